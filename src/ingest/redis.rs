//! The Redis link: one subscriber connection (`PSUBSCRIBE prostaff:events:*`) and one command
//! connection (PUBLISH for the HTTP paths, PING for readiness), managed by a single loop.
//!
//! The loop owns reconnection: connect both, subscribe, read until either connection ends, then
//! back off (capped, jittered) and start again. Each successful reconnect is announced so the
//! reconciler can catch up on anything missed. Redis being down never blocks sockets.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::Config as FredConfig;
use fred::types::Builder;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Pipeline, Source};

pub const CHANNEL_PATTERN: &str = "prostaff:events:*";
pub const CHANNEL_PREFIX: &str = "prostaff:events:";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Shared view of the Redis link for readiness and the publish paths.
pub struct RedisLink {
    url: String,
    publisher: RwLock<Option<Client>>,
    /// Notified (one permit) after each successful reconnect.
    pub reconnected: Arc<Notify>,
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
            publisher: RwLock::new(None),
            reconnected: Arc::new(Notify::new()),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.publisher().is_some()
    }

    /// The command connection, present only while Redis is connected.
    fn publisher(&self) -> Option<Client> {
        self.publisher.read().expect("publisher lock").clone()
    }

    /// PINGs Redis through the command connection.
    pub async fn ping(&self, timeout: Duration) -> Result<(), String> {
        let client = self.publisher().ok_or("disconnected")?;
        match tokio::time::timeout(timeout, client.ping::<String>(None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("ping failed: {}", error.kind().to_str())),
            Err(_) => Err("timeout".to_string()),
        }
    }

    /// PUBLISHes an envelope on `prostaff:events:{org_id}`.
    pub async fn publish(&self, org_id: &str, envelope: Bytes) -> Result<(), PublishError> {
        let client = self.publisher().ok_or(PublishError::Disconnected)?;
        let channel = format!("{CHANNEL_PREFIX}{org_id}");
        match tokio::time::timeout(
            COMMAND_TIMEOUT,
            client.publish::<i64, _, _>(channel, envelope),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
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
            })
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
                // Pub/sub messages wait here between the connection task and our loop.
                p.broadcast_channel_capacity = 16 * 1024;
            })
            .build()
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
        let connect = async {
            let sub_task = subscriber.init().await?;
            let cmd_task = commands.init().await?;
            subscriber.psubscribe(CHANNEL_PATTERN).await?;
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
            self.reconnected.notify_one();
            tracing::info!("redis reconnected; subscribed to {CHANNEL_PATTERN}");
        } else {
            tracing::info!("redis connected; subscribed to {CHANNEL_PATTERN}");
        }
        *ever_connected = true;

        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                message = messages.recv() => match message {
                    Ok(message) => {
                        let raw = message.value.into_bytes().unwrap_or_default();
                        pipeline.ingest(raw, Source::Redis, &message.channel).await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "redis subscriber lagged; events dropped");
                        metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => "redis", "outcome" => "subscriber_lagged")
                            .increment(missed);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break Err("subscriber channel closed".to_string()),
                },
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
