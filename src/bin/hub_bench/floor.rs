//! The `floor-server`: the minimal fan-out server of issue 14, the physical reference for "one
//! process pushing bytes into sockets" on this machine. Redis in (`PSUBSCRIBE floor:events:*`:
//! channels of its own, see [`CHANNEL_PREFIX`]); each event framed once as a WebSocket text
//! frame (header + the raw payload, shared by every client); one task per client that writes
//! everything queued for it with one `write_all`. No auth, no limits, no history, no presence;
//! the only routing is the channel → joined-topic lookup the `spread` scenario needs, and a
//! fixed ok reply to joins and heartbeats so the bench's clients connect to it (and rest on it)
//! exactly as on the hub.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The floor's channels. Not the hub's `prostaff:events:`: in a `compare` run the hub and the
/// floor share one Redis, and with one prefix each received the other's events too — the
/// floor's run was slowed by the hub appending every event to its history (Redis at 33 % of
/// the shared core instead of 10 %), the hub's by the floor framing them.
pub const CHANNEL_PREFIX: &str = "floor:events:";

struct Client {
    queue: Mutex<Vec<Bytes>>,
    wake: Notify,
}

type Topics = DashMap<String, Vec<Arc<Client>>>;

/// An unmasked server text frame carrying `payload`.
fn text_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.extend_from_slice(&[0x81]);
    match payload.len() {
        n if n < 126 => frame.extend_from_slice(&[n as u8]),
        n if n <= u16::MAX as usize => {
            frame.extend_from_slice(&[126]);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.extend_from_slice(&[127]);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame.freeze()
}

async fn serve_client(mut stream: TcpStream, topics: Arc<Topics>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // The upgrade request: read to the blank line, answer 101.
    let mut request = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await?;
        request.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&request);
    let key = text
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    let client = Arc::new(Client {
        queue: Mutex::new(Vec::new()),
        wake: Notify::new(),
    });
    let mut joined: Vec<String> = Vec::new();
    let (mut read, mut write) = stream.into_split();
    let mut inbound = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut buffer = Vec::with_capacity(16 * 1024);
    let result = loop {
        tokio::select! {
            _ = client.wake.notified() => {
                let frames = std::mem::take(&mut *client.queue.lock().unwrap());
                buffer.clear();
                for frame in &frames {
                    buffer.extend_from_slice(frame);
                }
                if let Err(error) = write.write_all(&buffer).await {
                    break Err(error);
                }
            }
            read = read.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break Ok(()),
                Ok(n) => {
                    inbound.extend_from_slice(&chunk[..n]);
                    // Joins and heartbeats get the minimal ok reply (the same as the hub's
                    // for a heartbeat), so the floor also measures the cost of a client at
                    // rest; anything else is read and ignored.
                    let mut replies = Vec::new();
                    while let Some((payload, used)) = parse_frame(&inbound) {
                        inbound.drain(..used);
                        if let Some((reply, topic)) = reply_to(&payload) {
                            if let Some(topic) = topic {
                                topics.entry(topic.clone()).or_default().push(client.clone());
                                joined.push(topic);
                            }
                            replies.extend_from_slice(&text_frame(reply.as_bytes()));
                        }
                    }
                    if !replies.is_empty() {
                        if let Err(error) = write.write_all(&replies).await {
                            break Err(error);
                        }
                    }
                }
            },
        }
    };
    for topic in joined {
        if let Some(mut clients) = topics.get_mut(&topic) {
            clients.retain(|c| !Arc::ptr_eq(c, &client));
        }
    }
    result
}

/// One complete masked client frame at the start of `buf`: its unmasked payload and the bytes
/// it used.
fn parse_frame(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mut mask = [0u8; 4];
    if buf[1] & 0x80 != 0 {
        mask.copy_from_slice(buf.get(at..at + 4)?);
        at += 4;
    }
    let mut payload = buf.get(at..at + len)?.to_vec();
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Some((payload, at + len))
}

/// The ok reply to a join or a heartbeat (`[join_ref, ref, topic, event, payload]`), and the
/// topic to subscribe for a join.
fn reply_to(payload: &[u8]) -> Option<(String, Option<String>)> {
    let message: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let topic = message[2].as_str()?.to_string();
    let event = message[3].as_str()?;
    let reply = serde_json::json!([
        message[0],
        message[1],
        topic,
        "phx_reply",
        {"status": "ok", "response": {}}
    ])
    .to_string();
    match event {
        "phx_join" => Some((reply, Some(topic))),
        "heartbeat" => Some((reply, None)),
        _ => None,
    }
}

/// Runs the floor server on `port` until killed.
pub async fn run(port: u16, redis: &str) {
    let topics: Arc<Topics> = Arc::new(DashMap::new());
    let config = fred::types::config::Config::from_url(redis).expect("valid --redis URL");
    let subscriber = fred::types::Builder::from_config(config)
        .with_performance_config(|p| p.broadcast_channel_capacity = 64 * 1024)
        .build()
        .expect("redis client");
    let mut messages = subscriber.message_rx();
    subscriber.init().await.expect("redis reachable");
    subscriber
        .psubscribe(format!("{CHANNEL_PREFIX}*"))
        .await
        .expect("psubscribe");
    let fanout_topics = topics.clone();
    tokio::spawn(async move {
        while let Ok(message) = messages.recv().await {
            let org = message.channel.strip_prefix(CHANNEL_PREFIX).unwrap_or("");
            let Some(payload) = message.value.as_bytes() else {
                continue;
            };
            let frame = text_frame(payload);
            if let Some(clients) = fanout_topics.get(&format!("org_events:{org}")) {
                for client in clients.iter() {
                    client.queue.lock().unwrap().push(frame.clone());
                    client.wake.notify_one();
                }
            }
        }
    });
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("floor port free");
    eprintln!("floor-server listening on 127.0.0.1:{port}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let topics = topics.clone();
        tokio::spawn(async move {
            let _ = serve_client(stream, topics).await;
        });
    }
}
