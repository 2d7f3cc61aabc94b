//! hub-bench: measures a running prostaff-events hub (and Redis itself, as a reference).
//!
//! Scenarios:
//! - `connections`: open N Phoenix sockets (spread over many 127.0.x.y source addresses), each
//!   joined to `org_events:{org}` and `notifications:{user}`; report connect rate, errors, the
//!   hub's RSS per connection and its CPU while the sockets idle and heart-beat (and, with
//!   `--redis`, the commands/s the hub costs Redis meanwhile).
//! - `fanout`: N subscribers on one topic; publish with Redis PUBLISH at a rate or flat out;
//!   report delivered msgs/s and publish→receive latency (same clock: the bench's).
//! - `spread`: N subscribers over K orgs; events spread over the orgs.
//! - `redis-baseline`: the same N subscribers subscribed to Redis directly (RESP), same publisher.
//! - `compare`: `redis-baseline`, then (with `--floor`) the same readers on the floor server,
//!   then the hub, in one run, with the ratios and each process's CPU (`--hub-pid`,
//!   `--floor-pid`, `--redis-pid`, and the bench's own, flagged when it is the bottleneck).
//!   `--orgs K` spreads subscribers and events over K topics (K Redis channels for the baseline).
//! - `floor-server`: the minimal fan-out server of issue 14 (see `hub_bench/floor.rs`), run as
//!   its own process so it can be pinned and measured like the hub.
//! - `queue`: in-house queue actions through the hub and its Redis scripts: C clients (one org
//!   each) alternate `join_queue`/`leave_queue` and wait for each reply; reports actions/s and
//!   p50/p99/max push→reply latency. Start the hub with a high `RATE_LIMIT_MAX`.
//!
//! Prints a table, or JSON with `--json`. Numbers go into BENCHMARKS.md.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use fred::interfaces::{ClientLike, PubsubInterface};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[path = "hub_bench/floor.rs"]
mod floor;

#[derive(Parser)]
#[command(
    name = "hub-bench",
    about = "Benchmarks for prostaff-events (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Scenario {
    Connections(ConnectionsArgs),
    Fanout(FanoutArgs),
    Spread(FanoutArgs),
    RedisBaseline(FanoutArgs),
    Compare(FanoutArgs),
    Queue(QueueArgs),
    FloorServer(FloorArgs),
    Catalogue(CatalogueArgs),
}

#[derive(Args)]
struct CatalogueArgs {
    /// Envelopes checked per type.
    #[arg(long, default_value_t = 100_000)]
    iterations: u32,
}

#[derive(Args)]
struct FloorArgs {
    #[arg(long, default_value_t = 4800)]
    port: u16,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
}

#[derive(Args, Clone)]
struct QueueArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Concurrent clients, each acting on its own org's queue.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Actions per client.
    #[arg(long, default_value_t = 2000)]
    actions: usize,
}

#[derive(Args, Clone)]
struct Common {
    /// Hub base URL.
    #[arg(long, default_value = "http://127.0.0.1:4000")]
    hub: String,
    /// INTERNAL_JWT_SECRET of the hub (to mint tokens).
    #[arg(long, env = "INTERNAL_JWT_SECRET", default_value = prostaff_events::config::DEV_INTERNAL_SECRET)]
    secret: String,
    /// Number of 127.0.0.x source addresses to spread client sockets over.
    #[arg(long, default_value_t = 64)]
    source_ips: u8,
    /// Concurrent handshakes while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// PID of the hub, to read its RSS and CPU from /proc.
    #[arg(long)]
    hub_pid: Option<u32>,
}

#[derive(Args)]
struct ConnectionsArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// How long to hold the idle sockets while measuring hub CPU.
    #[arg(long, default_value_t = 60)]
    hold_secs: u64,
    /// Distinct orgs the sockets belong to.
    #[arg(long, default_value_t = 100)]
    orgs: usize,
    /// The hub's Redis: when given, its commands/s during the hold are reported (the steady
    /// cost of presence leases, sweeps and liveness pings).
    #[arg(long)]
    redis: Option<String>,
    /// After the hold every socket is closed and the hub's RSS is sampled for this long (memory
    /// given back after a storm; 0 skips it).
    #[arg(long, default_value_t = 60)]
    after_close_secs: u64,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Orgs the subscribers and events are spread over (`spread`; 1 for `fanout`).
    #[arg(long, default_value_t = 1)]
    orgs: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Messages per second; 0 publishes as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Payload padding in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// `compare`: the floor server's URL (`hub-bench floor-server`), measured between Redis and
    /// the hub.
    #[arg(long)]
    floor: Option<String>,
    /// PID of the floor server (its CPU is reported).
    #[arg(long)]
    floor_pid: Option<u32>,
    /// PID of redis-server (its CPU is reported).
    #[arg(long)]
    redis_pid: Option<u32>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// Picks the source address for the i-th client socket: 127.0.<1+i/250>.<2+i%250>, limited to
/// `ips` addresses (one loopback address has only ~28k ephemeral ports).
fn source_ip(i: usize, ips: u8) -> IpAddr {
    let n = i % ips.max(1) as usize;
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (n / 250) as u8,
        2 + (n % 250) as u8,
    ))
}

fn ws_url(hub: &str, token: &str) -> String {
    format!(
        "{}/socket/websocket?vsn=2.0.0&token={token}",
        hub.replacen("http", "ws", 1)
    )
}

fn hub_addr(hub: &str) -> SocketAddr {
    let authority = hub.split("://").nth(1).unwrap_or(hub).trim_end_matches('/');
    authority.parse().unwrap_or_else(|_| {
        use std::net::ToSocketAddrs;
        authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .expect("hub address resolves")
    })
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

#[derive(Debug)]
enum ConnectError {
    FileLimit,
    Other(String),
}

async fn tcp_from(source: IpAddr, target: SocketAddr) -> Result<TcpStream, ConnectError> {
    let map = |e: std::io::Error| {
        if e.raw_os_error() == Some(24) {
            ConnectError::FileLimit
        } else {
            ConnectError::Other(e.to_string())
        }
    };
    let socket = TcpSocket::new_v4().map_err(map)?;
    socket.bind(SocketAddr::new(source, 0)).map_err(map)?;
    socket.connect(target).await.map_err(map)
}

/// Connects, joins `topics` and returns the socket.
async fn phoenix_client(
    common: &Common,
    index: usize,
    token: &str,
    topics: &[String],
) -> Result<Ws, ConnectError> {
    let stream = tcp_from(source_ip(index, common.source_ips), hub_addr(&common.hub)).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(
        ws_url(&common.hub, token),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .map_err(|e| ConnectError::Other(e.to_string()))?;
    for (i, topic) in topics.iter().enumerate() {
        let r = (i + 1).to_string();
        ws.send(Message::Text(
            json!([r, r, topic, "phx_join", {}]).to_string().into(),
        ))
        .await
        .map_err(|e| ConnectError::Other(e.to_string()))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.contains("phx_reply") => {
                    if !text.contains("\"ok\"") {
                        return Err(ConnectError::Other(format!("join refused: {text}")));
                    }
                    break;
                }
                Some(Ok(_)) => continue,
                other => return Err(ConnectError::Other(format!("join failed: {other:?}"))),
            }
        }
    }
    Ok(ws)
}

/// A minimal WebSocket client for the fan-out readers: as cheap per message as the RESP reader
/// of the Redis baseline (no per-frame allocation, no UTF-8 validation), so the ratio compares
/// the servers rather than the client libraries.
struct RawWs {
    reader: BufReader<TcpStream>,
    payload: Vec<u8>,
}

impl RawWs {
    async fn connect(
        common: &Common,
        index: usize,
        token: &str,
        topic: &str,
    ) -> Result<RawWs, ConnectError> {
        let other = |e: std::io::Error| ConnectError::Other(e.to_string());
        let addr = hub_addr(&common.hub);
        let stream = tcp_from(source_ip(index, common.source_ips), addr).await?;
        let mut reader = BufReader::with_capacity(16 * 1024, stream);
        let request = format!(
            "GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        reader
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .map_err(other)?;
        let mut status = String::new();
        reader.read_line(&mut status).await.map_err(other)?;
        if !status.contains(" 101 ") {
            return Err(ConnectError::Other(format!(
                "upgrade refused: {}",
                status.trim()
            )));
        }
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.map_err(other)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut ws = RawWs {
            reader,
            payload: Vec::with_capacity(1024),
        };
        let join = json!(["1", "1", topic, "phx_join", {}]).to_string();
        ws.send_text(join.as_bytes()).await.map_err(other)?;
        ws.next_text().await.map_err(other)?;
        if !ws.payload.windows(6).any(|w| w == b"\"ok\",\"")
            && !String::from_utf8_lossy(&ws.payload).contains("\"status\":\"ok\"")
        {
            return Err(ConnectError::Other(format!(
                "join refused: {}",
                String::from_utf8_lossy(&ws.payload)
            )));
        }
        Ok(ws)
    }

    /// Sends one masked text frame (clients must mask).
    async fn send_text(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = Vec::with_capacity(data.len() + 8);
        frame.push(0x81);
        if data.len() < 126 {
            frame.push(0x80 | data.len() as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(data.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.reader.get_mut().write_all(&frame).await
    }

    /// Reads the next text frame into `self.payload`.
    async fn next_text(&mut self) -> std::io::Result<()> {
        loop {
            let mut header = [0u8; 2];
            self.reader.read_exact(&mut header).await?;
            let opcode = header[0] & 0x0f;
            let len = match header[1] & 0x7f {
                126 => self.reader.read_u16().await? as usize,
                127 => self.reader.read_u64().await? as usize,
                n => n as usize,
            };
            self.payload.resize(len, 0);
            self.reader.read_exact(&mut self.payload).await?;
            match opcode {
                0x1 => return Ok(()),
                0x8 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "closed by the hub",
                    ))
                }
                _ => continue,
            }
        }
    }
}

fn mint(common: &Common, claims: Value) -> String {
    prostaff_events::auth::mint(&common.secret, &claims)
}

#[derive(Default, Clone, Copy)]
struct ProcSample {
    rss_kib: u64,
    cpu_ticks: u64,
}

fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let pid = pid?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let cpu_ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ProcSample { rss_kib, cpu_ticks })
}

fn clock_ticks() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on Linux x86_64.
    100.0
}

/// CPU used by some processes (and the bench itself) over one measured phase.
struct CpuWatch {
    started: Instant,
    watched: Vec<(&'static str, u32, u64)>,
}

impl CpuWatch {
    fn start(pids: &[(&'static str, Option<u32>)]) -> Self {
        let mut watched: Vec<(&'static str, u32, u64)> = pids
            .iter()
            .filter_map(|(label, pid)| {
                let pid = (*pid)?;
                Some((*label, pid, proc_sample(Some(pid))?.cpu_ticks))
            })
            .collect();
        let me = std::process::id();
        if let Some(sample) = proc_sample(Some(me)) {
            watched.push(("bench CPU % of a core", me, sample.cpu_ticks));
        }
        CpuWatch {
            started: Instant::now(),
            watched,
        }
    }

    /// One row per process: percent of one core over the phase; and whether the bench itself
    /// was saturated (then the figure is the generator's, a floor for the server).
    fn rows(&self) -> Vec<(&'static str, Value)> {
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let mut rows = Vec::new();
        for (label, pid, before) in &self.watched {
            let Some(after) = proc_sample(Some(*pid)) else {
                continue;
            };
            let percent =
                after.cpu_ticks.saturating_sub(*before) as f64 / clock_ticks() / seconds * 100.0;
            rows.push((*label, json!(percent)));
            if label.starts_with("bench") {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                let saturated = percent >= 90.0 * cores;
                if saturated {
                    eprintln!("hub-bench: the load generator was saturated ({percent:.0} % on {cores} core(s)): the figure is a floor");
                }
                rows.push(("bench saturated (figure is a floor)", json!(saturated)));
            }
        }
        rows
    }
}

/// Opens `count` sockets with bounded concurrency; returns them, the errors, and whether the
/// file limit stopped the run.
async fn open_many(
    common: &Common,
    count: usize,
    topics_for: impl Fn(usize) -> (String, Vec<String>),
) -> (Vec<Ws>, Vec<String>, bool, Duration) {
    let semaphore = Arc::new(Semaphore::new(common.connect_concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (token, topics) = topics_for(i);
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let common = common.clone();
        tasks.push(tokio::spawn(async move {
            let result = phoenix_client(&common, i, &token, &topics).await;
            drop(permit);
            result
        }));
    }
    let mut sockets = Vec::with_capacity(count);
    let mut errors = Vec::new();
    let mut file_limit = false;
    for task in tasks {
        match task.await.unwrap() {
            Ok(ws) => sockets.push(ws),
            Err(ConnectError::FileLimit) => file_limit = true,
            Err(ConnectError::Other(e)) => errors.push(e),
        }
    }
    (sockets, errors, file_limit, started.elapsed())
}

fn report(json_out: bool, title: &str, rows: Vec<(&str, Value)>) {
    if json_out {
        let object: serde_json::Map<String, Value> =
            rows.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        println!("{}", json!({ "scenario": title, "results": object }));
    } else {
        println!("\n== {title}");
        for (key, value) in rows {
            let shown = match &value {
                Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap()),
                other => other.to_string().trim_matches('"').to_string(),
            };
            println!("  {key:<34} {shown}");
        }
    }
}

async fn connections(args: ConnectionsArgs, json_out: bool) {
    let common = &args.common;
    let before = proc_sample(common.hub_pid);
    let orgs = args.orgs.max(1);
    let (mut sockets, errors, file_limit, elapsed) = open_many(common, args.count, |i| {
        let (user, org) = (format!("bench-u{i}"), format!("bench-o{}", i % orgs));
        let token =
            prostaff_events::auth::mint(&common.secret, &json!({"user_id": user, "org_id": org}));
        (
            token,
            vec![format!("org_events:{org}"), format!("notifications:{user}")],
        )
    })
    .await;
    let connected = sockets.len();
    if file_limit {
        eprintln!("hub-bench: STOPPED BY THE OPEN-FILE LIMIT of this process (ulimit -n = {}); {connected} sockets open", nofile_limit());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_connect = proc_sample(common.hub_pid);

    // Hold: every socket heart-beats every 30 s like phoenix.js; measure hub CPU meanwhile.
    let hold = Duration::from_secs(args.hold_secs);
    let heartbeats_answered = Arc::new(AtomicU64::new(0));
    let mut holders = Vec::with_capacity(connected);
    for (i, mut ws) in sockets.drain(..).enumerate() {
        let answered = heartbeats_answered.clone();
        holders.push(tokio::spawn(async move {
            // Spread the heartbeats over the 30 s interval.
            let offset = Duration::from_millis((i as u64 * 7919) % 30_000);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, Duration::from_secs(30));
            let mut next_ref = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        next_ref += 1;
                        let frame = format!("[null,\"hb{next_ref}\",\"phoenix\",\"heartbeat\",{{}}]");
                        if ws.send(Message::Text(frame.into())).await.is_err() { return ws; }
                    }
                    message = ws.next() => match message {
                        Some(Ok(Message::Text(text))) if text.contains("\"phoenix\"") => { answered.fetch_add(1, Ordering::Relaxed); }
                        Some(Ok(_)) => {}
                        _ => return ws,
                    }
                }
            }
        }));
    }
    let redis_start = redis_commands(args.redis.as_deref()).await;
    let cpu_start = proc_sample(common.hub_pid);
    tokio::time::sleep(hold).await;
    let cpu_end = proc_sample(common.hub_pid);
    let redis_end = redis_commands(args.redis.as_deref()).await;
    for holder in &holders {
        holder.abort();
    }
    // Aborted holders drop their sockets: every connection closes at once.
    let after_close = rss_after_close(common.hub_pid, args.after_close_secs).await;

    let mut rows = vec![
        ("requested", json!(args.count)),
        ("connected (2 topics each)", json!(connected)),
        ("errors", json!(errors.len())),
        ("stopped by file limit", json!(file_limit)),
        ("connect time s", json!(elapsed.as_secs_f64())),
        (
            "connect rate /s",
            json!(connected as f64 / elapsed.as_secs_f64()),
        ),
        (
            "heartbeats answered during hold",
            json!(heartbeats_answered.load(Ordering::Relaxed)),
        ),
    ];
    if let Some(first) = errors.first() {
        rows.push(("first error", json!(first)));
    }
    if let (Some(before), Some(after)) = (before, after_connect) {
        let delta = after.rss_kib.saturating_sub(before.rss_kib) as f64 * 1024.0;
        rows.push(("hub RSS before MiB", json!(before.rss_kib as f64 / 1024.0)));
        rows.push(("hub RSS after MiB", json!(after.rss_kib as f64 / 1024.0)));
        rows.push((
            "hub bytes per connection",
            json!(delta / connected.max(1) as f64),
        ));
        rows.push((
            "hub KiB per connection",
            json!(delta / 1024.0 / connected.max(1) as f64),
        ));
    }
    // At the end of the hold the allocator has settled (freed pages purged): the steady cost.
    if let (Some(before), Some(end)) = (before, cpu_end) {
        let delta = end.rss_kib.saturating_sub(before.rss_kib) as f64;
        rows.push((
            "hub RSS at the end of the hold MiB",
            json!(end.rss_kib as f64 / 1024.0),
        ));
        rows.push((
            "hub KiB per connection at the end of the hold",
            json!(delta / connected.max(1) as f64),
        ));
    }
    if let (Some(start), Some(end)) = (cpu_start, cpu_end) {
        let seconds = (end.cpu_ticks - start.cpu_ticks) as f64 / clock_ticks();
        rows.push(("hold s", json!(hold.as_secs_f64())));
        rows.push((
            "hub CPU while idle % of one core",
            json!(100.0 * seconds / hold.as_secs_f64()),
        ));
    }
    if let (Some(start), Some(end)) = (redis_start, redis_end) {
        // Minus the two INFO calls of this measurement.
        let commands = end.saturating_sub(start).saturating_sub(1);
        rows.push((
            "redis commands/s during hold",
            json!(commands as f64 / hold.as_secs_f64()),
        ));
    }
    for (label, rss_kib) in after_close {
        rows.push((label, json!(rss_kib as f64 / 1024.0)));
    }
    report(json_out, "connections", rows);
}

/// The hub's RSS 5 s, 30 s and `secs` after every socket closed (those within `secs`).
async fn rss_after_close(pid: Option<u32>, secs: u64) -> Vec<(&'static str, u64)> {
    let mut samples = Vec::new();
    if pid.is_none() || secs == 0 {
        return samples;
    }
    let closed = tokio::time::Instant::now();
    // The fixed samples fall strictly inside the window; its end is always sampled.
    let fixed = [
        (5, "hub RSS 5 s after close MiB"),
        (30, "hub RSS 30 s after close MiB"),
    ];
    let end = (secs, "hub RSS at the end of the close window MiB");
    for (at, label) in fixed.into_iter().filter(|(at, _)| *at < secs).chain([end]) {
        tokio::time::sleep_until(closed + Duration::from_secs(at)).await;
        if let Some(sample) = proc_sample(pid) {
            samples.push((label, sample.rss_kib));
        }
    }
    samples
}

/// `total_commands_processed` from `INFO stats` of the Redis at `url`.
async fn redis_commands(url: Option<&str>) -> Option<u64> {
    let config = fred::types::config::Config::from_url(url?).ok()?;
    let client = fred::types::Builder::from_config(config).build().ok()?;
    client.init().await.ok()?;
    let info: String = client.info(Some(fred::types::InfoKind::Stats)).await.ok()?;
    let _ = client.quit().await;
    info.lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
}

fn nofile_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// Latency samples (µs) and delivery counts shared by subscriber tasks.
#[derive(Default)]
struct Receipts {
    delivered: AtomicU64,
    last_receipt_us: AtomicU64,
    samples: Mutex<Vec<u32>>,
    /// The largest latency (µs) and when its event was published (µs, the bench's clock): tells
    /// a one-off (the first events) from a stall in the middle of the run.
    worst: Mutex<(u32, u64)>,
}

/// One reader's receipts, merged into [`Receipts`] when it stops.
#[derive(Default)]
struct LocalReceipts {
    samples: Vec<u32>,
    worst: (u32, u64),
}

impl Receipts {
    fn record(&self, sent_us: u64, local: &mut LocalReceipts) {
        let now = now_us();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.last_receipt_us.fetch_max(now, Ordering::Relaxed);
        let latency = now.saturating_sub(sent_us).min(u32::MAX as u64) as u32;
        local.samples.push(latency);
        if latency > local.worst.0 {
            local.worst = (latency, sent_us);
        }
    }
    fn merge(&self, local: LocalReceipts) {
        self.samples.lock().unwrap().extend(local.samples);
        let mut worst = self.worst.lock().unwrap();
        if local.worst.0 > worst.0 {
            *worst = local.worst;
        }
    }
}

/// The channels the hub reads events from (`PSUBSCRIBE prostaff:events:*`).
const HUB_CHANNEL_PREFIX: &str = "prostaff:events:";

/// Extracts the `"t":<µs>` stamp from a frame or RESP message without a JSON parse. The
/// search is `memchr`'s vectorised one and the digits are read in place: the byte-by-byte
/// search it replaces was 24 % of the load generator's samples, and it cost more per frame the
/// later the stamp sits in it (the hub's frames carry topic, event and position before the
/// payload, the floor's raw payload does not), so it slowed the reader of the hub more than
/// the reader of the floor.
fn stamp(bytes: &[u8]) -> Option<u64> {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"t\":"));
    let start = FINDER.find(bytes)? + 4;
    let digits = bytes.get(start..)?;
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(digits.get(..len)?).ok()?.parse().ok()
}

fn payload(seq: usize, org: &str, padding: &str) -> String {
    json!({"type": "bench.tick", "org_id": org, "user_id": "bench", "payload": {"t": now_us(), "seq": seq, "pad": padding}}).to_string()
}

async fn publisher(redis: &str) -> fred::clients::Client {
    let config = fred::types::config::Config::from_url(redis).expect("valid --redis URL");
    let client = fred::types::Builder::from_config(config)
        .build()
        .expect("redis client");
    client.init().await.expect("redis reachable");
    client
}

/// Publishes `messages` on `channel_for(seq)` at `rate` (0 = flat out). Returns the time span.
async fn publish_all(
    client: &fred::clients::Client,
    args: &FanoutArgs,
    channel_for: impl Fn(usize) -> (String, String),
) -> Duration {
    let padding = "x".repeat(args.payload_bytes);
    let started = Instant::now();
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut in_flight = Vec::new();
    for seq in 0..args.messages {
        if let Some(interval) = interval {
            let due = started + interval * seq as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        let (channel, org) = channel_for(seq);
        let message = payload(seq, &org, &padding);
        let client = client.clone();
        in_flight.push(tokio::spawn(async move {
            client.publish::<i64, _, _>(channel, message).await
        }));
        if in_flight.len() >= 64 {
            for task in in_flight.drain(..) {
                let _ = task.await;
            }
        }
    }
    for task in in_flight {
        let _ = task.await;
    }
    started.elapsed()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

struct FanoutResult {
    delivered: u64,
    expected: u64,
    rate: f64,
    rows: Vec<(&'static str, Value)>,
}

fn summarize(
    receipts: &Receipts,
    expected: u64,
    publish_started_us: u64,
    publish_span: Duration,
) -> FanoutResult {
    let delivered = receipts.delivered.load(Ordering::Relaxed);
    let span_us = receipts
        .last_receipt_us
        .load(Ordering::Relaxed)
        .saturating_sub(publish_started_us)
        .max(1);
    let rate = delivered as f64 / (span_us as f64 / 1e6);
    let mut samples = receipts.samples.lock().unwrap().clone();
    samples.sort_unstable();
    let rows = vec![
        ("delivered", json!(delivered)),
        ("expected", json!(expected)),
        (
            "dropped (expected - delivered)",
            json!(expected.saturating_sub(delivered)),
        ),
        ("publish span s", json!(publish_span.as_secs_f64())),
        (
            "first publish → last receipt s",
            json!(span_us as f64 / 1e6),
        ),
        ("delivered msgs/s", json!(rate)),
        ("latency p50 ms", json!(percentile(&samples, 0.50))),
        ("latency p90 ms", json!(percentile(&samples, 0.90))),
        ("latency p99 ms", json!(percentile(&samples, 0.99))),
        ("latency p99.9 ms", json!(percentile(&samples, 0.999))),
        (
            "latency max ms",
            json!(samples.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0)),
        ),
        (
            "latency max: its event published at s",
            json!(
                receipts
                    .worst
                    .lock()
                    .unwrap()
                    .1
                    .saturating_sub(publish_started_us) as f64
                    / 1e6
            ),
        ),
    ];
    FanoutResult {
        delivered,
        expected,
        rate,
        rows,
    }
}

async fn wait_for_deliveries(receipts: &Receipts, expected: u64) {
    let mut last = 0;
    let mut stalled = 0;
    while receipts.delivered.load(Ordering::Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = receipts.delivered.load(Ordering::Relaxed);
        stalled = if now == last { stalled + 1 } else { 0 };
        last = now;
        if stalled > 50 {
            eprintln!("hub-bench: deliveries stalled at {now}/{expected}");
            break;
        }
    }
}

/// Subscribers on `target` (the hub, or the floor server: both speak enough Phoenix for the
/// readers); CPU of `pids` is measured while publishing and delivering.
async fn hub_fanout(
    args: &FanoutArgs,
    target: &str,
    channel_prefix: &str,
    pids: &[(&'static str, Option<u32>)],
) -> FanoutResult {
    let mut common = args.common.clone();
    common.hub = target.to_string();
    let common = &common;
    let orgs = args.orgs.max(1);
    let run = format!("{:x}", fastrand::u64(..));
    let org_name = |i: usize| format!("bench-{run}-{}", i % orgs);
    let semaphore = Arc::new(Semaphore::new(common.connect_concurrency));
    let mut connecting = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let org = org_name(i);
        let token = mint(common, json!({"user_id": format!("s{i}"), "org_id": org}));
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let common = common.clone();
        connecting.push(tokio::spawn(async move {
            let result = RawWs::connect(&common, i, &token, &format!("org_events:{org}")).await;
            drop(permit);
            result
        }));
    }
    let mut sockets = Vec::with_capacity(args.subscribers);
    let (mut errors, mut file_limit) = (Vec::new(), false);
    for task in connecting {
        match task.await.unwrap() {
            Ok(ws) => sockets.push(ws),
            Err(ConnectError::FileLimit) => file_limit = true,
            Err(ConnectError::Other(e)) => errors.push(e),
        }
    }
    if file_limit {
        eprintln!(
            "hub-bench: STOPPED BY THE OPEN-FILE LIMIT (ulimit -n = {}); {} subscribers",
            nofile_limit(),
            sockets.len()
        );
    }
    if !errors.is_empty() {
        eprintln!(
            "hub-bench: {} connect errors, first: {}",
            errors.len(),
            errors[0]
        );
    }
    let subscribers = sockets.len();
    let receipts = Arc::new(Receipts::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::new();
    for mut ws in sockets {
        let receipts = receipts.clone();
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut local = LocalReceipts::default();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    read = ws.next_text() => {
                        if read.is_err() {
                            break;
                        }
                        if let Some(sent) = stamp(&ws.payload) {
                            receipts.record(sent, &mut local);
                        }
                    }
                }
            }
            receipts.merge(local);
        }));
    }
    let client = publisher(&args.redis).await;
    // Per org: subscribers in that org receive the org's events.
    let expected: u64 = (0..args.messages)
        .map(|seq| (0..subscribers).filter(|i| i % orgs == seq % orgs).count() as u64)
        .sum();
    let start_us = now_us();
    let cpu = CpuWatch::start(pids);
    let span = publish_all(&client, args, |seq| {
        let org = org_name(seq);
        (format!("{channel_prefix}{org}"), org)
    })
    .await;
    wait_for_deliveries(&receipts, expected).await;
    let cpu_rows = cpu.rows();
    stop.cancel();
    let mut result = join_and_summarize(&receipts, expected, start_us, span, readers).await;
    result.rows.insert(0, ("subscribers", json!(subscribers)));
    result.rows.insert(1, ("orgs", json!(orgs)));
    result.rows.extend(cpu_rows);
    let _ = client.quit().await;
    result
}

async fn join_and_summarize(
    receipts: &Arc<Receipts>,
    expected: u64,
    start_us: u64,
    span: Duration,
    readers: Vec<tokio::task::JoinHandle<()>>,
) -> FanoutResult {
    for reader in readers {
        let _ = reader.await;
    }
    summarize(receipts, expected, start_us, span)
}

/// The same subscribers, subscribed to Redis directly.
async fn redis_fanout(args: &FanoutArgs, pids: &[(&'static str, Option<u32>)]) -> FanoutResult {
    let common = &args.common;
    let orgs = args.orgs.max(1);
    let redis_addr = hub_addr(&args.redis.replace("redis://", "http://"));
    let base = format!("bench-baseline-{:x}", fastrand::u64(..));
    let channel_of = move |i: usize| format!("{base}-{}", i % orgs);
    let semaphore = Arc::new(Semaphore::new(common.connect_concurrency));
    let receipts = Arc::new(Receipts::default());
    let subscribed = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::new();
    let mut file_limit = false;
    for i in 0..args.subscribers {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let stream = match tcp_from(source_ip(i, common.source_ips), redis_addr).await {
            Ok(stream) => stream,
            Err(ConnectError::FileLimit) => {
                file_limit = true;
                break;
            }
            Err(ConnectError::Other(e)) => {
                eprintln!("hub-bench: redis connect error: {e}");
                continue;
            }
        };
        let channel = channel_of(i);
        let receipts = receipts.clone();
        let subscribed = subscribed.clone();
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let command = format!(
                "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{}\r\n",
                channel.len(),
                channel
            );
            if reader
                .get_mut()
                .write_all(command.as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let mut local = LocalReceipts::default();
            let mut line = String::new();
            let mut confirmed = false;
            drop(permit);
            loop {
                line.clear();
                let read = tokio::select! {
                    _ = stop.cancelled() => break,
                    read = reader.read_line(&mut line) => read.unwrap_or(0),
                };
                if read == 0 {
                    break;
                }
                // Bulk strings: read the announced length; the message is the one with a stamp.
                if let Some(len) = line
                    .strip_prefix('$')
                    .and_then(|l| l.trim().parse::<usize>().ok())
                {
                    let mut body = vec![0u8; len + 2];
                    if reader.read_exact(&mut body).await.is_err() {
                        break;
                    }
                    if let Some(sent) = stamp(&body[..len]) {
                        receipts.record(sent, &mut local);
                    }
                } else if line.starts_with(':') && !confirmed {
                    confirmed = true;
                    subscribed.fetch_add(1, Ordering::Relaxed);
                }
            }
            receipts.merge(local);
        }));
    }
    if file_limit {
        eprintln!(
            "hub-bench: STOPPED BY THE OPEN-FILE LIMIT (ulimit -n = {}); {} Redis subscribers",
            nofile_limit(),
            readers.len()
        );
    }
    let subscribers = readers.len();
    while subscribed.load(Ordering::Relaxed) < subscribers {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = publisher(&args.redis).await;
    let expected: u64 = (0..args.messages)
        .map(|seq| (0..subscribers).filter(|i| i % orgs == seq % orgs).count() as u64)
        .sum();
    let start_us = now_us();
    let cpu = CpuWatch::start(pids);
    let span = publish_all(&client, args, |seq| {
        (channel_of(seq), "baseline".to_string())
    })
    .await;
    wait_for_deliveries(&receipts, expected).await;
    let cpu_rows = cpu.rows();
    stop.cancel();
    let mut result = join_and_summarize(&receipts, expected, start_us, span, readers).await;
    result.rows.insert(0, ("subscribers", json!(subscribers)));
    result.rows.insert(1, ("channels", json!(orgs)));
    result.rows.extend(cpu_rows);
    let _ = client.quit().await;
    result
}

/// One client of the `queue` scenario: joined to `inhouse:{org}`, it sends `actions` pushes one
/// after another and records each push→reply latency (µs); returns (latencies, error reasons).
async fn queue_client(
    common: Common,
    index: usize,
    org: String,
    actions: usize,
) -> Result<(Vec<u32>, Vec<String>), ConnectError> {
    let token = mint(&common, json!({"type": "internal", "iss": "prostaff-api"}));
    let topic = format!("inhouse:{org}");
    let mut ws = phoenix_client(&common, index, &token, std::slice::from_ref(&topic)).await?;
    let mut latencies = Vec::with_capacity(actions);
    let mut errors = Vec::new();
    for i in 0..actions {
        let (event, payload) = if i % 2 == 0 {
            (
                "join_queue",
                json!({"player_id": format!("p{}", i / 2 % 50), "role": "mid"}),
            )
        } else {
            (
                "leave_queue",
                json!({"player_id": format!("p{}", i / 2 % 50)}),
            )
        };
        let msg_ref = format!("a{i}");
        let started = Instant::now();
        ws.send(Message::Text(
            json!(["1", msg_ref, topic, event, payload])
                .to_string()
                .into(),
        ))
        .await
        .map_err(|e| ConnectError::Other(e.to_string()))?;
        let needle = format!("\"{msg_ref}\"");
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text)))
                    if text.contains("phx_reply") && text.contains(&needle) =>
                {
                    latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    if !text.contains("\"status\":\"ok\"") {
                        let reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        errors.push(
                            reply[4]["response"]["reason"]
                                .as_str()
                                .unwrap_or("?")
                                .to_string(),
                        );
                    }
                    break;
                }
                Some(Ok(_)) => continue,
                other => return Err(ConnectError::Other(format!("socket ended: {other:?}"))),
            }
        }
    }
    Ok((latencies, errors))
}

async fn queue_bench(args: QueueArgs, json_out: bool) {
    let run = fastrand::u32(..);
    let orgs: Vec<String> = (0..args.clients)
        .map(|c| format!("bench-q-{run}-{c}"))
        .collect();
    let redis = publisher(&args.redis).await;
    for org in &orgs {
        let opened = json!({"type": "inhouse.queue_opened", "org_id": org, "user_id": "bench", "payload": {"queue_id": format!("{org}-queue")}});
        let _: i64 = redis
            .publish(format!("prostaff:events:{org}"), opened.to_string())
            .await
            .expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = proc_sample(args.common.hub_pid);
    let started = Instant::now();
    let tasks: Vec<_> = orgs
        .iter()
        .enumerate()
        .map(|(i, org)| {
            tokio::spawn(queue_client(
                args.common.clone(),
                i,
                org.clone(),
                args.actions,
            ))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    let mut failed_clients = 0;
    for task in tasks {
        match task.await.expect("client task") {
            Ok((mut l, e)) => {
                latencies.append(&mut l);
                for reason in e {
                    *errors.entry(reason).or_default() += 1;
                }
            }
            Err(error) => {
                failed_clients += 1;
                eprintln!("client failed: {error:?}");
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = proc_sample(args.common.hub_pid);
    latencies.sort_unstable();
    let mut rows = vec![
        ("clients (one org each)", json!(args.clients)),
        ("failed clients", json!(failed_clients)),
        ("actions", json!(latencies.len())),
        ("elapsed s", json!(elapsed)),
        ("actions/s", json!(latencies.len() as f64 / elapsed)),
        ("p50 ms", json!(percentile(&latencies, 0.50))),
        ("p99 ms", json!(percentile(&latencies, 0.99))),
        ("max ms", json!(percentile(&latencies, 1.0))),
        ("error replies", json!(errors)),
    ];
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        rows.push((
            "hub CPU % of one core",
            json!((after.cpu_ticks - before.cpu_ticks) as f64 / clock_ticks() / elapsed * 100.0),
        ));
    }
    report(json_out, "queue actions (hub + Redis scripts)", rows);
}

/// Redis, then the floor server (when given), then the hub: the same readers, publisher and
/// events in one run, with the ratios.
async fn compare(args: FanoutArgs, json_out: bool) {
    let redis_pid = ("redis CPU % of a core", args.redis_pid);
    let baseline = redis_fanout(&args, &[redis_pid]).await;
    report(json_out, "redis-baseline", baseline.rows.clone());
    let floor = match &args.floor {
        Some(url) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pids = [("floor CPU % of a core", args.floor_pid), redis_pid];
            let result = hub_fanout(&args, url, floor::CHANNEL_PREFIX, &pids).await;
            report(json_out, "floor server", result.rows.clone());
            Some(result)
        }
        None => None,
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = [("hub CPU % of a core", args.common.hub_pid), redis_pid];
    let hub = hub_fanout(&args, &args.common.hub, HUB_CHANNEL_PREFIX, &pids).await;
    report(json_out, "hub", hub.rows.clone());
    let latency = |result: &FanoutResult, key: &str| -> f64 {
        result
            .rows
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.as_f64())
            .unwrap_or(0.0)
    };
    let mut rows = vec![
        ("hub delivered msgs/s", json!(hub.rate)),
        ("redis delivered msgs/s", json!(baseline.rate)),
        ("hub / redis", json!(hub.rate / baseline.rate.max(1.0))),
    ];
    if let Some(floor) = &floor {
        rows.push(("floor delivered msgs/s", json!(floor.rate)));
        rows.push(("hub / floor", json!(hub.rate / floor.rate.max(1.0))));
        rows.push(("floor / redis", json!(floor.rate / baseline.rate.max(1.0))));
    }
    for key in [
        "latency p50 ms",
        "latency p99 ms",
        "latency p99.9 ms",
        "latency max ms",
        "latency max: its event published at s",
        "first publish → last receipt s",
    ] {
        let (h, r) = (latency(&hub, key), latency(&baseline, key));
        let f = floor
            .as_ref()
            .map(|f| format!(" / floor {:.1}", latency(f, key)))
            .unwrap_or_default();
        rows.push((key, json!(format!("hub {h:.1}{f} / redis {r:.1}"))));
    }
    rows.push(("hub complete", json!(hub.delivered == hub.expected)));
    rows.push((
        "redis complete",
        json!(baseline.delivered == baseline.expected),
    ));
    if let Some(floor) = &floor {
        rows.push(("floor complete", json!(floor.delivered == floor.expected)));
    }
    report(json_out, "ratios (same run)", rows);
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let _ = epoch();
    match cli.scenario {
        Scenario::Connections(args) => connections(args, cli.json).await,
        Scenario::Queue(args) => queue_bench(args, cli.json).await,
        Scenario::FloorServer(args) => floor::run(args.port, &args.redis).await,
        Scenario::Fanout(mut args) => {
            args.orgs = 1;
            let pids = [("hub CPU % of a core", args.common.hub_pid)];
            let result = hub_fanout(&args, &args.common.hub, HUB_CHANNEL_PREFIX, &pids).await;
            report(cli.json, "fanout (hub)", result.rows);
        }
        Scenario::Spread(args) => {
            let pids = [("hub CPU % of a core", args.common.hub_pid)];
            let result = hub_fanout(&args, &args.common.hub, HUB_CHANNEL_PREFIX, &pids).await;
            report(cli.json, "spread (hub)", result.rows);
        }
        Scenario::RedisBaseline(args) => {
            let pids = [("redis CPU % of a core", args.redis_pid)];
            let result = redis_fanout(&args, &pids).await;
            report(cli.json, "redis-baseline", result.rows);
        }
        Scenario::Compare(args) => compare(args, cli.json).await,
        Scenario::Catalogue(args) => catalogue_bench(args, cli.json),
    }
}

/// What ingest adds per envelope under `EVENT_SCHEMAS=warn|enforce`: decoding (done anyway)
/// next to the schema check, per catalogued type, on one core.
fn catalogue_bench(args: CatalogueArgs, json_out: bool) {
    use prostaff_events::catalogue::{Catalogue, Check};
    let catalogue = Catalogue::builtin().expect("the built-in catalogue loads");
    let cases = [
        (
            "tournament_match.confirmed",
            json!({"tournament_id": "t-123", "match_id": 42, "score": "2-1"}),
        ),
        (
            "inhouse.check_in_started",
            json!({"queue_id": "q1", "check_in_deadline": "2026-12-02T12:00:00Z",
            "entries": [{"player_id": "p1", "role": "top", "checked_in": false}, {"player_id": "p2", "role": "mid"}]}),
        ),
        (
            "notification.mention",
            json!({"text": "hello", "link": "/x"}),
        ),
        ("bench.tick", json!({"t": 1, "seq": 2})),
    ];
    let mut rows = Vec::new();
    for (event_type, payload) in cases {
        let raw = bytes::Bytes::from(
            json!({"version": "1", "id": "0b6f1c1e-4f0e-4c55-9a53-4f2b8f0e9a11", "type": event_type,
                "org_id": "org-123", "user_id": "user-456", "payload": payload,
                "published_at": "2026-12-02T12:00:00Z"})
            .to_string(),
        );
        let started = Instant::now();
        for _ in 0..args.iterations {
            std::hint::black_box(prostaff_events::envelope::decode(raw.clone()).expect("valid"));
        }
        let decode_ns = started.elapsed().as_nanos() as f64 / f64::from(args.iterations);
        let envelope = prostaff_events::envelope::decode(raw).expect("valid");
        let started = Instant::now();
        let mut valid = 0u32;
        for _ in 0..args.iterations {
            let document = std::hint::black_box(&envelope.document);
            if matches!(
                catalogue.check(&envelope.event_type, document),
                Check::Valid(_)
            ) {
                valid += 1;
            }
        }
        let check_ns = started.elapsed().as_nanos() as f64 / f64::from(args.iterations);
        rows.push((format!("{event_type}: decode ns"), json!(decode_ns.round())));
        let verdict = if valid > 0 { "valid" } else { "no schema" };
        rows.push((
            format!("{event_type}: schema check ns ({verdict})"),
            json!(check_ns.round()),
        ));
    }
    let rows = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    report(json_out, "catalogue (per envelope, one core)", rows);
}
