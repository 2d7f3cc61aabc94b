//! The status page (issue 13): `/admin` and `/admin/status` open only to an internal JWT or
//! `ADMIN_TOKEN`; the page's own socket token joins `admin:status` and nothing else; the pushed
//! figures follow what happens on the hub. (The page itself runs in Chromium in `browser.rs`.)

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const ADMIN_TOKEN: &str = "an-admin-token-for-the-status-page-tests";

async fn hub_with_admin_token(redis: &RedisServer) -> TestHub {
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.admin_token = Some(ADMIN_TOKEN.to_string());
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    hub
}

async fn get(url: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// The page's socket token, as the served HTML carries it.
fn page_token(html: &str) -> String {
    let start = html.find("const TOKEN = \"").expect("token in page") + 15;
    let end = start + html[start..].find('"').unwrap();
    html[start..end].to_string()
}

#[tokio::test]
async fn the_status_page_is_refused_without_an_internal_token_or_admin_token() {
    let redis = RedisServer::start();
    let hub = hub_with_admin_token(&redis).await;
    for path in ["/admin", "/admin/status"] {
        for bearer in [
            None,
            Some(user_token("u1", "o1")),
            Some(player_token("p1", "o1")),
            Some("not-the-admin-token".to_string()),
            Some(prostaff_events::auth::mint_admin_token(SECRET, 60)),
        ] {
            let response = get(&hub.http(path), bearer.as_deref()).await;
            assert_eq!(response.status(), 401, "{path} {bearer:?}");
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].as_str().unwrap().contains("unauthorized"));
        }
        let by_header = get(&hub.http(path), Some(&internal_token())).await;
        assert_eq!(by_header.status(), 200, "{path}");
        let by_admin_token = get(&hub.http(&format!("{path}?token={ADMIN_TOKEN}")), None).await;
        assert_eq!(by_admin_token.status(), 200, "{path}");
    }
    let page = get(&hub.http("/admin"), Some(&internal_token())).await;
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(!html.contains("src=\"http"), "no external assets");
    assert!(!html.contains("__SOCKET_TOKEN__"));
}

#[tokio::test]
async fn the_page_token_joins_admin_status_only_and_the_figures_follow_the_hub() {
    let redis = RedisServer::start();
    let hub = hub_with_admin_token(&redis).await;
    let html = get(&hub.http(&format!("/admin?token={ADMIN_TOKEN}")), None)
        .await
        .text()
        .await
        .unwrap();
    let token = page_token(&html);

    // The page token may not join anything else, and users may not join the admin topic.
    let mut admin = Phx::connect(&hub, &token).await;
    for topic in ["org_events:o1", "tournament:1", "notifications:u1"] {
        let reply = admin.join(topic, json!({})).await;
        assert_eq!(reply[4]["response"]["reason"], "unauthorized", "{topic}");
    }
    let mut user = Phx::connect(&hub, &user_token("u1", "o1")).await;
    let reply = user.join("admin:status", json!({})).await;
    assert_eq!(reply[4]["response"]["reason"], "unauthorized");

    admin.join_ok("admin:status").await;
    let first = admin.event("admin:status", "status").await;
    let figures = &first[4];
    assert_eq!(figures["redis"]["connected"], true);
    assert_eq!(figures["by_kind"]["admin"], 1);
    assert_eq!(figures["by_kind"]["user"], 1);
    assert!(figures["instance"].as_str().unwrap().len() == 12);

    // More users, a topic with subscribers, broadcasts and a queue: the next pushes show them.
    let org = unique("adminorg");
    let mut members = Vec::new();
    for n in 0..3 {
        let mut phx = Phx::connect(&hub, &user_token(&format!("m{n}"), &org)).await;
        phx.join_ok(&format!("org_events:{org}")).await;
        members.push(phx);
    }
    let open = json!({"type": "inhouse.queue_opened", "org_id": org, "user_id": "coach", "id": unique("ev"),
        "payload": {"queue_id": "q1", "status": "open"}});
    publish_event(&redis, &org, open, 1).await;
    for n in 0..5 {
        let event = json!({"type": "player.transferred", "org_id": org, "user_id": "u", "id": format!("{org}-{n}"), "payload": {}});
        publish_event(&redis, &org, event, 1).await;
    }
    let topic = format!("org_events:{org}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut saw_rate = false;
    loop {
        let frame = admin.event("admin:status", "status").await;
        let s = &frame[4];
        saw_rate |= s["broadcasts_per_s"].as_f64().unwrap() > 0.0;
        let subscribers = s["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == json!(topic))
            .map(|t| t["subscribers"].clone());
        let queue = s["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["org_id"] == json!(org))
            .cloned();
        if s["by_kind"]["user"] == 4
            && subscribers == Some(json!(3))
            && saw_rate
            && queue.as_ref().is_some_and(|q| q["status"] == "open")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "figures never caught up: {s}"
        );
    }
}
