//! History and recovery (issue 11) with two hubs on one redis-server: positions are consecutive
//! and identical on every hub; a client that missed events rejoins with `since` on another hub
//! and gets exactly those, in order, before live ones; too many missed, or a lost history, says
//! `recovered: false`; restarts lose nothing.

use std::time::Duration;

use prostaff_events::history::Position;
use serde_json::{json, Value};

use crate::support::*;

fn position_of(frame: &Value) -> Position {
    frame[1]
        .as_str()
        .and_then(Position::parse)
        .unwrap_or_else(|| panic!("broadcast without a position: {frame}"))
}

/// Publishes events `range` on the org's channel once `hubs` hubs listen.
async fn publish_range(redis: &RedisServer, org: &str, range: std::ops::Range<usize>, hubs: i64) {
    for n in range {
        assert!(
            redis
                .publish_when_subscribed(
                    &format!("prostaff:events:{org}"),
                    &Event::numbered(org, n).text(),
                    hubs
                )
                .await
        );
    }
}

/// Reads `count` broadcasts of the test event on `topic`.
async fn broadcasts(phx: &mut Phx, topic: &str, count: usize) -> Vec<Value> {
    let mut frames = Vec::new();
    for _ in 0..count {
        frames.push(phx.event(topic, "player.transferred").await);
    }
    frames
}

/// A member of `org_events:{org}` on `hub` that saw event 0 (published once `hubs` hubs listen),
/// and that event's position.
async fn saw_first_event(
    hub: &TestHub,
    redis: &RedisServer,
    org: &str,
    hubs: i64,
) -> (Phx, Position) {
    let topic = format!("org_events:{org}");
    let mut phx = Phx::connect(hub, &user_token("u1", org)).await;
    join_since(&mut phx, &topic, None).await;
    publish_range(redis, org, 0..1, hubs).await;
    let position = position_of(&broadcasts(&mut phx, &topic, 1).await[0]);
    (phx, position)
}

async fn join_since(phx: &mut Phx, topic: &str, since: Option<&Position>) -> Value {
    let params = match since {
        Some(p) => json!({"since": p.to_string()}),
        None => json!({}),
    };
    let reply = phx.join(topic, params).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    reply[4]["response"].clone()
}

#[tokio::test]
async fn positions_are_consecutive_and_the_same_on_every_hub() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.history_size = 300).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut on_a = Phx::connect(&a, &user_token("u1", &org)).await;
    let mut on_b = Phx::connect(&b, &user_token("u2", &org)).await;
    let start = Position::parse(
        join_since(&mut on_a, &topic, None).await["position"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(start.offset, 0, "a fresh topic starts at offset 0");
    let start_b = join_since(&mut on_b, &topic, None).await["position"].clone();
    assert_eq!(
        start_b,
        json!(start.to_string()),
        "both hubs report the same position"
    );

    publish_range(&redis, &org, 1..6, 2).await;
    let seen_a: Vec<Position> = broadcasts(&mut on_a, &topic, 5)
        .await
        .iter()
        .map(position_of)
        .collect();
    let seen_b: Vec<Position> = broadcasts(&mut on_b, &topic, 5)
        .await
        .iter()
        .map(position_of)
        .collect();
    assert_eq!(
        seen_a, seen_b,
        "the same broadcast has the same position on every hub"
    );
    let offsets: Vec<u64> = seen_a.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [1, 2, 3, 4, 5]);
    assert!(seen_a.iter().all(|p| p.epoch == start.epoch));
}

#[tokio::test]
async fn a_client_that_missed_ten_events_recovers_them_on_the_other_hub() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.history_size = 300).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let (on_a, last_seen) = saw_first_event(&a, &redis, &org, 2).await;
    drop(on_a);

    publish_range(&redis, &org, 1..11, 2).await;
    let mut on_b = Phx::connect(&b, &user_token("u1", &org)).await;
    let reply = join_since(&mut on_b, &topic, Some(&last_seen)).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    // Whatever B had appended by the join is replayed, the rest arrives live: the client cannot
    // tell the difference, and neither can this test.
    let missed = broadcasts(&mut on_b, &topic, 10).await;
    let numbers: Vec<u64> = missed
        .iter()
        .map(|f| f[4]["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (1..11).collect::<Vec<u64>>(),
        "in order, none missing"
    );
    let offsets: Vec<u64> = missed.iter().map(|f| position_of(f).offset).collect();
    assert_eq!(
        offsets,
        (last_seen.offset + 1..last_seen.offset + 11).collect::<Vec<u64>>()
    );
    // The payload is the envelope exactly as published.
    assert_eq!(
        missed[0][4],
        serde_json::from_str::<Value>(&Event::numbered(&org, 1).text()).unwrap()
    );

    publish_range(&redis, &org, 11..12, 2).await;
    let live = broadcasts(&mut on_b, &topic, 1).await;
    assert_eq!(live[0][4]["payload"]["n"], 11);
    assert!(
        on_b.silent_for(Duration::from_millis(300)).await,
        "no duplicate after the live one"
    );
}

#[tokio::test]
async fn recovery_while_events_keep_coming_has_no_gap_and_no_duplicate() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.history_size = 1000).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let (_on_a, since) = saw_first_event(&a, &redis, &org, 2).await;
    // Publish 300 events from another task while the client rejoins on B in the middle.
    let url = redis.url();
    let port: u16 = url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let org_task = org.clone();
    let publisher = tokio::task::spawn_blocking(move || {
        let server = RedisServer::attach(port);
        let mut connection = server.connection();
        for n in 1..301 {
            connection.publish(
                &format!("prostaff:events:{org_task}"),
                &Event::numbered(&org_task, n).text(),
            );
            if n % 50 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut on_b = Phx::connect(&b, &user_token("u1", &org)).await;
    let reply = join_since(&mut on_b, &topic, Some(&since)).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    publisher.await.unwrap();
    let frames = broadcasts(&mut on_b, &topic, 300).await;
    let numbers: Vec<u64> = frames
        .iter()
        .map(|f| f[4]["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (1..301).collect::<Vec<u64>>(),
        "every event once, in order"
    );
    assert!(on_b.silent_for(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn more_than_history_size_missed_is_not_recovered() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.history_size = 5).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let (mut on_a, since) = saw_first_event(&a, &redis, &org, 2).await;
    publish_range(&redis, &org, 1..8, 2).await;
    broadcasts(&mut on_a, &topic, 7).await;

    let mut on_b = Phx::connect(&b, &user_token("u1", &org)).await;
    let reply = join_since(&mut on_b, &topic, Some(&since)).await;
    assert_eq!(reply["recovered"], false, "7 missed, 5 kept: {reply}");
    assert_eq!(
        reply["position"],
        format!("{}:{}", since.epoch, since.offset + 7)
    );
    assert!(
        on_b.silent_for(Duration::from_millis(300)).await,
        "nothing is replayed"
    );
    // Exactly HISTORY_SIZE missed is still recoverable.
    let recent = Position {
        epoch: since.epoch,
        offset: since.offset + 2,
    };
    let mut again = Phx::connect(&b, &user_token("u1", &org)).await;
    assert_eq!(
        join_since(&mut again, &topic, Some(&recent)).await["recovered"],
        true
    );
    assert_eq!(broadcasts(&mut again, &topic, 5).await.len(), 5);
}

#[tokio::test]
async fn a_lost_history_or_a_wrong_epoch_is_not_recovered_and_bad_since_is_refused() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut phx = Phx::connect(&hub, &user_token("u1", &org)).await;
    join_since(&mut phx, &topic, None).await;
    publish_range(&redis, &org, 0..3, 1).await;
    let since = position_of(&broadcasts(&mut phx, &topic, 3).await[0]);

    let other_epoch = Position {
        epoch: prostaff_events::history::Epoch::new("zzzz").unwrap(),
        offset: since.offset,
    };
    let mut second = Phx::connect(&hub, &user_token("u1", &org)).await;
    assert_eq!(
        join_since(&mut second, &topic, Some(&other_epoch)).await["recovered"],
        false
    );

    // The history is lost (Redis emptied): a new epoch starts; old positions do not recover.
    redis.flushall();
    publish_range(&redis, &org, 3..4, 1).await;
    let fresh = position_of(&broadcasts(&mut phx, &topic, 1).await[0]);
    assert_ne!(fresh.epoch, since.epoch, "a lost history gets a new epoch");
    assert_eq!(fresh.offset, 1);
    let mut third = Phx::connect(&hub, &user_token("u1", &org)).await;
    assert_eq!(
        join_since(&mut third, &topic, Some(&since)).await["recovered"],
        false
    );

    for bad in [
        json!("nope"),
        json!(12),
        json!("e:-1"),
        json!({"epoch": "e"}),
    ] {
        let reply = third
            .join(
                &format!("tournament:{}", unique("t")),
                json!({"since": bad}),
            )
            .await;
        assert_eq!(reply[4]["response"]["reason"], "invalid_params", "{bad}");
    }
}

#[tokio::test]
async fn every_hub_restarted_in_between_still_recovers() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.history_size = 300).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut phx = Phx::connect(&a, &user_token("u1", &org)).await;
    join_since(&mut phx, &topic, None).await;
    let mut witness = Phx::connect(&b, &user_token("u2", &org)).await;
    join_since(&mut witness, &topic, None).await;
    publish_range(&redis, &org, 0..1, 2).await;
    let since = position_of(&broadcasts(&mut phx, &topic, 1).await[0]);
    drop(phx);
    publish_range(&redis, &org, 1..4, 2).await;
    // Seen live on B means appended to history (events published while no hub runs are lost
    // before they reach any history: that is pub/sub).
    broadcasts(&mut witness, &topic, 4).await;
    drop(witness);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();

    let (c, _d) = two_hubs_with(&redis, |config| config.history_size = 300).await;
    let mut phx = Phx::connect(&c, &user_token("u1", &org)).await;
    assert_eq!(
        join_since(&mut phx, &topic, Some(&since)).await["recovered"],
        true
    );
    let numbers: Vec<u64> = broadcasts(&mut phx, &topic, 3)
        .await
        .iter()
        .map(|f| f[4]["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
}

#[tokio::test]
async fn queue_updates_have_positions_and_recover_too() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.history_size = 300).await;
    let org = unique("org");
    let topic = format!("inhouse:{org}");
    let mut coach = Phx::connect(&a, &user_token("coach", &org)).await;
    let join_ref = coach.join_ok(&topic).await;
    let opened = json!({"type": "inhouse.queue_opened", "org_id": org, "user_id": "rails", "payload": {"queue_id": "q1"}});
    publish_event(&redis, &org, opened, 2).await;
    let first = coach.recv_matching(|f| f[3] == "queue_update").await;
    let since = position_of(&first);
    for player in ["p1", "p2"] {
        coach
            .push(
                &join_ref,
                &topic,
                "join_queue",
                json!({"player_id": player, "role": "mid"}),
            )
            .await;
    }
    let mut late = Phx::connect(&b, &user_token("coach", &org)).await;
    let reply = join_since(&mut late, &topic, Some(&since)).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["queue"]["player_count"], 2);
    let mut events = Vec::new();
    while events.len() < 2 {
        let frame = late.recv_matching(|f| f[3] == "queue_update").await;
        events.push(frame[4]["event"].as_str().unwrap().to_string());
    }
    assert_eq!(events, ["player_joined", "player_joined"]);
}
