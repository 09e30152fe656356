//! The Raft log, vote and commit markers in sled.
//!
//! Durability: sled makes nothing durable until a flush returns, so every write openraft relies
//! on after a crash (vote, appended entries, purge marker) is flushed before it is acknowledged.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::io_err;
use crate::types::{LogId, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Log storage backed by the `log` and `meta` trees of one sled database. Cheap to clone: clones
/// share the database.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    /// Opens the log trees in `db`.
    pub fn new(db: sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    async fn flush(&self, verb: ErrorVerb) -> Result<(), StorageError> {
        self.db.flush_async().await.map_err(|e| -> StorageError {
            StorageIOError::<NodeId>::new(ErrorSubject::Logs, verb, AnyError::new(&e)).into()
        })?;
        Ok(())
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self
            .meta
            .get(key)
            .map_err(|e| io_err(StorageIOError::read, e))?;
        raw.map(|v| serde_json::from_slice(&v))
            .transpose()
            .map_err(|e| io_err(StorageIOError::read, e))
    }

    fn write_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let raw = serde_json::to_vec(value).map_err(|e| io_err(StorageIOError::write, e))?;
        self.meta
            .insert(key, raw)
            .map_err(|e| io_err(StorageIOError::write, e))?;
        Ok(())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        match self
            .log
            .last()
            .map_err(|e| io_err(StorageIOError::read_logs, e))?
        {
            None => Ok(None),
            Some((_, raw)) => {
                let entry: Entry<TypeConfig> = serde_json::from_slice(&raw)
                    .map_err(|e| io_err(StorageIOError::read_logs, e))?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let iter = match range.end_bound() {
            Bound::Included(i) => self.log.range(key(start)..=key(*i)),
            Bound::Excluded(i) => self.log.range(key(start)..key(*i)),
            Bound::Unbounded => self.log.range(key(start)..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, raw) = item.map_err(|e| io_err(StorageIOError::read_logs, e))?;
            let entry: Entry<TypeConfig> =
                serde_json::from_slice(&raw).map_err(|e| io_err(StorageIOError::read_logs, e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote)?;
        self.flush(ErrorVerb::Write).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: openraft tolerates losing it (it only shortens re-application on restart).
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let raw =
                serde_json::to_vec(&entry).map_err(|e| io_err(StorageIOError::write_logs, e))?;
            batch.insert(&key(entry.log_id.index), raw);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        // The entries are readable now; openraft learns they are durable only after the fsync.
        let flushed = self.db.flush_async().await;
        callback.log_io_completed(flushed.map(|_| ()).map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(key(log_id.index)..) {
            let (k, _) = item.map_err(|e| io_err(StorageIOError::write_logs, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        self.flush(ErrorVerb::Delete).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the marker first: a crash between the two steps must not expose a log whose
        // head is missing without saying so.
        self.write_meta(LAST_PURGED, &log_id)?;
        self.flush(ErrorVerb::Write).await?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(|e| io_err(StorageIOError::write_logs, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        Ok(())
    }
}
