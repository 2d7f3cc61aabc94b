//! The live status page: `GET /admin` (one HTML page, no external assets) and
//! `GET /admin/status` (the same figures as JSON), for an internal JWT or `ADMIN_TOKEN`.
//!
//! The page does not poll: it opens a Phoenix socket to this hub with a short-lived admin token
//! (minted when the page is served; it may join `admin:status` and nothing else) and renders
//! the `status` pushes that [`run`] broadcasts every second while anyone is joined.
//!
//! Figures are this instance's (connections, topics, rates); in-house queues are the shared
//! ones in Redis, found by a bounded SCAN every few seconds while the page is open.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::Operator;
use crate::app::Admin;
use crate::app::App;
use crate::auth;

/// The topic the page joins.
pub const TOPIC: &str = "admin:status";
/// Lifetime of the page's socket token; the page reloads itself (and gets a new one) when the
/// socket closes for expiry.
const PAGE_TOKEN_TTL_S: u64 = 3600;
const TICK: Duration = Duration::from_secs(1);
/// Queues and Rails are looked at this often at most (each costs Redis or HTTP work).
const SLOW_REFRESH: Duration = Duration::from_secs(3);
const MAX_QUEUES: usize = 50;
const MAX_TOPICS: usize = 20;
const MAX_DEAD_LETTERS: usize = 10;

const PAGE: &str = include_str!("admin.html");

/// Records the hub's totals and the rates since the last sample.
fn sample(admin: &Admin, totals: (u64, u64)) {
    {
        let mut sample = admin.sample.lock().expect("admin sample lock");
        let seconds = sample.at.elapsed().as_secs_f64().max(0.001);
        sample.rates = (
            totals.0.saturating_sub(sample.totals.0) as f64 / seconds,
            totals.1.saturating_sub(sample.totals.1) as f64 / seconds,
        );
        sample.totals = totals;
        sample.at = Instant::now();
    }
}

/// The figures the page shows.
pub async fn status(app: &App) -> Value {
    let hub = &app.session_deps.hub;
    let mut by_kind = json!({"user": 0, "player": 0, "internal": 0, "admin": 0});
    for entry in app.per_identity.iter() {
        let kind = entry.key().split(':').next().unwrap_or("");
        if let Some(count) = by_kind.get_mut(kind) {
            *count = json!(count.as_u64().unwrap_or(0) + *entry.value() as u64);
        }
    }
    let topics: Vec<Value> = hub
        .largest_topics(MAX_TOPICS)
        .into_iter()
        .map(|(topic, subscribers)| json!({"topic": topic, "subscribers": subscribers}))
        .collect();
    let (broadcasts_per_s, drops_per_s) = app.admin.sample.lock().expect("admin sample").rates;
    let (queues, rails, dead_letters) = slow_figures(app).await;
    json!({
        "instance": app.redis.instance(),
        "uptime_s": app.admin.started.elapsed().as_secs(),
        "draining": app.draining.load(Ordering::Acquire),
        "connections": app.connections.load(Ordering::Acquire),
        "sockets": hub.socket_count(),
        "longpoll_sessions": app.longpoll.session_count(),
        "by_kind": by_kind,
        "topic_count": hub.topic_count(),
        "topics": topics,
        "broadcasts_per_s": round(broadcasts_per_s),
        "drops_per_s": round(drops_per_s),
        "redis": {
            "connected": app.redis.is_connected(),
            "history_sequencer": app.pipeline.sequencer.is_sequencer(),
        },
        "rails": rails,
        "queues": queues,
        "revocations": app.session_deps.revocations.in_force(),
        "event_schemas": app.config.event_schemas.as_str(),
        "dead_letters": dead_letters,
    })
}

fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// Queues and dead letters (from Redis) and Rails' health, refreshed every [`SLOW_REFRESH`]
/// at most.
async fn slow_figures(app: &App) -> (Value, Value, Value) {
    let mut slow = app.admin.slow.lock().await;
    if slow.refreshed.is_some_and(|at| at.elapsed() < SLOW_REFRESH) {
        return (
            slow.queues.clone(),
            slow.rails.clone(),
            slow.dead_letters.clone(),
        );
    }
    let store = app.session_deps.inhouse.store();
    slow.queues = match store.queue_orgs(MAX_QUEUES).await {
        Ok(mut orgs) => {
            orgs.sort();
            let mut queues = Vec::new();
            for org in orgs {
                if let Ok(Some(queue)) = store.snapshot(&org).await {
                    queues.push(queue);
                }
            }
            Value::Array(queues)
        }
        Err(_) => Value::Null,
    };
    slow.rails = match app.rails.health(Duration::from_secs(1)).await {
        Ok(()) => json!({"status": "ok"}),
        Err(error) => json!({"status": "down", "error": error.to_string()}),
    };
    // Reasons, types and times only: a listing never carries the envelope.
    slow.dead_letters = match app.pipeline.dead_letters.list(MAX_DEAD_LETTERS).await {
        Ok(listing) => serde_json::to_value(listing).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    slow.refreshed = Some(Instant::now());
    (
        slow.queues.clone(),
        slow.rails.clone(),
        slow.dead_letters.clone(),
    )
}

/// Samples the rates every second and, while someone is joined to [`TOPIC`], broadcasts the
/// status there.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let hub = &app.session_deps.hub;
        sample(&app.admin, hub.totals());
        if hub.has_subscribers(TOPIC) {
            let body = status(&app).await;
            let payload = Bytes::from(serde_json::to_vec(&body).expect("status serializes"));
            hub.publish_at(TOPIC, "status", payload, None);
        }
    }
}

/// `GET /admin`.
pub async fn page(State(app): State<Arc<App>>, _: Operator) -> Response {
    let token = auth::mint_admin_token(&app.config.internal_jwt_secret, PAGE_TOKEN_TTL_S);
    let html = PAGE.replace("__SOCKET_TOKEN__", &token);
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            // The URL may carry a token: never send it elsewhere.
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                ),
            ),
        ],
        html,
    )
        .into_response()
}

/// `GET /admin/status`: the page's figures as JSON.
pub async fn status_json(State(app): State<Arc<App>>, _: Operator) -> Response {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(status(&app).await),
    )
        .into_response()
}
