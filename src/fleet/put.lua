-- PUT (after RUN)  KEYS: epoch gen pending incarnation
-- ARGV: prefix cp_and_query owner epoch gen value px known_inc
-- Stores the page only if no write began or ended since the lookup (same epoch and
-- generation, no pending write) and Redis is still the incarnation the lookup ran in (as
-- LOOKUP checks it: a restart or failover may have lost increments); always releases the
-- caller's lock. value '' = release only.
local inc = redis.call('GET', KEYS[4])
local same = inc == ARGV[8] and of_run(inc, run_id())
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = ARGV[4] .. ':' .. ARGV[5] .. ':' .. ARGV[2]
local stored = 0
if same and ARGV[6] ~= '' and (redis.call('GET', KEYS[1]) or '0') == ARGV[4]
    and (redis.call('GET', KEYS[2]) or '0') == ARGV[5]
    and redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') == 0 then
  redis.call('SET', ARGV[1] .. 'page:' .. s, ARGV[6], 'PX', ARGV[7])
  stored = 1
end
local lock = ARGV[1] .. 'lock:' .. s
if redis.call('GET', lock) == ARGV[3] then redis.call('DEL', lock) end
return stored
