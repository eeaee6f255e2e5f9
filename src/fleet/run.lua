-- RUN (prefix of every script that checks the incarnation)
-- This Redis process's run_id ('norunid' where scripts may not call INFO or it names none: a
-- replica probes for that at each connect and then takes no lease): a restart or a failover
-- changes it. A plain find, then the id where it stands: no pattern scan of INFO.
local function run_id()
  local ok, info = pcall(redis.call, 'INFO', 'server')
  local at = ok and string.find(info, 'run_id:', 1, true)
  return at and string.match(info, '^%w+', at + 7) or 'norunid'
end
-- Whether the incarnation `inc` (as ENSURE names it) belongs to the process with id `run`.
local function of_run(inc, run)
  return inc and string.sub(inc, 1, #run + 1) == run .. ':'
end
