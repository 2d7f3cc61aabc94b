//! Admission: the one home of who may connect and who may call an internal route, as axum
//! extractors. Every route that admits a client runs the same steps in the same order —
//! draining → `vsn` → `Origin` → subprotocol → token (from any of its sources) → revocation →
//! connection permits — and differs only in which steps apply and how a refusal looks on its
//! transport ([`Transport`]): an empty 403/503 for a WebSocket upgrade, a JSON `status` body
//! for phoenix.js's long-poll, a JSON error for SSE.
//!
//! A token is looked for, first found wins, in: the `token` query parameter (not a long-poll
//! session token), the phoenix.js `authToken` subprotocol entry, `X-Phoenix-AuthToken`, and
//! `Authorization: Bearer`.

use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::app::{ApiError, App, ConnectionPermits, ConnectionsFull};
use crate::auth::{self, Authenticated, Identity};
use crate::longpoll::{Answer, LpStatus};
use crate::metrics as m;
use crate::phoenix::codec::Vsn;

/// Why a client was not admitted; `reason` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub kind: RefusalKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The instance is shutting down.
    Draining,
    /// A `vsn`, `Origin` or subprotocol the hub does not serve.
    Protocol,
    /// No token, or one that does not verify.
    Unauthenticated,
    /// The identity's access was revoked.
    Revoked,
    /// A connection cap.
    Full(ConnectionsFull),
}

impl Refusal {
    fn new(reason: &'static str, kind: RefusalKind) -> Self {
        Refusal { reason, kind }
    }
}

/// A transport that admits clients: which steps apply and how a refusal is answered.
pub trait Transport: Send + Sync + 'static {
    /// Reads and checks `vsn` (the Phoenix serializer version).
    const CHECKS_VSN: bool;
    /// Checks `Origin` against `CHECK_ORIGIN`.
    const CHECKS_ORIGIN: bool;
    /// Checks `Sec-WebSocket-Protocol` (only `phoenix` and the token entry are served).
    const CHECKS_SUBPROTOCOL: bool;
    fn refuse(refusal: Refusal) -> Response;
}

/// `GET /socket/websocket`: Phoenix refuses with an empty body; the client only looks at
/// "not 101".
pub struct WebSocket;

impl Transport for WebSocket {
    const CHECKS_VSN: bool = true;
    const CHECKS_ORIGIN: bool = true;
    const CHECKS_SUBPROTOCOL: bool = true;
    fn refuse(refusal: Refusal) -> Response {
        metrics::counter!(m::SOCKET_CONNECTS, "outcome" => refusal.reason).increment(1);
        tracing::debug!(reason = refusal.reason, "socket refused");
        let status = match refusal.kind {
            RefusalKind::Draining => StatusCode::SERVICE_UNAVAILABLE,
            RefusalKind::Full(full) => full.status(),
            _ => StatusCode::FORBIDDEN,
        };
        status.into_response()
    }
}

/// A long-poll session's first GET: HTTP 200 with the status in the JSON body, as phoenix.js
/// reads it; it retries on 500 and stops for good on 403.
pub struct LongPoll;

impl Transport for LongPoll {
    const CHECKS_VSN: bool = true;
    const CHECKS_ORIGIN: bool = true;
    const CHECKS_SUBPROTOCOL: bool = false;
    fn refuse(refusal: Refusal) -> Response {
        metrics::counter!(m::LONGPOLL_REQUESTS, "op" => "create", "outcome" => refusal.reason)
            .increment(1);
        metrics::counter!(m::SOCKET_CONNECTS, "outcome" => refusal.reason).increment(1);
        let status = match refusal.kind {
            RefusalKind::Draining | RefusalKind::Full(_) => LpStatus::Error,
            _ => LpStatus::Forbidden,
        };
        Json(Answer::status(status)).into_response()
    }
}

/// `GET /api/realtime/stream`: JSON errors; a full instance is counted like a socket.
pub struct Sse;

impl Transport for Sse {
    const CHECKS_VSN: bool = false;
    const CHECKS_ORIGIN: bool = false;
    const CHECKS_SUBPROTOCOL: bool = false;
    fn refuse(refusal: Refusal) -> Response {
        let error = match refusal.kind {
            RefusalKind::Draining => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining"),
            RefusalKind::Unauthenticated | RefusalKind::Protocol => ApiError::unauthorized(),
            RefusalKind::Revoked => ApiError::new(StatusCode::FORBIDDEN, "access revoked"),
            RefusalKind::Full(full) => {
                metrics::counter!(m::SOCKET_CONNECTS, "outcome" => full.reason()).increment(1);
                ApiError::new(full.status(), "too many connections")
            }
        };
        error.into_response()
    }
}

/// An admitted client: its verified token, its serializer, whether it offered the `phoenix`
/// subprotocol, and the permits it holds for its life.
pub struct Admitted<T> {
    pub authenticated: Authenticated,
    pub vsn: Vsn,
    pub offered_subprotocol: bool,
    pub permits: ConnectionPermits,
    transport: PhantomData<T>,
}

impl<T: Transport> FromRequestParts<Arc<App>> for Admitted<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        admit::<T>(parts, app).map_err(T::refuse)
    }
}

/// The admission steps of transport `T` (see the module doc).
pub fn admit<T: Transport>(parts: &Parts, app: &App) -> Result<Admitted<T>, Refusal> {
    if app.draining.load(Ordering::Acquire) {
        return Err(Refusal::new("draining", RefusalKind::Draining));
    }
    let query = query_pairs(parts);
    let param = |name: &str| {
        query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let vsn = if T::CHECKS_VSN {
        Vsn::from_param(param("vsn")).ok_or(Refusal::new("bad_vsn", RefusalKind::Protocol))?
    } else {
        Vsn::V2
    };
    if T::CHECKS_ORIGIN {
        if let Some(origin) = parts.headers.get(header::ORIGIN) {
            if !app.config.origins.allows(origin.to_str().unwrap_or("")) {
                return Err(Refusal::new("bad_origin", RefusalKind::Protocol));
            }
        }
    }
    let offered = subprotocols(&parts.headers);
    if T::CHECKS_SUBPROTOCOL && !offered.is_empty() && !offered.contains(&"phoenix") {
        return Err(Refusal::new("bad_subprotocol", RefusalKind::Protocol));
    }
    let authenticated = match token(&query, &offered, &parts.headers)
        .map(|t| app.verifier.verify(&t))
    {
        Some(Ok(authenticated)) => authenticated,
        Some(Err(error)) => return Err(Refusal::new(error.reason(), RefusalKind::Unauthenticated)),
        None => return Err(Refusal::new("missing_token", RefusalKind::Unauthenticated)),
    };
    if app.session_deps.revocations.refuses_connect(&authenticated) {
        return Err(Refusal::new("revoked", RefusalKind::Revoked));
    }
    let permits = ConnectionPermits::acquire(app, &authenticated.identity)
        .map_err(|full| Refusal::new(full.reason(), RefusalKind::Full(full)))?;
    Ok(Admitted {
        authenticated,
        vsn,
        offered_subprotocol: !offered.is_empty(),
        permits,
        transport: PhantomData,
    })
}

/// The query's pairs in order (repeated keys kept: phoenix.js's long-poll sends `token` twice).
fn query_pairs(parts: &Parts) -> Vec<(String, String)> {
    Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|Query(pairs)| pairs)
        .unwrap_or_default()
}

/// The `Sec-WebSocket-Protocol` entries offered.
fn subprotocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

/// The token from the first of its sources that has one (see the module doc).
fn token(query: &[(String, String)], offered: &[&str], headers: &HeaderMap) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    query
        .iter()
        .find(|(key, value)| key == "token" && !value.starts_with(crate::longpoll::TOKEN_PREFIX))
        .map(|(_, value)| value.clone())
        .or_else(|| {
            offered
                .iter()
                .find_map(|entry| auth::token_from_subprotocol(entry))
        })
        .or_else(|| header("x-phoenix-authtoken").map(str::to_string))
        .or_else(|| bearer_token(headers).map(str::to_string))
}

/// `Authorization: Bearer <token>`.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// An internal service (`Authorization: Bearer <internal JWT>`), or 401.
pub struct Internal;

impl FromRequestParts<Arc<App>> for Internal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        match app.verifier.verify(token) {
            Ok(authenticated) if authenticated.identity == Identity::Internal => Ok(Internal),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// The scraper (`X-Api-Key` equal to `SCRAPER_API_KEY`, compared in constant time), or 401.
pub struct Scraper;

impl FromRequestParts<Arc<App>> for Scraper {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let key = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok());
        if auth::api_key_matches(&app.config.scraper_api_key, key) {
            Ok(Scraper)
        } else {
            Err(ApiError::unauthorized())
        }
    }
}

/// The status page's reader: an internal JWT, or `ADMIN_TOKEN`, from `Authorization: Bearer`
/// or `?token=`; otherwise 401 (counted).
pub struct Operator;

impl FromRequestParts<Arc<App>> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        let query = query_pairs(parts);
        let offered = bearer_token(&parts.headers).or_else(|| {
            query
                .iter()
                .find(|(key, _)| key == "token")
                .map(|(_, value)| value.as_str())
        });
        let admin_token = app.config.admin_token.as_deref();
        let allowed = offered.is_some_and(|offered| {
            admin_token.is_some_and(|admin| auth::api_key_matches(admin, Some(offered)))
                || matches!(
                    app.verifier.verify(offered),
                    Ok(authenticated) if authenticated.identity == Identity::Internal
                )
        });
        if allowed {
            return Ok(Operator);
        }
        metrics::counter!(m::INBOUND_REJECTED, "reason" => "admin_unauthorized").increment(1);
        Err((
            StatusCode::UNAUTHORIZED,
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            Json(serde_json::json!({"error": "unauthorized: an internal token or ADMIN_TOKEN is required"})),
        )
            .into_response())
    }
}
