//! Redis as it runs in production (issue 24): a master demoted to a replica is left (READONLY),
//! and a Sentinel failover — the master SIGKILLed under two hubs with sockets — is followed:
//! readiness says so while the link is down, then events flow again on both hubs.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prostaff_events::config::Config;
use serde_json::Value;

use crate::support::*;

/// How long a failover (or a replica's sync) may take here.
const FAILOVER: Duration = Duration::from_secs(30);

/// Readiness of `hub`: (status, the redis check).
async fn readiness(hub: &TestHub) -> (u16, Value) {
    match reqwest::get(hub.http("/health/ready")).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["checks"]["redis"].clone())
        }
        Err(_) => (0, Value::Null),
    }
}

async fn wait_readiness(hub: &TestHub, what: &str, ready: bool) {
    let deadline = tokio::time::Instant::now() + FAILOVER;
    loop {
        let (status, redis) = readiness(hub).await;
        if (status == 200) == ready {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: readiness stayed {status} (redis {redis})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_demoted_to_a_replica_is_left_and_readiness_says_so() {
    let (redis, hub) = redis_and_ready_hub().await;
    let other = RedisServer::start();
    redis.replicate(other.port);
    // PING still answers on a replica; the liveness check writes, and READONLY ends the link.
    wait_readiness(&hub, "a replica is no link", false).await;
    wait_for_log(&["READONLY"]).await;
    assert_eq!(redis.command("REPLICAOF NO ONE").as_deref(), Some("+OK"));
    wait_readiness(&hub, "a master again", true).await;
}

/// A `redis-server --sentinel` watching the master named `prostaff`; killed on drop.
struct Sentinel {
    port: u16,
    child: Child,
    config: std::path::PathBuf,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        let port = free_port();
        let config = std::env::temp_dir().join(format!("{}.conf", unique("sentinel")));
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel resolve-hostnames no\n\
                 sentinel monitor prostaff 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds prostaff 1000\n\
                 sentinel failover-timeout prostaff 4000\n\
                 sentinel parallel-syncs prostaff 1\n"
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        Sentinel {
            port,
            child,
            config,
        }
    }

    /// The master's port as this sentinel sees it.
    fn master_port(&self) -> Option<u16> {
        let reply = RedisServer::attach(self.port)
            .command_lines("SENTINEL get-master-addr-by-name prostaff")?;
        reply.get(1)?.parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// One master, one replica, three sentinels; two hubs that know only the sentinels
/// (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`), members with presence on each, and a queue in
/// check-in whose deadline passes while there is no master. The master is SIGKILLed while events
/// flow (to another org, watched on both hubs: at most once, in order, never a silent gap): readiness
/// fails and a queue action answers `unavailable`; the sentinels promote the replica and both
/// hubs follow it; the deadline fires exactly once (seen once on each hub); what is published on
/// the new master reaches both hubs; a new queue takes a join seen on both; presence converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_by_every_hub() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start();
    replica.replicate_synced(master.port, FAILOVER).await;
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
    eventually_within(
        "the sentinels know the master and each other",
        FAILOVER,
        || async {
            sentinels
                .iter()
                .all(|s| s.master_port() == Some(master.port))
        },
    )
    .await;

    let nodes: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let settings = [
        ("REDIS_SENTINELS", nodes.join(",")),
        ("REDIS_SENTINEL_MASTER", "prostaff".to_string()),
    ];
    let sentinel_url = Config::from_lookup(|name| {
        settings
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
    })
    .unwrap()
    .redis_url;
    let (a, b) = two_hubs_with(&RedisServer::attach(master.port), |config| {
        config.redis_url = sentinel_url.clone();
    })
    .await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut on_a = Phx::connect(&a, &user_token("u1", &org)).await;
    on_a.join_ok(&topic).await;
    let mut on_b = Phx::connect(&b, &user_token("u2", &org)).await;
    on_b.join_ok(&topic).await;
    // A coach on each hub, and a queue in check-in (replicated before the master dies).
    let inhouse = format!("inhouse:{org}");
    let mut coach_a = Phx::connect(&a, &user_token("coach", &org)).await;
    let coach_ref = coach_a.join_ok(&inhouse).await;
    let mut coach_b = Phx::connect(&b, &user_token("coach-b", &org)).await;
    coach_b.join_ok(&inhouse).await;
    let lifecycle =
        |event_type: &str, payload: Value| Event::new(&org, event_type).payload(payload).json();
    let opened = lifecycle(
        "inhouse.queue_opened",
        serde_json::json!({"queue_id": "q1"}),
    );
    publish_event(&master, &org, opened, 2).await;
    coach_a.recv_matching(update_of("queue_opened")).await;
    coach_b.recv_matching(update_of("queue_opened")).await;
    for (player, role) in [("p1", "top"), ("p2", "mid")] {
        let join = serde_json::json!({"player_id": player, "role": role});
        let reply = coach_a.push(&coach_ref, &inhouse, "join_queue", join).await;
        assert_eq!(reply[4]["status"], "ok", "{reply}");
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    let started = lifecycle(
        "inhouse.check_in_started",
        serde_json::json!({"queue_id": "q1", "check_in_deadline": rfc3339_in(Duration::from_millis(1500))}),
    );
    publish_event(&master, &org, started, 2).await;
    coach_b.recv_matching(update_of("check_in_started")).await;
    let reply = coach_a
        .push(
            &coach_ref,
            &inhouse,
            "checkin",
            serde_json::json!({"player_id": "p1"}),
        )
        .await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    publish_event(
        &master,
        &org,
        Event::new(&org, "player.transferred").json(),
        2,
    )
    .await;
    on_a.event(&topic, "player.transferred").await;
    on_b.event(&topic, "player.transferred").await;
    assert_eq!(master.command("WAIT 1 2000").as_deref(), Some(":1"));

    // Traffic on another org until the master dies: a member on each hub watches it.
    let busy = unique("org");
    let busy_topic = format!("org_events:{busy}");
    let mut busy_on_a = Phx::connect(&a, &user_token("w1", &busy)).await;
    busy_on_a.join_ok(&busy_topic).await;
    let mut busy_on_b = Phx::connect(&b, &user_token("w2", &busy)).await;
    busy_on_b.join_ok(&busy_topic).await;
    let traffic = {
        let (port, busy) = (master.port, busy.clone());
        std::thread::spawn(move || {
            let node = RedisServer::attach(port);
            let channel = format!("prostaff:events:{busy}");
            let mut sent = 0;
            for n in 1.. {
                let text = serde_json::to_string(&Event::numbered(&busy, n).text()).unwrap();
                match node.command(&format!("PUBLISH {channel} {text}")) {
                    Some(reply) if reply.starts_with(':') => sent = n,
                    _ => break,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    master.stop();
    let sent = tokio::task::spawn_blocking(move || traffic.join().unwrap())
        .await
        .unwrap();
    assert!(
        sent > 10,
        "traffic was flowing when the master died ({sent} events)"
    );
    wait_readiness(&a, "hub a sees the master gone", false).await;
    wait_readiness(&b, "hub b sees the master gone", false).await;
    // While there is no master, a queue action says so rather than guess.
    let join = serde_json::json!({"player_id": "p3", "role": "top"});
    let reply = coach_a.push(&coach_ref, &inhouse, "join_queue", join).await;
    assert_eq!(reply[4]["response"]["reason"], "unavailable", "{reply}");
    eventually_within("the sentinels promote the replica", FAILOVER, || async {
        sentinels[0].master_port() == Some(replica.port)
    })
    .await;
    wait_readiness(&a, "hub a follows the new master", true).await;
    wait_readiness(&b, "hub b follows the new master", true).await;
    assert!(
        std::time::Instant::now() > deadline,
        "the set-up needs the check-in deadline to pass while there is no master"
    );

    // The deadline that passed during the failover fires once: p2 never checked in and is
    // removed; one checked in is not enough, so the queue closes. Each hub's coach sees it once.
    let expired = coach_b.recv_matching(update_of("check_in_expired")).await;
    assert_eq!(expired[4]["removed_count"], 1, "{expired}");
    assert_eq!(expired[4]["checked_in_count"], 1, "{expired}");
    assert_eq!(expired[4]["queue_closed"], true, "{expired}");
    coach_a.recv_matching(update_of("check_in_expired")).await;
    for (name, coach) in [("a", &mut coach_a), ("b", &mut coach_b)] {
        let again = coach
            .collect(Duration::from_millis(1000))
            .await
            .into_iter()
            .filter(|f| f[3] == "queue_update" && f[4]["event"] == "check_in_expired")
            .count();
        assert_eq!(again, 0, "hub {name}: the deadline fired more than once");
    }

    let after = Event::new(&org, "team_goal.completed").json();
    publish_event(&replica, &org, after, 2).await;
    let on_a_after = on_a.event(&topic, "team_goal.completed").await;
    let on_b_after = on_b.event(&topic, "team_goal.completed").await;
    assert_eq!(on_a_after[4]["id"], on_b_after[4]["id"]);
    // A queue opened after the failover takes a join made on one hub, seen on the other.
    let reopened = lifecycle(
        "inhouse.queue_opened",
        serde_json::json!({"queue_id": "q2"}),
    );
    publish_event(&replica, &org, reopened, 2).await;
    coach_b.recv_matching(update_of("queue_opened")).await;
    let join = serde_json::json!({"player_id": "p1", "role": "top"});
    let reply = coach_a.push(&coach_ref, &inhouse, "join_queue", join).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let joined = coach_b.recv_matching(update_of("player_joined")).await;
    assert_eq!(joined[4]["player_id"], "p1", "{joined}");
    // Presence converges: a newcomer on either hub sees both members.
    for (name, hub) in [("a", &a), ("b", &b)] {
        let deadline = tokio::time::Instant::now() + FAILOVER;
        loop {
            let keys = presence_keys(hub, &user_token("u3", &org), &topic).await;
            // The newcomer's own meta comes in a later diff; the members of both hubs must be in
            // the state.
            if ["user:u1", "user:u2"]
                .iter()
                .all(|member| keys.iter().any(|key| key == member))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "presence on hub {name} never converged: {keys:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // What the busy members got of the traffic cut by the kill: each event at most once, in
    // order, at increasing positions — or a gap notice (`phx_error`) where history went back,
    // never a silent one.
    for (name, member) in [("a", &mut busy_on_a), ("b", &mut busy_on_b)] {
        let frames = member.collect(Duration::from_millis(300)).await;
        let mut last: Option<(u64, u64)> = None;
        for frame in frames.iter().filter(|f| f[2] == busy_topic.as_str()) {
            if frame[3] == "phx_error" {
                break;
            }
            if frame[3] != "player.transferred" {
                continue;
            }
            let n = frame[4]["payload"]["n"].as_u64().unwrap();
            let offset: u64 = frame[1]
                .as_str()
                .and_then(|p| p.split_once(':'))
                .and_then(|(_, o)| o.parse().ok())
                .expect("a position");
            if let Some((last_n, last_offset)) = last {
                assert!(n > last_n, "hub {name}: event {n} after {last_n}");
                assert!(
                    offset > last_offset,
                    "hub {name}: offset {offset} after {last_offset}"
                );
            }
            last = Some((n, offset));
        }
        assert!(last.is_some(), "hub {name} delivered none of the traffic");
    }
    wait_for_log(&["redis connected", "reconnect=true"]).await;
}

/// An RFC 3339 UTC time `after` from now (a check-in deadline).
fn rfc3339_in(after: Duration) -> String {
    (time::OffsetDateTime::now_utc() + after)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A failover that lost the newest history writes (the promoted replica had not received them)
/// must not hand their offsets to other events: a client that saw a lost event and resumes
/// from it would skip the new one silently. Simulated on one server: the topic's last entry and
/// offset are taken back, and the hub's connections are killed. At its reconnect the hub, which
/// delivered that position, starts a new epoch: its subscribers are told to rejoin, a resume from
/// the lost position answers `recovered: false`, and the next event is in the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_that_went_back_in_a_failover_starts_a_new_epoch() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut member = Phx::org_member(&hub, &org).await;
    for n in 1..=3 {
        publish_event(&redis, &org, Event::numbered(&org, n).json(), 1).await;
    }
    let mut last = Value::Null;
    for _ in 1..=3 {
        last = member.event(&topic, "player.transferred").await;
    }
    let seen = last[1].as_str().expect("a position").to_string();
    let (old_epoch, offset) = seen.split_once(':').unwrap();
    assert_eq!(offset, "3");

    // The third write never reached the replica that is now the master.
    assert_eq!(
        redis
            .command(&format!("HSET hist:{{{topic}}}:m offset 2"))
            .as_deref(),
        Some(":0")
    );
    assert_eq!(
        redis
            .command(&format!("XDEL hist:{{{topic}}}:s 3-0"))
            .as_deref(),
        Some(":1")
    );
    redis.kill_clients();

    // The hub's subscribers hear that it cannot vouch for the gap.
    member.event(&topic, "phx_error").await;
    hub.wait_redis_ready().await;
    let mut resumed = Phx::connect(&hub, &user_token("u2", &org)).await;
    let reply = resumed
        .join(&topic, serde_json::json!({"since": seen}))
        .await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(reply[4]["response"]["recovered"], false, "{reply}");
    let position = reply[4]["response"]["position"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !position.starts_with(&format!("{old_epoch}:")),
        "{position}"
    );

    publish_event(&redis, &org, Event::numbered(&org, 4).json(), 1).await;
    let next = resumed.event(&topic, "player.transferred").await;
    let next_position = next[1].as_str().unwrap();
    assert!(
        !next_position.starts_with(&format!("{old_epoch}:")),
        "the lost offset 3 went to another event in the old epoch: {next_position}"
    );
    wait_for_log(&["history cannot cover this instance's gap"]).await;
}

/// A queue transition is acknowledged by a replica before the client hears `ok` (`WAIT 1 100`
/// after each queue script), so a failover keeps what a client was told happened; on a master
/// without replicas nothing waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_actions_wait_for_a_replica_only_when_there_is_one() {
    let (master, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let inhouse = format!("inhouse:{org}");
    let mut coach = Phx::connect(&hub, &user_token("coach", &org)).await;
    let coach_ref = coach.join_ok(&inhouse).await;
    let opened = Event::new(&org, "inhouse.queue_opened")
        .payload(serde_json::json!({"queue_id": "q1"}))
        .json();
    publish_event(&master, &org, opened, 1).await;
    coach
        .recv_matching(|f| f[3] == "queue_update" && f[4]["event"] == "queue_opened")
        .await;
    let player = serde_json::json!({"player_id": "p1", "role": "top"});
    let reply = coach
        .push(&coach_ref, &inhouse, "join_queue", player.clone())
        .await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(master.command_calls("wait"), 0, "no replica: no WAIT");

    let replica = RedisServer::start();
    replica.replicate_synced(master.port, FAILOVER).await;
    // The hub sees the replica at its next liveness check (every 2 s); actions then wait.
    let deadline = tokio::time::Instant::now() + FAILOVER;
    for event in ["leave_queue", "join_queue"].into_iter().cycle() {
        let reply = coach
            .push(&coach_ref, &inhouse, event, player.clone())
            .await;
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        if master.command_calls("wait") > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue actions never waited for the replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        replica
            .command(&format!("EXISTS iq:{{{org}}}:q"))
            .is_some_and(|r| r == ":1"),
        "the replica has the queue"
    );
}
