//! SIGTERM on the real binary with hundreds of connected clients: readiness 503 first, every
//! client sees a 1012 close frame, the process exits 0 within the grace period.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_hundreds_of_clients_and_exits_zero() {
    const CLIENTS: usize = 300;
    let redis = RedisServer::start();
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prostaff-events"))
        .env("PORT", port.to_string())
        .env("BIND_ADDR", "127.0.0.1")
        .env("INTERNAL_JWT_SECRET", SECRET)
        .env("REDIS_URL", redis.url())
        .env("RAILS_API_URL", "http://127.0.0.1:9")
        .env("RECONCILER_RETRY_DELAYS_MS", "10")
        .env("SHUTDOWN_GRACE_MS", "5000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    eventually("binary serving /health", || async {
        reqwest::get(format!("{base}/health")).await.is_ok()
    })
    .await;

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let url = format!(
            "ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&token={}",
            user_token(&format!("u{i}"), "o1")
        );
        let mut phx = Phx::connect_url(&url).await;
        phx.join_ok("org_events:o1").await;
        clients.push(phx);
    }

    let started = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let closes = clients
        .into_iter()
        .map(|mut phx| tokio::spawn(async move { phx.close_code().await }));
    let codes = futures_util::future::join_all(closes).await;
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("process exits")
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    for code in codes {
        let code = code.unwrap();
        assert!(
            matches!(code, Some(1012) | Some(1001)),
            "close code {code:?}"
        );
    }
    // Within the grace period (5 s) plus process start-up slack on a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        started.elapsed()
    );
}
