-- KEYS m p; ARGV token from count window window_bytes overhead now lease safety →
-- {code, new, id1, line1, id2, line2, ...}; code -1 lease lost, 0 ok, 2 the replay window is full
-- (the read must end so that the next one confirms it). Marks the returned events as sent; with
-- the window off (size 0) sent events are trimmed at once. Renews the lease (and the keys' safety
-- TTL when half of it has passed).
-- needs lib.lua
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return {-1, 0} end
local start = ARGV[2]
if start ~= '-' then start = '(' .. start end
local entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[3])
local out = {0, 0}
redis.call('HSET', KEYS[1], 'wk', '1', 'lease', tonumber(ARGV[7]) + tonumber(ARGV[8]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[9]) / 2 then expire_all(ARGV[9]) end
local window, window_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local overhead = tonumber(ARGV[6])
local ns = tonumber(redis.call('HGET', KEYS[1], 'ns') or '0')
local sb = tonumber(redis.call('HGET', KEYS[1], 'sb') or '0')
local dl = redis.call('HGET', KEYS[1], 'dl')
local new, bytes, last = 0, 0, nil
for i = 1, #entries do
  local id, line = entries[i][1], entries[i][2][4]
  if gt(id, dl) then
    local size = #line + overhead
    if window > 0 and ns > 0 and (ns >= window or sb + size > window_bytes) then
      out[1] = 2
      break
    end
    new, bytes, last = new + 1, bytes + size, id
    if window > 0 then ns, sb = ns + 1, sb + size end
  end
  out[#out + 1] = id
  out[#out + 1] = line
end
if window > 0 and ns >= window then out[1] = 2 end
out[2] = new
if new > 0 then
  local pending = redis.call('HINCRBY', KEYS[1], 'np', -new)
  redis.call('HINCRBY', KEYS[1], 'pb', -bytes)
  redis.call('HSET', KEYS[1], 'dl', last)
  if window > 0 then
    redis.call('HSET', KEYS[1], 'ns', ns, 'sb', sb)
  else
    redis.call('XTRIM', KEYS[2], 'MAXLEN', pending)
  end
end
return out
