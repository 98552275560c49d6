-- KEYS m p w i; ARGV eid line capacity ticket now enqueue notify safety capacity_bytes overhead
-- idempotency_key idempotency_ttl idempotency_max window window_bytes → 1 written, 0 no room
-- (queued if enqueue), -1 no such channel, 2 a write with this idempotency key was applied
-- already (nothing written). Six calls for a write that wakes nobody (the channel's fields are
-- read in one HMGET and written in one HSET).
local meta = redis.call('HMGET', KEYS[1], 'np', 'pb', 'wk', 'reader', 'ns', 'sb', 'dl')
if not meta[1] then return -1 end
local now = tonumber(ARGV[5])
local idem = ARGV[11]
if idem ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZSCORE', KEYS[4], idem) then return 2 end
end
-- tickets of writers whose wait is over are dropped from the head of the queue
local head = redis.call('LINDEX', KEYS[3], 0)
while head and tonumber(string.match(head, '^(%d+):')) < now do
  redis.call('LPOP', KEYS[3])
  head = redis.call('LINDEX', KEYS[3], 0)
end
local np, pb = tonumber(meta[1]), tonumber(meta[2] or '0')
local size = #ARGV[2] + tonumber(ARGV[10])
local full = np >= tonumber(ARGV[3]) or (np > 0 and pb + size > tonumber(ARGV[9]))
if (head and head ~= ARGV[4]) or full then
  if ARGV[6] == '1' then
    redis.call('RPUSH', KEYS[3], ARGV[4])
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
  return 0
end
local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[1], 'l', ARGV[2])
if head == ARGV[4] then redis.call('LPOP', KEYS[3]) end
local window, window_bytes = tonumber(ARGV[14]), tonumber(ARGV[15])
local ns, sb = tonumber(meta[5] or '0'), tonumber(meta[6] or '0')
if meta[3] == '1' and meta[4] and np == 0 and window > 0
   and not (ns > 0 and (ns >= window or sb + size > window_bytes)) then
  -- the reader waits and has everything before this event (its last take left nothing pending):
  -- hand the event over in the notification, marked as sent as a take would (it stays in the
  -- replay window, so a reader that cannot use the push takes it again), and stay armed.
  -- "<reader token> <previous dl> <id> <window now full: 1|0> <line>": the node delivers it only
  -- to that lease's reader, and only if it holds every event up to the previous dl
  ns, sb = ns + 1, sb + size
  if ns >= window then
    redis.call('HSET', KEYS[1], 'dl', id, 'ns', ns, 'sb', sb, 'wk', '0')
  else
    redis.call('HSET', KEYS[1], 'dl', id, 'ns', ns, 'sb', sb)
  end
  redis.call('PUBLISH', ARGV[7], meta[4] .. ' ' .. meta[7] .. ' ' .. id .. ' '
             .. (ns >= window and '1' or '0') .. ' ' .. ARGV[2])
elseif meta[3] == '1' and meta[4] then
  -- wake the reader only if it waits: after each take it arms ``wk``, and one notification per
  -- take is enough, whatever was written meanwhile
  redis.call('HSET', KEYS[1], 'np', np + 1, 'pb', pb + size, 'wk', '0')
  redis.call('PUBLISH', ARGV[7], '')
else
  redis.call('HSET', KEYS[1], 'np', np + 1, 'pb', pb + size)
end
if idem ~= '' then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[12]), idem)
  if redis.call('ZCARD', KEYS[4]) > tonumber(ARGV[13]) then
    redis.call('ZREMRANGEBYRANK', KEYS[4], 0, 0)
  end
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
end
-- the stream may have just been made by XADD: it lives as long as the channel's hash
if np == 0 and redis.call('PTTL', KEYS[2]) < 0 then
  redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1]))
end
return 1
