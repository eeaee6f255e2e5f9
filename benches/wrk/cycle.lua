-- Cycles through BENCH_KEYS distinct list URLs (one checkpoint each, named
-- BENCH_CHECKPOINT_PREFIX<i>), with BENCH_QUERY appended (e.g. "?limit=100"), starting after
-- key BENCH_OFFSET (so that successive runs can continue where the last one stopped).
-- The requests are built once in init(), so the per-request cost in wrk is a table lookup.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local keys = tonumber(os.getenv("BENCH_KEYS") or "10000")
local prefix = os.getenv("BENCH_CHECKPOINT_PREFIX") or "ft:bench:k"
local query = os.getenv("BENCH_QUERY") or ""
local requests = {}
local i = tonumber(os.getenv("BENCH_OFFSET") or "0") % keys

function init(args)
  for k = 1, keys do
    local path = string.format("/v1/fine_tuning/checkpoints/%s%06d/permissions%s", prefix, k, query)
    requests[k] = wrk.format(nil, path)
  end
end

function request()
  i = i % keys + 1
  return requests[i]
end
