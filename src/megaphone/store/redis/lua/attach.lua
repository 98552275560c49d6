-- KEYS m p w; ARGV token now lease after safety overhead → {status, start id, dl}; status -1 gone,
-- -2 busy, 0 no cursor, 1 resumed, 2 unknown cursor. A cursor confirms the sent events up to it; no
-- cursor confirms them all (such a reader cannot resume). dl: the last event sent before this
-- read (what the read gets up to it is replayed).
-- needs lib.lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local now = tonumber(ARGV[2])
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease') or '0')
if redis.call('HEXISTS', KEYS[1], 'reader') == 1 and lease > now then return {-2, ''} end
redis.call('HSET', KEYS[1], 'reader', ARGV[1], 'lease', now + tonumber(ARGV[3]))
expire_all(ARGV[5])
local dl = redis.call('HGET', KEYS[1], 'dl')
if ARGV[4] == '' then
  redis.call('XTRIM', KEYS[2], 'MINID', after(dl))
  redis.call('HSET', KEYS[1], 'ns', 0, 'sb', 0)
  return {0, dl, dl}
end
local sent = redis.call('XRANGE', KEYS[2], '-', dl)
local bytes = 0
for i = 1, #sent do
  local id, fields = sent[i][1], sent[i][2]
  bytes = bytes + #fields[4] + tonumber(ARGV[6])
  if fields[2] == ARGV[4] then
    redis.call('XTRIM', KEYS[2], 'MINID', after(id))
    redis.call('HSET', KEYS[1], 'confirmed', ARGV[4])
    redis.call('HINCRBY', KEYS[1], 'ns', -i)
    redis.call('HINCRBY', KEYS[1], 'sb', -bytes)
    return {1, id, dl}
  end
end
if redis.call('HGET', KEYS[1], 'confirmed') == ARGV[4] then return {1, '-', dl} end
return {2, '-', dl}
