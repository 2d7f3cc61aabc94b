//! Metrics: the Prometheus recorder and the hub's metric names.
//!
//! Hot-path metrics are resolved once into handles ([`Metrics`]); rarely-hit, labelled ones are
//! recorded with the `metrics` macros where they happen. Every drop and every refusal in the hub
//! has a metric here or a `reason` label on one.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SOCKETS_CONNECTED: &str = "prostaff_sockets_connected";
pub const SOCKET_CONNECTS: &str = "prostaff_socket_connects_total";
pub const SOCKET_CLOSES: &str = "prostaff_socket_closes_total";
pub const CHANNELS_JOINED: &str = "prostaff_channels_joined";
pub const CHANNEL_JOINS: &str = "prostaff_channel_joins_total";
pub const FRAMES_SENT: &str = "prostaff_frames_sent_total";
pub const FRAMES_RECEIVED: &str = "prostaff_frames_received_total";
pub const BROADCASTS_DROPPED: &str = "prostaff_broadcasts_dropped_total";
pub const INBOUND_REJECTED: &str = "prostaff_inbound_rejected_total";
pub const EVENTS_RECEIVED: &str = "prostaff_events_received_total";
pub const REDIS_CONNECTED: &str = "prostaff_redis_connected";
pub const REDIS_RECONNECTS: &str = "prostaff_redis_reconnects_total";
pub const HTTP_REQUESTS: &str = "prostaff_http_requests_total";
pub const PUBLISH_TO_SEND: &str = "prostaff_publish_to_send_seconds";
pub const INHOUSE_ACTIONS: &str = "prostaff_inhouse_actions_total";
pub const INHOUSE_SCRIPT_SECONDS: &str = "prostaff_inhouse_script_seconds";
pub const INHOUSE_LIFECYCLE: &str = "prostaff_inhouse_lifecycle_events_total";
pub const RECONCILE_MERGES: &str = "prostaff_reconcile_merges_total";
pub const HISTORY_SCRIPT_SECONDS: &str = "prostaff_history_script_seconds";
pub const HISTORY_APPENDS: &str = "prostaff_history_appends_total";
pub const HISTORY_NOTICES: &str = "prostaff_history_notices_total";
pub const SEQUENCER: &str = "prostaff_history_sequencer";
pub const QUEUE_REPLICATION: &str = "prostaff_queue_replication_total";
pub const RECOVERIES: &str = "prostaff_recoveries_total";
pub const SSE_STREAMS: &str = "prostaff_sse_streams";
pub const INHOUSE_EXPIRIES: &str = "prostaff_inhouse_expiries_total";
pub const RECONCILES: &str = "prostaff_reconcile_total";
pub const PRESENCE_TRACKED: &str = "prostaff_presence_tracked";
pub const PRESENCE_DIFFS: &str = "prostaff_presence_diffs_total";
pub const PRESENCE_EXPIRED: &str = "prostaff_presence_expired_total";
pub const PRESENCE_REFUSED: &str = "prostaff_presence_refused_total";
pub const PRESENCE_RESYNCS: &str = "prostaff_presence_state_resyncs_total";
pub const LONGPOLL_SESSIONS: &str = "prostaff_longpoll_sessions";
pub const LONGPOLL_REQUESTS: &str = "prostaff_longpoll_requests_total";
pub const LONGPOLL_EXPIRED: &str = "prostaff_longpoll_sessions_expired_total";
pub const SESSION_PANICS: &str = "prostaff_session_panics_total";
pub const CATCH_UPS: &str = "prostaff_catch_ups_total";
pub const REVOCATIONS: &str = "prostaff_revocations_total";
pub const REVOKED_REFUSALS: &str = "prostaff_revoked_refusals_total";
pub const CATCH_UP_BROADCASTS: &str = "prostaff_catch_up_broadcasts_total";
pub const EVENTS_INVALID: &str = "prostaff_events_invalid_total";
pub const DEAD_LETTERS: &str = "prostaff_dead_letters_total";
pub const TYPE_FILTERED: &str = "prostaff_type_filtered_total";

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(PUBLISH_TO_SEND.to_string()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    ],
                )
                .expect("non-empty buckets")
                .set_buckets_for_metric(
                    Matcher::Suffix("_script_seconds".to_string()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0,
                    ],
                )
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding test); then ours
            // simply renders nothing, which is visible rather than wrong.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// What a metric is: how `/metrics` describes it.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    /// A histogram of durations in seconds.
    Seconds,
}

/// Every metric's name, kind and `# HELP` text.
const DESCRIPTIONS: &[(&str, Kind, &str)] = &[
    (SOCKETS_CONNECTED, Kind::Gauge, "WebSocket connections currently open"),
    (SOCKET_CONNECTS, Kind::Counter, "socket upgrade attempts by outcome (accepted or the refusal reason)"),
    (SOCKET_CLOSES, Kind::Counter, "sockets closed, by reason"),
    (CHANNELS_JOINED, Kind::Gauge, "channels currently joined, by topic family"),
    (CHANNEL_JOINS, Kind::Counter, "join attempts by topic family and outcome"),
    (FRAMES_SENT, Kind::Counter, "frames written to sockets"),
    (FRAMES_RECEIVED, Kind::Counter, "frames read from sockets"),
    (BROADCASTS_DROPPED, Kind::Counter, "broadcast frames dropped before reaching a socket, by reason"),
    (INBOUND_REJECTED, Kind::Counter, "client frames refused, by reason"),
    (EVENTS_RECEIVED, Kind::Counter, "events received by source and outcome (routed or the drop reason)"),
    (REDIS_CONNECTED, Kind::Gauge, "1 while the Redis subscriber is connected"),
    (REDIS_RECONNECTS, Kind::Counter, "Redis subscriber reconnections"),
    (HTTP_REQUESTS, Kind::Counter, "HTTP requests by route and status"),
    (PUBLISH_TO_SEND, Kind::Seconds, "time from publish into the hub to the socket write (sampled: 1 in 16 sockets)"),
    (INHOUSE_ACTIONS, Kind::Counter, "in-house queue actions by action and outcome"),
    (INHOUSE_SCRIPT_SECONDS, Kind::Seconds, "latency of the queue scripts in Redis, by op"),
    (INHOUSE_LIFECYCLE, Kind::Counter, "inhouse.* lifecycle events applied, by outcome (changed, unchanged, ignored_closed, unavailable)"),
    (RECONCILE_MERGES, Kind::Counter, "queues merged by the reconciler, by outcome"),
    (INHOUSE_EXPIRIES, Kind::Counter, "check-in deadline attempts, by outcome (kept, closed, early, stale, unavailable)"),
    (RECONCILES, Kind::Counter, "reconcile runs by outcome"),
    (HISTORY_SCRIPT_SECONDS, Kind::Seconds, "latency of the history scripts (append, recover) in Redis"),
    (HISTORY_APPENDS, Kind::Counter, "broadcasts given a history position, by outcome (ok; deferred: the append failed with the link, the broadcasts wait for it to come back; failed: Redis refused it, delivered without one) and via (appended: by this instance as the sequencer; notice: learnt from the sequencer's notice; fallback: appended here after waiting FALLBACK_AFTER for a notice)"),
    (HISTORY_NOTICES, Kind::Counter, "position notices of other instances' appends, by outcome (received; undecodable; overflow: too many unmatched kept; repaired: broadcasts this instance never received, delivered from history; gap: history could not cover them; repair_failed)"),
    (QUEUE_REPLICATION, Kind::Counter, "queue script calls followed by WAIT 1 100 on a master with replicas, by outcome (acknowledged: a replica has it; unacknowledged: none within 100 ms, a failover now may lose it; no_replica: nothing to wait for)"),
    (SEQUENCER, Kind::Gauge, "1 while this instance holds the history sequencer lease (it appends every event; the others learn the positions from its notices)"),
    (SSE_STREAMS, Kind::Gauge, "Server-Sent Events streams currently open"),
    (SESSION_PANICS, Kind::Counter, "sessions that panicked (caught, logged with the socket's span, cleaned up)"),
    (CATCH_UPS, Kind::Counter, "topics caught up from history after a redis reconnect, by outcome (caught_up, gap, failed)"),
    (REVOCATIONS, Kind::Counter, "revocations applied on this instance, by scope (org, all)"),
    (REVOKED_REFUSALS, Kind::Counter, "connects and joins refused because the identity's token predates a revocation, by what"),
    (EVENTS_INVALID, Kind::Counter, "envelopes the event catalogue could not vouch for, by type (a catalogue entry, or unknown for a type with no schema) and mode (enforce: dropped, warn: delivered)"),
    (DEAD_LETTERS, Kind::Counter, "dropped envelopes kept in prostaff:events:dead, by outcome (written; duplicate: another instance wrote it; failed: redis unavailable; shed: too many writes in flight)"),
    (TYPE_FILTERED, Kind::Counter, "broadcasts not sent to a channel because its join's type filter excludes them"),
    (CATCH_UP_BROADCASTS, Kind::Counter, "broadcasts delivered by catch-ups after a redis reconnect"),
    (PRESENCE_TRACKED, Kind::Gauge, "presence metas (one per socket and topic) this instance tracks"),
    (PRESENCE_DIFFS, Kind::Counter, "presence diff batches: written (one script call per topic per interval), failed (resynced later), delivered (received from Redis and fanned out), summarized (received for a topic over PRESENCE_LIST_MAX: applied, then told as a listing move and a presence_summary), buffered (received while the topic's snapshot is read: part of the state its joiners get), unwatched (no socket of this instance has the topic's presence yet: its joiners read the state), undecodable (not a diff: dropped, never sent to clients)"),
    (PRESENCE_EXPIRED, Kind::Counter, "presence metas removed because their instance stopped renewing its lease"),
    (PRESENCE_REFUSED, Kind::Counter, "sockets not shown in presence, by reason (topic_full: PRESENCE_MAX_MEMBERS reached)"),
    (PRESENCE_RESYNCS, Kind::Counter, "presence_state pushed again to a socket that lost broadcasts on a presence topic"),
    (LONGPOLL_SESSIONS, Kind::Gauge, "long-poll sessions this instance runs (each is also counted as a socket)"),
    (LONGPOLL_REQUESTS, Kind::Counter, "long-poll requests by op (create, poll, post, routed) and outcome (ok, no_content, gone, malformed_token, error, undecodable; for create: ok or the refusal reason)"),
    (LONGPOLL_EXPIRED, Kind::Counter, "long-poll sessions ended after LONGPOLL_SESSION_TIMEOUT_MS without a request"),
    (RECOVERIES, Kind::Counter, "joins with `since`, by outcome (recovered, not_recovered, unavailable)"),
];

fn describe() {
    for &(name, kind, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Seconds => metrics::describe_histogram!(name, metrics::Unit::Seconds, help),
        }
    }
}

/// Handles for metrics recorded on hot paths.
#[derive(Clone)]
pub struct Metrics(Arc<Handles>);

pub struct Handles {
    pub sockets_connected: Gauge,
    pub frames_sent: Counter,
    pub frames_received: Counter,
    pub broadcasts_dropped_slow_consumer: Counter,
    pub publish_to_send: Histogram,
}

impl std::ops::Deref for Metrics {
    type Target = Handles;
    fn deref(&self) -> &Handles {
        &self.0
    }
}

impl Metrics {
    /// Handles bound to the global Prometheus recorder.
    pub fn global() -> Self {
        let _ = prometheus();
        Metrics(Arc::new(Handles {
            sockets_connected: gauge!(SOCKETS_CONNECTED),
            frames_sent: counter!(FRAMES_SENT),
            frames_received: counter!(FRAMES_RECEIVED),
            broadcasts_dropped_slow_consumer: counter!(BROADCASTS_DROPPED, "reason" => "slow_consumer"),
            publish_to_send: histogram!(PUBLISH_TO_SEND),
        }))
    }

    /// Handles that record nothing (unit tests).
    pub fn detached() -> Self {
        Metrics(Arc::new(Handles {
            sockets_connected: Gauge::noop(),
            frames_sent: Counter::noop(),
            frames_received: Counter::noop(),
            broadcasts_dropped_slow_consumer: Counter::noop(),
            publish_to_send: Histogram::noop(),
        }))
    }
}

/// Drains histogram buckets periodically so memory stays flat between scrapes.
pub async fn upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let handle = prometheus();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}
