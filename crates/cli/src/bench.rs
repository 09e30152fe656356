//! `pgquorum bench raft`: measures the Raft group on this machine with real sidecar processes
//! and prints figures (election after a leader's kill -9, commit latency, idle memory and CPU).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use raft_node::proto::{self, cluster_client::ClusterClient};
use tonic::transport::{Channel, Endpoint};

use crate::local::{self, Layout};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Election time after kill -9 of the leader, SetConfig commit latency, sidecar RSS and
    /// idle CPU, on a fresh local 3-member group.
    Raft {
        /// Leader kills to time.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Sequential commits to time.
        #[arg(long, default_value_t = 1000)]
        commits: u32,
        /// Working directory (default: a new directory under the system temp dir, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Write outage, lost acknowledged writes and split-brain observations under a steady write
    /// load over several connections through a multi-host URL, on fresh local 3-member clusters
    /// with real Postgres, for each fault; the sidecars' memory and idle CPU; the commit
    /// latency before the fault.
    Failover {
        /// Runs per fault.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Faults to inject, comma-separated (default: host-crash, postgres-crash,
        /// sidecar-freeze).
        #[arg(long, value_enum, value_delimiter = ',')]
        faults: Vec<Fault>,
        /// Write the figures to this file as a JSON array, one object per fault.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep every run's cluster directory (with the members' logs) instead of removing it.
        #[arg(long)]
        keep: bool,
        /// Writer connections, each inserting in a loop.
        #[arg(long, default_value_t = 4)]
        writers: u32,
        /// Pause of each writer between two inserts, in ms (4 writers and 10 ms: 100 to 250
        /// writes a second on loopback, by the commit latency).
        #[arg(long, default_value_t = 10)]
        pause_ms: u64,
        /// synchronous_mode of the clusters: off, on, strict or quorum.
        #[arg(long, default_value = "on")]
        sync: String,
        /// Keep Raft leadership on the primary's node (leader_handoff = false): a host crash
        /// then costs an election and a new leader's wait besides the lease.
        #[arg(long)]
        leader_on_primary: bool,
        /// Lease length of the clusters, in ms (default: the cluster default).
        #[arg(long)]
        lease_ms: Option<u64>,
    },
    /// Select-only throughput directly against the primary and through `pgquorum router`, on
    /// a fresh local 3-member cluster: what the router costs.
    Router {
        /// Client connections, each querying in a loop.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Alternations of direct and routed measurements.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// CPUs (comma-separated ids) for the router's process alone; the cluster and the
        /// clients then run on the others, as with a router on an application host. By default
        /// all share every CPU.
        #[arg(long, value_delimiter = ',')]
        router_cpus: Vec<usize>,
    },
}

/// A fault injected on the primary's member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// kill -9 of the sidecar and of Postgres' whole process group, as a host crash.
    HostCrash,
    /// kill -9 of the postmaster only; the sidecar lives on.
    PostgresCrash,
    /// SIGSTOP of the sidecar (a frozen or partitioned agent); Postgres runs on until fenced.
    SidecarFreeze,
    /// SIGSTOP of the sidecar, the guard and Postgres together (a frozen VM or host).
    NodeFreeze,
    /// A planned switchover (`pgquorum switchover`) to the most advanced replica, once the Raft
    /// leader has been in office for longer than a new leader's wait.
    Switchover,
    /// The primary's member cut off from the others both ways: every packet its processes send
    /// and every packet to its ports is dropped (nftables on loopback, the member's processes in
    /// their own cgroup); the bench's own clients still reach it, the worst case for split
    /// brain. Needs root, nftables and cgroup v2; skipped with the reason otherwise.
    Partition,
    /// A clean restart of the primary's sidecar (SIGTERM, then a new process at once), as in an
    /// upgrade: the new sidecar adopts the running Postgres; no failover is expected.
    SidecarRestart,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::HostCrash => "host-crash",
            Fault::PostgresCrash => "postgres-crash",
            Fault::SidecarFreeze => "sidecar-freeze",
            Fault::NodeFreeze => "node-freeze",
            Fault::Switchover => "switchover",
            Fault::Partition => "partition",
            Fault::SidecarRestart => "sidecar-restart",
        }
    }

    /// Whether the fault is expected to move the primary.
    fn fails_over(self) -> bool {
        self != Fault::SidecarRestart
    }
}

pub async fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Router {
            clients,
            seconds,
            rounds,
            router_cpus,
        } => {
            let dir =
                std::env::temp_dir().join(format!("pgquorum-bench-router-{}", std::process::id()));
            let result =
                crate::bench_router::run(clients, seconds, rounds, &router_cpus, &dir).await;
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        BenchCmd::Failover {
            runs,
            faults,
            json,
            keep,
            writers,
            pause_ms,
            sync,
            leader_on_primary,
            lease_ms,
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            if writers == 0 {
                bail!("--writers must be at least 1");
            }
            let faults = if faults.is_empty() {
                vec![Fault::HostCrash, Fault::PostgresCrash, Fault::SidecarFreeze]
            } else {
                faults
            };
            if let Some(path) = &json {
                // Fail before minutes of runs, not after.
                std::fs::write(path, "[]\n")
                    .with_context(|| format!("cannot write --json {}", path.display()))?;
            }
            let setup = Setup {
                sync,
                leader_on_primary,
                lease_ms,
                writers,
                pause: Duration::from_millis(pause_ms),
            };
            let mut report = Vec::new();
            'faults: for fault in faults {
                let mut all = Vec::new();
                for run in 1..=runs {
                    let dir = std::env::temp_dir()
                        .join(format!("pgquorum-bench-{}-{run}", std::process::id()));
                    // A partition needs every member on its own host: network namespaces.
                    let net = if fault == Fault::Partition {
                        match crate::netns::Netns::new(3) {
                            Ok(n) => Some(n),
                            Err(why) => {
                                println!("{}: skipped: {why}", fault.name());
                                report.push(serde_json::json!({
                                    "fault": fault.name(),
                                    "runs": 0,
                                    "skipped": why,
                                }));
                                continue 'faults;
                            }
                        }
                    } else {
                        None
                    };
                    let r = failover_run(&dir, fault, &setup, net.as_ref(), run == 1).await;
                    let _ = local::stop_all(&dir, true);
                    drop(net);
                    let f = match r {
                        Ok(f) => {
                            if keep {
                                println!("{} run {run}: kept {}", fault.name(), dir.display());
                            } else {
                                let _ = std::fs::remove_dir_all(&dir);
                            }
                            f
                        }
                        Err(e) => {
                            // The members' logs tell why.
                            eprintln!(
                                "{} run {run} failed; logs kept in {}",
                                fault.name(),
                                dir.display()
                            );
                            return Err(e);
                        }
                    };
                    println!(
                        "{} run {run}: write outage {:.0} ms, {} of {} acknowledged writes lost \
                         ({:.0} writes/s), {} split-brain observations, primary moved: {}, \
                         commit latency median {:.2} ms, sidecar RSS max {} KiB",
                        fault.name(),
                        f.outage_ms,
                        f.lost,
                        f.acked,
                        f.writes_per_s,
                        f.split_brain,
                        f.moved,
                        f.commit_ms,
                        f.rss_kb_max
                    );
                    all.push(f);
                }
                let outages: Vec<f64> = all.iter().map(|f| f.outage_ms).collect();
                let commits: Vec<f64> = all.iter().map(|f| f.commit_ms).collect();
                let lost: usize = all.iter().map(|f| f.lost).sum();
                let acked: usize = all.iter().map(|f| f.acked).sum();
                println!(
                    "{} (synchronous_mode {}, leader {}): write outage {}; lost {lost} of \
                     {acked} acknowledged writes; commit latency {}",
                    fault.name(),
                    setup.sync,
                    if setup.leader_on_primary {
                        "on the primary's node"
                    } else {
                        "apart from the primary"
                    },
                    summary(outages.clone()),
                    summary(commits.clone())
                );
                report.push(fault_json(fault, &setup, &all));
            }
            if let Some(path) = &json {
                let text = serde_json::to_string_pretty(&report)?;
                std::fs::write(path, text + "\n")
                    .with_context(|| format!("cannot write --json {}", path.display()))?;
                println!("figures written to {}", path.display());
            }
            Ok(())
        }
        BenchCmd::Raft { runs, commits, dir } => {
            if runs == 0 || commits == 0 {
                bail!("--runs and --commits must be at least 1");
            }
            let (dir, remove) = match dir {
                Some(d) => (d, false),
                None => (
                    std::env::temp_dir().join(format!("pgquorum-bench-{}", std::process::id())),
                    true,
                ),
            };
            if dir.join("cluster.json").exists() {
                bail!(
                    "{} already holds a cluster; give an empty --dir",
                    dir.display()
                );
            }
            let layout = local::load_or_create(3, &dir, false, true)?;
            local::start_missing(&layout, true)?;
            let result = bench_raft(&layout, runs, commits).await;
            let _ = local::stop_all(&dir, true);
            if remove {
                let _ = std::fs::remove_dir_all(&dir);
            }
            result
        }
    }
}

/// One connection to `addr`, as the layout's operator (over TLS unless it is insecure).
async fn connect(layout: &Layout, addr: &str) -> Result<ClusterClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(5));
    let ch = raft_node::security::connect(endpoint, layout.tls()?.as_ref()).await?;
    Ok(ClusterClient::new(ch))
}

async fn status(layout: &Layout, addr: &str) -> Option<proto::NodeStatus> {
    let mut c = connect(layout, addr).await.ok()?;
    c.get_node_status(proto::GetNodeStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The leader every member in `addrs` agrees on.
async fn agreed_leader(layout: &Layout, addrs: &[&str]) -> Option<u64> {
    let mut leader = None;
    for a in addrs {
        let s = status(layout, a).await?;
        if s.leader_id == 0 || leader.is_some_and(|l| l != s.leader_id) {
            return None;
        }
        leader = Some(s.leader_id);
    }
    leader
}

async fn set_config(c: &mut ClusterClient<Channel>, value: u64) -> Result<(), tonic::Status> {
    let changes = HashMap::from([("maximum_lag_on_failover".to_string(), value.to_string())]);
    c.set_config(proto::SetConfigRequest { changes })
        .await
        .map(|_| ())
}

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:.1} · median {:.1} · p99 {:.1} · max {:.1} ms (n={})",
        ms[0],
        pick(0.5),
        pick(0.99),
        ms[ms.len() - 1],
        ms.len()
    )
}

fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

async fn bench_raft(layout: &Layout, runs: u32, commits: u32) -> Result<()> {
    local::wait_ready(layout, Duration::from_secs(30)).await?;
    let by_id: HashMap<u64, &local::LocalNode> = layout.nodes.iter().map(|n| (n.id, n)).collect();
    let all: Vec<&str> = layout.nodes.iter().map(|n| n.api_addr.as_str()).collect();

    // Commit latency: one connection to the leader, sequential SetConfig entries.
    let leader = agreed_leader(layout, &all).await.context("no leader")?;
    let mut c = connect(layout, &by_id[&leader].api_addr).await?;
    let mut lat = Vec::with_capacity(commits as usize);
    for i in 0..commits {
        let t = Instant::now();
        set_config(&mut c, 2_000_000 + u64::from(i)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "commit latency of one SetConfig (loopback, 3 members, fsync per append): {}",
        summary(lat)
    );

    // Idle footprint of each sidecar.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids: Vec<i32> = layout.nodes.iter().filter_map(|n| n.pid()).collect();
    let ticks0: Vec<u64> = pids.iter().filter_map(|p| cpu_ticks(*p)).collect();
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let ticks1: Vec<u64> = pids.iter().filter_map(|p| cpu_ticks(*p)).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    for (i, pid) in pids.iter().enumerate() {
        let cpu = match (ticks0.get(i), ticks1.get(i)) {
            (Some(a), Some(b)) => (b - a) as f64 / hz / window.as_secs_f64() * 100.0,
            _ => f64::NAN,
        };
        println!(
            "sidecar pid {pid}: RSS {:.1} MiB, idle CPU {cpu:.2} % (over {} s)",
            rss_kib(*pid).unwrap_or(0) as f64 / 1024.0,
            window.as_secs()
        );
    }

    // Election after kill -9 of the leader, then the first successful write.
    let mut elect = Vec::new();
    let mut write = Vec::new();
    for run in 1..=runs {
        local::wait_ready(layout, Duration::from_secs(30)).await?;
        let old = agreed_leader(layout, &all)
            .await
            .context("no leader before the kill")?;
        let pid = by_id[&old].pid().context("leader not running")?;
        let t0 = Instant::now();
        // SAFETY: killing a sidecar this bench started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let rest: Vec<&str> = layout
            .nodes
            .iter()
            .filter(|n| n.id != old)
            .map(|n| n.api_addr.as_str())
            .collect();
        let new = loop {
            if let Some(l) = agreed_leader(layout, &rest).await.filter(|l| *l != old) {
                break l;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("run {run}: no new leader within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let e = t0.elapsed();
        let mut c = connect(layout, &by_id[&new].api_addr).await?;
        while set_config(&mut c, 3_000_000 + u64::from(run))
            .await
            .is_err()
        {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("run {run}: no write within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let w = t0.elapsed();
        println!(
            "run {run}: killed leader {old}; node {new} leads after {} ms, first write after {} ms",
            e.as_millis(),
            w.as_millis()
        );
        elect.push(e.as_secs_f64() * 1000.0);
        write.push(w.as_secs_f64() * 1000.0);
        local::start_missing(layout, true)?;
    }
    if !elect.is_empty() {
        println!("new leader after kill -9 of the leader: {}", summary(elect));
        println!(
            "first committed write after kill -9 of the leader: {}",
            summary(write)
        );
    }
    Ok(())
}

/// How the bench's clusters run.
struct Setup {
    sync: String,
    leader_on_primary: bool,
    lease_ms: Option<u64>,
    writers: u32,
    pause: Duration,
}

/// What one failover run measured.
struct RunFigures {
    outage_ms: f64,
    lost: usize,
    acked: usize,
    /// Median INSERT round trip before the fault.
    commit_ms: f64,
    /// Acknowledged writes per second before the fault.
    writes_per_s: f64,
    /// Polls (every 50 ms, every member at once) that found two members accepting writes.
    split_brain: usize,
    /// Whether another member became primary.
    moved: bool,
    /// The largest resident set of any sidecar during the run.
    rss_kb_max: u64,
    /// Average CPU of one idle sidecar before the load, on the first run of a fault.
    idle_cpu_percent: Option<f64>,
}

/// One acknowledged write of the bench's writers.
#[derive(Clone, Copy)]
struct Ack {
    id: i64,
    at: Instant,
    took: Duration,
}

/// Acknowledged writes of the bench's writers.
type Acks = std::sync::Arc<std::sync::Mutex<Vec<Ack>>>;

/// Connects to the first of `urls` that takes a read-write session within a second, starting
/// at `start`; returns the client and the index it connected to. Each member is tried on its
/// own with a bound on the whole setup: a multi-host URL waits on a frozen first host for
/// ever, since its timeout only bounds the TCP connect, which a frozen server's kernel still
/// completes.
async fn connect_writable(
    urls: &[String],
    start: usize,
) -> Option<(tokio_postgres::Client, usize)> {
    for k in 0..urls.len() {
        let i = (start + k) % urls.len();
        let connect = tokio_postgres::connect(&urls[i], tokio_postgres::NoTls);
        if let Ok(Ok((c, conn))) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            tokio::spawn(conn);
            return Some((c, i));
        }
    }
    None
}

/// One writer connection inserting ids `first, first + 1, …`, pausing `pause` between
/// inserts; every acknowledged insert is recorded.
fn spawn_writer(
    urls: Vec<String>,
    first: i64,
    pause: Duration,
    acks: Acks,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut at = 0;
        let mut id: i64 = first;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match connect_writable(&urls, at).await {
                    Some((c, i)) => {
                        at = i;
                        Some(c)
                    }
                    None => None,
                };
            }
            if let Some(c) = &client {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let sent = Instant::now();
                let insert = c.execute("INSERT INTO bench VALUES ($1)", &params);
                match tokio::time::timeout(Duration::from_secs(2), insert).await {
                    Ok(Ok(_)) => {
                        if let Ok(mut a) = acks.lock() {
                            a.push(Ack {
                                id,
                                at: Instant::now(),
                                took: sent.elapsed(),
                            });
                        }
                    }
                    _ => {
                        // Try the next member first: this one may be frozen or fenced.
                        client = None;
                        at += 1;
                    }
                }
            } else {
                // No server takes the connection: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(pause).await;
        }
    });
}

/// What the observer saw: split-brain polls and the sidecars' largest resident set.
#[derive(Default)]
struct Observed {
    split_brain: usize,
    rss_kb_max: u64,
}

/// Every 50 ms asks every member's Postgres at once whether it accepts writes, counting the
/// polls where two do, and samples the sidecars' resident set sizes.
fn spawn_observer(
    layout: &Layout,
    seen: std::sync::Arc<std::sync::Mutex<Observed>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let urls: Vec<String> = layout
        .nodes
        .iter()
        .filter_map(|n| layout.member_uri(n))
        .collect();
    let nodes = layout.nodes.clone();
    tokio::spawn(async move {
        let mut clients: Vec<Option<tokio_postgres::Client>> = urls.iter().map(|_| None).collect();
        while !stop.load(Ordering::Relaxed) {
            let polls = urls
                .iter()
                .zip(clients.iter_mut())
                .map(|(url, slot)| async move {
                    if slot.as_ref().is_none_or(|c| c.is_closed()) {
                        let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
                        *slot =
                            match tokio::time::timeout(Duration::from_millis(200), connect).await {
                                Ok(Ok((c, conn))) => {
                                    tokio::spawn(conn);
                                    Some(c)
                                }
                                _ => None,
                            };
                    }
                    let c = slot.as_ref()?;
                    let q = c.query_one("SELECT NOT pg_is_in_recovery()", &[]);
                    match tokio::time::timeout(Duration::from_millis(200), q).await {
                        Ok(Ok(row)) => row.try_get::<_, bool>(0).ok(),
                        _ => {
                            *slot = None;
                            None
                        }
                    }
                });
            let writable = futures::future::join_all(polls)
                .await
                .into_iter()
                .filter(|w| *w == Some(true))
                .count();
            let rss = nodes
                .iter()
                .filter_map(|n| n.pid())
                .filter_map(rss_kib)
                .max()
                .unwrap_or(0);
            if let Ok(mut s) = seen.lock() {
                if writable > 1 {
                    s.split_brain += 1;
                }
                s.rss_kb_max = s.rss_kb_max.max(rss);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// Average CPU of the sidecars over `window` while nothing but the cluster itself runs.
async fn idle_cpu_percent(layout: &Layout, window: Duration) -> Option<f64> {
    let pids: Vec<i32> = layout.nodes.iter().filter_map(|n| n.pid()).collect();
    let before: Vec<u64> = pids.iter().filter_map(|p| cpu_ticks(*p)).collect();
    tokio::time::sleep(window).await;
    let after: Vec<u64> = pids.iter().filter_map(|p| cpu_ticks(*p)).collect();
    if before.len() != pids.len() || after.len() != pids.len() || pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    Some(ticks as f64 / hz / window.as_secs_f64() * 100.0 / pids.len() as f64)
}

/// The JSON object of one fault's runs.
fn fault_json(fault: Fault, setup: &Setup, runs: &[RunFigures]) -> serde_json::Value {
    let stats = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        serde_json::json!({
            "min": v.first().copied().unwrap_or(0.0).round(),
            "median": median(v.clone()).round(),
            "max": v.last().copied().unwrap_or(0.0).round(),
        })
    };
    serde_json::json!({
        "fault": fault.name(),
        "runs": runs.len(),
        "synchronous_mode": setup.sync,
        "raft_leader": if setup.leader_on_primary { "on the primary's node" } else { "apart from the primary" },
        "writers": setup.writers,
        "write_outage_ms": stats(runs.iter().map(|r| r.outage_ms).collect()),
        "acknowledged_writes": runs.iter().map(|r| r.acked).sum::<usize>(),
        "lost_writes": runs.iter().map(|r| r.lost).sum::<usize>(),
        "writes_per_s": stats(runs.iter().map(|r| r.writes_per_s).collect()),
        "split_brain_observations": runs.iter().map(|r| r.split_brain).sum::<usize>(),
        "runs_that_moved_the_primary": runs.iter().filter(|r| r.moved).count(),
        "commit_latency_ms_median": (median(runs.iter().map(|r| r.commit_ms).collect()) * 100.0).round() / 100.0,
        "sidecar_rss_kb": { "max": runs.iter().map(|r| r.rss_kb_max).max().unwrap_or(0) },
        "sidecar_cpu_percent_idle": runs.iter().find_map(|r| r.idle_cpu_percent).map(|c| (c * 100.0).round() / 100.0),
    })
}

/// Commits `key = value` through any member.
async fn set_key(client: &raft_node::client::ApiClient, key: &str, value: &str) -> Result<()> {
    let changes = HashMap::from([(key.to_string(), value.to_string())]);
    client
        .call(|mut c| {
            let changes = changes.clone();
            async move { c.set_config(proto::SetConfigRequest { changes }).await }
        })
        .await
        .with_context(|| format!("config set {key}={value}"))?;
    Ok(())
}

/// Polls the topology until `ready` holds, for at most `limit`.
async fn wait_topology(
    client: &raft_node::client::ApiClient,
    what: &str,
    limit: Duration,
    ready: impl Fn(&proto::Topology) -> bool,
) -> Result<proto::Topology> {
    let started = Instant::now();
    loop {
        let t = client
            .call(|mut c| async move {
                c.get_topology(proto::GetTopologyRequest { local: false })
                    .await
            })
            .await;
        if let Ok(t) = t {
            if ready(&t) {
                return Ok(t);
            }
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn failover_run(
    dir: &std::path::Path,
    fault: Fault,
    setup: &Setup,
    net: Option<&crate::netns::Netns>,
    measure_idle: bool,
) -> Result<RunFigures> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let placement = net.map(|n| local::Placement {
        hosts: (1..=3).map(|id| n.addr(id)).collect(),
        prefixes: (1..=3).map(|id| n.exec_prefix(id)).collect(),
        cidr: n.cidr(),
    });
    let layout = local::create_with(3, dir, true, true, placement.as_ref(), false)?;
    local::start_missing(&layout, true)?;
    let api = layout.client()?.with_patience(Duration::from_secs(10));
    // Before the first primary is chosen, so that leadership stays where bootstrap put it
    // (member 1, which usually also becomes the first primary).
    let handoff = if setup.leader_on_primary {
        "false"
    } else {
        "true"
    };
    set_key(&api, "leader_handoff", handoff).await?;
    if let Some(ms) = setup.lease_ms {
        set_key(&api, "lease_ms", &ms.to_string()).await?;
    }
    let topo = local::wait_ready(&layout, Duration::from_secs(90)).await?;
    let primary = topo.primary.as_ref().context("no primary")?.node_id;
    set_key(&api, "synchronous_mode", &setup.sync).await?;
    let limit = Duration::from_secs(30);
    if setup.sync != "off" {
        wait_topology(&api, "a committed synchronous standby", limit, |t| {
            t.sync
                .as_ref()
                .is_some_and(|y| y.k > 0 && y.target.is_empty())
        })
        .await?;
    }
    if setup.leader_on_primary {
        // Bootstrap puts leadership on member 1, usually the first primary too.
        let t = wait_topology(&api, "a leader", limit, |t| t.leader_id != 0).await?;
        if t.leader_id != primary {
            bail!(
                "--leader-on-primary: the leader ({}) is not the primary's node ({primary}) in \
                 this cluster; run again",
                t.leader_id
            );
        }
    } else {
        wait_topology(&api, "leadership apart from the primary", limit, |t| {
            t.leader_id != 0 && t.leader_id != primary
        })
        .await?;
    }
    let idle_cpu = if measure_idle {
        idle_cpu_percent(&layout, Duration::from_secs(5)).await
    } else {
        None
    };
    let node = layout
        .nodes
        .iter()
        .find(|n| n.id == primary)
        .context("primary not in layout")?;
    let url = layout.uri().context("no Postgres in this cluster")?;
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE bench (id bigint PRIMARY KEY)")
        .await?;
    drop(c);
    let acks: Acks = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let write_urls: Vec<String> = layout
        .nodes
        .iter()
        .filter_map(|n| layout.member_uri(n))
        .map(|u| format!("{u}&target_session_attrs=read-write"))
        .collect();
    for w in 0..setup.writers {
        spawn_writer(
            write_urls.clone(),
            i64::from(w) * 1_000_000_000,
            setup.pause,
            acks.clone(),
            stop.clone(),
        );
    }
    let seen = Arc::new(Mutex::new(Observed::default()));
    spawn_observer(&layout, seen.clone(), stop.clone());
    let count = |a: &Acks| a.lock().map(|v| v.len()).unwrap_or(0);
    let started = Instant::now();
    while count(&acks) < 20 * setup.writers as usize {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the writers did not get going");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        // A new Raft leader waits a lease and more before it promotes anyone (its predecessor
        // may have granted one), and leadership just moved off the primary's node: measure a
        // settled cluster, as a real one has usually been for long (a fault right after a
        // leader change costs that wait on top; `--leader-on-primary` measures the worst case).
        let term = wait_topology(&api, "a leader", limit, |t| t.leader_id != 0)
            .await?
            .term;
        let settle = Duration::from_millis(2 * setup.lease_ms.unwrap_or(2_500) + 1_000);
        let since = Instant::now();
        while since.elapsed() < settle {
            let t = wait_topology(&api, "a leader", limit, |t| t.leader_id != 0).await?;
            if t.term != term {
                bail!("the Raft leader changed while the cluster settled; run again");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let pid_file = node.dir.join("pgdata/postmaster.pid");
    let postmaster: i32 = std::fs::read_to_string(&pid_file)?
        .lines()
        .next()
        .context("empty postmaster.pid")?
        .trim()
        .parse()?;
    let sidecar = node.pid().context("sidecar not running")?;
    let load_began = started;
    // Whatever happens below, a frozen member is thawed when this run ends: a run that fails
    // must not leave stopped processes behind.
    let thaw = Thaw(match fault {
        Fault::SidecarFreeze => vec![sidecar],
        Fault::NodeFreeze => {
            let mut p = node_processes(postmaster);
            p.push(sidecar);
            p
        }
        _ => Vec::new(),
    });
    let fault_at = Instant::now();
    let before_fault = count(&acks);
    // SAFETY: signalling processes this bench started.
    unsafe {
        // The guard and the postmaster share the guard's process group.
        let group = libc::getpgid(postmaster);
        match fault {
            Fault::HostCrash => {
                libc::kill(sidecar, libc::SIGKILL);
                if group > 1 {
                    libc::kill(-group, libc::SIGKILL);
                }
            }
            Fault::PostgresCrash => {
                libc::kill(postmaster, libc::SIGKILL);
            }
            Fault::SidecarFreeze => {
                libc::kill(sidecar, libc::SIGSTOP);
            }
            Fault::NodeFreeze => {
                // Postgres runs in its own session, so the guard's group is not enough: the
                // guard, the postmaster and every child of it.
                libc::kill(sidecar, libc::SIGSTOP);
                for pid in node_processes(postmaster) {
                    libc::kill(pid, libc::SIGSTOP);
                }
            }
            Fault::SidecarRestart => {
                libc::kill(sidecar, libc::SIGTERM);
            }
            Fault::Switchover | Fault::Partition => {}
        }
    }
    match fault {
        Fault::Switchover => {
            api.call(|mut c| async move {
                c.switchover(proto::SwitchoverRequest {
                    to: 0,
                    at_unix_ms: 0,
                })
                .await
            })
            .await
            .context("switchover refused")?;
        }
        Fault::Partition => {
            let net = net.context("a partition needs the namespaces")?;
            for other in layout.nodes.iter().filter(|n| n.id != primary) {
                net.cut(primary, other.id).map_err(anyhow::Error::msg)?;
            }
        }
        Fault::SidecarRestart => {
            // systemctl restart: the old process exits, a new one starts at once.
            let gone = Instant::now();
            while local::pid_alive(sidecar) {
                if gone.elapsed() > Duration::from_secs(20) {
                    bail!("the sidecar did not exit within 20 s of SIGTERM");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            local::start_missing(&layout, true)?;
        }
        _ => {}
    }
    // Done once another member is the committed primary (or, for a restart, once the new
    // sidecar is back and the primary's writes go on) and writes have flowed for a second
    // since; the outage is the largest gap between acknowledged writes from the fault on. A
    // frozen or cut-off member may take connections and never answer: a second per attempt.
    // Asked of the other members only: a cut-off primary still answers with its stale view.
    let others: Vec<String> = layout
        .nodes
        .iter()
        .filter(|n| n.id != primary)
        .map(|n| n.api_addr.clone())
        .collect();
    let client = layout
        .client_for(others)?
        .with_patience(Duration::from_secs(10))
        .with_request_timeout(Duration::from_secs(1));
    let mut moved = false;
    let changed_at = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if fault_at.elapsed() > Duration::from_secs(60) {
            bail!("{}: no new primary within 60 s", fault.name());
        }
        let topo = client
            .call(|mut c| async move {
                c.get_topology(proto::GetTopologyRequest { local: true })
                    .await
            })
            .await;
        if let Ok(t) = topo {
            let now_primary = t.primary.as_ref().map(|p| p.node_id);
            if now_primary.is_some_and(|p| p != primary) {
                moved = true;
                break Instant::now();
            }
            let lease = Duration::from_millis(setup.lease_ms.unwrap_or(2_500));
            if !fault.fails_over()
                && fault_at.elapsed() > 2 * lease + Duration::from_secs(1)
                && node.pid().is_some()
            {
                // Past two leases and a new leader's election: a restart that was going to
                // cost a failover has done so.
                break Instant::now();
            }
        }
    };
    let outage = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let times: Vec<Instant> = acks
            .lock()
            .map(|v| {
                let mut t: Vec<Instant> = v.iter().map(|a| a.at).collect();
                t.sort_unstable();
                t
            })
            .unwrap_or_default();
        if times
            .last()
            .is_some_and(|l| *l > changed_at + Duration::from_secs(1))
        {
            let mut gap = Duration::ZERO;
            let mut prev = times.iter().filter(|t| **t <= fault_at).max().copied();
            for t in times.iter().filter(|t| **t > fault_at) {
                if let Some(p) = prev {
                    gap = gap.max(*t - p);
                }
                prev = Some(*t);
            }
            break gap;
        }
        if fault_at.elapsed() > Duration::from_secs(60) {
            bail!("{}: writes did not resume within 60 s", fault.name());
        }
    };
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(thaw);
    if let (Fault::Partition, Some(net)) = (fault, net) {
        net.heal().map_err(anyhow::Error::msg)?;
    }
    let acked: Vec<Ack> = acks.lock().map(|v| v.clone()).unwrap_or_default();
    // Every acknowledged write must be on the primary now.
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let present: std::collections::BTreeSet<i64> = c
        .query("SELECT id FROM bench", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost = acked.iter().filter(|a| !present.contains(&a.id)).count();
    let before: Vec<f64> = acked
        .iter()
        .filter(|a| a.at < fault_at)
        .map(|a| a.took.as_secs_f64() * 1000.0)
        .collect();
    let loaded_for = (fault_at - load_began).as_secs_f64().max(0.001);
    let (split_brain, rss_kb_max) = seen
        .lock()
        .map(|s| (s.split_brain, s.rss_kb_max))
        .unwrap_or((0, 0));
    Ok(RunFigures {
        outage_ms: outage.as_secs_f64() * 1000.0,
        lost,
        acked: acked.len(),
        commit_ms: median(before),
        writes_per_s: before_fault as f64 / loaded_for,
        split_brain,
        moved,
        rss_kb_max,
        idle_cpu_percent: idle_cpu,
    })
}

/// Processes to SIGCONT, in order, when dropped.
struct Thaw(Vec<i32>);

impl Drop for Thaw {
    fn drop(&mut self) {
        // The guard comes first: it fences its expired primary before anything else runs on.
        for pid in &self.0 {
            // SAFETY: signalling processes this bench stopped.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
}

/// The guard of `postmaster` (its parent), the postmaster and its children, guard first.
fn node_processes(postmaster: i32) -> Vec<i32> {
    let ppid_of = |pid: i32| -> Option<i32> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        s[s.rfind(')')? + 2..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut out: Vec<i32> = ppid_of(postmaster).filter(|p| *p > 1).into_iter().collect();
    out.push(postmaster);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if ppid_of(pid) == Some(postmaster) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
