//! Durable Raft storage in one sled database under the node's data dir: the log and vote
//! ([`log_store`]), the state machine and its snapshot ([`state_machine`]), and the identity that
//! ties a data dir to one cluster and one node ([`identity`]).

// openraft fixes the error type of its storage traits; helpers return the same type.
#![allow(clippy::result_large_err)]

pub mod identity;
pub mod log_store;
pub mod state_machine;

use std::path::Path;

use openraft::{AnyError, StorageIOError};

use crate::types::{NodeId, StorageError};

/// sled's page cache; its 1 GiB default would dominate the sidecar's memory.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Opens (creating if needed) the sled database at `dir`.
pub fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .open()
}

/// Maps an I/O-level failure into openraft's error for the failed operation.
pub(crate) fn io_err(
    make: fn(AnyError) -> StorageIOError<NodeId>,
    e: impl std::error::Error + 'static,
) -> StorageError {
    make(AnyError::new(&e)).into()
}
