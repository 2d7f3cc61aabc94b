//! Limits and failure behaviour: each documented limit, what the client sees, and the metric
//! that counts it. Assertions are on counts and codes, never on timing.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// Waits until the metric (summed over samples with `label`) reaches `at_least`. The hub counts a
/// close after the closing handshake, so a client may see the close first.
async fn eventually_metric(hub: &TestHub, name: &str, label: &str, at_least: f64) {
    eventually(&format!("{name}{{{label}}} >= {at_least}"), || async {
        metric_value(&hub.metrics().await, name, &[label]) >= at_least
    })
    .await;
}

async fn hub_with(
    tweak: impl FnOnce(&mut prostaff_events::config::Config),
) -> (RedisServer, TestHub) {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    tweak(&mut config);
    let hub = TestHub::start(config).await;
    (redis, hub)
}

#[tokio::test]
async fn oversize_frames_close_with_1009() {
    let (_redis, hub) = hub_with(|c| c.limits.max_frame_bytes = 1024).await;
    for size in [2_000, 50_000] {
        let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
        let big = format!(
            "[null,\"1\",\"phoenix\",\"heartbeat\",{{\"pad\":\"{}\"}}]",
            "x".repeat(size)
        );
        phx.send_raw(Message::Text(big.into())).await;
        assert_eq!(phx.close_code().await, Some(1009), "frame of {size} bytes");
    }
    eventually_metric(
        &hub,
        "prostaff_inbound_rejected_total",
        "reason=\"frame_too_big\"",
        2.0,
    )
    .await;
}

#[tokio::test]
async fn undecodable_frames_close_with_1007() {
    let (_redis, hub) = hub_with(|_| {}).await;
    for garbage in [
        Message::Text("not json".into()),
        Message::Text("[1,2]".into()),
        Message::Binary(vec![9, 9, 9].into()),
    ] {
        let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
        phx.send_raw(garbage.clone()).await;
        assert_eq!(phx.close_code().await, Some(1007), "{garbage:?}");
    }
    eventually_metric(
        &hub,
        "prostaff_inbound_rejected_total",
        "reason=\"undecodable\"",
        3.0,
    )
    .await;
}

#[tokio::test]
async fn the_101st_channel_is_refused_with_the_default_limit() {
    let (_redis, hub) = hub_with(|c| c.limits.max_pushes_per_second = None).await;
    let mut phx = Phx::connect(&hub, &internal_token()).await;
    for i in 0..100 {
        phx.join_ok(&format!("tournament:{i}")).await;
    }
    let reply = phx.join("tournament:100", json!({})).await;
    assert_eq!(reply[4]["response"]["reason"], "too many channels joined");
    assert!(
        metric_value(
            &hub.metrics().await,
            "prostaff_channel_joins_total",
            &["outcome=\"too_many_channels\""]
        ) >= 1.0
    );
}

#[tokio::test]
async fn push_floods_get_rate_limited_replies_and_heartbeats_still_work() {
    let (_redis, hub) = hub_with(|c| c.limits.max_pushes_per_second = Some(5)).await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    let join_ref = phx.join_ok("inhouse:o1").await;
    for i in 0..30 {
        phx.send(
            json!([join_ref, format!("f{i}"), "inhouse:o1", "leave_queue", {"player_id": "p"}]),
        )
        .await;
    }
    let mut limited = 0;
    for i in 0..30 {
        let reply = phx.reply(&format!("f{i}")).await;
        if reply[4]["response"]["reason"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(
        limited >= 20,
        "only {limited} of 30 flooded pushes were rate limited"
    );
    phx.send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(phx.reply("hb").await[4]["status"], "ok");
    assert!(
        metric_value(
            &hub.metrics().await,
            "prostaff_inbound_rejected_total",
            &["reason=\"rate_limited\""]
        ) >= 20.0
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_refused() {
    let (_redis, hub) = hub_with(|c| c.limits.max_connections = Some(2)).await;
    let url = hub.ws_url(&format!("vsn=2.0.0&token={}", user_token("u1", "o1")));
    let first = Phx::connect_url(&url).await;
    let _second = Phx::connect_url(&url).await;
    assert_eq!(upgrade_status(&url, &[]).await, 503);
    drop(first);
    eventually("a slot frees up when a socket closes", || async {
        upgrade_status(&url, &[]).await == 101
    })
    .await;
    assert!(
        metric_value(
            &hub.metrics().await,
            "prostaff_socket_connects_total",
            &["outcome=\"too_many_connections\""]
        ) >= 1.0
    );
}

#[tokio::test]
async fn idle_sockets_are_closed_with_1001() {
    let (_redis, hub) = hub_with(|c| c.limits.idle_timeout = Duration::from_millis(400)).await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    assert_eq!(phx.close_code().await, Some(1001));
    eventually_metric(
        &hub,
        "prostaff_socket_closes_total",
        "reason=\"idle_timeout\"",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn heartbeats_keep_a_socket_open_past_the_idle_timeout() {
    let (_redis, hub) = hub_with(|c| c.limits.idle_timeout = Duration::from_millis(400)).await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    // 1.5 s of heartbeats every 100 ms: almost four idle periods, each one re-armed.
    for i in 0..15 {
        let msg_ref = format!("hb{i}");
        phx.send(json!([null, msg_ref, "phoenix", "heartbeat", {}]))
            .await;
        let reply = phx.recv().await;
        assert_eq!(
            reply[1],
            json!(msg_ref),
            "the socket is still served: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Silence closes it.
    assert_eq!(phx.close_code().await, Some(1001));
}

#[tokio::test]
async fn a_token_with_exp_closes_the_socket_with_1008_when_it_expires() {
    let (_redis, hub) = hub_with(|_| {}).await;
    let token = prostaff_events::auth::mint(
        SECRET,
        &json!({"user_id": "u1", "org_id": "o1", "exp": prostaff_events::auth::unix_now() + 2}),
    );
    let mut phx = Phx::connect(&hub, &token).await;
    phx.join_ok("org_events:o1").await;
    assert_eq!(phx.close_code().await, Some(1008));
    eventually_metric(
        &hub,
        "prostaff_socket_closes_total",
        "reason=\"token_expired\"",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn redis_absent_at_start_then_started() {
    let mut redis = RedisServer::reserved();
    let rails = FakeRails::start(json!([])).await;
    let hub = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    let org = unique("org");
    // The hub serves sockets without Redis.
    let mut phx = Phx::connect(&hub, &user_token("u1", &org)).await;
    phx.join_ok(&format!("org_events:{org}")).await;
    let ready = reqwest::get(hub.http("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["redis"], "disconnected");

    redis.spawn();
    eventually("readiness 200 once redis is up", || async {
        reqwest::get(hub.http("/health/ready"))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    let message =
        json!({"type": "player.transferred", "org_id": org, "user_id": "u1", "payload": {}})
            .to_string();
    assert!(
        redis
            .publish_when_subscribed(&format!("prostaff:events:{org}"), &message, 1)
            .await
    );
    phx.event(&format!("org_events:{org}"), "player.transferred")
        .await;
}

#[tokio::test]
async fn bad_http_input_is_4xx_json_never_5xx() {
    let (_redis, hub) = hub_with(|_| {}).await;
    let client = reqwest::Client::new();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("application/json", b"{".to_vec()),
        ("application/json", b"null".to_vec()),
        ("application/json", b"\"string\"".to_vec()),
        (
            "application/json",
            br#"{"type":["x"],"org_id":{"a":1}}"#.to_vec(),
        ),
        (
            "application/json",
            br#"{"type":"t","org_id":"o","user_id":false}"#.to_vec(),
        ),
        ("application/json", vec![0xff, 0xfe, 0x00]),
        ("application/json", vec![b'['; 300_000]),
        ("text/plain", br#"{"type":"t","org_id":"o"}"#.to_vec()),
        ("multipart/form-data; boundary=x", b"--x--".to_vec()),
    ];
    for route in ["/events/notify", "/api/events"] {
        for (content_type, body) in &bodies {
            let response = client
                .post(hub.http(route))
                .header("x-api-key", SCRAPER_KEY)
                .bearer_auth(internal_token())
                .header("content-type", *content_type)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = response.status();
            assert!(
                status.is_client_error(),
                "{route} {content_type} {} bytes → {status}",
                body.len()
            );
            let json: Value = response.json().await.expect("error bodies are JSON");
            assert!(json["error"].is_string(), "{json}");
        }
        let wrong_method = client.get(hub.http(route)).send().await.unwrap();
        assert_eq!(wrong_method.status(), 405);
        assert!(wrong_method.json::<Value>().await.unwrap()["error"].is_string());
    }
}

/// Opens a socket with a tiny receive buffer that joins `topic` and then stops reading.
pub async fn stalled_client(hub: &TestHub, token: &str, topic: &str) -> Phx {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(hub.addr).await.unwrap();
    let url = hub.ws_url(&format!("vsn=2.0.0&token={token}"));
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut phx = Phx::from_ws(ws);
    phx.join_ok(topic).await;
    phx
}

/// Publishes `count` events of `padding` bytes on `org`'s channel, pacing the publisher a little so
/// the test measures the hub rather than a burst from one Redis connection per event.
pub async fn flood(redis: &RedisServer, org: &str, event_type: &str, count: usize, padding: usize) {
    let padding = "p".repeat(padding);
    let mut connection = redis.connection();
    for seq in 0..count {
        let message = json!({"type": event_type, "org_id": org, "user_id": "u", "payload": {"seq": seq, "padding": padding}}).to_string();
        connection.publish(&format!("prostaff:events:{org}"), &message);
        if seq % 50 == 49 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_loses_only_its_own_oldest_broadcasts() {
    const OTHERS: usize = 1000;
    const SHARED: usize = 300;
    const FLOOD: usize = 2000;
    // The outbox bound this test overflows is set here (the default is bigger than the flood).
    let (redis, hub) = hub_with(|c| {
        c.limits.write_timeout = Duration::from_secs(120);
        c.limits.outbound_buffer_frames = 1024;
    })
    .await;
    hub.wait_redis_ready().await;
    let (org, private_org) = (unique("org"), unique("private"));
    let shared = format!("org_events:{org}");
    let private = format!("org_events:{private_org}");
    // The slow client joins the shared topic and a private one that only it receives, then
    // stops reading.
    let mut slow = stalled_client(&hub, &internal_token(), &shared).await;
    slow.join_ok(&private).await;

    let mut readers = Vec::new();
    for i in 0..OTHERS {
        let mut phx = Phx::connect(&hub, &user_token(&format!("u{i}"), &org)).await;
        phx.join_ok(&shared).await;
        readers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < SHARED {
                let frame = phx.recv().await;
                if frame[3] == "team_goal.progress_updated" {
                    assert_eq!(
                        frame[4]["payload"]["seq"], seen,
                        "events arrive in order, none missing"
                    );
                    seen += 1;
                }
            }
            seen
        }));
    }
    let before = metric_value(
        &hub.metrics().await,
        "prostaff_broadcasts_dropped_total",
        &["reason=\"slow_consumer\""],
    );
    // 16 MB that only the stalled client subscribes to: more than its kernel buffers and its
    // 1,024-frame outbox can hold.
    flood(&redis, &private_org, "team_goal.missed", FLOOD, 8 * 1024).await;
    flood(&redis, &org, "team_goal.progress_updated", SHARED, 64).await;
    for reader in readers {
        assert_eq!(
            reader.await.unwrap(),
            SHARED,
            "every healthy client gets every event"
        );
    }

    // Now the slow client reads: per topic, what it got plus what it was told it lost is all.
    let (mut shared_received, mut shared_dropped, mut flood_received, mut flood_dropped) =
        (0u64, 0u64, 0u64, 0u64);
    while shared_received + shared_dropped < SHARED as u64
        || flood_received + flood_dropped < FLOOD as u64
    {
        let frame = slow.recv().await;
        match (frame[2].as_str(), frame[3].as_str()) {
            (_, Some("team_goal.progress_updated")) => shared_received += 1,
            (_, Some("team_goal.missed")) => flood_received += 1,
            (Some(topic), Some("events_dropped")) => {
                assert_eq!(
                    (frame[0].clone(), frame[1].clone()),
                    (Value::Null, Value::Null)
                );
                let count = frame[4]["count"].as_u64().unwrap();
                if topic == shared {
                    shared_dropped += count;
                } else {
                    assert_eq!(topic, private);
                    flood_dropped += count;
                }
            }
            _ => {}
        }
    }
    assert_eq!(shared_received + shared_dropped, SHARED as u64);
    assert_eq!(flood_received + flood_dropped, FLOOD as u64);
    assert!(
        flood_dropped > 0,
        "the stalled client's outbox is bounded, so its oldest broadcasts were dropped"
    );
    let after = metric_value(
        &hub.metrics().await,
        "prostaff_broadcasts_dropped_total",
        &["reason=\"slow_consumer\""],
    );
    assert!(
        after - before >= (flood_dropped + shared_dropped) as f64,
        "drops are counted: {before} → {after}"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_after_the_write_timeout() {
    let (redis, hub) = hub_with(|c| c.limits.write_timeout = Duration::from_millis(500)).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let mut slow = stalled_client(
        &hub,
        &user_token("slow", &org),
        &format!("org_events:{org}"),
    )
    .await;
    let before = metric_value(
        &hub.metrics().await,
        "prostaff_socket_closes_total",
        &["reason=\"write_timeout\""],
    );
    flood(&redis, &org, "team_goal.missed", 2000, 8 * 1024).await;
    eventually_metric(
        &hub,
        "prostaff_socket_closes_total",
        "reason=\"write_timeout\"",
        before + 1.0,
    )
    .await;
    // The client sees its connection end (with 1013 when the close frame still fits).
    let code = slow.close_code().await;
    assert!(code.is_none() || code == Some(1013), "{code:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_lost_in_a_timed_out_write_are_counted_as_dropped() {
    const EVENTS: usize = 200;
    let (redis, hub) = hub_with(|c| c.limits.write_timeout = Duration::from_millis(500)).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let mut slow = stalled_client(
        &hub,
        &user_token("slow", &org),
        &format!("org_events:{org}"),
    )
    .await;
    let dropped = |text: &str| {
        metric_value(
            text,
            "prostaff_broadcasts_dropped_total",
            &["reason=\"write_timeout\""],
        )
    };
    let before = dropped(&hub.metrics().await);
    let closes = metric_value(
        &hub.metrics().await,
        "prostaff_socket_closes_total",
        &["reason=\"write_timeout\""],
    );
    // Fewer than one drain batch (256), so most of them sit in the write that times out.
    flood(&redis, &org, "team_goal.missed", EVENTS, 60 * 1024).await;
    eventually_metric(
        &hub,
        "prostaff_socket_closes_total",
        "reason=\"write_timeout\"",
        closes + 1.0,
    )
    .await;
    let counted = dropped(&hub.metrics().await) - before;
    // Whatever did reach the client, plus what was counted, covers every event published.
    let mut received = 0;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::StreamExt::next(&mut slow.ws),
    )
    .await
    {
        if let Message::Text(text) = message {
            received += usize::from(text.contains("team_goal.missed"));
        }
    }
    assert!(
        counted as usize + received >= EVENTS,
        "{counted} counted + {received} received < {EVENTS} published: losses went uncounted"
    );
}
