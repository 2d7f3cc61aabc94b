//! Configuration: every setting of the hub, read from environment variables (the same names as
//! the Elixir service), optionally backed by a TOML file under `config/`.
//!
//! Parsing is a pure function of a lookup (`Config::from_lookup`) so it is unit-testable with a
//! map; nothing here binds ports or opens connections. Bad values produce a [`ConfigError`] that
//! names the variable; `main` turns it into exit code 64.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Development-only secret used when `INTERNAL_JWT_SECRET` is unset outside production.
pub const DEV_INTERNAL_SECRET: &str = "dev-only-insecure-internal-secret-change-me-0000";
/// Shortest secret accepted in production (HS256 wants at least 256 bits of key).
pub const MIN_PRODUCTION_SECRET_LEN: usize = 32;
/// Default location of the optional TOML file; `PROSTAFF_EVENTS_CONFIG` overrides it.
pub const DEFAULT_CONFIG_FILE: &str = "config/prostaff-events.toml";

/// One documented setting: its variable name, default and meaning. The table drives `--help`,
/// `.env.example` and the README, so they cannot drift apart.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

pub const SETTINGS: &[Setting] = &[
    Setting { name: "PORT", default: "4000", meaning: "HTTP/WebSocket port" },
    Setting { name: "BIND_ADDR", default: "0.0.0.0", meaning: "listen address" },
    Setting { name: "REDIS_URL", default: "redis://127.0.0.1:6379/0", meaning: "Redis URL; `redis://` is prepended when the scheme is missing" },
    Setting { name: "REDIS_PASSWORD", default: "", meaning: "password of the Redis data nodes, used when REDIS_URL carries none (and with Sentinel)" },
    Setting { name: "REDIS_CLUSTER_NODES", default: "", meaning: "`host:port,host:port,…` of Redis Cluster nodes (any reachable ones: the hub discovers the rest and follows slot moves and failovers; REDIS_URL is then ignored)" },
    Setting { name: "REDIS_SENTINELS", default: "", meaning: "`host:port,host:port,…` of Redis Sentinels: the hub finds the master through them and follows every failover (REDIS_URL is then ignored)" },
    Setting { name: "REDIS_SENTINEL_MASTER", default: "", meaning: "the master's name in the Sentinel configuration (required with REDIS_SENTINELS)" },
    Setting { name: "REDIS_SENTINEL_PASSWORD", default: "", meaning: "password of the Sentinels themselves, if they have one" },
    Setting { name: "INTERNAL_JWT_SECRET", default: "(dev secret, with a warning)", meaning: "HS256 secret for internal tokens and the original hub's user tokens; required (>= 32 bytes) when APP_ENV=production" },
    Setting { name: "JWT_SECRET_KEY", default: "", meaning: "Rails user-token secret; tokens signed with it are accepted too" },
    Setting { name: "RAILS_API_URL", default: "http://localhost:3333", meaning: "Rails base URL for the reconciler and readiness" },
    Setting { name: "SCRAPER_API_KEY", default: "", meaning: "X-Api-Key for POST /events/notify; empty refuses every request" },
    Setting { name: "PHX_HOST", default: "localhost", meaning: "public host name (HTTPS redirects)" },
    Setting { name: "ALLOWED_ORIGINS", default: "(any)", meaning: "comma list of Origins allowed to open a socket and make CORS requests" },
    Setting { name: "FORCE_SSL", default: "false", meaning: "redirect X-Forwarded-Proto: http to https and send HSTS" },
    Setting { name: "RATE_LIMIT_MAX", default: "10", meaning: "join_queue attempts allowed per org in one window" },
    Setting { name: "RATE_LIMIT_WINDOW_MS", default: "60000", meaning: "join_queue sliding window length" },
    Setting { name: "RECONCILER_RETRY_DELAYS_MS", default: "1000,2000,4000", meaning: "delays between startup reconcile attempts" },
    Setting { name: "RECONCILE_INTERVAL_MS", default: "30000", meaning: "periodic re-reconcile interval (0 disables)" },
    Setting { name: "APP_ENV", default: "dev", meaning: "`production` refuses weak or missing secrets" },
    Setting { name: "LOG_FORMAT", default: "text", meaning: "`text` or `json`" },
    Setting { name: "RUST_LOG", default: "info", meaning: "log filter (tracing EnvFilter syntax)" },
    Setting { name: "SECRET_KEY_BASE", default: "", meaning: "accepted for drop-in compatibility; unused" },
    Setting { name: "REQUIRE_TOKEN_EXP", default: "false", meaning: "refuse tokens without `exp`" },
    Setting { name: "SHUTDOWN_GRACE_MS", default: "10000", meaning: "drain budget on SIGTERM/SIGINT" },
    Setting { name: "MAX_FRAME_BYTES", default: "65536", meaning: "largest inbound WebSocket message; larger closes with 1009" },
    Setting { name: "MAX_CHANNELS_PER_SOCKET", default: "100", meaning: "joined topics per socket; more get `too many channels joined`" },
    Setting { name: "OUTBOUND_BUFFER_FRAMES", default: "4096", meaning: "broadcast frames queued per socket before the oldest are dropped (frames are shared between sockets: a full outbox costs 8 bytes per frame)" },
    Setting { name: "WRITE_TIMEOUT_MS", default: "10000", meaning: "a socket unable to write for this long is closed with 1013" },
    Setting { name: "IDLE_TIMEOUT_MS", default: "60000", meaning: "a socket with no inbound frame for this long is closed with 1001" },
    Setting { name: "MAX_CONNECTIONS", default: "0 (unlimited)", meaning: "concurrent sockets; more are refused with 503" },
    Setting { name: "MAX_PUSHES_PER_SECOND", default: "50", meaning: "client frames per second per socket (burst of the same size); more get `rate_limited`" },
    Setting { name: "MAX_BODY_BYTES", default: "65536", meaning: "largest HTTP request body; larger gets 413" },
    Setting { name: "MAX_CONNECTIONS_PER_IDENTITY", default: "100", meaning: "concurrent sockets per identity (user, player, or all internal services together) on one instance; more are refused with 429 (0 = unlimited)" },
    Setting { name: "JWT_LEEWAY_S", default: "30", meaning: "clock-skew leeway in seconds for token exp and nbf" },
    Setting { name: "NOTIFY_ALLOWED_TYPES", default: DEFAULT_NOTIFY_ALLOWED_TYPES, meaning: "comma list of event-type prefixes POST /events/notify may publish (`*` = any); others get 403" },
    Setting { name: "READINESS_REQUIRES_RAILS", default: "false", meaning: "make /health/ready 503 when Rails is down (the original behaviour); by default only Redis decides" },
    Setting { name: "METRICS_TOKEN", default: "", meaning: "when set, GET /metrics requires `Authorization: Bearer <token>`" },
    Setting { name: "METRICS_BIND_ADDR", default: "", meaning: "when set (ip:port), /metrics is served only on this separate listener" },
    Setting { name: "HISTORY_SIZE", default: "300", meaning: "broadcasts kept per topic in Redis for recovery (0 turns history and positions off)" },
    Setting { name: "HISTORY_TTL_MS", default: "600000", meaning: "a topic's history expires after this long without a broadcast" },
    Setting { name: "PRESENCE_FAMILIES", default: "inhouse,org_events", meaning: "topic families with presence (`presence_state`/`presence_diff`); any of notifications, tournament, inhouse, org_events; `none` turns presence off" },
    Setting { name: "PRESENCE_TTL_MS", default: "30000", meaning: "members of a hub that stopped renewing its presence lease (a crash) leave everywhere after this long" },
    Setting { name: "PRESENCE_MAX_MEMBERS", default: "20000", meaning: "sockets tracked in one topic's presence across all hubs (counted in its summary); later ones stay joined but are not tracked" },
    Setting { name: "PRESENCE_LIST_MAX", default: "256", meaning: "metas a topic's presence lists (and at most 60 KiB of them); above it subscribers get a stable listing of that many and a `presence_summary` with the exact counts" },
    Setting { name: "LONGPOLL_HOLD_MS", default: "10000", meaning: "how long a long-poll GET waits for messages before answering 204" },
    Setting { name: "LONGPOLL_SESSION_TIMEOUT_MS", default: "20000", meaning: "a long-poll session with no request for this long ends (its channels leave)" },
    Setting { name: "REVOCATION_TTL_S", default: "86400", meaning: "how long a revocation (`access.revoked`, a roster removal) refuses the identity's older tokens; set it to the longest token lifetime Rails issues" },
    Setting { name: "EVENT_SCHEMAS", default: "warn", meaning: "what ingest does with an envelope its type's schema (config/events/) rejects: `enforce` drops it into the dead-letter stream (HTTP answers 422), `warn` delivers and counts it, `off` skips validation" },
    Setting { name: "EVENTS_STREAM", default: "prostaff:events:stream", meaning: "a Redis Stream every instance also reads envelopes from (`XADD <key> MAXLEN ~ 100000 * envelope <json>`), each from the last entry it delivered, so what is added while an instance reconnects reaches its clients; `off` stops reading it" },
    Setting { name: "DEAD_LETTER_MAXLEN", default: "10000", meaning: "entries kept (approximately) in the dead-letter stream `prostaff:events:dead`" },
    Setting { name: "ADMIN_TOKEN", default: "", meaning: "when set (>= 32 bytes in production), opens GET /admin besides an internal JWT" },
    Setting { name: "PROSTAFF_EVENTS_CONFIG", default: "(config/prostaff-events.toml when it exists)", meaning: "optional TOML file with any of these variables (environment wins); empty means none" },
];

/// Event-type prefixes the scraper key may publish by default: never `inhouse.` (queue control)
/// nor `notification.` (pushes to users).
pub const DEFAULT_NOTIFY_ALLOWED_TYPES: &str = "scraper.,match.,tournament_match.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppEnv {
    Dev,
    Test,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Limits that protect the hub from slow or abusive clients.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_channels_per_socket: usize,
    pub outbound_buffer_frames: usize,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None` means unlimited.
    pub max_connections: Option<usize>,
    /// `None` means unlimited.
    pub max_pushes_per_second: Option<u32>,
    pub max_body_bytes: usize,
    /// `None` means unlimited.
    pub max_connections_per_identity: Option<usize>,
}

impl Default for Limits {
    /// The defaults of [`SETTINGS`].
    fn default() -> Self {
        Limits::from_settings(&|_| None).expect("the SETTINGS defaults parse")
    }
}

impl Limits {
    fn from_settings(get: &impl Fn(&str) -> Option<String>) -> Result<Limits, ConfigError> {
        let max_connections_per_identity: usize = parse_or(get, "MAX_CONNECTIONS_PER_IDENTITY")?;

        let max_connections: usize = parse_or(get, "MAX_CONNECTIONS")?;
        let max_pushes: u32 = parse_or(get, "MAX_PUSHES_PER_SECOND")?;

        Ok(Limits {
            max_frame_bytes: parse_positive(get, "MAX_FRAME_BYTES")?,
            max_channels_per_socket: parse_positive(get, "MAX_CHANNELS_PER_SOCKET")?,
            outbound_buffer_frames: parse_positive(get, "OUTBOUND_BUFFER_FRAMES")?,
            write_timeout: Duration::from_millis(parse_positive(get, "WRITE_TIMEOUT_MS")?),
            idle_timeout: Duration::from_millis(parse_positive(get, "IDLE_TIMEOUT_MS")?),
            max_connections: (max_connections > 0).then_some(max_connections),
            max_pushes_per_second: (max_pushes > 0).then_some(max_pushes),
            max_body_bytes: parse_positive(get, "MAX_BODY_BYTES")?,
            max_connections_per_identity: (max_connections_per_identity > 0)
                .then_some(max_connections_per_identity),
        })
    }
}

/// Which browser `Origin`s may open a socket or make CORS requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPolicy {
    /// Development default: any Origin.
    Any,
    /// `ALLOWED_ORIGINS`: exactly these (scheme://host[:port]).
    List(Vec<String>),
    /// Production without `ALLOWED_ORIGINS`: Origins whose host is `PHX_HOST`.
    Host(String),
}

impl OriginPolicy {
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/');
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::List(list) => list.iter().any(|allowed| allowed == origin),
            OriginPolicy::Host(host) => {
                let without_scheme = origin.split_once("://").map_or(origin, |(_, rest)| rest);
                let origin_host = without_scheme
                    .rsplit_once(':')
                    .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
                    .map_or(without_scheme, |(host, _)| host);
                origin_host.eq_ignore_ascii_case(host)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub bind_addr: IpAddr,
    pub redis_url: String,
    pub internal_jwt_secret: String,
    /// True when the development default secret is in use (logged loudly at startup).
    pub using_dev_secret: bool,
    pub jwt_secret_key: Option<String>,
    pub rails_api_url: String,
    pub scraper_api_key: String,
    pub phx_host: String,
    pub origins: OriginPolicy,
    pub force_ssl: bool,
    pub rate_limit_max: u32,
    pub rate_limit_window: Duration,
    pub reconciler_retry_delays: Vec<Duration>,
    /// `None` disables the periodic reconcile.
    pub reconcile_interval: Option<Duration>,
    pub app_env: AppEnv,
    pub log_format: LogFormat,
    pub require_token_exp: bool,
    pub shutdown_grace: Duration,
    pub limits: Limits,
    pub jwt_leeway_s: u64,
    /// Event-type prefixes `/events/notify` may publish; `None` allows any.
    pub notify_allowed_types: Option<Vec<String>>,
    pub readiness_requires_rails: bool,
    pub metrics_token: Option<String>,
    pub metrics_bind_addr: Option<SocketAddr>,
    /// Broadcasts kept per topic; 0 turns history off.
    pub history_size: usize,
    pub history_ttl: Duration,
    /// `REVOCATION_TTL_S`: how long a revocation is kept and enforced.
    pub revocation_ttl: Duration,
    pub presence: PresenceConfig,
    pub longpoll: LongPollConfig,
    /// Opens `/admin` (besides an internal JWT) when set.
    pub admin_token: Option<String>,
    /// `EVENT_SCHEMAS`.
    pub event_schemas: SchemaMode,
    /// `DEAD_LETTER_MAXLEN`.
    pub dead_letter_maxlen: u64,
    /// `EVENTS_STREAM`: the stream envelopes are also read from; `None` when `off`.
    pub events_stream: Option<String>,
}

/// Presence settings.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Topic families with presence (labels: `inhouse`, `org_events`, …); empty turns it off.
    pub families: Vec<String>,
    pub ttl: Duration,
    /// Metas (sockets) tracked per topic at most, across instances.
    pub max_members: usize,
    /// Metas a topic's subscribers are shown at most (its listing bound).
    pub list_max: usize,
}

/// Long-poll settings.
#[derive(Debug, Clone)]
pub struct LongPollConfig {
    /// A GET waits this long for messages before answering 204.
    pub hold: Duration,
    /// A session without any request for this long ends.
    pub session_timeout: Duration,
}

/// `EVENT_SCHEMAS`: what ingest does with an envelope its type's schema rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchemaMode {
    /// Dropped into the dead-letter stream; HTTP publishers get 422.
    Enforce,
    /// Delivered and counted (`prostaff_events_invalid_total{type}`).
    #[default]
    Warn,
    /// Not validated.
    Off,
}

impl SchemaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaMode::Enforce => "enforce",
            SchemaMode::Warn => "warn",
            SchemaMode::Off => "off",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {variable}: {message}")]
    Invalid {
        variable: &'static str,
        message: String,
    },
    #[error("cannot read config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

fn invalid(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        variable,
        message: message.into(),
    }
}

impl Config {
    /// Reads the process environment, backed by the optional TOML file.
    pub fn from_env() -> Result<Config, ConfigError> {
        let file_path = std::env::var("PROSTAFF_EVENTS_CONFIG")
            .ok()
            .filter(|path| !path.trim().is_empty());
        let file_values = match file_path {
            Some(path) => read_toml_settings(Path::new(&path))?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                read_toml_settings(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => HashMap::new(),
        };
        Config::from_lookup(|name| {
            std::env::var(name)
                .ok()
                .or_else(|| file_values.get(name).cloned())
        })
    }

    /// Development defaults, as `cargo run` with nothing set would produce.
    pub fn development() -> Config {
        Config::from_lookup(|_| None).expect("defaults are valid")
    }

    /// Builds a config from any lookup of variable name to value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let app_env = app_env(&get)?;
        let production = app_env == AppEnv::Production;
        let Secrets {
            internal_jwt_secret,
            using_dev_secret,
            jwt_secret_key,
            scraper_api_key,
            admin_token,
        } = Secrets::from_settings(&get, production)?;

        let redis_url = redis_url(&get)?;
        let phx_host = value_or_default(&get, "PHX_HOST").unwrap_or_default();
        let origins = origins(&get, production, &phx_host);
        let reconcile_interval_ms: u64 = parse_or(&get, "RECONCILE_INTERVAL_MS")?;
        Ok(Config {
            port: parse_or(&get, "PORT")?,
            bind_addr: parse_or(&get, "BIND_ADDR")?,
            redis_url,
            internal_jwt_secret,
            using_dev_secret,
            jwt_secret_key,
            rails_api_url: value_or_default(&get, "RAILS_API_URL")
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string(),
            scraper_api_key,
            phx_host,
            origins,
            force_ssl: parse_bool(&get, "FORCE_SSL")?,
            rate_limit_max: parse_positive(&get, "RATE_LIMIT_MAX")?,
            rate_limit_window: Duration::from_millis(parse_positive(&get, "RATE_LIMIT_WINDOW_MS")?),
            reconciler_retry_delays: reconciler_retry_delays(&get)?,
            reconcile_interval: (reconcile_interval_ms > 0)
                .then(|| Duration::from_millis(reconcile_interval_ms)),
            app_env,
            log_format: log_format(&get)?,
            require_token_exp: parse_bool(&get, "REQUIRE_TOKEN_EXP")?,
            shutdown_grace: Duration::from_millis(parse_or(&get, "SHUTDOWN_GRACE_MS")?),
            limits: Limits::from_settings(&get)?,
            jwt_leeway_s: parse_or(&get, "JWT_LEEWAY_S")?,
            notify_allowed_types: notify_allowed_types(&get),
            readiness_requires_rails: parse_bool(&get, "READINESS_REQUIRES_RAILS")?,
            metrics_token: get("METRICS_TOKEN"),
            metrics_bind_addr: metrics_bind_addr(&get)?,
            history_size: parse_or(&get, "HISTORY_SIZE")?,
            history_ttl: Duration::from_millis(parse_positive(&get, "HISTORY_TTL_MS")?),
            revocation_ttl: Duration::from_secs(parse_positive(&get, "REVOCATION_TTL_S")?),
            event_schemas: event_schemas(&get)?,
            dead_letter_maxlen: parse_positive(&get, "DEAD_LETTER_MAXLEN")?,
            events_stream: events_stream(&get)?,
            presence: PresenceConfig {
                families: presence_families(&get)?,
                ttl: Duration::from_millis(parse_positive(&get, "PRESENCE_TTL_MS")?),
                max_members: parse_positive(&get, "PRESENCE_MAX_MEMBERS")?,
                list_max: parse_positive(&get, "PRESENCE_LIST_MAX")?,
            },
            longpoll: LongPollConfig {
                hold: Duration::from_millis(parse_positive(&get, "LONGPOLL_HOLD_MS")?),
                session_timeout: Duration::from_millis(parse_positive(
                    &get,
                    "LONGPOLL_SESSION_TIMEOUT_MS",
                )?),
            },
            admin_token,
        })
    }
}

/// `REDIS_URL` with `REDIS_PASSWORD` applied, or the Sentinel URL `REDIS_SENTINELS` describes,
/// checked to be a URL fred accepts.
fn redis_url(get: &impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    if get("REDIS_CLUSTER_NODES").is_some() && get("REDIS_SENTINELS").is_some() {
        return Err(invalid(
            "REDIS_CLUSTER_NODES",
            "set either REDIS_CLUSTER_NODES or REDIS_SENTINELS, not both",
        ));
    }
    if let Some(nodes) = get("REDIS_CLUSTER_NODES") {
        return cluster_url(get, &nodes);
    }
    if let Some(sentinels) = get("REDIS_SENTINELS") {
        return sentinel_url(get, &sentinels);
    }
    let redis_url = normalize_redis_url(
        &value_or_default(get, "REDIS_URL").unwrap_or_default(),
        get("REDIS_PASSWORD").as_deref(),
    );
    usable_by_fred(redis_url, "REDIS_URL", "a usable Redis URL")
}

/// `url` when fred accepts it; otherwise an error naming `variable`.
fn usable_by_fred(url: String, variable: &'static str, what: &str) -> Result<String, ConfigError> {
    match fred::types::config::Config::from_url(&url) {
        Ok(_) => Ok(url),
        Err(error) => Err(invalid(
            variable,
            format!("not {what}: {}", error.details()),
        )),
    }
}

/// A `host:port,host:port,…` list of `variable`, each entry checked.
fn node_list<'a>(variable: &'static str, list: &'a str) -> Result<Vec<&'a str>, ConfigError> {
    let nodes: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .collect();
    let bad_node = nodes.iter().find(|node| {
        !node
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    });
    if nodes.is_empty() || bad_node.is_some() {
        return Err(invalid(
            variable,
            format!(
                "expected host:port,host:port,…, got {:?}",
                bad_node.unwrap_or(&list)
            ),
        ));
    }
    Ok(nodes)
}

/// `redis-cluster://[:password@]first?node=…`: fred discovers the cluster from any of them.
fn cluster_url(get: &impl Fn(&str) -> Option<String>, list: &str) -> Result<String, ConfigError> {
    let nodes = node_list("REDIS_CLUSTER_NODES", list)?;
    let credentials = get("REDIS_PASSWORD")
        .map(|password| format!(":{}@", percent_encode(&password)))
        .unwrap_or_default();
    let others: Vec<String> = nodes[1..]
        .iter()
        .map(|node| format!("node={node}"))
        .collect();
    let mut url = format!("redis-cluster://{credentials}{}", nodes[0]);
    if !others.is_empty() {
        url.push('?');
        url.push_str(&others.join("&"));
    }
    usable_by_fred(url, "REDIS_CLUSTER_NODES", "a usable cluster node list")
}

/// `redis-sentinel://[:password@]first/0?sentinelServiceName=…&node=…[&sentinelPassword=…]`:
/// fred asks the Sentinels for the master at every connect.
fn sentinel_url(
    get: &impl Fn(&str) -> Option<String>,
    sentinels: &str,
) -> Result<String, ConfigError> {
    let nodes = node_list("REDIS_SENTINELS", sentinels)?;
    let master = get("REDIS_SENTINEL_MASTER").ok_or_else(|| {
        invalid(
            "REDIS_SENTINEL_MASTER",
            "required with REDIS_SENTINELS (the master's name in the Sentinel configuration)",
        )
    })?;
    let credentials = get("REDIS_PASSWORD")
        .map(|password| format!(":{}@", percent_encode(&password)))
        .unwrap_or_default();
    let mut url = format!(
        "redis-sentinel://{credentials}{}/0?sentinelServiceName={}",
        nodes[0],
        percent_encode(&master)
    );
    for node in &nodes[1..] {
        url.push_str(&format!("&node={node}"));
    }
    if let Some(password) = get("REDIS_SENTINEL_PASSWORD") {
        url.push_str(&format!("&sentinelPassword={}", percent_encode(&password)));
    }
    usable_by_fred(url, "REDIS_SENTINELS", "a usable Sentinel set-up")
}

/// `ALLOWED_ORIGINS`; unset, production accepts its own host only and development any.
fn origins(
    get: &impl Fn(&str) -> Option<String>,
    production: bool,
    phx_host: &str,
) -> OriginPolicy {
    match get("ALLOWED_ORIGINS") {
        Some(list) => OriginPolicy::List(
            list.split(',')
                .map(|origin| origin.trim().trim_end_matches('/').to_string())
                .filter(|origin| !origin.is_empty())
                .collect(),
        ),
        None if production => OriginPolicy::Host(phx_host.to_string()),
        None => OriginPolicy::Any,
    }
}

/// `NOTIFY_ALLOWED_TYPES`: type prefixes the scraper key may publish (`*`: any).
fn notify_allowed_types(get: &impl Fn(&str) -> Option<String>) -> Option<Vec<String>> {
    match get("NOTIFY_ALLOWED_TYPES")
        .as_deref()
        .unwrap_or(DEFAULT_NOTIFY_ALLOWED_TYPES)
    {
        "*" => None,
        list => Some(
            list.split(',')
                .map(|prefix| prefix.trim().to_string())
                .filter(|prefix| !prefix.is_empty())
                .collect(),
        ),
    }
}

/// `METRICS_BIND_ADDR`: a separate `ip:port` for `/metrics`, when set.
fn metrics_bind_addr(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<SocketAddr>, ConfigError> {
    get("METRICS_BIND_ADDR")
        .map(|raw| {
            raw.parse().map_err(|_| {
                invalid(
                    "METRICS_BIND_ADDR",
                    format!("expected ip:port, got {raw:?}"),
                )
            })
        })
        .transpose()
}

fn app_env(get: &impl Fn(&str) -> Option<String>) -> Result<AppEnv, ConfigError> {
    Ok(
        match get("APP_ENV")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("dev") | Some("development") => AppEnv::Dev,
            Some("test") => AppEnv::Test,
            Some("prod") | Some("production") => AppEnv::Production,
            Some(other) => {
                return Err(invalid(
                    "APP_ENV",
                    format!("expected dev, test or production, got {other:?}"),
                ))
            }
        },
    )
}

fn presence_families(get: &impl Fn(&str) -> Option<String>) -> Result<Vec<String>, ConfigError> {
    value_or_default(get, "PRESENCE_FAMILIES")
        .unwrap_or_default()
        .split(',')
        .filter(|family| family.trim() != "none")
        .map(str::trim)
        .filter(|family| !family.is_empty())
        .map(|family| match family {
            family if crate::topic::FAMILIES.contains(&family) => Ok(family.to_string()),
            other => Err(invalid(
                "PRESENCE_FAMILIES",
                format!("unknown topic family {other:?}"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
}

fn reconciler_retry_delays(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<Duration>, ConfigError> {
    let list = value_or_default(get, "RECONCILER_RETRY_DELAYS_MS").unwrap_or_default();
    list.split(',')
        .map(|item| item.trim().parse::<u64>().map(Duration::from_millis))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            invalid(
                "RECONCILER_RETRY_DELAYS_MS",
                "expected a comma list of milliseconds",
            )
        })
}

fn log_format(get: &impl Fn(&str) -> Option<String>) -> Result<LogFormat, ConfigError> {
    Ok(match get("LOG_FORMAT").as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(invalid(
                "LOG_FORMAT",
                format!("expected text or json, got {other:?}"),
            ))
        }
    })
}

fn event_schemas(get: &impl Fn(&str) -> Option<String>) -> Result<SchemaMode, ConfigError> {
    Ok(
        match get("EVENT_SCHEMAS").map(|v| v.trim().to_ascii_lowercase()) {
            None => SchemaMode::Warn,
            Some(mode) => match mode.as_str() {
                "enforce" => SchemaMode::Enforce,
                "warn" => SchemaMode::Warn,
                "off" => SchemaMode::Off,
                _ => {
                    return Err(invalid(
                        "EVENT_SCHEMAS",
                        format!("expected enforce, warn or off, got {mode:?}"),
                    ))
                }
            },
        },
    )
}

/// The secrets and keys, checked for production.
struct Secrets {
    internal_jwt_secret: String,
    using_dev_secret: bool,
    jwt_secret_key: Option<String>,
    scraper_api_key: String,
    admin_token: Option<String>,
}

impl Secrets {
    fn from_settings(
        get: &impl Fn(&str) -> Option<String>,
        production: bool,
    ) -> Result<Secrets, ConfigError> {
        let (internal_jwt_secret, using_dev_secret) = match get("INTERNAL_JWT_SECRET") {
            Some(secret) => {
                if production && secret == DEV_INTERNAL_SECRET {
                    return Err(invalid(
                        "INTERNAL_JWT_SECRET",
                        "is the development secret; set a real one when APP_ENV=production",
                    ));
                }
                check_production_secret(production, "INTERNAL_JWT_SECRET", &secret)?;
                (secret, false)
            }
            None if production => {
                return Err(invalid(
                    "INTERNAL_JWT_SECRET",
                    "is required when APP_ENV=production",
                ))
            }
            None => (DEV_INTERNAL_SECRET.to_string(), true),
        };

        let jwt_secret_key = get("JWT_SECRET_KEY");
        if let Some(secret) = &jwt_secret_key {
            check_production_secret(production, "JWT_SECRET_KEY", secret)?;
        }
        let scraper_api_key = get("SCRAPER_API_KEY").unwrap_or_default();
        if !scraper_api_key.is_empty() {
            check_production_secret(production, "SCRAPER_API_KEY", &scraper_api_key)?;
        }
        let admin_token = get("ADMIN_TOKEN");
        if let Some(token) = &admin_token {
            check_production_secret(production, "ADMIN_TOKEN", token)?;
        }

        Ok(Secrets {
            internal_jwt_secret,
            using_dev_secret,
            jwt_secret_key,
            scraper_api_key,
            admin_token,
        })
    }
}

/// In production a secret must be at least [`MIN_PRODUCTION_SECRET_LEN`] bytes.
fn check_production_secret(
    production: bool,
    name: &'static str,
    secret: &str,
) -> Result<(), ConfigError> {
    if production && secret.len() < MIN_PRODUCTION_SECRET_LEN {
        return Err(invalid(
            name,
            format!("must be at least {MIN_PRODUCTION_SECRET_LEN} bytes when APP_ENV=production"),
        ));
    }
    Ok(())
}

/// The default of a setting, from [`SETTINGS`] (the one home of defaults): its first word, or
/// `None` when the table describes it in words (`(any)`) or leaves it empty.
fn default_of(name: &str) -> Option<&'static str> {
    let setting = SETTINGS.iter().find(|setting| setting.name == name)?;
    let first = setting.default.split_whitespace().next()?;
    (!first.starts_with('(')).then_some(first)
}

/// A setting's value, or its default from [`SETTINGS`].
fn value_or_default(get: &impl Fn(&str) -> Option<String>, name: &'static str) -> Option<String> {
    get(name).or_else(|| default_of(name).map(str::to_string))
}

/// `EVENTS_STREAM`: a key (at most 256 bytes, no whitespace), or `off`.
fn events_stream(get: &impl Fn(&str) -> Option<String>) -> Result<Option<String>, ConfigError> {
    let key = value_or_default(get, "EVENTS_STREAM").unwrap_or_default();
    if key.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    if key.len() > 256 || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "EVENTS_STREAM",
            "must be a Redis key (at most 256 bytes, no whitespace) or `off`",
        ));
    }
    Ok(Some(key))
}

/// Parses a setting that has a default in [`SETTINGS`].
fn parse_or<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<T, ConfigError> {
    let raw =
        value_or_default(get, name).ok_or_else(|| invalid(name, "has no default in SETTINGS"))?;
    raw.parse::<T>()
        .map_err(|_| invalid(name, format!("cannot parse {raw:?}")))
}

/// Parses a setting that must be greater than zero.
fn parse_positive<T: std::str::FromStr + PartialOrd + Default>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<T, ConfigError> {
    let value: T = parse_or(get, name)?;
    if value > T::default() {
        Ok(value)
    } else {
        Err(invalid(name, "must be greater than zero"))
    }
}

fn parse_bool(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<bool, ConfigError> {
    match get(name).as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("false") | Some("0") | Some("no") | Some("off") => Ok(false),
        Some("true") | Some("1") | Some("yes") | Some("on") => Ok(true),
        Some(other) => Err(invalid(
            name,
            format!("expected true or false, got {other:?}"),
        )),
    }
}

/// Prepends `redis://` when the scheme is missing (the original did this) and inserts
/// `password` when the URL carries none.
pub fn normalize_redis_url(url: &str, password: Option<&str>) -> String {
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("redis://{url}")
    };
    let Some(password) = password else { return url };
    let (scheme, rest) = url.split_once("://").expect("scheme present");
    let authority_end = rest.find('/').unwrap_or(rest.len());
    if rest[..authority_end].contains('@') {
        return url;
    }
    format!("{scheme}://:{}@{rest}", percent_encode(password))
}

/// A Redis URL fit for a log line: the password in the authority and a Sentinel URL's
/// `sentinelPassword` are replaced by `***`.
pub fn redact_redis_url(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    };
    if let Some(start) = out.find("sentinelPassword=") {
        let value = start + "sentinelPassword=".len();
        let end = out[value..].find('&').map_or(out.len(), |i| value + i);
        out.replace_range(value..end, "***");
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a password or a name in
/// a URL).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Reads a flat TOML table; keys are variable names (case-insensitive), values any scalar.
fn read_toml_settings(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let file_error = |message: String| ConfigError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_error(e.to_string()))?;
    let mut values = HashMap::new();
    for (key, value) in table {
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
                .join(","),
            _ => return Err(file_error(format!("unsupported value type for {key}"))),
        };
        values.insert(key.to_ascii_uppercase(), text);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn presence_settings() {
        let defaults = config(&[]).unwrap().presence;
        assert_eq!(defaults.families, ["inhouse", "org_events"]);
        assert_eq!(defaults.ttl, Duration::from_secs(30));
        assert_eq!(defaults.max_members, 20000);
        assert_eq!(defaults.list_max, 256);
        let off = config(&[("PRESENCE_FAMILIES", "none")]).unwrap().presence;
        assert!(off.families.is_empty());
        let custom = config(&[
            ("PRESENCE_FAMILIES", " tournament , inhouse"),
            ("PRESENCE_TTL_MS", "2000"),
            ("PRESENCE_MAX_MEMBERS", "7"),
        ])
        .unwrap()
        .presence;
        assert_eq!(custom.families, ["tournament", "inhouse"]);
        assert_eq!(custom.ttl, Duration::from_secs(2));
        assert_eq!(custom.max_members, 7);
        let error = config(&[("PRESENCE_FAMILIES", "inhouse,lobby")]).unwrap_err();
        assert!(error.to_string().contains("PRESENCE_FAMILIES"), "{error}");
        assert!(config(&[("PRESENCE_TTL_MS", "0")]).is_err());
    }

    #[test]
    fn defaults_are_development_ready() {
        let config = config(&[]).unwrap();
        assert_eq!(config.port, 4000);
        assert!(config.using_dev_secret);
        assert_eq!(config.redis_url, "redis://127.0.0.1:6379/0");
        assert_eq!(config.reconciler_retry_delays.len(), 3);
        assert_eq!(config.limits.max_channels_per_socket, 100);
        assert_eq!(config.origins, OriginPolicy::Any);
        assert_eq!(config.jwt_leeway_s, 30);
        assert_eq!(config.limits.max_connections_per_identity, Some(100));
        let allowed = config.notify_allowed_types.unwrap();
        assert!(!allowed
            .iter()
            .any(|p| "inhouse.queue_opened".starts_with(p.as_str())));
        assert!(!allowed
            .iter()
            .any(|p| "notification.new".starts_with(p.as_str())));
    }

    #[test]
    fn production_requires_a_strong_secret() {
        let missing = config(&[("APP_ENV", "production")]).unwrap_err();
        assert!(
            missing.to_string().contains("INTERNAL_JWT_SECRET"),
            "{missing}"
        );
        let short =
            config(&[("APP_ENV", "production"), ("INTERNAL_JWT_SECRET", "short")]).unwrap_err();
        assert!(short.to_string().contains("at least 32"), "{short}");
        let ok = config(&[
            ("APP_ENV", "production"),
            ("INTERNAL_JWT_SECRET", &"x".repeat(32)),
        ])
        .unwrap();
        assert!(!ok.using_dev_secret);
        let dev = config(&[
            ("APP_ENV", "production"),
            ("INTERNAL_JWT_SECRET", DEV_INTERNAL_SECRET),
        ])
        .unwrap_err();
        assert!(dev.to_string().contains("development secret"), "{dev}");
        for name in ["JWT_SECRET_KEY", "SCRAPER_API_KEY"] {
            let err = config(&[
                ("APP_ENV", "production"),
                ("INTERNAL_JWT_SECRET", &"x".repeat(32)),
                (name, "short"),
            ])
            .unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
            // Outside production a short key is accepted (development convenience).
            assert!(config(&[(name, "short")]).is_ok());
        }
    }

    #[test]
    fn production_origins_default_to_phx_host() {
        let prod = config(&[
            ("APP_ENV", "production"),
            ("INTERNAL_JWT_SECRET", &"x".repeat(32)),
            ("PHX_HOST", "events.example.com"),
        ])
        .unwrap();
        assert_eq!(
            prod.origins,
            OriginPolicy::Host("events.example.com".into())
        );
        assert!(prod.origins.allows("https://events.example.com"));
        assert!(prod.origins.allows("https://events.example.com:8443/"));
        assert!(!prod.origins.allows("https://evil.example.com"));
        assert!(!prod.origins.allows("https://events.example.com.evil.io"));
        let listed = config(&[("ALLOWED_ORIGINS", "https://a.io, https://b.io/")]).unwrap();
        assert!(listed.origins.allows("https://b.io"));
        assert!(!listed.origins.allows("https://c.io"));
    }

    #[test]
    fn an_unparsable_redis_url_names_the_variable() {
        let sentinel = config(&[
            ("REDIS_SENTINELS", "10.0.0.1:26379, 10.0.0.2:26380"),
            ("REDIS_SENTINEL_MASTER", "prostaff"),
            ("REDIS_PASSWORD", "p@ss"),
            ("REDIS_SENTINEL_PASSWORD", "s3"),
        ])
        .unwrap();
        assert_eq!(
            sentinel.redis_url,
            "redis-sentinel://:p%40ss@10.0.0.1:26379/0?sentinelServiceName=prostaff&node=10.0.0.2:26380&sentinelPassword=s3"
        );
        let fred = fred::types::config::Config::from_url(&sentinel.redis_url).unwrap();
        assert_eq!(fred.password.as_deref(), Some("p@ss"));
        assert!(matches!(
            fred.server,
            fred::types::config::ServerConfig::Sentinel { ref hosts, ref service_name, .. }
                if hosts.len() == 2 && service_name == "prostaff"
        ));
        assert_eq!(
            redact_redis_url(&sentinel.redis_url),
            "redis-sentinel://***@10.0.0.1:26379/0?sentinelServiceName=prostaff&node=10.0.0.2:26380&sentinelPassword=***"
        );
        assert_eq!(
            redact_redis_url("redis://:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        let err = config(&[("REDIS_SENTINELS", "10.0.0.1:26379")]).unwrap_err();
        assert!(err.to_string().contains("REDIS_SENTINEL_MASTER"), "{err}");
        let err = config(&[
            ("REDIS_SENTINELS", "10.0.0.1"),
            ("REDIS_SENTINEL_MASTER", "m"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("REDIS_SENTINELS"), "{err}");
        let err = config(&[("REDIS_URL", "redis://host:notaport/0")]).unwrap_err();
        assert!(err.to_string().contains("REDIS_URL"), "{err}");
        assert!(config(&[("REDIS_URL", "rediss://redis.example.com:6380/0")]).is_ok());
    }

    #[test]
    fn notify_types_and_metrics_settings() {
        let any = config(&[("NOTIFY_ALLOWED_TYPES", "*")]).unwrap();
        assert!(any.notify_allowed_types.is_none());
        let err = config(&[("METRICS_BIND_ADDR", "nope")]).unwrap_err();
        assert!(err.to_string().contains("METRICS_BIND_ADDR"));
        let ok = config(&[
            ("METRICS_BIND_ADDR", "127.0.0.1:9100"),
            ("METRICS_TOKEN", "t"),
        ])
        .unwrap();
        assert_eq!(ok.metrics_bind_addr.unwrap().port(), 9100);
        assert_eq!(ok.metrics_token.as_deref(), Some("t"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = config(&[("PORT", "eighty")]).unwrap_err();
        assert!(err.to_string().contains("PORT"), "{err}");
        let err = config(&[("RECONCILER_RETRY_DELAYS_MS", "1,x")]).unwrap_err();
        assert!(
            err.to_string().contains("RECONCILER_RETRY_DELAYS_MS"),
            "{err}"
        );
        let err = config(&[("FORCE_SSL", "maybe")]).unwrap_err();
        assert!(err.to_string().contains("FORCE_SSL"), "{err}");
    }

    #[test]
    fn cluster_nodes_make_a_cluster_url() {
        let cluster = config(&[
            (
                "REDIS_CLUSTER_NODES",
                "10.0.0.1:7000, 10.0.0.2:7001,10.0.0.3:7002",
            ),
            ("REDIS_PASSWORD", "p@ss"),
        ])
        .unwrap();
        assert_eq!(
            cluster.redis_url,
            "redis-cluster://:p%40ss@10.0.0.1:7000?node=10.0.0.2:7001&node=10.0.0.3:7002"
        );
        let one = config(&[("REDIS_CLUSTER_NODES", "10.0.0.1:7000")]).unwrap();
        assert_eq!(one.redis_url, "redis-cluster://10.0.0.1:7000");
        assert!(config(&[("REDIS_CLUSTER_NODES", "10.0.0.1")]).is_err());
        assert!(config(&[
            ("REDIS_CLUSTER_NODES", "10.0.0.1:7000"),
            ("REDIS_SENTINELS", "10.0.0.1:26379"),
            ("REDIS_SENTINEL_MASTER", "m"),
        ])
        .is_err());
    }

    #[test]
    fn redis_url_gets_scheme_and_password() {
        assert_eq!(
            normalize_redis_url("redis:6379", None),
            "redis://redis:6379"
        );
        assert_eq!(
            normalize_redis_url("redis://h:1/0", Some("p@ss")),
            "redis://:p%40ss@h:1/0"
        );
        assert_eq!(
            normalize_redis_url("redis://:a@h:1", Some("b")),
            "redis://:a@h:1"
        );
    }

    #[test]
    fn zero_disables_optional_limits() {
        let config = config(&[
            ("RECONCILE_INTERVAL_MS", "0"),
            ("MAX_PUSHES_PER_SECOND", "0"),
        ])
        .unwrap();
        assert!(config.reconcile_interval.is_none());
        assert!(config.limits.max_pushes_per_second.is_none());
    }

    #[test]
    fn env_example_and_readme_list_every_setting() {
        let env_example = include_str!("../.env.example");
        let readme = include_str!("../README.md");
        for setting in SETTINGS {
            assert!(
                env_example.contains(&format!("\n{}=", setting.name)),
                ".env.example lacks {}",
                setting.name
            );
            assert!(
                readme.contains(&format!("`{}`", setting.name)),
                "README lacks {}",
                setting.name
            );
        }
    }

    #[test]
    fn example_toml_parses() {
        let dir = std::env::temp_dir().join(format!("prostaff-toml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("example.toml");
        std::fs::write(
            &path,
            include_str!("../config/prostaff-events.example.toml"),
        )
        .unwrap();
        let values = read_toml_settings(&path).unwrap();
        assert_eq!(values["RECONCILER_RETRY_DELAYS_MS"], "1000,2000,4000");
        let config = Config::from_lookup(|name| values.get(name).cloned()).unwrap();
        assert_eq!(config.rate_limit_max, 10);
    }

    #[test]
    fn every_setting_is_documented_once() {
        let mut names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
    }
}
