//! The failover policy: a pure function of the committed state, the members' latest reports and
//! the leader's clock. It decides whether the primary is healthy, whether and when another member
//! may be promoted, and whether the primary's lease may be renewed. No I/O, no hidden clock.

use std::collections::{BTreeMap, BTreeSet};

use super::lease::{grantor_safe_after, new_leader_wait, LeaseTerms, Millis};
use super::report::{MemberReport, PgState, ReportBook};
use super::sync::{self, SyncStep};
use crate::cluster_state::{ClusterState, Epoch, PlanKind, PrimaryAssignment, SyncSet};
use crate::types::NodeId;

/// The leases the current leader granted to one holder, as the grantor recorded them: the last
/// grant, and the latest end any grant of the same holder and epoch may still run to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRecord {
    /// Holder of the lease.
    pub node: NodeId,
    /// Epoch of the lease.
    pub epoch: Epoch,
    /// Grantor's clock when the last granted renewal request arrived.
    pub received_at: Millis,
    /// Holder's clock when it sent the last granted report ([`MemberReport::sent_at`]).
    pub report_sent_at: Millis,
    /// The lease and margin of the last grant.
    pub terms: LeaseTerms,
    /// Grantor's clock: before this instant some grant to this holder in this epoch may still
    /// run. The holder keeps the later of two expiries ([`super::lease::HeldLease::extend`]),
    /// so a shorter grant after a longer one (the lease was shortened meanwhile) ends nothing:
    /// this is the maximum over the grants, never the last one's bound.
    pub safe_after: Millis,
}

impl GrantRecord {
    /// The record after granting `node` a lease of `epoch` under `terms`, for a report sent at
    /// `report_sent_at` (holder's clock) and received at `received_at` (grantor's clock).
    /// Grants to the same holder and epoch keep the longest bound.
    pub fn after_grant(
        prev: Option<GrantRecord>,
        node: NodeId,
        epoch: Epoch,
        received_at: Millis,
        report_sent_at: Millis,
        terms: LeaseTerms,
    ) -> GrantRecord {
        let bound = grantor_safe_after(received_at, terms);
        let safe_after = prev
            .filter(|p| p.node == node && p.epoch == epoch)
            .map_or(bound, |p| p.safe_after.max(bound));
        GrantRecord {
            node,
            epoch,
            received_at,
            report_sent_at,
            terms,
            safe_after,
        }
    }
}

/// Everything the policy looks at.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    /// Leader's clock now.
    pub now: Millis,
    /// The leader's Raft term (reports echo stamps of it).
    pub term: u64,
    /// Leader's clock when it took office.
    pub leader_since: Millis,
    /// A leader grants leases only while its last quorum acknowledgement is at most this old.
    pub quorum_ack_max_ms: u64,
    /// The committed cluster state.
    pub cluster: &'a ClusterState,
    /// Ids of the Raft members (voters and learners).
    pub members: &'a BTreeSet<NodeId>,
    /// Latest report per member.
    pub reports: &'a ReportBook,
    /// The last lease this leader granted to the committed primary, if any.
    pub last_grant: Option<GrantRecord>,
    /// A promotion this leader decided and is still committing: the member it demotes gets no
    /// lease in the meantime.
    pub pending: Option<PrimaryAssignment>,
    /// Wall-clock time, milliseconds since the Unix epoch: only a plan's planned time is
    /// judged by it, never a lease.
    pub now_unix_ms: u64,
    /// Leader's clock when it first saw the current plan started (its timeout counts from
    /// there; a new leader starts counting anew).
    pub plan_started_seen: Option<Millis>,
}

/// What the leader should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The committed primary is healthy; nothing to do.
    Steady,
    /// Commit `Promote { node, epoch }`.
    Promote {
        /// The chosen member.
        node: NodeId,
        /// The next epoch.
        epoch: Epoch,
        /// Why, for the history and the logs.
        reason: String,
        /// The candidate's reported WAL position.
        lsn: u64,
        /// The synchronous standbys of the new epoch.
        sync: SyncSet,
    },
    /// A failover is due but not allowed yet; the reason says until when and why.
    Wait {
        /// Why, in an operator's words.
        reason: String,
    },
    /// A failover is due; it waits for members to report again, after the old primary
    /// stopped, so that their WAL positions say all they hold. Members are asked to report at
    /// once.
    AwaitReports {
        /// Why, in an operator's words.
        reason: String,
    },
    /// A failover is due and no member qualifies.
    NoCandidate {
        /// Why each member was excluded.
        reason: String,
    },
    /// Commit [`crate::cluster_state::Command::StartPlan`]: the switchover's time has come and
    /// its target is fit, so the primary may stop.
    StartPlan {
        /// The plan.
        id: u64,
    },
    /// Commit [`crate::cluster_state::Command::CancelPlan`].
    CancelPlan {
        /// The plan.
        id: u64,
        /// Why, in an operator's words.
        reason: String,
    },
}

impl PolicyInput<'_> {
    /// The latest report of `node`, if it arrived within a lease.
    pub(crate) fn fresh(&self, node: NodeId) -> Option<&MemberReport> {
        let r = self.reports.get(&node)?;
        (self.now.saturating_sub(r.at) <= self.cluster.config.lease_ms).then_some(&r.report)
    }

    /// Whether `r` was sent after the leader's instant `since` (it echoes a stamp of this term
    /// taken no earlier).
    fn sent_after(&self, r: &MemberReport, since: Millis) -> bool {
        r.leader_stamp
            .is_some_and(|s| s.term == self.term && s.at >= since)
    }

    pub(crate) fn tags(&self, node: NodeId) -> crate::cluster_state::Tags {
        self.cluster
            .members
            .get(&node)
            .map(|m| m.tags.clone())
            .unwrap_or_default()
    }

    /// Since when the synchronous standby `node` may have gone without WAL from `primary`, as
    /// far as this leader can tell.
    fn wal_grace_from(&self, node: NodeId, primary: NodeId) -> Millis {
        let lost = self.reports.get(&node).and_then(|r| r.wal_lost_since);
        let running = self.reports.get(&primary).and_then(|r| r.primary_since);
        lost.max(running).unwrap_or(0).max(self.leader_since)
    }

    /// Members that could ever acknowledge commits of `primary`.
    fn possible_standbys(&self, primary: NodeId) -> BTreeSet<NodeId> {
        self.members
            .iter()
            .copied()
            .filter(|n| *n != primary && !self.tags(*n).nosync)
            .collect()
    }

    /// Standbys fit to acknowledge commits of `primary`, best first: a member of `current`
    /// stays while it is a live replica; a new one must stream from `primary` now (any live
    /// replica when `primary` is about to be promoted and nobody streams from it yet).
    ///
    /// A member of `current` must keep receiving WAL from `primary`: one that has not for a
    /// lease is dropped, the lease counted from the latest of when the leader first saw it
    /// without WAL, when it first saw the primary running (standbys re-point after a
    /// promotion), and when it took office. Without this, an `on` cluster whose replication
    /// links alone were cut blocked every write for as long as the cut lasted.
    ///
    /// The same grace holds for a member of `current` that has no fresh report for this
    /// leader: a new leader's empty book is no evidence that a standby died, and dropping it
    /// would turn `on` asynchronous for nothing (found by the partition suite: a primary cut
    /// off right after a leadership change acknowledged writes only it had, and they were lost
    /// at failover). Such members come last.
    fn fit_standbys(&self, primary: NodeId, current: &SyncSet, promoting: bool) -> Vec<NodeId> {
        let cfg = &self.cluster.config;
        let possible = self.possible_standbys(primary);
        let in_grace = |n: NodeId| {
            current.members.contains(&n)
                && self.now < self.wal_grace_from(n, primary).saturating_add(cfg.lease_ms)
        };
        let mut fit: Vec<&MemberReport> = possible
            .iter()
            .filter_map(|n| self.fresh(*n))
            .filter(|r| {
                let live =
                    r.pg == PgState::Replica && r.consecutive_failures < cfg.failure_threshold;
                let streams = r.upstream == Some(primary) && r.receives_wal_now(wal_fresh_ms(cfg));
                live && (streams || promoting || in_grace(r.node))
            })
            .collect();
        fit.sort_by(|a, b| b.lsn.cmp(&a.lsn).then(a.node.cmp(&b.node)));
        // Members of the set without a fresh word to this leader: no evidence against them
        // either, until their grace ends.
        let unheard = possible
            .iter()
            .copied()
            .filter(|n| self.fresh(*n).is_none() && in_grace(*n));
        fit.into_iter().map(|r| r.node).chain(unheard).collect()
    }
}

/// How recent a replica's last message from its upstream must be to count as evidence that the
/// upstream is alive (the primary writes a heartbeat every tick).
pub fn wal_fresh_ms(cfg: &crate::dynamic_config::DynamicConfig) -> u64 {
    (cfg.lease_ms / 2).max(4 * cfg.tick_ms)
}

/// Whether the leader may renew the lease of `from` now. It may when `from` is the committed
/// primary, its Postgres has not failed (or failed with no other member able to take over), and
/// the leader's quorum contact is fresh (an isolated leader that still believes in itself must
/// not keep a primary alive). `input.reports` must already hold `from`'s report.
pub fn may_grant_lease(
    input: &PolicyInput<'_>,
    from: &MemberReport,
    quorum_ack_age_ms: Option<u64>,
) -> Option<Epoch> {
    let primary = input.cluster.primary?;
    if primary.node != from.node {
        return None;
    }
    // A promotion on its way demotes this primary: a lease now would outlive the decision.
    if input.pending.is_some_and(|p| p.epoch > primary.epoch) {
        return None;
    }
    if quorum_ack_age_ms.is_none_or(|age| age > input.quorum_ack_max_ms) {
        return None;
    }
    let failed = from.consecutive_failures >= input.cluster.config.failure_threshold
        || from.pg == PgState::Fenced
        || cannot_write(&input.cluster.config, from);
    // A failed primary gets no renewal while another member could take over; when none can, it
    // is better restarted in place (or, when it merely cannot write, kept) than left without
    // any primary. Whether one could is judged as if every wait were over: judged by the waits,
    // a primary that runs but cannot write would lose its lease for a failover that then finds
    // nobody, be restarted in place, and lose it again, over and over.
    if failed && !matches!(judge(input, true), Verdict::NoCandidate { .. }) {
        return None;
    }
    Some(primary.epoch)
}

/// Whether `r` is a primary that failed to write for long enough to be failed over.
pub(crate) fn cannot_write(cfg: &crate::dynamic_config::DynamicConfig, r: &MemberReport) -> bool {
    cfg.failover_on_write_failure && r.cannot_write_for(cfg.failure_threshold)
}

/// The policy's verdict for this moment.
pub fn decide(input: &PolicyInput<'_>) -> Verdict {
    let verdict = judge(input, false);
    // A wait that can only end with nobody to promote says so: a primary that cannot write
    // keeps its lease when no member could take over, so the wait would never end and its
    // countdown would hide the reason.
    if matches!(verdict, Verdict::Wait { .. }) && !input.cluster.paused && input.pending.is_none() {
        if let none @ Verdict::NoCandidate { .. } = judge(input, true) {
            return none;
        }
    }
    verdict
}

/// The verdict that would follow once every wait is over (no pause, pending promotion, lease,
/// report or live-WAL wait).
pub fn judge_hypothetically(input: &PolicyInput<'_>) -> Verdict {
    judge(input, true)
}

/// The verdict; with `hypothetical`, the one that would follow once every wait is over (no
/// pause, pending promotion, lease, report or live-WAL wait): whether any member qualifies.
fn judge(input: &PolicyInput<'_>, hypothetical: bool) -> Verdict {
    let cfg = &input.cluster.config;
    let Some(primary) = input.cluster.primary else {
        return choose_first_primary(input);
    };
    let primary_report = input.fresh(primary.node);
    let why = match primary_report {
        Some(r)
            if r.pg == PgState::Fenced
                && input
                    .plan()
                    .is_some_and(|p| r.handed_over.is_some_and(|h| h.plan == p.id)) =>
        {
            format!(
                "primary {} shut down cleanly for the switchover (its WAL ends at {})",
                primary.node,
                r.handed_over.map_or(0, |h| h.final_lsn)
            )
        }
        Some(r) if r.pg == PgState::Fenced && r.consecutive_failures > 0 => format!(
            "primary {} fenced itself after its Postgres failed {} consecutive probes",
            primary.node, r.consecutive_failures
        ),
        Some(r) if r.pg == PgState::Fenced => format!("primary {} fenced itself", primary.node),
        Some(r) if r.consecutive_failures >= cfg.failure_threshold => format!(
            "primary {}'s Postgres failed {} consecutive probes",
            primary.node, r.consecutive_failures
        ),
        Some(r) if cannot_write(cfg, r) => format!(
            "primary {} cannot write ({}) for {} consecutive probes",
            primary.node,
            r.storage
                .cannot_write
                .as_deref()
                .unwrap_or("write probe failed"),
            r.storage.write_failures
        ),
        Some(_) => return super::plan::while_primary_runs(input, hypothetical),
        None => format!(
            "primary {} has not reported for more than {} ms",
            primary.node, cfg.lease_ms
        ),
    };
    // A started switchover whose primary failed before it handed over is a failover like any
    // other: the usual rules choose, the most advanced member first.
    let plan = input.plan().filter(|p| p.started);
    let handed_over = plan.is_some_and(|p| {
        primary_report.is_some_and(|r| {
            r.pg == PgState::Fenced && r.handed_over.is_some_and(|h| h.plan == p.id)
        })
    });
    // (A leader that has no fresh word of the primary, a new one above all, cannot tell.)
    if let Some(p) = plan.filter(|p| p.kind == PlanKind::Switchover && !handed_over) {
        if !hypothetical && primary_report.is_some() {
            return Verdict::CancelPlan {
                id: p.id,
                reason: format!(
                    "switchover to member {} cancelled: {why} before it handed over; the usual \
                     failover rules choose instead",
                    p.to
                ),
            };
        }
    }
    let plan = plan.filter(|p| p.kind == PlanKind::Failover || handed_over);
    // Paused, only the operator's own choice of successor promotes anyone.
    let manual = plan.is_some_and(|p| p.kind == PlanKind::Failover);
    if input.cluster.paused && !hypothetical && !manual {
        return Verdict::Wait {
            reason: format!("{why}, but automatic failover is paused"),
        };
    }
    if input.pending.is_some() && !hypothetical {
        return Verdict::Wait {
            reason: format!("{why}; a promotion is being committed"),
        };
    }
    // The predecessor may have run a longer heartbeat than this leader (a rolling change of
    // the Raft timings): its grants rest on the longest one registered.
    let office_wait_until = input.leader_since.saturating_add(new_leader_wait(
        input.cluster.longest_lease_terms(),
        input
            .quorum_ack_max_ms
            .max(input.cluster.predecessor_ack_max_ms()),
    ));
    if input.now < office_wait_until && !hypothetical {
        return Verdict::Wait {
            reason: format!(
                "{why}; a new Raft leader waits {} ms more for leases its predecessor may have \
                 granted",
                office_wait_until - input.now
            ),
        };
    }
    // A fenced sidecar holds no lease and takes no grant for a report sent before its latest
    // fenced report. So a fenced report *sent* after the report behind this leader's last grant
    // proves the old primary cannot write: no lease wait. (Receipt order proves nothing: the
    // network reorders.)
    let fenced_after_last_grant = match (primary_report, input.last_grant) {
        (Some(r), _) if r.pg != PgState::Fenced => false,
        (Some(r), Some(g)) if g.node == primary.node => r.sent_at > g.report_sent_at,
        (Some(_), _) => true,
        (None, _) => false,
    };
    let fenced = primary_report.is_some_and(|r| r.pg == PgState::Fenced);
    // From this instant on (leader's clock) the old primary acknowledges nothing: its fenced
    // report arrived, or every lease it may hold has run out.
    let down_since = if fenced_after_last_grant {
        input
            .reports
            .get(&primary.node)
            .map_or(input.now, |r| r.fenced_since.unwrap_or(r.at))
    } else {
        let mut until = office_wait_until;
        if let Some(g) = input.last_grant.filter(|g| g.node == primary.node) {
            until = until.max(g.safe_after);
            if input.now < until && !hypothetical {
                return Verdict::Wait {
                    reason: format!("{why}; its lease may run {} ms more", until - input.now),
                };
            }
        }
        until
    };
    let mut excluded = Vec::new();
    let mut awaiting = Vec::new();
    let mut candidates: Vec<(&MemberReport, i32)> = Vec::new();
    for &node in input.members.iter().filter(|n| **n != primary.node) {
        let Some(r) = input.fresh(node) else {
            excluded.push(format!("{node}: no recent report"));
            continue;
        };
        if !input.sent_after(r, down_since) && !hypothetical {
            // Sent before the old primary stopped, its WAL position may miss writes it
            // acknowledged since (a frozen sidecar's Postgres keeps receiving).
            awaiting.push(node);
            continue;
        }
        if r.lsn_incomplete && !hypothetical {
            // Restarted and still replaying its own WAL: its position says less than it holds,
            // and a less advanced member would win the comparison.
            awaiting.push(node);
            continue;
        }
        let tags = input.tags(node);
        if tags.nofailover {
            excluded.push(format!("{node}: tagged nofailover"));
            continue;
        }
        if !r.healthy_replica() {
            excluded.push(format!("{node}: not a healthy replica ({:?})", r.pg));
            continue;
        }
        // A new primary on a full disk would refuse writes at once.
        if let Some(free) = r
            .storage
            .free_bytes
            .filter(|f| *f < cfg.failover_min_free_bytes)
        {
            excluded.push(format!(
                "{node}: only {free} bytes free on its data or WAL filesystem \
                 (failover_min_free_bytes = {})",
                cfg.failover_min_free_bytes
            ));
            continue;
        }
        // The status word `streaming` outlives a silent cut by a timeout; only a recent message
        // from the old primary shows it alive.
        let from_old_primary = r.upstream.is_none_or(|u| u == primary.node);
        if from_old_primary && r.receives_wal_now(wal_fresh_ms(cfg)) && !fenced && !hypothetical {
            // The old primary still ships WAL: it is alive and would win this race a moment
            // later, and its guard has not fenced it yet. Never promote beside a live writer.
            return Verdict::Wait {
                reason: format!(
                    "{why}, but member {node} still receives WAL from it; waiting for it to stop"
                ),
            };
        }
        candidates.push((r, tags.priority));
    }
    if !awaiting.is_empty() {
        // pg_auto_failover's lesson: never promote before every reachable member has said how
        // far it got, or the most advanced one may lose the race.
        return Verdict::AwaitReports {
            reason: format!(
                "{why}; waiting for members {awaiting:?} to report after the old primary stopped"
            ),
        };
    }
    if let Some(set) = input.cluster.failover_set().as_ref() {
        // Only a member known to hold every acknowledged write; while the set is committed,
        // lag does not matter (below).
        let reported: BTreeMap<NodeId, u64> = set
            .members
            .iter()
            .filter_map(|n| input.fresh(*n))
            .filter(|r| {
                r.pg == PgState::Replica && (hypothetical || input.sent_after(r, down_since))
            })
            .map(|r| (r.node, r.lsn))
            .collect();
        match sync::holders_of_every_ack(set, &reported) {
            Ok(holders) => {
                // WAL is one sequence: a replica at least as far along the same timeline as
                // the most advanced holder holds every acknowledged write too. Preferring
                // the most advanced of them spares the others a diverged history (a replica
                // ahead of the new primary's fork point can never follow it).
                let best = holders
                    .iter()
                    .filter_map(|n| input.fresh(*n))
                    .map(|r| (r.timeline, r.lsn))
                    .max();
                candidates.retain(|(r, _)| {
                    let holds = holders.contains(&r.node)
                        || best.is_some_and(|(tl, lsn)| r.timeline == tl && r.lsn >= lsn);
                    if !holds {
                        excluded.push(format!(
                            "{}: not known to hold every acknowledged write (synchronous set \
                             {:?}, most advanced {holders:?})",
                            r.node, set.members
                        ));
                    }
                    holds
                })
            }
            Err(why_not) => {
                excluded.push(why_not);
                candidates.clear();
            }
        }
    }
    // Writes acknowledged while replication was asynchronous (no set, or only a legacy set
    // kept from before a fall-back or `off`) are on no particular member: the lag bound is
    // what limits their loss.
    let sync = &input.cluster.sync;
    if sync.epoch != primary.epoch || !sync.committed.is_synchronous() {
        // Lag is measured against the most advanced position known: any member's report,
        // the old primary's last one included even when it is stale, and the position
        // last committed for the primary (a new leader has no older reports).
        let recorded = input
            .cluster
            .primary_lsn
            .filter(|r| r.epoch == primary.epoch)
            .map(|r| r.lsn);
        let best_lsn = input
            .members
            .iter()
            .filter_map(|n| input.reports.get(n))
            .map(|r| r.report.lsn)
            .chain(recorded)
            .max()
            .unwrap_or(0);
        candidates.retain(|(r, _)| {
            let lag = best_lsn.saturating_sub(r.lsn);
            if lag > cfg.maximum_lag_on_failover {
                excluded.push(format!(
                    "{}: {lag} bytes behind (maximum_lag_on_failover = {})",
                    r.node, cfg.maximum_lag_on_failover
                ));
                false
            } else {
                true
            }
        });
    }
    let mut why = why;
    if let Some(plan) = plan {
        let restricted = super::plan::Restriction {
            plan: &plan,
            primary_report,
            excluded: &excluded,
            why: &why,
            hypothetical,
        };
        if let Err(verdict) = restricted.apply(input, &mut candidates) {
            return verdict;
        }
        why = format!("{}: {why}", super::plan::requested(&plan));
    }
    candidates.sort_by(|(a, pa), (b, pb)| {
        b.timeline
            .cmp(&a.timeline)
            .then(b.lsn.cmp(&a.lsn))
            .then(pb.cmp(pa))
            .then(a.node.cmp(&b.node))
    });
    match candidates.first() {
        Some((best, _)) => {
            // The new primary's standbys: the old set's other members first, then live replicas.
            let mut keep = input.cluster.sync.committed.clone();
            keep.members.remove(&best.node);
            let fit = input.fit_standbys(best.node, &keep, true);
            let possible = input.possible_standbys(best.node);
            Verdict::Promote {
                node: best.node,
                epoch: primary.epoch + 1,
                reason: why,
                lsn: best.lsn,
                sync: sync::desired(cfg, &keep, &fit, &possible),
            }
        }
        None => Verdict::NoCandidate {
            reason: format!("{why}; no candidate: {}", excluded.join("; ")),
        },
    }
}

/// The next change of the synchronous standbys of the running primary, if any: only while the
/// primary reports as a primary and no promotion is under way.
pub fn sync_step(input: &PolicyInput<'_>) -> Option<SyncStep> {
    let primary = input.cluster.primary?;
    if input.pending.is_some() || input.cluster.sync.epoch != primary.epoch {
        return None;
    }
    let report = input.fresh(primary.node)?;
    if report.pg != PgState::Primary {
        return None;
    }
    let state = &input.cluster.sync;
    let current = sync::to_apply(state);
    let fit = input.fit_standbys(primary.node, current, false);
    let possible = input.possible_standbys(primary.node);
    let want = sync::desired(&input.cluster.config, current, &fit, &possible);
    sync::next_step(state, &want, report.sync_applied.as_ref(), primary.node)
}

/// Whom the leader `me` should ask to take Raft leadership, if anyone: when `me` runs the
/// committed primary and another voter is a healthy replica (the most advanced), so that a
/// crash of the primary's host costs one lease and not an election on top of it.
///
/// The target wins only with this leader's vote, which openraft 0.9.25 gives once
/// `raft_leader_lease_ms` has passed since this leader's election (its own vote time is not
/// refreshed while it leads), and only if the target's log has caught up (`caught_up`). The
/// other followers refuse within their lease, so with more than three voters the target
/// cannot win and its failed campaign would depose this leader: no hand-off then.
///
/// Only once the primary runs as one (its fresh report says so): a member promoting holds a
/// lease from before its promotion and renews it only when the promotion is done; a leader that
/// changed meanwhile may not renew it in time, and the new primary fences (found by the
/// partition suite: a second failover right after the first).
pub fn leadership_handoff(
    input: &PolicyInput<'_>,
    me: NodeId,
    voters: &BTreeSet<NodeId>,
    caught_up: &BTreeSet<NodeId>,
    raft_leader_lease_ms: u64,
) -> Option<NodeId> {
    let primary = input.cluster.primary?;
    let settled = input.now >= input.leader_since + raft_leader_lease_ms + input.quorum_ack_max_ms;
    if primary.node != me
        || !input.cluster.config.leader_handoff
        || input.pending.is_some()
        || !voters.contains(&me)
        || voters.len() > 3
        || !settled
        || input.fresh(me).is_none_or(|r| r.pg != PgState::Primary)
    {
        return None;
    }
    voters
        .iter()
        .filter(|n| **n != me && caught_up.contains(n))
        .filter_map(|n| input.fresh(*n))
        .filter(|r| r.healthy_replica())
        .max_by(|a, b| a.lsn.cmp(&b.lsn).then(b.node.cmp(&a.node)))
        .map(|r| r.node)
}

/// A new cluster's first primary: chosen once every member has reported, preferring a member
/// that already has data (the most advanced one), then the highest priority, then the lowest id.
fn choose_first_primary(input: &PolicyInput<'_>) -> Verdict {
    // Paused, the reconcile table would not initialise the chosen member anyway.
    if input.cluster.paused {
        return Verdict::Wait {
            reason: "no primary yet, and automatic failover is paused".into(),
        };
    }
    let mut reports = Vec::new();
    for &node in input.members {
        match input.fresh(node) {
            Some(r) => reports.push(r),
            None => {
                return Verdict::Wait {
                    reason: format!(
                        "waiting for every member to report before choosing the first primary \
                         (member {node} has not)"
                    ),
                }
            }
        }
    }
    let priority = |n: NodeId| {
        input
            .cluster
            .members
            .get(&n)
            .map(|m| (m.tags.nofailover, m.tags.priority))
            .unwrap_or((false, 0))
    };
    let has_data = |r: &MemberReport| r.pg != PgState::NoData;
    let best = reports
        .iter()
        .filter(|r| !priority(r.node).0)
        .max_by(|a, b| {
            has_data(a)
                .cmp(&has_data(b))
                .then(a.lsn.cmp(&b.lsn))
                .then(priority(a.node).1.cmp(&priority(b.node).1))
                .then(b.node.cmp(&a.node))
        });
    match best {
        // The first primary starts asynchronous: its standbys do not exist yet; they are added
        // once they stream from it.
        Some(r) => Verdict::Promote {
            node: r.node,
            epoch: 1,
            reason: "first primary of the cluster".into(),
            lsn: r.lsn,
            sync: SyncSet::asynchronous(),
        },
        None => Verdict::NoCandidate {
            reason: "every member is tagged nofailover; no first primary can be chosen".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_state::{MemberInfo, PrimaryAssignment, Tags};
    use crate::failover::report::Received;

    fn report(node: NodeId, pg: PgState, lsn: u64) -> MemberReport {
        MemberReport {
            node,
            pg,
            consecutive_failures: 0,
            timeline: 1,
            lsn,
            streaming: false,
            wal_receipt_age_ms: None,
            upstream: None,
            sync_applied: None,
            // Stamped late enough to count in every test that does not say otherwise.
            leader_stamp: Some(super::super::report::LeaderStamp {
                term: 1,
                at: 1_000_000,
            }),
            epoch_seen: 1,
            sent_at: 0,
            storage: Default::default(),
            replayed_lsn: None,
            handed_over: None,
            pending_restart: Vec::new(),
            system_identifier: None,
            unguarded: false,
            lsn_incomplete: false,
        }
    }

    struct Fixture {
        cluster: ClusterState,
        members: BTreeSet<NodeId>,
        reports: ReportBook,
    }

    impl Fixture {
        fn new() -> Self {
            // The timings below are written for a 2 s lease.
            let cluster = ClusterState {
                primary: Some(PrimaryAssignment { node: 1, epoch: 1 }),
                config: crate::dynamic_config::DynamicConfig {
                    lease_ms: 2_000,
                    synchronous_mode: crate::dynamic_config::SyncMode::Off,
                    ..Default::default()
                },
                sync: crate::cluster_state::SyncState {
                    epoch: 1,
                    ..Default::default()
                },
                ..Default::default()
            };
            let mut reports = ReportBook::new();
            reports.insert(
                1,
                Received {
                    at: 10_000,
                    report: report(1, PgState::Primary, 500),
                    fenced_since: None,
                    wal_lost_since: None,
                    primary_since: None,
                },
            );
            reports.insert(
                2,
                Received {
                    at: 10_000,
                    report: report(2, PgState::Replica, 490),
                    fenced_since: None,
                    wal_lost_since: None,
                    primary_since: None,
                },
            );
            reports.insert(
                3,
                Received {
                    at: 10_000,
                    report: report(3, PgState::Replica, 480),
                    fenced_since: None,
                    wal_lost_since: None,
                    primary_since: None,
                },
            );
            Self {
                cluster,
                members: [1, 2, 3].into(),
                reports,
            }
        }
        /// `synchronous_mode = on` with `member` the committed, confirmed standby.
        fn synchronous_with_standby(member: NodeId) -> Self {
            let mut f = Self::new();
            f.cluster.config.synchronous_mode = crate::dynamic_config::SyncMode::On;
            let set = SyncSet {
                members: [member].into(),
                k: 1,
            };
            f.cluster.sync.committed = set.clone();
            f.reports.get_mut(&1).unwrap().report.sync_applied =
                Some(super::super::report::SyncApplied {
                    epoch: 1,
                    set,
                    confirmed: true,
                    revision: f.cluster.sync.revision,
                });
            f
        }

        fn input(&self, now: Millis) -> PolicyInput<'_> {
            PolicyInput {
                now,
                term: 1,
                leader_since: 0,
                quorum_ack_max_ms: 300,
                cluster: &self.cluster,
                members: &self.members,
                reports: &self.reports,
                last_grant: Some(GrantRecord::after_grant(
                    None,
                    1,
                    1,
                    10_000,
                    0,
                    LeaseTerms::of(&self.cluster.config),
                )),
                pending: None,
                now_unix_ms: 1_000_000,
                plan_started_seen: None,
            }
        }

        /// Both replicas stream from the primary now.
        fn streaming(mut self) -> Self {
            for n in [2, 3] {
                let r = &mut self.reports.get_mut(&n).unwrap().report;
                r.streaming = true;
                r.wal_receipt_age_ms = Some(10);
                r.upstream = Some(1);
            }
            self
        }

        /// Primary 1 reports it fenced itself, after the last grant.
        fn fence_primary(&mut self) {
            let p = self.reports.get_mut(&1).unwrap();
            p.report.pg = PgState::Fenced;
            p.report.sent_at = 5;
            p.fenced_since = Some(10_050);
        }

        /// Primary 1 shut down cleanly for plan 7; its WAL ends at `final_lsn`.
        fn hand_over(&mut self, final_lsn: u64) {
            self.fence_primary();
            self.reports.get_mut(&1).unwrap().report.handed_over =
                Some(super::super::report::HandedOver { plan: 7, final_lsn });
        }

        fn plan(&mut self, kind: crate::cluster_state::PlanKind, to: NodeId, started: bool) {
            self.cluster.plan = Some(crate::cluster_state::PrimaryPlan {
                id: 7,
                kind,
                epoch: 1,
                from: 1,
                to,
                not_before_unix_ms: 0,
                requested_at_unix_ms: 0,
                started,
            });
        }
    }

    #[test]
    fn a_switchover_needs_a_running_primary_and_a_streaming_target_within_the_lag_bound() {
        use crate::failover::plan::switchover_target;
        let f = Fixture::new();
        let why = switchover_target(&f.input(10_100), Some(2)).unwrap_err();
        assert!(why.contains("does not stream"), "{why}");
        let mut f = Fixture::new().streaming();
        assert_eq!(switchover_target(&f.input(10_100), Some(3)), Ok(3));
        // Without a target: the most advanced replica.
        assert_eq!(switchover_target(&f.input(10_100), None), Ok(2));
        assert!(switchover_target(&f.input(10_100), Some(1))
            .unwrap_err()
            .contains("already the primary"));
        assert!(switchover_target(&f.input(10_100), Some(9))
            .unwrap_err()
            .contains("not a member"));
        f.cluster.members.insert(
            3,
            MemberInfo {
                id: 3,
                tags: Tags {
                    nofailover: true,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        assert!(switchover_target(&f.input(10_100), Some(3))
            .unwrap_err()
            .contains("nofailover"));
        f.cluster.config.maximum_lag_on_failover = 5;
        let why = switchover_target(&f.input(10_100), Some(2)).unwrap_err();
        assert!(why.contains("10 bytes behind"), "{why}");
        // A primary that is down has nothing to hand over.
        let mut f = Fixture::new().streaming();
        f.reports.get_mut(&1).unwrap().report.pg = PgState::Fenced;
        let why = switchover_target(&f.input(10_100), Some(2)).unwrap_err();
        assert!(why.contains("pgquorum failover"), "{why}");
    }

    #[test]
    fn a_planned_switchover_starts_at_its_time_and_promotes_the_target_only_past_the_last_record() {
        use crate::cluster_state::PlanKind;
        let mut f = Fixture::new().streaming();
        f.plan(PlanKind::Switchover, 3, false);
        f.cluster.plan.as_mut().unwrap().not_before_unix_ms = 2_000_000;
        assert_eq!(decide(&f.input(10_100)), Verdict::Steady, "not yet");
        f.cluster.plan.as_mut().unwrap().not_before_unix_ms = 0;
        assert_eq!(decide(&f.input(10_100)), Verdict::StartPlan { id: 7 });
        f.plan(PlanKind::Switchover, 3, true);
        match decide(&f.input(10_100)) {
            Verdict::Wait { reason } => assert!(reason.contains("shut down"), "{reason}"),
            v => panic!("{v:?}"),
        }
        // The primary keeps its lease while it shuts down.
        let r1 = f.reports[&1].report.clone();
        assert_eq!(may_grant_lease(&f.input(10_100), &r1, Some(10)), Some(1));
        // It stopped cleanly; the target has replayed only up to the last record's start.
        f.hand_over(500);
        for n in [2, 3] {
            let r = &mut f.reports.get_mut(&n).unwrap();
            r.report.lsn = 520;
            r.report.replayed_lsn = Some(500);
            r.report.streaming = false;
        }
        match decide(&f.input(10_100)) {
            Verdict::Wait { reason } => assert!(reason.contains("replayed"), "{reason}"),
            v => panic!("{v:?}"),
        }
        f.reports.get_mut(&3).unwrap().report.replayed_lsn = Some(520);
        // Member 2 is as far along, but the operator asked for 3: no lease wait either.
        match decide(&f.input(10_100)) {
            Verdict::Promote {
                node,
                epoch,
                reason,
                ..
            } => {
                assert_eq!((node, epoch), (3, 2));
                assert!(reason.contains("switchover"), "{reason}");
                assert!(reason.contains("shut down cleanly"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_switchover_whose_target_never_catches_up_is_cancelled_after_its_timeout() {
        use crate::cluster_state::PlanKind;
        let mut f = Fixture::new().streaming();
        f.plan(PlanKind::Switchover, 3, true);
        f.hand_over(500);
        f.reports.get_mut(&3).unwrap().report.pg = PgState::Unresponsive;
        let mut input = f.input(10_100);
        input.plan_started_seen = Some(10_000);
        assert!(matches!(decide(&input), Verdict::Wait { .. }));
        let late = 10_000 + f.cluster.config.switchover_timeout_ms;
        for r in f.reports.values_mut() {
            r.at = late;
        }
        let mut input = f.input(late);
        input.plan_started_seen = Some(10_000);
        match decide(&input) {
            Verdict::CancelPlan { id, reason } => {
                assert_eq!(id, 7);
                assert!(reason.contains("not a healthy replica"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_manual_failover_is_refused_while_the_primary_is_healthy_and_narrows_the_choice() {
        use crate::cluster_state::PlanKind;
        use crate::failover::plan::{hypothetical_refusal, manual_failover_refusal};
        let mut f = Fixture::new().streaming();
        let why = manual_failover_refusal(&f.input(10_100), 3).unwrap();
        assert!(why.contains("switchover --to 3"), "{why}");
        // The primary fenced itself: member 2 is the most advanced, but the operator names 3.
        f.fence_primary();
        assert_eq!(manual_failover_refusal(&f.input(10_100), 3), None);
        f.plan(PlanKind::Failover, 3, true);
        assert_eq!(hypothetical_refusal(&f.input(10_100), 3), None);
        match decide(&f.input(10_100)) {
            Verdict::Promote { node, reason, .. } => {
                assert_eq!(node, 3);
                assert!(reason.contains("manual failover"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        // Under synchronous replication only a member holding every acknowledged write.
        let mut f = Fixture::synchronous_with_standby(2).streaming();
        f.fence_primary();
        f.plan(PlanKind::Failover, 3, true);
        f.reports.get_mut(&3).unwrap().report.lsn = 400;
        let why = hypothetical_refusal(&f.input(10_100), 3).unwrap();
        assert!(why.contains("acknowledged"), "{why}");
    }

    #[test]
    fn healthy_primary_is_left_alone() {
        let f = Fixture::new();
        assert_eq!(decide(&f.input(10_100)), Verdict::Steady);
    }

    #[test]
    fn a_single_missed_probe_does_not_fail_over() {
        let mut f = Fixture::new();
        f.reports.get_mut(&1).unwrap().report.consecutive_failures = 1;
        assert_eq!(decide(&f.input(10_100)), Verdict::Steady);
    }

    #[test]
    fn silent_primary_waits_out_its_lease_then_most_advanced_replica_wins() {
        let mut f = Fixture::new();
        // Replicas keep reporting; the primary went silent at 10_000.
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = 12_100;
        }
        match decide(&f.input(12_150)) {
            Verdict::Wait { reason } => assert!(reason.contains("lease"), "{reason}"),
            v => panic!("{v:?}"),
        }
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = 12_200;
        }
        match decide(&f.input(12_201)) {
            Verdict::Promote { node, epoch, .. } => assert_eq!((node, epoch), (2, 2)),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn failed_postgres_with_fence_report_fails_over_without_lease_wait() {
        let mut f = Fixture::new();
        let p = f.reports.get_mut(&1).unwrap();
        p.report.pg = PgState::Fenced;
        p.report.consecutive_failures = 3;
        // Sent no later than the granted report, even if received later: that grant may have
        // restarted it.
        f.reports.get_mut(&1).unwrap().at = 10_050;
        assert!(matches!(decide(&f.input(10_100)), Verdict::Wait { .. }));
        // Sent after the granted report: the fence is proof, no lease wait.
        f.reports.get_mut(&1).unwrap().report.sent_at = 1;
        match decide(&f.input(10_100)) {
            Verdict::Promote { node, .. } => assert_eq!(node, 2),
            v => panic!("{v:?}"),
        }
    }

    /// Member 1, the primary, failed `failures` write probes for want of space.
    fn full_disk_on_the_primary(f: &mut Fixture, failures: u32) {
        let p = &mut f.reports.get_mut(&1).unwrap().report;
        p.storage = super::super::report::StorageReport {
            free_bytes: Some(4096),
            low_space: true,
            cannot_write: Some("no space: only 4096 bytes free".into()),
            write_failures: failures,
            read_only: false,
            write_probe_ms: None,
        };
    }

    fn room(f: &mut Fixture, node: NodeId, free: u64) {
        f.reports.get_mut(&node).unwrap().report.storage.free_bytes = Some(free);
    }

    #[test]
    fn a_primary_that_cannot_write_fails_over_only_to_a_member_with_room() {
        let mut f = Fixture::new();
        full_disk_on_the_primary(&mut f, 2);
        assert_eq!(
            decide(&f.input(10_100)),
            Verdict::Steady,
            "below the threshold"
        );
        full_disk_on_the_primary(&mut f, 3);
        // Up and answering, it may hold a lease: first that runs out (S1), and no renewal
        // while another member can take over.
        match decide(&f.input(10_100)) {
            Verdict::Wait { reason } => {
                assert!(
                    reason.contains("cannot write") && reason.contains("lease"),
                    "{reason}"
                )
            }
            v => panic!("{v:?}"),
        }
        let primary = f.reports[&1].report.clone();
        assert_eq!(may_grant_lease(&f.input(10_100), &primary, Some(10)), None);
        // Member 2 is the most advanced but has no room; member 3 has.
        room(&mut f, 2, 1024 * 1024);
        room(&mut f, 3, 1 << 30);
        for n in [1, 2, 3] {
            f.reports.get_mut(&n).unwrap().at = 12_300;
        }
        match decide(&f.input(12_301)) {
            Verdict::Promote { node, reason, .. } => {
                assert_eq!(node, 3);
                assert!(reason.contains("no space"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_primary_that_cannot_write_stays_when_no_member_has_room() {
        let mut f = Fixture::new();
        full_disk_on_the_primary(&mut f, 5);
        room(&mut f, 2, 0);
        room(&mut f, 3, 10 * 1024 * 1024);
        // While its lease runs, the lease is renewed all the same: no member could take over
        // once it ran out (found by the storage tests: without this the primary lost its lease,
        // was fenced, restarted in place, and lost it again), and the verdict says so.
        assert!(matches!(
            decide(&f.input(10_100)),
            Verdict::NoCandidate { .. }
        ));
        let primary = f.reports[&1].report.clone();
        assert_eq!(
            may_grant_lease(&f.input(10_100), &primary, Some(10)),
            Some(1)
        );
        for n in [1, 2, 3] {
            f.reports.get_mut(&n).unwrap().at = 12_300;
        }
        match decide(&f.input(12_301)) {
            Verdict::NoCandidate { reason } => {
                assert!(reason.contains("cannot write"), "{reason}");
                assert!(reason.contains("2: only 0 bytes free"), "{reason}");
                assert!(reason.contains("3: only 10485760 bytes free"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        // Better a primary that cannot write than none: its lease is renewed.
        let primary = f.reports[&1].report.clone();
        assert_eq!(
            may_grant_lease(&f.input(12_301), &primary, Some(10)),
            Some(1)
        );
    }

    #[test]
    fn write_failures_do_not_fail_over_when_the_setting_is_off() {
        let mut f = Fixture::new();
        f.cluster.config.failover_on_write_failure = false;
        full_disk_on_the_primary(&mut f, 10);
        for n in [1, 2, 3] {
            f.reports.get_mut(&n).unwrap().at = 12_300;
        }
        assert_eq!(decide(&f.input(12_301)), Verdict::Steady);
        let primary = f.reports[&1].report.clone();
        assert_eq!(
            may_grant_lease(&f.input(10_100), &primary, Some(10)),
            Some(1)
        );
    }

    #[test]
    fn failed_postgres_without_fence_waits_for_the_lease() {
        let mut f = Fixture::new();
        f.reports.get_mut(&1).unwrap().report.consecutive_failures = 3;
        assert!(matches!(decide(&f.input(10_100)), Verdict::Wait { .. }));
    }

    #[test]
    fn new_leader_waits_out_its_predecessors_leases_first() {
        let mut f = Fixture::new();
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = 13_000;
        }
        let mut input = f.input(13_000);
        input.leader_since = 12_000;
        input.last_grant = None;
        match decide(&input) {
            Verdict::Wait { reason } => assert!(reason.contains("new Raft leader"), "{reason}"),
            v => panic!("{v:?}"),
        }
        let later = 12_000 + new_leader_wait(LeaseTerms::of(&f.cluster.config), 300);
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = later;
        }
        let mut input = f.input(later);
        input.leader_since = 12_000;
        input.last_grant = None;
        assert!(matches!(decide(&input), Verdict::Promote { node: 2, .. }));
    }

    #[test]
    fn candidates_respect_tags_lag_and_priority() {
        let mut f = Fixture::new();
        f.reports.remove(&1);
        f.cluster.members.insert(
            2,
            MemberInfo {
                id: 2,
                name: "b".into(),
                tags: Tags {
                    nofailover: true,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let now = 20_000;
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = now;
        }
        match decide(&f.input(now)) {
            Verdict::Promote { node, .. } => assert_eq!(node, 3),
            v => panic!("{v:?}"),
        }
        // Too far behind: no candidate, and the reason says why.
        f.reports.get_mut(&3).unwrap().report.lsn = 0;
        f.reports.insert(
            4,
            Received {
                at: now,
                report: report(4, PgState::Primary, 10_000_000),
                fenced_since: None,
                wal_lost_since: None,
                primary_since: None,
            },
        );
        f.members.insert(4);
        match decide(&f.input(now)) {
            Verdict::NoCandidate { reason } => {
                assert!(
                    reason.contains("nofailover") && reason.contains("not a healthy replica"),
                    "{reason}"
                )
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn equal_lsn_ties_break_by_priority_then_id() {
        let mut f = Fixture::new();
        f.reports.remove(&1);
        let now = 20_000;
        for n in [2, 3] {
            let r = f.reports.get_mut(&n).unwrap();
            r.at = now;
            r.report.lsn = 490;
        }
        assert!(matches!(
            decide(&f.input(now)),
            Verdict::Promote { node: 2, .. }
        ));
        f.cluster.members.insert(
            3,
            MemberInfo {
                id: 3,
                name: "c".into(),
                tags: Tags {
                    priority: 5,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        assert!(matches!(
            decide(&f.input(now)),
            Verdict::Promote { node: 3, .. }
        ));
    }

    #[test]
    fn a_replica_still_streaming_from_a_silent_primary_blocks_promotion() {
        let mut f = Fixture::new();
        let now = 20_000;
        f.reports.remove(&1);
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = now;
        }
        let r = &mut f.reports.get_mut(&3).unwrap().report;
        r.streaming = true;
        r.wal_receipt_age_ms = Some(100);
        assert!(matches!(decide(&f.input(now)), Verdict::Wait { .. }));
    }

    #[test]
    fn reports_sent_before_the_old_primary_stopped_do_not_count() {
        // Member 3's sidecar froze while its Postgres kept receiving (and acknowledging) WAL:
        // its last report understates what it holds. Nobody is promoted on it.
        let mut f = Fixture::new();
        f.reports.remove(&1);
        let now = 20_000;
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = now;
        }
        let stale = super::super::report::LeaderStamp {
            term: 1,
            at: 11_000,
        };
        f.reports.get_mut(&3).unwrap().report.leader_stamp = Some(stale);
        match decide(&f.input(now)) {
            Verdict::AwaitReports { reason } => assert!(reason.contains("[3]"), "{reason}"),
            v => panic!("{v:?}"),
        }
        // A stamp of an earlier leader's term proves nothing either.
        let other_term = super::super::report::LeaderStamp {
            term: 0,
            at: 99_999,
        };
        f.reports.get_mut(&3).unwrap().report.leader_stamp = Some(other_term);
        assert!(matches!(
            decide(&f.input(now)),
            Verdict::AwaitReports { .. }
        ));
    }

    #[test]
    fn a_restarted_replica_still_replaying_its_own_wal_is_waited_for_not_outranked() {
        // Review finding 8: a standby restarted during a failover reports its replay position
        // (its receive position is NULL until the WAL receiver runs), which may be behind the
        // WAL on its disk; compared as it is, a less advanced member could be chosen.
        let mut f = Fixture::new();
        let now = 20_000;
        f.reports.remove(&1);
        for n in [2, 3] {
            let r = f.reports.get_mut(&n).unwrap();
            r.at = now;
            r.report.streaming = false;
            r.report.wal_receipt_age_ms = None;
        }
        f.reports.get_mut(&3).unwrap().report.lsn_incomplete = true;
        assert!(
            matches!(decide(&f.input(now)), Verdict::AwaitReports { ref reason } if reason.contains("[3]")),
            "{:?}",
            decide(&f.input(now))
        );
        f.reports.get_mut(&3).unwrap().report.lsn_incomplete = false;
        assert!(
            !matches!(decide(&f.input(now)), Verdict::AwaitReports { .. }),
            "{:?}",
            decide(&f.input(now))
        );
    }

    #[test]
    fn a_stale_streaming_status_does_not_block_promotion() {
        // After a silent cut the receiver still says `streaming`, but it has heard nothing for
        // longer than the old primary's lease: that is no evidence of a live primary.
        let mut f = Fixture::new();
        let now = 20_000;
        f.reports.remove(&1);
        for n in [2, 3] {
            let r = f.reports.get_mut(&n).unwrap();
            r.at = now;
            r.report.streaming = true;
            r.report.upstream = Some(1);
            r.report.wal_receipt_age_ms = Some(8_000);
        }
        assert!(matches!(
            decide(&f.input(now)),
            Verdict::Promote { node: 2, .. }
        ));
    }

    #[test]
    fn a_grant_is_judged_by_its_own_lease_not_a_shorter_one_set_later() {
        // Granted under a 10 s lease at 10_000; the operator lowers the lease to 2 s during the
        // partition. The old primary's guard still allows writes until about 20_000.
        let mut f = Fixture::new();
        let mut input_terms = LeaseTerms::of(&f.cluster.config);
        input_terms.lease_ms = 10_000;
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = 13_000;
        }
        let mut input = f.input(13_000);
        input.last_grant = Some(GrantRecord::after_grant(None, 1, 1, 10_000, 0, input_terms));
        assert!(
            matches!(decide(&input), Verdict::Wait { ref reason } if reason.contains("lease")),
            "{:?}",
            decide(&input)
        );
    }

    #[test]
    fn a_shorter_grant_after_a_longer_one_leaves_the_longer_bound_in_force() {
        // Finding 1 of the review: a 10 s grant at 10_000, then `lease_ms` lowered to 2.5 s and
        // a renewal granted under it at 11_000. The holder keeps the later expiry (about
        // 20_000), so the leader may not promote at 11_000 + 2_700.
        let mut f = Fixture::new();
        let long = LeaseTerms {
            lease_ms: 10_000,
            drift_margin_ms: 200,
        };
        let short = LeaseTerms {
            lease_ms: 2_500,
            drift_margin_ms: 200,
        };
        let first = GrantRecord::after_grant(None, 1, 1, 10_000, 9_990, long);
        let second = GrantRecord::after_grant(Some(first), 1, 1, 11_000, 10_990, short);
        assert_eq!(second.safe_after, 20_200, "the longest bound, not the last");
        assert_eq!(second.report_sent_at, 10_990, "the last grant's report");
        // A grant of a new epoch (or to another holder) starts a new record.
        assert_eq!(
            GrantRecord::after_grant(Some(first), 1, 2, 11_000, 10_990, short).safe_after,
            13_700
        );
        f.reports.remove(&1);
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = 14_000;
        }
        let mut input = f.input(14_000);
        input.last_grant = Some(second);
        assert!(
            matches!(decide(&input), Verdict::Wait { ref reason } if reason.contains("lease may run 6200 ms")),
            "{:?}",
            decide(&input)
        );
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = 20_300;
        }
        let mut input = f.input(20_300);
        input.last_grant = Some(second);
        assert!(
            !matches!(decide(&input), Verdict::Wait { ref reason } if reason.contains("lease may run")),
            "{:?}",
            decide(&input)
        );
    }

    #[test]
    fn a_new_leader_waits_by_the_longest_terms_still_in_force() {
        let mut f = Fixture::new();
        f.cluster.lease_ceiling = Some(LeaseTerms {
            lease_ms: 10_000,
            drift_margin_ms: 200,
        });
        f.reports.remove(&1);
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = 16_000;
        }
        let mut input = f.input(16_000);
        input.leader_since = 12_000;
        input.last_grant = None;
        // 4 s in office: past a 2 s lease's wait, not past a 10 s one's.
        assert!(matches!(decide(&input), Verdict::Wait { .. }));
    }

    #[test]
    fn no_lease_for_a_primary_that_a_pending_promotion_demotes() {
        let f = Fixture::new();
        let mut input = f.input(10_100);
        input.pending = Some(PrimaryAssignment { node: 2, epoch: 2 });
        assert_eq!(
            may_grant_lease(&input, &f.reports[&1].report, Some(100)),
            None
        );
        assert!(matches!(
            decide(&input),
            Verdict::Steady | Verdict::Wait { .. }
        ));
    }

    #[test]
    fn committed_primary_lsn_bounds_lag_after_a_leader_change() {
        // The new leader never heard the old primary; only the committed position shows that
        // both replicas are far behind it.
        let mut f = Fixture::new();
        f.reports.remove(&1);
        let now = 20_000;
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = now;
        }
        f.cluster.primary_lsn = Some(crate::cluster_state::RecordedLsn {
            epoch: 1,
            lsn: 490 + 10 * 1024 * 1024,
        });
        assert!(matches!(decide(&f.input(now)), Verdict::NoCandidate { .. }));
    }

    fn synchronous(f: &mut Fixture, members: &[NodeId]) {
        f.cluster.config.synchronous_mode = crate::dynamic_config::SyncMode::On;
        f.cluster.sync.committed = SyncSet {
            members: members.iter().copied().collect(),
            k: 1,
        };
    }

    #[test]
    fn lag_bounds_a_failover_that_relies_on_a_legacy_set() {
        // Replication went asynchronous (`off`, or `on` falling back): the synchronous set
        // of before is kept as legacy, but writes acknowledged since are on no particular
        // member, so the lag bound applies as in asynchronous mode. The partition suite found
        // this: a replica 130 KB behind was promoted with maximum_lag_on_failover at 64 KB.
        let mut f = Fixture::new();
        synchronous(&mut f, &[3]);
        f.reports.remove(&1);
        let now = 20_000;
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = now;
        }
        let far_ahead = crate::cluster_state::RecordedLsn {
            epoch: 1,
            lsn: 490 + 10 * 1024 * 1024,
        };
        f.cluster.primary_lsn = Some(far_ahead);
        // While the set is committed, its holders have every acknowledged write: lag is moot.
        assert!(matches!(
            decide(&f.input(now)),
            Verdict::Promote { node: 2, .. }
        ));
        let set = f.cluster.sync.committed.clone();
        f.cluster.sync.legacy = Some(set);
        f.cluster.sync.committed = SyncSet::default();
        f.cluster.config.synchronous_mode = crate::dynamic_config::SyncMode::Off;
        match decide(&f.input(now)) {
            Verdict::NoCandidate { reason } => {
                assert!(reason.contains("maximum_lag_on_failover"), "{reason}")
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn synchronous_mode_promotes_only_a_member_holding_every_acknowledged_write() {
        let mut f = Fixture::new();
        synchronous(&mut f, &[3]);
        f.reports.remove(&1);
        let now = 20_000;
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().at = now;
        }
        // Member 3 (synchronous) holds every acknowledged write at 480; member 2 got further
        // along the same timeline, so it holds them too, and it is the most advanced: promoting
        // 3 would leave 2 ahead of the new primary's fork point, unable to follow.
        match decide(&f.input(now)) {
            Verdict::Promote { node, sync, .. } => {
                assert_eq!(node, 2);
                assert_eq!(
                    sync.members,
                    [3].into(),
                    "the other replica becomes its standby"
                );
            }
            v => panic!("{v:?}"),
        }
        // Behind the synchronous standby, or on another timeline, it does not qualify.
        f.reports.get_mut(&2).unwrap().report.lsn = 470;
        assert!(matches!(
            decide(&f.input(now)),
            Verdict::Promote { node: 3, .. }
        ));
        f.reports.get_mut(&2).unwrap().report.lsn = 490;
        f.reports.get_mut(&2).unwrap().report.timeline = 7;
        f.reports.get_mut(&3).unwrap().report.timeline = 1;
        match decide(&f.input(now)) {
            Verdict::Promote { node, .. } => assert_eq!(node, 3),
            v => panic!("{v:?}"),
        }
        // Without a report from the synchronous standby, nobody.
        f.reports.get_mut(&2).unwrap().report.timeline = 1;
        f.reports.remove(&3);
        match decide(&f.input(now)) {
            Verdict::NoCandidate { reason } => assert!(reason.contains("synchronous"), "{reason}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn sync_step_adds_a_streaming_standby_through_a_target() {
        let mut f = Fixture::new();
        f.cluster.config.synchronous_mode = crate::dynamic_config::SyncMode::On;
        for n in [2, 3] {
            let r = &mut f.reports.get_mut(&n).unwrap().report;
            r.streaming = true;
            r.upstream = Some(1);
            r.wal_receipt_age_ms = Some(100);
        }
        match sync_step(&f.input(10_100)) {
            Some(SyncStep::Target(set)) => assert_eq!(set.members, [2].into()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_leader_keeps_a_synchronous_standby_it_has_not_heard_from_yet() {
        let mut f = Fixture::synchronous_with_standby(2);
        f.reports.remove(&2);
        f.reports.remove(&3);
        // In office since 10 s (lease 2 s): only the primary has reported so far.
        let mut input = f.input(10_100);
        input.leader_since = 10_000;
        assert_eq!(
            sync_step(&input),
            None,
            "no evidence against the standby yet"
        );
        // A whole lease in office without a word from the standby: it is gone.
        f.reports.get_mut(&1).unwrap().at = 12_050;
        let mut input = f.input(12_100);
        input.leader_since = 10_000;
        match sync_step(&input) {
            Some(SyncStep::Commit(set)) => assert!(set.members.is_empty(), "{set:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_synchronous_standby_without_wal_for_a_lease_is_dropped() {
        let mut f = Fixture::synchronous_with_standby(2);
        // The primary runs since 1 s; member 2 still says `streaming`, but its last message
        // from the primary is old (a silent cut of the replication link) since 10 s.
        let book = |f: &mut Fixture, at: Millis| {
            f.reports.get_mut(&1).unwrap().primary_since = Some(1_000);
            let r = f.reports.get_mut(&2).unwrap();
            r.report.streaming = true;
            r.report.upstream = Some(1);
            r.report.wal_receipt_age_ms = Some(5_000);
            r.wal_lost_since = Some(10_000);
            for n in [1, 2, 3] {
                f.reports.get_mut(&n).unwrap().at = at;
            }
        };
        book(&mut f, 11_000);
        assert_eq!(
            sync_step(&f.input(11_000)),
            None,
            "within a lease of the loss"
        );
        book(&mut f, 12_100);
        match sync_step(&f.input(12_100)) {
            Some(SyncStep::Commit(set)) => assert!(set.members.is_empty(), "{set:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn leadership_moves_off_the_primary_only_once_it_runs_as_primary() {
        let mut f = Fixture::new();
        f.cluster.config.leader_handoff = true;
        for n in [2, 3] {
            f.reports.get_mut(&n).unwrap().report.upstream = Some(1);
        }
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let caught_up: BTreeSet<NodeId> = [2, 3].into();
        let input = f.input(10_100);
        assert_eq!(
            leadership_handoff(&input, 1, &voters, &caught_up, 600),
            Some(2),
            "the most advanced caught-up replica"
        );
        // Committed primary, still promoting: its report says replica.
        f.reports.get_mut(&1).unwrap().report.pg = PgState::Replica;
        let input = f.input(10_100);
        assert_eq!(
            leadership_handoff(&input, 1, &voters, &caught_up, 600),
            None
        );
    }

    #[test]
    fn paused_cluster_never_fails_over() {
        let mut f = Fixture::new();
        f.cluster.paused = true;
        f.reports.remove(&1);
        assert!(matches!(decide(&f.input(30_000)), Verdict::Wait { .. }));
        // Nor chooses a first primary.
        f.cluster.primary = None;
        assert!(matches!(decide(&f.input(10_100)), Verdict::Wait { .. }));
    }

    #[test]
    fn first_primary_waits_for_all_then_prefers_data() {
        let mut f = Fixture::new();
        f.cluster.primary = None;
        for r in f.reports.values_mut() {
            r.report.pg = PgState::NoData;
            r.report.lsn = 0;
        }
        f.reports.get_mut(&3).unwrap().report.pg = PgState::Stopped;
        assert!(matches!(
            decide(&f.input(10_000)),
            Verdict::Promote {
                node: 3,
                epoch: 1,
                ..
            }
        ));
        f.reports.remove(&2);
        assert!(matches!(decide(&f.input(10_000)), Verdict::Wait { .. }));
    }

    #[test]
    fn leases_only_for_the_healthy_primary_of_a_leader_with_quorum() {
        let f = Fixture::new();
        let input = f.input(10_100);
        let primary = &f.reports[&1].report;
        assert_eq!(may_grant_lease(&input, primary, Some(100)), Some(1));
        assert_eq!(may_grant_lease(&input, primary, Some(301)), None);
        assert_eq!(may_grant_lease(&input, primary, None), None);
        assert_eq!(
            may_grant_lease(&input, &f.reports[&2].report, Some(100)),
            None
        );
        let mut failed = primary.clone();
        failed.consecutive_failures = 3;
        assert_eq!(may_grant_lease(&input, &failed, Some(100)), None);
    }
}
