//! What a sidecar tells the Raft leader about its Postgres every tick. Reports are soft state in
//! the leader's memory, never log entries: the log only records decisions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::lease::Millis;
use crate::types::NodeId;

/// The local Postgres as its sidecar last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PgState {
    /// No data directory yet (a new member before initdb or clone).
    NoData,
    /// Data directory present, postmaster not running (stopped on purpose, or crashed).
    Stopped,
    /// Postmaster verified gone after a fence, the sidecar holds no valid lease, and it accepts
    /// no grant for a report sent before this one: nothing on this node can write until the
    /// leader grants a newer report. (Down while holding a lease is `Stopped`.)
    Fenced,
    /// Running and answering as a primary.
    Primary,
    /// Running and answering as a replica.
    Replica,
    /// Postmaster present but not answering probes.
    Unresponsive,
}

/// One sidecar's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    /// The reporting member.
    pub node: NodeId,
    /// Postgres as observed.
    pub pg: PgState,
    /// Consecutive failed probes (0 when the last probe succeeded).
    pub consecutive_failures: u32,
    /// Timeline of the local data (0 when unknown).
    pub timeline: u32,
    /// Primary: current WAL insert position; replica: highest WAL received or replayed.
    pub lsn: u64,
    /// A replica's WAL receiver is streaming from the member it follows.
    pub streaming: bool,
    /// Highest committed epoch the sidecar has acted on.
    pub epoch_seen: u64,
    /// Sender's clock when the report left: the start of the lease it asks for. A sidecar whose
    /// Postgres is fenced accepts no grant for a report sent before its latest fenced report,
    /// so the leader can order a fence after a grant by these times.
    pub sent_at: Millis,
}

impl MemberReport {
    /// Whether this member could serve as primary right now.
    pub fn healthy_replica(&self) -> bool {
        self.pg == PgState::Replica && self.consecutive_failures == 0
    }
}

/// A report as the leader holds it: with the receipt time on the leader's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Leader's clock when the report arrived.
    pub at: Millis,
    /// The report.
    pub report: MemberReport,
}

/// The latest report of each member, as the leader knows them.
pub type ReportBook = BTreeMap<NodeId, Received>;
