//! The `prostaff-events` binary: `serve` (default), `token`, `catalogue`, `dead-letters` and
//! `healthcheck`.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use prostaff_events::config::{Config, LogFormat, SETTINGS};

/// jemalloc, with its background thread purging freed pages (BENCHMARKS.md, "Memory given back").
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration error (EX_CONFIG would be 78; 64 is what ops scripts expect here).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "prostaff-events",
    version,
    about = "Real-time event hub: Redis events → Phoenix Channels WebSocket clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (the default).
    Serve,
    /// Print a signed token for trying the hub (uses INTERNAL_JWT_SECRET).
    Token {
        #[arg(long)]
        user_id: Option<String>,
        #[arg(long)]
        org_id: Option<String>,
        /// Make a player token (needs --org-id).
        #[arg(long, conflicts_with = "user_id")]
        player_id: Option<String>,
        /// Make an internal service token.
        #[arg(long, conflicts_with_all = ["user_id", "player_id", "org_id"])]
        internal: bool,
        /// Lifetime, e.g. 90s, 30m, 1h, 7d; `never` for no exp.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// The event catalogue (config/events/).
    Catalogue {
        #[command(subcommand)]
        command: CatalogueCommand,
    },
    /// The dead-letter stream `prostaff:events:dead` (uses REDIS_URL).
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Exit 0 when GET /health on this host's PORT answers 200 (for Docker HEALTHCHECK).
    Healthcheck {
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum CatalogueCommand {
    /// Print the TypeScript declarations generated from the schemas.
    Typescript,
    /// Print every schema as `GET /api/events/catalogue` serves them.
    Json,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Print the counts per reason and the newest entries (reasons only, never the envelope),
    /// one JSON object per line.
    List {
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
    /// Publish the given entries again on the channel they came from, then delete them (an
    /// entry that is still invalid is dead-lettered again).
    Replay {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn settings_help() -> String {
    let mut text = String::from("Environment variables (a .env file is loaded when present):\n");
    for setting in SETTINGS {
        text.push_str(&format!(
            "  {:<28} {}\n  {:<28} default: {}\n",
            setting.name, setting.meaning, "", setting.default
        ));
    }
    text
}

fn parse_ttl(text: &str) -> Result<Option<u64>, String> {
    if text == "never" {
        return Ok(None);
    }
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number.parse().map_err(|_| format!("bad --ttl {text:?}"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad --ttl unit in {text:?} (use s, m, h or d)")),
    };
    Ok(Some(number * seconds))
}

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let matches = Cli::command()
        .after_long_help(settings_help())
        .after_help(settings_help())
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("prostaff-events: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Token {
            user_id,
            org_id,
            player_id,
            internal,
            ttl,
        } => {
            let ttl = match parse_ttl(&ttl) {
                Ok(ttl) => ttl,
                Err(message) => {
                    eprintln!("{message}");
                    return ExitCode::from(2);
                }
            };
            let mut claims = match (internal, user_id, player_id, org_id) {
                (true, ..) => serde_json::json!({"type": "internal", "iss": "prostaff-api"}),
                (false, Some(user_id), None, Some(org_id)) => {
                    serde_json::json!({"user_id": user_id, "org_id": org_id})
                }
                (false, None, Some(player_id), Some(org_id)) => {
                    serde_json::json!({"entity_type": "player", "player_id": player_id, "organization_id": org_id})
                }
                _ => {
                    eprintln!("token: give --user-id and --org-id, --player-id and --org-id, or --internal");
                    return ExitCode::from(2);
                }
            };
            let now = prostaff_events::auth::unix_now();
            claims["iat"] = now.into();
            if let Some(ttl) = ttl {
                claims["exp"] = (now + ttl).into();
            }
            println!(
                "{}",
                prostaff_events::auth::mint(&config.internal_jwt_secret, &claims)
            );
            ExitCode::SUCCESS
        }
        Command::Catalogue { command } => catalogue(command),
        Command::DeadLetters { command } => dead_letters(&config, command),
        Command::Healthcheck { url } => {
            healthcheck(url.unwrap_or_else(|| format!("http://127.0.0.1:{}/health", config.port)))
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts")
}

fn catalogue(command: CatalogueCommand) -> ExitCode {
    let catalogue = match prostaff_events::catalogue::Catalogue::builtin() {
        Ok(catalogue) => catalogue,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        CatalogueCommand::Typescript => print!("{}", catalogue.typescript()),
        CatalogueCommand::Json => println!("{}", String::from_utf8_lossy(&catalogue.served())),
    }
    ExitCode::SUCCESS
}

fn dead_letters(config: &Config, command: DeadLetterCommand) -> ExitCode {
    use prostaff_events::ingest::dead_letter::{DeadLetters, Replayed};
    runtime().block_on(async {
        let link = prostaff_events::redis::RedisLink::new(&config.redis_url);
        if let Err(error) = link.connect_commands().await {
            eprintln!("dead-letters: redis: {error}");
            return ExitCode::FAILURE;
        }
        let letters = DeadLetters::new(link, config.dead_letter_maxlen);
        match command {
            DeadLetterCommand::List { count } => match letters.list(count).await {
                Ok(listing) => {
                    println!(
                        "{}",
                        serde_json::json!({"length": listing.length, "counts": listing.counts})
                    );
                    for entry in listing.entries {
                        println!(
                            "{}",
                            serde_json::json!({"id": entry.id, "fields": entry.fields})
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("dead-letters: {error}");
                    ExitCode::FAILURE
                }
            },
            DeadLetterCommand::Replay { ids } => {
                let mut failed = false;
                for id in ids {
                    match letters.replay(&id).await {
                        Ok(Replayed::Published(receivers)) => {
                            println!("{id} replayed ({receivers} subscribers)")
                        }
                        Ok(Replayed::Missing) => {
                            failed = true;
                            eprintln!("{id}: no such entry");
                        }
                        Ok(Replayed::NotKept) => {
                            failed = true;
                            eprintln!("{id}: its envelope was too large to keep; not replayable");
                        }
                        Err(error) => {
                            failed = true;
                            eprintln!("{id}: {error}");
                        }
                    }
                }
                if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
        }
    })
}

fn healthcheck(url: String) -> ExitCode {
    let ok = runtime().block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .ok()?;
        let response = client.get(&url).send().await.ok()?;
        response.status().is_success().then_some(())
    });
    if ok.is_some() {
        ExitCode::SUCCESS
    } else {
        eprintln!("healthcheck failed: {url}");
        ExitCode::FAILURE
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Panics go through tracing (one structured line, in the span of the task that panicked:
/// a session's carries its identity and org) instead of unstructured text on stderr. Session
/// panics are also caught, counted and cleaned up by `session::run`.
fn log_panics_through_tracing() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("non-string panic");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %prostaff_events::logsafe::LogSafe(message), %location, "panic");
    }));
}

fn serve(config: Config) -> ExitCode {
    init_tracing(config.log_format);
    log_panics_through_tracing();
    if config.using_dev_secret {
        tracing::warn!(
            "INTERNAL_JWT_SECRET is not set: using the built-in DEVELOPMENT secret. Anyone can mint tokens for this hub. \
             Set INTERNAL_JWT_SECRET (APP_ENV=production refuses to start without it)."
        );
    }
    runtime().block_on(async move {
        let address = std::net::SocketAddr::new(config.bind_addr, config.port);
        let listener = match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%address, %error, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(%address, env = ?config.app_env, redis = %prostaff_events::config::redact_redis_url(&config.redis_url), rails = %config.rails_api_url, "prostaff-events listening");
        match prostaff_events::run(config, listener, shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(%error, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}
