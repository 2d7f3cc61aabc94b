//! Topic families, in Phoenix terms: `join` (authorize and build the join reply) and `handle_in`
//! (a client event → a reply). Server-side pushes (`handle_info`) arrive through the hub.
//!
//! This module decides *what* to answer; `phoenix/` decides how it looks on the wire.

use serde_json::{json, Value};

use crate::auth::Identity;
use crate::id::Id;
use crate::inhouse::{Inhouse, QueueError, Snapshot};
use crate::limits::MAX_ROLE_BYTES;
use crate::logsafe::LogSafe;
use crate::topic::Topic;

/// The `ok` response of a successful join.
pub async fn join_response(family: &Topic, inhouse: &Inhouse) -> Value {
    match family {
        Topic::Inhouse { org_id } => match inhouse.snapshot(org_id).await {
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
    family: &Topic,
    identity: &Identity,
    event: &str,
    payload: Option<&Value>,
    inhouse: &Inhouse,
) -> Result<Value, Refusal> {
    let Topic::Inhouse { org_id } = family else {
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

/// An id parameter of a client push ([`Id`]'s rule).
fn string_param(payload: Option<&Value>, name: &str) -> Option<String> {
    Id::field(payload?, name).map(Id::into_string)
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
            Topic::parse("inhouse:o1"),
            Some(Topic::Inhouse {
                org_id: "o1".into()
            })
        );
        assert_eq!(
            Topic::parse("tournament:1:2"),
            Some(Topic::Tournament {
                tournament_id: "1:2".into()
            })
        );
        assert_eq!(Topic::parse("inhouse:"), None);
        assert_eq!(Topic::parse("rooms:1"), None);
        assert_eq!(Topic::parse("admin:other"), None);
        assert_eq!(Topic::parse("phoenix"), None);
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
            let family = Topic::parse(topic).unwrap();
            assert_eq!(family.may_join(&identity), allowed, "{topic} {identity:?}");
        }
    }
}
