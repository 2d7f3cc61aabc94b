//! Event ingestion: Redis envelopes routed to topics, drop reasons, Redis outages, the HTTP
//! publish paths, multi-instance delivery, readiness and metrics.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

async fn notify(hub: &TestHub, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(hub.http("/events/notify"))
        .header("x-api-key", SCRAPER_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn routing_matrix_observed_by_joined_sockets() {
    let (redis, hub) = redis_and_ready_hub().await;
    let (org, user, tournament) = (unique("org"), unique("user"), unique("t"));
    let mut phx = Phx::connect(&hub, &internal_token()).await;
    let topics = [
        format!("org_events:{org}"),
        format!("notifications:{user}"),
        format!("tournament:{tournament}"),
        format!("inhouse:{org}"),
    ];
    for topic in &topics {
        phx.join_ok(topic).await;
    }
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "notification.created",
            json!({"title": "hi"}),
            vec!["org_events", "notifications"],
        ),
        (
            "tournament_match.confirmed",
            json!({"tournament_id": tournament}),
            vec!["org_events", "tournament"],
        ),
        ("tournament_match.walkover", json!({}), vec!["org_events"]),
        (
            "inhouse.session_started",
            json!({"queue_id": "nope"}),
            vec!["org_events", "inhouse"],
        ),
        ("team_goal.completed", json!({}), vec!["org_events"]),
        ("scrim_request.accepted", json!({}), vec!["org_events"]),
    ];
    for (event_type, payload, expected) in cases {
        let message = Event::new(&org, event_type)
            .user(&user)
            .payload(payload)
            .text();
        assert!(
            redis
                .publish_when_subscribed(&format!("prostaff:events:{org}"), &message, 1)
                .await
        );
        let frames = phx.collect(Duration::from_millis(300)).await;
        let reached: BTreeSet<String> = frames
            .iter()
            .filter(|f| f[3] == event_type)
            .map(|f| {
                f[2].as_str()
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(reached, expected, "{event_type}");
        // The payload is the envelope exactly as published.
        for frame in frames.iter().filter(|f| f[3] == event_type) {
            assert_eq!(frame[4], serde_json::from_str::<Value>(&message).unwrap());
            // A broadcast: no join_ref; its history position in the ref slot.
            assert_eq!(frame[0], Value::Null);
            assert!(
                frame[1]
                    .as_str()
                    .and_then(prostaff_events::history::Position::parse)
                    .is_some(),
                "{frame}"
            );
        }
    }
    wait_for_log(&[
        "Unrouted event",
        "event_type=team_goal.completed",
        &format!("org={org}"),
    ])
    .await;
}

#[tokio::test]
async fn versions_and_drops_are_logged_without_payload() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let channel = format!("prostaff:events:{org}");
    let mut phx = Phx::connect(&hub, &user_token("u1", &org)).await;
    phx.join_ok(&format!("org_events:{org}")).await;
    let before = hub.metrics().await;

    let secret = unique("s3cr3t");
    let base = json!({"type": "player.transferred", "org_id": org, "user_id": "u1", "payload": {"ssn": secret}});
    let with = |patch: Value| {
        let mut value = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                value.as_object_mut().unwrap().remove(k);
            } else {
                value[k] = v.clone();
            }
        }
        value.to_string()
    };
    // Accepted versions.
    for (i, version) in [Value::Null, json!("1"), json!(1)].into_iter().enumerate() {
        let message = with(json!({"version": version, "id": format!("ok-{i}")}));
        assert!(redis.publish_when_subscribed(&channel, &message, 1).await);
        let event = phx
            .event(&format!("org_events:{org}"), "player.transferred")
            .await;
        assert_eq!(event[4]["id"], format!("ok-{i}"));
    }
    // Dropped ones, each followed by a valid event that must still be delivered.
    let drops: Vec<(String, &str)> = vec![
        (with(json!({"version": "99"})), "unsupported version=\"99\""),
        (with(json!({"version": 2})), "unsupported version=2"),
        (
            with(json!({"user_id": null})),
            "missing or invalid field(s): user_id",
        ),
        (
            with(json!({"org_id": null})),
            "missing or invalid field(s): org_id",
        ),
        (
            with(json!({"type": null})),
            "missing or invalid field(s): type",
        ),
        (
            with(json!({"type": 42})),
            "missing or invalid field(s): type",
        ),
        (format!("not json {secret}"), "invalid JSON"),
    ];
    for (i, (message, reason)) in drops.iter().enumerate() {
        assert!(redis.publish_when_subscribed(&channel, message, 1).await);
        wait_for_log(&["dropped event", reason, &channel]).await;
        let next = with(json!({"id": format!("after-{i}")}));
        assert!(redis.publish_when_subscribed(&channel, &next, 1).await);
        let event = phx
            .event(&format!("org_events:{org}"), "player.transferred")
            .await;
        assert_eq!(
            event[4]["id"],
            format!("after-{i}"),
            "the subscriber keeps delivering after: {reason}"
        );
    }
    assert!(
        !all_logs().contains(&secret),
        "the payload must never be logged"
    );
    let after = hub.metrics().await;
    let outcome = |text: &str, label: &str| {
        metric_value(
            text,
            "prostaff_events_received_total",
            &[&format!("outcome=\"{label}\"")],
        )
    };
    assert!(
        outcome(&after, "unsupported_version") >= outcome(&before, "unsupported_version") + 2.0
    );
    assert!(outcome(&after, "invalid_fields") >= outcome(&before, "invalid_fields") + 4.0);
    assert!(outcome(&after, "invalid_json") >= outcome(&before, "invalid_json") + 1.0);
}

async fn ready_status(hub: &TestHub) -> (u16, Value) {
    let response = reqwest::get(hub.http("/health/ready")).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn redis_restart_mid_test() {
    let mut redis = RedisServer::start();
    let rails = FakeRails::start(json!([])).await;
    let hub = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    hub.wait_redis_ready().await;
    assert_eq!(ready_status(&hub).await.0, 200);
    let org = unique("org");
    let mut phx = Phx::connect(&hub, &user_token("u1", &org)).await;
    phx.join_ok(&format!("org_events:{org}")).await;

    redis.stop();
    eventually("readiness 503 while redis is down", || async {
        ready_status(&hub).await.0 == 503
    })
    .await;
    let last = ready_status(&hub).await;
    assert_eq!(last.1["status"], "unavailable");
    assert_ne!(last.1["checks"]["redis"], "ok");
    assert_eq!(last.1["checks"]["rails"], "ok");
    // The client stays connected meanwhile.
    phx.send(json!([null, "hb", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(phx.reply("hb").await[4]["status"], "ok");

    redis.spawn();
    eventually("readiness 200 after redis restart", || async {
        ready_status(&hub).await.0 == 200
    })
    .await;
    let message = Event::new(&org, "roster.player_removed")
        .user("u1")
        .payload(json!({"n": 1}))
        .text();
    assert!(
        redis
            .publish_when_subscribed(&format!("prostaff:events:{org}"), &message, 1)
            .await
    );
    let event = phx
        .event(&format!("org_events:{org}"), "roster.player_removed")
        .await;
    assert_eq!(event[4]["payload"]["n"], 1);
    assert!(metric_value(&hub.metrics().await, "prostaff_redis_reconnects_total", &[]) >= 1.0);
}

#[tokio::test]
async fn notify_statuses_and_bodies() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let client = reqwest::Client::new();
    let url = hub.http("/events/notify");
    let post = |key: Option<&str>, content_type: &str, body: Vec<u8>| {
        let mut request = client
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        request.send()
    };
    let valid = br#"{"type":"scraper.match_found","org_id":"o1","payload":{"m":1}}"#.to_vec();
    // (api key, content type, body, expected status, expected error)
    type Case<'a> = (Option<&'a str>, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            Some(SCRAPER_KEY),
            "application/json",
            valid.clone(),
            200,
            "",
        ),
        (None, "application/json", valid.clone(), 401, "unauthorized"),
        (
            Some("wrong"),
            "application/json",
            valid.clone(),
            401,
            "unauthorized",
        ),
        (
            Some(SCRAPER_KEY),
            "application/json",
            br#"{"payload":{}}"#.to_vec(),
            422,
            "missing required fields: type, org_id",
        ),
        (
            Some(SCRAPER_KEY),
            "application/json",
            br#"{"type":"x"}"#.to_vec(),
            422,
            "missing required fields: org_id",
        ),
        (
            Some(SCRAPER_KEY),
            "application/json",
            br#"{"type":7,"org_id":"o"}"#.to_vec(),
            422,
            "missing required fields: type",
        ),
        (
            Some(SCRAPER_KEY),
            "application/json",
            b"{not json".to_vec(),
            400,
            "malformed JSON body",
        ),
        (
            Some(SCRAPER_KEY),
            "application/json",
            b"[1,2]".to_vec(),
            400,
            "body must be a JSON object",
        ),
        (
            Some(SCRAPER_KEY),
            "text/plain",
            valid.clone(),
            415,
            "content-type must be application/json",
        ),
        (
            Some(SCRAPER_KEY),
            "application/json",
            vec![b' '; 200 * 1024],
            413,
            "request body too large",
        ),
    ];
    for (key, content_type, body, status, error) in cases {
        let response = post(key, content_type, body).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{error}");
        let body: Value = response.json().await.expect("every answer is JSON");
        if status == 200 {
            assert_eq!(body["ok"], true);
            assert_eq!(body["delivery"], "redis");
        } else {
            assert_eq!(body["error"], error);
        }
    }
    // An empty configured key refuses everything.
    let redis2 = RedisServer::start();
    let mut config = test_config(&redis2.url(), "http://127.0.0.1:9");
    config.scraper_api_key = String::new();
    let locked = TestHub::start(config).await;
    let response = client
        .post(locked.http("/events/notify"))
        .header("x-api-key", "")
        .json(&json!({"type": "t", "org_id": "o"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn api_events_requires_an_internal_token() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let mut phx = Phx::org_member(&hub, &org).await;
    let client = reqwest::Client::new();
    let body = json!({"type": "team_goal.at_risk", "org_id": org, "payload": {"goal": 1}});
    for token in [
        None,
        Some(user_token("u1", &org)),
        Some("garbage".to_string()),
    ] {
        let mut request = client.post(hub.http("/api/events")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), 401);
    }
    let response = client
        .post(hub.http("/api/events"))
        .bearer_auth(internal_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let event = phx
        .event(&format!("org_events:{org}"), "team_goal.at_risk")
        .await;
    assert_eq!(event[4]["id"], accepted["id"]);
    assert_eq!(event[4]["user_id"], "system");
    assert!(event[4]["published_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn notify_on_hub_a_reaches_a_client_on_hub_b() {
    let redis = RedisServer::start();
    let (hub_a, hub_b) = two_hubs(&redis).await;
    let org = unique("org");
    let mut on_b = Phx::connect(&hub_b, &user_token("u1", &org)).await;
    on_b.join_ok(&format!("org_events:{org}")).await;
    let response = notify(
        &hub_a,
        json!({"type": "scraper.match_found", "org_id": org, "payload": {"from": "a"}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let event = on_b
        .event(&format!("org_events:{org}"), "scraper.match_found")
        .await;
    assert_eq!(event[4]["payload"]["from"], "a");
}

#[tokio::test]
async fn notify_is_delivered_locally_when_redis_is_down() {
    let redis = RedisServer::reserved();
    let hub = TestHub::with_redis(&redis).await;
    let org = unique("org");
    let mut phx = Phx::connect(&hub, &user_token("u1", &org)).await;
    phx.join_ok(&format!("org_events:{org}")).await;
    let response = notify(&hub, json!({"type": "scraper.match_found", "org_id": org})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["delivery"], "local");
    phx.event(&format!("org_events:{org}"), "scraper.match_found")
        .await;
}

#[tokio::test]
async fn readiness_with_rails_up_down_and_hanging() {
    let redis = RedisServer::start();
    let rails = FakeRails::start(json!([])).await;
    let hub = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    hub.wait_redis_ready().await;
    let (status, body) = ready_status(&hub).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"status": "ok", "checks": {"redis": "ok", "rails": "ok"}})
        )
    );

    // Rails trouble is reported, but Redis alone decides the status code (the default).
    rails.set_mode(RailsMode::Failing);
    let (status, body) = ready_status(&hub).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["checks"],
        json!({"redis": "ok", "rails": "status 500"})
    );

    rails.set_mode(RailsMode::Hanging);
    let started = Instant::now();
    let (status, body) = ready_status(&hub).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(body["checks"]["rails"], "timeout");
    // Bounded by the check timeout (2.5 s), not by Rails; generous margin for a loaded machine.
    assert!(
        elapsed < Duration::from_secs(6),
        "readiness took {elapsed:?}"
    );

    // With READINESS_REQUIRES_RAILS (the original behaviour) Rails being down is a 503.
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.readiness_requires_rails = true;
    let hub_without_rails = TestHub::start(config).await;
    hub_without_rails.wait_redis_ready().await;
    let (status, body) = ready_status(&hub_without_rails).await;
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["rails"], "connection refused");
}

#[tokio::test]
async fn metrics_expose_the_documented_series() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let mut phx = Phx::org_member(&hub, &org).await;
    notify(&hub, json!({"type": "scraper.x", "org_id": org})).await;
    phx.event(&format!("org_events:{org}"), "scraper.x").await;
    let text = hub.metrics().await;
    for name in [
        "prostaff_sockets_connected",
        "prostaff_channels_joined",
        "prostaff_frames_sent_total",
        "prostaff_events_received_total",
        "prostaff_redis_connected",
        "prostaff_http_requests_total",
        "prostaff_socket_connects_total",
    ] {
        assert!(text.contains(name), "missing {name} in /metrics");
    }
    assert!(
        metric_value(
            &text,
            "prostaff_http_requests_total",
            &["route=\"/events/notify\"", "status=\"200\""]
        ) >= 1.0
    );
    assert!(
        metric_value(
            &text,
            "prostaff_channels_joined",
            &["family=\"org_events\""]
        ) >= 1.0
    );
}

/// The Streams ingestion: what Rails XADDs to `prostaff:events:stream` is delivered like what it
/// PUBLISHes, and what it adds while a hub's link is away reaches that hub's sockets after the
/// reconnect, in order and at contiguous positions — where a PUBLISH at the same moment reached
/// no one (pub/sub is at-most-once). An entry without an `envelope` field is skipped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_added_to_the_events_stream_while_a_hub_is_away_reaches_it_after_the_reconnect() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut member = Phx::org_member(&hub, &org).await;
    let key = "prostaff:events:stream";
    assert!(redis
        .xadd_envelope(key, &Event::numbered(&org, 1))
        .is_some());
    let first = member.event(&topic, "player.transferred").await;
    assert_eq!(first[4]["payload"]["n"], 1, "{first}");
    let (epoch, offset) = first[1].as_str().unwrap().split_once(':').unwrap();
    let offset: u64 = offset.parse().unwrap();

    assert_eq!(
        redis
            .command(&format!("XADD {key} * note no-envelope"))
            .map(|r| r.starts_with('$')),
        Some(true)
    );
    // The hub's connections are cut; while it reconnects, Rails publishes and adds.
    redis.kill_clients();
    let lost = Event::new(&org, "team_goal.completed").text();
    assert_eq!(
        redis.publish(&format!("prostaff:events:{org}"), &lost),
        0,
        "the hub was away: a PUBLISH reaches no one"
    );
    for n in 2..=4 {
        assert!(redis
            .xadd_envelope(key, &Event::numbered(&org, n))
            .is_some());
    }
    hub.wait_redis_ready().await;
    for n in 2..=4u64 {
        let frame = member.event(&topic, "player.transferred").await;
        assert_eq!(frame[4]["payload"]["n"], n, "{frame}");
        assert_eq!(
            frame[1],
            format!("{epoch}:{}", offset + n - 1),
            "contiguous positions: {frame}"
        );
    }
    wait_for_log(&["stream entry without an `envelope` field; skipped"]).await;
    assert!(
        member.silent_for(Duration::from_millis(300)).await,
        "nothing twice, and the lost PUBLISH stays lost"
    );
}
