-- ENSURE (prefix of RENEW and PUBLISH)
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- "<run_id>:<created_ms>": new when Redis restarted (run_id), failed over, or lost the key.
local function ensure(k_inc, k_acks, k_epoch, k_seq, k_inv, now)
  local ok, info = pcall(redis.call, 'INFO', 'server')
  local run = (ok and string.match(info, 'run_id:(%w+)')) or 'norunid'
  local inc = redis.call('GET', k_inc)
  if inc and string.sub(inc, 1, #run + 1) == run .. ':' then return inc end
  inc = run .. ':' .. now
  redis.call('SET', k_inc, inc)
  redis.call('DEL', k_acks, k_seq, k_inv)   -- a fresh sequence space; old acks mean nothing
  redis.call('INCR', k_epoch)               -- shared pages restored from a snapshot: unreachable
  return inc
end
