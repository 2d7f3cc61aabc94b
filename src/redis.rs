//! The Redis link, at the bottom of the module graph: one subscriber connection and one command
//! connection, managed by a single loop, plus the one typed error every Redis caller sees.
//!
//! Subsystems do not share a dispatcher that knows them: each one [`RedisLink::subscribe`]s its
//! own channel pattern with a [`Handler`] before the link runs (ingest: envelopes and queue
//! updates; presence: diffs; long-poll: this instance's channel). The link PSUBSCRIBEs every
//! registered pattern, hands each handler its messages in Redis's order (a burst is taken in
//! batches of up to [`MAX_BATCH`], split into runs per handler), and after every (re)connect
//! calls each handler's [`Handler::connected`] before any message of the new subscription.
//!
//! The loop owns reconnection: connect both, subscribe, read until either connection ends or
//! stops answering, then back off (capped, jittered) and start again. A half-open connection
//! (packets silently dropped) is caught by an application PING on both connections every
//! [`LIVENESS_INTERVAL`], bounded by [`LIVENESS_TIMEOUT`], plus TCP keepalive. Each successful
//! connect is announced ([`RedisLink::connects`]) so the reconciler, presence and revocations
//! can catch up. Redis being down never blocks sockets.
//!
//! The link runs on a thread of its own ([`LinkThread`]): its connections, its loop and every
//! handler it dispatches to (the ingest pipeline's decode, history append and fan-out) are
//! never queued behind the socket tasks of the main runtime, so a reply from Redis is read when
//! it arrives. Any task may call the link's clients; only the link's own work runs there.
//!
//! Invariant: this is the only place that opens Redis connections, and it names no module above
//! it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, PubsubInterface};
use fred::types::config::Config as FredConfig;
use fred::types::scripts::Script;
use fred::types::Builder;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Both connections are PINGed this often; a PING unanswered within [`LIVENESS_TIMEOUT`] ends
/// the connection, so a half-open link is replaced within about 5 s.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
/// Messages taken from the subscriber at once at most (a burst is split into batches this big).
pub const MAX_BATCH: usize = 256;

/// Why a Redis call did not answer: the one error type of every Redis caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    #[error("redis is not connected")]
    Disconnected,
    #[error("redis did not answer in time")]
    Timeout,
    /// Redis answered with an error (its kind, never a value).
    #[error("redis call failed: {0}")]
    Failed(&'static str),
    /// Redis answered, but not in the shape the caller's script promises.
    #[error("malformed redis reply: {0}")]
    Malformed(&'static str),
}

impl RedisError {
    /// A short label (readiness checks, logs).
    pub fn label(&self) -> &'static str {
        match self {
            RedisError::Disconnected => "disconnected",
            RedisError::Timeout => "timeout",
            RedisError::Failed(kind) => kind,
            RedisError::Malformed(_) => "malformed reply",
        }
    }

    /// Whether the call failed because the link did — no connection, no answer in time, the
    /// connection dropped under it — rather than because Redis refused it: worth making again
    /// once the link is back.
    pub fn is_link_failure(&self) -> bool {
        use fred::error::ErrorKind;
        match self {
            RedisError::Disconnected | RedisError::Timeout => true,
            RedisError::Failed(kind) => [
                ErrorKind::IO,
                ErrorKind::Canceled,
                ErrorKind::Timeout,
                ErrorKind::Sentinel,
            ]
            .iter()
            .any(|link| link.to_str() == *kind),
            RedisError::Malformed(_) => false,
        }
    }

    fn from_fred(error: &fred::error::Error) -> Self {
        RedisError::Failed(error.kind().to_str())
    }
}

/// One pub/sub message.
#[derive(Debug, Clone)]
pub struct Message {
    pub channel: String,
    pub payload: Bytes,
}

/// A boxed future a [`Handler`] returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What a subsystem that subscribes a channel pattern does with it.
pub trait Handler: Send + Sync + 'static {
    /// Messages on the handler's patterns, in the order Redis delivered them. The link waits
    /// for the future before handing over the next run.
    fn messages(&self, batch: Vec<Message>) -> HandlerFuture<'_>;

    /// After every (re)connect, once subscribed and before any message of the new
    /// subscription (those wait in the link's buffer meanwhile).
    fn connected(&self) -> HandlerFuture<'_> {
        Box::pin(async {})
    }
}

/// A registered pattern: `prefix*` matches channels that start with `prefix`; a pattern without
/// `*` matches that channel only. No other glob syntax is used.
struct Subscription {
    pattern: String,
    handler: Arc<dyn Handler>,
}

impl Subscription {
    fn matches(&self, channel: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => channel == self.pattern,
        }
    }
}

/// A registered stream: each entry's `envelope` field is handed to `handler` as a message on
/// a channel named after the key.
#[derive(Clone)]
struct StreamSource {
    key: String,
    handler: Arc<dyn Handler>,
}

/// The registered handlers, in registration order, and the stream read (if any).
#[derive(Default, Clone)]
struct Registry(Vec<Arc<Subscription>>, Option<StreamSource>);

impl Registry {
    fn patterns(&self) -> Vec<String> {
        self.0.iter().map(|s| s.pattern.clone()).collect()
    }

    /// Each distinct handler once, in registration order.
    fn handlers(&self) -> Vec<Arc<dyn Handler>> {
        let mut handlers: Vec<Arc<dyn Handler>> = Vec::new();
        for subscription in &self.0 {
            if !handlers
                .iter()
                .any(|h| Arc::ptr_eq(h, &subscription.handler))
            {
                handlers.push(subscription.handler.clone());
            }
        }
        handlers
    }

    /// Hands `batch` over in order, as consecutive runs per handler. A message no pattern
    /// matches (impossible unless Redis misbehaves) is counted and dropped.
    async fn dispatch(&self, batch: Vec<fred::types::Message>) {
        let mut run: Option<(Arc<dyn Handler>, Vec<Message>)> = None;
        for message in batch {
            let channel = message.channel.to_string();
            let Some(subscription) = self.0.iter().find(|s| s.matches(&channel)) else {
                metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => "redis", "outcome" => "unmatched_channel")
                    .increment(1);
                continue;
            };
            let message = Message {
                channel,
                payload: message.value.into_bytes().unwrap_or_default(),
            };
            match &mut run {
                Some((handler, messages)) if Arc::ptr_eq(handler, &subscription.handler) => {
                    messages.push(message)
                }
                _ => {
                    if let Some((handler, messages)) = run.take() {
                        handler.messages(messages).await;
                    }
                    run = Some((subscription.handler.clone(), vec![message]));
                }
            }
        }
        if let Some((handler, messages)) = run {
            handler.messages(messages).await;
        }
    }
}

/// The thread the Redis link runs on: a current-thread tokio runtime of its own.
///
/// Why: on the main runtime every hop of an event (the subscriber's message, the history
/// append's reply) waited in the run queue behind the socket tasks the previous fan-out woke:
/// at 1,000 subscribers and 435 events/s the hub's p50 was twice the floor server's and its
/// p99 above Redis's; on this thread both are at the floor's or below (BENCHMARKS.md, issue
/// 21's "Round four"). Here the operating system schedules the link as soon as a reply is
/// readable.
///
/// Dropping it stops the thread: its runtime is dropped there, and with it every task still on
/// it (the fred connections close), whatever path the hub left `run` by.
pub struct LinkThread {
    handle: tokio::runtime::Handle,
    /// Dropped with the `LinkThread`: the thread's `block_on` returns and its runtime shuts down.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl LinkThread {
    /// Starts the thread and its runtime.
    pub fn start() -> std::io::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (started, handle) = std::sync::mpsc::sync_channel(1);
        // The runtime is built and dropped on its own thread: a runtime must not be dropped
        // inside the async context `run` is called from.
        std::thread::Builder::new()
            .name("redis-link".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = started.send(Err(error));
                        return;
                    }
                };
                let _ = started.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        // Waits the few microseconds the thread takes to build its runtime.
        let handle = handle
            .recv()
            .map_err(|_| std::io::Error::other("redis-link thread ended before it started"))??;
        Ok(LinkThread {
            handle,
            _stop: stop,
        })
    }

    /// Where the link's tasks are spawned.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Shared view of the Redis link: the command connection for every caller, the registry of
/// subscribed patterns, and the connect signal.
pub struct RedisLink {
    url: String,
    /// This hub instance's id (12 hex digits, random per process): presence leases and
    /// long-poll session tokens name it.
    instance: String,
    publisher: RwLock<Option<Client>>,
    /// Counts successful connects, the first one included: subscribers catch up after each.
    connects: watch::Sender<u64>,
    registry: Mutex<Registry>,
    /// The id of the last stream entry handed over; `None` until the first connect reads where
    /// the stream ends (a new process starts there, it does not replay the past).
    stream_position: Mutex<Option<String>>,
    /// Replicas connected to the master (`INFO replication`), read at connect and at every
    /// liveness check; 0 on a cluster (its writes go to many masters).
    replicas: std::sync::atomic::AtomicU64,
}

/// How long [`RedisLink::replicate`] waits for a replica to acknowledge a write.
pub const REPLICATION_WAIT: Duration = Duration::from_millis(100);

/// What [`RedisLink::replicate`] learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// A replica has the write: a failover now keeps it.
    Acknowledged,
    /// No replica acknowledged within [`REPLICATION_WAIT`] (or WAIT failed): a failover in
    /// the next moments may lose the write.
    Unacknowledged,
    /// The master has no replica (or this is a cluster): nothing to wait for.
    NoReplica,
}

impl RedisLink {
    pub fn new(url: &str) -> Arc<Self> {
        Arc::new(RedisLink {
            url: url.to_string(),
            instance: format!("{:012x}", fastrand::u64(..) >> 16),
            publisher: RwLock::new(None),
            connects: watch::Sender::new(0),
            registry: Mutex::default(),
            stream_position: Mutex::new(None),
            replicas: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Registers `handler` for the channels `pattern` matches (`prefix*` or one exact channel).
    /// Takes effect at the next connect: subsystems register before [`RedisLink::run`].
    pub fn subscribe(&self, pattern: impl Into<String>, handler: Arc<dyn Handler>) {
        self.registry
            .lock()
            .expect("registry lock")
            .0
            .push(Arc::new(Subscription {
                pattern: pattern.into(),
                handler,
            }));
    }

    /// Reads the stream at `key` (XREAD on a connection of its own) and hands each entry's
    /// `envelope` field to `handler`, in the stream's order, from the entry after the last one
    /// handed over, across reconnects. Register before [`RedisLink::run`].
    pub fn read_stream(&self, key: impl Into<String>, handler: Arc<dyn Handler>) {
        self.registry.lock().expect("registry lock").1 = Some(StreamSource {
            key: key.into(),
            handler,
        });
    }

    /// A receiver that sees every later connect (the first one included).
    pub fn connects(&self) -> watch::Receiver<u64> {
        self.connects.subscribe()
    }

    /// Runs `script` (EVALSHA, loading it on `NOSCRIPT`) within [`COMMAND_TIMEOUT`]; the script
    /// must answer with an array of strings.
    pub async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Vec<String>, RedisError> {
        let client = self.commands().ok_or(RedisError::Disconnected)?;
        bounded(
            COMMAND_TIMEOUT,
            script.evalsha_with_reload::<Vec<String>, _, _>(&client, keys, args),
        )
        .await
    }

    /// Runs `script` (no keys) on every primary — each node of a cluster, or the one server —
    /// and joins the answers: what a keyspace walk (`SCAN`) needs, as a script sees only its
    /// own node's keys.
    pub async fn eval_on_every_primary(
        &self,
        script: &Script,
        args: Vec<String>,
    ) -> Result<Vec<String>, RedisError> {
        let client = self.commands().ok_or(RedisError::Disconnected)?;
        if !client.is_clustered() {
            return self.eval(script, vec![], args).await;
        }
        use fred::interfaces::ClusterInterface;
        let lua = script
            .lua()
            .ok_or(RedisError::Malformed("a script without its text"))?
            .to_string();
        // One slot each primary owns: an EVAL routed by it runs on that primary.
        let mut slots: Vec<(fred::types::config::Server, u16)> = Vec::new();
        for range in client
            .cached_cluster_state()
            .map(|state| state.slots().to_vec())
            .unwrap_or_default()
        {
            if !slots.iter().any(|(primary, _)| *primary == range.primary) {
                slots.push((range.primary.clone(), range.start));
            }
        }
        let mut joined = Vec::new();
        for (_, slot) in slots {
            let mut call = vec![lua.clone(), "0".to_string()];
            call.extend(args.iter().cloned());
            let eval = fred::types::CustomCommand::new_static("EVAL", Some(slot), false);
            let answer: Vec<String> = bounded(COMMAND_TIMEOUT, client.custom(eval, call)).await?;
            joined.extend(answer);
        }
        Ok(joined)
    }

    pub fn is_connected(&self) -> bool {
        self.commands().is_some()
    }

    /// The command connection (PUBLISH, PING, the queue and history scripts), present only
    /// while Redis is connected.
    pub fn commands(&self) -> Option<Client> {
        self.publisher.read().expect("publisher lock").clone()
    }

    /// PINGs Redis through the command connection.
    pub async fn ping(&self, timeout: Duration) -> Result<(), RedisError> {
        let client = self.commands().ok_or(RedisError::Disconnected)?;
        bounded(timeout, client.ping::<String>(None))
            .await
            .map(|_| ())
    }

    /// PUBLISHes `payload` on `channel`; answers how many subscribers received it.
    pub async fn publish(&self, channel: String, payload: Bytes) -> Result<i64, RedisError> {
        let client = self.commands().ok_or(RedisError::Disconnected)?;
        bounded(
            COMMAND_TIMEOUT,
            client.publish::<i64, _, _>(channel, payload),
        )
        .await
    }

    /// Waits (at most [`REPLICATION_WAIT`]) until a replica has every write this instance's
    /// command connection made so far (`WAIT 1 100`); at once when the master has none.
    pub async fn replicate(&self) -> Replication {
        if self.replicas.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return Replication::NoReplica;
        }
        let Some(client) = self.commands() else {
            return Replication::Unacknowledged;
        };
        let wait = fred::types::CustomCommand::new_static("WAIT", None::<u16>, true);
        let timeout = REPLICATION_WAIT.as_millis().to_string();
        match bounded(
            COMMAND_TIMEOUT,
            client.custom::<i64, _>(wait, vec!["1".to_string(), timeout]),
        )
        .await
        {
            Ok(acknowledged) if acknowledged >= 1 => Replication::Acknowledged,
            _ => Replication::Unacknowledged,
        }
    }

    /// Reads how many replicas the master has (0 on a cluster or when INFO fails).
    async fn count_replicas(&self, commands: &Client) {
        let replicas = if commands.is_clustered() {
            0
        } else {
            let info = fred::types::CustomCommand::new_static("INFO", None::<u16>, false);
            commands
                .custom::<String, _>(info, vec!["replication"])
                .await
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find_map(|line| line.strip_prefix("connected_slaves:"))
                        .and_then(|n| n.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        self.replicas
            .store(replicas, std::sync::atomic::Ordering::Relaxed);
    }

    /// `SET prostaff:live:<instance> 1 PX 10000`: fails with READONLY on a replica.
    async fn write_probe(&self, commands: &Client) -> Result<(), fred::error::Error> {
        commands
            .set::<(), _, _>(
                format!("prostaff:live:{}", self.instance),
                1,
                Some(fred::types::Expiration::PX(10_000)),
                None,
                false,
            )
            .await
    }

    fn set_connected(&self, publisher: Option<Client>) {
        let connected = publisher.is_some();
        *self.publisher.write().expect("publisher lock") = publisher;
        metrics::gauge!(crate::metrics::REDIS_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    }

    /// A client for commands: fred's event channels at their small default size.
    fn build_client(config: &FredConfig) -> Result<Client, fred::error::Error> {
        Self::build_client_with(config, COMMAND_BROADCAST_CAPACITY)
    }

    /// The subscriber: pub/sub messages wait in its broadcast channel between the connection
    /// task and the link's loop, so it is sized for bursts.
    fn build_subscriber(config: &FredConfig) -> Result<Client, fred::error::Error> {
        Self::build_client_with(config, SUBSCRIBER_BROADCAST_CAPACITY)
    }

    fn build_client_with(
        config: &FredConfig,
        broadcast_capacity: usize,
    ) -> Result<Client, fred::error::Error> {
        Builder::from_config(config.clone())
            .with_connection_config(|c| {
                c.connection_timeout = CONNECT_TIMEOUT;
                c.internal_command_timeout = COMMAND_TIMEOUT;
                // Commands are not retried on another connection: a caller that timed out has
                // already answered its client, and a retried PUBLISH would deliver twice.
                c.max_command_attempts = 1;
                c.unresponsive = fred::types::config::UnresponsiveConfig {
                    max_timeout: Some(LIVENESS_TIMEOUT),
                    interval: Duration::from_secs(1),
                };
                c.tcp = fred::types::config::TcpConfig {
                    nodelay: Some(true),
                    keepalive: Some(
                        socket2::TcpKeepalive::new()
                            .with_time(Duration::from_secs(5))
                            .with_interval(Duration::from_secs(2)),
                    ),
                    ..Default::default()
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
                p.broadcast_channel_capacity = broadcast_capacity;
            })
            .build()
    }

    /// Connects the command connection only (for a CLI command: no subscription, no
    /// reconnects); `Err` says why it could not.
    pub async fn connect_commands(&self) -> Result<(), String> {
        let config = FredConfig::from_url(&self.url).map_err(|e| e.details().to_string())?;
        let commands = Self::build_client(&config).map_err(|e| e.details().to_string())?;
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, commands.init()).await {
            Ok(Ok(_task)) => {
                self.set_connected(Some(commands));
                Ok(())
            }
            Ok(Err(error)) => Err(format!("connect failed: {}", error.kind().to_str())),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// Runs until `shutdown`: connect, subscribe, deliver, reconnect.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let config = match FredConfig::from_url(&self.url) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(error = %error.details(), "REDIS_URL is not a valid Redis URL; running without Redis");
                return;
            }
        };
        let mut backoff = BACKOFF_MIN;
        let mut ever_connected = false;
        self.set_connected(None);
        while !shutdown.is_cancelled() {
            let registry = self.registry.lock().expect("registry lock").clone();
            let connection = Connection {
                link: &self,
                config: &config,
                registry: &registry,
                shutdown: &shutdown,
            };
            match connection.serve(&mut ever_connected, &mut backoff).await {
                Ok(()) => return,
                Err(reason) => {
                    self.set_connected(None);
                    let jittered = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                    tracing::warn!(
                        reason,
                        retry_in_ms = jittered.as_millis() as u64,
                        "redis unavailable"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(jittered) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// A fred call bounded by `timeout`, its error typed.
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(RedisError::from_fred(&error)),
        Err(_) => Err(RedisError::Timeout),
    }
}

type Tasks = (fred::types::ConnectHandle, fred::types::ConnectHandle);

/// One connection lifetime of the link.
struct Connection<'a> {
    link: &'a RedisLink,
    config: &'a FredConfig,
    registry: &'a Registry,
    shutdown: &'a CancellationToken,
}

impl Connection<'_> {
    /// Connects, subscribes, tells the handlers, then reads until the link fails (`Err` with
    /// the reason) or shutdown is requested (`Ok`).
    async fn serve(&self, ever_connected: &mut bool, backoff: &mut Duration) -> Result<(), String> {
        let subscriber =
            RedisLink::build_subscriber(self.config).map_err(|e| e.details().to_string())?;
        let commands = RedisLink::build_client(self.config).map_err(|e| e.details().to_string())?;
        let messages = subscriber.message_rx();
        let patterns = self.registry.patterns();
        let (mut sub_task, mut cmd_task) =
            match self.connect(&subscriber, &commands, &patterns).await {
                Ok(tasks) => tasks,
                Err(reason) => {
                    let _ = subscriber.quit().await;
                    let _ = commands.quit().await;
                    return Err(reason);
                }
            };
        let mut stream = match self.registry.1.clone() {
            Some(source) => match StreamReader::start(self.link, self.config, source).await {
                Ok(reader) => Some(reader),
                Err(reason) => {
                    let _ = subscriber.quit().await;
                    let _ = commands.quit().await;
                    sub_task.abort();
                    cmd_task.abort();
                    return Err(reason);
                }
            },
            None => None,
        };
        self.link.count_replicas(&commands).await;
        self.link.set_connected(Some(commands.clone()));
        *backoff = BACKOFF_MIN;
        if *ever_connected {
            metrics::counter!(crate::metrics::REDIS_RECONNECTS).increment(1);
        }
        tracing::info!(patterns = %patterns.join(" "), reconnect = *ever_connected, "redis connected");
        // Subscribed, and what arrives now waits in the message channel: every handler catches
        // up to here first, so what it missed comes before the live messages.
        for handler in self.registry.handlers() {
            handler.connected().await;
        }
        // Every connect, the first included: a hub that booted without Redis reconciles too.
        self.link.connects.send_modify(|count| *count += 1);
        *ever_connected = true;
        let outcome = tokio::select! {
            outcome = self.read(messages, &subscriber, &commands, stream.as_mut().map(StreamReader::entries)) => outcome,
            _ = &mut sub_task => Err("subscriber connection closed".to_string()),
            _ = &mut cmd_task => Err("command connection closed".to_string()),
        };
        self.link.set_connected(None);
        if let Some(stream) = stream {
            stream.stop().await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), subscriber.quit()).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), commands.quit()).await;
        sub_task.abort();
        cmd_task.abort();
        outcome
    }

    async fn connect(
        &self,
        subscriber: &Client,
        commands: &Client,
        patterns: &[String],
    ) -> Result<Tasks, String> {
        let connect = async {
            let sub_task = subscriber.init().await?;
            let cmd_task = commands.init().await?;
            // A server that refuses writes (a replica, e.g. a master demoted by a failover) is
            // no link: every queue action and history append would fail.
            if let Err(error) = self.link.write_probe(commands).await {
                sub_task.abort();
                cmd_task.abort();
                return Err(error);
            }
            subscriber.psubscribe(patterns.to_vec()).await?;
            Ok::<_, fred::error::Error>((sub_task, cmd_task))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
            Ok(Ok(tasks)) => Ok(tasks),
            Ok(Err(error)) => Err(format!("connect failed: {}", probe_reason(&error))),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// Delivers messages (and stream entries) and checks liveness until the link fails or
    /// shutdown.
    async fn read(
        &self,
        mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
        subscriber: &Client,
        commands: &Client,
        mut stream: Option<(
            &mut tokio::sync::mpsc::Receiver<StreamBatch>,
            Arc<dyn Handler>,
        )>,
    ) -> Result<(), String> {
        let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        liveness.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = liveness.tick() => {
                    // The command connection's check is a write: a master that became a replica
                    // answers PING but refuses writes (READONLY), and is left for the new one.
                    let pings = async {
                        tokio::try_join!(
                            subscriber.ping::<fred::types::Value>(None),
                            self.link.write_probe(commands)
                        )
                    };
                    match tokio::time::timeout(LIVENESS_TIMEOUT, pings).await {
                        Ok(Ok(_)) => self.link.count_replicas(commands).await,
                        Ok(Err(error)) => return Err(format!("liveness ping failed: {}", probe_reason(&error))),
                        Err(_) => return Err("redis unresponsive (ping timed out)".to_string()),
                    }
                }
                batch = next_entries(&mut stream) => {
                    let (batch, last) = batch.unwrap_or_else(|| Err("stream reader stopped".to_string()))?;
                    if let Some((_, handler)) = &stream {
                        handler.messages(batch).await;
                    }
                    // Handed over: a reconnect reads on from here.
                    *self.link.stream_position.lock().expect("stream position lock") = Some(last);
                }
                first = messages.recv() => {
                    // Take whatever else is already waiting too: one batch costs one history
                    // call per topic instead of one round trip per message.
                    let (batch, closed) = take_batch(first, &mut messages);
                    if !batch.is_empty() {
                        self.registry.dispatch(batch).await;
                    }
                    if closed {
                        return Err("subscriber channel closed".to_string());
                    }
                }
            }
        }
    }
}

/// The next batch of stream entries, or never when no stream is read.
async fn next_entries(
    stream: &mut Option<(
        &mut tokio::sync::mpsc::Receiver<StreamBatch>,
        Arc<dyn Handler>,
    )>,
) -> Option<StreamBatch> {
    match stream {
        Some((receiver, _)) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Stream entries read at once and the id of the last one, or why the reader stopped.
type StreamBatch = Result<(Vec<Message>, String), String>;

/// fred's broadcast channels (pub/sub messages, reconnections, errors, …) preallocate every
/// slot, for each client: at 16,384 slots a client held ~12 MiB whether or not it subscribes
/// (measured: RSS at rest 55 → 43 MiB without the stream reader's client). Only the
/// subscriber receives messages through them.
const SUBSCRIBER_BROADCAST_CAPACITY: usize = 16 * 1024;
const COMMAND_BROADCAST_CAPACITY: usize = 32;

/// Entries asked for per XREAD, and how long one XREAD waits for new ones.
const STREAM_COUNT: &str = "256";
const STREAM_BLOCK_MS: &str = "1000";

/// The stream's reader: its own connection (XREAD BLOCK would hold up any other command), and
/// a task that reads from the last entry handed over and sends batches to the link's loop,
/// which hands them to the handler in order. A batch read but not handed over when the link
/// fails is read again after the reconnect.
struct StreamReader {
    source: StreamSource,
    client: Client,
    task: tokio::task::JoinHandle<()>,
    batches: tokio::sync::mpsc::Receiver<StreamBatch>,
    connection: fred::types::ConnectHandle,
}

impl StreamReader {
    async fn start(
        link: &RedisLink,
        config: &FredConfig,
        source: StreamSource,
    ) -> Result<StreamReader, String> {
        let client = RedisLink::build_client(config).map_err(|e| e.details().to_string())?;
        let connect = async {
            let connection = client.init().await?;
            let known = link
                .stream_position
                .lock()
                .expect("stream position lock")
                .clone();
            let after = match known {
                Some(after) => after,
                None => stream_end(&client, &source.key).await?,
            };
            Ok::<_, fred::error::Error>((connection, after))
        };
        let (connection, after) = match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
            Ok(Ok(started)) => started,
            Ok(Err(error)) => {
                let _ = client.quit().await;
                return Err(format!(
                    "stream reader connect failed: {}",
                    error.kind().to_str()
                ));
            }
            Err(_) => {
                let _ = client.quit().await;
                return Err("stream reader connect timed out".into());
            }
        };
        *link.stream_position.lock().expect("stream position lock") = Some(after.clone());
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let task = tokio::spawn(read_entries(
            client.clone(),
            source.key.clone(),
            after,
            sender,
        ));
        Ok(StreamReader {
            source,
            client,
            task,
            batches: receiver,
            connection,
        })
    }

    /// The batches it reads, and who they are for.
    fn entries(
        &mut self,
    ) -> (
        &mut tokio::sync::mpsc::Receiver<StreamBatch>,
        Arc<dyn Handler>,
    ) {
        (&mut self.batches, self.source.handler.clone())
    }

    async fn stop(self) {
        self.task.abort();
        let _ = tokio::time::timeout(Duration::from_millis(500), self.client.quit()).await;
        self.connection.abort();
    }
}

/// A stream command on `key`, routed to the key's slot in a cluster.
fn stream_command(name: &'static str, key: &str) -> fred::types::CustomCommand {
    let slot = fred::util::redis_keyslot(key.as_bytes());
    fred::types::CustomCommand::new_static(name, Some(slot), name == "XREAD")
}

/// The id of the stream's last entry (`0-0` when it is empty or does not exist).
async fn stream_end(client: &Client, key: &str) -> Result<String, fred::error::Error> {
    let reply: fred::types::Value = client
        .custom(
            stream_command("XREVRANGE", key),
            vec![key, "+", "-", "COUNT", "1"],
        )
        .await?;
    Ok(parse_entries(reply)
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_string(), |(id, _)| id))
}

/// Reads the stream after `after` until an XREAD fails (the reason is sent to the link's loop,
/// which reconnects) or the link's loop is gone.
async fn read_entries(
    client: Client,
    key: String,
    mut after: String,
    batches: tokio::sync::mpsc::Sender<StreamBatch>,
) {
    loop {
        let args = vec![
            "COUNT",
            STREAM_COUNT,
            "BLOCK",
            STREAM_BLOCK_MS,
            "STREAMS",
            key.as_str(),
            after.as_str(),
        ];
        let reply = match client
            .custom::<fred::types::Value, _>(stream_command("XREAD", &key), args)
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                // XREAD BLOCK answers within its block time: a timeout is a dead connection.
                let reason = match error.kind() {
                    fred::error::ErrorKind::Timeout => {
                        "no answer to XREAD (stream reader): connection unresponsive".to_string()
                    }
                    _ => format!("stream read failed: {}", probe_reason(&error)),
                };
                let _ = batches.send(Err(reason)).await;
                return;
            }
        };
        // XREAD answers `[[key, entries]]`, or nil when BLOCK passed without a new entry.
        let entries = match reply.into_array().into_iter().next() {
            Some(stream) if !stream.is_null() => parse_entries(
                stream
                    .into_array()
                    .into_iter()
                    .nth(1)
                    .unwrap_or(fred::types::Value::Null),
            ),
            _ => continue,
        };
        let Some(last) = entries.last().map(|(id, _)| id.clone()) else {
            continue;
        };
        let messages = entries
            .into_iter()
            .filter_map(|(id, envelope)| match envelope {
                Some(payload) => Some(Message {
                    channel: key.clone(),
                    payload,
                }),
                None => {
                    tracing::warn!(%id, stream = %key, "stream entry without an `envelope` field; skipped");
                    metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => "redis", "outcome" => "malformed_stream_entry")
                        .increment(1);
                    None
                }
            })
            .collect();
        if batches.send(Ok((messages, last.clone()))).await.is_err() {
            return;
        }
        after = last;
    }
}

/// Stream entries `[[id, [field, value, …]], …]` as (id, the `envelope` field's value).
fn parse_entries(entries: fred::types::Value) -> Vec<(String, Option<Bytes>)> {
    entries
        .into_array()
        .into_iter()
        .filter(|entry| !entry.is_null())
        .filter_map(|entry| {
            let mut parts = entry.into_array().into_iter();
            let id = parts.next()?.into_string()?;
            let mut fields = parts
                .next()
                .unwrap_or(fred::types::Value::Null)
                .into_array()
                .into_iter();
            let mut envelope = None;
            while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
                if field.as_bytes() == Some(b"envelope".as_slice()) {
                    envelope = value.into_bytes();
                }
            }
            Some((id, envelope))
        })
        .collect()
}

/// Why a connect or a liveness check failed, for the log: READONLY is named (a demoted
/// master), other errors by kind.
fn probe_reason(error: &fred::error::Error) -> &'static str {
    if error.details().starts_with("READONLY") {
        "READONLY (the server is a replica)"
    } else {
        error.kind().to_str()
    }
}

/// `first` and whatever else is already waiting, up to [`MAX_BATCH`]; `true` when the channel
/// closed. A lag (messages fred's buffer overwrote) is counted and logged.
fn take_batch(
    first: Result<fred::types::Message, RecvError>,
    messages: &mut tokio::sync::broadcast::Receiver<fred::types::Message>,
) -> (Vec<fred::types::Message>, bool) {
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(message) = next.take() {
        match message {
            Ok(message) => batch.push(message),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "redis subscriber lagged; messages dropped");
                metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => "redis", "outcome" => "subscriber_lagged")
                    .increment(missed);
            }
            Err(RecvError::Closed) => return (batch, true),
        }
        if batch.len() < MAX_BATCH {
            next = match messages.try_recv() {
                Ok(message) => Some(Ok(message)),
                Err(TryRecvError::Lagged(missed)) => Some(Err(RecvError::Lagged(missed))),
                Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                Err(TryRecvError::Empty) => None,
            };
        }
    }
    (batch, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drops its sender when dropped, so the test sees the task go.
    struct Gone(std::sync::mpsc::Sender<()>);

    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    #[test]
    fn a_call_lost_with_the_link_is_told_from_one_redis_refused() {
        use fred::error::{Error, ErrorKind};
        for lost in [
            RedisError::Disconnected,
            RedisError::Timeout,
            RedisError::from_fred(&Error::new(ErrorKind::IO, "connection reset")),
            RedisError::from_fred(&Error::new(ErrorKind::Canceled, "connection closed")),
        ] {
            assert!(lost.is_link_failure(), "{lost:?}");
        }
        for refused in [
            RedisError::from_fred(&Error::new(ErrorKind::Unknown, "ERR script error")),
            RedisError::from_fred(&Error::new(ErrorKind::InvalidArgument, "bad")),
            RedisError::Malformed("not a list"),
        ] {
            assert!(!refused.is_link_failure(), "{refused:?}");
        }
    }

    #[test]
    fn the_link_thread_runs_what_is_spawned_on_it_and_drops_it_when_dropped() {
        let thread = LinkThread::start().expect("the link thread starts");
        let (ran_on, name) = std::sync::mpsc::channel();
        let (gone_tx, gone) = std::sync::mpsc::channel();
        thread.handle().spawn(async move {
            let _guard = Gone(gone_tx);
            let _ = ran_on.send(std::thread::current().name().map(str::to_string));
            std::future::pending::<()>().await;
        });
        let name = name
            .recv_timeout(Duration::from_secs(5))
            .expect("the task runs");
        assert_eq!(name.as_deref(), Some("redis-link"));
        assert!(
            gone.try_recv().is_err(),
            "the task is still running while the thread is held"
        );
        drop(thread);
        gone.recv_timeout(Duration::from_secs(5))
            .expect("dropping the link thread drops the tasks on it");
    }
}
