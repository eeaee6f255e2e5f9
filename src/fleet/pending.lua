-- PENDING  KEYS: pending -> 1 while a write's token has not expired
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') > 0 and 1 or 0
