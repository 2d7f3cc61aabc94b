//! Hub core over a real socket: handshake, authentication, topic families, Phoenix lifecycle.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

async fn hub() -> (RedisServer, TestHub) {
    redis_and_ready_hub().await
}

#[tokio::test]
async fn health_is_exact_and_has_request_id() {
    let (_redis, hub) = hub().await;
    let response = reqwest::get(hub.http("/health")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-request-id").is_some());
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ok", "service": "prostaff-events", "vsn": env!("CARGO_PKG_VERSION")})
    );
}

#[tokio::test]
async fn refused_upgrades_are_403_before_the_handshake() {
    let (_redis, hub) = hub().await;
    let good = user_token("u1", "o1");
    assert_eq!(
        upgrade_status(&hub.ws_url(&format!("vsn=2.0.0&token={good}")), &[]).await,
        101
    );
    assert_eq!(
        upgrade_status(&hub.ws_url(&format!("vsn=9.0.0&token={good}")), &[]).await,
        403
    );
    assert_eq!(upgrade_status(&hub.ws_url("vsn=2.0.0"), &[]).await, 403);
    let wrong_secret =
        prostaff_events::auth::mint("not-the-secret", &json!({"user_id": "u1", "org_id": "o1"}));
    let expired = prostaff_events::auth::mint(
        SECRET,
        &json!({"user_id": "u1", "org_id": "o1", "exp": 1000}),
    );
    let no_claims = prostaff_events::auth::mint(SECRET, &json!({"sub": "u1"}));
    // alg none: header {"alg":"none"} + claims + empty signature.
    let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ1c2VyX2lkIjoidTEiLCJvcmdfaWQiOiJvMSJ9.";
    for token in [
        wrong_secret.as_str(),
        expired.as_str(),
        no_claims.as_str(),
        alg_none,
        "garbage",
    ] {
        assert_eq!(
            upgrade_status(&hub.ws_url(&format!("vsn=2.0.0&token={token}")), &[]).await,
            403,
            "{token}"
        );
    }
    // The bearer header is accepted too.
    let bearer = format!("Bearer {good}");
    assert_eq!(
        upgrade_status(&hub.ws_url("vsn=2.0.0"), &[("authorization", &bearer)]).await,
        101
    );
    // Rails access tokens signed with JWT_SECRET_KEY.
    let rails = prostaff_events::auth::mint(
        RAILS_SECRET,
        &json!({"user_id": 5, "organization_id": 7, "exp": prostaff_events::auth::unix_now() + 60}),
    );
    assert_eq!(
        upgrade_status(&hub.ws_url(&format!("vsn=2.0.0&token={rails}")), &[]).await,
        101
    );
    let metrics = hub.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "prostaff_socket_connects_total",
            &["outcome=\"bad_vsn\""]
        ) >= 1.0
    );
    assert!(
        metric_value(
            &metrics,
            "prostaff_socket_connects_total",
            &["outcome=\"token_expired\""]
        ) >= 1.0
    );
}

#[tokio::test]
async fn auth_token_subprotocol_is_answered_with_phoenix() {
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use base64::Engine;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (_redis, hub) = hub().await;
    let token = user_token("u1", "o1");
    let protocols = format!(
        "phoenix, base64url.bearer.phx.{}",
        STANDARD_NO_PAD.encode(&token)
    );
    let mut request = hub.ws_url("vsn=2.0.0").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade with authToken");
    assert_eq!(response.headers()["sec-websocket-protocol"], "phoenix");
    let mut phx = Phx::from_ws(ws);
    phx.join_ok("notifications:u1").await;
    // A subprotocol list without `phoenix` is refused.
    assert_eq!(
        upgrade_status(
            &hub.ws_url(&format!("vsn=2.0.0&token={token}")),
            &[("sec-websocket-protocol", "chat")]
        )
        .await,
        403
    );
}

#[tokio::test]
async fn origin_check() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.origins =
        prostaff_events::config::OriginPolicy::List(vec!["https://app.prostaff.gg".into()]);
    let hub = TestHub::start(config).await;
    let url = hub.ws_url(&format!("vsn=2.0.0&token={}", user_token("u1", "o1")));
    assert_eq!(
        upgrade_status(&url, &[("origin", "https://app.prostaff.gg")]).await,
        101
    );
    assert_eq!(
        upgrade_status(&url, &[("origin", "https://evil.example")]).await,
        403
    );
    // CORS answers only the allowed origin.
    let client = reqwest::Client::new();
    let preflight = client
        .request(reqwest::Method::OPTIONS, hub.http("/events/notify"))
        .header("origin", "https://app.prostaff.gg")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.prostaff.gg"
    );
}

#[tokio::test]
async fn heartbeat_join_leave_and_refs_as_strings() {
    let (_redis, hub) = hub().await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    phx.send(json!([null, "7", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        phx.recv().await,
        json!([null, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );

    phx.send(json!(["3", "3", "org_events:o1", "phx_join", {}]))
        .await;
    assert_eq!(
        strip_position(phx.recv().await),
        json!(["3", "3", "org_events:o1", "phx_reply", {"status": "ok", "response": {}}])
    );

    phx.send(json!(["3", "4", "org_events:o1", "phx_leave", {}]))
        .await;
    assert_eq!(
        phx.recv().await,
        json!(["3", "4", "org_events:o1", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        phx.recv().await,
        json!(["3", "3", "org_events:o1", "phx_close", {}])
    );

    // Leave of a topic not joined: ok, and no close.
    phx.send(json!(["9", "10", "org_events:o1", "phx_leave", {}]))
        .await;
    assert_eq!(
        phx.recv().await,
        json!(["9", "10", "org_events:o1", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert!(phx.silent_for(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn unmatched_topics_and_unauthorized_joins() {
    let (_redis, hub) = hub().await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    phx.send(json!(["1", "1", "rooms:lobby", "phx_join", {}]))
        .await;
    assert_eq!(
        phx.recv().await,
        json!([null, "1", "rooms:lobby", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    phx.send(json!(["2", "2", "org_events:o1", "some_event", {}]))
        .await;
    assert_eq!(
        phx.recv().await,
        json!([null, "2", "org_events:o1", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    phx.send(json!(["3", "3", "org_events:o2", "phx_join", {}]))
        .await;
    assert_eq!(
        phx.recv().await,
        json!(["3", "3", "org_events:o2", "phx_reply", {"status": "error", "response": {"reason": "unauthorized"}}])
    );
    phx.send(json!(["4", "4", "notifications:u2", "phx_join", {}]))
        .await;
    assert_eq!(phx.recv().await[4]["response"]["reason"], "unauthorized");
}

#[tokio::test]
async fn join_matrix_per_identity() {
    let (_redis, hub) = hub().await;
    let cases = [
        (
            user_token("u1", "o1"),
            vec![
                ("notifications:u1", true),
                ("notifications:u2", false),
                ("tournament:9", true),
                ("inhouse:o1", true),
                ("inhouse:o2", false),
                ("org_events:o1", true),
                ("org_events:o2", false),
            ],
        ),
        (
            player_token("p1", "o1"),
            vec![
                ("notifications:p1", false),
                ("tournament:9", true),
                ("inhouse:o1", true),
                ("inhouse:o2", false),
                ("org_events:o1", true),
                ("org_events:o2", false),
            ],
        ),
        (
            internal_token(),
            vec![
                ("notifications:u7", true),
                ("tournament:9", true),
                ("inhouse:o5", true),
                ("org_events:o5", true),
            ],
        ),
    ];
    for (token, topics) in cases {
        let mut phx = Phx::connect(&hub, &token).await;
        for (topic, allowed) in topics {
            let reply = phx.join(topic, json!({})).await;
            let expected = if allowed { "ok" } else { "error" };
            assert_eq!(reply[4]["status"], expected, "{topic}: {reply}");
        }
    }
}

#[tokio::test]
async fn duplicate_join_closes_the_old_channel_after_the_new_reply() {
    let (_redis, hub) = hub().await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    phx.send(json!(["1", "1", "org_events:o1", "phx_join", {}]))
        .await;
    assert_eq!(phx.recv().await[4]["status"], "ok");
    phx.send(json!(["2", "2", "org_events:o1", "phx_join", {}]))
        .await;
    assert_eq!(
        strip_position(phx.recv().await),
        json!(["2", "2", "org_events:o1", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        phx.recv().await,
        json!(["1", "1", "org_events:o1", "phx_close", {}])
    );
    // One subscription remains: one broadcast arrives once.
    let status = reqwest::Client::new()
        .post(hub.http("/events/notify"))
        .header("x-api-key", SCRAPER_KEY)
        .json(&json!({"type": "scraper.done", "org_id": "o1"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let event = phx.event("org_events:o1", "scraper.done").await;
    assert_eq!(event[0], Value::Null);
    assert!(phx.silent_for(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn stale_join_ref_frames_are_ignored() {
    let (_redis, hub) = hub().await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    let join_ref = phx.join_ok("inhouse:o1").await;
    phx.send(json!(["stale", "5", "inhouse:o1", "leave_queue", {"player_id": "p"}]))
        .await;
    phx.send(json!(["stale", "6", "inhouse:o1", "phx_leave", {}]))
        .await;
    assert!(phx.silent_for(Duration::from_millis(300)).await);
    // The channel is still joined: a push with the right join_ref is answered.
    let reply = phx
        .push(
            &join_ref,
            "inhouse:o1",
            "leave_queue",
            json!({"player_id": "p"}),
        )
        .await;
    assert_eq!(reply[4]["response"]["reason"], "no_active_queue");
    // A null join_ref is accepted.
    phx.send(json!([null, "8", "inhouse:o1", "leave_queue", {"player_id": "p"}]))
        .await;
    let reply = phx.reply("8").await;
    assert_eq!(reply[0], join_ref.as_str());
}

#[tokio::test]
async fn channel_limit_per_socket() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.limits.max_channels_per_socket = 3;
    let hub = TestHub::start(config).await;
    let mut phx = Phx::connect(&hub, &internal_token()).await;
    for i in 0..3 {
        phx.join_ok(&format!("tournament:{i}")).await;
    }
    let reply = phx.join("tournament:99", json!({})).await;
    assert_eq!(
        reply[4],
        json!({"status": "error", "response": {"reason": "too many channels joined"}})
    );
    // Re-joining an already joined topic is not a new channel.
    phx.join_ok("tournament:0").await;
}

#[tokio::test]
async fn v1_serializer_speaks_objects() {
    let (_redis, hub) = hub().await;
    let mut phx = Phx::connect_url(&hub.ws_url(&format!("token={}", user_token("u1", "o1")))).await;
    phx.send(json!({"topic": "org_events:o1", "event": "phx_join", "payload": {}, "ref": "1"}))
        .await;
    assert_eq!(
        strip_position(phx.recv().await),
        json!({"topic": "org_events:o1", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "1"})
    );
    reqwest::Client::new()
        .post(hub.http("/events/notify"))
        .header("x-api-key", SCRAPER_KEY)
        .json(&json!({"type": "scraper.done", "org_id": "o1", "payload": {"n": 1}}))
        .send()
        .await
        .unwrap();
    let event = phx.recv().await;
    assert_eq!(event["event"], "scraper.done");
    // V1 carries the history position in `ref` too.
    assert!(
        event["ref"]
            .as_str()
            .and_then(prostaff_events::history::Position::parse)
            .is_some(),
        "{event}"
    );
    assert_eq!(event["payload"]["payload"]["n"], 1);
}

#[tokio::test]
async fn binary_pushes_are_decoded_and_answered() {
    let (_redis, hub) = hub().await;
    let mut phx = Phx::connect(&hub, &user_token("u1", "o1")).await;
    let join_ref = phx.join_ok("inhouse:o1").await;
    let (topic, event, msg_ref) = ("inhouse:o1", "checkin", "42");
    let mut frame = vec![
        0u8,
        join_ref.len() as u8,
        msg_ref.len() as u8,
        topic.len() as u8,
        event.len() as u8,
    ];
    for field in [join_ref.as_str(), msg_ref, topic, event] {
        frame.extend_from_slice(field.as_bytes());
    }
    frame.extend_from_slice(&[1, 2, 3]);
    phx.send_raw(Message::Binary(frame.into())).await;
    let reply = phx.reply("42").await;
    assert_eq!(
        reply,
        json!([join_ref, "42", "inhouse:o1", "phx_reply", {"status": "error", "response": {"reason": "invalid_params"}}])
    );
}

#[tokio::test]
async fn force_ssl_redirects_and_sets_hsts() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.force_ssl = true;
    config.phx_host = "events.prostaff.gg".into();
    let hub = TestHub::start(config).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let redirect = client
        .get(hub.http("/health?x=1"))
        .header("x-forwarded-proto", "http")
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 301);
    assert_eq!(
        redirect.headers()["location"],
        "https://events.prostaff.gg/health?x=1"
    );
    let secure = client
        .get(hub.http("/health"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(secure.status(), 200);
    assert!(secure.headers()["strict-transport-security"]
        .to_str()
        .unwrap()
        .contains("max-age="));
}

#[tokio::test]
async fn graceful_shutdown_closes_sockets_with_1012() {
    let (_redis, hub) = hub().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut phx = Phx::connect(&hub, &user_token(&format!("u{i}"), "o1")).await;
        phx.join_ok("org_events:o1").await;
        clients.push(phx);
    }
    let shutdown = tokio::spawn(hub.shutdown());
    for phx in &mut clients {
        assert_eq!(phx.close_code().await, Some(1012));
    }
    shutdown.await.unwrap().unwrap();
}
