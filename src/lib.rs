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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::{CloseReason, Hub};
use crate::ingest::Pipeline;
use crate::inhouse::reconciler::Reconciler;
use crate::inhouse::{Inhouse, QueueStore};
use crate::redis::RedisLink;
use crate::subscriber::SessionDeps;

/// Serves the hub on `listener` until `shutdown` resolves, then drains: readiness fails at once,
/// sockets are closed with 1012 in batches, and the function returns within
/// `config.shutdown_grace`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let metrics = metrics::Metrics::global();
    let hub = Arc::new(Hub::new(
        config.limits.outbound_buffer_frames,
        metrics.clone(),
    ));
    let redis = RedisLink::new(&config.redis_url);
    // Taken before the link runs, so that no connect (the first included) goes unseen.
    let (reconciler_connects, presence_connects) = (redis.connects(), redis.connects());
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
    let presence = Arc::new(presence::Presence::new(
        redis.clone(),
        hub.clone(),
        config.presence.clone(),
    ));
    let revocations = Arc::new(revocation::Revocations::new(
        redis.clone(),
        hub.clone(),
        config.revocation_ttl,
    ));
    let revocation_connects = redis.connects();
    let longpoll = Arc::new(longpoll::LongPoll::new(
        redis.clone(),
        config.longpoll.clone(),
    ));
    let catalogue = catalogue::Catalogue::builtin()
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error.to_string()))?;
    let pipeline = Arc::new(Pipeline {
        hub: hub.clone(),
        inhouse: inhouse.clone(),
        history: history.clone(),
        revocations: revocations.clone(),
        catalogue,
        schemas: config.event_schemas,
        dead_letters: ingest::dead_letter::DeadLetters::new(
            redis.clone(),
            config.dead_letter_maxlen,
        ),
    });
    let rails = rails::RailsClient::new(&config.rails_api_url, &config.internal_jwt_secret);

    let background = CancellationToken::new();
    let background_tasks = TaskTracker::new();
    pipeline.subscribe(&redis);
    redis.subscribe(presence::CHANNEL_PATTERN, presence.clone());
    longpoll.subscribe(&redis);
    background_tasks.spawn(redis.clone().run(background.child_token()));
    background_tasks.spawn(
        Reconciler {
            inhouse: inhouse.clone(),
            rails: rails.clone(),
            retry_delays: config.reconciler_retry_delays.clone(),
            interval: config.reconcile_interval,
            redis_connected: reconciler_connects,
        }
        .run(background.child_token()),
    );
    background_tasks.spawn(inhouse::deadlines::run(
        inhouse.clone(),
        background.child_token(),
    ));
    background_tasks.spawn(metrics::upkeep(background.child_token()));
    background_tasks.spawn(longpoll.clone().run(background.child_token()));
    background_tasks.spawn(
        revocations
            .clone()
            .run(revocation_connects, background.child_token()),
    );
    background_tasks.spawn(
        presence
            .clone()
            .run(presence_connects, background.child_token()),
    );

    let grace = config.shutdown_grace;
    let hard_stop = CancellationToken::new();
    let metrics_bind_addr = config.metrics_bind_addr;
    let app = Arc::new(app::App {
        session_deps: Arc::new(SessionDeps {
            hub: hub.clone(),
            inhouse,
            history,
            presence: presence.clone(),
            revocations,
            limits: config.limits.clone(),
            metrics,
            hard_stop: hard_stop.clone(),
        }),
        verifier: auth::TokenVerifier::with_leeway(
            &config.internal_jwt_secret,
            config.jwt_secret_key.as_deref(),
            config.require_token_exp,
            config.jwt_leeway_s,
        ),
        config,
        pipeline,
        redis,
        rails,
        longpoll,
        admin: app::Admin::default(),
        draining: AtomicBool::new(false),
        connections: Arc::new(AtomicUsize::new(0)),
        per_identity: Arc::default(),
        sessions: TaskTracker::new(),
    });

    background_tasks.spawn(admin::run(app.clone(), background.child_token()));
    let stop_accepting = CancellationToken::new();
    if let Some(address) = metrics_bind_addr {
        let metrics_listener = TcpListener::bind(address).await?;
        let metrics_server = axum::serve(metrics_listener, http::metrics_router(app.clone()))
            .with_graceful_shutdown(background.clone().cancelled_owned());
        background_tasks.spawn(async move {
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
    let server = axum::serve(listener, http::router(app.clone()))
        .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
    let mut server = tokio::spawn(async move { server.await });

    tokio::select! {
        _ = shutdown => {}
        result = &mut server => {
            background.cancel();
            return result.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        }
    }

    // Drain: readiness goes 503 first, then sockets close in batches, then we stop.
    let started = Instant::now();
    app.draining.store(true, Ordering::Release);
    let sockets = hub.socket_count();
    tracing::info!(sockets, grace_ms = grace.as_millis() as u64, "draining");
    const BATCHES: usize = 20;
    let batch = sockets.div_ceil(BATCHES).max(200);
    let pause = (grace / 4 / BATCHES as u32).min(Duration::from_millis(100));
    hub.close_all(CloseReason::Restart, batch, pause).await;
    // Sockets upgraded while the batches ran (before `draining` was visible to them).
    hub.close_all(CloseReason::Restart, usize::MAX, Duration::ZERO)
        .await;
    app.sessions.close();
    let remaining = grace
        .saturating_sub(started.elapsed())
        .saturating_sub(Duration::from_millis(500));
    if tokio::time::timeout(remaining, app.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = app.sessions.len(),
            "grace period over; stopping remaining sockets"
        );
        hard_stop.cancel();
        hub.close_all(CloseReason::GoingAway, usize::MAX, Duration::ZERO)
            .await;
        let _ = tokio::time::timeout(Duration::from_millis(300), app.sessions.wait()).await;
    }
    stop_accepting.cancel();
    // Every session has untracked its presence: publish those leaves before going.
    let _ = tokio::time::timeout(Duration::from_millis(500), presence.shutdown()).await;
    background.cancel();
    background_tasks.close();
    let _ = tokio::time::timeout(Duration::from_millis(200), background_tasks.wait()).await;
    match tokio::time::timeout(Duration::from_millis(200), server).await {
        Ok(Ok(result)) => result,
        _ => Ok(()),
    }
}
