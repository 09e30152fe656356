//! The replicated truth of a cluster: members, the primary assignment per epoch, the history of
//! role changes, the dynamic configuration and the pause flag.
//!
//! Everything here is pure and deterministic: a command is applied to a state and yields the next
//! state or a rejection, with no I/O and no clock (times travel inside the commands).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::dynamic_config::DynamicConfig;
use crate::failover::lease::LeaseTerms;
use crate::pg_settings::PgSettings;
use crate::types::NodeId;

/// The shortest lease that outlasts a Raft election: a follower waits the leader lease (the
/// upper election timeout) and then its own election timeout (at most the same) before it
/// stands; the new leader confirms its quorum (a heartbeat round) and the primary's next report
/// (within a tick) renews the lease.
pub fn lease_floor_ms(heartbeat_ms: u64, election_max_ms: u64, tick_ms: u64) -> u64 {
    // Saturating: absurd registered timings (found by fuzzing) must give an absurd floor that
    // refuses the setting, never an overflow that panics every member on the same entry.
    election_max_ms
        .saturating_mul(2)
        .saturating_add(heartbeat_ms.saturating_mul(2))
        .saturating_add(tick_ms)
}

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
    /// The Raft heartbeat interval this member runs with (0: not said). A new leader's wait
    /// (S2) rests on its predecessor's quorum-contact bound, three heartbeats, so the cluster
    /// keeps the longest one registered.
    #[serde(default)]
    pub raft_heartbeat_ms: u64,
    /// The upper Raft election timeout this member runs with (0: not said).
    #[serde(default)]
    pub raft_election_max_ms: u64,
}

/// The committed primary: which member, in which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryAssignment {
    /// The member that is primary.
    pub node: NodeId,
    /// The epoch of that assignment.
    pub epoch: Epoch,
}

/// A committed set of synchronous standbys: every acknowledged commit of the primary is on at
/// least `k` of `members` (design rule S6). `k = 0` is asynchronous replication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSet {
    /// The standbys that may acknowledge commits.
    pub members: BTreeSet<NodeId>,
    /// How many of them acknowledge each commit.
    pub k: u32,
}

impl SyncSet {
    /// Asynchronous replication: no acknowledgement is waited for.
    pub fn asynchronous() -> Self {
        Self::default()
    }

    /// Whether commits wait for standbys.
    pub fn is_synchronous(&self) -> bool {
        self.k > 0
    }
}

/// The synchronous replication of the current primary's epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The epoch this state belongs to; a state of an older epoch says nothing.
    pub epoch: Epoch,
    /// What failover relies on: every acknowledged write is on `k` of these members.
    pub committed: SyncSet,
    /// A stronger set the primary is asked to apply and confirm before it is committed.
    pub target: Option<SyncSet>,
    /// After `on` fell back to asynchronous replication: the last synchronous set. The writes
    /// acknowledged before the fall-back are on `k` of its members, and a failover still relies
    /// on it until a new synchronous set is confirmed (which then holds them too).
    #[serde(default)]
    pub legacy: Option<SyncSet>,
    /// Grows with every change of this state: a primary's confirmation counts only for the
    /// revision it applied.
    #[serde(default)]
    pub revision: u64,
}

/// The primary's WAL position, committed now and then so that a new leader still knows how far
/// the primary had come when it judges replicas' lag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedLsn {
    /// The primary's epoch.
    pub epoch: Epoch,
    /// Its reported WAL position.
    pub lsn: u64,
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

/// What an operator asked the leader to do with the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    /// Planned switchover from a healthy primary: it shuts down cleanly, the target replays
    /// its last WAL record, then the target is promoted.
    Switchover,
    /// Manual failover: the primary is down, and the operator names who takes over. The usual
    /// safety waits (leases, reports, synchronous standbys) all still apply.
    Failover,
}

/// An operator's request to move the primary, committed before anything stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryPlan {
    /// Grows with every plan, so that a report about one plan never counts for another.
    pub id: u64,
    /// Switchover or manual failover.
    pub kind: PlanKind,
    /// The primary's epoch the plan belongs to; a promotion ends it.
    pub epoch: Epoch,
    /// The primary it moves away from.
    pub from: NodeId,
    /// The member that takes over.
    pub to: NodeId,
    /// Wall-clock time (ms since the Unix epoch) before which nothing stops; 0: at once.
    pub not_before_unix_ms: u64,
    /// When the operator asked, for the history.
    pub requested_at_unix_ms: u64,
    /// The leader checked the target again at the planned time and told the primary to go.
    pub started: bool,
}

/// How the last plan ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOutcome {
    /// The plan.
    pub plan: PrimaryPlan,
    /// Whether its target became primary.
    pub done: bool,
    /// What happened, in an operator's words.
    pub outcome: String,
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
        /// The synchronous standbys the new primary applies before it accepts writes: a target,
        /// committed once they have caught up with it. Until then the previous committed set
        /// carries over (the new primary, one of its members, holds every write acknowledged
        /// so far).
        #[serde(default)]
        sync: SyncSet,
    },
    /// Ask the primary of `epoch` to apply a stronger synchronous set; committed by
    /// [`Command::CommitSync`] once the primary confirmed it.
    SetSyncTarget {
        /// The primary's epoch.
        epoch: Epoch,
        /// The set to apply.
        target: SyncSet,
    },
    /// Commit the synchronous set failover relies on (clears any target).
    CommitSync {
        /// The primary's epoch.
        epoch: Epoch,
        /// The set.
        set: SyncSet,
    },
    /// Record the primary's WAL position (kept only when it advances).
    RecordPrimaryLsn {
        /// The primary's epoch.
        epoch: Epoch,
        /// Its WAL position.
        lsn: u64,
    },
    /// Every lease granted under longer terms than the current ones has run out: forget them.
    SettleLeaseCeiling,
    /// Stop or resume automatic failover.
    SetPaused {
        /// The new value of the flag.
        paused: bool,
    },
    /// Plan a switchover or a manual failover (its `id` is assigned by the state machine).
    PlanPrimary {
        /// The plan.
        plan: PrimaryPlan,
    },
    /// The leader found the target fit at the planned time: the primary may stop.
    StartPlan {
        /// The plan's id.
        id: u64,
    },
    /// Record the cluster's Postgres system identifier (once; a different one is refused).
    SetSystemIdentifier {
        /// The identifier.
        sysid: u64,
    },
    /// The plan ends without its target becoming primary.
    CancelPlan {
        /// The plan's id.
        id: u64,
        /// Why, in an operator's words.
        reason: String,
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
    /// Synchronous replication of the current epoch.
    #[serde(default)]
    pub sync: SyncState,
    /// The primary's WAL position as last recorded.
    #[serde(default)]
    pub primary_lsn: Option<RecordedLsn>,
    /// Set when the lease was shortened: the longest terms a lease may still run under. A new
    /// leader waits by these until a leader settles them.
    #[serde(default)]
    pub lease_ceiling: Option<LeaseTerms>,
    /// The longest Raft heartbeat interval any member registered with (it only grows): a new
    /// leader's wait rests on its predecessor's quorum-contact bound, three heartbeats.
    #[serde(default)]
    pub raft_heartbeat_ms: Option<u64>,
    /// The longest upper election timeout any member registered with.
    #[serde(default)]
    pub raft_election_max_ms: Option<u64>,
    /// A switchover or manual failover under way.
    #[serde(default)]
    pub plan: Option<PrimaryPlan>,
    /// How the last plan ended.
    #[serde(default)]
    pub last_plan: Option<PlanOutcome>,
    /// The id of the last plan committed.
    #[serde(default)]
    pub plan_seq: u64,
    /// Postgres parameters and extra `pg_hba.conf` lines every member applies.
    #[serde(default)]
    pub pg: PgSettings,
    /// The Postgres system identifier of the cluster's data, from its first primary: no member
    /// starts, rejoins or clones a data directory of another.
    #[serde(default)]
    pub system_identifier: Option<u64>,
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
                // Members may run different heartbeats (a rolling change of the Raft timings
                // passes through every mix): a new leader's wait assumes the longest one any
                // member registered, and a leader running a longer one grants nothing until its
                // own registration raised it. (A lease too short for the new timings is refused
                // at the next `config set`; the log applies what it holds.)
                let hb = self
                    .raft_heartbeat_ms
                    .unwrap_or(0)
                    .max(info.raft_heartbeat_ms);
                let election = self
                    .raft_election_max_ms
                    .unwrap_or(0)
                    .max(info.raft_election_max_ms);
                if hb != 0 {
                    self.raft_heartbeat_ms = Some(hb);
                }
                if election != 0 {
                    self.raft_election_max_ms = Some(election);
                }
                self.members.insert(info.id, info.clone());
                Ok(())
            }
            Command::SetConfig { changes } => {
                let (pg, changes) = self.split_changes(changes)?;
                self.pg = pg;
                if changes.is_empty() {
                    return Ok(());
                }
                let next = self.config_after(&changes)?;
                let (old, new) = (LeaseTerms::of(&self.config), LeaseTerms::of(&next));
                if new.grantor_span() < old.grantor_span() {
                    // Leases granted under the old terms still run; keep their bound.
                    let ceiling = self.lease_ceiling.map_or(old, |c| c.longest(old));
                    self.lease_ceiling = Some(ceiling);
                }
                self.config = next;
                Ok(())
            }
            Command::SetSyncTarget { epoch, target } => {
                self.check_sync_epoch(*epoch)?;
                self.sync.target = Some(target.clone());
                self.sync.revision += 1;
                Ok(())
            }
            Command::CommitSync { epoch, set } => {
                self.check_sync_epoch(*epoch)?;
                if set.is_synchronous() {
                    // Only a confirmed target makes an asynchronous cluster synchronous again,
                    // and it holds everything acknowledged before it took effect.
                    if !self.sync.committed.is_synchronous() {
                        self.sync.legacy = None;
                    }
                } else if self.sync.legacy.is_none() {
                    self.sync.legacy = self.failover_set();
                }
                self.sync.committed = set.clone();
                self.sync.target = None;
                self.sync.revision += 1;
                Ok(())
            }
            Command::RecordPrimaryLsn { epoch, lsn } => {
                if self.primary.map(|p| p.epoch) != Some(*epoch) {
                    return Err(format!("stale epoch {epoch}: not the current primary's"));
                }
                if self
                    .primary_lsn
                    .is_none_or(|r| r.epoch != *epoch || r.lsn < *lsn)
                {
                    self.primary_lsn = Some(RecordedLsn {
                        epoch: *epoch,
                        lsn: *lsn,
                    });
                }
                Ok(())
            }
            Command::SettleLeaseCeiling => {
                self.lease_ceiling = None;
                Ok(())
            }
            Command::Promote {
                node,
                epoch,
                reason,
                at_unix_ms,
                lsn,
                sync,
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
                // Whoever holds the writes acknowledged so far keeps counting until the new
                // primary's standbys have caught up with it.
                let carried = self.failover_set().unwrap_or_default();
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
                if let Some(p) = self.plan.take() {
                    let done = p.to == *node;
                    self.last_plan = Some(PlanOutcome {
                        plan: p,
                        done,
                        outcome: if done {
                            format!("member {node} is primary in epoch {epoch}")
                        } else {
                            format!("superseded: member {node} was promoted instead ({reason})")
                        },
                    });
                }
                self.primary = Some(PrimaryAssignment {
                    node: *node,
                    epoch: *epoch,
                });
                self.sync = SyncState {
                    epoch: *epoch,
                    committed: carried,
                    target: sync.is_synchronous().then(|| sync.clone()),
                    legacy: None,
                    revision: self.sync.revision + 1,
                };
                Ok(())
            }
            Command::SetPaused { paused } => {
                if let Some(p) = self.plan.filter(|_| *paused) {
                    // Half-way through, a pause would leave a stopped primary and nobody
                    // promoted until someone resumed.
                    return Err(format!(
                        "a {:?} from member {} to member {} is under way; pause once it ended",
                        p.kind, p.from, p.to
                    ));
                }
                self.paused = *paused;
                Ok(())
            }
            Command::PlanPrimary { plan } => {
                self.check_plan(plan, raft_members)?;
                self.plan_seq += 1;
                self.plan = Some(PrimaryPlan {
                    id: self.plan_seq,
                    // A manual failover has nothing to stop: it starts at once.
                    started: plan.kind == PlanKind::Failover,
                    ..*plan
                });
                Ok(())
            }
            Command::SetSystemIdentifier { sysid } => match self.system_identifier {
                Some(known) if known != *sysid => Err(format!(
                    "the cluster's data has system identifier {known}, not {sysid}: a member \
                     runs a Postgres of another cluster"
                )),
                _ => {
                    self.system_identifier = Some(*sysid);
                    Ok(())
                }
            },
            Command::StartPlan { id } => match &mut self.plan {
                Some(p) if p.id == *id => {
                    p.started = true;
                    Ok(())
                }
                _ => Err(format!("plan {id} is not under way")),
            },
            Command::CancelPlan { id, reason } => match self.plan {
                Some(p) if p.id == *id => {
                    self.plan = None;
                    self.last_plan = Some(PlanOutcome {
                        plan: p,
                        done: false,
                        outcome: reason.clone(),
                    });
                    Ok(())
                }
                _ => Err(format!("plan {id} is not under way")),
            },
        }
    }

    fn check_plan(
        &self,
        plan: &PrimaryPlan,
        raft_members: &BTreeSet<NodeId>,
    ) -> Result<(), String> {
        if let Some(p) = &self.plan {
            return Err(format!(
                "a {:?} from member {} to member {} is already under way; wait for it to end",
                p.kind, p.from, p.to
            ));
        }
        match self.primary {
            Some(p) if p.epoch == plan.epoch && p.node == plan.from => {}
            Some(p) => {
                return Err(format!(
                    "stale plan: the primary is member {} in epoch {}, not member {} in epoch {}",
                    p.node, p.epoch, plan.from, plan.epoch
                ))
            }
            None => return Err("no primary has been chosen yet".into()),
        }
        if plan.to == plan.from {
            return Err(format!("member {} is already the primary", plan.to));
        }
        if !raft_members.contains(&plan.to) || !self.members.contains_key(&plan.to) {
            return Err(format!(
                "member {} is not a registered member; `pgquorum list` shows the members",
                plan.to
            ));
        }
        if self
            .members
            .get(&plan.to)
            .is_some_and(|m| m.tags.nofailover)
        {
            return Err(format!(
                "member {} is tagged nofailover: it never becomes primary",
                plan.to
            ));
        }
        // A manual failover is the operator's own decision, which a pause leaves to them.
        if self.paused && plan.kind == PlanKind::Switchover {
            return Err(
                "automatic failover is paused; resume it first (`pgquorum resume`), or name the \
                 successor of a failed primary with `pgquorum failover --to NODE`"
                    .into(),
            );
        }
        Ok(())
    }

    /// The Postgres settings `changes` make, and the rest of the changes; or why they are
    /// refused.
    pub fn split_changes(
        &self,
        changes: &BTreeMap<String, String>,
    ) -> Result<(PgSettings, BTreeMap<String, String>), String> {
        let (pg, rest): (BTreeMap<String, String>, BTreeMap<String, String>) = changes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| crate::pg_settings::is_pg_key(k));
        let pg = self.pg.with_changes(&pg)?;
        if !rest.is_empty() {
            self.config_after(&rest)?;
        }
        if changes.is_empty() {
            return Err("no settings given; pass at least one key=value".into());
        }
        Ok((pg, rest))
    }

    /// The configuration `changes` would make, or why it is refused: a value out of range, or
    /// a lease that cannot outlast a Raft election with the members' registered timings.
    pub fn config_after(
        &self,
        changes: &BTreeMap<String, String>,
    ) -> Result<DynamicConfig, String> {
        let next = self
            .config
            .with_changes(changes)
            .map_err(|e| e.to_string())?;
        if let (Some(hb), Some(election)) = (self.raft_heartbeat_ms, self.raft_election_max_ms) {
            let floor = lease_floor_ms(hb, election, next.tick_ms);
            if next.lease_ms < floor {
                return Err(format!(
                    "setting 'lease_ms' = {}: a lease must outlast a Raft election, or a leader \
                     change alone fences a healthy primary. With raft.election_timeout_max_ms = \
                     {election}, raft.heartbeat_ms = {hb} and tick_ms = {} that takes up to \
                     {floor} ms (two election timeouts, a quorum confirmation and a report); \
                     set lease_ms to at least {floor}, or shorten the Raft timings of every member",
                    next.lease_ms, next.tick_ms
                ));
            }
        }
        Ok(next)
    }

    fn check_sync_epoch(&self, epoch: Epoch) -> Result<(), String> {
        match self.primary {
            Some(p) if p.epoch == epoch && self.sync.epoch == epoch => Ok(()),
            _ => Err(format!(
                "stale epoch {epoch}: synchronous standbys belong to the current primary's epoch"
            )),
        }
    }

    /// The longest Raft heartbeat any member registered with.
    pub fn longest_raft_heartbeat_ms(&self) -> Option<u64> {
        self.raft_heartbeat_ms
    }

    /// The longest quorum-contact age a predecessor may have granted a lease on: three of the
    /// longest heartbeat any member registered (0 when none registered its timings).
    pub fn predecessor_ack_max_ms(&self) -> u64 {
        crate::failover::lease::quorum_ack_max_ms(self.raft_heartbeat_ms.unwrap_or(0))
    }

    /// The terms a new leader must assume its predecessor granted leases under.
    pub fn longest_lease_terms(&self) -> LeaseTerms {
        let now = LeaseTerms::of(&self.config);
        self.lease_ceiling.map_or(now, |c| c.longest(now))
    }

    /// Synchronous replication was asked for but the committed set of the current primary is
    /// asynchronous (`on` fell back after its standbys were gone for a lease): acknowledged
    /// writes are on the primary alone until a standby streams again, and a crash of the
    /// primary now loses up to `maximum_lag_on_failover` of them.
    pub fn synchronous_degraded(&self) -> bool {
        self.config.synchronous_mode != crate::dynamic_config::SyncMode::Off
            && self.primary.is_some()
            && self.synchronous_set().is_none()
    }

    /// The committed synchronous set of the current primary, when it is synchronous.
    pub fn synchronous_set(&self) -> Option<&SyncSet> {
        let p = self.primary?;
        (self.sync.epoch == p.epoch && self.sync.committed.is_synchronous())
            .then_some(&self.sync.committed)
    }

    /// The set a failover relies on: the committed set, joined with a target the primary may
    /// already run (a write acknowledged under either is on at least the smaller `k` of the
    /// union). `None` while replication is asynchronous.
    pub fn failover_set(&self) -> Option<SyncSet> {
        let p = self.primary?;
        if self.sync.epoch != p.epoch {
            return None;
        }
        let base = if self.sync.committed.is_synchronous() {
            &self.sync.committed
        } else {
            self.sync.legacy.as_ref()?
        };
        Some(match &self.sync.target {
            Some(t) => SyncSet {
                members: base.members.union(&t.members).copied().collect(),
                k: base.k.min(t.k),
            },
            None => base.clone(),
        })
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

    #[test]
    fn the_system_identifier_is_recorded_once() {
        let m = ids(&[1]);
        let mut st = ClusterState::default();
        let set = |sysid| Command::SetSystemIdentifier { sysid };
        assert_eq!(st.apply(&set(7), &m), CommandOutcome::Applied);
        assert_eq!(st.apply(&set(7), &m), CommandOutcome::Applied);
        assert!(matches!(
            st.apply(&set(8), &m),
            CommandOutcome::Rejected { .. }
        ));
        assert_eq!(st.system_identifier, Some(7));
    }

    #[test]
    fn a_lease_that_cannot_outlast_an_election_is_refused_and_changes_nothing() {
        let m = ids(&[1]);
        let mut st = ClusterState::default();
        let mut a = info(1, "a");
        a.raft_heartbeat_ms = 150;
        a.raft_election_max_ms = 600;
        st.apply(&Command::RegisterMember(a), &m);
        assert_eq!(lease_floor_ms(150, 600, 250), 1_750);
        let set = |v: &str| Command::SetConfig {
            changes: [("lease_ms".to_string(), v.to_string())].into(),
        };
        let before = st.clone();
        match st.apply(&set("1500"), &m) {
            CommandOutcome::Rejected { reason } => {
                assert!(reason.contains("outlast a Raft election"), "{reason}");
                assert!(reason.contains("at least 1750"), "{reason}");
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(st, before, "a refused change leaves no trace");
        assert_eq!(st.apply(&set("1750"), &m), CommandOutcome::Applied);
        // A slower tick raises the floor.
        let slower = Command::SetConfig {
            changes: [("tick_ms".to_string(), "500".to_string())].into(),
        };
        assert!(matches!(
            st.apply(&slower, &m),
            CommandOutcome::Rejected { .. }
        ));
    }

    #[test]
    fn a_plan_is_checked_started_and_ended_by_the_promotion_or_a_cancel() {
        let m = ids(&[1, 2, 3]);
        let mut st = ClusterState::default();
        for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
            assert_eq!(
                st.apply(&Command::RegisterMember(info(id, name)), &m),
                CommandOutcome::Applied
            );
        }
        let plan = |to: NodeId| PrimaryPlan {
            id: 0,
            kind: PlanKind::Switchover,
            epoch: 1,
            from: 1,
            to,
            not_before_unix_ms: 0,
            requested_at_unix_ms: 5,
            started: false,
        };
        let refused = |st: &mut ClusterState, cmd: &Command, what: &str| match st.apply(cmd, &m) {
            CommandOutcome::Rejected { reason } => assert!(reason.contains(what), "{reason}"),
            o => panic!("{o:?}"),
        };
        let plan2 = Command::PlanPrimary { plan: plan(2) };
        refused(&mut st, &plan2, "no primary");
        st.apply(&promote(1, 1), &m);
        refused(
            &mut st,
            &Command::PlanPrimary { plan: plan(1) },
            "already the primary",
        );
        refused(
            &mut st,
            &Command::PlanPrimary { plan: plan(9) },
            "not a registered member",
        );
        refused(
            &mut st,
            &Command::PlanPrimary {
                plan: PrimaryPlan {
                    epoch: 0,
                    ..plan(2)
                },
            },
            "stale plan",
        );
        assert_eq!(st.apply(&plan2, &m), CommandOutcome::Applied);
        assert_eq!(st.plan.map(|p| (p.id, p.started)), Some((1, false)));
        refused(&mut st, &plan2, "already under way");
        refused(&mut st, &Command::SetPaused { paused: true }, "under way");
        refused(&mut st, &Command::StartPlan { id: 2 }, "not under way");
        assert_eq!(
            st.apply(&Command::StartPlan { id: 1 }, &m),
            CommandOutcome::Applied
        );
        st.apply(&promote(2, 2), &m);
        assert_eq!(st.plan, None);
        let last = st.last_plan.clone().expect("outcome");
        assert!(last.done, "{last:?}");
        // The next plan gets the next id; a cancel ends it with its reason.
        let back = Command::PlanPrimary {
            plan: PrimaryPlan {
                epoch: 2,
                from: 2,
                ..plan(1)
            },
        };
        assert_eq!(st.apply(&back, &m), CommandOutcome::Applied);
        assert_eq!(st.plan.map(|p| p.id), Some(2));
        let cancel = Command::CancelPlan {
            id: 2,
            reason: "target lags".into(),
        };
        assert_eq!(st.apply(&cancel, &m), CommandOutcome::Applied);
        assert_eq!(st.plan, None);
        assert_eq!(
            st.last_plan.clone().map(|l| (l.done, l.outcome)),
            Some((false, "target lags".into()))
        );
        // Paused, no switchover is planned; a manual failover is.
        st.apply(&Command::SetPaused { paused: true }, &m);
        refused(&mut st, &back, "paused");
        let manual = Command::PlanPrimary {
            plan: PrimaryPlan {
                kind: PlanKind::Failover,
                epoch: 2,
                from: 2,
                ..plan(1)
            },
        };
        assert_eq!(st.apply(&manual, &m), CommandOutcome::Applied);
        assert!(
            st.plan.is_some_and(|p| p.started),
            "a manual failover starts at once"
        );
    }

    fn promote(node: NodeId, epoch: Epoch) -> Command {
        Command::Promote {
            node,
            epoch,
            reason: "test".into(),
            at_unix_ms: 1,
            lsn: Some(42),
            sync: SyncSet::default(),
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

    fn set(members: &[NodeId], k: u32) -> SyncSet {
        SyncSet {
            members: members.iter().copied().collect(),
            k,
        }
    }

    #[test]
    fn sync_sets_belong_to_the_current_epoch() {
        let mut s = ClusterState::default();
        let m = ids(&[1, 2, 3]);
        s.apply(&promote(1, 1), &m);
        let target = Command::SetSyncTarget {
            epoch: 1,
            target: set(&[2], 1),
        };
        assert_eq!(s.apply(&target, &m), CommandOutcome::Applied);
        assert_eq!(s.sync.target, Some(set(&[2], 1)));
        assert_eq!(s.synchronous_set(), None, "a target is not committed yet");
        let commit = Command::CommitSync {
            epoch: 1,
            set: set(&[2], 1),
        };
        assert_eq!(s.apply(&commit, &m), CommandOutcome::Applied);
        assert_eq!(s.synchronous_set(), Some(&set(&[2], 1)));
        assert_eq!(s.sync.target, None);
        // A promotion carries the committed set over (its new primary holds every acknowledged
        // write) and makes the new standbys a target; old-epoch changes are refused.
        let mut p = promote(2, 2);
        if let Command::Promote { sync, .. } = &mut p {
            *sync = set(&[3], 1);
        }
        s.apply(&p, &m);
        assert_eq!(s.synchronous_set(), Some(&set(&[2], 1)));
        assert_eq!(s.sync.target, Some(set(&[3], 1)));
        // Until the target is committed, a failover counts on both.
        assert_eq!(s.failover_set(), Some(set(&[2, 3], 1)));
        // A promotion before that carries the union: writes the last primary acknowledged
        // through its target are on those members.
        let mut p = promote(3, 3);
        if let Command::Promote { sync, .. } = &mut p {
            *sync = set(&[1], 1);
        }
        s.apply(&p, &m);
        assert_eq!(s.synchronous_set(), Some(&set(&[2, 3], 1)));
        let before = s.clone();
        assert!(matches!(
            s.apply(&commit, &m),
            CommandOutcome::Rejected { .. }
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn a_fall_back_to_async_keeps_the_last_synchronous_set_for_failover() {
        let mut s = ClusterState::default();
        let m = ids(&[1, 2, 3]);
        s.apply(&promote(1, 1), &m);
        let commit = |set: SyncSet| Command::CommitSync { epoch: 1, set };
        s.apply(&commit(set(&[2], 1)), &m);
        s.apply(&commit(SyncSet::asynchronous()), &m);
        assert_eq!(s.synchronous_set(), None);
        assert_eq!(
            s.failover_set(),
            Some(set(&[2], 1)),
            "writes acknowledged before"
        );
        // Back to synchronous through a confirmed target: it holds everything earlier.
        s.apply(
            &Command::SetSyncTarget {
                epoch: 1,
                target: set(&[3], 1),
            },
            &m,
        );
        assert_eq!(s.failover_set(), Some(set(&[2, 3], 1)));
        s.apply(&commit(set(&[3], 1)), &m);
        assert_eq!(s.failover_set(), Some(set(&[3], 1)));
        assert_eq!(s.sync.legacy, None);
    }

    #[test]
    fn shortening_the_lease_keeps_the_old_terms_until_settled() {
        let mut s = ClusterState::default();
        let m = ids(&[1]);
        let old = LeaseTerms::of(&s.config);
        let shorter = Command::SetConfig {
            changes: [("lease_ms".to_string(), "2000".to_string())].into(),
        };
        s.apply(&shorter, &m);
        assert_eq!(s.longest_lease_terms(), old);
        s.apply(&Command::SettleLeaseCeiling, &m);
        assert_eq!(s.longest_lease_terms().lease_ms, 2000);
    }

    #[test]
    fn the_longest_registered_heartbeat_is_kept_and_a_lease_it_cannot_cover_is_refused() {
        // Finding 4 of the review: a member with other Raft timings was refused at
        // registration but stayed a voter, and as leader blocked every grant for good.
        let mut s = ClusterState::default();
        let m = ids(&[1, 2]);
        let mut a = info(1, "a");
        a.raft_heartbeat_ms = 150;
        a.raft_election_max_ms = 600;
        assert_eq!(
            s.apply(&Command::RegisterMember(a.clone()), &m),
            CommandOutcome::Applied
        );
        let mut b = info(2, "b");
        b.raft_heartbeat_ms = 300;
        b.raft_election_max_ms = 600;
        assert_eq!(
            s.apply(&Command::RegisterMember(b.clone()), &m),
            CommandOutcome::Applied
        );
        assert_eq!(s.longest_raft_heartbeat_ms(), Some(300));
        assert_eq!(s.predecessor_ack_max_ms(), 900);
        // Back to 150 everywhere: the longest stays (a lease may still rest on it).
        b.raft_heartbeat_ms = 150;
        s.apply(&Command::RegisterMember(b.clone()), &m);
        assert_eq!(s.longest_raft_heartbeat_ms(), Some(300));
        // Longer election timeouts are kept too; a lease they outlast is refused at the next
        // change.
        b.raft_election_max_ms = 2_000;
        s.apply(&Command::RegisterMember(b), &m);
        assert_eq!(s.raft_election_max_ms, Some(2_000));
        assert!(s
            .config_after(&[("tick_ms".to_string(), "250".to_string())].into())
            .is_err());
    }

    #[test]
    fn recorded_primary_lsn_only_advances_within_the_epoch() {
        let mut s = ClusterState::default();
        let m = ids(&[1, 2]);
        s.apply(&promote(1, 1), &m);
        let rec = |lsn| Command::RecordPrimaryLsn { epoch: 1, lsn };
        s.apply(&rec(500), &m);
        s.apply(&rec(400), &m);
        assert_eq!(s.primary_lsn.map(|r| r.lsn), Some(500));
        assert!(matches!(
            s.apply(&Command::RecordPrimaryLsn { epoch: 7, lsn: 9 }, &m),
            CommandOutcome::Rejected { .. }
        ));
    }
}
