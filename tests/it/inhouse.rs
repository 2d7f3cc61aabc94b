//! In-house queues end to end: the reconciler against a fake Rails, lifecycle events over Redis,
//! a real-time deadline, and rebuilding after a restart.

use std::time::Duration;

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::support::*;

fn deadline_in(seconds: f64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::seconds_f64(seconds))
        .format(&Rfc3339)
        .unwrap()
}

fn queue(id: &str, org: &str, status: &str, deadline: Option<String>, entries: Value) -> Value {
    json!({"id": id, "organization_id": org, "status": status, "check_in_deadline": deadline, "entries": entries})
}

async fn snapshot(hub: &TestHub, org: &str) -> Value {
    let mut phx = Phx::connect(hub, &internal_token()).await;
    let reply = phx.join(&format!("inhouse:{org}"), json!({})).await;
    assert_eq!(reply[4]["status"], "ok");
    reply[4]["response"]["queue"].clone()
}

#[tokio::test]
async fn reconciler_starts_actors_for_every_active_queue_with_a_valid_token() {
    let redis = RedisServer::start();
    let (org_a, org_b, org_c) = (unique("a"), unique("b"), unique("c"));
    let rails = FakeRails::start(json!([
        queue(
            "q-a",
            &org_a,
            "open",
            None,
            json!([{"player_id": "p1", "role": "top", "checked_in": false}])
        ),
        queue(
            "q-b",
            &org_b,
            "check_in",
            Some(deadline_in(600.0)),
            json!([{"player_id": 7, "role": "mid", "checked_in": true}])
        ),
        queue("q-c", &org_c, "open", None, json!([])),
    ]))
    .await;
    let hub = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    eventually("queues reconciled", || async {
        !snapshot(&hub, &org_c).await.is_null()
    })
    .await;

    let a = snapshot(&hub, &org_a).await;
    assert_eq!(
        (
            a["queue_id"].as_str(),
            a["status"].as_str(),
            a["player_count"].as_u64()
        ),
        (Some("q-a"), Some("open"), Some(1))
    );
    assert_eq!(
        a["entries"][0],
        json!({"player_id": "p1", "role": "top", "checked_in": false})
    );
    let b = snapshot(&hub, &org_b).await;
    assert_eq!(b["status"], "check_in");
    assert!(b["check_in_deadline"].is_string());
    assert_eq!(b["entries"][0]["player_id"], "7");
    // The fake Rails verified every token: HS256 internal secret, iss prostaff-events, exp = iat + 60.
    let checks = rails.state.lock().unwrap().token_checks.clone();
    assert!(!checks.is_empty());
    assert!(checks.iter().all(Result::is_ok), "{checks:?}");
}

#[tokio::test]
async fn rails_errors_are_retried_then_the_hub_runs_without_state_and_catches_up() {
    let redis = RedisServer::start();
    let org = unique("org");
    let rails = FakeRails::start(json!([])).await;
    rails.set_mode(RailsMode::Failing);
    let mut config = test_config(&redis.url(), &rails.url());
    config.reconcile_interval = Some(Duration::from_millis(300));
    let hub = TestHub::start(config).await;
    // One attempt plus two retries (RECONCILER_RETRY_DELAYS_MS has two entries), then no state.
    eventually("startup attempts exhausted", || async {
        rails.requests() >= 3
    })
    .await;
    assert!(snapshot(&hub, &org).await.is_null());

    // A queue created later is picked up by the periodic reconcile.
    rails.set_queues(json!([queue("q-late", &org, "open", None, json!([]))]));
    rails.set_mode(RailsMode::Up);
    eventually("periodic reconcile picks up the new queue", || async {
        snapshot(&hub, &org).await["queue_id"] == "q-late"
    })
    .await;

    // A queue Rails stops listing is closed at the next reconcile.
    rails.set_queues(json!([]));
    eventually("queue no longer active in Rails is closed", || async {
        snapshot(&hub, &org).await.is_null()
    })
    .await;
}

#[tokio::test]
async fn session_started_on_redis_closes_the_queue() {
    let redis = RedisServer::start();
    let org = unique("org");
    let rails = FakeRails::start(json!([queue("q1", &org, "open", None, json!([]))])).await;
    let hub = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    hub.wait_redis_ready().await;
    eventually("queue reconciled", || async {
        !snapshot(&hub, &org).await.is_null()
    })
    .await;

    let mut member = Phx::connect(&hub, &user_token("coach", &org)).await;
    let join_ref = member.join_ok(&format!("inhouse:{org}")).await;
    let reply = member
        .push(
            &join_ref,
            &format!("inhouse:{org}"),
            "join_queue",
            json!({"player_id": "p1", "role": "support"}),
        )
        .await;
    assert_eq!(
        reply[4]["status"], "ok",
        "a coach may queue a player of the org: {reply}"
    );

    let message = json!({"type": "inhouse.session_started", "org_id": org, "user_id": "u1", "payload": {"queue_id": "q1"}}).to_string();
    assert!(
        redis
            .publish_when_subscribed(&format!("prostaff:events:{org}"), &message, 1)
            .await
    );
    let closed = member
        .recv_matching(|f| f[3] == "queue_update" && f[4]["event"] == "queue_closed")
        .await;
    assert_eq!(closed[4]["reason"], "session_started");
    assert_eq!(closed[4]["status"], "closed");
    // The event itself also reaches the topic.
    member
        .event(&format!("inhouse:{org}"), "inhouse.session_started")
        .await;
    eventually("actor gone", || async {
        snapshot(&hub, &org).await.is_null()
    })
    .await;
    let reply = member
        .push(
            &join_ref,
            &format!("inhouse:{org}"),
            "join_queue",
            json!({"player_id": "p2", "role": "top"}),
        )
        .await;
    assert_eq!(reply[4]["response"]["reason"], "no_active_queue");
}

#[tokio::test]
async fn real_time_deadline_keeps_two_checked_in_players() {
    let redis = RedisServer::start();
    let org = unique("org");
    let entries = json!([
        {"player_id": "p1", "role": "top", "checked_in": true},
        {"player_id": "p2", "role": "mid", "checked_in": false},
        {"player_id": "p3", "role": "adc", "checked_in": false}
    ]);
    let rails = FakeRails::start(json!([queue(
        "q1",
        &org,
        "check_in",
        Some(deadline_in(3.0)),
        entries
    )]))
    .await;
    let hub = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    let mut player = Phx::connect(&hub, &player_token("p2", &org)).await;
    let topic = format!("inhouse:{org}");
    eventually("queue reconciled", || async {
        !snapshot(&hub, &org).await.is_null()
    })
    .await;
    let join_ref = player.join_ok(&topic).await;
    // A player may not act for someone else.
    let refused = player
        .push(&join_ref, &topic, "checkin", json!({"player_id": "p3"}))
        .await;
    assert_eq!(refused[4]["response"]["reason"], "unauthorized");
    let ok = player
        .push(&join_ref, &topic, "checkin", json!({"player_id": "p2"}))
        .await;
    assert_eq!(ok[4]["status"], "ok");
    let expired = player
        .recv_matching(|f| f[3] == "queue_update" && f[4]["event"] == "check_in_expired")
        .await;
    assert_eq!(expired[4]["queue_closed"], false);
    assert_eq!(expired[4]["removed_count"], 1);
    assert_eq!(expired[4]["checked_in_count"], 2);
    assert_eq!(expired[4]["player_count"], 2);
    assert_eq!(snapshot(&hub, &org).await["player_count"], 2);
}

#[tokio::test]
async fn a_restarted_hub_rebuilds_queues_from_rails() {
    let redis = RedisServer::start();
    let org = unique("org");
    let rails = FakeRails::start(json!([queue(
        "q1",
        &org,
        "open",
        None,
        json!([{"player_id": "p1", "role": "top", "checked_in": false}])
    )]))
    .await;
    let first = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    eventually("first hub has the queue", || async {
        !snapshot(&first, &org).await.is_null()
    })
    .await;
    first.shutdown().await.unwrap();
    let second = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    eventually("restarted hub rebuilt the queue", || async {
        snapshot(&second, &org).await["player_count"] == 1
    })
    .await;
}

#[tokio::test]
async fn redis_reconnect_triggers_a_reconcile() {
    let mut redis = RedisServer::start();
    let rails = FakeRails::start(json!([])).await;
    let hub = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    hub.wait_redis_ready().await;
    eventually("startup reconcile", || async { rails.requests() >= 1 }).await;
    let before = rails.requests();
    redis.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.spawn();
    eventually("reconcile after the reconnect", || async {
        rails.requests() > before
    })
    .await;
}
