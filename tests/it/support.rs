//! Test harness: a real `redis-server` on a free port, the hub's `run()` on port 0, a fake Rails
//! (an axum server answering the documented JSON), a Phoenix V2 client over tokio-tungstenite,
//! and a log capture for asserting what the hub logged.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use prostaff_events::config::Config;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
pub const RAILS_SECRET: &str = "rails-user-token-secret-for-tests";
pub const SCRAPER_KEY: &str = "scraper-key-for-tests";
pub const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Logs

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once per test binary.
pub fn init_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,prostaff_events=info",
            ))
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buffer
    });
}

/// Every captured log line containing `needle`.
pub fn log_lines(needle: &str) -> Vec<String> {
    let logs = LOGS.get().expect("init_logs called").lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

pub fn all_logs() -> String {
    String::from_utf8_lossy(&LOGS.get().expect("init_logs called").lock().unwrap()).into_owned()
}

/// Waits until a log line contains every needle.
pub async fn wait_for_log(needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(line) = log_lines(needles[0])
            .into_iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {needles:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` child process on its own port; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
        };
        server.spawn();
        server
    }

    /// A handle on a server someone else owns (not stopped on drop).
    pub fn attach(port: u16) -> Self {
        RedisServer { port, child: None }
    }

    /// Empties the server, as a restart of a Redis that keeps nothing on disk would.
    pub fn flushall(&self) {
        assert_eq!(self.try_command("FLUSHALL").as_deref(), Some("+OK"));
    }

    /// A port with nothing listening yet (Redis can be started there later).
    pub fn reserved() -> Self {
        RedisServer {
            port: free_port(),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    /// Starts a redis-server on `port` with `extra` arguments besides the test defaults.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let mut server = RedisServer { port, child: None };
        server.spawn_with(extra);
        server
    }

    fn spawn_with(&mut self, extra: &[&str]) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // A replica's full sync writes an RDB file: never into the checkout.
                "--dir",
                std::env::temp_dir().to_str().expect("a UTF-8 temp dir"),
                "--dbfilename",
                &format!("{}.rdb", unique("redis")),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while self.try_command("PING").as_deref() != Some("+PONG") {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An inline command's first reply line (`+OK`, `-ERR …`, `:1`).
    pub fn command(&self, command: &str) -> Option<String> {
        self.try_command(command)
    }

    /// Makes this server a replica of the one on `master_port`.
    pub fn replicate(&self, master_port: u16) {
        assert_eq!(
            self.command(&format!("REPLICAOF 127.0.0.1 {master_port}"))
                .as_deref(),
            Some("+OK")
        );
    }

    /// `REPLICAOF` `master`, then waits until the link is up (its first sync done).
    pub async fn replicate_synced(&self, master_port: u16, limit: Duration) {
        self.replicate(master_port);
        eventually_within("the replica syncs", limit, || async {
            self.info("replication")
                .is_some_and(|info| info.contains("master_link_status:up"))
        })
        .await;
    }

    /// Calls of `command` this server has served (`INFO commandstats`).
    pub fn command_calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.info("commandstats")
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Cuts every client connection (pub/sub and normal): a hub's link drops and reconnects.
    pub fn kill_clients(&self) {
        for kind in ["pubsub", "normal"] {
            assert!(self
                .command(&format!("CLIENT KILL TYPE {kind}"))
                .is_some_and(|r| r.starts_with(':')));
        }
    }

    /// `XADD key MAXLEN ~ 1000 * envelope <event>` (the events stream's entry shape); the
    /// first reply line.
    pub fn xadd_envelope(&self, key: &str, event: &Event) -> Option<String> {
        self.command(&format!(
            "XADD {key} MAXLEN ~ 1000 * envelope {}",
            serde_json::to_string(&event.text()).unwrap()
        ))
    }

    /// `INFO section` as text.
    pub fn info(&self, section: &str) -> Option<String> {
        self.bulk_command(&format!("INFO {section}"))
    }

    /// An inline command whose reply is a short array of bulk strings.
    pub fn command_lines(&self, command: &str) -> Option<Vec<String>> {
        let reply = self.try_command(command)?;
        let mut lines = reply.split("\r\n");
        let count: usize = lines.next()?.strip_prefix('*')?.parse().ok()?;
        let items: Vec<String> = lines
            .filter(|line| !line.starts_with('$'))
            .map(str::to_string)
            .collect();
        (items.len() == count).then_some(items)
    }

    fn try_command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    }

    /// `PUBLISH channel message` over RESP; returns the receiver count.
    pub fn publish(&self, channel: &str, message: &str) -> i64 {
        self.connection().publish(channel, message)
    }

    /// One connection for many PUBLISHes (floods would otherwise churn ephemeral ports).
    pub fn connection(&self) -> RedisConnection {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("redis reachable");
        RedisConnection {
            reader: std::io::BufReader::new(stream),
        }
    }

    /// Publishes until at least `subscribers` receive it (the hub's subscriber may still be
    /// connecting); returns false after the timeout.
    pub async fn publish_when_subscribed(
        &self,
        channel: &str,
        message: &str,
        subscribers: i64,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if self.numsub_pattern() >= subscribers {
                return self.publish(channel, message) >= subscribers;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// How many connections hold a pattern subscription (one per hub instance). `PUBSUB NUMPAT`
    /// would count distinct patterns instead, which stays the same for any number of hubs.
    pub fn numsub_pattern(&self) -> i64 {
        self.bulk_command("CLIENT LIST TYPE pubsub")
            .map(|list| {
                list.lines()
                    .filter(|line| {
                        line.split(' ')
                            .any(|f| f.starts_with("psub=") && f != "psub=0")
                    })
                    .count() as i64
            })
            .unwrap_or(0)
    }

    /// Runs an inline command whose reply is a bulk string and returns its text.
    /// An inline command's bulk-string reply (`INFO`, `CLUSTER INFO`, `CLIENT LIST`).
    pub fn bulk_command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply).into_owned();
            let (header, body) = text.split_once("\r\n")?;
            let len: usize = header.strip_prefix('$')?.parse().ok()?;
            if body.len() >= len {
                return Some(body[..len].to_string());
            }
        }
    }
}

pub struct RedisConnection {
    reader: std::io::BufReader<TcpStream>,
}

impl RedisConnection {
    /// `PUBLISH channel message`; returns the receiver count.
    pub fn publish(&mut self, channel: &str, message: &str) -> i64 {
        use std::io::BufRead;
        let frame = format!(
            "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{}\r\n${}\r\n{}\r\n",
            channel.len(),
            channel,
            message.len(),
            message
        );
        self.reader.get_mut().write_all(frame.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line.trim().trim_start_matches(':').parse().unwrap_or(-1)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Hub

/// A fresh id, so tests running in parallel never share orgs, users or rate-limit windows.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A redis-server and a hub subscribed to it (no Rails).
pub async fn redis_and_ready_hub() -> (RedisServer, TestHub) {
    let redis = RedisServer::start();
    let hub = TestHub::ready(test_config(&redis.url(), "http://127.0.0.1:9")).await;
    (redis, hub)
}

pub struct TestHub {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Config for tests: known secrets, fast reconciler retries.
pub fn test_config(redis_url: &str, rails_url: &str) -> Config {
    let mut config = Config::development();
    config.port = 0;
    config.redis_url = redis_url.to_string();
    config.rails_api_url = rails_url.to_string();
    config.internal_jwt_secret = SECRET.to_string();
    config.using_dev_secret = false;
    config.jwt_secret_key = Some(RAILS_SECRET.to_string());
    config.scraper_api_key = SCRAPER_KEY.to_string();
    config.reconciler_retry_delays = vec![Duration::from_millis(50); 2];
    config.reconcile_interval = None;
    config.shutdown_grace = Duration::from_secs(3);
    // Expiry tests use tokens that expire in seconds; the production leeway (30 s) would hide them.
    config.jwt_leeway_s = 0;
    config
}

impl TestHub {
    pub async fn start(config: Config) -> TestHub {
        init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(prostaff_events::run(config, listener, async move {
            let _ = stopped.await;
        }));
        TestHub {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a hub and waits until its Redis subscriber is connected.
    pub async fn ready(config: Config) -> TestHub {
        let hub = TestHub::start(config).await;
        hub.wait_redis_ready().await;
        hub
    }

    /// Hub with Redis at `redis` and no Rails.
    pub async fn with_redis(redis: &RedisServer) -> TestHub {
        TestHub::start(test_config(&redis.url(), "http://127.0.0.1:9")).await
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The V2 socket URL with `token`.
    pub fn socket_url(&self, token: &str) -> String {
        self.ws_url(&format!("vsn=2.0.0&token={token}"))
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/socket/websocket?{}", self.addr, query)
    }

    /// Triggers the graceful drain and waits for `run` to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    /// Waits until the hub's Redis subscriber is connected (readiness reports redis ok).
    pub async fn wait_redis_ready(&self) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Ok(response) = client.get(self.http("/health/ready")).send().await {
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if body["checks"]["redis"] == "ok" {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "hub never connected to redis"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// This hub's figures from `/admin/status` (per hub, unlike the process-wide metrics).
pub async fn admin_status(hub: &TestHub) -> Value {
    let response = reqwest::Client::new()
        .get(hub.http("/admin/status"))
        .bearer_auth(internal_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Sum of every sample of `name` whose labels contain all of `labels`, in a Prometheus text dump.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Tokens

pub fn user_token(user_id: &str, org_id: &str) -> String {
    prostaff_events::auth::mint(SECRET, &json!({"user_id": user_id, "org_id": org_id}))
}

pub fn player_token(player_id: &str, org_id: &str) -> String {
    prostaff_events::auth::mint(
        SECRET,
        &json!({"entity_type": "player", "player_id": player_id, "organization_id": org_id}),
    )
}

pub fn internal_token() -> String {
    prostaff_events::auth::mint(SECRET, &json!({"type": "internal", "iss": "prostaff-api"}))
}

// ---------------------------------------------------------------------------------------------
// Phoenix V2 client

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Phx {
    pub ws: Ws,
    next_ref: u64,
    /// Frames read while waiting for something else.
    pub backlog: Vec<Value>,
    /// When false (the default), `presence_state`, `presence_diff` and `presence_summary` frames
    /// are set aside in
    /// `presence_frames` instead of being returned: tests about other behaviours read exact
    /// frame sequences on topics that have presence.
    pub presence: bool,
    pub presence_frames: Vec<Value>,
}

/// The event name of a V2 (array) or V1 (object) frame.
pub fn frame_event(frame: &Value) -> &str {
    frame
        .get(3)
        .or_else(|| frame.get("event"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

impl Phx {
    pub async fn connect(hub: &TestHub, token: &str) -> Phx {
        Phx::connect_url(&hub.socket_url(token)).await
    }

    pub async fn connect_url(url: &str) -> Phx {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("socket upgrade");
        Phx::from_ws(ws)
    }

    pub fn from_ws(ws: Ws) -> Phx {
        Phx {
            ws,
            next_ref: 0,
            backlog: Vec::new(),
            presence: false,
            presence_frames: Vec::new(),
        }
    }

    pub fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// The next text frame as JSON (panics on timeout or close).
    pub async fn recv(&mut self) -> Value {
        if !self.backlog.is_empty() {
            return self.backlog.remove(0);
        }
        self.recv_socket().await
    }

    async fn recv_socket(&mut self) -> Value {
        loop {
            match tokio::time::timeout(TIMEOUT, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if !self.presence
                        && matches!(
                            frame_event(&frame),
                            "presence_state" | "presence_diff" | "presence_summary"
                        )
                    {
                        self.presence_frames.push(frame);
                        continue;
                    }
                    return frame;
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads frames until one matches; others are kept for later `recv`s.
    pub async fn recv_matching(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        if let Some(index) = self.backlog.iter().position(&predicate) {
            return self.backlog.remove(index);
        }
        loop {
            let frame = self.recv_socket().await;
            if predicate(&frame) {
                return frame;
            }
            self.backlog.push(frame);
        }
    }

    /// Waits for the reply to `msg_ref`.
    pub async fn reply(&mut self, msg_ref: &str) -> Value {
        let msg_ref = msg_ref.to_string();
        self.recv_matching(move |f| f[3] == "phx_reply" && f[1] == msg_ref.as_str())
            .await
    }

    /// Waits for a push/broadcast `event` on `topic`.
    pub async fn event(&mut self, topic: &str, event: &str) -> Value {
        self.recv_matching(|f| f[2] == topic && f[3] == event).await
    }

    /// Joins and returns the reply frame.
    pub async fn join(&mut self, topic: &str, params: Value) -> Value {
        let r = self.next_ref();
        self.send(json!([r, r, topic, "phx_join", params])).await;
        self.reply(&r).await
    }

    /// A user of `org` joined to `org_events:{org}`.
    pub async fn org_member(hub: &TestHub, org: &str) -> Phx {
        let mut phx = Phx::connect(hub, &user_token("u1", org)).await;
        phx.join_ok(&format!("org_events:{org}")).await;
        phx
    }

    /// Joins and asserts ok; returns the join_ref.
    pub async fn join_ok(&mut self, topic: &str) -> String {
        let reply = self.join(topic, json!({})).await;
        assert_eq!(reply[4]["status"], "ok", "join {topic}: {reply}");
        reply[0].as_str().unwrap().to_string()
    }

    pub async fn push(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Value {
        let r = self.next_ref();
        self.send(json!([join_ref, r, topic, event, payload])).await;
        self.reply(&r).await
    }

    /// Waits for the server to close the socket and returns the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(remaining, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return None,
                Err(_) => panic!("socket not closed within 20 s"),
            }
        }
    }

    /// Every frame that arrives until the socket is quiet for `quiet`.
    pub async fn collect(&mut self, quiet: Duration) -> Vec<Value> {
        let mut frames = std::mem::take(&mut self.backlog);
        while let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, self.ws.next()).await {
            if let Message::Text(text) = message {
                frames.push(serde_json::from_str(&text).unwrap());
            }
        }
        frames
    }

    /// True when nothing arrives for `quiet`.
    /// True when no frame arrives for `quiet` (presence frames are set aside as by `recv`
    /// unless `presence` is on).
    pub async fn silent_for(&mut self, quiet: Duration) -> bool {
        if !self.backlog.is_empty() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return true,
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if self.presence
                        || !matches!(frame_event(&frame), "presence_state" | "presence_diff")
                    {
                        return false;
                    }
                    self.presence_frames.push(frame);
                }
                Ok(_) => return false,
            }
        }
    }
}

/// HTTP status of a WebSocket upgrade attempt (101 on success).
pub async fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected upgrade error: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Fake Rails

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RailsMode {
    Up,
    Failing,
    Hanging,
}

pub struct RailsState {
    pub mode: RailsMode,
    pub queues: Value,
    /// One entry per active-queues request: whether its bearer token verified.
    pub token_checks: Vec<Result<(), String>>,
}

#[derive(Clone)]
pub struct FakeRails {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<RailsState>>,
}

impl FakeRails {
    pub async fn start(queues: Value) -> FakeRails {
        let state = Arc::new(Mutex::new(RailsState {
            mode: RailsMode::Up,
            queues,
            token_checks: Vec::new(),
        }));
        let app = Router::new()
            .route("/health", get(rails_health))
            .route(
                "/internal/api/inhouse_queues/active",
                get(rails_active_queues),
            )
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeRails { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: RailsMode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn set_queues(&self, queues: Value) {
        self.state.lock().unwrap().queues = queues;
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().token_checks.len()
    }
}

async fn rails_mode_response(state: &Arc<Mutex<RailsState>>) -> Option<Response> {
    let mode = state.lock().unwrap().mode;
    match mode {
        RailsMode::Up => None,
        RailsMode::Failing => Some((StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()),
        RailsMode::Hanging => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Some(StatusCode::GATEWAY_TIMEOUT.into_response())
        }
    }
}

async fn rails_health(State(state): State<Arc<Mutex<RailsState>>>) -> Response {
    if let Some(response) = rails_mode_response(&state).await {
        return response;
    }
    Json(json!({"status": "ok"})).into_response()
}

/// Verifies the reconciler's token as Rails would: HS256 with the internal secret,
/// `type: internal`, `iss: prostaff-events`, and an `exp`.
fn verify_internal_token(headers: &HeaderMap) -> Result<(), String> {
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
    let value = headers
        .get("authorization")
        .ok_or("no authorization header")?
        .to_str()
        .map_err(|e| e.to_string())?;
    let token = value.strip_prefix("Bearer ").ok_or("not a bearer token")?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "iss"]);
    validation.set_issuer(&["prostaff-events"]);
    let data = decode::<Value>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .map_err(|e| e.to_string())?;
    if data.claims["type"] != "internal" {
        return Err("type is not internal".into());
    }
    let (iat, exp) = (
        data.claims["iat"].as_u64().unwrap_or(0),
        data.claims["exp"].as_u64().unwrap_or(0),
    );
    if exp != iat + 60 {
        return Err(format!("exp should be iat + 60, got iat={iat} exp={exp}"));
    }
    Ok(())
}

async fn rails_active_queues(
    State(state): State<Arc<Mutex<RailsState>>>,
    headers: HeaderMap,
) -> Response {
    let check = verify_internal_token(&headers);
    state.lock().unwrap().token_checks.push(check.clone());
    if let Some(response) = rails_mode_response(&state).await {
        return response;
    }
    if check.is_err() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let queues = state.lock().unwrap().queues.clone();
    Json(json!({ "queues": queues })).into_response()
}

/// Polls `condition` until true (panics after the timeout with `what`).
pub async fn eventually<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, TIMEOUT, condition).await
}

/// [`eventually`] with its own time limit (a Sentinel failover takes seconds).
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary (for SIGKILL and restart tests)

/// The `prostaff-events` binary on a free port; SIGKILLed on drop.
pub struct BinaryHub {
    pub port: u16,
    pub child: tokio::process::Child,
}

impl BinaryHub {
    /// Starts the binary with the test secrets, `redis_url`, no Rails, and `extra` settings,
    /// and waits until it serves `/health`.
    pub async fn start(redis_url: &str, extra: &[(&str, &str)]) -> BinaryHub {
        let port = free_port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prostaff-events"))
            .current_dir(std::env::temp_dir())
            .env("PORT", port.to_string())
            .env("BIND_ADDR", "127.0.0.1")
            .env("INTERNAL_JWT_SECRET", SECRET)
            .env("JWT_SECRET_KEY", RAILS_SECRET)
            .env("REDIS_URL", redis_url)
            .env("RAILS_API_URL", "http://127.0.0.1:9")
            .env("RECONCILER_RETRY_DELAYS_MS", "10")
            .env("RECONCILE_INTERVAL_MS", "0")
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the hub binary starts");
        let hub = BinaryHub { port, child };
        let health = format!("http://127.0.0.1:{port}/health");
        eventually("binary serving /health", || async {
            reqwest::get(health.as_str()).await.is_ok()
        })
        .await;
        hub
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/socket/websocket?vsn=2.0.0&token={token}",
            self.port
        )
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until readiness reports Redis ok.
    pub async fn wait_redis_ready(&self) {
        let url = self.http("/health/ready");
        eventually("binary connected to redis", || async {
            match reqwest::get(url.as_str()).await {
                Ok(response) => {
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    body["checks"]["redis"] == "ok"
                }
                Err(_) => false,
            }
        })
        .await;
    }

    /// SIGKILL: no drain, no goodbye.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Matches the `queue_update` frames of `event` (`player_joined`, `check_in_expired`, …).
pub fn update_of(event: &'static str) -> impl Fn(&Value) -> bool {
    move |f: &Value| f[3] == "queue_update" && f[4]["event"] == event
}

/// The keys of the `presence_state` a newcomer (`token`) gets when it joins `topic` on `hub`.
pub async fn presence_keys(hub: &TestHub, token: &str, topic: &str) -> Vec<String> {
    let mut newcomer = Phx::connect(hub, token).await;
    newcomer.presence = true;
    newcomer.join_ok(topic).await;
    let state = newcomer
        .recv_matching(|f| frame_event(f) == "presence_state")
        .await;
    state[4]
        .as_object()
        .map(|members| members.keys().cloned().collect())
        .unwrap_or_default()
}

/// The tests' one envelope builder: what Rails publishes on `prostaff:events:{org}`.
#[derive(Clone)]
pub struct Event(Value);

impl Event {
    /// A fresh `id`, `user_id` "rails", `published_at` now (revocations are dated by it) and an
    /// empty payload.
    pub fn new(org: &str, event_type: &str) -> Event {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        Event(
            json!({"id": unique("ev"), "type": event_type, "org_id": org,
            "user_id": "rails", "published_at": now, "payload": {}}),
        )
    }

    /// Number `n` of a series: `player.transferred` with id `{org}-{n}` and payload `{"n": n}`,
    /// the same text every time (no `published_at`).
    pub fn numbered(org: &str, n: usize) -> Event {
        Event::new(org, "player.transferred")
            .id(&format!("{org}-{n}"))
            .payload(json!({ "n": n }))
            .without("published_at")
    }

    pub fn payload(self, payload: Value) -> Event {
        self.set("payload", payload)
    }

    pub fn id(self, id: &str) -> Event {
        self.set("id", json!(id))
    }

    pub fn user(self, user: &str) -> Event {
        self.set("user_id", json!(user))
    }

    /// Any member, `null` included (a field left out is `without`).
    pub fn set(mut self, field: &str, value: Value) -> Event {
        self.0[field] = value;
        self
    }

    pub fn without(mut self, field: &str) -> Event {
        self.0.as_object_mut().unwrap().remove(field);
        self
    }

    pub fn json(self) -> Value {
        self.0
    }

    pub fn text(&self) -> String {
        self.0.to_string()
    }
}

/// `n` hubs on `redis` (no Rails), each with `configure` applied, all subscribed.
pub async fn ready_hubs(
    redis: &RedisServer,
    n: usize,
    configure: impl Fn(&mut Config),
) -> Vec<TestHub> {
    let mut hubs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
        configure(&mut config);
        hubs.push(TestHub::ready(config).await);
    }
    hubs
}

/// Two subscribed hubs on `redis`, each with `configure` applied.
pub async fn two_hubs_with(
    redis: &RedisServer,
    configure: impl Fn(&mut Config),
) -> (TestHub, TestHub) {
    let mut hubs = ready_hubs(redis, 2, configure).await;
    let b = hubs.pop().unwrap();
    (hubs.pop().unwrap(), b)
}

/// Two subscribed hubs on `redis` at the test defaults.
pub async fn two_hubs(redis: &RedisServer) -> (TestHub, TestHub) {
    two_hubs_with(redis, |_| {}).await
}

/// Publishes a lifecycle/any envelope on `prostaff:events:{org}` once `subscribers` hubs listen.
pub async fn publish_event(redis: &RedisServer, org: &str, event: Value, subscribers: i64) {
    assert!(
        redis
            .publish_when_subscribed(
                &format!("prostaff:events:{org}"),
                &event.to_string(),
                subscribers
            )
            .await,
        "not enough hubs subscribed"
    );
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that can go silent (a half-open connection: no reset, no data)

/// Forwards `127.0.0.1:port` to `target`. [`FreezableProxy::freeze`] makes every connection
/// open at that moment stop forwarding in both directions without closing; connections made
/// later forward normally.
pub struct FreezableProxy {
    pub port: u16,
    generation: Arc<std::sync::atomic::AtomicU64>,
    frozen_up_to: Arc<std::sync::atomic::AtomicU64>,
}

impl FreezableProxy {
    pub async fn start(target: u16) -> FreezableProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(AtomicU64::new(1));
        let frozen_up_to = Arc::new(AtomicU64::new(0));
        let (generation_task, frozen_task) = (generation.clone(), frozen_up_to.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let mine = generation_task.load(Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)]
                {
                    let frozen = frozen_task.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            if frozen.load(Ordering::SeqCst) >= mine {
                                // Silent forever: hold both halves open, move nothing.
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                continue;
                            }
                            let read = tokio::time::timeout(
                                Duration::from_millis(50),
                                from.read(&mut buf),
                            )
                            .await;
                            match read {
                                Err(_) => continue,
                                Ok(Ok(0)) | Ok(Err(_)) => return,
                                Ok(Ok(n)) => {
                                    if frozen.load(Ordering::SeqCst) >= mine {
                                        continue;
                                    }
                                    if to.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            }
        });
        FreezableProxy {
            port,
            generation,
            frozen_up_to,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Every connection open now goes silent; later connections forward normally.
    pub fn freeze(&self) {
        use std::sync::atomic::Ordering;
        let current = self.generation.fetch_add(1, Ordering::SeqCst);
        self.frozen_up_to.store(current, Ordering::SeqCst);
    }
}

/// Asserts a join reply carries a valid `position` and returns the frame without it, so the rest
/// can be compared exactly (epochs are random).
pub fn strip_position(mut frame: Value) -> Value {
    let response = if frame.is_array() {
        &mut frame[4]["response"]
    } else {
        &mut frame["payload"]["response"]
    };
    let position = response
        .as_object_mut()
        .and_then(|o| o.remove("position"))
        .unwrap_or_else(|| panic!("no position in the join reply"));
    assert!(
        position
            .as_str()
            .and_then(prostaff_events::history::Position::parse)
            .is_some(),
        "not a position: {position}"
    );
    frame
}

// ---------------------------------------------------------------------------------------------
// Node test suites (`tests/js`, `tests/browser`)

/// `tests/<name>` in the repository.
pub fn node_suite_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

/// `npm ci` in `dir` when one of `packages` is not installed yet (a fresh checkout).
pub fn ensure_node_modules(dir: &std::path::Path, packages: &[&str]) {
    let installed = packages.iter().all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .exists()
    });
    if installed {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("npm is installed (Node.js 20)");
    assert!(status.success(), "npm ci failed in {}", dir.display());
}

/// What a `node --test --test-reporter=spec` run printed.
pub struct NodeRun {
    stdout: String,
}

impl NodeRun {
    /// A count from the run's summary (`ℹ pass 27`).
    pub fn count(&self, label: &str) -> usize {
        self.stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("ℹ {label} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` line in the node test summary"))
    }
}

/// Runs `node --test --test-force-exit --test-reporter=spec <args>` in `dir` with `env`, shows
/// its output and asserts that it succeeded.
pub async fn run_node_tests(
    suite: &str,
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, std::ffi::OsString)],
) -> NodeRun {
    let output = tokio::process::Command::new("node")
        .args(["--test", "--test-force-exit", "--test-reporter=spec"])
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(name, value)| (*name, value)))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("node is installed");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{suite} failed (see output above)");
    NodeRun { stdout }
}
