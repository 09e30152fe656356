//! The partition suite's harness: a cluster on one of two network backends ([`net`]), a client
//! workload (writers with unique sequence numbers through the multi-host URL, and readers), the
//! checkers named after the rules they check, a timeline of faults and role changes printed with
//! the seed when a scenario fails, and one report line per scenario.
//!
//! Checkers:
//! - `single_writer`: every member's Postgres is asked `pg_is_in_recovery()` every 50 ms (at
//!   least every 100 ms) over a connection that bypasses every fault; never two writable.
//! - `no_lost_writes`: every write the client saw acknowledged is on the final primary.
//! - `converges`: after the faults end, one writable primary and every replica streaming from
//!   it, within [`CONVERGE`].

pub mod net;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft_node::client::ApiClient;
use raft_node::proto;
use rand::{Rng, SeedableRng};

use crate::harness::workload::{
    connect_within, max_gap_ms, missing_on, topology, wait_sync_committed, Checker, Writer,
};
use crate::harness::{pg_url_at, wait_for, Placement, TestCluster, PG_PASSWORD};
use crate::netns::Netns;
use net::{Net, ToxiNet, NETNS_GRPC_PORT, NETNS_PG_PORT};

/// How long a fresh cluster may take to elect a primary with streaming replicas.
pub const START: Duration = Duration::from_secs(90);
/// How long the healthy side may take to promote, or the workload to resume.
pub const FAILOVER: Duration = Duration::from_secs(30);
/// `converges`: how long after the last fault ends the cluster may take to have one writable
/// primary and every replica streaming.
pub const CONVERGE: Duration = Duration::from_secs(45);

/// `single_writer` polls each member every 50 ms and fails a scenario in which a member went
/// longer than this unpolled (the report shows the longest gap of each run).
pub const POLL_BOUND: Duration = Duration::from_millis(250);

/// Scenarios share the machine: by default one cluster runs at a time (each takes both
/// permits). `PGQUORUM_PARTITION_CLUSTERS=2` lets two 3-member clusters run side by side (a
/// 5-member one always runs alone): a stress run. On two cores and one disk, two clusters' six
/// Postgres instances and their fsyncs stall the other cluster's Raft round trips past
/// openraft's time-to-live (one heartbeat, 150 ms): leadership confirmations fail, the leader
/// withholds renewals, and healthy primaries lose their leases. That is load no deployment
/// puts on one host, and it made the failover counts of the default run depend on which
/// scenarios happened to overlap.
static CORES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// How many of [`CORES`]' permits a cluster of `members` takes.
fn cluster_weight(members: u64) -> u32 {
    let side_by_side = std::env::var("PGQUORUM_PARTITION_CLUSTERS").is_ok_and(|v| v.trim() == "2");
    if members > 3 || !side_by_side {
        2
    } else {
        1
    }
}

/// Which network a scenario runs on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// Namespaces and nftables (root).
    Netns,
    /// Toxiproxy proxies on loopback.
    Toxiproxy,
}

/// Faults, role changes and verdicts with the time since the scenario started.
#[derive(Clone)]
pub struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Timeline {
    fn new() -> Self {
        Timeline {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    /// Records `what` now.
    pub fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let at = self.start.elapsed();
        eprintln!("[{:>8.3} s] {what}", at.as_secs_f64());
        self.events.lock().expect("timeline").push((at, what));
    }

    fn render(&self) -> String {
        self.events
            .lock()
            .map(|e| {
                e.iter()
                    .map(|(at, what)| format!("  {:>8.3} s  {what}\n", at.as_secs_f64()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A cluster on a backend, with its workload running. Fields drop in declaration order: the
/// watcher, then the sidecars (whose guards take their Postgres down with them), then the
/// network.
pub struct Sut {
    watcher: Option<Watcher>,
    /// The cluster.
    pub c: TestCluster,
    /// Its network.
    pub net: Net,
    /// What happened, for the failure report.
    pub timeline: Timeline,
    /// The scenario's name in reports.
    pub label: String,
    /// Seed of the scenario's random choices (`PGQUORUM_PARTITION_SEED` to replay one).
    pub seed: u64,
    /// The seeded generator of those choices.
    pub rng: rand::rngs::StdRng,
    /// This scenario's share of the machine, released last.
    _cores: tokio::sync::SemaphorePermit<'static>,
}

impl Drop for Sut {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "FAILED scenario {} on {} (seed {}; replay with PGQUORUM_PARTITION_SEED={}). \
                 Timeline:\n{}",
                self.label,
                self.net.backend(),
                self.seed,
                self.seed,
                self.timeline.render()
            );
        }
    }
}

impl Sut {
    /// A cluster of `n` members on `backend`, configured but not started; `None` (after printing
    /// `SKIPPED <test>: <reason>`; a failure under `CI=true`) when the backend cannot run here.
    pub async fn new(backend: Backend, n: u64, label: &str) -> Option<Sut> {
        let seed = std::env::var("PGQUORUM_PARTITION_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::thread_rng().gen());
        let cores = CORES
            .acquire_many(cluster_weight(n))
            .await
            .expect("the semaphore is never closed");
        let timeline = Timeline::new();
        let (c, net) = match backend {
            Backend::Netns => {
                let netns = Netns::setup_or_skip(n)?;
                let placements: BTreeMap<u64, Placement> = (1..=n)
                    .map(|id| {
                        let p = Placement {
                            host: netns.addr(id),
                            port: NETNS_GRPC_PORT,
                            pg_port: NETNS_PG_PORT,
                            command_prefix: netns.exec_prefix(id),
                        };
                        (id, p)
                    })
                    .collect();
                // The members' /24 holds the other members (replication, pg_rewind) and the
                // host (the test's clients).
                let c = TestCluster::with_postgres_placed(placements, vec![netns.cidr()]);
                (c, Net::Netns(netns))
            }
            Backend::Toxiproxy => {
                let placements: BTreeMap<u64, Placement> =
                    (1..=n).map(|id| (id, Placement::loopback())).collect();
                let toxi = ToxiNet::build(&placements)
                    .await
                    .unwrap_or_else(|e| panic!("toxiproxy backend: {e}"));
                let mut c = TestCluster::with_postgres_placed(placements.clone(), Vec::new());
                for id in 1..=n {
                    c.append_config(id, &toxi.dial_via(id, &placements));
                }
                timeline.note(format!("proxies on {}", toxi.server()));
                (c, Net::Toxi(Box::new(toxi)))
            }
        };
        timeline.note(format!(
            "scenario {label} on {}: {n} members, seed {seed}",
            net.backend()
        ));
        Some(Sut {
            watcher: None,
            c,
            net,
            timeline,
            label: label.to_string(),
            seed,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            _cores: cores,
        })
    }

    /// The multi-host URL the workload writes through: members' own addresses in namespaces
    /// (the host reaches them over the bridge), the clients' proxies with Toxiproxy.
    pub fn client_url(&self, attrs: &str) -> String {
        let hosts: Vec<String> = self
            .c
            .nodes
            .values()
            .map(|n| match self.net.toxi() {
                Some(t) => t.client_pg_addr(n.id).to_string(),
                None => format!("{}:{}", n.pg_host, n.pg_port),
            })
            .collect();
        format!(
            "postgresql://postgres:{PG_PASSWORD}@{}/postgres?target_session_attrs={attrs}&connect_timeout=1",
            hosts.join(",")
        )
    }

    /// The topology as the leader sees it, asked only through members `via` (for example the
    /// side of a cut that can elect a leader), within 5 s.
    pub async fn topology_via(&self, via: &[u64]) -> Option<proto::Topology> {
        let endpoints = via.iter().map(|id| self.c.nodes[id].addr.clone()).collect();
        let client = ApiClient::new(endpoints)
            .ok()?
            .with_tls(Some(crate::harness::pki().operator_tls()))
            .with_patience(Duration::from_secs(3));
        let call = client.call(|mut cl| async move {
            cl.get_topology(proto::GetTopologyRequest { local: false })
                .await
        });
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .ok()?
            .ok()
    }

    /// Every member but `id`.
    pub fn others(&self, id: u64) -> Vec<u64> {
        self.c.nodes.keys().copied().filter(|n| *n != id).collect()
    }

    /// Starts every member, waits for a primary with a committed synchronous standby, and
    /// starts the workload and the checkers.
    pub async fn start(&mut self) -> Running {
        self.c.start_all();
        self.c.wait_postgres(START).await;
        let writer = Writer::start(self.client_url("read-write")).await;
        let timeline = self.timeline.clone();
        let checker = Checker::start_noting(&self.c, Arc::new(move |s| timeline.note(s)));
        let reader = Reader::start(self.client_url("read-only"));
        wait_for("writes flow", FAILOVER, || async {
            (writer.acked_count() >= 10).then_some(())
        })
        .await;
        let sync = wait_sync_committed(&self.c).await;
        // A start on a busy machine may have moved the primary already: the scenario works
        // from the primary in office now.
        let t = topology(&self.c).await;
        let primary = t.primary.as_ref().map(|p| p.node_id).expect("a primary");
        let history = t.history.len();
        self.timeline.note(format!(
            "primary {primary} (epoch {}), Raft leader {}, synchronous set {sync:?}; writes flow",
            t.primary.as_ref().map(|p| p.epoch).unwrap_or_default(),
            t.leader_id
        ));
        self.watcher = Some(Watcher::start(&self.c, self.timeline.clone()));
        Running {
            writer,
            checker,
            reader,
            primary,
            history,
        }
    }

    /// Records a fault in the timeline.
    pub fn fault(&self, what: impl Into<String>) -> Instant {
        self.timeline.note(format!("FAULT {}", what.into()));
        Instant::now()
    }

    /// Heals the network, then judges the run: `converges`, `single_writer`, `no_lost_writes`
    /// and the failover count; prints the report line.
    pub async fn finish(&mut self, run: Running, expect: Expect) -> Report {
        let faults = self.net.describe().await;
        if !faults.is_empty() {
            self.timeline
                .note(format!("faults before the heal:\n{faults}"));
        }
        self.net.heal().await;
        let healed_at = self.fault("heal: every link restored");
        let (primary, converged_after) = converges(&self.c).await;
        self.timeline.note(format!(
            "converged: primary {primary}, every replica streaming, {} ms after the heal",
            converged_after.as_millis()
        ));
        let failovers = topology(&self.c).await.history.len() - run.history;
        let acked = run.writer.stop().await;
        let longest_poll = run.checker.longest_interval();
        let verdict = run.checker.stop_verdict().await;
        let (reads_ok, reads_failed) = run.reader.stop().await;
        if let Some(w) = self.watcher.take() {
            w.stop().await;
        }
        let lost = missing_on(&self.c, primary, &acked).await;
        let report = Report {
            backend: self.net.backend(),
            scenario: self.label.clone(),
            failovers,
            outage_ms: expect
                .fault_at
                .map(|at| max_gap_ms(&acked, at, healed_at))
                .unwrap_or_default(),
            acked: acked.len(),
            lost: lost.len(),
            two_writer_moments: verdict.two_writer_moments,
            two_writer_ms: verdict.two_writer_time.as_millis(),
            reads_ok,
            reads_failed,
            longest_poll_ms: longest_poll.as_millis(),
            converged_ms: converged_after.as_millis(),
            seed: self.seed,
        };
        eprintln!("{}", report.line());
        report.append_to_file();
        self.timeline.note(format!(
            "verdicts: single_writer {}, no_lost_writes {}, failovers {failovers} (expected {:?})",
            if verdict.two_writer_moments == 0 {
                "ok"
            } else {
                "VIOLATED"
            },
            if lost.is_empty() { "ok" } else { "VIOLATED" },
            expect.failovers
        ));
        assert_eq!(
            verdict.two_writer_moments, 0,
            "single_writer: two writable members at once: {:?}",
            verdict.most
        );
        assert!(
            lost.is_empty(),
            "no_lost_writes: acknowledged writes lost: {lost:?}"
        );
        assert!(
            expect.failovers.contains(&failovers),
            "{failovers} failovers, expected {:?}",
            expect.failovers
        );
        assert!(
            longest_poll <= expect.poll_tolerance,
            "single_writer: a member went {} ms unpolled",
            longest_poll.as_millis()
        );
        report
    }
}

/// What a scenario expects of its end.
pub struct Expect {
    /// How many promotions the run may commit.
    pub failovers: std::ops::RangeInclusive<usize>,
    /// When the fault began, for the write outage figure.
    pub fault_at: Option<Instant>,
    /// The longest a member may go unpolled by `single_writer`. Polls start every 50 ms; on a
    /// loaded 2-core machine one sometimes answers late, so the bound is [`POLL_BOUND`].
    pub poll_tolerance: Duration,
}

impl Expect {
    /// `failovers` promotions, the fault at `fault_at`.
    pub fn new(failovers: std::ops::RangeInclusive<usize>, fault_at: Instant) -> Self {
        Expect {
            failovers,
            fault_at: Some(fault_at),
            poll_tolerance: POLL_BOUND,
        }
    }
}

/// The workload and checkers of a started scenario.
pub struct Running {
    /// Writes a row every 100 ms through the read-write URL.
    pub writer: Writer,
    checker: Checker,
    reader: Reader,
    /// The primary when the workload started.
    pub primary: u64,
    history: usize,
}

/// One scenario's figures.
pub struct Report {
    pub backend: &'static str,
    pub scenario: String,
    pub failovers: usize,
    pub outage_ms: u128,
    pub acked: usize,
    pub lost: usize,
    pub two_writer_moments: usize,
    pub two_writer_ms: u128,
    pub reads_ok: usize,
    pub reads_failed: usize,
    pub longest_poll_ms: u128,
    pub converged_ms: u128,
    pub seed: u64,
}

impl Report {
    fn line(&self) -> String {
        format!(
            "REPORT backend={} scenario={} failovers={} write_outage_ms={} acked={} lost={} \
             two_writer_moments={} two_writer_ms={} reads_ok={} reads_failed={} \
             longest_poll_ms={} converged_after_heal_ms={} seed={}",
            self.backend,
            self.scenario,
            self.failovers,
            self.outage_ms,
            self.acked,
            self.lost,
            self.two_writer_moments,
            self.two_writer_ms,
            self.reads_ok,
            self.reads_failed,
            self.longest_poll_ms,
            self.converged_ms,
            self.seed
        )
    }

    /// Appends the line to `partition-report.txt` in the test build's scratch directory, so a
    /// whole run's table can be printed with `scripts`-free `grep REPORT` afterwards.
    fn append_to_file(&self) {
        use std::io::Write;
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("partition-report.txt");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{}", self.line());
        }
    }
}

/// `converges`: waits until one member is primary and writable, every other member is its
/// replica with a streaming WAL receiver, and no other member is writable. Returns the primary
/// and how long it took.
pub async fn converges(c: &TestCluster) -> (u64, Duration) {
    let start = Instant::now();
    let client = c.client();
    let primary = wait_for(
        "converges: one writable primary, every replica streaming",
        CONVERGE,
        || async {
            let t = client
                .call(|mut cl| async move {
                    cl.get_topology(proto::GetTopologyRequest { local: false })
                        .await
                })
                .await
                .ok()?;
            let p = t.primary.as_ref()?.node_id;
            if c.writable(p).await != Some(true) {
                return None;
            }
            let others = c
                .nodes
                .values()
                .filter(|n| n.is_running() && !n.frozen && n.id != p)
                .map(|n| n.id);
            for id in others {
                if c.writable(id).await != Some(false) || !streaming(c, id).await {
                    return None;
                }
            }
            Some(p)
        },
    )
    .await;
    (primary, start.elapsed())
}

/// Whether member `id`'s WAL receiver streams.
async fn streaming(c: &TestCluster, id: u64) -> bool {
    let n = &c.nodes[&id];
    let url = pg_url_at(&n.pg_host, n.pg_port);
    let ask = async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        let row = client
            .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
            .await
            .ok()??;
        Some(row.get::<_, String>(0) == "streaming")
    };
    tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Reads through the read-only multi-host URL every 100 ms, counting answers and failures.
pub struct Reader {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(url: String) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = connect_within(&url, Duration::from_secs(2)).await;
                }
                let answered = match &client {
                    Some(c) => {
                        let q = c.query_one("SELECT count(*) FROM w", &[]);
                        matches!(
                            tokio::time::timeout(Duration::from_secs(2), q).await,
                            Ok(Ok(_))
                        )
                    }
                    None => false,
                };
                if answered {
                    o.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                    client = None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Reader {
            stop,
            ok,
            failed,
            task,
        }
    }

    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Notes changes of the committed primary, its epoch and the Raft leader in the timeline,
/// asking every member for its own view (so a cut leader does not hide the other side's).
struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(c: &TestCluster, timeline: Timeline) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let addrs: Vec<(u64, String)> = c.nodes.values().map(|n| (n.id, n.addr.clone())).collect();
        let task = tokio::spawn(async move {
            let mut seen: BTreeMap<u64, (Option<(u64, u64)>, u64)> = BTreeMap::new();
            while !s.load(Ordering::Relaxed) {
                for (id, addr) in &addrs {
                    let Some(t) = local_topology(addr).await else {
                        continue;
                    };
                    let view = (
                        t.primary.as_ref().map(|p| (p.node_id, p.epoch)),
                        t.leader_id,
                    );
                    if seen.get(id) != Some(&view) {
                        timeline.note(format!(
                            "member {id} sees primary {:?} (node, epoch), Raft leader {}",
                            view.0, view.1
                        ));
                        seen.insert(*id, view);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Watcher { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// One member's own applied view, without forwarding, within 1 s.
async fn local_topology(addr: &str) -> Option<proto::Topology> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(1));
    let channel = crate::harness::pki()
        .operator_tls()
        .connect(ep)
        .await
        .ok()?;
    let mut client = proto::cluster_client::ClusterClient::new(channel);
    client
        .get_topology(proto::GetTopologyRequest { local: true })
        .await
        .ok()
        .map(|r| r.into_inner())
}
