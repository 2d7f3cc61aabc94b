//! In-house game queues: one actor per active queue ([`actor`]), the registry keyed by
//! organisation, the `join_queue` rate limiter ([`rate_limit`]), lifecycle events from the
//! platform, and the reconciler that rebuilds actors from Rails ([`reconciler`]).

pub mod actor;
pub mod rate_limit;
pub mod reconciler;

use std::sync::Arc;

use dashmap::DashMap;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use actor::{EntrySummary, QueueHandle, QueueSpec, QueueStatus, QueueSummary};
use actor::Command;
use rate_limit::SlidingWindow;

use crate::envelope::Envelope;
use crate::hub::Hub;

/// Error reasons of the queue actions; `reason()` is what the client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("no active queue")]
    NoActiveQueue,
    #[error("queue is not open")]
    QueueNotOpen,
    #[error("rate limited")]
    RateLimited,
    #[error("invalid params")]
    InvalidParams,
    #[error("not in check-in phase")]
    NotInCheckInPhase,
    #[error("player not in queue")]
    PlayerNotInQueue,
    #[error("unauthorized")]
    Unauthorized,
}

impl QueueError {
    pub fn reason(self) -> &'static str {
        match self {
            QueueError::NoActiveQueue => "no_active_queue",
            QueueError::QueueNotOpen => "queue_not_open",
            QueueError::RateLimited => "rate_limited",
            QueueError::InvalidParams => "invalid_params",
            QueueError::NotInCheckInPhase => "not_in_check_in_phase",
            QueueError::PlayerNotInQueue => "player_not_in_queue",
            QueueError::Unauthorized => "unauthorized",
        }
    }
}

/// Running queue actors by organisation (one active queue per org).
#[derive(Clone, Default)]
pub struct Registry(Arc<DashMap<String, QueueHandle>>);

impl Registry {
    pub fn get(&self, org_id: &str) -> Option<QueueHandle> {
        self.0.get(org_id).map(|h| h.clone()).filter(QueueHandle::is_running)
    }

    /// Removes the entry only if it still belongs to `queue_id` (a newer queue may have
    /// replaced it).
    pub fn remove_if_current(&self, org_id: &str, queue_id: &str) {
        self.0.remove_if(org_id, |_, handle| &*handle.queue_id == queue_id);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn all(&self) -> Vec<(String, QueueHandle)> {
        self.0.iter().map(|e| (e.key().clone(), e.value().clone())).collect()
    }
}

/// The in-house service: queue actions, snapshots, lifecycle events and reconcile merges.
pub struct Inhouse {
    registry: Registry,
    limiter: SlidingWindow,
    hub: Arc<Hub>,
}

impl Inhouse {
    pub fn new(hub: Arc<Hub>, rate_limit_max: u32, rate_limit_window: std::time::Duration) -> Self {
        Inhouse { registry: Registry::default(), limiter: SlidingWindow::new(rate_limit_max, rate_limit_window), hub }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub async fn snapshot(&self, org_id: &str) -> Option<QueueSummary> {
        self.registry.get(org_id)?.snapshot().await
    }

    pub async fn join(&self, org_id: &str, player_id: String, role: String) -> Result<QueueSummary, QueueError> {
        if !self.limiter.allow(org_id, std::time::Instant::now()) {
            return Err(QueueError::RateLimited);
        }
        self.registry.get(org_id).ok_or(QueueError::NoActiveQueue)?.join(player_id, role).await
    }

    pub async fn leave(&self, org_id: &str, player_id: String) -> Result<QueueSummary, QueueError> {
        self.registry.get(org_id).ok_or(QueueError::NoActiveQueue)?.leave(player_id).await
    }

    pub async fn checkin(&self, org_id: &str, player_id: String) -> Result<QueueSummary, QueueError> {
        self.registry.get(org_id).ok_or(QueueError::NoActiveQueue)?.checkin(player_id).await
    }

    /// Starts an actor for `spec`, replacing any other queue of the same org; an actor for the
    /// same queue takes the spec as a merge instead.
    pub async fn upsert(&self, spec: QueueSpec) {
        if let Some(existing) = self.registry.get(&spec.org_id) {
            if *existing.queue_id == spec.queue_id {
                existing.send(Command::Sync { spec }).await;
                return;
            }
            existing.send(Command::Close { reason: "replaced" }).await;
        }
        if spec.status == QueueStatus::Closed {
            return;
        }
        let org_id = spec.org_id.clone();
        let handle = actor::spawn(spec, self.hub.clone(), self.registry.clone());
        self.registry.0.insert(org_id, handle);
    }

    /// Closes the actor of `queue_id` in `org_id`, if it runs.
    pub async fn close(&self, org_id: &str, queue_id: &str, reason: &'static str) -> bool {
        match self.registry.get(org_id) {
            Some(handle) if *handle.queue_id == *queue_id => handle.send(Command::Close { reason }).await,
            _ => false,
        }
    }

    /// Applies the `inhouse.*` lifecycle events that keep actors exact.
    pub async fn on_event(&self, envelope: &Envelope) {
        let payload = &envelope.payload;
        let Some(queue_id) = id_field(payload, "queue_id") else { return };
        let org_id = envelope.org_id.as_str();
        match envelope.event_type.as_str() {
            "inhouse.session_started" => {
                self.close(org_id, &queue_id, "session_started").await;
            }
            "inhouse.queue_closed" => {
                self.close(org_id, &queue_id, "queue_closed").await;
            }
            "inhouse.queue_opened" => {
                let status = payload.get("status").and_then(Value::as_str).and_then(QueueStatus::parse);
                self.upsert(QueueSpec {
                    queue_id,
                    org_id: org_id.to_string(),
                    status: status.unwrap_or(QueueStatus::Open),
                    check_in_deadline: deadline_field(payload),
                    entries: entries_field(payload),
                })
                .await;
            }
            "inhouse.check_in_started" => {
                let Some(deadline) = deadline_field(payload) else {
                    tracing::warn!(org = org_id, queue_id, "inhouse.check_in_started without a valid check_in_deadline");
                    return;
                };
                match self.registry.get(org_id) {
                    Some(handle) if *handle.queue_id == *queue_id => {
                        handle.send(Command::StartCheckIn { deadline }).await;
                    }
                    _ => {
                        self.upsert(QueueSpec {
                            queue_id,
                            org_id: org_id.to_string(),
                            status: QueueStatus::CheckIn,
                            check_in_deadline: Some(deadline),
                            entries: entries_field(payload),
                        })
                        .await;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Reads an id that may be a string or a number.
pub fn id_field(value: &Value, name: &str) -> Option<String> {
    match value.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn parse_deadline(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

fn deadline_field(payload: &Value) -> Option<OffsetDateTime> {
    payload.get("check_in_deadline").and_then(Value::as_str).and_then(parse_deadline)
}

fn entries_field(payload: &Value) -> Vec<EntrySummary> {
    let Some(Value::Array(entries)) = payload.get("entries") else { return Vec::new() };
    entries
        .iter()
        .filter_map(|entry| {
            Some(EntrySummary {
                player_id: id_field(entry, "player_id")?,
                role: entry.get("role").and_then(Value::as_str).unwrap_or("").to_string(),
                checked_in: entry.get("checked_in").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect()
}
