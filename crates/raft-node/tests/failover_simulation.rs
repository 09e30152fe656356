//! Seeded simulation of the failover protocol with a fake clock: N members run the real policy
//! (`failover::policy`), the real lease arithmetic (`failover::lease`), the real reconcile table
//! (`failover::reconcile`) and the real state machine (`ClusterState::apply`) through host
//! crashes, sidecar kills and freezes, Postgres crashes, partitions, message delay and loss and
//! clock-rate drift within the configured bound. Raft itself is modelled: a leader needs a
//! majority that has not moved to a higher term, an elected leader's followers refuse votes
//! within the Raft leader lease, and a cut-off leader keeps believing it leads (openraft 0.9).
//!
//! Checked after every step: at most one member can write (S1), promotions only follow a commit
//! naming the member in an epoch at least as high as it has seen (S5); and after the faults heal,
//! a healthy majority has a writable primary again within a bound (liveness).
//!
//! `PGQUORUM_SIM_SEEDS=N` sets how many seeds run (default 2000) from `PGQUORUM_SIM_SEED_BASE`
//! (default 0); `PGQUORUM_SIM_SEED=S` replays one.

use std::collections::{BTreeMap, BTreeSet};

use raft_node::cluster_state::{ClusterState, Command, CommandOutcome};
use raft_node::dynamic_config::DynamicConfig;
use raft_node::failover::lease::{max_clock_rate_error, HeldLease, Millis};
use raft_node::failover::policy::{decide, may_grant_lease, GrantRecord, PolicyInput, Verdict};
use raft_node::failover::reconcile::{plan, Action, LocalView};
use raft_node::failover::report::{MemberReport, PgState, Received, ReportBook};
use raft_node::types::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Real milliseconds per simulation step.
const STEP: u64 = 5;
/// Raft timings of the product defaults.
const RAFT_LEADER_LEASE: u64 = 800;
const ELECTION_MIN: u64 = 500;
const ELECTION_MAX: u64 = 800;
const HEARTBEAT: u64 = 150;
/// A leader grants leases only while its quorum contact is at most this old (as the sidecar).
const QUORUM_ACK_MAX: u64 = 3 * HEARTBEAT;
/// Faults happen during this much simulated time, then everything heals.
const FAULT_PHASE_MS: u64 = 30_000;
/// After healing, a writable primary must exist within this bound.
const LIVENESS_BOUND_MS: u64 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sidecar {
    Running,
    Frozen { until: u64 },
    Dead { until: u64 },
}

struct Node {
    id: NodeId,
    rate: f64,
    offset: f64,
    host_up: bool,
    host_back_at: u64,
    sidecar: Sidecar,
    pg: PgState,
    crashed: bool,
    failures: u32,
    upstream: Option<NodeId>,
    lsn: u64,
    timeline: u32,
    last_primary_epoch: Option<u64>,
    epoch_seen: u64,
    lease: Option<HeldLease>,
    fenced_at: Option<Millis>,
    guard_deadline: Option<Millis>,
    applied: ClusterState,
    log_index: u64,
    term: u64,
    last_heard: u64,
    election_timeout: u64,
    next_tick: Millis,
}

impl Node {
    fn local(&self, t: u64) -> Millis {
        (self.offset + t as f64 * self.rate) as Millis
    }
    fn alive(&self) -> bool {
        self.host_up && self.sidecar == Sidecar::Running
    }
    fn writable(&self) -> bool {
        self.host_up && self.pg == PgState::Primary
    }
}

struct Leader {
    term: u64,
    since: Millis,
    reports: ReportBook,
    last_grant: Option<GrantRecord>,
    last_quorum_ack: u64,
    next_policy: Millis,
}

enum Body {
    Report {
        report: MemberReport,
        sent: Millis,
        term: u64,
    },
    Grant {
        epoch: u64,
        sent: Millis,
        lease_ms: u64,
    },
}

struct Msg {
    at: u64,
    from: NodeId,
    to: NodeId,
    body: Body,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    t: u64,
    nodes: Vec<Node>,
    members: BTreeSet<NodeId>,
    committed: ClusterState,
    committed_index: u64,
    top_term: u64,
    leaders: BTreeMap<NodeId, Leader>,
    group: Vec<u8>,
    partition_until: u64,
    loss: f64,
    max_delay: u64,
    msgs: Vec<Msg>,
    promotions: Vec<(NodeId, u64)>,
    events: Vec<String>,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let cfg = DynamicConfig::default();
        // Stay inside the rate error the drift margin covers.
        let rho = max_clock_rate_error(&cfg) * 0.95;
        let nodes = (1..=n as u64)
            .map(|id| Node {
                id,
                rate: 1.0 + rng.gen_range(-rho..rho),
                offset: rng.gen_range(0.0..1e6),
                host_up: true,
                host_back_at: 0,
                sidecar: Sidecar::Running,
                pg: PgState::NoData,
                crashed: false,
                failures: 0,
                upstream: None,
                lsn: 0,
                timeline: 0,
                last_primary_epoch: None,
                epoch_seen: 0,
                lease: None,
                fenced_at: None,
                guard_deadline: None,
                applied: ClusterState::default(),
                log_index: 0,
                term: 0,
                last_heard: 0,
                election_timeout: rng.gen_range(ELECTION_MIN..=ELECTION_MAX),
                next_tick: 0,
            })
            .collect();
        Sim {
            seed,
            rng,
            t: 0,
            nodes,
            members: (1..=n as u64).collect(),
            committed: ClusterState::default(),
            committed_index: 0,
            top_term: 0,
            leaders: BTreeMap::new(),
            group: vec![0; n],
            partition_until: 0,
            loss: 0.0,
            max_delay: 20,
            msgs: Vec::new(),
            promotions: Vec::new(),
            events: Vec::new(),
        }
    }

    fn idx(id: NodeId) -> usize {
        (id - 1) as usize
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[Self::idx(id)]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[Self::idx(id)]
    }

    fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }

    fn can_talk(&self, a: NodeId, b: NodeId) -> bool {
        let (x, y) = (self.node(a), self.node(b));
        x.alive() && y.alive() && self.group[Self::idx(a)] == self.group[Self::idx(b)]
    }

    fn hosts_connected(&self, a: NodeId, b: NodeId) -> bool {
        self.node(a).host_up
            && self.node(b).host_up
            && self.group[Self::idx(a)] == self.group[Self::idx(b)]
    }

    fn log(&mut self, s: String) {
        self.events.push(format!("[t={} ms] {s}", self.t));
    }

    fn fail(&self, what: &str) -> ! {
        let tail: Vec<&String> = self.events.iter().rev().take(40).collect();
        let tail: Vec<&String> = tail.into_iter().rev().collect();
        panic!(
            "seed {} (replay with PGQUORUM_SIM_SEED={}): {what} at t={} ms\nrecent events:\n{}",
            self.seed,
            self.seed,
            self.t,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    fn send(&mut self, from: NodeId, to: NodeId, body: Body) {
        if self.rng.gen_bool(self.loss) {
            return;
        }
        let delay = self.rng.gen_range(1..=self.max_delay);
        self.msgs.push(Msg {
            at: self.t + delay,
            from,
            to,
            body,
        });
    }

    /// Raft: leaders with a quorum replicate the committed state and their term; cut-off ones
    /// keep believing; elections follow openraft 0.9's timing.
    fn raft_step(&mut self) {
        let ids: Vec<NodeId> = self.leaders.keys().copied().collect();
        for l in ids {
            if !self.node(l).alive() {
                // A crashed or frozen leader stops acting; a frozen one resumes believing.
                if !self.node(l).host_up || matches!(self.node(l).sidecar, Sidecar::Dead { .. }) {
                    self.leaders.remove(&l);
                }
                continue;
            }
            let term = self.leaders[&l].term;
            let higher = self
                .members
                .iter()
                .any(|&j| j != l && self.can_talk(l, j) && self.node(j).term > term);
            if higher {
                self.leaders.remove(&l);
                self.log(format!("{l} steps down (saw a higher term)"));
                continue;
            }
            let acks: Vec<NodeId> = self
                .members
                .iter()
                .copied()
                .filter(|&j| j == l || (self.can_talk(l, j) && self.node(j).term <= term))
                .collect();
            if acks.len() >= self.majority() {
                let t = self.t;
                if let Some(ld) = self.leaders.get_mut(&l) {
                    ld.last_quorum_ack = t;
                }
                if term == self.top_term {
                    let index = self.committed_index;
                    for j in acks {
                        if self.node(j).log_index != index {
                            let committed = self.committed.clone();
                            self.node_mut(j).applied = committed;
                        }
                        let n = self.node_mut(j);
                        n.term = term;
                        n.last_heard = t;
                        n.log_index = index;
                    }
                }
            }
        }
        let has_quorum_leader = self
            .leaders
            .values()
            .any(|ld| ld.term == self.top_term && self.t - ld.last_quorum_ack <= HEARTBEAT);
        if has_quorum_leader {
            return;
        }
        for c in self.members.clone() {
            let n = self.node(c);
            if !n.alive() || self.leaders.contains_key(&c) {
                continue;
            }
            // A follower that knew a committed leader waits the leader lease plus its timeout.
            if self.t.saturating_sub(n.last_heard) < RAFT_LEADER_LEASE + n.election_timeout {
                continue;
            }
            let cand_index = n.log_index;
            let voters: Vec<NodeId> = self
                .members
                .iter()
                .copied()
                .filter(|&j| {
                    j == c
                        || (self.can_talk(c, j)
                            && self.t.saturating_sub(self.node(j).last_heard) >= RAFT_LEADER_LEASE
                            && self.node(j).log_index <= cand_index)
                })
                .collect();
            let t = self.t;
            self.node_mut(c).last_heard = t;
            if voters.len() >= self.majority() {
                self.top_term += 1;
                let term = self.top_term;
                for j in &voters {
                    let n = self.node_mut(*j);
                    n.term = term;
                    n.last_heard = t;
                }
                let since = self.node(c).local(t);
                self.leaders.insert(
                    c,
                    Leader {
                        term,
                        since,
                        reports: ReportBook::new(),
                        last_grant: None,
                        last_quorum_ack: t,
                        next_policy: since,
                    },
                );
                self.log(format!("{c} elected leader of term {term}"));
                return;
            }
        }
    }

    fn current_leader_of(&self, id: NodeId) -> Option<NodeId> {
        let term = self.node(id).term;
        self.leaders
            .iter()
            .find(|(_, ld)| ld.term == term)
            .map(|(l, _)| *l)
    }

    /// The leader's policy: decide and, with a quorum, commit.
    fn policy_step(&mut self) {
        let ids: Vec<NodeId> = self.leaders.keys().copied().collect();
        for l in ids {
            if !self.node(l).alive() {
                continue;
            }
            let now = self.node(l).local(self.t);
            let ld = &self.leaders[&l];
            if now < ld.next_policy || ld.term != self.top_term {
                continue;
            }
            let has_quorum = self.t - ld.last_quorum_ack <= HEARTBEAT;
            let verdict = {
                let input = PolicyInput {
                    now,
                    leader_since: ld.since,
                    quorum_ack_max_ms: QUORUM_ACK_MAX,
                    raft_leader_lease_ms: RAFT_LEADER_LEASE,
                    cluster: &self.committed,
                    members: &self.members,
                    reports: &ld.reports,
                    last_grant: ld.last_grant,
                };
                decide(&input)
            };
            let tick = self.committed.config.tick_ms;
            if let Some(ld) = self.leaders.get_mut(&l) {
                ld.next_policy = now + tick;
            }
            if let Verdict::Promote {
                node,
                epoch,
                reason,
                lsn,
            } = verdict
            {
                if !has_quorum {
                    continue;
                }
                let cmd = Command::Promote {
                    node,
                    epoch,
                    reason: reason.clone(),
                    at_unix_ms: self.t,
                    lsn: Some(lsn),
                };
                let members = self.members.clone();
                if self.committed.apply(&cmd, &members) == CommandOutcome::Applied {
                    self.committed_index += 1;
                    let index = self.committed_index;
                    let committed = self.committed.clone();
                    let n = self.node_mut(l);
                    n.applied = committed;
                    n.log_index = index;
                    self.log(format!(
                        "leader {l} commits Promote {{ {node}, epoch {epoch} }}: {reason}"
                    ));
                }
            }
        }
    }

    fn deliver(&mut self) {
        let t = self.t;
        let (due, rest): (Vec<Msg>, Vec<Msg>) = std::mem::take(&mut self.msgs)
            .into_iter()
            .partition(|m| m.at <= t);
        self.msgs = rest;
        for m in due {
            if !self.can_talk(m.from, m.to) {
                continue;
            }
            match m.body {
                Body::Report { report, sent, term } => {
                    let l = m.to;
                    let Some(ld) = self.leaders.get(&l) else {
                        continue;
                    };
                    if ld.term != term {
                        continue;
                    }
                    let now = self.node(l).local(t);
                    let ack_age = now.saturating_sub(self.node(l).local(ld.last_quorum_ack));
                    let ld = self.leaders.get_mut(&l).expect("leader present");
                    let cluster = &self.nodes[Self::idx(l)].applied;
                    ld.reports.insert(
                        report.node,
                        Received {
                            at: now,
                            report: report.clone(),
                        },
                    );
                    let grant = {
                        let input = PolicyInput {
                            now,
                            leader_since: ld.since,
                            quorum_ack_max_ms: QUORUM_ACK_MAX,
                            raft_leader_lease_ms: RAFT_LEADER_LEASE,
                            cluster,
                            members: &self.members,
                            reports: &ld.reports,
                            last_grant: ld.last_grant,
                        };
                        may_grant_lease(&input, &report, Some(ack_age))
                    };
                    if let Some(epoch) = grant {
                        if report.pg != PgState::Primary {
                            self.events.push(format!(
                                "[t={t} ms] leader {l} grants {} a lease for its {:?} report sent at {}",
                                report.node, report.pg, report.sent_at
                            ));
                        }
                        ld.last_grant = Some(GrantRecord {
                            node: report.node,
                            epoch,
                            received_at: now,
                            report_sent_at: report.sent_at,
                        });
                        let lease_ms = cluster.config.lease_ms;
                        self.send(
                            l,
                            report.node,
                            Body::Grant {
                                epoch,
                                sent,
                                lease_ms,
                            },
                        );
                    }
                }
                Body::Grant {
                    epoch,
                    sent,
                    lease_ms,
                } => {
                    let n = self.node_mut(m.to);
                    if n.fenced_at.is_some_and(|f| sent < f) {
                        continue;
                    }
                    let (id, pg, fenced_at) = (n.id, n.pg, n.fenced_at);
                    if pg != PgState::Primary {
                        self.log(format!("{id} ({pg:?}, cutoff {fenced_at:?}) accepts a grant for its report sent at {sent}"));
                    }
                    let n = self.node_mut(m.to);
                    let new = HeldLease::from_grant(epoch, sent, lease_ms);
                    n.lease = Some(n.lease.map_or(new, |old| old.extend(new)));
                    if n.pg == PgState::Primary && n.lease.is_some_and(|l| l.epoch == epoch) {
                        n.guard_deadline = n.lease.map(|l| l.expires_at);
                    }
                }
            }
        }
    }

    /// The guard runs beside Postgres whatever the sidecar does.
    fn guard_step(&mut self) {
        let t = self.t;
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            if !n.host_up {
                continue;
            }
            let sidecar_dead = matches!(n.sidecar, Sidecar::Dead { .. });
            if n.pg == PgState::Primary {
                let expired = n.guard_deadline.is_none_or(|d| n.local(t) >= d);
                if expired || sidecar_dead {
                    n.pg = PgState::Fenced;
                    let id = n.id;
                    self.log(format!("guard of {id} fences its primary"));
                }
            } else if n.pg == PgState::Replica && sidecar_dead {
                n.pg = PgState::Stopped;
            }
        }
    }

    fn sidecar_step(&mut self) {
        let t = self.t;
        for id in self.members.clone() {
            let n = self.node(id);
            if !n.alive() || n.local(t) < n.next_tick {
                continue;
            }
            let now = n.local(t);
            let tick = n.applied.config.tick_ms;
            // Observe.
            let healthy = matches!(n.pg, PgState::Primary | PgState::Replica);
            let failures = if healthy {
                0
            } else if n.crashed {
                n.failures + 1
            } else {
                0
            };
            let streaming = n.pg == PgState::Replica
                && n.upstream.is_some_and(|u| {
                    self.hosts_connected(id, u) && self.node(u).pg == PgState::Primary
                });
            // "Fenced" promises the leader that nothing here can write: Postgres is down and
            // no lease is held. Down while holding a lease is merely stopped.
            let holds_lease = n.lease.is_some_and(|l| l.valid_at(now));
            let reported_pg = if n.pg == PgState::Fenced && holds_lease {
                PgState::Stopped
            } else {
                n.pg
            };
            let report = MemberReport {
                node: id,
                pg: reported_pg,
                consecutive_failures: failures,
                timeline: n.timeline,
                lsn: n.lsn,
                streaming,
                epoch_seen: n.epoch_seen,
                sent_at: now,
            };
            let term = n.term;
            if reported_pg == PgState::Fenced {
                // No grant for an earlier report may restart a fenced primary any more.
                self.node_mut(id).fenced_at = Some(now);
            }
            if let Some(l) = self.current_leader_of(id) {
                if l == id {
                    // The leader reports to itself without the network.
                    self.msgs.push(Msg {
                        at: t,
                        from: id,
                        to: id,
                        body: Body::Report {
                            report,
                            sent: now,
                            term,
                        },
                    });
                } else {
                    self.send(
                        id,
                        l,
                        Body::Report {
                            report,
                            sent: now,
                            term,
                        },
                    );
                }
            }
            // Reconcile.
            let n = self.node(id);
            let view = LocalView {
                pg: n.pg,
                upstream: n.upstream,
                last_primary_epoch: n.last_primary_epoch,
                crashed: n.crashed,
                failures,
                epoch_seen: n.epoch_seen,
            };
            let assigned = n.applied.primary;
            let step = plan(id, &view, assigned, n.lease, now, &n.applied.config);
            let upstream_lsn = |s: &Sim, u: NodeId| s.node(u).lsn;
            match step.action {
                Action::Nothing => {}
                Action::InitPrimary => {
                    let epoch = assigned.map(|a| a.epoch).unwrap_or(0);
                    self.check_lease(id, now, epoch, "initdb as primary");
                    let n = self.node_mut(id);
                    n.pg = PgState::Primary;
                    n.timeline = 1;
                    n.last_primary_epoch = Some(epoch);
                    n.guard_deadline = n.lease.map(|l| l.expires_at);
                    self.log(format!(
                        "{id} initialises the first primary (epoch {epoch})"
                    ));
                }
                Action::Clone { from } => {
                    if self.hosts_connected(id, from) && self.node(from).pg == PgState::Primary {
                        let lsn = upstream_lsn(self, from);
                        let tl = self.node(from).timeline;
                        let n = self.node_mut(id);
                        n.pg = PgState::Replica;
                        n.upstream = Some(from);
                        n.lsn = lsn;
                        n.timeline = tl;
                    }
                }
                Action::StartPrimary => {
                    let epoch = assigned.map(|a| a.epoch).unwrap_or(0);
                    self.check_lease(id, now, epoch, "start as primary");
                    let n = self.node_mut(id);
                    n.pg = PgState::Primary;
                    n.crashed = false;
                    n.guard_deadline = n.lease.map(|l| l.expires_at);
                    self.log(format!("{id} starts as primary (epoch {epoch})"));
                }
                Action::StartReplica { upstream } => {
                    let n = self.node_mut(id);
                    n.pg = PgState::Replica;
                    n.crashed = false;
                    n.upstream = upstream;
                }
                Action::Promote { epoch } => {
                    // S5: only a committed assignment naming this member, in an epoch at least
                    // as high as any it has seen.
                    if !self.promotions.contains(&(id, epoch)) && !self.committed_names(id, epoch) {
                        self.fail(&format!(
                            "S5: {id} promotes in epoch {epoch} without a commit"
                        ));
                    }
                    if epoch < self.node(id).epoch_seen {
                        self.fail(&format!("S5: {id} promotes in stale epoch {epoch}"));
                    }
                    self.check_lease(id, now, epoch, "promote");
                    self.promotions.push((id, epoch));
                    let n = self.node_mut(id);
                    n.pg = PgState::Primary;
                    n.timeline += 1;
                    n.last_primary_epoch = Some(epoch);
                    n.guard_deadline = n.lease.map(|l| l.expires_at);
                    self.log(format!("{id} promotes (epoch {epoch}): {}", step.reason));
                }
                Action::Follow { upstream } => {
                    self.node_mut(id).upstream = Some(upstream);
                }
                Action::Rejoin { upstream } => {
                    if self.hosts_connected(id, upstream)
                        && self.node(upstream).pg == PgState::Primary
                    {
                        let lsn = upstream_lsn(self, upstream);
                        let tl = self.node(upstream).timeline;
                        let n = self.node_mut(id);
                        n.pg = PgState::Replica;
                        n.upstream = Some(upstream);
                        n.last_primary_epoch = None;
                        n.crashed = false;
                        n.lsn = lsn;
                        n.timeline = tl;
                        self.log(format!("{id} rejoins as a replica of {upstream}"));
                    }
                }
                Action::Fence => {
                    let n = self.node_mut(id);
                    n.pg = PgState::Fenced;
                    n.guard_deadline = None;
                    n.lease = None;
                    n.fenced_at = Some(now);
                    self.log(format!("{id} fences: {}", step.reason));
                }
            }
            let n = self.node_mut(id);
            n.failures = failures;
            if let Some(a) = assigned {
                n.epoch_seen = n.epoch_seen.max(a.epoch);
            }
            n.next_tick = now + tick;
        }
    }

    fn committed_names(&self, id: NodeId, epoch: u64) -> bool {
        self.committed
            .history
            .iter()
            .any(|h| h.to == id && h.epoch == epoch)
    }

    fn check_lease(&self, id: NodeId, now: Millis, epoch: u64, what: &str) {
        let ok = self
            .node(id)
            .lease
            .is_some_and(|l| l.epoch == epoch && l.valid_at(now));
        if !ok {
            self.fail(&format!(
                "{id} tries to {what} without a valid lease for epoch {epoch}"
            ));
        }
    }

    /// Writes advance the writable primary's WAL; connected replicas stream it.
    fn wal_step(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].writable() {
                self.nodes[i].lsn += 100;
            }
        }
        for id in self.members.clone() {
            let n = self.node(id);
            if n.pg != PgState::Replica {
                continue;
            }
            if let Some(u) = n.upstream {
                if self.hosts_connected(id, u) && self.node(u).pg == PgState::Primary {
                    let lsn = self.node(u).lsn;
                    let tl = self.node(u).timeline;
                    let n = self.node_mut(id);
                    n.lsn = n.lsn.max(lsn);
                    n.timeline = tl;
                }
            }
        }
    }

    fn check_s1(&self) {
        let writers: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.writable())
            .map(|n| n.id)
            .collect();
        if writers.len() > 1 {
            self.fail(&format!("S1: two writable primaries {writers:?}"));
        }
    }

    fn faults(&mut self) {
        let t = self.t;
        // Recoveries.
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            if !self.nodes[i].host_up && t >= self.nodes[i].host_back_at {
                let n = &mut self.nodes[i];
                n.host_up = true;
                n.sidecar = Sidecar::Running;
                n.lease = None;
                n.guard_deadline = None;
                n.crashed = false;
                n.failures = 0;
                n.last_heard = t;
                self.log(format!("host {id} is back"));
            }
            match self.nodes[i].sidecar {
                Sidecar::Frozen { until } if t >= until => {
                    self.nodes[i].sidecar = Sidecar::Running;
                    self.log(format!("sidecar {id} thawed"));
                }
                Sidecar::Dead { until } if t >= until && self.nodes[i].host_up => {
                    let n = &mut self.nodes[i];
                    n.sidecar = Sidecar::Running;
                    n.lease = None;
                    n.crashed = false;
                    n.failures = 0;
                    n.last_heard = t;
                    self.log(format!("sidecar {id} restarted"));
                }
                _ => {}
            }
        }
        if self.partition_until != 0 && t >= self.partition_until {
            self.group.iter_mut().for_each(|g| *g = 0);
            self.partition_until = 0;
            self.log("partition healed".into());
        }
        if t >= FAULT_PHASE_MS {
            return;
        }
        // New faults, a few per simulated minute each.
        let p = STEP as f64 / 20_000.0;
        let n = self.nodes.len();
        let victim = self.rng.gen_range(0..n);
        let id = self.nodes[victim].id;
        if self.rng.gen_bool(p) && self.nodes[victim].host_up {
            let back = t + self.rng.gen_range(500..8_000);
            let v = &mut self.nodes[victim];
            v.host_up = false;
            v.host_back_at = back;
            if matches!(v.pg, PgState::Primary | PgState::Replica | PgState::Fenced) {
                v.pg = PgState::Stopped;
            }
            v.sidecar = Sidecar::Dead { until: back };
            self.leaders.remove(&id);
            self.log(format!("host {id} crashes until {back}"));
        } else if self.rng.gen_bool(p) && self.nodes[victim].alive() {
            let until = t + self.rng.gen_range(300..8_000);
            if self.rng.gen_bool(0.5) {
                self.nodes[victim].sidecar = Sidecar::Frozen { until };
                self.log(format!("sidecar {id} frozen until {until}"));
            } else {
                self.nodes[victim].sidecar = Sidecar::Dead { until };
                self.leaders.remove(&id);
                self.log(format!("sidecar {id} killed until {until}"));
            }
        } else if self.rng.gen_bool(p)
            && self.nodes[victim].host_up
            && matches!(self.nodes[victim].pg, PgState::Primary | PgState::Replica)
        {
            self.nodes[victim].pg = PgState::Stopped;
            self.nodes[victim].crashed = true;
            self.log(format!("postmaster of {id} crashes"));
        } else if self.rng.gen_bool(p) && self.partition_until == 0 {
            for g in self.group.iter_mut() {
                *g = self.rng.gen_range(0..2);
            }
            self.partition_until = t + self.rng.gen_range(500..10_000);
            let groups = self.group.clone();
            self.log(format!(
                "partition {groups:?} until {}",
                self.partition_until
            ));
        } else if self.rng.gen_bool(p) {
            self.loss = self.rng.gen_range(0.0..0.3);
            self.max_delay = self.rng.gen_range(1..=300);
            let (loss, delay) = (self.loss, self.max_delay);
            self.log(format!("network: loss {loss:.2}, delay up to {delay} ms"));
        }
    }

    fn heal(&mut self) {
        self.loss = 0.0;
        self.max_delay = 20;
        self.group.iter_mut().for_each(|g| *g = 0);
        self.partition_until = 0;
        let t = self.t;
        for n in &mut self.nodes {
            if !n.host_up {
                n.host_back_at = t;
            }
            match n.sidecar {
                Sidecar::Frozen { .. } => n.sidecar = Sidecar::Frozen { until: t },
                Sidecar::Dead { .. } => n.sidecar = Sidecar::Dead { until: t },
                Sidecar::Running => {}
            }
        }
        self.log("everything heals".into());
    }

    fn step(&mut self) {
        self.faults();
        self.raft_step();
        self.deliver();
        self.guard_step();
        self.check_s1();
        self.sidecar_step();
        self.guard_step();
        self.policy_step();
        self.wal_step();
        self.check_s1();
        self.t += STEP;
    }

    /// Runs the fault phase and the healed phase; returns the recovery time after healing and
    /// the number of promotions and guard fences seen.
    fn run_with_stats(mut self) -> (u64, usize, usize) {
        while self.t < FAULT_PHASE_MS {
            self.step();
        }
        self.heal();
        let healed_at = self.t;
        while self.t < healed_at + LIVENESS_BOUND_MS {
            self.step();
            if self.nodes.iter().any(|n| n.writable()) && self.t > healed_at + 1_000 {
                let fences = self
                    .events
                    .iter()
                    .filter(|e| e.contains("guard of"))
                    .count();
                return (self.t - healed_at, self.promotions.len(), fences);
            }
        }
        self.fail(&format!(
            "liveness: no writable primary {LIVENESS_BOUND_MS} ms after every fault healed"
        ));
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("PGQUORUM_SIM_SEED") {
        return vec![s.parse().expect("PGQUORUM_SIM_SEED must be a number")];
    }
    let n: u64 = std::env::var("PGQUORUM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let base: u64 = std::env::var("PGQUORUM_SIM_SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (base..base + n).collect()
}

#[test]
fn s1_s5_and_liveness_hold_under_seeded_faults() {
    let started = std::time::Instant::now();
    let mut worst = 0;
    let (mut promotions, mut fences) = (0, 0);
    let seeds = seeds();
    for &seed in &seeds {
        let size = if seed % 3 == 0 { 5 } else { 3 };
        let (recovered_in, p, f) = Sim::new(seed, size).run_with_stats();
        worst = worst.max(recovered_in);
        promotions += p;
        fences += f;
    }
    eprintln!(
        "FIGURE simulation seeds={} promotions={promotions} guard_fences={fences} \
         worst_recovery_after_heal_ms={worst} wall_ms={}",
        seeds.len(),
        started.elapsed().as_millis()
    );
    // The faults must actually move the primary around, or the run proves nothing.
    assert!(
        promotions >= seeds.len() / 2,
        "too few failovers: {promotions}"
    );
}

#[test]
fn a_healthy_cluster_gets_its_first_primary_quickly_and_keeps_it() {
    let mut sim = Sim::new(12345, 3);
    while sim.t < 10_000 {
        sim.raft_step();
        sim.deliver();
        sim.guard_step();
        sim.sidecar_step();
        sim.guard_step();
        sim.policy_step();
        sim.wal_step();
        sim.check_s1();
        sim.t += STEP;
    }
    let writers: Vec<_> = sim
        .nodes
        .iter()
        .filter(|n| n.writable())
        .map(|n| n.id)
        .collect();
    assert_eq!(writers.len(), 1, "one primary: {:?}", sim.events);
    assert_eq!(
        sim.promotions.len(),
        0,
        "the first primary is initialised, not promoted"
    );
    assert_eq!(
        sim.committed.primary.map(|p| p.epoch),
        Some(1),
        "no failover without a fault"
    );
}
