-- PUT (after RUN)  KEYS: incarnation epoch, then for each page: gen pending page lock staged
-- ARGV: for each page: known_inc epoch gen owner staged(1|0)
-- Makes each staged page (written just before by a plain SET, with its expiry, where no lookup
-- reads) the shared page, only if no write began or ended since its lookup (same epoch and
-- generation, no pending write, as LOOKUP reads it) and Redis is still the incarnation its
-- lookup ran in (as LOOKUP checks it: a restart or failover may have lost increments); drops
-- it otherwise. Always releases the lock its lookup took. -> how many pages were stored
local n = (#KEYS - 2) / 5
local read, pending = {KEYS[1], KEYS[2]}, {}
for i = 1, n do
  read[2 * i + 1] = KEYS[5 * i - 2]
  read[2 * i + 2] = KEYS[5 * i + 1]
  pending[i] = KEYS[5 * i - 1]
end
local v = redis.call('MGET', unpack(read))
local inc, epoch = v[1], v[2] or '0'
local live = of_run(inc, run_id())
local some_pending = redis.call('EXISTS', unpack(pending)) > 0
local stored, drop = 0, {}
for i = 1, n do
  local a, staged = 5 * (i - 1), KEYS[5 * i + 2]
  if ARGV[a + 5] == '1' then
    -- RENAME fails (and nothing is stored) if the staged page is gone, e.g. already expired.
    if live and inc == ARGV[a + 1] and epoch == ARGV[a + 2]
        and (v[2 * i + 1] or '0') == ARGV[a + 3]
        and not (some_pending and redis.call('EXISTS', KEYS[5 * i - 1]) == 1)
        and not redis.pcall('RENAME', staged, KEYS[5 * i]).err then
      stored = stored + 1
    else
      drop[#drop + 1] = staged
    end
  end
  if v[2 * i + 2] == ARGV[a + 4] then drop[#drop + 1] = KEYS[5 * i + 1] end
end
if #drop > 0 then redis.call('DEL', unpack(drop)) end
return stored
