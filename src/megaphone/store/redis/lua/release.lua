-- KEYS m p w; ARGV token now ttl safety → 1 released, 0 not ours
-- needs lib.lua
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'reader', 'lease')
redis.call('HSET', KEYS[1], 'exp', tonumber(ARGV[2]) + tonumber(ARGV[3]))
expire_all(ARGV[4])
return 1
