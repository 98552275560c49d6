-- KEYS m p w i; ARGV eid line capacity ticket now enqueue notify safety capacity_bytes overhead
-- idempotency_key idempotency_ttl idempotency_max → 1 written, 0 no room (queued if enqueue),
-- -1 no such channel, 2 a write with this idempotency key was applied already (nothing written)
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local now = tonumber(ARGV[5])
local idem = ARGV[11]
if idem ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZSCORE', KEYS[4], idem) then return 2 end
end
while true do
  local head = redis.call('LINDEX', KEYS[3], 0)
  if not head then break end
  if tonumber(string.match(head, '^(%d+):')) < now then redis.call('LPOP', KEYS[3]) else break end
end
local head = redis.call('LINDEX', KEYS[3], 0)
local queued_before = head and head ~= ARGV[4]
local np = tonumber(redis.call('HGET', KEYS[1], 'np'))
local size = #ARGV[2] + tonumber(ARGV[10])
local full = np >= tonumber(ARGV[3]) or
  (np > 0 and tonumber(redis.call('HGET', KEYS[1], 'pb') or '0') + size > tonumber(ARGV[9]))
if queued_before or full then
  if ARGV[6] == '1' then
    redis.call('RPUSH', KEYS[3], ARGV[4])
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
  return 0
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[1], 'l', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'np', 1)
redis.call('HINCRBY', KEYS[1], 'pb', size)
if head == ARGV[4] then redis.call('LPOP', KEYS[3]) end
if idem ~= '' then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[12]), idem)
  if redis.call('ZCARD', KEYS[4]) > tonumber(ARGV[13]) then
    redis.call('ZREMRANGEBYRANK', KEYS[4], 0, 0)
  end
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
end
-- wake the reader only if it waits: after each take it arms ``wk``, and one notification per
-- take is enough, whatever was written meanwhile
if redis.call('HGET', KEYS[1], 'wk') == '1' and redis.call('HEXISTS', KEYS[1], 'reader') == 1 then
  redis.call('HDEL', KEYS[1], 'wk')
  redis.call('PUBLISH', ARGV[7], '')
end
if redis.call('PTTL', KEYS[2]) < 0 then
  redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1]))
end
return 1
