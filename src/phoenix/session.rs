//! One task per WebSocket: the Phoenix socket state machine.
//!
//! The loop is a `select!` over the client's frames, the socket's [`Outbox`] (broadcasts and
//! the close signal), the idle timer and the token-expiry timer. Replies are written inline and
//! are never dropped; broadcasts come from the outbox, where a slow client loses the oldest ones
//! and is told with `events_dropped`. Every write is bounded by `WRITE_TIMEOUT_MS`.
//!
//! Generic over any `Stream + Sink` of axum WebSocket messages, so it can be driven without a
//! network in tests.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::codec::{self, BroadcastFrame, Inbound, InboundPayload, ReplyStatus, Vsn};
use super::ws::{Outbound, ReserveWrite};
use crate::auth::Authenticated;
use crate::channels;
use crate::history::Position;
use crate::hub::{CloseReason, Drained, Outbox, SocketId};
use crate::limits::{MAX_EVENT_BYTES, MAX_TOPIC_BYTES};
use crate::logsafe::LogSafe;
use crate::metrics as m;
use crate::subscriber::{Channel, JoinRefusal, JoinRequest, SessionDeps, Subscriber, Transport};
use crate::topic::Topic;

/// WebSocket close codes used by the hub. Never 1000: phoenix.js 1.8.0–1.8.15 does not
/// reconnect after it.
pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Why the session ended (metric label) and the close frame to send, if any.
struct Ending {
    reason: &'static str,
    close: Option<(u16, &'static str)>,
}

impl Ending {
    fn closed(reason: &'static str, code: u16, text: &'static str) -> Self {
        Ending {
            reason,
            close: Some((code, text)),
        }
    }
    fn silent(reason: &'static str) -> Self {
        Ending {
            reason,
            close: None,
        }
    }
}

struct Session {
    deps: Arc<SessionDeps>,
    /// The socket's registration, channels and presence; released on drop, so a panic or a
    /// cancelled session leaves nothing behind.
    sub: Subscriber,
    id: SocketId,
    outbox: Arc<Outbox>,
    vsn: Vsn,
    auth: Authenticated,
    /// Client pushes (queue actions, unknown events): `MAX_PUSHES_PER_SECOND`, same burst.
    pushes: TokenBucket,
    /// Joins and leaves: their own budget, with a burst covering a rejoin of every channel
    /// (phoenix.js rejoins all of them at once after a reconnect).
    control: TokenBucket,
    pending: Vec<Outbound>,
    /// The outgoing batch of a flush, kept between flushes (small) so a delivery to an idle
    /// socket allocates nothing: at 19k sockets per broadcast, allocator time showed.
    scratch: Vec<Outbound>,
}

/// A token bucket: `rate` per second up to `burst`; `None` is unlimited.
struct TokenBucket {
    limit: Option<(f64, f64)>,
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    fn new(limit: Option<(f64, f64)>) -> Self {
        TokenBucket {
            tokens: limit.map_or(0.0, |(_, burst)| burst),
            limit,
            refilled_at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let Some((rate, burst)) = self.limit else {
            return true;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.refilled_at = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A transport's read error: how the session fails the connection for it.
pub trait TransportError: std::fmt::Display {
    /// The close code and the metric reason, or `None` when the connection itself broke.
    fn close_code(&self) -> Option<(u16, &'static str)>;
}

impl TransportError for super::ws::WsError {
    fn close_code(&self) -> Option<(u16, &'static str)> {
        super::ws::WsError::close_code(self)
    }
}

impl TransportError for std::io::Error {
    fn close_code(&self) -> Option<(u16, &'static str)> {
        None
    }
}

/// Serves one socket until it closes (the hub closes it through its outbox on shutdown).
///
/// A panic inside the session is caught here: it is logged through tracing (in the socket's
/// span) and counted in `prostaff_session_panics_total`, and the socket's [`Subscriber`] is
/// dropped like on any other ending, so it leaves nothing behind.
pub async fn run<S, E>(socket: S, deps: Arc<SessionDeps>, vsn: Vsn, auth: Authenticated)
where
    S: Stream<Item = Result<Message, E>> + Sink<Outbound, Error = E> + ReserveWrite + Unpin,
    E: TransportError,
{
    use futures_util::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(serve(socket, deps, vsn, auth))
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("non-string panic");
        metrics::counter!(m::SESSION_PANICS).increment(1);
        tracing::error!(panic = %LogSafe(message), "session panicked; its socket was cleaned up");
    }
}

impl Session {
    /// Registers the socket's subscriber and its push budgets.
    fn new(deps: Arc<SessionDeps>, vsn: Vsn, auth: Authenticated) -> Self {
        let sub = Subscriber::register(deps.clone(), Transport::Socket, &auth.identity);
        let (id, outbox) = (sub.id(), sub.outbox().clone());
        let limits = &deps.limits;
        let pushes = TokenBucket::new(
            limits
                .max_pushes_per_second
                .map(|rate| (rate as f64, rate as f64)),
        );
        let control = TokenBucket::new(limits.max_pushes_per_second.map(|rate| {
            let burst = 2.0 * limits.max_channels_per_socket as f64 + rate as f64;
            (rate as f64, burst)
        }));
        Session {
            deps,
            sub,
            id,
            outbox,
            vsn,
            pushes,
            control,
            auth,
            pending: Vec::new(),
            scratch: Vec::new(),
        }
    }
}

async fn serve<S, E>(mut socket: S, deps: Arc<SessionDeps>, vsn: Vsn, auth: Authenticated)
where
    S: Stream<Item = Result<Message, E>> + Sink<Outbound, Error = E> + ReserveWrite + Unpin,
    E: TransportError,
{
    let limits = deps.limits.clone();
    let mut session = Session::new(deps, vsn, auth);
    metrics::counter!(m::SOCKET_CONNECTS, "outcome" => "accepted").increment(1);

    // The idle timer is not moved on every inbound message (a timer-wheel update per heartbeat
    // for every socket): messages only record when they came, and when the timer fires early
    // it is re-armed for what is left.
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    let mut last_inbound = Instant::now();
    let expires_at = session.auth.expires_at;
    let expiry = tokio::time::sleep_until(
        expires_at
            .map(crate::auth::expiry_instant)
            .unwrap_or_else(Instant::now),
    );
    tokio::pin!(expiry);
    let mut drained = Drained::default();

    let ending = loop {
        tokio::select! {
            biased;
            _ = session.outbox.notified() => {
                if let Err(ending) = session.flush_outbox(&mut socket, &mut drained).await {
                    break ending;
                }
            }
            incoming = socket.next() => {
                last_inbound = Instant::now();
                let result = match incoming {
                    None => Err(Ending::silent("client_closed")),
                    Some(Err(error)) => Err(session.read_error(&error)),
                    // Boxed: joins and pushes await Redis (history, presence, queues), and
                    // those futures would otherwise size every idle socket's task (see
                    // `the_session_future_stays_small`).
                    Some(Ok(message)) if session.heartbeat(&message) => Ok(()),
                    Some(Ok(message)) => Box::pin(session.on_message(message)).await,
                };
                if let Err(ending) = result {
                    break ending;
                }
                if let Err(ending) = session.write_pending(&mut socket).await {
                    break ending;
                }
            }
            _ = &mut idle => {
                let deadline = last_inbound + limits.idle_timeout;
                if deadline > Instant::now() {
                    idle.as_mut().reset(deadline);
                    continue;
                }
                break Ending::closed("idle_timeout", close_code::GOING_AWAY, "idle timeout");
            }
            _ = &mut expiry, if expires_at.is_some() => break Ending::closed("token_expired", close_code::POLICY, "token expired"),
        }
    };

    session.sub.set_ending(ending.reason);
    if let Some((code, text)) = ending.close {
        close(&mut socket, code, text).await;
    }
    // `session` drops here: its subscriber leaves every topic and presence.
}

/// Why [`Session::join_gate`] refused a join: the metric's labels and the reply's reason.
struct JoinGateRefusal {
    family: &'static str,
    outcome: &'static str,
    reason: &'static str,
    /// False for an unmatched topic: no channel of the client's, so its error carries no ref.
    names_a_channel: bool,
}

/// What a join's params ask for besides the topic.
#[derive(Debug, Default)]
pub(crate) struct JoinParams {
    /// `since`: `"<epoch>:<offset>"`, the position to resume after.
    pub since: Option<Position>,
    /// `types`: the type filter.
    pub types: Option<crate::type_filter::TypeFilter>,
}

/// The optional join parameters: absent (or null) ones are `None`; a `since` that is not a
/// valid `"<epoch>:<offset>"` string or a malformed `types` is an error (`invalid_params`).
/// Params that are not a JSON object ask for nothing (phoenix.js always sends an object).
pub(crate) fn join_params(params: &InboundPayload) -> Result<JoinParams, ()> {
    let InboundPayload::Json(raw) = params else {
        return Ok(JoinParams::default());
    };
    let Ok(Value::Object(params)) = serde_json::from_str::<Value>(raw.get()) else {
        return Ok(JoinParams::default());
    };
    let since = match params.get("since") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(Position::parse(text).ok_or(())?),
        Some(_) => return Err(()),
    };
    let types = crate::type_filter::TypeFilter::from_param(params.get("types")).map_err(|_| ())?;
    Ok(JoinParams { since, types })
}

/// Sends a close frame and waits briefly for the client's answer, both bounded in time.
async fn close<S, E>(socket: &mut S, code: u16, reason: &'static str)
where
    S: Stream<Item = Result<Message, E>> + Sink<Outbound, Error = E> + ReserveWrite + Unpin,
{
    let frame: Outbound = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
    .into();
    if tokio::time::timeout(Duration::from_secs(1), socket.send(frame))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

impl Session {
    fn read_error<E: TransportError>(&self, error: &E) -> Ending {
        match error.close_code() {
            Some((code, reason)) => {
                tracing::debug!(socket = self.id, %error, "protocol violation");
                metrics::counter!(m::INBOUND_REJECTED, "reason" => reason).increment(1);
                let text = match code {
                    close_code::TOO_BIG => "frame too big",
                    close_code::INVALID_PAYLOAD => "invalid UTF-8",
                    _ => "protocol error",
                };
                Ending::closed(reason, code, text)
            }
            None => Ending::silent("read_error"),
        }
    }

    /// Answers a heartbeat without the (boxed) general path: most of what an idle socket
    /// receives. `false` for anything else.
    fn heartbeat(&mut self, message: &Message) -> bool {
        let Message::Text(text) = message else {
            return false;
        };
        if text.len() > self.deps.limits.max_frame_bytes {
            return false;
        }
        let Some(msg_ref) = codec::heartbeat_ref(self.vsn, text.as_str()) else {
            return false;
        };
        self.deps.metrics.frames_received.increment(1);
        let reply = codec::encode_reply(
            self.vsn,
            None,
            Some(msg_ref),
            "phoenix",
            ReplyStatus::Ok,
            b"{}",
        );
        self.pending.push(Message::Text(reply).into());
        true
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Ending> {
        let inbound = match message {
            Message::Text(text) => {
                self.check_size(text.len())?;
                codec::decode_text(self.vsn, text.as_str())
            }
            Message::Binary(data) => {
                self.check_size(data.len())?;
                codec::decode_binary(self.vsn, &data)
            }
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Ending::silent("client_closed")),
        };
        self.deps.metrics.frames_received.increment(1);
        match inbound {
            Ok(inbound) => {
                self.on_inbound(inbound).await;
                Ok(())
            }
            Err(error) => {
                tracing::debug!(socket = self.id, %error, "undecodable frame");
                metrics::counter!(m::INBOUND_REJECTED, "reason" => "undecodable").increment(1);
                Err(Ending::closed(
                    "undecodable_frame",
                    close_code::INVALID_PAYLOAD,
                    "undecodable frame",
                ))
            }
        }
    }

    fn check_size(&self, len: usize) -> Result<(), Ending> {
        if len > self.deps.limits.max_frame_bytes {
            metrics::counter!(m::INBOUND_REJECTED, "reason" => "frame_too_big").increment(1);
            return Err(Ending::closed(
                "frame_too_big",
                close_code::TOO_BIG,
                "frame too big",
            ));
        }
        Ok(())
    }

    fn reply(
        &mut self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        status: ReplyStatus,
        response: &Value,
    ) {
        let body = serde_json::to_vec(response).expect("JSON value serializes");
        self.pending.push(
            Message::Text(codec::encode_reply(
                self.vsn, join_ref, msg_ref, topic, status, &body,
            ))
            .into(),
        );
    }

    fn error_reply(
        &mut self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        reason: &str,
    ) {
        self.reply(
            join_ref,
            msg_ref,
            topic,
            ReplyStatus::Error,
            &json!({ "reason": reason }),
        );
    }

    /// A channel lifecycle frame (`phx_close`, `phx_error`) for the channel of `join_ref`:
    /// phoenix.js matches it to the channel by that ref.
    fn lifecycle(&self, join_ref: Option<&str>, topic: &str, event: &str) -> Outbound {
        Message::Text(codec::encode_message(
            self.vsn, join_ref, join_ref, topic, event, b"{}",
        ))
        .into()
    }

    fn push_close(&mut self, join_ref: Option<&str>, topic: &str) {
        let close = self.lifecycle(join_ref, topic, "phx_close");
        self.pending.push(close);
    }

    async fn on_inbound(&mut self, msg: Inbound) {
        let Inbound {
            join_ref,
            msg_ref,
            topic,
            event,
            payload,
        } = msg;
        let (join_ref, msg_ref) = (join_ref.as_deref(), msg_ref.as_deref());
        if topic == "phoenix" && event == "heartbeat" {
            self.reply(join_ref, msg_ref, &topic, ReplyStatus::Ok, &json!({}));
            return;
        }
        if topic.len() > MAX_TOPIC_BYTES || event.len() > MAX_EVENT_BYTES {
            metrics::counter!(m::INBOUND_REJECTED, "reason" => "name_too_long").increment(1);
            let reason = if topic.len() > MAX_TOPIC_BYTES {
                "topic too long"
            } else {
                "event name too long"
            };
            // The reply names a capped topic: echoing 64 KiB back would amplify the abuse.
            let shown: String = topic.chars().take(MAX_TOPIC_BYTES / 4).collect();
            self.error_reply(join_ref, msg_ref, &shown, reason);
            return;
        }
        let control = matches!(event.as_str(), "phx_join" | "phx_leave");
        let allowed = if control {
            self.control.take()
        } else {
            self.pushes.take()
        };
        if !allowed {
            metrics::counter!(m::INBOUND_REJECTED, "reason" => "rate_limited").increment(1);
            self.error_reply(join_ref, msg_ref, &topic, "rate_limited");
            return;
        }
        match event.as_str() {
            "phx_join" => {
                self.on_join(join_ref.or(msg_ref), msg_ref, &topic, payload)
                    .await
            }
            "phx_leave" => self.on_leave(join_ref, msg_ref, &topic),
            _ => {
                self.on_push(join_ref, msg_ref, &topic, &event, payload)
                    .await
            }
        }
    }

    /// The checks before a join touches anything: a known topic, room for one more channel,
    /// the identity's right to it (and no revocation), and well-formed params.
    fn join_gate(
        &self,
        topic: &str,
        params: &InboundPayload,
    ) -> Result<(Topic, JoinParams), JoinGateRefusal> {
        let refuse = |family: &'static str, outcome, reason| JoinGateRefusal {
            family,
            outcome,
            reason,
            names_a_channel: true,
        };
        let Some(family) = Topic::parse(topic) else {
            return Err(JoinGateRefusal {
                names_a_channel: false,
                ..refuse("none", "unmatched_topic", "unmatched topic")
            });
        };
        let label = family.label();
        if !self.sub.contains(topic) && self.sub.len() >= self.deps.limits.max_channels_per_socket {
            return Err(refuse(
                label,
                "too_many_channels",
                "too many channels joined",
            ));
        }
        if !family.may_join(&self.auth.identity) {
            return Err(refuse(label, "unauthorized", "unauthorized"));
        }
        if let Some(org) = family.org() {
            if self.deps.revocations.refuses_join(&self.auth, org) {
                return Err(refuse(label, "revoked", "unauthorized"));
            }
        }
        let Ok(params) = join_params(params) else {
            return Err(refuse(label, "invalid_params", "invalid_params"));
        };
        Ok((family, params))
    }

    async fn on_join(
        &mut self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        params: InboundPayload,
    ) {
        let (family, JoinParams { since, types }) = match self.join_gate(topic, &params) {
            Ok(admitted) => admitted,
            Err(refused) => {
                metrics::counter!(m::CHANNEL_JOINS, "family" => refused.family, "outcome" => refused.outcome)
                    .increment(1);
                let join_ref = join_ref.filter(|_| refused.names_a_channel);
                self.error_reply(join_ref, msg_ref, topic, refused.reason);
                return;
            }
        };
        let label = family.label();
        crate::fault::on_join(topic);
        let joined = self
            .sub
            .join(JoinRequest {
                topic,
                family,
                join_ref,
                since: since.as_ref(),
                identity: &self.auth.identity,
                reply: true,
                presence: true,
                types,
            })
            .await;
        let joined = match joined {
            Ok(joined) => joined,
            Err(JoinRefusal::Unavailable) => {
                metrics::counter!(m::CHANNEL_JOINS, "family" => label, "outcome" => "unavailable")
                    .increment(1);
                self.error_reply(join_ref, msg_ref, topic, "unavailable");
                return;
            }
        };
        let mut response = joined.response;
        if self.deps.history.enabled() && label != Topic::Admin.label() {
            if let Some(object) = response.as_object_mut() {
                let position = joined.position.as_ref().map(Position::to_string);
                object.insert("position".into(), json!(position));
                if let Some(recovered) = joined.recovered {
                    object.insert("recovered".into(), json!(recovered));
                }
            }
        }
        metrics::counter!(m::CHANNEL_JOINS, "family" => label, "outcome" => "ok").increment(1);
        self.reply(join_ref, msg_ref, topic, ReplyStatus::Ok, &response);
        // The missed broadcasts follow the reply, before any live one.
        for entry in joined.missed {
            let frame = BroadcastFrame::new(
                joined.topic.clone(),
                &entry.event,
                entry.payload,
                Some(entry.position),
                std::time::Instant::now(),
            );
            self.pending.push(Self::outbound(self.vsn, frame));
        }
        if joined.presence {
            // After the reply, like Phoenix's `after_join`; diffs already on their way are
            // buffered by phoenix.js until this state arrives, and re-applying them is harmless.
            self.push_presence_state(join_ref, topic).await;
        }
        tracing::debug!(socket = self.id, topic = %LogSafe(topic), "joined");
        if let Some(previous) = joined.replaced {
            // Duplicate join: the old channel is closed after the new join's reply.
            self.push_close(previous.join_ref.as_deref(), topic);
        }
    }

    async fn push_presence_state(&mut self, join_ref: Option<&str>, topic: &str) {
        let view = self.deps.presence.state(topic).await;
        self.pending.push(
            Message::Text(codec::encode_message(
                self.vsn,
                join_ref,
                None,
                topic,
                "presence_state",
                &view.state,
            ))
            .into(),
        );
        for (event, payload) in [
            ("presence_diff", view.pending),
            ("presence_summary", view.summary),
        ] {
            if let Some(payload) = payload {
                self.pending.push(
                    Message::Text(codec::encode_message(
                        self.vsn, join_ref, None, topic, event, &payload,
                    ))
                    .into(),
                );
            }
        }
    }

    fn on_leave(&mut self, join_ref: Option<&str>, msg_ref: Option<&str>, topic: &str) {
        match self.sub.get(topic) {
            Some(joined) if join_ref.is_none() || join_ref == joined.join_ref.as_deref() => {
                let Some(joined) = self.sub.leave(topic) else {
                    return;
                };
                let channel_ref = joined.join_ref.as_deref();
                self.reply(channel_ref, msg_ref, topic, ReplyStatus::Ok, &json!({}));
                self.push_close(channel_ref, topic);
            }
            Some(_) => {
                metrics::counter!(m::INBOUND_REJECTED, "reason" => "stale_join_ref").increment(1);
            }
            None => self.reply(join_ref, msg_ref, topic, ReplyStatus::Ok, &json!({})),
        }
    }

    async fn on_push(
        &mut self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: InboundPayload,
    ) {
        let Some(joined) = self.sub.get(topic) else {
            self.error_reply(None, msg_ref, topic, "unmatched topic");
            return;
        };
        if join_ref.is_some() && join_ref != joined.join_ref.as_deref() {
            metrics::counter!(m::INBOUND_REJECTED, "reason" => "stale_join_ref").increment(1);
            return;
        }
        let channel_ref = joined.join_ref.clone();
        let family = joined.family.clone();
        let payload = match payload {
            InboundPayload::Json(raw) => serde_json::from_str::<Value>(raw.get()).ok(),
            // No hub event takes binary data.
            InboundPayload::Binary(_) => None,
        };
        let result = channels::handle_in(
            &family,
            &self.auth.identity,
            event,
            payload.as_ref(),
            &self.deps.inhouse,
        )
        .await;
        match result {
            Ok(response) => self.reply(
                channel_ref.as_deref(),
                msg_ref,
                topic,
                ReplyStatus::Ok,
                &response,
            ),
            Err(refusal) => self.error_reply(channel_ref.as_deref(), msg_ref, topic, refusal.0),
        }
    }

    /// Writes the queued replies.
    async fn write_pending<S, E>(&mut self, socket: &mut S) -> Result<(), Ending>
    where
        S: Sink<Outbound, Error = E> + ReserveWrite + Unpin,
    {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut messages = std::mem::take(&mut self.pending);
        let result = self.write_all(socket, &mut messages).await;
        self.pending = messages;
        result
    }

    /// Writes whatever the outbox holds (drop notices first), or closes when asked to.
    async fn flush_outbox<S, E>(
        &mut self,
        socket: &mut S,
        drained: &mut Drained,
    ) -> Result<(), Ending>
    where
        S: Sink<Outbound, Error = E> + ReserveWrite + Unpin,
    {
        self.outbox.drain(256, drained);
        let mut messages = std::mem::take(&mut self.scratch);
        messages.append(&mut self.pending);
        for scope in drained.revoked.drain(..) {
            self.apply_revocation(scope, &mut messages)?;
        }
        let resync = self.notice_drops(&mut drained.dropped, &mut messages);
        if let Some(first) = drained.frames.first() {
            if self.id % 16 == 0 {
                self.deps
                    .metrics
                    .publish_to_send
                    .record(first.published_at.elapsed().as_secs_f64());
            }
        }
        // One allocation for the batch rather than doublings as it fills.
        messages.reserve(drained.frames.len());
        self.encode_frames(&mut drained.frames, &mut messages);
        drained.frames.shrink_to(crate::hub::RETAINED_CAPACITY);
        for (topic, join_ref) in resync {
            metrics::counter!(m::PRESENCE_RESYNCS).increment(1);
            Box::pin(self.push_presence_state(join_ref.as_deref(), &topic)).await;
            messages.append(&mut self.pending);
        }
        if !messages.is_empty() {
            self.write_all(socket, &mut messages).await?;
        }
        messages.shrink_to(4);
        self.scratch = messages;
        match drained.closing.take() {
            Some(CloseReason::Restart) => Err(Ending::closed(
                "server_restart",
                close_code::SERVICE_RESTART,
                "server restarting",
            )),
            Some(CloseReason::GoingAway) => Err(Ending::closed(
                "server_going_away",
                close_code::GOING_AWAY,
                "server going away",
            )),
            None => Ok(()),
        }
    }

    /// A revocation that reached this socket: every grant ends the session; an org's ends its
    /// topics of that org with `phx_close` (phoenix.js leaves the channel and does not rejoin).
    fn apply_revocation(
        &mut self,
        scope: crate::auth::Scope,
        messages: &mut Vec<Outbound>,
    ) -> Result<(), Ending> {
        let org = match scope {
            crate::auth::Scope::All => {
                return Err(Ending::closed("revoked", close_code::POLICY, "revoked"));
            }
            crate::auth::Scope::Org(org) => org,
        };
        let topics: Vec<Arc<str>> = self
            .sub
            .channels()
            .filter(|(_, c)| c.family.org() == Some(&org))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in topics {
            if let Some(channel) = self.sub.leave(&topic) {
                messages.push(self.lifecycle(channel.join_ref.as_deref(), &topic, "phx_close"));
            }
        }
        Ok(())
    }

    /// An `events_dropped` notice per topic that lost broadcasts to a full outbox; returns the
    /// presence topics whose whole state must be sent again (a lost `presence_diff` would leave
    /// the client's list wrong for good; phoenix.js re-syncs on a `presence_state`).
    fn notice_drops(
        &self,
        dropped: &mut Vec<(Arc<str>, u64)>,
        messages: &mut Vec<Outbound>,
    ) -> Vec<(Arc<str>, Option<String>)> {
        let mut resync = Vec::new();
        for (topic, count) in dropped.drain(..) {
            if let Some(joined) = self.sub.get(&topic) {
                if joined.presence.is_some() {
                    resync.push((topic.clone(), joined.join_ref.clone()));
                }
            }
            let payload = format!("{{\"count\":{count}}}");
            messages.push(
                Message::Text(codec::encode_message(
                    self.vsn,
                    None,
                    None,
                    &topic,
                    "events_dropped",
                    payload.as_bytes(),
                ))
                .into(),
            );
        }
        resync
    }

    /// Encodes the drained broadcasts for the channels still joined, skipping what a channel
    /// has already seen or filters out; a topic with a gap gets nothing after the gap and a
    /// `phx_error` (phoenix.js rejoins with `since`, so the rejoin reports `recovered: false`).
    fn encode_frames(
        &mut self,
        frames: &mut Vec<Arc<BroadcastFrame>>,
        messages: &mut Vec<Outbound>,
    ) {
        // Consecutive frames usually share a topic: its channel is looked up once per run.
        let mut current: Option<(Arc<str>, Option<&mut Channel>)> = None;
        let mut gaps: Vec<Arc<str>> = Vec::new();
        let mut filtered = 0u64;
        for frame in frames.drain(..) {
            if frame.gap || gaps.iter().any(|t| Arc::ptr_eq(t, &frame.topic)) {
                if frame.gap && !gaps.iter().any(|t| Arc::ptr_eq(t, &frame.topic)) {
                    gaps.push(frame.topic.clone());
                }
                continue;
            }
            if !current
                .as_ref()
                .is_some_and(|(topic, _)| Arc::ptr_eq(topic, &frame.topic))
            {
                // End the previous borrow before taking the next one.
                current.take();
                let joined = self.sub.for_frame(&frame.topic);
                current = Some((frame.topic.clone(), joined));
            }
            let Some((_, Some(joined))) = current.as_mut() else {
                // Queued before the client left the topic: it has had its `phx_close`.
                continue;
            };
            // Skip what the channel has already seen (recovery overlap, a re-published
            // event); remember the newest position otherwise.
            if let Some(position) = &frame.position {
                if !joined.admit(position) {
                    continue;
                }
            }
            if !joined.wants(&frame.event) {
                filtered += 1;
                continue;
            }
            messages.push(Self::outbound(self.vsn, frame));
        }
        drop(current);
        if filtered > 0 {
            metrics::counter!(m::TYPE_FILTERED).increment(filtered);
        }
        for topic in gaps {
            if let Some(channel) = self.sub.leave(&topic) {
                messages.push(self.lifecycle(channel.join_ref.as_deref(), &topic, "phx_error"));
            }
        }
    }

    /// A broadcast as this socket sends it: the shared frame itself for the V2 serializer,
    /// the frame's (lazily encoded, then shared) V1 text otherwise.
    fn outbound(vsn: Vsn, frame: Arc<BroadcastFrame>) -> Outbound {
        match vsn {
            Vsn::V2 => Outbound::Shared(frame),
            Vsn::V1 => Message::Text(frame.text(Vsn::V1)).into(),
        }
    }

    async fn write_all<S, E>(
        &mut self,
        socket: &mut S,
        messages: &mut Vec<Outbound>,
    ) -> Result<(), Ending>
    where
        S: Sink<Outbound, Error = E> + ReserveWrite + Unpin,
    {
        let count = messages.len() as u64;
        socket.reserve_write(messages.iter().map(Outbound::wire_len).sum());
        let write = async {
            for message in messages.drain(..) {
                socket.feed(message).await?;
            }
            socket.flush().await
        };
        // Borrowed, not cloned: cloning and dropping a `CancellationToken` locks its tree node's
        // mutex, one shared by every socket. Biased: a write that completes at once (the
        // usual case) never registers with the token either, so 10k sockets writing do not
        // contend on it.
        let hard_stop = &self.deps.hard_stop;
        let outcome = tokio::select! {
            biased;
            result = tokio::time::timeout(self.deps.limits.write_timeout, write) => Some(result),
            _ = hard_stop.cancelled() => None,
        };
        match outcome {
            Some(Ok(Ok(()))) => {
                self.deps.metrics.frames_sent.increment(count);
                Ok(())
            }
            Some(Ok(Err(_))) => Err(Ending::silent("write_error")),
            Some(Err(_)) => {
                // Lost: what is still queued plus this whole write, whose flush never finished
                // (some of it may have reached the client: an upper bound, never an undercount).
                let lost = self.outbox.queued() as u64 + count;
                metrics::counter!(m::BROADCASTS_DROPPED, "reason" => "write_timeout")
                    .increment(lost);
                Err(Ending::closed(
                    "write_timeout",
                    close_code::TRY_AGAIN_LATER,
                    "slow consumer",
                ))
            }
            None => Err(Ending::closed(
                "server_going_away",
                close_code::GOING_AWAY,
                "server going away",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::history::History;
    use crate::hub::Hub;
    use crate::inhouse::{Inhouse, QueueStore};
    use crate::presence::Presence;
    use crate::redis::RedisLink;
    use tokio_util::sync::CancellationToken;

    /// Every socket's task holds one `run` future for its whole life: its size is per-socket
    /// memory (issue 14: RSS per socket). Rarely taken paths (joins, pushes, presence resyncs)
    /// are boxed so they do not size the idle state.
    #[test]
    fn the_session_future_stays_small() {
        let redis = RedisLink::new("redis://127.0.0.1:1");
        let hub = Arc::new(Hub::new(16, crate::metrics::Metrics::global()));
        let deps = Arc::new(SessionDeps {
            hub: hub.clone(),
            inhouse: Arc::new(Inhouse::new(QueueStore::new(
                redis.clone(),
                10,
                Duration::from_secs(60),
            ))),
            history: Arc::new(History::new(redis.clone(), 10, Duration::from_secs(60))),
            presence: Arc::new(Presence::new(
                redis.clone(),
                hub.clone(),
                crate::config::Config::development().presence,
            )),
            revocations: Arc::new(crate::revocation::Revocations::new(
                redis,
                hub,
                Duration::from_secs(60),
            )),
            limits: Limits::default(),
            metrics: crate::metrics::Metrics::global(),
            hard_stop: CancellationToken::new(),
        });
        let auth = Authenticated {
            identity: crate::auth::Identity::Internal,
            expires_at: None,
            issued_at_ms: None,
        };
        let future = run(Box::pin(EmptySocket), deps, Vsn::V2, auth);
        let size = std::mem::size_of_val(&future);
        println!("session future: {size} bytes");
        assert!(size <= 2048, "the session future is {size} bytes");
    }

    struct EmptySocket;

    impl Stream for EmptySocket {
        type Item = Result<Message, std::io::Error>;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(None)
        }
    }

    impl ReserveWrite for std::pin::Pin<Box<EmptySocket>> {}

    impl Sink<Outbound> for EmptySocket {
        type Error = std::io::Error;
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn start_send(self: std::pin::Pin<&mut Self>, _: Outbound) -> Result<(), Self::Error> {
            Ok(())
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
}
