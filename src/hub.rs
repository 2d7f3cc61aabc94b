//! The topic map: which sockets are subscribed to which topics, and fan-out of broadcasts.
//!
//! Every socket owns one [`Outbox`]: a bounded queue of shared [`BroadcastFrame`]s plus a close
//! signal. Publishing encodes the frame once and pushes the same `Arc` into each subscriber's
//! outbox; a full outbox drops the oldest broadcast **of the topic with the most queued frames**
//! (so an `org_events` flood cannot evict a rare `queue_update` or notification) and counts the
//! drop per topic so the socket can tell its client (`events_dropped`). Replies never pass through here, so they are
//! never dropped. Empty topics are removed as their last subscriber leaves.
//!
//! Invariant: the hub never writes to a socket and never blocks on one; a stalled client only
//! fills its own outbox.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::history::Position;
use crate::metrics::Metrics;
use crate::phoenix::codec::BroadcastFrame;

pub type SocketId = u64;

/// Why the server is closing a socket; each maps to a WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The hub is shutting down or draining (1012, service restart).
    Restart,
    /// The hub is going away (1001).
    GoingAway,
}

/// Queue capacity an idle socket keeps after a burst (frames are pointers: 8 bytes each).
pub const RETAINED_CAPACITY: usize = 16;

/// One socket's queue of broadcasts waiting to be written.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
    capacity: usize,
    /// The subscriber's identity key (`user:<id>`, `player:<id>`), for revocations.
    identity: Option<Box<str>>,
}

#[derive(Debug, Default)]
struct OutboxState {
    frames: VecDeque<Arc<BroadcastFrame>>,
    /// Frames queued per topic (a handful of topics per socket: a scan beats a map).
    queued_per_topic: Vec<(Arc<str>, usize)>,
    /// Broadcasts dropped since the client was last told, per topic.
    dropped: Vec<(Arc<str>, u64)>,
    closing: Option<CloseReason>,
    /// Revocations of the subscriber's identity not acted on yet.
    revoked: Vec<crate::auth::Scope>,
}

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Queued,
    /// Queued, and the oldest queued broadcast was dropped to make room.
    QueuedDroppedOldest,
    /// The socket is closing; nothing was queued.
    Closed,
}

/// What a socket should write next.
#[derive(Debug, Default)]
pub struct Drained {
    pub frames: Vec<Arc<BroadcastFrame>>,
    /// `(topic, count)` of broadcasts dropped since the last drain.
    pub dropped: Vec<(Arc<str>, u64)>,
    pub closing: Option<CloseReason>,
    /// Revocations of the subscriber's identity: leave the org's topics, or close.
    pub revoked: Vec<crate::auth::Scope>,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Outbox::for_identity(capacity, None)
    }

    pub fn for_identity(capacity: usize, identity: Option<String>) -> Self {
        Outbox {
            state: Mutex::new(OutboxState::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            identity: identity.map(String::into_boxed_str),
        }
    }

    /// Asks the subscriber to act on a revocation of its identity.
    pub fn revoke(&self, scope: crate::auth::Scope) {
        self.state.lock().expect("outbox lock").revoked.push(scope);
        self.notify.notify_one();
    }

    pub fn push(&self, frame: &Arc<BroadcastFrame>) -> PushOutcome {
        match self.push_run(std::slice::from_ref(frame)) {
            None => PushOutcome::Closed,
            Some(0) => PushOutcome::Queued,
            Some(_) => PushOutcome::QueuedDroppedOldest,
        }
    }

    /// Queues `frames` in order with one lock and one wake-up (a run of one topic's
    /// broadcasts costs a socket what one does). Returns how many queued broadcasts were
    /// dropped to make room, or `None` when the socket is closing and nothing was queued.
    pub fn push_run(&self, frames: &[Arc<BroadcastFrame>]) -> Option<u64> {
        let dropped = {
            let mut state = self.state.lock().expect("outbox lock");
            if state.closing.is_some() {
                return None;
            }
            let mut dropped = 0;
            for frame in frames {
                if state.frames.len() >= self.capacity {
                    state.drop_oldest_of_busiest_topic();
                    dropped += 1;
                }
                state.count_queued(&frame.topic, 1);
                state.frames.push_back(frame.clone());
            }
            dropped
        };
        self.notify.notify_one();
        Some(dropped)
    }

    /// Takes up to `max` frames, the pending drop counts and the close signal.
    pub fn drain(&self, max: usize, into: &mut Drained) {
        let mut state = self.state.lock().expect("outbox lock");
        let take = state.frames.len().min(max);
        let start = into.frames.len();
        into.frames.extend(state.frames.drain(..take));
        for frame in &into.frames[start..] {
            state.count_queued(&frame.topic, -1);
        }
        into.dropped.append(&mut state.dropped);
        into.revoked.append(&mut state.revoked);
        into.closing = state.closing;
        if !state.frames.is_empty() {
            // More to write: make sure the next wait returns at once.
            self.notify.notify_one();
        } else if state.frames.capacity() > RETAINED_CAPACITY {
            // A burst is over: give the memory back so lagging once does not cost forever.
            state.frames.shrink_to(RETAINED_CAPACITY);
        }
    }

    /// Asks the socket to close. `GoingAway` (the hard stop at the end of the grace period)
    /// overrides an earlier `Restart` the session has not acted on yet.
    pub fn close(&self, reason: CloseReason) {
        {
            let mut state = self.state.lock().expect("outbox lock");
            if state.closing.is_none() || reason == CloseReason::GoingAway {
                state.closing = Some(reason);
            }
        }
        self.notify.notify_one();
    }

    pub fn queued(&self) -> usize {
        self.state.lock().expect("outbox lock").frames.len()
    }

    /// Resolves when something was pushed or the socket should close.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

fn same_topic(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl OutboxState {
    fn count_queued(&mut self, topic: &Arc<str>, delta: isize) {
        // Frames share their topic's `Arc` with the topic map, so a pointer comparison almost
        // always decides; the string comparison is the fallback.
        match self
            .queued_per_topic
            .iter()
            .position(|(t, _)| same_topic(t, topic))
        {
            Some(i) => {
                let count = &mut self.queued_per_topic[i].1;
                *count = count.saturating_add_signed(delta);
                if *count == 0 {
                    self.queued_per_topic.swap_remove(i);
                }
            }
            None if delta > 0 => self.queued_per_topic.push((topic.clone(), delta as usize)),
            None => {}
        }
    }

    /// Drops the oldest queued frame of the topic with the most queued frames (ties: the topic
    /// whose oldest frame is oldest) and counts it for `events_dropped`.
    fn drop_oldest_of_busiest_topic(&mut self) {
        let Some(busiest) = self.queued_per_topic.iter().map(|(_, count)| *count).max() else {
            return;
        };
        let Some(index) = self.frames.iter().position(|frame| {
            self.queued_per_topic
                .iter()
                .any(|(topic, count)| *count == busiest && same_topic(topic, &frame.topic))
        }) else {
            return;
        };
        let dropped = self.frames.remove(index).expect("index in range");
        self.count_queued(&dropped.topic, -1);
        match self
            .dropped
            .iter_mut()
            .find(|(topic, _)| same_topic(topic, &dropped.topic))
        {
            Some((_, count)) => *count += 1,
            None => self.dropped.push((dropped.topic.clone(), 1)),
        }
    }
}

/// The in-process topic map shared by every socket and every publisher.
pub struct Hub {
    topics: DashMap<Arc<str>, HashMap<SocketId, Arc<Outbox>>>,
    /// The last history position this instance delivered, per topic with subscribers: after a
    /// Redis reconnect each such topic is caught up from there ([`crate::ingest::Pipeline`]).
    delivered: DashMap<Arc<str>, Position>,
    sockets: DashMap<SocketId, Arc<Outbox>>,
    next_socket_id: AtomicU64,
    outbox_capacity: usize,
    metrics: Metrics,
    /// Broadcasts that reached at least one subscriber, and broadcasts dropped for slow
    /// consumers, since start (the status page turns them into rates).
    broadcasts: AtomicU64,
    dropped: AtomicU64,
}

impl Hub {
    pub fn new(outbox_capacity: usize, metrics: Metrics) -> Self {
        Hub {
            topics: DashMap::new(),
            delivered: DashMap::new(),
            sockets: DashMap::new(),
            next_socket_id: AtomicU64::new(1),
            outbox_capacity,
            metrics,
            broadcasts: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Registers a new socket and returns its id and outbox.
    pub fn register_socket(&self) -> (SocketId, Arc<Outbox>) {
        self.register_identity(None)
    }

    /// Registers a subscriber of an identity (its presence key), so revocations reach it.
    pub fn register_identity(&self, identity: Option<String>) -> (SocketId, Arc<Outbox>) {
        let id = self.next_socket_id.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::for_identity(self.outbox_capacity, identity));
        self.sockets.insert(id, outbox.clone());
        (id, outbox)
    }

    /// Removes a socket; its subscriptions must have been dropped by the caller already.
    pub fn unregister_socket(&self, id: SocketId) {
        self.sockets.remove(&id);
    }

    /// Tells every local subscriber of `identity` about a revocation; returns how many. A scan:
    /// revocations are rare, and no per-socket index is kept for them.
    pub fn revoke(&self, identity: &str, scope: crate::auth::Scope) -> usize {
        let outboxes: Vec<Arc<Outbox>> = self
            .sockets
            .iter()
            .filter(|entry| entry.value().identity.as_deref() == Some(identity))
            .map(|entry| entry.value().clone())
            .collect();
        for outbox in &outboxes {
            outbox.revoke(scope.clone());
        }
        outboxes.len()
    }

    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// Subscribes socket `id` to `topic`; returns the topic's shared name (the `Arc` every
    /// frame of the topic carries, so sessions can match frames by pointer).
    pub fn subscribe(&self, topic: &str, id: SocketId, outbox: &Arc<Outbox>) -> Arc<str> {
        if let Some(mut subscribers) = self.topics.get_mut(topic) {
            subscribers.insert(id, outbox.clone());
            return subscribers.key().clone();
        }
        let mut subscribers = self.topics.entry(Arc::from(topic)).or_default();
        subscribers.insert(id, outbox.clone());
        subscribers.key().clone()
    }

    pub fn unsubscribe(&self, topic: &str, id: SocketId) {
        if let Some(mut subscribers) = self.topics.get_mut(topic) {
            subscribers.remove(&id);
        }
        if self
            .topics
            .remove_if(topic, |_, subscribers| subscribers.is_empty())
            .is_some()
        {
            self.delivered.remove(topic);
        }
    }

    /// Every topic with subscribers and the last position delivered on it.
    pub fn delivered_positions(&self) -> Vec<(Arc<str>, Position)> {
        self.delivered
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect()
    }

    /// The last position delivered on `topic` here, if any.
    pub fn delivered_position(&self, topic: &str) -> Option<Position> {
        self.delivered.get(topic).map(|entry| entry.value().clone())
    }

    /// Tells every subscriber of `topic` that its stream has a gap (see
    /// [`BroadcastFrame::gap`]); returns how many were told.
    pub fn announce_gap(&self, topic: &str) -> usize {
        let Some(subscribers) = self.topics.get(topic) else {
            return 0;
        };
        let frame = BroadcastFrame::gap(subscribers.key().clone());
        let told = subscribers
            .values()
            .filter(|outbox| outbox.push(&frame) != PushOutcome::Closed)
            .count();
        drop(subscribers);
        // Whoever rejoins starts from its own `since`; the next broadcast sets it again.
        self.delivered.remove(topic);
        told
    }

    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// The `limit` topics with the most subscribers here, largest first.
    pub fn largest_topics(&self, limit: usize) -> Vec<(String, usize)> {
        let mut topics: Vec<(String, usize)> = self
            .topics
            .iter()
            .map(|entry| (entry.key().to_string(), entry.value().len()))
            .collect();
        topics.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        topics.truncate(limit);
        topics
    }

    /// (broadcasts delivered, broadcasts dropped for slow consumers) since start.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.broadcasts.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    /// Broadcasts `payload` (valid JSON) as `event` on `topic`, without a history position.
    #[cfg(test)]
    pub fn publish(&self, topic: &str, event: &str, payload: Bytes) -> usize {
        self.publish_at(topic, event, payload, None)
    }

    /// Broadcasts `payload` (valid JSON) as `event` on `topic` at `position`. The frame is
    /// encoded once, and only when someone is subscribed. Returns how many sockets it was
    /// queued for.
    pub fn publish_at(
        &self,
        topic: &str,
        event: &str,
        payload: Bytes,
        position: Option<Position>,
    ) -> usize {
        self.publish_run(topic, [(event, payload, position)])
    }

    /// Broadcasts a run of `topic`'s broadcasts `(event, payload, position)`, in order: each
    /// frame is encoded once, and each subscriber's outbox is locked and woken once for the
    /// whole run, not once per broadcast (the sequencer delivers what one history append
    /// placed as one run). Returns how many sockets the run was queued for.
    pub fn publish_run<E: AsRef<str>>(
        &self,
        topic: &str,
        run: impl IntoIterator<Item = (E, Bytes, Option<Position>)>,
    ) -> usize {
        let published_at = Instant::now();
        let Some(subscribers) = self.topics.get(topic) else {
            return 0;
        };
        let frames: Vec<Arc<BroadcastFrame>> = run
            .into_iter()
            .map(|(event, payload, position)| {
                if let Some(position) = &position {
                    self.remember_delivered(subscribers.key(), position);
                }
                BroadcastFrame::new(
                    subscribers.key().clone(),
                    event.as_ref(),
                    payload,
                    position,
                    published_at,
                )
            })
            .collect();
        if frames.is_empty() {
            return 0;
        }
        let mut queued = 0;
        let mut dropped = 0;
        for outbox in subscribers.values() {
            if let Some(made_room) = outbox.push_run(&frames) {
                queued += 1;
                dropped += made_room;
            }
        }
        drop(subscribers);
        self.broadcasts
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.metrics
                .broadcasts_dropped_slow_consumer
                .increment(dropped);
        }
        queued
    }

    fn remember_delivered(&self, topic: &Arc<str>, position: &Position) {
        match self.delivered.get_mut(&**topic) {
            Some(mut last) => {
                if last.epoch != position.epoch || last.offset < position.offset {
                    *last = position.clone();
                }
            }
            None => {
                self.delivered.insert(topic.clone(), position.clone());
            }
        }
    }

    /// Asks every socket to close, `batch` sockets at a time with `pause` between batches, so
    /// that reconnecting clients do not all arrive in the same instant.
    pub async fn close_all(&self, reason: CloseReason, batch: usize, pause: std::time::Duration) {
        let outboxes: Vec<Arc<Outbox>> = self
            .sockets
            .iter()
            .map(|entry| entry.value().clone())
            .collect();
        for (index, chunk) in outboxes.chunks(batch.max(1)).enumerate() {
            if index > 0 {
                tokio::time::sleep(pause).await;
            }
            for outbox in chunk {
                outbox.close(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(capacity: usize) -> Hub {
        Hub::new(capacity, Metrics::detached())
    }

    /// Drains `outbox`: the V2 text of each queued frame, and the drop counts per topic.
    fn drain_texts(outbox: &Outbox) -> (Vec<String>, Vec<(Arc<str>, u64)>) {
        let mut drained = Drained::default();
        outbox.drain(10, &mut drained);
        let texts = drained
            .frames
            .iter()
            .map(|f| f.text(crate::phoenix::codec::Vsn::V2).to_string())
            .collect();
        (texts, drained.dropped)
    }

    #[test]
    fn publish_shares_one_encoding() {
        let hub = hub(8);
        let (a, outbox_a) = hub.register_socket();
        let (b, outbox_b) = hub.register_socket();
        hub.subscribe("t", a, &outbox_a);
        hub.subscribe("t", b, &outbox_b);
        assert_eq!(hub.publish("t", "e", Bytes::from_static(b"{}")), 2);
        let (mut da, mut db) = (Drained::default(), Drained::default());
        outbox_a.drain(10, &mut da);
        outbox_b.drain(10, &mut db);
        assert!(Arc::ptr_eq(&da.frames[0], &db.frames[0]));
        assert_eq!(hub.publish("nobody", "e", Bytes::from_static(b"{}")), 0);
    }

    #[test]
    fn empty_topics_are_freed() {
        let hub = hub(8);
        let (a, outbox) = hub.register_socket();
        hub.subscribe("t", a, &outbox);
        assert_eq!(hub.topic_count(), 1);
        hub.unsubscribe("t", a);
        assert_eq!(hub.topic_count(), 0);
    }

    #[test]
    fn full_outbox_drops_oldest_and_counts_per_topic() {
        let hub = hub(2);
        let (a, outbox) = hub.register_socket();
        hub.subscribe("t", a, &outbox);
        for i in 0..5 {
            hub.publish("t", "e", Bytes::from(format!("{{\"i\":{i}}}")));
        }
        let (texts, dropped) = drain_texts(&outbox);
        assert_eq!(dropped, vec![(Arc::from("t"), 3)]);
        assert_eq!(
            texts,
            [
                r#"[null,null,"t","e",{"i":3}]"#,
                r#"[null,null,"t","e",{"i":4}]"#
            ]
        );
    }

    #[test]
    fn a_flood_on_one_topic_does_not_evict_another_topics_frames() {
        let hub = hub(4);
        let (a, outbox) = hub.register_socket();
        hub.subscribe("rare", a, &outbox);
        hub.subscribe("busy", a, &outbox);
        hub.publish("rare", "e", Bytes::from_static(b"{\"r\":1}"));
        for i in 0..10 {
            hub.publish("busy", "e", Bytes::from(format!("{{\"b\":{i}}}")));
        }
        let mut drained = Drained::default();
        outbox.drain(10, &mut drained);
        let topics: Vec<_> = drained.frames.iter().map(|f| f.topic.to_string()).collect();
        assert_eq!(
            topics,
            ["rare", "busy", "busy", "busy"],
            "the rare frame survived"
        );
        assert_eq!(drained.dropped, vec![(Arc::from("busy"), 7)]);
        let last = drained
            .frames
            .last()
            .unwrap()
            .text(crate::phoenix::codec::Vsn::V2)
            .to_string();
        assert!(last.contains("\"b\":9"), "newest busy frame kept: {last}");
        assert!(outbox.state.lock().unwrap().queued_per_topic.is_empty());
    }

    #[test]
    fn a_run_is_queued_in_order_like_broadcasts_one_by_one() {
        let hub = hub(4);
        let (a, outbox) = hub.register_socket();
        let (b, closing) = hub.register_socket();
        hub.subscribe("rare", a, &outbox);
        hub.subscribe("t", a, &outbox);
        hub.subscribe("t", b, &closing);
        closing.close(CloseReason::Restart);
        hub.publish("rare", "e", Bytes::from_static(b"{\"r\":1}"));
        let epoch = crate::history::Epoch::new("e7").unwrap();
        let run = (0..6).map(|i| {
            let position = Position {
                epoch,
                offset: i + 1,
            };
            ("e", Bytes::from(format!("{{\"i\":{i}}}")), Some(position))
        });
        assert_eq!(
            hub.publish_run("t", run),
            1,
            "the closing socket takes nothing"
        );
        assert_eq!(
            hub.delivered_position("t"),
            Some(Position { epoch, offset: 6 })
        );
        assert_eq!(hub.totals(), (7, 3));
        let (texts, dropped) = drain_texts(&outbox);
        assert_eq!(
            texts,
            [
                r#"[null,null,"rare","e",{"r":1}]"#,
                r#"[null,"e7:4","t","e",{"i":3}]"#,
                r#"[null,"e7:5","t","e",{"i":4}]"#,
                r#"[null,"e7:6","t","e",{"i":5}]"#,
            ]
        );
        assert_eq!(dropped, vec![(Arc::from("t"), 3)]);
        assert_eq!(hub.publish_run("nobody", [("e", Bytes::new(), None)]), 0);
    }

    #[test]
    fn going_away_overrides_a_pending_restart() {
        let hub = hub(2);
        let (_, outbox) = hub.register_socket();
        outbox.close(CloseReason::Restart);
        outbox.close(CloseReason::GoingAway);
        outbox.close(CloseReason::Restart);
        let mut drained = Drained::default();
        outbox.drain(10, &mut drained);
        assert_eq!(drained.closing, Some(CloseReason::GoingAway));
    }

    #[test]
    fn memory_of_a_burst_is_given_back() {
        let hub = hub(1024);
        let (a, outbox) = hub.register_socket();
        hub.subscribe("t", a, &outbox);
        for _ in 0..500 {
            hub.publish("t", "e", Bytes::from_static(b"{}"));
        }
        let mut drained = Drained::default();
        while outbox.queued() > 0 {
            drained.frames.clear();
            outbox.drain(256, &mut drained);
        }
        assert!(outbox.state.lock().unwrap().frames.capacity() <= RETAINED_CAPACITY);
    }

    #[test]
    fn closing_outbox_refuses_frames() {
        let hub = hub(2);
        let (a, outbox) = hub.register_socket();
        hub.subscribe("t", a, &outbox);
        outbox.close(CloseReason::Restart);
        assert_eq!(hub.publish("t", "e", Bytes::from_static(b"{}")), 0);
        let mut drained = Drained::default();
        outbox.drain(10, &mut drained);
        assert_eq!(drained.closing, Some(CloseReason::Restart));
    }
}
