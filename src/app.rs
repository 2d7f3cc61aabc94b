//! The edge's shared state: [`App`] (what every HTTP handler reaches), [`ApiError`] (the
//! `{"error": …}` shape of every JSON refusal) and the connection permits a socket or stream
//! holds for its life (given back on drop).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dashmap::DashMap;
use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, TokenVerifier};
use crate::config::Config;
use crate::ingest::publish::{self, Rejection};
use crate::ingest::Pipeline;
use crate::rails::RailsClient;
use crate::redis::RedisLink;
use crate::subscriber::SessionDeps;

/// Everything the HTTP handlers share.
pub struct App {
    pub config: Config,
    pub pipeline: Arc<Pipeline>,
    pub redis: Arc<RedisLink>,
    pub rails: RailsClient,
    pub longpoll: Arc<crate::longpoll::LongPoll>,
    /// The status page's rates and cached figures.
    pub admin: Admin,
    pub verifier: TokenVerifier,
    pub session_deps: Arc<SessionDeps>,
    /// Set at the start of shutdown: readiness fails and new sockets are refused.
    pub draining: AtomicBool,
    pub connections: Arc<AtomicUsize>,
    /// Open sockets per identity key (see `Identity::key`).
    pub per_identity: Arc<DashMap<String, usize>>,
    /// Tracks socket sessions (axum's graceful shutdown does not see upgraded connections).
    pub sessions: TaskTracker,
}

impl App {
    /// The HTTP side's state, not draining and with no connection yet.
    pub fn new(
        config: Config,
        session_deps: Arc<SessionDeps>,
        pipeline: Arc<Pipeline>,
        redis: Arc<RedisLink>,
        rails: RailsClient,
        longpoll: Arc<crate::longpoll::LongPoll>,
    ) -> Self {
        let verifier = TokenVerifier::with_leeway(
            &config.internal_jwt_secret,
            config.jwt_secret_key.as_deref(),
            config.require_token_exp,
            config.jwt_leeway_s,
        );
        App {
            config,
            pipeline,
            redis,
            rails,
            longpoll,
            admin: Admin::default(),
            verifier,
            session_deps,
            draining: AtomicBool::new(false),
            connections: Arc::new(AtomicUsize::new(0)),
            per_identity: Arc::default(),
            sessions: TaskTracker::new(),
        }
    }
}

/// A JSON error response `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn unauthorized() -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized")
    }
}

impl From<publish::PublishFailure> for ApiError {
    fn from(_: publish::PublishFailure) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "publish to redis failed; the event was not delivered, retry",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<crate::catalogue::Violation> for ApiError {
    fn from(violation: crate::catalogue::Violation) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, violation.to_string())
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        let status = match rejection {
            Rejection::MalformedJson | Rejection::NotAnObject => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, rejection.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            }
            status if status.is_client_error() => ApiError::new(status, "unreadable request body"),
            _ => ApiError::new(StatusCode::BAD_REQUEST, "unreadable request body"),
        }
    }
}

/// The key `MAX_CONNECTIONS_PER_IDENTITY` counts under: one person, or all internal services.
fn identity_key(identity: &Identity) -> String {
    identity
        .key()
        .unwrap_or_else(|| identity.kind().to_string())
}

/// Holds one of an identity's `MAX_CONNECTIONS_PER_IDENTITY` slots for the life of a socket;
/// the map entry goes away with the identity's last socket.
struct IdentityPermit {
    counts: Arc<DashMap<String, usize>>,
    key: String,
}

impl IdentityPermit {
    fn acquire(
        counts: &Arc<DashMap<String, usize>>,
        key: String,
        max: Option<usize>,
    ) -> Option<IdentityPermit> {
        let mut count = counts.entry(key.clone()).or_insert(0);
        if max.is_some_and(|max| *count >= max) {
            return None;
        }
        *count += 1;
        drop(count);
        Some(IdentityPermit {
            counts: counts.clone(),
            key,
        })
    }
}

impl Drop for IdentityPermit {
    fn drop(&mut self) {
        if let Some(mut count) = self.counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
        }
        self.counts.remove_if(&self.key, |_, count| *count == 0);
    }
}

/// Which connection cap refused a socket or stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionsFull {
    /// `MAX_CONNECTIONS` (503: the client retries, likely elsewhere).
    Instance,
    /// `MAX_CONNECTIONS_PER_IDENTITY` (429).
    Identity,
}

impl ConnectionsFull {
    pub fn reason(self) -> &'static str {
        match self {
            ConnectionsFull::Instance => "too_many_connections",
            ConnectionsFull::Identity => "too_many_connections_per_identity",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ConnectionsFull::Instance => StatusCode::SERVICE_UNAVAILABLE,
            ConnectionsFull::Identity => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// The slots a socket or an SSE stream holds for its whole life: one of `MAX_CONNECTIONS` and
/// one of its identity's `MAX_CONNECTIONS_PER_IDENTITY`. Both are given back on drop.
pub struct ConnectionPermits {
    _instance: ConnectionPermit,
    _identity: IdentityPermit,
}

impl ConnectionPermits {
    pub fn acquire(app: &App, identity: &Identity) -> Result<ConnectionPermits, ConnectionsFull> {
        let previous = app.connections.fetch_add(1, Ordering::AcqRel);
        let instance = ConnectionPermit(app.connections.clone());
        if app
            .config
            .limits
            .max_connections
            .is_some_and(|max| previous >= max)
        {
            return Err(ConnectionsFull::Instance);
        }
        let identity = IdentityPermit::acquire(
            &app.per_identity,
            identity_key(identity),
            app.config.limits.max_connections_per_identity,
        )
        .ok_or(ConnectionsFull::Identity)?;
        Ok(ConnectionPermits {
            _instance: instance,
            _identity: identity,
        })
    }
}

/// Holds one slot of `MAX_CONNECTIONS` for the life of a socket.
struct ConnectionPermit(Arc<AtomicUsize>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the status page (`crate::admin`) keeps between ticks.
pub struct Admin {
    pub(crate) started: Instant,
    pub(crate) sample: Mutex<Sample>,
    pub(crate) slow: tokio::sync::Mutex<Slow>,
}

pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) totals: (u64, u64),
    /// (broadcasts/s, drops/s) over the last tick.
    pub(crate) rates: (f64, f64),
}

pub(crate) struct Slow {
    pub(crate) refreshed: Option<Instant>,
    pub(crate) queues: Value,
    pub(crate) rails: Value,
    /// `null` while Redis cannot be read.
    pub(crate) dead_letters: Value,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            started: Instant::now(),
            sample: Mutex::new(Sample {
                at: Instant::now(),
                totals: (0, 0),
                rates: (0.0, 0.0),
            }),
            slow: tokio::sync::Mutex::new(Slow {
                refreshed: None,
                queues: json!([]),
                rails: json!({"status": "unknown"}),
                dead_letters: Value::Null,
            }),
        }
    }
}
