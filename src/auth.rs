//! Authentication: JWT verification into an [`Identity`], the scraper API-key check, and minting
//! of internal tokens (for the reconciler and the `token` subcommand).
//!
//! HS256 is pinned: `none` and every other algorithm are refused before any signature work.
//! This module knows nothing about HTTP or WebSockets; callers hand it the token text.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use crate::id::Id;

/// Who is on the other end of a socket or HTTP call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    User {
        user_id: String,
        org_id: String,
    },
    Player {
        player_id: String,
        org_id: String,
    },
    /// A service token (`type: "internal"`, `iss: "prostaff-api"`); may join and act anywhere.
    Internal,
    /// The status page's own socket (`type: "admin"`, `iss: "prostaff-events"`, minted by
    /// `/admin`): may join `admin:status` only.
    Admin,
}

impl Identity {
    /// The organisation this identity belongs to (`None` for internal services).
    pub fn org_id(&self) -> Option<&str> {
        match self {
            Identity::User { org_id, .. } | Identity::Player { org_id, .. } => Some(org_id),
            Identity::Internal | Identity::Admin => None,
        }
    }

    /// The key presence, revocations and the per-identity connection cap know a person by:
    /// `user:{id}` or `player:{id}`; `None` for services and the status page.
    pub fn key(&self) -> Option<String> {
        match self {
            Identity::User { user_id, .. } => Some(format!("user:{user_id}")),
            Identity::Player { player_id, .. } => Some(format!("player:{player_id}")),
            Identity::Internal | Identity::Admin => None,
        }
    }

    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::User { .. } => "user",
            Identity::Player { .. } => "player",
            Identity::Internal => "internal",
            Identity::Admin => "admin",
        }
    }
}

/// What a revocation takes away.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "scope", content = "org_id", rename_all = "snake_case")]
pub enum Scope {
    /// The org's topics (`inhouse:{org}`, `org_events:{org}`).
    Org(String),
    /// Every socket, long-poll session and SSE stream, and every connect.
    All,
}

impl Scope {
    pub fn label(&self) -> &'static str {
        match self {
            Scope::Org(_) => "org",
            Scope::All => "all",
        }
    }
}

/// A verified token: the identity and, when the token has one, its expiry (unix seconds).
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub identity: Identity,
    pub expires_at: Option<u64>,
    /// The token's `iat` in unix milliseconds (a revocation refuses tokens issued at or before
    /// it, and tokens without `iat`). An unusable `iat` counts as absent.
    pub issued_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    MissingToken,
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("invalid signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token has no exp")]
    MissingExp,
    #[error("missing identity claims")]
    MissingIdentityClaims,
    #[error("exp or nbf is not a valid timestamp")]
    InvalidTimeClaim,
    #[error("this signing key may not grant that identity")]
    IdentityNotAllowedForKey,
}

impl AuthError {
    /// Stable label for the `reason` metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::MissingExp => "missing_exp",
            AuthError::MissingIdentityClaims => "missing_identity_claims",
            AuthError::InvalidTimeClaim => "invalid_time_claim",
            AuthError::IdentityNotAllowedForKey => "identity_not_allowed_for_key",
        }
    }
}

/// Which secret signed a token, and so which identities it may grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyScope {
    /// `INTERNAL_JWT_SECRET`: any identity.
    Internal,
    /// `JWT_SECRET_KEY` (Rails user tokens): User and Player only, never Internal.
    RailsUsers,
}

/// The latest `exp` accepted (9999-12-31T23:59:59Z); anything beyond is refused as absurd.
pub const MAX_TIMESTAMP: f64 = 253_402_300_799.0;

/// Verifies HS256 tokens against the internal secret and, when configured, the Rails secret.
///
/// `exp` and `nbf` are checked here rather than by `jsonwebtoken`, so that integer and float
/// timestamps are enforced alike, strings, negatives and absurd values are refused, and the
/// leeway (`JWT_LEEWAY_S`) applies to both.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: Vec<(DecodingKey, KeyScope)>,
    validation: Validation,
    require_exp: bool,
    leeway_s: u64,
}

impl TokenVerifier {
    pub fn new(internal_secret: &str, rails_secret: Option<&str>, require_exp: bool) -> Self {
        TokenVerifier::with_leeway(internal_secret, rails_secret, require_exp, 0)
    }

    pub fn with_leeway(
        internal_secret: &str,
        rails_secret: Option<&str>,
        require_exp: bool,
        leeway_s: u64,
    ) -> Self {
        let mut keys = vec![(
            DecodingKey::from_secret(internal_secret.as_bytes()),
            KeyScope::Internal,
        )];
        if let Some(secret) = rails_secret {
            keys.push((
                DecodingKey::from_secret(secret.as_bytes()),
                KeyScope::RailsUsers,
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        TokenVerifier {
            keys,
            validation,
            require_exp,
            leeway_s,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Authenticated, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        // The header is checked first so `alg: none` and friends never reach signature code.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        for (key, scope) in &self.keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation) {
                Ok(data) => return self.authenticate(&data.claims, *scope, unix_now()),
                Err(error) => match error.kind() {
                    // Only a signature mismatch is worth trying the next secret for.
                    ErrorKind::InvalidSignature => continue,
                    ErrorKind::InvalidAlgorithm => return Err(AuthError::AlgorithmNotAllowed),
                    _ => return Err(AuthError::Malformed),
                },
            }
        }
        Err(AuthError::BadSignature)
    }

    fn authenticate(
        &self,
        claims: &Map<String, Value>,
        scope: KeyScope,
        now: u64,
    ) -> Result<Authenticated, AuthError> {
        let exp = timestamp_claim(claims, "exp")?;
        let nbf = timestamp_claim(claims, "nbf")?;
        let (now, leeway) = (now as f64, self.leeway_s as f64);
        if let Some(nbf) = nbf {
            if now + leeway < nbf {
                return Err(AuthError::NotYetValid);
            }
        }
        let expires_at = match exp {
            Some(exp) if now > exp + leeway => return Err(AuthError::Expired),
            // The live socket closes when the token would be refused: at exp plus the leeway.
            Some(exp) => Some((exp + leeway).ceil() as u64),
            None if self.require_exp => return Err(AuthError::MissingExp),
            None => None,
        };
        let identity = identity_from_claims(claims)?;
        if scope == KeyScope::RailsUsers && matches!(identity, Identity::Internal | Identity::Admin)
        {
            return Err(AuthError::IdentityNotAllowedForKey);
        }
        let issued_at_ms = timestamp_claim(claims, "iat")
            .ok()
            .flatten()
            .map(|iat| (iat * 1000.0) as u64);
        Ok(Authenticated {
            identity,
            expires_at,
            issued_at_ms,
        })
    }
}

/// A NumericDate claim: an integer or float of seconds between 0 and [`MAX_TIMESTAMP`].
fn timestamp_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() && (0.0..=MAX_TIMESTAMP).contains(&t) => Ok(Some(t)),
            _ => Err(AuthError::InvalidTimeClaim),
        },
        Some(_) => Err(AuthError::InvalidTimeClaim),
    }
}

/// An id claim ([`Id`]'s rule: an over-long or blank id is no id).
fn claim_id(claims: &Map<String, Value>, name: &str) -> Option<String> {
    Id::from_json(claims.get(name)?).map(Id::into_string)
}

/// Maps the claim shapes of DESIGN.md onto identities.
pub fn identity_from_claims(claims: &Map<String, Value>) -> Result<Identity, AuthError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("type") == Some("internal") && text("iss") == Some("prostaff-api") {
        return Ok(Identity::Internal);
    }
    if text("type") == Some("admin") && text("iss") == Some(ADMIN_ISSUER) {
        return Ok(Identity::Admin);
    }
    if text("entity_type") == Some("player") {
        if let (Some(player_id), Some(org_id)) = (
            claim_id(claims, "player_id"),
            claim_id(claims, "organization_id"),
        ) {
            return Ok(Identity::Player { player_id, org_id });
        }
        return Err(AuthError::MissingIdentityClaims);
    }
    if let Some(user_id) = claim_id(claims, "user_id") {
        if let Some(org_id) =
            claim_id(claims, "org_id").or_else(|| claim_id(claims, "organization_id"))
        {
            return Ok(Identity::User { user_id, org_id });
        }
    }
    Err(AuthError::MissingIdentityClaims)
}

/// A token's expiry (unix seconds) as a timer instant.
pub fn expiry_instant(expires_at: u64) -> tokio::time::Instant {
    let at = UNIX_EPOCH + std::time::Duration::from_secs(expires_at);
    let remaining = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + remaining
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Signs `claims` with HS256.
pub fn mint(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of a JSON object cannot fail")
}

/// Issuer of the status page's socket tokens.
pub const ADMIN_ISSUER: &str = "prostaff-events";

/// A token for the status page's socket: it may join `admin:status` and nothing else.
pub fn mint_admin_token(secret: &str, ttl_s: u64) -> String {
    let iat = unix_now();
    mint(
        secret,
        &serde_json::json!({"type": "admin", "iss": ADMIN_ISSUER, "iat": iat, "exp": iat + ttl_s}),
    )
}

/// The token the hub sends to Rails (`iss: prostaff-events`, one minute of life).
pub fn mint_reconciler_token(secret: &str) -> String {
    let iat = unix_now();
    mint(
        secret,
        &serde_json::json!({"type": "internal", "iss": "prostaff-events", "iat": iat, "exp": iat + 60}),
    )
}

/// Constant-time comparison of an offered API key with the configured one. An empty configured
/// key refuses everything.
pub fn api_key_matches(configured: &str, offered: Option<&str>) -> bool {
    match offered {
        Some(offered) if !configured.is_empty() => {
            bool::from(configured.as_bytes().ct_eq(offered.as_bytes()))
        }
        _ => false,
    }
}

/// Decodes the token carried in the phoenix.js `authToken` subprotocol entry
/// (`base64url.bearer.phx.<standard base64 without padding>`).
pub fn token_from_subprotocol(entry: &str) -> Option<String> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let encoded = entry
        .trim()
        .strip_prefix("base64url.bearer.phx.")?
        .trim_end_matches('=');
    let bytes = STANDARD_NO_PAD
        .decode(encoded)
        .or_else(|_| URL_SAFE_NO_PAD.decode(encoded))
        .ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "test-secret-test-secret-test-secret";

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(SECRET, Some("rails-secret"), false)
    }

    #[test]
    fn identity_claims_follow_the_id_rule() {
        let v = verifier();
        let long = "x".repeat(crate::limits::MAX_ID_BYTES + 1);
        for claims in [
            json!({"user_id": long, "org_id": "o1"}),
            json!({"user_id": "u1", "org_id": long}),
            json!({"user_id": "u\n1", "org_id": "o1"}),
            json!({"entity_type": "player", "player_id": long, "organization_id": "o1"}),
        ] {
            let error = v.verify(&mint(SECRET, &claims)).unwrap_err();
            assert_eq!(error.reason(), "missing_identity_claims", "{claims}");
        }
        let longest = "x".repeat(crate::limits::MAX_ID_BYTES);
        let ok = v
            .verify(&mint(SECRET, &json!({"user_id": longest, "org_id": "o1"})))
            .unwrap();
        assert_eq!(ok.identity.key().unwrap(), format!("user:{longest}"));
    }

    #[test]
    fn identities_from_each_claim_shape() {
        let v = verifier();
        let user = v
            .verify(&mint(SECRET, &json!({"user_id": "u1", "org_id": "o1"})))
            .unwrap();
        assert_eq!(
            user.identity,
            Identity::User {
                user_id: "u1".into(),
                org_id: "o1".into()
            }
        );
        let rails = v
            .verify(&mint(
                "rails-secret",
                &json!({"user_id": 7, "organization_id": 9, "exp": unix_now() + 60}),
            ))
            .unwrap();
        assert_eq!(
            rails.identity,
            Identity::User {
                user_id: "7".into(),
                org_id: "9".into()
            }
        );
        assert!(rails.expires_at.is_some());
        let player = v
            .verify(&mint(
                SECRET,
                &json!({"entity_type": "player", "player_id": "p1", "organization_id": "o1"}),
            ))
            .unwrap();
        assert_eq!(
            player.identity,
            Identity::Player {
                player_id: "p1".into(),
                org_id: "o1".into()
            }
        );
        let internal = v
            .verify(&mint(
                SECRET,
                &json!({"type": "internal", "iss": "prostaff-api"}),
            ))
            .unwrap();
        assert_eq!(internal.identity, Identity::Internal);
    }

    #[test]
    fn refusals_have_specific_reasons() {
        let v = verifier();
        assert_eq!(
            v.verify(&mint("wrong", &json!({"user_id": "u", "org_id": "o"})))
                .unwrap_err(),
            AuthError::BadSignature
        );
        assert_eq!(
            v.verify(&mint(
                SECRET,
                &json!({"user_id": "u", "org_id": "o", "exp": unix_now() - 10})
            ))
            .unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            v.verify(&mint(
                SECRET,
                &json!({"user_id": "u", "org_id": "o", "nbf": unix_now() + 100})
            ))
            .unwrap_err(),
            AuthError::NotYetValid
        );
        assert_eq!(
            v.verify(&mint(SECRET, &json!({"user_id": "u"})))
                .unwrap_err(),
            AuthError::MissingIdentityClaims
        );
        assert_eq!(
            v.verify(&mint(
                SECRET,
                &json!({"type": "internal", "iss": "someone-else"})
            ))
            .unwrap_err(),
            AuthError::MissingIdentityClaims
        );
        assert_eq!(v.verify("garbage").unwrap_err(), AuthError::Malformed);
        assert_eq!(v.verify("").unwrap_err(), AuthError::MissingToken);
    }

    #[test]
    fn alg_none_is_refused() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(br#"{"user_id":"u","org_id":"o"}"#);
        let err = verifier().verify(&format!("{header}.{body}.")).unwrap_err();
        assert!(
            matches!(err, AuthError::AlgorithmNotAllowed | AuthError::Malformed),
            "{err:?}"
        );
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"user_id": "u", "org_id": "o"}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            verifier().verify(&hs512).unwrap_err(),
            AuthError::AlgorithmNotAllowed
        );
    }

    #[test]
    fn exp_can_be_required() {
        let strict = TokenVerifier::new(SECRET, None, true);
        assert_eq!(
            strict
                .verify(&mint(SECRET, &json!({"user_id": "u", "org_id": "o"})))
                .unwrap_err(),
            AuthError::MissingExp
        );
    }

    #[test]
    fn the_rails_key_never_grants_an_internal_identity() {
        let internal_claims = json!({"type": "internal", "iss": "prostaff-api"});
        assert_eq!(
            verifier()
                .verify(&mint("rails-secret", &internal_claims))
                .unwrap_err(),
            AuthError::IdentityNotAllowedForKey
        );
        // The same claims with the internal secret are an Internal identity.
        assert_eq!(
            verifier()
                .verify(&mint(SECRET, &internal_claims))
                .unwrap()
                .identity,
            Identity::Internal
        );
        // Nor an admin one: admin tokens are the hub's own, minted with the internal secret.
        let admin_claims = json!({"type": "admin", "iss": ADMIN_ISSUER});
        assert_eq!(
            verifier()
                .verify(&mint("rails-secret", &admin_claims))
                .unwrap_err(),
            AuthError::IdentityNotAllowedForKey
        );
        assert_eq!(
            verifier()
                .verify(&mint_admin_token(SECRET, 60))
                .unwrap()
                .identity,
            Identity::Admin
        );
        // Rails user and player tokens still work.
        let player = json!({"entity_type": "player", "player_id": 1, "organization_id": 2});
        assert!(verifier().verify(&mint("rails-secret", &player)).is_ok());
    }

    #[test]
    fn float_string_negative_and_absurd_times() {
        let v = TokenVerifier::with_leeway(SECRET, None, false, 0);
        let now = unix_now() as f64;
        let with = |claims: Value| v.verify(&mint(SECRET, &claims));
        let user = |extra: Value| {
            let mut claims = json!({"user_id": "u", "org_id": "o"});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            claims
        };
        assert_eq!(
            with(user(json!({"exp": now - 10.5}))).unwrap_err(),
            AuthError::Expired
        );
        let live = with(user(json!({"exp": now + 60.25}))).unwrap();
        assert_eq!(
            live.expires_at,
            Some((now + 60.25).ceil() as u64),
            "float exp is enforced"
        );
        assert_eq!(
            with(user(json!({"nbf": now + 100.5}))).unwrap_err(),
            AuthError::NotYetValid
        );
        for bad in [
            json!("1999999999"),
            json!(-5),
            json!(1e300),
            json!(u64::MAX),
            json!(true),
        ] {
            assert_eq!(
                with(user(json!({"exp": bad.clone()}))).unwrap_err(),
                AuthError::InvalidTimeClaim,
                "{bad}"
            );
        }
        assert_eq!(
            with(user(json!({"nbf": "soon"}))).unwrap_err(),
            AuthError::InvalidTimeClaim
        );
    }

    #[test]
    fn leeway_covers_clock_skew_both_ways() {
        let v = TokenVerifier::with_leeway(SECRET, None, false, 30);
        let now = unix_now();
        let claims =
            |exp: u64, nbf: u64| json!({"user_id": "u", "org_id": "o", "exp": exp, "nbf": nbf});
        let ok = v
            .verify(&mint(SECRET, &claims(now - 10, now + 10)))
            .unwrap();
        assert_eq!(
            ok.expires_at,
            Some(now - 10 + 30),
            "socket closes at exp + leeway"
        );
        assert_eq!(
            v.verify(&mint(SECRET, &claims(now - 40, now))).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            v.verify(&mint(SECRET, &claims(now + 100, now + 40)))
                .unwrap_err(),
            AuthError::NotYetValid
        );
    }

    #[test]
    fn api_key_compare() {
        assert!(api_key_matches("k", Some("k")));
        assert!(!api_key_matches("k", Some("K")));
        assert!(!api_key_matches("k", None));
        assert!(!api_key_matches("", Some("")));
    }

    #[test]
    fn subprotocol_token_decodes_standard_base64() {
        use base64::engine::general_purpose::STANDARD_NO_PAD;
        use base64::Engine;
        let token = "a+b/c?=";
        let entry = format!("base64url.bearer.phx.{}", STANDARD_NO_PAD.encode(token));
        assert_eq!(token_from_subprotocol(&entry).as_deref(), Some(token));
        assert_eq!(token_from_subprotocol("phoenix"), None);
    }
}
