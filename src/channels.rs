//! Topic families, in Phoenix terms: `join` (authorize and build the join reply) and `handle_in`
//! (a client event → a reply). Server-side pushes (`handle_info`) arrive through the hub.
//!
//! This module decides *what* to answer; `phoenix/` decides how it looks on the wire.

use serde_json::{json, Value};

use crate::auth::Identity;
use crate::inhouse::{Inhouse, QueueError, Snapshot};
use crate::limits::{MAX_ID_BYTES, MAX_ROLE_BYTES};
use crate::logsafe::LogSafe;

/// The four topic families of DESIGN.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicFamily {
    Notifications {
        user_id: String,
    },
    Tournament {
        tournament_id: String,
    },
    Inhouse {
        org_id: String,
    },
    OrgEvents {
        org_id: String,
    },
    /// `admin:status`: the status page's live figures, for admin and internal identities.
    Admin,
}

impl TopicFamily {
    /// `None` for a topic that matches no family (`unmatched topic`).
    pub fn parse(topic: &str) -> Option<TopicFamily> {
        let (prefix, id) = topic.split_once(':')?;
        if id.is_empty() {
            return None;
        }
        let id = id.to_string();
        Some(match prefix {
            "notifications" => TopicFamily::Notifications { user_id: id },
            "tournament" => TopicFamily::Tournament { tournament_id: id },
            "inhouse" => TopicFamily::Inhouse { org_id: id },
            "org_events" => TopicFamily::OrgEvents { org_id: id },
            "admin" if id == "status" => TopicFamily::Admin,
            _ => return None,
        })
    }

    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            TopicFamily::Notifications { .. } => "notifications",
            TopicFamily::Tournament { .. } => "tournament",
            TopicFamily::Inhouse { .. } => "inhouse",
            TopicFamily::OrgEvents { .. } => "org_events",
            TopicFamily::Admin => "admin",
        }
    }

    /// Join rules: notifications are per user; inhouse and org_events per organisation;
    /// tournaments are open to any authenticated identity; internal services may join anything.
    pub fn may_join(&self, identity: &Identity) -> bool {
        match (self, identity) {
            (TopicFamily::Admin, identity) => {
                matches!(identity, Identity::Internal | Identity::Admin)
            }
            (_, Identity::Internal) => true,
            (_, Identity::Admin) => false,
            (TopicFamily::Tournament { .. }, _) => true,
            (TopicFamily::Notifications { user_id }, Identity::User { user_id: own, .. }) => {
                user_id == own
            }
            (TopicFamily::Notifications { .. }, Identity::Player { .. }) => false,
            (TopicFamily::Inhouse { org_id } | TopicFamily::OrgEvents { org_id }, identity) => {
                identity.org_id() == Some(org_id.as_str())
            }
        }
    }
}

/// The `ok` response of a successful join.
pub async fn join_response(family: &TopicFamily, inhouse: &Inhouse) -> Value {
    match family {
        TopicFamily::Inhouse { org_id } => match inhouse.snapshot(org_id).await {
            Snapshot::Known(queue) => json!({ "queue": queue }),
            // Redis is down: say so rather than pretend there is no queue.
            Snapshot::Unavailable => json!({ "queue": null, "stale": true }),
        },
        _ => json!({}),
    }
}

/// An error reply `{"reason": …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub &'static str);

/// Handles a client event on a joined channel and returns the reply's response.
pub async fn handle_in(
    family: &TopicFamily,
    identity: &Identity,
    event: &str,
    payload: Option<&Value>,
    inhouse: &Inhouse,
) -> Result<Value, Refusal> {
    let TopicFamily::Inhouse { org_id } = family else {
        return Err(Refusal("unknown_event"));
    };
    let action = match event {
        "join_queue" => QueueAction::Join,
        "leave_queue" => QueueAction::Leave,
        "checkin" => QueueAction::Checkin,
        _ => return Err(Refusal("unknown_event")),
    };
    let result = run_queue_action(action, org_id, identity, payload, inhouse).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(error) => error.reason(),
    };
    tracing::debug!(org = %LogSafe(org_id), action = action.label(), player_id = %LogSafe(player_of(payload).as_deref().unwrap_or("-")), outcome, "queue action");
    metrics::counter!(crate::metrics::INHOUSE_ACTIONS, "action" => action.label(), "outcome" => outcome).increment(1);
    result.map_err(|error| Refusal(error.reason()))
}

#[derive(Debug, Clone, Copy)]
enum QueueAction {
    Join,
    Leave,
    Checkin,
}

impl QueueAction {
    fn label(self) -> &'static str {
        match self {
            QueueAction::Join => "join_queue",
            QueueAction::Leave => "leave_queue",
            QueueAction::Checkin => "checkin",
        }
    }
}

/// A role is a short non-empty string (`top`, `jungle`, …).
fn role_param(payload: Option<&Value>) -> Option<String> {
    match payload?.get("role")? {
        Value::String(s) if !s.trim().is_empty() && s.len() <= MAX_ROLE_BYTES => Some(s.clone()),
        _ => None,
    }
}

/// An id may be a string or a number (Rails ids are integers); it is compared as a string.
fn string_param(payload: Option<&Value>, name: &str) -> Option<String> {
    match payload?.get(name)? {
        Value::String(s) if !s.trim().is_empty() && s.len() <= MAX_ID_BYTES => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn player_of(payload: Option<&Value>) -> Option<String> {
    string_param(payload, "player_id")
}

async fn run_queue_action(
    action: QueueAction,
    org_id: &str,
    identity: &Identity,
    payload: Option<&Value>,
    inhouse: &Inhouse,
) -> Result<Value, QueueError> {
    let player_id = player_of(payload).ok_or(QueueError::InvalidParams)?;
    if let Identity::Player { player_id: own, .. } = identity {
        if *own != player_id {
            return Err(QueueError::Unauthorized);
        }
    }
    match action {
        QueueAction::Join => {
            let role = role_param(payload).ok_or(QueueError::InvalidParams)?;
            inhouse.join(org_id, &player_id, &role).await
        }
        QueueAction::Leave => inhouse.leave(org_id, &player_id).await,
        QueueAction::Checkin => inhouse.checkin(org_id, &player_id).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(user_id: &str, org_id: &str) -> Identity {
        Identity::User {
            user_id: user_id.into(),
            org_id: org_id.into(),
        }
    }

    fn player(org_id: &str) -> Identity {
        Identity::Player {
            player_id: "p1".into(),
            org_id: org_id.into(),
        }
    }

    #[test]
    fn parse_topics() {
        assert_eq!(
            TopicFamily::parse("inhouse:o1"),
            Some(TopicFamily::Inhouse {
                org_id: "o1".into()
            })
        );
        assert_eq!(
            TopicFamily::parse("tournament:1:2"),
            Some(TopicFamily::Tournament {
                tournament_id: "1:2".into()
            })
        );
        assert_eq!(TopicFamily::parse("inhouse:"), None);
        assert_eq!(TopicFamily::parse("rooms:1"), None);
        assert_eq!(TopicFamily::parse("admin:other"), None);
        assert_eq!(TopicFamily::parse("phoenix"), None);
    }

    #[test]
    fn join_matrix() {
        let cases = [
            ("notifications:u1", user("u1", "o1"), true),
            ("notifications:u2", user("u1", "o1"), false),
            ("notifications:p1", player("o1"), false),
            ("notifications:u2", Identity::Internal, true),
            ("tournament:9", user("u1", "o1"), true),
            ("tournament:9", player("o2"), true),
            ("inhouse:o1", user("u1", "o1"), true),
            ("inhouse:o2", user("u1", "o1"), false),
            ("inhouse:o1", player("o1"), true),
            ("inhouse:o2", player("o1"), false),
            ("inhouse:o2", Identity::Internal, true),
            ("org_events:o1", user("u1", "o1"), true),
            ("org_events:o2", user("u1", "o1"), false),
            ("org_events:o1", player("o1"), true),
            ("org_events:o2", player("o1"), false),
            ("org_events:o3", Identity::Internal, true),
            ("admin:status", Identity::Admin, true),
            ("admin:status", Identity::Internal, true),
            ("admin:status", user("u1", "o1"), false),
            ("admin:status", player("o1"), false),
            ("tournament:9", Identity::Admin, false),
            ("org_events:o1", Identity::Admin, false),
            ("notifications:u1", Identity::Admin, false),
        ];
        for (topic, identity, allowed) in cases {
            let family = TopicFamily::parse(topic).unwrap();
            assert_eq!(family.may_join(&identity), allowed, "{topic} {identity:?}");
        }
    }
}
