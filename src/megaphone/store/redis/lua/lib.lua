-- shared by the scripts that need them: stream ids, and the channel keys' safety TTL
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function gt(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am > bm or (am == bm and as > bs)
end
local function after(id)
  local ms, seq = parse(id)
  return ms .. '-' .. (seq + 1)
end
local function expire_all(ms)
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ms) end
end
