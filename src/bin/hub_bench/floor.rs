//! The `floor-server`: the minimal fan-out server of issue 14, the physical reference for "one
//! process pushing bytes into sockets" on this machine. Redis in (`PSUBSCRIBE
//! prostaff:events:*`); each event framed once as a WebSocket text frame (header + the raw
//! payload, shared by every client); one task per client that writes everything queued for it
//! with one `write_all`. No auth, no limits, no history, no presence; the only routing is the
//! channel → joined-topic lookup the `spread` scenario needs, and a fixed join reply so the
//! bench's readers can connect to it exactly as they connect to the hub.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

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

/// Reads one masked client frame's payload.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await?;
    let len = match header[1] & 0x7f {
        126 => stream.read_u16().await? as usize,
        127 => stream.read_u64().await? as usize,
        n => n as usize,
    };
    let mut mask = [0u8; 4];
    if header[1] & 0x80 != 0 {
        stream.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok(payload)
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
    // The join: `["1","1","org_events:<org>","phx_join",{}]` → a fixed ok reply.
    let join = read_frame(&mut stream).await?;
    let join: serde_json::Value = serde_json::from_slice(&join).unwrap_or_default();
    let topic = join[2].as_str().unwrap_or("").to_string();
    let reply = serde_json::json!(["1", "1", topic, "phx_reply", {"status": "ok", "response": {}}]);
    stream
        .write_all(&text_frame(reply.to_string().as_bytes()))
        .await?;
    let client = Arc::new(Client {
        queue: Mutex::new(Vec::new()),
        wake: Notify::new(),
    });
    topics
        .entry(topic.clone())
        .or_default()
        .push(client.clone());

    let (mut read, mut write) = stream.into_split();
    let mut sink = [0u8; 4096];
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
            read = read.read(&mut sink) => match read {
                Ok(0) | Err(_) => break Ok(()),
                Ok(_) => {}
            },
        }
    };
    if let Some(mut clients) = topics.get_mut(&topic) {
        clients.retain(|c| !Arc::ptr_eq(c, &client));
    }
    result
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
        .psubscribe("prostaff:events:*")
        .await
        .expect("psubscribe");
    let fanout_topics = topics.clone();
    tokio::spawn(async move {
        while let Ok(message) = messages.recv().await {
            let org = message
                .channel
                .strip_prefix("prostaff:events:")
                .unwrap_or("");
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
