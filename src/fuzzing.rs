//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run by `fuzz/run.sh`), one per
//! parser that reads network bytes. The targets and the `fuzz_regressions` test (which
//! replays every kept input under `fuzz/regressions/<target>/` on each `cargo test`) call the
//! same functions, so a crash found once is checked forever. Each asserts the parser's
//! invariants besides "no panic".

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use axum::extract::ws::Message;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::phoenix::codec::{decode_text, InboundPayload, Vsn};
use crate::phoenix::ws::WsStream;

/// An in-memory connection: reads hand out `input` in the given chunk sizes, then EOF;
/// writes are kept.
struct Chunked<'a> {
    input: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
    written: Vec<u8>,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = match self.sizes.get(self.turn % self.sizes.len().max(1)) {
            Some(&size) => usize::from(size).max(1),
            None => self.input.len(),
        };
        self.turn += 1;
        let n = size.min(self.input.len()).min(buf.remaining());
        let (now, rest) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The WebSocket frame reader on an arbitrary byte stream in arbitrary chunkings. Input:
/// `[n, n chunk sizes…, max message selector, bytes…]`.
pub fn ws_frames(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, rest) = rest.split_at(n);
    let Some((&selector, input)) = rest.split_first() else {
        return;
    };
    let max_message = [0usize, 1, 125, 126, 4096, 65536][usize::from(selector % 6)];
    let io = Chunked {
        input,
        sizes,
        turn: 0,
        written: Vec::new(),
    };
    // Each frame costs at least two bytes and an empty read ends the stream: bounded.
    let limit = input.len() + 2;
    let mut ws = WsStream::new(io, max_message);
    let mut cx = Context::from_waker(Waker::noop());
    let mut failed = false;
    for _ in 0..limit {
        match Pin::new(&mut ws).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(message))) => {
                assert!(!failed, "nothing is read after an error");
                match &message {
                    Message::Text(text) => assert!(text.len() <= max_message),
                    Message::Binary(data) => assert!(data.len() <= max_message),
                    Message::Close(Some(frame)) => {
                        assert!(crate::phoenix::ws::is_valid_close_code(frame.code))
                    }
                    _ => {}
                }
            }
            Poll::Ready(Some(Err(error))) => {
                assert!(!failed, "one error ends the stream");
                failed = true;
                if let Some((code, _)) = error.close_code() {
                    assert!(matches!(code, 1002 | 1007 | 1009), "{code}");
                }
            }
            Poll::Ready(None) => return,
            Poll::Pending => panic!("an in-memory stream is never pending"),
        }
    }
}

/// A long-poll request: the session token (first line) and the NDJSON body (the rest), each
/// message decoded as the session would; acknowledgements of any value on a session's queue.
pub fn longpoll(data: &[u8]) {
    let (first, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let token_text = String::from_utf8_lossy(first);
    if crate::longpoll::SessionToken::parse(&token_text).is_some() {
        assert!(token_text.starts_with(crate::longpoll::TOKEN_PREFIX));
    }
    let mut acks = Vec::new();
    for message in crate::longpoll::batch_messages(body) {
        match message {
            Message::Text(text) => {
                assert!(!text.is_empty() && !text.contains('\n'));
                let _ = decode_text(Vsn::V2, text.as_str());
                let _ = decode_text(Vsn::V1, text.as_str());
            }
            Message::Binary(line) => assert!(std::str::from_utf8(&line).is_err()),
            _ => unreachable!("a batch yields text or binary messages"),
        }
    }
    for chunk in body.chunks(8) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        acks.push(u64::from_le_bytes(bytes));
    }
    crate::longpoll::replay_acknowledgements(&acks);
}

/// What a client resumes from and filters by: the join parameters (`since`, `types`),
/// positions, SSE resume tokens and `?types=`.
pub fn resume(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = serde_json::value::RawValue::from_string(text.to_string()) {
        if let Ok(params) = crate::phoenix::session::join_params(&InboundPayload::Json(raw)) {
            if let Some(position) = params.since {
                assert_eq!(
                    crate::history::Position::parse(&position.to_string()),
                    Some(position)
                );
            }
            if let Some(filter) = params.types {
                // The hub's own pushes pass every filter.
                assert!(filter.admits("queue_update") && filter.admits("phx_close"));
            }
        }
    }
    if let Some(position) = crate::history::Position::parse(text) {
        assert_eq!(
            crate::history::Position::parse(&position.to_string()),
            Some(position)
        );
    }
    if let Ok(Some(filter)) = crate::type_filter::TypeFilter::from_query(Some(text)) {
        assert!(filter.admits("presence_diff"));
    }
    if let Ok(positions) = crate::sse::parse_resume_token(text) {
        let again = crate::sse::resume_token(&positions);
        assert_eq!(crate::sse::parse_resume_token(&again), Ok(positions));
    }
}

/// An envelope from Redis or an HTTP body: decoding, routing, the catalogue's schema check, and
/// completion of HTTP-posted bodies.
pub fn envelope(data: &[u8]) {
    match crate::envelope::decode(bytes::Bytes::copy_from_slice(data)) {
        Ok(envelope) => {
            assert!(!crate::router::route(&envelope).topics.is_empty());
            let catalogue = crate::catalogue::Catalogue::builtin().expect("catalogue loads");
            if let crate::catalogue::Check::Invalid(violation) =
                catalogue.check(&envelope.event_type, &envelope.document)
            {
                // Logged and answered to publishers: one short line, never a value.
                let text = violation.to_string();
                assert!(
                    text.len() < 400 && !text.chars().any(char::is_control),
                    "{text}"
                );
            }
        }
        Err(reason) => assert!(reason.to_string().len() < 200, "drop reasons stay short"),
    }
    if let Ok(accepted) = crate::ingest::publish::complete_envelope(data) {
        // Whatever the HTTP path accepts must decode as a valid envelope.
        crate::envelope::decode(accepted.raw).expect("completed envelopes are valid");
    }
}

/// A `presence_diff` from Redis (any instance, or anyone who can PUBLISH there) and a stored
/// presence hash: applying never panics, is idempotent, keeps the counts consistent, and what a
/// listing shows stays valid JSON under its bounds.
pub fn presence_diff(data: &[u8]) {
    use crate::presence::members::{Listing, Members, MAX_LISTED_BYTES};
    let mut members = Members::default();
    if members.apply_diff(data) {
        assert!(members.consistent(), "counts after a diff");
        let len = members.len();
        assert!(members.apply_diff(data));
        assert_eq!(
            members.len(),
            len,
            "a diff applied twice changes nothing more"
        );
        assert!(members.consistent(), "counts after the same diff again");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let flat: Vec<String> = text.split('\u{1}').map(str::to_string).collect();
        let stored = Members::from_stored(&flat);
        assert!(stored.consistent(), "counts of a stored hash");
        for (topic_members, limit) in [(&members, 3), (&stored, 2)] {
            let listing = Listing::newest(topic_members, limit);
            assert!(listing.len() <= limit);
            let state = listing.encode();
            assert!(state.len() <= MAX_LISTED_BYTES + 2);
            // JSON by RFC 8259's grammar, as a client's `JSON.parse` reads it (a number such as
            // `1e44073` is JSON, though too large for `serde_json::Value`).
            serde_json::from_slice::<serde::de::IgnoredAny>(&state).expect("a listing is JSON");
            serde_json::from_slice::<serde_json::Value>(&topic_members.summary(listing.len()))
                .expect("a summary is JSON");
        }
    }
}

/// A position notice from Redis (`prostaff:seq:<topic>`, which anyone who can PUBLISH there can
/// send): parsing never panics, a parsed notice written back out parses to itself, and a
/// sequencer with broadcasts waiting takes it without panicking.
pub fn history_notice(data: &[u8]) {
    use crate::history::Notice;
    if let Some(notice) = Notice::parse(data) {
        let mut text = notice.origin.clone();
        for (dedup, position) in &notice.positions {
            text.push_str(&format!("\n{dedup} {position}"));
        }
        assert_eq!(Notice::parse(text.as_bytes()).as_ref(), Some(&notice));
    }
    let redis = crate::redis::RedisLink::new("redis://127.0.0.1:1");
    let hub = std::sync::Arc::new(crate::hub::Hub::new(8, crate::metrics::Metrics::detached()));
    let (id, outbox) = hub.register_socket();
    hub.subscribe("t", id, &outbox);
    let history = std::sync::Arc::new(crate::history::History::new(
        redis.clone(),
        10,
        std::time::Duration::from_secs(60),
    ));
    let sequencer = crate::ingest::sequencer::Sequencer::new(history, hub, redis);
    for dedup in ["a", "b"] {
        sequencer.push(
            "t",
            "e".into(),
            bytes::Bytes::from_static(b"{}"),
            dedup.into(),
        );
    }
    sequencer.notice("t", data);
}
