//! Shared helpers: an echo upstream, raw HTTP and deadline-bounded reads.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgquorum_toxiproxy::{Client, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

/// The one way a test skips: prints `SKIPPED <test>: <why>` and returns, so the caller can
/// return; under `CI=true` it panics with that message instead, so a green CI run means every
/// test ran. `why` names what is missing and the fix.
pub fn skip(test: &str, why: &str) {
    let said = format!("SKIPPED {test}: {why}");
    eprintln!("{said}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{said} (CI=true: a skip fails the run)");
    }
}

/// An echo server that counts the bytes it received.
pub struct Echo {
    pub addr: String,
    pub received: Arc<AtomicUsize>,
}

pub async fn echo() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            counter.fetch_add(n, Ordering::SeqCst);
                            if conn.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Echo { addr, received }
}

pub fn server() -> (ServerHandle, Client) {
    let handle = ServerHandle::start("127.0.0.1:0").unwrap();
    let client = Client::new(&handle.url()).unwrap();
    (handle, client)
}

/// Reads exactly `n` bytes, failing after `limit`.
pub async fn read_n(conn: &mut TcpStream, n: usize, limit: Duration) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(limit, conn.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read failed");
    buf
}

/// Whether the connection ends (EOF or error) within `limit`; data read meanwhile is returned.
pub async fn ends_within(conn: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Asserts nothing arrives within `window` (an assertion window, not synchronisation).
pub async fn silent_for(conn: &mut TcpStream, window: Duration) {
    let mut buf = [0u8; 64];
    if let Ok(r) = timeout(window, conn.read(&mut buf)).await {
        panic!("expected silence, got {r:?}");
    }
}

/// Polls `f` until true or panics after `limit`.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut f: F) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One raw HTTP/1.1 request; returns status and body.
pub async fn http(base: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let host = base.trim_start_matches("http://");
    let mut conn = TcpStream::connect(host).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    timeout(Duration::from_secs(10), conn.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
