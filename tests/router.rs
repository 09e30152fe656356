//! `pgquorum router` as applications use it: a real router process in front of sidecars that
//! manage real Postgres, clients speaking the real protocol through it.

mod harness;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::workload::{rows_on, topology, wait_sync_committed};
use harness::{cli, free_port, pki, wait_for, TestCluster, BIN, PG_PASSWORD};

const START: Duration = Duration::from_secs(120);
const FAILOVER: Duration = Duration::from_secs(60);

/// A router process over `c`'s members, killed when dropped.
struct Router {
    child: Child,
    rw: String,
    ro: String,
    http: String,
    log: PathBuf,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- router log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Router {
    async fn start(c: &TestCluster) -> Router {
        let (rw, ro, http) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let endpoints: Vec<String> = c
            .nodes
            .values()
            .map(|n| format!("\"{}\"", n.addr))
            .collect();
        let (cert, key) = pki().operator_cert();
        let cfg = format!(
            "endpoints = [{}]\nlisten_rw = \"{rw}\"\nlisten_ro = \"{ro}\"\nhttp_addr = \"{http}\"\n\
             write_timeout_ms = 30000\n\n[security]\nca_file = \"{}\"\ncert_file = \"{}\"\n\
             key_file = \"{}\"\n",
            endpoints.join(", "),
            pki().ca().display(),
            cert.display(),
            key.display()
        );
        let path = c.root.path().join("router.toml");
        std::fs::write(&path, cfg).expect("router config");
        let log = c.root.path().join("router.log");
        let out = std::fs::File::create(&log).expect("router log");
        let child = Command::new(BIN)
            .args(["router", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn the router");
        let r = Router {
            child,
            rw,
            ro,
            http,
            log,
        };
        wait_for("the router knows the primary", START, || async {
            (harness::http_get(&r.http, "/health", None).await?.0 == 200).then_some(())
        })
        .await;
        r
    }

    fn url(addr: &str) -> String {
        format!("postgresql://postgres:{PG_PASSWORD}@{addr}/postgres?connect_timeout=45")
    }
}

/// Gives every member an HTTP address: the router asks a new primary's `/primary` before it
/// sends writes there.
fn serve_http(c: &mut TestCluster) {
    for id in c.nodes.keys().copied().collect::<Vec<_>>() {
        let addr = format!("127.0.0.1:{}", free_port());
        c.insert_config(id, "listen_addr", &format!("http_addr = \"{addr}\""));
    }
}

/// A three-member cluster managing Postgres, its members serving HTTP, and a router in front:
/// the cluster, its first primary and the router.
async fn routed_cluster() -> (TestCluster, u64, Router) {
    let mut c = TestCluster::with_postgres(3);
    serve_http(&mut c);
    c.start_all();
    let (primary, _) = c.wait_postgres(START).await;
    let router = Router::start(&c).await;
    (c, primary, router)
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// An error with what the server said, if it said anything (`Display` alone gives "db error").
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {}: {} ({:?})",
            db.severity(),
            db.code().code(),
            db.message(),
            db.detail()
        ),
        None => format!(
            "{e} ({:?})",
            std::error::Error::source(e).map(|s| s.to_string())
        ),
    }
}

/// What a client that opens a new connection per write saw.
#[derive(Default)]
struct Seen {
    acked: Vec<(i64, Instant)>,
    /// Connections that could not be made (the router refused, or nothing answered): when the
    /// attempt began, and why it failed.
    connect_errors: Vec<(Instant, String)>,
    /// Statements a server ended (a session terminated under a fast shutdown, say).
    statement_errors: Vec<(Instant, String)>,
    /// The longest time one connection took to be made.
    slowest_connect: Duration,
}

/// Writes one row per new connection through `url` until `stop`, ids from `first` up.
fn writer(
    url: String,
    first: i64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut id = first - 1;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            id += 1;
            let t = Instant::now();
            let client = match connect(&url).await {
                Ok(c) => c,
                Err(e) => {
                    seen.connect_errors.push((t, error_text(&e)));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            seen.slowest_connect = seen.slowest_connect.max(t.elapsed());
            match client
                .execute("INSERT INTO w (id) VALUES ($1)", &[&id])
                .await
            {
                Ok(_) => seen.acked.push((id, Instant::now())),
                Err(e) => seen.statement_errors.push((Instant::now(), error_text(&e))),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_router_wait_out_a_switchover_and_a_host_crash_and_lose_nothing() {
    let (mut c, old, router) = routed_cluster().await;
    wait_sync_committed(&c).await;
    let url = Router::url(&router.rw);
    connect(&url)
        .await
        .expect("through the router")
        .batch_execute("CREATE TABLE IF NOT EXISTS w (id bigint PRIMARY KEY)")
        .await
        .expect("create table");

    // A switchover: new connections wait for the new primary; none fails.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(url.clone(), 1, stop.clone());
    wait_for("writes flow", FAILOVER, || async {
        (rows_on(&c, old).await.len() >= 20).then_some(())
    })
    .await;
    let ep = c.endpoints().join(",");
    let switched_at = Instant::now();
    let (ok, _, err) = cli(&["switchover"], &[("PGQUORUM_ENDPOINTS", &ep)]);
    assert!(ok, "{err}");
    let (new, _) = wait_for("a new primary", FAILOVER, || async {
        let (p, t) = c.wait_postgres(FAILOVER).await;
        (p != old).then_some((p, t))
    })
    .await;
    let base = rows_on(&c, new).await.len();
    wait_for("writes on the new primary", FAILOVER, || async {
        (rows_on(&c, new).await.len() >= base + 10).then_some(())
    })
    .await;
    let switch_took = switched_at.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = w.await.expect("writer");
    assert!(
        seen.connect_errors.is_empty(),
        "a client saw connection errors during a switchover: {:?}",
        seen.connect_errors
    );
    let present = rows_on(&c, new).await;
    let lost: Vec<i64> = seen
        .acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "FIGURE router_switchover slowest_connect_ms={} switch_to_writes_ms={} acked={} statement_errors={}",
        seen.slowest_connect.as_millis(),
        switch_took.as_millis(),
        seen.acked.len(),
        seen.statement_errors.len()
    );

    // A host crash: connections wait for the successor; every acknowledged write survives.
    wait_sync_committed(&c).await;
    harness::workload::wait_leader_settled(&c, Duration::from_secs(2)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(url.clone(), 1_000_000, stop.clone());
    wait_for("writes flow again", FAILOVER, || async {
        (rows_on(&c, new).await.len() >= present.len() + 20).then_some(())
    })
    .await;
    let crash = c.crash_host(new);
    let (third, _) = wait_for("a primary after the crash", FAILOVER, || async {
        let t = topology(&c).await;
        let p = t.primary.as_ref()?.node_id;
        (p != new && c.writable(p).await == Some(true)).then_some((p, t))
    })
    .await;
    let before = rows_on(&c, third).await.len();
    wait_for("writes on the successor", FAILOVER, || async {
        (rows_on(&c, third).await.len() > before + 10).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = w.await.expect("writer");
    let present = rows_on(&c, third).await;
    let lost: Vec<i64> = seen
        .acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost after a crash: {lost:?}"
    );
    // A connection whose handshake was under way with the primary when its host died dies with
    // it (the client has already spoken to that server: no proxy can move it). Every one begun
    // after the crash must wait for the successor instead.
    let (in_flight, after): (Vec<_>, Vec<_>) = seen
        .connect_errors
        .iter()
        .partition(|(began, _)| *began < crash);
    assert!(
        after.is_empty(),
        "connections begun after the crash failed instead of waiting for the successor: \
         {after:?} (in flight at the crash: {in_flight:?})"
    );
    assert!(
        in_flight.len() <= 1,
        "more than the one connection in flight at the crash failed: {in_flight:?}"
    );
    if !in_flight.is_empty() {
        eprintln!("the connection in flight at the crash failed: {in_flight:?}");
    }
    let resumed = seen
        .acked
        .iter()
        .find(|(_, at)| *at > crash)
        .map(|(_, at)| at.duration_since(crash));
    eprintln!(
        "FIGURE router_host_crash first_write_after_ms={} slowest_connect_ms={} statement_errors={}",
        resumed.map_or(0, |d| d.as_millis()),
        seen.slowest_connect.as_millis(),
        seen.statement_errors.len()
    );
    for (at, e) in seen.statement_errors.iter().take(3) {
        eprintln!(
            "statement error {} ms after the crash: {e}",
            at.saturating_duration_since(crash).as_millis()
        );
    }
    let metrics = harness::http_get(&router.http, "/metrics", None)
        .await
        .expect("router metrics")
        .1;
    assert!(metrics.contains("pgquorum_router_held_total"), "{metrics}");
}

/// The port of the Postgres that answered through `url`.
async fn server_port(url: &str) -> Option<i32> {
    try_server_port(url).await.ok()
}

/// The port of the Postgres that answered through `url`, or why none did.
async fn try_server_port(url: &str) -> Result<i32, String> {
    let client = connect(url).await.map_err(|e| format!("connect: {e}"))?;
    let row = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .map_err(|e| format!("query: {e}"))?;
    row.try_get(0).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_over_the_replicas_and_survive_a_replicas_death() {
    let (mut c, primary, router) = routed_cluster().await;
    let url = Router::url(&router.ro);
    let replicas: Vec<u64> = (1..=3).filter(|id| *id != primary).collect();
    let port_of: std::collections::BTreeMap<u64, i32> = c
        .nodes
        .iter()
        .map(|(id, n)| (*id, i32::from(n.pg_port)))
        .collect();
    // The router reads the replicas' health once a second; until then reads go to the primary.
    let spread = wait_for("reads reach both replicas", START, || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..8 {
            seen.insert(server_port(&url).await?);
        }
        let want: std::collections::BTreeSet<i32> = replicas.iter().map(|id| port_of[id]).collect();
        (seen == want).then_some(seen)
    })
    .await;
    eprintln!("reads went to ports {spread:?}");
    // A replica dies: every read still gets an answer, from the other replica (or, while the
    // router has not yet seen the death, after a refused connect to the dead one).
    c.crash_host(replicas[0]);
    for _ in 0..10 {
        let port = try_server_port(&url)
            .await
            .unwrap_or_else(|e| panic!("a read after a replica's death: {e}"));
        assert_ne!(
            port, port_of[&replicas[0]],
            "a read reached the dead replica"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_the_primary_is_closed_when_it_loses_its_office() {
    let (mut c, old, router) = routed_cluster().await;
    let url = Router::url(&router.rw);
    let client = connect(&url).await.expect("through the router");
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("a query")
        .get(0);
    assert_eq!(port, i32::from(c.nodes[&old].pg_port));
    // The primary's sidecar freezes: its guard fences Postgres when the lease ends, and the
    // cluster commits a successor. The session through the router does not outlive that.
    c.signal_sidecar(old, libc::SIGSTOP);
    wait_for("the session to the old primary ends", FAILOVER, || async {
        client.simple_query("SELECT 1").await.is_err().then_some(())
    })
    .await;
    // A new session lands on the successor.
    let (new, _) = wait_for("a successor", FAILOVER, || async {
        let t = topology(&c).await;
        let p = t.primary.as_ref()?.node_id;
        (p != old).then_some((p, t))
    })
    .await;
    let port = wait_for("a session on the successor", FAILOVER, || async {
        server_port(&url).await
    })
    .await;
    assert_eq!(port, i32::from(c.nodes[&new].pg_port));
    c.signal_sidecar(old, libc::SIGCONT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_through_the_router_cancels_the_right_backend() {
    let (_cluster, _, router) = routed_cluster().await;
    let url = Router::url(&router.rw);
    let sleeper = connect(&url).await.expect("through the router");
    let bystander = connect(&url).await.expect("a second session");
    let token = sleeper.cancel_token();
    let bystander_token = bystander.cancel_token();
    let started = Instant::now();
    let sleep = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await });
    let other_sleep =
        tokio::spawn(async move { bystander.simple_query("SELECT pg_sleep(61)").await });
    let watcher = connect(&url).await.expect("a watcher session");
    let running = |q: &'static str| {
        let watcher = &watcher;
        async move {
            let n: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = $1",
                    &[&q],
                )
                .await
                .ok()?
                .get(0);
            Some(n)
        }
    };
    wait_for("both sleeps run", FAILOVER, || async {
        (running("SELECT pg_sleep(60)").await? == 1 && running("SELECT pg_sleep(61)").await? == 1)
            .then_some(())
    })
    .await;
    // The sleeper's cancel goes to the router's address, as libpq sends it.
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send a cancel through the router");
    let result = tokio::time::timeout(Duration::from_secs(10), sleep)
        .await
        .expect("the sleep ended within 10 s")
        .expect("task");
    let e = result.expect_err("the sleep was cancelled");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Only that backend: the other session's query still runs.
    assert_eq!(running("SELECT pg_sleep(61)").await, Some(1));
    assert!(!other_sleep.is_finished());
    bystander_token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel the other sleep");
    let e = tokio::time::timeout(Duration::from_secs(10), other_sleep)
        .await
        .expect("the other sleep ended")
        .expect("task")
        .expect_err("cancelled too");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
}

/// A `pgquorum local up` cluster, brought down (Postgres too) when dropped.
struct LocalCluster {
    dir: tempfile::TempDir,
}

impl LocalCluster {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--dir")
            .arg(self.dir.path())
            .env_remove("PGQUORUM_ENDPOINTS")
            .env_remove("PGQUORUM_CA_FILE")
            .env_remove("PGQUORUM_CERT_FILE")
            .env_remove("PGQUORUM_KEY_FILE")
            .env_remove("PGQUORUM_INSECURE")
            .stdin(Stdio::null())
            .output()
            .expect("run pgquorum local")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.run(&["local", "down"]);
    }
}

/// The health checks a router or load balancer reads, on the cluster a newcomer starts with
/// `pgquorum local up`: it prints one URL per member, and `/primary` answers 200 on exactly one
/// of them (503 on the others); `/metrics` answers without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_serves_the_health_checks_and_prints_their_urls() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Postgres runs as the unprivileged `postgres` user when tests run as root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod temp dir");
    let local = LocalCluster { dir };
    let up = local.run(&["local", "up", "--nodes", "3"]);
    let out = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(
        up.status.success(),
        "local up: {out}{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // `curl http://127.0.0.1:PORT/primary   # nN: also /replica /health /cluster /metrics`
    let http: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("curl http://")?.split_once("/primary"))
        .map(|(addr, _)| addr.to_string())
        .collect();
    assert_eq!(http.len(), 3, "one HTTP address per member: {out}");
    let primary = wait_for("/primary 200 on exactly one member", START, || async {
        let mut codes = Vec::new();
        for addr in &http {
            codes.push(harness::http_get(addr, "/primary", None).await?.0);
        }
        let ok: Vec<&String> = http
            .iter()
            .zip(&codes)
            .filter(|(_, c)| **c == 200)
            .map(|(a, _)| a)
            .collect();
        let others_refuse = codes.iter().filter(|c| **c == 503).count() == http.len() - 1;
        (ok.len() == 1 && others_refuse).then(|| ok[0].clone())
    })
    .await;
    let (code, body) = harness::http_get(&primary, "/metrics", None)
        .await
        .expect("/metrics answers");
    assert_eq!(code, 200, "/metrics without a token: {body}");
}
