//! The Raft leader's failover duty, at the I/O edge of the pure policy: it keeps the members'
//! reports (soft state, reset when leadership changes), answers reports with lease renewals,
//! confirms its quorum every heartbeat, and commits the policy's promotions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::ServerState;
use tokio::sync::watch;

pub use super::duty::{duty_blocked, DutyBlock, Grant, ReportAnswer};
use super::duty::{DutyView, LeaderBook, RaftFacts};
use super::lease::Millis;
use super::plan::{hypothetical_refusal, manual_failover_refusal, switchover_target};
use super::policy::Verdict;
use super::report::{MemberReport, PgState};
use crate::cluster_state::{Command, CommandOutcome, PlanKind, SyncSet};
use crate::events::EventLog;
use crate::network::Dialer;
use crate::store::state_machine::AppliedState;
use crate::types::{NodeId, Raft};

/// How often the leader re-evaluates while a failover is due.
const FAILOVER_POLL: Duration = Duration::from_millis(50);

/// Milliseconds of `CLOCK_BOOTTIME`: one clock for every lease computation of this host, which
/// keeps counting while the host is suspended (so is the guard's).
pub fn boot_clock_ms() -> Millis {
    pg_supervisor::lease::clock_now_ns() / 1_000_000
}

/// Wall-clock milliseconds since the Unix epoch (for the history and planned times only).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the leader currently knows of one member, for the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHealth {
    /// Postgres as last reported.
    pub pg: PgState,
    /// Timeline.
    pub timeline: u32,
    /// WAL position.
    pub lsn: u64,
    /// Whether the report is recent (within one lease).
    pub fresh: bool,
    /// Room and write health.
    pub storage: super::report::StorageReport,
    /// Settings waiting for a restart.
    pub pending_restart: Vec<String>,
    /// Postgres runs outside the member's guard.
    pub unguarded: bool,
}

/// The leader-side failover state of one sidecar (inactive while it is not the leader).
pub struct FailoverLeader {
    node_id: NodeId,
    raft: Raft,
    state: watch::Receiver<Arc<AppliedState>>,
    heartbeat_ms: u64,
    book: Mutex<LeaderBook>,
    events: EventLog,
    dialer: Dialer,
}

impl FailoverLeader {
    /// The duty of node `node_id`, which runs Raft with heartbeats every `heartbeat_ms`; leases
    /// are granted only while the last quorum confirmation is at most three heartbeats old.
    pub fn new(
        node_id: NodeId,
        raft: Raft,
        state: watch::Receiver<Arc<AppliedState>>,
        heartbeat_ms: u64,
        events: EventLog,
        dialer: Dialer,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            raft,
            state,
            heartbeat_ms,
            book: Mutex::new(LeaderBook::default()),
            events,
            dialer,
        })
    }

    fn now(&self) -> Millis {
        boot_clock_ms()
    }

    fn quorum_ack_max_ms(&self) -> u64 {
        super::lease::quorum_ack_max_ms(self.heartbeat_ms)
    }

    /// What the duty is judged by now, besides the book.
    fn view<'a>(
        &self,
        state: &'a AppliedState,
        members: &'a std::collections::BTreeSet<NodeId>,
        now: Millis,
    ) -> DutyView<'a> {
        DutyView {
            me: self.node_id,
            cluster: &state.cluster,
            applied_index: state.last_applied.map(|l| l.index),
            members,
            heartbeat_ms: self.heartbeat_ms,
            now,
            now_unix_ms: unix_ms(),
        }
    }

    /// Raft facts for a hand-off.
    fn raft_facts(&self, state: &AppliedState) -> RaftFacts {
        let voters = state.membership.membership().voter_ids().collect();
        let metrics = self.raft.metrics().borrow().clone();
        let last_index = metrics.last_log_index;
        let caught_up = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(_, matched)| matched.map(|m| m.index) == last_index)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        RaftFacts {
            voters,
            caught_up,
            raft_leader_lease_ms: self.raft.config().election_timeout_max,
        }
    }

    /// This node's term if it leads now.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.state == ServerState::Leader && m.current_leader == Some(self.node_id))
            .then_some(m.current_term)
    }

    /// Runs `f` on the book of the current term, resetting it when the term changed: reports
    /// and grants of an earlier leadership say nothing about this one.
    fn with_book<T>(&self, term: u64, f: impl FnOnce(&mut LeaderBook) -> T) -> Option<T> {
        let mut book = self.book.lock().ok()?;
        if book.term != term {
            *book = LeaderBook::new(term, self.now());
            tracing::info!(term, "took office as Raft leader: failover duty starts");
        }
        Some(f(&mut book))
    }

    /// Checks a switchover (to `to`, or to the best replica) or a manual failover (to `to`)
    /// against this leader's reports; returns the plan to commit, or why it is refused.
    pub fn check_plan(
        &self,
        kind: PlanKind,
        to: Option<NodeId>,
        not_before_unix_ms: u64,
    ) -> Result<Command, String> {
        let term = self
            .leading_term()
            .ok_or("this node is not the Raft leader")?;
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        let primary = state
            .cluster
            .primary
            .ok_or("no primary has been chosen yet")?;
        let view = self.view(&state, &members, now);
        self.with_book(term, |book| {
            if let Some(why) = book.blocked(&view) {
                return Err(why.to_string());
            }
            let input = book.policy_input(&view);
            let to = match kind {
                PlanKind::Switchover => switchover_target(&input, to)?,
                PlanKind::Failover => {
                    let to = to.ok_or("a manual failover needs --to NODE")?;
                    if let Some(why) = manual_failover_refusal(&input, to) {
                        return Err(why);
                    }
                    to
                }
            };
            let plan = crate::cluster_state::PrimaryPlan {
                id: 0,
                kind,
                epoch: primary.epoch,
                from: primary.node,
                to,
                not_before_unix_ms,
                requested_at_unix_ms: unix_ms(),
                started: false,
            };
            // A manual failover must name a member the policy could promote once every wait
            // is over; a switchover's target was checked above.
            if kind == PlanKind::Failover {
                let mut cluster = state.cluster.clone();
                cluster.plan = Some(crate::cluster_state::PrimaryPlan {
                    started: true,
                    ..plan
                });
                let view = DutyView {
                    cluster: &cluster,
                    ..view
                };
                let input = book.policy_input(&view);
                if let Some(why) = hypothetical_refusal(&input, to) {
                    return Err(why);
                }
            }
            Ok(Command::PlanPrimary { plan })
        })
        .ok_or("the failover book is unavailable")?
    }

    /// Handles a member's report; `None` when this node does not lead.
    pub fn on_report(&self, report: MemberReport) -> Option<ReportAnswer> {
        let term = self.leading_term()?;
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        let view = self.view(&state, &members, now);
        self.with_book(term, |book| book.on_report(&view, report))
    }

    /// The members as the leader's reports show them, and the latest non-steady verdict.
    pub fn health(&self) -> (BTreeMap<NodeId, MemberHealth>, String) {
        let now = self.now();
        let lease = self.state.borrow().cluster.config.lease_ms;
        let Ok(book) = self.book.lock() else {
            return (BTreeMap::new(), String::new());
        };
        if self.leading_term() != Some(book.term) {
            return (BTreeMap::new(), String::new());
        }
        let map = book
            .reports
            .iter()
            .map(|(id, r)| {
                (
                    *id,
                    MemberHealth {
                        pg: r.report.pg,
                        timeline: r.report.timeline,
                        lsn: r.report.lsn,
                        fresh: now.saturating_sub(r.at) <= lease,
                        storage: r.report.storage.clone(),
                        pending_restart: r.report.pending_restart.clone(),
                        unguarded: r.report.unguarded,
                    },
                )
            })
            .collect();
        (map, book.verdict.clone())
    }

    /// Every tick while leading: run the policy and commit its promotion. A second task
    /// confirms the quorum every `confirm_every` (which bounds lease grants), so a slow commit
    /// never starves the renewals of a healthy primary.
    pub async fn run(self: Arc<Self>, confirm_every: Duration, stop: watch::Receiver<bool>) {
        tokio::spawn(self.clone().confirm_quorum(confirm_every, stop.clone()));
        let mut stop = stop;
        loop {
            // While a failover is due, look again every few tens of milliseconds: the moment a
            // lease is known over should not wait for the next tick.
            let due = self.book.lock().is_ok_and(|b| !b.verdict.is_empty());
            let tick = Duration::from_millis(self.state.borrow().cluster.config.tick_ms);
            let pause = if due { FAILOVER_POLL.min(tick) } else { tick };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(pause) => {}
            }
            let Some(term) = self.leading_term() else {
                continue;
            };
            match self.decide(term) {
                Some(Verdict::Promote {
                    node,
                    epoch,
                    reason,
                    lsn,
                    sync,
                }) => self.promote(term, node, epoch, reason, lsn, sync).await,
                Some(Verdict::Steady) => self.upkeep(term).await,
                Some(Verdict::Wait { .. }) => self.hand_off_if_blocked(term).await,
                Some(Verdict::StartPlan { id }) => {
                    self.commit_plan_step(Command::StartPlan { id }).await
                }
                Some(Verdict::CancelPlan { id, reason }) => {
                    self.commit_plan_step(Command::CancelPlan { id, reason })
                        .await
                }
                _ => {}
            }
        }
    }

    /// The leader's chores while the primary is healthy ([`LeaderBook::upkeep`]).
    async fn upkeep(&self, term: u64) {
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        let raft = self.raft_facts(&state);
        let view = self.view(&state, &members, now);
        let Some(upkeep) = self.with_book(term, |book| book.upkeep(&view, &raft)) else {
            return;
        };
        let epoch = state.cluster.primary.map_or(0, |p| p.epoch);
        if let Some(cmd) = upkeep.command {
            let routine = matches!(cmd, Command::RecordPrimaryLsn { .. });
            let degrades = matches!(&cmd, Command::CommitSync { set, .. } if !set.is_synchronous())
                && state.cluster.config.synchronous_mode != crate::dynamic_config::SyncMode::Off;
            let restores = matches!(&cmd, Command::CommitSync { set, .. } if set.is_synchronous())
                && state.cluster.synchronous_degraded();
            let what = format!("{cmd:?}");
            match self.raft.client_write(cmd).await {
                Ok(r) if r.data == CommandOutcome::Applied => {
                    tracing::info!(epoch, "committed {what}");
                    if degrades {
                        let text = "synchronous replication DEGRADED: no synchronous standby is \
                                    fit, so commits no longer wait for one; a crash of the \
                                    primary now loses up to maximum_lag_on_failover of \
                                    acknowledged writes";
                        tracing::warn!(epoch, "{text}");
                        self.events.record("failover", text.to_string(), epoch, 0);
                    } else if restores {
                        tracing::info!(epoch, "synchronous replication restored: {what}");
                        self.events.record(
                            "failover",
                            format!("synchronous replication restored: committed {what}"),
                            epoch,
                            0,
                        );
                    } else if !routine {
                        self.events
                            .record("failover", format!("committed {what}"), epoch, 0);
                    }
                }
                Ok(r) => tracing::warn!(outcome = ?r.data, "{what} refused"),
                Err(e) => tracing::warn!(error = %e, "{what} not committed"),
            }
        }
        if let Some(target) = upkeep.handoff {
            self.hand_off(term, target, &state).await;
        }
    }

    /// A leader that may not do its duty for its Raft timings hands leadership to a member
    /// that can ([`LeaderBook::handoff_while_blocked`]); a cluster must never stay without
    /// grants and promotions because one member leads with other timings.
    async fn hand_off_if_blocked(&self, term: u64) {
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        let raft = self.raft_facts(&state);
        let view = self.view(&state, &members, now);
        let target = self
            .with_book(term, |book| book.handoff_while_blocked(&view, &raft))
            .flatten();
        if let Some(target) = target {
            tracing::warn!(
                term,
                target,
                heartbeat_ms = self.heartbeat_ms,
                "this leader's Raft timings are not registered yet: handing leadership over"
            );
            self.hand_off(term, target, &state).await;
        }
    }

    /// Asks `target` to stand for election: this node runs the primary, and a host crash here
    /// would cost an election plus a new leader's wait before the lease question is even asked.
    async fn hand_off(&self, term: u64, target: NodeId, state: &AppliedState) {
        let Some(addr) = state
            .membership
            .membership()
            .get_node(&target)
            .map(|n| n.addr.clone())
        else {
            return;
        };
        tracing::info!(
            term,
            target,
            "asking member {target} to take Raft leadership"
        );
        let payload = serde_json::json!({ "from": self.node_id, "term": term }).to_string();
        let call = async {
            let channel = self.dialer.kept(&addr).ok()?;
            let mut client = crate::proto::raft_transport_client::RaftTransportClient::new(channel);
            client
                .take_leadership(crate::proto::RaftMessage {
                    payload: payload.into_bytes(),
                })
                .await
                .ok()
        };
        if tokio::time::timeout(Duration::from_millis(500), call)
            .await
            .ok()
            .flatten()
            .is_none()
        {
            tracing::warn!(target, "member {target} did not take the hand-off request");
        }
    }

    async fn confirm_quorum(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) {
        // Rounds start every `every`, not `every` after the last one ended: the contact a grant
        // is judged by is then at most one round trip plus `every` old.
        let mut rounds = tokio::time::interval(every);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = rounds.tick() => {}
            }
            let Some(term) = self.leading_term() else {
                continue;
            };
            // Only a committed primary needs leases; a Raft-only group skips the heartbeats.
            if self.state.borrow().cluster.primary.is_none() {
                continue;
            }
            let asked = self.now();
            let limit = Duration::from_millis(self.quorum_ack_max_ms());
            let confirm = tokio::time::timeout(limit, self.raft.get_read_log_id()).await;
            if let Ok(Ok((read_log_id, _))) = confirm {
                // Counted from before the heartbeats left: never younger than the real contact.
                self.with_book(term, |b| {
                    b.quorum_confirmed(asked, read_log_id.map(|l| l.index).unwrap_or(0))
                });
            }
        }
    }

    /// One policy round ([`LeaderBook::decide`]): a promotion it decides is pending from the
    /// same step on, so the primary it demotes gets no further lease.
    fn decide(&self, term: u64) -> Option<Verdict> {
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        let view = self.view(&state, &members, now);
        let decision = self.with_book(term, |book| book.decide(&view))?;
        if let Some(a) = decision.announce {
            let epoch = state.cluster.primary.map(|p| p.epoch).unwrap_or(0);
            tracing::info!(epoch, "failover: {}", a.text);
            if a.new_kind {
                self.events.record("failover", a.text, epoch, 0);
            }
        }
        Some(decision.verdict)
    }

    async fn commit_plan_step(&self, cmd: Command) {
        let epoch = self.state.borrow().cluster.primary.map_or(0, |p| p.epoch);
        let what = match &cmd {
            Command::StartPlan { id } => {
                format!("switchover plan {id} starts: the primary shuts down")
            }
            Command::CancelPlan { id, reason } => format!("plan {id} ends: {reason}"),
            other => format!("{other:?}"),
        };
        match self.raft.client_write(cmd).await {
            Ok(r) if r.data == CommandOutcome::Applied => {
                tracing::info!(epoch, "{what}");
                self.events.record("failover", what, epoch, 0);
            }
            Ok(r) => tracing::warn!(outcome = ?r.data, "{what}: refused"),
            Err(e) => tracing::warn!(error = %e, "{what}: not committed"),
        }
    }

    async fn promote(
        &self,
        term: u64,
        node: NodeId,
        epoch: u64,
        reason: String,
        lsn: u64,
        sync: SyncSet,
    ) {
        let at_unix_ms = unix_ms();
        let cmd = Command::Promote {
            node,
            epoch,
            reason: reason.clone(),
            at_unix_ms,
            lsn: Some(lsn),
            sync: sync.clone(),
        };
        // The decision made the promotion pending: until the applied state shows it, the
        // demoted primary gets no lease (one granted now would outlive the decision).
        let outcome = self.raft.client_write(cmd).await;
        if let Ok(r) = &outcome {
            if r.data != CommandOutcome::Applied {
                // Applied and refused: nothing changed, nothing pending.
                self.with_book(term, |b| b.promotion_refused());
            }
        }
        match outcome {
            Ok(r) if r.data == CommandOutcome::Applied => {
                tracing::info!(node, epoch, lsn, sync = ?sync.members, k = sync.k, %reason, "committed new primary");
                self.events.record(
                    "failover",
                    format!("committed member {node} as primary: {reason}"),
                    epoch,
                    lsn,
                );
            }
            Ok(r) => tracing::warn!(node, epoch, outcome = ?r.data, "promotion refused"),
            Err(e) => tracing::warn!(node, epoch, error = %e, "promotion not committed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::duty::DutyView;

    fn view(state: &AppliedState, heartbeat_ms: u64) -> DutyView<'_> {
        static MEMBERS: std::sync::OnceLock<std::collections::BTreeSet<NodeId>> =
            std::sync::OnceLock::new();
        DutyView {
            me: 1,
            cluster: &state.cluster,
            applied_index: state.last_applied.map(|l| l.index),
            members: MEMBERS.get_or_init(Default::default),
            heartbeat_ms,
            now: 0,
            now_unix_ms: 0,
        }
    }

    fn applied_at(index: u64) -> AppliedState {
        AppliedState {
            last_applied: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                index,
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_leader_neither_grants_nor_promotes_on_a_state_older_than_its_read_index() {
        // A new leader whose applied state lags may not yet see a promotion its predecessor
        // committed: it would renew the demoted primary's lease.
        let state = applied_at(41);
        assert_eq!(
            duty_blocked(&view(&state, 150), Some(42)),
            Some(DutyBlock::CatchingUp)
        );
        assert_eq!(
            duty_blocked(&view(&state, 150), None),
            Some(DutyBlock::CatchingUp),
            "no confirmation yet"
        );
        let state = applied_at(42);
        assert_eq!(duty_blocked(&view(&state, 150), Some(42)), None);
    }

    #[test]
    fn a_leader_with_a_longer_heartbeat_than_registered_neither_grants_nor_promotes() {
        let mut state = applied_at(42);
        state.cluster.raft_heartbeat_ms = Some(150);
        assert_eq!(duty_blocked(&view(&state, 150), Some(42)), None);
        assert!(matches!(
            duty_blocked(&view(&state, 300), Some(42)),
            Some(DutyBlock::UnregisteredTimings { ours: 300, .. })
        ));
    }
}
