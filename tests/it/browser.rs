//! Runs the browser suite (`tests/browser`: the phoenix npm package's browser build in headless
//! Chromium, driven by puppeteer-core) against a live hub with a real redis-server. Installs the
//! npm packages on first run. Chromium is Debian's `chromium` package (`.ci/run` installs it);
//! without it the suite is skipped and says so on the terminal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::support::*;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `CHROMIUM`, or the first Chromium found on the usual paths.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|path| path.exists())
}

/// `npm ci` in `dir` when one of `packages` is not installed yet (a fresh checkout).
fn ensure_node_modules(dir: &Path, packages: &[&str]) {
    let installed = packages.iter().all(|p| {
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
async fn browser_suite_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        // Written past the test harness's capture, so the skip shows in every run's output.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED browser::browser_suite_in_headless_chromium: Chromium not found \
             (install Debian's `chromium` package, as .ci/run does, or set CHROMIUM) ***\n"
        );
        return;
    };
    ensure_node_modules(&manifest_dir().join("tests/js"), &["phoenix", "ws"]);
    let dir = manifest_dir().join("tests/browser");
    ensure_node_modules(&dir, &["phoenix", "puppeteer-core"]);
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    // A closed page's long-poll session ends (and leaves presence) sooner than the default.
    config.longpoll.session_timeout = std::time::Duration::from_secs(3);
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let artifacts = manifest_dir().join("target/test-artifacts");

    let output = tokio::process::Command::new("node")
        .args([
            "--test",
            "--test-force-exit",
            "--test-timeout=90000",
            "--test-concurrency=1",
            "--test-reporter=spec",
        ])
        .current_dir(&dir)
        .env("HUB_HTTP", format!("http://{}", hub.addr))
        .env("HUB_SECRET", SECRET)
        .env("RAILS_SECRET", RAILS_SECRET)
        .env("REDIS_URL", redis.url())
        .env("CHROMIUM", &chromium)
        .env("ARTIFACTS_DIR", &artifacts)
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
        "browser suite failed (see output above)"
    );
    let summary = |label: &str| -> usize {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("ℹ {label} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` line in the node test summary"))
    };
    assert_eq!(summary("fail"), 0);
    assert_eq!(summary("skipped"), 0);
    assert!(
        summary("pass") >= 7,
        "only {} browser tests ran",
        summary("pass")
    );
    assert!(
        artifacts.join("admin-status.png").exists(),
        "the status page screenshot was saved"
    );
}
