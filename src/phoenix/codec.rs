//! Phoenix Channels serializers: V1 (JSON objects), V2 (JSON arrays) and V2 binary frames.
//!
//! Decoding turns client frames into [`Inbound`]; encoding builds server frames. Refs are decimal
//! strings on the wire; integer refs from non-phoenix.js clients are accepted and echoed back as
//! strings. Nothing here does I/O.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;

use crate::history::Position;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Serializer version negotiated from the `vsn` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    /// Missing → V1; `1.x` → V1; `2.x` → V2; anything else is refused.
    pub fn from_param(vsn: Option<&str>) -> Option<Vsn> {
        match vsn {
            None => Some(Vsn::V1),
            Some(v) if v == "1" || v.starts_with("1.") => Some(Vsn::V1),
            Some(v) if v == "2" || v.starts_with("2.") => Some(Vsn::V2),
            Some(_) => None,
        }
    }
}

/// The payload of a client frame.
#[derive(Debug)]
pub enum InboundPayload {
    Json(Box<RawValue>),
    Binary(Bytes),
}

/// One decoded client frame.
#[derive(Debug)]
pub struct Inbound {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: InboundPayload,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame is not a valid Phoenix message")]
    Malformed,
    #[error("binary frame is truncated or has an unknown kind")]
    BadBinary,
    #[error("binary frames need serializer 2.0.0")]
    BinaryOnV1,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RefValue {
    Text(String),
    Integer(i64),
}

impl From<RefValue> for String {
    fn from(value: RefValue) -> String {
        match value {
            RefValue::Text(text) => text,
            RefValue::Integer(n) => n.to_string(),
        }
    }
}

#[derive(Deserialize)]
struct V2Frame(
    Option<RefValue>,
    Option<RefValue>,
    String,
    String,
    Box<RawValue>,
);

#[derive(Deserialize)]
struct V1Frame {
    topic: String,
    event: String,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(rename = "ref", default)]
    msg_ref: Option<RefValue>,
    #[serde(default)]
    join_ref: Option<RefValue>,
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_string()).expect("valid JSON")
}

/// Decodes a text frame of either serializer.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<Inbound, DecodeError> {
    match vsn {
        Vsn::V2 => {
            let V2Frame(join_ref, msg_ref, topic, event, payload) =
                serde_json::from_str(text).map_err(|_| DecodeError::Malformed)?;
            Ok(Inbound {
                join_ref: join_ref.map(String::from),
                msg_ref: msg_ref.map(String::from),
                topic,
                event,
                payload: InboundPayload::Json(payload),
            })
        }
        Vsn::V1 => {
            let frame: V1Frame = serde_json::from_str(text).map_err(|_| DecodeError::Malformed)?;
            Ok(Inbound {
                join_ref: frame.join_ref.map(String::from),
                msg_ref: frame.msg_ref.map(String::from),
                topic: frame.topic,
                event: frame.event,
                payload: InboundPayload::Json(frame.payload.unwrap_or_else(empty_object)),
            })
        }
    }
}

/// Recognises phoenix.js's V2 heartbeat `[null,"<ref>","phoenix","heartbeat",{}]` without a
/// JSON parse (it is most of the traffic of an idle socket) and returns its ref. Anything else,
/// including heartbeats spelled differently, returns `None` and takes the general decoder.
pub fn heartbeat_ref(vsn: Vsn, text: &str) -> Option<&str> {
    if vsn != Vsn::V2 {
        return None;
    }
    let msg_ref = text
        .strip_prefix("[null,\"")?
        .strip_suffix("\",\"phoenix\",\"heartbeat\",{}]")?;
    let plain = !msg_ref.is_empty()
        && msg_ref.len() <= 32
        && msg_ref.bytes().all(|b| b.is_ascii_alphanumeric());
    plain.then_some(msg_ref)
}

/// Decodes a V2 binary client push: `0|jrLen|refLen|topicLen|evLen|jr|ref|topic|event|data`.
pub fn decode_binary(vsn: Vsn, frame: &Bytes) -> Result<Inbound, DecodeError> {
    if vsn == Vsn::V1 {
        return Err(DecodeError::BinaryOnV1);
    }
    if frame.len() < 5 || frame[0] != 0 {
        return Err(DecodeError::BadBinary);
    }
    let lengths = [
        frame[1] as usize,
        frame[2] as usize,
        frame[3] as usize,
        frame[4] as usize,
    ];
    let header_end = 5 + lengths.iter().sum::<usize>();
    if frame.len() < header_end {
        return Err(DecodeError::BadBinary);
    }
    let mut offset = 5;
    let mut fields = lengths.iter().map(|len| {
        let field = &frame[offset..offset + len];
        offset += len;
        std::str::from_utf8(field).map(str::to_string)
    });
    let mut next = || {
        fields
            .next()
            .expect("four fields")
            .map_err(|_| DecodeError::BadBinary)
    };
    let (join_ref, msg_ref, topic, event) = (next()?, next()?, next()?, next()?);
    Ok(Inbound {
        join_ref: (!join_ref.is_empty()).then_some(join_ref),
        msg_ref: (!msg_ref.is_empty()).then_some(msg_ref),
        topic,
        event,
        payload: InboundPayload::Binary(frame.slice(header_end..)),
    })
}

fn push_json_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
}

fn push_ref(out: &mut Vec<u8>, reference: Option<&str>) {
    match reference {
        Some(text) => push_json_str(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

/// Encodes a text message `[join_ref, ref, topic, event, payload]` (V2) or
/// `{"topic","event","payload","ref"}` (V1). `payload` must be valid JSON.
pub fn encode_message(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &[u8],
) -> Utf8Bytes {
    let mut out = Vec::with_capacity(payload.len() + topic.len() + event.len() + 32);
    match vsn {
        Vsn::V2 => {
            out.push(b'[');
            push_ref(&mut out, join_ref);
            out.push(b',');
            push_ref(&mut out, msg_ref);
            out.push(b',');
            push_json_str(&mut out, topic);
            out.push(b',');
            push_json_str(&mut out, event);
            out.push(b',');
            out.extend_from_slice(payload);
            out.push(b']');
        }
        Vsn::V1 => {
            out.extend_from_slice(b"{\"topic\":");
            push_json_str(&mut out, topic);
            out.extend_from_slice(b",\"event\":");
            push_json_str(&mut out, event);
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(payload);
            out.extend_from_slice(b",\"ref\":");
            push_ref(&mut out, msg_ref);
            out.push(b'}');
        }
    }
    Utf8Bytes::try_from(out).expect("encoder writes UTF-8 only")
}

/// Encodes a `phx_reply` with `{"status":…,"response":…}`.
pub fn encode_reply(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    status: ReplyStatus,
    response: &[u8],
) -> Utf8Bytes {
    let mut payload = Vec::with_capacity(response.len() + 32);
    payload.extend_from_slice(b"{\"status\":\"");
    payload.extend_from_slice(status.as_str().as_bytes());
    payload.extend_from_slice(b"\",\"response\":");
    payload.extend_from_slice(response);
    payload.push(b'}');
    encode_message(vsn, join_ref, msg_ref, topic, "phx_reply", &payload)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    Ok,
    Error,
}

impl ReplyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStatus::Ok => "ok",
            ReplyStatus::Error => "error",
        }
    }
}

fn binary_field(out: &mut Vec<u8>, field: &str) {
    out.extend_from_slice(&field.as_bytes()[..field.len().min(255)]);
}

fn binary_len(field: &str) -> u8 {
    field.len().min(255) as u8
}

/// Binary server push, kind 0: `0|jrLen|topicLen|evLen|jr|topic|event|data`.
pub fn encode_binary_push(join_ref: &str, topic: &str, event: &str, data: &[u8]) -> Bytes {
    let mut out = vec![
        0,
        binary_len(join_ref),
        binary_len(topic),
        binary_len(event),
    ];
    for field in [join_ref, topic, event] {
        binary_field(&mut out, field);
    }
    out.extend_from_slice(data);
    out.into()
}

/// Binary reply, kind 1: `1|jrLen|refLen|topicLen|statusLen|jr|ref|topic|status|data`.
pub fn encode_binary_reply(
    join_ref: Option<&str>,
    msg_ref: &str,
    topic: &str,
    status: ReplyStatus,
    data: &[u8],
) -> Bytes {
    let join_ref = join_ref.unwrap_or("");
    let status = status.as_str();
    let mut out = vec![
        1,
        binary_len(join_ref),
        binary_len(msg_ref),
        binary_len(topic),
        binary_len(status),
    ];
    for field in [join_ref, msg_ref, topic, status] {
        binary_field(&mut out, field);
    }
    out.extend_from_slice(data);
    out.into()
}

/// Binary broadcast, kind 2: `2|topicLen|evLen|topic|event|data`.
pub fn encode_binary_broadcast(topic: &str, event: &str, data: &[u8]) -> Bytes {
    let mut out = vec![2, binary_len(topic), binary_len(event)];
    for field in [topic, event] {
        binary_field(&mut out, field);
    }
    out.extend_from_slice(data);
    out.into()
}

/// A broadcast `[null,null,topic,event,payload]`, encoded once per serializer and shared by
/// every subscriber (cloning a [`Utf8Bytes`] only bumps a reference count).
#[derive(Debug)]
pub struct BroadcastFrame {
    pub topic: Arc<str>,
    pub event: Box<str>,
    /// The broadcast's place in its topic's history, sent in the `ref` slot.
    pub position: Option<Position>,
    pub published_at: std::time::Instant,
    /// Not a broadcast: the topic's stream has a gap this instance cannot fill (its Redis link
    /// was away longer than the history covers). A socket answers it with `phx_error` on the
    /// channel (phoenix.js rejoins with its `since` and learns `recovered: false`); an SSE
    /// stream ends (the browser resumes with `Last-Event-ID`).
    pub gap: bool,
    payload: Bytes,
    v2: Utf8Bytes,
    v1: OnceLock<Utf8Bytes>,
}

impl BroadcastFrame {
    /// `payload` must be valid JSON text. The V2 text is encoded here, V1 on first use. The
    /// position, when there is one, travels in the `ref` slot (`[null,"<epoch>:<offset>",…]`),
    /// so the payload stays byte-for-byte as published.
    pub fn new(
        topic: Arc<str>,
        event: &str,
        payload: Bytes,
        position: Option<Position>,
        published_at: std::time::Instant,
    ) -> Arc<Self> {
        let position_text = position.as_ref().map(Position::to_string);
        let v2 = encode_message(
            Vsn::V2,
            None,
            position_text.as_deref(),
            &topic,
            event,
            &payload,
        );
        Arc::new(BroadcastFrame {
            topic,
            event: event.into(),
            position,
            published_at,
            gap: false,
            payload,
            v2,
            v1: OnceLock::new(),
        })
    }

    /// The gap notice of `topic` (see [`BroadcastFrame::gap`]).
    pub fn gap(topic: Arc<str>) -> Arc<Self> {
        let v2 = encode_message(Vsn::V2, None, None, &topic, "phx_error", b"{}");
        Arc::new(BroadcastFrame {
            topic,
            event: "phx_error".into(),
            position: None,
            published_at: std::time::Instant::now(),
            gap: true,
            payload: Bytes::from_static(b"{}"),
            v2,
            v1: OnceLock::new(),
        })
    }

    /// The payload exactly as published.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The broadcast's text in `vsn` (a reference-count bump, no copy).
    pub fn text(&self, vsn: Vsn) -> Utf8Bytes {
        let text = match vsn {
            Vsn::V2 => &self.v2,
            Vsn::V1 => self.v1.get_or_init(|| {
                let position = self.position.as_ref().map(Position::to_string);
                encode_message(
                    Vsn::V1,
                    None,
                    position.as_deref(),
                    &self.topic,
                    &self.event,
                    &self.payload,
                )
            }),
        };
        text.clone()
    }
}

/// The V2 text is what a WebSocket of the default serializer copies straight from the shared
/// frame into its write buffer ([`super::ws::Outbound::Shared`]).
impl super::ws::SharedText for BroadcastFrame {
    fn text(&self) -> &str {
        &self.v2
    }

    fn utf8_bytes(&self) -> Utf8Bytes {
        self.v2.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsn_negotiation() {
        assert_eq!(Vsn::from_param(None), Some(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("2.0.0")), Some(Vsn::V2));
        assert_eq!(Vsn::from_param(Some("1.0.0")), Some(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("9.0.0")), None);
    }

    #[test]
    fn decode_v2_and_v1() {
        let msg = decode_text(Vsn::V2, r#"["1","2","room:1","phx_join",{"a":1}]"#).unwrap();
        assert_eq!(
            (msg.join_ref.as_deref(), msg.msg_ref.as_deref()),
            (Some("1"), Some("2"))
        );
        assert_eq!(
            (msg.topic.as_str(), msg.event.as_str()),
            ("room:1", "phx_join")
        );
        let heartbeat = decode_text(Vsn::V2, r#"[null,"5","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(heartbeat.join_ref, None);
        let numeric = decode_text(Vsn::V2, r#"[1,2,"t","e",{}]"#).unwrap();
        assert_eq!(numeric.msg_ref.as_deref(), Some("2"));
        let v1 = decode_text(
            Vsn::V1,
            r#"{"topic":"t","event":"e","payload":{"x":1},"ref":"3"}"#,
        )
        .unwrap();
        assert_eq!((v1.msg_ref.as_deref(), v1.join_ref), (Some("3"), None));
        for bad in [
            "",
            "{}",
            "[1,2,3]",
            r#"["1","2","t","e"]"#,
            r#"[true,"2","t","e",{}]"#,
            "[null,null,5,\"e\",{}]",
        ] {
            assert_eq!(
                decode_text(Vsn::V2, bad).unwrap_err(),
                DecodeError::Malformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn heartbeat_fast_path() {
        assert_eq!(
            heartbeat_ref(Vsn::V2, r#"[null,"17","phoenix","heartbeat",{}]"#),
            Some("17")
        );
        assert_eq!(
            heartbeat_ref(Vsn::V1, r#"[null,"17","phoenix","heartbeat",{}]"#),
            None
        );
        for other in [
            r#"[null,"1\"","phoenix","heartbeat",{}]"#,
            r#"[null,"","phoenix","heartbeat",{}]"#,
            r#"[null, "1","phoenix","heartbeat",{}]"#,
            r#"["2","1","phoenix","heartbeat",{}]"#,
            r#"[null,"1","phoenix","heartbeat",{"a":1}]"#,
        ] {
            assert_eq!(heartbeat_ref(Vsn::V2, other), None, "{other}");
        }
    }

    #[test]
    fn encode_text_frames() {
        let reply = encode_reply(
            Vsn::V2,
            Some("1"),
            Some("2"),
            "t\"x",
            ReplyStatus::Ok,
            b"{}",
        );
        assert_eq!(
            reply.as_str(),
            r#"["1","2","t\"x","phx_reply",{"status":"ok","response":{}}]"#
        );
        let v1 = encode_message(Vsn::V1, Some("1"), Some("2"), "t", "e", b"{}");
        assert_eq!(
            v1.as_str(),
            r#"{"topic":"t","event":"e","payload":{},"ref":"2"}"#
        );
        let frame = BroadcastFrame::new(
            "t".into(),
            "e",
            Bytes::from_static(b"{\"k\":1}"),
            None,
            std::time::Instant::now(),
        );
        assert_eq!(
            frame.text(Vsn::V2).as_str(),
            r#"[null,null,"t","e",{"k":1}]"#
        );
        assert_eq!(
            frame.text(Vsn::V1).as_str(),
            r#"{"topic":"t","event":"e","payload":{"k":1},"ref":null}"#
        );
        let positioned = BroadcastFrame::new(
            "t".into(),
            "e",
            Bytes::from_static(b"{}"),
            Position::parse("ab12:7"),
            std::time::Instant::now(),
        );
        assert_eq!(
            positioned.text(Vsn::V2).as_str(),
            r#"[null,"ab12:7","t","e",{}]"#
        );
        assert_eq!(
            positioned.text(Vsn::V1).as_str(),
            r#"{"topic":"t","event":"e","payload":{},"ref":"ab12:7"}"#
        );
    }

    #[test]
    fn binary_round_trip() {
        let mut client = vec![0u8, 1, 2, 6, 5];
        client.extend_from_slice(b"112room:1event");
        client.extend_from_slice(&[0xde, 0xad]);
        let msg = decode_binary(Vsn::V2, &Bytes::from(client)).unwrap();
        assert_eq!(
            (
                msg.join_ref.as_deref(),
                msg.msg_ref.as_deref(),
                msg.topic.as_str(),
                msg.event.as_str()
            ),
            (Some("1"), Some("12"), "room:1", "event")
        );
        assert!(matches!(msg.payload, InboundPayload::Binary(ref b) if b[..] == [0xde, 0xad]));
        assert_eq!(
            decode_binary(Vsn::V2, &Bytes::from_static(&[0, 9, 9, 9, 9, 1])).unwrap_err(),
            DecodeError::BadBinary
        );
        assert_eq!(
            decode_binary(Vsn::V1, &Bytes::from_static(&[0])).unwrap_err(),
            DecodeError::BinaryOnV1
        );

        assert_eq!(
            &encode_binary_push("1", "t", "e", b"d")[..],
            b"\x00\x01\x01\x011ted"
        );
        assert_eq!(
            &encode_binary_reply(None, "7", "t", ReplyStatus::Ok, b"d")[..],
            b"\x01\x00\x01\x01\x027tokd"
        );
        assert_eq!(
            &encode_binary_broadcast("t", "e", b"d")[..],
            b"\x02\x01\x01ted"
        );
    }
}
