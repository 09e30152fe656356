//! Client-side workload and observers shared by the process tests: a writer that remembers
//! which writes were acknowledged, a checker that watches for two writable members at once,
//! and the read-back helpers that judge them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft_node::proto;

use super::{wait_for, TestCluster, PG_PASSWORD};

/// How long the helpers here wait for the cluster to reach a state.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A connection to `url` within `within`, its connection task spawned; `None` on any failure.
pub async fn connect_within(url: &str, within: Duration) -> Option<tokio_postgres::Client> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(within, connect).await.ok()?.ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// Inserts increasing ids every 100 ms (or at another pace); remembers which were acknowledged
/// and when.
pub struct Writer {
    pub acked: Arc<Mutex<Vec<(i64, Instant)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub async fn start(url: String) -> Writer {
        Self::start_at(url, 1).await
    }

    /// Like [`Writer::start`], trying each member in turn with a bound on the whole
    /// connection setup (libpq's per-host `connect_timeout`; tokio-postgres bounds only the
    /// socket's connect, so a member that accepts TCP and then hangs, as on a frozen disk,
    /// would hold a multi-host URL on its first host for ever).
    pub async fn start_per_host(c: &TestCluster) -> Writer {
        let urls = c
            .nodes
            .keys()
            .map(|id| format!("{}&target_session_attrs=read-write", c.pg_url_of(*id)))
            .collect();
        Self::start_urls(urls, 1).await
    }

    /// Starts writing ids from `first` up.
    pub async fn start_at(url: String, first: i64) -> Writer {
        Self::start_urls(vec![url], first).await
    }

    /// Like [`Writer::start_at`], pausing `pause` between writes instead of 100 ms.
    pub async fn start_paced(url: String, first: i64, pause: Duration) -> Writer {
        Self::start_urls_paced(vec![url], first, pause).await
    }

    /// Writes through the first of `urls` that takes a connection within its bound.
    async fn start_urls(urls: Vec<String>, first: i64) -> Writer {
        Self::start_urls_paced(urls, first, Duration::from_millis(100)).await
    }

    async fn start_urls_paced(urls: Vec<String>, first: i64, pause: Duration) -> Writer {
        // A member that just started may refuse or reset the first connection.
        let (client, conn) = wait_for("the writer's first connection", PATIENCE, || async {
            for url in &urls {
                if let Ok(c) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                    return Some(c);
                }
            }
            None
        })
        .await;
        tokio::spawn(conn);
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS w (id bigint PRIMARY KEY)")
            .await
            .expect("create table");
        drop(client);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut id = first - 1;
            while !s.load(Ordering::Relaxed) {
                id += 1;
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    let per_host = if urls.len() > 1 { 1 } else { 2 };
                    for url in &urls {
                        client = connect_within(url, Duration::from_secs(per_host)).await;
                        if client.is_some() {
                            break;
                        }
                    }
                }
                if let Some(c) = &client {
                    let r = tokio::time::timeout(
                        Duration::from_secs(2),
                        c.execute("INSERT INTO w VALUES ($1)", &[&id]),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => a.lock().unwrap().push((id, Instant::now())),
                        _ => client = None,
                    }
                }
                tokio::time::sleep(pause).await;
            }
        });
        Writer { acked, stop, task }
    }

    pub fn acked_after(&self, t: Instant) -> bool {
        self.acked.lock().unwrap().iter().any(|(_, at)| *at > t)
    }

    /// How many writes were acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub async fn stop(self) -> Vec<(i64, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let v = self.acked.lock().unwrap().clone();
        v
    }
}

/// Polls every member's `pg_is_in_recovery()` and records the worst moment: the most members
/// writable at once.
///
/// Each member has its own poller on its own OS thread and runtime, starting a poll every
/// 50 ms over a kept-open connection, reopened when it breaks: neither a reconnecting member
/// nor the test's own busy runtime (a debug build spends ~100 ms of CPU per SCRAM login)
/// delays the others.
/// A member counts as writable from an answer saying so until an answer, or a failure, says
/// otherwise: a member that turns writable while another's last word was "writable" counts as
/// two at once, so the record errs towards reporting split brain, never away from it.
pub struct Checker {
    state: Arc<Mutex<CheckerState>>,
    episodes: Arc<Mutex<Episodes>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Something told of each change a checker sees (a scenario's timeline).
pub type Notes = Arc<dyn Fn(String) + Send + Sync>;

/// The `single_writer` verdict of a whole run.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// The most members writable at once, and which.
    pub most: (usize, Vec<u64>),
    /// How many times two or more members became writable at once.
    pub two_writer_moments: usize,
    /// How long, in all, two or more were.
    pub two_writer_time: Duration,
}

/// Moments with two writers, as they happen.
#[derive(Default)]
struct Episodes {
    since: Option<Instant>,
    verdict: Verdict,
    notes: Option<Notes>,
}

#[derive(Default)]
struct CheckerState {
    /// Members whose latest answer said writable.
    writable: std::collections::BTreeSet<u64>,
    /// The most members writable at once, and which.
    most: (usize, Vec<u64>),
    /// Longest time between two consecutive answers of one member over a kept-open connection.
    longest_interval: Duration,
}

/// A kept-open connection to one member, if it is open.
type Conn = Option<tokio_postgres::Client>;

impl Checker {
    pub fn start(c: &TestCluster) -> Checker {
        Self::start_with(c, None)
    }

    /// Like [`Checker::start`], telling `notes` of every member that turns writable or stops
    /// being writable.
    pub fn start_noting(c: &TestCluster, notes: Notes) -> Checker {
        Self::start_with(c, Some(notes))
    }

    fn start_with(c: &TestCluster, notes: Option<Notes>) -> Checker {
        let state = Arc::new(Mutex::new(CheckerState::default()));
        let episodes = Arc::new(Mutex::new(Episodes {
            notes,
            ..Episodes::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = c
            .nodes
            .keys()
            .map(|id| {
                let (id, url) = (*id, c.pg_url_of(*id));
                let (state, stop, episodes) = (state.clone(), stop.clone(), episodes.clone());
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("checker runtime");
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    raise_priority(unsafe { libc::gettid() });
                    runtime.block_on(poll_member(id, url, state, episodes, stop));
                })
            })
            .collect();
        Checker {
            state,
            episodes,
            stop,
            threads,
        }
    }

    /// The longest time so far between two consecutive answers of one member over a kept-open
    /// connection (opening a connection costs more, but only follows a member's restart or
    /// failure, when it is not writable).
    pub fn longest_interval(&self) -> Duration {
        self.state.lock().unwrap().longest_interval
    }

    pub async fn stop(self) -> (usize, Vec<u64>) {
        self.stop_verdict().await.most
    }

    /// Stops polling; the whole run's verdict.
    pub async fn stop_verdict(self) -> Verdict {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads;
        // Joining blocks: keep it off the test's runtime workers.
        tokio::task::spawn_blocking(move || {
            for t in threads {
                t.join().expect("checker thread");
            }
        })
        .await
        .expect("join checker threads");
        let most = self.state.lock().unwrap().most.clone();
        let mut e = self.episodes.lock().unwrap();
        if let Some(since) = e.since.take() {
            e.verdict.two_writer_time += since.elapsed();
        }
        e.verdict.most = most;
        e.verdict.clone()
    }
}

/// A gap between two answers of one member at least this long is written to the notes.
const NOTED_GAP: Duration = Duration::from_millis(150);

/// One member's poller: asks every 50 ms until `stop`, recording into `state`.
async fn poll_member(
    id: u64,
    url: String,
    state: Arc<Mutex<CheckerState>>,
    episodes: Arc<Mutex<Episodes>>,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Conn = None;
    let mut last_answer = Instant::now();
    // Polls start every 50 ms, however long the previous one took (a late one starts at once).
    let mut every = tokio::time::interval(Duration::from_millis(50));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        every.tick().await;
        let (kept, writable, reused) = poll_writable(conn, &url).await;
        conn = kept;
        let now = Instant::now();
        {
            let mut g = state.lock().unwrap();
            if reused {
                let gap = now - last_answer;
                g.longest_interval = g.longest_interval.max(gap);
                // Name slow answers in the timeline: a failed poll bound says which member and when.
                if gap >= NOTED_GAP {
                    if let Some(notes) = &episodes.lock().unwrap().notes {
                        notes(format!(
                            "single_writer: member {id} answered {} ms after its previous answer",
                            gap.as_millis()
                        ));
                    }
                }
            }
            let changed = if writable {
                g.writable.insert(id)
            } else {
                g.writable.remove(&id)
            };
            if g.writable.len() > g.most.0 {
                g.most = (g.writable.len(), g.writable.iter().copied().collect());
            }
            if changed {
                let mut e = episodes.lock().unwrap();
                let writers: Vec<u64> = g.writable.iter().copied().collect();
                if let Some(notes) = &e.notes {
                    let word = if writable { "writable" } else { "not writable" };
                    notes(format!(
                        "single_writer: member {id} {word}; writable now {writers:?}"
                    ));
                }
                match (writers.len() > 1, e.since) {
                    (true, None) => {
                        e.since = Some(now);
                        e.verdict.two_writer_moments += 1;
                    }
                    (false, Some(since)) => {
                        e.since = None;
                        e.verdict.two_writer_time += now - since;
                    }
                    _ => {}
                }
            }
        }
        last_answer = now;
    }
}

/// Whether the member at `url` is writable (not in recovery), over `conn` or a new connection;
/// returns the connection to keep, if it still works, and whether the poll went over a kept-open
/// connection. A kept connection the member closed (it stopped or restarted) is replaced, and
/// opening one is not what the poll bound measures. No answer counts as not writable.
/// The checker must see every member even while the machine is saturated: five Postgres
/// instances converging on two cores once held every poller up for about 250 ms at once. So its
/// threads, and the backends that answer it, run at this nice value. That needs root
/// (CAP_SYS_NICE); without it the checker says so once and polls at the normal priority.
const CHECKER_NICE: i32 = -10;

/// Raises task `tid` (a thread or a process) to [`CHECKER_NICE`].
fn raise_priority(tid: i32) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // SAFETY: setpriority has no memory-safety preconditions.
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, CHECKER_NICE) };
    if done != 0 && !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "single_writer: cannot raise the checker's priority ({}); it polls at the normal \
             priority",
            std::io::Error::last_os_error()
        );
    }
}

async fn poll_writable(conn: Conn, url: &str) -> (Conn, bool, bool) {
    let (client, reused) = match conn.filter(|c| !c.is_closed()) {
        Some(c) => (c, true),
        None => {
            let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
            match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok((c, connection))) => {
                    tokio::spawn(connection);
                    let pid = c.query_one("SELECT pg_backend_pid()", &[]);
                    match tokio::time::timeout(Duration::from_secs(1), pid).await {
                        Ok(Ok(row)) => raise_priority(row.get::<_, i32>(0)),
                        _ => return (None, false, false),
                    }
                    (c, false)
                }
                _ => return (None, false, false),
            }
        }
    };
    let query = client.query_one("SELECT pg_is_in_recovery()", &[]);
    match tokio::time::timeout(Duration::from_secs(1), query).await {
        Ok(Ok(row)) => {
            let in_recovery: bool = row.get(0);
            (Some(client), !in_recovery, reused)
        }
        _ => (None, false, reused),
    }
}

/// The cluster's topology as its leader sees it.
pub async fn topology(c: &TestCluster) -> proto::Topology {
    c.client()
        .call(|mut cl| async move {
            cl.get_topology(proto::GetTopologyRequest { local: false })
                .await
        })
        .await
        .expect("topology")
}

/// Rows present on `id`'s Postgres.
pub async fn rows_on(c: &TestCluster, id: u64) -> Vec<i64> {
    let n = &c.nodes[&id];
    let url = format!(
        "postgresql://postgres:{PG_PASSWORD}@{}:{}/postgres?connect_timeout=2",
        n.pg_host, n.pg_port
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect for rows");
    tokio::spawn(conn);
    client
        .query("SELECT id FROM w ORDER BY id", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until a synchronous set is committed with no change pending; returns its members.
pub async fn wait_sync_committed(c: &TestCluster) -> Vec<u64> {
    wait_for("a committed synchronous standby", PATIENCE, || async {
        let y = topology(c).await.sync?;
        (y.k > 0 && y.target.is_empty()).then_some(y.members)
    })
    .await
}

/// Rows of table `w` missing from member `id`, of those in `acked`.
pub async fn missing_on(c: &TestCluster, id: u64, acked: &[(i64, Instant)]) -> Vec<i64> {
    let present = rows_on(c, id).await;
    acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect()
}

/// The longest gap between two consecutive acknowledged writes around `t`.
pub fn outage_ms(acked: &[(i64, Instant)], t: Instant) -> u128 {
    let before = acked
        .iter()
        .filter(|(_, at)| *at <= t)
        .map(|(_, at)| *at)
        .max();
    let after = acked
        .iter()
        .filter(|(_, at)| *at > t)
        .map(|(_, at)| *at)
        .min();
    match (before, after) {
        (Some(b), Some(a)) => (a - b).as_millis(),
        _ => u128::MAX,
    }
}

/// The longest gap between consecutive acknowledged writes from the last one acknowledged
/// before `from` up to `to` (the stretch from the last write to `to` included): the write
/// outage of a fault injected at `from`. Unlike [`outage_ms`] it is not fooled by a write that
/// was in flight at `from` and acknowledged just after.
pub fn max_gap_ms(acked: &[(i64, Instant)], from: Instant, to: Instant) -> u128 {
    let mut times: Vec<Instant> = acked.iter().map(|(_, at)| *at).collect();
    times.sort_unstable();
    let start = times
        .iter()
        .copied()
        .filter(|at| *at <= from)
        .max()
        .unwrap_or(from);
    let mut last = start;
    let mut gap = Duration::ZERO;
    for t in times
        .into_iter()
        .filter(|at| *at > start && *at <= to)
        .chain(std::iter::once(to))
    {
        gap = gap.max(t - last);
        last = t;
    }
    gap.as_millis()
}

/// Waits until the Raft leader has held office unchanged for `settled` (a new leader waits a
/// lease and more before it promotes anyone, so a planned switchover right after a leadership
/// change costs that wait); returns its id.
pub async fn wait_leader_settled(c: &TestCluster, settled: Duration) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut seen: Option<(u64, u64, Instant)> = None;
    loop {
        let t = topology(c).await;
        match seen {
            Some((l, term, since)) if (l, term) == (t.leader_id, t.term) && l != 0 => {
                if since.elapsed() >= settled {
                    return l;
                }
            }
            _ => seen = Some((t.leader_id, t.term, Instant::now())),
        }
        assert!(
            Instant::now() < deadline,
            "no Raft leader held office for {settled:?} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
