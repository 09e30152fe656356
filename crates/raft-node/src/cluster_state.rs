//! The replicated truth of a cluster: members, the primary assignment per epoch, the history of
//! role changes, the dynamic configuration and the pause flag.
//!
//! Everything here is pure and deterministic: a command is applied to a state and yields the next
//! state or a rejection, with no I/O and no clock (times travel inside the commands).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::dynamic_config::DynamicConfig;
use crate::types::NodeId;

/// How many role changes the history keeps; older ones are dropped first.
pub const HISTORY_LIMIT: usize = 200;

/// Primary epochs only grow; each promotion commits a higher one.
pub type Epoch = u64;

/// Failover tags of a member, as Patroni users know them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tags {
    /// Never promote this member.
    pub nofailover: bool,
    /// Higher wins among otherwise equal candidates.
    pub priority: i32,
    /// Never make this member a synchronous standby.
    pub nosync: bool,
}

/// What a sidecar publishes about itself. Its Raft address lives in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Raft node id.
    pub id: NodeId,
    /// Human name, unique in the cluster; also the Postgres `application_name`.
    pub name: String,
    /// HTTP address for health checks and metrics (may be empty).
    pub http_addr: String,
    /// Host clients use to reach this member's Postgres.
    pub pg_host: String,
    /// Port of this member's Postgres.
    pub pg_port: u16,
    /// Failover tags.
    pub tags: Tags,
}

/// The committed primary: which member, in which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryAssignment {
    /// The member that is primary.
    pub node: NodeId,
    /// The epoch of that assignment.
    pub epoch: Epoch,
}

/// One committed change of primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    /// The epoch the change started.
    pub epoch: Epoch,
    /// The previous primary, if any.
    pub from: Option<NodeId>,
    /// The new primary.
    pub to: NodeId,
    /// Why, in words an operator understands.
    pub reason: String,
    /// Proposer's wall-clock time, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// WAL position of the new primary at promotion, when known.
    pub lsn: Option<u64>,
}

/// A state machine command: the `D` of the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A member publishes (or updates) its own details.
    RegisterMember(MemberInfo),
    /// Change dynamic settings, all or nothing.
    SetConfig {
        /// Setting name to new value, as text.
        changes: BTreeMap<String, String>,
    },
    /// Name `node` primary for `epoch`.
    Promote {
        /// The member to promote.
        node: NodeId,
        /// Must exceed the current epoch.
        epoch: Epoch,
        /// Why, for the history.
        reason: String,
        /// Proposer's wall-clock time.
        at_unix_ms: u64,
        /// WAL position of the candidate, when known.
        lsn: Option<u64>,
    },
    /// Stop or resume automatic failover.
    SetPaused {
        /// The new value of the flag.
        paused: bool,
    },
}

/// The reply of the state machine to one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// The entry changed (or confirmed) the state.
    Applied,
    /// The entry was refused; the state is unchanged.
    Rejected {
        /// Why, naming the problem and the fix.
        reason: String,
    },
}

/// The replicated cluster state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Registered details of current Raft members, by id.
    pub members: BTreeMap<NodeId, MemberInfo>,
    /// The committed primary, once one is chosen.
    pub primary: Option<PrimaryAssignment>,
    /// Recent role changes, oldest first, at most [`HISTORY_LIMIT`].
    pub history: VecDeque<RoleChange>,
    /// Dynamic configuration.
    pub config: DynamicConfig,
    /// Automatic failover is paused.
    pub paused: bool,
}

impl ClusterState {
    /// Applies `cmd` given the ids currently in the Raft membership (voters and learners).
    /// A rejected command leaves the state exactly as it was.
    pub fn apply(&mut self, cmd: &Command, raft_members: &BTreeSet<NodeId>) -> CommandOutcome {
        match self.check_and_apply(cmd, raft_members) {
            Ok(()) => CommandOutcome::Applied,
            Err(reason) => CommandOutcome::Rejected { reason },
        }
    }

    fn check_and_apply(
        &mut self,
        cmd: &Command,
        raft_members: &BTreeSet<NodeId>,
    ) -> Result<(), String> {
        match cmd {
            Command::RegisterMember(info) => {
                if !raft_members.contains(&info.id) {
                    return Err(format!(
                        "node {} is not a member of the Raft group; add it with \
                         `pgquorum member add --id {} --addr HOST:PORT` first",
                        info.id, info.id
                    ));
                }
                if info.name.trim().is_empty() {
                    return Err(format!("node {}: member name must not be empty", info.id));
                }
                if let Some(other) = self
                    .members
                    .values()
                    .find(|m| m.id != info.id && m.name == info.name)
                {
                    return Err(format!(
                        "name '{}' is already used by node {}; give node {} another name",
                        info.name, other.id, info.id
                    ));
                }
                self.members.insert(info.id, info.clone());
                Ok(())
            }
            Command::SetConfig { changes } => {
                self.config = self
                    .config
                    .with_changes(changes)
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            Command::Promote {
                node,
                epoch,
                reason,
                at_unix_ms,
                lsn,
            } => {
                if !raft_members.contains(node) {
                    return Err(format!("cannot promote node {node}: not a cluster member"));
                }
                let current = self.primary.map(|p| p.epoch).unwrap_or(0);
                if *epoch <= current {
                    return Err(format!(
                        "stale epoch {epoch}: the committed epoch is already {current}"
                    ));
                }
                self.history.push_back(RoleChange {
                    epoch: *epoch,
                    from: self.primary.map(|p| p.node),
                    to: *node,
                    reason: reason.clone(),
                    at_unix_ms: *at_unix_ms,
                    lsn: *lsn,
                });
                while self.history.len() > HISTORY_LIMIT {
                    self.history.pop_front();
                }
                self.primary = Some(PrimaryAssignment {
                    node: *node,
                    epoch: *epoch,
                });
                Ok(())
            }
            Command::SetPaused { paused } => {
                self.paused = *paused;
                Ok(())
            }
        }
    }

    /// Follows a committed membership change: details of nodes that left are forgotten, so the
    /// member list never names a node the Raft group no longer has.
    pub fn retain_members(&mut self, raft_members: &BTreeSet<NodeId>) {
        self.members.retain(|id, _| raft_members.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[NodeId]) -> BTreeSet<NodeId> {
        v.iter().copied().collect()
    }

    fn info(id: NodeId, name: &str) -> MemberInfo {
        MemberInfo {
            id,
            name: name.into(),
            pg_host: "127.0.0.1".into(),
            pg_port: 5432,
            ..Default::default()
        }
    }

    fn promote(node: NodeId, epoch: Epoch) -> Command {
        Command::Promote {
            node,
            epoch,
            reason: "test".into(),
            at_unix_ms: 1,
            lsn: Some(42),
        }
    }

    #[test]
    fn register_member_valid_and_idempotent_replay() {
        let mut s = ClusterState::default();
        let members = ids(&[1, 2, 3]);
        let cmd = Command::RegisterMember(info(1, "a"));
        assert_eq!(s.apply(&cmd, &members), CommandOutcome::Applied);
        let once = s.clone();
        // Replaying the same entry (e.g. after a restart re-applies the log) yields the same state.
        assert_eq!(s.apply(&cmd, &members), CommandOutcome::Applied);
        assert_eq!(s, once);
    }

    #[test]
    fn register_member_rejects_non_member_and_duplicate_name() {
        let mut s = ClusterState::default();
        let members = ids(&[1, 2]);
        s.apply(&Command::RegisterMember(info(1, "a")), &members);
        let before = s.clone();
        assert!(matches!(
            s.apply(&Command::RegisterMember(info(9, "z")), &members),
            CommandOutcome::Rejected { .. }
        ));
        assert!(matches!(
            s.apply(&Command::RegisterMember(info(2, "a")), &members),
            CommandOutcome::Rejected { .. }
        ));
        assert!(matches!(
            s.apply(&Command::RegisterMember(info(2, " ")), &members),
            CommandOutcome::Rejected { .. }
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn set_config_all_or_nothing() {
        let mut s = ClusterState::default();
        let m = ids(&[1]);
        let ok = Command::SetConfig {
            changes: [("lease_ms".to_string(), "4000".to_string())].into(),
        };
        assert_eq!(s.apply(&ok, &m), CommandOutcome::Applied);
        assert_eq!(s.config.lease_ms, 4000);
        let bad = Command::SetConfig {
            changes: [
                ("failure_threshold".to_string(), "5".to_string()),
                ("nonsense".to_string(), "1".to_string()),
            ]
            .into(),
        };
        let before = s.clone();
        match s.apply(&bad, &m) {
            CommandOutcome::Rejected { reason } => assert!(reason.contains("nonsense")),
            other => panic!("expected rejection, got {other:?}"),
        }
        assert_eq!(s, before);
    }

    #[test]
    fn promote_requires_member_and_growing_epoch() {
        let mut s = ClusterState::default();
        let m = ids(&[1, 2]);
        assert_eq!(s.apply(&promote(1, 1), &m), CommandOutcome::Applied);
        assert_eq!(s.primary, Some(PrimaryAssignment { node: 1, epoch: 1 }));
        let before = s.clone();
        assert!(matches!(
            s.apply(&promote(2, 1), &m),
            CommandOutcome::Rejected { .. }
        ));
        assert!(matches!(
            s.apply(&promote(3, 2), &m),
            CommandOutcome::Rejected { .. }
        ));
        assert_eq!(s, before);
        // A replay of an already-applied promotion is refused as stale, so it cannot record twice.
        assert!(matches!(
            s.apply(&promote(1, 1), &m),
            CommandOutcome::Rejected { .. }
        ));
        assert_eq!(s.apply(&promote(2, 2), &m), CommandOutcome::Applied);
        assert_eq!(s.history.len(), 2);
        assert_eq!(s.history[1].from, Some(1));
        assert_eq!(s.history[1].to, 2);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = ClusterState::default();
        let m = ids(&[1, 2]);
        for epoch in 1..=(HISTORY_LIMIT as u64 + 10) {
            assert_eq!(
                s.apply(&promote(1 + epoch % 2, epoch), &m),
                CommandOutcome::Applied
            );
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        assert_eq!(s.history.front().map(|h| h.epoch), Some(11));
    }

    #[test]
    fn membership_change_forgets_departed_members() {
        let mut s = ClusterState::default();
        let m = ids(&[1, 2, 3]);
        for (id, n) in [(1, "a"), (2, "b"), (3, "c")] {
            s.apply(&Command::RegisterMember(info(id, n)), &m);
        }
        s.retain_members(&ids(&[1, 3]));
        assert_eq!(s.members.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn pause_flag() {
        let mut s = ClusterState::default();
        s.apply(&Command::SetPaused { paused: true }, &ids(&[1]));
        assert!(s.paused);
    }
}
