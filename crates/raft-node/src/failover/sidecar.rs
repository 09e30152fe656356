//! The member's side of failover, at the I/O edge: every tick it observes its Postgres, reports
//! to the Raft leader (whose reply renews the primary's lease and feeds the guard), and runs the
//! reconcile table's action against Postgres through `pg-supervisor`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_supervisor::{Instance, Lease, PostmasterState, Role, Upstream};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::leader::{FailoverLeader, Grant};
use super::lease::{HeldLease, Millis};
use super::reconcile::{plan, Action, LocalView};
use super::report::{MemberReport, PgState};
use crate::events::EventLog;
use crate::network::lazy_channel;
use crate::proto::cluster_client::ClusterClient;
use crate::proto::ReportRequest;
use crate::store::state_machine::AppliedState;
use crate::types::{NodeId, Raft};

/// What the sidecar must remember across restarts about its data directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Memory {
    last_primary_epoch: Option<u64>,
    epoch_seen: u64,
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
    base: Instant,
    lease: Option<HeldLease>,
    /// Grants for reports sent before this instant (ms) are ignored: set while fenced.
    fence_cutoff: Option<Millis>,
    fenced: bool,
    saw_running: bool,
    failures: u32,
    events: EventLog,
}

impl Sidecar {
    /// A loop driving `instance`; its memory lives in `memory_path`.
    pub fn new(
        node_id: NodeId,
        raft: Raft,
        state: watch::Receiver<Arc<AppliedState>>,
        leader: Arc<FailoverLeader>,
        instance: Instance,
        memory_path: PathBuf,
        events: EventLog,
    ) -> Self {
        let memory = std::fs::read(&memory_path)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default();
        Self {
            node_id,
            raft,
            state,
            leader,
            instance,
            memory_path,
            memory,
            base: Instant::now(),
            lease: None,
            fence_cutoff: None,
            fenced: false,
            saw_running: false,
            failures: 0,
            events,
        }
    }

    fn now(&self) -> Millis {
        self.base.elapsed().as_millis() as Millis
    }

    fn remember(&mut self, memory: Memory) {
        if memory == self.memory {
            return;
        }
        self.memory = memory;
        match serde_json::to_vec(&memory) {
            Ok(raw) => {
                let tmp = self.memory_path.with_extension("tmp");
                let written = std::fs::write(&tmp, raw)
                    .and_then(|_| std::fs::rename(&tmp, &self.memory_path));
                if let Err(e) = written {
                    tracing::warn!(error = %e, "cannot persist failover memory");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode failover memory"),
        }
    }

    /// Runs until `stop`; on exit the instance is dropped, which fences its Postgres.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let tick = Duration::from_millis(self.state.borrow().cluster.config.tick_ms);
            let started = Instant::now();
            let acted = self.tick().await;
            // After a change, look and report again at once so the leader's view catches up.
            let rest = if acted {
                Duration::ZERO
            } else {
                tick.saturating_sub(started.elapsed())
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(rest) => {}
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

    async fn observe(&mut self) -> (PgState, u32, u64, bool, Option<String>) {
        let has_data = matches!(
            self.instance.data_dir().contents(),
            Ok(pg_supervisor::data_dir::DataDirContents::Cluster)
        );
        if !has_data {
            return (PgState::NoData, 0, 0, false, None);
        }
        // The lease renewal waits for this probe, so a hanging Postgres must not make the
        // sidecar miss renewals: past a quarter lease the probe counts as a failure.
        let lease_ms = self.state.borrow().cluster.config.lease_ms;
        let cap = Duration::from_millis(lease_ms / 4);
        let Ok(obs) = tokio::time::timeout(cap, self.instance.observe()).await else {
            return (PgState::Unresponsive, 0, 0, false, None);
        };
        let running = matches!(obs.postmaster, PostmasterState::Running { .. });
        let lsn = [obs.current_lsn, obs.received_lsn, obs.replayed_lsn]
            .into_iter()
            .flatten()
            .map(|l| l.0)
            .max()
            .unwrap_or(0);
        let timeline = obs.timeline.unwrap_or(0);
        let streaming = obs
            .wal_receiver
            .as_ref()
            .is_some_and(|w| w.status == "streaming");
        let upstream = obs
            .wal_receiver
            .as_ref()
            .and_then(|w| Some(format!("{}:{}", w.sender_host.as_ref()?, w.sender_port?)));
        let pg = match (running, obs.accepts_connections, obs.role) {
            (false, _, _) if self.fenced => PgState::Fenced,
            (false, _, _) => PgState::Stopped,
            (true, true, Some(Role::Primary)) => PgState::Primary,
            (true, true, Some(Role::Replica)) => PgState::Replica,
            (true, _, _) => PgState::Unresponsive,
        };
        (pg, timeline, lsn, streaming, upstream)
    }

    fn leader_addr(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    async fn send_report(&self, report: &MemberReport, timeout: Duration) -> Option<Grant> {
        let (leader, addr) = self.leader_addr()?;
        if leader == self.node_id {
            return self.leader.on_report(report.clone()).flatten();
        }
        let payload = serde_json::to_vec(report).ok()?;
        let mut client = ClusterClient::new(lazy_channel(&addr).ok()?);
        let reply = tokio::time::timeout(timeout, client.report(ReportRequest { report: payload }))
            .await
            .ok()?
            .ok()?
            .into_inner();
        reply.granted.then_some(Grant {
            epoch: reply.epoch,
            lease_ms: reply.lease_ms,
        })
    }

    fn upstream_of(&self, node: NodeId) -> Option<Upstream> {
        let state = self.state.borrow();
        let m = state.cluster.members.get(&node)?;
        Some(Upstream {
            host: m.pg_host.clone(),
            port: m.pg_port,
        })
    }

    fn guard_lease(&self) -> Lease {
        match self.lease {
            Some(l) => {
                let remaining = l.expires_at.saturating_sub(self.now());
                Lease::expires_in(Duration::from_millis(remaining))
            }
            None => Lease::expires_in(Duration::ZERO),
        }
    }

    /// One round; returns whether an action ran.
    async fn tick(&mut self) -> bool {
        let state = self.state.borrow().clone();
        let cfg = state.cluster.config.clone();
        let (mut pg, timeline, lsn, streaming, upstream_addr) = self.observe().await;
        let now = self.now();
        if matches!(pg, PgState::Primary | PgState::Replica) {
            self.saw_running = true;
            self.fenced = false;
        }
        // The guard fenced a primary whose lease ran out: that is a fence, not a crash.
        if pg == PgState::Stopped
            && self.memory.last_primary_epoch.is_some()
            && self.saw_running
            && !self.lease.is_some_and(|l| l.valid_at(now))
        {
            self.fenced = true;
            pg = PgState::Fenced;
        }
        let crashed = pg == PgState::Stopped && self.saw_running;
        // A primary fenced after a crash keeps counting, so the leader can say why.
        let fenced_after_failures = pg == PgState::Fenced && self.failures > 0;
        self.failures = if crashed || pg == PgState::Unresponsive || fenced_after_failures {
            self.failures + 1
        } else {
            0
        };
        let holds_lease = self.lease.is_some_and(|l| l.valid_at(now));
        if pg == PgState::Fenced && holds_lease {
            pg = PgState::Stopped;
        }
        if pg == PgState::Fenced {
            self.fence_cutoff = Some(now);
        }
        let report = MemberReport {
            node: self.node_id,
            pg,
            consecutive_failures: self.failures,
            timeline,
            lsn,
            streaming,
            epoch_seen: self.memory.epoch_seen,
            sent_at: now,
        };
        let grant = self
            .send_report(&report, Duration::from_millis(cfg.tick_ms))
            .await;
        if let Some(g) = grant {
            if self.fence_cutoff.is_none_or(|c| now >= c) {
                let new = HeldLease::from_grant(g.epoch, now, g.lease_ms);
                self.lease = Some(self.lease.map_or(new, |old| old.extend(new)));
                if pg == PgState::Primary {
                    let lease = self.guard_lease();
                    if let Err(e) = self.instance.feed_lease(lease).await {
                        tracing::warn!(error = %e, "cannot renew the guard's lease");
                    }
                }
            }
        }
        let upstream = upstream_addr.and_then(|addr| {
            state
                .cluster
                .members
                .values()
                .find(|m| format!("{}:{}", m.pg_host, m.pg_port) == addr)
                .map(|m| m.id)
        });
        let view = LocalView {
            pg,
            upstream,
            last_primary_epoch: self.memory.last_primary_epoch,
            crashed,
            failures: self.failures,
            epoch_seen: self.memory.epoch_seen,
        };
        let assigned = state.cluster.primary;
        let step = plan(self.node_id, &view, assigned, self.lease, self.now(), &cfg);
        let epoch = assigned.map(|a| a.epoch).unwrap_or(0);
        if step.action != Action::Nothing {
            tracing::info!(action = ?step.action, epoch, lsn, "{}", step.reason);
        }
        let mut memory = self.memory;
        memory.epoch_seen = memory.epoch_seen.max(epoch);
        let result = self.execute(step.action, epoch, &mut memory).await;
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
                lsn,
            );
        }
        self.remember(memory);
        step.action != Action::Nothing && result.is_ok()
    }

    async fn execute(
        &mut self,
        action: Action,
        epoch: u64,
        memory: &mut Memory,
    ) -> Result<(), String> {
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
                memory.last_primary_epoch = Some(epoch);
            }
            Action::Clone { from } => {
                let u = up(self, from)?;
                self.instance
                    .clone_from(&u)
                    .await
                    .map_err(|e| e.to_string())?;
                self.instance.follow(&u).await.map_err(|e| e.to_string())?;
                memory.last_primary_epoch = None;
            }
            Action::StartPrimary => {
                self.instance
                    .start(self.guard_lease())
                    .await
                    .map_err(|e| e.to_string())?;
                self.fenced = false;
                memory.last_primary_epoch = Some(epoch);
            }
            Action::StartReplica { upstream } => {
                match upstream {
                    Some(n) => {
                        let u = up(self, n)?;
                        self.instance.follow(&u).await.map_err(|e| e.to_string())?;
                    }
                    None => self
                        .instance
                        .start(Lease::NotRequired)
                        .await
                        .map_err(|e| e.to_string())?,
                }
                self.fenced = false;
            }
            Action::Promote { epoch } => {
                let lease = self.guard_lease();
                self.instance
                    .feed_lease(lease)
                    .await
                    .map_err(|e| e.to_string())?;
                let r = self.instance.promote().await.map_err(|e| e.to_string())?;
                tracing::info!(
                    epoch,
                    timeline = r.timeline,
                    elapsed_ms = r.elapsed_ms,
                    "promoted"
                );
                memory.last_primary_epoch = Some(epoch);
            }
            Action::Follow { upstream } => {
                let u = up(self, upstream)?;
                self.instance.follow(&u).await.map_err(|e| e.to_string())?;
            }
            Action::Rejoin { upstream } => {
                let u = up(self, upstream)?;
                let r = self
                    .instance
                    .rejoin_as_replica(&u)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(method = ?r.method, elapsed_ms = r.elapsed_ms, epoch, "rejoined as a replica");
                memory.last_primary_epoch = None;
                self.fenced = false;
            }
            Action::Fence => {
                let r = self.instance.fence().await.map_err(|e| e.to_string())?;
                tracing::info!(elapsed_ms = r.elapsed_ms, epoch, "fenced Postgres");
                self.fenced = true;
                self.lease = None;
                self.fence_cutoff = Some(self.now());
            }
        }
        Ok(())
    }
}
