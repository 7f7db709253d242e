//! Reopening a partition over the in-memory stores with task writers (what the deterministic
//! simulation does at a node restart) runs the real open path on one thread: its start-up
//! writes (`cut_corrupt_tail`, the vote demotion) commit inline instead of waiting for a
//! writer task that this very thread would have to run.

use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};
use replikv_raft::Entry;
use replikv_storage::{LogOp, Stores};

const P: replikv_types::GroupId = replikv_types::GroupId::default_keyspace(3);

fn one_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

#[test]
fn a_reopen_demotes_the_vote_on_one_thread() {
    one_thread().block_on(async {
        let stores = Stores::in_memory().expect("in-memory stores");
        let (mut log, _sm) = replikv_raft::open_group(&stores, P).expect("open partition");
        let mut vote = Vote::new(4, 2);
        vote.commit();
        log.save_vote(&vote).await.expect("save vote");
        drop(log);
        let (mut log, _sm) = replikv_raft::open_group(&stores, P).expect("reopen partition");
        let vote = log.read_vote().await.unwrap().expect("the vote survives");
        assert!(!vote.committed, "restarted with a committed vote: {vote:?}");
        assert_eq!(vote.leader_id.term, 4);
    });
}

#[test]
fn a_reopen_cuts_a_corrupt_tail_on_one_thread() {
    one_thread().block_on(async {
        let stores = Stores::in_memory().expect("in-memory stores");
        // Five records and a commit point, as a node writes them before it stops.
        let records: Vec<LogOp> = (1..=5)
            .map(|i| {
                let entry = Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
                    payload: EntryPayload::Blank,
                };
                LogOp::Append {
                    g: P,
                    index: i,
                    bytes: replikv_raft::encode_record(&entry),
                }
            })
            .collect();
        stores.log.write(true, records).await.unwrap();
        let (mut log, _sm) = replikv_raft::open_group(&stores, P).expect("open partition");
        log.save_committed(Some(LogId::new(CommittedLeaderId::new(1, 1), 5)))
            .await
            .unwrap();
        // `save_committed` does not wait for its commit; a write queued after it does.
        stores.log.write(false, Vec::new()).await.unwrap();
        assert_eq!(
            log.read_committed().await.unwrap().map(|l| l.index),
            Some(5)
        );
        drop(log);
        // A torn write at index 4: its checksum fails.
        let mut raw = stores.log.entry(P, 4).unwrap().unwrap();
        *raw.last_mut().unwrap() ^= 1;
        let torn = LogOp::Append {
            g: P,
            index: 4,
            bytes: raw,
        };
        stores.log.write(true, vec![torn]).await.unwrap();

        let (mut log, _sm) = replikv_raft::open_group(&stores, P).expect("reopen partition");
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3), "cut from 4 on");
        let committed = log.read_committed().await.unwrap();
        assert_eq!(committed.map(|l| l.index), Some(3), "commit point clamped");
    });
}

/// A record in a format this build does not know (a newer replikv wrote it, its checksum
/// holds) is not a torn write: the log refuses to open instead of cutting it, since the
/// cut would drop committed entries.
#[test]
fn a_record_of_an_unknown_version_is_refused_not_cut() {
    one_thread().block_on(async {
        let stores = Stores::in_memory().expect("in-memory stores");
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Blank,
        };
        let mut newer = replikv_raft::encode_record(&entry);
        newer[0] = 9;
        let op = LogOp::Append {
            g: P,
            index: 1,
            bytes: newer,
        };
        stores.log.write(true, vec![op]).await.unwrap();
        let err = match replikv_raft::open_group(&stores, P) {
            Ok(_) => panic!("a log with a record of version 9 opened"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("unknown record version 9"), "{err}");
        assert!(
            stores.log.entry(P, 1).unwrap().is_some(),
            "the record was cut"
        );
    });
}
