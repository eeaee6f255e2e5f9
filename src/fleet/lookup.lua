-- LOOKUP (after RUN)  KEYS: incarnation epoch gen pending
-- ARGV: prefix cp_and_query owner lock_ms mode known_inc fresh_since_200 fresh_since_404
-- A miss's one call before upstream. mode: page (the shared page if it is still fresh, else
-- try the fetch lock) | lock (only the lock: a no-cache read). A shared page is fresh while
-- it was fetched (its first 8 bytes: unix ms, big-endian; then 2 bytes of status) at or after
-- fresh_since for its status (unix ms by the caller's clock); Redis keeps it through the stale
-- windows, but past its TTL it is as good as none, so the lock is tried in this same call.
-- -> {epoch, gen, pending 0|1, locked 0|1, page or false}
-- Answers "pending" (fetch, store nothing) unless this Redis is the incarnation the caller
-- renewed with, as ENSURE would find it: after a restart or failover (a new run_id) epoch and
-- gen may have lost increments while older pages survived, until a renewal moves the epoch.
-- A write is pending while its checkpoint's pending set exists: the set holds every live
-- token, and a token past its deadline stays in it only until PUBLISH clears it or the set
-- expires, so existence errs on the side of "pending" (and needs no clock).
local v = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3])
if v[1] ~= ARGV[6] or not of_run(v[1], run_id()) then
  return {'0', '0', 1, 0, false}
end
local epoch, gen = v[2] or '0', v[3] or '0'
if redis.call('EXISTS', KEYS[4]) == 1 then return {epoch, gen, 1, 0, false} end
local s = epoch .. ':' .. gen .. ':' .. ARGV[2]
if ARGV[5] == 'page' then
  local page = redis.call('GET', ARGV[1] .. 'page:' .. s)
  if page and #page >= 10 then
    local fetched = 0
    for i = 1, 8 do fetched = fetched * 256 + string.byte(page, i) end
    local status = string.byte(page, 9) * 256 + string.byte(page, 10)
    if fetched >= tonumber(status == 200 and ARGV[7] or ARGV[8]) then
      return {epoch, gen, 0, 0, page}
    end
  end
end
local locked = redis.call('SET', ARGV[1] .. 'lock:' .. s, ARGV[3], 'NX', 'PX', ARGV[4])
return {epoch, gen, 0, locked and 1 or 0, false}
