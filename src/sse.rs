//! `GET /api/realtime/stream?topics=a,b`: Server-Sent Events, the transport of the realtime
//! service this hub also replaces, with `Last-Event-ID` resume from the same per-topic history
//! the Phoenix sockets recover from.
//!
//! A stream is a subscriber like a socket: it gets an [`Outbox`](crate::hub::Outbox) in the hub (same bound, same
//! drop policy, same `events_dropped` notice and metrics), the same join rules per topic, and
//! ends on shutdown. Each event's `id:` is a resume token covering every topic of the stream
//! (base64url of `{"topic": "<epoch>:<offset>", …}`); a client that reconnects with it as
//! `Last-Event-ID` (or `?lastEventId=`) gets what it missed, in order, then live events.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::Stream;
use serde_json::json;
use tokio::sync::mpsc;

use crate::auth::Authenticated;
use crate::history::{Entry, Position};
use crate::hub::Drained;
use crate::limits::MAX_TOPIC_BYTES;
use crate::subscriber::{JoinRefusal, JoinRequest, SessionDeps, Subscriber, Transport};
use crate::topic::Topic;

/// Comment sent when the stream is idle, so proxies keep it open.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// The reconnect delay suggested to clients (`retry:`), sent once.
pub const RETRY: Duration = Duration::from_secs(3);
/// Events buffered between the stream task and the HTTP body; beyond this the outbox holds them
/// (and drops the oldest when full, like a socket's).
const BODY_BUFFER: usize = 32;

/// Why a stream request was refused (the HTTP layer maps these to 400/401/403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamRefusal {
    #[error("topics must be a non-empty comma list of at most {0} topics")]
    BadTopics(usize),
    #[error("unmatched topic")]
    UnmatchedTopic,
    #[error("not allowed to join one of the topics")]
    Forbidden,
    #[error("malformed Last-Event-ID")]
    BadResumeToken,
    #[error("history unavailable; retry with the same Last-Event-ID")]
    Unavailable,
    #[error("{0}")]
    BadTypes(#[from] crate::type_filter::InvalidFilter),
}

/// The topics of a stream request, authorized for `auth`.
pub fn parse_topics(
    list: &str,
    auth: &Authenticated,
    max: usize,
) -> Result<Vec<String>, StreamRefusal> {
    let mut topics: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    topics.dedup();
    if topics.is_empty() || topics.len() > max || topics.iter().any(|t| t.len() > MAX_TOPIC_BYTES) {
        return Err(StreamRefusal::BadTopics(max));
    }
    for topic in &topics {
        let family = Topic::parse(topic).ok_or(StreamRefusal::UnmatchedTopic)?;
        if !family.may_join(&auth.identity) {
            return Err(StreamRefusal::Forbidden);
        }
    }
    Ok(topics)
}

/// Encodes the positions of every topic as one resume token.
pub fn resume_token(positions: &BTreeMap<String, Position>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = positions
        .iter()
        .map(|(topic, position)| (topic.clone(), json!(position.to_string())))
        .collect();
    URL_SAFE_NO_PAD.encode(serde_json::Value::Object(map).to_string())
}

/// Decodes a resume token; topics it does not name start without `since`.
pub fn parse_resume_token(token: &str) -> Result<BTreeMap<String, Position>, StreamRefusal> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| StreamRefusal::BadResumeToken)?;
    let serde_json::Value::Object(map) =
        serde_json::from_slice(&bytes).map_err(|_| StreamRefusal::BadResumeToken)?
    else {
        return Err(StreamRefusal::BadResumeToken);
    };
    map.into_iter()
        .map(|(topic, value)| {
            let position = value
                .as_str()
                .and_then(Position::parse)
                .ok_or(StreamRefusal::BadResumeToken)?;
            Ok((topic, position))
        })
        .collect()
}

/// An SSE event name must be one line; anything else becomes the default `message`.
fn event_name(name: &str) -> &str {
    if name.is_empty() || name.contains(['\n', '\r']) {
        "message"
    } else {
        name
    }
}

struct StreamTask {
    /// The stream's registration and topics; released on drop (a client that goes away, a
    /// panic, shutdown).
    sub: Subscriber,
    /// The position of every topic as the stream's resume token names it.
    positions: BTreeMap<String, Position>,
    tx: mpsc::Sender<Event>,
}

impl StreamTask {
    fn event(&self, name: &str, payload: &[u8]) -> Event {
        let mut event = Event::default()
            .event(event_name(name))
            .data(String::from_utf8_lossy(payload));
        if !self.positions.is_empty() {
            event = event.id(resume_token(&self.positions));
        }
        event
    }

    async fn send(&mut self, name: &str, payload: &[u8]) -> bool {
        let event = self.event(name, payload);
        self.tx.send(event).await.is_ok()
    }

    async fn run(mut self, missed: Vec<(String, Entry)>, expires_at: Option<u64>) {
        let mut ok = true;
        for (topic, entry) in missed {
            if !ok {
                break;
            }
            self.positions.insert(topic, entry.position);
            ok = self.send(&entry.event, &entry.payload).await;
        }
        let expiry = expires_at.map(crate::auth::expiry_instant);
        let mut drained = Drained::default();
        let outbox = self.sub.outbox().clone();
        while ok {
            tokio::select! {
                _ = outbox.notified() => {}
                _ = self.tx.closed() => break,
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)), if expiry.is_some() => {
                    metrics::counter!(crate::metrics::SOCKET_CLOSES, "reason" => "sse_token_expired").increment(1);
                    break;
                }
            }
            outbox.drain(256, &mut drained);
            let revoked = drained.revoked.drain(..).any(|scope| match scope {
                crate::auth::Scope::All => true,
                crate::auth::Scope::Org(org) => self
                    .sub
                    .channels()
                    .any(|(_, c)| c.family.org() == Some(org.as_str())),
            });
            if revoked {
                // The stream ends; a reconnect is refused (403) for what was revoked.
                metrics::counter!(crate::metrics::SOCKET_CLOSES, "reason" => "sse_revoked")
                    .increment(1);
                break;
            }
            for (topic, count) in std::mem::take(&mut drained.dropped) {
                let payload = json!({"topic": &*topic, "count": count}).to_string();
                ok = ok && self.send("events_dropped", payload.as_bytes()).await;
            }
            for frame in std::mem::take(&mut drained.frames) {
                if !ok {
                    break;
                }
                if frame.gap && self.sub.contains(&frame.topic) {
                    // The stream ends where the gap starts: the browser resumes with the last
                    // id it has and learns `recovered: false`.
                    ok = false;
                    break;
                }
                // Skip what the stream has already seen (the replay's overlap with live
                // frames, a re-published event) and frames of no joined topic.
                let Some(channel) = self.sub.for_frame(&frame.topic) else {
                    continue;
                };
                if let Some(position) = &frame.position {
                    if !channel.admit(position) {
                        continue;
                    }
                    // A filtered broadcast moves the token too: a resume skips it again.
                    self.positions
                        .insert(frame.topic.to_string(), position.clone());
                }
                if !channel.wants(&frame.event) {
                    metrics::counter!(crate::metrics::TYPE_FILTERED).increment(1);
                    continue;
                }
                let payload = frame.payload().clone();
                ok = self.send(&frame.event, &payload).await;
            }
            if drained.closing.take().is_some() {
                break;
            }
        }
        // `self.sub` drops here: unsubscribed, unregistered, gauge down.
    }
}

/// Opens a stream: subscribes first, then reads each topic's position (and what a resume token
/// says was missed), so nothing published meanwhile is lost; returns the SSE body and the task
/// that feeds it (the caller tracks it for shutdown). A resume while the history cannot be read
/// is refused with [`StreamRefusal::Unavailable`] (503: the browser retries with the same
/// `Last-Event-ID`). Dropping the returned future, or this one, releases everything.
pub async fn open(
    deps: Arc<SessionDeps>,
    auth: Authenticated,
    topics: Vec<String>,
    resume: BTreeMap<String, Position>,
    types: Option<crate::type_filter::TypeFilter>,
) -> Result<
    (
        Sse<impl Stream<Item = Result<Event, Infallible>>>,
        impl std::future::Future<Output = ()>,
    ),
    StreamRefusal,
> {
    let mut sub = Subscriber::register(deps, Transport::Stream, &auth.identity);
    let mut positions = BTreeMap::new();
    let mut missed = Vec::new();
    let mut recovered = true;
    for topic in &topics {
        let Some(family) = Topic::parse(topic) else {
            return Err(StreamRefusal::UnmatchedTopic);
        };
        let since = resume.get(topic);
        let joined = sub
            .join(JoinRequest {
                topic,
                family,
                join_ref: None,
                since,
                identity: &auth.identity,
                reply: false,
                presence: false,
                types: types.clone(),
            })
            .await
            .map_err(|JoinRefusal::Unavailable| StreamRefusal::Unavailable)?;
        match (joined.recovered, since) {
            // The replay advances the token from the resume point.
            (Some(true), Some(since)) => {
                positions.insert(topic.clone(), since.clone());
                missed.extend(joined.missed.into_iter().map(|e| (topic.clone(), e)));
            }
            (Some(false), _) => recovered = false,
            _ => {}
        }
        if let (false, Some(position)) = (positions.contains_key(topic), joined.position) {
            positions.insert(topic.clone(), position);
        }
    }
    let (tx, rx) = mpsc::channel(BODY_BUFFER);
    // The first event: the retry hint, the starting token, and whether a resume succeeded.
    let hello = json!({"topics": topics, "recovered": recovered});
    let mut first = Event::default()
        .event("stream_started")
        .retry(RETRY)
        .data(hello.to_string());
    if !positions.is_empty() {
        first = first.id(resume_token(&positions));
    }
    let _ = tx.try_send(first);
    let task = StreamTask { sub, positions, tx };
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"));
    Ok((sse, task.run(missed, auth.expires_at)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;

    fn user(org: &str) -> Authenticated {
        Authenticated {
            identity: Identity::User {
                user_id: "u1".into(),
                org_id: org.into(),
            },
            expires_at: None,
            issued_at_ms: None,
        }
    }

    #[test]
    fn topics_follow_the_socket_join_rules() {
        assert_eq!(
            parse_topics("org_events:o1, notifications:u1", &user("o1"), 10).unwrap(),
            ["org_events:o1", "notifications:u1"]
        );
        assert_eq!(
            parse_topics("org_events:o2", &user("o1"), 10),
            Err(StreamRefusal::Forbidden)
        );
        assert_eq!(
            parse_topics("rooms:1", &user("o1"), 10),
            Err(StreamRefusal::UnmatchedTopic)
        );
        assert!(matches!(
            parse_topics("", &user("o1"), 10),
            Err(StreamRefusal::BadTopics(_))
        ));
        assert!(matches!(
            parse_topics("tournament:1,tournament:2", &user("o1"), 1),
            Err(StreamRefusal::BadTopics(_))
        ));
    }

    #[test]
    fn resume_tokens_round_trip_and_reject_garbage() {
        let mut positions = BTreeMap::new();
        positions.insert(
            "org_events:o1".to_string(),
            Position::parse("ab:3").unwrap(),
        );
        positions.insert("tournament:9".to_string(), Position::parse("cd:0").unwrap());
        let token = resume_token(&positions);
        assert!(!token.contains(['\n', ':']));
        assert_eq!(parse_resume_token(&token).unwrap(), positions);
        assert_eq!(
            parse_resume_token("%%%"),
            Err(StreamRefusal::BadResumeToken)
        );
        let not_positions = URL_SAFE_NO_PAD.encode(r#"{"t":"nope"}"#);
        assert_eq!(
            parse_resume_token(&not_positions),
            Err(StreamRefusal::BadResumeToken)
        );
    }

    #[test]
    fn event_names_stay_on_one_line() {
        assert_eq!(event_name("player.transferred"), "player.transferred");
        assert_eq!(event_name("a\nid: forged"), "message");
    }
}
