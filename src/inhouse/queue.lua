-- In-house queue state machine. Every transition of a queue runs here, atomically, on the Redis
-- server: validate, mutate, bump the version, PUBLISH the `queue_update`. The hub instances hold
-- no queue state of their own; they call this script and deliver what it publishes.
--
-- KEYS (one hash tag per organisation, whose single active queue they describe):
--   1 q       HASH  id, status (open|check_in|closed), deadline (RFC 3339 or ""), deadline_ms,
--                   fence (bumped at every check-in start), fired (fence of the last deadline
--                   that ran), since_ms (when check-in started), version
--   2 e       HASH  player_id -> JSON {"role": …, "checked_in": bool}
--   3 gone    SET   players who left or were removed at a deadline: a reconcile never re-adds them
--   4 closed  SET   ids of queues that closed: nothing reopens them (expires after CLOSED_TTL)
--   5 rl      ZSET  join_queue attempts (sliding log, scored by Redis time in ms)
-- ARGV: 1 op, 2 org_id, 3 pub/sub channel for queue_update, then the op's own arguments.
--
-- Returns {outcome, a, b}: outcome "ok" with a = summary JSON (or "" when there is no queue),
-- "err" with a = reason, "noop"/"ignored" when nothing changed. Ops that set a deadline return
-- b = "<fence>:<deadline_ms>" so the caller can index it for the deadline watchers.

local Q, E, GONE, CLOSED, RL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, org, channel = ARGV[1], ARGV[2], ARGV[3]
local CLOSED_TTL_MS = 7 * 24 * 3600 * 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), t
end

local function state()
  local raw = redis.call('HGETALL', Q)
  local q = {}
  for i = 1, #raw, 2 do q[raw[i]] = raw[i + 1] end
  return q
end

local function active(q)
  return q.id ~= nil and q.status ~= 'closed'
end

local function summary(q)
  local entries = {}
  local count = 0
  local raw = redis.call('HGETALL', E)
  for i = 1, #raw, 2 do
    entries[raw[i]] = cjson.decode(raw[i + 1])
    count = count + 1
  end
  local deadline = cjson.null
  if q.deadline ~= nil and q.deadline ~= '' then deadline = q.deadline end
  return {
    queue_id = q.id, org_id = org, status = q.status, check_in_deadline = deadline,
    player_count = count, entries = entries, version = tonumber(q.version or '0'),
  }
end

-- Bumps the version and publishes `queue_update {event, …summary, …extra}`; returns the summary.
local function changed(q, event, extra)
  q.version = tostring(redis.call('HINCRBY', Q, 'version', 1))
  local s = summary(q)
  local update = {}
  for k, v in pairs(s) do update[k] = v end
  update.event = event
  if extra then for k, v in pairs(extra) do update[k] = v end end
  redis.call('PUBLISH', channel, cjson.encode(update))
  return s
end

local function set_entry(player, role, checked_in)
  redis.call('HSET', E, player, cjson.encode({ role = role, checked_in = checked_in }))
end

-- Adds Rails' entries: missing players join (unless they left through the hub), check-ins only
-- ever turn on. Returns true when something changed.
local function merge_entries(list)
  local any = false
  for _, entry in ipairs(list) do
    local player = tostring(entry.player_id)
    local current = redis.call('HGET', E, player)
    if current then
      local e = cjson.decode(current)
      if entry.checked_in == true and e.checked_in ~= true then
        set_entry(player, e.role, true)
        any = true
      end
    elseif redis.call('SISMEMBER', GONE, player) == 0 then
      set_entry(player, entry.role or '', entry.checked_in == true)
      any = true
    end
  end
  return any
end

local function close(q, event, extra)
  q.status = 'closed'
  redis.call('HSET', Q, 'status', 'closed')
  local s = changed(q, event, extra)
  redis.call('SADD', CLOSED, q.id)
  redis.call('PEXPIRE', CLOSED, CLOSED_TTL_MS)
  redis.call('DEL', E, GONE)
  redis.call('PEXPIRE', Q, CLOSED_TTL_MS)
  return s
end

-- Makes `id` the org's active queue (closing another active one as "replaced").
local function create(q, id, status, deadline, deadline_ms, entries, now)
  if active(q) and q.id ~= id then
    close(q, 'queue_closed', { reason = 'replaced' })
  end
  redis.call('DEL', E, GONE)
  redis.call('PERSIST', Q)
  local fence = redis.call('HINCRBY', Q, 'fence', 1)
  redis.call('HSET', Q, 'id', id, 'status', status, 'deadline', deadline, 'deadline_ms', deadline_ms,
    'since_ms', now, 'fired', '0')
  local fresh = state()
  merge_entries(entries)
  if status == 'check_in' then
    return changed(fresh, 'queue_opened'), tostring(fence) .. ':' .. deadline_ms
  end
  return changed(fresh, 'queue_opened'), ''
end

local function start_check_in(q, deadline, deadline_ms, now)
  local fence = redis.call('HINCRBY', Q, 'fence', 1)
  redis.call('HSET', Q, 'status', 'check_in', 'deadline', deadline, 'deadline_ms', deadline_ms,
    'since_ms', now)
  q.status, q.deadline = 'check_in', deadline
  return changed(q, 'check_in_started'), tostring(fence) .. ':' .. deadline_ms
end

local q = state()

if op == 'snapshot' then
  if not active(q) then return { 'ok', '' } end
  return { 'ok', cjson.encode(summary(q)) }
end

if op == 'join' then
  local player, role = ARGV[4], ARGV[5]
  local max, window = tonumber(ARGV[6]), tonumber(ARGV[7])
  local now, t = now_ms()
  redis.call('ZREMRANGEBYSCORE', RL, '-inf', now - window)
  local attempts = redis.call('ZCARD', RL)
  if attempts >= max then return { 'err', 'rate_limited' } end
  redis.call('ZADD', RL, now, t[1] .. '.' .. t[2] .. '-' .. attempts)
  redis.call('PEXPIRE', RL, window)
  if not active(q) then return { 'err', 'no_active_queue' } end
  if q.status ~= 'open' then return { 'err', 'queue_not_open' } end
  set_entry(player, role, false)
  redis.call('SREM', GONE, player)
  return { 'ok', cjson.encode(changed(q, 'player_joined', { player_id = player })) }
end

if op == 'leave' then
  local player = ARGV[4]
  if not active(q) then return { 'err', 'no_active_queue' } end
  if redis.call('HDEL', E, player) == 1 then
    redis.call('SADD', GONE, player)
    return { 'ok', cjson.encode(changed(q, 'player_left', { player_id = player })) }
  end
  return { 'ok', cjson.encode(summary(q)) }
end

if op == 'checkin' then
  local player = ARGV[4]
  if not active(q) then return { 'err', 'no_active_queue' } end
  if q.status ~= 'check_in' then return { 'err', 'not_in_check_in_phase' } end
  local current = redis.call('HGET', E, player)
  if not current then return { 'err', 'player_not_in_queue' } end
  local e = cjson.decode(current)
  if e.checked_in == true then return { 'ok', cjson.encode(summary(q)) } end
  set_entry(player, e.role, true)
  return { 'ok', cjson.encode(changed(q, 'player_checked_in', { player_id = player })) }
end

-- Lifecycle events arrive on every instance: each op is idempotent, so only the first one
-- changes anything.
if op == 'open' then
  local id, entries = ARGV[4], cjson.decode(ARGV[5])
  if redis.call('SISMEMBER', CLOSED, id) == 1 then return { 'ignored', '' } end
  local now = now_ms()
  if active(q) and q.id == id then
    if merge_entries(entries) then return { 'ok', cjson.encode(changed(q, 'queue_synced')) } end
    return { 'noop', '' }
  end
  local s = create(q, id, 'open', '', '0', entries, now)
  return { 'ok', cjson.encode(s) }
end

if op == 'start_check_in' then
  local id, deadline, deadline_ms, entries = ARGV[4], ARGV[5], ARGV[6], cjson.decode(ARGV[7])
  if redis.call('SISMEMBER', CLOSED, id) == 1 then return { 'ignored', '' } end
  local now = now_ms()
  if active(q) and q.id == id then
    if q.status == 'check_in' and q.deadline_ms == deadline_ms then return { 'noop', '' } end
    local s, index = start_check_in(q, deadline, deadline_ms, now)
    return { 'ok', cjson.encode(s), index }
  end
  local s, index = create(q, id, 'check_in', deadline, deadline_ms, entries, now)
  return { 'ok', cjson.encode(s), index }
end

if op == 'close' then
  local id, reason = ARGV[4], ARGV[5]
  if not (active(q) and q.id == id) then return { 'noop', '' } end
  local fence = q.fence or '0'
  local s = close(q, 'queue_closed', { reason = reason })
  return { 'ok', cjson.encode(s), fence }
end

-- The check-in deadline. Fenced: it runs only for the check-in start that indexed it, only once,
-- and only when Redis's clock says the deadline passed, however many instances race for it.
if op == 'expire' then
  local fence = ARGV[4]
  if not (active(q) and q.status == 'check_in' and q.fence == fence and q.fired ~= fence) then
    return { 'stale', '' }
  end
  local now = now_ms()
  if now < tonumber(q.deadline_ms) then return { 'early', q.deadline_ms } end
  redis.call('HSET', Q, 'fired', fence)
  local removed = 0
  local raw = redis.call('HGETALL', E)
  for i = 1, #raw, 2 do
    if cjson.decode(raw[i + 1]).checked_in ~= true then
      redis.call('HDEL', E, raw[i])
      redis.call('SADD', GONE, raw[i])
      removed = removed + 1
    end
  end
  local checked = redis.call('HLEN', E)
  local extra = { removed_count = removed, checked_in_count = checked, queue_closed = checked < 2 }
  if checked < 2 then
    return { 'ok', cjson.encode(close(q, 'check_in_expired', extra)) }
  end
  return { 'ok', cjson.encode(changed(q, 'check_in_expired', extra)) }
end

-- A queue Rails lists (only `check_in` queues whose deadline is ahead, in practice). Merged,
-- never overwritten: a closed queue stays closed, players who left stay out, check-ins only turn
-- on, and a reconcile never moves a queue back from check_in to open.
if op == 'reconcile' then
  local id, status, deadline, deadline_ms, entries =
    ARGV[4], ARGV[5], ARGV[6], ARGV[7], cjson.decode(ARGV[8])
  if redis.call('SISMEMBER', CLOSED, id) == 1 then return { 'ignored', '' } end
  local now = now_ms()
  if status == 'closed' then
    if active(q) and q.id == id then
      local fence = q.fence or '0'
      return { 'ok', cjson.encode(close(q, 'queue_closed', { reason = 'reconcile' })), fence }
    end
    return { 'noop', '' }
  end
  if not (active(q) and q.id == id) then
    local s, index = create(q, id, status, deadline, deadline_ms, entries, now)
    return { 'ok', cjson.encode(s), index }
  end
  local index = ''
  local any = merge_entries(entries)
  if status == 'check_in' and (q.status ~= 'check_in' or q.deadline_ms ~= deadline_ms) then
    local fence = redis.call('HINCRBY', Q, 'fence', 1)
    redis.call('HSET', Q, 'status', 'check_in', 'deadline', deadline, 'deadline_ms', deadline_ms,
      'since_ms', now)
    q.status, q.deadline = 'check_in', deadline
    index = tostring(fence) .. ':' .. deadline_ms
    any = true
  end
  if any then return { 'ok', cjson.encode(changed(q, 'queue_synced')), index } end
  if q.status == 'check_in' and q.fired ~= q.fence then
    index = q.fence .. ':' .. q.deadline_ms
  end
  return { 'noop', '', index }
end

-- Rails no longer lists a queue the hub holds in check_in with its deadline ahead: Rails closed
-- it. Only for the check-in start the caller saw (fence) and only when that check-in started
-- before the caller began fetching from Rails (it may be newer than Rails' answer).
if op == 'absent' then
  local fence, fetch_started_ms = ARGV[4], tonumber(ARGV[5])
  if not (active(q) and q.status == 'check_in' and q.fence == fence and q.fired ~= fence) then
    return { 'noop', '' }
  end
  local now = now_ms()
  if tonumber(q.deadline_ms) <= now or tonumber(q.since_ms or '0') >= fetch_started_ms then
    return { 'noop', '' }
  end
  return { 'ok', cjson.encode(close(q, 'queue_closed', { reason = 'not_active_in_rails' })), fence }
end

return redis.error_reply('unknown queue op ' .. tostring(op))
