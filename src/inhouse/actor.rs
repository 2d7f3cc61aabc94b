//! One queue actor: a task that owns a queue's state, serialises every change, fires the
//! check-in deadline from its own `select!`, and broadcasts `queue_update` after each change.
//!
//! The [`QueueHandle`] is a cheap clone holding only the command sender; every request carries a
//! `oneshot` for its answer. The task ends when the queue closes (deadline with fewer than two
//! check-ins, a close event, or reconcile) and then removes itself from the registry.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{QueueError, Registry};
use crate::hub::Hub;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntrySummary {
    pub player_id: String,
    pub role: String,
    pub checked_in: bool,
}

/// The queue summary carried by replies, join snapshots and `queue_update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueSummary {
    pub queue_id: String,
    pub org_id: String,
    pub status: QueueStatus,
    pub check_in_deadline: Option<String>,
    pub player_count: usize,
    pub entries: Vec<EntrySummary>,
}

#[derive(Debug, Clone)]
struct Entry {
    role: String,
    checked_in: bool,
}

/// The initial or reconciled state of a queue.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub queue_id: String,
    pub org_id: String,
    pub status: QueueStatus,
    pub check_in_deadline: Option<OffsetDateTime>,
    pub entries: Vec<EntrySummary>,
}

pub(crate) enum Command {
    Join {
        player_id: String,
        role: String,
        reply: oneshot::Sender<Result<QueueSummary, QueueError>>,
    },
    Leave {
        player_id: String,
        reply: oneshot::Sender<Result<QueueSummary, QueueError>>,
    },
    Checkin {
        player_id: String,
        reply: oneshot::Sender<Result<QueueSummary, QueueError>>,
    },
    Snapshot {
        reply: oneshot::Sender<QueueSummary>,
    },
    /// Take Rails' status and deadline; add missing entries, never drop socket-made ones.
    Sync {
        spec: QueueSpec,
    },
    StartCheckIn {
        deadline: OffsetDateTime,
    },
    Close {
        reason: &'static str,
    },
}

/// A cloneable handle to a running queue actor.
#[derive(Clone, Debug)]
pub struct QueueHandle {
    pub queue_id: Arc<str>,
    /// When the actor was started; reconcile only closes actors older than its fetch.
    pub started_at: Instant,
    tx: mpsc::Sender<Command>,
}

impl QueueHandle {
    async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        answer.await.ok()
    }

    pub async fn join(&self, player_id: String, role: String) -> Result<QueueSummary, QueueError> {
        self.request(|reply| Command::Join {
            player_id,
            role,
            reply,
        })
        .await
        .unwrap_or(Err(QueueError::NoActiveQueue))
    }

    pub async fn leave(&self, player_id: String) -> Result<QueueSummary, QueueError> {
        self.request(|reply| Command::Leave { player_id, reply })
            .await
            .unwrap_or(Err(QueueError::NoActiveQueue))
    }

    pub async fn checkin(&self, player_id: String) -> Result<QueueSummary, QueueError> {
        self.request(|reply| Command::Checkin { player_id, reply })
            .await
            .unwrap_or(Err(QueueError::NoActiveQueue))
    }

    pub async fn snapshot(&self) -> Option<QueueSummary> {
        self.request(|reply| Command::Snapshot { reply }).await
    }

    pub(crate) async fn send(&self, command: Command) -> bool {
        self.tx.send(command).await.is_ok()
    }

    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }
}

struct QueueActor {
    queue_id: String,
    org_id: String,
    status: QueueStatus,
    deadline: Option<OffsetDateTime>,
    /// The deadline as a timer instant; `None` once it has fired or when there is none.
    deadline_at: Option<Instant>,
    entries: BTreeMap<String, Entry>,
    hub: Arc<Hub>,
    registry: Registry,
    topic: String,
}

/// Starts an actor for `spec` and returns its handle. The caller registers it.
pub fn spawn(spec: QueueSpec, hub: Arc<Hub>, registry: Registry) -> QueueHandle {
    let (tx, rx) = mpsc::channel(64);
    let handle = QueueHandle {
        queue_id: spec.queue_id.clone().into(),
        started_at: Instant::now(),
        tx,
    };
    let mut actor = QueueActor {
        topic: format!("inhouse:{}", spec.org_id),
        queue_id: spec.queue_id,
        org_id: spec.org_id,
        status: QueueStatus::Open,
        deadline: None,
        deadline_at: None,
        entries: BTreeMap::new(),
        hub,
        registry,
    };
    actor.apply_spec(spec.status, spec.check_in_deadline, spec.entries);
    tokio::spawn(actor.run(rx));
    handle
}

/// Converts a wall-clock deadline into a timer instant (a past deadline fires at once).
fn instant_for(deadline: OffsetDateTime) -> Instant {
    let remaining = deadline - OffsetDateTime::now_utc();
    if remaining.is_positive() {
        Instant::now() + remaining.unsigned_abs()
    } else {
        Instant::now()
    }
}

impl QueueActor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        metrics::gauge!(crate::metrics::INHOUSE_QUEUES_ACTIVE).increment(1.0);
        tracing::info!(queue_id = %self.queue_id, org = %self.org_id, status = ?self.status, "queue actor started");
        self.broadcast("queue_opened", json!({}));
        loop {
            let deadline = self.deadline_at;
            tokio::select! {
                command = rx.recv() => {
                    let Some(command) = command else { break };
                    if self.handle(command) {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if self.on_deadline() {
                        break;
                    }
                }
            }
        }
        self.status = QueueStatus::Closed;
        self.registry
            .remove_if_current(&self.org_id, &self.queue_id);
        metrics::gauge!(crate::metrics::INHOUSE_QUEUES_ACTIVE).decrement(1.0);
        tracing::info!(queue_id = %self.queue_id, org = %self.org_id, "queue actor stopped");
    }

    /// Returns true when the actor must stop.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Join {
                player_id,
                role,
                reply,
            } => {
                let result = if self.status != QueueStatus::Open {
                    Err(QueueError::QueueNotOpen)
                } else {
                    self.entries.insert(
                        player_id.clone(),
                        Entry {
                            role,
                            checked_in: false,
                        },
                    );
                    self.broadcast("player_joined", json!({ "player_id": player_id }));
                    Ok(self.summary())
                };
                let _ = reply.send(result);
            }
            Command::Leave { player_id, reply } => {
                if self.entries.remove(&player_id).is_some() {
                    self.broadcast("player_left", json!({ "player_id": player_id }));
                }
                let _ = reply.send(Ok(self.summary()));
            }
            Command::Checkin { player_id, reply } => {
                let result = if self.status != QueueStatus::CheckIn {
                    Err(QueueError::NotInCheckInPhase)
                } else if let Some(entry) = self.entries.get_mut(&player_id) {
                    entry.checked_in = true;
                    self.broadcast("player_checked_in", json!({ "player_id": player_id }));
                    Ok(self.summary())
                } else {
                    Err(QueueError::PlayerNotInQueue)
                };
                let _ = reply.send(result);
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.summary());
            }
            Command::Sync { spec } => {
                let before = self.summary();
                self.apply_spec(spec.status, spec.check_in_deadline, spec.entries);
                if self.status == QueueStatus::Closed {
                    self.broadcast("queue_closed", json!({ "reason": "reconcile" }));
                    return true;
                }
                if self.summary() != before {
                    self.broadcast("queue_synced", json!({}));
                }
            }
            Command::StartCheckIn { deadline } => {
                self.status = QueueStatus::CheckIn;
                self.set_deadline(Some(deadline));
                self.broadcast("check_in_started", json!({}));
            }
            Command::Close { reason } => {
                self.status = QueueStatus::Closed;
                self.broadcast("queue_closed", json!({ "reason": reason }));
                return true;
            }
        }
        false
    }

    fn apply_spec(
        &mut self,
        status: QueueStatus,
        deadline: Option<OffsetDateTime>,
        entries: Vec<EntrySummary>,
    ) {
        self.status = status;
        if deadline != self.deadline {
            self.set_deadline(deadline);
        }
        for entry in entries {
            let local = self.entries.entry(entry.player_id).or_insert(Entry {
                role: entry.role.clone(),
                checked_in: false,
            });
            local.checked_in |= entry.checked_in;
        }
    }

    fn set_deadline(&mut self, deadline: Option<OffsetDateTime>) {
        self.deadline = deadline;
        self.deadline_at = deadline.map(instant_for);
    }

    /// Removes unchecked players; closes the queue when fewer than two remain. Returns true
    /// when the actor must stop.
    fn on_deadline(&mut self) -> bool {
        self.deadline_at = None;
        if self.status != QueueStatus::CheckIn {
            return false;
        }
        let before = self.entries.len();
        self.entries.retain(|_, entry| entry.checked_in);
        let checked_in_count = self.entries.len();
        let removed_count = before - checked_in_count;
        let closed = checked_in_count < 2;
        if closed {
            self.status = QueueStatus::Closed;
        }
        metrics::counter!(crate::metrics::INHOUSE_EXPIRIES, "outcome" => if closed { "closed" } else { "kept" }).increment(1);
        tracing::info!(queue_id = %self.queue_id, org = %self.org_id, removed_count, checked_in_count, closed, "check-in deadline fired");
        self.broadcast(
            "check_in_expired",
            json!({ "removed_count": removed_count, "checked_in_count": checked_in_count, "queue_closed": closed }),
        );
        closed
    }

    fn summary(&self) -> QueueSummary {
        QueueSummary {
            queue_id: self.queue_id.clone(),
            org_id: self.org_id.clone(),
            status: self.status,
            check_in_deadline: self.deadline.and_then(|d| d.format(&Rfc3339).ok()),
            player_count: self.entries.len(),
            entries: self
                .entries
                .iter()
                .map(|(player_id, entry)| EntrySummary {
                    player_id: player_id.clone(),
                    role: entry.role.clone(),
                    checked_in: entry.checked_in,
                })
                .collect(),
        }
    }

    /// Pushes `queue_update {event, …summary, …extra}` to `inhouse:{org}`.
    fn broadcast(&self, event: &str, extra: Value) {
        let mut payload = serde_json::to_value(self.summary()).expect("summary serializes");
        let object = payload.as_object_mut().expect("summary is an object");
        object.insert("event".into(), Value::String(event.into()));
        if let Value::Object(extra) = extra {
            object.extend(extra);
        }
        let bytes = serde_json::to_vec(&payload).expect("payload serializes");
        self.hub.publish(&self.topic, "queue_update", bytes.into());
    }
}
