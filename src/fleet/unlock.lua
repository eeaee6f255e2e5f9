-- UNLOCK  KEYS: epoch, then for each lock: gen
-- ARGV: prefix, then for each lock: cp_and_query owner
-- Releases the fetch locks of lookups whose answers never reached their requests (cancelled
-- while the call was out), so the replica never learned the epoch and generation the lock was
-- taken in: each is looked for in the fleet's epoch and its checkpoint's generation as they
-- are now, and deleted if this owner holds it. One taken in an older generation is not found;
-- no lookup asks for it any more, and it runs out by itself. -> how many were released
local epoch = redis.call('GET', KEYS[1]) or '0'
local released = 0
for i = 2, #KEYS do
  local lock = ARGV[1] .. 'lock:' .. epoch .. ':' .. (redis.call('GET', KEYS[i]) or '0')
    .. ':' .. ARGV[2 * i - 2]
  if redis.call('GET', lock) == ARGV[2 * i - 1] then
    redis.call('DEL', lock)
    released = released + 1
  end
end
return released
