//! Each toxic against a live echo server, over real loopback TCP.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use pgquorum_toxiproxy::{Client, Stream, Toxic, ToxicKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(5);

async fn proxied(client: &Client, name: &str) -> (String, Echo) {
    let echo = echo().await;
    let p = client
        .create_proxy(name, "127.0.0.1:0", &echo.addr)
        .await
        .unwrap();
    (p.listen, echo)
}

async fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    conn.write_all(msg).await.unwrap();
    assert_eq!(read_n(conn, msg.len(), LONG).await, msg);
    start.elapsed()
}

#[tokio::test]
async fn latency_applies_to_existing_connection() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    assert!(round_trip(&mut conn, b"fast").await < Duration::from_millis(280));
    let lat = ToxicKind::Latency {
        latency: 300,
        jitter: 0,
    };
    client
        .add_toxic("p", &Toxic::new("lat", Stream::Downstream, lat))
        .await
        .unwrap();
    let took = round_trip(&mut conn, b"slow").await;
    assert!(
        took >= Duration::from_millis(280) && took < LONG,
        "{took:?}"
    );
    client.remove_toxic("p", "lat").await.unwrap();
    assert!(round_trip(&mut conn, b"fast").await < Duration::from_millis(280));
}

#[tokio::test]
async fn timeout_zero_silences_until_removed() {
    let (_s, client) = server();
    let (listen, echo) = proxied(&client, "p").await;
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"before").await;
    let cut = Toxic::new("cut", Stream::Upstream, ToxicKind::Timeout { timeout: 0 });
    client.add_toxic("p", &cut).await.unwrap();
    conn.write_all(b"lost").await.unwrap();
    silent_for(&mut conn, Duration::from_millis(300)).await;
    assert_eq!(
        echo.received.load(Ordering::SeqCst),
        6,
        "dropped, not delivered"
    );
    // Like Toxiproxy, removing a timeout toxic closes the connections it silenced (their
    // streams lost bytes); new connections work again.
    client.remove_toxic("p", "cut").await.unwrap();
    assert!(ends_within(&mut conn, LONG).await.is_some());
    let mut fresh = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut fresh, b"after").await;
}

#[tokio::test]
async fn timeout_closes_after_delay() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"x").await;
    let start = Instant::now();
    let t = Toxic::new("t", Stream::Downstream, ToxicKind::Timeout { timeout: 300 });
    client.add_toxic("p", &t).await.unwrap();
    conn.write_all(b"dropped").await.unwrap();
    let got = ends_within(&mut conn, LONG).await.expect("closed");
    assert!(got.is_empty());
    assert!(
        start.elapsed() >= Duration::from_millis(280),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn bandwidth_limits_low_rates() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let bw = Toxic::new("bw", Stream::Downstream, ToxicKind::Bandwidth { rate: 10 });
    client.add_toxic("p", &bw).await.unwrap();
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    let data = vec![7u8; 30_000];
    let start = Instant::now();
    conn.write_all(&data).await.unwrap();
    assert_eq!(
        read_n(&mut conn, data.len(), Duration::from_secs(10)).await,
        data
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

#[tokio::test]
async fn slow_close_delays_eof() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let sc = Toxic::new(
        "sc",
        Stream::Downstream,
        ToxicKind::SlowClose { delay: 400 },
    );
    client.add_toxic("p", &sc).await.unwrap();
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"x").await;
    let start = Instant::now();
    conn.shutdown().await.unwrap();
    assert!(ends_within(&mut conn, LONG).await.is_some());
    assert!(
        start.elapsed() >= Duration::from_millis(380),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn limit_data_closes_after_bytes() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let lim = Toxic::new(
        "lim",
        Stream::Downstream,
        ToxicKind::LimitData { bytes: 10 },
    );
    client.add_toxic("p", &lim).await.unwrap();
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    conn.write_all(b"0123456789abcdefghij").await.unwrap();
    let got = ends_within(&mut conn, LONG).await.expect("closed");
    assert_eq!(got, b"0123456789");
}

#[tokio::test]
async fn slicer_splits_data() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let kind = ToxicKind::Slicer {
        average_size: 10,
        size_variation: 2,
        delay: 20_000,
    };
    client
        .add_toxic("p", &Toxic::new("sl", Stream::Downstream, kind))
        .await
        .unwrap();
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    conn.write_all(&[1u8; 100]).await.unwrap();
    let (mut total, mut reads) = (0, 0);
    let mut buf = [0u8; 256];
    while total < 100 {
        let n = tokio::time::timeout(LONG, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        total += n;
        reads += 1;
    }
    assert_eq!(total, 100);
    assert!(reads > 3, "arrived in {reads} reads");
}

#[tokio::test]
async fn one_way_cuts_follow_the_stream() {
    let (_s, client) = server();
    let (listen, echo) = proxied(&client, "p").await;
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"ok").await;

    // Downstream cut: the server still receives, the client hears nothing.
    let down = Toxic::new(
        "down",
        Stream::Downstream,
        ToxicKind::Timeout { timeout: 0 },
    );
    client.add_toxic("p", &down).await.unwrap();
    conn.write_all(b"abc").await.unwrap();
    eventually(LONG, || echo.received.load(Ordering::SeqCst) == 5).await;
    silent_for(&mut conn, Duration::from_millis(200)).await;
    client.remove_toxic("p", "down").await.unwrap();

    // Upstream cut on a new connection: the server receives nothing.
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"ok").await;
    let up = Toxic::new("up", Stream::Upstream, ToxicKind::Timeout { timeout: 0 });
    client.add_toxic("p", &up).await.unwrap();
    conn.write_all(b"abc").await.unwrap();
    silent_for(&mut conn, Duration::from_millis(200)).await;
    assert_eq!(echo.received.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn reset_peer_resets() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let rp = Toxic::new(
        "rp",
        Stream::Upstream,
        ToxicKind::ResetPeer { timeout: 100 },
    );
    client.add_toxic("p", &rp).await.unwrap();
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    conn.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(LONG, conn.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()).unwrap_err(),
        std::io::ErrorKind::ConnectionReset
    );
}

#[tokio::test]
async fn disable_closes_and_enable_restores() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"ok").await;
    client.set_enabled("p", false).await.unwrap();
    assert!(
        ends_within(&mut conn, LONG).await.is_some(),
        "existing connection closed"
    );
    assert!(
        TcpStream::connect(&listen).await.is_err(),
        "new connections refused"
    );
    client.set_enabled("p", true).await.unwrap();
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"back").await;
    client.delete_proxy("p").await.unwrap();
    assert!(ends_within(&mut conn, LONG).await.is_some());
    assert!(TcpStream::connect(&listen).await.is_err());
}

#[tokio::test]
async fn toxicity_zero_never_applies() {
    let (_s, client) = server();
    let (listen, _echo) = proxied(&client, "p").await;
    let mut cut = Toxic::new("cut", Stream::Downstream, ToxicKind::Timeout { timeout: 0 });
    cut.toxicity = 0.0;
    client.add_toxic("p", &cut).await.unwrap();
    let mut conn = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut conn, b"passes").await;
}
