//! Who gives broadcasts their history positions, so that Redis's work per event does not grow
//! with the number of hub instances.
//!
//! Every instance receives every event (PSUBSCRIBE), but only one of them — the **sequencer**,
//! the holder of the lease `prostaff:sequencer` — runs the history script for it. The script
//! publishes a [`Notice`] of the positions it gave (`prostaff:seq:<topic>`); every other
//! instance keeps the event waiting in its topic's queue until the notice names it, then
//! delivers it at that position. Per event, Redis runs one script per topic (and one PUBLISH of
//! the notice) whatever the number of instances, instead of one script per topic per instance.
//!
//! Correctness never rests on the lease: the script is idempotent per event (its dedup key), so
//! two instances that both believe they hold the lease, or a waiting instance that appends
//! itself, give an event the same one position. An event still waiting [`FALLBACK_AFTER`] its
//! arrival (the sequencer died, lost its link, or missed the message) is appended by the
//! instance that waits for it, together with everything queued behind it on its topic: a lost
//! sequencer costs that latency, never an event. An append that fails because the link did
//! (disconnected, timed out, the connection dropped under it) leaves its broadcasts waiting:
//! once the link is back and the pipeline has caught up from history ([`Sequencer::suspend`],
//! [`Sequencer::resume`]), the sweep appends them — the same position if history already has
//! them, the next ones if the failover lost them — so a Redis failover delivers them late but
//! positioned, never without a position a client could resume past. A notice that names an
//! event this instance never received (it missed the message while reconnecting) is repaired
//! from history after [`EARLY_GRACE`] when the topic has subscribers here, so a reconnect
//! leaves no silent gap.
//!
//! Invariant: each topic's broadcasts are delivered in queue order (Redis's order); a run of
//! ready broadcasts is delivered in offset order, so a late fallback append (which gets a later
//! offset than events behind it that the sequencer already placed) never makes a socket skip
//! one as already seen.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::types::scripts::Script;
use tokio_util::sync::CancellationToken;

use crate::history::{AppendItem, History, Notice, Position};
use crate::hub::Hub;
use crate::logsafe::LogSafe;
use crate::redis::RedisLink;

/// The key whose holder is the sequencer.
pub const LEASE_KEY: &str = "prostaff:sequencer";
/// The lease lives this long unless renewed: a sequencer that died is replaced within it.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// The holder renews (and every other instance tries to take) the lease this often.
pub const LEASE_INTERVAL: Duration = Duration::from_secs(2);
/// A broadcast still without a position this long after it arrived is appended by the
/// instance that waits for it.
pub const FALLBACK_AFTER: Duration = Duration::from_millis(500);
/// A notice naming a broadcast this instance never received is repaired from history after
/// this long.
pub const EARLY_GRACE: Duration = Duration::from_secs(1);
/// How often waiting broadcasts and unmatched notices are checked.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Unmatched notices kept at most (per instance); more are dropped (counted).
const MAX_EARLY: usize = 65_536;

const LEASE_SCRIPT: &str = r#"
-- KEYS: the lease. ARGV: this instance, ttl_ms, '1' to take or renew it, '0' to release it.
-- Returns '1' when this instance holds the lease afterwards.
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return '0'
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return '1'
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return '1'
end
return '0'
"#;

/// Where a queued broadcast stands.
#[derive(Debug, Clone, PartialEq)]
enum Status {
    /// Waiting for a position (a notice, or an append of its own).
    Waiting,
    /// Sent in an append call that has not answered yet.
    Appending,
    /// Ready to deliver; `None` when its append failed (delivered without a position).
    Ready(Option<Position>),
}

struct Queued {
    id: u64,
    dedup: Arc<str>,
    event: String,
    raw: Bytes,
    arrived: Instant,
    status: Status,
}

/// A notice for a broadcast this instance has not received (yet).
struct Early {
    dedup: String,
    position: Position,
    arrived: Instant,
}

#[derive(Default)]
struct TopicQueue {
    queued: VecDeque<Queued>,
    early: VecDeque<Early>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    topics: HashMap<String, TopicQueue>,
    early: usize,
}

/// One append call to make: the topic and the broadcasts (id, dedup, event, payload) it sends.
struct Call {
    topic: String,
    items: Vec<(u64, Arc<str>, String, Bytes)>,
}

/// How a broadcast got its position (a metric label).
#[derive(Clone, Copy)]
enum Via {
    Appended,
    Notice,
    Fallback,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Appended => "appended",
            Via::Notice => "notice",
            Via::Fallback => "fallback",
        }
    }
}

pub struct Sequencer {
    history: Arc<History>,
    hub: Arc<Hub>,
    redis: Arc<RedisLink>,
    holds_lease: AtomicBool,
    /// Set by [`Sequencer::retire`]: the lease is never taken again.
    retired: AtomicBool,
    /// Whether the sweep may append what waits: false from the start of each (re)connect until
    /// the pipeline has caught up from history, so that what history already holds is
    /// delivered before anything that waited here is appended behind it.
    caught_up: AtomicBool,
    lease: Script,
    state: Mutex<State>,
}

impl Sequencer {
    pub fn new(history: Arc<History>, hub: Arc<Hub>, redis: Arc<RedisLink>) -> Self {
        Sequencer {
            history,
            hub,
            redis,
            holds_lease: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            caught_up: AtomicBool::new(false),
            lease: Script::from_lua(LEASE_SCRIPT),
            state: Mutex::default(),
        }
    }

    /// Whether this instance is the sequencer now (it holds the lease and its link is up).
    pub fn is_sequencer(&self) -> bool {
        self.holds_lease.load(Ordering::Relaxed) && self.redis.is_connected()
    }

    /// Takes or renews the lease (`take`), or gives it up; records whether this instance
    /// holds it afterwards.
    pub async fn claim(&self, take: bool) {
        let take = take && !self.retired.load(Ordering::Relaxed);
        let holds = match self
            .redis
            .eval(
                &self.lease,
                vec![LEASE_KEY.to_string()],
                vec![
                    self.redis.instance().to_string(),
                    LEASE_TTL.as_millis().to_string(),
                    if take { "1" } else { "0" }.to_string(),
                ],
            )
            .await
        {
            Ok(reply) => reply.first().is_some_and(|r| r == "1"),
            Err(error) => {
                if take {
                    tracing::debug!(%error, "sequencer lease not renewed");
                }
                false
            }
        };
        let held = self.holds_lease.swap(holds, Ordering::Relaxed);
        if held != holds {
            tracing::info!(sequencer = holds, "history sequencer role changed");
        }
        metrics::gauge!(crate::metrics::SEQUENCER).set(if holds { 1.0 } else { 0.0 });
    }

    /// Gives the lease up for good (a draining instance), so another instance takes it at its
    /// next renewal instead of after [`LEASE_TTL`].
    pub async fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.claim(false).await;
    }

    /// A (re)connect starts: the sweep appends nothing until [`Sequencer::resume`].
    pub fn suspend(&self) {
        self.caught_up.store(false, Ordering::Relaxed);
    }

    /// The pipeline has caught up after a (re)connect: what waits may be appended again.
    pub fn resume(&self) {
        self.caught_up.store(true, Ordering::Relaxed);
    }

    /// Renews the lease every [`LEASE_INTERVAL`] and appends what waited too long every
    /// [`SWEEP_INTERVAL`], until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut lease = tokio::time::interval(LEASE_INTERVAL);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = lease.tick() => {
                    if self.redis.is_connected() {
                        self.claim(true).await;
                    }
                }
                _ = sweep.tick() => self.sweep().await,
            }
        }
    }

    /// Queues one broadcast of `topic`, in Redis's order; it is delivered by [`Sequencer::settle`],
    /// a notice or the sweep, whichever gives it its position.
    pub fn push(&self, topic: &str, event: String, raw: Bytes, dedup: Arc<str>) {
        let mut state = self.state.lock().expect("sequencer lock");
        let state = &mut *state;
        let id = state.next_id;
        state.next_id += 1;
        // The topic's name is copied only when its queue is new (not once per broadcast).
        if !state.topics.contains_key(topic) {
            state
                .topics
                .insert(topic.to_string(), TopicQueue::default());
        }
        let queue = state.topics.get_mut(topic).expect("inserted above");
        // A notice that came first (it can, when the raw message was delayed): taken now.
        let status = match queue.early.iter().position(|e| *e.dedup == *dedup) {
            Some(index) => {
                let early = queue.early.remove(index).expect("index in range");
                state.early -= 1;
                count(Via::Notice, 1);
                Status::Ready(Some(early.position))
            }
            None => Status::Waiting,
        };
        queue.queued.push_back(Queued {
            id,
            dedup,
            event,
            raw,
            arrived: Instant::now(),
            status,
        });
    }

    /// After a batch was pushed on `topics` (each once): the sequencer appends whatever waits
    /// (one call per topic, topics concurrently); any instance delivers what is ready.
    pub async fn settle(&self, topics: &[String]) {
        let mut appended = Vec::new();
        if self.is_sequencer() {
            let calls = self.take_calls(|_, _| true);
            // Topics that waited from before this instance held the lease are appended too, and
            // must be delivered as well.
            appended = calls.iter().map(|call| call.topic.clone()).collect();
            self.append(calls, Via::Appended).await;
        }
        let mut state = self.state.lock().expect("sequencer lock");
        for topic in topics.iter().chain(&appended) {
            self.deliver(&mut state, topic);
        }
    }

    /// A notice from another instance's append: its positions are given to the broadcasts
    /// waiting for them, and what became ready is delivered.
    pub fn notice(&self, topic: &str, payload: &[u8]) {
        let Some(notice) = Notice::parse(payload) else {
            metrics::counter!(crate::metrics::HISTORY_NOTICES, "outcome" => "undecodable")
                .increment(1);
            tracing::warn!(topic = %LogSafe(topic), "history notice that is not one; ignored");
            return;
        };
        if notice.origin == self.redis.instance() {
            return;
        }
        metrics::counter!(crate::metrics::HISTORY_NOTICES, "outcome" => "received").increment(1);
        let subscribed = self.hub.has_subscribers(topic);
        // What this instance delivered up to needs no repair (a fallback append's notice names
        // broadcasts the sequencer placed and this instance already delivered).
        let delivered = self.hub.delivered_position(topic);
        let mut state = self.state.lock().expect("sequencer lock");
        let state = &mut *state;
        let queue = state.topics.entry(topic.to_string()).or_default();
        let mut taken = 0;
        for (dedup, position) in notice.positions {
            let waiting = queue.queued.iter_mut().find(|q| {
                matches!(q.status, Status::Waiting | Status::Appending) && *q.dedup == *dedup
            });
            match waiting {
                Some(queued) => {
                    queued.status = Status::Ready(Some(position));
                    taken += 1;
                }
                // Nobody here can need it, or it is already delivered: nothing to repair.
                None if !subscribed => {}
                None if delivered
                    .as_ref()
                    .is_some_and(|d| position.is_covered_by(d)) => {}
                None if state.early >= MAX_EARLY => {
                    metrics::counter!(crate::metrics::HISTORY_NOTICES, "outcome" => "overflow")
                        .increment(1);
                }
                None => {
                    state.early += 1;
                    queue.early.push_back(Early {
                        dedup,
                        position,
                        arrived: Instant::now(),
                    });
                }
            }
        }
        count(Via::Notice, taken);
        if queue.queued.is_empty() && queue.early.is_empty() {
            state.topics.remove(topic);
            return;
        }
        self.deliver(state, topic);
    }

    /// Appends the broadcasts that waited longer than [`FALLBACK_AFTER`] (with whatever waits
    /// behind them on their topic), and repairs from history the topics of notices that stayed
    /// unmatched for [`EARLY_GRACE`].
    ///
    /// While the link is down (or not yet caught up after a reconnect), what waits keeps
    /// waiting: an append now could only fail.
    pub async fn sweep(&self) {
        let now = Instant::now();
        let linked = self.redis.is_connected() && self.caught_up.load(Ordering::Relaxed);
        let calls = if linked {
            self.take_calls(|_, queue| {
                queue.queued.iter().any(|q| {
                    q.status == Status::Waiting && now.duration_since(q.arrived) >= FALLBACK_AFTER
                })
            })
        } else {
            Vec::new()
        };
        if !calls.is_empty() {
            self.append(calls, Via::Fallback).await;
            let mut state = self.state.lock().expect("sequencer lock");
            let topics: Vec<String> = state.topics.keys().cloned().collect();
            for topic in topics {
                self.deliver(&mut state, &topic);
            }
        }
        for (topic, from) in self.take_unmatched(now) {
            self.repair(&topic, from).await;
        }
    }

    /// Marks the waiting broadcasts of every topic `select` picks as being appended, and
    /// returns one call per topic.
    fn take_calls(&self, select: impl Fn(&str, &TopicQueue) -> bool) -> Vec<Call> {
        let mut state = self.state.lock().expect("sequencer lock");
        let mut calls = Vec::new();
        for (topic, queue) in state.topics.iter_mut() {
            if !select(topic, queue) {
                continue;
            }
            let items: Vec<_> = queue
                .queued
                .iter_mut()
                .filter(|q| q.status == Status::Waiting)
                .map(|q| {
                    q.status = Status::Appending;
                    (q.id, q.dedup.clone(), q.event.clone(), q.raw.clone())
                })
                .collect();
            if !items.is_empty() {
                calls.push(Call {
                    topic: topic.clone(),
                    items,
                });
            }
        }
        calls
    }

    /// Runs `calls` (topics concurrently) and records each broadcast's position. A call that
    /// failed with the link puts its broadcasts back to waiting (the sweep appends them once the
    /// link is back); one that Redis refused leaves them ready without a position (delivered,
    /// but not resumable past): retrying it would hold the topic up for good.
    async fn append(&self, calls: Vec<Call>, via: Via) {
        let results = futures_util::future::join_all(calls.into_iter().map(|call| async move {
            let items: Vec<AppendItem> = call
                .items
                .iter()
                .map(|(_, dedup, event, raw)| AppendItem {
                    dedup,
                    event,
                    payload: raw,
                })
                .collect();
            let result = self.history.append_batch(&call.topic, &items).await;
            (call, result)
        }))
        .await;
        let mut state = self.state.lock().expect("sequencer lock");
        for (call, result) in results {
            let statuses: Vec<Status> = match result {
                Ok(positions) => {
                    count(via, positions.len() as u64);
                    positions
                        .into_iter()
                        .map(|p| Status::Ready(Some(p)))
                        .collect()
                }
                Err(error) if error.is_link_failure() || !self.redis.is_connected() => {
                    metrics::counter!(crate::metrics::HISTORY_APPENDS, "outcome" => "deferred", "via" => via.label())
                        .increment(call.items.len() as u64);
                    tracing::warn!(%error, topic = %LogSafe(&call.topic), "history append failed with the link; broadcasts wait for it");
                    vec![Status::Waiting; call.items.len()]
                }
                Err(error) => {
                    metrics::counter!(crate::metrics::HISTORY_APPENDS, "outcome" => "failed", "via" => via.label())
                        .increment(call.items.len() as u64);
                    tracing::warn!(%error, topic = %LogSafe(&call.topic), "broadcasts delivered without a history position");
                    vec![Status::Ready(None); call.items.len()]
                }
            };
            let Some(queue) = state.topics.get_mut(&call.topic) else {
                continue;
            };
            for ((id, ..), status) in call.items.iter().zip(statuses) {
                if let Some(queued) = queue.queued.iter_mut().find(|q| q.id == *id) {
                    // A notice may have placed it meanwhile: the same position (one per event).
                    if queued.status == Status::Appending {
                        queued.status = status;
                    }
                }
            }
        }
    }

    /// Delivers the ready broadcasts at the head of `topic`'s queue, in offset order.
    fn deliver(&self, state: &mut State, topic: &str) {
        let Some(queue) = state.topics.get_mut(topic) else {
            return;
        };
        let ready = queue
            .queued
            .iter()
            .take_while(|q| matches!(q.status, Status::Ready(_)))
            .count();
        if ready > 0 {
            let mut run: Vec<(Option<Position>, Queued)> = queue
                .queued
                .drain(..ready)
                .map(|q| match &q.status {
                    Status::Ready(position) => (position.clone(), q),
                    _ => unreachable!("the run holds ready broadcasts only"),
                })
                .collect();
            let one_epoch = run
                .iter()
                .filter_map(|(p, _)| p.as_ref().map(|p| p.epoch))
                .collect::<std::collections::HashSet<_>>()
                .len()
                <= 1;
            if one_epoch {
                run.sort_by_key(|(position, _)| position.as_ref().map(|p| p.offset));
            }
            self.hub.publish_run(
                topic,
                run.into_iter()
                    .map(|(position, queued)| (queued.event, queued.raw, position)),
            );
        }
        if queue.queued.is_empty() && queue.early.is_empty() {
            state.topics.remove(topic);
        }
    }

    /// Takes the notices unmatched for [`EARLY_GRACE`]: per topic, the position to read
    /// history after (just before the earliest of them, or what was delivered here if earlier).
    fn take_unmatched(&self, now: Instant) -> Vec<(String, Position)> {
        let mut state = self.state.lock().expect("sequencer lock");
        let state = &mut *state;
        let mut repairs = Vec::new();
        let mut removed = 0;
        for (topic, queue) in state.topics.iter_mut() {
            let mut from: Option<Position> = None;
            while let Some(early) = queue.early.front() {
                if now.duration_since(early.arrived) < EARLY_GRACE {
                    break;
                }
                let early = queue.early.pop_front().expect("front exists");
                removed += 1;
                let before = Position {
                    epoch: early.position.epoch,
                    offset: early.position.offset.saturating_sub(1),
                };
                from = Some(match from {
                    Some(f) if f.epoch == before.epoch && f.offset <= before.offset => f,
                    _ => before,
                });
            }
            if let Some(mut from) = from {
                if let Some(delivered) = self.hub.delivered_position(topic) {
                    if delivered.epoch == from.epoch && delivered.offset < from.offset {
                        from = delivered;
                    }
                }
                repairs.push((topic.clone(), from));
            }
        }
        state.early -= removed;
        state
            .topics
            .retain(|_, q| !q.queued.is_empty() || !q.early.is_empty());
        repairs
    }

    /// Delivers `topic`'s history after `from`: broadcasts this instance never received
    /// (sockets skip what they already have). Where history cannot cover it, the topic's
    /// subscribers are told of the gap.
    async fn repair(&self, topic: &str, from: Position) {
        match self.history.recover(topic, Some(&from)).await {
            Ok(recovery) => match recovery.missed {
                Some(entries) => {
                    metrics::counter!(crate::metrics::HISTORY_NOTICES, "outcome" => "repaired")
                        .increment(entries.len() as u64);
                    tracing::info!(topic = %LogSafe(topic), count = entries.len(), "broadcasts this instance missed delivered from history");
                    self.hub.publish_run(
                        topic,
                        entries
                            .into_iter()
                            .map(|entry| (entry.event, entry.payload, Some(entry.position))),
                    );
                }
                None => {
                    let told = self.hub.announce_gap(topic);
                    metrics::counter!(crate::metrics::HISTORY_NOTICES, "outcome" => "gap")
                        .increment(1);
                    tracing::warn!(topic = %LogSafe(topic), subscribers = told, "history cannot cover broadcasts this instance missed; subscribers told to rejoin");
                }
            },
            Err(error) => {
                metrics::counter!(crate::metrics::HISTORY_NOTICES, "outcome" => "repair_failed")
                    .increment(1);
                tracing::warn!(%error, topic = %LogSafe(topic), "repair from history failed");
            }
        }
    }
}

fn count(via: Via, n: u64) {
    if n > 0 {
        metrics::counter!(crate::metrics::HISTORY_APPENDS, "outcome" => "ok", "via" => via.label())
            .increment(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Drained;

    /// A sequencer whose link is not connected (it never holds the lease), and a socket
    /// subscribed to `t`.
    fn setup() -> (Sequencer, Arc<crate::hub::Outbox>) {
        let redis = RedisLink::new("redis://127.0.0.1:1");
        let hub = Arc::new(Hub::new(64, crate::metrics::Metrics::detached()));
        let (id, outbox) = hub.register_socket();
        hub.subscribe("t", id, &outbox);
        let history = Arc::new(History::new(redis.clone(), 10, Duration::from_secs(60)));
        (Sequencer::new(history, hub, redis), outbox)
    }

    fn delivered(outbox: &crate::hub::Outbox) -> Vec<(String, String)> {
        let mut drained = Drained::default();
        outbox.drain(64, &mut drained);
        drained
            .frames
            .iter()
            .map(|f| {
                let position = f.position.as_ref().map(|p| p.to_string());
                (f.event.to_string(), position.unwrap_or_default())
            })
            .collect()
    }

    fn push(sequencer: &Sequencer, event: &str) {
        sequencer.push(
            "t",
            event.to_string(),
            Bytes::from_static(b"{}"),
            event.into(),
        );
    }

    #[test]
    fn a_topic_is_delivered_in_queue_order_once_its_head_has_a_position() {
        let (sequencer, outbox) = setup();
        for event in ["a", "b", "c"] {
            push(&sequencer, event);
        }
        // b and c are placed; a, at the head, is not: nothing goes out.
        sequencer.notice("t", b"elsewhere\nb e1:2\nc e1:3");
        assert!(delivered(&outbox).is_empty());
        sequencer.notice("t", b"elsewhere\na e1:1");
        assert_eq!(
            delivered(&outbox),
            [("a", "e1:1"), ("b", "e1:2"), ("c", "e1:3")].map(|(e, p)| (e.into(), p.into()))
        );
        // Its own notices are ignored; an empty queue leaves nothing behind.
        sequencer.notice(
            "t",
            format!("{}\nx e1:9", sequencer.redis.instance()).as_bytes(),
        );
        assert!(sequencer.state.lock().unwrap().topics.is_empty());
    }

    #[test]
    fn a_late_fallback_position_is_delivered_after_the_earlier_offsets_behind_it() {
        let (sequencer, outbox) = setup();
        push(&sequencer, "late");
        push(&sequencer, "placed");
        // The sequencer never saw `late`; a fallback appended it after `placed`.
        sequencer.notice("t", b"elsewhere\nplaced e1:4");
        sequencer.notice("t", b"elsewhere\nlate e1:5");
        assert_eq!(
            delivered(&outbox),
            [("placed", "e1:4"), ("late", "e1:5")].map(|(e, p)| (e.into(), p.into())),
            "in queue order the socket would skip e1:4 as already seen after e1:5"
        );
    }

    /// Makes everything queued look older than [`FALLBACK_AFTER`].
    fn age(sequencer: &Sequencer) {
        for queue in sequencer.state.lock().unwrap().topics.values_mut() {
            for queued in queue.queued.iter_mut() {
                queued.arrived = queued
                    .arrived
                    .checked_sub(FALLBACK_AFTER * 2)
                    .expect("the clock is past FALLBACK_AFTER");
            }
        }
    }

    #[test]
    fn what_waits_while_the_link_is_down_keeps_waiting_for_a_position() {
        let (sequencer, outbox) = setup();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        sequencer.resume();
        push(&sequencer, "a");
        age(&sequencer);
        // Due for a fallback append, but the link is down: the sweep makes none.
        rt.block_on(sequencer.sweep());
        assert!(
            delivered(&outbox).is_empty(),
            "nothing goes out without a position"
        );
        // An append that fails with the link puts the broadcast back to waiting.
        let calls = sequencer.take_calls(|_, _| true);
        assert_eq!(calls.len(), 1);
        rt.block_on(sequencer.append(calls, Via::Fallback));
        assert!(delivered(&outbox).is_empty());
        assert_eq!(
            sequencer.state.lock().unwrap().topics["t"].queued[0].status,
            Status::Waiting
        );
        // Placed once the link is back (here by the sequencer's notice): out, positioned.
        sequencer.notice("t", b"elsewhere\na e1:1");
        assert_eq!(delivered(&outbox), [("a".to_string(), "e1:1".to_string())]);
    }

    #[test]
    fn a_notice_before_its_message_places_it_on_arrival() {
        let (sequencer, outbox) = setup();
        sequencer.notice("t", b"elsewhere\nearly e1:7");
        assert!(delivered(&outbox).is_empty());
        push(&sequencer, "early");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(sequencer.settle(&["t".to_string()]));
        assert_eq!(
            delivered(&outbox),
            [("early".to_string(), "e1:7".to_string())]
        );
    }
}
