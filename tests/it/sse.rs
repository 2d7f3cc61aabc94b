//! `GET /api/realtime/stream` (SSE): the same tokens and join rules as sockets (401/403 JSON),
//! a resume token in `id:` covering every topic, `Last-Event-ID` replay across hubs and
//! restarts, and a clean end on shutdown.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

#[derive(Debug, Default, Clone)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
    retry: Option<u64>,
}

struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    async fn open(base: &str, query: &str, last_event_id: Option<&str>) -> SseClient {
        let mut request = reqwest::Client::new().get(format!("{base}/api/realtime/stream?{query}"));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        SseClient {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped); `None` when the stream ended.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut any = false;
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "" => continue, // comment (heartbeat)
                        "id" => event.id = Some(value.to_string()),
                        "event" => event.event = Some(value.to_string()),
                        "retry" => event.retry = value.parse().ok(),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        _ => {}
                    }
                    any = true;
                }
                if any {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout(TIMEOUT, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no SSE event within {TIMEOUT:?}"),
            }
        }
    }

    /// The next event named `name`.
    async fn next_named(&mut self, name: &str) -> SseEvent {
        loop {
            let event = self.next().await.expect("stream still open");
            if event.event.as_deref() == Some(name) {
                return event;
            }
        }
    }
}

fn n_of(event: &SseEvent) -> u64 {
    serde_json::from_str::<Value>(&event.data).unwrap()["payload"]["n"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn tokens_and_topics_are_checked_like_sockets() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let base = format!("http://{}", hub.addr);
    let get = |query: String, bearer: Option<String>| {
        let mut request = reqwest::Client::new().get(format!("{base}/api/realtime/stream?{query}"));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = get("topics=org_events:o1".into(), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = get("topics=org_events:o1&token=garbage".into(), None).await;
    assert_eq!(status, 401);
    let (status, body) = get("topics=org_events:o2".into(), Some(user_token("u1", "o1"))).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].is_string());
    let (status, _) = get("topics=rooms:1".into(), Some(user_token("u1", "o1"))).await;
    assert_eq!(status, 400);
    let (status, _) = get(
        format!(
            "topics=org_events:o1&token={}&lastEventId=%25%25",
            user_token("u1", "o1")
        ),
        None,
    )
    .await;
    assert_eq!(
        status, 400,
        "a malformed Last-Event-ID is refused, not ignored"
    );
}

#[tokio::test]
async fn events_stream_with_ids_and_resume_on_another_hub_with_last_event_id() {
    let redis = RedisServer::start();
    let mut hubs = ready_hubs(&redis, 2, |_| {}).await;
    let org = unique("org");
    let token = user_token("u1", &org);
    let query = format!("topics=org_events:{org},notifications:u1&token={token}");
    let mut first = SseClient::open(&format!("http://{}", hubs[0].addr), &query, None).await;
    let hello = first.next_named("stream_started").await;
    assert_eq!(hello.retry, Some(3000), "the retry hint comes once, first");
    assert!(hello.id.is_some());
    let channel = format!("prostaff:events:{org}");
    assert!(
        redis
            .publish_when_subscribed(&channel, &Event::numbered(&org, 0).text(), 2)
            .await
    );
    let seen = first.next_named("player.transferred").await;
    assert_eq!(
        serde_json::from_str::<Value>(&seen.data).unwrap(),
        serde_json::from_str::<Value>(&Event::numbered(&org, 0).text()).unwrap()
    );
    let resume = seen.id.clone().expect("every event carries a resume token");
    drop(first);

    // A socket on B sees the events live, which means they are in history.
    let mut witness = Phx::org_member(&hubs[1], &org).await;
    for n in 1..11 {
        redis.publish(&channel, &Event::numbered(&org, n).text());
    }
    for _ in 1..11 {
        witness
            .event(&format!("org_events:{org}"), "player.transferred")
            .await;
    }

    let mut second =
        SseClient::open(&format!("http://{}", hubs[1].addr), &query, Some(&resume)).await;
    let hello = second.next_named("stream_started").await;
    assert_eq!(
        serde_json::from_str::<Value>(&hello.data).unwrap()["recovered"],
        true
    );
    let mut numbers = Vec::new();
    for _ in 1..11 {
        numbers.push(n_of(&second.next_named("player.transferred").await));
    }
    assert_eq!(
        numbers,
        (1..11).collect::<Vec<u64>>(),
        "missed events in order"
    );
    redis.publish(&channel, &Event::numbered(&org, 11).text());
    let live = second.next_named("player.transferred").await;
    assert_eq!(n_of(&live), 11, "then live");
    drop(second);

    // Every hub restarted: the history is in Redis, so the token still resumes.
    drop(witness);
    for hub in hubs.drain(..) {
        hub.shutdown().await.unwrap();
    }
    let restarted = TestHub::with_redis(&redis).await;
    restarted.wait_redis_ready().await;
    let mut witness = Phx::org_member(&restarted, &org).await;
    redis.publish(&channel, &Event::numbered(&org, 12).text());
    witness
        .event(&format!("org_events:{org}"), "player.transferred")
        .await;
    let mut after_restart = SseClient::open(
        &format!("http://{}", restarted.addr),
        &query,
        live.id.as_deref(),
    )
    .await;
    let hello = after_restart.next_named("stream_started").await;
    assert_eq!(
        serde_json::from_str::<Value>(&hello.data).unwrap()["recovered"],
        true
    );
    assert_eq!(
        n_of(&after_restart.next_named("player.transferred").await),
        12
    );
    let hubs = [restarted];

    // A resume token from a lost history says so.
    let stale = {
        let mut positions = std::collections::BTreeMap::new();
        positions.insert(
            format!("org_events:{org}"),
            prostaff_events::history::Position::parse("gone:3").unwrap(),
        );
        prostaff_events::sse::resume_token(&positions)
    };
    let mut third =
        SseClient::open(&format!("http://{}", hubs[0].addr), &query, Some(&stale)).await;
    let hello = third.next_named("stream_started").await;
    assert_eq!(
        serde_json::from_str::<Value>(&hello.data).unwrap()["recovered"],
        false
    );
}

#[tokio::test]
async fn a_stream_ends_cleanly_on_shutdown() {
    let (_redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let query = format!("topics=org_events:{org}&token={}", user_token("u1", &org));
    let mut client = SseClient::open(&format!("http://{}", hub.addr), &query, None).await;
    client.next_named("stream_started").await;
    let shutdown = tokio::spawn(hub.shutdown());
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while client.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream did not end on shutdown");
    shutdown.await.unwrap().unwrap();
}

/// Issue 25: a resume token ahead of the topic's position (a client from before a Redis
/// restart) made the stream skip every broadcast until the topic caught up with it; sockets
/// started from the current position. Both do now.
#[tokio::test]
async fn a_resume_token_ahead_of_the_topic_does_not_hide_later_events() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let token = user_token("u1", &org);
    let base = format!("http://{}", hub.addr);
    let mut first = SseClient::open(&base, &format!("topics={topic}&token={token}"), None).await;
    let started = first.next_named("stream_started").await;
    let position: String = {
        let bytes = base64_decode(started.id.as_deref().unwrap());
        let map: Value = serde_json::from_slice(&bytes).unwrap();
        map[&topic].as_str().unwrap().to_string()
    };
    drop(first);
    let (epoch, _) = position.split_once(':').unwrap();
    let ahead = prostaff_events::sse::resume_token(
        &std::iter::once((
            topic.clone(),
            prostaff_events::history::Position::parse(&format!("{epoch}:1000")).unwrap(),
        ))
        .collect(),
    );
    let mut stream = SseClient::open(
        &base,
        &format!("topics={topic}&token={token}"),
        Some(&ahead),
    )
    .await;
    let started = stream.next_named("stream_started").await;
    assert_eq!(
        serde_json::from_str::<Value>(&started.data).unwrap()["recovered"],
        false
    );
    redis.publish(
        &format!("prostaff:events:{org}"),
        &Event::numbered(&org, 1).text(),
    );
    let event = stream.next_named("player.transferred").await;
    assert_eq!(n_of(&event), 1);
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_filter_applies_live_and_to_the_replay_on_another_hub() {
    let redis = RedisServer::start();
    let a = TestHub::ready(test_config(&redis.url(), "http://127.0.0.1:9")).await;
    let b = TestHub::ready(test_config(&redis.url(), "http://127.0.0.1:9")).await;
    let org = unique("org");
    let token = user_token("u1", &org);
    let refused = reqwest::get(format!(
        "http://{}/api/realtime/stream?topics=org_events:{org}&types=*&token={token}",
        a.addr
    ))
    .await
    .unwrap();
    assert_eq!(refused.status(), 400);

    // Odd events are team goals (wanted), even ones roster changes (filtered out).
    let event = |n: usize| {
        let event_type = if n % 2 == 1 {
            "team_goal.completed"
        } else {
            "roster.player_hired"
        };
        json!({"type": event_type, "org_id": org, "user_id": "u", "id": format!("{org}-t{n}"),
            "payload": {"n": n, "goal_id": "g", "player_id": "p"}})
        .to_string()
    };
    let channel = format!("prostaff:events:{org}");
    let query = format!("topics=org_events:{org}&types=team_goal.*&token={token}");
    let mut first = SseClient::open(&format!("http://{}", a.addr), &query, None).await;
    first.next_named("stream_started").await;
    assert!(redis.publish_when_subscribed(&channel, &event(1), 2).await);
    for n in 2..=4 {
        redis.publish(&channel, &event(n));
    }
    let one = first.next().await.unwrap();
    let three = first.next().await.unwrap();
    assert_eq!((n_of(&one), n_of(&three)), (1, 3));
    let resume = three.id.clone().unwrap();
    drop(first);

    let mut witness = Phx::org_member(&b, &org).await;
    for n in 5..=8 {
        redis.publish(&channel, &event(n));
    }
    for _ in 5..=8 {
        witness
            .recv_matching(|f| f[2] == format!("org_events:{org}").as_str())
            .await;
    }
    let mut second = SseClient::open(&format!("http://{}", b.addr), &query, Some(&resume)).await;
    let hello = second.next_named("stream_started").await;
    assert_eq!(
        serde_json::from_str::<Value>(&hello.data).unwrap()["recovered"],
        true
    );
    redis.publish(&channel, &event(9));
    let mut numbers = Vec::new();
    while numbers.last() != Some(&9) {
        let next = second.next().await.unwrap();
        assert_eq!(next.event.as_deref(), Some("team_goal.completed"));
        numbers.push(n_of(&next));
    }
    assert_eq!(
        numbers,
        vec![5, 7, 9],
        "the matching events, once, in order"
    );
}
