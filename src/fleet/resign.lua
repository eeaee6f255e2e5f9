-- RESIGN  KEYS: incarnation acks leases   ARGV: id known_inc channel
-- A replica leaving after its drain (it serves nothing from here on): its lease ends now, so no
-- later write waits for it (RENEW's sweep removes it a minute on); in its incarnation it counts
-- as having applied every invalidation, so writes already waiting for it stop waiting, and a
-- renewal of it still under way cannot take the lease back (RENEW checks that mark).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[3], 'XX', now, ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('ZADD', KEYS[2], 'inf', ARGV[1])
  redis.call('PUBLISH', ARGV[3], 'resigned')
end
return 1
