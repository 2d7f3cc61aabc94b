//! In-house game queues. Their state lives in Redis ([`store`]), changed only by one script per
//! transition, so every hub instance sees one queue and a restart loses nothing. This module is
//! the facade the channels use ([`Inhouse`]), the lifecycle events from the platform, the
//! deadline watcher ([`deadlines`]) and the reconciler that merges Rails' view ([`reconciler`]).
//!
//! Invariant: no queue state is kept in process memory; an instance that dies loses nothing and
//! any instance can serve any socket.

pub mod deadlines;
pub mod reconciler;
pub mod store;

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::envelope::Envelope;
use crate::id::Id;
use crate::logsafe::LogSafe;
pub use store::QueueStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueStatus {
    Open,
    CheckIn,
    Closed,
}

impl QueueStatus {
    pub fn parse(text: &str) -> Option<QueueStatus> {
        match text {
            "open" | "waiting" => Some(QueueStatus::Open),
            "check_in" | "checkin" | "check-in" => Some(QueueStatus::CheckIn),
            "closed" | "cancelled" | "started" => Some(QueueStatus::Closed),
            _ => None,
        }
    }
}

/// One entry as Rails and lifecycle events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySummary {
    pub player_id: String,
    pub role: String,
    pub checked_in: bool,
}

/// A queue as Rails or a lifecycle event describes it.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub queue_id: String,
    pub org_id: String,
    pub status: QueueStatus,
    pub check_in_deadline: Option<OffsetDateTime>,
    pub entries: Vec<EntrySummary>,
}

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
    /// Redis (the queue state) is unreachable; nothing was changed.
    #[error("queue state unavailable")]
    Unavailable,
}

const ALL_ERRORS: [QueueError; 8] = [
    QueueError::NoActiveQueue,
    QueueError::QueueNotOpen,
    QueueError::RateLimited,
    QueueError::InvalidParams,
    QueueError::NotInCheckInPhase,
    QueueError::PlayerNotInQueue,
    QueueError::Unauthorized,
    QueueError::Unavailable,
];

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
            QueueError::Unavailable => "unavailable",
        }
    }

    /// The error whose `reason()` is `reason` (how `queue.lua` reports refusals).
    pub fn from_reason(reason: &str) -> Option<QueueError> {
        ALL_ERRORS.into_iter().find(|e| e.reason() == reason)
    }
}

/// What a joiner of `inhouse:{org}` learns about the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Snapshot {
    Known(Option<Value>),
    /// Redis is unreachable: the state cannot be read right now.
    Unavailable,
}

/// The in-house service the channels and the pipeline use.
pub struct Inhouse {
    store: QueueStore,
}

impl Inhouse {
    pub fn new(store: QueueStore) -> Self {
        Inhouse { store }
    }

    pub fn store(&self) -> &QueueStore {
        &self.store
    }

    pub async fn snapshot(&self, org_id: &str) -> Snapshot {
        match self.store.snapshot(org_id).await {
            Ok(summary) => Snapshot::Known(summary),
            Err(_) => Snapshot::Unavailable,
        }
    }

    pub async fn join(
        &self,
        org_id: &str,
        player_id: &str,
        role: &str,
    ) -> Result<Value, QueueError> {
        self.store.join(org_id, player_id, role).await
    }

    pub async fn leave(&self, org_id: &str, player_id: &str) -> Result<Value, QueueError> {
        self.store.leave(org_id, player_id).await
    }

    pub async fn checkin(&self, org_id: &str, player_id: &str) -> Result<Value, QueueError> {
        self.store.checkin(org_id, player_id).await
    }

    /// Applies the `inhouse.*` lifecycle events that keep queues exact. Every instance receives
    /// each event; the script ops are idempotent, so the first one changes state and the others
    /// find nothing to do.
    pub async fn on_event(&self, envelope: &Envelope) {
        let payload = envelope.payload();
        let Some(queue_id) = id_field(payload, "queue_id") else {
            return;
        };
        let org_id = envelope.org_id.as_str();
        let result = match envelope.event_type.as_str() {
            "inhouse.session_started" => {
                self.store.close(org_id, &queue_id, "session_started").await
            }
            "inhouse.queue_closed" => self.store.close(org_id, &queue_id, "queue_closed").await,
            "inhouse.queue_opened" => {
                let entries = entries_field(payload);
                match deadline_field(payload) {
                    Some(deadline)
                        if payload.get("status").and_then(Value::as_str) == Some("check_in") =>
                    {
                        self.store
                            .start_check_in(org_id, &queue_id, deadline, &entries)
                            .await
                    }
                    _ => self.store.open(org_id, &queue_id, &entries).await,
                }
            }
            "inhouse.check_in_started" => {
                let Some(deadline) = deadline_field(payload) else {
                    tracing::warn!(
                        org = %LogSafe(org_id),
                        queue_id = %LogSafe(&queue_id),
                        "inhouse.check_in_started without a valid check_in_deadline"
                    );
                    return;
                };
                self.store
                    .start_check_in(org_id, &queue_id, deadline, &entries_field(payload))
                    .await
            }
            _ => return,
        };
        let outcome = match &result {
            Ok(store::Change::Changed(_)) => "changed",
            Ok(store::Change::Unchanged) => "unchanged",
            Ok(store::Change::Ignored) => "ignored_closed",
            Err(_) => "unavailable",
        };
        metrics::counter!(crate::metrics::INHOUSE_LIFECYCLE, "outcome" => outcome).increment(1);
        tracing::debug!(event_type = %LogSafe(&envelope.event_type), org = %LogSafe(org_id), queue_id = %LogSafe(&queue_id), outcome, "queue lifecycle event");
    }
}

/// Reads an id ([`Id`]'s rule) as a string.
pub fn id_field(value: &Value, name: &str) -> Option<String> {
    Id::field(value, name).map(Id::into_string)
}

pub fn parse_deadline(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

fn deadline_field(payload: &Value) -> Option<OffsetDateTime> {
    payload
        .get("check_in_deadline")
        .and_then(Value::as_str)
        .and_then(parse_deadline)
}

/// Reads `entries` in Rails' list shape `[{player_id, role, checked_in}]` or the wire's object
/// shape `{player_id: {role, checked_in}}`; malformed entries are skipped.
pub fn entries_field(payload: &Value) -> Vec<EntrySummary> {
    let entry = |player_id: Option<String>, body: &Value| {
        Some(EntrySummary {
            player_id: player_id?,
            role: body
                .get("role")
                .and_then(Value::as_str)
                .filter(|r| r.len() <= crate::limits::MAX_ROLE_BYTES)
                .unwrap_or("")
                .to_string(),
            checked_in: body
                .get("checked_in")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    };
    match payload.get("entries") {
        Some(Value::Array(entries)) => entries
            .iter()
            .filter_map(|e| entry(id_field(e, "player_id"), e))
            .collect(),
        Some(Value::Object(entries)) => entries
            .iter()
            .filter_map(|(id, e)| entry(Id::parse(id).map(Id::into_string), e))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_reason_maps_back_to_its_error() {
        for error in ALL_ERRORS {
            assert_eq!(QueueError::from_reason(error.reason()), Some(error));
        }
        assert_eq!(QueueError::from_reason("nope"), None);
    }

    #[test]
    fn entries_in_both_shapes() {
        let list = entries_field(&json!({"entries": [
            {"player_id": 7, "role": "mid", "checked_in": true},
            {"role": "no id"},
        ]}));
        assert_eq!(
            list,
            vec![EntrySummary {
                player_id: "7".into(),
                role: "mid".into(),
                checked_in: true
            }]
        );
        let object =
            entries_field(&json!({"entries": {"p1": {"role": "top", "checked_in": false}}}));
        assert_eq!(object[0].player_id, "p1");
        assert_eq!(object[0].role, "top");
        assert!(entries_field(&json!({})).is_empty());
    }
}
