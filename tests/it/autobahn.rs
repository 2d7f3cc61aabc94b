//! RFC 6455 conformance with the real Autobahn|Testsuite (`tests/autobahn/run.sh`, its
//! `fuzzingclient` ported to Python 3; the venv is kept in `target/autobahn-venv`):
//! - the 151 cases of sections 2–7 that need no echo, against the hub's own Phoenix socket;
//! - all 246 cases of sections 1–7 against an echo server built on the hub's framing code
//!   (`phoenix::ws::WsStream`), failing the connection exactly as the session does.
//!
//! The gate is FAILED = 0 (a case whose behaviour or closing behaviour is FAILED or UNCLEAN):
//! NON-STRICT is allowed, and the cases that send plain text before their violation are
//! answered 1007 by the Phoenix socket (that text is not a Phoenix message).

use std::path::PathBuf;
use std::process::Command;

use futures_util::{SinkExt, StreamExt};
use prostaff_events::phoenix::ws::WsStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::support::*;

/// Runs the suite; returns its summary output. Fails the test when a case FAILED.
fn autobahn(url: &str, cases: &str, report: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target");
    let output = Command::new("bash")
        .arg(root.join("tests/autobahn/run.sh"))
        .arg(url)
        .env("AB_VENV", target.join("autobahn-venv"))
        .env("AB_OUTDIR", target.join("autobahn-reports").join(report))
        .env("AB_CASES", cases)
        .env("AB_TIMEOUT", "600")
        .output()
        .expect("bash runs tests/autobahn/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(
        output.status.success(),
        "Autobahn|Testsuite ({cases}) against {url}: {text}"
    );
    assert!(text.contains("FAILED=0"), "{text}");
    text
}

/// An echo server on the hub's framing: each text or binary message is sent back; a protocol
/// violation is answered with the close code the session uses for it, then the connection
/// closes.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let end = loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&request[..end]).to_string();
                let Some(key) = head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| value.trim().to_string())
                }) else {
                    return;
                };
                let response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    derive_accept_key(key.as_bytes())
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                let _ = stream.set_nodelay(true);
                let mut ws = WsStream::with_prefix(stream, &request[end..], 16 << 20);
                use axum::extract::ws::{CloseFrame, Message};
                while let Some(message) = ws.next().await {
                    match message {
                        Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                            if ws.send(message.into()).await.is_err() {
                                return;
                            }
                        }
                        Ok(Message::Close(_)) => {
                            // Answered by the stream itself; then the server closes TCP
                            // (RFC 6455 §7.1.1), as the session does.
                            let _ = ws.close().await;
                            return;
                        }
                        Ok(_) => {}
                        Err(error) => {
                            if let Some((code, _)) = error.close_code() {
                                let frame = CloseFrame {
                                    code,
                                    reason: "".into(),
                                };
                                let _ = ws.send(Message::Close(Some(frame)).into()).await;
                            }
                            let _ = ws.close().await;
                            return;
                        }
                    }
                }
                let _ = ws.close().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_sections_1_to_7_pass_on_the_hub_framing_and_the_phoenix_socket() {
    // Both runs in one test: they share the venv install and run one after the other.
    let port = echo_server().await;
    let echo = tokio::task::spawn_blocking(move || {
        autobahn(&format!("ws://127.0.0.1:{port}/"), "1-7", "echo")
    })
    .await
    .unwrap();
    assert!(echo.contains("246 cases"), "{echo}");

    let (_redis, hub) = redis_and_ready_hub().await;
    let url = hub.socket_url(&user_token("u1", &unique("org")));
    let hub_run = tokio::task::spawn_blocking(move || autobahn(&url, "no-echo", "hub"))
        .await
        .unwrap();
    assert!(hub_run.contains("151 cases"), "{hub_run}");
}
