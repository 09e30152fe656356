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
    /// Write outage and lost acknowledged writes of a client writing every 100 ms through a
    /// multi-host URL, on fresh local 3-member clusters with real Postgres, for each fault (and
    /// for a planned switchover); and the commit latency before the fault.
    Failover {
        /// Runs per fault.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Faults to inject (default: host-crash, postgres-crash, sidecar-freeze; `switchover`
        /// times a planned switchover).
        #[arg(long, value_enum, value_delimiter = ',')]
        faults: Vec<Fault>,
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
    /// A planned switchover (`pgquorum switchover`) to the most advanced replica, once the Raft
    /// leader has been in office for longer than a new leader's wait.
    Switchover,
}

pub async fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Failover {
            runs,
            faults,
            sync,
            leader_on_primary,
            lease_ms,
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            let faults = if faults.is_empty() {
                vec![Fault::HostCrash, Fault::PostgresCrash, Fault::SidecarFreeze]
            } else {
                faults
            };
            let setup = Setup {
                sync,
                leader_on_primary,
                lease_ms,
            };
            for fault in faults {
                let (mut outages, mut commits) = (Vec::new(), Vec::new());
                let (mut lost, mut acked) = (0, 0);
                for run in 1..=runs {
                    let dir = std::env::temp_dir()
                        .join(format!("pgquorum-bench-{}-{run}", std::process::id()));
                    let r = failover_run(&dir, fault, &setup).await;
                    let _ = local::stop_all(&dir, true);
                    let _ = std::fs::remove_dir_all(&dir);
                    let f = r?;
                    println!(
                        "{fault:?} run {run}: write outage {:.0} ms, {} of {} acknowledged \
                         writes lost, commit latency median {:.2} ms",
                        f.outage_ms, f.lost, f.acked, f.commit_ms
                    );
                    outages.push(f.outage_ms);
                    commits.push(f.commit_ms);
                    lost += f.lost;
                    acked += f.acked;
                }
                println!(
                    "{fault:?} (synchronous_mode {}, leader {}): write outage {}; lost {lost} of \
                     {acked} acknowledged writes; commit latency {}",
                    setup.sync,
                    if setup.leader_on_primary {
                        "on the primary's node"
                    } else {
                        "apart from the primary"
                    },
                    summary(outages),
                    summary(commits)
                );
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
            let layout = local::load_or_create(3, &dir, false)?;
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

async fn connect(addr: &str) -> Result<ClusterClient<Channel>> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(ClusterClient::new(ch))
}

async fn status(addr: &str) -> Option<proto::NodeStatus> {
    let mut c = connect(addr).await.ok()?;
    c.get_node_status(proto::GetNodeStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The leader every member in `addrs` agrees on.
async fn agreed_leader(addrs: &[&str]) -> Option<u64> {
    let mut leader = None;
    for a in addrs {
        let s = status(a).await?;
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
    let leader = agreed_leader(&all).await.context("no leader")?;
    let mut c = connect(&by_id[&leader].api_addr).await?;
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
        let old = agreed_leader(&all)
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
            if let Some(l) = agreed_leader(&rest).await.filter(|l| *l != old) {
                break l;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("run {run}: no new leader within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let e = t0.elapsed();
        let mut c = connect(&by_id[&new].api_addr).await?;
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
}

/// What one failover run measured.
struct RunFigures {
    outage_ms: f64,
    lost: usize,
    acked: usize,
    /// Median INSERT round trip before the fault.
    commit_ms: f64,
}

/// One acknowledged write of the bench's writer.
#[derive(Clone, Copy)]
struct Ack {
    id: i64,
    at: Instant,
    took: Duration,
}

/// Acknowledged writes of the bench's writer.
type Acks = std::sync::Arc<std::sync::Mutex<Vec<Ack>>>;

fn spawn_writer(url: String, acks: Acks, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut id: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
                client = match tokio::time::timeout(Duration::from_secs(2), connect).await {
                    Ok(Ok((c, conn))) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    _ => None,
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
                    _ => client = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
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

async fn failover_run(dir: &std::path::Path, fault: Fault, setup: &Setup) -> Result<RunFigures> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let layout = local::load_or_create(3, dir, true)?;
    local::start_missing(&layout, true)?;
    let api = raft_node::client::ApiClient::new(layout.endpoints())?
        .with_patience(Duration::from_secs(10));
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
    let writer_url = url.clone();
    let acks: Acks = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    spawn_writer(writer_url, acks.clone(), stop.clone());
    let count = |a: &Acks| a.lock().map(|v| v.len()).unwrap_or(0);
    let started = Instant::now();
    while count(&acks) < 20 {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the writer did not get going");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if fault == Fault::Switchover {
        // A new Raft leader waits a lease and more before it promotes anyone (its predecessor
        // may have granted one), and leadership just moved off the primary's node: measure the
        // switchover of a settled cluster.
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
    let fault_at = Instant::now();
    // SAFETY: signalling processes this bench started.
    unsafe {
        match fault {
            Fault::HostCrash => {
                let group = libc::getpgid(postmaster);
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
            Fault::Switchover => {}
        }
    }
    if fault == Fault::Switchover {
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
    // Done once another member is the committed primary and writes have flowed for a second
    // since; the outage is the largest gap between acknowledged writes from the fault on. The
    // frozen member accepts connections and never answers: give each attempt a second.
    let client = api.with_request_timeout(Duration::from_secs(1));
    let changed_at = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if fault_at.elapsed() > Duration::from_secs(60) {
            bail!("{fault:?}: no new primary within 60 s");
        }
        let topo = client
            .call(|mut c| async move {
                c.get_topology(proto::GetTopologyRequest { local: true })
                    .await
            })
            .await;
        if let Ok(t) = topo {
            if t.primary.as_ref().is_some_and(|p| p.node_id != primary) {
                break Instant::now();
            }
        }
    };
    let outage = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let times: Vec<Instant> = acks
            .lock()
            .map(|v| v.iter().map(|a| a.at).collect())
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
            bail!("{fault:?}: writes did not resume within 60 s");
        }
    };
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    if fault == Fault::SidecarFreeze {
        // SAFETY: as above.
        unsafe { libc::kill(sidecar, libc::SIGCONT) };
    }
    let acked: Vec<Ack> = acks.lock().map(|v| v.clone()).unwrap_or_default();
    // Every acknowledged write must be on the new primary.
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
    Ok(RunFigures {
        outage_ms: outage.as_secs_f64() * 1000.0,
        lost,
        acked: acked.len(),
        commit_ms: median(before),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
