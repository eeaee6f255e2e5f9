-- A create on every request: POST {"project_ids":["<BENCH_PROJECT_ID>"]} to the list URL
-- given to wrk (permgate checks the body, then forwards it; the client needs can_write).
-- The request is built once by wrk from the fields below. BENCH_PAUSE_MS > 0: each connection
-- waits that long after an answer before its next request (wrk's latency excludes the wait),
-- so writes arrive at about a steady rate instead of back to back.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

wrk.method = "POST"
wrk.body = string.format('{"project_ids":["%s"]}', os.getenv("BENCH_PROJECT_ID") or "proj_bench")
wrk.headers["Content-Type"] = "application/json"

local pause = tonumber(os.getenv("BENCH_PAUSE_MS") or "0")
if pause > 0 then
  function delay()
    return pause
  end
end
