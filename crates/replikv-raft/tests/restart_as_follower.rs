//! Found by `replikv-chaos` `kill-all`: a node that led before every node was killed came
//! back as leader of the same term (openraft 0.9 restores a committed vote of its own), with
//! a read index taken from the saved commit point, which may be older than writes it had
//! acknowledged; a primary read then returned an overwritten value. A reopened log store
//! keeps the vote but never as committed, so the node must win a new election first.

// Real time: real stores on a real runtime, not the simulation.
#![allow(clippy::disallowed_methods)]

use openraft::storage::RaftLogStorage;
use openraft::Vote;
use replikv_storage::{FsyncPolicy, Stores};

#[tokio::test]
async fn kill_all_a_leader_restarts_without_a_committed_vote() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let stores = Stores::open(dir.path(), FsyncPolicy::Always).expect("open stores");
        let (mut log, _sm) =
            replikv_raft::open_group(&stores, replikv_types::GroupId::default_keyspace(3))
                .expect("open partition");
        let mut vote = Vote::new(4, 2);
        vote.commit();
        log.save_vote(&vote).await.expect("save vote");
        assert_eq!(log.read_vote().await.unwrap(), Some(vote), "saved as given");
    }
    // The writer threads of the first open let go of the files once they see it dropped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stores = loop {
        match Stores::open(dir.path(), FsyncPolicy::Always) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("reopen stores: {e}"),
        }
    };
    let (mut log, _sm) =
        replikv_raft::open_group(&stores, replikv_types::GroupId::default_keyspace(3))
            .expect("reopen partition");
    let vote = log.read_vote().await.unwrap().expect("the vote survives");
    assert!(!vote.committed, "restarted with a committed vote: {vote:?}");
    assert_eq!(vote.leader_id().voted_for(), Some(2));
    assert_eq!(vote.leader_id.term, 4);
}
