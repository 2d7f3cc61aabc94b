//! The axum router: health, readiness, metrics, the two publish routes, the Phoenix socket
//! upgrade and the long-poll transport; plus CORS, request ids, FORCE_SSL and HTTP metrics.
//!
//! Handlers stay thin: authentication lives in `auth`, envelopes in `ingest`, the socket
//! protocol in `phoenix`. Errors leave as `{"error": …}` JSON with a 4xx status; internal details
//! are logged, never sent.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing::Instrument;

use crate::admission::{self, Admitted, Internal, Scraper, Transport};
use crate::app::{ApiError, App};
use crate::config::{Config, OriginPolicy};
use crate::ingest::publish;
use crate::logsafe::LogSafe;
use crate::metrics as m;
use crate::phoenix::session;
use crate::phoenix::ws::WsStream;

const X_REQUEST_ID: &str = "x-request-id";

/// The router of the separate `METRICS_BIND_ADDR` listener: `/metrics` only.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(app)
}

pub fn router(app: Arc<App>) -> Router {
    let cors = cors_layer(&app.config);
    let body_limit = app.config.limits.max_body_bytes;
    let mut router = Router::new();
    if app.config.metrics_bind_addr.is_none() {
        router = router.route("/metrics", get(metrics_text));
    }
    router
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/events/notify", post(notify))
        .route("/api/events", post(api_events))
        .route("/api/events/catalogue", get(catalogue))
        .route("/api/revocations", post(api_revocations))
        .route("/socket/websocket", get(socket))
        .route("/api/realtime/stream", get(realtime_stream))
        .route("/socket/longpoll", any(longpoll))
        .route("/admin", get(crate::admin::page))
        .route("/admin/status", get(crate::admin::status_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(app.clone(), force_ssl))
        .layer(middleware::from_fn(count_requests))
        .layer(cors)
        .layer(PropagateRequestIdLayer::new(header::HeaderName::from_static(X_REQUEST_ID)))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let request_id = request
                .extensions()
                .get::<RequestId>()
                .and_then(|id| id.header_value().to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id)
        }))
        .layer(SetRequestIdLayer::new(header::HeaderName::from_static(X_REQUEST_ID), MakeRequestUuid))
        .with_state(app)
}

fn cors_layer(config: &Config) -> CorsLayer {
    let origins = match &config.origins {
        OriginPolicy::Any => AllowOrigin::any(),
        OriginPolicy::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
        policy @ OriginPolicy::Host(_) => {
            let policy = policy.clone();
            AllowOrigin::predicate(move |origin, _| {
                origin.to_str().is_ok_and(|origin| policy.allows(origin))
            })
        }
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("x-phoenix-authtoken"),
        ])
        .expose_headers([header::HeaderName::from_static(X_REQUEST_ID)])
        .max_age(Duration::from_secs(3600))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "service": "prostaff-events", "vsn": env!("CARGO_PKG_VERSION") }))
}

const CHECK_TIMEOUT: Duration = Duration::from_millis(2500);

/// Readiness: Redis decides the status code (a Rails outage must not take every hub out of the
/// load balancer) unless `READINESS_REQUIRES_RAILS`; both are always reported.
async fn ready(State(app): State<Arc<App>>) -> Response {
    let (redis, rails) = tokio::join!(
        app.redis.ping(CHECK_TIMEOUT),
        app.rails.health(CHECK_TIMEOUT)
    );
    let redis = redis.map_err(|error| error.label().to_string());
    let rails = rails.map_err(|error| error.to_string());
    let draining = app.draining.load(Ordering::Acquire);
    let label = |result: &Result<(), String>| match result {
        Ok(()) => "ok".to_string(),
        Err(reason) => reason.clone(),
    };
    let checks = json!({ "redis": label(&redis), "rails": label(&rails) });
    let rails_ok = rails.is_ok() || !app.config.readiness_requires_rails;
    if redis.is_ok() && rails_ok && !draining {
        (
            StatusCode::OK,
            Json(json!({ "status": "ok", "checks": checks })),
        )
            .into_response()
    } else {
        let mut body = json!({ "status": "unavailable", "checks": checks });
        if draining {
            body["draining"] = Value::Bool(true);
        }
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /metrics`, behind `METRICS_TOKEN` when set.
async fn metrics_text(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(expected) = &app.config.metrics_token {
        if !crate::auth::api_key_matches(expected, admission::bearer_token(&headers)) {
            return ApiError::unauthorized().into_response();
        }
    }
    metrics_body()
}

fn metrics_body() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        m::prometheus().render(),
    )
        .into_response()
}

fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Ok(()),
        Some(value)
            if value
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")) =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/json",
        )),
    }
}

/// `POST /events/notify` — the scraper, authenticated by `X-Api-Key`.
async fn notify(
    State(app): State<Arc<App>>,
    _: Scraper,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body?;
    check_json_content_type(&headers)?;
    let accepted = publish::complete_envelope(&body)?;
    if let Some(allowed) = &app.config.notify_allowed_types {
        if !allowed
            .iter()
            .any(|prefix| accepted.event_type.starts_with(prefix.as_str()))
        {
            metrics::counter!(m::EVENTS_RECEIVED, "source" => "http_notify", "outcome" => "type_not_allowed").increment(1);
            tracing::warn!(event_type = %LogSafe(&accepted.event_type), "notify refused an event type outside NOTIFY_ALLOWED_TYPES");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "event type not allowed for the scraper key (NOTIFY_ALLOWED_TYPES)",
            ));
        }
    }
    app.pipeline.refuse_invalid(&accepted)?;
    let id = accepted.id.clone();
    let delivery = publish::publish(&app.redis, &app.pipeline, accepted).await?;
    Ok(Json(
        json!({ "ok": true, "id": id, "delivery": delivery.as_str() }),
    ))
}

/// `POST /api/events` — internal services, authenticated by an internal JWT.
async fn api_events(
    State(app): State<Arc<App>>,
    _: Internal,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body?;
    check_json_content_type(&headers)?;
    let accepted = publish::complete_envelope(&body)?;
    app.pipeline.refuse_invalid(&accepted)?;
    let id = accepted.id.clone();
    let delivery = publish::publish(&app.redis, &app.pipeline, accepted).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "ok": true, "id": id, "delivery": delivery.as_str() })),
    ))
}

/// `GET /api/events/catalogue` — the JSON Schema of every event type (public: the schemas
/// describe shapes, never data or secrets).
async fn catalogue(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        app.pipeline.catalogue.served(),
    )
        .into_response()
}

/// `POST /api/revocations` — internal services: `{identity, scope, org_id?, reason?}` →
/// 202. Published as an `access.revoked` envelope, so every instance applies it (or applied
/// here alone when Redis is down, like `/api/events`).
async fn api_revocations(
    State(app): State<Arc<App>>,
    _: Internal,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body?;
    check_json_content_type(&headers)?;
    let request: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed JSON"))?;
    let (identity, scope, reason) = crate::revocation::parse_request(&request, None)
        .map_err(|invalid| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, invalid.to_string()))?;
    let org_id = match &scope {
        crate::auth::Scope::Org(org) => org.clone(),
        // A scope-all revocation names no org: its envelope travels on the hub's own channel.
        crate::auth::Scope::All => "_hub".to_string(),
    };
    let envelope = json!({
        "type": "access.revoked",
        "org_id": org_id,
        "payload": {"identity": identity, "scope": scope.label(), "org_id": org_id, "reason": reason},
    });
    let accepted = publish::complete_envelope(envelope.to_string().as_bytes())?;
    app.pipeline.refuse_invalid(&accepted)?;
    publish::publish(&app.redis, &app.pipeline, accepted).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "ok": true }))))
}

/// `GET /api/realtime/stream?topics=a,b[&types=x.*,y.z]` — Server-Sent Events with
/// `Last-Event-ID` resume and an optional type filter.
async fn realtime_stream(
    State(app): State<Arc<App>>,
    admitted: Admitted<admission::Sse>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    use crate::sse::{self, StreamRefusal};
    let Admitted {
        authenticated,
        permits,
        ..
    } = admitted;
    let refusal = |refusal: StreamRefusal| {
        let status = match refusal {
            StreamRefusal::Forbidden => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        metrics::counter!(m::SOCKET_CONNECTS, "outcome" => "sse_refused").increment(1);
        ApiError::new(status, refusal.to_string()).into_response()
    };
    let topics = match sse::parse_topics(
        params.get("topics").map(String::as_str).unwrap_or(""),
        &authenticated,
        app.config.limits.max_channels_per_socket,
    ) {
        Ok(topics) => topics,
        Err(refused) => return refusal(refused),
    };
    let resume_token = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(params.get("lastEventId").map(String::as_str))
        .filter(|t| !t.trim().is_empty());
    let resume = match resume_token.map(sse::parse_resume_token) {
        None => Default::default(),
        Some(Ok(resume)) => resume,
        Some(Err(refused)) => return refusal(refused),
    };
    let types =
        match crate::type_filter::TypeFilter::from_query(params.get("types").map(String::as_str)) {
            Ok(types) => types,
            Err(invalid) => return refusal(invalid.into()),
        };
    let opened = sse::open(
        app.session_deps.clone(),
        authenticated,
        topics,
        resume,
        types,
    );
    let (body, task) = match opened.await {
        Ok(opened) => opened,
        Err(refused @ StreamRefusal::Unavailable) => {
            metrics::counter!(m::SOCKET_CONNECTS, "outcome" => "sse_unavailable").increment(1);
            let mut response =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, refused.to_string()).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Err(refused) => return refusal(refused),
    };
    app.sessions.spawn(async move {
        let _permits = permits;
        task.await;
    });
    body.into_response()
}

/// `/socket/longpoll` — the phoenix.js long-poll transport (see [`crate::longpoll`]). Every
/// answer is HTTP 200 with the status in the JSON body, as phoenix.js reads it.
async fn longpoll(
    State(app): State<Arc<App>>,
    Query(params): Query<Vec<(String, String)>>,
    request: Request,
) -> Response {
    use crate::longpoll::{Answer, LpStatus, SessionToken, TOKEN_PREFIX};
    // phoenix.js sends the socket params (maybe a JWT as `token`) and then its session token
    // as a second `token`; session tokens have their own prefix.
    let session = params
        .iter()
        .rev()
        .find(|(key, value)| key == "token" && value.starts_with(TOKEN_PREFIX))
        .map(|(_, value)| SessionToken::parse(value));
    let (parts, body) = request.into_parts();
    let answer = match (parts.method.clone(), session) {
        (Method::OPTIONS, _) => Answer::status(LpStatus::Ok),
        (method, Some(None)) => {
            let op = if method == Method::POST {
                "post"
            } else {
                "poll"
            };
            metrics::counter!(m::LONGPOLL_REQUESTS, "op" => op, "outcome" => "malformed_token")
                .increment(1);
            Answer::status(LpStatus::Gone)
        }
        (Method::GET, Some(Some(token))) => app.longpoll.poll(&token).await,
        (Method::GET, None) => match admission::admit::<admission::LongPoll>(&parts, &app) {
            Ok(admitted) => longpoll_create(&app, admitted),
            Err(refusal) => return <admission::LongPoll as Transport>::refuse(refusal),
        },
        (Method::POST, Some(Some(token))) => {
            let limit = app
                .config
                .limits
                .max_frame_bytes
                .saturating_mul(LONGPOLL_BATCH);
            match axum::body::to_bytes(body, limit).await {
                Ok(body) => app.longpoll.post(&token, body).await,
                Err(_) => {
                    metrics::counter!(m::INBOUND_REJECTED, "reason" => "longpoll_batch_too_big")
                        .increment(1);
                    Answer::status(LpStatus::TooLarge)
                }
            }
        }
        (Method::POST, None) => Answer::status(LpStatus::Gone),
        _ => Answer::status(LpStatus::MethodNotAllowed),
    };
    Json(answer).into_response()
}

/// Messages phoenix.js puts in one long-poll POST at most (`MAX_LONGPOLL_BATCH_SIZE`): a POST
/// may carry this many frames of `MAX_FRAME_BYTES`.
const LONGPOLL_BATCH: usize = 100;

/// A GET without a session token, admitted like a WebSocket upgrade: start a session.
fn longpoll_create(app: &App, admitted: Admitted<admission::LongPoll>) -> crate::longpoll::Answer {
    metrics::counter!(m::LONGPOLL_REQUESTS, "op" => "create", "outcome" => "ok").increment(1);
    let authenticated = admitted.authenticated;
    let span = tracing::info_span!(
        "longpoll",
        identity = authenticated.identity.kind(),
        org = authenticated.identity.org_id().unwrap_or("-")
    );
    app.longpoll.create(
        app.session_deps.clone(),
        admitted.vsn,
        authenticated,
        (&app.sessions, span),
        admitted.permits,
    )
}

/// A WebSocket upgrade request: its `Sec-WebSocket-Key` and hyper's upgrade handle. Extracted
/// before admission, so a plain GET is told it is not an upgrade (400) whatever its token.
struct Upgrade {
    key: String,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

impl axum::extract::FromRequestParts<Arc<App>> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &Arc<App>,
    ) -> Result<Self, ApiError> {
        let key = websocket_key(&parts.headers)
            .ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "not a WebSocket upgrade request")
            })?
            .to_string();
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UPGRADE_REQUIRED,
                    "connection cannot be upgraded",
                )
            })?;
        Ok(Upgrade { key, on_upgrade })
    }
}

/// `GET /socket/websocket` — admit, then upgrade to a Phoenix socket served by a tracked task.
async fn socket(
    State(app): State<Arc<App>>,
    upgrade: Upgrade,
    admitted: Admitted<admission::WebSocket>,
) -> Response {
    let offered_subprotocol = admitted.offered_subprotocol;
    spawn_session(&app, upgrade.on_upgrade, admitted);
    switching_protocols(&upgrade.key, offered_subprotocol)
}

/// The socket's session, once hyper hands the connection over after the 101.
fn spawn_session(
    app: &App,
    on_upgrade: hyper::upgrade::OnUpgrade,
    admitted: Admitted<admission::WebSocket>,
) {
    // Larger than MAX_FRAME_BYTES so the session itself sees (and closes with 1009) messages
    // up to twice the limit; beyond that the reader refuses them before buffering them whole.
    let max_message = app.config.limits.max_frame_bytes * 2 + 1024;
    let deps = app.session_deps.clone();
    let Admitted {
        authenticated,
        vsn,
        permits,
        ..
    } = admitted;
    let span = tracing::info_span!(
        "socket",
        identity = authenticated.identity.kind(),
        org = authenticated.identity.org_id().unwrap_or("-")
    );
    tokio::spawn(
        app.sessions.track_future(
            async move {
                let _permits = permits;
                match on_upgrade.await {
                    // The socket is served on the TCP stream itself when hyper gives it back
                    // (always, with axum's TCP listener): no boxed I/O and adapter layers on
                    // every read and write. Whatever hyper read past the request comes first.
                    Ok(upgraded) => match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
                        Ok(parts) => {
                            let socket = WsStream::with_prefix(
                                parts.io.into_inner(),
                                &parts.read_buf,
                                max_message,
                            );
                            session::run(socket, deps, vsn, authenticated).await;
                        }
                        Err(upgraded) => {
                            let socket = WsStream::new(TokioIo::new(upgraded), max_message);
                            session::run(socket, deps, vsn, authenticated).await;
                        }
                    },
                    Err(error) => tracing::debug!(%error, "upgrade failed"),
                }
            }
            .instrument(span),
        ),
    );
}

/// The 101 answer (RFC 6455 §4.2.2), naming `phoenix` when the client offered subprotocols.
fn switching_protocols(key: &str, offered_subprotocol: bool) -> Response {
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&crate::phoenix::ws::accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if offered_subprotocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("phoenix"),
        );
    }
    response
}

/// The `Sec-WebSocket-Key` of a valid HTTP/1.1 WebSocket upgrade request (RFC 6455 §4.2.1).
fn websocket_key(headers: &HeaderMap) -> Option<&str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::CONNECTION, "upgrade")
        || !has_token(header::UPGRADE, "websocket")
        || headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .and_then(|v| v.to_str().ok())
            != Some("13")
    {
        return None;
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)?
        .to_str()
        .ok()
        .filter(|key| !key.is_empty())
}

async fn force_ssl(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if !app.config.force_ssl {
        return next.run(request).await;
    }
    let forwarded_http = request
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("http"));
    if forwarded_http {
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let location = format!("https://{}{}", app.config.phx_host, path);
        let status = if matches!(*request.method(), Method::GET | Method::HEAD) {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::PERMANENT_REDIRECT
        };
        return match HeaderValue::from_str(&location) {
            Ok(location) => (status, [(header::LOCATION, location)]).into_response(),
            Err(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad request path").into_response(),
        };
    }
    let mut response = next.run(request).await;
    response.headers_mut().insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    response
}

async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "status" => response.status().as_u16().to_string()).increment(1);
    response
}
