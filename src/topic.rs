//! [`Topic`]: the one home of topic names. The families of DESIGN.md are listed here once;
//! topics are parsed from what clients join and built (displayed) for what the router and the
//! pipeline publish, and the join rule of each family lives beside its name. Pure.

use std::fmt;

use crate::auth::Identity;

/// The topic families clients may join, by label (`PRESENCE_FAMILIES` names these).
pub const FAMILIES: &[&str] = &["notifications", "tournament", "inhouse", "org_events"];

/// A topic, by family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `notifications:{user_id}`.
    Notifications { user_id: String },
    /// `tournament:{tournament_id}`.
    Tournament { tournament_id: String },
    /// `inhouse:{org_id}`.
    Inhouse { org_id: String },
    /// `org_events:{org_id}`.
    OrgEvents { org_id: String },
    /// `admin:status`: the status page's live figures, for admin and internal identities.
    Admin,
}

impl Topic {
    /// `None` for a name that matches no family (`unmatched topic`).
    pub fn parse(topic: &str) -> Option<Topic> {
        let (prefix, id) = topic.split_once(':')?;
        if id.is_empty() {
            return None;
        }
        let id = id.to_string();
        Some(match prefix {
            "notifications" => Topic::Notifications { user_id: id },
            "tournament" => Topic::Tournament { tournament_id: id },
            "inhouse" => Topic::Inhouse { org_id: id },
            "org_events" => Topic::OrgEvents { org_id: id },
            "admin" if id == "status" => Topic::Admin,
            _ => return None,
        })
    }

    /// The family's label (metric label, `PRESENCE_FAMILIES`).
    pub fn label(&self) -> &'static str {
        match self {
            Topic::Notifications { .. } => "notifications",
            Topic::Tournament { .. } => "tournament",
            Topic::Inhouse { .. } => "inhouse",
            Topic::OrgEvents { .. } => "org_events",
            Topic::Admin => "admin",
        }
    }

    /// The organisation an org-scoped topic belongs to (what a scope-org revocation takes
    /// away); `None` for the others.
    pub fn org(&self) -> Option<&str> {
        match self {
            Topic::Inhouse { org_id } | Topic::OrgEvents { org_id } => Some(org_id),
            _ => None,
        }
    }

    /// Join rules: notifications are per user; inhouse and org_events per organisation;
    /// tournaments are open to any authenticated identity; internal services may join anything.
    pub fn may_join(&self, identity: &Identity) -> bool {
        match (self, identity) {
            (Topic::Admin, identity) => matches!(identity, Identity::Internal | Identity::Admin),
            (_, Identity::Internal) => true,
            (_, Identity::Admin) => false,
            (Topic::Tournament { .. }, _) => true,
            (Topic::Notifications { user_id }, Identity::User { user_id: own, .. }) => {
                user_id == own
            }
            (Topic::Notifications { .. }, Identity::Player { .. }) => false,
            (Topic::Inhouse { org_id } | Topic::OrgEvents { org_id }, identity) => {
                identity.org_id() == Some(org_id.as_str())
            }
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Notifications { user_id: id }
            | Topic::Tournament { tournament_id: id }
            | Topic::Inhouse { org_id: id }
            | Topic::OrgEvents { org_id: id } => write!(f, "{}:{id}", self.label()),
            Topic::Admin => f.write_str("admin:status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_are_inverse() {
        for name in [
            "notifications:u1",
            "tournament:12",
            "inhouse:o1",
            "org_events:o1",
            "admin:status",
        ] {
            assert_eq!(Topic::parse(name).unwrap().to_string(), name);
        }
        for family in FAMILIES {
            let topic = Topic::parse(&format!("{family}:x")).unwrap();
            assert_eq!(topic.label(), *family);
        }
        for unmatched in ["", "inhouse", "inhouse:", "admin:other", "other:1"] {
            assert_eq!(Topic::parse(unmatched), None, "{unmatched}");
        }
    }

    #[test]
    fn org_of_org_scoped_topics_only() {
        assert_eq!(Topic::parse("inhouse:o1").unwrap().org(), Some("o1"));
        assert_eq!(Topic::parse("org_events:o1").unwrap().org(), Some("o1"));
        assert_eq!(Topic::parse("tournament:o1").unwrap().org(), None);
    }
}
