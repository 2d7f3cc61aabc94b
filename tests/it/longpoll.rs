//! The long-poll transport (issue 13) over plain HTTP, as phoenix.js's `LongPoll` uses it:
//! session creation (410 + token), NDJSON POSTs, held GETs (200 with messages, or 204),
//! 403/410 in the JSON body of HTTP 200 answers, CORS; acknowledged redelivery; requests that
//! land on another hub than the session's (no sticky sessions); idle expiry; the slow-consumer
//! policy; and the drain.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const HOLD_MS: u64 = 300;

fn config(redis: &RedisServer) -> prostaff_events::config::Config {
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.longpoll.hold = Duration::from_millis(HOLD_MS);
    config
}

/// A long-poll client that behaves like phoenix.js's `LongPoll`: it sends back the token of the
/// last answer, and the socket params (the JWT) on every request.
pub(crate) struct Lp {
    client: reqwest::Client,
    base: String,
    jwt: String,
    token: String,
    next_ref: u64,
}

/// GETs or POSTs `url`, asserting HTTP 200 and a JSON body (phoenix.js reads only the body).
async fn request(builder: reqwest::RequestBuilder) -> Value {
    let response = builder.send().await.expect("long-poll request");
    assert_eq!(
        response.status(),
        200,
        "long-poll answers are always HTTP 200"
    );
    response.json().await.expect("a JSON answer")
}

impl Lp {
    pub(crate) async fn open(http_base: &str, jwt: &str) -> Lp {
        let client = reqwest::Client::new();
        let base = format!("{http_base}/socket/longpoll");
        let answer = request(client.get(format!("{base}?token={jwt}&vsn=2.0.0"))).await;
        assert_eq!(answer["status"], 410, "{answer}");
        let token = answer["token"]
            .as_str()
            .expect("a session token")
            .to_string();
        assert!(token.starts_with("lp."), "{token}");
        Lp {
            client,
            base,
            jwt: jwt.to_string(),
            token,
            next_ref: 0,
        }
    }

    /// The same session, with requests sent to another hub.
    fn via(&mut self, http_base: &str) -> &mut Lp {
        self.base = format!("{http_base}/socket/longpoll");
        self
    }

    fn url(&self) -> String {
        format!(
            "{}?token={}&vsn=2.0.0&token={}",
            self.base, self.jwt, self.token
        )
    }

    async fn post(&mut self, frames: &[Value]) -> Value {
        let body: Vec<String> = frames.iter().map(Value::to_string).collect();
        request(
            self.client
                .post(self.url())
                .header("content-type", "application/x-ndjson")
                .body(body.join("\n")),
        )
        .await
    }

    pub(crate) async fn poll(&mut self) -> Value {
        let answer = request(self.client.get(self.url())).await;
        if let Some(token) = answer["token"].as_str() {
            self.token = token.to_string();
        }
        answer
    }

    /// Polls until a message matches; returns every message seen, the match last.
    async fn poll_until(&mut self, what: &str, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answer = self.poll().await;
            assert!(
                answer["status"] == 200 || answer["status"] == 204,
                "{what}: {answer}"
            );
            for message in answer["messages"].as_array().into_iter().flatten() {
                let frame: Value = serde_json::from_str(message.as_str().unwrap()).unwrap();
                let found = predicate(&frame);
                seen.push(frame);
                if found {
                    return seen;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out polling for {what}; saw {seen:?}"
            );
        }
    }

    pub(crate) async fn join(&mut self, topic: &str, params: Value) -> Value {
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        let answer = self.post(&[json!([r, r, topic, "phx_join", params])]).await;
        assert_eq!(answer["status"], 200, "{answer}");
        let frames = self
            .poll_until("the join reply", |f| {
                f[1] == json!(r) && f[3] == "phx_reply"
            })
            .await;
        frames.last().unwrap().clone()
    }

    /// Polls until an answer is 204 (what was queued, e.g. a presence diff, is read).
    async fn drain(&mut self) {
        for _ in 0..20 {
            if self.poll().await["status"] == 204 {
                return;
            }
        }
        panic!("the session never went quiet");
    }

    /// Polls until the session is gone (410), collecting what came before.
    pub(crate) async fn poll_until_gone(&mut self) -> Vec<Value> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let answer = self.poll().await;
            if answer["status"] == 410 {
                return seen;
            }
            for message in answer["messages"].as_array().into_iter().flatten() {
                seen.push(serde_json::from_str(message.as_str().unwrap()).unwrap());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the session never ended; saw {seen:?}"
            );
        }
    }
}

fn transferred(org: &str, n: usize) -> Value {
    json!({"type": "player.transferred", "org_id": org, "user_id": "u", "id": format!("{org}-lp-{n}"), "payload": {"n": n}})
}

#[tokio::test]
async fn a_long_poll_session_joins_receives_and_answers_as_phoenix_js_expects() {
    let redis = RedisServer::start();
    let hub = TestHub::start(config(&redis)).await;
    hub.wait_redis_ready().await;
    let org = unique("lporg");
    let topic = format!("org_events:{org}");
    let mut lp = Lp::open(&hub.http(""), &user_token("u1", &org)).await;

    let reply = lp.join(&topic, json!({})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert!(reply[4]["response"]["position"].is_string(), "{reply}");

    // A heartbeat in the same batch as a push: both answered, in order.
    let answer = lp
        .post(&[
            json!([null, "h1", "phoenix", "heartbeat", {}]),
            json!(["1", "p1", &topic, "nope", {}]),
        ])
        .await;
    assert_eq!(answer, json!({"status": 200}));
    let frames = lp.poll_until("the push reply", |f| f[1] == "p1").await;
    let heartbeat = frames
        .iter()
        .position(|f| f[1] == "h1")
        .expect("heartbeat reply");
    assert_eq!(frames[heartbeat][4]["status"], "ok");
    assert!(heartbeat < frames.len() - 1, "replies keep their order");

    publish_event(&redis, &org, transferred(&org, 1), 1).await;
    let frames = lp
        .poll_until("the broadcast", |f| f[3] == "player.transferred")
        .await;
    let event = frames.last().unwrap();
    assert_eq!(event[2], json!(topic));
    assert_eq!(event[4]["payload"]["n"], 1);
    assert!(
        event[1].as_str().is_some_and(|p| p.contains(':')),
        "the position rides in the ref slot: {event}"
    );

    // Nothing to say: the poll is held, then answered 204 with the same token.
    lp.drain().await;
    let before = lp.token.clone();
    let started = std::time::Instant::now();
    let answer = lp.poll().await;
    assert_eq!(answer["status"], 204, "{answer}");
    assert_eq!(lp.token, before);
    assert!(started.elapsed() >= Duration::from_millis(HOLD_MS / 2));

    // An unknown session is 410; POST too.
    let client = reqwest::Client::new();
    let base = hub.http("/socket/longpoll");
    let gone = format!("lp.{}.{}.0", "ab12", "0".repeat(32));
    let answer = request(client.get(format!("{base}?vsn=2.0.0&token={gone}"))).await;
    assert_eq!(answer, json!({"status": 410}));
    let answer = request(
        client
            .post(format!("{base}?vsn=2.0.0&token={gone}"))
            .body("[]"),
    )
    .await;
    assert_eq!(answer, json!({"status": 410}));
    let answer = request(client.get(format!("{base}?vsn=2.0.0&token=lp.garbage"))).await;
    assert_eq!(answer, json!({"status": 410}));

    // A bad or missing JWT is 403; the JWT is also taken from X-Phoenix-AuthToken.
    let answer = request(client.get(format!("{base}?vsn=2.0.0&token=not-a-jwt"))).await;
    assert_eq!(answer, json!({"status": 403}));
    let answer = request(client.get(format!("{base}?vsn=2.0.0"))).await;
    assert_eq!(answer, json!({"status": 403}));
    let answer = request(
        client
            .get(format!("{base}?vsn=2.0.0"))
            .header("x-phoenix-authtoken", user_token("u2", &org)),
    )
    .await;
    assert_eq!(answer["status"], 410, "{answer}");
    let answer =
        request(client.get(format!("{base}?vsn=9.9.9&token={}", user_token("u2", &org)))).await;
    assert_eq!(answer, json!({"status": 403}));

    // CORS preflight for the header and the NDJSON POST phoenix.js sends.
    let preflight = client
        .request(reqwest::Method::OPTIONS, &base)
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "x-phoenix-authtoken,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(allowed.contains("x-phoenix-authtoken"), "{allowed}");
    assert!(preflight
        .headers()
        .contains_key("access-control-allow-origin"));

    assert_eq!(admin_status(&hub).await["longpoll_sessions"], 2);
    let metrics = hub.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "prostaff_longpoll_requests_total",
            &["op=\"create\"", "outcome=\"missing_token\""]
        ) >= 1.0
    );
}

#[tokio::test]
async fn an_answer_that_never_arrived_is_sent_again_until_acknowledged() {
    let redis = RedisServer::start();
    let hub = TestHub::start(config(&redis)).await;
    hub.wait_redis_ready().await;
    let org = unique("lpack");
    let topic = format!("tournament:{org}");
    let mut lp = Lp::open(&hub.http(""), &user_token("u1", &org)).await;
    lp.join(&topic, json!({})).await;

    lp.post(&[json!(["1", "x1", &topic, "unknown_event", {}])])
        .await;
    let acknowledged_before = lp.token.clone();
    let first = lp.poll().await;
    assert_eq!(first["status"], 200, "{first}");
    // The answer is "lost": the client polls again with the token it had.
    lp.token = acknowledged_before;
    let again = lp.poll().await;
    assert_eq!(
        again["messages"], first["messages"],
        "unacknowledged messages come again"
    );
    assert_eq!(again["token"], first["token"]);
    // With the new token they are acknowledged: the next poll has nothing.
    let next = lp.poll().await;
    assert_eq!(next["status"], 204, "{next}");
}

#[tokio::test]
async fn polls_and_posts_that_land_on_another_hub_reach_the_session() {
    let redis = RedisServer::start();
    let a = TestHub::start(config(&redis)).await;
    let b = TestHub::start(config(&redis)).await;
    a.wait_redis_ready().await;
    b.wait_redis_ready().await;
    let org = unique("lproute");
    let topic = format!("org_events:{org}");
    let mut lp = Lp::open(&a.http(""), &user_token("u1", &org)).await;

    // Join through B, read the reply through B: both routed to A through Redis.
    let reply = lp.via(&b.http("")).join(&topic, json!({})).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    for n in 0..4 {
        let hub = if n % 2 == 0 { &a } else { &b };
        publish_event(&redis, &org, transferred(&org, n), 2).await;
        let frames = lp
            .via(&hub.http(""))
            .poll_until("the routed broadcast", |f| f[3] == "player.transferred")
            .await;
        assert_eq!(
            frames.last().unwrap()[4]["payload"]["n"],
            n,
            "in order, once"
        );
    }
    // A held poll through B is answered 204 by A when nothing comes.
    lp.via(&b.http("")).drain().await;
    let answer = lp.poll().await;
    assert_eq!(answer["status"], 204, "{answer}");
    let routed = b.metrics().await;
    assert!(
        metric_value(
            &routed,
            "prostaff_longpoll_requests_total",
            &["op=\"poll\"", "outcome=\"ok\""]
        ) >= 2.0
    );
    assert_eq!(
        admin_status(&b).await["longpoll_sessions"],
        0,
        "the session lives on A"
    );
    assert_eq!(admin_status(&a).await["longpoll_sessions"], 1);

    // A drains (a deploy): the session closes; polls through B see the end as 410, and so does
    // a poll once A is gone for good (nobody listens on its channel).
    a.shutdown().await.unwrap();
    lp.via(&b.http("")).poll_until_gone().await;
    let answer = lp.poll().await;
    assert_eq!(answer, json!({"status": 410}));
}

#[tokio::test]
async fn a_session_without_requests_expires_and_leaves_its_channels() {
    let redis = RedisServer::start();
    let mut config = config(&redis);
    config.longpoll.session_timeout = Duration::from_millis(600);
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let org = unique("lpidle");
    let topic = format!("org_events:{org}");
    let mut lp = Lp::open(&hub.http(""), &user_token("u1", &org)).await;
    lp.join(&topic, json!({})).await;
    let mut watcher = Phx::connect(&hub, &user_token("watcher", &org)).await;
    watcher.presence = true;
    watcher.join_ok(&topic).await;

    // Polling keeps it alive past the timeout.
    for _ in 0..4 {
        lp.poll().await;
    }
    assert_eq!(admin_status(&hub).await["longpoll_sessions"], 1);
    let expired_before = metric_value(
        &hub.metrics().await,
        "prostaff_longpoll_sessions_expired_total",
        &[],
    );

    // Then the client vanishes: the session ends and its presence leaves.
    let leave = watcher
        .recv_matching(|f| f[3] == "presence_diff" && f[4]["leaves"].get("user:u1").is_some())
        .await;
    assert!(leave[4]["leaves"]["user:u1"]["metas"].is_array());
    assert_eq!(admin_status(&hub).await["longpoll_sessions"], 0);
    let expired = metric_value(
        &hub.metrics().await,
        "prostaff_longpoll_sessions_expired_total",
        &[],
    );
    assert!(expired > expired_before, "{expired} > {expired_before}");
    assert_eq!(lp.poll().await, json!({"status": 410}));
}

#[tokio::test]
async fn a_session_that_stops_reading_is_closed_like_a_slow_websocket() {
    let redis = RedisServer::start();
    let mut config = config(&redis);
    config.limits.outbound_buffer_frames = 8;
    config.limits.write_timeout = Duration::from_millis(400);
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let org = unique("lpslow");
    let topic = format!("org_events:{org}");
    let mut lp = Lp::open(&hub.http(""), &user_token("u1", &org)).await;
    lp.join(&topic, json!({})).await;

    // Keep the session alive with POSTs (heartbeats) but never poll while 300 events arrive.
    for n in 0..300 {
        publish_event(&redis, &org, transferred(&org, n), 1).await;
    }
    // The session ends on its own write timeout: its input closes, so a POST then hears 410.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = lp
            .post(&[json!([null, "hb", "phoenix", "heartbeat", {}])])
            .await;
        if answer["status"] == 410 {
            break;
        }
        assert_eq!(answer["status"], 200, "{answer}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow session was never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What was queued is still handed out, then the session is gone.
    let frames = lp.poll_until_gone().await;
    assert!(!frames.is_empty());
    assert!(frames.len() < 300, "the queue is bounded: {}", frames.len());
}

#[tokio::test]
async fn an_oversized_post_batch_is_refused_and_the_session_survives() {
    let redis = RedisServer::start();
    let mut config = config(&redis);
    // A batch may carry 100 frames of MAX_FRAME_BYTES: 100 × 200 bytes here.
    config.limits.max_frame_bytes = 200;
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let org = unique("lpbig");
    let mut lp = Lp::open(&hub.http(""), &user_token("u1", &org)).await;
    let frame = json!([null, "big", "phoenix", "heartbeat", {"pad": "x".repeat(150)}]);
    let answer = lp.post(&vec![frame; 200]).await;
    assert_eq!(answer, json!({"status": 413}));
    let rejected = metric_value(
        &hub.metrics().await,
        "prostaff_inbound_rejected_total",
        &["reason=\"longpoll_batch_too_big\""],
    );
    assert!(rejected >= 1.0);
    // The session is still there: a normal batch goes through and is answered.
    let answer = lp
        .post(&[json!([null, "ok", "phoenix", "heartbeat", {}])])
        .await;
    assert_eq!(answer, json!({"status": 200}));
    let frames = lp.poll_until("the heartbeat reply", |f| f[1] == "ok").await;
    assert_eq!(frames.last().unwrap()[4]["status"], "ok");
}

#[tokio::test]
async fn a_type_filter_on_a_long_poll_join_holds_live_and_for_a_resume_on_another_hub() {
    let redis = RedisServer::start();
    let hub = TestHub::ready(config(&redis)).await;
    let other = TestHub::ready(config(&redis)).await;
    let org = unique("lporg");
    let topic = format!("org_events:{org}");
    let token = user_token("u1", &org);
    let mut lp = Lp::open(&hub.http(""), &token).await;
    let refused = lp.join(&topic, json!({"types": ["a*"]})).await;
    assert_eq!(
        refused[4]["response"]["reason"], "invalid_params",
        "{refused}"
    );
    let filter = json!(["tournament_match.*"]);
    let reply = lp.join(&topic, json!({ "types": filter })).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");

    // Odd events are team goals (filtered out), even ones match events (wanted).
    let event = |n: u64| {
        let event_type = if n % 2 == 1 {
            "team_goal.completed"
        } else {
            "tournament_match.confirmed"
        };
        json!({"type": event_type, "org_id": org, "user_id": "u", "id": format!("{org}-{n}"),
            "payload": {"n": n, "tournament_id": "t1", "goal_id": "g"}})
    };
    let broadcasts = |frames: &[Value]| -> Vec<u64> {
        frames
            .iter()
            .filter(|f| f[2] == json!(topic) && f[4]["payload"]["n"].is_u64())
            .map(|f| f[4]["payload"]["n"].as_u64().unwrap())
            .collect()
    };
    for n in 1..=4 {
        publish_event(&redis, &org, event(n), 2).await;
    }
    let frames = lp
        .poll_until("the last matching broadcast", |f| f[4]["payload"]["n"] == 4)
        .await;
    assert_eq!(broadcasts(&frames), vec![2, 4]);
    let since = frames.last().unwrap()[1].as_str().unwrap().to_string();

    // Away: 5..8 are published; a new session on the other hub resumes with the same filter.
    for n in 5..=8 {
        publish_event(&redis, &org, event(n), 2).await;
    }
    // Polled by hand: the replay can share the join reply's answer. After the reply, 9 and 10
    // are published live.
    let mut resumed = Lp::open(&other.http(""), &token).await;
    let join = json!(["j", "j", &topic, "phx_join", {"types": filter, "since": since}]);
    assert_eq!(resumed.post(&[join]).await["status"], 200);
    let mut frames: Vec<Value> = Vec::new();
    let mut published = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !frames.iter().any(|f| f[4]["payload"]["n"] == 10) {
        assert!(tokio::time::Instant::now() < deadline, "saw {frames:?}");
        if !published && frames.iter().any(|f| f[1] == "j") {
            publish_event(&redis, &org, event(9), 2).await;
            publish_event(&redis, &org, event(10), 2).await;
            published = true;
        }
        let answer = resumed.poll().await;
        for message in answer["messages"].as_array().into_iter().flatten() {
            frames.push(serde_json::from_str(message.as_str().unwrap()).unwrap());
        }
    }
    let reply = frames.iter().find(|f| f[1] == "j").unwrap();
    assert_eq!(reply[4]["response"]["recovered"], true, "{reply}");
    assert_eq!(broadcasts(&frames), vec![6, 8, 10]);
}
