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
//! must be zero. A message over `max_message` bytes ends the stream with [`WsError::TooBig`].

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

/// Read buffer an idle socket keeps (Phoenix client frames are ~50–200 bytes; larger messages
/// grow it on demand and it shrinks back after them).
const READ_CAPACITY: usize = 1024;
/// Write buffer an idle socket may keep. A flush larger than this (a join's `presence_state`,
/// a batch of broadcasts) keeps its buffer while flushes that large follow each other (a stream
/// reuses it, no allocation per flush) and gives it back at the first smaller flush (at the
/// latest the next heartbeat reply). Without this, every socket kept the capacity of its join's
/// `presence_state` (~3 KiB per socket with presence on, BENCHMARKS.md).
const IDLE_WRITE_CAPACITY: usize = 1024;
/// Queued output that makes `poll_ready` flush before accepting more.
const FLUSH_THRESHOLD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Worded like tungstenite's error so the session maps it to close 1009.
    #[error("Message too big")]
    TooBig,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
}

pub struct WsStream<S> {
    io: S,
    read: BytesMut,
    write: BytesMut,
    max_message: usize,
    /// A fragmented message being reassembled: (opcode, data so far).
    partial: Option<(u8, BytesMut)>,
    close_sent: bool,
    eof: bool,
    /// The read buffer was grown past its idle size for a large message: it is replaced by a
    /// small one once empty (`capacity()` of an advanced view does not show the allocation).
    read_grown: bool,
    /// The last flush wrote more than [`IDLE_WRITE_CAPACITY`]: the buffer is large.
    write_grown: bool,
}

impl<S> WsStream<S> {
    pub fn new(io: S, max_message: usize) -> Self {
        WsStream {
            io,
            read: BytesMut::with_capacity(READ_CAPACITY),
            write: BytesMut::new(),
            max_message,
            partial: None,
            close_sent: false,
            eof: false,
            read_grown: false,
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
        self.write.reserve(len + 10);
        self.write.put_u8(0x80 | opcode);
        if len < 126 {
            self.write.put_u8(len as u8);
        } else if len <= u16::MAX as usize {
            self.write.put_u8(126);
            self.write.put_u16(len as u16);
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
                let mut payload = Vec::with_capacity(2 + frame.reason.len());
                payload.extend_from_slice(&frame.code.to_be_bytes());
                payload.extend_from_slice(frame.reason.as_bytes());
                self.put_frame(0x8, &payload);
            }
            None => self.put_frame(0x8, &[]),
        }
    }

    /// Parses one complete frame from the read buffer: `Ok(None)` when more bytes are needed
    /// or the frame was a control frame handled here.
    fn parse(&mut self) -> Result<Option<Parsed>, WsError> {
        let buf = &self.read[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(WsError::Protocol("unmasked client frame"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let (len, header) = match b1 & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
                10,
            ),
            126 | 127 => return Ok(None),
            n => (n as u64, 2),
        };
        let already = self
            .partial
            .as_ref()
            .map_or(0, |(_, data)| data.len() as u64);
        if len + already > self.max_message as u64 {
            return Err(WsError::TooBig);
        }
        let total = header + 4 + len as usize;
        if buf.len() < total {
            if total > READ_CAPACITY {
                self.read_grown = true;
            }
            self.read.reserve(total - buf.len());
            return Ok(None);
        }
        let mask: [u8; 4] = buf[header..header + 4].try_into().expect("4 bytes");
        let mut frame = self.read.split_to(total);
        frame.advance(header + 4);
        for (i, byte) in frame.iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
        if opcode >= 0x8 && (!fin || frame.len() > 125) {
            return Err(WsError::Protocol("invalid control frame"));
        }
        match opcode {
            0x1 | 0x2 if self.partial.is_some() => {
                Err(WsError::Protocol("new message inside a fragmented one"))
            }
            0x1 | 0x2 if fin => Ok(Some(Parsed::Data(opcode, frame.freeze()))),
            0x1 | 0x2 => {
                self.partial = Some((opcode, frame));
                Ok(None)
            }
            0x0 => {
                let Some((first, mut data)) = self.partial.take() else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                data.extend_from_slice(&frame);
                if fin {
                    Ok(Some(Parsed::Data(first, data.freeze())))
                } else {
                    self.partial = Some((first, data));
                    Ok(None)
                }
            }
            0x8 => {
                let close = (frame.len() >= 2).then(|| {
                    let code = u16::from_be_bytes([frame[0], frame[1]]);
                    let reason = frame.split_off(2).freeze();
                    CloseFrame {
                        code,
                        reason: Utf8Bytes::try_from(reason).unwrap_or_default(),
                    }
                });
                // Answer once, with the client's code.
                let echo = close.as_ref().map(|c| CloseFrame {
                    code: c.code,
                    reason: Utf8Bytes::default(),
                });
                self.put_close(echo.as_ref());
                Ok(Some(Parsed::Close(close)))
            }
            0x9 => {
                let payload = frame.freeze();
                self.put_frame(0xA, &payload);
                Ok(Some(Parsed::Control))
            }
            0xA => Ok(Some(Parsed::Control)),
            _ => Err(WsError::Protocol("unknown opcode")),
        }
    }
}

enum Parsed {
    Data(u8, Bytes),
    Close(Option<CloseFrame>),
    /// A ping (its pong is queued) or a pong.
    Control,
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
            self.write.advance(written);
            if written == 0 {
                return Poll::Ready(Err(WsError::Io(std::io::ErrorKind::WriteZero.into())));
            }
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
        loop {
            match this.parse() {
                Err(error) => return Poll::Ready(Some(Err(error))),
                Ok(Some(Parsed::Data(0x1, data))) => {
                    return Poll::Ready(Some(
                        Utf8Bytes::try_from(data)
                            .map(Message::Text)
                            .map_err(|_| WsError::InvalidUtf8),
                    ));
                }
                Ok(Some(Parsed::Data(_, data))) => {
                    return Poll::Ready(Some(Ok(Message::Binary(data))))
                }
                Ok(Some(Parsed::Close(frame))) => {
                    // Best effort: the answer goes out now if the socket takes it.
                    let _ = this.poll_write_out(cx);
                    return Poll::Ready(Some(Ok(Message::Close(frame))));
                }
                Ok(Some(Parsed::Control)) => {
                    let _ = this.poll_write_out(cx);
                    continue;
                }
                Ok(None) if this.eof => return Poll::Ready(None),
                Ok(None) => {}
            }
            if this.read.is_empty() && std::mem::take(&mut this.read_grown) {
                // A large message came and went: back to the idle size.
                this.read = BytesMut::with_capacity(READ_CAPACITY);
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

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WsStream<S> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.write.len() >= FLUSH_THRESHOLD {
            ready!(self.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        if self.close_sent {
            // Nothing may follow a close frame.
            return Ok(());
        }
        match message {
            Message::Text(text) => self.put_frame(0x1, text.as_bytes()),
            Message::Binary(data) => self.put_frame(0x2, &data),
            Message::Ping(data) => self.put_frame(0x9, &data),
            Message::Pong(data) => self.put_frame(0xA, &data),
            Message::Close(frame) => self.put_close(frame.as_ref()),
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
    use futures_util::{SinkExt, StreamExt};
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
        ws.send(Message::Text("late".into())).await.unwrap();
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
            ws.feed(Message::Text("y".repeat(len).into()))
                .await
                .unwrap();
        }
        ws.flush().await.unwrap();
        // A burst keeps the large buffer; the next small write gives it back. (Reserving
        // reclaims the old allocation when it was kept: it must not have been.)
        ws.send(Message::Text("small".into())).await.unwrap();
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
        ws.send(Message::Text("s".repeat(3000).into()))
            .await
            .unwrap();
        ws.send(Message::Text("hb".into())).await.unwrap();
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
            ws.send(Message::Text("s".repeat(3000).into())),
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
