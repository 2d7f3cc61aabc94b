//! Runs the phoenix.js conformance suite (`tests/js`, official `phoenix` npm client 1.8.16 and
//! 1.8.12) against a live hub with a real redis-server. Installs the npm packages on first run.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_js_suite() {
    let dir = node_suite_dir("js");
    ensure_node_modules(&dir, &["phoenix", "phoenix-1.8.12", "ws"]);
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url(), "http://127.0.0.1:9");
    config.rate_limit_max = 3;
    let hub = TestHub::start(config).await;
    hub.wait_redis_ready().await;

    let run = run_node_tests(
        "phoenix.js suite",
        &dir,
        &["--test-timeout=60000"],
        &[
            ("HUB_HTTP", format!("http://{}", hub.addr).into()),
            ("HUB_SECRET", SECRET.into()),
            ("RAILS_SECRET", RAILS_SECRET.into()),
            ("HUB_BIN", env!("CARGO_BIN_EXE_prostaff-events").into()),
            ("REDIS_URL", redis.url().into()),
        ],
    )
    .await;
    let summary = |label: &str| run.count(label);
    assert_eq!(summary("fail"), 0);
    assert_eq!(summary("cancelled"), 0);
    // Guard against a suite that silently runs nothing.
    assert!(
        summary("pass") >= 30,
        "only {} phoenix.js tests ran",
        summary("pass")
    );
}

/// The typed phoenix.js example compiles with `tsc --noEmit` against the TypeScript
/// declarations generated from the event catalogue (`config/events/prostaff-events.d.ts`; the
/// unit test `catalogue::tests::the_committed_typescript_matches_the_schemas` keeps them equal
/// to the schemas). Its `@ts-expect-error` lines fail the compile if a payload loses its type.
#[test]
fn typed_client_example_compiles() {
    let dir = node_suite_dir("js");
    ensure_node_modules(&dir, &["phoenix", "typescript", "@types/phoenix"]);
    let output = std::process::Command::new("node")
        .args([
            "node_modules/typescript/bin/tsc",
            "--noEmit",
            "-p",
            "typed/tsconfig.json",
        ])
        .current_dir(&dir)
        .output()
        .expect("node is installed");
    assert!(
        output.status.success(),
        "tsc failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
