-- KEYS m p; ARGV token from count window window_bytes overhead now lease safety →
-- {code, new, id1, line1, id2, line2, ...}; code -1 lease lost, 0 ok, 2 the replay window is full
-- (the read must end so that the next one confirms it). Marks the returned events as sent; with
-- the window off (size 0) sent events are trimmed at once. Renews the lease (and the keys' safety
-- TTL when half of it has passed). The channel's fields are read in one HMGET, written in one HSET.
-- needs lib.lua
local meta = redis.call('HMGET', KEYS[1], 'reader', 'ns', 'sb', 'dl', 'np', 'pb')
if meta[1] ~= ARGV[1] then return {-1, 0} end
local start = ARGV[2]
if start ~= '-' then start = '(' .. start end
local entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[3])
local out = {0, 0}
local window, window_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local overhead = tonumber(ARGV[6])
local ns, sb, dl = tonumber(meta[2] or '0'), tonumber(meta[3] or '0'), meta[4]
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
local lease = tonumber(ARGV[7]) + tonumber(ARGV[8])
if new > 0 then
  local pending = tonumber(meta[5]) - new
  local pb = tonumber(meta[6] or '0') - bytes
  if window > 0 then
    redis.call('HSET', KEYS[1], 'wk', '1', 'lease', lease, 'np', pending, 'pb', pb, 'dl', last,
               'ns', ns, 'sb', sb)
  else
    redis.call('HSET', KEYS[1], 'wk', '1', 'lease', lease, 'np', pending, 'pb', pb, 'dl', last)
    redis.call('XTRIM', KEYS[2], 'MAXLEN', pending)
  end
else
  redis.call('HSET', KEYS[1], 'wk', '1', 'lease', lease)
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[9]) / 2 then expire_all(ARGV[9]) end
return out
