//! The Phoenix long-poll transport (`/socket/longpoll`), as phoenix.js's `LongPoll` speaks it,
//! for networks that block WebSockets.
//!
//! A long-poll session is an ordinary socket session ([`session::run`]) driven through
//! [`LpSocket`] instead of a WebSocket: POSTed NDJSON lines become inbound frames, and what the
//! session writes waits in a bounded queue until a GET takes it. So auth, join rules, limits,
//! the outbox and its drop policy, recovery, presence and the drain on shutdown are the
//! WebSocket's, unchanged; a client that stops polling fills the queue and is closed by the
//! session's own `WRITE_TIMEOUT_MS`.
//!
//! # Tokens and acknowledgements
//! phoenix.js sends back, as `token`, whatever the last poll answered. The hub's session token
//! is `lp.<instance>.<session id>.<ack>`: the instance that runs the session, 128 random bits
//! naming it, and the sequence number of the last message the client was given. A poll
//! therefore acknowledges everything up to `<ack>`: messages of an answer that never reached
//! the client (a cut connection, a proxy timeout) are sent again on the next poll, never lost,
//! and never sent twice once acknowledged.
//!
//! # No sticky sessions
//! A request whose token names another instance is routed to it through Redis: PUBLISH on
//! `prostaff:lp:<owner>`, whose subscriber runs the poll or post there and PUBLISHes the answer
//! on `prostaff:lp:<asker>`. A PUBLISH that reaches nobody means the owner is gone: the session
//! answers 410 and phoenix.js reconnects and rejoins (with `since`, nothing is lost).
//!
//! Sessions end when their socket session ends (the next poll answers what was queued, then
//! 410) or after `LONGPOLL_SESSION_TIMEOUT_MS` without a request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::Message;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::{Sink, Stream};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSender};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Authenticated;
use crate::config::LongPollConfig;
use crate::metrics as m;
use crate::phoenix::codec::Vsn;
use crate::phoenix::session;
use crate::phoenix::ws::{Outbound, ReserveWrite};
use crate::redis::{self, Handler, HandlerFuture, RedisLink};
use crate::subscriber::SessionDeps;

/// Channel prefix of routed requests and answers (`prostaff:lp:{instance}`).
pub const CHANNEL_PREFIX: &str = "prostaff:lp:";
/// Session tokens start with this, which tells them from JWTs sent as the same `token` param.
pub const TOKEN_PREFIX: &str = "lp.";
/// Messages handed out by one poll at most.
const MAX_POLL_MESSAGES: usize = 256;
/// POSTed lines waiting for the session loop.
const INBOUND_CAPACITY: usize = 256;
/// How often idle sessions are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A routed request whose answer has not come back within the hold plus this is a 500.
const ROUTE_MARGIN: Duration = Duration::from_secs(3);

/// The status phoenix.js's `LongPoll` reads from an answer's body (the HTTP status is 200).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
pub enum LpStatus {
    /// Messages (or a newly created session's token).
    Ok,
    /// Nothing arrived within the hold: poll again.
    NoContent,
    /// A request phoenix.js will not send (a method other than GET, POST or OPTIONS).
    MethodNotAllowed,
    /// The session is unknown or over: phoenix.js reconnects and rejoins.
    Gone,
    /// A POST batch over the frame limit times the batch size.
    TooLarge,
    /// phoenix.js stops for good (a refused token, origin or `vsn`).
    Forbidden,
    /// phoenix.js retries (draining, full, or an answer that did not come back in time).
    Error,
}

impl LpStatus {
    pub fn code(self) -> u16 {
        match self {
            LpStatus::Ok => 200,
            LpStatus::NoContent => 204,
            LpStatus::Forbidden => 403,
            LpStatus::MethodNotAllowed => 405,
            LpStatus::Gone => 410,
            LpStatus::TooLarge => 413,
            LpStatus::Error => 500,
        }
    }

    /// The `outcome` label of `prostaff_longpoll_requests_total`.
    fn outcome(self) -> &'static str {
        match self {
            LpStatus::Ok => "ok",
            LpStatus::NoContent => "no_content",
            LpStatus::Gone => "gone",
            _ => "error",
        }
    }
}

impl From<LpStatus> for u16 {
    fn from(status: LpStatus) -> u16 {
        status.code()
    }
}

impl TryFrom<u16> for LpStatus {
    type Error = String;
    fn try_from(code: u16) -> Result<Self, String> {
        [
            LpStatus::Ok,
            LpStatus::NoContent,
            LpStatus::Forbidden,
            LpStatus::MethodNotAllowed,
            LpStatus::Gone,
            LpStatus::TooLarge,
            LpStatus::Error,
        ]
        .into_iter()
        .find(|status| status.code() == code)
        .ok_or_else(|| format!("not a long-poll status: {code}"))
    }
}

/// The JSON body of every long-poll answer (the HTTP status is always 200; phoenix.js reads
/// `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub status: LpStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<String>>,
}

impl Answer {
    pub fn status(status: LpStatus) -> Self {
        Answer {
            status,
            token: None,
            messages: None,
        }
    }

    fn with_token(status: LpStatus, token: String) -> Self {
        Answer {
            status,
            token: Some(token),
            messages: None,
        }
    }
}

/// `lp.<instance>.<session id>.<ack>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionToken {
    pub instance: String,
    pub sid: String,
    pub ack: u64,
}

impl SessionToken {
    pub fn parse(text: &str) -> Option<SessionToken> {
        let mut parts = text.strip_prefix(TOKEN_PREFIX)?.split('.');
        let (instance, sid, ack) = (parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        if parts.next().is_some() || !hex(instance, 16) || sid.len() != 32 || !hex(sid, 32) {
            return None;
        }
        Some(SessionToken {
            instance: instance.to_string(),
            sid: sid.to_string(),
            ack: ack.parse().ok()?,
        })
    }

    fn format(instance: &str, sid: &str, ack: u64) -> String {
        format!("{TOKEN_PREFIX}{instance}.{sid}.{ack}")
    }
}

/// The client messages of a POST body: NDJSON, one message per non-empty line (`\r\n` too).
/// A line that is not UTF-8 becomes a binary message, which the session refuses as an
/// undecodable frame, like a WebSocket's.
pub fn batch_messages(body: &[u8]) -> impl Iterator<Item = Message> + '_ {
    body.split(|b| *b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        Some(match std::str::from_utf8(line) {
            Ok(text) => Message::Text(text.into()),
            Err(_) => Message::Binary(Bytes::copy_from_slice(line)),
        })
    })
}

/// Applies client acknowledgements (any u64, as tokens carry them) to a queue of handed-out
/// messages and checks its bookkeeping after each (the `longpoll` fuzz target).
pub(crate) fn replay_acknowledgements(acks: &[u64]) {
    let (tx, queue) = mpsc::channel(8);
    let mut out = Outgoing {
        queue,
        unacked: Vec::new(),
        first_seq: 1,
        ended: false,
    };
    for (i, &ack) in acks.iter().enumerate() {
        let _ = tx.try_send(Message::Text(format!("m{i}").into()));
        let first = out.queue.try_recv().ok();
        out.take_queued(first);
        let (before_first, before_len) = (out.first_seq, out.unacked.len());
        out.acknowledge(ack);
        assert!(out.first_seq >= before_first);
        assert!(out.unacked.len() <= before_len);
        assert_eq!(
            out.first_seq - before_first,
            (before_len - out.unacked.len()) as u64
        );
        assert!(out.last_seq().saturating_add(1) >= out.first_seq);
    }
}

/// What one instance routes to another over Redis.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Wire {
    Poll {
        id: u64,
        from: String,
        sid: String,
        ack: u64,
    },
    Post {
        id: u64,
        from: String,
        sid: String,
        body: String,
    },
    Answer {
        id: u64,
        answer: Answer,
    },
}

/// The long-poll sessions this instance runs, and the requests it routed elsewhere.
pub struct LongPoll {
    instance: String,
    redis: Arc<RedisLink>,
    config: LongPollConfig,
    sessions: DashMap<String, Arc<LpSession>>,
    routed: DashMap<u64, oneshot::Sender<Answer>>,
    next_request: AtomicU64,
    /// The runtime requests routed from other instances are served on: the one `new` was
    /// called on, not the Redis link's thread that hands them over.
    runtime: tokio::runtime::Handle,
}

/// One session as its owner holds it.
struct LpSession {
    inbound: mpsc::Sender<Message>,
    outgoing: tokio::sync::Mutex<Outgoing>,
    /// A new poll takes over from one still waiting (the client gave up on it).
    preempt: Notify,
    requests_in_flight: AtomicUsize,
    last_request: Mutex<Instant>,
    write_timeout: Duration,
}

/// Messages on their way to the client.
struct Outgoing {
    queue: mpsc::Receiver<Message>,
    /// Handed out by the last poll, not yet acknowledged: sent again until they are.
    unacked: Vec<String>,
    /// Sequence number of `unacked[0]` (or of the next message when it is empty).
    first_seq: u64,
    /// The socket session wrote its close (or ended): nothing more will come.
    ended: bool,
}

impl Outgoing {
    /// `ack` comes from the client's token: any u64. Checked arithmetic throughout.
    fn acknowledge(&mut self, ack: u64) {
        let Some(behind) = ack.checked_sub(self.first_seq) else {
            return;
        };
        let done = usize::try_from(behind.saturating_add(1))
            .unwrap_or(usize::MAX)
            .min(self.unacked.len());
        self.unacked.drain(..done);
        self.first_seq = self.first_seq.saturating_add(done as u64);
    }

    /// The last sequence number handed out.
    fn last_seq(&self) -> u64 {
        (self.first_seq.saturating_add(self.unacked.len() as u64)).saturating_sub(1)
    }

    /// Moves what is queued into `unacked`; `false` when nothing was there.
    fn take_queued(&mut self, first: Option<Message>) -> bool {
        let mut next = first;
        loop {
            match next {
                Some(Message::Text(text)) => self.unacked.push(text.to_string()),
                Some(Message::Close(_)) | None => {
                    self.ended = true;
                    break;
                }
                // The session writes text frames only.
                Some(_) => {}
            }
            if self.unacked.len() >= MAX_POLL_MESSAGES {
                break;
            }
            next = match self.queue.try_recv() {
                Ok(message) => Some(message),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
        }
        !self.unacked.is_empty()
    }
}

impl LpSession {
    /// Marks a request as running until the guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.requests_in_flight.fetch_add(1, Ordering::AcqRel);
        *self.last_request.lock().expect("last_request lock") = Instant::now();
        InFlight(self.clone())
    }
}

struct InFlight(Arc<LpSession>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_request.lock().expect("last_request lock") = Instant::now();
        self.0.requests_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The long-poll handler of this instance's channel `prostaff:lp:<instance>`.
struct Routed(Arc<LongPoll>);

impl Handler for Routed {
    fn messages(&self, batch: Vec<redis::Message>) -> HandlerFuture<'_> {
        for message in batch {
            self.0.on_message(&message.payload);
        }
        Box::pin(async {})
    }
}

impl LongPoll {
    /// Subscribes this instance's channel on the link.
    pub fn subscribe(self: &Arc<Self>, redis: &RedisLink) {
        redis.subscribe(
            format!("{CHANNEL_PREFIX}{}", self.instance),
            Arc::new(Routed(self.clone())),
        );
    }

    /// Must be called on the runtime that serves the hub's requests.
    pub fn new(redis: Arc<RedisLink>, config: LongPollConfig) -> Self {
        LongPoll {
            instance: redis.instance().to_string(),
            redis,
            config,
            sessions: DashMap::new(),
            routed: DashMap::new(),
            next_request: AtomicU64::new(1),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Starts a session for an authenticated client (the socket session runs on `tracker`,
    /// holding `guard` — the connection permits — for its life) and answers 410 with its token,
    /// which phoenix.js takes as "open".
    pub fn create<G: Send + 'static>(
        &self,
        deps: Arc<SessionDeps>,
        vsn: Vsn,
        auth: Authenticated,
        (tracker, span): (&TaskTracker, tracing::Span),
        guard: G,
    ) -> Answer {
        let sid = uuid::Uuid::new_v4().simple().to_string();
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let (outbound_tx, outbound_rx) = mpsc::channel(deps.limits.outbound_buffer_frames.max(64));
        let session = Arc::new(LpSession {
            inbound: inbound_tx,
            outgoing: tokio::sync::Mutex::new(Outgoing {
                queue: outbound_rx,
                unacked: Vec::new(),
                first_seq: 1,
                ended: false,
            }),
            preempt: Notify::new(),
            requests_in_flight: AtomicUsize::new(0),
            last_request: Mutex::new(Instant::now()),
            write_timeout: deps.limits.write_timeout,
        });
        self.sessions.insert(sid.clone(), session);
        metrics::gauge!(m::LONGPOLL_SESSIONS).increment(1.0);
        let socket = LpSocket {
            inbound: inbound_rx,
            outbound: PollSender::new(outbound_tx),
            closed: false,
        };
        tracker.spawn(
            async move {
                let _guard = guard;
                session::run(socket, deps, vsn, auth).await;
            }
            .instrument(span),
        );
        Answer::with_token(
            LpStatus::Gone,
            SessionToken::format(&self.instance, &sid, 0),
        )
    }

    /// A GET with a session token.
    pub async fn poll(&self, token: &SessionToken) -> Answer {
        let answer = if token.instance == self.instance {
            self.poll_local(&token.sid, token.ack).await
        } else {
            let id = self.next_request.fetch_add(1, Ordering::Relaxed);
            let wire = Wire::Poll {
                id,
                from: self.instance.clone(),
                sid: token.sid.clone(),
                ack: token.ack,
            };
            self.route(id, &token.instance, &wire).await
        };
        count("poll", &answer);
        answer
    }

    /// A POST (an NDJSON batch of client messages) with a session token.
    pub async fn post(&self, token: &SessionToken, body: Bytes) -> Answer {
        let answer = if token.instance == self.instance {
            self.post_local(&token.sid, &body).await
        } else {
            let id = self.next_request.fetch_add(1, Ordering::Relaxed);
            let wire = Wire::Post {
                id,
                from: self.instance.clone(),
                sid: token.sid.clone(),
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            self.route(id, &token.instance, &wire).await
        };
        count("post", &answer);
        answer
    }

    async fn poll_local(&self, sid: &str, ack: u64) -> Answer {
        let Some(session) = self.sessions.get(sid).map(|s| s.clone()) else {
            return Answer::status(LpStatus::Gone);
        };
        let _in_flight = session.begin();
        session.preempt.notify_waiters();
        let hold = self.config.hold;
        let Ok(mut out) = tokio::time::timeout(hold, session.outgoing.lock()).await else {
            return Answer::with_token(
                LpStatus::NoContent,
                SessionToken::format(&self.instance, sid, ack),
            );
        };
        out.acknowledge(ack);
        if out.unacked.is_empty() && !out.ended {
            // A poll is the client's sign of life (phoenix.js sends no heartbeats over
            // long-poll): it keeps the socket session's idle timer from firing.
            let _ = session.inbound.try_send(Message::Ping(Bytes::new()));
            let preempted = session.preempt.notified();
            tokio::pin!(preempted);
            preempted.as_mut().enable();
            let first = tokio::select! {
                message = out.queue.recv() => message,
                _ = tokio::time::sleep(hold) => {
                    return Answer::with_token(LpStatus::NoContent, SessionToken::format(&self.instance, sid, ack));
                }
                _ = preempted => {
                    return Answer::with_token(LpStatus::NoContent, SessionToken::format(&self.instance, sid, ack));
                }
            };
            out.take_queued(first);
        }
        if out.unacked.is_empty() {
            // Ended, and everything was acknowledged.
            drop(out);
            self.forget(sid);
            return Answer::status(LpStatus::Gone);
        }
        Answer {
            status: LpStatus::Ok,
            token: Some(SessionToken::format(&self.instance, sid, out.last_seq())),
            messages: Some(out.unacked.clone()),
        }
    }

    async fn post_local(&self, sid: &str, body: &[u8]) -> Answer {
        let Some(session) = self.sessions.get(sid).map(|s| s.clone()) else {
            return Answer::status(LpStatus::Gone);
        };
        let _in_flight = session.begin();
        for message in batch_messages(body) {
            match tokio::time::timeout(session.write_timeout, session.inbound.send(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Answer::status(LpStatus::Gone),
                Err(_) => return Answer::status(LpStatus::Error),
            }
        }
        Answer::status(LpStatus::Ok)
    }

    /// Sends a request to the instance that owns the session and waits for its answer.
    async fn route(&self, id: u64, owner: &str, wire: &Wire) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.routed.insert(id, tx);
        let payload = Bytes::from(serde_json::to_vec(wire).expect("wire message serializes"));
        let answer = match self
            .redis
            .publish(format!("{CHANNEL_PREFIX}{owner}"), payload)
            .await
        {
            // Nobody listens there any more: the owner is gone, and the session with it.
            Ok(0) => Answer::status(LpStatus::Gone),
            Ok(_) => match tokio::time::timeout(self.config.hold + ROUTE_MARGIN, rx).await {
                Ok(Ok(answer)) => answer,
                _ => {
                    tracing::warn!(owner, "routed long-poll request unanswered");
                    Answer::status(LpStatus::Error)
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot route long-poll request");
                Answer::status(LpStatus::Error)
            }
        };
        self.routed.remove(&id);
        answer
    }

    /// A message on `prostaff:lp:<this instance>`: a request routed here, or an answer.
    pub fn on_message(self: &Arc<Self>, raw: &[u8]) {
        let wire = match serde_json::from_slice::<Wire>(raw) {
            Ok(wire) => wire,
            Err(error) => {
                tracing::warn!(%error, "undecodable long-poll routing message");
                metrics::counter!(m::LONGPOLL_REQUESTS, "op" => "routed", "outcome" => "undecodable").increment(1);
                return;
            }
        };
        let this = self.clone();
        match wire {
            Wire::Answer { id, answer } => {
                if let Some((_, tx)) = self.routed.remove(&id) {
                    let _ = tx.send(answer);
                }
            }
            Wire::Poll { id, from, sid, ack } => {
                self.runtime.spawn(async move {
                    let answer = this.poll_local(&sid, ack).await;
                    this.answer(&from, id, answer).await;
                });
            }
            Wire::Post {
                id,
                from,
                sid,
                body,
            } => {
                self.runtime.spawn(async move {
                    let answer = this.post_local(&sid, body.as_bytes()).await;
                    this.answer(&from, id, answer).await;
                });
            }
        }
    }

    async fn answer(&self, to: &str, id: u64, answer: Answer) {
        let wire = Wire::Answer { id, answer };
        let payload = Bytes::from(serde_json::to_vec(&wire).expect("wire message serializes"));
        if let Err(error) = self
            .redis
            .publish(format!("{CHANNEL_PREFIX}{to}"), payload)
            .await
        {
            tracing::warn!(%error, "cannot answer routed long-poll request");
        }
    }

    fn forget(&self, sid: &str) {
        if self.sessions.remove(sid).is_some() {
            metrics::gauge!(m::LONGPOLL_SESSIONS).decrement(1.0);
        }
    }

    /// Ends sessions that went `session_timeout` without a request; dropping a session ends
    /// its socket session's input, which closes it like a vanished WebSocket client.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let timeout = self.config.session_timeout;
            let idle: Vec<String> = self
                .sessions
                .iter()
                .filter(|entry| {
                    let session = entry.value();
                    session.requests_in_flight.load(Ordering::Acquire) == 0
                        && session
                            .last_request
                            .lock()
                            .expect("last_request lock")
                            .elapsed()
                            >= timeout
                })
                .map(|entry| entry.key().clone())
                .collect();
            for sid in idle {
                self.forget(&sid);
                metrics::counter!(m::LONGPOLL_EXPIRED).increment(1);
            }
        }
    }
}

fn count(op: &'static str, answer: &Answer) {
    metrics::counter!(m::LONGPOLL_REQUESTS, "op" => op, "outcome" => answer.status.outcome())
        .increment(1);
}

/// The socket session's side of a long-poll session: a `Stream + Sink` of WebSocket messages.
struct LpSocket {
    inbound: mpsc::Receiver<Message>,
    outbound: PollSender<Message>,
    /// The session wrote its close: it then reads until the client's close, which long-poll
    /// has none of, so the input ends here.
    closed: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("long-poll session gone")]
struct LpClosed;

impl crate::phoenix::session::TransportError for LpClosed {
    fn close_code(&self) -> Option<(u16, &'static str)> {
        None
    }
}

impl Stream for LpSocket {
    type Item = Result<Message, LpClosed>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed {
            return Poll::Ready(None);
        }
        self.inbound.poll_recv(cx).map(|message| message.map(Ok))
    }
}

/// Long-poll answers are messages: nothing to reserve.
impl ReserveWrite for LpSocket {}

impl Sink<Outbound> for LpSocket {
    type Error = LpClosed;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), LpClosed>> {
        self.outbound.poll_reserve(cx).map_err(|_| LpClosed)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outbound) -> Result<(), LpClosed> {
        // Long-poll answers carry messages: a broadcast becomes one here.
        let message = item.into_message();
        if matches!(message, Message::Close(_)) {
            self.closed = true;
        }
        self.outbound.send_item(message).map_err(|_| LpClosed)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), LpClosed>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), LpClosed>> {
        self.outbound.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_the_status_as_the_number_phoenix_js_reads() {
        let answer = Answer::with_token(LpStatus::NoContent, "lp.a.b.3".into());
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(text, r#"{"status":204,"token":"lp.a.b.3"}"#);
        assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), answer);
        for status in [
            LpStatus::Ok,
            LpStatus::Gone,
            LpStatus::Forbidden,
            LpStatus::Error,
        ] {
            assert_eq!(LpStatus::try_from(status.code()), Ok(status));
        }
        assert!(serde_json::from_str::<Answer>(r#"{"status":299}"#).is_err());
    }

    #[test]
    fn session_tokens_round_trip_and_refuse_garbage() {
        let text = SessionToken::format("00ab12cd34ef", &"f".repeat(32), 42);
        let token = SessionToken::parse(&text).unwrap();
        assert_eq!(token.instance, "00ab12cd34ef");
        assert_eq!(token.ack, 42);
        assert_eq!(SessionToken::format(&token.instance, &token.sid, 42), text);
        for bad in [
            "",
            "lp.",
            "eyJhbGciOiJIUzI1NiJ9.e30.sig",
            "lp.00ab.short.1",
            &format!("lp.00ab.{}.x", "f".repeat(32)),
            &format!("lp.00ab.{}.1.2", "f".repeat(32)),
            &format!("lp.zz.{}.1", "f".repeat(32)),
            &format!("lp.{}.{}.1", "a".repeat(17), "f".repeat(32)),
        ] {
            assert_eq!(SessionToken::parse(bad), None, "{bad}");
        }
    }

    fn outgoing(messages: &[&str]) -> (Outgoing, mpsc::Sender<Message>) {
        let (tx, rx) = mpsc::channel(16);
        for m in messages {
            tx.try_send(Message::Text((*m).into())).unwrap();
        }
        let out = Outgoing {
            queue: rx,
            unacked: Vec::new(),
            first_seq: 1,
            ended: false,
        };
        (out, tx)
    }

    #[test]
    fn unacknowledged_messages_are_handed_out_again_until_acknowledged() {
        let (mut out, tx) = outgoing(&["a", "b"]);
        let first = out_first(&mut out);
        assert!(out.take_queued(first));
        assert_eq!(out.unacked, ["a", "b"]);
        assert_eq!(out.last_seq(), 2);
        // The answer was lost: the client polls again with ack 0.
        out.acknowledge(0);
        assert_eq!(out.unacked, ["a", "b"]);
        out.acknowledge(2);
        assert!(out.unacked.is_empty());
        tx.try_send(Message::Text("c".into())).unwrap();
        tx.try_send(Message::Close(None)).unwrap();
        let first = out_first(&mut out);
        assert!(out.take_queued(first));
        assert_eq!(out.unacked, ["c"]);
        assert_eq!(out.last_seq(), 3);
        assert!(out.ended);
        // An ack beyond what was handed out (forged) acknowledges what there is, no more.
        out.acknowledge(99);
        assert!(out.unacked.is_empty());
        assert_eq!(out.first_seq, 4);
    }

    fn out_first(out: &mut Outgoing) -> Option<Message> {
        out.queue.try_recv().ok()
    }
}
