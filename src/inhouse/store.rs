//! Queue state in Redis: the only home of an in-house queue's truth.
//!
//! Every transition is one call of `queue.lua` (validate, mutate, bump the version, `PUBLISH`
//! the `queue_update` on `prostaff:inhouse:{org}`), so any number of hub instances behave as
//! one and a restart loses nothing. Instances keep no queue state; each delivers what the
//! script publishes to its own subscribers (see `crate::redis`).
//!
//! Keys of one organisation's queue share the hash tag `{org_id}` (`iq:{org}:q`, `:e`, `:gone`,
//! `:closed`, `:rl`), so each script call touches one Redis Cluster slot. The deadline index
//! `iq:deadlines` (members `"<fence>:<org>"`, scored by the deadline in ms) is global: it is
//! written by a separate command after the script (never in the same call, which would cross
//! slots). A lost index write is repaired by the next reconcile, and a stale index entry is
//! harmless because the `expire` op checks the fence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::interfaces::LuaInterface;
use fred::types::scripts::Script;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{EntrySummary, QueueError, QueueSpec, QueueStatus};
use crate::redis::{RedisError, RedisLink};

/// Channel prefix of `queue_update` messages (`prostaff:inhouse:{org_id}`).
pub const QUEUE_CHANNEL_PREFIX: &str = "prostaff:inhouse:";
/// The pattern the pipeline subscribes for queue updates.
pub const QUEUE_CHANNEL_PATTERN: &str = "prostaff:inhouse:*";
/// Global index of pending check-in deadlines.
pub const DEADLINES_KEY: &str = "iq:deadlines";
const RECONCILE_LOCK_KEY: &str = "iq:reconcile:lock";

const QUEUE_SCRIPT: &str = include_str!("queue.lua");

/// Members of `KEYS[1]` scored at or below Redis's clock (`ARGV[1]` = limit), or above it when
/// `ARGV[2]` is `ahead`; also returns Redis's time in ms as the first element.
const DEADLINES_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members
if ARGV[2] == 'ahead' then
  members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'LIMIT', 0, ARGV[1])
else
  members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
end
table.insert(members, 1, tostring(now))
return members
"#;

/// `SET lock token NX PX ttl`, returning Redis's time in ms on success and "" otherwise.
const LOCK_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  return tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return ''
"#;

/// Up to `ARGV[1]` organisations with a queue key, found by SCAN (at most `ARGV[2]` SCAN steps,
/// so a large keyspace costs a bounded amount of work). For the status page only.
const QUEUE_ORGS_SCRIPT: &str = r#"
local found, cursor, steps = {}, '0', 0
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', 'iq:{*}:q', 'COUNT', 1000)
  cursor, steps = page[1], steps + 1
  for _, key in ipairs(page[2]) do
    found[#found + 1] = string.sub(key, 5, -4)
    if #found >= tonumber(ARGV[1]) then return found end
  end
until cursor == '0' or steps >= tonumber(ARGV[2])
return found
"#;

/// Releases the lock only when it still holds our token.
const UNLOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// What a lifecycle or reconcile op did.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// State changed; the summary after the change (with `status: "closed"` when it closed).
    Changed(Value),
    /// Nothing to do (already in that state).
    Unchanged,
    /// The queue closed earlier: nothing reopens it.
    Ignored,
}

/// Outcome of one deadline firing attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// This call ran the deadline; `closed` tells whether the queue closed.
    Fired { closed: bool },
    /// Redis's clock says the deadline is still ahead.
    Early,
    /// Another call ran it, or the check-in it belonged to was replaced or closed.
    Stale,
}

/// One indexed deadline: which org's queue, which check-in start (the fence), when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedDeadline {
    pub org_id: String,
    pub fence: String,
}

impl IndexedDeadline {
    fn parse(member: &str) -> Option<Self> {
        let (fence, org_id) = member.split_once(':')?;
        Some(IndexedDeadline {
            org_id: org_id.to_string(),
            fence: fence.to_string(),
        })
    }

    fn member(&self) -> String {
        format!("{}:{}", self.fence, self.org_id)
    }
}

impl From<RedisError> for QueueError {
    fn from(_: RedisError) -> Self {
        QueueError::Unavailable
    }
}

pub struct QueueStore {
    redis: Arc<RedisLink>,
    queue_script: Script,
    deadlines_script: Script,
    lock_script: Script,
    unlock_script: Script,
    queue_orgs_script: Script,
    rate_limit_max: u32,
    rate_limit_window: Duration,
}

fn keys(org_id: &str) -> Vec<String> {
    ["q", "e", "gone", "closed", "rl"]
        .iter()
        .map(|suffix| format!("iq:{{{org_id}}}:{suffix}"))
        .collect()
}

fn deadline_text(deadline: OffsetDateTime) -> (String, String) {
    let text = deadline
        .to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .expect("a UTC date formats as RFC 3339");
    let ms = (deadline.unix_timestamp_nanos() / 1_000_000).max(0);
    (text, ms.to_string())
}

fn entries_json(entries: &[EntrySummary]) -> String {
    let list: Vec<Value> = entries
        .iter()
        .map(|e| json!({"player_id": e.player_id, "role": e.role, "checked_in": e.checked_in}))
        .collect();
    Value::Array(list).to_string()
}

impl QueueStore {
    pub fn new(redis: Arc<RedisLink>, rate_limit_max: u32, rate_limit_window: Duration) -> Self {
        QueueStore {
            redis,
            queue_script: Script::from_lua(QUEUE_SCRIPT),
            deadlines_script: Script::from_lua(DEADLINES_SCRIPT),
            lock_script: Script::from_lua(LOCK_SCRIPT),
            unlock_script: Script::from_lua(UNLOCK_SCRIPT),
            queue_orgs_script: Script::from_lua(QUEUE_ORGS_SCRIPT),
            rate_limit_max,
            rate_limit_window,
        }
    }

    fn client(&self) -> Result<Client, RedisError> {
        self.redis.commands().ok_or(RedisError::Disconnected)
    }

    async fn eval(
        &self,
        script: &Script,
        label: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Vec<String>, RedisError> {
        let started = Instant::now();
        let result = self.redis.eval(script, keys, args).await;
        metrics::histogram!(crate::metrics::INHOUSE_SCRIPT_SECONDS, "op" => label)
            .record(started.elapsed().as_secs_f64());
        if let Err(
            error @ (RedisError::Failed(_) | RedisError::Malformed(_) | RedisError::Timeout),
        ) = &result
        {
            tracing::warn!(op = label, %error, "queue script failed");
        }
        result
    }

    async fn queue_op(
        &self,
        op: &'static str,
        org_id: &str,
        extra: Vec<String>,
    ) -> Result<Vec<String>, RedisError> {
        let mut args = vec![
            op.to_string(),
            org_id.to_string(),
            format!("{QUEUE_CHANNEL_PREFIX}{org_id}"),
        ];
        args.extend(extra);
        let reply = self
            .eval(&self.queue_script, op, keys(org_id), args)
            .await?;
        let refused = reply.first().map(String::as_str) == Some("err");
        if op != "snapshot" && !refused {
            // A transition a replica has not received is lost if the master fails now: wait
            // (≤ 100 ms) until one has it, so a failover keeps every acknowledged action. A
            // refusal changed nothing a client relies on.
            let outcome = match self.redis.replicate().await {
                crate::redis::Replication::Acknowledged => "acknowledged",
                crate::redis::Replication::Unacknowledged => "unacknowledged",
                crate::redis::Replication::NoReplica => "no_replica",
            };
            metrics::counter!(crate::metrics::QUEUE_REPLICATION, "outcome" => outcome).increment(1);
        }
        Ok(reply)
    }

    /// Organisations that have a queue in Redis (at most `limit`, bounded work on each node of
    /// a cluster): the status page's list. Not for hot paths.
    pub async fn queue_orgs(&self, limit: usize) -> Result<Vec<String>, RedisError> {
        let mut orgs = self
            .redis
            .eval_on_every_primary(
                &self.queue_orgs_script,
                vec![limit.to_string(), "50".to_string()],
            )
            .await?;
        orgs.truncate(limit);
        Ok(orgs)
    }

    /// The org's active queue, or `None`.
    pub async fn snapshot(&self, org_id: &str) -> Result<Option<Value>, RedisError> {
        let reply = self.queue_op("snapshot", org_id, vec![]).await?;
        Ok(reply.get(1).and_then(|s| parse_summary(s)))
    }

    /// A socket action (join/leave/checkin): `Ok(summary)` or the refusal reason.
    async fn action(
        &self,
        op: &'static str,
        org_id: &str,
        args: Vec<String>,
    ) -> Result<Value, QueueError> {
        let reply = self.queue_op(op, org_id, args).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => reply
                .get(1)
                .and_then(|s| parse_summary(s))
                .ok_or(QueueError::NoActiveQueue),
            Some("err") => Err(reply
                .get(1)
                .and_then(|reason| QueueError::from_reason(reason))
                .unwrap_or(QueueError::Unavailable)),
            _ => Err(QueueError::Unavailable),
        }
    }

    pub async fn join(
        &self,
        org_id: &str,
        player_id: &str,
        role: &str,
    ) -> Result<Value, QueueError> {
        let args = vec![
            player_id.to_string(),
            role.to_string(),
            self.rate_limit_max.to_string(),
            self.rate_limit_window.as_millis().to_string(),
        ];
        self.action("join", org_id, args).await
    }

    pub async fn leave(&self, org_id: &str, player_id: &str) -> Result<Value, QueueError> {
        self.action("leave", org_id, vec![player_id.to_string()])
            .await
    }

    pub async fn checkin(&self, org_id: &str, player_id: &str) -> Result<Value, QueueError> {
        self.action("checkin", org_id, vec![player_id.to_string()])
            .await
    }

    /// Runs a lifecycle/reconcile op and indexes the deadline it armed, if any.
    async fn transition(
        &self,
        op: &'static str,
        org_id: &str,
        args: Vec<String>,
    ) -> Result<Change, RedisError> {
        let reply = self.queue_op(op, org_id, args).await?;
        if let Some(index) = reply.get(2).filter(|s| !s.is_empty()) {
            self.index_deadline(org_id, index).await?;
        }
        Ok(match reply.first().map(String::as_str) {
            Some("ok") => Change::Changed(
                reply
                    .get(1)
                    .and_then(|s| parse_summary(s))
                    .unwrap_or(Value::Null),
            ),
            Some("ignored") => Change::Ignored,
            _ => Change::Unchanged,
        })
    }

    /// `"<fence>:<deadline_ms>"` from the script → `ZADD iq:deadlines`. Close ops return a bare
    /// fence instead, whose index entry is removed.
    async fn index_deadline(&self, org_id: &str, index: &str) -> Result<(), RedisError> {
        match index.split_once(':') {
            Some((fence, deadline_ms)) => {
                let score: f64 = deadline_ms.parse().unwrap_or(0.0);
                self.edit_index(
                    "return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])",
                    vec![score.to_string(), format!("{fence}:{org_id}")],
                )
                .await
            }
            None => self.unindex(&format!("{index}:{org_id}")).await,
        }
    }

    async fn unindex(&self, member: &str) -> Result<(), RedisError> {
        self.edit_index(
            "return redis.call('ZREM', KEYS[1], ARGV[1])",
            vec![member.to_string()],
        )
        .await
    }

    /// One command on the deadline index (a plain `EVAL`: the features stay lean).
    async fn edit_index(&self, lua: &str, args: Vec<String>) -> Result<(), RedisError> {
        self.client()?
            .eval::<i64, _, _, _>(lua, vec![DEADLINES_KEY], args)
            .await
            .map(|_| ())
            .map_err(|e| RedisError::Failed(e.kind().to_str()))
    }

    pub async fn open(
        &self,
        org_id: &str,
        queue_id: &str,
        entries: &[EntrySummary],
    ) -> Result<Change, RedisError> {
        self.transition(
            "open",
            org_id,
            vec![queue_id.to_string(), entries_json(entries)],
        )
        .await
    }

    pub async fn start_check_in(
        &self,
        org_id: &str,
        queue_id: &str,
        deadline: OffsetDateTime,
        entries: &[EntrySummary],
    ) -> Result<Change, RedisError> {
        let (text, ms) = deadline_text(deadline);
        self.transition(
            "start_check_in",
            org_id,
            vec![queue_id.to_string(), text, ms, entries_json(entries)],
        )
        .await
    }

    pub async fn close(
        &self,
        org_id: &str,
        queue_id: &str,
        reason: &str,
    ) -> Result<Change, RedisError> {
        self.transition(
            "close",
            org_id,
            vec![queue_id.to_string(), reason.to_string()],
        )
        .await
    }

    /// Merges one queue listed by Rails.
    pub async fn reconcile(&self, spec: &QueueSpec) -> Result<Change, RedisError> {
        let (text, ms) = match spec.check_in_deadline {
            Some(deadline) => deadline_text(deadline),
            None => (String::new(), "0".to_string()),
        };
        let status = match spec.status {
            QueueStatus::Open => "open",
            QueueStatus::CheckIn => "check_in",
            QueueStatus::Closed => "closed",
        };
        self.transition(
            "reconcile",
            &spec.org_id,
            vec![
                spec.queue_id.clone(),
                status.to_string(),
                text,
                ms,
                entries_json(&spec.entries),
            ],
        )
        .await
    }

    /// Closes a queue Rails stopped listing, if the absence rule allows it (see `queue.lua`).
    pub async fn close_if_absent(
        &self,
        deadline: &IndexedDeadline,
        fetch_started_ms: u64,
    ) -> Result<Change, RedisError> {
        self.transition(
            "absent",
            &deadline.org_id,
            vec![deadline.fence.clone(), fetch_started_ms.to_string()],
        )
        .await
    }

    /// Runs one indexed deadline and drops its index entry unless it is still ahead.
    pub async fn expire(&self, deadline: &IndexedDeadline) -> Result<Expiry, RedisError> {
        let reply = self
            .queue_op("expire", &deadline.org_id, vec![deadline.fence.clone()])
            .await?;
        let expiry = match reply.first().map(String::as_str) {
            Some("ok") => Expiry::Fired {
                closed: reply
                    .get(1)
                    .and_then(|s| parse_summary(s))
                    .is_some_and(|s| s["status"] == "closed"),
            },
            Some("early") => return Ok(Expiry::Early),
            _ => Expiry::Stale,
        };
        self.unindex(&deadline.member()).await?;
        Ok(expiry)
    }

    /// Indexed deadlines that Redis's clock says are due (`ahead == false`) or still ahead, and
    /// Redis's time in ms.
    pub async fn indexed_deadlines(
        &self,
        ahead: bool,
        limit: usize,
    ) -> Result<(u64, Vec<IndexedDeadline>), RedisError> {
        let mut reply = self
            .eval(
                &self.deadlines_script,
                "deadlines",
                vec![DEADLINES_KEY.to_string()],
                vec![
                    limit.to_string(),
                    if ahead { "ahead" } else { "due" }.to_string(),
                ],
            )
            .await?;
        if reply.is_empty() {
            return Err(RedisError::Malformed("empty deadline reply"));
        }
        let now: u64 = reply.remove(0).parse().unwrap_or(0);
        Ok((
            now,
            reply
                .iter()
                .filter_map(|m| IndexedDeadline::parse(m))
                .collect(),
        ))
    }

    /// Takes the reconcile lock for `ttl`; returns Redis's time in ms, or `None` when another
    /// instance holds it. Advisory: it only avoids duplicate work; the scripts keep state safe.
    pub async fn lock_reconcile(
        &self,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, RedisError> {
        let reply = self
            .eval(
                &self.lock_script,
                "lock",
                vec![RECONCILE_LOCK_KEY.to_string()],
                vec![token.to_string(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok(reply.first().and_then(|s| s.parse().ok()))
    }

    pub async fn unlock_reconcile(&self, token: &str) {
        let _ = self
            .eval(
                &self.unlock_script,
                "unlock",
                vec![RECONCILE_LOCK_KEY.to_string()],
                vec![token.to_string()],
            )
            .await;
    }
}

fn parse_summary(text: &str) -> Option<Value> {
    if text.is_empty() {
        return None;
    }
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = keys("org-1");
        assert_eq!(keys.len(), 5);
        assert!(keys.iter().all(|k| k.starts_with("iq:{org-1}:")));
    }

    #[test]
    fn deadline_members_round_trip() {
        let d = IndexedDeadline::parse("12:org:with:colons").unwrap();
        assert_eq!(d.fence, "12");
        assert_eq!(d.org_id, "org:with:colons");
        assert_eq!(d.member(), "12:org:with:colons");
    }

    #[test]
    fn deadlines_are_utc_text_and_ms() {
        let deadline = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
            + time::Duration::milliseconds(250);
        let (text, ms) = deadline_text(deadline);
        assert_eq!(text, "2023-11-14T22:13:20.25Z");
        assert_eq!(ms, "1700000000250");
    }
}
