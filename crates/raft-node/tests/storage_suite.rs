//! openraft's own storage test suite against the sled log store and state machine.

use openraft::testing::{StoreBuilder, Suite};
use raft_node::store::log_store::LogStore;
use raft_node::store::open_db;
use raft_node::store::state_machine::StateMachineStore;
use raft_node::types::{StorageError, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_db(dir.path()).expect("open sled");
        let log = LogStore::new(db.clone()).expect("log trees");
        let sm = StateMachineStore::new(db)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_sled() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
