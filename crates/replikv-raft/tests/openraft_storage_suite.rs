//! openraft's own storage test suite, run against replikv's log store and state machine:
//! the contract openraft relies on (log state, vote, truncate, purge, apply, snapshots).

use openraft::testing::{StoreBuilder, Suite};
use replikv_raft::{LogStore, StateMachine, StorageError, TypeConfig};
use replikv_storage::{FsyncPolicy, Stores};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let stores = Stores::open(dir.path(), FsyncPolicy::Never).expect("open stores");
        let (log, sm) = replikv_raft::open_partition(&stores, 7)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn replikv_storage_passes_the_openraft_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite failed: {e}");
    }
}
