//! The event catalogue: schemas per type at ingest (`EVENT_SCHEMAS` warn / enforce / off), the
//! dead-letter stream (one entry per drop whatever the number of hubs; listed without the
//! envelope; replayed by the CLI), `GET /api/events/catalogue`, and type filters on join over
//! WebSocket with recovery across two hubs (long-poll and SSE: `longpoll.rs`, `sse.rs`).

use std::process::Command;
use std::time::Duration;

use prostaff_events::config::SchemaMode;
use serde_json::{json, Value};

use crate::support::*;

/// `prostaff-events dead-letters <args>` against `redis`: (exit ok, stdout).
fn dead_letters_cli(redis: &RedisServer, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_prostaff-events"))
        .arg("dead-letters")
        .args(args)
        .current_dir(std::env::temp_dir())
        .env("REDIS_URL", redis.url())
        .output()
        .expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The CLI listing: (the summary line, the entries).
fn listing(redis: &RedisServer) -> (Value, Vec<Value>) {
    let (ok, stdout) = dead_letters_cli(redis, &["list", "--count", "50"]);
    assert!(ok, "dead-letters list failed: {stdout}");
    let mut lines = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap());
    let summary = lines.next().expect("a summary line");
    (summary, lines.collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_delivers_an_invalid_event_counts_it_and_logs_where_never_what() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let mut phx = Phx::org_member(&hub, &org).await;
    let topic = format!("org_events:{org}");
    // `team_goal.at_risk` with a goal_id that is an object: the schema says string or integer.
    let invalid = Event::new(&org, "team_goal.at_risk")
        .id("warn-1")
        .payload(json!({"goal_id": {"secret": "s3cr3t-warn"}}))
        .json();
    publish_event(&redis, &org, invalid, 1).await;
    let frame = phx.event(&topic, "team_goal.at_risk").await;
    assert_eq!(frame[4]["payload"]["goal_id"]["secret"], "s3cr3t-warn");
    let invalid_count = |metrics: &str, label: &str| {
        metric_value(metrics, "prostaff_events_invalid_total", &[label])
    };
    let before = hub.metrics().await;
    assert!(invalid_count(&before, "type=\"team_goal.at_risk\"") >= 1.0);
    // An unknown type is delivered too, and counted as `unknown` (a label other tests share:
    // the count must grow across this event).
    let unknown = Event::new(&org, "scraper.warn_test")
        .id("warn-2")
        .payload(json!({}))
        .json();
    publish_event(&redis, &org, unknown, 1).await;
    phx.event(&topic, "scraper.warn_test").await;
    let after = hub.metrics().await;
    assert!(
        invalid_count(&after, "type=\"unknown\"") > invalid_count(&before, "type=\"unknown\""),
        "an unknown type is counted"
    );
    let line = wait_for_log(&["event does not match its schema", "type=team_goal.at_risk"]).await;
    assert!(
        line.contains("pointer=/payload/goal_id") && line.contains("rule=type"),
        "{line}"
    );
    assert!(
        !all_logs().contains("s3cr3t-warn"),
        "a payload value was logged"
    );
    // Nothing is dropped in warn mode.
    let (summary, _) = listing(&redis);
    assert_eq!(summary["length"], 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_drops_into_one_dead_letter_per_drop_across_hubs_and_replay_delivers() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.event_schemas = SchemaMode::Enforce).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut phx = Phx::org_member(&a, &org).await;

    // A walkover without its tournament_id, and bytes that are not JSON; then a valid event.
    let invalid = Event::new(&org, "tournament_match.walkover")
        .id("enf-1")
        .payload(json!({"note": "s3cr3t-enforce"}))
        .json();
    publish_event(&redis, &org, invalid, 2).await;
    redis.publish(
        &format!("prostaff:events:{org}"),
        "{\"s3cr3t-enforce\": not json",
    );
    let valid = Event::new(&org, "team_goal.completed")
        .id("enf-3")
        .payload(json!({"goal_id": "g1"}))
        .json();
    publish_event(&redis, &org, valid, 2).await;
    // The valid event is the first and only broadcast: the dropped ones never reached clients.
    let first = phx.recv().await;
    assert_eq!(first[3], "team_goal.completed", "{first}");
    assert!(phx.silent_for(Duration::from_millis(300)).await);

    // HTTP publishers are told why (422), with the same reason.
    let response = reqwest::Client::new()
        .post(a.http("/api/events"))
        .bearer_auth(internal_token())
        .json(&json!({"type": "tournament_match.confirmed", "org_id": org,
            "payload": {"tournament_id": ["s3cr3t-http"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"],
        "schema violation: type=tournament_match.confirmed pointer=/payload/tournament_id rule=type"
    );

    // Each drop is one entry although both hubs dropped the pub/sub ones.
    eventually(
        "three entries kept, both hubs tried each pub/sub drop",
        || async {
            metric_value(
                &a.metrics().await,
                "prostaff_dead_letters_total",
                &["outcome=\"duplicate\""],
            ) >= 2.0
                && listing(&redis).0["length"] == 3
        },
    )
    .await;
    let (summary, entries) = listing(&redis);
    assert_eq!(summary["length"], 3, "{summary}");
    assert_eq!(summary["counts"]["schema"], 2, "{summary}");
    assert_eq!(summary["counts"]["invalid_json"], 1, "{summary}");
    let listed = serde_json::to_string(&entries).unwrap();
    assert!(
        !listed.contains("s3cr3t"),
        "a listing carries an envelope: {listed}"
    );
    let walkover = entries
        .iter()
        .find(|e| e["fields"]["type"] == "tournament_match.walkover")
        .expect("the walkover is kept");
    assert_eq!(walkover["fields"]["source"], "redis");
    assert_eq!(
        walkover["fields"]["detail"],
        "schema violation: type=tournament_match.walkover pointer=/payload/tournament_id rule=required"
    );
    assert!(entries.iter().any(|e| e["fields"]["source"] == "http"));
    let garbage = entries
        .iter()
        .find(|e| e["fields"]["reason"] == "invalid_json")
        .unwrap();
    // The status page shows the same, reasons only.
    let status = admin_status(&a).await;
    assert_eq!(status["event_schemas"], "enforce");
    assert_eq!(status["dead_letters"]["counts"]["schema"], 2, "{status}");
    assert!(!status.to_string().contains("s3cr3t"));

    // The cause is fixed (here: the hubs run with `warn`); the walkover is replayed.
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let fixed = TestHub::ready(test_config(&redis.url(), "http://127.0.0.1:9")).await;
    let mut phx = Phx::org_member(&fixed, &org).await;
    let walkover_id = walkover["id"].as_str().unwrap();
    let garbage_id = garbage["id"].as_str().unwrap();
    let (ok, out) = dead_letters_cli(&redis, &["replay", walkover_id, garbage_id]);
    assert!(ok, "{out}");
    let replayed = phx.event(&topic, "tournament_match.walkover").await;
    assert_eq!(replayed[4]["payload"]["note"], "s3cr3t-enforce");
    // The walkover left the stream; the garbage failed again and was kept again (new id).
    eventually("the undecodable replay is kept again", || async {
        let (summary, entries) = listing(&redis);
        summary["length"] == 2
            && entries
                .iter()
                .any(|e| e["fields"]["reason"] == "invalid_json" && e["id"] != garbage_id)
            && !entries.iter().any(|e| e["id"] == walkover_id)
    })
    .await;
    let (ok, _) = dead_letters_cli(&redis, &["replay", walkover_id]);
    assert!(!ok, "replaying an entry twice must fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_skips_validation_and_the_catalogue_is_served() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.event_schemas = SchemaMode::Off;
    let hub = TestHub::ready(config).await;
    let org = unique("org");
    let mut phx = Phx::org_member(&hub, &org).await;
    let before = metric_value(
        &hub.metrics().await,
        "prostaff_events_invalid_total",
        &["type=\"roster.player_hired\""],
    );
    let invalid = Event::new(&org, "roster.player_hired")
        .id("off-1")
        .payload(json!({"player_id": false}))
        .json();
    publish_event(&redis, &org, invalid, 1).await;
    phx.event(&format!("org_events:{org}"), "roster.player_hired")
        .await;
    let after = metric_value(
        &hub.metrics().await,
        "prostaff_events_invalid_total",
        &["type=\"roster.player_hired\""],
    );
    assert_eq!(before, after, "off validates nothing");

    let response = reqwest::get(hub.http("/api/events/catalogue"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains(SECRET) && !text.contains(SCRAPER_KEY));
    let catalogue: Value = serde_json::from_str(&text).unwrap();
    let confirmed = &catalogue["types"]["tournament_match.confirmed"];
    assert_eq!(
        confirmed["properties"]["payload"]["required"],
        json!(["tournament_id"])
    );
    assert_eq!(
        catalogue["envelope"]["required"],
        json!(["type", "org_id", "user_id"])
    );
    for event_type in ["inhouse.session_started", "queue_update", "access.revoked"] {
        assert!(catalogue["types"][event_type].is_object(), "{event_type}");
    }
}

/// The `n` a test event carries in its payload.
fn payload_n(frame: &Value) -> u64 {
    frame[4]["payload"]["n"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_filters_over_websocket_recover_exactly_across_two_hubs() {
    let redis = RedisServer::start();
    let a = TestHub::ready(test_config(&redis.url(), "http://127.0.0.1:9")).await;
    let b = TestHub::ready(test_config(&redis.url(), "http://127.0.0.1:9")).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let token = user_token("u1", &org);
    let filter = json!(["tournament_match.*", "team_goal.completed"]);

    let mut phx = Phx::connect(&a, &token).await;
    for bad in [
        json!("tournament_match.*"),
        json!(["*"]),
        json!([]),
        json!(vec!["a.b"; 33]),
    ] {
        let reply = phx.join(&topic, json!({ "types": bad })).await;
        assert_eq!(
            reply[4],
            json!({"status": "error", "response": {"reason": "invalid_params"}}),
            "{bad}"
        );
    }
    let reply = phx.join(&topic, json!({ "types": filter })).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");

    let kinds = [
        ("team_goal.completed", json!({"goal_id": "g"})),
        ("roster.player_hired", json!({"player_id": "p"})),
        ("tournament_match.confirmed", json!({"tournament_id": "t"})),
        ("team_goal.missed", json!({"goal_id": "g"})),
        ("tournament_match.walkover", json!({"tournament_id": "t"})),
        ("scrim_request.accepted", json!({"scrim_request_id": "s"})),
        ("team_goal.completed", json!({"goal_id": "g"})),
        ("roster.player_hired", json!({"player_id": "p"})),
    ];
    let publish = |n: usize| {
        let (event_type, mut payload) = kinds[(n - 1) % kinds.len()].clone();
        payload["n"] = json!(n);
        Event::new(&org, event_type)
            .id(&format!("{org}-f{n}"))
            .payload(payload)
            .json()
    };
    for n in 1..=4 {
        publish_event(&redis, &org, publish(n), 2).await;
    }
    let first = phx.recv().await;
    let second = phx.recv().await;
    assert_eq!((payload_n(&first), payload_n(&second)), (1, 3));
    assert!(phx.silent_for(Duration::from_millis(300)).await);
    let since = second[1].as_str().unwrap().to_string();
    drop(phx);

    // Away: 5..8 are published; 5 and 7 match.
    for n in 5..=8 {
        publish_event(&redis, &org, publish(n), 2).await;
    }
    let mut phx = Phx::connect(&b, &token).await;
    let reply = phx
        .join(&topic, json!({"types": filter, "since": since}))
        .await;
    assert_eq!(reply[4]["response"]["recovered"], true, "{reply}");
    publish_event(&redis, &org, publish(9), 2).await;
    publish_event(&redis, &org, publish(10), 2).await;
    publish_event(&redis, &org, publish(11), 2).await;
    let mut got = Vec::new();
    while got.last() != Some(&11) {
        got.push(payload_n(&phx.recv().await));
    }
    assert_eq!(
        got,
        vec![5, 7, 9, 11],
        "exactly the matching broadcasts, once, in order"
    );
    assert!(phx.silent_for(Duration::from_millis(300)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_never_hides_queue_updates_and_they_match_their_schema() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let mut phx = Phx::connect(&hub, &internal_token()).await;
    let topic = format!("inhouse:{org}");
    let reply = phx.join(&topic, json!({"types": ["no_such.type"]})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let opened = Event::new(&org, "inhouse.queue_opened")
        .id("q-open")
        .payload(json!({"queue_id": "q1", "entries": [{"player_id": "p1", "role": "top"}]}))
        .json();
    publish_event(&redis, &org, opened, 1).await;
    let update = phx.event(&topic, "queue_update").await;
    // The envelope itself is filtered out; its queue_update is not.
    assert!(phx.silent_for(Duration::from_millis(300)).await);

    let catalogue: Value = reqwest::get(hub.http("/api/events/catalogue"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let validator = jsonschema::draft202012::new(&catalogue["types"]["queue_update"]).unwrap();
    let payload = &update[4];
    assert!(
        validator.is_valid(payload),
        "queue_update does not match its schema: {payload}"
    );
    assert_eq!(payload["event"], "queue_opened");
}
