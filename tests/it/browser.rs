//! Runs the browser suite (`tests/browser`: the phoenix npm package's browser build in headless
//! Chromium, driven by puppeteer-core) against a live hub with a real redis-server. Installs the
//! npm packages on first run. Chromium is Debian's `chromium` package (`.ci/run` installs it);
//! without it the suite is skipped and says so on the terminal.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::support::*;

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
    ensure_node_modules(&node_suite_dir("js"), &["phoenix", "ws"]);
    let dir = node_suite_dir("browser");
    ensure_node_modules(&dir, &["phoenix", "puppeteer-core"]);
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    // A closed page's long-poll session ends (and leaves presence) sooner than the default.
    config.longpoll.session_timeout = std::time::Duration::from_secs(3);
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");

    let run = run_node_tests(
        "browser suite",
        &dir,
        &["--test-timeout=90000", "--test-concurrency=1"],
        &[
            ("HUB_HTTP", format!("http://{}", hub.addr).into()),
            ("HUB_SECRET", SECRET.into()),
            ("RAILS_SECRET", RAILS_SECRET.into()),
            ("REDIS_URL", redis.url().into()),
            ("CHROMIUM", chromium.into()),
            ("ARTIFACTS_DIR", artifacts.clone().into()),
        ],
    )
    .await;
    let summary = |label: &str| run.count(label);
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
