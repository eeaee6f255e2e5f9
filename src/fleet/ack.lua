-- ACK  KEYS: incarnation acks   ARGV: id seq known_inc channel
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return 0 end   -- ack from an older incarnation
redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[1])          -- monotonic: a late, lower ack cannot regress it
redis.call('PUBLISH', ARGV[4], ARGV[2])                     -- wakes waiting writers
return 1
