-- PUBLISH  KEYS: incarnation acks epoch seq inv leases gen pending
-- ARGV: lease_ms target op token pending_ms maxlen
--   op: begin (gen+1, add the write's pending token) | end (gen+1, drop it)
--       | keep (gen+1, token left to expire: outcome unknown) | purge (gen+1, or epoch+1 for '*')
-- -> {seq, now, fence, incarnation, {id, deadline, id, deadline, ...}}
local now = now_ms()
local inc = ensure(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], now)
local op = ARGV[3]
if ARGV[2] == '*' then redis.call('INCR', KEYS[3]) else redis.call('INCR', KEYS[7]) end
if op == 'begin' then
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now)
  local ms = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[8], now + ms, ARGV[4])
  -- The set lives as long as its longest token: a write with a shorter deadline (another
  -- replica's upstream settings) must not cut short one already pending.
  if redis.call('PTTL', KEYS[8]) < ms then redis.call('PEXPIRE', KEYS[8], ms) end
elseif op == 'end' then
  redis.call('ZREM', KEYS[8], ARGV[4])
end
local seq = redis.call('INCR', KEYS[4])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], seq .. '-0', 'c', ARGV[2])
local fence = tonumber(string.match(inc, ':(%d+)$')) + tonumber(ARGV[1])
return {seq, now, fence, inc, redis.call('ZRANGEBYSCORE', KEYS[6], '(' .. now, '+inf', 'WITHSCORES')}
