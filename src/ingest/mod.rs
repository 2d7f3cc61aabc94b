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
use crate::history::{self, History, Position};
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

/// Decode → route → position → fan out, plus the in-house lifecycle hooks.
///
/// Invariant: called from the Redis subscriber loop one message at a time, in the order Redis
/// delivered them, so every instance assigns and reads positions in the same order.
pub struct Pipeline {
    pub hub: Arc<Hub>,
    pub inhouse: Arc<Inhouse>,
    pub history: Arc<History>,
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
    pub async fn queue_update(&self, org_id: &str, raw: Bytes) {
        let topic = format!("inhouse:{org_id}");
        let position = self
            .position(
                &topic,
                "queue_update",
                &raw,
                &history::content_key(&raw),
                Source::Redis,
            )
            .await;
        self.hub.publish_at(&topic, "queue_update", raw, position);
    }

    /// The broadcast's history position (appended once across instances), or `None` when
    /// history is off, the event did not come through Redis, or Redis failed (the broadcast is
    /// still delivered, without a position: clients then cannot resume past it).
    async fn position(
        &self,
        topic: &str,
        event: &str,
        raw: &Bytes,
        dedup: &str,
        source: Source,
    ) -> Option<Position> {
        if !self.history.enabled() || !matches!(source, Source::Redis) {
            return None;
        }
        match self.history.append(topic, event, raw, dedup).await {
            Ok(position) => {
                metrics::counter!(crate::metrics::HISTORY_APPENDS, "outcome" => "ok").increment(1);
                Some(position)
            }
            Err(error) => {
                metrics::counter!(crate::metrics::HISTORY_APPENDS, "outcome" => "failed")
                    .increment(1);
                tracing::warn!(%error, topic = %LogSafe(topic), "broadcast delivered without a history position");
                None
            }
        }
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
        let dedup = match &envelope.id {
            Some(id) => format!("i{id}"),
            None => history::content_key(&envelope.raw),
        };
        for topic in &route.topics {
            let event = router::event_name(topic, &envelope.event_type);
            let position = self
                .position(topic, event, &envelope.raw, &dedup, source)
                .await;
            sockets += self
                .hub
                .publish_at(topic, event, envelope.raw.clone(), position);
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
