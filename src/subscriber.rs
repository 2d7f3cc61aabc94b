//! The subscription core every transport shares: a WebSocket or long-poll session and an SSE
//! stream are each one [`Subscriber`].
//!
//! Life of a subscriber: [`Subscriber::register`] (an outbox in the hub, the connection gauge)
//! → per topic [`Subscriber::join`]: refuse a resume while Redis is unreachable → subscribe →
//! recover from history → (the transport replays what was missed) → presence; live frames then
//! pass [`Channel::admit`], which skips what the channel has already seen, and
//! [`Channel::wants`], the join's type filter (which replays pass too). The reverse —
//! unsubscribe, untrack presence, gauges, unregister — is [`Drop`]: a panic, a cancelled future
//! or an early return cannot leave a subscriber in the topic map, in a gauge or in presence.
//!
//! Invariants:
//! - A subscriber is in the hub's topic map for exactly the topics in its channel list.
//! - A join with `since` is refused with [`JoinRefusal::Unavailable`] while the history cannot
//!   be read, so a Redis blip never answers `recovered: false` (which makes clients refetch).
//! - After a join the channel has seen the topic's current position: a `since` ahead of it
//!   (a client from before a Redis restart, a forged value) never hides later broadcasts.

use std::sync::Arc;

use serde_json::Value;

use crate::auth::Identity;
use crate::config::Limits;
use crate::history::History;
use crate::history::{Entry, Position};
use crate::hub::Hub;
use crate::hub::{Outbox, SocketId};
use crate::inhouse::Inhouse;
use crate::metrics as m;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::topic::Topic;
use crate::type_filter::TypeFilter;
use tokio_util::sync::CancellationToken;

/// What a subscriber (a socket session, a long-poll session, an SSE stream) needs from the rest
/// of the hub.
pub struct SessionDeps {
    pub hub: Arc<Hub>,
    pub inhouse: Arc<Inhouse>,
    pub history: Arc<History>,
    pub presence: Arc<Presence>,
    pub revocations: Arc<crate::revocation::Revocations>,
    pub limits: Limits,
    pub metrics: Metrics,
    /// Cancelled at the end of the shutdown grace period: a session stuck in a write gives up
    /// and closes with 1001.
    pub hard_stop: CancellationToken,
}

/// Which connection gauge a subscriber counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A Phoenix socket (WebSocket or long-poll): `prostaff_sockets_connected`, channel gauges
    /// and `prostaff_socket_closes_total{reason}`.
    Socket,
    /// An SSE stream: `prostaff_sse_streams`.
    Stream,
}

/// One joined topic.
pub struct Channel {
    pub join_ref: Option<String>,
    pub family: Topic,
    /// The last position this channel has seen: broadcasts at or before it (same epoch) are not
    /// sent again (recovery overlap, a re-published event).
    pub seen: Option<Position>,
    /// Present on a presence topic: whether this channel gets `presence_state`, and the
    /// subscriber's own `phx_ref` there when its identity is tracked.
    pub presence: Option<Option<String>>,
    /// The join's type filter: only matching broadcasts are sent.
    pub types: Option<TypeFilter>,
}

impl Channel {
    /// Whether the join's type filter lets a push with this event name through.
    pub fn wants(&self, event: &str) -> bool {
        crate::type_filter::admits(self.types.as_ref(), event)
    }

    /// Whether a frame at `position` is new to this channel; remembers it when it is.
    pub fn admit(&mut self, position: &Position) -> bool {
        match self.seen.as_mut() {
            Some(seen) if position.is_covered_by(seen) => false,
            // Same epoch: move the offset, no allocation.
            Some(seen) if seen.epoch == position.epoch => {
                seen.offset = position.offset;
                true
            }
            _ => {
                self.seen = Some(position.clone());
                true
            }
        }
    }
}

/// What a successful join found.
pub struct Joined {
    /// The hub's shared name of the topic (frames carry the same `Arc`).
    pub topic: Arc<str>,
    /// The family's join reply (`{}` when none was asked for).
    pub response: Value,
    /// The topic's position (`None`: history off, or Redis could not be read and no resume
    /// was asked for).
    pub position: Option<Position>,
    /// With `since`: whether every broadcast after it is in `missed`.
    pub recovered: Option<bool>,
    /// Broadcasts after `since` that pass the type filter, in order, to send before any live
    /// one.
    pub missed: Vec<Entry>,
    /// Whether the channel gets `presence_state`.
    pub presence: bool,
    /// The channel this join replaced (a duplicate join): its `join_ref` gets `phx_close`.
    pub replaced: Option<Channel>,
}

/// Why a join was refused by the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// A resume (`since`) while the history cannot be read: retry later (phoenix.js retries a
    /// refused join with its back-off and keeps its params).
    Unavailable,
}

/// A join's position in the topic's history and what it missed.
#[derive(Default)]
struct Catchup {
    position: Option<Position>,
    recovered: Option<bool>,
    missed: Vec<Entry>,
}

/// What a join asks for besides the topic.
pub struct JoinRequest<'a> {
    pub topic: &'a str,
    pub family: Topic,
    pub join_ref: Option<&'a str>,
    pub since: Option<&'a Position>,
    pub identity: &'a Identity,
    /// Build the family's join reply (a Phoenix join; SSE has none).
    pub reply: bool,
    /// Track the identity in presence and send `presence_state` (a Phoenix join on a presence
    /// family; SSE streams only listen).
    pub presence: bool,
    /// Only broadcasts of these types (replays included).
    pub types: Option<TypeFilter>,
}

/// A registered subscriber; everything it holds is released on drop.
pub struct Subscriber {
    deps: Arc<SessionDeps>,
    id: SocketId,
    outbox: Arc<Outbox>,
    transport: Transport,
    channels: Vec<(Arc<str>, Channel)>,
    /// The metric label of why it ended, set by its owner; a subscriber dropped without one
    /// (a panic, a cancelled future) is counted as `aborted`.
    ending: &'static str,
}

impl Subscriber {
    pub fn register(deps: Arc<SessionDeps>, transport: Transport, identity: &Identity) -> Self {
        // The identity key (`user:<id>`, `player:<id>`): revocations find its outboxes by it.
        let key = identity.key();
        let (id, outbox) = deps.hub.register_identity(key);
        match transport {
            Transport::Socket => deps.metrics.sockets_connected.increment(1.0),
            Transport::Stream => metrics::gauge!(m::SSE_STREAMS).increment(1.0),
        }
        Subscriber {
            deps,
            id,
            outbox,
            transport,
            channels: Vec::new(),
            ending: "aborted",
        }
    }

    pub fn id(&self) -> SocketId {
        self.id
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub fn deps(&self) -> &Arc<SessionDeps> {
        &self.deps
    }

    /// Records why the subscriber ends (the `reason` label of `prostaff_socket_closes_total`).
    pub fn set_ending(&mut self, reason: &'static str) {
        self.ending = reason;
    }

    fn index(&self, topic: &str) -> Option<usize> {
        self.channels.iter().position(|(t, _)| &**t == topic)
    }

    pub fn get(&self, topic: &str) -> Option<&Channel> {
        self.index(topic).map(|i| &self.channels[i].1)
    }

    pub fn contains(&self, topic: &str) -> bool {
        self.index(topic).is_some()
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn channels(&self) -> impl Iterator<Item = (&Arc<str>, &Channel)> {
        self.channels.iter().map(|(t, c)| (t, c))
    }

    /// The channel of a frame's topic: by pointer first (each topic is the hub's shared
    /// `Arc`, so the per-frame lookup compares pointers rather than names), by name as the
    /// fallback. A subscriber holds a handful of channels: a scan beats a map.
    pub fn for_frame(&mut self, topic: &Arc<str>) -> Option<&mut Channel> {
        let i = match self
            .channels
            .iter()
            .position(|(t, _)| Arc::ptr_eq(t, topic))
        {
            Some(i) => i,
            None => self.index(topic)?,
        };
        Some(&mut self.channels[i].1)
    }

    /// Joins a topic (or joins it again: the new channel replaces the old one).
    pub async fn join(&mut self, request: JoinRequest<'_>) -> Result<Joined, JoinRefusal> {
        let JoinRequest {
            topic,
            family,
            join_ref,
            since,
            identity,
            reply,
            presence,
            types,
        } = request;
        let history = self.deps.history.enabled() && family != Topic::Admin;
        if since.is_some() && history && !self.deps.history.available() {
            metrics::counter!(m::RECOVERIES, "outcome" => "unavailable").increment(1);
            return Err(JoinRefusal::Unavailable);
        }
        let duplicate = self.contains(topic);
        // Subscribe before reading the reply and the position, so nothing published meanwhile
        // falls in between: a broadcast after these reads is already on its way to the outbox.
        let shared = self.deps.hub.subscribe(topic, self.id, &self.outbox);
        let response = if reply {
            crate::channels::join_response(&family, &self.deps.inhouse).await
        } else {
            Value::Object(Default::default())
        };
        let Catchup {
            position,
            recovered,
            mut missed,
        } = if history {
            match self.catch_up(topic, since).await {
                Ok(catchup) => catchup,
                Err(refusal) => {
                    if !duplicate {
                        self.deps.hub.unsubscribe(topic, self.id);
                    }
                    return Err(refusal);
                }
            }
        } else {
            Catchup::default()
        };
        let before = missed.len();
        missed.retain(|entry| crate::type_filter::admits(types.as_ref(), &entry.event));
        if missed.len() < before {
            metrics::counter!(m::TYPE_FILTERED).increment((before - missed.len()) as u64);
        }
        let presence = (presence && self.deps.presence.covers(&family))
            .then(|| self.deps.presence.track(topic, identity));
        let gets_presence = presence.is_some();
        let channel = Channel {
            join_ref: join_ref.map(str::to_string),
            family,
            seen: position.clone(),
            presence,
            types,
        };
        let replaced = self.install(&shared, channel);
        if let Some(Some(phx_ref)) = replaced.as_ref().and_then(|c| c.presence.as_ref()) {
            self.deps.presence.untrack(topic, phx_ref);
        }
        Ok(Joined {
            topic: shared,
            response,
            position,
            recovered,
            missed,
            presence: gets_presence,
            replaced,
        })
    }

    /// The topic's position and, for a resume (`since`), what was missed: a resume whose
    /// history cannot be read while the link is down is refused rather than told of a gap.
    async fn catch_up(
        &self,
        topic: &str,
        since: Option<&Position>,
    ) -> Result<Catchup, JoinRefusal> {
        match self.deps.history.recover(topic, since).await {
            Ok(recovery) => {
                let recovered = since.map(|_| recovery.missed.is_some());
                if let Some(recovered) = recovered {
                    let outcome = if recovered {
                        "recovered"
                    } else {
                        "not_recovered"
                    };
                    metrics::counter!(m::RECOVERIES, "outcome" => outcome).increment(1);
                }
                Ok(Catchup {
                    position: Some(recovery.position),
                    recovered,
                    missed: recovery.missed.unwrap_or_default(),
                })
            }
            Err(_) if since.is_some() => {
                metrics::counter!(m::RECOVERIES, "outcome" => "unavailable").increment(1);
                Err(JoinRefusal::Unavailable)
            }
            Err(_) => Ok(Catchup::default()),
        }
    }

    /// Puts a channel in place: replaces the topic's old channel (returned) or adds it.
    fn install(&mut self, shared: &Arc<str>, channel: Channel) -> Option<Channel> {
        match self.index(shared) {
            Some(i) => Some(std::mem::replace(&mut self.channels[i].1, channel)),
            None => {
                if self.transport == Transport::Socket {
                    metrics::gauge!(m::CHANNELS_JOINED, "family" => channel.family.label())
                        .increment(1.0);
                }
                self.channels.push((shared.clone(), channel));
                None
            }
        }
    }

    /// Leaves a topic: unsubscribes, untracks presence; returns the channel that was left.
    pub fn leave(&mut self, topic: &str) -> Option<Channel> {
        let i = self.index(topic)?;
        let (topic, channel) = self.channels.swap_remove(i);
        self.release(&topic, &channel);
        Some(channel)
    }

    fn release(&self, topic: &str, channel: &Channel) {
        self.deps.hub.unsubscribe(topic, self.id);
        if let Some(Some(phx_ref)) = &channel.presence {
            self.deps.presence.untrack(topic, phx_ref);
        }
        if self.transport == Transport::Socket {
            metrics::gauge!(m::CHANNELS_JOINED, "family" => channel.family.label()).decrement(1.0);
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        for (topic, channel) in std::mem::take(&mut self.channels) {
            self.release(&topic, &channel);
        }
        self.deps.hub.unregister_socket(self.id);
        match self.transport {
            Transport::Socket => {
                self.deps.metrics.sockets_connected.decrement(1.0);
                metrics::counter!(m::SOCKET_CLOSES, "reason" => self.ending).increment(1);
            }
            Transport::Stream => metrics::gauge!(m::SSE_STREAMS).decrement(1.0),
        }
        tracing::debug!(socket = self.id, reason = self.ending, "subscriber ended");
    }
}
