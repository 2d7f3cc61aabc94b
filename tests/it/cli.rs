//! The binary's command line: configuration errors exit 64 naming the variable, `--help` lists
//! every setting, `token` mints verifiable tokens, `LOG_FORMAT=json` logs JSON lines.

use std::process::{Command, Stdio};

use crate::support::*;

fn hub_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prostaff-events"));
    // Run outside the repository so no .env or config file is picked up.
    command
        .current_dir(std::env::temp_dir())
        .env_remove("APP_ENV")
        .env_remove("INTERNAL_JWT_SECRET");
    command
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let cases = [
        (vec![("APP_ENV", "production")], "INTERNAL_JWT_SECRET"),
        (
            vec![
                ("APP_ENV", "production"),
                ("INTERNAL_JWT_SECRET", "too-short"),
            ],
            "INTERNAL_JWT_SECRET",
        ),
        (vec![("PORT", "eighty")], "PORT"),
        (vec![("MAX_FRAME_BYTES", "0")], "MAX_FRAME_BYTES"),
        (vec![("REDIS_URL", "redis://host:notaport/0")], "REDIS_URL"),
        (
            vec![
                ("APP_ENV", "production"),
                (
                    "INTERNAL_JWT_SECRET",
                    prostaff_events::config::DEV_INTERNAL_SECRET,
                ),
            ],
            "INTERNAL_JWT_SECRET",
        ),
    ];
    for (env, variable) in cases {
        let output = hub_command().envs(env.clone()).output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{env:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{env:?}: {stderr}");
    }
}

#[test]
fn help_lists_every_variable() {
    let output = hub_command().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for setting in prostaff_events::config::SETTINGS {
        assert!(help.contains(setting.name), "--help lacks {}", setting.name);
    }
}

#[test]
fn token_subcommand_mints_verifiable_tokens() {
    let verifier = prostaff_events::auth::TokenVerifier::new(SECRET, None, true);
    let mint = |args: &[&str]| {
        let output = hub_command()
            .env("INTERNAL_JWT_SECRET", SECRET)
            .arg("token")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    let user = verifier
        .verify(&mint(&["--user-id", "u1", "--org-id", "o1", "--ttl", "1h"]))
        .unwrap();
    assert_eq!(
        user.identity,
        prostaff_events::auth::Identity::User {
            user_id: "u1".into(),
            org_id: "o1".into()
        }
    );
    let exp = user.expires_at.unwrap();
    let now = prostaff_events::auth::unix_now();
    assert!(
        (now + 3590..=now + 3610).contains(&exp),
        "exp {exp} vs now {now}"
    );
    let player = verifier
        .verify(&mint(&["--player-id", "p1", "--org-id", "o1"]))
        .unwrap();
    assert!(matches!(
        player.identity,
        prostaff_events::auth::Identity::Player { .. }
    ));
    let internal = verifier
        .verify(&mint(&["--internal", "--ttl", "30m"]))
        .unwrap();
    assert_eq!(internal.identity, prostaff_events::auth::Identity::Internal);
    let forever = hub_command()
        .env("INTERNAL_JWT_SECRET", SECRET)
        .args(["token", "--internal", "--ttl", "never"])
        .output()
        .unwrap();
    let forever = String::from_utf8(forever.stdout).unwrap();
    assert!(
        verifier.verify(forever.trim()).is_err(),
        "--ttl never has no exp, refused when exp is required"
    );
    let missing = hub_command()
        .args(["token", "--user-id", "u1"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let mut child = hub_command()
        .env("LOG_FORMAT", "json")
        .env("PORT", free_port().to_string())
        .env("BIND_ADDR", "127.0.0.1")
        .env("REDIS_URL", format!("redis://127.0.0.1:{}", free_port()))
        .env("RAILS_API_URL", "http://127.0.0.1:9")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let line = lines.next().expect("a log line").unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["message"].is_string(),
            "{line}"
        );
        seen.push(value["message"].as_str().unwrap().to_string());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|m| m.contains("DEVELOPMENT secret")),
        "the dev-secret warning is logged: {seen:?}"
    );
}
