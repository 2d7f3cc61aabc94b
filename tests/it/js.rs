//! Runs the phoenix.js conformance suite (`tests/js`, official `phoenix` npm client 1.8.16 and
//! 1.8.12) against a live hub with a real redis-server. Installs the npm packages on first run.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::support::*;

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// `npm ci` when the pinned packages are not installed yet (a fresh checkout).
fn ensure_node_modules(dir: &Path) {
    let installed = ["phoenix", "phoenix-1.8.12", "ws"].iter().all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .exists()
    });
    if installed {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("npm is installed (Node.js 20)");
    assert!(status.success(), "npm ci failed in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_js_suite() {
    let dir = js_dir();
    ensure_node_modules(&dir);
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.rate_limit_max = 3;
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;

    let output = tokio::process::Command::new("node")
        .args([
            "--test",
            "--test-force-exit",
            "--test-timeout=60000",
            "--test-reporter=spec",
        ])
        .current_dir(&dir)
        .env("HUB_HTTP", format!("http://{}", hub.addr))
        .env("HUB_SECRET", SECRET)
        .env("RAILS_SECRET", RAILS_SECRET)
        .env("HUB_BIN", env!("CARGO_BIN_EXE_prostaff-events"))
        .env("REDIS_URL", redis.url())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("node is installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "phoenix.js suite failed (see output above)"
    );
    let summary = |label: &str| -> usize {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("ℹ {label} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` line in the node test summary"))
    };
    assert_eq!(summary("fail"), 0);
    assert_eq!(summary("cancelled"), 0);
    // Guard against a suite that silently runs nothing.
    assert!(
        summary("pass") >= 27,
        "only {} phoenix.js tests ran",
        summary("pass")
    );
}
