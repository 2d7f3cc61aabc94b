//! Issue 25: no input can crash a session or leave anything behind. The remote-panic
//! reproduction against the real hub, a session made to panic on purpose (checked on a second
//! hub), protocol violations answered with close frames, and resumes refused while Redis is
//! unreachable instead of answered `recovered: false`.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::presence::View;
use crate::support::*;

/// A WebSocket client that writes raw frames (what tungstenite will not send).
struct RawWs {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawWs {
    async fn connect(hub: &TestHub, token: &str) -> RawWs {
        let mut stream = TcpStream::connect(hub.addr).await.unwrap();
        let request = format!(
            "GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            hub.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 1024];
        let end = loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed during the upgrade");
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        assert!(buffer.starts_with(b"HTTP/1.1 101"), "upgrade refused");
        buffer.drain(..end);
        RawWs { stream, buffer }
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [7u8, 1, 9, 3];
        let mut frame = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next server frame: (opcode, payload); `None` when the connection closed.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buffer.len() >= 2 {
                let (opcode, len7) = (self.buffer[0] & 0x0f, (self.buffer[1] & 0x7f) as usize);
                let (len, header) = match len7 {
                    126 if self.buffer.len() >= 4 => (
                        u16::from_be_bytes([self.buffer[2], self.buffer[3]]) as usize,
                        4,
                    ),
                    127 if self.buffer.len() >= 10 => (
                        u64::from_be_bytes(self.buffer[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buffer.len() >= header + len {
                    let payload = self.buffer[header..header + len].to_vec();
                    self.buffer.drain(..header + len);
                    return Some((opcode, payload));
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("no frame within {TIMEOUT:?}"),
            }
        }
    }

    /// Reads until a text frame with `needle` arrives.
    async fn text_with(&mut self, needle: &str) -> Value {
        loop {
            let (opcode, payload) = self.next().await.expect("connection open");
            if opcode == 0x1 {
                let text = String::from_utf8(payload).unwrap();
                if text.contains(needle) {
                    return serde_json::from_str(&text).unwrap();
                }
            }
        }
    }

    /// Reads until the close frame; returns its code, then checks the TCP connection ends.
    async fn close_code(&mut self) -> Option<u16> {
        let mut code = None;
        while let Some((opcode, payload)) = self.next().await {
            if opcode == 0x8 {
                code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                break;
            }
        }
        // The hub closes TCP after a violation: no more frames, then EOF.
        while let Some((opcode, _)) = self.next().await {
            assert_ne!(opcode, 0x1, "nothing follows the close frame");
        }
        code
    }
}

/// Two hubs on one Redis and an observer on the second one watching `org_events:{org}`'s
/// presence; returns (redis, a, b, observer, org).
async fn two_hubs_with_an_observer() -> (RedisServer, TestHub, TestHub, Phx, String) {
    let redis = RedisServer::start();
    let (a, b) = two_hubs(&redis).await;
    let org = unique("org");
    let mut observer = Phx::connect(&b, &user_token("observer", &org)).await;
    observer.presence = true;
    observer.join_ok(&format!("org_events:{org}")).await;
    (redis, a, b, observer, org)
}

/// Waits until the observer's presence shows (`present`) or no longer shows `key`.
async fn wait_presence(observer: &mut Phx, key: &str, present: bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut view = View::default();
    while view.0.contains_key(key) != present {
        let frame = tokio::time::timeout_at(deadline, observer.recv())
            .await
            .unwrap_or_else(|_| panic!("presence of {key} never became {present}"));
        view.apply(&frame);
    }
}

/// Waits until hub `a` holds no socket and no topic.
async fn wait_empty(hub: &TestHub) {
    eventually("the hub holds no socket and no topic", || async {
        let status = admin_status(hub).await;
        status["sockets"] == 0 && status["topic_count"] == 0 && status["connections"] == 0
    })
    .await;
}

#[tokio::test]
async fn the_u64_max_continuation_is_answered_1009_and_leaves_no_ghost() {
    let (_redis, a, _b, mut observer, org) = two_hubs_with_an_observer().await;
    let mut raw = RawWs::connect(&a, &user_token("attacker", &org)).await;
    let topic = format!("org_events:{org}");
    let join = json!(["1", "1", topic, "phx_join", {}]).to_string();
    raw.send(&RawWs::frame(true, 0x1, join.as_bytes())).await;
    raw.text_with("phx_reply").await;
    wait_presence(&mut observer, "user:attacker", true).await;

    // Issue 25's reproduction: a 1-byte text fragment, then a continuation of length u64::MAX.
    let mut attack = RawWs::frame(false, 0x1, b"[");
    attack.extend_from_slice(&[0x80, 0x80 | 127]);
    attack.extend_from_slice(&u64::MAX.to_be_bytes());
    attack.extend_from_slice(&[0, 0, 0, 0, b'x']);
    raw.send(&attack).await;
    assert_eq!(raw.close_code().await, Some(1009));

    wait_presence(&mut observer, "user:attacker", false).await;
    wait_empty(&a).await;
    let metrics = a.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "prostaff_inbound_rejected_total",
            &["frame_too_big"]
        ) >= 1.0
    );
}

#[tokio::test]
async fn protocol_violations_are_answered_with_their_close_code() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let token = user_token("u1", &unique("org"));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("reserved bits", vec![0xC1, 0x80, 0, 0, 0, 0], 1002),
        ("reserved opcode", vec![0x83, 0x80, 0, 0, 0, 0], 1002),
        ("unmasked frame", vec![0x81, 0x01, b'a'], 1002),
        (
            "continuation without a message",
            RawWs::frame(true, 0x0, b"a"),
            1002,
        ),
        ("fragmented ping", RawWs::frame(false, 0x9, b"a"), 1002),
        (
            "ping over 125 bytes",
            RawWs::frame(true, 0x9, &[0; 126]),
            1002,
        ),
        (
            "close code 1005",
            RawWs::frame(true, 0x8, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 5000",
            RawWs::frame(true, 0x8, &5000u16.to_be_bytes()),
            1002,
        ),
        (
            "invalid UTF-8 text",
            RawWs::frame(true, 0x1, &[0xff, 0xfe]),
            1007,
        ),
        (
            "invalid UTF-8 close reason",
            RawWs::frame(true, 0x8, &[0x03, 0xe8, 0xff]),
            1007,
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut raw = RawWs::connect(&hub, &token).await;
        raw.send(&bytes).await;
        assert_eq!(raw.close_code().await, Some(expected), "{what}");
    }
    wait_empty(&hub).await;
    let metrics = hub.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "prostaff_inbound_rejected_total",
            &["protocol_error"]
        ) >= 8.0
    );
    assert!(
        metric_value(
            &metrics,
            "prostaff_inbound_rejected_total",
            &["invalid_utf8"]
        ) >= 2.0
    );
}

#[tokio::test]
async fn a_session_that_panics_leaves_nothing_behind_on_either_hub() {
    let (_redis, a, _b, mut observer, org) = two_hubs_with_an_observer().await;
    let mut victim = Phx::connect(&a, &user_token("victim", &org)).await;
    victim.join_ok(&format!("org_events:{org}")).await;
    victim.join_ok("notifications:victim").await;
    wait_presence(&mut observer, "user:victim", true).await;

    // A bug on the join path (injected): the session's task panics mid-join.
    let armed = format!("tournament:{}", unique("boom"));
    prostaff_events::fault::panic_on_join(&armed);
    let r = victim.next_ref();
    victim.send(json!([r, r, armed, "phx_join", {}])).await;
    assert_eq!(victim.close_code().await, None, "the connection just ends");

    // Nothing is left: not in presence on the other hub, not in this hub's topic map or
    // connection count; the panic is logged in the socket's span and counted.
    wait_presence(&mut observer, "user:victim", false).await;
    wait_empty(&a).await;
    let line = wait_for_log(&["session panicked", &org]).await;
    assert!(
        line.contains("socket{"),
        "logged in the socket's span: {line}"
    );
    assert!(
        line.contains("identity=\"user\"") || line.contains("identity=user"),
        "{line}"
    );
    let metrics = a.metrics().await;
    assert!(metric_value(&metrics, "prostaff_session_panics_total", &[]) >= 1.0);
    assert!(
        metric_value(
            &metrics,
            "prostaff_socket_closes_total",
            &["reason=\"aborted\""]
        ) >= 1.0
    );

    // The same identity connects again (its per-identity permit was given back).
    let mut again = Phx::connect(&a, &user_token("victim", &org)).await;
    again.join_ok(&format!("org_events:{org}")).await;
}

#[tokio::test]
async fn resumes_are_refused_while_redis_is_unreachable_and_served_once_it_is_back() {
    let mut redis = RedisServer::reserved();
    let hub = TestHub::with_redis(&redis).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut phx = Phx::connect(&hub, &user_token("u1", &org)).await;

    // With `since`: refused, so phoenix.js retries the join and keeps its `since`.
    let reply = phx.join(&topic, json!({"since": "abc:3"})).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    assert_eq!(reply[4]["response"]["reason"], "unavailable", "{reply}");
    // Without: joined, with no position to promise.
    let reply = phx.join(&topic, json!({})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(reply[4]["response"]["position"], Value::Null, "{reply}");

    // SSE: a resume is 503 with Retry-After; a fresh stream opens.
    let client = reqwest::Client::new();
    let token = user_token("u1", &org);
    let resume = prostaff_events::sse::resume_token(
        &std::iter::once((
            topic.clone(),
            prostaff_events::history::Position::parse("abc:3").unwrap(),
        ))
        .collect(),
    );
    let stream = |resume: Option<&str>| {
        let mut request = client
            .get(hub.http(&format!("/api/realtime/stream?topics={topic}")))
            .bearer_auth(&token);
        if let Some(id) = resume {
            request = request.header("Last-Event-ID", id);
        }
        request.send()
    };
    let response = stream(Some(&resume)).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let fresh = stream(None).await.unwrap();
    assert_eq!(fresh.status(), 200);
    drop(fresh);

    // Redis comes: the same resume is answered (a new epoch: not recovered, truthfully).
    redis.spawn();
    hub.wait_redis_ready().await;
    let reply = phx.join(&topic, json!({"since": "abc:3"})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(reply[4]["response"]["recovered"], false, "{reply}");
    assert!(reply[4]["response"]["position"].is_string(), "{reply}");
    let response = stream(Some(&resume)).await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_queued_before_a_leave_are_not_sent_after_its_phx_close() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut phx = Phx::connect(&hub, &user_token("u1", &org)).await;
    // Events stream in the whole time, so some are queued in the outbox at the moment a leave
    // is handled; none of them may follow that leave's phx_close.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, org) = (stop.clone(), org.clone());
        let mut connection = redis.connection();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let event = json!({"id": format!("e{i}"), "type": "team_goal.updated",
                    "user_id": "u", "org_id": org, "payload": {},
                    "published_at": "2026-12-02T00:00:00Z"});
                connection.publish(&format!("prostaff:events:{org}"), &event.to_string());
            }
        })
    };
    let mut late = 0;
    // Two control messages per round: 120 rounds stay within the join/leave burst.
    for _ in 0..120 {
        // Between the previous leave's phx_close and this join's reply nothing of the topic
        // is legitimate (this join's broadcasts come after its reply).
        let r = phx.next_ref();
        phx.send(json!([r, r, topic, "phx_join", {}])).await;
        loop {
            let frame = phx.recv().await;
            if frame_event(&frame) == "phx_reply" && frame[1] == r.as_str() {
                assert_eq!(frame[4]["status"], "ok", "{frame}");
                break;
            }
            if frame[2] == topic.as_str() && frame_event(&frame) == "team_goal.updated" {
                late += 1;
            }
        }
        let leave = phx.next_ref();
        phx.send(json!([r, leave, topic, "phx_leave", {}])).await;
        phx.recv_matching(|f| frame_event(f) == "phx_close").await;
        // What came before the phx_close was legitimately the channel's.
        phx.backlog.clear();
    }
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    assert_eq!(late, 0, "broadcasts sent after the channel's phx_close");
}

fn goal_event(org: &str, id: &str) -> String {
    json!({"id": id, "type": "team_goal.updated", "user_id": "u", "org_id": org,
        "payload": {"n": id}, "published_at": "2026-12-02T00:00:00Z"})
    .to_string()
}

/// Hub A reaches Redis through a proxy that can go silent; hub B directly. Returns the
/// redis, proxy, both hubs, a member on each, the org and its topic.
async fn a_cut_hub_and_a_live_hub(
    history_size: usize,
) -> (
    RedisServer,
    FreezableProxy,
    TestHub,
    TestHub,
    Phx,
    Phx,
    String,
    String,
) {
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let mut config_a = test_config(&proxy.url(), "http://127.0.0.1:9");
    config_a.history_size = history_size;
    let mut config_b = test_config(&redis.url(), "http://127.0.0.1:9");
    config_b.history_size = history_size;
    let a = TestHub::start(config_a).await;
    let b = TestHub::start(config_b).await;
    a.wait_redis_ready().await;
    b.wait_redis_ready().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let on_a = Phx::org_member(&a, &org).await;
    let on_b = Phx::org_member(&b, &org).await;
    (redis, proxy, a, b, on_a, on_b, org, topic)
}

/// The `payload.n` of the next `team_goal.updated` on `topic`, and its position.
async fn next_goal(phx: &mut Phx, topic: &str) -> (String, String) {
    let frame = phx.event(topic, "team_goal.updated").await;
    (
        frame[4]["payload"]["n"].as_str().unwrap().to_string(),
        frame[1].as_str().expect("a position").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_redis_link_blips_catches_its_sockets_up_in_order() {
    let (redis, proxy, _a, _b, mut on_a, mut on_b, org, topic) =
        a_cut_hub_and_a_live_hub(300).await;
    let channel = format!("prostaff:events:{org}");
    redis.publish(&channel, &goal_event(&org, "e0"));
    assert_eq!(next_goal(&mut on_a, &topic).await.0, "e0");
    assert_eq!(next_goal(&mut on_b, &topic).await.0, "e0");

    // A's link goes silent (no reset); B goes on delivering and appending to history.
    proxy.freeze();
    for i in 1..=5 {
        redis.publish(&channel, &goal_event(&org, &format!("e{i}")));
    }
    for i in 1..=5 {
        assert_eq!(next_goal(&mut on_b, &topic).await.0, format!("e{i}"));
    }
    // A notices, reconnects, and its socket gets exactly what it missed, in order, with the
    // positions B's clients saw; then live events again.
    let mut positions = Vec::new();
    for i in 1..=5 {
        let (n, position) =
            tokio::time::timeout(Duration::from_secs(15), next_goal(&mut on_a, &topic))
                .await
                .expect("caught up after the reconnect");
        assert_eq!(n, format!("e{i}"));
        positions.push(position);
    }
    redis.publish(&channel, &goal_event(&org, "e6"));
    assert_eq!(next_goal(&mut on_a, &topic).await.0, "e6");
    assert!(
        on_a.silent_for(Duration::from_millis(300)).await,
        "no duplicate"
    );
    let offsets: Vec<u64> = positions
        .iter()
        .map(|p| p.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "{positions:?}"
    );
    let metrics = _a.metrics().await;
    assert!(metric_value(&metrics, "prostaff_catch_up_broadcasts_total", &[]) >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_history_cannot_cover_is_announced_never_silent() {
    let (redis, proxy, _a, _b, mut on_a, mut on_b, org, topic) = a_cut_hub_and_a_live_hub(3).await;
    let channel = format!("prostaff:events:{org}");
    // An SSE stream on A too: it must end at the gap (the browser resumes with its last id).
    let mut sse = reqwest::Client::new()
        .get(_a.http(&format!("/api/realtime/stream?topics={topic}")))
        .bearer_auth(user_token("u1", &org))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    redis.publish(&channel, &goal_event(&org, "e0"));
    let (_, before_gap) = next_goal(&mut on_a, &topic).await;
    next_goal(&mut on_b, &topic).await;
    proxy.freeze();
    // More than the history keeps (3) while A is away.
    for i in 1..=8 {
        redis.publish(&channel, &goal_event(&org, &format!("e{i}")));
    }
    for _ in 1..=8 {
        next_goal(&mut on_b, &topic).await;
    }
    // A's socket is told with phx_error on the channel (phoenix.js rejoins), and gets none of
    // the events after the gap on that channel.
    let error = tokio::time::timeout(
        Duration::from_secs(15),
        on_a.recv_matching(|f| frame_event(f) == "phx_error"),
    )
    .await
    .expect("the gap is announced");
    assert_eq!(error[2], topic.as_str());
    assert!(
        error[0].is_string(),
        "carries the channel's join_ref: {error}"
    );
    assert!(
        on_a.backlog
            .iter()
            .all(|f| frame_event(f) != "team_goal.updated"),
        "nothing of the gap was delivered: {:?}",
        on_a.backlog
    );
    // The SSE stream ended without delivering anything after the gap.
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), sse.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) | Ok(Err(_)) => break,
            Err(_) => panic!("the SSE stream did not end at the gap: {text}"),
        }
    }
    assert!(text.contains("\"e0\""), "{text}");
    assert!(!text.contains("\"e1\""), "nothing after the gap: {text}");
    // The rejoin with the last position it had learns the truth.
    let reply = on_a.join(&topic, json!({"since": before_gap})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(reply[4]["response"]["recovered"], false, "{reply}");
}
