-- Every request a new cache key: ?after=BENCH_RUN_ID-<counter> on one checkpoint
-- (BENCH_RUN_ID must differ between runs against the same server), plus BENCH_QUERY_EXTRA
-- (e.g. "&limit=100"). Both permgate and nginx key their caches on the query, so each
-- request is a miss that goes upstream.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local run = os.getenv("BENCH_RUN_ID") or tostring(os.time())
local extra = os.getenv("BENCH_QUERY_EXTRA") or ""
local base = "/v1/fine_tuning/checkpoints/ft:bench:miss/permissions?after=" .. run .. "-"
local n = 0

function request()
  n = n + 1
  return wrk.format(nil, base .. n .. extra)
end
