//! openraft's type configuration for pgquorum, kept in one place.

use std::io::Cursor;

use crate::cluster_state::{Command, CommandOutcome};

/// A sidecar's id inside the Raft group (stable for the life of the member).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The Raft types of a pgquorum cluster: commands are [`Command`]s, replies
    /// [`CommandOutcome`]s, a member's Raft node carries its gRPC address.
    pub TypeConfig:
        D = Command,
        R = CommandOutcome,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a pgquorum node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id of this type configuration.
pub type LogId = openraft::LogId<NodeId>;
/// Membership as stored in the log and the state machine.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// openraft's storage error for this node id type.
pub type StorageError = openraft::StorageError<NodeId>;
