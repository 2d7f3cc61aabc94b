//! Type filters on join: `{"types": ["tournament_match.*", "team_goal.completed"]}` (SSE:
//! `?types=a,b.*`) — the channel then receives only the broadcasts whose event type matches.
//! Pure.
//!
//! Invariants:
//! - The hub's own pushes are never filtered: `queue_update`, presence, `events_dropped` and
//!   the `phx_*` lifecycle (a client that filters `inhouse:` still sees its queue).
//! - Replays after `since` pass the same filter as live broadcasts, so recovery stays exact
//!   among the matching broadcasts (a filtered broadcast was never the client's to miss).

use serde_json::Value;

use crate::limits::MAX_EVENT_BYTES;

/// Entries a filter may have at most.
pub const MAX_ENTRIES: usize = 32;

/// A parsed, valid filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeFilter {
    exact: Vec<Box<str>>,
    /// `prefix.*` entries, kept as `prefix.`.
    prefixes: Vec<Box<str>>,
}

/// Why a filter was refused (the join answers `invalid_params`; SSE answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("types must be a list of 1 to {MAX_ENTRIES} event types or prefixes ending in .*")]
pub struct InvalidFilter;

impl TypeFilter {
    /// The `types` join parameter: absent or `null` is no filter.
    pub fn from_param(value: Option<&Value>) -> Result<Option<TypeFilter>, InvalidFilter> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => {
                let entries: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                Self::from_entries(&entries.ok_or(InvalidFilter)?).map(Some)
            }
            Some(_) => Err(InvalidFilter),
        }
    }

    /// SSE's `?types=a,b.*`: absent or empty is no filter.
    pub fn from_query(text: Option<&str>) -> Result<Option<TypeFilter>, InvalidFilter> {
        match text.map(str::trim) {
            None | Some("") => Ok(None),
            Some(list) => {
                let entries: Vec<&str> = list.split(',').map(str::trim).collect();
                Self::from_entries(&entries).map(Some)
            }
        }
    }

    fn from_entries(entries: &[&str]) -> Result<TypeFilter, InvalidFilter> {
        if entries.is_empty() || entries.len() > MAX_ENTRIES {
            return Err(InvalidFilter);
        }
        let mut filter = TypeFilter {
            exact: Vec::new(),
            prefixes: Vec::new(),
        };
        for entry in entries {
            let valid = !entry.is_empty()
                && entry.len() <= MAX_EVENT_BYTES
                && !entry.chars().any(|c| c.is_control() || c.is_whitespace());
            if !valid {
                return Err(InvalidFilter);
            }
            match entry.strip_suffix('*') {
                // `prefix.*`: a non-empty prefix ending in a dot, and no other wildcard.
                Some(prefix) if prefix.len() > 1 && prefix.ends_with('.') => {
                    if prefix.contains('*') {
                        return Err(InvalidFilter);
                    }
                    filter.prefixes.push(prefix.into());
                }
                Some(_) => return Err(InvalidFilter),
                None if entry.contains('*') => return Err(InvalidFilter),
                None => filter.exact.push((*entry).into()),
            }
        }
        Ok(filter)
    }

    /// Whether a push with this event name reaches a channel with this filter.
    pub fn admits(&self, event: &str) -> bool {
        exempt(event)
            || self.exact.iter().any(|e| &**e == event)
            || self.prefixes.iter().any(|p| event.starts_with(&**p))
    }
}

/// The hub's own pushes, which no filter hides.
fn exempt(event: &str) -> bool {
    matches!(
        event,
        "queue_update" | "presence_state" | "presence_diff" | "presence_summary" | "events_dropped"
    ) || event.starts_with("phx_")
}

/// `admits` for an optional filter (no filter admits everything).
pub fn admits(filter: Option<&TypeFilter>, event: &str) -> bool {
    filter.is_none_or(|f| f.admits(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(value: Value) -> Result<Option<TypeFilter>, InvalidFilter> {
        TypeFilter::from_param(Some(&value))
    }

    #[test]
    fn exact_types_and_prefixes() {
        let f = filter(json!(["tournament_match.*", "team_goal.completed"]))
            .unwrap()
            .unwrap();
        assert!(f.admits("tournament_match.confirmed"));
        assert!(f.admits("team_goal.completed"));
        assert!(!f.admits("team_goal.missed"));
        assert!(!f.admits("tournament_matchx.confirmed"));
        assert!(!f.admits("tournament_match"));
        // The hub's own pushes pass any filter.
        for own in [
            "queue_update",
            "presence_state",
            "presence_diff",
            "presence_summary",
            "events_dropped",
            "phx_close",
        ] {
            assert!(f.admits(own), "{own}");
        }
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in [
            json!("tournament_match.*"),
            json!([]),
            json!([1]),
            json!([""]),
            json!(["*"]),
            json!([".*"]),
            json!(["a*"]),
            json!(["a.*.b"]),
            json!(["a.**"]),
            json!(["a b"]),
            json!(["x".repeat(MAX_EVENT_BYTES + 1)]),
            json!(vec!["a"; MAX_ENTRIES + 1]),
        ] {
            assert_eq!(filter(bad.clone()), Err(InvalidFilter), "{bad}");
        }
        assert_eq!(filter(Value::Null), Ok(None));
        assert!(filter(json!(vec!["a"; MAX_ENTRIES])).unwrap().is_some());
    }

    #[test]
    fn query_lists() {
        assert_eq!(TypeFilter::from_query(None), Ok(None));
        assert_eq!(TypeFilter::from_query(Some(" ")), Ok(None));
        let f = TypeFilter::from_query(Some("a.b, c.*")).unwrap().unwrap();
        assert!(f.admits("a.b") && f.admits("c.d") && !f.admits("a.c"));
        assert_eq!(TypeFilter::from_query(Some("a.b,,c")), Err(InvalidFilter));
        assert!(admits(None, "anything"));
    }
}
