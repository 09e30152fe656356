//! The failover policy: a pure function of the committed state, the members' latest reports and
//! the leader's clock. It decides whether the primary is healthy, whether and when another member
//! may be promoted, and whether the primary's lease may be renewed. No I/O, no hidden clock.

use std::collections::BTreeSet;

use super::lease::{grantor_safe_after, new_leader_wait, Millis};
use super::report::{MemberReport, PgState, ReportBook};
use crate::cluster_state::{ClusterState, Epoch};
use crate::types::NodeId;

/// The last lease the current leader granted, as the grantor recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRecord {
    /// Holder of the lease.
    pub node: NodeId,
    /// Epoch of the lease.
    pub epoch: Epoch,
    /// Grantor's clock when the renewal request arrived.
    pub received_at: Millis,
    /// Holder's clock when it sent the granted report ([`MemberReport::sent_at`]).
    pub report_sent_at: Millis,
}

/// Everything the policy looks at.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    /// Leader's clock now.
    pub now: Millis,
    /// Leader's clock when it took office.
    pub leader_since: Millis,
    /// A leader grants leases only while its last quorum acknowledgement is at most this old.
    pub quorum_ack_max_ms: u64,
    /// How long a Raft follower refuses to vote after hearing from its leader (openraft's
    /// leader lease: `election_timeout_max`).
    pub raft_leader_lease_ms: u64,
    /// The committed cluster state.
    pub cluster: &'a ClusterState,
    /// Ids of the Raft members (voters and learners).
    pub members: &'a BTreeSet<NodeId>,
    /// Latest report per member.
    pub reports: &'a ReportBook,
    /// The last lease this leader granted to the committed primary, if any.
    pub last_grant: Option<GrantRecord>,
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
    },
    /// A failover is due but not allowed yet; the reason says until when and why.
    Wait {
        /// Why, in an operator's words.
        reason: String,
    },
    /// A failover is due and no member qualifies.
    NoCandidate {
        /// Why each member was excluded.
        reason: String,
    },
}

impl PolicyInput<'_> {
    fn fresh(&self, node: NodeId) -> Option<&MemberReport> {
        let r = self.reports.get(&node)?;
        (self.now.saturating_sub(r.at) <= self.cluster.config.lease_ms).then_some(&r.report)
    }
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
    if quorum_ack_age_ms.is_none_or(|age| age > input.quorum_ack_max_ms) {
        return None;
    }
    let failed = from.consecutive_failures >= input.cluster.config.failure_threshold
        || from.pg == PgState::Fenced;
    // A failed primary gets no renewal while another member could take over; when none can, it
    // is better restarted in place than left without any primary.
    if failed && !matches!(decide(input), Verdict::NoCandidate { .. }) {
        return None;
    }
    Some(primary.epoch)
}

/// The policy's verdict for this moment.
pub fn decide(input: &PolicyInput<'_>) -> Verdict {
    let cfg = &input.cluster.config;
    let Some(primary) = input.cluster.primary else {
        return choose_first_primary(input);
    };
    let primary_report = input.fresh(primary.node);
    let why = match primary_report {
        Some(r) if r.pg == PgState::Fenced && r.consecutive_failures > 0 => format!(
            "primary {} fenced itself after its Postgres failed {} consecutive probes",
            primary.node, r.consecutive_failures
        ),
        Some(r) if r.pg == PgState::Fenced => format!("primary {} fenced itself", primary.node),
        Some(r) if r.consecutive_failures >= cfg.failure_threshold => format!(
            "primary {}'s Postgres failed {} consecutive probes",
            primary.node, r.consecutive_failures
        ),
        Some(_) => return Verdict::Steady,
        None => format!(
            "primary {} has not reported for more than {} ms",
            primary.node, cfg.lease_ms
        ),
    };
    if input.cluster.paused {
        return Verdict::Wait {
            reason: format!("{why}, but automatic failover is paused"),
        };
    }
    let office_wait_until = input.leader_since.saturating_add(new_leader_wait(
        cfg,
        input.quorum_ack_max_ms,
        input.raft_leader_lease_ms,
    ));
    if input.now < office_wait_until {
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
    if !fenced_after_last_grant {
        if let Some(g) = input.last_grant.filter(|g| g.node == primary.node) {
            let until = grantor_safe_after(g.received_at, cfg);
            if input.now < until {
                return Verdict::Wait {
                    reason: format!("{why}; its lease may run {} ms more", until - input.now),
                };
            }
        }
    }
    let mut excluded = Vec::new();
    let mut candidates: Vec<(&MemberReport, i32)> = Vec::new();
    for &node in input.members.iter().filter(|n| **n != primary.node) {
        let Some(r) = input.fresh(node) else {
            excluded.push(format!("{node}: no recent report"));
            continue;
        };
        let tags = input
            .cluster
            .members
            .get(&node)
            .map(|m| m.tags.clone())
            .unwrap_or_default();
        if tags.nofailover {
            excluded.push(format!("{node}: tagged nofailover"));
            continue;
        }
        if !r.healthy_replica() {
            excluded.push(format!("{node}: not a healthy replica ({:?})", r.pg));
            continue;
        }
        if r.streaming && !fenced {
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
    // Lag is measured against the most advanced position any member reported, the old
    // primary's last report included even when it is stale.
    let best_lsn = input
        .members
        .iter()
        .filter_map(|n| input.reports.get(n))
        .map(|r| r.report.lsn)
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
    candidates.sort_by(|(a, pa), (b, pb)| {
        b.timeline
            .cmp(&a.timeline)
            .then(b.lsn.cmp(&a.lsn))
            .then(pb.cmp(pa))
            .then(a.node.cmp(&b.node))
    });
    match candidates.first() {
        Some((best, _)) => Verdict::Promote {
            node: best.node,
            epoch: primary.epoch + 1,
            reason: why,
            lsn: best.lsn,
        },
        None => Verdict::NoCandidate {
            reason: format!("{why}; no candidate: {}", excluded.join("; ")),
        },
    }
}

/// A new cluster's first primary: chosen once every member has reported, preferring a member
/// that already has data (the most advanced one), then the highest priority, then the lowest id.
fn choose_first_primary(input: &PolicyInput<'_>) -> Verdict {
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
        Some(r) => Verdict::Promote {
            node: r.node,
            epoch: 1,
            reason: "first primary of the cluster".into(),
            lsn: r.lsn,
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
            epoch_seen: 1,
            sent_at: 0,
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
                },
            );
            reports.insert(
                2,
                Received {
                    at: 10_000,
                    report: report(2, PgState::Replica, 490),
                },
            );
            reports.insert(
                3,
                Received {
                    at: 10_000,
                    report: report(3, PgState::Replica, 480),
                },
            );
            Self {
                cluster,
                members: [1, 2, 3].into(),
                reports,
            }
        }
        fn input(&self, now: Millis) -> PolicyInput<'_> {
            PolicyInput {
                now,
                leader_since: 0,
                quorum_ack_max_ms: 300,
                raft_leader_lease_ms: 800,
                cluster: &self.cluster,
                members: &self.members,
                reports: &self.reports,
                last_grant: Some(GrantRecord {
                    node: 1,
                    epoch: 1,
                    received_at: 10_000,
                    report_sent_at: 0,
                }),
            }
        }
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
        let later = 12_000 + new_leader_wait(&f.cluster.config, 300, 800);
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
        f.reports.get_mut(&3).unwrap().report.streaming = true;
        assert!(matches!(decide(&f.input(now)), Verdict::Wait { .. }));
    }

    #[test]
    fn paused_cluster_never_fails_over() {
        let mut f = Fixture::new();
        f.cluster.paused = true;
        f.reports.remove(&1);
        assert!(matches!(decide(&f.input(30_000)), Verdict::Wait { .. }));
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
