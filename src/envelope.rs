//! Envelope decoding and validation: Redis message bytes → [`Envelope`] or a [`DropReason`].
//!
//! Pure: no I/O, no logging. The original JSON text is kept untouched in [`Envelope::raw`] so the
//! hub pushes exactly what the publisher sent, including fields it does not know.
//! Invariant: nothing here ever formats the payload into a string meant for logs.

use bytes::Bytes;
use serde_json::{Map, Value};

/// A validated event envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The envelope exactly as received (valid JSON object text).
    pub raw: Bytes,
    pub id: Option<String>,
    pub event_type: String,
    pub org_id: String,
    pub user_id: String,
    /// The `payload` member (`Null` when absent).
    pub payload: Value,
}

/// Why an envelope was dropped. `Display` is safe to log: it never includes the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("invalid JSON")]
    InvalidJson,
    #[error("envelope is not a JSON object")]
    NotAnObject,
    #[error("unsupported version={0}")]
    UnsupportedVersion(String),
    #[error("missing or invalid field(s): {}", .0.join(", "))]
    InvalidFields(Vec<&'static str>),
}

impl DropReason {
    /// Stable label for the `outcome` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::InvalidJson => "invalid_json",
            DropReason::NotAnObject => "not_an_object",
            DropReason::UnsupportedVersion(_) => "unsupported_version",
            DropReason::InvalidFields(_) => "invalid_fields",
        }
    }
}

/// Decodes and validates one envelope.
pub fn decode(raw: Bytes) -> Result<Envelope, DropReason> {
    let value: Value = serde_json::from_slice(&raw).map_err(|_| DropReason::InvalidJson)?;
    let Value::Object(mut object) = value else {
        return Err(DropReason::NotAnObject);
    };
    check_version(object.get("version"))?;

    let mut invalid = Vec::new();
    let mut required = |name: &'static str, object: &Map<String, Value>| match object.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            invalid.push(name);
            String::new()
        }
    };
    let event_type = required("type", &object);
    let org_id = required("org_id", &object);
    let user_id = required("user_id", &object);
    if !invalid.is_empty() {
        return Err(DropReason::InvalidFields(invalid));
    }
    let id = match object.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let payload = object.remove("payload").unwrap_or(Value::Null);
    Ok(Envelope {
        raw,
        id,
        event_type,
        org_id,
        user_id,
        payload,
    })
}

fn check_version(version: Option<&Value>) -> Result<(), DropReason> {
    match version {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(()),
        Some(Value::String(s)) if s == "1" => Ok(()),
        Some(other) => {
            // The version is echoed in the warning; cap it so a hostile value stays short.
            let mut shown = other.to_string();
            if shown.len() > 32 {
                let cut = (0..=32)
                    .rev()
                    .find(|i| shown.is_char_boundary(*i))
                    .unwrap_or(0);
                shown.truncate(cut);
                shown.push('…');
            }
            Err(DropReason::UnsupportedVersion(shown))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_str(text: &str) -> Result<Envelope, DropReason> {
        decode(Bytes::copy_from_slice(text.as_bytes()))
    }

    const BASE: &str = r#""type":"inhouse.session_started","org_id":"o1","user_id":"u1","payload":{"secret":"s3cr3t"}"#;

    #[test]
    fn versions() {
        for version in ["", r#""version":"1","#, r#""version":1,"#] {
            let env = decode_str(&format!("{{{version}{BASE}}}")).unwrap();
            assert_eq!(env.event_type, "inhouse.session_started");
        }
        assert_eq!(
            decode_str(&format!(r#"{{"version":"99",{BASE}}}"#)).unwrap_err(),
            DropReason::UnsupportedVersion("\"99\"".into())
        );
        assert_eq!(
            decode_str(&format!(r#"{{"version":2,{BASE}}}"#)).unwrap_err(),
            DropReason::UnsupportedVersion("2".into())
        );
    }

    #[test]
    fn required_fields_are_named() {
        let err =
            decode_str(r#"{"type":5,"org_id":"","payload":{"secret":"s3cr3t"}}"#).unwrap_err();
        assert_eq!(
            err,
            DropReason::InvalidFields(vec!["type", "org_id", "user_id"])
        );
        assert_eq!(
            err.to_string(),
            "missing or invalid field(s): type, org_id, user_id"
        );
        assert!(!err.to_string().contains("s3cr3t"));
    }

    #[test]
    fn garbage() {
        assert_eq!(decode_str("not json").unwrap_err(), DropReason::InvalidJson);
        assert_eq!(decode_str("[1,2]").unwrap_err(), DropReason::NotAnObject);
    }

    #[test]
    fn raw_is_kept_verbatim() {
        let text = format!(r#"{{"extra": {{"kept": true}}, {BASE}}}"#);
        let env = decode_str(&text).unwrap();
        assert_eq!(&env.raw[..], text.as_bytes());
        assert_eq!(env.payload["secret"], "s3cr3t");
    }
}
