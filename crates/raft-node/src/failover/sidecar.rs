//! The member's side of failover, at the I/O edge: every tick it observes its Postgres, judges
//! it ([`super::assess`]), reports to the Raft leader (whose reply renews the primary's lease and
//! feeds the guard), runs the reconcile table's action against Postgres through `pg-supervisor`,
//! and keeps a primary's synchronous standbys equal to what the cluster committed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_supervisor::storage::{WriteCheck, WriteProbe};
use pg_supervisor::{Instance, Lease, PostmasterState, Role, SyncSpec, Upstream};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::assess::{Assessor, Seen};
use super::leader::{boot_clock_ms, FailoverLeader, Grant, ReportAnswer};
use super::lease::{adopted_lease, renewed, HeldLease, Millis};
use super::plan::follows_without_rewind;
use super::reconcile::{plan, while_paused, Action, LocalView};
use super::report::{HandedOver, LeaderStamp, MemberReport, PgState, StorageReport, SyncApplied};
use super::sync;
use crate::callbacks::{CallbackAction, Callbacks};
use crate::cluster_state::{ClusterState, Epoch, PlanKind, SyncSet};
use crate::dynamic_config::DynamicConfig;
use crate::events::EventLog;
use crate::http::LocalHealth;
use crate::metrics::Metrics;
use crate::network::Dialer;
use crate::node::Shutdown;
use crate::proto::internal_client::InternalClient;
use crate::proto::ReportRequest;
use crate::store::state_machine::AppliedState;
use crate::types::{NodeId, Raft};

/// What the sidecar must remember across restarts about its data directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// The last epoch this data directory served as primary in; `Some(0)` when it did in an
    /// unknown epoch (rebuilt from the control file), which any committed epoch supersedes.
    pub last_primary_epoch: Option<Epoch>,
    /// The highest committed epoch the sidecar acted on.
    pub epoch_seen: Epoch,
}

impl Memory {
    /// Memory rebuilt from the control file's cluster state, for a data directory whose memory
    /// file is missing or unreadable: a directory that was not in recovery may have accepted
    /// writes, so it must rejoin (rewind) before it follows anyone.
    pub fn rebuilt_from_cluster_state(cluster_state: &str) -> Self {
        let in_recovery = cluster_state.contains("recovery");
        Memory {
            last_primary_epoch: (!in_recovery).then_some(0),
            epoch_seen: 0,
        }
    }

    /// Writes `self` to `path` so that a crash leaves either the old or the new file, never a
    /// torn one: write a sibling, fsync it, rename it over, fsync the directory.
    pub fn persist(&self, path: &Path) -> std::io::Result<()> {
        let raw = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&raw)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The deadline to feed the guard for a held lease, on the guard's own clock: the sidecar counts
/// leases in [`boot_clock_ms`], the same `CLOCK_BOOTTIME` the guard reads, so nothing is
/// converted between clocks (a suspend between two readings cannot stretch a lease).
pub fn guard_deadline(lease: Option<HeldLease>) -> Lease {
    Lease::Until(lease.map_or(0, |l| l.expires_at.saturating_mul(1_000_000)))
}

/// How long a report may wait for the leader's answer. The answer's grant counts from when the
/// report left, so a late answer is as safe as a prompt one, just shorter-lived; waiting a
/// quarter lease (never less than a tick) lets renewals ride out round trips far longer than a
/// tick, and a primary whose reports all fail still sees its lease end on time.
pub fn report_timeout(cfg: &DynamicConfig) -> Duration {
    Duration::from_millis(cfg.tick_ms.max(cfg.lease_ms / 4))
}

/// Postgres as one probe saw it.
#[derive(Debug, Clone, Default)]
struct Observed {
    seen: Option<Seen>,
    timeline: u32,
    lsn: u64,
    replayed: Option<u64>,
    /// `pg_last_wal_receive_lsn()`: none until the WAL receiver runs.
    received: Option<u64>,
    streaming: bool,
    receipt_age_ms: Option<u64>,
    upstream_addr: Option<String>,
    /// On a primary: each standby's flushed position, by `application_name`.
    flushed: BTreeMap<String, u64>,
    /// On a primary: what the write probe found.
    write: Option<WriteProbe>,
    /// Free bytes of the data directory's and the WAL directory's filesystems.
    data_free: Option<u64>,
    wal_free: Option<u64>,
    /// The data or the WAL filesystem refuses writes (mounted or fallen read-only).
    read_only: bool,
}

impl Observed {
    /// The fewer free bytes of the two filesystems; none on a read-only one.
    fn free_bytes(&self) -> Option<u64> {
        if self.read_only {
            return Some(0);
        }
        self.data_free.into_iter().chain(self.wal_free).min()
    }
}

/// What the sidecar last said about its storage, so that it logs and records changes only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StorageSeen {
    write_kind: &'static str,
    low_space: bool,
}

/// When the next round runs.
enum Pace {
    Now,
    Soon,
    Tick,
}

/// The synchronous standbys this sidecar applied to its primary.
#[derive(Debug, Clone)]
struct AppliedSync {
    epoch: Epoch,
    set: SyncSet,
    /// The revision of the committed state it was (last) asked for by.
    revision: u64,
    switch_lsn: u64,
    at: Millis,
    /// Whether commits wait under it: proven once the checkpointer took the reload
    /// ([`Instance::checkpointer_took_reload`]); the WAL position after which they do.
    proof: Arc<std::sync::Mutex<Proof>>,
}

/// Whether a synchronous set applied to the primary is in force in its checkpointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Not asked yet (applied before a promotion, or an asynchronous set).
    NotStarted,
    /// A `CHECKPOINT` is under way.
    Pending,
    /// In force for commits after this WAL position.
    Proven(u64),
    /// The last attempt failed or timed out; tried again at the next tick.
    Failed,
}

/// The member-side failover loop of one sidecar.
pub struct Sidecar {
    node_id: NodeId,
    raft: Raft,
    state: watch::Receiver<Arc<AppliedState>>,
    leader: Arc<FailoverLeader>,
    instance: Instance,
    memory_path: PathBuf,
    memory: Memory,
    lease: Option<HeldLease>,
    assessor: Assessor,
    applied_sync: Option<AppliedSync>,
    /// The latest stamp a leader answered with, echoed in the next report.
    leader_stamp: Option<LeaderStamp>,
    events: EventLog,
    dialer: Dialer,
    /// The committed primary (and epoch) this replica reached but could not stream from.
    cannot_stream: Option<(NodeId, Epoch)>,
    /// Below this many free bytes the sidecar warns.
    free_space_warn_bytes: u64,
    /// Where the HTTP health endpoints read this member's state.
    health_tx: Option<watch::Sender<LocalHealth>>,
    storage_seen: StorageSeen,
    /// This member's primary shut down cleanly for a switchover: the plan, where its WAL
    /// ends, the target and the epoch it handed over.
    handed_over: Option<(HandedOver, NodeId, Epoch)>,
    metrics: Metrics,
    callbacks: Callbacks,
    /// Operator requests for this member's Postgres (`pgquorum restart`, `reload`, `reinit`).
    requests: Option<tokio::sync::mpsc::Receiver<MemberRequest>>,
    /// Settings waiting for a restart, as last read, and how many ticks ago.
    pending_restart: Vec<String>,
    /// Postgres runs outside this sidecar's guard (see [`Sidecar::note_unguarded`]).
    unguarded: bool,
    /// The replay position of the previous observation.
    last_replayed: Option<u64>,
    pending_checked: u32,
    /// `pg_hba.conf` admits the members' own hosts, as registered, rather than fixed addresses.
    members_only: bool,
    /// The system identifier of the data directory, once read.
    sysid: Option<u64>,
    /// Slots of members that are gone, and since when (boot clock) this primary saw them.
    stale_slots: BTreeMap<String, Millis>,
    slots_checked: u32,
    /// What the last tick judged, and the committed epoch it saw, for the counters.
    last_pg: Option<PgState>,
    last_epoch: Epoch,
    /// How the node is being stopped, once it is.
    shutdown: Option<watch::Receiver<Shutdown>>,
    /// How long Postgres may outlive a restarting sidecar.
    restart_window: Duration,
    /// The upstream a follow could not reach, and until when not to try it again.
    unreachable: Option<Unreachable>,
}

/// Sends a sidecar's reports to the Raft leader.
#[derive(Clone)]
struct Reporter {
    node_id: NodeId,
    raft: Raft,
    leader: Arc<FailoverLeader>,
    dialer: Dialer,
    metrics: Metrics,
}

impl Reporter {
    fn leader_addr(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Sends `report` to the Raft leader (this node's own, without the network) and returns
    /// its answer, if one came within `timeout`.
    async fn send(&self, report: &MemberReport, timeout: Duration) -> Option<ReportAnswer> {
        let (leader, addr) = self.leader_addr()?;
        if leader == self.node_id {
            return self.leader.on_report(report.clone());
        }
        // One kept channel per leader: a report is a call on an open HTTP/2 connection.
        let mut client = InternalClient::new(self.dialer.kept(&addr).ok()?);
        let sent = Instant::now();
        let req = ReportRequest {
            report: Some(report.into()),
        };
        let reply = match tokio::time::timeout(timeout, client.report(req)).await {
            Ok(Ok(reply)) => {
                self.metrics
                    .report_rtt
                    .observe(sent.elapsed().as_secs_f64());
                reply.into_inner()
            }
            failed => {
                let why = match failed {
                    Ok(Err(status)) => status.to_string(),
                    _ => format!("no answer within {} ms", timeout.as_millis()),
                };
                tracing::debug!(leader, %why, "report to the Raft leader failed");
                self.metrics.report_failures.inc();
                // The kept connection may be the one a cut silenced: dial afresh next time.
                self.dialer.forget(&addr);
                return None;
            }
        };
        Some(ReportAnswer {
            grant: reply.granted.then_some(Grant {
                epoch: reply.epoch,
                lease_ms: reply.lease_ms,
            }),
            stamp: LeaderStamp {
                term: reply.leader_term,
                at: reply.leader_at_ms,
            },
            report_again: reply.report_again,
        })
    }
}

/// A promotion or a start as primary can outlast the lease (a slow end of recovery on a busy
/// host, a long crash recovery), and the tick that renews the lease waits on it. Renewals go
/// on meanwhile, for at most this many leases: a promotion stuck longer than that loses its
/// lease, and the guard stops it so that another member can take over.
pub const RENEWAL_LEASES: u64 = 8;

/// Lease renewals while a long action holds the tick.
struct Renewals {
    reporter: Reporter,
    /// The report of the tick that started the action, sent again.
    report: MemberReport,
    lease: Option<HeldLease>,
    stamp: Option<LeaderStamp>,
    assessor: Assessor,
    /// Where every renewed lease goes, for the instance to feed its guard.
    feed: watch::Sender<Lease>,
    every: Duration,
    timeout: Duration,
    /// Boot clock: no renewal is sent after this.
    until: Millis,
}

impl Renewals {
    /// Runs `work` while renewing.
    async fn around<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        tokio::select! {
            out = work => out,
            never = self.run() => match never {},
        }
    }

    async fn run(&mut self) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(self.every).await;
            let now = boot_clock_ms();
            if now >= self.until {
                continue;
            }
            let report = self.report.resent(now);
            let Some(answer) = self.reporter.send(&report, self.timeout).await else {
                continue;
            };
            self.stamp = Some(answer.stamp);
            if let Some(g) = answer.grant {
                if self.assessor.accepts_grant_for(report.sent_at) {
                    self.lease = Some(renewed(self.lease, g.epoch, report.sent_at, g.lease_ms));
                    self.feed.send_replace(guard_deadline(self.lease));
                }
            }
        }
    }
}

/// A follow that could not reach its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    /// The member followed.
    pub upstream: NodeId,
    /// The committed epoch it was followed in.
    pub epoch: Epoch,
    /// Boot clock: not before then again.
    pub until: Millis,
}

/// How long a follow waits after its upstream could not be reached.
pub const UNREACHABLE_BACKOFF_MS: Millis = 2_000;

/// Whether a follow of `upstream` in `epoch` waits: it could not be reached in this same epoch
/// a moment ago. A newly committed primary (another member, or a later epoch) is followed at
/// once.
pub fn follow_waits(
    last: Option<Unreachable>,
    upstream: NodeId,
    epoch: Epoch,
    now: Millis,
) -> bool {
    last.is_some_and(|u| u.upstream == upstream && u.epoch == epoch && now < u.until)
}

/// Why the failover memory could not be loaded or rebuilt.
#[derive(Debug, thiserror::Error)]
#[error(
    "failover memory {path} is unreadable ({why}) and cannot be rebuilt from pg_controldata: \
     {rebuild}; check the data directory, then delete the file to start afresh"
)]
pub struct MemoryError {
    path: String,
    why: String,
    rebuild: String,
}

impl Sidecar {
    /// A loop driving `instance`; its memory lives in `memory_path`. A missing or corrupt memory
    /// file with a data directory present is rebuilt from the control file.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        node_id: NodeId,
        raft: Raft,
        state: watch::Receiver<Arc<AppliedState>>,
        leader: Arc<FailoverLeader>,
        instance: Instance,
        memory_path: PathBuf,
        events: EventLog,
        dialer: Dialer,
    ) -> Result<Self, MemoryError> {
        let memory = load_memory(&memory_path, &instance).await?;
        let mut instance = instance;
        let lease = match instance.adopt_running().await {
            Ok(Some(guard_lease)) => {
                let deadline = match guard_lease {
                    Lease::Until(ns) => Some(ns / 1_000_000),
                    Lease::NotRequired => None,
                };
                let lease = adopted_lease(deadline, memory.last_primary_epoch);
                tracing::info!(
                    epoch = lease.map(|l| l.epoch),
                    lease_left_ms = lease.map(|l| l.expires_at.saturating_sub(boot_clock_ms())),
                    "sidecar restart: adopted the Postgres its predecessor left running"
                );
                events.record(
                    "transition",
                    "adopted the running Postgres and its guard",
                    lease.map_or(0, |l| l.epoch),
                    0,
                );
                lease
            }
            Ok(None) => None,
            Err(e) => {
                // Not adopted: whatever runs is judged by the usual rules (a primary without a
                // lease is fenced), and a guard let go of without `detach` fences by itself.
                tracing::warn!(error = %e, "cannot adopt the running Postgres");
                None
            }
        };
        Ok(Self {
            node_id,
            raft,
            state,
            leader,
            instance,
            memory_path,
            memory,
            lease,
            assessor: Assessor::default(),
            applied_sync: None,
            leader_stamp: None,
            events,
            dialer,
            cannot_stream: None,
            free_space_warn_bytes: 1024 * 1024 * 1024,
            health_tx: None,
            storage_seen: StorageSeen {
                write_kind: "none",
                low_space: false,
            },
            handed_over: None,
            metrics: Metrics::default(),
            callbacks: Callbacks::default(),
            requests: None,
            pending_restart: Vec::new(),
            unguarded: false,
            last_replayed: None,
            pending_checked: u32::MAX,
            sysid: None,
            members_only: false,
            stale_slots: BTreeMap::new(),
            slots_checked: 0,
            last_pg: None,
            last_epoch: 0,
            shutdown: None,
            restart_window: Duration::ZERO,
            unreachable: None,
        })
    }

    /// On a [`Shutdown::KeepPostgres`] stop, leave Postgres running under its guard for
    /// `window` instead of fencing it, for the next sidecar to adopt.
    pub fn keep_postgres_on_restart(
        mut self,
        mode: watch::Receiver<Shutdown>,
        window: Duration,
    ) -> Self {
        self.shutdown = Some(mode);
        self.restart_window = window;
        self
    }

    /// Publish this member's state every tick to `tx` (the HTTP health endpoints).
    pub fn publish_health(mut self, tx: watch::Sender<LocalHealth>) -> Self {
        self.health_tx = Some(tx);
        self
    }

    /// Take operator requests for this member's Postgres from `rx`.
    pub fn take_requests(mut self, rx: tokio::sync::mpsc::Receiver<MemberRequest>) -> Self {
        self.requests = Some(rx);
        self
    }

    /// Admit the members' registered Postgres hosts (and 127.0.0.1) for replication and the
    /// superuser, following membership changes.
    pub fn allow_members_only(mut self, on: bool) -> Self {
        self.members_only = on;
        self
    }

    /// Run the operator's callbacks on starts, stops and role changes.
    pub fn with_callbacks(mut self, callbacks: Callbacks) -> Self {
        self.callbacks = callbacks;
        self
    }

    /// Count fences, promotions, failovers and report round trips in `metrics`.
    pub fn count_in(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Warn when the data or WAL filesystem has fewer free bytes than `bytes`.
    pub fn warn_below(mut self, bytes: u64) -> Self {
        self.free_space_warn_bytes = bytes;
        self
    }

    /// Logs and records a change of the storage's state: a write probe that starts or stops
    /// failing, free space that falls below or climbs back over the warning threshold. The
    /// events carry the figures until a metrics endpoint exports them.
    fn note_storage(&mut self, obs: &Observed, epoch: Epoch, lsn: u64) {
        let free = obs.free_bytes();
        let seen = StorageSeen {
            write_kind: obs.write.as_ref().map_or("none", |w| w.check.kind()),
            low_space: free.is_some_and(|f| f < self.free_space_warn_bytes),
        };
        // Only a failure, and the end of one, is news: a primary's first probe is not.
        let was_failing = !matches!(self.storage_seen.write_kind, "ok" | "none");
        let failing = !matches!(seen.write_kind, "ok" | "none");
        if seen.write_kind != self.storage_seen.write_kind && (failing || was_failing) {
            let probe = obs.write.as_ref();
            let ms = probe.map_or(0, |w| w.ms);
            let what = match probe.map(|w| &w.check) {
                None => {
                    tracing::info!(epoch, lsn, "no longer a running primary: write probe ends");
                    "write probe ends: no longer a running primary".to_string()
                }
                Some(WriteCheck::Ok) => {
                    tracing::info!(epoch, lsn, probe_ms = ms, "primary writes again");
                    format!("write probe ok again ({ms} ms)")
                }
                Some(c) => {
                    let why = cannot_write_text(c);
                    tracing::warn!(epoch, lsn, probe_ms = ms, free_bytes = ?free, "primary cannot write: {why}");
                    format!("cannot write: {why} (probe {ms} ms, free bytes {free:?})")
                }
            };
            self.events.record("storage", what, epoch, lsn);
        }
        if seen.low_space != self.storage_seen.low_space {
            let what = if seen.low_space {
                tracing::warn!(
                    epoch,
                    data_free_bytes = ?obs.data_free,
                    wal_free_bytes = ?obs.wal_free,
                    threshold = self.free_space_warn_bytes,
                    "low free space on the data or WAL filesystem"
                );
                format!(
                    "low free space: data {:?} bytes, WAL {:?} bytes (warning below {})",
                    obs.data_free, obs.wal_free, self.free_space_warn_bytes
                )
            } else {
                tracing::info!(epoch, free_bytes = ?free, "free space back above the warning threshold");
                format!("free space back: {free:?} bytes")
            };
            self.events.record("storage", what, epoch, lsn);
        }
        self.storage_seen = seen;
    }

    fn remember(&mut self, memory: Memory) {
        if memory == self.memory {
            return;
        }
        self.memory = memory;
        if let Err(e) = memory.persist(&self.memory_path) {
            tracing::warn!(error = %e, path = %self.memory_path.display(), "cannot persist failover memory");
        }
    }

    /// Runs until `stop`; on exit the instance is dropped, which fences its Postgres.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // A commit that concerns this member (a promotion above all) is acted on at once, not
        // at the next tick.
        let mut commits = self.state.clone();
        let mut requests = self.requests.take();
        loop {
            commits.borrow_and_update();
            let tick = Duration::from_millis(self.state.borrow().cluster.config.tick_ms);
            let started = Instant::now();
            // After a change, look and report again at once so the leader's view catches up;
            // a leader waiting for fresh reports gets them within a fraction of a tick.
            let rest = match self.tick().await {
                Pace::Now => Duration::ZERO,
                Pace::Soon => (tick / 5).saturating_sub(started.elapsed()),
                Pace::Tick => tick.saturating_sub(started.elapsed()),
            };
            let next_request = async {
                match requests.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let (commits_gone, request) = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(rest) => (false, None),
                changed = commits.changed() => (changed.is_err(), None),
                req = next_request => (false, Some(req)),
            };
            match request {
                Some(Some(r)) => {
                    let outcome = self.handle_request(r.action).await;
                    let _ = r.reply.send(outcome);
                }
                Some(None) => requests = None,
                None => {}
            }
            if commits_gone {
                // The state machine is gone (shutting down): no more commits to wait for.
                tokio::time::sleep(rest).await;
            }
        }
        let keep = self
            .shutdown
            .as_ref()
            .is_some_and(|m| *m.borrow() == Shutdown::KeepPostgres)
            && !self.restart_window.is_zero();
        if keep && self.instance.guard().is_some() {
            // One last renewal first: the successor then has close to a whole lease to come
            // back in, even when this member led Raft and a new leader must be elected.
            if self.last_pg == Some(PgState::Primary) {
                self.tick().await;
            }
            let epoch = self.lease.map(|l| l.epoch);
            let lease_left_ms = self
                .lease
                .map(|l| l.expires_at.saturating_sub(boot_clock_ms()));
            match self.instance.detach_guard(self.restart_window).await {
                Ok(_) => {
                    tracing::info!(
                        ?epoch,
                        ?lease_left_ms,
                        window_ms = self.restart_window.as_millis() as u64,
                        "sidecar stopping: Postgres keeps running under its guard for the next sidecar"
                    );
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot detach from the guard; fencing"),
            }
        }
        if self.instance.guard().is_some() {
            if let Ok(r) = self.instance.fence().await {
                tracing::info!(
                    elapsed_ms = r.elapsed_ms,
                    "sidecar stopping: Postgres fenced"
                );
            }
        }
    }

    async fn observe(&mut self) -> Observed {
        let has_data = matches!(
            self.instance.data_dir().contents(),
            Ok(pg_supervisor::data_dir::DataDirContents::Cluster)
        );
        if !has_data {
            let (data, _) = self.instance.storage_space().await;
            return Observed {
                seen: Some(Seen::NoData),
                data_free: data.map(|d| d.free_bytes),
                read_only: data.is_some_and(|d| d.read_only),
                ..Default::default()
            };
        }
        // The lease renewal waits for this probe, so a hanging Postgres must not make the
        // sidecar miss renewals: past a quarter lease the probe counts as a failure. The
        // probe's own bound is a little shorter, so that a stuck write is told apart from a
        // server that does not answer.
        let lease_ms = self.state.borrow().cluster.config.lease_ms;
        let cap = Duration::from_millis(lease_ms / 4);
        let look = self.instance.observe_within(cap * 9 / 10);
        let Ok(obs) = tokio::time::timeout(cap, look).await else {
            return Observed {
                seen: Some(Seen::Unresponsive),
                ..Default::default()
            };
        };
        let running = matches!(obs.postmaster, PostmasterState::Running { .. });
        let lsn = [obs.current_lsn, obs.received_lsn, obs.replayed_lsn]
            .into_iter()
            .flatten()
            .map(|l| l.0)
            .max()
            .unwrap_or(0);
        let receiver = obs.wal_receiver.as_ref();
        let seen = match (running, obs.accepts_connections, obs.role) {
            (false, _, _) => Seen::Down,
            (true, true, Some(Role::Primary)) => Seen::Primary,
            (true, true, Some(Role::Replica)) => Seen::Replica,
            (true, _, _) => Seen::Unresponsive,
        };
        Observed {
            seen: Some(seen),
            timeline: obs.timeline.unwrap_or(0),
            lsn,
            replayed: obs.replayed_lsn.map(|l| l.0),
            received: obs.received_lsn.map(|l| l.0),
            streaming: receiver.is_some_and(|w| w.status == "streaming"),
            receipt_age_ms: receiver.and_then(|w| w.last_msg_receipt_age_ms),
            upstream_addr: receiver
                .and_then(|w| Some(format!("{}:{}", w.sender_host.as_ref()?, w.sender_port?))),
            flushed: obs
                .standbys
                .iter()
                .filter_map(|s| Some((s.name.clone(), s.flush_lsn?.0)))
                .collect(),
            write: obs.write_probe.clone(),
            data_free: obs.data_fs.map(|f| f.free_bytes),
            wal_free: obs.wal_fs.map(|f| f.free_bytes),
            read_only: [obs.data_fs, obs.wal_fs]
                .iter()
                .flatten()
                .any(|f| f.read_only),
        }
    }

    /// What sends this sidecar's reports; owned, so that renewals can go on while an action
    /// holds the instance.
    fn reporter(&self) -> Reporter {
        Reporter {
            node_id: self.node_id,
            raft: self.raft.clone(),
            leader: self.leader.clone(),
            dialer: self.dialer.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Starts renewing the lease while a long action runs: `report` (the one this tick sent)
    /// goes out again every tick, and the instance feeds its guard every lease granted.
    fn begin_renewals(&mut self, report: &MemberReport, cfg: &DynamicConfig) -> Renewals {
        let (feed, leases) = watch::channel(self.guard_lease());
        self.instance.renew_from(Some(leases));
        Renewals {
            reporter: self.reporter(),
            report: report.clone(),
            lease: self.lease,
            stamp: self.leader_stamp,
            assessor: self.assessor,
            feed,
            every: Duration::from_millis(cfg.tick_ms),
            timeout: report_timeout(cfg),
            until: boot_clock_ms().saturating_add(cfg.lease_ms.saturating_mul(RENEWAL_LEASES)),
        }
    }

    /// Takes back what the renewals got.
    fn end_renewals(&mut self, r: Renewals) {
        self.instance.renew_from(None);
        self.lease = r.lease;
        self.leader_stamp = r.stamp;
    }

    fn upstream_of(&self, node: NodeId) -> Option<Upstream> {
        let state = self.state.borrow();
        let m = state.cluster.members.get(&node)?;
        let (host, port) = self.dialer.postgres(&m.pg_host, m.pg_port);
        Some(Upstream { host, port })
    }

    fn guard_lease(&self) -> Lease {
        guard_deadline(self.lease)
    }

    /// What a primary reports about its synchronous standbys: the set it applied in the current
    /// epoch, confirmed once `k` of them flushed past where it took effect. Walsenders re-read
    /// the setting on their own after a reload, so a tick passes before confirming.
    fn sync_report(
        &self,
        cluster: &ClusterState,
        obs: &Observed,
        now: Millis,
    ) -> Option<SyncApplied> {
        let applied = self.applied_sync.as_ref()?;
        let epoch = cluster.primary.filter(|p| p.node == self.node_id)?.epoch;
        if applied.epoch != epoch {
            return None;
        }
        let flushed: BTreeMap<NodeId, u64> = cluster
            .members
            .values()
            .filter_map(|m| Some((m.id, *obs.flushed.get(&m.name)?)))
            .collect();
        let settled = now >= applied.at + cluster.config.tick_ms;
        // A synchronous set counts only once commits provably wait under it.
        let switch_lsn = match applied.proof.lock().map(|p| *p) {
            _ if !applied.set.is_synchronous() => Some(applied.switch_lsn),
            Ok(Proof::Proven(lsn)) => Some(lsn.max(applied.switch_lsn)),
            _ => None,
        };
        Some(SyncApplied {
            epoch,
            set: applied.set.clone(),
            confirmed: settled
                && switch_lsn.is_some_and(|lsn| sync::confirmed(&applied.set, lsn, &flushed)),
            revision: applied.revision,
        })
    }

    /// Makes `synchronous_standby_names` say what the committed state asks of this member as
    /// the primary of `epoch` (before promotion too: the new primary must never acknowledge a
    /// write without its synchronous standbys).
    async fn apply_sync(&mut self, cluster: &ClusterState, epoch: Epoch) -> Result<(), String> {
        if cluster.sync.epoch != epoch {
            return Ok(());
        }
        let want = sync::to_apply(&cluster.sync).clone();
        let revision = cluster.sync.revision;
        if let Some(a) = self
            .applied_sync
            .as_mut()
            .filter(|a| a.epoch == epoch && a.set == want)
        {
            // The same set asked for again: it has run without a break since it was applied,
            // so its confirmation still holds.
            a.revision = revision;
            let proof = a.proof.clone();
            self.prove_sync(&proof, &want, cluster);
            return Ok(());
        }
        let spec = sync_spec(cluster, &want);
        let applied = self
            .instance
            .apply_synchronous_standbys(&spec)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(epoch, standbys = %applied.rendered, switch_lsn = %applied.switch_lsn, "synchronous standbys applied");
        self.events.record(
            "transition",
            format!("synchronous_standby_names = '{}'", applied.rendered),
            epoch,
            applied.switch_lsn.0,
        );
        self.applied_sync = Some(AppliedSync {
            epoch,
            set: want,
            revision,
            switch_lsn: applied.switch_lsn.0,
            at: boot_clock_ms(),
            proof: Arc::new(std::sync::Mutex::new(Proof::NotStarted)),
        });
        if let Some((proof, set)) = self
            .applied_sync
            .as_ref()
            .map(|a| (a.proof.clone(), a.set.clone()))
        {
            self.prove_sync(&proof, &set, cluster);
        }
        Ok(())
    }

    /// On the primary, starts proving (beside the tick, which must go on renewing the lease)
    /// that a synchronous set is in force in the checkpointer, unless that is under way or
    /// done.
    fn prove_sync(
        &self,
        proof: &Arc<std::sync::Mutex<Proof>>,
        set: &SyncSet,
        cluster: &ClusterState,
    ) {
        if !set.is_synchronous() || self.last_pg != Some(PgState::Primary) {
            return;
        }
        let Ok(mut p) = proof.lock() else { return };
        if matches!(*p, Proof::Pending | Proof::Proven(_)) {
            return;
        }
        *p = Proof::Pending;
        drop(p);
        let limit = Duration::from_millis(cluster.config.lease_ms.saturating_mul(4));
        let check = self.instance.checkpointer_took_reload(limit);
        let proof = proof.clone();
        tokio::spawn(async move {
            let outcome = check.await;
            let next = match &outcome {
                Ok(lsn) => Proof::Proven(lsn.0),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prove the synchronous standbys in force (the checkpointer has not taken the reload); trying again");
                    Proof::Failed
                }
            };
            if let Ok(mut p) = proof.lock() {
                *p = next;
            }
        });
    }

    /// One round; says when to run the next.
    async fn tick(&mut self) -> Pace {
        let state = self.state.borrow().clone();
        let cfg = state.cluster.config.clone();
        self.instance
            .expect_system_identifier(state.cluster.system_identifier);
        let obs = self.observe().await;
        let unguarded = self.note_unguarded(committed_epoch_of(&state.cluster));
        let lsn_incomplete = lsn_incomplete(
            obs.seen,
            obs.received,
            obs.replayed,
            std::mem::replace(&mut self.last_replayed, obs.replayed),
        );
        if self.sysid.is_none() && matches!(obs.seen, Some(Seen::Primary | Seen::Replica)) {
            self.sysid = self.instance.system_identifier().await.ok();
        }
        let now = boot_clock_ms();
        let judged = self.assessor.assess(
            obs.seen.unwrap_or(Seen::Unresponsive),
            self.memory.last_primary_epoch.is_some(),
            self.lease,
            now,
        );
        let pg = judged.pg;
        if pg == PgState::Fenced && self.last_pg != Some(PgState::Fenced) {
            self.metrics.fences.inc();
        }
        self.last_pg = Some(pg);
        let committed_epoch = state.cluster.primary.map_or(0, |p| p.epoch);
        if self.last_epoch != 0 && committed_epoch > self.last_epoch {
            self.metrics.failovers.inc();
        }
        self.last_epoch = self.last_epoch.max(committed_epoch);
        if matches!(pg, PgState::Primary | PgState::Replica) {
            // Postgres runs again: whatever it writes now was never handed over.
            self.handed_over = None;
        }
        let wrote = obs.write.as_ref().map(|w| w.check.is_ok());
        let write_failures = self.assessor.judge_write(pg, wrote);
        let free_bytes = obs.free_bytes();
        let storage = StorageReport {
            free_bytes,
            low_space: free_bytes.is_some_and(|f| f < self.free_space_warn_bytes),
            cannot_write: obs
                .write
                .as_ref()
                .filter(|w| !w.check.is_ok() && pg == PgState::Primary)
                .map(|w| cannot_write_text(&w.check)),
            write_failures,
            read_only: obs.read_only,
            write_probe_ms: obs.write.as_ref().map(|w| match w.check {
                WriteCheck::Stuck { running_ms } => running_ms,
                _ => w.ms,
            }),
        };
        let upstream = obs.upstream_addr.as_ref().and_then(|addr| {
            state
                .cluster
                .members
                .values()
                .find(|m| {
                    // The WAL receiver names the address it dialed, which `dial_via` may
                    // have routed elsewhere.
                    let (host, port) = self.dialer.postgres(&m.pg_host, m.pg_port);
                    &format!("{host}:{port}") == addr
                })
                .map(|m| m.id)
        });
        let report = MemberReport {
            node: self.node_id,
            pg,
            consecutive_failures: judged.failures,
            timeline: obs.timeline,
            lsn: obs.lsn,
            streaming: obs.streaming,
            wal_receipt_age_ms: obs.receipt_age_ms,
            upstream,
            sync_applied: (pg == PgState::Primary)
                .then(|| self.sync_report(&state.cluster, &obs, now))
                .flatten(),
            leader_stamp: self.leader_stamp,
            epoch_seen: self.memory.epoch_seen,
            sent_at: now,
            storage,
            replayed_lsn: obs.replayed.filter(|_| pg == PgState::Replica),
            pending_restart: self.pending_restart.clone(),
            system_identifier: self.sysid,
            unguarded,
            lsn_incomplete,
            handed_over: self
                .handed_over
                .filter(|_| pg == PgState::Fenced)
                .map(|(h, _, _)| h),
        };
        let answer = self.reporter().send(&report, report_timeout(&cfg)).await;
        let report_again = answer.is_some_and(|a| a.report_again);
        if let Some(a) = answer {
            self.leader_stamp = Some(a.stamp);
        }
        if let Some(g) = answer.and_then(|a| a.grant) {
            if self.assessor.accepts_grant_for(now) {
                self.lease = Some(renewed(self.lease, g.epoch, now, g.lease_ms));
                if pg == PgState::Primary {
                    let lease = self.guard_lease();
                    if let Err(e) = self.instance.feed_lease(lease).await {
                        tracing::warn!(error = %e, "cannot renew the guard's lease");
                    }
                }
            }
        }
        if let Some(tx) = &self.health_tx {
            tx.send_replace(LocalHealth {
                pg: Some(pg),
                lease: self
                    .lease
                    .filter(|_| pg == PgState::Primary)
                    .map(|l| (l.epoch, l.expires_at)),
                receives_wal: pg == PgState::Replica
                    && report.receives_wal_now(super::policy::wal_fresh_ms(&cfg)),
                lsn: obs.lsn,
                timeline: obs.timeline,
                at: boot_clock_ms(),
                free_bytes,
            });
        }
        let view = LocalView {
            pg,
            upstream,
            last_primary_epoch: self.memory.last_primary_epoch,
            crashed: judged.crashed,
            failures: judged.failures,
            epoch_seen: self.memory.epoch_seen,
            cannot_stream: self.cannot_stream.is_some()
                && self.cannot_stream == state.cluster.primary.map(|a| (a.node, a.epoch)),
            free_bytes,
            hand_over: state.cluster.plan.is_some_and(|p| {
                p.started
                    && p.kind == PlanKind::Switchover
                    && p.from == self.node_id
                    && state.cluster.primary.is_some_and(|a| a.epoch == p.epoch)
            }),
            handed_over_to: self
                .handed_over
                .filter(|(h, to, e)| follows_without_rewind(&state.cluster, *h, *to, *e))
                .map(|(_, to, epoch)| (to, epoch)),
            unguarded,
        };
        let assigned = state.cluster.primary;
        if let Some(epoch) = became_primary(
            pg,
            assigned,
            self.node_id,
            self.lease,
            self.memory.last_primary_epoch,
        ) {
            // A promotion confirmed late (after its call failed) is recorded here.
            tracing::info!(
                epoch,
                lsn = obs.lsn,
                "Postgres runs as the primary of epoch {epoch}"
            );
            let mut memory = self.memory;
            memory.last_primary_epoch = Some(epoch);
            self.remember(memory);
        }
        let mut step = plan(
            self.node_id,
            &view,
            assigned,
            self.lease,
            boot_clock_ms(),
            &cfg,
        );
        if state.cluster.paused {
            step = while_paused(step);
        }
        if let Action::Follow { upstream } = step.action {
            if follow_waits(
                self.unreachable,
                upstream,
                assigned.map_or(0, |a| a.epoch),
                boot_clock_ms(),
            ) {
                // Postgres' own WAL receiver keeps trying meanwhile.
                step.action = Action::Nothing;
            }
        }
        let epoch = assigned.map(|a| a.epoch).unwrap_or(0);
        self.note_storage(&obs, epoch, obs.lsn);
        self.apply_pg_settings(&state.cluster, pg, epoch).await;
        if step.action != Action::Nothing {
            tracing::info!(action = ?step.action, epoch, lsn = obs.lsn, "{}", step.reason);
        }
        let mut memory = self.memory;
        memory.epoch_seen = memory.epoch_seen.max(epoch);
        let result = self
            .execute(step.action, &state.cluster, &report, &mut memory)
            .await;
        if result.is_ok() {
            self.call_back(step.action, pg);
        }
        if let Err(e) = &result {
            tracing::warn!(action = ?step.action, epoch, error = %e, "action failed; retrying next tick");
        }
        if step.action != Action::Nothing {
            let outcome = match &result {
                Ok(()) => "done".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            self.events.record(
                "transition",
                format!("{:?}: {} ({outcome})", step.action, step.reason),
                epoch,
                obs.lsn,
            );
        }
        self.remember(memory);
        let primary_here = assigned.is_some_and(|a| a.node == self.node_id);
        if step.action == Action::Nothing && pg == PgState::Primary && primary_here {
            if let Err(e) = self.apply_sync(&state.cluster, epoch).await {
                tracing::warn!(epoch, error = %e, "cannot apply the synchronous standbys; retrying next tick");
            }
            self.drop_stale_slots(&state.cluster, epoch).await;
        }
        if step.action != Action::Nothing && result.is_ok() {
            Pace::Now
        } else if report_again {
            Pace::Soon
        } else {
            Pace::Tick
        }
    }

    /// Whether Postgres runs outside this sidecar's guard; says so once (log and event) when it
    /// starts to.
    fn note_unguarded(&mut self, epoch: Epoch) -> bool {
        let pid = self.instance.unguarded_postmaster();
        if pid.is_some() && !self.unguarded {
            tracing::warn!(epoch, postmaster = ?pid, "Postgres runs outside pgquorum's guard (started by hand?): nothing would fence it if this sidecar died; restarting it under the guard");
            self.events.record(
                "transition",
                format!(
                    "Postgres (postmaster {}) runs outside pgquorum's guard; restarting it \
                     under the guard",
                    pid.unwrap_or(0)
                ),
                epoch,
                0,
            );
        }
        self.unguarded = pid.is_some();
        self.unguarded
    }

    /// Makes this member's Postgres run the committed parameters and `pg_hba.conf` lines, and
    /// reads which settings wait for a restart (right after a change, then every few ticks).
    async fn apply_pg_settings(&mut self, cluster: &ClusterState, pg: PgState, epoch: Epoch) {
        if self.members_only {
            let hosts = member_addresses(cluster.members.values().map(|m| m.pg_host.as_str()));
            match self.instance.set_cluster_cidrs(hosts.clone()) {
                Ok(true) => {
                    tracing::info!(epoch, allowed = ?hosts, "pg_hba.conf admits the members' hosts")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot update the members' pg_hba lines"),
            }
        }
        match self
            .instance
            .set_cluster_settings(cluster.pg.parameter_pairs(), cluster.pg.hba.clone())
        {
            Ok(true) => {
                tracing::info!(epoch, parameters = ?cluster.pg.parameters, hba_lines = cluster.pg.hba.len(), "applied the committed Postgres settings");
                self.events.record(
                    "transition",
                    format!(
                        "applied Postgres settings: {} parameters, {} extra pg_hba lines",
                        cluster.pg.parameters.len(),
                        cluster.pg.hba.len()
                    ),
                    epoch,
                    0,
                );
                self.pending_checked = u32::MAX;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot apply the committed Postgres settings"),
        }
        if !matches!(pg, PgState::Primary | PgState::Replica) {
            self.pending_restart.clear();
            return;
        }
        // A reload reaches the postmaster a moment after the signal: look again next tick too.
        self.pending_checked = self.pending_checked.saturating_add(1);
        if self.pending_checked >= 8 {
            match self.instance.pending_restart().await {
                Ok(names) => {
                    if names != self.pending_restart && !names.is_empty() {
                        tracing::info!(epoch, settings = ?names, "settings wait for a restart of Postgres");
                    }
                    self.pending_restart = names;
                    self.pending_checked = 0;
                }
                Err(e) => tracing::debug!(error = %e, "cannot read pending_restart"),
            }
        }
    }

    /// On the primary, every few seconds: drops the slots of members no longer in the cluster
    /// once they have been unused for `stale_slot_grace_ms`, so they cannot pin WAL for ever.
    async fn drop_stale_slots(&mut self, cluster: &ClusterState, epoch: Epoch) {
        self.slots_checked += 1;
        if self.slots_checked < 20 {
            return;
        }
        self.slots_checked = 0;
        let keep: Vec<String> = cluster
            .members
            .values()
            .map(|m| pg_supervisor::conninfo::slot_name_for(&m.name))
            .collect();
        let stale = match self.instance.stale_slots(&keep).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list replication slots");
                return;
            }
        };
        let now = boot_clock_ms();
        self.stale_slots.retain(|name, _| stale.contains(name));
        for name in stale {
            let since = *self.stale_slots.entry(name.clone()).or_insert(now);
            if now.saturating_sub(since) < cluster.config.stale_slot_grace_ms {
                continue;
            }
            match self.instance.drop_replication_slot(&name).await {
                Ok(()) => {
                    tracing::info!(epoch, slot = %name, "dropped the replication slot of a member that is gone");
                    self.events.record(
                        "transition",
                        format!("dropped replication slot {name}: its member is gone"),
                        epoch,
                        0,
                    );
                    self.stale_slots.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(slot = %name, error = %e, "cannot drop a stale replication slot")
                }
            }
        }
    }

    /// Carries out an operator's request for this member's Postgres.
    async fn handle_request(&mut self, action: MemberAction) -> Result<String, String> {
        let cluster = self.state.borrow().cluster.clone();
        let epoch = cluster.primary.map_or(0, |p| p.epoch);
        let primary_here = cluster.primary.is_some_and(|p| p.node == self.node_id);
        tracing::info!(?action, epoch, "operator request");
        let outcome = match action {
            MemberAction::Reload => self
                .instance
                .reload()
                .map(|()| "Postgres reloaded its configuration".to_string())
                .map_err(|e| e.to_string()),
            MemberAction::Restart { only_if_pending } => {
                let pending = self.instance.pending_restart().await.unwrap_or_default();
                if only_if_pending && pending.is_empty() {
                    return Ok("no setting waits for a restart: nothing done".into());
                }
                if primary_here && !self.lease.is_some_and(|l| l.valid_at(boot_clock_ms())) {
                    return Err("this member is the primary and holds no valid lease: it                                 must not start writable; retry in a moment"
                        .into());
                }
                let r = self.instance.restart().await.map_err(|e| e.to_string());
                if r.is_ok() {
                    self.assessor.started();
                    self.pending_restart.clear();
                    self.pending_checked = u32::MAX;
                    self.callbacks.fire(
                        CallbackAction::Start,
                        if primary_here { "primary" } else { "replica" },
                    );
                }
                r.map(|()| {
                    if pending.is_empty() {
                        "Postgres restarted".to_string()
                    } else {
                        format!("Postgres restarted; now in effect: {}", pending.join(", "))
                    }
                })
            }
            MemberAction::Reinit => {
                let Some(primary) = cluster.primary.filter(|p| p.node != self.node_id) else {
                    return Err("reinit re-clones a replica from the primary, and this member                                 is the primary (or none is chosen yet); switch over first"
                        .into());
                };
                let u = self.upstream_of(primary.node).ok_or_else(|| {
                    format!(
                        "member {} has not registered its Postgres address",
                        primary.node
                    )
                })?;
                let r = self
                    .instance
                    .reinit_from(&u)
                    .await
                    .map_err(|e| e.to_string());
                if r.is_ok() {
                    self.assessor.started();
                    self.cannot_stream = None;
                    let mut memory = self.memory;
                    memory.last_primary_epoch = None;
                    self.remember(memory);
                    self.callbacks.fire(CallbackAction::Start, "replica");
                }
                r.map(|()| format!("re-cloned from member {} and streaming", primary.node))
            }
        };
        let what = match &outcome {
            Ok(o) => format!("{action:?}: {o}"),
            Err(e) => format!("{action:?} failed: {e}"),
        };
        tracing::info!(epoch, "{what}");
        self.events.record("transition", what, epoch, 0);
        outcome
    }

    /// Fires the callbacks of a successful `action` taken while Postgres was `was`.
    fn call_back(&self, action: Action, was: PgState) {
        use CallbackAction::{RoleChange, Start, Stop};
        let (fire, role): (&[CallbackAction], &str) = match action {
            Action::Nothing | Action::Follow { .. } | Action::TakeUnderGuard => (&[], ""),
            Action::InitPrimary | Action::StartPrimary => (&[Start], "primary"),
            Action::Clone { .. } | Action::StartReplica { .. } => (&[Start], "replica"),
            Action::Promote { .. } => (&[RoleChange], "primary"),
            Action::Rejoin { .. } | Action::FollowAfterHandOver { .. } => {
                (&[Start, RoleChange], "replica")
            }
            Action::Fence | Action::HandOver => (&[Stop], crate::metrics::role_name(Some(was))),
        };
        for a in fire {
            self.callbacks.fire(*a, role);
        }
    }

    async fn execute(
        &mut self,
        action: Action,
        cluster: &ClusterState,
        report: &MemberReport,
        memory: &mut Memory,
    ) -> Result<(), String> {
        let epoch = cluster.primary.map(|a| a.epoch).unwrap_or(0);
        let up = |s: &Self, n: NodeId| {
            s.upstream_of(n)
                .ok_or_else(|| format!("member {n} has not registered its Postgres address"))
        };
        match action {
            Action::Nothing => {}
            Action::InitPrimary => {
                let sysid = self
                    .instance
                    .init_primary()
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    system_identifier = sysid,
                    epoch,
                    "initialised a new cluster"
                );
                self.instance
                    .start(self.guard_lease())
                    .await
                    .map_err(|e| e.to_string())?;
                self.assessor.started();
                memory.last_primary_epoch = Some(epoch);
            }
            Action::Clone { from } => {
                let u = up(self, from)?;
                self.instance
                    .clone_from(&u)
                    .await
                    .map_err(|e| e.to_string())?;
                self.instance.follow(&u).await.map_err(|e| e.to_string())?;
                self.assessor.started();
                memory.last_primary_epoch = None;
            }
            Action::StartPrimary => {
                let lease = self.guard_lease();
                let mut renewals = self.begin_renewals(report, &cluster.config);
                let started = renewals.around(self.instance.start(lease)).await;
                self.end_renewals(renewals);
                started.map_err(|e| e.to_string())?;
                self.assessor.started();
                memory.last_primary_epoch = Some(epoch);
            }
            Action::StartReplica { upstream } => {
                match upstream {
                    Some(n) => {
                        let u = up(self, n)?;
                        self.instance.follow(&u).await.map_err(|e| e.to_string())?;
                    }
                    // Never without standby.signal: a data directory that starts out of
                    // recovery is writable, and only a lease may make it so.
                    None => self
                        .instance
                        .start_in_recovery()
                        .await
                        .map_err(|e| e.to_string())?,
                }
                self.assessor.started();
            }
            Action::Promote { epoch } => {
                // The new primary's first acknowledged write already waits for its committed
                // synchronous standbys.
                self.apply_sync(cluster, epoch).await?;
                let lease = self.guard_lease();
                self.instance
                    .feed_lease(lease)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut renewals = self.begin_renewals(report, &cluster.config);
                let promoted = renewals.around(self.instance.promote()).await;
                self.end_renewals(renewals);
                let r = match promoted {
                    Ok(r) => r,
                    Err(e) => {
                        if self.instance.promotion_requested() {
                            // What Postgres becomes, not what the call returned: once asked, it
                            // promotes, and a data directory that may have served writes is a
                            // primary's (fenced when down, rewound before following, its lease
                            // taken over by a restarted sidecar).
                            memory.last_primary_epoch = Some(epoch);
                            tracing::warn!(
                                epoch,
                                error = %e,
                                "the promotion was requested but not confirmed: this data                                  directory counts as the primary of epoch {epoch} from now on"
                            );
                        }
                        return Err(e.to_string());
                    }
                };
                tracing::info!(
                    epoch,
                    timeline = r.timeline,
                    elapsed_ms = r.elapsed_ms,
                    "promoted"
                );
                self.metrics.promotions.inc();
                memory.last_primary_epoch = Some(epoch);
            }
            Action::Follow { upstream } => {
                let u = up(self, upstream)?;
                match self.instance.follow(&u).await {
                    Ok(_) => {
                        self.cannot_stream = None;
                        self.unreachable = None;
                    }
                    Err(e) if e.is_connect_failure() => {
                        // The upstream is down or cut off: that says nothing about this
                        // member's history, and retrying every tick would hold every report
                        // back by a connect timeout.
                        self.unreachable = Some(Unreachable {
                            upstream,
                            epoch,
                            until: boot_clock_ms() + UNREACHABLE_BACKOFF_MS,
                        });
                        return Err(e.to_string());
                    }
                    Err(e) => {
                        // Reached the upstream (its timeline was read) but never streamed.
                        if matches!(e, pg_supervisor::error::SupervisorError::Timeout { .. }) {
                            self.cannot_stream = Some((upstream, epoch));
                        }
                        return Err(e.to_string());
                    }
                }
            }
            Action::Rejoin { upstream } => {
                // One rewind per failed follow: if this one fails too, following is tried anew.
                self.cannot_stream = None;
                let u = up(self, upstream)?;
                let r = self
                    .instance
                    .rejoin_as_replica(&u)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(method = ?r.method, elapsed_ms = r.elapsed_ms, epoch, "rejoined as a replica");
                self.metrics.rejoins.inc();
                memory.last_primary_epoch = None;
                self.applied_sync = None;
                self.assessor.started();
            }
            Action::HandOver => {
                let plan = cluster
                    .plan
                    .filter(|p| p.started && p.from == self.node_id)
                    .ok_or("no started switchover names this member")?;
                // The guard fences at the lease's end anyway; a shutdown still running then
                // is no longer clean.
                let timeout = Duration::from_millis(cluster.config.lease_ms);
                let outcome = self.instance.hand_over(timeout).await;
                self.lease = None;
                self.assessor.fenced_at(boot_clock_ms());
                match outcome {
                    Ok(r) => {
                        tracing::info!(
                            epoch,
                            lsn = r.final_lsn,
                            elapsed_ms = r.elapsed_ms,
                            to = plan.to,
                            "switchover: primary shut down cleanly"
                        );
                        self.handed_over = Some((
                            HandedOver {
                                plan: plan.id,
                                final_lsn: r.final_lsn,
                            },
                            plan.to,
                            epoch,
                        ));
                    }
                    Err(e) => {
                        let r = self.instance.fence().await.map_err(|f| f.to_string())?;
                        tracing::warn!(epoch, error = %e, elapsed_ms = r.elapsed_ms, "switchover: the clean shutdown failed; fenced instead");
                        return Err(format!("clean shutdown failed ({e}); fenced instead"));
                    }
                }
            }
            Action::FollowAfterHandOver { upstream } => {
                let u = up(self, upstream)?;
                match self.instance.follow_after_hand_over(&u).await {
                    Ok(r) => {
                        tracing::info!(epoch, upstream, elapsed_ms = r.elapsed_ms, timeline = ?r.timeline, "former primary follows the new primary without a rewind");
                        self.metrics.rejoins.inc();
                        memory.last_primary_epoch = None;
                        self.handed_over = None;
                        self.applied_sync = None;
                        self.cannot_stream = None;
                        self.assessor.started();
                    }
                    Err(e) => {
                        // Reached the new primary but streaming never started: this history
                        // went past the fork after all, and only a rewind helps.
                        if matches!(e, pg_supervisor::error::SupervisorError::Timeout { .. })
                            && !e.is_connect_failure()
                        {
                            self.cannot_stream = Some((upstream, epoch));
                            self.handed_over = None;
                        }
                        return Err(e.to_string());
                    }
                }
            }
            Action::TakeUnderGuard => {
                let lease = self
                    .lease
                    .filter(|l| {
                        cluster
                            .primary
                            .is_some_and(|a| a.node == self.node_id && a.epoch == l.epoch)
                    })
                    .map(|l| guard_deadline(Some(l)));
                let done = self
                    .instance
                    .take_under_guard(lease)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(epoch, outcome = ?done, "Postgres is under the guard again");
                if done == pg_supervisor::TakenUnderGuard::Fenced {
                    self.lease = None;
                    self.assessor.fenced_at(boot_clock_ms());
                } else {
                    self.assessor.started();
                }
            }
            Action::Fence => {
                let r = self.instance.fence().await.map_err(|e| e.to_string())?;
                tracing::info!(elapsed_ms = r.elapsed_ms, epoch, "fenced Postgres");
                self.lease = None;
                self.assessor.fenced_at(boot_clock_ms());
                if !r.verified_gone {
                    return Err(format!(
                        "fence could not verify that every process of the data directory is \
                         gone: {r:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether a replica's reported position may be behind the WAL it holds: its WAL receiver has
/// not run since it started (no received position), and its replay still advanced since the
/// previous observation (or there was none), so WAL on its disk may remain to be replayed.
/// (Streaming starts where the local WAL ends, so a received position covers what is on disk.)
pub fn lsn_incomplete(
    seen: Option<Seen>,
    received: Option<u64>,
    replayed: Option<u64>,
    previous_replayed: Option<u64>,
) -> bool {
    seen == Some(Seen::Replica)
        && received.is_none()
        && (previous_replayed.is_none() || replayed != previous_replayed)
}

/// The committed primary's epoch, 0 before the first.
fn committed_epoch_of(cluster: &ClusterState) -> Epoch {
    cluster.primary.map_or(0, |p| p.epoch)
}

/// The epoch to record as this data directory's last as a primary when the tick sees Postgres
/// writable as the committed primary under a lease of that epoch, and memory says otherwise
/// (the call that promoted it failed after Postgres was asked to promote).
pub fn became_primary(
    pg: PgState,
    assigned: Option<crate::cluster_state::PrimaryAssignment>,
    me: NodeId,
    lease: Option<HeldLease>,
    remembered: Option<Epoch>,
) -> Option<Epoch> {
    let a = assigned.filter(|a| a.node == me)?;
    let leased = lease.is_some_and(|l| l.epoch == a.epoch);
    (pg == PgState::Primary && leased && remembered != Some(a.epoch)).then_some(a.epoch)
}

/// The `pg_hba.conf` addresses of the members' Postgres hosts: an address as a single-host
/// CIDR, a host name as it is (Postgres matches it by DNS), and always 127.0.0.1.
pub fn member_addresses<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = hosts
        .into_iter()
        // A registered host lands in pg_hba.conf: anything but an address or a host name
        // (a CIDR, a keyword, a line break) would admit more than that member.
        .filter(|h| crate::security::valid_host(h.trim()))
        .map(|h| match h.trim().parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => format!("{a}/32"),
            Ok(std::net::IpAddr::V6(a)) => format!("{a}/128"),
            Err(_) => h.trim().to_string(),
        })
        .chain(["127.0.0.1/32".to_string()])
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What an operator asks of a member's Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberAction {
    /// Re-read the configuration files.
    Reload,
    /// Stop and start (a primary under its lease); with `only_if_pending`, only when a setting
    /// waits for it.
    Restart {
        /// Only when a committed setting waits for a restart.
        only_if_pending: bool,
    },
    /// Re-clone a replica from the primary.
    Reinit,
}

/// A request from the API to the sidecar loop, answered once carried out.
pub struct MemberRequest {
    /// What to do.
    pub action: MemberAction,
    /// Where the outcome goes.
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
}

/// `synchronous_standby_names` for `set`: the members' names (their `application_name`). A
/// member without registered details, or a set smaller than `k` (strict and quorum modes with
/// too few standbys), is stood in for by a name no standby uses, so writes wait rather than
/// count an acknowledgement from outside the set.
pub fn sync_spec(cluster: &ClusterState, set: &SyncSet) -> SyncSpec {
    let mut names: Vec<String> = set
        .members
        .iter()
        .map(|id| {
            cluster
                .members
                .get(id)
                .map(|m| m.name.clone())
                .unwrap_or_else(|| format!("pgquorum-unregistered-{id}"))
        })
        .collect();
    let mut filler = 0;
    while set.k as usize > names.len() {
        filler += 1;
        names.push(format!("pgquorum-no-standby-{filler}"));
    }
    SyncSpec { k: set.k, names }
}

async fn load_memory(path: &Path, instance: &Instance) -> Result<Memory, MemoryError> {
    let why = match std::fs::read(path) {
        Ok(raw) => match serde_json::from_slice::<Memory>(&raw) {
            Ok(m) => return Ok(m),
            Err(e) => format!("corrupt: {e}"),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing".to_string(),
        Err(e) => e.to_string(),
    };
    let has_data = matches!(
        instance.data_dir().contents(),
        Ok(pg_supervisor::data_dir::DataDirContents::Cluster)
    );
    if !has_data {
        return Ok(Memory::default());
    }
    let control = instance.control_data().await.map_err(|e| MemoryError {
        path: path.display().to_string(),
        why: why.clone(),
        rebuild: e.to_string(),
    })?;
    let memory = Memory::rebuilt_from_cluster_state(&control.cluster_state);
    tracing::warn!(
        path = %path.display(),
        why = %why,
        cluster_state = %control.cluster_state,
        rebuilt = ?memory,
        "failover memory rebuilt from pg_controldata"
    );
    memory.persist(path).map_err(|e| MemoryError {
        path: path.display().to_string(),
        why,
        rebuild: format!("cannot write the rebuilt memory: {e}"),
    })?;
    Ok(memory)
}

/// Why a primary cannot write, in an operator's words.
fn cannot_write_text(c: &WriteCheck) -> String {
    match c {
        WriteCheck::Ok => "it can".into(),
        WriteCheck::NoSpace { detail } => format!("no space: {detail}"),
        WriteCheck::ReadOnly { detail } => format!("read-only storage: {detail}"),
        WriteCheck::Stuck { running_ms } => {
            format!("stuck I/O: the write probe has not finished after {running_ms} ms")
        }
        WriteCheck::Failed { detail } => format!("write probe failed: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follow_of_an_unreachable_upstream_waits_but_a_new_primary_is_followed_at_once() {
        let last = Some(Unreachable {
            upstream: 1,
            epoch: 3,
            until: 5_000,
        });
        assert!(follow_waits(last, 1, 3, 4_999));
        assert!(!follow_waits(last, 1, 3, 5_000), "the backoff ends");
        assert!(!follow_waits(last, 2, 3, 4_000), "another member");
        assert!(!follow_waits(last, 1, 4, 4_000), "a later epoch");
        assert!(!follow_waits(None, 1, 3, 0));
    }

    #[test]
    fn a_postgres_seen_writable_as_the_leased_primary_is_recorded_as_its_epochs() {
        let a = Some(crate::cluster_state::PrimaryAssignment { node: 2, epoch: 5 });
        let lease = Some(HeldLease {
            epoch: 5,
            expires_at: 9_000,
        });
        assert_eq!(became_primary(PgState::Primary, a, 2, lease, None), Some(5));
        assert_eq!(
            became_primary(PgState::Primary, a, 2, lease, Some(4)),
            Some(5)
        );
        assert_eq!(became_primary(PgState::Primary, a, 2, lease, Some(5)), None);
        assert_eq!(became_primary(PgState::Replica, a, 2, lease, None), None);
        assert_eq!(became_primary(PgState::Primary, a, 3, lease, None), None);
        let old = Some(HeldLease {
            epoch: 4,
            expires_at: 9_000,
        });
        assert_eq!(became_primary(PgState::Primary, a, 2, old, None), None);
    }

    #[test]
    fn a_replica_without_a_receive_position_is_incomplete_until_its_replay_settles() {
        let r = Some(Seen::Replica);
        assert!(
            lsn_incomplete(r, None, Some(100), None),
            "first look after a start"
        );
        assert!(
            lsn_incomplete(r, None, Some(200), Some(100)),
            "still replaying"
        );
        assert!(
            !lsn_incomplete(r, None, Some(200), Some(200)),
            "replay settled"
        );
        assert!(
            !lsn_incomplete(r, Some(300), Some(250), Some(100)),
            "streaming"
        );
        assert!(!lsn_incomplete(Some(Seen::Primary), None, None, None));
    }

    #[test]
    fn members_are_admitted_by_address_or_name() {
        assert_eq!(
            member_addresses(["10.0.0.2", "10.0.0.1", "db3.example", "::1", "10.0.0.1", ""]),
            [
                "10.0.0.1/32",
                "10.0.0.2/32",
                "127.0.0.1/32",
                "::1/128",
                "db3.example"
            ]
        );
    }

    #[test]
    fn a_report_may_wait_a_quarter_lease_and_never_less_than_a_tick() {
        let mut cfg = crate::dynamic_config::DynamicConfig {
            tick_ms: 250,
            lease_ms: 2_500,
            ..Default::default()
        };
        assert_eq!(report_timeout(&cfg), Duration::from_millis(625));
        cfg.lease_ms = 1_000;
        assert_eq!(report_timeout(&cfg), Duration::from_millis(250));
    }

    #[test]
    fn the_guard_gets_the_held_deadline_on_the_same_clock() {
        let held = HeldLease {
            epoch: 3,
            expires_at: 123_456,
        };
        assert_eq!(guard_deadline(Some(held)), Lease::Until(123_456_000_000));
        assert!(guard_deadline(None).is_expired());
        // The sidecar's clock is the guard's: a deadline a second out is a second out there.
        let soon = HeldLease {
            epoch: 1,
            expires_at: boot_clock_ms() + 1_000,
        };
        let left = guard_deadline(Some(soon)).remaining().unwrap_or_default();
        assert!(left > Duration::from_millis(900) && left <= Duration::from_millis(1_000));
    }

    #[test]
    fn memory_is_written_whole_and_rebuilt_safely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failover.json");
        let m = Memory {
            last_primary_epoch: Some(4),
            epoch_seen: 5,
        };
        m.persist(&path).unwrap();
        let back: Memory = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, m);
        assert!(!path.with_extension("tmp").exists());
        // A data directory that was not in recovery may hold writes nobody else has: it is
        // treated as a former primary, which rewinds before following.
        assert_eq!(
            Memory::rebuilt_from_cluster_state("in production").last_primary_epoch,
            Some(0)
        );
        assert_eq!(
            Memory::rebuilt_from_cluster_state("shut down").last_primary_epoch,
            Some(0)
        );
        assert_eq!(
            Memory::rebuilt_from_cluster_state("shut down in recovery").last_primary_epoch,
            None
        );
        assert_eq!(
            Memory::rebuilt_from_cluster_state("in archive recovery").last_primary_epoch,
            None
        );
    }

    #[test]
    fn sync_spec_stands_in_for_missing_standbys() {
        let mut cluster = ClusterState::default();
        cluster.members.insert(
            2,
            crate::cluster_state::MemberInfo {
                id: 2,
                name: "b".into(),
                ..Default::default()
            },
        );
        let set = SyncSet {
            members: [2, 3].into(),
            k: 3,
        };
        let spec = sync_spec(&cluster, &set);
        assert_eq!(spec.k, 3);
        assert_eq!(spec.names.len(), 3);
        assert!(spec.names.contains(&"b".to_string()));
        assert!(spec.names.iter().all(|n| n != "c"));
    }
}
