//! The HTTP publish paths (`POST /events/notify`, `POST /api/events`): validate a JSON body,
//! complete it into an envelope, and publish it to Redis so every hub instance delivers it —
//! or deliver it locally when Redis is unavailable.

use bytes::Bytes;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Pipeline, Source};
use crate::limits::{MAX_EVENT_BYTES, MAX_ID_BYTES};
use crate::logsafe::LogSafe;
use crate::redis::{RedisError, RedisLink};

/// Why a body was refused; `Display` is the client-facing message (never the payload).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed JSON body")]
    MalformedJson,
    #[error("body must be a JSON object")]
    NotAnObject,
    #[error("missing required fields: {}", .0.join(", "))]
    MissingFields(Vec<&'static str>),
    #[error("invalid fields: {}", .0.join(", "))]
    InvalidFields(Vec<&'static str>),
    #[error("unsupported version")]
    UnsupportedVersion,
    #[error("fields too long: {}", .0.join(", "))]
    TooLong(Vec<&'static str>),
}

/// A completed envelope ready to publish.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: String,
    pub org_id: String,
    pub event_type: String,
    pub raw: Bytes,
    /// The completed envelope, parsed (what `raw` serializes): the catalogue checks it.
    pub document: Value,
}

/// Redis was connected but the PUBLISH failed or timed out: it may or may not have reached
/// Redis, so the event is not delivered locally (that could deliver it twice); the caller
/// answers 503 and the publisher retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishFailure;

/// How an accepted event was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Published to Redis: every instance (this one included) delivers it.
    Redis,
    /// Redis was unavailable: delivered by this instance only.
    Local,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Redis => "redis",
            Delivery::Local => "local",
        }
    }
}

fn non_empty_string(object: &Map<String, Value>, name: &str) -> Option<bool> {
    object
        .get(name)
        .map(|value| matches!(value, Value::String(s) if !s.trim().is_empty()))
}

/// Validates a body and fills in `id` (uuid), `published_at` and `user_id` ("system").
pub fn complete_envelope(body: &[u8]) -> Result<Accepted, Rejection> {
    let value: Value = serde_json::from_slice(body).map_err(|_| Rejection::MalformedJson)?;
    let Value::Object(mut object) = value else {
        return Err(Rejection::NotAnObject);
    };
    // serde_json reserves this key for raw values; an envelope carrying it cannot round-trip
    // (found by the `envelope` fuzz target).
    if object
        .keys()
        .any(|key| key.starts_with("$serde_json::private"))
    {
        return Err(Rejection::InvalidFields(vec![
            "$serde_json::private::RawValue",
        ]));
    }

    let mut missing = Vec::new();
    for name in ["type", "org_id"] {
        if non_empty_string(&object, name) != Some(true) {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(Rejection::MissingFields(missing));
    }
    match object.get("version") {
        None | Some(Value::Null) => {}
        Some(Value::String(v)) if v == "1" => {}
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(Rejection::UnsupportedVersion),
    }
    if non_empty_string(&object, "user_id") == Some(false)
        && object.get("user_id") != Some(&Value::Null)
    {
        return Err(Rejection::InvalidFields(vec!["user_id"]));
    }
    if !matches!(object.get("user_id"), Some(Value::String(_))) {
        object.insert("user_id".into(), Value::String("system".into()));
    }
    let id = match object.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            object.insert("id".into(), Value::String(id.clone()));
            id
        }
    };
    if !matches!(object.get("published_at"), Some(Value::String(_))) {
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .expect("UTC time formats as RFC 3339");
        object.insert("published_at".into(), Value::String(now));
    }
    let org_id = object["org_id"].as_str().expect("validated").to_string();
    let event_type = object["type"].as_str().expect("validated").to_string();
    let mut too_long = Vec::new();
    for (name, value, cap) in [
        ("type", event_type.as_str(), MAX_EVENT_BYTES),
        ("org_id", org_id.as_str(), MAX_ID_BYTES),
        ("id", id.as_str(), MAX_ID_BYTES),
    ] {
        if value.len() > cap {
            too_long.push(name);
        }
    }
    if let Some(Value::String(user_id)) = object.get("user_id") {
        if user_id.len() > MAX_ID_BYTES {
            too_long.push("user_id");
        }
    }
    if !too_long.is_empty() {
        return Err(Rejection::TooLong(too_long));
    }
    // What HTTP accepts every subscriber must accept too: the `envelope` fuzz target and
    // `completes_missing_fields` check that this output decodes.
    let document = Value::Object(object);
    let raw = serde_json::to_vec(&document).expect("a JSON value serializes");
    Ok(Accepted {
        id,
        org_id,
        event_type,
        raw: raw.into(),
        document,
    })
}

/// Publishes to Redis. Only when Redis is known to be down (not connected) is the event
/// delivered by this instance alone; a PUBLISH that fails or times out on a live connection is
/// a [`PublishFailure`], never a local delivery.
pub async fn publish(
    link: &RedisLink,
    pipeline: &Pipeline,
    accepted: Accepted,
) -> Result<Delivery, PublishFailure> {
    let channel = super::events_channel(&accepted.org_id);
    match link.publish(channel.clone(), accepted.raw.clone()).await {
        Ok(_) => Ok(Delivery::Redis),
        Err(RedisError::Disconnected) => {
            tracing::warn!(org = %LogSafe(&accepted.org_id), "redis is down; delivering locally only");
            pipeline
                .ingest(accepted.raw, Source::HttpLocal, &channel)
                .await;
            Ok(Delivery::Local)
        }
        Err(error) => {
            tracing::warn!(%error, org = %LogSafe(&accepted.org_id), "publish failed; not delivered");
            metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => "http", "outcome" => "publish_failed")
                .increment(1);
            Err(PublishFailure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_missing_fields() {
        let accepted =
            complete_envelope(br#"{"type":"scraper.done","org_id":"o1","payload":{"n":1}}"#)
                .unwrap();
        let value: Value = serde_json::from_slice(&accepted.raw).unwrap();
        assert_eq!(value["user_id"], "system");
        assert_eq!(value["id"], accepted.id.as_str());
        assert!(value["published_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(value["payload"]["n"], 1);
        assert!(crate::envelope::decode(accepted.raw).is_ok());
    }

    #[test]
    fn keeps_given_fields() {
        let accepted = complete_envelope(
            br#"{"type":"t","org_id":"o","user_id":"u","id":"x","published_at":"p"}"#,
        )
        .unwrap();
        let value: Value = serde_json::from_slice(&accepted.raw).unwrap();
        assert_eq!(
            (
                value["user_id"].as_str(),
                value["id"].as_str(),
                value["published_at"].as_str()
            ),
            (Some("u"), Some("x"), Some("p"))
        );
    }

    #[test]
    fn rejections_name_fields() {
        assert_eq!(
            complete_envelope(b"{").unwrap_err(),
            Rejection::MalformedJson
        );
        assert_eq!(
            complete_envelope(b"[]").unwrap_err(),
            Rejection::NotAnObject
        );
        assert_eq!(
            complete_envelope(br#"{"payload":{}}"#)
                .unwrap_err()
                .to_string(),
            "missing required fields: type, org_id"
        );
        assert_eq!(
            complete_envelope(br#"{"type":1,"org_id":"o"}"#).unwrap_err(),
            Rejection::MissingFields(vec!["type"])
        );
        assert_eq!(
            complete_envelope(br#"{"type":"t","org_id":"o","user_id":5}"#).unwrap_err(),
            Rejection::InvalidFields(vec!["user_id"])
        );
        assert_eq!(
            complete_envelope(br#"{"type":"t","org_id":"o","version":"2"}"#).unwrap_err(),
            Rejection::UnsupportedVersion
        );
        let reserved = br#"{"type":"t","org_id":"o","$serde_json::private::RawValue":{"a":1}}"#;
        assert!(matches!(
            complete_envelope(reserved).unwrap_err(),
            Rejection::InvalidFields(_)
        ));
    }
}
