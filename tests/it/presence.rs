//! Presence across hubs: `presence_state` on join, batched `presence_diff`s, tabs as metas,
//! leaves on `phx_leave` and close, a SIGKILLed hub's members leaving within the TTL, Redis
//! losing its data, the member cap, and a reconnect storm.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// What phoenix.js's `Presence` would hold: key → the `phx_ref`s of its metas.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct View(pub(crate) BTreeMap<String, BTreeSet<String>>);

impl View {
    fn refs(entry: &Value) -> BTreeSet<String> {
        entry["metas"]
            .as_array()
            .expect("metas")
            .iter()
            .map(|meta| meta["phx_ref"].as_str().expect("phx_ref").to_string())
            .collect()
    }

    /// Applies a `presence_state` or `presence_diff` frame (V2); false for other frames.
    pub(crate) fn apply(&mut self, frame: &Value) -> bool {
        match frame_event(frame) {
            "presence_state" => {
                self.0 = frame[4]
                    .as_object()
                    .expect("state object")
                    .iter()
                    .map(|(key, entry)| (key.clone(), View::refs(entry)))
                    .collect();
                true
            }
            "presence_diff" => {
                for (key, entry) in frame[4]["joins"].as_object().expect("joins") {
                    self.0
                        .entry(key.clone())
                        .or_default()
                        .extend(View::refs(entry));
                }
                for (key, entry) in frame[4]["leaves"].as_object().expect("leaves") {
                    if let Some(refs) = self.0.get_mut(key) {
                        for r in View::refs(entry) {
                            refs.remove(&r);
                        }
                        if refs.is_empty() {
                            self.0.remove(key);
                        }
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Like [`View::apply`] on raw text, parsing only what presence needs (the storm test reads
    /// hundreds of megabytes).
    fn apply_text(&mut self, text: &str) -> bool {
        use serde::de::IgnoredAny;
        #[derive(serde::Deserialize)]
        struct Frame<'a>(
            IgnoredAny,
            IgnoredAny,
            IgnoredAny,
            &'a str,
            #[serde(borrow)] &'a serde_json::value::RawValue,
        );
        #[derive(serde::Deserialize)]
        struct Ref {
            phx_ref: String,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            metas: Vec<Ref>,
        }
        type State = std::collections::HashMap<String, Entry>;
        #[derive(serde::Deserialize)]
        struct Diff {
            joins: State,
            leaves: State,
        }
        let refs = |entry: Entry| -> BTreeSet<String> {
            entry.metas.into_iter().map(|m| m.phx_ref).collect()
        };
        let frame: Frame = serde_json::from_str(text).expect("a V2 frame");
        match frame.3 {
            "presence_state" => {
                let state: State = serde_json::from_str(frame.4.get()).expect("state");
                self.0 = state.into_iter().map(|(k, e)| (k, refs(e))).collect();
                true
            }
            "presence_diff" => {
                let diff: Diff = serde_json::from_str(frame.4.get()).expect("diff");
                for (key, entry) in diff.joins {
                    self.0.entry(key).or_default().extend(refs(entry));
                }
                for (key, entry) in diff.leaves {
                    if let Some(current) = self.0.get_mut(&key) {
                        for r in refs(entry) {
                            current.remove(&r);
                        }
                        if current.is_empty() {
                            self.0.remove(&key);
                        }
                    }
                }
                true
            }
            _ => false,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    fn metas(&self, key: &str) -> usize {
        self.0.get(key).map_or(0, BTreeSet::len)
    }
}

/// A client that keeps its presence view (and the last `presence_summary`) up to date.
struct Member {
    phx: Phx,
    view: View,
    summary: Option<Value>,
}

impl Member {
    async fn join(url: &str, topic: &str) -> Member {
        let mut phx = Phx::connect_url(url).await;
        phx.presence = true;
        phx.join_ok(topic).await;
        let mut member = Member {
            phx,
            view: View::default(),
            summary: None,
        };
        let state = member
            .phx
            .recv_matching(|f| frame_event(f) == "presence_state")
            .await;
        member.view.apply(&state);
        member
    }

    /// Reads presence frames until `condition` holds (panics after the support timeout).
    async fn until(&mut self, what: &str, condition: impl Fn(&View) -> bool) {
        self.until_summary(what, |view, _| condition(view)).await
    }

    /// Reads presence frames until `condition` holds of the view and the last summary (`Null`
    /// while none came).
    async fn until_summary(&mut self, what: &str, condition: impl Fn(&View, &Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let summary = self.summary.clone().unwrap_or(Value::Null);
            if condition(&self.view, &summary) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: presence is {:?}, summary {summary}",
                self.view
            );
            let frame = self
                .phx
                .recv_matching(|f| {
                    matches!(
                        frame_event(f),
                        "presence_state" | "presence_diff" | "presence_summary"
                    )
                })
                .await;
            if frame_event(&frame) == "presence_summary" {
                self.summary = Some(frame[4].clone());
            } else {
                self.view.apply(&frame);
            }
        }
    }

    /// Metas in the view.
    fn metas_shown(&self) -> usize {
        self.view.0.values().map(BTreeSet::len).sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_on_two_hubs_see_each_other_and_tabs_are_metas() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs(&redis).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");

    let mut alice = Member::join(&a.socket_url(&user_token("alice", &org)), &topic).await;
    alice
        .until("alice sees herself", |v| v.keys() == ["user:alice"])
        .await;

    let mut bob = Member::join(&b.socket_url(&player_token("bob", &org)), &topic).await;
    bob.until("bob sees alice and himself", |v| {
        v.keys() == ["player:bob", "user:alice"]
    })
    .await;
    alice
        .until("alice sees bob", |v| {
            v.keys() == ["player:bob", "user:alice"]
        })
        .await;

    // A second tab of alice (on the other hub) is a second meta of the same key.
    let mut alice_tab = Member::join(&b.socket_url(&user_token("alice", &org)), &topic).await;
    alice_tab
        .until("the new tab sees both of alice's metas", |v| {
            v.metas("user:alice") == 2
        })
        .await;
    bob.until("bob sees two metas for alice", |v| {
        v.metas("user:alice") == 2 && v.0.len() == 2
    })
    .await;

    // phx_leave of the tab removes that meta only, everywhere.
    let leave = alice_tab.phx.next_ref();
    alice_tab
        .phx
        .send(json!(["1", leave, topic, "phx_leave", {}]))
        .await;
    bob.until("bob sees one meta for alice again", |v| {
        v.metas("user:alice") == 1
    })
    .await;
    alice
        .until("alice sees her single meta", |v| v.metas("user:alice") == 1)
        .await;

    // Closing bob's socket cleanly makes him leave on the other hub (well before the TTL).
    bob.phx.ws.close(None).await.unwrap();
    alice
        .until("alice sees bob leave", |v| v.keys() == ["user:alice"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metas_carry_the_ref_kind_and_online_at_and_internal_services_are_not_tracked() {
    let redis = RedisServer::start();
    let hub = TestHub::with_redis(&redis).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let topic = format!("inhouse:{org}");

    let mut service = Member::join(&hub.socket_url(&internal_token()), &topic).await;
    assert!(
        service.view.0.is_empty(),
        "an internal service is not tracked"
    );
    let _player = Member::join(&hub.socket_url(&player_token("p1", &org)), &topic).await;
    service
        .until("the service sees the player", |v| v.keys() == ["player:p1"])
        .await;

    let mut late = Phx::connect(&hub, &user_token("u1", &org)).await;
    late.presence = true;
    late.join_ok(&topic).await;
    let state = late
        .recv_matching(|f| frame_event(f) == "presence_state")
        .await;
    let metas = &state[4]["player:p1"]["metas"];
    assert_eq!(metas.as_array().unwrap().len(), 1, "{state}");
    let meta = metas[0].as_object().unwrap();
    let mut fields: Vec<&str> = meta.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["kind", "online_at", "phx_ref"]);
    assert_eq!(meta["kind"], "player");
    assert!(meta["online_at"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(
        state[0],
        Value::String("1".into()),
        "pushed with the join ref"
    );
    // The joiner's own meta may come in the state or in the diff right after it; the service
    // never has a key.
    let mut view = View::default();
    view.apply(&state);
    assert!(
        view.keys()
            .iter()
            .all(|k| ["player:p1", "user:u1"].contains(k)),
        "{state}"
    );
    let mut late = Member {
        phx: late,
        view,
        summary: None,
    };
    late.until("the joiner sees the player and itself only", |v| {
        v.keys() == ["player:p1", "user:u1"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_families_setting() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.presence.families = vec!["tournament".into()];
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let org = unique("org");

    let mut member = Member::join(&hub.socket_url(&user_token("u1", &org)), "tournament:t1").await;
    member
        .until("presence on tournament", |v| v.keys() == ["user:u1"])
        .await;

    // org_events has no presence here: nothing presence-related arrives on it, even after a
    // flush interval.
    let phx = &mut member.phx;
    phx.join_ok(&format!("org_events:{org}")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = phx.next_ref();
    phx.send(json!([null, r, "phoenix", "heartbeat", {}])).await;
    phx.reply(&r).await;
    assert!(
        !phx.backlog
            .iter()
            .any(|f| f[2].as_str().is_some_and(|t| t.starts_with("org_events:"))),
        "no presence frames on org_events: {:?}",
        phx.backlog
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_s_members_leave_on_the_other_hub_within_the_ttl() {
    const TTL_MS: u64 = 2000;
    let redis = RedisServer::start();
    let doomed = BinaryHub::start(&redis.url(), &[("PRESENCE_TTL_MS", "2000")]).await;
    doomed.wait_redis_ready().await;
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.presence.ttl = Duration::from_millis(TTL_MS);
    let survivor = TestHub::start(config).await;
    survivor.wait_redis_ready().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");

    let _ghost = Member::join(&doomed.ws_url(&user_token("ghost", &org)), &topic).await;
    let mut watcher =
        Member::join(&survivor.socket_url(&user_token("watcher", &org)), &topic).await;
    watcher
        .until("the watcher sees the member of the other hub", |v| {
            v.keys() == ["user:ghost", "user:watcher"]
        })
        .await;

    doomed.kill().await;
    let killed_at = Instant::now();
    watcher
        .until("the dead hub's member leaves", |v| {
            v.keys() == ["user:watcher"]
        })
        .await;
    let took = killed_at.elapsed();
    println!("leave after SIGKILL arrived in {took:?} (PRESENCE_TTL_MS={TTL_MS})");
    assert!(
        took <= Duration::from_millis(TTL_MS + 1000),
        "the leave took {took:?}, more than the TTL + 1 s"
    );
    // The recorder is shared by every in-process hub of this test binary: at least ours.
    let metrics = survivor.metrics().await;
    assert!(metric_value(&metrics, "prostaff_presence_expired_total", &[]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_announced_again_when_redis_comes_back_empty() {
    let mut redis = RedisServer::start();
    let hub = TestHub::with_redis(&redis).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let topic = format!("inhouse:{org}");
    let mut first = Member::join(&hub.socket_url(&user_token("first", &org)), &topic).await;
    first
        .until("the member is written", |v| v.keys() == ["user:first"])
        .await;
    // Let the flush reach Redis, then lose everything Redis had.
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.stop();
    redis.spawn();
    hub.wait_redis_ready().await;

    let second = TestHub::with_redis(&redis).await;
    second.wait_redis_ready().await;
    let mut late = Member::join(&second.socket_url(&user_token("late", &org)), &topic).await;
    late.until("the member of the first hub is known again", |v| {
        v.keys() == ["user:first", "user:late"]
    })
    .await;
}

/// A join while Redis cannot answer (here: before the hub's first connect, as a client racing a
/// hub that just started) shows only this instance's members; once Redis answers, the joiners
/// get the whole state, and every diff after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_shown_only_local_members_while_redis_was_away_get_the_whole_state_after() {
    let mut redis = RedisServer::start();
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let other = TestHub::with_redis(&redis).await;
    other.wait_redis_ready().await;
    let mut remote = Member::join(&other.socket_url(&user_token("remote", &org)), &topic).await;
    remote
        .until("the remote member is shown", |v| {
            v.keys() == ["user:remote"]
        })
        .await;

    redis.stop();
    let hub = TestHub::with_redis(&redis).await;
    let mut first = Member::join(&hub.socket_url(&user_token("first", &org)), &topic).await;
    let mut second = Member::join(&hub.socket_url(&user_token("second", &org)), &topic).await;
    assert!(
        !second.view.keys().contains(&"user:remote"),
        "no Redis, yet the state has the other hub's member: {:?}",
        second.view
    );

    redis.spawn();
    hub.wait_redis_ready().await;
    let everyone = ["user:first", "user:remote", "user:second"];
    first
        .until("the first joiner sees everyone", |v| v.keys() == everyone)
        .await;
    second
        .until("the second joiner sees everyone", |v| v.keys() == everyone)
        .await;
    remote
        .until("the other hub sees both joiners", |v| v.keys() == everyone)
        .await;

    // Diffs are relayed from then on.
    let _late = Member::join(&other.socket_url(&user_token("late", &org)), &topic).await;
    first
        .until("the first joiner sees a later join", |v| {
            v.keys().contains(&"user:late")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_cap_bounds_presence_state() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.presence.max_members = 2;
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");

    let mut one = Member::join(&hub.socket_url(&user_token("one", &org)), &topic).await;
    let _two = Member::join(&hub.socket_url(&user_token("two", &org)), &topic).await;
    one.until("two members shown", |v| v.0.len() == 2).await;
    let mut three = Member::join(&hub.socket_url(&user_token("three", &org)), &topic).await;
    eventually("the third member is refused", || async {
        metric_value(
            &hub.metrics().await,
            "prostaff_presence_refused_total",
            &["reason=\"topic_full\""],
        ) >= 1.0
    })
    .await;
    // Still joined: events reach the refused member.
    let late = Member::join(&hub.socket_url(&internal_token()), &topic).await;
    assert_eq!(late.view.keys(), ["user:one", "user:two"]);
    publish_event(
        &redis,
        &org,
        json!({"type": "match.updated", "org_id": org, "user_id": "u1", "payload": {}}),
        1,
    )
    .await;
    three.phx.event(&topic, "match.updated").await;
    assert_eq!(one.view.0.len(), 2);
}

/// Joins `user:m{i}` (its socket URL is `url`) and keeps it in `members` by key.
async fn join_member(members: &mut BTreeMap<String, Member>, url: &str, i: usize, topic: &str) {
    members.insert(format!("user:m{i}"), Member::join(url, topic).await);
}

/// Over the listing bound (`PRESENCE_LIST_MAX`, 4 here) subscribers on both hubs are shown a
/// stable listing of 4 metas, each a member, and a `presence_summary` counts everyone; a joiner
/// gets the listing and the summary; a listed member that leaves is replaced by the newest; back
/// under the bound the whole list returns and the summary says it is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_listing_bound_subscribers_get_a_stable_listing_and_exact_counts() {
    let redis = RedisServer::start();
    let (a, b) = two_hubs_with(&redis, |config| config.presence.list_max = 4).await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let url = |hub: &TestHub, who: &str| hub.socket_url(&user_token(who, &org));
    let mut observer = Member::join(&url(&b, "observer"), &topic).await;
    let mut members = BTreeMap::new();
    for i in 0..3 {
        join_member(&mut members, &url(&a, &format!("m{i}")), i, &topic).await;
    }
    observer
        .until("four metas, all listed", |v| v.0.len() == 4)
        .await;
    assert!(observer.summary.is_none(), "no summary under the bound");

    for i in 3..7 {
        join_member(&mut members, &url(&a, &format!("m{i}")), i, &topic).await;
    }
    observer
        .until_summary("eight counted", |_, s| s["metas"] == 8)
        .await;
    let summary = observer.summary.clone().unwrap();
    assert_eq!(summary["keys"], 8, "{summary}");
    assert_eq!(summary["kinds"]["user"], 8, "{summary}");
    assert_eq!(summary["listed"], 4, "{summary}");
    assert_eq!(summary["complete"], false, "{summary}");
    observer
        .until("a listing of four", |v| {
            v.0.values().map(BTreeSet::len).sum::<usize>() == 4
        })
        .await;
    let listed: Vec<String> = observer.view.0.keys().cloned().collect();
    for key in &listed {
        assert!(
            key == "user:observer" || members.contains_key(key),
            "{key} is not a member"
        );
    }

    // A joiner is shown the listing and the summary, not every meta.
    let mut late = Member::join(&url(&a, "late"), &topic).await;
    assert_eq!(late.metas_shown(), 4, "{:?}", late.view);
    late.until_summary("the joiner's summary", |_, s| s["metas"] == 9)
        .await;

    // A listed member leaves: its slot goes to another member, the listing stays at four.
    let leaver = listed
        .iter()
        .find(|key| members.contains_key(*key))
        .expect("a listed member")
        .clone();
    drop(members.remove(&leaver));
    observer
        .until_summary("the leaver replaced", |v, s| {
            s["metas"] == 8
                && !v.0.contains_key(&leaver)
                && v.0.values().map(BTreeSet::len).sum::<usize>() == 4
        })
        .await;

    // Back under the bound: the whole list and a complete summary.
    while members.len() > 2 {
        let key = members.keys().next().unwrap().clone();
        drop(members.remove(&key));
    }
    let mut remaining: Vec<String> = members.keys().cloned().collect();
    remaining.extend(["user:late".to_string(), "user:observer".to_string()]);
    remaining.sort();
    observer
        .until_summary("the whole list again", |v, s| {
            s["complete"] == true
                && v.keys() == remaining.iter().map(String::as_str).collect::<Vec<_>>()
        })
        .await;
    assert_eq!(observer.summary.clone().unwrap()["metas"], 4);
}

/// 2,000 sockets (half on each hub) join one org topic at once, at the defaults: every socket
/// ends up shown a listing of `PRESENCE_LIST_MAX` (256) metas, the same on every socket of a hub,
/// and a summary counting all 2,000; the metas each socket receives stay bounded by the listing
/// (O(N) bytes for the storm, not O(N²)), and the presence messages by the diff intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_joins_converges_to_a_bounded_listing_and_exact_counts() {
    const SOCKETS: usize = 2000;
    const LISTED: usize = 256;
    let redis = RedisServer::start();
    // Real binaries: the hubs get their own processes and runtimes, apart from the 2,000
    // clients of this test.
    let hubs = [
        BinaryHub::start(&redis.url(), &[]).await,
        BinaryHub::start(&redis.url(), &[]).await,
    ];
    for hub in &hubs {
        hub.wait_redis_ready().await;
    }
    let org = unique("org");
    let topic = format!("org_events:{org}");

    // Connect everyone first (not part of the storm), then every socket joins at once.
    let sockets = futures_util::stream::iter((0..SOCKETS).map(|i| {
        let url = hubs[i % 2].ws_url(&user_token(&format!("u{i}"), &org));
        async move {
            tokio_tungstenite::connect_async(url.as_str())
                .await
                .expect("upgrade")
                .0
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;

    // Readers first (idle until data arrives), then every join goes out in one tight loop.
    let mut tasks = Vec::new();
    let mut sinks = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (sink, mut stream) = socket.split();
        sinks.push(sink);
        tasks.push(tokio::spawn(async move {
            let mut view = View::default();
            let mut counted = 0u64;
            let (mut presence_messages, mut metas_received, mut bytes) = (0usize, 0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(90);
            let shown = |view: &View| view.0.values().map(BTreeSet::len).sum::<usize>();
            while counted != SOCKETS as u64 || shown(&view) != LISTED {
                let left = deadline.saturating_duration_since(Instant::now());
                let text = match tokio::time::timeout(left, stream.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => text,
                    Ok(Some(Ok(_))) => continue,
                    other => panic!(
                        "socket {i} ended at {} metas shown, {counted} counted: {other:?}",
                        shown(&view)
                    ),
                };
                if text.contains("\"presence_summary\"") {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    counted = frame[4]["metas"].as_u64().unwrap();
                    presence_messages += 1;
                    bytes += text.len();
                } else if view.apply_text(&text) {
                    presence_messages += 1;
                    metas_received += text.matches("\"phx_ref\"").count();
                    bytes += text.len();
                }
            }
            (presence_messages, metas_received, bytes, view)
        }));
    }
    let started = Instant::now();
    let join = json!(["1", "1", topic, "phx_join", {}]).to_string();
    for sink in &mut sinks {
        use futures_util::SinkExt;
        sink.send(Message::Text(join.clone().into())).await.unwrap();
    }
    let storm = started.elapsed();

    let (mut counts, mut metas, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let mut views: [Option<View>; 2] = [None, None];
    for (i, task) in tasks.into_iter().enumerate() {
        let (count, received, bytes, view) = task.await.expect("socket task");
        counts.push(count);
        metas.push(received);
        sizes.push(bytes);
        assert!(
            view.0.keys().all(|key| key[5..].starts_with('u')),
            "only members are listed"
        );
        match &views[i % 2] {
            None => views[i % 2] = Some(view),
            Some(first) => assert_eq!(first, &view, "every socket of a hub is shown the same"),
        }
    }
    let converged = started.elapsed();
    counts.sort_unstable();
    metas.sort_unstable();
    sizes.sort_unstable();
    let max = *counts.last().unwrap();
    let max_metas = *metas.last().unwrap();
    let max_bytes = *sizes.last().unwrap();
    println!(
        "presence storm: {SOCKETS} sockets on 2 hubs sent their joins within {storm:?}, all \
         converged after {converged:?}; presence messages per socket: median {}, max {max}; \
         metas received per socket: median {}, max {max_metas}; presence bytes per socket: \
         median {}, max {max_bytes}",
        counts[counts.len() / 2],
        metas[metas.len() / 2],
        sizes[sizes.len() / 2],
    );
    // A state, then at most one diff per hub and one summary per interval.
    let intervals = (converged.as_millis() / 200) as usize + 2;
    let bound = 1 + 3 * intervals;
    assert!(
        max <= bound,
        "a socket got {max} presence messages; batching allows at most {bound} over {converged:?}"
    );
    // What a socket was shown is bounded by the listing, not the topic (2,000 here): the diffs
    // relayed while the topic was under the bound (≤ the listing in all), its own state (≤ the
    // listing), the whole state sent when the topic crossed the bound (the listing; a join
    // storm moves no listed meta out after that), and its hub's unflushed joins shown with its
    // state (≤ 4 KiB: under 64 metas of this size).
    let bound = 3 * LISTED + 64;
    assert!(
        max_metas <= bound,
        "a socket received {max_metas} metas for a listing of {LISTED} (bound {bound})"
    );
}

/// Whatever is PUBLISHed on a presence channel that is not a diff (not JSON, or not `{joins,
/// leaves}`) is dropped and counted, never relayed to clients (whose frame would stop being
/// JSON); presence goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_presence_diff_is_dropped_and_counted_not_relayed() {
    let (redis, hub) = redis_and_ready_hub().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");
    let mut watcher = Member::join(&hub.socket_url(&user_token("watcher", &org)), &topic).await;
    let undecodable = |metrics: &str| {
        metric_value(
            metrics,
            "prostaff_presence_diffs_total",
            &["outcome=\"undecodable\""],
        )
    };
    let before = undecodable(&hub.metrics().await);
    let channel = format!("prostaff:presence:{topic}");
    assert_eq!(redis.publish(&channel, "{\"joins\": not json"), 1);
    assert_eq!(redis.publish(&channel, "[1,2]"), 1);
    eventually("both are counted", || async {
        undecodable(&hub.metrics().await) >= before + 2.0
    })
    .await;
    // The next real change arrives, and every frame before it was JSON (`Phx` parses each).
    let _other = Member::join(&hub.socket_url(&user_token("other", &org)), &topic).await;
    watcher
        .until("the other member shows", |v| v.0.contains_key("user:other"))
        .await;
    wait_for_log(&["undecodable presence diff dropped"]).await;
}

/// A client that fell behind and lost broadcasts on a presence topic may have lost a
/// `presence_diff`: after the `events_dropped` notice it gets a whole `presence_state` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_lost_broadcasts_gets_the_presence_state_again() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.limits.outbound_buffer_frames = 4;
    config.limits.write_timeout = Duration::from_secs(120);
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let org = unique("org");
    let topic = format!("org_events:{org}");

    let mut slow = crate::limits::stalled_client(&hub, &user_token("slow", &org), &topic).await;
    let resyncs_before = metric_value(
        &hub.metrics().await,
        "prostaff_presence_state_resyncs_total",
        &[],
    );
    // Someone joins while the slow client is not reading, then a flood overflows its outbox.
    let _other = Member::join(&hub.socket_url(&user_token("other", &org)), &topic).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    crate::limits::flood(&redis, &org, "team_goal.missed", 300, 8 * 1024).await;

    slow.presence = true;
    let dropped = slow
        .recv_matching(|f| f[2] == topic.as_str() && f[3] == "events_dropped")
        .await;
    assert!(dropped[4]["count"].as_u64().unwrap() > 0);
    // The fresh state comes after the notice and has both members.
    let backlog_before: Vec<Value> = std::mem::take(&mut slow.backlog);
    let state = slow
        .recv_matching(|f| f[2] == topic.as_str() && f[3] == "presence_state")
        .await;
    let mut view = View::default();
    view.apply(&state);
    for frame in &slow.backlog {
        view.apply(frame);
    }
    assert!(
        view.keys() == ["user:other", "user:slow"],
        "state after the drop: {state} (frames before the notice: {})",
        backlog_before.len()
    );
    let resyncs = metric_value(
        &hub.metrics().await,
        "prostaff_presence_state_resyncs_total",
        &[],
    );
    assert!(resyncs > resyncs_before, "the resync is counted");
}

/// A member that leaves before its join was flushed to Redis (within one 200 ms diff interval)
/// was silently dropped, but a local joiner had already been shown it as pending: that joiner's
/// list kept it forever. It now hears the leave.
#[tokio::test]
async fn a_member_gone_before_its_join_was_flushed_leaves_the_local_joiners_list_too() {
    let (_redis, hub) = redis_and_ready_hub().await;
    for round in 0..5 {
        let org = unique("org");
        let topic = format!("org_events:{org}");
        let mut observer_seed = Phx::connect(&hub, &user_token("seed", &org)).await;
        observer_seed.join_ok(&topic).await;
        // Let the topic's mirror exist, so joiners get the pending diff path.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut player = Phx::connect(&hub, &player_token("p1", &org)).await;
        player.join_ok(&topic).await;
        let mut observer = Phx::connect(&hub, &user_token("obs", &org)).await;
        observer.presence = true;
        observer.join_ok(&topic).await;
        drop(player);
        let mut view = View::default();
        for frame in observer.collect(Duration::from_millis(800)).await {
            view.apply(&frame);
        }
        assert!(
            !view.0.contains_key("player:p1"),
            "round {round}: the observer still lists the player: {view:?}"
        );
    }
}
