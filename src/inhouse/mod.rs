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

use actor::Command;
pub use actor::{EntrySummary, QueueHandle, QueueSpec, QueueStatus, QueueSummary};
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
        self.0
            .get(org_id)
            .map(|h| h.clone())
            .filter(QueueHandle::is_running)
    }

    /// Removes the entry only if it still belongs to `queue_id` (a newer queue may have
    /// replaced it).
    pub fn remove_if_current(&self, org_id: &str, queue_id: &str) {
        self.0
            .remove_if(org_id, |_, handle| &*handle.queue_id == queue_id);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn all(&self) -> Vec<(String, QueueHandle)> {
        self.0
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
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
        Inhouse {
            registry: Registry::default(),
            limiter: SlidingWindow::new(rate_limit_max, rate_limit_window),
            hub,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub async fn snapshot(&self, org_id: &str) -> Option<QueueSummary> {
        self.registry.get(org_id)?.snapshot().await
    }

    pub async fn join(
        &self,
        org_id: &str,
        player_id: String,
        role: String,
    ) -> Result<QueueSummary, QueueError> {
        if !self.limiter.allow(org_id, std::time::Instant::now()) {
            return Err(QueueError::RateLimited);
        }
        self.registry
            .get(org_id)
            .ok_or(QueueError::NoActiveQueue)?
            .join(player_id, role)
            .await
    }

    pub async fn leave(&self, org_id: &str, player_id: String) -> Result<QueueSummary, QueueError> {
        self.registry
            .get(org_id)
            .ok_or(QueueError::NoActiveQueue)?
            .leave(player_id)
            .await
    }

    pub async fn checkin(
        &self,
        org_id: &str,
        player_id: String,
    ) -> Result<QueueSummary, QueueError> {
        self.registry
            .get(org_id)
            .ok_or(QueueError::NoActiveQueue)?
            .checkin(player_id)
            .await
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
            Some(handle) if *handle.queue_id == *queue_id => {
                handle.send(Command::Close { reason }).await
            }
            _ => false,
        }
    }

    /// Applies the `inhouse.*` lifecycle events that keep actors exact.
    pub async fn on_event(&self, envelope: &Envelope) {
        let payload = &envelope.payload;
        let Some(queue_id) = id_field(payload, "queue_id") else {
            return;
        };
        let org_id = envelope.org_id.as_str();
        match envelope.event_type.as_str() {
            "inhouse.session_started" => {
                self.close(org_id, &queue_id, "session_started").await;
            }
            "inhouse.queue_closed" => {
                self.close(org_id, &queue_id, "queue_closed").await;
            }
            "inhouse.queue_opened" => {
                let status = payload
                    .get("status")
                    .and_then(Value::as_str)
                    .and_then(QueueStatus::parse);
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
                    tracing::warn!(
                        org = org_id,
                        queue_id,
                        "inhouse.check_in_started without a valid check_in_deadline"
                    );
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
    payload
        .get("check_in_deadline")
        .and_then(Value::as_str)
        .and_then(parse_deadline)
}

/// Reads `entries: [{player_id, role, checked_in}]` (Rails' shape); malformed entries are skipped.
pub fn entries_field(payload: &Value) -> Vec<EntrySummary> {
    let Some(Value::Array(entries)) = payload.get("entries") else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            Some(EntrySummary {
                player_id: id_field(entry, "player_id")?,
                role: entry
                    .get("role")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                checked_in: entry
                    .get("checked_in")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::hub::Drained;
    use crate::metrics::Metrics;

    struct Fixture {
        inhouse: Inhouse,
        hub: Arc<Hub>,
        outbox: Arc<crate::hub::Outbox>,
    }

    /// An `Inhouse` whose `inhouse:o1` broadcasts are captured by a subscribed outbox.
    fn fixture(rate_limit: u32) -> Fixture {
        let hub = Arc::new(Hub::new(1024, Metrics::detached()));
        let (id, outbox) = hub.register_socket();
        hub.subscribe("inhouse:o1", id, &outbox);
        Fixture {
            inhouse: Inhouse::new(hub.clone(), rate_limit, Duration::from_secs(60)),
            hub,
            outbox,
        }
    }

    impl Fixture {
        fn updates(&self) -> Vec<Value> {
            let mut drained = Drained::default();
            self.outbox.drain(usize::MAX, &mut drained);
            drained
                .frames
                .iter()
                .map(|f| {
                    serde_json::from_str::<Value>(&f.text(crate::phoenix::codec::Vsn::V2)).unwrap()
                        [4]
                    .clone()
                })
                .collect()
        }
    }

    fn spec(status: QueueStatus, deadline_in: Option<i64>, entries: &[(&str, bool)]) -> QueueSpec {
        QueueSpec {
            queue_id: "q1".into(),
            org_id: "o1".into(),
            status,
            check_in_deadline: deadline_in
                .map(|s| OffsetDateTime::now_utc() + time::Duration::seconds(s)),
            entries: entries
                .iter()
                .map(|(id, checked_in)| EntrySummary {
                    player_id: id.to_string(),
                    role: "mid".into(),
                    checked_in: *checked_in,
                })
                .collect(),
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn actions_without_a_queue() {
        let f = fixture(10);
        assert_eq!(
            f.inhouse.join("o1", "p1".into(), "mid".into()).await,
            Err(QueueError::NoActiveQueue)
        );
        assert_eq!(
            f.inhouse.leave("o1", "p1".into()).await,
            Err(QueueError::NoActiveQueue)
        );
        assert_eq!(
            f.inhouse.checkin("o1", "p1".into()).await,
            Err(QueueError::NoActiveQueue)
        );
        assert_eq!(f.inhouse.snapshot("o1").await, None);
    }

    #[tokio::test]
    async fn join_leave_checkin_rules() {
        let f = fixture(10);
        f.inhouse.upsert(spec(QueueStatus::Open, None, &[])).await;
        let summary = f
            .inhouse
            .join("o1", "p1".into(), "jungle".into())
            .await
            .unwrap();
        assert_eq!(summary.player_count, 1);
        assert_eq!(
            summary.entries[0],
            EntrySummary {
                player_id: "p1".into(),
                role: "jungle".into(),
                checked_in: false
            }
        );
        assert_eq!(
            f.inhouse.checkin("o1", "p1".into()).await,
            Err(QueueError::NotInCheckInPhase)
        );
        assert_eq!(
            f.inhouse
                .leave("o1", "p1".into())
                .await
                .unwrap()
                .player_count,
            0
        );
        assert_eq!(
            f.inhouse
                .leave("o1", "absent".into())
                .await
                .unwrap()
                .player_count,
            0,
            "leaving when absent is ok"
        );
        let updates = f.updates();
        let events: Vec<_> = updates
            .iter()
            .map(|u| u["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            events,
            ["queue_opened", "player_joined", "player_left"],
            "no broadcast for a no-op leave"
        );
        let updates = &updates[1..];
        assert_eq!(updates[0]["player_count"], 1);
        assert_eq!(updates[0]["queue_id"], "q1");
        assert_eq!(updates[0]["org_id"], "o1");
        assert_eq!(updates[0]["status"], "open");
        assert_eq!(updates[0]["player_id"], "p1");

        f.inhouse
            .upsert(spec(QueueStatus::CheckIn, Some(600), &[("p1", false)]))
            .await;
        assert_eq!(
            f.inhouse.join("o1", "p2".into(), "top".into()).await,
            Err(QueueError::QueueNotOpen)
        );
        assert_eq!(
            f.inhouse.checkin("o1", "ghost".into()).await,
            Err(QueueError::PlayerNotInQueue)
        );
        let summary = f.inhouse.checkin("o1", "p1".into()).await.unwrap();
        assert!(summary.entries[0].checked_in);
        assert_eq!(summary.status, QueueStatus::CheckIn);
    }

    #[tokio::test]
    async fn join_queue_is_rate_limited_per_org() {
        let f = fixture(3);
        f.inhouse.upsert(spec(QueueStatus::Open, None, &[])).await;
        for i in 0..3 {
            assert!(f
                .inhouse
                .join("o1", format!("p{i}"), "mid".into())
                .await
                .is_ok());
        }
        assert_eq!(
            f.inhouse.join("o1", "p4".into(), "mid".into()).await,
            Err(QueueError::RateLimited)
        );
        // Another org has its own window.
        assert_eq!(
            f.inhouse.join("o2", "p1".into(), "mid".into()).await,
            Err(QueueError::NoActiveQueue)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_with_one_of_two_checked_in_closes_the_queue() {
        let f = fixture(10);
        f.inhouse
            .upsert(spec(
                QueueStatus::CheckIn,
                Some(60),
                &[("p1", true), ("p2", false)],
            ))
            .await;
        settle().await;
        tokio::time::advance(Duration::from_secs(59)).await;
        settle().await;
        assert!(
            f.inhouse.snapshot("o1").await.is_some(),
            "still open before the deadline"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(f.inhouse.snapshot("o1").await, None);
        assert!(
            f.inhouse.registry().is_empty(),
            "the actor left the registry"
        );
        let expired = f
            .updates()
            .into_iter()
            .find(|u| u["event"] == "check_in_expired")
            .expect("check_in_expired broadcast");
        assert_eq!(expired["queue_closed"], true);
        assert_eq!(expired["status"], "closed");
        assert_eq!(expired["removed_count"], 1);
        assert_eq!(expired["checked_in_count"], 1);
        let _ = &f.hub;
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_with_two_of_three_checked_in_keeps_the_queue() {
        let f = fixture(10);
        f.inhouse
            .upsert(spec(
                QueueStatus::CheckIn,
                Some(30),
                &[("p1", true), ("p2", true), ("p3", false)],
            ))
            .await;
        settle().await;
        tokio::time::advance(Duration::from_secs(31)).await;
        settle().await;
        let summary = f.inhouse.snapshot("o1").await.expect("queue stays");
        assert_eq!(summary.player_count, 2);
        assert!(summary.entries.iter().all(|e| e.checked_in));
        let expired = f
            .updates()
            .into_iter()
            .find(|u| u["event"] == "check_in_expired")
            .unwrap();
        assert_eq!(
            (
                expired["queue_closed"].as_bool(),
                expired["removed_count"].as_u64()
            ),
            (Some(false), Some(1))
        );
        // The timer does not fire again.
        tokio::time::advance(Duration::from_secs(120)).await;
        settle().await;
        assert!(f.updates().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_past_fires_at_once() {
        let f = fixture(10);
        f.inhouse
            .upsert(spec(QueueStatus::CheckIn, Some(-5), &[("p1", false)]))
            .await;
        settle().await;
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(f.inhouse.registry().is_empty());
    }

    #[tokio::test]
    async fn reconcile_merge_keeps_socket_joins_and_takes_rails_status() {
        let f = fixture(10);
        f.inhouse
            .upsert(spec(QueueStatus::Open, None, &[("rails-1", false)]))
            .await;
        f.inhouse
            .join("o1", "socket-1".into(), "adc".into())
            .await
            .unwrap();
        f.inhouse
            .upsert(spec(
                QueueStatus::CheckIn,
                Some(600),
                &[("rails-1", true), ("rails-2", false)],
            ))
            .await;
        let summary = f.inhouse.snapshot("o1").await.unwrap();
        let ids: Vec<_> = summary
            .entries
            .iter()
            .map(|e| e.player_id.as_str())
            .collect();
        assert_eq!(ids, ["rails-1", "rails-2", "socket-1"]);
        assert_eq!(summary.status, QueueStatus::CheckIn);
        assert!(summary.check_in_deadline.is_some());
        assert!(summary.entries[0].checked_in);
    }

    #[tokio::test]
    async fn lifecycle_events_open_start_and_close_queues() {
        let f = fixture(10);
        let event = |event_type: &str, payload: Value| {
            let raw = serde_json::json!({"type": event_type, "org_id": "o1", "user_id": "u", "payload": payload}).to_string();
            crate::envelope::decode(raw.into()).unwrap()
        };
        f.inhouse
            .on_event(&event(
                "inhouse.queue_opened",
                serde_json::json!({"queue_id": "q9"}),
            ))
            .await;
        assert_eq!(
            f.inhouse.snapshot("o1").await.unwrap().status,
            QueueStatus::Open
        );
        let deadline = (OffsetDateTime::now_utc() + time::Duration::minutes(5))
            .format(&Rfc3339)
            .unwrap();
        f.inhouse
            .on_event(&event(
                "inhouse.check_in_started",
                serde_json::json!({"queue_id": "q9", "check_in_deadline": deadline}),
            ))
            .await;
        assert_eq!(
            f.inhouse.snapshot("o1").await.unwrap().status,
            QueueStatus::CheckIn
        );
        // A session for another queue id leaves this one alone.
        f.inhouse
            .on_event(&event(
                "inhouse.session_started",
                serde_json::json!({"queue_id": "other"}),
            ))
            .await;
        assert!(f.inhouse.snapshot("o1").await.is_some());
        f.inhouse
            .on_event(&event(
                "inhouse.session_started",
                serde_json::json!({"queue_id": "q9"}),
            ))
            .await;
        settle().await;
        assert_eq!(f.inhouse.snapshot("o1").await, None);
        let closed = f
            .updates()
            .into_iter()
            .find(|u| u["event"] == "queue_closed")
            .unwrap();
        assert_eq!(closed["reason"], "session_started");
    }
}
