//! The reconciler: merges Rails' active queues into the queue state in Redis at startup (with
//! retries), after every Redis (re)connect, including the first one after a boot without Redis,
//! and every `RECONCILE_INTERVAL_MS`.
//!
//! One instance at a time (a short advisory lock in Redis; the scripts keep state safe even if
//! two ran). Merge rules live in `queue.lua` (`reconcile`, `absent`): Rails lists only `check_in`
//! queues whose deadline is ahead, so absence closes a queue only when the hub holds it in
//! `check_in` with its deadline ahead and that check-in began before the fetch started.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::Change;
use super::Inhouse;
use crate::rails::{RailsClient, RailsError};
use crate::redis::RedisError;

/// How long one reconcile may hold the lock (the Rails fetch alone is bounded at 5 s).
const LOCK_TTL: Duration = Duration::from_secs(15);
/// Queues in check-in looked at for absence per reconcile.
const ABSENCE_SCAN_LIMIT: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("rails: {0}")]
    Rails(#[from] RailsError),
    #[error("queue state: {0}")]
    Store(#[from] RedisError),
}

/// What one reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// Rails listed this many queues; they were merged.
    Merged(usize),
    /// Another instance holds the reconcile lock.
    Skipped,
}

#[derive(Clone)]
pub struct Reconciler {
    pub inhouse: Arc<Inhouse>,
    pub rails: RailsClient,
    pub retry_delays: Vec<Duration>,
    pub interval: Option<Duration>,
    /// Changes after each successful Redis connect.
    pub redis_connected: tokio::sync::watch::Receiver<u64>,
}

impl Reconciler {
    pub async fn reconcile_once(&self) -> Result<Reconciled, ReconcileError> {
        let result = self.locked_reconcile().await;
        let outcome = match &result {
            Ok(Reconciled::Merged(_)) => "ok",
            Ok(Reconciled::Skipped) => "skipped_locked",
            Err(ReconcileError::Rails(_)) => "rails_error",
            Err(ReconcileError::Store(_)) => "redis_error",
        };
        metrics::counter!(crate::metrics::RECONCILES, "outcome" => outcome).increment(1);
        result
    }

    async fn locked_reconcile(&self) -> Result<Reconciled, ReconcileError> {
        let store = self.inhouse.store();
        let token = uuid::Uuid::new_v4().to_string();
        let Some(fetch_started_ms) = store.lock_reconcile(&token, LOCK_TTL).await? else {
            return Ok(Reconciled::Skipped);
        };
        let result = self.merge(fetch_started_ms).await;
        store.unlock_reconcile(&token).await;
        result
    }

    async fn merge(&self, fetch_started_ms: u64) -> Result<Reconciled, ReconcileError> {
        let store = self.inhouse.store();
        let queues = self.rails.active_queues().await?;
        let count = queues.len();
        let listed: HashSet<&str> = queues.iter().map(|q| q.org_id.as_str()).collect();
        for spec in &queues {
            let change = store.reconcile(spec).await?;
            metrics::counter!(crate::metrics::RECONCILE_MERGES, "outcome" => change_label(&change))
                .increment(1);
        }
        let (_, in_check_in) = store.indexed_deadlines(true, ABSENCE_SCAN_LIMIT).await?;
        for deadline in in_check_in
            .iter()
            .filter(|d| !listed.contains(d.org_id.as_str()))
        {
            let change = store.close_if_absent(deadline, fetch_started_ms).await?;
            if matches!(change, Change::Changed(_)) {
                metrics::counter!(crate::metrics::RECONCILE_MERGES, "outcome" => "closed_absent")
                    .increment(1);
            }
        }
        tracing::info!(queues = count, "reconciled in-house queues from Rails");
        Ok(Reconciled::Merged(count))
    }

    /// Startup reconcile with retries, then periodic and connect-triggered runs.
    pub async fn run(mut self, shutdown: CancellationToken) {
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
                        tracing::warn!(%error, "startup reconcile failed; queues as Redis holds them until the next reconcile");
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
                changed = self.redis_connected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tracing::info!("redis connected; reconciling queues");
                }
            }
            if let Err(error) = self.reconcile_once().await {
                tracing::warn!(%error, "reconcile failed");
            }
        }
    }
}

fn change_label(change: &Change) -> &'static str {
    match change {
        Change::Changed(_) => "changed",
        Change::Unchanged => "unchanged",
        Change::Ignored => "ignored_closed",
    }
}
