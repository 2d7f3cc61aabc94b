//! Presence: who is online on a topic, in the Phoenix wire format, shared by every instance
//! through Redis.
//!
//! Each instance tracks its own sockets' metas locally and, every [`DIFF_INTERVAL`], writes the
//! changes of each topic to Redis in one script call (`topic.lua`), which `PUBLISH`es **one**
//! `presence_diff` per topic on `prostaff:presence:{topic}`. Every instance (this one included)
//! delivers that diff to its own subscribers of the topic, so a storm of joins costs
//! O(topics × instances) messages per interval, not one per socket.
//!
//! Liveness is per instance, not per entry: each instance keeps a lease in `pr:{i}:live`
//! (refreshed every third of `PRESENCE_TTL_MS`) and a set of the topics it has members on. Every
//! instance looks for expired leases every [`SWEEP_INTERVAL`]; the one that claims a dead
//! instance removes its entries topic by topic (each removal publishes the `leaves`), so a
//! crashed hub's members leave everywhere within the TTL plus about half a second, and steady
//! state costs a few Redis calls per second per instance however many sockets are present.
//!
//! Entries are stamped with Redis's time when written; a sweep removes only entries written
//! before its claim, so an instance that was presumed dead (a partition longer than the TTL) and
//! re-announces itself (it resyncs every topic when its lease shows it was swept, and after every
//! Redis reconnect) cannot lose its members to a sweep still in progress.
//!
//! Invariant: the hub's sockets never wait for Redis here except for the `presence_state` read
//! at join; tracking and untracking are in-memory and O(1).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fred::interfaces::SetsInterface;
use fred::types::scripts::Script;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::config::PresenceConfig;
use crate::hub::Hub;
use crate::logsafe::LogSafe;
use crate::redis::{Handler, HandlerFuture, Message, RedisError, RedisLink, COMMAND_TIMEOUT};
use crate::topic::Topic;
use members::{encode_state, Listing, Member, Members, MAX_FILLS, MAX_PENDING_BYTES};

pub(crate) mod members;

/// Diffs of one topic are gathered this long on each instance before one is published.
pub const DIFF_INTERVAL: Duration = Duration::from_millis(200);
/// How often every instance looks for instances whose lease expired.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// A claim on a dead instance that was not finished within this long is taken over.
const STALE_CLAIM: Duration = Duration::from_secs(10);
/// Channel prefix of `presence_diff` messages (`prostaff:presence:{topic}`).
pub const CHANNEL_PREFIX: &str = "prostaff:presence:";
pub const CHANNEL_PATTERN: &str = "prostaff:presence:*";
/// Topics flushed concurrently at most.
const FLUSH_CONCURRENCY: usize = 32;

const LIVE_KEY: &str = "pr:{i}:live";
const CLAIMS_KEY: &str = "pr:{i}:claims";

const TOPIC_SCRIPT: &str = include_str!("topic.lua");

/// Renews this instance's lease; returns "1" when it had been claimed as dead or swept (or never
/// existed) and everything it tracks must be announced again. Clears such a claim: a sweep still
/// running removes only entries written before it, and the resync rewrites every entry.
const HEARTBEAT_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local swept = '0'
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 or not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  swept = '1'
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {swept}
"#;

/// Claims instances whose lease expired (or whose claim went stale): returns pairs
/// (instance, claimed_at ms).
const FIND_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 10)) do
  local claimed = redis.call('HGET', KEYS[2], inst)
  if not claimed or now - tonumber(claimed) > tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[2], inst, now)
    out[#out + 1] = inst
    out[#out + 1] = tostring(now)
  end
end
return out
"#;

/// Ends a claim; forgets the instance unless it renewed its lease since the claim.
const BURY_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[1]) end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[3])
  return {'1'}
end
return {'0'}
"#;

/// Ends this instance's lease now (clean shutdown): the next sweep by any instance removes
/// whatever it could not withdraw itself, and forgets it.
const WITHDRAW_SCRIPT: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then redis.call('ZADD', KEYS[1], 0, ARGV[1]) end
return {'1'}
"#;

fn topic_key(topic: &str) -> String {
    format!("pr:{{{topic}}}:h")
}

fn topics_key(instance: &str) -> String {
    format!("pr:{{i}}:t:{instance}")
}

fn channel(topic: &str) -> String {
    format!("{CHANNEL_PREFIX}{topic}")
}

#[derive(Debug, Default)]
struct LocalTopic {
    members: HashMap<Box<str>, Member>,
    /// Refs tracked since the last flush.
    joins: Vec<Box<str>>,
    /// Members untracked since the last flush (that had been flushed as joins, or may have been).
    leaves: Vec<(Box<str>, Member)>,
    /// Send everything this instance tracks here instead of the changes (after a failure, a
    /// reconnect, or a sweep of this instance).
    resync: bool,
    /// A local joiner was shown the unflushed joins (`state`'s pending diff): one of them
    /// untracked before the flush must still be announced as a leave here, or that joiner keeps
    /// a meta nobody else ever saw.
    exposed: bool,
}

impl LocalTopic {
    fn dirty(&self) -> bool {
        self.resync || !self.joins.is_empty() || !self.leaves.is_empty()
    }

    /// What the unflushed joins and leaves add to a joiner's presence, at most.
    fn pending_cost(&self) -> usize {
        let joins = self.joins.iter().filter_map(|r| self.members.get(r));
        let leaves = self.leaves.iter().map(|(_, m)| m);
        joins.chain(leaves).map(Member::cost).sum()
    }
}

/// What one flush sends for one topic.
enum Batch {
    Changes {
        leaves: Vec<Box<str>>,
        joins: Vec<(Box<str>, Member)>,
    },
    Sync(Vec<(Box<str>, Member)>),
}

/// One topic's presence as this instance knows it: a snapshot read once from Redis, then every
/// diff in the order Redis published them (diffs that arrive during the read are buffered and
/// applied after it; joins and leaves are idempotent by `phx_ref`, so overlap is harmless).
#[derive(Debug)]
struct Mirror {
    /// `None` while the snapshot is being read.
    members: Option<Members>,
    /// Above the listing bound: what this instance's subscribers were last shown (moved every
    /// [`DIFF_INTERVAL`] while the topic changes); `None` below it, where every diff is relayed.
    listing: Option<Listing>,
    /// The topic changed since the listing last moved.
    changed: bool,
    /// The `presence_state` payload a joiner gets, shared by every join until it changes (a
    /// reconnect storm encodes it once per diff interval, not once per join).
    encoded: Option<Bytes>,
    /// Above the bound, the `presence_summary` sent with it.
    summary: Option<Bytes>,
    buffered: Vec<Bytes>,
    loaded: Arc<tokio::sync::Notify>,
}

impl Mirror {
    /// A loaded mirror's `presence_state` payload and, over the bound, its summary.
    fn view(&mut self) -> (Bytes, Option<Bytes>) {
        let members = self.members.as_ref().expect("a loaded mirror");
        match &self.listing {
            None => {
                let state = self
                    .encoded
                    .get_or_insert_with(|| {
                        Bytes::from(encode_state(members.iter().map(|(_, m)| m)))
                    })
                    .clone();
                (state, None)
            }
            Some(listing) => {
                let state = self.encoded.get_or_insert_with(|| listing.encode()).clone();
                let summary = self
                    .summary
                    .get_or_insert_with(|| members.summary(listing.len()))
                    .clone();
                (state, Some(summary))
            }
        }
    }
}

/// What becomes of a diff received from Redis, for this instance's subscribers.
enum Relay {
    /// Sent on as it is (a topic under the bound).
    Diff,
    /// Not sent: no socket of this instance has the topic's presence yet.
    Unwatched,
    /// Held: the topic is over the bound and its listing moves at the next interval.
    Held,
    /// The topic crossed the bound: the whole state (the listing, or every meta) and a summary
    /// go instead.
    State(Bytes, Bytes),
    /// Kept for the snapshot being read (its state includes it).
    Buffered,
    /// Not a diff (not JSON, or not `{joins, leaves}`): logged, counted, never sent to clients.
    Dropped,
}

/// The presence a joiner is sent: a `presence_state` and, when this instance has changes not
/// flushed yet, a `presence_diff` with them; over the listing bound, the listing and a
/// `presence_summary`.
#[derive(Debug, Clone)]
pub struct StateView {
    pub state: Bytes,
    pub pending: Option<Bytes>,
    /// Over the listing bound: the `presence_summary` that says so (sent after the state).
    pub summary: Option<Bytes>,
}

/// This instance's presence tracker.
pub struct Presence {
    redis: Arc<RedisLink>,
    config: PresenceConfig,
    instance: String,
    next_ref: AtomicU64,
    topics: Mutex<HashMap<Arc<str>, LocalTopic>>,
    /// Every instance's members of the topics this instance has subscribers on, kept current
    /// by the diffs every instance receives: joins read `presence_state` here, not in Redis.
    mirrors: Mutex<HashMap<Arc<str>, Mirror>>,
    /// Topics whose joiners were shown only this instance's members because Redis could not
    /// answer (a join before the first connect, during an outage, or a failed read): once it
    /// answers, their subscribers get the whole state, and diffs are relayed from then on.
    unsynced: Mutex<HashSet<Arc<str>>>,
    hub: Arc<Hub>,
    /// One flush at a time (the loop's and the final one at shutdown), so a topic's changes
    /// reach Redis in the order they were made.
    flushing: tokio::sync::Mutex<()>,
    topic_script: Script,
    heartbeat_script: Script,
    find_script: Script,
    bury_script: Script,
    withdraw_script: Script,
}

impl Handler for Presence {
    /// Diffs published on `prostaff:presence:{topic}`: applied to the mirror, then fanned out
    /// as they are, without a history position (presence is state, not a stream).
    fn messages(&self, batch: Vec<Message>) -> HandlerFuture<'_> {
        for message in batch {
            let Some(topic) = message.channel.strip_prefix(CHANNEL_PREFIX) else {
                continue;
            };
            match self.on_diff(topic, &message.payload) {
                Relay::Diff => {
                    let sockets =
                        self.hub
                            .publish_at(topic, "presence_diff", message.payload, None);
                    metrics::counter!(crate::metrics::PRESENCE_DIFFS, "outcome" => "delivered")
                        .increment(1);
                    tracing::trace!(topic = %LogSafe(topic), sockets, "presence diff delivered");
                }
                Relay::Held => {
                    metrics::counter!(crate::metrics::PRESENCE_DIFFS, "outcome" => "summarized")
                        .increment(1);
                }
                Relay::State(state, summary) => self.publish_state(topic, state, Some(summary)),
                Relay::Unwatched => {
                    metrics::counter!(crate::metrics::PRESENCE_DIFFS, "outcome" => "unwatched")
                        .increment(1);
                }
                Relay::Buffered => {
                    metrics::counter!(crate::metrics::PRESENCE_DIFFS, "outcome" => "buffered")
                        .increment(1);
                }
                Relay::Dropped => {
                    metrics::counter!(crate::metrics::PRESENCE_DIFFS, "outcome" => "undecodable")
                        .increment(1);
                }
            }
        }
        Box::pin(async {})
    }
}

impl Presence {
    pub fn new(redis: Arc<RedisLink>, hub: Arc<Hub>, config: PresenceConfig) -> Self {
        Presence {
            // Random per process: a restarted hub is a new instance, and its old one is swept.
            instance: redis.instance().to_string(),
            redis,
            config,
            next_ref: AtomicU64::new(1),
            topics: Mutex::new(HashMap::new()),
            mirrors: Mutex::new(HashMap::new()),
            unsynced: Mutex::new(HashSet::new()),
            hub,
            flushing: tokio::sync::Mutex::new(()),
            topic_script: Script::from_lua(TOPIC_SCRIPT),
            heartbeat_script: Script::from_lua(HEARTBEAT_SCRIPT),
            find_script: Script::from_lua(FIND_SCRIPT),
            bury_script: Script::from_lua(BURY_SCRIPT),
            withdraw_script: Script::from_lua(WITHDRAW_SCRIPT),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether joins of this family get presence.
    pub fn covers(&self, family: &Topic) -> bool {
        self.config
            .families
            .iter()
            .any(|label| label == family.label())
    }

    /// Tracks a socket on `topic`; returns its `phx_ref`, or `None` for an untracked identity.
    pub fn track(&self, topic: &str, identity: &Identity) -> Option<String> {
        let key = identity.key()?;
        let phx_ref = format!(
            "{}-{:x}",
            self.instance,
            self.next_ref.fetch_add(1, Ordering::Relaxed)
        );
        let online_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let meta = serde_json::json!({
            "phx_ref": phx_ref,
            "online_at": online_at,
            "kind": identity.kind(),
        });
        let member = Member {
            key: serde_json::to_string(&key)
                .expect("a string serializes")
                .into(),
            meta: meta.to_string().into(),
        };
        let mut topics = self.topics.lock().expect("presence lock");
        let local = match topics.get_mut(topic) {
            Some(local) => local,
            None => topics.entry(Arc::from(topic)).or_default(),
        };
        let ref_key: Box<str> = phx_ref.as_str().into();
        local.members.insert(ref_key.clone(), member);
        local.joins.push(ref_key);
        metrics::gauge!(crate::metrics::PRESENCE_TRACKED).increment(1.0);
        Some(phx_ref)
    }

    /// Stops tracking `phx_ref` on `topic` (leave, duplicate join, socket closed).
    pub fn untrack(&self, topic: &str, phx_ref: &str) {
        let mut topics = self.topics.lock().expect("presence lock");
        let Some(local) = topics.get_mut(topic) else {
            return;
        };
        let Some(member) = local.members.remove(phx_ref) else {
            return;
        };
        metrics::gauge!(crate::metrics::PRESENCE_TRACKED).decrement(1.0);
        if let Some(index) = local.joins.iter().position(|r| &**r == phx_ref) {
            // Never written to Redis: other instances never heard of it. Local joiners that
            // were shown it as pending hear the leave directly (a leave of an unknown meta is
            // ignored by phoenix.js's `Presence`).
            local.joins.swap_remove(index);
            if local.exposed {
                let diff = format!(
                    "{{\"joins\":{{}},\"leaves\":{}}}",
                    encode_state(std::iter::once(&member))
                );
                drop(topics);
                self.hub
                    .publish_at(topic, "presence_diff", Bytes::from(diff), None);
            }
        } else {
            local.leaves.push((phx_ref.into(), member));
        }
    }

    /// What a joiner of `topic` is sent: the state every instance agrees on (from the mirror,
    /// read from Redis on first use) and, as a diff, this instance's own changes not flushed
    /// yet (the joiner's own meta among them). Over the listing bound, the listing and its
    /// summary (the joiner's own meta is listed when a slot frees). When Redis cannot answer,
    /// this instance's own members as the state.
    pub async fn state(&self, topic: &str) -> StateView {
        let shared = self.mirrored_state(topic).await;
        let mut topics = self.topics.lock().expect("presence lock");
        match shared {
            Some((state, Some(summary))) => StateView {
                state,
                pending: None,
                summary: Some(summary),
            },
            Some((state, None)) => {
                // Shown only while small: a burst of local joins reaches the joiner in the next
                // diff instead, and its presence stays bounded.
                let local = topics.get_mut(topic);
                let pending = local
                    .filter(|l| !l.joins.is_empty() || !l.leaves.is_empty())
                    .filter(|l| l.pending_cost() <= MAX_PENDING_BYTES)
                    .map(|local| {
                        local.exposed |= !local.joins.is_empty();
                        let joins = local.joins.iter().filter_map(|r| local.members.get(r));
                        let leaves = local.leaves.iter().map(|(_, m)| m);
                        Bytes::from(format!(
                            "{{\"joins\":{},\"leaves\":{}}}",
                            encode_state(joins),
                            encode_state(leaves)
                        ))
                    });
                StateView {
                    state,
                    pending,
                    summary: None,
                }
            }
            None => {
                self.unsynced
                    .lock()
                    .expect("unsynced lock")
                    .insert(Arc::from(topic));
                let local = topics.get(topic);
                let mut own = Members::default();
                for member in local.into_iter().flat_map(|l| l.members.values()) {
                    own.insert(member.clone());
                }
                let (state, summary) = self.fallback_view(&own);
                StateView {
                    state,
                    pending: None,
                    summary,
                }
            }
        }
    }

    /// This instance's own members as a view, under the same bound, when Redis cannot answer.
    fn fallback_view(&self, own: &Members) -> (Bytes, Option<Bytes>) {
        let limit = self.config.list_max;
        if own.fits(limit) {
            return (Bytes::from(encode_state(own.iter().map(|(_, m)| m))), None);
        }
        let listing = Listing::newest(own, limit);
        (listing.encode(), Some(own.summary(listing.len())))
    }

    /// The topic's `presence_state` payload (and, over the bound, its summary), loading the
    /// mirror first if needed; `None` when Redis cannot answer.
    async fn mirrored_state(&self, topic: &str) -> Option<(Bytes, Option<Bytes>)> {
        loop {
            let loaded = {
                let mut mirrors = self.mirrors.lock().expect("mirror lock");
                match mirrors.get_mut(topic) {
                    Some(mirror) if mirror.members.is_some() => return Some(mirror.view()),
                    Some(mirror) => Some(mirror.loaded.clone()),
                    None => {
                        mirrors.insert(
                            Arc::from(topic),
                            Mirror {
                                members: None,
                                listing: None,
                                changed: false,
                                encoded: None,
                                summary: None,
                                buffered: Vec::new(),
                                loaded: Arc::default(),
                            },
                        );
                        None
                    }
                }
            };
            match loaded {
                // Someone else is reading the snapshot: wait for it (bounded), then look again.
                Some(loaded) => {
                    let notified = loaded.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if self.is_loading(topic) {
                        let _ = tokio::time::timeout(COMMAND_TIMEOUT, notified).await;
                    }
                    if self.is_loading(topic) {
                        return None;
                    }
                }
                None => {
                    if !self.load(topic).await {
                        return None;
                    }
                }
            }
        }
    }

    fn is_loading(&self, topic: &str) -> bool {
        self.mirrors
            .lock()
            .expect("mirror lock")
            .get(topic)
            .is_some_and(|mirror| mirror.members.is_none())
    }

    /// Reads the snapshot into the (loading) mirror; false when Redis cannot answer. A topic
    /// over the bound starts with a full listing of its newest metas.
    async fn load(&self, topic: &str) -> bool {
        let stored = self
            .redis
            .eval(
                &self.topic_script,
                vec![topic_key(topic)],
                vec!["state".into(), channel(topic)],
            )
            .await;
        let mut mirrors = self.mirrors.lock().expect("mirror lock");
        // Gone when a reconnect cleared the mirrors meanwhile: the caller tries again later.
        let Some(mirror) = mirrors.get_mut(topic) else {
            return false;
        };
        let loaded = mirror.loaded.clone();
        let result = match stored {
            Ok(flat) => {
                let mut members = Members::from_stored(&flat);
                for diff in mirror.buffered.drain(..) {
                    members.apply_diff(&diff);
                }
                let limit = self.config.list_max;
                if !members.fits(limit) {
                    mirror.listing = Some(Listing::newest(&members, limit));
                }
                mirror.members = Some(members);
                true
            }
            Err(error) => {
                tracing::warn!(topic = %LogSafe(topic), %error, "presence state unavailable");
                mirrors.remove(topic);
                false
            }
        };
        loaded.notify_waiters();
        result
    }

    /// A diff published on `prostaff:presence:{topic}`: applied to the mirror (before the hub
    /// delivers it, so a socket joining meanwhile finds it in the state or gets the diff), and
    /// what this instance's subscribers get of it.
    fn on_diff(&self, topic: &str, raw: &Bytes) -> Relay {
        let limit = self.config.list_max;
        let mut mirrors = self.mirrors.lock().expect("mirror lock");
        let undecodable = || {
            tracing::warn!(topic = %LogSafe(topic), "undecodable presence diff dropped");
            Relay::Dropped
        };
        let Some(mirror) = mirrors.get_mut(topic) else {
            // No socket here has this topic's presence yet: one that is joining gets the state
            // its read of Redis will find (this diff's writes precede it), within the bound.
            return Relay::Unwatched;
        };
        let Some(members) = &mut mirror.members else {
            if serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_err() {
                return undecodable();
            }
            // The snapshot being read will include it: whoever waits for the snapshot gets it
            // in the state, within the bound, rather than as a diff of any size now.
            mirror.buffered.push(raw.clone());
            return Relay::Buffered;
        };
        if !members.apply_diff(raw) {
            return undecodable();
        }
        let fits = members.fits(limit);
        match (&mirror.listing, fits) {
            (None, true) => {
                mirror.encoded = None;
                Relay::Diff
            }
            (Some(_), false) => {
                mirror.changed = true;
                Relay::Held
            }
            // Across the bound, either way: every subscriber is sent the new state whole
            // (phoenix.js replaces its list with a `presence_state`), so whatever diffs it saw
            // before, its list is the listing from here on.
            (None, false) => {
                let listing = Listing::newest(members, limit);
                mirror.listing = Some(listing);
                mirror.encoded = None;
                mirror.summary = None;
                mirror.changed = false;
                let (state, summary) = mirror.view();
                Relay::State(state, summary.expect("a listed topic has a summary"))
            }
            (Some(_), true) => {
                let summary = members.summary(members.len());
                mirror.listing = None;
                mirror.encoded = None;
                mirror.summary = None;
                mirror.changed = false;
                let (state, _) = mirror.view();
                Relay::State(state, summary)
            }
        }
    }

    /// Moves the listings of topics over the bound that changed, and tells their subscribers
    /// (one diff, if any, and one summary per topic per interval).
    fn move_listings(&self) {
        let limit = self.config.list_max;
        let mut moved = Vec::new();
        {
            let mut mirrors = self.mirrors.lock().expect("mirror lock");
            for (topic, mirror) in mirrors.iter_mut() {
                let (Some(members), Some(listing)) = (&mirror.members, &mut mirror.listing) else {
                    continue;
                };
                if !std::mem::take(&mut mirror.changed) {
                    continue;
                }
                let (diff, unfinished) = listing.follow(members, limit, MAX_FILLS);
                // Slots still free after this interval's fills: the next interval goes on.
                mirror.changed = unfinished;
                if diff.is_some() {
                    mirror.encoded = None;
                }
                let summary = members.summary(listing.len());
                mirror.summary = Some(summary.clone());
                moved.push((topic.clone(), diff, summary));
            }
        }
        for (topic, diff, summary) in moved {
            if let Some(diff) = diff {
                self.hub.publish_at(&topic, "presence_diff", diff, None);
            }
            self.hub
                .publish_at(&topic, "presence_summary", summary, None);
        }
    }

    /// Forgets the mirrors of topics nobody on this instance listens to any more.
    fn evict_mirrors(&self) {
        self.mirrors
            .lock()
            .expect("mirror lock")
            .retain(|topic, mirror| mirror.members.is_none() || self.hub.has_subscribers(topic));
    }

    /// After Redis came back: the diffs of the outage are lost, so every mirror is read again
    /// and every local subscriber gets a fresh `presence_state` (phoenix.js re-syncs on it).
    async fn refresh_mirrors(&self) {
        // The mirrored topics and those whose joiners got only this instance's members, each
        // once.
        let topics: HashSet<Arc<str>> = {
            let mut mirrors = self.mirrors.lock().expect("mirror lock");
            let mut topics = std::mem::take(&mut *self.unsynced.lock().expect("unsynced lock"));
            topics.extend(mirrors.drain().map(|(topic, _)| topic));
            topics
        };
        for topic in topics {
            self.send_state(topic).await;
        }
    }

    /// Topics whose joiners got only this instance's members: their subscribers get the whole
    /// state as soon as Redis answers (tried every [`DIFF_INTERVAL`] while it is connected).
    async fn sync_unsynced(&self) {
        if !self.redis.is_connected() {
            return;
        }
        let topics = std::mem::take(&mut *self.unsynced.lock().expect("unsynced lock"));
        for topic in topics {
            self.send_state(topic).await;
        }
    }

    /// The whole state to the topic's subscribers on this instance, then (over the bound) its
    /// summary.
    fn publish_state(&self, topic: &str, state: Bytes, summary: Option<Bytes>) {
        self.hub.publish_at(topic, "presence_state", state, None);
        if let Some(summary) = summary {
            self.hub
                .publish_at(topic, "presence_summary", summary, None);
        }
    }

    /// Sends the topic's subscribers on this instance its whole `presence_state` (and, over the
    /// bound, its summary), read into the mirror first; a topic whose state Redis cannot give
    /// stays unsynced and is tried again.
    async fn send_state(&self, topic: Arc<str>) {
        if !self.hub.has_subscribers(&topic) {
            return;
        }
        match self.mirrored_state(&topic).await {
            Some((state, summary)) => self.publish_state(&topic, state, summary),
            None => {
                self.unsynced.lock().expect("unsynced lock").insert(topic);
            }
        }
    }

    /// Runs the flushes, the lease and the sweeps until `shutdown`; then withdraws this
    /// instance (after the sessions have untracked everything, see [`Presence::shutdown`]).
    pub async fn run(
        self: Arc<Self>,
        mut connected: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        if self.config.families.is_empty() {
            return;
        }
        // The lease first: entries written before it exists could not be swept.
        self.heartbeat().await;
        let mut flush = tokio::time::interval(DIFF_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat =
            tokio::time::interval((self.config.ttl / 3).max(Duration::from_millis(100)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = flush.tick() => {
                    self.flush().await;
                    self.evict_mirrors();
                    self.move_listings();
                    self.sync_unsynced().await;
                }
                _ = heartbeat.tick() => self.heartbeat().await,
                _ = sweep.tick() => self.sweep().await,
                changed = connected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Whatever happened while Redis was away (it may even be a new, empty
                    // Redis), announce everything again.
                    self.resync_all();
                    self.heartbeat().await;
                    self.flush().await;
                    self.refresh_mirrors().await;
                }
            }
        }
    }

    /// At shutdown, after the sessions ended: publishes their leaves and ends the lease (any
    /// instance then sweeps what could not be published).
    pub async fn shutdown(&self) {
        if self.config.families.is_empty() {
            return;
        }
        self.flush().await;
        let _ = self
            .redis
            .eval(
                &self.withdraw_script,
                vec![LIVE_KEY.into()],
                vec![self.instance.clone()],
            )
            .await;
    }

    fn resync_all(&self) {
        let mut topics = self.topics.lock().expect("presence lock");
        for local in topics.values_mut() {
            local.resync = true;
        }
    }

    async fn heartbeat(&self) {
        let result = self
            .redis
            .eval(
                &self.heartbeat_script,
                vec![LIVE_KEY.into(), CLAIMS_KEY.into()],
                vec![
                    self.instance.clone(),
                    self.config.ttl.as_millis().to_string(),
                ],
            )
            .await;
        if let Ok(reply) = result {
            if reply.first().map(String::as_str) == Some("1") {
                let swept = self.topics.lock().expect("presence lock").len();
                if swept > 0 {
                    tracing::warn!(
                        topics = swept,
                        "this instance's presence lease had lapsed; announcing its members again"
                    );
                }
                self.resync_all();
            }
        }
    }

    /// Writes each changed topic's joins and leaves (or its full list) in one script call.
    pub async fn flush(&self) {
        let _one_at_a_time = self.flushing.lock().await;
        let batches = self.take_batches();
        if batches.is_empty() {
            return;
        }
        let Some(client) = self.redis.commands() else {
            self.failed(batches.into_iter().map(|(topic, _)| topic));
            return;
        };
        if !self.announce(&client, &batches).await {
            self.failed(batches.into_iter().map(|(topic, _)| topic));
            return;
        }
        use futures_util::StreamExt;
        let results =
            futures_util::stream::iter(batches.into_iter().map(|(topic, batch)| async move {
                let result = self.write(&topic, batch).await;
                (topic, result)
            }))
            .buffer_unordered(FLUSH_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut failed = Vec::new();
        for (topic, result) in results {
            match result {
                Ok(refused) => {
                    metrics::counter!(crate::metrics::PRESENCE_DIFFS, "outcome" => "written")
                        .increment(1);
                    self.refuse(&topic, &refused);
                }
                Err(error) => {
                    tracing::warn!(topic = %LogSafe(&topic), %error, "presence flush failed; will resync");
                    failed.push(topic);
                }
            }
        }
        self.failed(failed.into_iter());
    }

    /// Takes every dirty topic's changes (or its whole state, after a failed write) and
    /// forgets the topics with nothing tracked and nothing to tell.
    fn take_batches(&self) -> Vec<(Arc<str>, Batch)> {
        let mut topics = self.topics.lock().expect("presence lock");
        let mut batches = Vec::new();
        topics.retain(|topic, local| {
            if local.dirty() {
                local.exposed = false;
                let batch = if std::mem::take(&mut local.resync) {
                    local.joins.clear();
                    local.leaves.clear();
                    Batch::Sync(
                        local
                            .members
                            .iter()
                            .map(|(r, m)| (r.clone(), m.clone()))
                            .collect(),
                    )
                } else {
                    let joins = std::mem::take(&mut local.joins)
                        .into_iter()
                        .filter_map(|r| local.members.get(&r).cloned().map(|m| (r, m)))
                        .collect();
                    Batch::Changes {
                        leaves: std::mem::take(&mut local.leaves)
                            .into_iter()
                            .map(|(r, _)| r)
                            .collect(),
                        joins,
                    }
                };
                batches.push((topic.clone(), batch));
                true
            } else {
                // Nothing tracked and nothing to tell: forget the topic.
                !local.members.is_empty()
            }
        });
        batches
    }

    /// Records the topics this instance has members on, before any entry is written there: a
    /// sweep of this instance must find every topic it touched. False when Redis refused.
    async fn announce(
        &self,
        client: &fred::clients::Client,
        batches: &[(Arc<str>, Batch)],
    ) -> bool {
        let announced: Vec<String> = batches
            .iter()
            .filter(|(_, batch)| match batch {
                Batch::Changes { joins, .. } => !joins.is_empty(),
                Batch::Sync(members) => !members.is_empty(),
            })
            .map(|(topic, _)| topic.to_string())
            .collect();
        if announced.is_empty() {
            return true;
        }
        let added = tokio::time::timeout(
            COMMAND_TIMEOUT,
            client.sadd::<i64, _, _>(topics_key(&self.instance), announced),
        )
        .await;
        matches!(added, Ok(Ok(_)))
    }

    async fn write(&self, topic: &str, batch: Batch) -> Result<Vec<String>, RedisError> {
        let cap = self.config.max_members.to_string();
        let args = match batch {
            Batch::Changes { leaves, joins } => {
                let mut args = Vec::with_capacity(4 + leaves.len() + 3 * joins.len());
                args.extend(["flush".to_string(), channel(topic), cap]);
                args.push(leaves.len().to_string());
                args.extend(leaves.into_iter().map(String::from));
                push_members(&mut args, joins);
                args
            }
            Batch::Sync(members) => {
                let mut args = Vec::with_capacity(4 + 3 * members.len());
                args.extend(["sync".to_string(), channel(topic), cap]);
                args.push(self.instance.clone());
                push_members(&mut args, members);
                args
            }
        };
        self.redis
            .eval(&self.topic_script, vec![topic_key(topic)], args)
            .await
    }

    /// Members refused by the per-topic cap stay joined to the channel but are not shown.
    fn refuse(&self, topic: &str, refused: &[String]) {
        if refused.is_empty() {
            return;
        }
        metrics::counter!(crate::metrics::PRESENCE_REFUSED, "reason" => "topic_full")
            .increment(refused.len() as u64);
        tracing::warn!(topic = %LogSafe(topic), refused = refused.len(), cap = self.config.max_members, "presence cap reached; members not shown");
        let mut topics = self.topics.lock().expect("presence lock");
        if let Some(local) = topics.get_mut(topic) {
            for phx_ref in refused {
                if local.members.remove(phx_ref.as_str()).is_some() {
                    metrics::gauge!(crate::metrics::PRESENCE_TRACKED).decrement(1.0);
                }
            }
        }
    }

    fn failed(&self, topics: impl Iterator<Item = Arc<str>>) {
        let mut local = self.topics.lock().expect("presence lock");
        for topic in topics {
            metrics::counter!(crate::metrics::PRESENCE_DIFFS, "outcome" => "failed").increment(1);
            if let Some(local) = local.get_mut(&topic) {
                local.resync = true;
            }
        }
    }

    /// Claims instances whose lease expired and removes their members, topic by topic.
    async fn sweep(&self) {
        let Ok(found) = self
            .redis
            .eval(
                &self.find_script,
                vec![LIVE_KEY.into(), CLAIMS_KEY.into()],
                vec![STALE_CLAIM.as_millis().to_string()],
            )
            .await
        else {
            return;
        };
        for pair in found.chunks_exact(2) {
            let (dead, claimed_at) = (&pair[0], &pair[1]);
            if *dead == self.instance {
                // Our own lease lapsed (Redis was away): the next heartbeat clears the claim and
                // announces everything again.
                continue;
            }
            let Some(client) = self.redis.commands() else {
                return;
            };
            let topics: Vec<String> = match tokio::time::timeout(
                COMMAND_TIMEOUT,
                client.smembers::<Vec<String>, _>(topics_key(dead)),
            )
            .await
            {
                Ok(Ok(topics)) => topics,
                _ => return,
            };
            let mut gone = 0u64;
            for topic in &topics {
                match self
                    .redis
                    .eval(
                        &self.topic_script,
                        vec![topic_key(topic)],
                        vec![
                            "sweep".into(),
                            channel(topic),
                            dead.clone(),
                            claimed_at.clone(),
                        ],
                    )
                    .await
                {
                    Ok(reply) => {
                        gone += reply.first().and_then(|n| n.parse().ok()).unwrap_or(0);
                    }
                    // The claim goes stale and is taken over later.
                    Err(_) => return,
                }
            }
            let _ = self
                .redis
                .eval(
                    &self.bury_script,
                    vec![LIVE_KEY.into(), CLAIMS_KEY.into(), topics_key(dead)],
                    vec![dead.clone(), claimed_at.clone()],
                )
                .await;
            metrics::counter!(crate::metrics::PRESENCE_EXPIRED).increment(gone);
            if gone == 0 {
                // A clean shutdown ends its lease this way after publishing its own leaves.
                tracing::debug!(instance = %LogSafe(dead), "ended presence lease collected");
                continue;
            }
            tracing::info!(
                instance = %LogSafe(dead),
                topics = topics.len(),
                members = gone,
                "presence of an expired instance removed"
            );
        }
    }
}

fn push_members(args: &mut Vec<String>, members: Vec<(Box<str>, Member)>) {
    for (phx_ref, member) in members {
        args.push(phx_ref.into());
        args.push(member.key.into());
        args.push(member.meta.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_and_internal_is_untracked() {
        let user = Identity::User {
            user_id: "a\"\nb".into(),
            org_id: "o".into(),
        };
        let key = user.key().unwrap();
        let json = serde_json::to_string(&key).unwrap();
        assert!(!json.contains('\n'), "the stored form splits on a newline");
        assert_eq!(Identity::Internal.key(), None);
    }

    #[test]
    fn an_unflushed_join_that_leaves_is_never_announced() {
        let presence = Presence::new(
            RedisLink::new("redis://127.0.0.1:1"),
            Arc::new(Hub::new(8, crate::metrics::Metrics::detached())),
            PresenceConfig {
                families: vec!["inhouse".into()],
                ttl: Duration::from_secs(30),
                max_members: 10,
                list_max: 5,
            },
        );
        let user = Identity::User {
            user_id: "1".into(),
            org_id: "o".into(),
        };
        let a = presence.track("inhouse:o", &user).unwrap();
        let b = presence.track("inhouse:o", &user).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(presence.instance()));
        presence.untrack("inhouse:o", &a);
        let topics = presence.topics.lock().unwrap();
        let local = &topics["inhouse:o"];
        assert_eq!(local.joins.len(), 1);
        assert!(local.leaves.is_empty());
        assert_eq!(local.members.len(), 1);
    }
}
