//! The HTTP publish paths (`POST /events/notify`, `POST /api/events`): validate a JSON body,
//! complete it into an envelope, and publish it to Redis so every hub instance delivers it —
//! or deliver it locally when Redis is unavailable.

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Pipeline, Source};
use crate::envelope::{self, DropReason, Envelope};
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

/// Fields HTTP publishers may leave out: the hub fills them before validating.
const DEFAULTED: [&str; 3] = ["user_id", "id", "published_at"];

impl From<DropReason> for Rejection {
    /// The envelope rules' verdict in the HTTP routes' words: a field the hub cannot fill in is
    /// "missing", a field it would have filled but was given in the wrong shape is "invalid".
    fn from(reason: DropReason) -> Self {
        match reason {
            DropReason::InvalidJson => Rejection::MalformedJson,
            DropReason::NotAnObject => Rejection::NotAnObject,
            DropReason::UnsupportedVersion(_) => Rejection::UnsupportedVersion,
            DropReason::TooLong(fields) => Rejection::TooLong(fields),
            DropReason::InvalidFields(fields) => {
                let (defaulted, required): (Vec<_>, Vec<_>) = fields
                    .into_iter()
                    .partition(|name| DEFAULTED.contains(name));
                if required.is_empty() {
                    Rejection::InvalidFields(defaulted)
                } else {
                    Rejection::MissingFields(required)
                }
            }
        }
    }
}

/// Fills in `id` (uuid), `published_at` (now) and `user_id` ("system") where the body leaves
/// them out, then validates with the envelope rules every subscriber applies
/// ([`envelope::from_object`]), so what HTTP accepts every instance accepts.
pub fn complete_envelope(body: &[u8]) -> Result<Envelope, Rejection> {
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
    if matches!(object.get("user_id"), None | Some(Value::Null)) {
        object.insert("user_id".into(), Value::String("system".into()));
    }
    let has_id = match object.get("id") {
        Some(Value::String(id)) => !id.is_empty(),
        Some(Value::Number(_)) => true,
        _ => false,
    };
    if !has_id {
        let id = uuid::Uuid::new_v4().to_string();
        object.insert("id".into(), Value::String(id));
    }
    if !matches!(object.get("published_at"), Some(Value::String(_))) {
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .expect("UTC time formats as RFC 3339");
        object.insert("published_at".into(), Value::String(now));
    }
    Ok(envelope::from_object(object)?)
}

/// Publishes to Redis. Only when Redis is known to be down (not connected) is the event
/// delivered by this instance alone; a PUBLISH that fails or times out on a live connection is
/// a [`PublishFailure`], never a local delivery.
pub async fn publish(
    link: &RedisLink,
    pipeline: &Pipeline,
    accepted: Envelope,
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
        assert_eq!(Some(value["id"].as_str().unwrap()), accepted.id.as_deref());
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
    fn http_applies_the_envelope_rules_of_every_subscriber() {
        // One rule set: the same cap and the same version rule refuse on both paths.
        let long = "x".repeat(crate::limits::MAX_ID_BYTES + 1);
        let body = serde_json::json!({"type": "t", "org_id": long, "user_id": "u"}).to_string();
        assert_eq!(
            complete_envelope(body.as_bytes()).unwrap_err(),
            Rejection::TooLong(vec!["org_id"])
        );
        assert_eq!(
            envelope::decode(body.into()).unwrap_err(),
            DropReason::TooLong(vec!["org_id"])
        );
        // The version is checked before the fields, on both paths.
        let body = br#"{"version": 2, "org_id": "o"}"#;
        assert_eq!(
            complete_envelope(body).unwrap_err(),
            Rejection::UnsupportedVersion
        );
        assert!(matches!(
            envelope::decode(body.as_slice().into()).unwrap_err(),
            DropReason::UnsupportedVersion(_)
        ));
        // A field the hub fills in is "invalid" when given in the wrong shape; one it cannot
        // fill in is "missing".
        assert_eq!(
            complete_envelope(br#"{"org_id":"o","user_id":""}"#).unwrap_err(),
            Rejection::MissingFields(vec!["type"])
        );
        assert_eq!(
            complete_envelope(br#"{"type":"t","org_id":"o","user_id":"  "}"#).unwrap_err(),
            Rejection::InvalidFields(vec!["user_id"])
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
