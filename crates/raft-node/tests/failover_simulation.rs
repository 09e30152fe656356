//! Seeded simulation of the failover protocol with a fake clock. N members run the real code of
//! every decision: the sidecar's assessment (`failover::assess`), the reconcile table
//! (`failover::reconcile`), the leader's duty as the daemon runs it
//! (`failover::duty::LeaderBook`: reports, grants, policy rounds, upkeep) over the policy
//! (`failover::policy`), the lease arithmetic (`failover::lease`), the synchronous-standby
//! rules (`failover::sync`) and the state machine (`ClusterState::apply`). Around them it
//! models Postgres, the guard, the sidecar's fence timer, the network and Raft:
//! - the sidecar's tick as the daemon paces it: a probe that takes time (a quarter lease when
//!   Postgres does not answer), a report whose call blocks until the leader answers or
//!   `report_timeout`, then the reconcile table on what the probe saw; the leader's policy
//!   round runs on its own tick;
//! - faults: host crashes, sidecar kills and freezes, guard kills and freezes (on a loaded
//!   host, and with the primary cut off so that its lease runs out while only the sidecar's
//!   fence timer can fence), whole nodes frozen (sidecar, guard and Postgres) and Postgres
//!   alone frozen, Postgres crashes, full disks (a primary that runs but cannot write, a
//!   replica that cannot receive), partitions, one-way cuts, message delay and loss,
//!   clock-rate drift within the bound the drift margin covers, lease changes committed
//!   mid-run (sometimes with `synchronous_mode` and `tick_ms`, and sometimes followed by the
//!   loss of the primary while its longer grant still runs), maintenance pauses (the reconcile
//!   table under `while_paused`; no promotion may be decided while paused), sidecars restarted
//!   with another Raft heartbeat (a rolling change of the timings) or other tags
//!   (`nofailover`, `nosync`, `priority`), members removed and added back with an empty data
//!   directory, failed clones and rewinds, Postgres restarted by hand outside its guard, and
//!   promotion calls that fail although Postgres promoted;
//! - a WAL receiver whose `streaming` status outlives a silent cut until its timeout;
//! - synchronous replication in every mode: the primary acknowledges a write only when its
//!   applied `synchronous_standby_names` allow it;
//! - a delay between a leader's decision to promote and the commit;
//! - Raft as openraft 0.9.25 runs it: a leader needs a majority that has not moved to a higher
//!   term, followers refuse votes within the leader lease after hearing from the leader, the
//!   leader itself refreshes its vote time only at its election (so it may vote for a successor),
//!   a candidate still votes for another and draws a fresh timeout for its next attempt, and a
//!   cut-off leader keeps believing it leads.
//!
//! Not modelled: a guard and a sidecar both stopped while Postgres runs on (no process is left
//! that could fence it; only a kernel watchdog could), and the race on a resumed host between
//! the guard's deadline check and a commit under way (the model lets the guard go first).
//!
//! Checked after every step: at most one member can write (S1); promotions only follow a commit
//! naming the member in an epoch at least as high as it has seen (S5); a promoted member holds
//! every write acknowledged under synchronous replication (S6). After the faults heal, a
//! healthy majority has a writable primary whose writes are acknowledged again within a bound
//! (liveness).
//!
//! Every run tries fresh seeds besides the fixed ones and prints its base seed.
//! `PGQUORUM_SIM_SEEDS=N` sets how many fixed seeds run (default 1500) from
//! `PGQUORUM_SIM_SEED_BASE` (default 0), `PGQUORUM_SIM_FRESH=N` how many fresh ones (default
//! 500); `PGQUORUM_SIM_SEED=S` replays one.

use std::collections::{BTreeMap, BTreeSet};

use pg_supervisor::{effective_deadline, Lease};
use raft_node::cluster_state::{
    ClusterState, Command, CommandOutcome, PlanKind, PrimaryPlan, SyncSet, Tags,
};
use raft_node::dynamic_config::{DynamicConfig, SyncMode};
use raft_node::failover::assess::{Assessor, Seen};
use raft_node::failover::duty::{DutyView, LeaderBook, RaftFacts};
use raft_node::failover::lease::{adopted_lease, renewed, HeldLease, LeaseTerms, Millis};
use raft_node::failover::plan::{
    follows_without_rewind, hypothetical_refusal, manual_failover_refusal, switchover_target,
};
use raft_node::failover::policy::Verdict;
use raft_node::failover::reconcile::{plan, while_paused, Action, LocalView};
use raft_node::failover::report::{
    HandedOver, LeaderStamp, MemberReport, PgState, StorageReport, SyncApplied,
};
use raft_node::failover::sidecar::{
    became_primary, follow_waits, report_timeout, Unreachable, RENEWAL_LEASES,
    UNREACHABLE_BACKOFF_MS,
};
use raft_node::failover::sync::{self as syncrules};
use raft_node::types::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Real milliseconds per simulation step.
const STEP: u64 = 5;
/// Raft timings of the product defaults.
const RAFT_LEADER_LEASE: u64 = 600;
const ELECTION_MIN: u64 = 400;
const ELECTION_MAX: u64 = 600;
const HEARTBEAT: u64 = 150;
/// A leader grants leases only while its quorum contact is at most this old (as the sidecar).
/// The heartbeat a member may switch to in a rolling change of the Raft timings (the default
/// lease still outlasts an election with it).
const OTHER_HEARTBEAT: u64 = 200;

/// What a member registers: its name and Raft timings.
fn member_info(id: NodeId, heartbeat_ms: u64, tags: Tags) -> raft_node::cluster_state::MemberInfo {
    raft_node::cluster_state::MemberInfo {
        id,
        name: format!("n{id}"),
        tags,
        raft_heartbeat_ms: heartbeat_ms,
        raft_election_max_ms: ELECTION_MAX,
        ..Default::default()
    }
}
/// `wal_receiver_timeout`: how long the status word says `streaming` after a silent cut.
const RECEIVER_TIMEOUT: u64 = 5_000;
/// Faults happen during this much simulated time, then everything heals.
const FAULT_PHASE_MS: u64 = 30_000;
/// After healing, a writable primary must have its writes acknowledged within this bound.
const LIVENESS_BOUND_MS: u64 = 20_000;
/// Lease terms an operator may switch between mid-run; clock rates stay within the error the
/// smallest margin covers.
const LEASE_CHOICES: [(u64, u64); 5] = [
    (2_000, 100),
    (2_500, 150),
    (3_000, 200),
    (4_000, 200),
    (8_000, 300),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Process {
    Running,
    Frozen { until: u64 },
    Dead { until: u64 },
}

/// The synchronous standbys the sidecar applied, as it remembers them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedSync {
    epoch: u64,
    set: SyncSet,
    revision: u64,
    switch_lsn: u64,
    at: Millis,
}

struct Node {
    id: NodeId,
    rate: f64,
    offset: f64,
    host_up: bool,
    host_back_at: u64,
    sidecar: Process,
    guard: Process,
    pg: PgState,
    upstream: Option<NodeId>,
    /// Sim time of the last WAL message from the upstream.
    last_receipt: Option<u64>,
    /// The receiver's status word: true until a clean close or the receiver timeout.
    receiver_streaming: bool,
    lsn: u64,
    timeline: u32,
    /// `synchronous_standby_names` in the data directory (survives sidecar restarts).
    ssn: SyncSet,
    applied_sync: Option<AppliedSync>,
    last_primary_epoch: Option<u64>,
    epoch_seen: u64,
    lease: Option<HeldLease>,
    leader_stamp: Option<LeaderStamp>,
    assessor: Assessor,
    guard_deadline: Option<Millis>,
    /// Set by a clean sidecar stop (`detach`): the guard keeps Postgres running until then
    /// (local clock), or until its lease ends, for the next sidecar to adopt.
    detached_until: Option<Millis>,
    /// The upstream a follow could not reach (lost with the sidecar process).
    unreachable: Option<Unreachable>,
    applied: ClusterState,
    log_index: u64,
    term: u64,
    last_heard: u64,
    /// Sim time of this member's last own election attempt.
    last_attempt: u64,
    election_timeout: u64,
    next_tick: Millis,
    /// Sim time until which the data directory's filesystem is full: client writes and WAL
    /// receipt fail, the primary's write probe fails, and the sidecar reports no room.
    disk_full_until: u64,
    /// The sidecar shut its primary down cleanly for a switchover (lost with the process).
    handed_over: Option<(HandedOver, NodeId, u64)>,
    /// Where this member's timeline forked off its predecessor's (its WAL position when it
    /// was promoted): WAL of the old timeline past it is not in its history.
    fork_lsn: u64,
    /// Postgres is promoting (`pg_promote` runs) for this epoch until this sim time; and
    /// whether it began after everything healed.
    promoting: Option<(u64, u64, bool)>,
    /// The sidecar waits on a promotion and renews its lease meanwhile (lost with the process).
    renewals: Option<Renewing>,
    /// The Raft heartbeat this member's sidecar runs (a restart may change it: a rolling change
    /// of the Raft timings), and whether its registration of it was committed.
    heartbeat_ms: u64,
    registered: bool,
    /// Postgres was restarted by hand: no guard watches it until its sidecar takes it under one.
    unguarded: bool,
    /// Sim time of that restart.
    unguarded_at: u64,
    /// Postgres is frozen (every process of it stopped, or its whole host) until this sim
    /// time: it answers no probe, writes nothing, streams nothing.
    pg_frozen: Option<u64>,
    /// The tick under way, if any: the sidecar's probe and its report to the leader each take
    /// time, and what it does at the end rests on what it saw at the start.
    tick: Option<TickPhase>,
    /// The failover tags this member's sidecar registers (a restart may change them).
    tags: Tags,
    /// Sim time until which the host is so loaded that every probe takes up to its bound.
    loaded_until: u64,
    /// Removed from the cluster by the operator (decommissioned) until this sim time, when it
    /// is added back with an empty data directory.
    removed_until: Option<u64>,
}

/// A sidecar's tick under way (local clock), as the real loop runs it: the probe (bounded by a
/// quarter lease), then the report, whose call blocks until the leader answers or
/// `report_timeout`, then the reconcile table.
#[derive(Clone)]
enum TickPhase {
    Probing {
        started: Millis,
        done_at: Millis,
    },
    Reporting {
        started: Millis,
        done_at: Millis,
        view: LocalView,
        judged: PgState,
        sent: Box<MemberReport>,
    },
}

/// The sidecar's renewals while it waits on a promotion (`Renewals` in the real sidecar).
struct Renewing {
    epoch: u64,
    /// The report of the tick that started the promotion, sent again.
    report: MemberReport,
    /// Local clock: the next resend, and the last one allowed.
    next: Millis,
    until: Millis,
}

impl Node {
    fn local(&self, t: u64) -> Millis {
        (self.offset + t as f64 * self.rate) as Millis
    }
    fn alive(&self) -> bool {
        self.host_up && self.sidecar == Process::Running
    }
    /// Accepts writes, for S1: a primary whose disk is full counts too, since room may come
    /// back at any moment without anyone telling the cluster.
    /// A frozen Postgres writes nothing until it thaws, and then only if no fencer stopped it
    /// first. On a resumed host the model lets the guard look at its deadline before any
    /// backend acknowledges a commit; really that is a race (docs/architecture.md, S4).
    fn writable(&self) -> bool {
        self.host_up && self.pg == PgState::Primary && self.pg_frozen.is_none()
    }
    fn disk_full(&self, t: u64) -> bool {
        t < self.disk_full_until
    }
    /// A new sidecar process: it knows nothing but what is on disk.
    fn sidecar_restarted(&mut self, t: u64) {
        self.sidecar = Process::Running;
        self.lease = None;
        self.leader_stamp = None;
        self.assessor = Assessor::default();
        self.applied_sync = None;
        self.handed_over = None;
        self.unreachable = None;
        self.renewals = None;
        self.tick = None;
        self.last_heard = t;
    }
}

/// A leader: the shipped book of its term ([`LeaderBook`]), driven by the shipped steps, plus
/// what the simulation's Raft model keeps about it.
struct Leader {
    term: u64,
    book: LeaderBook,
    /// Sim time of the last quorum contact.
    last_quorum_ack: u64,
    next_policy: Millis,
}

enum Body {
    Report {
        report: Box<MemberReport>,
        term: u64,
    },
    Reply {
        grant: Option<(u64, u64)>,
        sent: Millis,
        stamp: LeaderStamp,
        report_again: bool,
    },
}

struct Msg {
    at: u64,
    from: NodeId,
    to: NodeId,
    body: Body,
}

/// A leader's decision on its way into the log.
struct InFlight {
    at: u64,
    leader: NodeId,
    term: u64,
    cmd: Command,
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
    /// Directed links that drop everything.
    cut: BTreeSet<(NodeId, NodeId)>,
    cut_until: u64,
    /// An operator's maintenance pause lasts until then (sim time); 0 when none is wanted.
    paused_until: u64,
    loss: f64,
    max_delay: u64,
    msgs: Vec<Msg>,
    in_flight: Vec<InFlight>,
    promotions: Vec<(NodeId, u64)>,
    /// Promotions decided while the old primary's disk was full.
    write_failovers: usize,
    /// Maintenance pauses committed.
    pauses: usize,
    /// Switchovers and manual failovers committed, completed and cancelled.
    plans: usize,
    plans_done: usize,
    plans_cancelled: usize,
    manual_failovers: usize,
    /// Former primaries that followed their successor without a rewind.
    followed_without_rewind: usize,
    /// Clean sidecar stops (detach), sidecars that adopted a running Postgres, and primaries
    /// adopted with their lease still running (kept without a failover).
    clean_restarts: usize,
    adoptions: usize,
    primaries_adopted: usize,
    /// Follows that found their upstream unreachable and backed off.
    follow_backoffs: usize,
    /// The highest WAL position acknowledged to a client while the primary ran synchronous.
    acked_sync_high: u64,
    /// The highest WAL position acknowledged at all.
    acked_high: u64,
    /// The highest WAL position acknowledged by the primary of each epoch.
    acked_by_epoch: BTreeMap<u64, u64>,
    /// Every fault has healed.
    healed: bool,
    /// Sim time at which the primary is lost after a shortened lease.
    lose_primary_at: Option<u64>,
    /// How often each of the later faults happened (the run asserts they did).
    counts: BTreeMap<&'static str, usize>,
    events: Vec<String>,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mode = [
            SyncMode::Off,
            SyncMode::On,
            SyncMode::Strict,
            SyncMode::Quorum,
        ][rng.gen_range(0..4)];
        let count = if n >= 5 { rng.gen_range(1..=2) } else { 1 };
        // A lag bound the simulated write rate (about 20 kB/s) can exceed, so that the lag
        // checker below can fail.
        let maximum_lag_on_failover = [2_000, 20_000, 1 << 20][rng.gen_range(0..3)];
        let config = DynamicConfig {
            synchronous_mode: mode,
            synchronous_node_count: count,
            maximum_lag_on_failover,
            ..Default::default()
        };
        // Stay inside the rate error the smallest margin covers.
        let rho = LEASE_CHOICES
            .iter()
            .map(|(l, m)| {
                LeaseTerms {
                    lease_ms: *l,
                    drift_margin_ms: *m,
                }
                .max_clock_rate_error()
            })
            .fold(f64::MAX, f64::min)
            * 0.95;
        let nodes = (1..=n as u64)
            .map(|id| Node {
                id,
                rate: 1.0 + rng.gen_range(-rho..rho),
                offset: rng.gen_range(0.0..1e6),
                host_up: true,
                host_back_at: 0,
                sidecar: Process::Running,
                guard: Process::Running,
                pg: PgState::NoData,
                upstream: None,
                last_receipt: None,
                receiver_streaming: false,
                lsn: 0,
                timeline: 0,
                ssn: SyncSet::asynchronous(),
                applied_sync: None,
                last_primary_epoch: None,
                epoch_seen: 0,
                lease: None,
                leader_stamp: None,
                assessor: Assessor::default(),
                guard_deadline: None,
                detached_until: None,
                unreachable: None,
                applied: ClusterState::default(),
                log_index: 0,
                term: 0,
                last_heard: 0,
                last_attempt: 0,
                election_timeout: rng.gen_range(ELECTION_MIN..=ELECTION_MAX),
                next_tick: 0,
                disk_full_until: 0,
                handed_over: None,
                fork_lsn: 0,
                promoting: None,
                renewals: None,
                heartbeat_ms: HEARTBEAT,
                registered: true,
                unguarded: false,
                unguarded_at: 0,
                pg_frozen: None,
                tick: None,
                tags: Tags::default(),
                removed_until: None,
                loaded_until: 0,
            })
            .collect();
        let mut committed = ClusterState {
            config,
            ..Default::default()
        };
        let ids: BTreeSet<NodeId> = (1..=n as u64).collect();
        for id in 1..=n as u64 {
            let info = member_info(id, HEARTBEAT, Tags::default());
            committed.apply(&Command::RegisterMember(info), &ids);
        }
        let mut sim = Sim {
            seed,
            rng,
            t: 0,
            nodes,
            members: (1..=n as u64).collect(),
            committed: committed.clone(),
            committed_index: 0,
            top_term: 0,
            leaders: BTreeMap::new(),
            cut: BTreeSet::new(),
            cut_until: 0,
            paused_until: 0,
            loss: 0.0,
            max_delay: 20,
            msgs: Vec::new(),
            in_flight: Vec::new(),
            promotions: Vec::new(),
            write_failovers: 0,
            pauses: 0,
            plans: 0,
            plans_done: 0,
            plans_cancelled: 0,
            manual_failovers: 0,
            followed_without_rewind: 0,
            clean_restarts: 0,
            adoptions: 0,
            primaries_adopted: 0,
            follow_backoffs: 0,
            acked_sync_high: 0,
            acked_high: 0,
            acked_by_epoch: BTreeMap::new(),
            healed: false,
            lose_primary_at: None,
            counts: BTreeMap::new(),
            events: Vec::new(),
        };
        for node in &mut sim.nodes {
            node.applied = committed.clone();
        }
        sim.log(format!(
            "synchronous_mode {mode}, count {count}, {n} members"
        ));
        sim
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

    /// Packets from `a` reach `b`.
    fn reaches(&self, a: NodeId, b: NodeId) -> bool {
        a == b || !self.cut.contains(&(a, b))
    }

    /// A Raft RPC and its reply get through: both sidecars run and both directions are open.
    fn can_talk(&self, a: NodeId, b: NodeId) -> bool {
        self.node(a).alive() && self.node(b).alive() && self.reaches(a, b) && self.reaches(b, a)
    }

    /// A TCP connection between the hosts works (WAL streaming).
    fn hosts_connected(&self, a: NodeId, b: NodeId) -> bool {
        self.node(a).host_up && self.node(b).host_up && self.reaches(a, b) && self.reaches(b, a)
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn log(&mut self, s: String) {
        self.events.push(format!("[t={} ms] {s}", self.t));
    }

    fn fail(&self, what: &str) -> ! {
        let tail: Vec<&String> = self.events.iter().rev().take(50).collect();
        let tail: Vec<&String> = tail.into_iter().rev().collect();
        let state: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{}: pg {:?} frozen {:?} sidecar {:?} guard {:?} term {} lsn {} upstream {:?} \
                     lease {:?} tick {} tags {:?} removed {:?}",
                    n.id,
                    n.pg,
                    n.pg_frozen,
                    n.sidecar,
                    n.guard,
                    n.term,
                    n.lsn,
                    n.upstream,
                    n.lease,
                    match n.tick {
                        None => "idle",
                        Some(TickPhase::Probing { .. }) => "probing",
                        Some(TickPhase::Reporting { .. }) => "reporting",
                    },
                    n.tags,
                    n.removed_until
                )
            })
            .collect();
        let leaders: Vec<(NodeId, u64)> =
            self.leaders.iter().map(|(l, ld)| (*l, ld.term)).collect();
        panic!(
            "seed {} (replay with PGQUORUM_SIM_SEED={}): {what} at t={} ms\nrecent events:\n{}\n\
             members {:?}, leaders {leaders:?}, committed primary {:?}\n{}",
            self.seed,
            self.seed,
            self.t,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            self.members,
            self.committed.primary,
            state.join("\n")
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

    /// Commits `cmd` at once through a leader that has its quorum now.
    fn commit(&mut self, leader: NodeId, cmd: Command) -> bool {
        let members = self.members.clone();
        let what = format!("{cmd:?}");
        if self.committed.apply(&cmd, &members) != CommandOutcome::Applied {
            return false;
        }
        self.committed_index += 1;
        let index = self.committed_index;
        let committed = self.committed.clone();
        let n = self.node_mut(leader);
        n.applied = committed;
        n.log_index = index;
        self.log(format!("leader {leader} commits {what}"));
        true
    }

    /// Raft: leaders with a quorum replicate the committed state and their term; cut-off ones
    /// keep believing; elections follow openraft 0.9's timing.
    fn raft_step(&mut self) {
        let ids: Vec<NodeId> = self.leaders.keys().copied().collect();
        for l in ids {
            if !self.node(l).alive() {
                // A crashed or killed leader stops; a frozen one resumes believing.
                if !self.node(l).host_up || matches!(self.node(l).sidecar, Process::Dead { .. }) {
                    self.leaders.remove(&l);
                }
                continue;
            }
            let term = self.leaders[&l].term;
            let higher = self
                .members
                .iter()
                .any(|&j| j != l && self.can_talk(l, j) && self.node(j).term > term);
            if higher || self.node(l).term > term {
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
                let asked = self.node(l).local(t);
                let read_index = if term == self.top_term {
                    self.committed_index
                } else {
                    self.node(l).log_index
                };
                if let Some(ld) = self.leaders.get_mut(&l) {
                    ld.last_quorum_ack = t;
                    ld.book.quorum_confirmed(asked, read_index);
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
                        // openraft 0.9.25: followers refresh their vote time on the leader's
                        // RPCs; the leader itself does not, it only set it when elected.
                        if j != l {
                            n.last_heard = t;
                        }
                        n.log_index = index;
                    }
                }
            }
        }
        self.commit_in_flight();
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
            // A follower that knew a committed leader waits the leader lease plus its timeout;
            // a candidate waits its timeout again after a failed attempt.
            if self.t.saturating_sub(n.last_heard) < RAFT_LEADER_LEASE + n.election_timeout
                || self.t.saturating_sub(n.last_attempt) < n.election_timeout
            {
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
            // openraft 0.9: a candidate's own vote is not a committed one, so it still votes for
            // another candidate; its next attempt comes after a fresh random timeout.
            let timeout = self.rng.gen_range(ELECTION_MIN..=ELECTION_MAX);
            let n = self.node_mut(c);
            n.last_attempt = t;
            n.election_timeout = timeout;
            if voters.len() >= self.majority() {
                self.top_term += 1;
                let term = self.top_term;
                for j in &voters {
                    let n = self.node_mut(*j);
                    n.term = term;
                    n.last_heard = t;
                }
                // A voter that led an older term is a follower now.
                self.leaders.retain(|l, _| !voters.contains(l));
                let since = self.node(c).local(t);
                self.leaders.insert(
                    c,
                    Leader {
                        term,
                        book: LeaderBook::new(term, since),
                        last_quorum_ack: t,
                        next_policy: since,
                    },
                );
                self.log(format!("{c} elected leader of term {term}"));
                return;
            }
        }
    }

    /// Decisions reach the log after a delay, through a leader that still has its quorum.
    fn commit_in_flight(&mut self) {
        let t = self.t;
        let due: Vec<InFlight> = {
            let (due, rest): (Vec<InFlight>, Vec<InFlight>) = std::mem::take(&mut self.in_flight)
                .into_iter()
                .partition(|f| f.at <= t);
            self.in_flight = rest;
            due
        };
        for f in due {
            let leads = self.leaders.get(&f.leader).is_some_and(|ld| {
                ld.term == f.term && f.term == self.top_term && t - ld.last_quorum_ack <= HEARTBEAT
            });
            if leads {
                // The book forgets the pending promotion once the applied state shows it.
                if !self.commit(f.leader, f.cmd) {
                    if let Some(ld) = self.leaders.get_mut(&f.leader) {
                        ld.book.promotion_refused();
                    }
                }
            } else if self
                .leaders
                .get(&f.leader)
                .is_some_and(|ld| ld.term == f.term)
            {
                // Still leading without a quorum: the entry waits in its log.
                self.in_flight.push(InFlight { at: t + STEP, ..f });
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

    /// What leader `l`'s duty is judged by at its clock's `now`, besides its book.
    fn view(&self, now: Millis, l: NodeId) -> DutyView<'_> {
        let n = self.node(l);
        DutyView {
            me: l,
            cluster: &n.applied,
            applied_index: Some(n.log_index),
            members: &self.members,
            heartbeat_ms: n.heartbeat_ms,
            now,
            // Sim time stands in for the wall clock of planned switchovers.
            now_unix_ms: self.t,
        }
    }

    /// The Raft facts a hand-off is judged by, for leader `l`.
    fn raft_facts(&self, l: NodeId) -> RaftFacts {
        RaftFacts {
            voters: self.members.clone(),
            caught_up: self
                .members
                .iter()
                .copied()
                .filter(|&j| self.can_talk(l, j) && self.node(j).log_index == self.committed_index)
                .collect(),
            raft_leader_lease_ms: RAFT_LEADER_LEASE,
        }
    }

    /// The leader's policy round and upkeep, through the shipped steps
    /// ([`LeaderBook::decide`], [`LeaderBook::upkeep`]); with a quorum, their commands commit
    /// (promotions after a delay).
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
            if self.t - ld.last_quorum_ack > HEARTBEAT {
                continue;
            }
            let term = ld.term;
            let tick = self.node(l).applied.config.tick_ms;
            let mut ld = self.leaders.remove(&l).expect("leader present");
            ld.next_policy = now + tick;
            let decision = ld.book.decide(&self.view(now, l));
            let upkeep = matches!(decision.verdict, Verdict::Steady).then(|| {
                let raft = self.raft_facts(l);
                ld.book.upkeep(&self.view(now, l), &raft)
            });
            self.leaders.insert(l, ld);
            if let Some(a) = decision.announce.filter(|a| a.new_kind) {
                self.log(format!("leader {l}: {}", a.text));
            }
            match decision.verdict {
                Verdict::Promote {
                    node,
                    epoch,
                    reason,
                    lsn,
                    sync,
                } => {
                    // Without a synchronous set in force (asynchronous mode, or a legacy set
                    // after a fall-back), writes acknowledged meanwhile are on no particular
                    // member: the candidate must be within maximum_lag_on_failover of the
                    // position last committed for the old primary.
                    let applied = &self.node(l).applied;
                    if let Some(old) = applied.primary {
                        let sync_in_force = applied.sync.epoch == old.epoch
                            && applied.sync.committed.is_synchronous();
                        let recorded = applied.primary_lsn.filter(|r| r.epoch == old.epoch);
                        if let Some(rec) = recorded.filter(|_| !sync_in_force) {
                            let bound = applied.config.maximum_lag_on_failover;
                            if lsn.saturating_add(bound) < rec.lsn {
                                self.fail(&format!(
                                    "lag: leader {l} promotes {node} at WAL {lsn}, more than \
                                     maximum_lag_on_failover ({bound}) behind the committed \
                                     position {} of the old primary",
                                    rec.lsn
                                ));
                            }
                        }
                    }
                    let manual =
                        self.node(l).applied.plan.is_some_and(|p| {
                            p.started && p.kind == PlanKind::Failover && p.to == node
                        });
                    if self.node(l).applied.paused && !manual {
                        self.fail(&format!(
                            "pause: leader {l} decides to promote {node} while automatic \
                             failover is paused"
                        ));
                    }
                    // The reason names the last straw (often the guard's fence once the
                    // lease ran out), so count by what the old primary's disk is.
                    let old = self.node(l).applied.primary;
                    if old.is_some_and(|o| self.node(o.node).disk_full(self.t)) {
                        self.write_failovers += 1;
                    }
                    // The book made the promotion pending in the same step.
                    // A commit waits for a quorum's fsync; a slow disk makes it long.
                    let latency = self.rng.gen_range(0..=1_000);
                    self.log(format!(
                        "leader {l} decides Promote {{ {node}, epoch {epoch}, sync {sync:?} }}: {reason}"
                    ));
                    self.in_flight.push(InFlight {
                        at: self.t + latency,
                        leader: l,
                        term,
                        cmd: Command::Promote {
                            node,
                            epoch,
                            reason,
                            at_unix_ms: self.t,
                            lsn: Some(lsn),
                            sync,
                        },
                    });
                }
                Verdict::StartPlan { id } => {
                    self.commit(l, Command::StartPlan { id });
                }
                Verdict::CancelPlan { id, reason } => {
                    let cancelled = self.commit(l, Command::CancelPlan { id, reason });
                    self.plans_cancelled += usize::from(cancelled);
                }
                Verdict::Steady => {
                    let upkeep = upkeep.unwrap_or_default();
                    if let Some(cmd) = upkeep.command {
                        if let Command::CommitSync { .. } = cmd {
                            let seen = self
                                .committed
                                .primary
                                .and_then(|p| self.leaders[&l].book.reports.get(&p.node))
                                .map(|r| format!("{:?}", r.report.sync_applied))
                                .unwrap_or_default();
                            self.log(format!("leader {l} sees the primary run {seen}"));
                        }
                        self.commit(l, cmd);
                    }
                    if let Some(target) = upkeep.handoff {
                        // Not modelled: the hand-off request is a hint that Raft may refuse.
                        self.log(format!("leader {l} would ask {target} to take leadership"));
                    }
                }
                _ => {}
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
            if !self.node(m.to).alive() || !self.reaches(m.from, m.to) {
                continue;
            }
            match m.body {
                Body::Report { report, term } => {
                    let report = *report;
                    let l = m.to;
                    let Some(ld) = self.leaders.get(&l) else {
                        continue;
                    };
                    if ld.term != term {
                        continue;
                    }
                    let now = self.node(l).local(t);
                    let mut ld = self.leaders.remove(&l).expect("leader present");
                    let pg = report.pg;
                    let (node, sent_at) = (report.node, report.sent_at);
                    let answer = ld.book.on_report(&self.view(now, l), report);
                    self.leaders.insert(l, ld);
                    if answer.grant.is_some() && pg != PgState::Primary {
                        self.log(format!(
                            "leader {l} grants {node} a lease for its {pg:?} report sent at {sent_at}"
                        ));
                    }
                    let body = Body::Reply {
                        grant: answer.grant.map(|g| (g.epoch, g.lease_ms)),
                        sent: sent_at,
                        stamp: answer.stamp,
                        report_again: answer.report_again,
                    };
                    if l == node {
                        self.msgs.push(Msg {
                            at: t,
                            from: l,
                            to: l,
                            body,
                        });
                    } else {
                        self.send(l, node, body);
                    }
                }
                Body::Reply {
                    grant,
                    sent,
                    stamp,
                    report_again,
                } => {
                    let n = self.node_mut(m.to);
                    n.leader_stamp = Some(stamp);
                    if report_again {
                        let soon = sent + n.applied.config.tick_ms / 5;
                        n.next_tick = n.next_tick.min(soon);
                    }
                    let Some((epoch, lease_ms)) = grant else {
                        continue;
                    };
                    if !n.assessor.accepts_grant_for(sent) {
                        continue;
                    }
                    n.lease = Some(renewed(n.lease, epoch, sent, lease_ms));
                    // A sidecar waiting on a promotion feeds every renewal to the guard.
                    let feeds = n.pg == PgState::Primary || n.renewals.is_some();
                    if feeds && n.lease.is_some_and(|l| l.epoch == epoch) {
                        n.guard_deadline = n.lease.map(|l| l.expires_at);
                    }
                }
            }
        }
    }

    /// The guard runs beside Postgres whatever the sidecar does, unless it is frozen itself.
    fn guard_step(&mut self) {
        let t = self.t;
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            if !matches!(n.pg, PgState::Primary | PgState::Replica) {
                // No postmaster left: nothing of it is unguarded or frozen any more.
                n.unguarded = false;
                n.pg_frozen = None;
            }
            // An unguarded Postgres has no guard to fence it.
            if !n.host_up || n.unguarded {
                continue;
            }
            if matches!(n.guard, Process::Frozen { .. }) {
                // The sidecar's fence timer, armed with every deadline fed to the guard, fences
                // from a thread of its own while the sidecar process runs, whatever its tick
                // waits on (the shipped `guard::watchdog`).
                let timer = n.sidecar == Process::Running && n.detached_until.is_none();
                let due = n.guard_deadline.is_some_and(|d| n.local(t) >= d);
                let leased =
                    n.pg == PgState::Primary || (n.pg == PgState::Replica && n.promoting.is_some());
                if timer && due && leased {
                    n.pg = PgState::Fenced;
                    n.promoting = None;
                    let id = n.id;
                    self.log(format!(
                        "fence timer of {id} fences its Postgres: its guard is frozen"
                    ));
                    self.count("fence_timer_fences");
                }
                continue;
            }
            // A sidecar that detached is not "gone" to its guard: the guard waits for a successor
            // until the earlier of its lease's end and the restart window (the real rule).
            let sidecar_gone =
                matches!(n.sidecar, Process::Dead { .. }) && n.detached_until.is_none();
            let now = n.local(t);
            if n.pg == PgState::Replica && n.promoting.is_some() {
                // The guard holds the lease fed before `pg_promote`, and every renewal since.
                let lease = Lease::Until(n.guard_deadline.unwrap_or(0));
                let expired = effective_deadline(lease, n.detached_until).is_some_and(|d| now >= d);
                if expired || sidecar_gone {
                    let healed = n.promoting.is_some_and(|(_, _, healed)| healed);
                    n.pg = PgState::Fenced;
                    n.promoting = None;
                    n.detached_until = None;
                    let id = n.id;
                    self.log(format!(
                        "guard of {id} stops a promotion that outlived its lease"
                    ));
                    if healed {
                        // Nothing is wrong any more: a promotion, however slow, must keep
                        // its lease.
                        self.fail(&format!(
                            "{id}'s promotion, begun after everything healed, lost its lease \
                             half-way"
                        ));
                    }
                }
            } else if n.pg == PgState::Primary {
                let lease = Lease::Until(n.guard_deadline.unwrap_or(0));
                let expired = effective_deadline(lease, n.detached_until).is_some_and(|d| now >= d);
                if expired || sidecar_gone {
                    n.pg = PgState::Fenced;
                    n.detached_until = None;
                    let id = n.id;
                    self.log(format!("guard of {id} fences its primary"));
                }
            } else if n.pg == PgState::Replica {
                let window_over = effective_deadline(Lease::NotRequired, n.detached_until)
                    .is_some_and(|d| now >= d);
                if sidecar_gone || window_over {
                    n.pg = PgState::Stopped;
                    n.detached_until = None;
                }
            } else {
                // Nothing runs under a guard any more.
                n.detached_until = None;
            }
        }
        self.promotion_step();
    }

    /// Postgres finishes the promotions that are due, whatever its sidecar does meanwhile.
    fn promotion_step(&mut self) {
        let t = self.t;
        for id in self.members.clone() {
            let n = self.node(id);
            let Some((epoch, done_at, _)) = n.promoting else {
                continue;
            };
            if !n.host_up || n.pg != PgState::Replica {
                // Crashed or stopped half-way: `pg_promote` fails.
                self.node_mut(id).promoting = None;
                continue;
            }
            if t < done_at || n.pg_frozen.is_some() {
                // A frozen startup process finishes nothing until it thaws.
                continue;
            }
            // Writable from now on: only under a lease of this epoch (S2), which the renewals
            // kept alive however long the promotion took.
            self.check_lease(id, n.local(t), epoch, "finish promoting");
            let n = self.node_mut(id);
            n.fork_lsn = n.lsn;
            n.pg = PgState::Primary;
            n.timeline += 1;
            n.upstream = None;
            n.receiver_streaming = false;
            n.last_receipt = None;
            n.promoting = None;
            self.log(format!("{id}'s Postgres is promoted (epoch {epoch})"));
        }
    }

    /// What the probe of `id` sees.
    fn seen(&self, id: NodeId) -> Seen {
        let n = self.node(id);
        if n.pg_frozen.is_some() && matches!(n.pg, PgState::Primary | PgState::Replica) {
            return Seen::Unresponsive;
        }
        match n.pg {
            PgState::NoData => Seen::NoData,
            PgState::Primary => Seen::Primary,
            PgState::Replica => Seen::Replica,
            PgState::Stopped | PgState::Fenced => Seen::Down,
            PgState::Unresponsive => Seen::Unresponsive,
        }
    }

    /// The sidecar makes its Postgres run the synchronous standbys the committed state asks
    /// of the primary of `epoch`.
    fn apply_sync(&mut self, id: NodeId, epoch: u64, now: Millis) {
        let n = self.node(id);
        if n.applied.sync.epoch != epoch {
            return;
        }
        let want = syncrules::to_apply(&n.applied.sync).clone();
        let revision = n.applied.sync.revision;
        let switch_lsn = n.lsn;
        let n = self.node_mut(id);
        if let Some(a) = n
            .applied_sync
            .as_mut()
            .filter(|a| a.epoch == epoch && a.set == want)
        {
            a.revision = revision;
            return;
        }
        n.ssn = want.clone();
        n.applied_sync = Some(AppliedSync {
            epoch,
            set: want.clone(),
            revision,
            switch_lsn,
            at: now,
        });
        self.log(format!(
            "{id} applies synchronous standbys {want:?} (epoch {epoch})"
        ));
    }

    fn sync_report(&self, id: NodeId, now: Millis) -> Option<SyncApplied> {
        let n = self.node(id);
        let a = n.applied_sync.as_ref()?;
        let flushed: BTreeMap<NodeId, u64> = self
            .members
            .iter()
            .filter(|&&m| {
                let r = self.node(m);
                r.pg == PgState::Replica && r.upstream == Some(id) && self.hosts_connected(id, m)
            })
            .map(|&m| (m, self.node(m).lsn))
            .collect();
        Some(SyncApplied {
            epoch: a.epoch,
            set: a.set.clone(),
            confirmed: now >= a.at + n.applied.config.tick_ms
                && syncrules::confirmed(&a.set, a.switch_lsn, &flushed),
            revision: a.revision,
        })
    }

    /// Every sidecar's tick, phase by phase: the probe, the report (the leader's answer may
    /// take until `report_timeout`), then the reconcile table on what the probe saw. The guard
    /// and the fence timer act meanwhile on their own clocks.
    fn sidecar_step(&mut self) {
        let t = self.t;
        for id in self.members.clone() {
            let n = self.node(id);
            if n.alive() && n.renewals.is_some() && self.renewing(id) {
                continue;
            }
            loop {
                let n = self.node(id);
                if !n.alive() {
                    break;
                }
                let now = n.local(t);
                match n.tick.clone() {
                    None if now >= n.next_tick => {
                        let done_at = now + self.probe_ms(id);
                        self.node_mut(id).tick = Some(TickPhase::Probing {
                            started: now,
                            done_at,
                        });
                    }
                    Some(TickPhase::Probing { started, done_at }) if now >= done_at => {
                        let (view, judged, sent) = self.observe_and_report(id, now);
                        let done_at = now + self.report_wait_ms(id);
                        self.node_mut(id).tick = Some(TickPhase::Reporting {
                            started,
                            done_at,
                            view,
                            judged,
                            sent: Box::new(sent),
                        });
                    }
                    Some(TickPhase::Reporting {
                        started,
                        done_at,
                        view,
                        judged,
                        sent,
                    }) if now >= done_at => {
                        self.node_mut(id).tick = None;
                        self.act(id, view, judged, *sent, started, now);
                        break;
                    }
                    _ => break,
                }
            }
        }
    }

    /// How long the probe of `id` takes: mostly a few milliseconds, sometimes a loaded host's
    /// hundreds (on a host stalled with its guard, up to the bound), and a frozen Postgres
    /// until the probe's bound, a quarter lease.
    fn probe_ms(&mut self, id: NodeId) -> Millis {
        let cap = self.node(id).applied.config.lease_ms / 4;
        if self.node(id).pg_frozen.is_some() {
            return cap;
        }
        if self.t < self.node(id).loaded_until {
            return self.rng.gen_range(cap / 2..=cap);
        }
        match self.rng.gen_range(0..100) {
            0..=79 => self.rng.gen_range(0..=10),
            80..=96 => self.rng.gen_range(0..=150),
            _ => self.rng.gen_range(0..=cap),
        }
    }

    /// How long the report's call blocks the tick: the leader's answer, or `report_timeout`
    /// when no leader answers (none known, or the link is cut).
    fn report_wait_ms(&mut self, id: NodeId) -> Millis {
        let timeout = report_timeout(&self.node(id).applied.config).as_millis() as Millis;
        let answers = self
            .current_leader_of(id)
            .is_some_and(|l| l == id || (self.can_talk(id, l) && self.can_talk(l, id)));
        if !answers {
            return timeout;
        }
        // A round trip, and the leader's work on it (a write to its log when it grants).
        let rtt = self.rng.gen_range(0..=2 * self.max_delay + 5);
        rtt.min(timeout)
    }

    /// The probe's result judged, reported to the leader and recorded; returns what the
    /// reconcile table will run on.
    fn observe_and_report(
        &mut self,
        id: NodeId,
        now: Millis,
    ) -> (LocalView, PgState, MemberReport) {
        let t = self.t;
        let seen = self.seen(id);
        let n = self.node(id);
        let (was_primary, lease) = (n.last_primary_epoch.is_some(), n.lease);
        let judged = self
            .node_mut(id)
            .assessor
            .assess(seen, was_primary, lease, now);
        if matches!(judged.pg, PgState::Primary | PgState::Replica) {
            // As the sidecar: what a running Postgres writes was never handed over.
            self.node_mut(id).handed_over = None;
        }
        let full = self.node(id).disk_full(t);
        let write_failures = self
            .node_mut(id)
            .assessor
            .judge_write(judged.pg, (judged.pg == PgState::Primary).then_some(!full));
        let free_bytes = Some(if full { 0 } else { 1 << 30 });
        let n = self.node(id);
        let receipt_age = n.last_receipt.map(|r| now.saturating_sub(n.local(r)));
        let report = MemberReport {
            node: id,
            pg: judged.pg,
            consecutive_failures: judged.failures,
            timeline: n.timeline,
            lsn: n.lsn,
            streaming: n.pg == PgState::Replica && n.receiver_streaming,
            wal_receipt_age_ms: receipt_age,
            upstream: n.upstream,
            sync_applied: (judged.pg == PgState::Primary)
                .then(|| self.sync_report(id, now))
                .flatten(),
            leader_stamp: n.leader_stamp,
            epoch_seen: n.epoch_seen,
            sent_at: now,
            storage: StorageReport {
                free_bytes,
                low_space: full,
                cannot_write: (full && judged.pg == PgState::Primary)
                    .then(|| "no space: disk full".to_string()),
                write_failures,
                read_only: false,
                write_probe_ms: None,
            },
            // Replay keeps up with receipt here; a real replica's may lag behind.
            replayed_lsn: (judged.pg == PgState::Replica).then_some(n.lsn),
            handed_over: n
                .handed_over
                .filter(|_| judged.pg == PgState::Fenced)
                .map(|(h, _, _)| h),
            pending_restart: Vec::new(),
            system_identifier: None,
            unguarded: n.unguarded,
            lsn_incomplete: false,
        };
        let sent = report.clone();
        self.report_to_leader(id, report);
        // A Postgres writable as the leased primary is recorded as such (the shipped rule
        // that catches a promotion whose call failed after Postgres was asked to promote).
        let n = self.node(id);
        if let Some(e) = became_primary(
            judged.pg,
            n.applied.primary,
            id,
            n.lease,
            n.last_primary_epoch,
        ) {
            self.node_mut(id).last_primary_epoch = Some(e);
            self.log(format!(
                "{id} records its Postgres as the primary of epoch {e}"
            ));
        }
        // Reconcile.
        let n = self.node(id);
        let view = LocalView {
            pg: judged.pg,
            upstream: n.upstream,
            last_primary_epoch: n.last_primary_epoch,
            crashed: judged.crashed,
            failures: judged.failures,
            epoch_seen: n.epoch_seen,
            // The simulated replicas' follow always streams: a forked history is not
            // modelled here (tests/partition.rs covers it on real Postgres).
            cannot_stream: false,
            free_bytes,
            hand_over: n.applied.plan.is_some_and(|p| {
                p.started
                    && p.kind == PlanKind::Switchover
                    && p.from == id
                    && n.applied.primary.is_some_and(|a| a.epoch == p.epoch)
            }),
            handed_over_to: n
                .handed_over
                .filter(|(h, to, e)| follows_without_rewind(&n.applied, *h, *to, *e))
                .map(|(_, to, e)| (to, e)),
            unguarded: n.unguarded && matches!(judged.pg, PgState::Primary | PgState::Replica),
        };
        (view, judged.pg, sent)
    }

    /// The reconcile table of the tick `started`, on what its probe saw, and its action.
    fn act(
        &mut self,
        id: NodeId,
        view: LocalView,
        judged: PgState,
        sent: MemberReport,
        started: Millis,
        now: Millis,
    ) {
        let t = self.t;
        let tick = self.node(id).applied.config.tick_ms;
        {
            let n = self.node(id);
            let assigned = n.applied.primary;
            let mut step = plan(id, &view, assigned, n.lease, now, &n.applied.config);
            if n.applied.paused {
                step = while_paused(step);
            }
            let epoch = assigned.map(|a| a.epoch).unwrap_or(0);
            match step.action {
                Action::Nothing => {
                    if judged == PgState::Primary && assigned.is_some_and(|a| a.node == id) {
                        self.apply_sync(id, epoch, now);
                    }
                }
                Action::InitPrimary => {
                    self.check_lease(id, now, epoch, "initdb as primary");
                    let n = self.node_mut(id);
                    n.pg = PgState::Primary;
                    n.timeline = 1;
                    n.last_primary_epoch = Some(epoch);
                    n.guard_deadline = n.lease.map(|l| l.expires_at);
                    n.assessor.started();
                    self.log(format!(
                        "{id} initialises the first primary (epoch {epoch})"
                    ));
                }
                Action::Clone { from } => {
                    // A failed clone leaves the data directory empty for the next tick.
                    if self.primary_answers(id, from)
                        && !self.copy_fails(id, from, "clone", "clone_failures")
                    {
                        let (lsn, tl) = (self.node(from).lsn, self.node(from).timeline);
                        let n = self.node_mut(id);
                        n.pg = PgState::Replica;
                        n.upstream = Some(from);
                        n.lsn = lsn;
                        n.timeline = tl;
                        n.ssn = SyncSet::asynchronous();
                        n.assessor.started();
                    }
                }
                Action::StartPrimary => {
                    self.check_lease(id, now, epoch, "start as primary");
                    let n = self.node_mut(id);
                    n.pg = PgState::Primary;
                    n.guard_deadline = n.lease.map(|l| l.expires_at);
                    n.assessor.started();
                    self.log(format!("{id} starts as primary (epoch {epoch})"));
                }
                Action::StartReplica { upstream } => {
                    let n = self.node_mut(id);
                    n.pg = PgState::Replica;
                    n.upstream = upstream;
                    n.receiver_streaming = false;
                    n.assessor.started();
                }
                Action::Promote { epoch } if self.node(id).unguarded => {
                    // The shipped promote() refuses a Postgres that runs outside the guard.
                    self.log(format!(
                        "{id} cannot promote (epoch {epoch}): Postgres is unguarded"
                    ));
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
                    // S6: the new primary holds every write acknowledged synchronously.
                    let lsn = self.node(id).lsn;
                    if lsn < self.acked_sync_high {
                        self.fail(&format!(
                            "S6: {id} promotes at WAL {lsn} but writes up to {} were acknowledged \
                             synchronously",
                            self.acked_sync_high
                        ));
                    }
                    // A switchover loses nothing, even asynchronous: the target replayed past the
                    // old primary's last record.
                    let switchover = self.committed.history.iter().any(|h| {
                        h.to == id && h.epoch == epoch && h.reason.starts_with("switchover")
                    });
                    let acked_before = self.acked_by_epoch.get(&(epoch - 1)).copied();
                    if switchover && acked_before.is_some_and(|a| lsn < a) {
                        self.fail(&format!(
                            "switchover: {id} promotes at WAL {lsn} but the old primary \
                             acknowledged writes up to {acked_before:?}"
                        ));
                    }
                    if switchover {
                        self.plans_done += 1;
                    }
                    let manual = self.committed.history.iter().any(|h| {
                        h.to == id && h.epoch == epoch && h.reason.starts_with("manual failover")
                    });
                    self.manual_failovers += usize::from(manual);
                    self.apply_sync(id, epoch, now);
                    self.promotions.push((id, epoch));
                    // `pg_promote` may take a while on a busy host, sometimes beyond the lease:
                    // the sidecar waits on it and renews its lease meanwhile. Up to two leases,
                    // and never beyond 8 s, so the longest lease choice keeps within the
                    // liveness bound.
                    let lease_ms = self.node(id).applied.config.lease_ms;
                    let took = if self.rng.gen_bool(0.2) {
                        self.rng.gen_range(0..=(2 * lease_ms).min(8_000))
                    } else {
                        self.rng.gen_range(0..=300)
                    };
                    let healed = self.healed;
                    let n = self.node_mut(id);
                    n.guard_deadline = n.lease.map(|l| l.expires_at);
                    n.promoting = Some((epoch, t + took, healed));
                    n.renewals = Some(Renewing {
                        epoch,
                        report: sent,
                        next: now + tick,
                        until: now + lease_ms * RENEWAL_LEASES,
                    });
                    self.log(format!(
                        "{id} promotes (epoch {epoch}, {took} ms): {}",
                        step.reason
                    ));
                }
                Action::Follow { upstream } => {
                    // Following reaches the upstream first; one that cannot be reached is not
                    // tried again for a while in the same epoch (the real backoff).
                    let epoch = assigned.map_or(0, |a| a.epoch);
                    let reachable = self.hosts_connected(id, upstream)
                        && matches!(self.node(upstream).pg, PgState::Primary | PgState::Replica)
                        && self.node(upstream).pg_frozen.is_none();
                    let n = self.node_mut(id);
                    if follow_waits(n.unreachable, upstream, epoch, now) {
                        // Waits; Postgres' own WAL receiver would go on trying meanwhile.
                    } else if reachable {
                        n.upstream = Some(upstream);
                        n.receiver_streaming = false;
                        n.last_receipt = None;
                        n.unreachable = None;
                    } else {
                        n.unreachable = Some(Unreachable {
                            upstream,
                            epoch,
                            until: now + UNREACHABLE_BACKOFF_MS,
                        });
                        self.follow_backoffs += 1;
                    }
                }
                Action::Rejoin { upstream } => {
                    // A failed rewind leaves the member stopped for the next tick.
                    if self.primary_answers(id, upstream)
                        && !self.copy_fails(id, upstream, "rewind", "rewind_failures")
                    {
                        // A rewind takes the upstream's history, WAL position included.
                        let lsn = self.node(upstream).lsn;
                        self.become_replica_of(id, upstream);
                        self.node_mut(id).lsn = lsn;
                        self.log(format!("{id} rejoins as a replica of {upstream}"));
                    }
                }
                Action::HandOver => {
                    let plan = self
                        .node(id)
                        .applied
                        .plan
                        .filter(|p| p.started && p.from == id);
                    // A fast shutdown waits until every connected standby flushed the WAL up
                    // to the shutdown checkpoint; now and then it does not finish in time and
                    // the sidecar fences instead.
                    // A frozen Postgres never finishes its shutdown: the sidecar fences it.
                    let clean = self.node(id).pg_frozen.is_none() && self.rng.gen_bool(0.9);
                    // The shutdown checkpoint is the last record: it starts at `final_lsn`
                    // and a standby that has it is past that.
                    let final_lsn = self.node(id).lsn;
                    if clean {
                        self.node_mut(id).lsn += 1;
                    }
                    let end = self.node(id).lsn;
                    if clean {
                        for m in self.members.clone() {
                            let r = self.node(m);
                            let streams = r.pg == PgState::Replica
                                && r.upstream == Some(id)
                                && !r.disk_full(self.t)
                                && self.hosts_connected(id, m);
                            if streams {
                                let r = self.node_mut(m);
                                r.lsn = r.lsn.max(end);
                            }
                        }
                    }
                    let n = self.node_mut(id);
                    n.pg = PgState::Fenced;
                    n.guard_deadline = None;
                    n.lease = None;
                    n.assessor.fenced_at(now);
                    n.handed_over = plan.filter(|_| clean).map(|p| {
                        (
                            HandedOver {
                                plan: p.id,
                                final_lsn,
                            },
                            p.to,
                            p.epoch,
                        )
                    });
                    self.log(format!(
                        "{id} shuts down for the switchover (clean: {clean}, WAL ends at {final_lsn})"
                    ));
                }
                Action::FollowAfterHandOver { upstream } => {
                    if self.primary_answers(id, upstream) {
                        // S7: without a rewind, this member's WAL must end where the new
                        // primary's timeline forked off it, or it holds writes nobody else has.
                        let (lsn, fork) = (self.node(id).lsn, self.node(upstream).fork_lsn);
                        if lsn > fork {
                            self.fail(&format!(
                                "S7: {id} follows {upstream} without a rewind, but its WAL ends at \
                                 {lsn}, past the fork at {fork}"
                            ));
                        }
                        self.become_replica_of(id, upstream);
                        self.followed_without_rewind += 1;
                        self.log(format!("{id} follows {upstream} without a rewind"));
                    }
                }
                Action::TakeUnderGuard => {
                    // The shipped Instance::take_under_guard: a fast restart under the guard; a
                    // writable server without a lease of the committed epoch is fenced.
                    let n = self.node_mut(id);
                    let leased = n.lease.filter(|l| l.valid_at(now) && l.epoch == epoch);
                    n.unguarded = false;
                    if n.pg == PgState::Primary && leased.is_none() {
                        n.pg = PgState::Fenced;
                        n.lease = None;
                        n.guard_deadline = None;
                        n.assessor.fenced_at(now);
                    } else if n.pg == PgState::Primary {
                        n.guard_deadline = leased.map(|l| l.expires_at);
                        n.assessor.started();
                    } else {
                        n.guard_deadline = None;
                        n.assessor.started();
                    }
                    self.log(format!(
                        "{id} takes its Postgres under the guard: {}",
                        step.reason
                    ));
                }
                Action::Fence => {
                    let n = self.node_mut(id);
                    n.pg = PgState::Fenced;
                    n.unguarded = false;
                    n.guard_deadline = None;
                    n.lease = None;
                    n.assessor.fenced_at(now);
                    self.log(format!("{id} fences: {}", step.reason));
                }
            }
            let n = self.node_mut(id);
            n.epoch_seen = n.epoch_seen.max(epoch);
            n.next_tick = started + tick;
        }
    }

    /// Whether `from`'s Postgres answers `id` as a primary (a frozen one answers nobody).
    fn primary_answers(&self, id: NodeId, from: NodeId) -> bool {
        let f = self.node(from);
        self.hosts_connected(id, from) && f.pg == PgState::Primary && f.pg_frozen.is_none()
    }

    /// A clone or rewind of `id` from `from` that reached its source fails now and then (the
    /// source restarts, a connection drops, WAL it needs was recycled, the disk fills); a
    /// failure is logged and counted as `counter`.
    fn copy_fails(&mut self, id: NodeId, from: NodeId, what: &str, counter: &'static str) -> bool {
        let fails = self.rng.gen_bool(0.15);
        if fails {
            self.log(format!("{id}'s {what} from {from} fails"));
            self.count(counter);
        }
        fails
    }

    /// A former primary runs as a replica of `upstream`, on its timeline, and forgets its time
    /// as primary (its WAL position is the caller's to set).
    fn become_replica_of(&mut self, id: NodeId, upstream: NodeId) {
        let tl = self.node(upstream).timeline;
        let n = self.node_mut(id);
        n.pg = PgState::Replica;
        n.upstream = Some(upstream);
        n.receiver_streaming = false;
        n.last_receipt = None;
        n.last_primary_epoch = None;
        n.handed_over = None;
        n.timeline = tl;
        n.ssn = SyncSet::asynchronous();
        n.applied_sync = None;
        n.assessor.started();
    }

    fn committed_names(&self, id: NodeId, epoch: u64) -> bool {
        self.committed
            .history
            .iter()
            .any(|h| h.to == id && h.epoch == epoch)
    }

    /// A sidecar waiting on its promotion: resends its last report every tick while
    /// `pg_promote` runs (true), and once it returned takes up the tick again (false).
    fn renewing(&mut self, id: NodeId) -> bool {
        let t = self.t;
        let n = self.node_mut(id);
        let now = n.local(t);
        let tick = n.applied.config.tick_ms;
        let Some(r) = n.renewals.as_mut() else {
            return false;
        };
        if n.promoting.is_none() {
            let epoch = r.epoch;
            n.renewals = None;
            if n.pg == PgState::Primary {
                n.next_tick = now;
                // Sometimes the call fails although Postgres promoted (the confirmation or the
                // write of the replication settings after it): only what the tick then sees
                // records the epoch.
                if self.rng.gen_bool(0.15) {
                    self.log(format!(
                        "{id}'s promotion call fails after Postgres promoted (epoch {epoch})"
                    ));
                } else {
                    self.node_mut(id).last_primary_epoch = Some(epoch);
                    self.log(format!("{id} promoted (epoch {epoch})"));
                }
            }
            return false;
        }
        if now < r.next {
            return true;
        }
        r.next = now + tick;
        if now >= r.until {
            return true;
        }
        let report = r.report.resent(now);
        self.report_to_leader(id, report);
        true
    }

    /// `id`'s sidecar sends `report` to the Raft leader it knows, if any.
    fn report_to_leader(&mut self, id: NodeId, report: MemberReport) {
        let Some(l) = self.current_leader_of(id) else {
            return;
        };
        let body = Body::Report {
            report: Box::new(report),
            term: self.node(id).term,
        };
        if l == id {
            // The leader reports to itself without the network.
            self.msgs.push(Msg {
                at: self.t,
                from: id,
                to: id,
                body,
            });
        } else {
            self.send(id, l, body);
        }
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

    /// Writes advance the writable primary's WAL; connected replicas stream it; the primary
    /// acknowledges what its synchronous standbys allow.
    fn wal_step(&mut self) {
        let t = self.t;
        for i in 0..self.nodes.len() {
            if self.nodes[i].writable() && !self.nodes[i].disk_full(t) {
                self.nodes[i].lsn += 100;
            }
        }
        for id in self.members.clone() {
            let n = self.node(id);
            if n.pg != PgState::Replica || n.pg_frozen.is_some() {
                continue;
            }
            let Some(u) = n.upstream else {
                continue;
            };
            let up = self.node(u);
            // A frozen upstream keeps its sockets open and sends nothing: a silent link.
            let silent = !self.hosts_connected(id, u) || up.pg_frozen.is_some();
            if self.node(id).disk_full(t) {
                // The WAL receiver cannot write what arrives: it fails and retries.
                self.node_mut(id).receiver_streaming = false;
            } else if !silent && up.pg == PgState::Primary {
                let (lsn, tl) = (up.lsn, up.timeline);
                let n = self.node_mut(id);
                n.lsn = n.lsn.max(lsn);
                n.timeline = tl;
                n.last_receipt = Some(t);
                n.receiver_streaming = true;
            } else if !silent {
                // The upstream process is gone but its host answers: the socket closes at once.
                self.node_mut(id).receiver_streaming = false;
            } else {
                // A silent cut: the status word lingers until the receiver times out.
                let n = self.node_mut(id);
                if n.last_receipt.is_none_or(|r| t >= r + RECEIVER_TIMEOUT) {
                    n.receiver_streaming = false;
                }
            }
        }
        // Acknowledgements.
        for id in self.members.clone() {
            let p = self.node(id);
            if !p.writable() {
                continue;
            }
            let set = p.ssn.clone();
            if !set.is_synchronous() {
                let lsn = p.lsn;
                self.acked_high = self.acked_high.max(lsn);
                self.ack_in_epoch(id, lsn);
                continue;
            }
            let mut held: Vec<u64> = set
                .members
                .iter()
                .filter(|&&m| {
                    let r = self.node(m);
                    r.pg == PgState::Replica
                        && r.pg_frozen.is_none()
                        && r.upstream == Some(id)
                        && self.hosts_connected(id, m)
                })
                .map(|&m| self.node(m).lsn.min(p.lsn))
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            if let Some(&acked) = held.get(set.k as usize - 1) {
                // The promise (S6) covers what is acknowledged while a synchronous set is
                // committed; before the first one (a new cluster) or after `on` fell back, a
                // write is acknowledged synchronously but nothing relies on it.
                if self.committed.synchronous_set().is_some() {
                    self.acked_sync_high = self.acked_sync_high.max(acked);
                }
                self.acked_high = self.acked_high.max(acked);
                self.ack_in_epoch(id, acked);
            }
        }
    }

    /// Notes a write acknowledged by primary `id` in the epoch it serves.
    fn ack_in_epoch(&mut self, id: NodeId, lsn: u64) {
        if let Some(e) = self.node(id).last_primary_epoch {
            let high = self.acked_by_epoch.entry(e).or_default();
            *high = (*high).max(lsn);
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
        // S4: whatever its sidecar does (running, frozen, killed, or stopped cleanly and
        // detached), a running guard never lets its primary write past the guard's deadline,
        // which is the end of a lease the cluster granted. The guard acts on its own ticks, so
        // one step late is the bound.
        for n in &self.nodes {
            // A Postgres restarted by hand runs outside the guard until its sidecar's next tick
            // takes it under one (or fences it): two ticks at most, each with its probe (a
            // quarter lease at most) and its report (`report_timeout` at most).
            let cfg = &n.applied.config;
            let tick = cfg.tick_ms + cfg.lease_ms / 4 + report_timeout(cfg).as_millis() as u64;
            if n.writable() && n.unguarded && self.t > n.unguarded_at + 2 * tick + STEP {
                self.fail(&format!(
                    "S4: primary {} still writes outside any guard {} ms after it was started by \
                     hand",
                    n.id,
                    self.t - n.unguarded_at
                ));
            }
            // With the guard frozen, the sidecar's fence timer holds the same deadline while the
            // sidecar process runs.
            let fencer = n.guard == Process::Running || n.sidecar == Process::Running;
            if n.writable()
                && !n.unguarded
                && fencer
                && n.guard_deadline.is_none_or(|d| n.local(self.t) >= d + STEP)
            {
                self.fail(&format!(
                    "S4: primary {} writes past its guard's deadline {:?} (local {}, detached {:?})",
                    n.id,
                    n.guard_deadline,
                    n.local(self.t),
                    n.detached_until
                ));
            }
        }
    }

    fn cut_both_ways(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    fn faults(&mut self) {
        let t = self.t;
        // Recoveries.
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            if !self.nodes[i].host_up && t >= self.nodes[i].host_back_at {
                let n = &mut self.nodes[i];
                n.host_up = true;
                n.guard = Process::Running;
                n.guard_deadline = None;
                n.sidecar_restarted(t);
                if n.removed_until.is_some() {
                    // Decommissioned: nothing of pgquorum starts on it.
                    n.sidecar = Process::Dead { until: u64::MAX };
                }
                self.log(format!("host {id} is back"));
            }
            match self.nodes[i].sidecar {
                Process::Frozen { until } if t >= until => {
                    self.nodes[i].sidecar = Process::Running;
                    self.log(format!("sidecar {id} thawed"));
                }
                Process::Dead { until } if t >= until && self.nodes[i].host_up => {
                    self.nodes[i].sidecar_restarted(t);
                    if self.rng.gen_bool(0.3) {
                        // A rolling change of the Raft timings: the new sidecar runs the other
                        // heartbeat, and leads (if elected) before its registration commits.
                        let n = &mut self.nodes[i];
                        n.heartbeat_ms = if n.heartbeat_ms == HEARTBEAT {
                            OTHER_HEARTBEAT
                        } else {
                            HEARTBEAT
                        };
                        n.registered = false;
                        let hb = n.heartbeat_ms;
                        self.log(format!(
                            "sidecar {id} restarts with raft.heartbeat_ms = {hb}"
                        ));
                    }
                    if self.rng.gen_bool(0.25) {
                        self.retag(id);
                    }
                    let n = &mut self.nodes[i];
                    if n.detached_until.take().is_some()
                        && matches!(n.pg, PgState::Primary | PgState::Replica)
                    {
                        // The new sidecar adopts the running guard: a primary's guard holds a
                        // deadline, a replica's none (the real sidecar takes over the same way).
                        let guard_lease = n.guard_deadline.filter(|_| n.pg == PgState::Primary);
                        n.lease = adopted_lease(guard_lease, n.last_primary_epoch);
                        let kept = n.lease.is_some_and(|l| l.valid_at(n.local(t)));
                        self.adoptions += 1;
                        if kept {
                            self.primaries_adopted += 1;
                        }
                        self.log(format!(
                            "sidecar {id} restarted and adopted its running Postgres (lease kept: {kept})"
                        ));
                    } else {
                        self.log(format!("sidecar {id} restarted"));
                    }
                }
                _ => {}
            }
            if let Process::Frozen { until } = self.nodes[i].guard {
                if t >= until {
                    self.nodes[i].guard = Process::Running;
                    self.log(format!("guard {id} thawed"));
                }
            }
            if self.nodes[i].pg_frozen.is_some_and(|until| t >= until) {
                self.nodes[i].pg_frozen = None;
                self.log(format!("Postgres of {id} thawed"));
            }
            if self.nodes[i].removed_until.is_some_and(|until| t >= until) {
                self.add_back(id);
            }
            if self.nodes[i].disk_full_until != 0 && !self.nodes[i].disk_full(t) {
                self.nodes[i].disk_full_until = 0;
                self.log(format!("disk of {id} has room again"));
            }
        }
        if self.cut_until != 0 && t >= self.cut_until {
            self.cut.clear();
            self.cut_until = 0;
            self.log("network cuts healed".into());
        }
        // The operator resumes a pause once it is over, through whichever leader has a quorum
        // (retrying each step until the commit goes through).
        if self.committed.paused && t >= self.paused_until {
            if let Some(l) = self.leader_with_quorum() {
                if self.commit(l, Command::SetPaused { paused: false }) {
                    self.log("operator resumes automatic failover".into());
                }
            }
        }
        if t >= FAULT_PHASE_MS {
            return;
        }
        self.lose_primary_after_shortening();
        // New faults, a few per simulated minute each.
        let p = STEP as f64 / 20_000.0;
        let n = self.nodes.len();
        let victim = self.rng.gen_range(0..n);
        let id = self.nodes[victim].id;
        let guard_ok = self.nodes[victim].guard == Process::Running;
        if self.rng.gen_bool(p) && self.nodes[victim].host_up {
            let back = t + self.rng.gen_range(500..8_000);
            let v = &mut self.nodes[victim];
            v.host_up = false;
            v.host_back_at = back;
            if matches!(v.pg, PgState::Primary | PgState::Replica | PgState::Fenced) {
                v.pg = PgState::Stopped;
            }
            v.sidecar = Process::Dead { until: back };
            v.detached_until = None;
            v.pg_frozen = None;
            self.leaders.remove(&id);
            self.log(format!("host {id} crashes until {back}"));
        } else if self.rng.gen_bool(p)
            && self.nodes[victim].alive()
            && guard_ok
            && !self.nodes[victim].unguarded
        {
            // (A sidecar lost while Postgres runs outside the guard is the operator's risk: no
            // process is left that could fence it.)
            let until = t + self.rng.gen_range(300..8_000);
            if self.rng.gen_bool(0.5) {
                self.nodes[victim].sidecar = Process::Frozen { until };
                self.log(format!("sidecar {id} frozen until {until}"));
            } else if self.rng.gen_bool(0.5) {
                self.nodes[victim].sidecar = Process::Dead { until };
                self.leaders.remove(&id);
                self.log(format!("sidecar {id} killed until {until}"));
            } else if self.nodes[victim].renewals.is_none() {
                // A clean stop for a restart or an upgrade (SIGTERM), taken after the tick under
                // way (so never in the middle of a promotion): the sidecar detaches from its
                // guard, which keeps Postgres for the restart window. Half the restarts are
                // back within a lease, half long after it (a slow upgrade, a failed start).
                let until = if self.rng.gen_bool(0.5) {
                    t + self.rng.gen_range(100..2_000)
                } else {
                    t + self.rng.gen_range(2_000..15_000)
                };
                let window = self.rng.gen_range(1_000..30_000);
                let v = &mut self.nodes[victim];
                v.sidecar = Process::Dead { until };
                v.detached_until = Some(v.local(t) + window);
                self.leaders.remove(&id);
                self.clean_restarts += 1;
                self.log(format!(
                    "sidecar {id} stopped cleanly until {until} (restart window {window} ms)"
                ));
            }
        } else if self.rng.gen_bool(p)
            && self.nodes[victim].host_up
            && matches!(self.nodes[victim].pg, PgState::Primary | PgState::Replica)
        {
            self.nodes[victim].pg = PgState::Stopped;
            if self.rng.gen_bool(0.5) {
                self.log(format!("postmaster of {id} crashes"));
            } else {
                // The postmaster dies with its guard (PDEATHSIG); the sidecar starts a new one.
                self.log(format!("guard of {id} killed: its postmaster dies with it"));
            }
        } else if self.rng.gen_bool(p / 2.0)
            && self.nodes[victim].alive()
            && guard_ok
            && self.nodes[victim].pg == PgState::Primary
        {
            // A frozen guard cannot fence; the sidecar's fence timer does, and its table at the
            // next tick. A guard stalls mostly when its host does (a hung log filesystem, a
            // swap storm): then the sidecar's probes are slow too, up to their bound. (A guard
            // and a sidecar both stopped while Postgres runs on is outside what S4 covers: no
            // process is left that could fence; a whole node frozen is modelled below.)
            let until = t + self.rng.gen_range(200..3_000);
            let v = &mut self.nodes[victim];
            v.guard = Process::Frozen { until };
            if self.rng.gen_bool(0.5) {
                v.loaded_until = until;
            }
            self.log(format!("guard {id} frozen until {until}"));
            if self.cut_until == 0 && self.rng.gen_bool(0.5) {
                // ... and the primary loses the cluster meanwhile: its lease runs out while the
                // guard is still frozen, with only the sidecar left to fence.
                let lease = self.nodes[victim].applied.config.lease_ms;
                let frozen_until = t + lease + self.rng.gen_range(500..3_000);
                self.nodes[victim].guard = Process::Frozen {
                    until: frozen_until,
                };
                let cut_until = t + self.rng.gen_range(3_000..8_000);
                for b in self.members.clone() {
                    if b != id {
                        self.cut_both_ways(id, b);
                    }
                }
                self.cut_until = cut_until;
                self.log(format!("primary {id} cut off until {cut_until}"));
                self.count("guard_frozen_primary_cut_off");
            }
        } else if self.rng.gen_bool(p / 2.0)
            && self.nodes[victim].alive()
            && guard_ok
            && self.nodes[victim].pg_frozen.is_none()
            && !self.nodes[victim].unguarded
        {
            // The whole node stops (a paused VM, a cgroup freeze of the service, a host stalled
            // on its storage): sidecar, guard and Postgres together; or Postgres alone (its
            // processes stopped or stalled) while the sidecar and guard run on.
            let until = t + self.rng.gen_range(200..8_000);
            let v = &mut self.nodes[victim];
            if matches!(v.pg, PgState::Primary | PgState::Replica) {
                v.pg_frozen = Some(until);
            }
            if self.rng.gen_bool(0.5) {
                v.sidecar = Process::Frozen { until };
                v.guard = Process::Frozen { until };
                self.log(format!("node {id} frozen whole until {until}"));
                self.count("whole_node_freezes");
            } else if v.pg_frozen.is_some() {
                self.log(format!("Postgres of {id} frozen until {until}"));
                self.count("postgres_freezes");
            }
        } else if self.rng.gen_bool(p / 4.0)
            && self.members.len() > 3
            && self.nodes[victim].removed_until.is_none()
            && self.committed.primary.is_none_or(|a| a.node != id)
            && self.committed.plan.is_none()
            && !self.leaders.contains_key(&id)
        {
            // The operator removes a replica (decommissions it) and adds it back later with an
            // empty data directory, through the leader with a quorum.
            if self.leader_with_quorum().is_some() {
                let back = t + self.rng.gen_range(2_000..10_000);
                self.remove_member(id, back);
            }
        } else if self.rng.gen_bool(p / 2.0)
            && self.nodes[victim].host_up
            && self.nodes[victim].disk_full_until == 0
        {
            // Up and answering, but nothing can be written: the classic disk-full test.
            let until = t + self.rng.gen_range(500..10_000);
            self.nodes[victim].disk_full_until = until;
            self.log(format!("disk of {id} full until {until}"));
        } else if self.rng.gen_bool(p / 2.0)
            && self.nodes[victim].alive()
            && matches!(self.nodes[victim].pg, PgState::Primary | PgState::Replica)
            && !self.nodes[victim].unguarded
            && self.nodes[victim].renewals.is_none()
        {
            // An operator restarts Postgres by hand (`pg_ctl restart`): the guard exits with the
            // old postmaster, and the new one runs outside any guard, in the same role.
            let v = &mut self.nodes[victim];
            v.unguarded = true;
            v.unguarded_at = t;
            v.guard_deadline = None;
            v.detached_until = None;
            self.log(format!(
                "operator restarts the Postgres of {id} by hand, unguarded"
            ));
        } else if self.rng.gen_bool(p) && self.cut_until == 0 {
            let until = t + self.rng.gen_range(500..10_000);
            let ids: Vec<NodeId> = self.members.iter().copied().collect();
            let kind = self.rng.gen_range(0..4);
            match kind {
                0 => {
                    let groups: Vec<u8> = ids.iter().map(|_| self.rng.gen_range(0..2)).collect();
                    for (i, &a) in ids.iter().enumerate() {
                        for (j, &b) in ids.iter().enumerate() {
                            if groups[i] != groups[j] {
                                self.cut_both_ways(a, b);
                            }
                        }
                    }
                    self.log(format!("partition {groups:?} until {until}"));
                }
                1 => {
                    for &b in ids.iter().filter(|&&b| b != id) {
                        self.cut.insert((id, b));
                    }
                    self.log(format!("packets from {id} dropped until {until}"));
                }
                3 => {
                    // Arbitrary links, some one way: connectivity need not be transitive (A
                    // reaches B, B reaches C, A does not reach C).
                    for &a in &ids {
                        for &b in &ids {
                            if a != b && self.rng.gen_bool(0.3) {
                                self.cut.insert((a, b));
                            }
                        }
                    }
                    let links: Vec<_> = self.cut.iter().copied().collect();
                    self.log(format!("links cut {links:?} until {until}"));
                }
                _ => {
                    for &b in ids.iter().filter(|&&b| b != id) {
                        self.cut.insert((b, id));
                    }
                    self.log(format!("packets to {id} dropped until {until}"));
                }
            }
            self.cut_until = until;
        } else if self.rng.gen_bool(p) {
            self.loss = self.rng.gen_range(0.0..0.3);
            self.max_delay = self.rng.gen_range(1..=300);
            let (loss, delay) = (self.loss, self.max_delay);
            self.log(format!("network: loss {loss:.2}, delay up to {delay} ms"));
        } else if self.rng.gen_bool(p / 4.0) && !self.committed.paused {
            // Maintenance: automatic failover paused for a while, faults going on meanwhile.
            let until = t + self.rng.gen_range(1_000..6_000);
            if let Some(l) = self.leader_with_quorum() {
                if self.commit(l, Command::SetPaused { paused: true }) {
                    self.paused_until = until;
                    self.pauses += 1;
                    self.log(format!("operator pauses automatic failover until {until}"));
                }
            }
        } else if self.rng.gen_bool(p) && self.committed.plan.is_none() {
            // An operator asks for a switchover (now or a little later, to a named member or
            // the best one), or names the successor of a primary that is down, through the
            // leader with a quorum and the same checks the API runs.
            if let Some(l) = self.leader_with_quorum() {
                let to = self
                    .rng
                    .gen_bool(0.5)
                    .then(|| self.rng.gen_range(1..=n as u64));
                let any = self.rng.gen_range(1..=n as u64);
                let later = if self.rng.gen_bool(0.3) {
                    self.t + self.rng.gen_range(100..3_000)
                } else {
                    0
                };
                let cmd = {
                    let ld = &self.leaders[&l];
                    let now = self.node(l).local(t);
                    let view = self.view(now, l);
                    let input = ld.book.policy_input(&view);
                    let primary = input.cluster.primary;
                    let plan = |kind, to| {
                        primary.map(|a| PrimaryPlan {
                            id: 0,
                            kind,
                            epoch: a.epoch,
                            from: a.node,
                            to,
                            not_before_unix_ms: later,
                            requested_at_unix_ms: t,
                            started: false,
                        })
                    };
                    match switchover_target(&input, to) {
                        Ok(target) => plan(PlanKind::Switchover, target),
                        Err(_) => Some(to.unwrap_or(any))
                            .filter(|&to| manual_failover_refusal(&input, to).is_none())
                            .and_then(|to| plan(PlanKind::Failover, to))
                            .filter(|p| {
                                let mut cluster = input.cluster.clone();
                                cluster.plan = Some(PrimaryPlan {
                                    started: true,
                                    ..*p
                                });
                                let mut input = input.clone();
                                input.cluster = &cluster;
                                hypothetical_refusal(&input, p.to).is_none()
                            }),
                    }
                };
                if let Some(plan) = cmd {
                    if self.commit(l, Command::PlanPrimary { plan }) {
                        self.plans += 1;
                    }
                }
            }
        } else if self.rng.gen_bool(p / 2.0) {
            // An operator changes the lease mid-run, through whichever leader has a quorum.
            let (lease, margin) = LEASE_CHOICES[self.rng.gen_range(0..LEASE_CHOICES.len())];
            let leader = self.leaders.iter().find_map(|(l, ld)| {
                (ld.term == self.top_term && self.t - ld.last_quorum_ack <= HEARTBEAT).then_some(*l)
            });
            if let Some(l) = leader {
                let before = self.committed.config.lease_ms;
                let mut changes: BTreeMap<String, String> = [
                    ("lease_ms".to_string(), lease.to_string()),
                    ("drift_margin_ms".to_string(), margin.to_string()),
                ]
                .into();
                // Sometimes the operator changes the replication mode or the tick too.
                if self.rng.gen_bool(0.3) {
                    let mode = ["off", "on", "strict", "quorum"][self.rng.gen_range(0..4)];
                    changes.insert("synchronous_mode".into(), mode.into());
                }
                if self.rng.gen_bool(0.3) {
                    let tick = [100, 250, 400][self.rng.gen_range(0..3)];
                    changes.insert("tick_ms".into(), tick.to_string());
                }
                if self.commit(l, Command::SetConfig { changes })
                    && lease < before
                    && self.rng.gen_bool(0.5)
                {
                    // The primary is lost right after the lease was shortened, once it took a
                    // renewal under the shorter terms: the longer grant it holds still binds.
                    self.lose_primary_at = Some(t + self.rng.gen_range(300..1_500));
                }
            }
        }
    }

    /// A restarted sidecar comes up with other tags: `nofailover` or `nosync` toggled (on at most
    /// one member each, so a candidate and a standby always remain), or another priority. It
    /// registers them as a new member registers.
    fn retag(&mut self, id: NodeId) {
        let others =
            |s: &Self, f: fn(&Tags) -> bool| s.nodes.iter().any(|n| n.id != id && f(&n.tags));
        let kind = self.rng.gen_range(0..3);
        let nofailover_elsewhere = others(self, |t| t.nofailover);
        let nosync_elsewhere = others(self, |t| t.nosync);
        let priority = self.rng.gen_range(0..3);
        let tags = &mut self.node_mut(id).tags;
        match kind {
            0 if !nofailover_elsewhere => tags.nofailover = !tags.nofailover,
            1 if !nosync_elsewhere => tags.nosync = !tags.nosync,
            _ => tags.priority = priority,
        }
        let tags = self.node(id).tags.clone();
        self.node_mut(id).registered = false;
        self.log(format!("sidecar {id} restarts with tags {tags:?}"));
        self.count("tag_changes");
    }

    /// The operator removes member `id` from the Raft membership and stops its sidecar and
    /// Postgres, until `back`.
    fn remove_member(&mut self, id: NodeId, back: u64) {
        self.members.remove(&id);
        let n = self.node_mut(id);
        n.removed_until = Some(back);
        n.sidecar = Process::Dead { until: u64::MAX };
        n.pg = PgState::Stopped;
        n.pg_frozen = None;
        n.promoting = None;
        n.detached_until = None;
        n.unguarded = false;
        self.log(format!("operator removes member {id} until {back}"));
        self.count("members_removed");
    }

    /// Member `id` joins again as a new member: an empty data directory, a new sidecar that
    /// learns the log from the leader and registers itself.
    fn add_back(&mut self, id: NodeId) {
        let t = self.t;
        let n = self.node_mut(id);
        n.removed_until = None;
        n.sidecar_restarted(t);
        n.pg = PgState::NoData;
        n.upstream = None;
        n.last_receipt = None;
        n.receiver_streaming = false;
        n.lsn = 0;
        n.timeline = 0;
        n.fork_lsn = 0;
        n.ssn = SyncSet::asynchronous();
        n.last_primary_epoch = None;
        n.epoch_seen = 0;
        n.guard_deadline = None;
        n.registered = false;
        n.next_tick = 0;
        self.members.insert(id);
        self.log(format!(
            "operator adds member {id} back with an empty data directory"
        ));
        self.count("members_added_back");
    }

    /// The primary's sidecar freezes, or the primary is cut off, at the time set after a
    /// shortened lease: its guard keeps the longer deadline it was fed.
    fn lose_primary_after_shortening(&mut self) {
        if self.lose_primary_at.is_none_or(|at| self.t < at) {
            return;
        }
        self.lose_primary_at = None;
        let Some(p) = self.committed.primary.map(|p| p.node) else {
            return;
        };
        // (A Postgres started by hand outside its guard has no fencer but its sidecar: losing
        // that is the operator's risk, as above.)
        if !self.node(p).alive() || self.node(p).pg != PgState::Primary || self.node(p).unguarded {
            return;
        }
        let until = self.t + self.rng.gen_range(3_000..12_000);
        if self.rng.gen_bool(0.5) {
            self.node_mut(p).sidecar = Process::Frozen { until };
            self.log(format!("sidecar {p} of the primary frozen until {until}"));
        } else if self.cut_until == 0 {
            for b in self.members.clone() {
                if b != p {
                    self.cut_both_ways(p, b);
                }
            }
            self.cut_until = until;
            self.log(format!("primary {p} cut off until {until}"));
        }
    }

    /// A sidecar that restarted with other Raft timings registers them through a leader with
    /// its quorum (the real one does at start, through whichever leader it reaches).
    fn register_step(&mut self) {
        let Some(l) = self.leader_with_quorum() else {
            return;
        };
        let waiting: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| !n.registered && n.alive())
            .map(|n| n.id)
            .filter(|&id| id == l || self.can_talk(id, l))
            .collect();
        for id in waiting {
            let (hb, tags) = (self.node(id).heartbeat_ms, self.node(id).tags.clone());
            if self.commit(l, Command::RegisterMember(member_info(id, hb, tags))) {
                self.node_mut(id).registered = true;
            }
        }
    }

    /// A leader that has its quorum now, if any.
    fn leader_with_quorum(&self) -> Option<NodeId> {
        self.leaders.iter().find_map(|(l, ld)| {
            (ld.term == self.top_term && self.t - ld.last_quorum_ack <= HEARTBEAT).then_some(*l)
        })
    }

    fn heal(&mut self) {
        self.paused_until = self.t;
        self.loss = 0.0;
        self.max_delay = 20;
        self.cut.clear();
        self.cut_until = 0;
        let t = self.t;
        for n in &mut self.nodes {
            if !n.host_up {
                n.host_back_at = t;
            }
            n.disk_full_until = 0;
            match n.sidecar {
                Process::Frozen { .. } => n.sidecar = Process::Frozen { until: t },
                Process::Dead { .. } => n.sidecar = Process::Dead { until: t },
                Process::Running => {}
            }
            if let Process::Frozen { .. } = n.guard {
                n.guard = Process::Frozen { until: t };
            }
            if n.pg_frozen.is_some() {
                n.pg_frozen = Some(t);
            }
            if n.removed_until.is_some() {
                n.removed_until = Some(t);
            }
        }
        self.healed = true;
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
        self.register_step();
        self.policy_step();
        self.wal_step();
        self.check_s1();
        self.t += STEP;
    }

    /// Runs the fault phase and the healed phase; returns the recovery time after healing and
    /// the number of promotions and guard fences seen.
    #[allow(clippy::type_complexity)]
    fn run_with_stats(
        mut self,
    ) -> (
        u64,
        usize,
        usize,
        usize,
        usize,
        [usize; 9],
        BTreeMap<&'static str, usize>,
    ) {
        while self.t < FAULT_PHASE_MS {
            self.step();
        }
        self.heal();
        let healed_at = self.t;
        let acked_at_heal = self.acked_high;
        while self.t < healed_at + LIVENESS_BOUND_MS {
            self.step();
            let writable = self.nodes.iter().any(|n| n.writable());
            if writable && self.acked_high > acked_at_heal && self.t > healed_at + 1_000 {
                let fences = self
                    .events
                    .iter()
                    .filter(|e| e.contains("guard of"))
                    .count();
                return (
                    self.t - healed_at,
                    self.promotions.len(),
                    fences,
                    self.write_failovers,
                    self.pauses,
                    [
                        self.plans,
                        self.plans_done,
                        self.plans_cancelled,
                        self.followed_without_rewind,
                        self.manual_failovers,
                        self.clean_restarts,
                        self.adoptions,
                        self.primaries_adopted,
                        self.follow_backoffs,
                    ],
                    std::mem::take(&mut self.counts),
                );
            }
        }
        self.fail(&format!(
            "liveness: no acknowledged write {LIVENESS_BOUND_MS} ms after every fault healed"
        ));
    }
}

fn seeds() -> (Vec<u64>, Option<u64>) {
    if let Ok(s) = std::env::var("PGQUORUM_SIM_SEED") {
        return (
            vec![s.parse().expect("PGQUORUM_SIM_SEED must be a number")],
            None,
        );
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let n = env("PGQUORUM_SIM_SEEDS", 1500);
    let base = env("PGQUORUM_SIM_SEED_BASE", 0);
    let fresh_n = env("PGQUORUM_SIM_FRESH", 500);
    // Fresh seeds far from the fixed range, different every run.
    let fresh_base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        % (1 << 40)
        + (1 << 32);
    let mut all: Vec<u64> = (base..base + n).collect();
    all.extend(fresh_base..fresh_base + fresh_n);
    (all, Some(fresh_base))
}

#[test]
fn s1_s5_s6_and_liveness_hold_under_seeded_faults() {
    let started = std::time::Instant::now();
    let mut worst = 0;
    let (mut promotions, mut fences, mut write_failovers, mut pauses) = (0, 0, 0, 0);
    // Plans made, done, cancelled; followed without a rewind; manual failovers; clean sidecar
    // stops, adoptions, primaries adopted with their lease running; follows that backed off.
    let mut plans = [0usize; 9];
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (seeds, fresh_base) = seeds();
    if let Some(b) = fresh_base {
        eprintln!("simulation: fresh seeds start at {b} (replay one with PGQUORUM_SIM_SEED)");
    }
    for &seed in &seeds {
        let size = if seed % 3 == 0 { 5 } else { 3 };
        let (recovered_in, p, f, w, z, planned, counted) = Sim::new(seed, size).run_with_stats();
        for (k, v) in counted {
            *counts.entry(k).or_default() += v;
        }
        pauses += z;
        for (sum, n) in plans.iter_mut().zip(planned) {
            *sum += n;
        }
        worst = worst.max(recovered_in);
        promotions += p;
        fences += f;
        write_failovers += w;
    }
    eprintln!(
        "FIGURE simulation seeds={} promotions={promotions} guard_fences={fences} \
         failovers_for_a_primary_that_cannot_write={write_failovers} pauses={pauses} \
         plans={} switchovers_done={} plans_cancelled={} followed_without_rewind={} \
         manual_failovers={} clean_sidecar_stops={} adoptions={} primaries_adopted_in_lease={} follow_backoffs={} \
         worst_recovery_after_heal_ms={worst} wall_ms={}",
        seeds.len(),
        plans[0],
        plans[1],
        plans[2],
        plans[3],
        plans[4],
        plans[5],
        plans[6],
        plans[7],
        plans[8],
        started.elapsed().as_millis()
    );
    eprintln!("FIGURE simulation_faults {counts:?}");
    // Each later fault must have happened, or the run proves nothing about it.
    for what in [
        "fence_timer_fences",
        "whole_node_freezes",
        "postgres_freezes",
        "clone_failures",
        "rewind_failures",
        "tag_changes",
        "members_removed",
        "members_added_back",
        "guard_frozen_primary_cut_off",
    ] {
        let n = counts.get(what).copied().unwrap_or(0);
        assert!(
            n >= seeds.len() / 100,
            "too few {what}: {n} in {} seeds",
            seeds.len()
        );
    }
    // The faults must actually move the primary around, or the run proves nothing.
    assert!(
        promotions >= seeds.len() / 2,
        "too few failovers: {promotions}"
    );
    assert!(
        write_failovers >= seeds.len() / 20,
        "too few failovers of a primary that cannot write: {write_failovers}"
    );
    assert!(
        pauses >= seeds.len() / 20,
        "too few maintenance pauses: {pauses}"
    );
    assert!(
        plans[4] >= seeds.len() / 100,
        "too few manual failovers: {}",
        plans[4]
    );
    assert!(
        plans[8] >= seeds.len() / 50,
        "too few follows of an unreachable upstream that backed off: {}",
        plans[8]
    );
    assert!(
        plans[6] >= seeds.len() / 10 && plans[7] >= seeds.len() / 40,
        "too few sidecar restarts that adopted a running Postgres ({}) or kept a primary ({})",
        plans[6],
        plans[7]
    );
    assert!(
        plans[1] >= seeds.len() / 4 && plans[3] >= seeds.len() / 8,
        "too few switchovers completed ({}) or former primaries that followed without a rewind \
         ({})",
        plans[1],
        plans[3]
    );
}

#[test]
fn a_healthy_cluster_gets_its_first_primary_quickly_and_keeps_it() {
    for mode in [
        SyncMode::Off,
        SyncMode::On,
        SyncMode::Strict,
        SyncMode::Quorum,
    ] {
        let mut sim = Sim::new(12345, 3);
        sim.committed.config.synchronous_mode = mode;
        for n in &mut sim.nodes {
            n.applied.config.synchronous_mode = mode;
        }
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
        // Synchronous modes end up waiting for a standby, committed and applied.
        let sync = sim.committed.synchronous_set().cloned();
        assert_eq!(
            sync.is_some(),
            mode.is_synchronous(),
            "{mode}: {:?}",
            sim.events
        );
        assert!(sim.acked_high > 0, "{mode}: writes are acknowledged");
        if mode.is_synchronous() {
            assert!(sim.acked_sync_high > 0, "{mode}: synchronously");
        }
    }
}
