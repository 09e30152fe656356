//! Conversions between the typed gRPC messages and the failover types, checked on the way in:
//! a malformed message is refused with the reason and never reaches the policy.

use crate::cluster_state::SyncSet;
use crate::failover::report::{
    HandedOver, LeaderStamp, MemberReport, PgState, StorageReport, SyncApplied,
};
use crate::proto;

/// At most this many settings waiting for a restart are taken from a report.
const MAX_PENDING: usize = 64;
/// Longest text taken from a report (a setting's name, why a primary cannot write).
const MAX_TEXT: usize = 1024;

/// The wire value of a Postgres state.
pub fn pg_role(pg: PgState) -> proto::PgRole {
    match pg {
        PgState::Primary => proto::PgRole::Primary,
        PgState::Replica => proto::PgRole::Replica,
        PgState::Stopped => proto::PgRole::Stopped,
        PgState::Fenced => proto::PgRole::Fenced,
        PgState::NoData => proto::PgRole::NoData,
        PgState::Unresponsive => proto::PgRole::Unresponsive,
    }
}

/// The Postgres state of a wire value; `None` for unspecified.
pub fn pg_state(role: proto::PgRole) -> Option<PgState> {
    Some(match role {
        proto::PgRole::Unspecified => return None,
        proto::PgRole::Primary => PgState::Primary,
        proto::PgRole::Replica => PgState::Replica,
        proto::PgRole::Stopped => PgState::Stopped,
        proto::PgRole::Fenced => PgState::Fenced,
        proto::PgRole::NoData => PgState::NoData,
        proto::PgRole::Unresponsive => PgState::Unresponsive,
    })
}

/// The name tables and JSON use for a wire role.
pub fn pg_role_name(role: proto::PgRole) -> &'static str {
    crate::metrics::role_name(pg_state(role))
}

/// The name tables and JSON use for a Raft role.
pub fn raft_role_name(role: proto::RaftRole) -> &'static str {
    match role {
        proto::RaftRole::Unspecified => "",
        proto::RaftRole::Leader => "leader",
        proto::RaftRole::Follower => "follower",
        proto::RaftRole::Candidate => "candidate",
        proto::RaftRole::Learner => "learner",
        proto::RaftRole::Shutdown => "shutdown",
        proto::RaftRole::Unreachable => "unreachable",
    }
}

/// The name tables and JSON use for a membership.
pub fn membership_name(m: proto::Membership) -> &'static str {
    match m {
        proto::Membership::Unspecified => "",
        proto::Membership::Voter => "voter",
        proto::Membership::Learner => "learner",
    }
}

/// The name tables and JSON use for a plan kind.
pub fn plan_kind_name(k: proto::PlanKind) -> &'static str {
    match k {
        proto::PlanKind::Unspecified => "",
        proto::PlanKind::Switchover => "switchover",
        proto::PlanKind::Failover => "failover",
    }
}

fn sync_set_to(s: &SyncSet) -> proto::SyncSet {
    proto::SyncSet {
        members: s.members.iter().copied().collect(),
        k: s.k,
    }
}

impl From<&MemberReport> for proto::MemberReport {
    fn from(r: &MemberReport) -> Self {
        proto::MemberReport {
            node: r.node,
            pg: pg_role(r.pg).into(),
            consecutive_failures: r.consecutive_failures,
            timeline: r.timeline,
            lsn: r.lsn,
            streaming: r.streaming,
            wal_receipt_age_ms: r.wal_receipt_age_ms,
            upstream: r.upstream,
            sync_applied: r.sync_applied.as_ref().map(|s| proto::SyncApplied {
                epoch: s.epoch,
                set: Some(sync_set_to(&s.set)),
                confirmed: s.confirmed,
                revision: s.revision,
            }),
            leader_stamp: r.leader_stamp.map(|s| proto::LeaderStamp {
                term: s.term,
                at: s.at,
            }),
            epoch_seen: r.epoch_seen,
            sent_at: r.sent_at,
            storage: Some(proto::StorageReport {
                free_bytes: r.storage.free_bytes,
                low_space: r.storage.low_space,
                cannot_write: r.storage.cannot_write.clone(),
                write_failures: r.storage.write_failures,
                read_only: r.storage.read_only,
                write_probe_ms: r.storage.write_probe_ms,
            }),
            replayed_lsn: r.replayed_lsn,
            handed_over: r.handed_over.map(|h| proto::HandedOver {
                plan: h.plan,
                final_lsn: h.final_lsn,
            }),
            pending_restart: r.pending_restart.clone(),
            system_identifier: r.system_identifier,
            unguarded: r.unguarded,
            lsn_incomplete: r.lsn_incomplete,
        }
    }
}

impl TryFrom<proto::MemberReport> for MemberReport {
    type Error = String;

    fn try_from(r: proto::MemberReport) -> Result<Self, String> {
        if r.node == 0 {
            return Err("report without a member id".into());
        }
        let role = proto::PgRole::try_from(r.pg).map_err(|_| {
            format!(
                "report of member {}: unknown Postgres state {}",
                r.node, r.pg
            )
        })?;
        let pg = pg_state(role)
            .ok_or_else(|| format!("report of member {}: no Postgres state", r.node))?;
        if r.upstream == Some(0) {
            return Err(format!(
                "report of member {}: upstream 0 is no member",
                r.node
            ));
        }
        let sync_applied = match r.sync_applied {
            None => None,
            Some(s) => {
                let set = s.set.unwrap_or_default();
                let wire_len = set.members.len();
                // Judged on the set as it will be kept (duplicates gone), so that a report that
                // is taken converts back into one that is taken too (found by fuzzing).
                let members: std::collections::BTreeSet<u64> = set.members.into_iter().collect();
                if wire_len > 16 || members.contains(&0) || set.k as usize > members.len() + 16 {
                    return Err(format!(
                        "report of member {}: synchronous set of {} members with k = {}",
                        r.node, wire_len, set.k
                    ));
                }
                Some(SyncApplied {
                    epoch: s.epoch,
                    set: SyncSet { members, k: set.k },
                    confirmed: s.confirmed,
                    revision: s.revision,
                })
            }
        };
        let storage = r.storage.unwrap_or_default();
        let too_long = |t: &str| t.len() > MAX_TEXT;
        if storage.cannot_write.as_deref().is_some_and(too_long)
            || r.pending_restart.len() > MAX_PENDING
            || r.pending_restart.iter().any(|p| too_long(p))
        {
            return Err(format!(
                "report of member {}: a text field is too long",
                r.node
            ));
        }
        Ok(MemberReport {
            node: r.node,
            pg,
            consecutive_failures: r.consecutive_failures,
            timeline: r.timeline,
            lsn: r.lsn,
            streaming: r.streaming,
            wal_receipt_age_ms: r.wal_receipt_age_ms,
            upstream: r.upstream,
            sync_applied,
            leader_stamp: r.leader_stamp.map(|s| LeaderStamp {
                term: s.term,
                at: s.at,
            }),
            epoch_seen: r.epoch_seen,
            sent_at: r.sent_at,
            storage: StorageReport {
                free_bytes: storage.free_bytes,
                low_space: storage.low_space,
                cannot_write: storage.cannot_write,
                write_failures: storage.write_failures,
                read_only: storage.read_only,
                write_probe_ms: storage.write_probe_ms,
            },
            replayed_lsn: r.replayed_lsn,
            handed_over: r.handed_over.map(|h| HandedOver {
                plan: h.plan,
                final_lsn: h.final_lsn,
            }),
            pending_restart: r.pending_restart,
            system_identifier: r.system_identifier,
            unguarded: r.unguarded,
            lsn_incomplete: r.lsn_incomplete,
        })
    }
}

impl proto::Member {
    /// The Postgres role's name: primary, replica, stopped, fenced, no_data, unresponsive or
    /// unknown.
    pub fn pg_role_name(&self) -> &'static str {
        pg_role_name(self.pg_role())
    }

    /// The Raft role's name (empty when not asked).
    pub fn raft_role_name(&self) -> &'static str {
        raft_role_name(self.raft_role())
    }

    /// voter or learner.
    pub fn membership_name(&self) -> &'static str {
        membership_name(self.membership())
    }
}

impl proto::NodeStatus {
    /// The Raft role's name.
    pub fn raft_role_name(&self) -> &'static str {
        raft_role_name(self.raft_role())
    }
}

impl proto::Plan {
    /// switchover or failover.
    pub fn kind_name(&self) -> &'static str {
        plan_kind_name(self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MemberReport {
        MemberReport {
            node: 2,
            pg: PgState::Fenced,
            consecutive_failures: 3,
            timeline: 4,
            lsn: 0x3000028,
            streaming: true,
            wal_receipt_age_ms: Some(12),
            upstream: Some(1),
            sync_applied: Some(SyncApplied {
                epoch: 5,
                set: SyncSet {
                    members: [1, 3].into(),
                    k: 1,
                },
                confirmed: true,
                revision: 9,
            }),
            leader_stamp: Some(LeaderStamp { term: 7, at: 1234 }),
            epoch_seen: 5,
            sent_at: 99,
            storage: StorageReport {
                free_bytes: Some(1 << 30),
                low_space: false,
                cannot_write: Some("no space: disk full".into()),
                write_failures: 2,
                read_only: false,
                write_probe_ms: Some(3),
            },
            replayed_lsn: Some(0x3000020),
            handed_over: Some(HandedOver {
                plan: 3,
                final_lsn: 0x3000000,
            }),
            pending_restart: vec!["max_connections".into()],
            system_identifier: Some(7_304_567_890_123_456_789),
            unguarded: true,
            lsn_incomplete: true,
        }
    }

    #[test]
    fn a_report_survives_the_wire_unchanged() {
        let r = sample();
        let wire = proto::MemberReport::from(&r);
        assert_eq!(MemberReport::try_from(wire), Ok(r));
    }

    #[test]
    fn malformed_reports_are_refused_with_a_reason() {
        let mut w = proto::MemberReport::from(&sample());
        w.node = 0;
        assert!(MemberReport::try_from(w).unwrap_err().contains("member id"));
        let mut w = proto::MemberReport::from(&sample());
        w.pg = 0;
        assert!(MemberReport::try_from(w)
            .unwrap_err()
            .contains("no Postgres state"));
        let mut w = proto::MemberReport::from(&sample());
        w.pg = 99;
        assert!(MemberReport::try_from(w).unwrap_err().contains("unknown"));
        let mut w = proto::MemberReport::from(&sample());
        w.pending_restart = vec!["x".repeat(5000)];
        assert!(MemberReport::try_from(w).unwrap_err().contains("too long"));
    }
}
