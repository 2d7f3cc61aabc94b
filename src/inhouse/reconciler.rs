//! The reconciler: rebuilds queue actors from Rails at startup (with retries), after every Redis
//! reconnect (events may have been missed) and every `RECONCILE_INTERVAL_MS`.
//!
//! Merge rules: unknown queues get an actor; known ones take Rails' status and deadline and gain
//! missing entries (socket-made joins are kept); actors for queues Rails no longer lists are
//! closed, unless they started after the fetch began (they may be newer than Rails' answer).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Inhouse;
use crate::rails::{RailsClient, RailsError};

pub struct Reconciler {
    pub inhouse: Arc<Inhouse>,
    pub rails: RailsClient,
    pub retry_delays: Vec<Duration>,
    pub interval: Option<Duration>,
    /// Notified by the Redis subscriber after each reconnect.
    pub redis_reconnected: Arc<Notify>,
}

impl Reconciler {
    /// Fetches the active queues once and merges them into the registry.
    pub async fn reconcile_once(&self) -> Result<usize, RailsError> {
        let fetch_started = Instant::now();
        let queues = match self.rails.active_queues().await {
            Ok(queues) => queues,
            Err(error) => {
                metrics::counter!(crate::metrics::RECONCILES, "outcome" => "error").increment(1);
                return Err(error);
            }
        };
        let count = queues.len();
        let listed: std::collections::HashSet<(String, String)> = queues
            .iter()
            .map(|q| (q.org_id.clone(), q.queue_id.clone()))
            .collect();
        for spec in queues {
            self.inhouse.upsert(spec).await;
        }
        for (org_id, handle) in self.inhouse.registry().all() {
            if handle.started_at < fetch_started
                && !listed.contains(&(org_id.clone(), handle.queue_id.to_string()))
            {
                self.inhouse
                    .close(&org_id, &handle.queue_id, "not_active_in_rails")
                    .await;
            }
        }
        metrics::counter!(crate::metrics::RECONCILES, "outcome" => "ok").increment(1);
        tracing::info!(queues = count, "reconciled in-house queues from Rails");
        Ok(count)
    }

    /// Startup reconcile with retries, then periodic and reconnect-triggered runs.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delays = self.retry_delays.iter();
        loop {
            match self.reconcile_once().await {
                Ok(_) => break,
                Err(error) => match delays.next() {
                    Some(delay) => {
                        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "startup reconcile failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(*delay) => {}
                        }
                    }
                    None => {
                        tracing::warn!(%error, "startup reconcile failed; running without queue state");
                        break;
                    }
                },
            }
        }
        let period = self
            .interval
            .unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick(), if self.interval.is_some() => {}
                _ = self.redis_reconnected.notified() => {
                    tracing::info!("redis reconnected; reconciling queues");
                }
            }
            if let Err(error) = self.reconcile_once().await {
                tracing::warn!(%error, "reconcile failed");
            }
        }
    }
}
