//! The deadline watcher: every instance polls the deadline index in Redis and runs what is due.
//!
//! Redis's clock decides what is due (the index query and the `expire` op both read `TIME`), and
//! the fence in each index entry makes the expiry run once however many instances race for it,
//! including when the instance that started the check-in is gone.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store::Expiry;
use super::Inhouse;
use crate::logsafe::LogSafe;

/// How often each instance looks for due deadlines: the most a deadline can fire late (plus one
/// script call).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Deadlines handled per poll (more wait for the next poll).
const BATCH: usize = 64;

pub async fn run(inhouse: Arc<Inhouse>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok((_, due)) = inhouse.store().indexed_deadlines(false, BATCH).await else {
            continue; // Redis down: the deadlines wait in Redis for whoever comes back first.
        };
        for deadline in due {
            let outcome = match inhouse.store().expire(&deadline).await {
                Ok(Expiry::Fired { closed: true }) => "closed",
                Ok(Expiry::Fired { closed: false }) => "kept",
                Ok(Expiry::Early) => "early",
                Ok(Expiry::Stale) => "stale",
                Err(_) => "unavailable",
            };
            metrics::counter!(crate::metrics::INHOUSE_EXPIRIES, "outcome" => outcome).increment(1);
            if matches!(outcome, "closed" | "kept") {
                tracing::info!(org = %LogSafe(&deadline.org_id), fence = %deadline.fence, outcome, "check-in deadline fired");
            }
        }
    }
}
