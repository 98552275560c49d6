-- KEYS m p w i; ARGV now ttl → {0} gone, {1, next check ms} not due, {2, addr, created, lost}
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local now = tonumber(ARGV[1])
local exp = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if redis.call('HEXISTS', KEYS[1], 'reader') == 1 then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease'))
  if lease > now then return {1, lease + tonumber(ARGV[2])} end
  exp = math.max(exp, lease + tonumber(ARGV[2]))
end
if exp > now then return {1, exp} end
local info = redis.call('HMGET', KEYS[1], 'addr', 'created', 'np')
local lost = tonumber(info[3]) + redis.call('LLEN', KEYS[3])
redis.call('DEL', unpack(KEYS))
return {2, info[1], info[2], lost}
