-- Presence of one topic. KEYS[1] = `pr:{topic}:h`, a hash
--   phx_ref -> "<written_at_ms>|<key as JSON>\n<meta as JSON>"
-- A phx_ref is "<instance>-<n>": the instance that tracks it. ARGV[1] = op, ARGV[2] = the pub/sub
-- channel every instance listens on for this topic's `presence_diff`.
--
-- Ops (each one atomic, each publishing at most one diff, in the Phoenix wire format
-- {"joins": {key: {"metas": [meta, ...]}}, "leaves": {...}}):
--   flush  ARGV[3] = member cap, ARGV[4] = n, ARGV[5..4+n] = refs that left,
--          then (ref, key, meta) triples that joined. Returns the refs refused by the cap.
--   sync   ARGV[3] = member cap, ARGV[4] = instance, then (ref, key, meta) triples: the whole
--          of what this instance tracks here. Its other refs leave; missing ones join; every
--          one of its entries is rewritten with Redis's time (so an earlier sweep cannot remove
--          it). Returns the refused refs.
--   sweep  ARGV[3] = dead instance, ARGV[4] = claimed_at: its entries written before the claim
--          leave. Returns how many left.
--   state  returns a flat list ref, value, ref, value, ...
local h = KEYS[1]
local op = ARGV[1]
local channel = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local joins, leaves = {}, {}
local changed = false

local function add(diff, key, meta)
  local metas = diff[key]
  if not metas then
    metas = {}
    diff[key] = metas
  end
  metas[#metas + 1] = meta
  changed = true
end

local function encode(diff)
  local parts = {}
  for key, metas in pairs(diff) do
    parts[#parts + 1] = key .. ':{"metas":[' .. table.concat(metas, ',') .. ']}'
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

local function parse(value)
  local written, key, meta = string.match(value, '^(%d+)|([^\n]*)\n(.*)$')
  return tonumber(written), key, meta
end

local function leave(ref)
  local value = redis.call('HGET', h, ref)
  if value then
    redis.call('HDEL', h, ref)
    local _, key, meta = parse(value)
    add(leaves, key, meta)
  end
end

local function publish()
  if changed then
    redis.call('PUBLISH', channel, '{"joins":' .. encode(joins) .. ',"leaves":' .. encode(leaves) .. '}')
  end
end

-- Writes (ref, key, meta) triples from ARGV[first..]; existing ones are refreshed without a diff.
local function join_all(first, cap)
  local refused = {}
  local size = redis.call('HLEN', h)
  for i = first, #ARGV, 3 do
    local ref, key, meta = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local value = now .. '|' .. key .. '\n' .. meta
    if redis.call('HEXISTS', h, ref) == 1 then
      redis.call('HSET', h, ref, value)
    elseif size >= cap then
      refused[#refused + 1] = ref
    else
      redis.call('HSET', h, ref, value)
      size = size + 1
      add(joins, key, meta)
    end
  end
  return refused
end

local function starts_with(text, prefix)
  return string.sub(text, 1, #prefix) == prefix
end

if op == 'flush' then
  local n = tonumber(ARGV[4])
  for i = 5, 4 + n do
    leave(ARGV[i])
  end
  local refused = join_all(5 + n, tonumber(ARGV[3]))
  publish()
  return refused
elseif op == 'sync' then
  local prefix = ARGV[4] .. '-'
  local wanted = {}
  for i = 5, #ARGV, 3 do
    wanted[ARGV[i]] = true
  end
  for _, ref in ipairs(redis.call('HKEYS', h)) do
    if starts_with(ref, prefix) and not wanted[ref] then
      leave(ref)
    end
  end
  local refused = join_all(5, tonumber(ARGV[3]))
  publish()
  return refused
elseif op == 'sweep' then
  local prefix = ARGV[3] .. '-'
  local claimed_at = tonumber(ARGV[4])
  local gone = 0
  for _, ref in ipairs(redis.call('HKEYS', h)) do
    if starts_with(ref, prefix) then
      local written = parse(redis.call('HGET', h, ref))
      if written == nil or written < claimed_at then
        leave(ref)
        gone = gone + 1
      end
    end
  end
  publish()
  return gone
elseif op == 'state' then
  return redis.call('HGETALL', h)
end
return redis.error_reply('unknown presence op')
