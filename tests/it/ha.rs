//! Redis as it runs in production (issue 24): a master demoted to a replica is left (READONLY),
//! and a Sentinel failover — the master SIGKILLed under two hubs with sockets — is followed:
//! readiness says so while the link is down, then events flow again on both hubs.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prostaff_events::config::Config;
use serde_json::Value;

use crate::support::*;

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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
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
    assert_eq!(
        redis
            .command(&format!("REPLICAOF 127.0.0.1 {}", other.port))
            .as_deref(),
        Some("+OK")
    );
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

async fn eventually_true(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One master, one replica, three sentinels; two hubs that know only the sentinels
/// (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`), a socket on each. The master is SIGKILLed:
/// readiness goes to 503 on both hubs, the sentinels promote the replica, both hubs follow it
/// and what is published on the new master reaches both sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_by_every_hub() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start();
    assert_eq!(
        replica
            .command(&format!("REPLICAOF 127.0.0.1 {}", master.port))
            .as_deref(),
        Some("+OK")
    );
    eventually_true("the replica syncs", || {
        replica
            .info("replication")
            .is_some_and(|info| info.contains("master_link_status:up"))
    })
    .await;
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
    eventually_true("the sentinels know the master and each other", || {
        sentinels
            .iter()
            .all(|s| s.master_port() == Some(master.port))
    })
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
    let mut on_a = Phx::org_member(&a, &org).await;
    let mut on_b = Phx::org_member(&b, &org).await;
    publish_event(
        &master,
        &org,
        Event::new(&org, "player.transferred").json(),
        2,
    )
    .await;
    on_a.event(&topic, "player.transferred").await;
    on_b.event(&topic, "player.transferred").await;

    master.stop();
    wait_readiness(&a, "hub a sees the master gone", false).await;
    wait_readiness(&b, "hub b sees the master gone", false).await;
    eventually_true("the sentinels promote the replica", || {
        sentinels[0].master_port() == Some(replica.port)
    })
    .await;
    wait_readiness(&a, "hub a follows the new master", true).await;
    wait_readiness(&b, "hub b follows the new master", true).await;

    let after = Event::new(&org, "team_goal.completed").json();
    publish_event(&replica, &org, after, 2).await;
    let on_a_after = on_a.event(&topic, "team_goal.completed").await;
    let on_b_after = on_b.event(&topic, "team_goal.completed").await;
    assert_eq!(on_a_after[4]["id"], on_b_after[4]["id"]);
    wait_for_log(&["redis connected", "reconnect=true"]).await;
}
