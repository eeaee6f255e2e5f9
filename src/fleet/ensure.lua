-- ENSURE (prefix of RENEW and PUBLISH, after RUN)
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- "<run_id>:<created_ms>": new when Redis restarted (run_id), failed over, or lost the key.
local function ensure(k_inc, k_acks, k_epoch, k_seq, k_inv, now)
  local run = run_id()
  local inc = redis.call('GET', k_inc)
  if of_run(inc, run) then return inc end
  inc = run .. ':' .. now
  redis.call('SET', k_inc, inc)
  redis.call('DEL', k_acks, k_seq, k_inv)   -- a fresh sequence space; old acks mean nothing
  redis.call('INCR', k_epoch)               -- shared pages restored from a snapshot: unreachable
  return inc
end
