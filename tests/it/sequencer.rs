//! The history sequencer: one instance appends each event; the others learn its positions from
//! the notice, fall back to appending themselves when no notice comes, and repair from history
//! what a notice names that they never received.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The `n` and position of each `player.transferred` broadcast among `frames`.
fn numbered(frames: &[Value], topic: &str) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter(|f| f[2] == topic && f[3] == "player.transferred")
        .map(|f| {
            (
                f[4]["payload"]["n"].as_u64().expect("a numbered event"),
                f[1].as_str().expect("a position").to_string(),
            )
        })
        .collect()
}

/// Asserts that `got` holds events `first..=last` in order at offsets `first..=last` of one
/// epoch, and returns that epoch.
fn assert_in_order(got: &[(u64, String)], first: u64, last: u64, who: &str) -> String {
    let expected: Vec<u64> = (first..=last).collect();
    let numbers: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers, expected,
        "{who}: events out of order, missing or twice"
    );
    let epoch = got[0].1.split_once(':').unwrap().0.to_string();
    for (n, position) in got {
        assert_eq!(
            position,
            &format!("{epoch}:{n}"),
            "{who}: event {n} is not at its offset"
        );
    }
    epoch
}

/// Which of `hubs` the admin page names as the sequencer.
async fn sequencers(hubs: &[TestHub]) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, hub) in hubs.iter().enumerate() {
        if admin_status(hub).await["redis"]["history_sequencer"] == true {
            found.push(i);
        }
    }
    found
}

async fn members(hubs: &[TestHub], org: &str) -> Vec<Phx> {
    let mut sockets = Vec::new();
    for hub in hubs {
        sockets.push(Phx::org_member(hub, org).await);
    }
    sockets
}

fn publish_numbered(redis: &RedisServer, org: &str, range: std::ops::RangeInclusive<usize>) {
    let mut connection = redis.connection();
    for n in range {
        connection.publish(
            &format!("prostaff:events:{org}"),
            &Event::numbered(org, n).text(),
        );
    }
}

/// Three hubs, events published as fast as one connection can: every socket gets every event
/// once, in order, at the same positions, and Redis ran the history script's dedup read once
/// per event (one appender), not once per hub as before the sequencer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hub_appends_and_every_hub_delivers_at_its_positions() {
    let redis = RedisServer::start();
    let hubs = ready_hubs(&redis, 3, |_| {}).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut sockets = members(&hubs, &org).await;
    eventually("one sequencer among the hubs", || async {
        sequencers(&hubs).await.len() == 1
    })
    .await;
    let leader = sequencers(&hubs).await[0];
    let holder = redis.command("GET prostaff:sequencer").unwrap_or_default();
    assert!(
        holder.contains(
            admin_status(&hubs[leader]).await["instance"]
                .as_str()
                .unwrap()
        ),
        "the lease names the sequencer: {holder}"
    );

    let (gets, xadds) = (redis.command_calls("get"), redis.command_calls("xadd"));
    publish_numbered(&redis, &org, 1..=100);
    let mut epochs = Vec::new();
    for (i, socket) in sockets.iter_mut().enumerate() {
        let frames = socket.collect(Duration::from_millis(1500)).await;
        let got = numbered(&frames, &topic);
        epochs.push(assert_in_order(&got, 1, 100, &format!("hub {i}")));
    }
    assert!(epochs.windows(2).all(|w| w[0] == w[1]), "{epochs:?}");
    assert_eq!(
        redis.command_calls("xadd") - xadds,
        100,
        "each event appended once"
    );
    // One appender: 100 dedup reads (plus a lease GET per hub every 2 s); one per hub per event
    // (300) without the sequencer.
    let reads = redis.command_calls("get") - gets;
    assert!(
        (100..150).contains(&reads),
        "{reads} dedup reads for 100 events on 3 hubs"
    );
}

/// The sequencer is gone (its lease is held by an instance that no longer runs): every hub
/// appends what waited for a notice itself, and nothing is lost, reordered or positioned twice;
/// once the lease is free again one hub takes it and the others go back to waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sequencer_every_hub_falls_back_and_nothing_is_lost() {
    let redis = RedisServer::start();
    let hubs = ready_hubs(&redis, 2, |_| {}).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut sockets = members(&hubs, &org).await;
    publish_numbered(&redis, &org, 1..=10);
    for socket in sockets.iter_mut() {
        let frames = socket.collect(Duration::from_millis(700)).await;
        assert_in_order(&numbered(&frames, &topic), 1, 10, "before");
    }

    assert_eq!(
        redis
            .command("SET prostaff:sequencer vanished PX 60000")
            .as_deref(),
        Some("+OK")
    );
    eventually("no hub is the sequencer", || async {
        sequencers(&hubs).await.is_empty()
    })
    .await;
    let xadds = redis.command_calls("xadd");
    publish_numbered(&redis, &org, 11..=40);
    let mut epochs = Vec::new();
    for (i, socket) in sockets.iter_mut().enumerate() {
        let frames = socket.collect(Duration::from_millis(1500)).await;
        epochs.push(assert_in_order(
            &numbered(&frames, &topic),
            11,
            40,
            &format!("hub {i} without a sequencer"),
        ));
    }
    assert_eq!(epochs[0], epochs[1]);
    assert_eq!(
        redis.command_calls("xadd") - xadds,
        30,
        "each event appended once"
    );

    assert_eq!(
        redis.command("DEL prostaff:sequencer").as_deref(),
        Some(":1")
    );
    eventually("a hub takes the free lease", || async {
        sequencers(&hubs).await.len() == 1
    })
    .await;
    publish_numbered(&redis, &org, 41..=50);
    for (i, socket) in sockets.iter_mut().enumerate() {
        let frames = socket.collect(Duration::from_millis(1000)).await;
        assert_in_order(
            &numbered(&frames, &topic),
            41,
            50,
            &format!("hub {i} with a new sequencer"),
        );
    }
}

/// A notice names a broadcast this hub never received (it missed the message while its link
/// was away): after the grace it is delivered from history, at its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_for_a_missed_broadcast_is_repaired_from_history() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut member = Phx::org_member(&hub, &org).await;
    publish_numbered(&redis, &org, 1..=1);
    let first = member.event(&topic, "player.transferred").await;
    let epoch = first[1]
        .as_str()
        .unwrap()
        .split_once(':')
        .unwrap()
        .0
        .to_string();

    // Another instance appended event 2, which this hub's link never brought.
    let missed = Event::numbered(&org, 2).text();
    let mut connection = redis.connection();
    assert_eq!(
        redis
            .command(&format!("HINCRBY hist:{{{topic}}}:m offset 1"))
            .as_deref(),
        Some(":2")
    );
    let added = redis.command(&format!(
        "XADD hist:{{{topic}}}:s 2-0 e player.transferred p {}",
        serde_json::to_string(&missed).unwrap()
    ));
    assert_eq!(
        added.as_deref(),
        Some("$3\r\n2-0"),
        "XADD answers the entry id"
    );
    connection.publish(
        &format!("prostaff:seq:{topic}"),
        &format!("elsewhere\ni{org}-2 {epoch}:2"),
    );
    let repaired = member.event(&topic, "player.transferred").await;
    assert_eq!(repaired[1], format!("{epoch}:2"), "{repaired}");
    assert_eq!(repaired[4]["payload"]["n"], 2, "{repaired}");
    wait_for_log(&["broadcasts this instance missed delivered from history"]).await;
}

/// The link dies while a broadcast waits for the sequencer's notice (the lease is held by an
/// instance that no longer runs): when its fallback comes due with the link down it is not
/// delivered without a position — which no client could resume past — but waits, and goes out
/// positioned once Redis is back (here an empty one on the same port, as after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_waiting_when_the_link_dies_goes_out_positioned_after_the_reconnect() {
    let (mut redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut member = Phx::org_member(&hub, &org).await;
    assert_eq!(
        redis
            .command("SET prostaff:sequencer vanished PX 60000")
            .as_deref(),
        Some("+OK")
    );
    eventually("the hub is not the sequencer", || async {
        sequencers(std::slice::from_ref(&hub)).await.is_empty()
    })
    .await;
    publish_numbered(&redis, &org, 1..=1);
    // Received (loopback), not yet due for its fallback (500 ms): the link dies now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.stop();
    let frames = member.collect(Duration::from_millis(1500)).await;
    let early: Vec<&serde_json::Value> = frames
        .iter()
        .filter(|f| f[2] == topic.as_str() && f[3] == "player.transferred")
        .collect();
    assert!(
        early.is_empty(),
        "delivered while the link was down: {early:?}"
    );
    redis.spawn();
    let event = member.event(&topic, "player.transferred").await;
    assert_eq!(event[4]["payload"]["n"], 1, "{event}");
    assert!(
        event[1].as_str().is_some_and(|p| p.contains(':')),
        "delivered with a position: {event}"
    );
}
