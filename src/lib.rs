//! prostaff-events: the real-time event hub of ProStaff.
//!
//! Events published by the Rails API on Redis (`PSUBSCRIBE prostaff:events:*`) or posted over
//! HTTP are decoded, routed by type onto topics, and fanned out to WebSocket clients speaking
//! the Phoenix Channels protocol. In-house game queues live in Redis, shared by every instance.
//!
//! # Layout
//! - [`config`]: settings from env vars / TOML; pure parsing, typed errors.
//! - [`auth`]: JWT → [`auth::Identity`]; API-key compare; internal token minting.
//! - [`envelope`], [`router`]: pure decoding/validation and type-prefix routing.
//! - [`history`]: per-topic history in Redis Streams and the positions clients resume from.
//! - [`hub`]: the topic map and per-socket outboxes; frames are encoded once and shared.
//! - [`subscriber`]: the subscription core of every transport (register, join, recover,
//!   presence) whose tear-down runs on drop; [`type_filter`]: a join's `types` filter.
//! - [`catalogue`]: the event catalogue (a JSON Schema per event type, validation, the
//!   generated TypeScript declarations).
//! - [`phoenix`]: the wire protocol and the per-socket session loop.
//! - [`channels`]: topic families: join authorization, join replies, queue actions.
//! - [`presence`]: who is online per topic (phoenix.js `Presence` format), shared in Redis.
//! - [`revocation`]: access follows the roster: revoked identities lose an org or every
//!   connection, on every instance, and their older tokens are refused.
//! - [`inhouse`]: in-house queues: state in Redis (one script per transition), the deadline
//!   watcher, the reconciler.
//! - [`limits`], [`logsafe`]: length caps on untrusted names; untrusted text in logs.
//! - [`ingest`]: the Redis link and the HTTP publish paths; the delivery pipeline.
//! - [`rails`]: HTTP client to the Rails API.
//! - [`http`]: the axum router and middleware.
//! - [`longpoll`]: the phoenix.js long-poll transport; sessions reachable from any instance.
//! - [`sse`]: the Server-Sent Events stream (`/api/realtime/stream`) with `Last-Event-ID`.
//! - [`admin`]: the live status page (`/admin`) and its figures.
//! - [`metrics`]: Prometheus recorder and metric names.
//! - `fault`, `fuzzing`: test support (an injected session panic; the fuzz targets' entry
//!   points, replayed by `cargo test`).
//!
//! [`run`] starts the whole hub on a listener and returns after a graceful drain, so tests
//! start the real thing on port 0.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod auth;
pub mod catalogue;
pub mod channels;
pub mod config;
pub mod envelope;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod http;
pub mod hub;
pub mod id;
pub mod ingest;
pub mod inhouse;
pub mod limits;
pub mod logsafe;
pub mod longpoll;
pub mod metrics;
pub mod phoenix;
pub mod presence;
pub mod rails;
pub mod redis;
pub mod revocation;
pub mod router;
pub mod sse;
pub mod subscriber;
pub mod topic;
pub mod type_filter;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::Config;
use crate::hub::{CloseReason, Hub};
use crate::ingest::Pipeline;
use crate::inhouse::reconciler::Reconciler;
use crate::inhouse::{Inhouse, QueueStore};
use crate::presence::Presence;
use crate::redis::RedisLink;
use crate::revocation::Revocations;
use crate::subscriber::SessionDeps;

/// Serves the hub on `listener` until `shutdown` resolves, then drains: readiness fails at once,
/// sockets are closed with 1012 in batches, and the function returns within
/// `config.shutdown_grace`. Config → build → spawn → drain.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let timings = DrainTimings::for_grace(config.shutdown_grace);
    let built = build(config)?;
    let background = CancellationToken::new();
    let background_tasks = TaskTracker::new();
    let mut server = spawn(&built, listener, &background, &background_tasks).await?;
    tokio::select! {
        _ = shutdown => {}
        result = &mut server.task => {
            background.cancel();
            return result.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        }
    }
    drain(&built, &timings).await;
    server.stop_accepting.cancel();
    // Every session has untracked its presence: publish those leaves before going.
    let _ = tokio::time::timeout(timings.presence_flush, built.presence.shutdown()).await;
    background.cancel();
    background_tasks.close();
    let _ = tokio::time::timeout(timings.background_stop, background_tasks.wait()).await;
    match tokio::time::timeout(timings.background_stop, server.task).await {
        Ok(Ok(result)) => result,
        _ => Ok(()),
    }
}

/// Every bound of the drain, in one place (derived from `SHUTDOWN_GRACE_MS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainTimings {
    pub grace: Duration,
    /// Sockets are closed with 1012 in this many batches, so reconnects spread out…
    pub batches: usize,
    /// …of at least this many sockets each…
    pub min_batch: usize,
    /// …with this pause between batches (a quarter of the grace spread over the batches, at
    /// most 100 ms).
    pub pause: Duration,
    /// Left for the 1001 pass after the grace's wait for sessions.
    pub margin: Duration,
    /// How long sessions get to send their 1001 once the grace is over.
    pub going_away: Duration,
    /// The final presence flush (the leaves of every closed session).
    pub presence_flush: Duration,
    /// Background tasks and the listener stop within this.
    pub background_stop: Duration,
}

impl DrainTimings {
    pub fn for_grace(grace: Duration) -> Self {
        const BATCHES: usize = 20;
        DrainTimings {
            grace,
            batches: BATCHES,
            min_batch: 200,
            pause: (grace / 4 / BATCHES as u32).min(Duration::from_millis(100)),
            margin: Duration::from_millis(500),
            going_away: Duration::from_millis(300),
            presence_flush: Duration::from_millis(500),
            background_stop: Duration::from_millis(200),
        }
    }
}

/// Everything `run` builds before it serves.
struct Built {
    app: Arc<App>,
    hub: Arc<Hub>,
    redis: Arc<RedisLink>,
    pipeline: Arc<Pipeline>,
    presence: Arc<Presence>,
    revocations: Arc<Revocations>,
    longpoll: Arc<longpoll::LongPoll>,
    hard_stop: CancellationToken,
    reconciler: Reconciler,
    /// Where the Redis link and the sequencer run; dropped last (a field drops after the ones
    /// above it), which stops the thread.
    link_thread: redis::LinkThread,
}

/// Builds the subsystems from the configuration and registers each one's Redis channel.
fn build(config: Config) -> std::io::Result<Built> {
    let metrics = metrics::Metrics::global();
    let hub = Arc::new(Hub::new(
        config.limits.outbound_buffer_frames,
        metrics.clone(),
    ));
    let redis = RedisLink::new(&config.redis_url);
    let inhouse = Arc::new(Inhouse::new(QueueStore::new(
        redis.clone(),
        config.rate_limit_max,
        config.rate_limit_window,
    )));
    let history = Arc::new(history::History::new(
        redis.clone(),
        config.history_size,
        config.history_ttl,
    ));
    let presence = Arc::new(Presence::new(
        redis.clone(),
        hub.clone(),
        config.presence.clone(),
    ));
    let revocations = Arc::new(Revocations::new(
        redis.clone(),
        hub.clone(),
        config.revocation_ttl,
    ));
    let longpoll = Arc::new(longpoll::LongPoll::new(
        redis.clone(),
        config.longpoll.clone(),
    ));
    let pipeline = Arc::new(pipeline(
        &config,
        &redis,
        &hub,
        &inhouse,
        &history,
        &revocations,
    )?);
    pipeline.subscribe(&redis);
    if let Some(key) = &config.events_stream {
        redis.read_stream(key.clone(), pipeline.clone());
    }
    redis.subscribe(presence::CHANNEL_PATTERN, presence.clone());
    longpoll.subscribe(&redis);
    let rails = rails::RailsClient::new(&config.rails_api_url, &config.internal_jwt_secret);
    let reconciler = Reconciler {
        inhouse: inhouse.clone(),
        rails: rails.clone(),
        retry_delays: config.reconciler_retry_delays.clone(),
        interval: config.reconcile_interval,
        redis_connected: redis.connects(),
    };
    let hard_stop = CancellationToken::new();
    let session_deps = Arc::new(SessionDeps {
        hub: hub.clone(),
        inhouse,
        history,
        presence: presence.clone(),
        revocations: revocations.clone(),
        limits: config.limits.clone(),
        metrics,
        hard_stop: hard_stop.clone(),
    });
    let app = Arc::new(App::new(
        config,
        session_deps,
        pipeline.clone(),
        redis.clone(),
        rails,
        longpoll.clone(),
    ));
    Ok(Built {
        app,
        hub,
        redis,
        pipeline,
        presence,
        revocations,
        longpoll,
        hard_stop,
        reconciler,
        link_thread: redis::LinkThread::start()?,
    })
}

/// The ingest pipeline: routes events onto topics, with the catalogue and dead letters.
fn pipeline(
    config: &Config,
    redis: &Arc<RedisLink>,
    hub: &Arc<Hub>,
    inhouse: &Arc<Inhouse>,
    history: &Arc<history::History>,
    revocations: &Arc<Revocations>,
) -> std::io::Result<Pipeline> {
    let catalogue = catalogue::Catalogue::builtin()
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error.to_string()))?;
    Ok(Pipeline {
        hub: hub.clone(),
        inhouse: inhouse.clone(),
        history: history.clone(),
        sequencer: Arc::new(ingest::sequencer::Sequencer::new(
            history.clone(),
            hub.clone(),
            redis.clone(),
        )),
        revocations: revocations.clone(),
        catalogue,
        schemas: config.event_schemas,
        dead_letters: ingest::dead_letter::DeadLetters::new(
            redis.clone(),
            config.dead_letter_maxlen,
        ),
    })
}

/// The HTTP server task and the token that stops it accepting.
struct Server {
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_accepting: CancellationToken,
}

/// Spawns the background tasks (each stops on `background`) and the HTTP server(s).
async fn spawn(
    built: &Built,
    listener: TcpListener,
    background: &CancellationToken,
    tasks: &TaskTracker,
) -> std::io::Result<Server> {
    // Taken before the link runs, so that no connect (the first included) goes unseen.
    let (presence_connects, revocation_connects) = (built.redis.connects(), built.redis.connects());
    // The link (and every handler it dispatches to) and the sequencer on the link's thread.
    let link = built.link_thread.handle();
    tasks.spawn_on(built.redis.clone().run(background.child_token()), link);
    tasks.spawn_on(
        built
            .pipeline
            .sequencer
            .clone()
            .run(background.child_token()),
        link,
    );
    tasks.spawn(built.reconciler.clone().run(background.child_token()));
    tasks.spawn(inhouse::deadlines::run(
        built.pipeline.inhouse.clone(),
        background.child_token(),
    ));
    tasks.spawn(metrics::upkeep(background.child_token()));
    tasks.spawn(built.longpoll.clone().run(background.child_token()));
    tasks.spawn(
        built
            .revocations
            .clone()
            .run(revocation_connects, background.child_token()),
    );
    tasks.spawn(
        built
            .presence
            .clone()
            .run(presence_connects, background.child_token()),
    );
    tasks.spawn(admin::run(built.app.clone(), background.child_token()));
    if let Some(address) = built.app.config.metrics_bind_addr {
        let metrics_listener = TcpListener::bind(address).await?;
        let metrics_server = axum::serve(metrics_listener, http::metrics_router(built.app.clone()))
            .with_graceful_shutdown(background.clone().cancelled_owned());
        tasks.spawn(async move {
            if let Err(error) = metrics_server.await {
                tracing::error!(%error, "metrics listener failed");
            }
        });
    }
    // Small WebSocket frames must not wait for Nagle/delayed-ACK: every socket gets TCP_NODELAY.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let stop_accepting = CancellationToken::new();
    let server = axum::serve(listener, http::router(built.app.clone()))
        .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
    Ok(Server {
        task: tokio::spawn(async move { server.await }),
        stop_accepting,
    })
}

/// Readiness goes 503 first, then sockets close with 1012 in batches, then what is left after
/// the grace closes with 1001 (stuck writes are cancelled).
async fn drain(built: &Built, timings: &DrainTimings) {
    let (app, hub) = (&built.app, &built.hub);
    let started = Instant::now();
    app.draining.store(true, Ordering::Release);
    // Another instance sequences history from its next lease renewal.
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        built.pipeline.sequencer.retire(),
    )
    .await;
    let sockets = hub.socket_count();
    tracing::info!(
        sockets,
        grace_ms = timings.grace.as_millis() as u64,
        "draining"
    );
    let batch = sockets.div_ceil(timings.batches).max(timings.min_batch);
    hub.close_all(CloseReason::Restart, batch, timings.pause)
        .await;
    // Sockets upgraded while the batches ran (before `draining` was visible to them).
    hub.close_all(CloseReason::Restart, usize::MAX, Duration::ZERO)
        .await;
    app.sessions.close();
    let remaining = timings
        .grace
        .saturating_sub(started.elapsed())
        .saturating_sub(timings.margin);
    if tokio::time::timeout(remaining, app.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = app.sessions.len(),
            "grace period over; stopping remaining sockets"
        );
        built.hard_stop.cancel();
        hub.close_all(CloseReason::GoingAway, usize::MAX, Duration::ZERO)
            .await;
        let _ = tokio::time::timeout(timings.going_away, app.sessions.wait()).await;
    }
}
