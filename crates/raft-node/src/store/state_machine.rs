//! The cluster state machine in sled: applies committed entries to a [`ClusterState`], persists
//! it, builds and installs snapshots, and publishes every applied state to local readers.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::io_err;
use crate::cluster_state::{ClusterState, CommandOutcome};
use crate::types::{LogId, NodeId, StorageError, StoredMembership, TypeConfig};

const STATE: &[u8] = b"state";
const SNAPSHOT: &[u8] = b"current";

/// The state machine's content after some prefix of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    /// The last entry applied.
    pub last_applied: Option<LogId>,
    /// The last membership applied.
    pub membership: StoredMembership,
    /// The cluster state.
    pub cluster: ClusterState,
}

impl AppliedState {
    /// Applies one committed entry: the state machine's whole logic, without storage.
    pub fn apply_entry(&mut self, entry: openraft::Entry<TypeConfig>) -> CommandOutcome {
        self.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => CommandOutcome::Applied,
            EntryPayload::Normal(cmd) => {
                let members = self.member_ids();
                self.cluster.apply(&cmd, &members)
            }
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(entry.log_id), m);
                let members = self.member_ids();
                self.cluster.retain_members(&members);
                CommandOutcome::Applied
            }
        }
    }

    /// Ids of all Raft members (voters and learners) of the applied membership.
    pub fn member_ids(&self) -> BTreeSet<NodeId> {
        self.membership
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

/// The state machine store. Clones share the database and the published state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: sled::Db,
    sm: sled::Tree,
    state: Arc<tokio::sync::RwLock<AppliedState>>,
    published: watch::Sender<Arc<AppliedState>>,
    snapshot_seq: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachineStore {
    /// Opens the state machine trees and loads the last persisted state.
    pub fn new(db: sled::Db) -> Result<Self, StorageError> {
        let sm = db
            .open_tree("sm")
            .map_err(|e| io_err(StorageIOError::read_state_machine, e))?;
        let state: AppliedState = match sm
            .get(STATE)
            .map_err(|e| io_err(StorageIOError::read_state_machine, e))?
        {
            Some(raw) => serde_json::from_slice(&raw)
                .map_err(|e| io_err(StorageIOError::read_state_machine, e))?,
            None => AppliedState::default(),
        };
        let (published, _) = watch::channel(Arc::new(state.clone()));
        Ok(Self {
            db,
            sm,
            state: Arc::new(tokio::sync::RwLock::new(state)),
            published,
            snapshot_seq: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// A receiver that sees every applied state, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AppliedState>> {
        self.published.subscribe()
    }

    async fn persist(&self, state: &AppliedState) -> Result<(), StorageError> {
        let raw = serde_json::to_vec(state)
            .map_err(|e| io_err(StorageIOError::write_state_machine, e))?;
        self.sm
            .insert(STATE, raw)
            .map_err(|e| io_err(StorageIOError::write_state_machine, e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| io_err(StorageIOError::write_state_machine, e))?;
        self.published.send_replace(Arc::new(state.clone()));
        Ok(())
    }

    async fn store_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let raw =
            serde_json::to_vec(snap).map_err(|e| io_err(StorageIOError::write_snapshot_any, e))?;
        self.sm
            .insert(SNAPSHOT, raw)
            .map_err(|e| io_err(StorageIOError::write_snapshot_any, e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| io_err(StorageIOError::write_snapshot_any, e))?;
        Ok(())
    }
}

trait SnapshotErr {
    fn write_snapshot_any(e: openraft::AnyError) -> Self;
    fn read_snapshot_any(e: openraft::AnyError) -> Self;
}

impl SnapshotErr for StorageIOError<NodeId> {
    fn write_snapshot_any(e: openraft::AnyError) -> Self {
        StorageIOError::write_snapshot(None, e)
    }
    fn read_snapshot_any(e: openraft::AnyError) -> Self {
        StorageIOError::read_snapshot(None, e)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state = self.state.read().await.clone();
        let data = serde_json::to_vec(&state.cluster)
            .map_err(|e| io_err(StorageIOError::read_state_machine, e))?;
        let seq = self
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match state.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, seq),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        self.store_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let s = self.state.read().await;
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandOutcome>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.state.write().await;
        let mut replies = Vec::new();
        for entry in entries {
            replies.push(state.apply_entry(entry));
        }
        self.persist(&state).await?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let cluster: ClusterState = serde_json::from_slice(&data)
            .map_err(|e| io_err(StorageIOError::read_snapshot_any, e))?;
        self.store_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        let mut state = self.state.write().await;
        *state = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            cluster,
        };
        self.persist(&state).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let raw = self
            .sm
            .get(SNAPSHOT)
            .map_err(|e| io_err(StorageIOError::read_snapshot_any, e))?;
        let Some(raw) = raw else { return Ok(None) };
        let stored: StoredSnapshot = serde_json::from_slice(&raw)
            .map_err(|e| io_err(StorageIOError::read_snapshot_any, e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
