//! The server side of RFC 6455 over an upgraded connection, as a `Stream + Sink` of axum
//! WebSocket messages for [`super::session::run`].
//!
//! Written here rather than taken from axum (tungstenite) for two measured reasons (issue 14,
//! BENCHMARKS.md): a socket must give back the write buffer a large frame needed (tungstenite
//! keeps the capacity of the largest frame ever written, e.g. a `presence_state`, for the
//! socket's life), and a frame should cost one header plus one copy of its payload into the
//! socket's buffer, written with everything else queued in one `write`.
//!
//! Scope: what Phoenix clients send. Masked client frames (unmasked ones are a protocol
//! error), text and binary messages (fragmented ones are reassembled), ping (answered with a
//! pong), pong (ignored), close (answered once). No extensions are negotiated, so RSV bits
//! must be zero.
//!
//! Invariants (issue 25; Autobahn|Testsuite sections 1–7 pass, `tests/it/autobahn.rs`):
//! - Every length and offset read from the network is checked arithmetic: a 64-bit length
//!   can neither wrap nor be cast down.
//! - Every complete frame already buffered is parsed before reading more bytes (a read never
//!   waits for bytes the client has already sent).
//! - A violation fails the connection as §7.1.7 says: a close frame with the code naming the
//!   violation ([`WsError::close_code`]: 1002 framing, 1007 invalid UTF-8, 1009 too big) is
//!   queued by the session, then the TCP connection closes. After an error the stream yields
//!   nothing more.
//! - Text is validated as it arrives: an invalid byte sequence in any fragment fails the
//!   connection at that fragment, not at the end of the message.
//! - A client's close is answered with its own code when that code is one an endpoint may send
//!   (1000–1003, 1007–1014, 3000–4999), with 1002 otherwise, and with 1007 when its reason is
//!   not UTF-8; 1005, 1006 and 1015 are never sent.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Bytes read at once while no frame is partly buffered. An idle socket keeps no read buffer:
/// such a read lands on the stack and only what arrived is copied to the heap (Phoenix client
/// frames are ~50–200 bytes; a socket waits for its next heartbeat for 30 s, and with 20k
/// sockets a kept 1 KiB buffer each was 20 MiB). A frame that arrives in pieces is read on
/// into its own buffer, grown to the frame's size.
const READ_CAPACITY: usize = 4096;
/// Write buffer an idle socket may keep. A flush larger than this (a join's `presence_state`,
/// a batch of broadcasts) keeps its buffer while flushes that large follow each other (a stream
/// reuses it, no allocation per flush) and gives it back at the first smaller flush (at the
/// latest the next heartbeat reply). Without this, every socket kept the capacity of its join's
/// `presence_state` (~3 KiB per socket with presence on, BENCHMARKS.md).
const IDLE_WRITE_CAPACITY: usize = 1024;
/// Queued output that makes `poll_ready` flush before accepting more.
const FLUSH_THRESHOLD: usize = 64 * 1024;
/// The largest header of a server frame (no mask): 2 bytes, 2 more for a 16-bit length, 8 for
/// a 64-bit one.
const MAX_HEADER: usize = 10;

/// A text message shared between sockets (a broadcast, encoded once for all its subscribers).
/// A socket is handed the shared object itself (moved out of its outbox) and copies the text
/// into its write buffer when fed: no per-socket `Message` is built and the text's reference
/// count is not touched (a `Message::Text` clone counted it up and down once per delivery).
pub trait SharedText: Send + Sync + std::fmt::Debug {
    fn text(&self) -> &str;
    /// The text as a message of its own, for a transport that keeps messages.
    fn utf8_bytes(&self) -> Utf8Bytes;
}

/// A transport told the size of the batch about to be sent. The WebSocket reserves its write
/// buffer once for all of it: growing it frame by frame re-copied what it held at every
/// doubling (the reallocation and its `memmove` were 5.5 % of the hub's samples at 100
/// subscribers). Transports that keep messages ignore it.
pub trait ReserveWrite {
    fn reserve_write(&mut self, _bytes: usize) {}
}

impl<S> ReserveWrite for WsStream<S> {
    fn reserve_write(&mut self, bytes: usize) {
        if self.write.is_empty() && self.write.capacity() < bytes {
            // A fresh buffer: growing the empty one would copy its old capacity over.
            self.write = BytesMut::with_capacity(bytes);
        } else {
            self.write.reserve(bytes);
        }
    }
}

/// What a session hands its transport: a message of its own (a reply, a notice, a close), or
/// a text shared with other sockets.
#[derive(Debug)]
pub enum Outbound {
    Message(Message),
    Shared(Arc<dyn SharedText>),
}

impl From<Message> for Outbound {
    fn from(message: Message) -> Self {
        Outbound::Message(message)
    }
}

impl Outbound {
    /// An upper bound of the bytes this takes on a WebSocket: its payload and the largest
    /// header.
    pub fn wire_len(&self) -> usize {
        let payload = match self {
            Outbound::Shared(shared) => shared.text().len(),
            Outbound::Message(Message::Text(text)) => text.len(),
            Outbound::Message(Message::Binary(data))
            | Outbound::Message(Message::Ping(data))
            | Outbound::Message(Message::Pong(data)) => data.len(),
            // A close frame's payload is at most 125 bytes (`put_close` cuts the reason).
            Outbound::Message(Message::Close(_)) => 125,
        };
        payload.saturating_add(MAX_HEADER)
    }

    /// The message a transport that keeps messages (long-poll) sends.
    pub fn into_message(self) -> Message {
        match self {
            Outbound::Message(message) => message,
            Outbound::Shared(shared) => Message::Text(shared.utf8_bytes()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("message too big")]
    TooBig,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
}

impl WsError {
    /// The close frame that fails the connection for this error (RFC 6455 §7.4.1), with the
    /// metric label of the reason; `None` when the connection itself broke (nothing can be
    /// sent).
    pub fn close_code(&self) -> Option<(u16, &'static str)> {
        match self {
            WsError::Io(_) => None,
            WsError::TooBig => Some((1009, "frame_too_big")),
            WsError::Protocol(_) => Some((1002, "protocol_error")),
            WsError::InvalidUtf8 => Some((1007, "invalid_utf8")),
        }
    }
}

/// Close codes an endpoint may send (RFC 6455 §7.4.1 and the IANA registry, 1012–1014
/// included) or that applications use (3000–4999). 1005, 1006 and 1015 are reserved for
/// reporting and never appear on the wire.
/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2):
/// base64(SHA-1(key ‖ the protocol's GUID)).
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Checks the bytes of a text message as they arrive: `data[*checked..]` is validated and
/// `checked` moves past every complete character. An incomplete character at the end is
/// fine until `fin`; an invalid sequence fails at once (fail fast, §8.1).
fn check_utf8(data: &[u8], checked: &mut usize, fin: bool) -> Result<(), WsError> {
    let rest = data.get(*checked..).unwrap_or_default();
    match std::str::from_utf8(rest) {
        Ok(_) => {
            *checked = data.len();
            Ok(())
        }
        Err(error) if error.error_len().is_none() && !fin => {
            *checked = checked.saturating_add(error.valid_up_to());
            Ok(())
        }
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

/// A fragmented message being reassembled.
struct Partial {
    opcode: u8,
    data: BytesMut,
    /// How much of a text message's data is known to be valid UTF-8.
    utf8_checked: usize,
}

pub struct WsStream<S> {
    io: S,
    read: BytesMut,
    write: BytesMut,
    max_message: usize,
    partial: Option<Partial>,
    close_sent: bool,
    eof: bool,
    /// A protocol error was reported: the stream yields nothing more.
    failed: bool,
    /// The last flush wrote more than [`IDLE_WRITE_CAPACITY`]: the buffer is large.
    write_grown: bool,
}

/// What one parse step found.
enum Step {
    /// No complete frame is buffered.
    NeedMore,
    /// A frame was consumed (a fragment, a ping, a pong): parse the next one.
    Again,
    /// A complete message or a close.
    Item(Parsed),
}

enum Parsed {
    Data(u8, Bytes),
    Close(Option<CloseFrame>),
}

impl<S> WsStream<S> {
    pub fn new(io: S, max_message: usize) -> Self {
        WsStream {
            io,
            read: BytesMut::new(),
            write: BytesMut::new(),
            max_message,
            partial: None,
            close_sent: false,
            eof: false,
            failed: false,
            write_grown: false,
        }
    }

    /// A stream whose first bytes were already read by the HTTP server (a client that sent
    /// frames right behind its upgrade request).
    pub fn with_prefix(io: S, prefix: &[u8], max_message: usize) -> Self {
        let mut ws = WsStream::new(io, max_message);
        ws.read.extend_from_slice(prefix);
        ws
    }

    /// Appends one unmasked server frame.
    fn put_frame(&mut self, opcode: u8, payload: &[u8]) {
        let len = payload.len();
        self.write.reserve(len.saturating_add(10));
        self.write.put_u8(0x80 | opcode);
        if len < 126 {
            self.write.put_u8(len as u8);
        } else if let Ok(short) = u16::try_from(len) {
            self.write.put_u8(126);
            self.write.put_u16(short);
        } else {
            self.write.put_u8(127);
            self.write.put_u64(len as u64);
        }
        self.write.extend_from_slice(payload);
    }

    fn put_close(&mut self, frame: Option<&CloseFrame>) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        match frame {
            Some(frame) => {
                // A control frame carries at most 125 bytes: the reason is cut on a character
                // boundary to fit.
                let mut reason = frame.reason.as_str();
                while reason.len() > 123 {
                    let mut end = 123;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason = &reason[..end];
                }
                let mut payload = Vec::with_capacity(2 + reason.len());
                payload.extend_from_slice(&frame.code.to_be_bytes());
                payload.extend_from_slice(reason.as_bytes());
                self.put_frame(0x8, &payload);
            }
            None => self.put_frame(0x8, &[]),
        }
    }

    /// Parses at most one frame from the read buffer.
    fn parse(&mut self) -> Result<Step, WsError> {
        let buf = &self.read[..];
        let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
            return Ok(Step::NeedMore);
        };
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(WsError::Protocol("unmasked client frame"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let control = opcode >= 0x8;
        if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
            return Err(WsError::Protocol("reserved opcode"));
        }
        if control && !fin {
            return Err(WsError::Protocol("fragmented control frame"));
        }
        let (len, header): (u64, usize) = match b1 & 0x7f {
            126 => match buf.get(2..4) {
                Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
                None => return Ok(Step::NeedMore),
            },
            127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(bytes) => (u64::from_be_bytes(bytes), 10),
                None => return Ok(Step::NeedMore),
            },
            n => (u64::from(n), 2),
        };
        if control && len > 125 {
            return Err(WsError::Protocol("control frame over 125 bytes"));
        }
        match opcode {
            0x0 if self.partial.is_none() => {
                return Err(WsError::Protocol("continuation without a message"))
            }
            0x1 | 0x2 if self.partial.is_some() => {
                return Err(WsError::Protocol("new message inside a fragmented one"))
            }
            _ => {}
        }
        // Checked: a 64-bit length from the network can neither wrap the sum nor be cut by
        // the cast (issue 25: `len + already` wrapped, `total` became 13, `advance` panicked).
        let already = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
        let message_len = len.checked_add(already).ok_or(WsError::TooBig)?;
        if message_len > self.max_message as u64 {
            return Err(WsError::TooBig);
        }
        let len = usize::try_from(len).map_err(|_| WsError::TooBig)?;
        let total = len.checked_add(header + 4).ok_or(WsError::TooBig)?;
        if buf.len() < total {
            self.read.reserve(total - buf.len());
            return Ok(Step::NeedMore);
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&buf[header..header + 4]);
        let mut frame = self.read.split_to(total);
        frame.advance(header + 4);
        for (i, byte) in frame.iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
        self.on_frame(opcode, fin, frame)
    }

    /// One unmasked frame: a whole message, a fragment, or a control frame.
    fn on_frame(&mut self, opcode: u8, fin: bool, frame: BytesMut) -> Result<Step, WsError> {
        match opcode {
            0x1 | 0x2 if fin => Ok(Step::Item(Parsed::Data(opcode, frame.freeze()))),
            0x1 | 0x2 => {
                let mut utf8_checked = 0;
                if opcode == 0x1 {
                    check_utf8(&frame, &mut utf8_checked, false)?;
                }
                self.partial = Some(Partial {
                    opcode,
                    data: frame,
                    utf8_checked,
                });
                Ok(Step::Again)
            }
            0x0 => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                partial.data.extend_from_slice(&frame);
                if partial.opcode == 0x1 {
                    check_utf8(&partial.data, &mut partial.utf8_checked, fin)?;
                }
                if fin {
                    Ok(Step::Item(Parsed::Data(
                        partial.opcode,
                        partial.data.freeze(),
                    )))
                } else {
                    self.partial = Some(partial);
                    Ok(Step::Again)
                }
            }
            0x8 => self.on_close(frame),
            0x9 => {
                if !self.close_sent {
                    self.put_frame(0xA, &frame);
                }
                Ok(Step::Again)
            }
            // 0xA: a pong is ignored.
            _ => Ok(Step::Again),
        }
    }

    /// A close frame: its code and reason are checked, and it is echoed once.
    fn on_close(&mut self, mut frame: BytesMut) -> Result<Step, WsError> {
        let close = match frame.len() {
            0 => None,
            1 => return Err(WsError::Protocol("close frame of one byte")),
            _ => {
                let code = u16::from_be_bytes([frame[0], frame[1]]);
                let reason = Utf8Bytes::try_from(frame.split_off(2).freeze())
                    .map_err(|_| WsError::InvalidUtf8)?;
                if !is_valid_close_code(code) {
                    return Err(WsError::Protocol("invalid close code"));
                }
                Some(CloseFrame { code, reason })
            }
        };
        // Answered once, with the client's (valid) code.
        let echo = close.as_ref().map(|c| CloseFrame {
            code: c.code,
            reason: Utf8Bytes::default(),
        });
        self.put_close(echo.as_ref());
        Ok(Step::Item(Parsed::Close(close)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Writes what is queued; gives back a large buffer afterwards.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let large = self.write.len() > IDLE_WRITE_CAPACITY;
        if large {
            // Recorded before writing: a flush that a slow client spreads over several calls
            // ends with a small remainder, and must still be known to have been large.
            self.write_grown = true;
        }
        while !self.write.is_empty() {
            // A plain `write` of the one contiguous buffer: on a TCP stream that is `send`,
            // cheaper in the kernel than the one-element `writev` a vectored write makes
            // (measured: `vfs_writev` and `fdget_pos` were 6 % of a 19k-socket fan-out).
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write))?;
            if written == 0 {
                return Poll::Ready(Err(WsError::Io(std::io::ErrorKind::WriteZero.into())));
            }
            self.write.advance(written.min(self.write.len()));
        }
        // Kept while large flushes follow each other (a stream reuses it), given back at the
        // first small one.
        if !large && std::mem::take(&mut self.write_grown) {
            self.write = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WsStream<S> {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        let mut answered_control = false;
        loop {
            let step = match this.parse() {
                Ok(step) => step,
                Err(error) => {
                    // Nothing more is read after a violation; the session answers it with a
                    // close frame (`WsError::close_code`) and drops the connection.
                    this.failed = true;
                    this.partial = None;
                    this.read = BytesMut::new();
                    return Poll::Ready(Some(Err(error)));
                }
            };
            match step {
                Step::Item(Parsed::Data(0x1, data)) => {
                    return Poll::Ready(Some(match Utf8Bytes::try_from(data) {
                        Ok(text) => Ok(Message::Text(text)),
                        Err(_) => {
                            this.failed = true;
                            Err(WsError::InvalidUtf8)
                        }
                    }));
                }
                Step::Item(Parsed::Data(_, data)) => {
                    return Poll::Ready(Some(Ok(Message::Binary(data))))
                }
                Step::Item(Parsed::Close(frame)) => {
                    // Best effort: the answer goes out now if the socket takes it.
                    let _ = this.poll_write_out(cx);
                    return Poll::Ready(Some(Ok(Message::Close(frame))));
                }
                Step::Again => {
                    answered_control |= !this.write.is_empty();
                    continue;
                }
                Step::NeedMore if this.eof => return Poll::Ready(None),
                Step::NeedMore => {}
            }
            if std::mem::take(&mut answered_control) {
                // Pongs go out before waiting for more input.
                let _ = this.poll_write_out(cx);
            }
            if this.read.is_empty() {
                // Nothing partly read: the buffer of the last message is given back, and what
                // comes next is read on the stack and copied to a buffer of its own size.
                this.read = BytesMut::new();
                let mut stack = [MaybeUninit::<u8>::uninit(); READ_CAPACITY];
                let mut chunk = ReadBuf::uninit(&mut stack);
                if let Err(error) = ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk)) {
                    return Poll::Ready(Some(Err(error.into())));
                }
                match chunk.filled() {
                    [] => this.eof = true,
                    filled => this.read = BytesMut::from(filled),
                }
                continue;
            }
            if this.read.capacity() - this.read.len() < 256 {
                this.read.reserve(READ_CAPACITY);
            }
            match ready!(poll_read_buf(Pin::new(&mut this.io), cx, &mut this.read)) {
                Ok(0) => this.eof = true,
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(error.into()))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Outbound> for WsStream<S> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.write.len() >= FLUSH_THRESHOLD {
            ready!(self.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: Outbound) -> Result<(), WsError> {
        if self.close_sent {
            // Nothing may follow a close frame.
            return Ok(());
        }
        match item {
            Outbound::Shared(shared) => self.put_frame(0x1, shared.text().as_bytes()),
            Outbound::Message(Message::Text(text)) => self.put_frame(0x1, text.as_bytes()),
            Outbound::Message(Message::Binary(data)) => self.put_frame(0x2, &data),
            Outbound::Message(Message::Ping(data)) => self.put_frame(0x9, &data),
            Outbound::Message(Message::Pong(data)) => self.put_frame(0xA, &data),
            Outbound::Message(Message::Close(frame)) => self.put_close(frame.as_ref()),
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.io).poll_flush(cx).map_err(WsError::from)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.io)
            .poll_shutdown(cx)
            .map_err(WsError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_of_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 65535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[tokio::test]
    async fn reads_masked_fragmented_and_control_frames_and_writes_server_frames() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut ws = WsStream::new(server, 1 << 16);
        let mut input = client_frame(true, 0x1, b"hello");
        input.extend(client_frame(false, 0x1, b"frag"));
        input.extend(client_frame(true, 0x9, b"p")); // a ping between fragments
        input.extend(client_frame(true, 0x0, b"mented"));
        input.extend(client_frame(true, 0x2, &[0, 159, 146, 150]));
        let big = "x".repeat(70_000);
        input.extend(client_frame(true, 0x1, big.as_bytes()));
        input.extend(client_frame(true, 0x8, &[0x03, 0xe8, b'b', b'y', b'e']));
        client.write_all(&input).await.unwrap();

        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("hello".into())
        );
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("fragmented".into())
        );
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(&[0, 159, 146, 150]))
        );
        assert!(matches!(ws.next().await, Some(Err(WsError::TooBig))));
        // (The stream is over after an error; a new one reads the close.)
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut ws = WsStream::new(server, 1 << 16);
        client
            .write_all(&client_frame(true, 0x8, &[0x03, 0xe8, b'b', b'y', b'e']))
            .await
            .unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => {
                assert_eq!(frame.code, 1000);
                assert_eq!(frame.reason.as_str(), "bye");
            }
            other => panic!("{other:?}"),
        }
        // The close was answered once with the same code; nothing is written after it.
        ws.send(Message::Text("late".into()).into()).await.unwrap();
        let mut out = [0u8; 4];
        client.read_exact(&mut out).await.unwrap();
        assert_eq!(out, [0x88, 0x02, 0x03, 0xe8]);
    }

    #[tokio::test]
    async fn writes_frames_of_every_length_class_and_answers_pings() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut ws = WsStream::new(server, 1 << 20);
        client
            .write_all(&client_frame(true, 0x9, b"hi"))
            .await
            .unwrap();
        client
            .write_all(&client_frame(true, 0x1, b"after"))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("after".into())
        );
        for len in [5usize, 200, 70_000] {
            ws.feed(Message::Text("y".repeat(len).into()).into())
                .await
                .unwrap();
        }
        ws.flush().await.unwrap();
        // A burst keeps the large buffer; the next small write gives it back. (Reserving
        // reclaims the old allocation when it was kept: it must not have been.)
        ws.send(Message::Text("small".into()).into()).await.unwrap();
        ws.write.reserve(16);
        assert!(
            ws.write.capacity() <= IDLE_WRITE_CAPACITY,
            "a large buffer is given back: {}",
            ws.write.capacity()
        );
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8a, 0x02, b'h', b'i']);
        for len in [5usize, 200, 70_000] {
            let mut header = [0u8; 2];
            client.read_exact(&mut header).await.unwrap();
            assert_eq!(header[0], 0x81);
            let actual = match header[1] {
                126 => client.read_u16().await.unwrap() as usize,
                127 => client.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            assert_eq!(actual, len);
            let mut body = vec![0u8; len];
            client.read_exact(&mut body).await.unwrap();
        }
    }

    /// Reads one unmasked server frame: its opcode and payload.
    async fn server_frame(client: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        let mut header = [0u8; 2];
        client.read_exact(&mut header).await.unwrap();
        let len = match header[1] {
            126 => client.read_u16().await.unwrap() as usize,
            127 => client.read_u64().await.unwrap() as usize,
            n => n as usize,
        };
        let mut body = vec![0u8; len];
        client.read_exact(&mut body).await.unwrap();
        (header[0], body)
    }

    #[tokio::test]
    async fn a_batch_of_broadcasts_and_messages_is_framed_in_order_into_one_reserved_buffer() {
        use crate::phoenix::codec::{BroadcastFrame, Vsn};
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut ws = WsStream::new(server, 1 << 20);
        let frame = |n: usize| {
            BroadcastFrame::new(
                "org_events:o".into(),
                "t.x",
                bytes::Bytes::from(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "p".repeat(n))),
                None,
                std::time::Instant::now(),
            )
        };
        let (small, large) = (frame(1), frame(300));
        let batch: Vec<Outbound> = vec![
            Message::Text("reply".into()).into(),
            Outbound::Shared(small.clone()),
            Outbound::Shared(large.clone()),
            Message::Close(None).into(),
            // After a close nothing more goes out.
            Outbound::Shared(small.clone()),
        ];
        ws.reserve_write(batch.iter().map(Outbound::wire_len).sum());
        let (buffer, capacity) = (ws.write.as_ptr(), ws.write.capacity());
        for item in batch {
            ws.feed(item).await.unwrap();
        }
        // Framed into the buffer reserved for the batch: never grown (nor moved) on the way.
        assert_eq!((ws.write.as_ptr(), ws.write.capacity()), (buffer, capacity));
        assert!(ws.write.len() > 5 + 2 * small.text(Vsn::V2).len());
        ws.flush().await.unwrap();
        assert_eq!(server_frame(&mut client).await, (0x81, b"reply".to_vec()));
        assert_eq!(
            server_frame(&mut client).await,
            (0x81, small.text(Vsn::V2).as_bytes().to_vec())
        );
        assert_eq!(
            server_frame(&mut client).await,
            (0x81, large.text(Vsn::V2).as_bytes().to_vec())
        );
        assert_eq!(server_frame(&mut client).await, (0x88, Vec::new()));
        drop(ws);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing follows the close frame");
        // The shared frames are referenced by their owners only again.
        assert_eq!(
            (Arc::strong_count(&small), Arc::strong_count(&large)),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn bytes_read_before_the_upgrade_are_parsed_first() {
        let (server, mut client) = tokio::io::duplex(1024);
        let mut prefix = client_frame(true, 0x1, b"early");
        // The prefix may end mid-frame: the rest arrives on the connection.
        let late = client_frame(true, 0x1, b"late");
        prefix.extend_from_slice(&late[..3]);
        let mut ws = WsStream::with_prefix(server, &prefix, 1024);
        client.write_all(&late[3..]).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("early".into())
        );
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("late".into())
        );
    }

    #[tokio::test]
    async fn a_medium_flush_does_not_keep_its_buffer_past_the_next_small_one() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut ws = WsStream::new(server, 1 << 20);
        // A join's presence_state-sized flush, then a heartbeat reply: the buffer of the first
        // is given back at the second (it was kept by every socket before).
        ws.send(Message::Text("s".repeat(3000).into()).into())
            .await
            .unwrap();
        ws.send(Message::Text("hb".into()).into()).await.unwrap();
        ws.write.reserve(16);
        assert!(
            ws.write.capacity() <= IDLE_WRITE_CAPACITY,
            "a medium flush gives its buffer back at the next small one: {}",
            ws.write.capacity()
        );
        let mut received = vec![0u8; 4 + 3000 + 4];
        client.read_exact(&mut received).await.unwrap();
    }

    #[tokio::test]
    async fn a_large_flush_a_slow_client_takes_in_pieces_does_not_keep_its_buffer() {
        // The pipe holds 256 bytes: the 3 KB flush needs many calls, the last with a small rest.
        let (server, mut client) = tokio::io::duplex(256);
        let mut ws = WsStream::new(server, 1 << 20);
        let mut received = vec![0u8; 4 + 3000];
        let (flushed, read) = tokio::join!(
            ws.send(Message::Text("s".repeat(3000).into()).into()),
            client.read_exact(&mut received)
        );
        flushed.unwrap();
        read.unwrap();
        ws.write.reserve(16);
        assert!(
            ws.write.capacity() <= IDLE_WRITE_CAPACITY,
            "the buffer of a flush finished in pieces is given back: {}",
            ws.write.capacity()
        );
    }

    #[tokio::test]
    async fn an_idle_stream_keeps_no_read_buffer() {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let mut ws = WsStream::new(server, 1 << 20);
        // Two messages in one read, then half of a third: each is returned whole.
        let mut bytes = client_frame(true, 0x1, b"one");
        bytes.extend(client_frame(true, 0x1, b"two"));
        let third = client_frame(true, 0x1, &[b'x'; 5000]);
        bytes.extend(&third[..100]);
        client.write_all(&bytes).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("one".into())
        );
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("two".into())
        );
        client.write_all(&third[100..]).await.unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.len() == 5000));
        // Waiting for the next message: no buffer is held.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut ws).poll_next(&mut cx).is_pending());
        assert_eq!(ws.read.capacity(), 0, "an idle socket holds a read buffer");
        client
            .write_all(&client_frame(true, 0x1, b"four"))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("four".into())
        );
    }

    #[tokio::test]
    async fn a_large_message_does_not_keep_a_large_read_buffer() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut ws = WsStream::new(server, 1 << 20);
        let big = "z".repeat(100_000);
        client
            .write_all(&client_frame(true, 0x1, big.as_bytes()))
            .await
            .unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.len() == 100_000));
        client
            .write_all(&client_frame(true, 0x1, b"small"))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("small".into())
        );
        ws.read.reserve(16);
        assert!(
            ws.read.capacity() <= 4 * READ_CAPACITY,
            "the read buffer went back to its idle size: {}",
            ws.read.capacity()
        );
    }

    /// Issue 25's remote panic: a 1-byte text fragment, then a continuation whose 64-bit length
    /// is `u64::MAX`. `len + already` wrapped and `advance` panicked; it is a 1009 now.
    #[tokio::test]
    async fn a_continuation_of_length_u64_max_is_too_big_not_a_panic() {
        for already in [0usize, 1, 5] {
            let (server, mut client) = tokio::io::duplex(1024);
            let mut ws = WsStream::new(server, 1 << 16);
            let mut input = client_frame(false, 0x1, &b"abcde"[..already.max(1)]);
            input.extend_from_slice(&[0x80, 0x80 | 127]);
            input.extend_from_slice(&u64::MAX.to_be_bytes());
            input.extend_from_slice(&[1, 2, 3, 4, b'x']);
            client.write_all(&input).await.unwrap();
            let error = ws.next().await.unwrap().unwrap_err();
            assert!(matches!(error, WsError::TooBig), "{error}");
            assert_eq!(error.close_code(), Some((1009, "frame_too_big")));
            // Nothing more is read after the violation.
            assert!(ws.next().await.is_none());
        }
        // Every length class near the limits: never a panic, always an error or a message.
        for len in [
            u64::MAX,
            u64::MAX - 13,
            1 << 63,
            (usize::MAX as u64),
            65536,
            65537,
        ] {
            let (server, mut client) = tokio::io::duplex(1024);
            let mut ws = WsStream::new(server, 65536);
            let mut input = vec![0x82u8, 0x80 | 127];
            input.extend_from_slice(&len.to_be_bytes());
            input.extend_from_slice(&[0, 0, 0, 0]);
            client.write_all(&input).await.unwrap();
            drop(client);
            let next = ws.next().await;
            assert!(
                matches!(next, Some(Err(WsError::TooBig)) | None),
                "length {len}: {next:?}"
            );
        }
    }

    /// Issue 25: three fragments of one heartbeat in one write got no answer until the client
    /// sent more bytes; 10,000 one-byte fragments never finished. The client here keeps the
    /// connection open and sends nothing more.
    #[tokio::test]
    async fn buffered_fragments_are_parsed_without_waiting_for_more_bytes() {
        let heartbeat = br#"[null,"1","phoenix","heartbeat",{}]"#;
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut ws = WsStream::new(server, 1 << 16);
        let mut input = client_frame(false, 0x1, &heartbeat[..10]);
        input.extend(client_frame(false, 0x0, &heartbeat[10..20]));
        input.extend(client_frame(true, 0x0, &heartbeat[20..]));
        client.write_all(&input).await.unwrap();
        let message = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("answered without more bytes")
            .unwrap()
            .unwrap();
        assert_eq!(
            message,
            Message::Text(std::str::from_utf8(heartbeat).unwrap().into())
        );

        let text = "y".repeat(10_000);
        let mut input = client_frame(false, 0x1, b"y");
        for _ in 1..9_999 {
            input.extend(client_frame(false, 0x0, b"y"));
        }
        input.extend(client_frame(true, 0x0, b"y"));
        // A ping after the message is answered too, still without more bytes.
        input.extend(client_frame(true, 0x9, b"p"));
        client.write_all(&input).await.unwrap();
        let message = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("10,000 fragments finish")
            .unwrap()
            .unwrap();
        assert_eq!(message, Message::Text(text.into()));
        let pending = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
        assert!(pending.is_err(), "nothing else is buffered: {pending:?}");
        let mut pong = [0u8; 3];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8a, 0x01, b'p']);
    }

    #[tokio::test]
    async fn close_codes_are_echoed_only_when_valid() {
        for (code, answer) in [
            (1000u16, Some(1000u16)),
            (1001, Some(1001)),
            (1003, Some(1003)),
            (1007, Some(1007)),
            (1011, Some(1011)),
            (1012, Some(1012)),
            (3000, Some(3000)),
            (4999, Some(4999)),
            (0, None),
            (999, None),
            (1004, None),
            (1005, None),
            (1006, None),
            (1015, None),
            (1016, None),
            (2999, None),
            (5000, None),
        ] {
            let (server, mut client) = tokio::io::duplex(1024);
            let mut ws = WsStream::new(server, 1024);
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(b"ok");
            client
                .write_all(&client_frame(true, 0x8, &payload))
                .await
                .unwrap();
            match (ws.next().await.unwrap(), answer) {
                (Ok(Message::Close(Some(frame))), Some(answer)) => {
                    assert_eq!(frame.code, code);
                    let mut out = [0u8; 4];
                    client.read_exact(&mut out).await.unwrap();
                    assert_eq!(out[..2], [0x88, 0x02]);
                    assert_eq!(u16::from_be_bytes([out[2], out[3]]), answer);
                }
                (Err(error), None) => {
                    assert_eq!(error.close_code().map(|c| c.0), Some(1002), "code {code}")
                }
                (other, _) => panic!("code {code}: {other:?}"),
            }
        }
        // A reason that is not UTF-8 is 1007; a one-byte close payload is 1002.
        for (payload, expected) in [(vec![0x03, 0xe8, 0xff], 1007u16), (vec![0x03], 1002)] {
            let (server, mut client) = tokio::io::duplex(1024);
            let mut ws = WsStream::new(server, 1024);
            client
                .write_all(&client_frame(true, 0x8, &payload))
                .await
                .unwrap();
            let error = ws.next().await.unwrap().unwrap_err();
            assert_eq!(error.close_code().map(|c| c.0), Some(expected));
        }
    }

    #[tokio::test]
    async fn invalid_utf8_fails_at_the_fragment_that_carries_it() {
        let (server, mut client) = tokio::io::duplex(1024);
        let mut ws = WsStream::new(server, 1 << 16);
        // A character split across fragments is fine; an invalid byte fails at its fragment,
        // before the message ends (no final fragment is ever sent here).
        let mut input = client_frame(false, 0x1, &[b'a', 0xc3]);
        input.extend(client_frame(false, 0x0, &[0xa9, b'b']));
        input.extend(client_frame(false, 0x0, &[0xff]));
        client.write_all(&input).await.unwrap();
        let error = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("fails fast")
            .unwrap()
            .unwrap_err();
        assert!(matches!(error, WsError::InvalidUtf8), "{error}");
        assert_eq!(error.close_code().map(|c| c.0), Some(1007));
    }

    #[tokio::test]
    async fn refuses_unmasked_frames_and_reserved_bits() {
        for bad in [
            vec![0x81u8, 0x01, b'a'],
            vec![0xC1u8, 0x81, 0, 0, 0, 0, b'a'],
        ] {
            let (server, mut client) = tokio::io::duplex(1024);
            let mut ws = WsStream::new(server, 1024);
            client.write_all(&bad).await.unwrap();
            assert!(matches!(ws.next().await, Some(Err(WsError::Protocol(_)))));
        }
    }
}
