-- One queue family (a queue and its dead-letter queue) in Redis; every operation is
-- one call of this script, atomic, on keys that share the hash tag {sq:<queue>}.
--
-- KEYS[1..5]: the queue's hash, ready, delayed, leases and expiries; KEYS[6..10]: the
-- same of its dead-letter queue. Per queue:
--   hash      'n' the last id given out; per message (m = 16 hex digits of its id, so
--             that members sort as ids): 'm'..m "<kind> <ts>", 'b'..m the payload,
--             'a'..m deliveries so far, 'd'..m the current delivery id while leased
--   ready     ZSET score = time it became ready, member m (oldest first, then by id)
--   delayed   ZSET score = when its delay ends
--   leases    ZSET score = when its lease ends
--   expiries  ZSET score = when its TTL passes (only messages with a TTL)
-- A live message is in exactly one of ready, delayed and leases.
--
-- ARGV[1] the operation, ARGV[2] 'm' (the queue) or 'd' (its dead-letter queue),
-- ARGV[3] now (ms, the calling node's clock), ARGV[4] max_attempts, ARGV[5] the wake
-- channel, ARGV[6..] the operation's arguments. Every reply starts with the number of
-- messages dead-lettered while settling, then the operation's own answer.
--
-- Time-driven changes (a TTL passing, a delay ending, a lease ending) are applied
-- lazily, in time order, at the start of every operation (`settle`), exactly as the
-- single-node engine does: expiries first, then delay ends, then lease ends at one
-- instant. An operation on the dead-letter queue settles the queue first, since a
-- lease ending there may owe the dead-letter queue a message.

local M = { h = KEYS[1], r = KEYS[2], w = KEYS[3], l = KEYS[4], x = KEYS[5], tag = 'm' }
local D = { h = KEYS[6], r = KEYS[7], w = KEYS[8], l = KEYS[9], x = KEYS[10], tag = 'd' }
local op, now, max_attempts, channel = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local Q = (ARGV[2] == 'd') and D or M
local PUBLISH = '__PUBLISH__'
local BATCH = 256

local dead_letters = 0
local woken = {}

local function int(n) return string.format('%d', n) end
local function member(id) return string.format('%016x', id) end

local function count(q)
  return redis.call('ZCARD', q.r) + redis.call('ZCARD', q.w) + redis.call('ZCARD', q.l)
end

local function make_ready(q, m, since)
  redis.call('ZADD', q.r, since, m)
  woken[q.tag] = true
end

local function remove(q, m)
  redis.call('ZREM', q.r, m)
  redis.call('ZREM', q.w, m)
  redis.call('ZREM', q.l, m)
  redis.call('ZREM', q.x, m)
  redis.call('HDEL', q.h, 'm' .. m, 'b' .. m, 'a' .. m, 'd' .. m)
end

-- Copies message m of queue `from` into queue `to` as a new message (a new id there),
-- of the same kind and payload, timestamped `at`; returns its member. The caller
-- removes m and makes the copy ready.
local function copy(from, to, m, at)
  local id = redis.call('HINCRBY', to.h, 'n', 1)
  local nm = member(id)
  local meta = redis.call('HGET', from.h, 'm' .. m) or 'binary 0'
  local kind = string.match(meta, '^(%S+)')
  redis.call('HSET', to.h, 'm' .. nm, kind .. ' ' .. int(at), 'b' .. nm, redis.call('HGET', from.h, 'b' .. m) or '')
  return nm
end

-- Moves message m of the queue, out of its state already, to the dead-letter queue as
-- a new message there, ready at `at`.
local function dead_letter(m, at)
  local dm = copy(M, D, m, at)
  remove(M, m)
  make_ready(D, dm, at)
  dead_letters = dead_letters + 1
end

-- A delivery ended without an ack (lease end or requeue), its lease already removed:
-- ready again at `at` (after `delay`), or dead-lettered once it had max_attempts.
local function release(q, m, at, delay)
  local attempts = tonumber(redis.call('HGET', q.h, 'a' .. m) or '0')
  if q == M and attempts >= max_attempts then
    dead_letter(m, at)
  elseif delay > 0 then
    redis.call('ZADD', q.w, at + delay, m)
  else
    make_ready(q, m, at)
  end
end

-- The due events of one set, oldest first, as {time, order, member}.
local function due(key, order, into)
  local got = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, BATCH)
  for i = 1, #got, 2 do
    into[#into + 1] = { tonumber(got[i + 1]), order, got[i] }
  end
  return #got / 2 >= BATCH
end

-- Applies every timed event due at `now`, in time order. Applying an event never makes
-- another one due, so each round reads what is due, sorts it, and skips entries an
-- earlier event of the round made stale (checked against the set's current score).
local function settle(q)
  local more = true
  while more do
    local events = {}
    local a = due(q.x, 1, events)
    local b = due(q.w, 2, events)
    local c = due(q.l, 3, events)
    more = a or b or c
    table.sort(events, function(x, y)
      if x[1] ~= y[1] then return x[1] < y[1] end
      if x[2] ~= y[2] then return x[2] < y[2] end
      return x[3] < y[3]
    end)
    for _, e in ipairs(events) do
      local at, kind, m = e[1], e[2], e[3]
      if kind == 1 then
        if tonumber(redis.call('ZSCORE', q.x, m)) == at then remove(q, m) end
      elseif kind == 2 then
        if tonumber(redis.call('ZSCORE', q.w, m)) == at then
          redis.call('ZREM', q.w, m)
          make_ready(q, m, at)
        end
      elseif tonumber(redis.call('ZSCORE', q.l, m)) == at then
        redis.call('ZREM', q.l, m)
        redis.call('HDEL', q.h, 'd' .. m)
        release(q, m, at, 0)
      end
    end
  end
end

local function first_score(key)
  local got = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return got[2] and tonumber(got[2])
end

-- When the next delay or lease of the queue ends (on a dead-letter queue, also the
-- queue's next lease end, which may bring a dead letter); '' when none is pending.
local function next_due()
  local t = { first_score(Q.w), first_score(Q.l) }
  if Q == D then t[#t + 1] = first_score(M.l) end
  local min
  for _, v in pairs(t) do
    if v and (min == nil or v < min) then min = v end
  end
  return min and int(min) or ''
end

-- Whether delivery `id` is message m's current lease.
local function current(m, id)
  return redis.call('HGET', Q.h, 'd' .. m) == id and redis.call('ZSCORE', Q.l, m)
end

settle(M)
if Q == D or op == 'stats' or op == 'redrive' then settle(D) end

local reply
if op == 'enqueue' then
  -- ARGV: max_queue_messages, then per message (one or a batch, in order): kind, delay
  -- ms, ttl ms ('' for none), payload. One reply entry per message: its id, or 'full'.
  local room = tonumber(ARGV[6]) - count(M)
  reply = {}
  for i = 7, #ARGV, 4 do
    if room <= 0 then
      table.insert(reply, 'full')
    else
      room = room - 1
      local delay, ttl = tonumber(ARGV[i + 1]), ARGV[i + 2]
      local id = redis.call('HINCRBY', M.h, 'n', 1)
      local m = member(id)
      redis.call('HSET', M.h, 'm' .. m, ARGV[i] .. ' ' .. int(now), 'b' .. m, ARGV[i + 3])
      if delay > 0 then
        redis.call('ZADD', M.w, now + delay, m)
      else
        make_ready(M, m, now)
      end
      if ttl ~= '' then redis.call('ZADD', M.x, now + tonumber(ttl), m) end
      table.insert(reply, int(id))
    end
  end
elseif op == 'fetch' then
  -- ARGV: visibility ms, then one nonce per message wanted
  local deadline = now + tonumber(ARGV[6])
  local wanted = #ARGV - 6
  local got = redis.call('ZPOPMIN', Q.r, wanted)
  reply = {}
  for i = 1, #got, 2 do
    local m = got[i]
    local attempt = redis.call('HINCRBY', Q.h, 'a' .. m, 1)
    local id = string.format('%x', tonumber(m, 16)) .. '-' .. int(attempt) .. '-' .. ARGV[6 + (i + 1) / 2]
    redis.call('ZADD', Q.l, deadline, m)
    redis.call('HSET', Q.h, 'd' .. m, id)
    local meta = redis.call('HGET', Q.h, 'm' .. m) or 'binary 0'
    reply[#reply + 1] = m
    reply[#reply + 1] = id
    reply[#reply + 1] = int(attempt)
    reply[#reply + 1] = meta
    reply[#reply + 1] = redis.call('HGET', Q.h, 'b' .. m) or ''
  end
  if #got == 0 then reply = { next_due() } end
elseif op == 'ack' then
  -- ARGV: member, delivery id
  local m = ARGV[6]
  if current(m, ARGV[7]) then
    remove(Q, m)
    reply = { 'ok' }
  else
    reply = { 'not_found' }
  end
elseif op == 'requeue' then
  -- ARGV: member, delivery id, delay ms
  local m = ARGV[6]
  if current(m, ARGV[7]) then
    redis.call('ZREM', Q.l, m)
    redis.call('HDEL', Q.h, 'd' .. m)
    release(Q, m, now, tonumber(ARGV[8]))
    reply = { 'ok' }
  else
    reply = { 'not_found' }
  end
elseif op == 'extend' then
  -- ARGV: member, delivery id, visibility ms
  local m = ARGV[6]
  if current(m, ARGV[7]) then
    redis.call('ZADD', Q.l, now + tonumber(ARGV[8]), m)
    reply = { 'ok' }
  else
    reply = { 'not_found' }
  end
elseif op == 'purge' then
  -- ARGV: most messages to remove in this call. Ready, then delayed; leased ones stay.
  local left = tonumber(ARGV[6])
  local removed = 0
  for _, key in ipairs({ Q.r, Q.w }) do
    if left > 0 then
      local ms = redis.call('ZRANGE', key, 0, left - 1)
      for _, m in ipairs(ms) do
        remove(Q, m)
      end
      removed = removed + #ms
      left = left - #ms
    end
  end
  reply = { int(removed) }
elseif op == 'redrive' then
  -- ARGV: most dead letters to move in this call, max_queue_messages. Ready dead
  -- letters, oldest first, become new messages of the queue, ready now; atomic.
  local room = tonumber(ARGV[7]) - count(M)
  local want = math.min(tonumber(ARGV[6]), room)
  local moved = 0
  if want > 0 then
    for _, dm in ipairs(redis.call('ZRANGE', D.r, 0, want - 1)) do
      local m = copy(D, M, dm, now)
      remove(D, dm)
      make_ready(M, m, now)
      moved = moved + 1
    end
  end
  reply = { int(moved) }
elseif op == 'stats' then
  local dead = 0
  if Q == M then dead = count(D) end
  reply = { int(redis.call('ZCARD', Q.r)), int(redis.call('ZCARD', Q.l)), int(redis.call('ZCARD', Q.w)), int(dead) }
else
  return redis.error_reply('unknown queue operation ' .. tostring(op))
end

-- Long polls on any node wake when messages became ready in a queue of the family.
for tag, _ in pairs(woken) do
  redis.call(PUBLISH, channel, tag)
end
table.insert(reply, 1, int(dead_letters))
return reply
