//! The Raft leader's failover duty, at the I/O edge of the pure policy: it keeps the members'
//! reports (soft state, reset when leadership changes), answers reports with lease renewals,
//! confirms its quorum every heartbeat, and commits the policy's promotions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::ServerState;
use tokio::sync::watch;

use super::lease::{new_leader_wait, LeaseTerms, Millis};
use super::plan::{hypothetical_refusal, manual_failover_refusal, switchover_target};
use super::policy::{
    decide, leadership_handoff, may_grant_lease, sync_step, GrantRecord, PolicyInput, Verdict,
};
use super::report::{LeaderStamp, MemberReport, PgState, ReportBook};
use super::sync::SyncStep;
use crate::cluster_state::{Command, CommandOutcome, PlanKind, PrimaryAssignment, SyncSet};
use crate::events::EventLog;
use crate::network::Dialer;
use crate::store::state_machine::AppliedState;
use crate::types::{NodeId, Raft};

/// The primary's WAL position is committed at most this often (it bounds replicas' lag for a
/// leader that never heard the primary).
const LSN_RECORD_EVERY_MS: Millis = 2_000;
/// How often the leader re-evaluates while a failover is due.
const FAILOVER_POLL: Duration = Duration::from_millis(50);
/// A leader on the primary's node asks another member to take over at most this often.
const HANDOFF_EVERY_MS: Millis = 2_000;

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

/// A renewal granted to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Epoch of the lease.
    pub epoch: u64,
    /// Length, counted by the holder from when it sent the report.
    pub lease_ms: u64,
}

/// The leader's answer to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportAnswer {
    /// The lease renewal, if granted.
    pub grant: Option<Grant>,
    /// This leader's term and clock, for the member to echo in its next report.
    pub stamp: LeaderStamp,
    /// A failover waits for reports sent after the old primary stopped: report again now.
    pub report_again: bool,
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
}

#[derive(Default)]
struct Book {
    term: u64,
    since: Millis,
    reports: ReportBook,
    last_grant: Option<GrantRecord>,
    quorum_confirmed_at: Option<Millis>,
    /// The log index the last quorum confirmation read at: an applied state older than it may
    /// miss a promotion a predecessor committed.
    read_index: Option<u64>,
    /// A promotion this leader is committing.
    pending: Option<PrimaryAssignment>,
    ceiling_seen_at: Option<Millis>,
    lsn_recorded_at: Option<Millis>,
    handoff_at: Option<Millis>,
    /// The last verdict waits for fresh reports.
    awaiting_reports: bool,
    verdict: String,
    /// The started plan this leader saw, and when it first saw it.
    plan_seen: Option<(u64, Millis)>,
}

/// The leader-side failover state of one sidecar (inactive while it is not the leader).
pub struct FailoverLeader {
    node_id: NodeId,
    raft: Raft,
    state: watch::Receiver<Arc<AppliedState>>,
    heartbeat_ms: u64,
    book: Mutex<Book>,
    events: EventLog,
    dialer: Dialer,
}

/// Why this leader may neither grant nor promote right now, if it may not.
pub fn duty_blocked(
    state: &AppliedState,
    read_index: Option<u64>,
    heartbeat_ms: u64,
) -> Option<String> {
    if let Some(hb) = state.cluster.raft_heartbeat_ms {
        if hb != heartbeat_ms {
            return Some(format!(
                "this leader runs raft.heartbeat_ms = {heartbeat_ms} but the cluster runs {hb}: \
                 its lease arithmetic would not match its predecessors'; fix its config"
            ));
        }
    }
    let applied = state.last_applied.map(|l| l.index);
    match read_index {
        Some(ri) if applied.is_some_and(|a| a >= ri) => None,
        _ => Some("waiting for the applied state to catch up with the committed log".into()),
    }
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
            book: Mutex::new(Book::default()),
            events,
            dialer,
        })
    }

    fn now(&self) -> Millis {
        boot_clock_ms()
    }

    fn quorum_ack_max_ms(&self) -> u64 {
        3 * self.heartbeat_ms
    }

    /// This node's term if it leads now.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.state == ServerState::Leader && m.current_leader == Some(self.node_id))
            .then_some(m.current_term)
    }

    /// Runs `f` on the book of the current term, resetting it when the term changed: reports
    /// and grants of an earlier leadership say nothing about this one.
    fn with_book<T>(&self, term: u64, f: impl FnOnce(&mut Book) -> T) -> Option<T> {
        let mut book = self.book.lock().ok()?;
        if book.term != term {
            *book = Book {
                term,
                since: self.now(),
                ..Book::default()
            };
            tracing::info!(term, "took office as Raft leader: failover duty starts");
        }
        Some(f(&mut book))
    }

    fn policy_input<'a>(
        &self,
        book: &'a Book,
        now: Millis,
        state: &'a AppliedState,
        members: &'a std::collections::BTreeSet<NodeId>,
    ) -> PolicyInput<'a> {
        PolicyInput {
            now,
            term: book.term,
            leader_since: book.since,
            quorum_ack_max_ms: self.quorum_ack_max_ms(),
            cluster: &state.cluster,
            members,
            reports: &book.reports,
            last_grant: book.last_grant,
            pending: book.pending,
            now_unix_ms: unix_ms(),
            plan_started_seen: book.plan_seen.map(|(_, at)| at),
        }
    }

    /// Notes when this leader first saw the current plan started.
    fn see_plan(book: &mut Book, state: &AppliedState, now: Millis) {
        let started = state.cluster.plan.filter(|p| p.started).map(|p| p.id);
        if book.plan_seen.map(|(id, _)| id) != started {
            book.plan_seen = started.map(|id| (id, now));
        }
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
        self.with_book(term, |book| {
            if let Some(why) = duty_blocked(&state, book.read_index, self.heartbeat_ms) {
                return Err(why);
            }
            let input = self.policy_input(book, now, &state, &members);
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
                let mut input = self.policy_input(book, now, &state, &members);
                input.cluster = &cluster;
                if let Some(why) = hypothetical_refusal(&input, to) {
                    return Err(why);
                }
            }
            Ok(Command::PlanPrimary { plan })
        })
        .ok_or("the failover book is unavailable")?
    }

    /// Forgets a pending promotion once the applied state shows it (or a later one).
    fn settle_pending(book: &mut Book, state: &AppliedState) {
        let applied_epoch = state.cluster.primary.map(|p| p.epoch).unwrap_or(0);
        if book.pending.is_some_and(|p| applied_epoch >= p.epoch) {
            book.pending = None;
        }
    }

    /// Handles a member's report; `None` when this node does not lead.
    pub fn on_report(&self, report: MemberReport) -> Option<ReportAnswer> {
        let term = self.leading_term()?;
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        self.with_book(term, |book| {
            let granted = book
                .last_grant
                .filter(|g| g.node == report.node)
                .map(|g| g.report_sent_at);
            let fresh = super::policy::wal_fresh_ms(&state.cluster.config);
            super::report::record(&mut book.reports, report.clone(), now, granted, fresh);
            Self::settle_pending(book, &state);
            let grant = self.grant(book, now, &state, &members, &report);
            ReportAnswer {
                grant,
                stamp: LeaderStamp { term, at: now },
                report_again: book.awaiting_reports,
            }
        })
    }

    fn grant(
        &self,
        book: &mut Book,
        now: Millis,
        state: &AppliedState,
        members: &std::collections::BTreeSet<NodeId>,
        report: &MemberReport,
    ) -> Option<Grant> {
        let primary = state.cluster.primary.is_some_and(|p| p.node == report.node);
        if let Some(why) = duty_blocked(state, book.read_index, self.heartbeat_ms) {
            if primary {
                tracing::debug!(node = report.node, ?why, "no lease for the primary yet");
            }
            return None;
        }
        let ack_age = book.quorum_confirmed_at.map(|t| now.saturating_sub(t));
        let input = self.policy_input(book, now, state, members);
        let Some(epoch) = may_grant_lease(&input, report, ack_age) else {
            if primary {
                tracing::debug!(
                    node = report.node,
                    ?ack_age,
                    pg = ?report.pg,
                    failures = report.consecutive_failures,
                    pending = ?input.pending,
                    "no lease renewal for the primary"
                );
            }
            return None;
        };
        let terms = LeaseTerms::of(&state.cluster.config);
        book.last_grant = Some(GrantRecord {
            node: report.node,
            epoch,
            received_at: now,
            report_sent_at: report.sent_at,
            terms,
        });
        Some(Grant {
            epoch,
            lease_ms: terms.lease_ms,
        })
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

    /// The leader's chores while the primary is healthy: the synchronous standbys, the
    /// recorded primary position, an old lease ceiling, and moving Raft leadership off the
    /// primary's node.
    async fn upkeep(&self, term: u64) {
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        let voters: std::collections::BTreeSet<NodeId> =
            state.membership.membership().voter_ids().collect();
        let metrics = self.raft.metrics().borrow().clone();
        let last_index = metrics.last_log_index;
        let caught_up: std::collections::BTreeSet<NodeId> = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(_, matched)| matched.map(|m| m.index) == last_index)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        let raft_leader_lease_ms = self.raft.config().election_timeout_max;
        let Some(primary) = state.cluster.primary else {
            return;
        };
        let Some((command, handoff)) = self.with_book(term, |book| {
            let handoff_due = book.handoff_at.is_none_or(|t| now >= t + HANDOFF_EVERY_MS);
            let (step, handoff) = {
                let input = self.policy_input(book, now, &state, &members);
                let handoff = handoff_due
                    .then(|| {
                        leadership_handoff(
                            &input,
                            self.node_id,
                            &voters,
                            &caught_up,
                            raft_leader_lease_ms,
                        )
                    })
                    .flatten();
                (sync_step(&input), handoff)
            };
            let command = if let Some(step) = step {
                Some(match step {
                    SyncStep::Commit(set) => Command::CommitSync {
                        epoch: primary.epoch,
                        set,
                    },
                    SyncStep::Target(target) => Command::SetSyncTarget {
                        epoch: primary.epoch,
                        target,
                    },
                })
            } else if let Some(c) = state.cluster.lease_ceiling {
                let seen = *book.ceiling_seen_at.get_or_insert(now);
                let office = book.since + new_leader_wait(c, self.quorum_ack_max_ms());
                (now >= office && now >= seen + c.grantor_span())
                    .then_some(Command::SettleLeaseCeiling)
            } else {
                None
            };
            // The first primary's data names the cluster's data for good.
            let command = command.or_else(|| {
                let r = book.reports.get(&primary.node)?;
                let sysid = r.report.system_identifier?;
                (state.cluster.system_identifier.is_none() && r.report.pg == PgState::Primary)
                    .then_some(Command::SetSystemIdentifier { sysid })
            });
            let command = command.or_else(|| {
                let r = book.reports.get(&primary.node)?;
                let recorded = state
                    .cluster
                    .primary_lsn
                    .filter(|r| r.epoch == primary.epoch);
                let due = book
                    .lsn_recorded_at
                    .is_none_or(|t| now >= t + LSN_RECORD_EVERY_MS);
                let advanced = recorded.is_none_or(|rec| r.report.lsn > rec.lsn);
                (due && advanced && r.report.pg == PgState::Primary).then(|| {
                    book.lsn_recorded_at = Some(now);
                    Command::RecordPrimaryLsn {
                        epoch: primary.epoch,
                        lsn: r.report.lsn,
                    }
                })
            });
            // A command written in this round would leave the target one entry behind the
            // log it was judged caught up with; it would lose the election and depose us.
            let handoff = handoff.filter(|_| command.is_none());
            if handoff.is_some() {
                book.handoff_at = Some(now);
            }
            (command, handoff)
        }) else {
            return;
        };
        if let Some(cmd) = command {
            let what = format!("{cmd:?}");
            match self.raft.client_write(cmd).await {
                Ok(r) if r.data == CommandOutcome::Applied => {
                    tracing::info!(epoch = primary.epoch, "committed {what}");
                    if !what.starts_with("RecordPrimaryLsn") {
                        self.events.record(
                            "failover",
                            format!("committed {what}"),
                            primary.epoch,
                            0,
                        );
                    }
                }
                Ok(r) => tracing::warn!(outcome = ?r.data, "{what} refused"),
                Err(e) => tracing::warn!(error = %e, "{what} not committed"),
            }
        }
        if let Some(target) = handoff {
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
            "this node runs the primary: asking member {target} to take Raft leadership"
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
                    b.quorum_confirmed_at = Some(asked);
                    b.read_index = Some(read_log_id.map(|l| l.index).unwrap_or(0));
                });
            }
        }
    }

    fn decide(&self, term: u64) -> Option<Verdict> {
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        self.with_book(term, |book| {
            Self::settle_pending(book, &state);
            Self::see_plan(book, &state, now);
            let verdict = match duty_blocked(&state, book.read_index, self.heartbeat_ms) {
                // Nothing committed yet needs a current state to be judged.
                Some(why) if state.cluster.primary.is_some() => Verdict::Wait { reason: why },
                _ => decide(&self.policy_input(book, now, &state, &members)),
            };
            book.awaiting_reports = matches!(verdict, Verdict::AwaitReports { .. });
            let text = match &verdict {
                Verdict::Steady => String::new(),
                Verdict::Promote { reason, node, .. } => format!("promoting {node}: {reason}"),
                Verdict::StartPlan { id } => format!("starting plan {id}"),
                Verdict::CancelPlan { reason, .. } => reason.clone(),
                Verdict::Wait { reason }
                | Verdict::AwaitReports { reason }
                | Verdict::NoCandidate { reason } => reason.clone(),
            };
            if text != book.verdict && !text.is_empty() {
                let epoch = state.cluster.primary.map(|p| p.epoch).unwrap_or(0);
                tracing::info!(epoch, "failover: {text}");
                // Countdowns change every tick; record the first of a kind, not every one.
                let kind_changed = book.verdict.split(';').next() != text.split(';').next();
                if kind_changed {
                    self.events.record("failover", text.clone(), epoch, 0);
                }
            }
            book.verdict = text;
            verdict
        })
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
        // From here until the applied state shows the promotion, the demoted primary gets no
        // lease: one granted now would outlive the decision.
        self.with_book(term, |b| {
            b.pending = Some(PrimaryAssignment { node, epoch })
        });
        let outcome = self.raft.client_write(cmd).await;
        if let Ok(r) = &outcome {
            if r.data != CommandOutcome::Applied {
                // Applied and refused: nothing changed, nothing pending.
                self.with_book(term, |b| b.pending = None);
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
        assert!(duty_blocked(&state, Some(42), 150).is_some());
        assert!(
            duty_blocked(&state, None, 150).is_some(),
            "no confirmation yet"
        );
        assert_eq!(duty_blocked(&applied_at(42), Some(42), 150), None);
    }

    #[test]
    fn a_leader_with_other_raft_timings_than_the_cluster_neither_grants_nor_promotes() {
        let mut state = applied_at(42);
        state.cluster.raft_heartbeat_ms = Some(150);
        assert_eq!(duty_blocked(&state, Some(42), 150), None);
        let why = duty_blocked(&state, Some(42), 300).expect("blocked");
        assert!(why.contains("heartbeat_ms"), "{why}");
    }
}
