//! Routing: which topics an envelope goes to, and under which event name. Pure.

use crate::envelope::Envelope;
use crate::id::Id;
use crate::topic::Topic;

/// The topics one envelope is delivered to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub topics: Vec<String>,
    /// True when no type-specific rule matched (the event still reaches `org_events:`).
    pub unrouted: bool,
}

/// Every event → `org_events:{org}`; `notification.*` → `notifications:{user}`;
/// `tournament_match.*` → `tournament:{payload.tournament_id}` when present;
/// `inhouse.*` → `inhouse:{org}`.
pub fn route(envelope: &Envelope) -> Route {
    let org_id = envelope.org_id.clone();
    let mut topics = vec![Topic::OrgEvents {
        org_id: org_id.clone(),
    }
    .to_string()];
    let event_type = envelope.event_type.as_str();
    let mut unrouted = false;
    if event_type.starts_with("notification.") {
        let user_id = envelope.user_id.clone();
        topics.push(Topic::Notifications { user_id }.to_string());
    } else if event_type.starts_with("tournament_match.") {
        if let Some(id) = Id::field(envelope.payload(), "tournament_id") {
            let tournament_id = id.into_string();
            topics.push(Topic::Tournament { tournament_id }.to_string());
        }
    } else if event_type.starts_with("inhouse.") {
        topics.push(Topic::Inhouse { org_id }.to_string());
    } else {
        unrouted = true;
    }
    Route { topics, unrouted }
}

/// The event name pushed to clients: the envelope type, with the original's fallbacks.
pub fn event_name<'a>(topic: &str, event_type: &'a str) -> &'a str {
    if !event_type.is_empty() {
        event_type
    } else if topic.starts_with("tournament:") {
        "match_update"
    } else {
        "event"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::decode;

    fn route_of(event_type: &str, payload: &str) -> Route {
        let text = format!(
            r#"{{"type":"{event_type}","org_id":"o1","user_id":"u1","payload":{payload}}}"#
        );
        route(&decode(bytes::Bytes::from(text)).unwrap())
    }

    #[test]
    fn matrix() {
        assert_eq!(
            route_of("notification.created", "{}").topics,
            ["org_events:o1", "notifications:u1"]
        );
        assert_eq!(
            route_of("tournament_match.confirmed", r#"{"tournament_id":"t9"}"#).topics,
            ["org_events:o1", "tournament:t9"]
        );
        assert_eq!(
            route_of("tournament_match.walkover", r#"{"tournament_id":12}"#).topics,
            ["org_events:o1", "tournament:12"]
        );
        let no_tournament = route_of("tournament_match.confirmed", "{}");
        assert_eq!(no_tournament.topics, ["org_events:o1"]);
        assert!(!no_tournament.unrouted);
        assert_eq!(
            route_of("inhouse.session_started", "{}").topics,
            ["org_events:o1", "inhouse:o1"]
        );
        let other = route_of("team_goal.completed", "{}");
        assert_eq!(other.topics, ["org_events:o1"]);
        assert!(other.unrouted);
    }

    #[test]
    fn fallback_event_names() {
        assert_eq!(event_name("tournament:1", ""), "match_update");
        assert_eq!(event_name("org_events:1", ""), "event");
        assert_eq!(event_name("org_events:1", "x.y"), "x.y");
    }
}
