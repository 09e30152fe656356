//! Operator plans for the primary, judged by the leader: a planned switchover (the healthy
//! primary shuts down cleanly, the target replays its last WAL record, then the target is
//! promoted) and a manual failover (the primary is down and the operator names its
//! successor). Pure, like the rest of the policy: the leader and the simulation run this code.
//!
//! A plan only ever narrows what the policy would do: every safety wait of a failover (leases,
//! reports sent after the old primary stopped, the synchronous standbys) still applies, and the
//! target must qualify like any candidate. A switchover adds one condition: the target has
//! replayed past the old primary's shutdown checkpoint, so it holds every write that primary
//! ever made, acknowledged or not, and the old primary can follow it without a rewind.

use super::policy::{cannot_write, wal_fresh_ms, PolicyInput, Verdict};
use super::report::{HandedOver, MemberReport, PgState};
use crate::cluster_state::{ClusterState, Epoch, PlanKind, PrimaryPlan};
use crate::types::NodeId;

impl PolicyInput<'_> {
    /// The plan under way for the current primary's epoch, if any.
    pub(crate) fn plan(&self) -> Option<PrimaryPlan> {
        let epoch = self.cluster.primary?.epoch;
        self.cluster.plan.filter(|p| p.epoch == epoch)
    }

    fn plan_timed_out(&self) -> bool {
        let timeout = self.cluster.config.switchover_timeout_ms;
        self.plan_started_seen
            .is_some_and(|seen| self.now >= seen.saturating_add(timeout))
    }
}

/// Whether a primary that shut down cleanly for a switchover (`handed`, to `to`, in
/// `from_epoch`) may follow the new primary without a rewind: only when the committed
/// promotion of the next epoch named `to` at a WAL position past the old primary's last record.
/// Any other promotion (the plan was cancelled, the target was promoted by the usual rules
/// before it had everything) may have forked the timeline earlier; then a rewind it is.
pub fn follows_without_rewind(
    cluster: &ClusterState,
    handed: HandedOver,
    to: NodeId,
    from_epoch: Epoch,
) -> bool {
    cluster.history.iter().any(|h| {
        h.epoch == from_epoch + 1 && h.to == to && h.lsn.is_some_and(|l| l > handed.final_lsn)
    })
}

/// How the history names what an operator asked for.
pub fn requested(plan: &PrimaryPlan) -> String {
    match plan.kind {
        PlanKind::Switchover => format!(
            "switchover from member {} to member {} requested by an operator",
            plan.from, plan.to
        ),
        PlanKind::Failover => format!(
            "manual failover to member {} requested by an operator",
            plan.to
        ),
    }
}

/// Why `node` may not take over from the running primary in a switchover, if it may not.
fn unfit_for_switchover(
    input: &PolicyInput<'_>,
    node: NodeId,
    primary: &MemberReport,
) -> Option<String> {
    let cfg = &input.cluster.config;
    if input.tags(node).nofailover {
        return Some(format!("member {node} is tagged nofailover"));
    }
    let Some(r) = input.fresh(node) else {
        return Some(format!(
            "member {node} has not reported within the last {} ms",
            cfg.lease_ms
        ));
    };
    if !r.healthy_replica() {
        return Some(format!(
            "member {node} is not a healthy replica ({:?})",
            r.pg
        ));
    }
    if r.upstream != Some(primary.node) || !r.receives_wal_now(wal_fresh_ms(cfg)) {
        return Some(format!(
            "member {node} does not stream from the primary (member {}) now",
            primary.node
        ));
    }
    let lag = primary.lsn.saturating_sub(r.lsn);
    if lag > cfg.maximum_lag_on_failover {
        return Some(format!(
            "member {node} is {lag} bytes behind the primary (maximum_lag_on_failover = {})",
            cfg.maximum_lag_on_failover
        ));
    }
    if let Some(free) = r
        .storage
        .free_bytes
        .filter(|f| *f < cfg.failover_min_free_bytes)
    {
        return Some(format!(
            "member {node} has only {free} bytes free (failover_min_free_bytes = {})",
            cfg.failover_min_free_bytes
        ));
    }
    None
}

/// The member a switchover to `to` (or, without `to`, to the best replica) would promote, or
/// why none may: the primary must run and write, the target must stream from it, be within
/// `maximum_lag_on_failover`, have room, and not be tagged `nofailover`.
pub fn switchover_target(input: &PolicyInput<'_>, to: Option<NodeId>) -> Result<NodeId, String> {
    let cfg = &input.cluster.config;
    let primary = input
        .cluster
        .primary
        .ok_or("no primary has been chosen yet")?;
    if input.cluster.paused {
        return Err("automatic failover is paused; resume it first (`pgquorum resume`)".into());
    }
    let running = input.fresh(primary.node).filter(|r| {
        r.pg == PgState::Primary && r.consecutive_failures == 0 && !cannot_write(cfg, r)
    });
    let Some(p) = running else {
        return Err(format!(
            "the primary (member {}) is not running and writing, so there is nothing to hand \
             over; use `pgquorum failover --to NODE` to choose its successor",
            primary.node
        ));
    };
    match to {
        Some(n) if n == primary.node => Err(format!("member {n} is already the primary")),
        Some(n) if !input.members.contains(&n) => Err(format!(
            "member {n} is not a member; `pgquorum list` shows the members"
        )),
        Some(n) => unfit_for_switchover(input, n, p).map_or(Ok(n), Err),
        None => {
            let mut reasons = Vec::new();
            let mut fit: Vec<&MemberReport> = Vec::new();
            for &n in input.members.iter().filter(|n| **n != primary.node) {
                match unfit_for_switchover(input, n, p) {
                    Some(why) => reasons.push(why),
                    None => fit.extend(input.fresh(n)),
                }
            }
            fit.iter()
                .max_by(|a, b| {
                    a.lsn
                        .cmp(&b.lsn)
                        .then(
                            input
                                .tags(a.node)
                                .priority
                                .cmp(&input.tags(b.node).priority),
                        )
                        .then(b.node.cmp(&a.node))
                })
                .map(|r| r.node)
                .ok_or_else(|| format!("no member can take over: {}", reasons.join("; ")))
        }
    }
}

/// Whether a manual failover to `to` may be planned: only when the primary is not healthy
/// (a healthy one is switched over), and only to a member that could be promoted once every
/// wait is over. Also while paused: the operator decides, as in maintenance mode.
pub fn manual_failover_refusal(input: &PolicyInput<'_>, to: NodeId) -> Option<String> {
    let cfg = &input.cluster.config;
    let primary = input.cluster.primary?;
    if to == primary.node {
        return Some(format!("member {to} is already the primary"));
    }
    let healthy = input.fresh(primary.node).is_some_and(|r| {
        r.pg == PgState::Primary
            && r.consecutive_failures < cfg.failure_threshold
            && !cannot_write(cfg, r)
    });
    if healthy {
        return Some(format!(
            "the primary (member {}) is healthy; move it with `pgquorum switchover --to {to}`",
            primary.node
        ));
    }
    None
}

/// With a started manual failover to `to` in `input.cluster`: why `to` could not be promoted
/// even once every wait is over, if it could not.
pub fn hypothetical_refusal(input: &PolicyInput<'_>, to: NodeId) -> Option<String> {
    match super::policy::judge_hypothetically(input) {
        Verdict::Promote { node, .. } if node == to => None,
        Verdict::Promote { node, .. } => Some(format!("member {node} would be promoted instead")),
        Verdict::CancelPlan { reason, .. } | Verdict::NoCandidate { reason } => Some(reason),
        Verdict::Steady => Some("the primary is healthy".into()),
        other => Some(format!("{other:?}")),
    }
}

/// What the leader does with a plan while the primary runs healthy.
pub(crate) fn while_primary_runs(input: &PolicyInput<'_>, hypothetical: bool) -> Verdict {
    let Some(plan) = input.plan().filter(|_| !hypothetical) else {
        return Verdict::Steady;
    };
    match plan.kind {
        PlanKind::Failover => Verdict::CancelPlan {
            id: plan.id,
            reason: format!(
                "the primary (member {}) is healthy again: manual failover to member {} \
                 cancelled",
                plan.from, plan.to
            ),
        },
        PlanKind::Switchover if !plan.started => {
            if input.now_unix_ms < plan.not_before_unix_ms {
                return Verdict::Steady;
            }
            match switchover_target(input, Some(plan.to)) {
                Ok(_) => Verdict::StartPlan { id: plan.id },
                Err(why) => Verdict::CancelPlan {
                    id: plan.id,
                    reason: format!("switchover to member {} cancelled: {why}", plan.to),
                },
            }
        }
        PlanKind::Switchover if input.plan_timed_out() => Verdict::CancelPlan {
            id: plan.id,
            reason: format!(
                "switchover to member {} cancelled: the primary (member {}) did not shut down \
                 within switchover_timeout_ms ({})",
                plan.to, plan.from, input.cluster.config.switchover_timeout_ms
            ),
        },
        PlanKind::Switchover => Verdict::Wait {
            reason: format!(
                "switchover to member {}: waiting for the primary (member {}) to shut down \
                 cleanly",
                plan.to, plan.from
            ),
        },
    }
}

/// A started plan narrowing a failover's candidates.
pub(crate) struct Restriction<'a> {
    /// The plan.
    pub plan: &'a PrimaryPlan,
    /// The old primary's fresh report.
    pub primary_report: Option<&'a MemberReport>,
    /// Why members were excluded so far, each starting with the member's id.
    pub excluded: &'a [String],
    /// Why a failover is due.
    pub why: &'a str,
    /// Judged as if every wait were over.
    pub hypothetical: bool,
}

impl Restriction<'_> {
    /// Keeps only the plan's target among `candidates`; for a switchover, only once it
    /// replayed past the old primary's last record. Without it, the verdict to return: wait
    /// for it, or, once the plan timed out (at once when hypothetical), cancel it so that the
    /// usual rules choose.
    pub fn apply(
        &self,
        input: &PolicyInput<'_>,
        candidates: &mut Vec<(&MemberReport, i32)>,
    ) -> Result<(), Verdict> {
        let to = self.plan.to;
        let handed = self
            .primary_report
            .and_then(|r| r.handed_over)
            .filter(|h| h.plan == self.plan.id);
        let mut why_not: Vec<String> = self
            .excluded
            .iter()
            .filter(|e| e.split(':').next() == Some(&to.to_string()))
            .cloned()
            .collect();
        candidates.retain(|(r, _)| r.node == to);
        if let (Some(h), Some((r, _))) = (handed, candidates.first()) {
            if r.replayed_lsn.is_none_or(|x| x <= h.final_lsn) {
                why_not.push(format!(
                    "{to}: has replayed up to {:?}, not yet past the old primary's last record \
                     at {}",
                    r.replayed_lsn, h.final_lsn
                ));
                candidates.clear();
            }
        }
        if !candidates.is_empty() {
            return Ok(());
        }
        if why_not.is_empty() {
            // Nothing names the target: a rule for every member (the synchronous standbys'
            // reports) stands in the way.
            why_not = self.excluded.to_vec();
        }
        if why_not.is_empty() {
            why_not.push(format!("{to}: no recent report"));
        }
        let kind = match self.plan.kind {
            PlanKind::Switchover => "switchover",
            PlanKind::Failover => "manual failover",
        };
        Err(if self.hypothetical || input.plan_timed_out() {
            Verdict::CancelPlan {
                id: self.plan.id,
                reason: format!(
                    "{kind} to member {to} cancelled: {}; the usual failover rules choose \
                     instead",
                    why_not.join("; ")
                ),
            }
        } else {
            Verdict::Wait {
                reason: format!(
                    "{}; {kind} to member {to}: {}",
                    self.why,
                    why_not.join("; ")
                ),
            }
        })
    }
}
