//! Access follows the roster (issue 22): a revoked identity loses an org's topics (scope
//! `org`) or every connection (scope `all`) on every instance at once, and its older tokens are
//! refused for `REVOCATION_TTL_S`.
//!
//! Where revocations come from: an `access.revoked` envelope (consumed by the hub, never fanned
//! out), `player.transferred` and `roster.player_removed` with a `payload.player_id` (scope org
//! on the envelope's org; still delivered as events), and `POST /api/revocations` (which
//! publishes an `access.revoked` envelope). Envelopes reach every instance through the Redis
//! subscription, so each instance enforces on its own subscribers; each also writes the
//! revocation to the Redis hash `rev:index` (idempotent), from which every instance loads what
//! is in force on every Redis connect — so an instance that was away, or starts later, refuses
//! the same tokens.
//!
//! The rule: a revocation at time `at` refuses a token of that identity whose `iat` is at or
//! before `at`, or that has no `iat`; a token issued after it is accepted (Rails mints new
//! tokens from the new roster). Checks are in memory (no Redis round trip per connect or join).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{unix_now_ms, Authenticated, Scope};
use crate::envelope::Envelope;
use crate::hub::Hub;
use crate::id::Id;
use crate::logsafe::LogSafe;
use crate::metrics as m;
use crate::redis::RedisLink;

/// The Redis hash of revocations in force: field `<identity>|<scope>`, value the JSON record.
pub const INDEX_KEY: &str = "rev:index";
/// Longest accepted `reason`.
const MAX_REASON_BYTES: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// `user:<id>` or `player:<id>` (the presence key).
    pub identity: String,
    #[serde(flatten)]
    pub scope: Scope,
    pub reason: String,
    /// When it was decided (unix ms; the envelope's `published_at` when it has one, so every
    /// instance agrees).
    pub at_ms: u64,
    pub expires_at_ms: u64,
}

/// Why a revocation request was refused (HTTP 422 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("identity must be \"user:<id>\" or \"player:<id>\" (id at most 128 bytes)")]
    Identity,
    #[error("scope must be \"org\" or \"all\"")]
    Scope,
    #[error("org_id is required for scope org (at most 128 bytes)")]
    OrgId,
}

/// Checks an identity key: `user:<id>` or `player:<id>`, id non-empty and capped.
pub fn valid_identity(identity: &str) -> bool {
    let Some((kind, id)) = identity.split_once(':') else {
        return false;
    };
    matches!(kind, "user" | "player") && Id::parse(id).is_some()
}

/// Reads `{identity, scope, org_id?, reason?}`: the API body (`envelope_org` `None`: the org
/// is the body's `org_id`) or an `access.revoked` payload (the org is always the envelope's,
/// whatever the payload says).
pub fn parse_request(
    body: &Value,
    envelope_org: Option<&str>,
) -> Result<(String, Scope, String), Invalid> {
    let identity = body
        .get("identity")
        .and_then(Value::as_str)
        .filter(|i| valid_identity(i))
        .ok_or(Invalid::Identity)?;
    let org = match (envelope_org, body.get("org_id")) {
        (Some(org), _) => Some(org),
        (None, Some(Value::String(org))) => Some(org.as_str()),
        (None, Some(Value::Null) | None) => None,
        (None, Some(_)) => return Err(Invalid::OrgId),
    };
    let scope = match body.get("scope").and_then(Value::as_str) {
        Some("all") => Scope::All,
        Some("org") => match org {
            Some(org) if Id::parse(org).is_some() => Scope::Org(org.to_string()),
            _ => return Err(Invalid::OrgId),
        },
        _ => return Err(Invalid::Scope),
    };
    let reason: String = body
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("")
        .chars()
        .take(MAX_REASON_BYTES / 4)
        .collect();
    Ok((identity.to_string(), scope, reason))
}

/// The envelope's `published_at` in unix ms, when it has a valid RFC 3339 one.
fn published_at_ms(envelope: &Envelope) -> Option<u64> {
    #[derive(Deserialize)]
    struct PublishedAt<'a> {
        #[serde(borrow)]
        published_at: Option<&'a str>,
    }
    let parsed: PublishedAt = serde_json::from_slice(&envelope.raw).ok()?;
    let at = time::OffsetDateTime::parse(
        parsed.published_at?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The revocation an envelope carries, if any. `access.revoked` carries one explicitly;
/// `player.transferred` and `roster.player_removed` with a `payload.player_id` (string or
/// number) revoke that player from the envelope's org.
pub fn from_envelope(envelope: &Envelope, ttl: Duration) -> Option<Result<Revocation, Invalid>> {
    let (identity, scope, reason) = match envelope.event_type.as_str() {
        "access.revoked" => match parse_request(envelope.payload(), Some(&envelope.org_id)) {
            Ok(parsed) => parsed,
            Err(invalid) => return Some(Err(invalid)),
        },
        "player.transferred" | "roster.player_removed" => {
            let player = match envelope.payload().get("player_id")? {
                Value::String(id) => id.clone(),
                Value::Number(id) => id.to_string(),
                _ => return None,
            };
            let identity = format!("player:{player}");
            if !valid_identity(&identity) {
                return None;
            }
            (
                identity,
                Scope::Org(envelope.org_id.clone()),
                envelope.event_type.clone(),
            )
        }
        _ => return None,
    };
    let at_ms = published_at_ms(envelope).unwrap_or_else(unix_now_ms);
    Some(Ok(Revocation {
        identity,
        scope,
        reason,
        at_ms,
        expires_at_ms: at_ms.saturating_add(ttl.as_millis() as u64),
    }))
}

/// Per identity: the `all` revocation and the per-org ones in force.
#[derive(Debug, Default, Clone)]
struct Entry {
    all: Option<Revocation>,
    orgs: Vec<Revocation>,
}

/// The revocations in force, shared by every transport of this instance.
pub struct Revocations {
    redis: Arc<RedisLink>,
    hub: Arc<Hub>,
    ttl: Duration,
    table: Mutex<HashMap<String, Entry>>,
}

impl Revocations {
    pub fn new(redis: Arc<RedisLink>, hub: Arc<Hub>, ttl: Duration) -> Self {
        Revocations {
            redis,
            hub,
            ttl,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn refused(revocation: &Revocation, issued_at_ms: Option<u64>, now: u64) -> bool {
        now < revocation.expires_at_ms && issued_at_ms.is_none_or(|iat| iat <= revocation.at_ms)
    }

    /// Whether a connect with this token is refused (scope `all`); a refusal is counted.
    pub fn refuses_connect(&self, auth: &Authenticated) -> bool {
        self.refuses(auth, None, "connect")
    }

    /// Whether a join of `org`'s topics with this token is refused (scope `org` or `all`); a
    /// refusal is counted.
    pub fn refuses_join(&self, auth: &Authenticated, org: &str) -> bool {
        self.refuses(auth, Some(org), "join")
    }

    fn refuses(&self, auth: &Authenticated, org: Option<&str>, what: &'static str) -> bool {
        let Some(key) = auth.identity.key() else {
            return false;
        };
        let now = unix_now_ms();
        let refused = self
            .table
            .lock()
            .expect("revocations lock")
            .get(&key)
            .is_some_and(|entry| {
                let of_org = entry
                    .orgs
                    .iter()
                    .filter(|r| org.is_some_and(|org| r.scope == Scope::Org(org.into())));
                entry
                    .all
                    .iter()
                    .chain(of_org)
                    .any(|r| Self::refused(r, auth.issued_at_ms, now))
            });
        if refused {
            metrics::counter!(m::REVOKED_REFUSALS, "what" => what).increment(1);
        }
        refused
    }

    /// Remembers a revocation; `true` when it is new or newer than what was known.
    fn remember(&self, revocation: &Revocation) -> bool {
        if revocation.expires_at_ms <= unix_now_ms() {
            return false;
        }
        let mut table = self.table.lock().expect("revocations lock");
        let entry = table.entry(revocation.identity.clone()).or_default();
        let slot = match &revocation.scope {
            Scope::All => &mut entry.all,
            Scope::Org(org) => {
                match entry
                    .orgs
                    .iter_mut()
                    .find(|r| r.scope == Scope::Org(org.clone()))
                {
                    Some(existing) if existing.at_ms >= revocation.at_ms => return false,
                    Some(existing) => {
                        *existing = revocation.clone();
                        return true;
                    }
                    None => {
                        entry.orgs.push(revocation.clone());
                        return true;
                    }
                }
            }
        };
        match slot {
            Some(existing) if existing.at_ms >= revocation.at_ms => false,
            _ => {
                *slot = Some(revocation.clone());
                true
            }
        }
    }

    /// Applies a revocation on this instance (closes what it takes away here) and records it in
    /// Redis for instances that connect later.
    pub async fn apply(&self, revocation: Revocation) {
        if !self.remember(&revocation) {
            return;
        }
        self.enforce(&revocation);
        metrics::counter!(m::REVOCATIONS, "scope" => revocation.scope.label()).increment(1);
        tracing::info!(
            identity = %LogSafe(&revocation.identity),
            scope = revocation.scope.label(),
            org = %LogSafe(match &revocation.scope { Scope::Org(org) => org, Scope::All => "-" }),
            "access revoked"
        );
        if let Some(client) = self.redis.commands() {
            use fred::interfaces::HashesInterface;
            let field = format!(
                "{}|{}",
                revocation.identity,
                match &revocation.scope {
                    Scope::Org(org) => format!("org:{org}"),
                    Scope::All => "all".into(),
                }
            );
            let value = serde_json::to_string(&revocation).expect("a revocation serializes");
            let written: Result<(), _> = client.hset(INDEX_KEY, (field, value)).await;
            if let Err(error) = written {
                // Every instance received the event and enforces it; only later connects to
                // an instance that never saw it depend on this write (retried by the next
                // event's instance, or lost with this one: logged).
                tracing::warn!(error = %error.kind().to_str(), "revocation not recorded in redis");
            }
        }
    }

    fn enforce(&self, revocation: &Revocation) {
        let closed = self
            .hub
            .revoke(&revocation.identity, revocation.scope.clone());
        tracing::debug!(closed, "revocation enforced on local subscribers");
    }

    /// Loads what is in force from Redis (every connect: an instance that was away or just
    /// started learns what it missed), enforcing the new ones, and prunes expired entries.
    pub async fn load(&self) {
        let Some(client) = self.redis.commands() else {
            return;
        };
        use fred::interfaces::HashesInterface;
        let all: HashMap<String, String> = match client.hgetall(INDEX_KEY).await {
            Ok(all) => all,
            Err(error) => {
                tracing::warn!(error = %error.kind().to_str(), "cannot load revocations");
                return;
            }
        };
        let now = unix_now_ms();
        let mut expired = Vec::new();
        for (field, value) in all {
            match serde_json::from_str::<Revocation>(&value) {
                Ok(revocation) if revocation.expires_at_ms > now => {
                    if self.remember(&revocation) {
                        self.enforce(&revocation);
                    }
                }
                _ => expired.push(field),
            }
        }
        if !expired.is_empty() {
            let _: Result<(), _> = client.hdel(INDEX_KEY, expired).await;
        }
    }

    /// Forgets expired revocations.
    fn prune(&self) {
        let now = unix_now_ms();
        let mut table = self.table.lock().expect("revocations lock");
        table.retain(|_, entry| {
            entry.all = entry.all.take().filter(|r| r.expires_at_ms > now);
            entry.orgs.retain(|r| r.expires_at_ms > now);
            entry.all.is_some() || !entry.orgs.is_empty()
        });
    }

    /// The revocations in force (the status page).
    pub fn in_force(&self) -> Vec<Revocation> {
        self.prune();
        let table = self.table.lock().expect("revocations lock");
        let mut list: Vec<Revocation> = table
            .values()
            .flat_map(|entry| entry.all.iter().chain(entry.orgs.iter()).cloned())
            .collect();
        list.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
        list
    }

    /// Loads on every Redis connect; prunes once a minute.
    pub async fn run(
        self: Arc<Self>,
        mut connects: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = connects.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.load().await;
                }
                _ = prune.tick() => self.prune(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_are_checked() {
        assert_eq!(
            parse_request(&json!({"identity": "player:7", "scope": "org"}), Some("o1")),
            Ok(("player:7".into(), Scope::Org("o1".into()), String::new()))
        );
        assert_eq!(
            parse_request(
                &json!({"identity": "user:u", "scope": "all", "reason": "ban"}),
                None
            ),
            Ok(("user:u".into(), Scope::All, "ban".into()))
        );
        assert_eq!(
            parse_request(&json!({"identity": "player:7", "scope": "org"}), None),
            Err(Invalid::OrgId)
        );
        // An envelope's revocation takes the envelope's org, never the payload's.
        assert_eq!(
            parse_request(
                &json!({"identity": "player:7", "scope": "org", "org_id": "o2"}),
                Some("o1")
            ),
            Ok(("player:7".into(), Scope::Org("o1".into()), String::new()))
        );
        for bad in ["admin:1", "user:", "user", "internal:x"] {
            assert_eq!(
                parse_request(&json!({"identity": bad, "scope": "all"}), None),
                Err(Invalid::Identity)
            );
        }
        assert_eq!(
            parse_request(&json!({"identity": "user:1", "scope": "everything"}), None),
            Err(Invalid::Scope)
        );
    }

    #[test]
    fn tokens_issued_after_a_revocation_are_accepted() {
        let revocation = Revocation {
            identity: "user:u".into(),
            scope: Scope::All,
            reason: String::new(),
            at_ms: 10_000,
            expires_at_ms: u64::MAX,
        };
        assert!(Revocations::refused(&revocation, None, 0));
        assert!(Revocations::refused(&revocation, Some(10_000), 0));
        assert!(!Revocations::refused(&revocation, Some(11_000), 0));
        // Expired: nothing is refused.
        assert!(!Revocations::refused(&revocation, None, u64::MAX));
    }

    #[test]
    fn records_round_trip_as_json() {
        let revocation = Revocation {
            identity: "player:7".into(),
            scope: Scope::Org("o1".into()),
            reason: "roster.player_removed".into(),
            at_ms: 1,
            expires_at_ms: 2,
        };
        let text = serde_json::to_string(&revocation).unwrap();
        assert!(
            text.contains(r#""scope":"org""#) && text.contains(r#""org_id":"o1""#),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<Revocation>(&text).unwrap(),
            revocation
        );
    }
}
