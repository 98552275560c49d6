-- KEYS m p; ARGV token now lease safety → 1 renewed, 0 not ours (lost): a reader whose sink
-- cannot take events keeps its lease
-- needs lib.lua
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', tonumber(ARGV[2]) + tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) / 2 then expire_all(ARGV[4]) end
return 1
