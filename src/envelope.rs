//! Envelope decoding and validation: Redis message bytes → [`Envelope`] or a [`DropReason`].
//!
//! Pure: no I/O, no logging. The original JSON text is kept untouched in [`Envelope::raw`] so the
//! hub pushes exactly what the publisher sent, including fields it does not know.
//! Invariant: nothing here ever formats the payload into a string meant for logs.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::limits::{MAX_EVENT_BYTES, MAX_ID_BYTES};
use crate::logsafe::LogSafe;

/// A validated event envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The envelope exactly as received (valid JSON object text).
    pub raw: Bytes,
    pub id: Option<String>,
    pub event_type: String,
    pub org_id: String,
    pub user_id: String,
    /// The whole envelope, parsed (the event catalogue validates it).
    pub document: Value,
}

impl Envelope {
    /// The `payload` member (`Null` when absent).
    pub fn payload(&self) -> &Value {
        self.document.get("payload").unwrap_or(&Value::Null)
    }
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
    #[error("field(s) too long: {}", .0.join(", "))]
    TooLong(Vec<&'static str>),
}

impl DropReason {
    /// Stable label for the `outcome` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::InvalidJson => "invalid_json",
            DropReason::NotAnObject => "not_an_object",
            DropReason::UnsupportedVersion(_) => "unsupported_version",
            DropReason::InvalidFields(_) => "invalid_fields",
            DropReason::TooLong(_) => "field_too_long",
        }
    }
}

/// Decodes and validates one envelope as received from Redis (the text is kept verbatim).
pub fn decode(raw: Bytes) -> Result<Envelope, DropReason> {
    let value: Value = serde_json::from_slice(&raw).map_err(|_| DropReason::InvalidJson)?;
    let Value::Object(object) = value else {
        return Err(DropReason::NotAnObject);
    };
    let fields = check(&object)?;
    Ok(fields.into_envelope(raw, object))
}

/// Validates an envelope built in the hub (the HTTP routes, after filling their defaults) with
/// the same rules as [`decode`], and serializes it.
pub fn from_object(object: Map<String, Value>) -> Result<Envelope, DropReason> {
    let fields = check(&object)?;
    let raw = serde_json::to_vec(&object).expect("a JSON object serializes");
    Ok(fields.into_envelope(raw.into(), object))
}

/// The checked members of an envelope.
struct Fields {
    id: Option<String>,
    event_type: String,
    org_id: String,
    user_id: String,
}

impl Fields {
    fn into_envelope(self, raw: Bytes, object: Map<String, Value>) -> Envelope {
        Envelope {
            raw,
            id: self.id,
            event_type: self.event_type,
            org_id: self.org_id,
            user_id: self.user_id,
            document: Value::Object(object),
        }
    }
}

/// The envelope rules, in one place: a supported version, `type`, `org_id` and `user_id` as
/// non-blank strings, an optional string or number `id`, and every name within its cap.
fn check(object: &Map<String, Value>) -> Result<Fields, DropReason> {
    check_version(object.get("version"))?;

    let mut invalid = Vec::new();
    let mut required = |name: &'static str| match object.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            invalid.push(name);
            String::new()
        }
    };
    let event_type = required("type");
    let org_id = required("org_id");
    let user_id = required("user_id");
    if !invalid.is_empty() {
        return Err(DropReason::InvalidFields(invalid));
    }
    let id = match object.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let too_long: Vec<&'static str> = [
        ("type", event_type.len(), MAX_EVENT_BYTES),
        ("org_id", org_id.len(), MAX_ID_BYTES),
        ("user_id", user_id.len(), MAX_ID_BYTES),
        ("id", id.as_ref().map_or(0, String::len), MAX_ID_BYTES),
    ]
    .into_iter()
    .filter(|(_, len, cap)| len > cap)
    .map(|(name, _, _)| name)
    .collect();
    if !too_long.is_empty() {
        return Err(DropReason::TooLong(too_long));
    }
    Ok(Fields {
        id,
        event_type,
        org_id,
        user_id,
    })
}

fn check_version(version: Option<&Value>) -> Result<(), DropReason> {
    match version {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(()),
        Some(Value::String(s)) if s == "1" => Ok(()),
        Some(other) => {
            // The version is echoed in the warning: capped and escaped like any untrusted text.
            let shown: String = other.to_string().chars().take(32).collect();
            Err(DropReason::UnsupportedVersion(LogSafe(&shown).to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_names_are_dropped_naming_the_field() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let raw = format!(r#"{{"type":"t","org_id":"{long}","user_id":"u"}}"#);
        assert_eq!(
            decode(raw.into()).unwrap_err(),
            DropReason::TooLong(vec!["org_id"])
        );
        let ok = format!(
            r#"{{"type":"t","org_id":"{}","user_id":"u"}}"#,
            "x".repeat(MAX_ID_BYTES)
        );
        assert!(decode(ok.into()).is_ok());
    }

    #[test]
    fn an_unsupported_version_cannot_forge_a_log_line() {
        let raw = r#"{"version":"2\nINFO forged","type":"t","org_id":"o","user_id":"u"}"#;
        let reason = decode(Bytes::from_static(raw.as_bytes()))
            .unwrap_err()
            .to_string();
        assert!(!reason.contains('\n'), "{reason}");
    }

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
        assert_eq!(env.payload()["secret"], "s3cr3t");
    }
}
