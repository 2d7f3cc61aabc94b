//! Redis Cluster (issue 24): three masters started on free ports, two hubs that know only the
//! node list (`REDIS_CLUSTER_NODES`). Events published on any node, the events stream, queue
//! actions, recovery on the other hub and presence all work across the hubs: every script's
//! keys share one slot (hash tags), and a PUBLISH reaches subscribers on every node.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = 20_000 + fastrand::u16(..20_000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// Three masters on free ports; their cluster config files are removed on drop.
struct Cluster {
    nodes: Vec<RedisServer>,
    configs: Vec<std::path::PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for config in &self.configs {
            let _ = std::fs::remove_file(config);
        }
    }
}

/// Three masters, every slot assigned, `cluster_state:ok` on each.
fn start_cluster() -> Cluster {
    let configs: Vec<std::path::PathBuf> = (0..3)
        .map(|_| std::env::temp_dir().join(format!("{}.conf", unique("cluster"))))
        .collect();
    let nodes: Vec<RedisServer> = configs
        .iter()
        .map(|config| {
            let port = cluster_port();
            RedisServer::start_on(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    config.to_str().unwrap(),
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
        })
        .collect();
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let status = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-cli is installed");
    assert!(status.success(), "redis-cli --cluster create failed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| {
        n.bulk_command("CLUSTER INFO")
            .is_some_and(|info| info.contains("cluster_state:ok"))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster never became ok"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Cluster { nodes, configs }
}

/// The node that holds `key`'s slot.
fn owner<'a>(nodes: &'a [RedisServer], key: &str) -> &'a RedisServer {
    nodes
        .iter()
        .find(|n| {
            n.command(&format!("EXISTS {key}"))
                .is_some_and(|r| r.starts_with(':'))
        })
        .expect("one node owns every slot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_a_three_master_cluster_deliver_queue_recover_and_share_presence() {
    let cluster = start_cluster();
    let nodes = &cluster.nodes;
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let url = prostaff_events::config::Config::from_lookup(|name| {
        (name == "REDIS_CLUSTER_NODES").then(|| list.join(","))
    })
    .unwrap()
    .redis_url;
    let (a, b) = two_hubs_with(&RedisServer::attach(nodes[0].port), |config| {
        config.redis_url = url.clone();
    })
    .await;

    // Events: whichever node Rails publishes on, both hubs' sockets get them at one position.
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut on_a = Phx::connect(&a, &user_token("u1", &org)).await;
    on_a.join_ok(&topic).await;
    let mut on_b = Phx::connect(&b, &user_token("u2", &org)).await;
    on_b.join_ok(&topic).await;
    let channel = format!("prostaff:events:{org}");
    let mut seen = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        // In a cluster PUBLISH counts the receivers on its own node only: the deliveries tell.
        node.publish(&channel, &Event::numbered(&org, n + 1).text());
        let got_a = on_a.event(&topic, "player.transferred").await;
        let got_b = on_b.event(&topic, "player.transferred").await;
        assert_eq!(got_a[4]["payload"]["n"], n + 1);
        assert_eq!(got_a[1], got_b[1], "one position on both hubs");
        seen.push(got_a[1].as_str().unwrap().to_string());
    }
    // The events stream lives on its slot's node.
    let stream = "prostaff:events:stream";
    let added = owner(nodes, stream).xadd_envelope(stream, &Event::numbered(&org, 4));
    assert!(
        added.is_some_and(|r| r.starts_with('$')),
        "XADD on the owner"
    );
    let got = on_b.event(&topic, "player.transferred").await;
    assert_eq!(got[4]["payload"]["n"], 4, "{got}");

    // Recovery: a client that saw the first event resumes on the other hub.
    let mut resumed = Phx::connect(&b, &user_token("u3", &org)).await;
    let reply = resumed.join(&topic, json!({"since": seen[0]})).await;
    assert_eq!(reply[4]["response"]["recovered"], true, "{reply}");
    let missed: Vec<Value> = resumed.collect(Duration::from_millis(500)).await;
    let numbers: Vec<u64> = missed
        .iter()
        .filter(|f| f[3] == "player.transferred")
        .map(|f| f[4]["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [2, 3, 4], "what it missed, in order");

    // Queue: opened by the lifecycle event, a join on one hub is seen on the other.
    let inhouse = format!("inhouse:{org}");
    let mut coach_a = Phx::connect(&a, &user_token("coach", &org)).await;
    let coach_ref = coach_a.join_ok(&inhouse).await;
    let mut coach_b = Phx::connect(&b, &user_token("coach-b", &org)).await;
    coach_b.join_ok(&inhouse).await;
    let opened = Event::new(&org, "inhouse.queue_opened")
        .payload(json!({"queue_id": "q1"}))
        .json();
    nodes[1].publish(&channel, &opened.to_string());
    coach_b.recv_matching(update_of("queue_opened")).await;
    let reply = coach_a
        .push(
            &coach_ref,
            &inhouse,
            "join_queue",
            json!({"player_id": "p1", "role": "top"}),
        )
        .await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let joined = coach_b.recv_matching(update_of("player_joined")).await;
    assert_eq!(joined[4]["player_id"], "p1", "{joined}");

    // The status page walks every node's keys: queues whose keys sit on different nodes all show.
    let elsewhere = loop {
        let other = unique("org");
        let port = |o: &str| owner(nodes, &format!("iq:{{{o}}}:q")).port;
        if port(&other) != port(&org) {
            break other;
        }
    };
    let opened = Event::new(&elsewhere, "inhouse.queue_opened")
        .payload(json!({"queue_id": "q2"}))
        .json();
    nodes[2].publish(&format!("prostaff:events:{elsewhere}"), &opened.to_string());
    eventually_within(
        "both orgs' queues on the status page",
        Duration::from_secs(15),
        || async {
            let status = admin_status(&a).await;
            let listed: Vec<&str> = status["queues"]
                .as_array()
                .map(|queues| queues.iter().filter_map(|q| q["org_id"].as_str()).collect())
                .unwrap_or_default();
            listed.contains(&org.as_str()) && listed.contains(&elsewhere.as_str())
        },
    )
    .await;

    // Presence: a newcomer on either hub sees the members of both (its own meta comes in a
    // later diff).
    for hub in [&a, &b] {
        eventually("presence across hubs on a cluster", || async {
            let keys = presence_keys(hub, &user_token("u4", &org), &topic).await;
            ["user:u1", "user:u2"]
                .iter()
                .all(|k| keys.iter().any(|key| key == k))
        })
        .await;
    }
}
