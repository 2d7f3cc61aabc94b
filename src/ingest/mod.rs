//! Ingestion: how events enter the hub. The [`Pipeline`] subscribes `prostaff:events:*`
//! (envelopes) and `prostaff:inhouse:*` (queue updates) on the Redis link and decodes, checks,
//! routes and delivers every envelope, whatever its source; [`publish`] turns HTTP bodies into
//! envelopes; [`dead_letter`] keeps what was dropped.

pub mod dead_letter;
pub mod publish;
pub mod sequencer;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::catalogue::{Catalogue, Check, Violation};
use crate::config::SchemaMode;
use crate::envelope::{self, Envelope};
use crate::history::{self, History};
use crate::hub::Hub;
use crate::inhouse::Inhouse;
use crate::logsafe::LogSafe;
use crate::redis::{Handler, HandlerFuture, Message};
use crate::router;
use dead_letter::{DeadLetter, DeadLetters};
use sequencer::Sequencer;

/// Where an event came from (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Redis,
    /// Posted over HTTP and delivered locally because Redis was unavailable.
    HttpLocal,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::HttpLocal => "http_local",
        }
    }

    /// Where a dead letter came from: Redis, or an HTTP route (directly or delivered locally).
    fn origin(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::HttpLocal => "http",
        }
    }
}

/// The pattern the Rails API publishes envelopes on.
pub const CHANNEL_PATTERN: &str = "prostaff:events:*";
pub const CHANNEL_PREFIX: &str = "prostaff:events:";

/// The pub/sub channel an organisation's envelopes are published on.
pub fn events_channel(org_id: &str) -> String {
    format!("{CHANNEL_PREFIX}{org_id}")
}

/// What the pipeline delivers.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// An envelope from `prostaff:events:{org}` (or posted over HTTP).
    Envelope { raw: Bytes, channel: String },
    /// A `queue_update` that `queue.lua` published on `prostaff:inhouse:{org}`.
    QueueUpdate { org_id: String, raw: Bytes },
    /// The positions another instance's history append gave (`prostaff:seq:{topic}`).
    Notice { topic: String, raw: Bytes },
}

impl Incoming {
    /// A message of one of the pipeline's three patterns.
    fn from_message(message: Message) -> Incoming {
        if let Some(org_id) = message
            .channel
            .strip_prefix(crate::inhouse::store::QUEUE_CHANNEL_PREFIX)
        {
            return Incoming::QueueUpdate {
                org_id: org_id.to_string(),
                raw: message.payload,
            };
        }
        if let Some(topic) = message.channel.strip_prefix(history::NOTICE_PREFIX) {
            return Incoming::Notice {
                topic: topic.to_string(),
                raw: message.payload,
            };
        }
        Incoming::Envelope {
            raw: message.payload,
            channel: message.channel,
        }
    }
}

static UNROUTED_WARNINGS: LogLimiter = LogLimiter::new();
static SCHEMA_WARNINGS: LogLimiter = LogLimiter::new();

/// Lets one log line per key through per second and counts the ones it held back, so a busy
/// key cannot turn every event into a log write while a new key is still logged at once.
pub struct LogLimiter {
    /// key → (second of the last line let through, lines held back since).
    seen: std::sync::Mutex<Option<HashMap<String, (u64, u64)>>>,
}

/// Keys remembered at most; past this the table starts over (a flood of distinct keys costs
/// one line each, as without the limiter, but no memory).
const LOG_LIMITER_KEYS: usize = 1024;

impl LogLimiter {
    pub const fn new() -> Self {
        LogLimiter {
            seen: std::sync::Mutex::new(None),
        }
    }

    /// `Some(lines held back since the last one)` when this line may be logged.
    pub fn admit(&self, key: &str) -> Option<u64> {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let second = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs();
        self.admit_at(key, second)
    }

    fn admit_at(&self, key: &str, second: u64) -> Option<u64> {
        let key: String = key.chars().take(64).collect();
        let mut seen = self.seen.lock().expect("log limiter lock");
        let seen = seen.get_or_insert_with(HashMap::new);
        if let Some((last, held)) = seen.get_mut(&key) {
            if *last == second {
                *held += 1;
                return None;
            }
            *last = second;
            return Some(std::mem::take(held));
        }
        if seen.len() >= LOG_LIMITER_KEYS {
            seen.clear();
        }
        seen.insert(key, (second, 0));
        Some(0)
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// One broadcast to make: the same raw bytes on each of its topics.
struct Broadcast {
    raw: Bytes,
    /// (topic, event name) pairs.
    topics: Vec<(String, String)>,
    dedup: Arc<str>,
    envelope: Option<Envelope>,
    unrouted: bool,
}

/// Decode → route → position → fan out, plus the in-house lifecycle hooks.
///
/// Invariant: the Redis subscriber loop hands batches over one at a time, in the order Redis
/// delivered the messages; each topic's broadcasts are queued in the [`Sequencer`] in that
/// order and delivered in it once positioned (by this instance's append when it is the
/// sequencer, by the sequencer's notice otherwise). Different topics do not wait for each
/// other (only the order within a topic matters).
pub struct Pipeline {
    pub hub: Arc<Hub>,
    pub inhouse: Arc<Inhouse>,
    pub history: Arc<History>,
    pub sequencer: Arc<Sequencer>,
    pub revocations: Arc<crate::revocation::Revocations>,
    pub catalogue: &'static Catalogue,
    /// `EVENT_SCHEMAS`.
    pub schemas: SchemaMode,
    pub dead_letters: Arc<DeadLetters>,
}

impl Handler for Pipeline {
    fn messages(&self, batch: Vec<Message>) -> HandlerFuture<'_> {
        let batch = batch.into_iter().map(Incoming::from_message).collect();
        Box::pin(self.ingest_batch(batch, Source::Redis))
    }

    fn connected(&self) -> HandlerFuture<'_> {
        Box::pin(async {
            // No fallback append until history's catch-up is delivered (it runs first here,
            // before any message of the new subscription).
            self.sequencer.suspend();
            if self.history.enabled() {
                // Take the lease at once if it is free: the first events need no fallback.
                self.sequencer.claim(true).await;
            }
            self.catch_up().await;
            self.sequencer.resume();
        })
    }
}

impl Pipeline {
    /// Subscribes the pipeline's patterns on the link.
    pub fn subscribe(self: &Arc<Self>, redis: &crate::redis::RedisLink) {
        redis.subscribe(CHANNEL_PATTERN, self.clone());
        redis.subscribe(crate::inhouse::store::QUEUE_CHANNEL_PATTERN, self.clone());
        if self.history.enabled() {
            redis.subscribe(history::NOTICE_PATTERN, self.clone());
        }
    }

    /// The schema check of an HTTP publish route, before it publishes: under `enforce` an
    /// envelope its type's schema rejects is refused (the route answers 422 with the reason) and
    /// kept as a dead letter; otherwise it goes on (ingest counts it on every instance).
    pub fn refuse_invalid(&self, accepted: &Envelope) -> Result<(), Violation> {
        if self.schemas != SchemaMode::Enforce {
            return Ok(());
        }
        match self
            .catalogue
            .check(&accepted.event_type, &accepted.document)
        {
            Check::Invalid(violation) => {
                self.count_violation(&violation, "http");
                self.dead_letters.keep(DeadLetter {
                    reason: "schema",
                    detail: violation.to_string(),
                    source: "http",
                    channel: events_channel(&accepted.org_id),
                    event_type: Some(accepted.event_type.clone()),
                    org_id: Some(accepted.org_id.clone()),
                    raw: accepted.raw.clone(),
                });
                Err(violation)
            }
            Check::Valid(_) | Check::Unknown => Ok(()),
        }
    }

    /// Counts and logs (at most once a second per type) an envelope its schema rejects.
    fn count_violation(&self, violation: &Violation, source: &'static str) {
        metrics::counter!(crate::metrics::EVENTS_INVALID, "type" => violation.event_type)
            .increment(1);
        if let Some(suppressed) = SCHEMA_WARNINGS.admit(violation.event_type) {
            let mode = self.schemas.as_str();
            tracing::warn!(source, mode, suppressed, reason = %violation, "event does not match its schema");
        }
    }

    /// The catalogue's verdict under `EVENT_SCHEMAS`: `Err` drops the envelope (enforce).
    fn validate(&self, envelope: &Envelope, source: Source) -> Result<(), Violation> {
        if self.schemas == SchemaMode::Off {
            return Ok(());
        }
        match self
            .catalogue
            .check(&envelope.event_type, &envelope.document)
        {
            Check::Valid(_) => Ok(()),
            Check::Unknown => {
                metrics::counter!(crate::metrics::EVENTS_INVALID, "type" => "unknown").increment(1);
                Ok(())
            }
            Check::Invalid(violation) => {
                self.count_violation(&violation, source.origin());
                match self.schemas {
                    SchemaMode::Enforce => Err(violation),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Logs, counts and keeps a dropped envelope.
    fn drop_envelope(&self, letter: DeadLetter, source: Source) {
        // The detail never includes the payload and escapes what it echoes.
        tracing::warn!(source = source.label(), channel = %LogSafe(&letter.channel), reason = %letter.detail, "dropped event");
        metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => source.label(), "outcome" => letter.reason)
            .increment(1);
        self.dead_letters.keep(letter);
    }

    /// Decodes raw envelope bytes and delivers them (the HTTP local-delivery path);
    /// drops are logged without the payload.
    pub async fn ingest(&self, raw: Bytes, source: Source, channel: &str) {
        let incoming = Incoming::Envelope {
            raw,
            channel: channel.to_string(),
        };
        self.ingest_batch(vec![incoming], source).await;
    }

    /// Delivers a batch of messages in order: through the [`Sequencer`] (which gives each
    /// broadcast its history position) for what came through Redis with history on, at once
    /// and without a position otherwise.
    pub async fn ingest_batch(&self, batch: Vec<Incoming>, source: Source) {
        let sequenced = self.history.enabled() && matches!(source, Source::Redis);
        let mut touched: std::collections::HashSet<String> = std::collections::HashSet::new();
        for incoming in batch {
            if let Incoming::Notice { topic, raw } = &incoming {
                self.sequencer.notice(topic, raw);
                continue;
            }
            let Some(broadcast) = self.prepare(incoming, source) else {
                continue;
            };
            for (topic, event) in broadcast.topics {
                if sequenced {
                    self.sequencer.push(
                        &topic,
                        event,
                        broadcast.raw.clone(),
                        broadcast.dedup.clone(),
                    );
                    touched.insert(topic);
                } else {
                    self.hub
                        .publish_at(&topic, &event, broadcast.raw.clone(), None);
                }
            }
            if let Some(envelope) = broadcast.envelope {
                self.after_delivery(envelope, broadcast.unrouted, source)
                    .await;
            }
        }
        if sequenced {
            let touched: Vec<String> = touched.into_iter().collect();
            self.sequencer.settle(&touched).await;
        }
    }

    /// What an envelope does besides its broadcasts: a revocation is applied, an `inhouse.*`
    /// lifecycle event moves the queue; counted and logged.
    async fn after_delivery(&self, envelope: Envelope, unrouted: bool, source: Source) {
        match crate::revocation::from_envelope(&envelope, self.revocations.ttl()) {
            Some(Ok(revocation)) => self.revocations.apply(revocation).await,
            Some(Err(invalid)) => {
                // Not applied and never fanned out: kept like any other dropped envelope.
                let letter = DeadLetter {
                    reason: "invalid_revocation",
                    detail: format!("access.revoked ignored: {invalid}"),
                    source: source.origin(),
                    channel: events_channel(&envelope.org_id),
                    event_type: Some(envelope.event_type.clone()),
                    org_id: Some(envelope.org_id.clone()),
                    raw: envelope.raw.clone(),
                };
                self.drop_envelope(letter, source);
            }
            None => {}
        }
        tracing::debug!(
            event_type = %LogSafe(&envelope.event_type),
            org = %LogSafe(&envelope.org_id),
            id = %LogSafe(envelope.id.as_deref().unwrap_or("-")),
            "event received"
        );
        metrics::counter!(
            crate::metrics::EVENTS_RECEIVED,
            "source" => source.label(),
            "outcome" => if unrouted { "unrouted" } else { "routed" }
        )
        .increment(1);
        if envelope.event_type.starts_with("inhouse.") {
            self.inhouse.on_event(&envelope).await;
        }
    }

    /// After a Redis (re)connect, before any live message of the new subscription: every topic
    /// with local subscribers is caught up from history after the last position this instance
    /// delivered, so a blip of this instance's link is invisible to its sockets (other
    /// instances kept appending). In order; what a socket already has is skipped by its
    /// channel's `seen`. Where history cannot cover the gap (too long, or a new epoch), the
    /// topic's subscribers are told ([`Hub::announce_gap`]) instead of left with a silent gap.
    /// Topics that never had a positioned broadcast here have nothing to catch up.
    pub async fn catch_up(&self) {
        if !self.history.enabled() {
            return;
        }
        for (topic, last) in self.hub.delivered_positions() {
            match self.history.recover_delivered(&topic, &last).await {
                Ok(recovery) => match recovery.missed {
                    Some(entries) => {
                        let count = entries.len() as u64;
                        self.hub.publish_run(
                            &topic,
                            entries
                                .into_iter()
                                .map(|entry| (entry.event, entry.payload, Some(entry.position))),
                        );
                        metrics::counter!(crate::metrics::CATCH_UPS, "outcome" => "caught_up")
                            .increment(1);
                        metrics::counter!(crate::metrics::CATCH_UP_BROADCASTS).increment(count);
                        if count > 0 {
                            tracing::info!(topic = %LogSafe(&topic), count, "caught up after a redis reconnect");
                        }
                    }
                    None => {
                        let told = self.hub.announce_gap(&topic);
                        metrics::counter!(crate::metrics::CATCH_UPS, "outcome" => "gap")
                            .increment(1);
                        tracing::warn!(topic = %LogSafe(&topic), subscribers = told, "history cannot cover this instance's gap; subscribers told to rejoin");
                    }
                },
                Err(error) => {
                    // The link is gone again: the next connect catches up from the same point.
                    metrics::counter!(crate::metrics::CATCH_UPS, "outcome" => "failed")
                        .increment(1);
                    tracing::warn!(%error, "catch-up after a redis reconnect failed");
                    return;
                }
            }
        }
    }

    /// Decodes and routes one message; `None` for a dropped envelope (logged and counted).
    fn prepare(&self, incoming: Incoming, source: Source) -> Option<Broadcast> {
        match incoming {
            // A notice is the sequencer's, taken before (`ingest_batch`): nothing to broadcast.
            Incoming::Notice { .. } => None,
            Incoming::QueueUpdate { org_id, raw } => Some(Broadcast {
                topics: vec![(
                    crate::topic::Topic::Inhouse { org_id }.to_string(),
                    "queue_update".to_string(),
                )],
                dedup: history::content_key(&raw).into(),
                raw,
                envelope: None,
                unrouted: false,
            }),
            Incoming::Envelope { raw, channel } => {
                let envelope = match envelope::decode(raw.clone()) {
                    Ok(envelope) => envelope,
                    Err(reason) => {
                        let letter = DeadLetter {
                            reason: reason.label(),
                            detail: reason.to_string(),
                            source: source.origin(),
                            channel,
                            event_type: None,
                            org_id: None,
                            raw,
                        };
                        self.drop_envelope(letter, source);
                        return None;
                    }
                };
                if let Err(violation) = self.validate(&envelope, source) {
                    let letter = DeadLetter {
                        reason: "schema",
                        detail: violation.to_string(),
                        source: source.origin(),
                        channel,
                        event_type: Some(envelope.event_type.clone()),
                        org_id: Some(envelope.org_id.clone()),
                        raw,
                    };
                    self.drop_envelope(letter, source);
                    return None;
                }
                Some(self.routed(envelope))
            }
        }
    }

    /// The topics and event names of a valid envelope.
    fn routed(&self, envelope: Envelope) -> Broadcast {
        let route = router::route(&envelope);
        let control = envelope.event_type == "access.revoked";
        if route.unrouted && !control {
            // Counted always (`outcome="unrouted"`); logged at most once a second per type, so
            // a busy type cannot turn every event into a log write.
            if let Some(suppressed) = UNROUTED_WARNINGS.admit(&envelope.event_type) {
                tracing::warn!(
                    event_type = %LogSafe(&envelope.event_type),
                    org = %LogSafe(&envelope.org_id),
                    suppressed,
                    "Unrouted event"
                );
            }
        }
        // `access.revoked` is for the hub alone: applied, never fanned out.
        let routed = if control { Vec::new() } else { route.topics };
        let topics = routed
            .into_iter()
            .map(|topic| {
                let event = router::event_name(&topic, &envelope.event_type).to_string();
                (topic, event)
            })
            .collect();
        Broadcast {
            raw: envelope.raw.clone(),
            topics,
            dedup: match &envelope.id {
                Some(id) => format!("i{id}").into(),
                None => history::content_key(&envelope.raw).into(),
            },
            unrouted: route.unrouted && !control,
            envelope: Some(envelope),
        }
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::LogLimiter;

    #[test]
    fn one_line_per_second_and_the_rest_counted() {
        let limiter = LogLimiter::new();
        assert_eq!(limiter.admit_at("a.type", 7), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.admit_at("a.type", 7), None);
        }
        // Another key is not held back by the first one.
        assert_eq!(limiter.admit_at("b.type", 7), Some(0));
        // The next second lets one through, with the count of what was held back.
        assert_eq!(limiter.admit_at("a.type", 8), Some(5));
        assert_eq!(limiter.admit_at("a.type", 8), None);
    }
}
