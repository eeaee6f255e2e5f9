-- PUT (after RUN)  KEYS: incarnation epoch, then for each page: gen pending page lock
-- ARGV: for each page: known_inc epoch gen owner value px
-- Stores each page only if no write began or ended since its lookup (same epoch and
-- generation, no pending write, as LOOKUP reads it) and Redis is still the incarnation its
-- lookup ran in (as LOOKUP checks it: a restart or failover may have lost increments); always
-- releases the lock its lookup took. value '' = release only. -> how many pages were stored
local n = (#KEYS - 2) / 4
local read, pending = {KEYS[1], KEYS[2]}, {}
for i = 1, n do
  read[2 * i + 1] = KEYS[4 * i - 1]
  read[2 * i + 2] = KEYS[4 * i + 2]
  pending[i] = KEYS[4 * i]
end
local v = redis.call('MGET', unpack(read))
local inc, epoch = v[1], v[2] or '0'
local live = of_run(inc, run_id())
local some_pending = redis.call('EXISTS', unpack(pending)) > 0
local stored, unlock = 0, {}
for i = 1, n do
  local a = 6 * (i - 1)
  if live and inc == ARGV[a + 1] and ARGV[a + 5] ~= '' and epoch == ARGV[a + 2]
      and (v[2 * i + 1] or '0') == ARGV[a + 3]
      and not (some_pending and redis.call('EXISTS', KEYS[4 * i]) == 1) then
    redis.call('SET', KEYS[4 * i + 1], ARGV[a + 5], 'PX', ARGV[a + 6])
    stored = stored + 1
  end
  if v[2 * i + 2] == ARGV[a + 4] then unlock[#unlock + 1] = KEYS[4 * i + 2] end
end
if #unlock > 0 then redis.call('DEL', unpack(unlock)) end
return stored
