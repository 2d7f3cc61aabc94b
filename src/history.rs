//! Per-topic history in Redis Streams, and the positions that let a client recover what it
//! missed (Centrifugo's offset + epoch, spoken through the stock phoenix.js client).
//!
//! Every broadcast on a topic gets a [`Position`] `"<epoch>:<offset>"`: `offset` grows by exactly
//! one per broadcast; `epoch` changes only when the topic's history was lost (expired, or Redis
//! restarted empty) or went back (a failover lost its newest writes: an instance that delivered
//! a position the history no longer reaches starts a new epoch at its reconnect, so a lost offset
//! is never handed to another event). Offsets are assigned in Redis by `APPEND_SCRIPT`, so
//! every instance agrees: the first call for an event appends, and later calls for the same
//! event (same dedup key: the envelope `id`, or a hash of the raw bytes) read its position back.
//! Every call also PUBLISHes a [`Notice`] of the positions it answered on
//! `prostaff:seq:<topic>`, so the other instances learn them without a call of their own: who
//! calls the script is the sequencer's business (`ingest::sequencer`). Callers hand one topic's
//! events over strictly in the order Redis delivered them, so the order matches too.
//!
//! Keys of one topic share the hash tag `{topic}`: `hist:{t}:m` (hash: epoch, offset),
//! `hist:{t}:s` (the stream, entry ids `<offset>-0`, fields `e` event and `p` payload, capped at
//! `HISTORY_SIZE`) and `hist:{t}:d:<dedup>` (the position an event was given). Both the stream
//! and the meta hash expire after `HISTORY_TTL_MS` without a broadcast.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::types::scripts::Script;

use crate::redis::{RedisError, RedisLink};

/// A history epoch: 1–32 ASCII alphanumerics, stored inline. Every socket compares the epoch
/// of each broadcast with the last one its channel saw; inline, that comparison reads memory
/// the channel already holds instead of following a pointer per socket (measured: 2 % of a
/// 19k-socket fan-out went to that cache miss when it was a `String`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch {
    len: u8,
    bytes: [u8; 32],
}

impl Epoch {
    pub fn new(text: &str) -> Option<Epoch> {
        if text.is_empty() || text.len() > 32 || !text.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Some(Epoch {
            len: text.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("ASCII by construction")
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Where a broadcast sits in its topic's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: u64,
}

impl Position {
    /// Parses `"<epoch>:<offset>"` (epoch: 1–32 ASCII alphanumerics).
    pub fn parse(text: &str) -> Option<Position> {
        let (epoch, offset) = text.split_once(':')?;
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position {
            epoch: Epoch::new(epoch)?,
            offset: offset.parse().ok()?,
        })
    }

    /// True when `self` is at or before `other` in the same epoch (a frame a client has
    /// already seen).
    pub fn is_covered_by(&self, other: &Position) -> bool {
        self.epoch == other.epoch && self.offset <= other.offset
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// One broadcast read back from history.
#[derive(Debug, Clone)]
pub struct Entry {
    pub position: Position,
    pub event: String,
    pub payload: Bytes,
}

/// One broadcast to append: its dedup key (envelope id or content hash), event and payload.
#[derive(Debug, Clone, Copy)]
pub struct AppendItem<'a> {
    pub dedup: &'a str,
    pub event: &'a str,
    pub payload: &'a Bytes,
}

/// What a join with `since` learns.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The topic's position now (the last broadcast, or `:0` when there was none).
    pub position: Position,
    /// `Some(entries after since)` when every broadcast after `since` is still in history.
    pub missed: Option<Vec<Entry>>,
}

/// How long an event's dedup key lives: every instance must have appended it by then.
const DEDUP_TTL: Duration = Duration::from_secs(120);

const APPEND_SCRIPT: &str = r#"
-- KEYS: meta, stream, then one dedup key per broadcast. ARGV: size, ttl_ms, candidate epoch,
-- dedup_ttl_ms, notice channel, notice origin, length of the dedup keys' prefix, then
-- (event, payload) per broadcast, in delivery order. Returns the positions, and PUBLISHes them
-- on the notice channel: the origin, then a line `<dedup> <position>` per broadcast.
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3]) == 1 then
  -- A new epoch: whatever stream is left belongs to a lost history.
  redis.call('DEL', KEYS[2])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local out = {}
local notice = { ARGV[6] }
local appended = false
for i = 3, #KEYS do
  local seen = redis.call('GET', KEYS[i])
  if seen then
    out[#out + 1] = seen
  else
    local j = 8 + (i - 3) * 2
    local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], offset .. '-0', 'e', ARGV[j], 'p', ARGV[j + 1])
    local position = epoch .. ':' .. offset
    redis.call('SET', KEYS[i], position, 'PX', ARGV[4])
    out[#out + 1] = position
    appended = true
  end
end
for i = 3, #KEYS do
  notice[#notice + 1] = string.sub(KEYS[i], ARGV[7] + 1) .. ' ' .. out[i - 2]
end
redis.call('PUBLISH', ARGV[5], table.concat(notice, '\n'))
if appended then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return out
"#;

const RECOVER_SCRIPT: &str = r#"
-- KEYS: meta, stream. ARGV: since epoch ('' for none), since offset, max entries, ttl_ms,
-- candidate epoch, rewind ('1': `since` is a position the hub itself delivered).
-- Returns {recovered 0|1, epoch, offset, e1, p1, e2, p2, ...}.
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[5]) == 1 then
  redis.call('HSET', KEYS[1], 'offset', 0)
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local since = tonumber(ARGV[2])
if ARGV[6] == '1' and ARGV[1] == epoch and since > offset then
  -- History went back: writes the hub saw were lost (a failover to a replica that had not
  -- received them). Offsets after `offset` would be handed out a second time, to other events:
  -- start a new epoch so no client that saw a lost one can skip a new one.
  epoch = ARGV[5]
  offset = 0
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local reply = { '0', epoch, tostring(offset) }
if ARGV[1] == '' or ARGV[1] ~= epoch then return reply end
if since > offset or offset - since > tonumber(ARGV[3]) then return reply end
if since == offset then reply[1] = '1'; return reply end
local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', offset .. '-0')
if #entries ~= offset - since then return reply end
reply[1] = '1'
for _, entry in ipairs(entries) do
  local fields = entry[2]
  local e, p
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then e = fields[i + 1] elseif fields[i] == 'p' then p = fields[i + 1] end
  end
  table.insert(reply, e)
  table.insert(reply, p)
end
return reply
"#;

/// Every append's [`Notice`] is published on `NOTICE_PREFIX` + topic.
pub const NOTICE_PREFIX: &str = "prostaff:seq:";
pub const NOTICE_PATTERN: &str = "prostaff:seq:*";

/// The channel an append on `topic` publishes its [`Notice`] on.
pub fn notice_channel(topic: &str) -> String {
    format!("{NOTICE_PREFIX}{topic}")
}

/// The positions one append call answered: which instance called it, and each broadcast's
/// dedup key with its position, in the order appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub origin: String,
    pub positions: Vec<(String, Position)>,
}

impl Notice {
    /// Parses what `APPEND_SCRIPT` published: the origin, then `<dedup> <position>` lines (a
    /// dedup key may hold spaces, a position never does). `None` for anything else.
    pub fn parse(payload: &[u8]) -> Option<Notice> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut lines = text.split('\n');
        let origin = lines.next()?.to_string();
        let positions = lines
            .map(|line| {
                let (dedup, position) = line.rsplit_once(' ')?;
                Some((dedup.to_string(), Position::parse(position)?))
            })
            .collect::<Option<Vec<_>>>()?;
        (!origin.is_empty() && !positions.is_empty()).then_some(Notice { origin, positions })
    }
}

/// The history store; `None` size means history is off (`HISTORY_SIZE=0`).
pub struct History {
    redis: Arc<RedisLink>,
    append: Script,
    recover: Script,
    size: usize,
    ttl: Duration,
}

fn keys(topic: &str) -> (String, String) {
    (format!("hist:{{{topic}}}:m"), format!("hist:{{{topic}}}:s"))
}

/// A short random epoch candidate (used only when a topic starts a new history).
fn new_epoch() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// FNV-1a over the raw bytes: a dedup key that every instance (and every build) computes alike.
pub fn content_key(raw: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in raw {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("h{hash:016x}")
}

impl History {
    pub fn new(redis: Arc<RedisLink>, size: usize, ttl: Duration) -> Self {
        History {
            redis,
            append: Script::from_lua(APPEND_SCRIPT),
            recover: Script::from_lua(RECOVER_SCRIPT),
            size,
            ttl,
        }
    }

    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// Whether the history can be read now (the Redis link is connected): a resume is refused
    /// rather than answered `recovered: false` while it cannot.
    pub fn available(&self) -> bool {
        self.redis.is_connected()
    }

    async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Vec<String>, RedisError> {
        let started = std::time::Instant::now();
        let result = self.redis.eval(script, keys, args).await;
        metrics::histogram!(crate::metrics::HISTORY_SCRIPT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Appends broadcasts of one topic, in order, each once per `dedup` key across every
    /// instance, and returns their positions (in the same order). One script call for the batch.
    pub async fn append_batch(
        &self,
        topic: &str,
        items: &[AppendItem<'_>],
    ) -> Result<Vec<Position>, RedisError> {
        let (meta, stream) = keys(topic);
        let mut keys = Vec::with_capacity(items.len() + 2);
        keys.push(meta);
        keys.push(stream);
        let mut args = Vec::with_capacity(items.len() * 2 + 4);
        args.push(self.size.to_string());
        args.push(self.ttl.as_millis().to_string());
        args.push(new_epoch());
        args.push(DEDUP_TTL.as_millis().to_string());
        args.push(notice_channel(topic));
        args.push(self.redis.instance().to_string());
        let dedup_prefix = format!("hist:{{{topic}}}:d:");
        args.push(dedup_prefix.len().to_string());
        for item in items {
            keys.push(format!("{dedup_prefix}{}", item.dedup));
            let payload = std::str::from_utf8(item.payload)
                .map_err(|_| RedisError::Malformed("payload is not UTF-8"))?;
            args.push(item.event.to_string());
            args.push(payload.to_string());
        }
        let reply = self.eval(&self.append, keys, args).await?;
        let positions: Option<Vec<Position>> =
            reply.iter().map(|text| Position::parse(text)).collect();
        match positions {
            Some(positions) if positions.len() == items.len() => Ok(positions),
            _ => Err(RedisError::Malformed("append reply")),
        }
    }

    /// The topic's current position and, with `since`, the broadcasts after it when all of them
    /// are still in history (at most `HISTORY_SIZE`).
    pub async fn recover(
        &self,
        topic: &str,
        since: Option<&Position>,
    ) -> Result<Recovery, RedisError> {
        self.recover_from(topic, since, false).await
    }

    /// [`History::recover`] after a reconnect, from the last position this instance delivered:
    /// when the topic's history is behind it (a failover lost the newest writes), the topic
    /// starts a new epoch, so the lost offsets are never given to other events. Only the
    /// hub's own positions may do this: a client's `since` is never trusted to.
    pub async fn recover_delivered(
        &self,
        topic: &str,
        delivered: &Position,
    ) -> Result<Recovery, RedisError> {
        self.recover_from(topic, Some(delivered), true).await
    }

    async fn recover_from(
        &self,
        topic: &str,
        since: Option<&Position>,
        rewind: bool,
    ) -> Result<Recovery, RedisError> {
        let (meta, stream) = keys(topic);
        let (since_epoch, since_offset) = match since {
            Some(p) => (p.epoch.to_string(), p.offset.to_string()),
            None => (String::new(), "0".to_string()),
        };
        let reply = self
            .eval(
                &self.recover,
                vec![meta, stream],
                vec![
                    since_epoch,
                    since_offset,
                    self.size.to_string(),
                    self.ttl.as_millis().to_string(),
                    new_epoch(),
                    if rewind { "1" } else { "0" }.to_string(),
                ],
            )
            .await?;
        let malformed = || RedisError::Malformed("recover reply");
        let (Some(flag), Some(epoch), Some(offset)) = (reply.first(), reply.get(1), reply.get(2))
        else {
            return Err(malformed());
        };
        let epoch = Epoch::new(epoch).ok_or_else(malformed)?;
        let position = Position {
            epoch,
            offset: offset.parse().map_err(|_| malformed())?,
        };
        let missed = (flag == "1" && since.is_some()).then(|| {
            let first = since.map_or(0, |s| s.offset) + 1;
            reply[3..]
                .chunks_exact(2)
                .enumerate()
                .map(|(i, pair)| Entry {
                    position: Position {
                        epoch,
                        offset: first + i as u64,
                    },
                    event: pair[0].clone(),
                    payload: Bytes::from(pair[1].clone()),
                })
                .collect()
        });
        Ok(Recovery { position, missed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_strictly() {
        assert_eq!(
            Position::parse("a1b2:42"),
            Some(Position {
                epoch: Epoch::new("a1b2").unwrap(),
                offset: 42
            })
        );
        for bad in [
            "",
            ":1",
            "e:",
            "e:-1",
            "e:1.5",
            "e f:1",
            "e:1:2",
            "x".repeat(40).as_str(),
            format!("{}:1", "x".repeat(33)).as_str(),
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
        assert_eq!(Position::parse("e:7").unwrap().to_string(), "e:7");
        let longest = format!("{}:1", "x".repeat(32));
        assert_eq!(Position::parse(&longest).unwrap().to_string(), longest);
    }

    #[test]
    fn coverage_needs_the_same_epoch() {
        let p = |e: &str, o| Position {
            epoch: Epoch::new(e).unwrap(),
            offset: o,
        };
        assert!(p("a", 3).is_covered_by(&p("a", 3)));
        assert!(p("a", 2).is_covered_by(&p("a", 3)));
        assert!(!p("a", 4).is_covered_by(&p("a", 3)));
        assert!(!p("b", 1).is_covered_by(&p("a", 3)));
    }

    #[test]
    fn notices_parse_strictly() {
        let notice = Notice::parse(b"abc123\nia b 7 e1:4\nh00ff e1:5").unwrap();
        assert_eq!(notice.origin, "abc123");
        assert_eq!(
            notice.positions,
            [
                ("ia b 7".to_string(), Position::parse("e1:4").unwrap()),
                ("h00ff".to_string(), Position::parse("e1:5").unwrap())
            ]
        );
        for bad in [
            &b""[..],
            b"abc",
            b"\nix e1:4",
            b"abc\nix",
            b"abc\nix e1:x",
            b"abc\nix e1:4\n",
            b"abc\n\xff e1:4",
        ] {
            assert_eq!(Notice::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn content_keys_are_stable() {
        assert_eq!(content_key(b""), "hcbf29ce484222325");
        assert_ne!(content_key(b"a"), content_key(b"b"));
    }
}
