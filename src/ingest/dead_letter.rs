//! Dead letters: every envelope the hub drops (undecodable, unsupported version, missing
//! fields, a schema violation under `EVENT_SCHEMAS=enforce`) is kept in the Redis Stream
//! `prostaff:events:dead` (bounded by `DEAD_LETTER_MAXLEN`) with its reason and time, so it can
//! be read (`/admin`, `prostaff-events dead-letters list`) and replayed once the cause is fixed
//! (`prostaff-events dead-letters replay ID…`).
//!
//! Invariants:
//! - Ingest never waits on a dead letter: writes run in the background, at most
//!   [`MAX_IN_FLIGHT`] at a time; past that they are shed and counted.
//! - Every hub instance receives (and drops) the same pub/sub message; a claim key lets the first
//!   one write it, so a drop is one entry whatever the number of instances.
//! - What is listed never carries the envelope (payloads can hold personal data); only replay
//!   reads it, inside Redis.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use fred::types::scripts::Script;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::metrics as m;
use crate::redis::{RedisError, RedisLink};

/// The stream's key (DESIGN.md).
pub const STREAM_KEY: &str = "prostaff:events:dead";
/// Counts per reason, in the stream's cluster slot.
const COUNTS_KEY: &str = "{prostaff:events:dead}:counts";
/// One claim per dropped message, in the stream's cluster slot.
const CLAIM_PREFIX: &str = "{prostaff:events:dead}:claim:";
/// Long enough for every instance to have received the same message.
const CLAIM_TTL_MS: u64 = 10_000;
/// Envelopes larger than this are recorded without their text (and cannot be replayed).
pub const MAX_KEPT_ENVELOPE: usize = 256 * 1024;
/// Dead-letter writes in flight at most.
pub const MAX_IN_FLIGHT: usize = 64;
const SCRIPT: &str = include_str!("dead_letter.lua");

/// One dropped envelope.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Stable reason label (`invalid_json`, `schema`, …).
    pub reason: &'static str,
    /// The reason's text: safe to show (never the payload).
    pub detail: String,
    /// `redis` or `http`.
    pub source: &'static str,
    /// The pub/sub channel it arrived on (replay publishes there again).
    pub channel: String,
    pub event_type: Option<String>,
    pub org_id: Option<String>,
    pub raw: Bytes,
}

/// The dead-letter stream.
pub struct DeadLetters {
    link: Arc<RedisLink>,
    script: Script,
    maxlen: u64,
    in_flight: Arc<Semaphore>,
}

/// One listed entry: its fields without the envelope.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

/// The stream's length, the counts per reason since they were first kept, the newest entries.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Listing {
    pub length: u64,
    pub counts: BTreeMap<String, u64>,
    pub entries: Vec<Listed>,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    /// Published again (to this many subscribers, hub instances included) and removed.
    Published(i64),
    /// No entry with that id.
    Missing,
    /// The entry has no envelope text (it was too large to keep).
    NotKept,
}

impl DeadLetters {
    pub fn new(link: Arc<RedisLink>, maxlen: u64) -> Arc<Self> {
        Arc::new(DeadLetters {
            link,
            script: Script::from_lua(SCRIPT),
            maxlen,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Keeps a dropped envelope, in the background.
    pub fn keep(self: &Arc<Self>, letter: DeadLetter) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            metrics::counter!(m::DEAD_LETTERS, "outcome" => "shed").increment(1);
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.write(&letter).await;
            metrics::counter!(m::DEAD_LETTERS, "outcome" => outcome).increment(1);
            drop(permit);
        });
    }

    /// Writes one entry; answers the outcome label.
    pub async fn write(&self, letter: &DeadLetter) -> &'static str {
        let claim = format!(
            "{CLAIM_PREFIX}{}:{}",
            letter.reason,
            crate::history::content_key(&letter.raw)
        );
        let mut args = vec![
            "add".to_string(),
            self.maxlen.to_string(),
            CLAIM_TTL_MS.to_string(),
            letter.reason.to_string(),
        ];
        let mut field = |name: &str, value: String| {
            args.push(name.to_string());
            args.push(value);
        };
        field("reason", letter.reason.to_string());
        field("detail", letter.detail.clone());
        field("source", letter.source.to_string());
        field("channel", letter.channel.clone());
        field("at", crate::auth::unix_now_ms().to_string());
        if let Some(event_type) = &letter.event_type {
            field("type", event_type.clone());
        }
        if let Some(org_id) = &letter.org_id {
            field("org_id", org_id.clone());
        }
        field("envelope_bytes", letter.raw.len().to_string());
        field("claim", claim.clone());
        // Lua arguments are binary-safe, but the envelope is kept as text: an envelope that is
        // not UTF-8 was undecodable anyway and is kept lossily (it cannot be replayed as sent).
        if letter.raw.len() <= MAX_KEPT_ENVELOPE {
            field(
                "envelope",
                String::from_utf8_lossy(&letter.raw).into_owned(),
            );
        }
        let keys = vec![STREAM_KEY.to_string(), COUNTS_KEY.to_string(), claim];
        match self.link.eval(&self.script, keys, args).await {
            Ok(answer) if answer.first().map(String::as_str) == Some("ok") => "written",
            Ok(_) => "duplicate",
            Err(error) => {
                tracing::warn!(%error, reason = letter.reason, "dead letter not kept");
                "failed"
            }
        }
    }

    /// The newest `count` entries (without their envelopes) and the counts per reason.
    pub async fn list(&self, count: usize) -> Result<Listing, RedisError> {
        let keys = vec![STREAM_KEY.to_string(), COUNTS_KEY.to_string()];
        let args = vec!["list".to_string(), count.max(1).to_string()];
        let flat = self.link.eval(&self.script, keys, args).await?;
        Ok(parse_listing(&flat))
    }

    /// Publishes an entry's envelope again on its channel and removes it.
    pub async fn replay(&self, id: &str) -> Result<Replayed, RedisError> {
        let keys = vec![STREAM_KEY.to_string(), COUNTS_KEY.to_string()];
        let args = vec!["replay".to_string(), id.to_string()];
        let answer = self.link.eval(&self.script, keys, args).await?;
        Ok(match answer.first().map(String::as_str) {
            Some("ok") => {
                Replayed::Published(answer.get(1).and_then(|n| n.parse().ok()).unwrap_or(0))
            }
            Some("not_kept") => Replayed::NotKept,
            _ => Replayed::Missing,
        })
    }
}

/// `{length, reason, count, …, "|", id, n, field, value, …}` → [`Listing`]; the envelope field
/// is left out. Malformed answers give what could be read.
fn parse_listing(flat: &[String]) -> Listing {
    let mut listing = Listing::default();
    let mut items = flat.iter();
    listing.length = items.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    loop {
        match items.next().map(String::as_str) {
            None | Some("|") => break,
            Some(reason) => {
                let count = items.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                listing.counts.insert(reason.to_string(), count);
            }
        }
    }
    while let Some(id) = items.next() {
        let n: usize = items.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut fields = BTreeMap::new();
        for _ in 0..n {
            let (Some(name), Some(value)) = (items.next(), items.next()) else {
                break;
            };
            if name != "envelope" && name != "claim" {
                fields.insert(name.clone(), value.clone());
            }
        }
        listing.entries.push(Listed {
            id: id.clone(),
            fields,
        });
    }
    listing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_never_carry_the_envelope() {
        let flat: Vec<String> = [
            "2",
            "schema",
            "5",
            "invalid_json",
            "1",
            "|",
            "1-0",
            "3",
            "reason",
            "schema",
            "envelope",
            "{\"secret\":1}",
            "type",
            "t",
            "0-1",
            "1",
            "reason",
            "invalid_json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let listing = parse_listing(&flat);
        assert_eq!(listing.length, 2);
        assert_eq!(listing.counts["schema"], 5);
        assert_eq!(listing.entries.len(), 2);
        assert_eq!(
            listing.entries[0].fields.get("type").map(String::as_str),
            Some("t")
        );
        assert!(!listing.entries[0].fields.contains_key("envelope"));
        assert_eq!(listing.entries[1].id, "0-1");
    }

    #[test]
    fn a_truncated_answer_is_read_as_far_as_it_goes() {
        let flat: Vec<String> = ["1", "|", "1-0", "9", "reason"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let listing = parse_listing(&flat);
        assert_eq!(listing.entries.len(), 1);
        assert!(listing.entries[0].fields.is_empty());
    }
}
