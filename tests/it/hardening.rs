//! Hardening (issue 9): a working `.env.example`, token scoping and time claims, a scraper key
//! that cannot steer queues, bounded names, a per-identity socket cap, log lines that cannot be
//! forged, a join budget that covers a full rejoin, half-open Redis detection, no duplicate
//! delivery after a timed-out PUBLISH, the hard stop, readiness and metrics protection.

use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_env_example_copy_starts_the_hub() {
    // `cp .env.example .env && cargo run --release`, in a copy of the repository's files (the
    // port comes from the environment, which wins over .env, so parallel tests do not collide).
    let dir = std::env::temp_dir().join(unique("env-example"));
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::copy(repo_file(".env.example"), dir.join(".env")).unwrap();
    std::fs::copy(
        repo_file("config/prostaff-events.example.toml"),
        dir.join("config/prostaff-events.example.toml"),
    )
    .unwrap();
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prostaff-events"))
        .current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = format!("http://127.0.0.1:{port}/health");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use tokio::io::AsyncReadExt;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await
                .unwrap();
            panic!("the hub exited with {status}: {stderr}");
        }
        if reqwest::get(&health).await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hub never served /health"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();

    // Production stays the container's default: compose maps an empty APP_ENV to production,
    // and .env.example leaves it empty (dev for `cargo run`).
    let env_example = std::fs::read_to_string(repo_file(".env.example")).unwrap();
    assert!(
        env_example.lines().any(|l| l == "APP_ENV="),
        ".env.example must leave APP_ENV empty"
    );
    let compose = std::fs::read_to_string(repo_file("docker-compose.yml")).unwrap();
    assert!(compose.contains("APP_ENV: ${APP_ENV:-production}"));
    let dockerfile = std::fs::read_to_string(repo_file("Dockerfile")).unwrap();
    assert!(dockerfile.contains("APP_ENV=production"));
}

async fn post_notify(hub: &TestHub, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(hub.http("/events/notify"))
        .header("x-api-key", SCRAPER_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_leaked_scraper_key_cannot_steer_queues_or_notify_users() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let mut member = Phx::connect(&hub, &user_token("u1", &org)).await;
    member.join_ok(&format!("inhouse:{org}")).await;
    member.join_ok("notifications:u1").await;
    for event_type in [
        "inhouse.queue_opened",
        "inhouse.check_in_started",
        "inhouse.queue_closed",
        "notification.new",
    ] {
        let (status, body) = post_notify(
            &hub,
            json!({"type": event_type, "org_id": org, "user_id": "u1", "payload": {"queue_id": "q1", "check_in_deadline": "2030-01-01T00:00:00Z"}}),
        )
        .await;
        assert_eq!(status, 403, "{event_type}");
        assert!(
            body["error"].as_str().unwrap().contains("not allowed"),
            "{body}"
        );
    }
    assert!(
        member.silent_for(Duration::from_millis(400)).await,
        "nothing was delivered"
    );
    let (status, body) =
        post_notify(&hub, json!({"type": "scraper.match_found", "org_id": org})).await;
    assert_eq!((status, body["ok"].clone()), (200, json!(true)));

    // The internal publish API keeps full power.
    let response = reqwest::Client::new()
        .post(hub.http("/api/events"))
        .bearer_auth(internal_token())
        .json(
            &json!({"type": "inhouse.queue_opened", "org_id": org, "payload": {"queue_id": "q1"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let opened = member
        .recv_matching(|f| f[3] == "queue_update" && f[4]["event"] == "queue_opened")
        .await;
    assert_eq!(opened[4]["queue_id"], "q1");
}

#[tokio::test]
async fn tokens_are_scoped_to_their_key_and_time_claims_are_strict() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let now = prostaff_events::auth::unix_now() as f64;
    let rails_internal = prostaff_events::auth::mint(
        RAILS_SECRET,
        &json!({"type": "internal", "iss": "prostaff-api"}),
    );
    assert_eq!(
        upgrade_status(
            &hub.ws_url(&format!("vsn=2.0.0&token={rails_internal}")),
            &[]
        )
        .await,
        403
    );
    for exp in [json!("9999999999"), json!(-1), json!(1e19)] {
        let token = prostaff_events::auth::mint(
            SECRET,
            &json!({"user_id": "u", "org_id": "o", "exp": exp}),
        );
        assert_eq!(
            upgrade_status(&hub.ws_url(&format!("vsn=2.0.0&token={token}")), &[]).await,
            403,
            "{exp}"
        );
    }
    // A float exp (beyond the 30 s default leeway, so the test config uses none) is enforced.
    let mut config = test_config("redis://127.0.0.1:9/0", "http://127.0.0.1:9");
    config.jwt_leeway_s = 0;
    let strict = TestHub::start(config).await;
    let token = prostaff_events::auth::mint(
        SECRET,
        &json!({"user_id": "u", "org_id": "o", "exp": now + 1.5}),
    );
    let mut phx = Phx::connect(&strict, &token).await;
    assert_eq!(
        phx.close_code().await,
        Some(1008),
        "the socket closes when the float exp passes"
    );
}

#[tokio::test]
async fn oversized_names_are_refused_with_clear_errors() {
    let (redis, hub) = redis_and_ready_hub().await;
    let mut phx = Phx::connect(&hub, &internal_token()).await;
    let topic = format!("tournament:{}", "x".repeat(64 * 1024 - 200));
    let reply = phx.join(&topic, json!({})).await;
    assert_eq!(reply[4]["response"]["reason"], "topic too long");
    assert!(
        reply[2].as_str().unwrap().len() <= 200,
        "the reply does not echo 64 KiB back"
    );
    let ok = phx
        .join(&format!("tournament:{}", "x".repeat(180)), json!({}))
        .await;
    assert_eq!(ok[4]["status"], "ok");

    let org = unique("org");
    let (status, body) = post_notify(
        &hub,
        json!({"type": format!("scraper.{}", "t".repeat(300)), "org_id": org}),
    )
    .await;
    assert_eq!(status, 422);
    assert!(body["error"].as_str().unwrap().contains("type"), "{body}");
    let long_org = "o".repeat(300);
    let message = json!({"type": "player.x", "org_id": long_org, "user_id": "u"}).to_string();
    assert!(
        redis
            .publish_when_subscribed("prostaff:events:long", &message, 1)
            .await
    );
    wait_for_log(&["dropped event", "field(s) too long: org_id"]).await;
}

#[tokio::test]
async fn one_identity_cannot_take_every_connection() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.limits.max_connections_per_identity = Some(3);
    let hub = TestHub::start(config).await;
    let url = hub.ws_url(&format!("vsn=2.0.0&token={}", user_token("greedy", "o1")));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Phx::connect_url(&url).await);
    }
    assert_eq!(upgrade_status(&url, &[]).await, 429);
    let other = hub.ws_url(&format!(
        "vsn=2.0.0&token={}",
        user_token("someone-else", "o1")
    ));
    assert_eq!(upgrade_status(&other, &[]).await, 101);
    drop(held.pop());
    eventually("a slot frees when a socket closes", || async {
        upgrade_status(&url, &[]).await == 101
    })
    .await;
    let metrics = hub.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "prostaff_socket_connects_total",
            &["too_many_connections_per_identity"]
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_newline_in_untrusted_text_cannot_forge_a_log_line() {
    let (redis, _hub) = redis_and_ready_hub().await;
    let marker = unique("FORGED");
    let message = json!({"type": format!("weird.type\n{marker} INFO forged"), "org_id": "o\r\nx", "user_id": "u"}).to_string();
    assert!(
        redis
            .publish_when_subscribed("prostaff:events:o", &message, 1)
            .await
    );
    let line = wait_for_log(&["Unrouted event", &marker]).await;
    assert!(line.contains("weird.type\\n"), "{line}");
    assert!(
        !all_logs().lines().any(|l| l.starts_with(&marker)),
        "a log line begins with attacker text"
    );
}

#[tokio::test]
async fn a_full_rejoin_burst_is_not_rate_limited() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let mut phx = Phx::connect(&hub, &internal_token()).await;
    // phoenix.js after a reconnect: every channel's join at once, with the default limits.
    for i in 0..101 {
        phx.send(json!([
            format!("j{i}"),
            format!("j{i}"),
            format!("tournament:{i}"),
            "phx_join",
            {}
        ]))
        .await;
    }
    let mut reasons = Vec::new();
    for i in 0..101 {
        let reply = phx.reply(&format!("j{i}")).await;
        if reply[4]["status"] != "ok" {
            reasons.push(reply[4]["response"]["reason"].clone());
        }
    }
    assert_eq!(reasons, vec![json!("too many channels joined")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_redis_connection_is_replaced_within_10_s() {
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let hub = TestHub::start(test_config(&proxy.url(), "http://127.0.0.1:9")).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let mut member = Phx::org_member(&hub, &org).await;
    let frozen_at = std::time::Instant::now();
    proxy.freeze();
    // Within 10 s the link notices, reconnects through a fresh connection and delivers again.
    let event =
        json!({"type": "player.transferred", "org_id": org, "user_id": "u", "id": "after-freeze"})
            .to_string();
    let mut delivered = false;
    while frozen_at.elapsed() < Duration::from_secs(10) && !delivered {
        redis.publish(&format!("prostaff:events:{org}"), &event);
        delivered = tokio::time::timeout(
            Duration::from_millis(500),
            member.event(&format!("org_events:{org}"), "player.transferred"),
        )
        .await
        .is_ok();
    }
    assert!(
        delivered,
        "no delivery within 10 s of the connection going silent"
    );
    // Caught by an application-level check (not by a TCP reset: the proxy never sends one): the
    // liveness PING, or the stream reader's XREAD BLOCK getting no answer, whichever comes first.
    eventually("the link names its application-level check", || async {
        log_lines("redis unavailable")
            .iter()
            .any(|line| line.contains("ping") || line.contains("no answer to XREAD"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_times_out_is_not_also_delivered_locally() {
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let hub = TestHub::start(test_config(&proxy.url(), "http://127.0.0.1:9")).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let mut member = Phx::org_member(&hub, &org).await;
    proxy.freeze();
    let response = reqwest::Client::new()
        .post(hub.http("/api/events"))
        .bearer_auth(internal_token())
        .json(&json!({"type": "player.transferred", "org_id": org}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("retry"), "{body}");
    assert!(
        member.silent_for(Duration::from_millis(500)).await,
        "no local copy was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_end_of_the_grace_period_stuck_sessions_get_1001() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.shutdown_grace = Duration::from_millis(1500);
    config.limits.outbound_buffer_frames = 4096;
    config.limits.write_timeout = Duration::from_secs(30);
    config.limits.max_frame_bytes = 1024 * 1024;
    // History is beside the point here and would slow the flood into the socket.
    config.history_size = 0;
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let mut stuck = Phx::org_member(&hub, &org).await;
    // Fill the socket until the hub's writes block: the client reads nothing meanwhile.
    let payload = "x".repeat(60 * 1024);
    let event =
        json!({"type": "player.transferred", "org_id": org, "user_id": "u", "payload": payload})
            .to_string();
    let mut connection = redis.connection();
    for _ in 0..400 {
        connection.publish(&format!("prostaff:events:{org}"), &event);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    hub.shutdown().await.unwrap();
    // Now read everything: the stream ends with 1001 (the hard stop), not 1012.
    let mut code = None;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(10), stuck.ws.next()).await
    {
        match message {
            Ok(Message::Close(frame)) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert_eq!(code, Some(1001));
}

#[tokio::test]
async fn readiness_follows_redis_unless_rails_is_required() {
    let redis = RedisServer::start();
    let rails = FakeRails::start(json!([])).await;
    rails.set_mode(RailsMode::Failing);
    let lenient = TestHub::start(test_config(&redis.url(), &rails.url())).await;
    lenient.wait_redis_ready().await;
    let response = reqwest::get(lenient.http("/health/ready")).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["checks"]["rails"], "status 500",
        "Rails is still reported: {body}"
    );

    let mut config = test_config(&redis.url(), &rails.url());
    config.readiness_requires_rails = true;
    let strict = TestHub::start(config).await;
    strict.wait_redis_ready().await;
    assert_eq!(
        reqwest::get(strict.http("/health/ready"))
            .await
            .unwrap()
            .status(),
        503
    );
}

#[tokio::test]
async fn metrics_can_require_a_token_or_a_separate_listener() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.metrics_token = Some("metrics-secret".into());
    let hub = TestHub::start(config).await;
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(hub.http("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let ok = client
        .get(hub.http("/metrics"))
        .bearer_auth("metrics-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("prostaff_"));

    let port = free_port();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.metrics_bind_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let split = TestHub::start(config).await;
    eventually("metrics listener up", || async {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(
        reqwest::get(split.http("/metrics")).await.unwrap().status(),
        404
    );
}

#[tokio::test]
async fn in_production_without_allowed_origins_only_phx_host_may_connect() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.app_env = prostaff_events::config::AppEnv::Production;
    config.phx_host = "events.prostaff.gg".into();
    config.origins = prostaff_events::config::OriginPolicy::Host("events.prostaff.gg".into());
    let hub = TestHub::start(config).await;
    let url = hub.ws_url(&format!("vsn=2.0.0&token={}", user_token("u", "o")));
    assert_eq!(
        upgrade_status(&url, &[("origin", "https://evil.example")]).await,
        403
    );
    assert_eq!(
        upgrade_status(&url, &[("origin", "https://events.prostaff.gg")]).await,
        101
    );
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_connect_over_tls() {
    // A CA and a server certificate for localhost, then redis-server with TLS only.
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=prostaff test CA",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    let port = free_port();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let url = format!("rediss://localhost:{port}/0");
    let hub = BinaryHub::start(
        &url,
        &[("SSL_CERT_FILE", dir.join("ca.pem").to_str().unwrap())],
    )
    .await;
    hub.wait_redis_ready().await;
    // A publish through the hub goes out over TLS and comes back to a member.
    let org = unique("org");
    let mut member = Phx::connect_url(&hub.ws_url(&user_token("u1", &org))).await;
    member.join_ok(&format!("org_events:{org}")).await;
    let response = reqwest::Client::new()
        .post(hub.http("/api/events"))
        .bearer_auth(internal_token())
        .json(&json!({"type": "player.transferred", "org_id": org}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["delivery"], "redis", "{body}");
    member
        .event(&format!("org_events:{org}"), "player.transferred")
        .await;
    drop(hub);
    let _ = server.kill();
    let _ = server.wait();
}
