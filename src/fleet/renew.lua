-- RENEW  KEYS: incarnation acks epoch seq inv leases   ARGV: id lease_ms known_inc applied
-- -> {incarnation, seq, live_replicas}
local now = now_ms()
local inc = ensure(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], now)
-- A replica that resigned (RESIGN marked it acknowledged to infinity) takes no lease again.
if redis.call('ZSCORE', KEYS[2], ARGV[1]) ~= 'inf' then
  redis.call('ZADD', KEYS[6], 'GT', now + tonumber(ARGV[2]), ARGV[1])
end
if inc == ARGV[3] then redis.call('ZADD', KEYS[2], 'GT', ARGV[4], ARGV[1]) end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now - 60000, 'LIMIT', 0, 16)) do
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZREM', KEYS[2], id)
end
return {inc, tonumber(redis.call('GET', KEYS[4]) or '0'), redis.call('ZCOUNT', KEYS[6], '(' .. now, '+inf')}
