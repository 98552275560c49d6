-- KEYS m p w i; ARGV notify → {0} gone, {1, lost}
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local lost = tonumber(redis.call('HGET', KEYS[1], 'np')) + redis.call('LLEN', KEYS[3])
redis.call('DEL', unpack(KEYS))
redis.call('PUBLISH', ARGV[1], 'd')
return {1, lost}
