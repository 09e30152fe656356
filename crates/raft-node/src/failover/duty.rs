//! The Raft leader's failover duty as pure steps: the book of one leadership term (reports,
//! grants, the quorum confirmation, the promotion on its way) and what the leader does with it
//! on a report, on a policy round and in its upkeep. The daemon ([`super::leader`]) runs these
//! steps with openraft and the network around them; the simulation runs the very same steps
//! with its model, so neither keeps a copy of the other's logic.

use std::collections::BTreeSet;

use super::lease::{quorum_ack_max_ms, LeaseTerms, Millis};
use super::policy::{
    decide, leadership_handoff, may_grant_lease, sync_step, GrantRecord, PolicyInput, Verdict,
};
use super::report::{self, LeaderStamp, MemberReport, PgState, ReportBook};
use super::sync::SyncStep;
use crate::cluster_state::{ClusterState, Command, PrimaryAssignment};
use crate::types::NodeId;

/// The primary's WAL position is committed at most this often (it bounds replicas' lag for a
/// leader that never heard the primary).
pub const LSN_RECORD_EVERY_MS: Millis = 2_000;
/// A leader on the primary's node asks another member to take over at most this often.
pub const HANDOFF_EVERY_MS: Millis = 2_000;

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

/// Why a leader may neither grant nor promote right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DutyBlock {
    /// Its applied state may miss a promotion its predecessor committed.
    CatchingUp,
    /// It runs a longer Raft heartbeat than any member registered with, so a successor's wait
    /// (which assumes the registered heartbeats) would not cover the leases it grants.
    UnregisteredTimings {
        /// This leader's heartbeat.
        ours: u64,
        /// The longest heartbeat the cluster registered.
        cluster: u64,
    },
}

impl std::fmt::Display for DutyBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DutyBlock::CatchingUp => {
                write!(
                    f,
                    "waiting for the applied state to catch up with the committed log"
                )
            }
            DutyBlock::UnregisteredTimings { ours, cluster } => write!(
                f,
                "this leader runs raft.heartbeat_ms = {ours}, longer than any member registered \
                 ({cluster}): it hands Raft leadership to a member that can grant leases until \
                 its own registration is committed"
            ),
        }
    }
}

/// What a leader's duty is judged by besides its book: the applied state and the leader's
/// own constants.
#[derive(Debug, Clone, Copy)]
pub struct DutyView<'a> {
    /// This leader's id.
    pub me: NodeId,
    /// The applied cluster state.
    pub cluster: &'a ClusterState,
    /// Index of the last applied entry.
    pub applied_index: Option<u64>,
    /// Ids of the Raft members (voters and learners).
    pub members: &'a BTreeSet<NodeId>,
    /// This leader's Raft heartbeat interval.
    pub heartbeat_ms: u64,
    /// Leader's clock now.
    pub now: Millis,
    /// Wall-clock time, milliseconds since the Unix epoch (planned switchovers only).
    pub now_unix_ms: u64,
}

impl DutyView<'_> {
    /// A leader grants leases only while its last quorum confirmation is at most this old.
    pub fn quorum_ack_max_ms(&self) -> u64 {
        quorum_ack_max_ms(self.heartbeat_ms)
    }
}

/// Why this leader may neither grant nor promote right now, if it may not.
pub fn duty_blocked(view: &DutyView<'_>, read_index: Option<u64>) -> Option<DutyBlock> {
    let registered = view.cluster.longest_raft_heartbeat_ms();
    if registered.is_some_and(|hb| view.heartbeat_ms > hb) {
        return Some(DutyBlock::UnregisteredTimings {
            ours: view.heartbeat_ms,
            cluster: registered.unwrap_or(0),
        });
    }
    match read_index {
        Some(ri) if view.applied_index.is_some_and(|a| a >= ri) => None,
        _ => Some(DutyBlock::CatchingUp),
    }
}

/// A verdict's text for people, and whether it starts a new kind of wait (countdowns change
/// every round; only the first of a kind is worth an event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The verdict in an operator's words.
    pub text: String,
    /// The first verdict of its kind since the last one.
    pub new_kind: bool,
}

/// What one policy round decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// Set when the verdict's text changed.
    pub announce: Option<Announcement>,
}

/// What the leader's upkeep asks for while the primary is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Upkeep {
    /// A command to commit.
    pub command: Option<Command>,
    /// A member to hand Raft leadership to.
    pub handoff: Option<NodeId>,
}

/// Raft facts the upkeep judges a hand-off by.
#[derive(Debug, Clone, Default)]
pub struct RaftFacts {
    /// The voters.
    pub voters: BTreeSet<NodeId>,
    /// The members whose log matches the leader's last entry.
    pub caught_up: BTreeSet<NodeId>,
    /// The Raft leader lease (openraft's upper election timeout).
    pub raft_leader_lease_ms: u64,
}

/// The failover book of one leadership term: soft state, dropped when the term changes.
#[derive(Debug, Clone, Default)]
pub struct LeaderBook {
    /// The term this book belongs to.
    pub term: u64,
    /// Leader's clock when it took office.
    pub since: Millis,
    /// Latest report per member.
    pub reports: ReportBook,
    /// The leases granted to the committed primary.
    pub last_grant: Option<GrantRecord>,
    /// Leader's clock when the last quorum confirmation was asked for.
    pub quorum_confirmed_at: Option<Millis>,
    /// The log index the last quorum confirmation read at: an applied state older than it may
    /// miss a promotion a predecessor committed.
    pub read_index: Option<u64>,
    /// A promotion this leader decided and is committing.
    pub pending: Option<PrimaryAssignment>,
    ceiling_seen_at: Option<Millis>,
    lsn_recorded_at: Option<Millis>,
    handoff_at: Option<Millis>,
    /// The last verdict waits for fresh reports.
    pub awaiting_reports: bool,
    /// The last non-steady verdict, in words.
    pub verdict: String,
    /// The started plan this leader saw, and when it first saw it.
    plan_seen: Option<(u64, Millis)>,
}

impl LeaderBook {
    /// The book of a leader that took office in `term` at `since` (its clock).
    pub fn new(term: u64, since: Millis) -> Self {
        Self {
            term,
            since,
            ..Self::default()
        }
    }

    /// The policy's input for this book.
    pub fn policy_input<'a>(&'a self, view: &DutyView<'a>) -> PolicyInput<'a> {
        PolicyInput {
            now: view.now,
            term: self.term,
            leader_since: self.since,
            quorum_ack_max_ms: view.quorum_ack_max_ms(),
            cluster: view.cluster,
            members: view.members,
            reports: &self.reports,
            last_grant: self.last_grant,
            pending: self.pending,
            now_unix_ms: view.now_unix_ms,
            plan_started_seen: self.plan_seen.map(|(_, at)| at),
        }
    }

    /// Notes a quorum confirmation asked for at `asked` (leader's clock) that read `read_index`.
    pub fn quorum_confirmed(&mut self, asked: Millis, read_index: u64) {
        self.quorum_confirmed_at = Some(asked);
        self.read_index = Some(read_index);
    }

    /// Why this leader may neither grant nor promote right now, if it may not.
    pub fn blocked(&self, view: &DutyView<'_>) -> Option<DutyBlock> {
        duty_blocked(view, self.read_index)
    }

    /// Forgets a pending promotion once the applied state shows it (or a later one).
    fn settle_pending(&mut self, cluster: &ClusterState) {
        let applied_epoch = cluster.primary.map(|p| p.epoch).unwrap_or(0);
        if self.pending.is_some_and(|p| applied_epoch >= p.epoch) {
            self.pending = None;
        }
    }

    /// Notes when this leader first saw the current plan started.
    fn see_plan(&mut self, cluster: &ClusterState, now: Millis) {
        let started = cluster.plan.filter(|p| p.started).map(|p| p.id);
        if self.plan_seen.map(|(id, _)| id) != started {
            self.plan_seen = started.map(|id| (id, now));
        }
    }

    /// Records a member's report and answers it, with a lease renewal when the policy allows.
    pub fn on_report(&mut self, view: &DutyView<'_>, report: MemberReport) -> ReportAnswer {
        let granted = self
            .last_grant
            .filter(|g| g.node == report.node)
            .map(|g| g.report_sent_at);
        let fresh = super::policy::wal_fresh_ms(&view.cluster.config);
        report::record(&mut self.reports, report.clone(), view.now, granted, fresh);
        self.settle_pending(view.cluster);
        let grant = self.grant(view, &report);
        ReportAnswer {
            grant,
            stamp: LeaderStamp {
                term: self.term,
                at: view.now,
            },
            report_again: self.awaiting_reports,
        }
    }

    fn grant(&mut self, view: &DutyView<'_>, report: &MemberReport) -> Option<Grant> {
        let primary = view.cluster.primary.is_some_and(|p| p.node == report.node);
        if let Some(why) = self.blocked(view) {
            if primary {
                tracing::debug!(node = report.node, %why, "no lease for the primary yet");
            }
            return None;
        }
        let ack_age = self.quorum_confirmed_at.map(|t| view.now.saturating_sub(t));
        let epoch = {
            let input = self.policy_input(view);
            let epoch = may_grant_lease(&input, report, ack_age);
            if epoch.is_none() && primary {
                tracing::debug!(
                    node = report.node,
                    ?ack_age,
                    pg = ?report.pg,
                    failures = report.consecutive_failures,
                    pending = ?input.pending,
                    "no lease renewal for the primary"
                );
            }
            epoch?
        };
        let terms = LeaseTerms::of(&view.cluster.config);
        self.last_grant = Some(GrantRecord::after_grant(
            self.last_grant,
            report.node,
            epoch,
            view.now,
            report.sent_at,
            terms,
        ));
        Some(Grant {
            epoch,
            lease_ms: terms.lease_ms,
        })
    }

    /// One policy round. A promotion it decides becomes pending in the same step, so no report
    /// answered after the decision renews the lease of the primary it demotes.
    pub fn decide(&mut self, view: &DutyView<'_>) -> Decision {
        self.settle_pending(view.cluster);
        self.see_plan(view.cluster, view.now);
        let verdict = match self.blocked(view) {
            // Nothing committed yet needs a current state to be judged.
            Some(why) if view.cluster.primary.is_some() => Verdict::Wait {
                reason: why.to_string(),
            },
            _ => decide(&self.policy_input(view)),
        };
        if let Verdict::Promote { node, epoch, .. } = verdict {
            self.pending = Some(PrimaryAssignment { node, epoch });
        }
        self.awaiting_reports = matches!(verdict, Verdict::AwaitReports { .. });
        let text = match &verdict {
            Verdict::Steady => String::new(),
            Verdict::Promote { reason, node, .. } => format!("promoting {node}: {reason}"),
            Verdict::StartPlan { id } => format!("starting plan {id}"),
            Verdict::CancelPlan { reason, .. } => reason.clone(),
            Verdict::Wait { reason }
            | Verdict::AwaitReports { reason }
            | Verdict::NoCandidate { reason } => reason.clone(),
        };
        let announce = (text != self.verdict && !text.is_empty()).then(|| Announcement {
            new_kind: self.verdict.split(';').next() != text.split(';').next(),
            text: text.clone(),
        });
        self.verdict = text;
        Decision { verdict, announce }
    }

    /// The commit of a promotion this book made pending was refused: nothing changed.
    pub fn promotion_refused(&mut self) {
        self.pending = None;
    }

    /// The leader's chores while the primary is healthy: the synchronous standbys, an old lease
    /// ceiling, the first primary's system identifier, the recorded primary position, and
    /// moving Raft leadership off the primary's node.
    pub fn upkeep(&mut self, view: &DutyView<'_>, raft: &RaftFacts) -> Upkeep {
        let now = view.now;
        let Some(primary) = view.cluster.primary else {
            return Upkeep::default();
        };
        let handoff_due = self.handoff_at.is_none_or(|t| now >= t + HANDOFF_EVERY_MS);
        let (step, handoff) = {
            let input = self.policy_input(view);
            let handoff = handoff_due
                .then(|| {
                    leadership_handoff(
                        &input,
                        view.me,
                        &raft.voters,
                        &raft.caught_up,
                        raft.raft_leader_lease_ms,
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
        } else if let Some(c) = view.cluster.lease_ceiling {
            let seen = *self.ceiling_seen_at.get_or_insert(now);
            let office = self.since
                + super::lease::new_leader_wait(c, view.cluster.predecessor_ack_max_ms());
            (now >= office && now >= seen + c.grantor_span()).then_some(Command::SettleLeaseCeiling)
        } else {
            None
        };
        // The first primary's data names the cluster's data for good.
        let command = command.or_else(|| {
            let r = self.reports.get(&primary.node)?;
            let sysid = r.report.system_identifier?;
            (view.cluster.system_identifier.is_none() && r.report.pg == PgState::Primary)
                .then_some(Command::SetSystemIdentifier { sysid })
        });
        let command = command.or_else(|| {
            let r = self.reports.get(&primary.node)?;
            let recorded = view
                .cluster
                .primary_lsn
                .filter(|r| r.epoch == primary.epoch);
            let due = self
                .lsn_recorded_at
                .is_none_or(|t| now >= t + LSN_RECORD_EVERY_MS);
            let advanced = recorded.is_none_or(|rec| r.report.lsn > rec.lsn);
            (due && advanced && r.report.pg == PgState::Primary).then(|| {
                self.lsn_recorded_at = Some(now);
                Command::RecordPrimaryLsn {
                    epoch: primary.epoch,
                    lsn: r.report.lsn,
                }
            })
        });
        // A command written in this round would leave the target one entry behind the log it
        // was judged caught up with; it would lose the election and depose us.
        let handoff = handoff.filter(|_| command.is_none());
        if handoff.is_some() {
            self.handoff_at = Some(now);
        }
        Upkeep { command, handoff }
    }

    /// The member a leader that may not do its duty for its timings hands Raft leadership to
    /// (at most every [`HANDOFF_EVERY_MS`]): a caught-up voter that reported recently. Every
    /// registered member's heartbeat is within the cluster's longest, so any of them can.
    pub fn handoff_while_blocked(
        &mut self,
        view: &DutyView<'_>,
        raft: &RaftFacts,
    ) -> Option<NodeId> {
        if !matches!(
            self.blocked(view),
            Some(DutyBlock::UnregisteredTimings { .. })
        ) {
            return None;
        }
        if self
            .handoff_at
            .is_some_and(|t| view.now < t + HANDOFF_EVERY_MS)
        {
            return None;
        }
        let lease_ms = view.cluster.config.lease_ms;
        let target = raft
            .voters
            .iter()
            .filter(|n| **n != view.me && raft.caught_up.contains(n))
            .filter(|n| view.cluster.members.contains_key(n))
            .filter(|n| {
                self.reports
                    .get(n)
                    .is_some_and(|r| view.now.saturating_sub(r.at) <= lease_ms)
            })
            .copied()
            .next()?;
        self.handoff_at = Some(view.now);
        Some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_state::SyncSet;
    use crate::failover::report::StorageReport;

    fn report(node: NodeId, pg: PgState, sent_at: Millis) -> MemberReport {
        MemberReport {
            node,
            pg,
            consecutive_failures: 0,
            timeline: 1,
            lsn: 100,
            streaming: pg == PgState::Replica,
            wal_receipt_age_ms: (pg == PgState::Replica).then_some(10),
            upstream: (pg == PgState::Replica).then_some(1),
            sync_applied: None,
            leader_stamp: None,
            epoch_seen: 1,
            sent_at,
            storage: StorageReport::default(),
            replayed_lsn: None,
            pending_restart: Vec::new(),
            system_identifier: None,
            unguarded: false,
            lsn_incomplete: false,
            handed_over: None,
        }
    }

    fn cluster() -> ClusterState {
        let mut c = ClusterState {
            primary: Some(PrimaryAssignment { node: 1, epoch: 1 }),
            ..Default::default()
        };
        c.config.synchronous_mode = crate::dynamic_config::SyncMode::Off;
        c.sync.epoch = 1;
        c.sync.committed = SyncSet::asynchronous();
        c
    }

    fn view<'a>(c: &'a ClusterState, members: &'a BTreeSet<NodeId>, now: Millis) -> DutyView<'a> {
        DutyView {
            me: 2,
            cluster: c,
            applied_index: Some(10),
            members,
            heartbeat_ms: 150,
            now,
            now_unix_ms: 0,
        }
    }

    #[test]
    fn a_promotion_decided_refuses_the_demoted_primary_any_further_grant_in_the_same_step() {
        // Finding 6 of the review: the decision and the refusal of grants were two steps with
        // the book unlocked in between, so a report could be granted after the decision.
        let c = cluster();
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        let mut book = LeaderBook::new(1, 0);
        book.quorum_confirmed(0, 10);
        let answer = book.on_report(&view(&c, &members, 100), report(1, PgState::Primary, 100));
        assert!(answer.grant.is_some(), "a healthy primary is renewed");
        // The primary is then fenced (its lease ran out), the others report after it.
        let fenced = view(&c, &members, 4_000);
        book.quorum_confirmed(3_950, 10);
        let replica = |n, sent_at, stamp| {
            let mut r = report(n, PgState::Replica, sent_at);
            r.leader_stamp = stamp;
            r.wal_receipt_age_ms = Some(5_000);
            r.streaming = false;
            r
        };
        for n in [2, 3] {
            book.on_report(&view(&c, &members, 3_990), replica(n, 3_990, None));
        }
        let a = book.on_report(&fenced, report(1, PgState::Fenced, 4_000));
        assert_eq!(
            a.grant, None,
            "a fenced primary with candidates gets no lease"
        );
        let stamp = Some(LeaderStamp { term: 1, at: 4_000 });
        for n in [2, 3] {
            book.on_report(&view(&c, &members, 4_010), replica(n, 4_010, stamp));
        }
        let d = book.decide(&view(&c, &members, 4_020));
        assert!(
            matches!(d.verdict, Verdict::Promote { .. }),
            "{:?}",
            d.verdict
        );
        // A late healthy report of the old primary (sent before it was fenced, delivered
        // now) gets nothing.
        let late = book.on_report(
            &view(&c, &members, 4_030),
            report(1, PgState::Primary, 4_025),
        );
        assert_eq!(late.grant, None, "a grant after the promotion was decided");
        assert!(book.pending.is_some());
        book.promotion_refused();
        assert_eq!(book.pending, None);
    }

    #[test]
    fn a_shorter_renewal_keeps_the_longer_grant_in_the_book() {
        let mut c = cluster();
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        let mut book = LeaderBook::new(1, 0);
        c.config.lease_ms = 10_000;
        book.quorum_confirmed(0, 10);
        book.on_report(&view(&c, &members, 100), report(1, PgState::Primary, 100));
        c.config.lease_ms = 2_500;
        book.quorum_confirmed(150, 10);
        book.on_report(&view(&c, &members, 200), report(1, PgState::Primary, 200));
        let g = book.last_grant.expect("granted");
        assert_eq!(g.safe_after, 100 + 10_000 + c.config.drift_margin_ms);
        assert_eq!(g.terms.lease_ms, 2_500);
    }

    #[test]
    fn a_leader_with_a_longer_heartbeat_than_registered_is_blocked_and_hands_off() {
        let mut c = cluster();
        c.raft_heartbeat_ms = Some(150);
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        let mut v = view(&c, &members, 1_000);
        v.heartbeat_ms = 300;
        let mut book = LeaderBook::new(1, 0);
        book.quorum_confirmed(900, 10);
        assert_eq!(
            book.blocked(&v),
            Some(DutyBlock::UnregisteredTimings {
                ours: 300,
                cluster: 150
            })
        );
        // Its grants would be judged by successors assuming 150 ms heartbeats: none.
        let a = book.on_report(&v, report(1, PgState::Primary, 1_000));
        assert_eq!(a.grant, None);
        let raft = RaftFacts {
            voters: [1, 2, 3].into(),
            caught_up: [1, 3].into(),
            raft_leader_lease_ms: 600,
        };
        // Only registered, caught-up, reporting voters qualify.
        assert_eq!(book.handoff_while_blocked(&v, &raft), None);
        let mut c2 = c.clone();
        c2.members.insert(
            1,
            crate::cluster_state::MemberInfo {
                id: 1,
                ..Default::default()
            },
        );
        let v = DutyView { cluster: &c2, ..v };
        assert_eq!(book.handoff_while_blocked(&v, &raft), Some(1));
        assert_eq!(
            book.handoff_while_blocked(&v, &raft),
            None,
            "not every round"
        );
        // A shorter heartbeat than registered is covered by the successors' waits.
        let v = DutyView {
            heartbeat_ms: 100,
            ..v
        };
        assert_eq!(book.blocked(&v), None);
    }
}
