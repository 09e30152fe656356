//! `pgquorum bench router`: what the router costs a select-only load (pgbench's `-S` shape:
//! one indexed lookup per query on a connection of its own per client), directly against the
//! primary and through the router's read-write port, alternated to even out drift.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::local;
use crate::router::{self, RouterConfig};

const ACCOUNTS: i32 = 100_000;

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| "cannot connect to Postgres".to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

/// Queries per second of `clients` connections to `url` for `seconds`.
async fn select_only(url: &str, clients: u32, seconds: u64) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..clients {
        let client = connect(url).await?;
        let stmt = client
            .prepare("SELECT abalance FROM bench_accounts WHERE aid = $1")
            .await?;
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            // A small LCG is enough to spread the lookups over the table.
            let mut x = 0x9E37_79B9u32.wrapping_mul(n + 1);
            while !stop.load(Ordering::Relaxed) {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let aid = (x % ACCOUNTS as u32) as i32 + 1;
                if client.query_one(&stmt, &[&aid]).await.is_err() {
                    return Err(anyhow::anyhow!("a query failed"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Runs the router bench on a fresh local cluster in `dir`.
pub async fn run(clients: u32, seconds: u64, rounds: u32, dir: &Path) -> Result<()> {
    if clients == 0 || seconds == 0 || rounds == 0 {
        bail!("--clients, --seconds and --rounds must be positive");
    }
    let layout = local::create_with(3, dir, true, true, None)?;
    local::start_missing(&layout, true)?;
    let result = measure(&layout, clients, seconds, rounds).await;
    let _ = local::stop_all(dir, true);
    result
}

async fn measure(layout: &local::Layout, clients: u32, seconds: u64, rounds: u32) -> Result<()> {
    let topo = local::wait_ready(layout, Duration::from_secs(90)).await?;
    let primary = topo.primary.as_ref().context("no primary")?.node_id;
    let node = layout
        .nodes
        .iter()
        .find(|n| n.id == primary)
        .context("the primary's member")?;
    let direct = layout.member_uri(node).context("a Postgres cluster")?;
    let rw = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let cfg = RouterConfig {
        endpoints: layout.endpoints(),
        listen_rw: rw.clone(),
        listen_ro: None,
        http_addr: None,
        write_timeout_ms: 30_000,
        max_lag_bytes: None,
        read_fallback_to_primary: true,
        security: layout.client_security(),
    };
    tokio::spawn(async move {
        if let Err(e) = router::run(cfg, std::future::pending()).await {
            eprintln!("router failed: {e:#}");
        }
    });
    let through = direct.replace(&format!("{}:{}", node.pg_host(), node.pg_port), &rw);
    let deadline = Instant::now() + Duration::from_secs(30);
    while connect(&through).await.is_err() {
        if Instant::now() > deadline {
            bail!("the router did not take connections within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let setup = connect(&direct).await?;
    setup
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_accounts; \
             CREATE TABLE bench_accounts (aid int PRIMARY KEY, abalance int NOT NULL); \
             INSERT INTO bench_accounts SELECT g, 0 FROM generate_series(1, {ACCOUNTS}) g; \
             ANALYZE bench_accounts"
        ))
        .await?;
    // Warm the caches on both paths before anything counts.
    select_only(&direct, clients, 1).await?;
    select_only(&through, clients, 1).await?;
    let (mut d, mut r) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let a = select_only(&direct, clients, seconds).await?;
        let b = select_only(&through, clients, seconds).await?;
        println!(
            "round {round}: direct {a:.0} queries/s, through the router {b:.0} queries/s ({:+.1} %)",
            (b / a - 1.0) * 100.0
        );
        d.push(a);
        r.push(b);
    }
    let (sd, sr): (f64, f64) = (d.iter().sum(), r.iter().sum());
    println!(
        "select-only, {clients} clients, {rounds} x {seconds} s each: direct {:.0} queries/s, \
         through the router {:.0} queries/s; the router costs {:.1} % of the throughput",
        sd / f64::from(rounds),
        sr / f64::from(rounds),
        (1.0 - sr / sd) * 100.0
    );
    Ok(())
}
