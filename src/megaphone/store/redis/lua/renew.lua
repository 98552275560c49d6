-- KEYS m p; ARGV token now lease safety → 1 renewed, 0 not ours (lost): a reader whose sink
-- cannot take events keeps its lease, and is disarmed (``wk`` 0): writes no longer hand it their
-- events (write.lua) nor wake it; its sink's draining does, with a take (which arms it again)
-- needs lib.lua
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', tonumber(ARGV[2]) + tonumber(ARGV[3]), 'wk', '0')
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) / 2 then expire_all(ARGV[4]) end
return 1
