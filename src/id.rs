//! [`Id`]: an id of the outside world (organisation, user, player, queue, tournament). Rails
//! ids are integers and JSON carries them as numbers or strings; the hub compares them as
//! strings. One rule for every id the hub reads, from an envelope, a client push, a Rails
//! answer or a JWT claim: a string that is not blank, has no control character and is at most
//! [`MAX_ID_BYTES`] long, or a JSON number (its decimal text). Pure.

use std::fmt;

use serde_json::Value;

use crate::limits::MAX_ID_BYTES;

/// A checked id (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(String);

impl Id {
    /// `None` when `text` breaks the rule.
    pub fn parse(text: &str) -> Option<Id> {
        let valid = !text.trim().is_empty()
            && text.len() <= MAX_ID_BYTES
            && !text.chars().any(char::is_control);
        valid.then(|| Id(text.to_string()))
    }

    /// A string or a number; `None` for anything else or a string that breaks the rule.
    pub fn from_json(value: &Value) -> Option<Id> {
        match value {
            Value::String(text) => Id::parse(text),
            Value::Number(number) => Some(Id(number.to_string())),
            _ => None,
        }
    }

    /// The id under `name` in a JSON object, if it is one.
    pub fn field(object: &Value, name: &str) -> Option<Id> {
        Id::from_json(object.get(name)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_and_numbers_within_the_cap() {
        assert_eq!(Id::from_json(&json!("p1")).unwrap().as_str(), "p1");
        assert_eq!(Id::from_json(&json!(42)).unwrap().as_str(), "42");
        assert_eq!(Id::field(&json!({"id": 7}), "id").unwrap().as_str(), "7");
        let longest = "x".repeat(MAX_ID_BYTES);
        assert!(Id::parse(&longest).is_some());
    }

    #[test]
    fn blank_long_control_and_other_shapes_are_refused() {
        assert!(Id::parse("").is_none());
        assert!(Id::parse("  ").is_none());
        assert!(Id::parse(&"x".repeat(MAX_ID_BYTES + 1)).is_none());
        assert!(Id::parse("a\nb").is_none());
        assert!(Id::from_json(&json!(true)).is_none());
        assert!(Id::from_json(&json!(null)).is_none());
        assert!(Id::from_json(&json!({"id": 1})).is_none());
        assert!(Id::field(&json!({}), "id").is_none());
    }
}
