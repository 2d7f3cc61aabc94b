//! The Redis link: one subscriber connection (`PSUBSCRIBE prostaff:events:*` for envelopes,
//! `prostaff:inhouse:*` for queue updates, `prostaff:presence:*` for presence diffs,
//! `prostaff:lp:{instance}` for long-poll requests routed to this instance) and one command connection (PUBLISH for the HTTP
//! paths, PING for readiness, the queue scripts), managed by a single loop.
//!
//! The loop owns reconnection: connect both, subscribe, read until either connection ends or
//! stops answering, then back off (capped, jittered) and start again. A half-open connection
//! (packets silently dropped) is caught by an application PING on both connections every
//! [`LIVENESS_INTERVAL`], bounded by [`LIVENESS_TIMEOUT`], plus TCP keepalive. Each successful
//! connect is announced so the reconciler can catch up on anything missed. Redis being down
//! never blocks sockets.
//!
//! Invariant: this is the only place that opens Redis connections.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::Config as FredConfig;
use fred::types::scripts::Script;
use fred::types::Builder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Incoming, Pipeline, Source};

pub const CHANNEL_PATTERN: &str = "prostaff:events:*";
pub const CHANNEL_PREFIX: &str = "prostaff:events:";

/// The pub/sub channel an organisation's envelopes are published on.
pub fn events_channel(org_id: &str) -> String {
    format!("{CHANNEL_PREFIX}{org_id}")
}
/// Queue updates published by `queue.lua` (`prostaff:inhouse:{org}`).
pub const QUEUE_CHANNEL_PATTERN: &str = "prostaff:inhouse:*";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Both connections are PINGed this often; a PING unanswered within [`LIVENESS_TIMEOUT`] ends
/// the connection, so a half-open link is replaced within about 5 s.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
/// Messages handed to the pipeline at once at most (a burst is split into batches this big).
const MAX_BATCH: usize = 256;

/// A pub/sub message as the pipeline's input: queue updates and presence diffs by their
/// channel, envelopes otherwise.
fn incoming(message: fred::types::Message) -> Incoming {
    let raw = message.value.into_bytes().unwrap_or_default();
    if message.channel.starts_with(crate::longpoll::CHANNEL_PREFIX) {
        return Incoming::LongPoll { raw };
    }
    if let Some(topic) = message
        .channel
        .strip_prefix(crate::presence::CHANNEL_PREFIX)
    {
        return Incoming::PresenceDiff {
            topic: topic.to_string(),
            raw,
        };
    }
    match message
        .channel
        .strip_prefix(crate::inhouse::store::QUEUE_CHANNEL_PREFIX)
    {
        Some(org_id) => Incoming::QueueUpdate {
            org_id: org_id.to_string(),
            raw,
        },
        None => Incoming::Envelope {
            raw,
            channel: message.channel.to_string(),
        },
    }
}
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Shared view of the Redis link for readiness and the publish paths.
pub struct RedisLink {
    url: String,
    /// This hub instance's id (12 hex digits, random per process): presence leases and
    /// long-poll session tokens name it.
    instance: String,
    publisher: RwLock<Option<Client>>,
    /// Counts successful connects, the first one included: subscribers catch up after each.
    connects: watch::Sender<u64>,
}

/// A script call that did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("redis is not connected")]
    Disconnected,
    #[error("redis script failed: {0}")]
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("redis is not connected")]
    Disconnected,
    #[error("redis publish failed: {0}")]
    Failed(String),
}

impl RedisLink {
    pub fn new(url: &str) -> Arc<Self> {
        Arc::new(RedisLink {
            url: url.to_string(),
            instance: format!("{:012x}", fastrand::u64(..) >> 16),
            publisher: RwLock::new(None),
            connects: watch::Sender::new(0),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
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
    ) -> Result<Vec<String>, ScriptError> {
        let client = self.commands().ok_or(ScriptError::Disconnected)?;
        match tokio::time::timeout(
            COMMAND_TIMEOUT,
            script.evalsha_with_reload::<Vec<String>, _, _>(&client, keys, args),
        )
        .await
        {
            Ok(Ok(values)) => Ok(values),
            Ok(Err(error)) => Err(ScriptError::Failed(error.kind().to_str().to_string())),
            Err(_) => Err(ScriptError::Failed("timeout".into())),
        }
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
    pub async fn ping(&self, timeout: Duration) -> Result<(), String> {
        let client = self.commands().ok_or("disconnected")?;
        match tokio::time::timeout(timeout, client.ping::<String>(None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("ping failed: {}", error.kind().to_str())),
            Err(_) => Err("timeout".to_string()),
        }
    }

    /// PUBLISHes an envelope on `prostaff:events:{org_id}`.
    pub async fn publish(&self, org_id: &str, envelope: Bytes) -> Result<(), PublishError> {
        self.publish_to(events_channel(org_id), envelope)
            .await
            .map(|_| ())
    }

    /// PUBLISHes `payload` on `channel`; answers how many subscribers received it.
    pub async fn publish_to(&self, channel: String, payload: Bytes) -> Result<i64, PublishError> {
        let client = self.commands().ok_or(PublishError::Disconnected)?;
        match tokio::time::timeout(
            COMMAND_TIMEOUT,
            client.publish::<i64, _, _>(channel, payload),
        )
        .await
        {
            Ok(Ok(receivers)) => Ok(receivers),
            Ok(Err(error)) => Err(PublishError::Failed(error.kind().to_str().to_string())),
            Err(_) => Err(PublishError::Failed("timeout".into())),
        }
    }

    fn set_connected(&self, publisher: Option<Client>) {
        let connected = publisher.is_some();
        *self.publisher.write().expect("publisher lock") = publisher;
        metrics::gauge!(crate::metrics::REDIS_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    }

    fn build_client(config: &FredConfig) -> Result<Client, fred::error::Error> {
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
                // Pub/sub messages wait here between the connection task and our loop.
                p.broadcast_channel_capacity = 16 * 1024;
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
    pub async fn run(self: Arc<Self>, pipeline: Arc<Pipeline>, shutdown: CancellationToken) {
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
            match self
                .session(
                    &config,
                    &pipeline,
                    &shutdown,
                    &mut ever_connected,
                    &mut backoff,
                )
                .await
            {
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

    /// One connection lifetime. `Ok` means shutdown was requested.
    async fn session(
        &self,
        config: &FredConfig,
        pipeline: &Pipeline,
        shutdown: &CancellationToken,
        ever_connected: &mut bool,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let subscriber = Self::build_client(config).map_err(|e| e.details().to_string())?;
        let commands = Self::build_client(config).map_err(|e| e.details().to_string())?;
        let mut messages = subscriber.message_rx();
        let longpoll_channel = format!("{}{}", crate::longpoll::CHANNEL_PREFIX, self.instance);
        let connect = async {
            let sub_task = subscriber.init().await?;
            let cmd_task = commands.init().await?;
            subscriber
                .psubscribe(vec![
                    CHANNEL_PATTERN,
                    QUEUE_CHANNEL_PATTERN,
                    crate::presence::CHANNEL_PATTERN,
                    // A pattern without wildcards: this instance's channel only.
                    longpoll_channel.as_str(),
                ])
                .await?;
            Ok::<_, fred::error::Error>((sub_task, cmd_task))
        };
        let (mut sub_task, mut cmd_task) =
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
                Ok(Ok(tasks)) => tasks,
                Ok(Err(error)) => {
                    let _ = subscriber.quit().await;
                    let _ = commands.quit().await;
                    return Err(format!("connect failed: {}", error.kind().to_str()));
                }
                Err(_) => return Err("connect timed out".into()),
            };
        self.set_connected(Some(commands.clone()));
        *backoff = BACKOFF_MIN;
        if *ever_connected {
            metrics::counter!(crate::metrics::REDIS_RECONNECTS).increment(1);
            tracing::info!(
                patterns = %format!("{CHANNEL_PATTERN} {QUEUE_CHANNEL_PATTERN}"),
                "redis reconnected"
            );
        } else {
            tracing::info!(
                patterns = %format!("{CHANNEL_PATTERN} {QUEUE_CHANNEL_PATTERN}"),
                "redis connected"
            );
        }
        // Subscribed, and what arrives now waits in the message channel: catch every topic up
        // to here first, so the missed broadcasts come before the live ones.
        pipeline.catch_up().await;
        // Every connect, the first included: a hub that booted without Redis reconciles too.
        self.connects.send_modify(|count| *count += 1);
        *ever_connected = true;

        let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        liveness.tick().await;
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = liveness.tick() => {
                    let pings = async {
                        tokio::try_join!(
                            subscriber.ping::<fred::types::Value>(None),
                            commands.ping::<fred::types::Value>(None)
                        )
                    };
                    match tokio::time::timeout(LIVENESS_TIMEOUT, pings).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => break Err(format!("ping failed: {}", error.kind().to_str())),
                        Err(_) => break Err("redis unresponsive (ping timed out)".to_string()),
                    }
                }
                message = messages.recv() => {
                    // Take whatever else is already waiting too: one batch costs one history
                    // call per topic instead of one round trip per message.
                    let mut batch = Vec::new();
                    let mut next = Some(message);
                    let mut closed = false;
                    while let Some(message) = next.take() {
                        match message {
                            Ok(message) => batch.push(incoming(message)),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                                tracing::warn!(missed, "redis subscriber lagged; events dropped");
                                metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => "redis", "outcome" => "subscriber_lagged")
                                    .increment(missed);
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => closed = true,
                        }
                        if batch.len() < MAX_BATCH && !closed {
                            next = match messages.try_recv() {
                                Ok(message) => Some(Ok(message)),
                                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(missed)) => {
                                    Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)))
                                }
                                Err(tokio::sync::broadcast::error::TryRecvError::Closed) => {
                                    Some(Err(tokio::sync::broadcast::error::RecvError::Closed))
                                }
                                Err(tokio::sync::broadcast::error::TryRecvError::Empty) => None,
                            };
                        }
                    }
                    if !batch.is_empty() {
                        pipeline.ingest_batch(batch, Source::Redis).await;
                    }
                    if closed {
                        break Err("subscriber channel closed".to_string());
                    }
                }
                _ = &mut sub_task => break Err("subscriber connection closed".to_string()),
                _ = &mut cmd_task => break Err("command connection closed".to_string()),
            }
        };
        self.set_connected(None);
        let _ = tokio::time::timeout(Duration::from_millis(500), subscriber.quit()).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), commands.quit()).await;
        sub_task.abort();
        cmd_task.abort();
        outcome
    }
}
