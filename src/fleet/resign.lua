-- RESIGN  KEYS: acks leases   ARGV: id channel
-- A replica leaving after its drain (it serves nothing from here on): its lease ends now, so no
-- later write waits for it (RENEW's sweep removes it and its ack a minute on), and it counts as
-- having applied every invalidation, so writes already waiting for it stop waiting, and a
-- renewal of it still under way cannot take the lease back (RENEW checks that mark). Whatever
-- incarnation its last renewal saw: leaving is safe in any. Also without a lease entry (its
-- first renewal still on its way, or swept after a long outage): the entry, ended, is what
-- lets RENEW's sweep remove the mark later.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZADD', KEYS[1], 'inf', ARGV[1])
redis.call('PUBLISH', ARGV[2], 'resigned')
return 1
