-- LOOKUP  KEYS: epoch gen pending incarnation
-- ARGV: prefix cp_and_query owner lock_ms mode known_inc
-- A miss's one call before upstream. mode: page (the shared page, else try the fetch lock)
-- | lock (only the lock: the shared copy was too old).
-- -> {epoch, gen, pending 0|1, locked 0|1, page or false}
-- Answers "pending" (fetch, store nothing) unless this Redis is the incarnation the caller
-- renewed with, as ENSURE would find it: after a restart or failover (a new run_id) epoch and
-- gen may have lost increments while older pages survived, until a renewal moves the epoch.
local ok, info = pcall(redis.call, 'INFO', 'server')
local run = (ok and string.match(info, 'run_id:(%w+)')) or 'norunid'
local inc = redis.call('GET', KEYS[4])
if not inc or inc ~= ARGV[6] or string.sub(inc, 1, #run + 1) ~= run .. ':' then
  return {'0', '0', 1, 0, false}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('GET', KEYS[1]) or '0'
local gen = redis.call('GET', KEYS[2]) or '0'
if redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') > 0 then return {epoch, gen, 1, 0, false} end
local s = epoch .. ':' .. gen .. ':' .. ARGV[2]
if ARGV[5] == 'page' then
  local page = redis.call('GET', ARGV[1] .. 'page:' .. s)
  if page then return {epoch, gen, 0, 0, page} end
end
local locked = redis.call('SET', ARGV[1] .. 'lock:' .. s, ARGV[3], 'NX', 'PX', ARGV[4])
return {epoch, gen, 0, locked and 1 or 0, false}
