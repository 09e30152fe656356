//! The HTTP API's shape, as real Toxiproxy has it.

mod common;

use std::time::Duration;

use common::*;
use pgquorum_toxiproxy::{Client, Stream, Toxic, ToxicKind};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn proxy_lifecycle() {
    let (_server, client) = server();
    let echo = echo().await;

    let p = client
        .create_proxy("a", "127.0.0.1:0", &echo.addr)
        .await
        .unwrap();
    assert!(p.enabled);
    assert_eq!(p.upstream, echo.addr);
    assert!(
        !p.listen.ends_with(":0"),
        "bound port reported: {}",
        p.listen
    );
    assert_eq!(client.proxy("a").await.unwrap(), p);
    assert_eq!(
        client.proxies().await.unwrap().keys().collect::<Vec<_>>(),
        ["a"]
    );

    let dup = client
        .create_proxy("a", "127.0.0.1:0", &echo.addr)
        .await
        .unwrap_err();
    assert_eq!(dup.status(), Some(409));
    let missing = client.proxy("nope").await.unwrap_err();
    assert_eq!(missing.status(), Some(404));
    assert!(missing.to_string().contains("proxy not found"), "{missing}");
    let no_upstream = client
        .create_proxy("b", "127.0.0.1:0", "")
        .await
        .unwrap_err();
    assert_eq!(no_upstream.status(), Some(400));
    let bad_listen = client
        .create_proxy("b", "not an address", &echo.addr)
        .await
        .unwrap_err();
    assert_eq!(bad_listen.status(), Some(400));

    let off = client.set_enabled("a", false).await.unwrap();
    assert!(!off.enabled);
    assert_eq!(off.listen, p.listen);
    let on = client.set_enabled("a", true).await.unwrap();
    assert!(on.enabled);
    assert_eq!(on.listen, p.listen, "re-enabled on the same port");

    client.delete_proxy("a").await.unwrap();
    assert_eq!(client.proxy("a").await.unwrap_err().status(), Some(404));
    assert_eq!(
        client.delete_proxy("a").await.unwrap_err().status(),
        Some(404)
    );
}

#[tokio::test]
async fn error_and_toxic_wire_format() {
    let (server, client) = server();
    let (status, body) = http(&server.url(), "GET", "/proxies/missing", "").await;
    assert_eq!(status, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"error": "proxy not found", "status": 404})
    );

    let (status, body) = http(&server.url(), "GET", "/version", "").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], pgquorum_toxiproxy::VERSION);
    assert_eq!(client.version().await.unwrap(), pgquorum_toxiproxy::VERSION);

    client
        .create_proxy("p", "127.0.0.1:0", "127.0.0.1:9")
        .await
        .unwrap();
    // Defaults: stream downstream, toxicity 1, name <type>_<stream>.
    let (status, body) = http(
        &server.url(),
        "POST",
        "/proxies/p/toxics",
        r#"{"type":"latency","attributes":{"latency":5}}"#,
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["name"], "latency_downstream");
    assert_eq!(v["stream"], "downstream");
    assert_eq!(v["toxicity"], 1.0);
    assert_eq!(
        v["attributes"],
        serde_json::json!({"latency": 5, "jitter": 0})
    );
    let (status, _) = http(
        &server.url(),
        "POST",
        "/proxies/p/toxics",
        r#"{"type":"latency","attributes":{"latency":5}}"#,
    )
    .await;
    assert_eq!(status, 409);
    let (status, _) = http(
        &server.url(),
        "POST",
        "/proxies/p/toxics",
        r#"{"type":"nope"}"#,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http(
        &server.url(),
        "POST",
        "/proxies/p/toxics",
        r#"{"type":"timeout","stream":"sideways"}"#,
    )
    .await;
    assert_eq!(status, 400);

    // Update merges attributes.
    let (status, body) = http(
        &server.url(),
        "PATCH",
        "/proxies/p/toxics/latency_downstream",
        r#"{"attributes":{"jitter":2}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let t = client.toxics("p").await.unwrap();
    assert_eq!(
        t[0].kind,
        ToxicKind::Latency {
            latency: 5,
            jitter: 2
        }
    );
    let mut changed = t[0].clone();
    changed.toxicity = 0.5;
    changed.kind = ToxicKind::Latency {
        latency: 7,
        jitter: 0,
    };
    assert_eq!(client.update_toxic("p", &changed).await.unwrap(), changed);
    client
        .remove_toxic("p", "latency_downstream")
        .await
        .unwrap();
    assert_eq!(
        client
            .remove_toxic("p", "latency_downstream")
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert!(client.toxics("p").await.unwrap().is_empty());
}

#[tokio::test]
async fn reset_clears_toxics_and_enables() {
    let (_server, client) = server();
    let echo = echo().await;
    client
        .create_proxy("a", "127.0.0.1:0", &echo.addr)
        .await
        .unwrap();
    let t = Toxic::new("cut", Stream::Upstream, ToxicKind::Timeout { timeout: 0 });
    assert_eq!(client.add_toxic("a", &t).await.unwrap(), t);
    client.set_enabled("a", false).await.unwrap();
    client.reset().await.unwrap();
    let p = client.proxy("a").await.unwrap();
    assert!(p.enabled);
    assert!(p.toxics.is_empty());
}

#[tokio::test]
async fn populate_creates_and_keeps() {
    let (server, client) = server();
    let body = r#"[{"name":"x","listen":"127.0.0.1:0","upstream":"127.0.0.1:9"},
                   {"name":"y","listen":"127.0.0.1:0","upstream":"127.0.0.1:9","enabled":false}]"#;
    let (status, resp) = http(&server.url(), "POST", "/populate", body).await;
    assert_eq!(status, 201, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["proxies"].as_array().unwrap().len(), 2);
    let all = client.proxies().await.unwrap();
    assert!(all["x"].enabled);
    assert!(!all["y"].enabled);
    // Same listen and upstream: the proxy is kept, port included.
    let same = format!(
        r#"[{{"name":"x","listen":"{}","upstream":"127.0.0.1:9"}}]"#,
        all["x"].listen
    );
    let (status, resp) = http(&server.url(), "POST", "/populate", &same).await;
    assert_eq!(status, 201);
    let v: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["proxies"][0]["listen"], all["x"].listen.as_str());
    let (status, _) = http(&server.url(), "POST", "/populate", r#"[{"name":"z"}]"#).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn binary_serves_the_api() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgquorum-toxiproxy"))
        .args(["-host", "127.0.0.1", "-port", &port.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = Client::new(&format!("127.0.0.1:{port}")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.version().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "binary did not answer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let echo = echo().await;
    let p = client
        .create_proxy("bin", "127.0.0.1:0", &echo.addr)
        .await
        .unwrap();
    let mut conn = TcpStream::connect(&p.listen).await.unwrap();
    conn.write_all(b"hi").await.unwrap();
    assert_eq!(read_n(&mut conn, 2, Duration::from_secs(5)).await, b"hi");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn launch_falls_back_to_own_server() {
    if std::env::var_os("TOXIPROXY_URL").is_some() {
        skip(
            "launch_falls_back_to_own_server",
            "TOXIPROXY_URL names a server, so there is no fallback to test; unset TOXIPROXY_URL",
        );
        return;
    }
    let (client, backend) = pgquorum_toxiproxy::connect_or_start().await.unwrap();
    assert!(client.version().await.is_ok());
    assert!(
        backend.describe().contains(&backend.url()),
        "{}",
        backend.describe()
    );
}
