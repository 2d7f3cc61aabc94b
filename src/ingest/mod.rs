//! Ingestion: how events enter the hub. [`redis`] owns the Redis connections (PSUBSCRIBE and
//! PUBLISH); [`publish`] turns HTTP bodies into envelopes; [`Pipeline`] decodes, routes and
//! delivers every envelope, whatever its source.
//!
//! Invariant: only this module talks to Redis.

pub mod publish;
pub mod redis;

use std::sync::Arc;

use bytes::Bytes;

use crate::envelope::{self, Envelope};
use crate::hub::Hub;
use crate::inhouse::Inhouse;
use crate::logsafe::LogSafe;
use crate::router;

/// Where an event came from (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Redis,
    /// Posted over HTTP and delivered locally because Redis was unavailable.
    HttpLocal,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::HttpLocal => "http_local",
        }
    }
}

/// Decode → route → fan out, plus the in-house lifecycle hooks.
pub struct Pipeline {
    pub hub: Arc<Hub>,
    pub inhouse: Arc<Inhouse>,
}

impl Pipeline {
    /// Decodes raw envelope bytes and delivers them; drops are logged without the payload.
    /// `channel` is the Redis channel (or `http`), logged to tell publishers apart.
    pub async fn ingest(&self, raw: Bytes, source: Source, channel: &str) {
        match envelope::decode(raw) {
            Ok(envelope) => self.deliver(&envelope, source).await,
            Err(reason) => {
                // `reason`'s Display never includes the payload and escapes what it echoes.
                tracing::warn!(source = source.label(), channel = %LogSafe(channel), %reason, "dropped event");
                metrics::counter!(crate::metrics::EVENTS_RECEIVED, "source" => source.label(), "outcome" => reason.label())
                    .increment(1);
            }
        }
    }

    /// Delivers a `queue_update` that `queue.lua` published (every instance receives it once and
    /// delivers it to its own subscribers of `inhouse:{org}`).
    pub fn queue_update(&self, org_id: &str, raw: Bytes) {
        self.hub
            .publish(&format!("inhouse:{org_id}"), "queue_update", raw);
    }

    pub async fn deliver(&self, envelope: &Envelope, source: Source) {
        let route = router::route(envelope);
        if route.unrouted {
            tracing::warn!(
                event_type = %LogSafe(&envelope.event_type),
                org = %LogSafe(&envelope.org_id),
                "Unrouted event"
            );
        }
        let mut sockets = 0;
        for topic in &route.topics {
            let event = router::event_name(topic, &envelope.event_type);
            sockets += self.hub.publish(topic, event, envelope.raw.clone());
        }
        tracing::debug!(
            event_type = %LogSafe(&envelope.event_type),
            org = %LogSafe(&envelope.org_id),
            id = %LogSafe(envelope.id.as_deref().unwrap_or("-")),
            sockets,
            "event delivered"
        );
        metrics::counter!(
            crate::metrics::EVENTS_RECEIVED,
            "source" => source.label(),
            "outcome" => if route.unrouted { "unrouted" } else { "routed" }
        )
        .increment(1);
        if envelope.event_type.starts_with("inhouse.") {
            self.inhouse.on_event(envelope).await;
        }
    }
}
