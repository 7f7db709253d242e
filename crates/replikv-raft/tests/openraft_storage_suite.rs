//! openraft's own storage test suite, run against replikv's log store and state machine:
//! the contract openraft relies on (log state, vote, truncate, purge, apply, snapshots).
//! Twice: on files with writer threads (the server), and in memory with task writers (the
//! deterministic simulation in `sim/`), so the simulated store is held to the same contract.

use openraft::testing::{StoreBuilder, Suite};
use replikv_raft::{LogStore, StateMachine, StorageError, TypeConfig};
use replikv_storage::{FsyncPolicy, Stores, WriterKind};

struct OnFiles;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for OnFiles {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let stores = Stores::open(dir.path(), FsyncPolicy::Never).expect("open stores");
        let (log, sm) =
            replikv_raft::open_group(&stores, replikv_types::GroupId::default_keyspace(7))?;
        Ok((dir, log, sm))
    }
}

struct InMemory;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for InMemory {
    async fn build(&self) -> Result<((), LogStore, StateMachine), StorageError> {
        let stores = Stores::in_memory().expect("in-memory stores");
        assert_eq!(stores.log.writer_kind(), WriterKind::Task);
        let (log, sm) =
            replikv_raft::open_group(&stores, replikv_types::GroupId::default_keyspace(7))?;
        Ok(((), log, sm))
    }
}

#[test]
fn replikv_storage_passes_the_openraft_suite() {
    if let Err(e) = Suite::test_all(OnFiles) {
        panic!("openraft storage suite failed: {e}");
    }
}

#[test]
fn in_memory_storage_with_task_writers_passes_the_openraft_suite() {
    if let Err(e) = Suite::test_all(InMemory) {
        panic!("openraft storage suite failed (in memory, task writers): {e}");
    }
}
