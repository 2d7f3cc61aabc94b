-- The dead-letter stream: envelopes the hub dropped, with why, so they can be read and replayed
-- once the cause is fixed. Every key shares the slot of the stream (`{prostaff:events:dead}…`
-- hashes like `prostaff:events:dead`), so this runs unchanged on a Redis Cluster.
--
-- KEYS: 1 the stream, 2 counts per reason (HASH), 3 (add only) the claim of this drop
-- ARGV: 1 op, then per op:
--   add     2 MAXLEN (approximate), 3 claim TTL ms, 4 reason label, 5.. field, value pairs
--           Every instance sees the same pub/sub message and drops it: the first claim writes.
--   list    2 how many of the newest entries → {length, reason, count, …, "|", id, n, f, v, …}
--   replay  2 entry id → drop its claim, PUBLISH its envelope on its channel, delete it
local STREAM, COUNTS = KEYS[1], KEYS[2]
local op = ARGV[1]

if op == 'add' then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3]) then
    return { 'duplicate' }
  end
  local fields = {}
  for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
  local id = redis.call('XADD', STREAM, 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
  redis.call('HINCRBY', COUNTS, ARGV[4], 1)
  return { 'ok', id }
elseif op == 'list' then
  local out = { tostring(redis.call('XLEN', STREAM)) }
  local counts = redis.call('HGETALL', COUNTS)
  for i = 1, #counts do out[#out + 1] = counts[i] end
  out[#out + 1] = '|'
  for _, entry in ipairs(redis.call('XREVRANGE', STREAM, '+', '-', 'COUNT', ARGV[2])) do
    out[#out + 1] = entry[1]
    out[#out + 1] = tostring(#entry[2] / 2)
    for _, v in ipairs(entry[2]) do out[#out + 1] = v end
  end
  return out
elseif op == 'replay' then
  local entries = redis.call('XRANGE', STREAM, ARGV[2], ARGV[2])
  if #entries == 0 then return { 'missing' } end
  local f = {}
  local raw = entries[1][2]
  for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
  if not f.envelope or not f.channel or string.sub(f.channel, 1, 16) ~= 'prostaff:events:' then
    return { 'not_kept' }
  end
  -- A replay that fails the same way again must be kept again: its claim goes first.
  if f.claim and string.sub(f.claim, 1, 29) == '{prostaff:events:dead}:claim:' then
    redis.call('DEL', f.claim)
  end
  local receivers = redis.call('PUBLISH', f.channel, f.envelope)
  redis.call('XDEL', STREAM, ARGV[2])
  return { 'ok', tostring(receivers) }
end
return redis.error_reply('unknown op')
