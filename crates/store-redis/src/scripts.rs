//! The Lua scripts: each runs atomically in Redis on the keys of one topic or one
//! queue (one hash tag, so one Redis Cluster slot).
//!
//! Numbers cross into Lua as strings and come back as strings: Lua numbers are doubles,
//! exact up to 2^53, and `string.format('%d', n)` prints them without an exponent. The
//! caller clamps every limit it passes to that range.

use redis::Script;

/// Shared by the topic scripts. KEYS[1]: the meta hash; KEYS[2]: the log stream.
/// ARGV[1]: a fresh epoch (used only if the meta is missing); ARGV[2]: now (ms);
/// ARGV[3]: retention by count; ARGV[4]: retention by age (ms).
const TOPIC_PRELUDE: &str = r#"
local meta, log = KEYS[1], KEYS[2]
local now, max_age = tonumber(ARGV[2]), tonumber(ARGV[4])

local function int(n) return string.format('%d', n) end

-- The oldest entry's ts and expiry as the meta remembers them (nil: unknown), so that
-- trim() need not read the log while that entry is live.
local front_ts, front_exp

-- The topic's epoch, next offset and newest timestamp. A missing meta (never
-- published, or evicted) is created with the caller's fresh epoch, and a log left
-- without its meta is deleted first: an epoch is never reborn over old offsets.
local function meta_or_create()
  local m = redis.call('HMGET', meta, 'epoch', 'next', 'last_ts', 'front_ts', 'front_exp')
  if m[1] then
    front_ts, front_exp = tonumber(m[4]), m[5]
    return m[1], tonumber(m[2]), tonumber(m[3])
  end
  redis.call('DEL', log)
  redis.call('HSET', meta, 'epoch', ARGV[1], 'next', '1', 'last_ts', '0')
  return ARGV[1], 1, 0
end

-- Front-only trimming, as the memory store's Log::trim: past the count, then from the
-- oldest while it is too old or its TTL passed (an expired message behind a live one
-- stays until it reaches the front; reads skip it).
local function dead(e)
  local f = e[2] -- ts, kind, expires, payload (field, value, ...)
  return now - tonumber(f[2]) >= max_age or (f[6] ~= '' and now >= tonumber(f[6]))
end

-- The front only moves by trimming (entries are added at the back), so while nothing
-- was trimmed by count and the remembered front is live, there is nothing to read.
local function trim()
  local cut = redis.call('XTRIM', log, 'MAXLEN', ARGV[3])
  if cut == 0 and front_ts and now - front_ts < max_age
      and (front_exp == nil or front_exp == '' or now < tonumber(front_exp)) then
    return
  end
  local oldest = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
  while oldest and dead(oldest) do
    local batch = redis.call('XRANGE', log, '-', '+', 'COUNT', 64)
    local gone = {}
    for _, e in ipairs(batch) do
      if dead(e) then gone[#gone + 1] = e[1] else break end
    end
    if #gone > 0 then redis.call('XDEL', log, unpack(gone)) end
    oldest = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
  end
  if oldest then
    redis.call('HSET', meta, 'front_ts', oldest[2][2], 'front_exp', oldest[2][6])
  else
    redis.call('HDEL', meta, 'front_ts', 'front_exp')
  end
end
"#;

/// Appends a batch and publishes it whole to the topic's channel (the bus event every
/// node fans out from; see `bus.rs` for the format). ARGV[5]: the channel; from ARGV[6],
/// per message: kind, TTL in ms ('' for none), payload. Returns {epoch, first offset, ts}.
const APPEND: &str = r#"
local epoch, next_off, last_ts = meta_or_create()
local ts = math.max(now, last_ts)
local first = next_off
local event = {}
for i = 6, #ARGV, 3 do
  local expires = ''
  if ARGV[i + 1] ~= '' then expires = int(ts + tonumber(ARGV[i + 1])) end
  redis.call('XADD', log, int(next_off) .. '-0',
    'ts', int(ts), 'kind', ARGV[i], 'expires', expires, 'payload', ARGV[i + 2])
  local e = expires
  if e == '' then e = '-' end
  event[#event + 1] = ARGV[i] .. ' ' .. e .. ' ' .. #ARGV[i + 2] .. '\n'
  event[#event + 1] = ARGV[i + 2]
  next_off = next_off + 1
end
redis.call('HSET', meta, 'epoch', epoch, 'next', int(next_off), 'last_ts', int(ts))
trim()
local header = 'a ' .. epoch .. ' ' .. int(first) .. ' ' .. int(ts) .. ' ' .. int(next_off - first) .. '\n'
redis.call(PUBLISH, ARGV[5], header .. table.concat(event))
return {epoch, int(first), int(ts)}
"#;

/// The head after trimming: `epoch`, `next_off`, `first` and `last` ids ('0' when
/// nothing is retained) and `n` retained; HEAD returns them, BARRIER publishes first.
const HEAD_STATE: &str = r#"
local epoch, next_off = meta_or_create()
trim()
local n = redis.call('XLEN', log)
local first, last = '0', '0'
if n > 0 then
  first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1][1]
  last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1][1]
end
"#;

/// Returns {epoch, next, first id, last id, retained}.
const HEAD: &str = r#"
return {epoch, int(next_off), first, last, n}
"#;

/// The head, as HEAD, and a barrier event `h <token>` on the topic's channel, published
/// in the same step: a node that receives it has received every event before this head.
/// ARGV[5]: the channel; ARGV[6]: the token.
const BARRIER: &str = r#"
redis.call(PUBLISH, ARGV[5], 'h ' .. ARGV[6])
return {epoch, int(next_off), first, last, n}
"#;

/// Live messages after trimming. ARGV[5]: start id ('-' or 'N-0'); ARGV[6]: end id
/// ('+' or 'N-0'); ARGV[7]: limit. Returns {epoch, {{id, ts, kind, expires, payload}, ...}}.
const READ: &str = r#"
local epoch = meta_or_create()
trim()
local limit = tonumber(ARGV[7])
local out = {}
local start = ARGV[5]
while #out < limit do
  local want = limit - #out
  local batch = redis.call('XRANGE', log, start, ARGV[6], 'COUNT', int(want))
  for _, e in ipairs(batch) do
    local f = e[2]
    if f[6] == '' or now < tonumber(f[6]) then
      out[#out + 1] = {e[1], f[2], f[4], f[6], f[8]}
    end
  end
  if #batch < want then break end
  start = '(' .. batch[#batch][1]
end
return {epoch, out}
"#;

/// Deletes the history and publishes `d <previous epoch or -> <new epoch>`.
/// ARGV[1]: the new epoch; ARGV[2]: the topic's channel.
const DELETE: &str = r#"
local meta, log = KEYS[1], KEYS[2]
redis.call('DEL', log)
local m = redis.call('HMGET', meta, 'epoch', 'last_ts')
redis.call('HDEL', meta, 'front_ts', 'front_exp')
redis.call('HSET', meta, 'epoch', ARGV[1], 'next', '1', 'last_ts', m[2] or '0')
redis.call(PUBLISH, ARGV[2], 'd ' .. (m[1] or '-') .. ' ' .. ARGV[1])
return ARGV[1]
"#;

/// Stores queue records. KEYS[1]: the records hash; KEYS[2]: the next-id string.
/// ARGV: id, encoded record, ... The next id becomes max(next id, every id + 1).
const QUEUE_APPEND: &str = r#"
local top = tonumber(redis.call('GET', KEYS[2]) or '1')
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  local id = tonumber(ARGV[i]) + 1
  if id > top then top = id end
end
redis.call('SET', KEYS[2], string.format('%d', top))
return 1
"#;

/// The scripts, hashed once (EVALSHA, loaded again on NOSCRIPT).
#[derive(Clone)]
pub(crate) struct Scripts {
    pub append: Script,
    pub head: Script,
    pub barrier: Script,
    pub read: Script,
    pub delete: Script,
    pub queue_append: Script,
}

impl Scripts {
    /// The scripts, publishing with `PUBLISH` (standalone Redis) or `SPUBLISH` (sharded
    /// pub/sub on Redis Cluster, so an event stays on the topic's shard).
    pub fn new(publish: &str) -> Self {
        let with = |body: &str| body.replace("PUBLISH,", &format!("'{publish}',"));
        let topic = |body: &str| Script::new(&format!("{TOPIC_PRELUDE}{}", with(body)));
        Self {
            append: topic(APPEND),
            head: topic(&format!("{HEAD_STATE}{HEAD}")),
            barrier: topic(&format!("{HEAD_STATE}{BARRIER}")),
            read: topic(READ),
            delete: Script::new(&with(DELETE)),
            queue_append: Script::new(QUEUE_APPEND),
        }
    }
}
