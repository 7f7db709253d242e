//! Applies go into the state machine's in-memory overlay and reach the state file in
//! checkpoints (`overlay.rs`). These tests apply real entries through openraft's state
//! machine trait, with checkpoints every few keys, and check what readers, snapshots and a
//! restart over the same file see.

use std::collections::BTreeMap;

use bytes::Bytes;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload};
use replikv_raft::{CheckpointLimits, Entry, KvView, LogId, SnapshotFile, StateMachine};
use replikv_storage::{FsyncPolicy, Store, Stores};
use replikv_types::{KvOp, Ops, SetCond, WriteRequest};

const P: replikv_types::GroupId = replikv_types::GroupId::default_keyspace(3);

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn entry(index: u64, op: KvOp) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(WriteRequest {
            req_id: index,
            now_ms: 1_000,
            ops: Ops::encode(&[op]),
        }),
    }
}

fn set(key: &str, value: &str) -> KvOp {
    KvOp::Set {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        expire: None,
        keep_ttl: false,
        cond: SetCond::Always,
        get: false,
    }
}

fn del(key: &str) -> KvOp {
    KvOp::Del {
        keys: vec![Bytes::copy_from_slice(key.as_bytes())],
    }
}

/// The ops of entries 1..=n: sets of 12 keys, overwrites and deletes, so that checkpoints
/// (every 4 keys) cut through runs of changes to the same keys.
fn ops(n: u64) -> Vec<KvOp> {
    (1..=n)
        .map(|i| match i % 5 {
            0 => del(&format!("k{:02}", (i * 7) % 12)),
            _ => set(&format!("k{:02}", (i * 5) % 12), &format!("v{i}")),
        })
        .collect()
}

/// What applying `ops` in order leaves: key → value.
fn model(ops: &[KvOp]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for op in ops {
        match op {
            KvOp::Set { key, value, .. } => {
                m.insert(
                    String::from_utf8(key.to_vec()).unwrap(),
                    String::from_utf8(value.to_vec()).unwrap(),
                );
            }
            KvOp::Del { keys } => {
                m.remove(std::str::from_utf8(&keys[0]).unwrap());
            }
            _ => unreachable!(),
        }
    }
    m
}

fn contents(view: &KvView) -> BTreeMap<String, String> {
    let (keys, next) = view.scan(b"", usize::MAX, 1_000, |_| true).unwrap();
    assert_eq!(next, None);
    keys.iter()
        .map(|k| {
            let v = view
                .get(k, 1_000)
                .unwrap()
                .expect("a scanned key has a value");
            (
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(v.data.to_vec()).unwrap(),
            )
        })
        .collect()
}

fn small(store: &Store) -> StateMachine {
    StateMachine::open(store.clone(), P)
        .unwrap()
        .with_checkpoint_limits(CheckpointLimits {
            keys: 4,
            bytes: usize::MAX,
        })
}

/// Whole scans, a page at a time: pages may stop short where an overlay layer was cut, and
/// the pages together give every key once, in order.
fn assert_pages(view: &KvView, model: &BTreeMap<String, String>) {
    for limit in [1, 2, 3, 5] {
        let (mut paged, mut from) = (Vec::new(), Vec::new());
        loop {
            let (page, next) = view.scan(&from, limit, 1_000, |_| true).unwrap();
            assert!(page.len() <= limit);
            paged.extend(page);
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        let want: Vec<_> = model.keys().cloned().map(Bytes::from).collect();
        assert_eq!(paged, want, "pages of {limit}");
    }
}

async fn wait_until_quiet(store: &Store) {
    // An empty job is answered after every job queued before it (the writer is in order).
    store.write(false, |_| Ok(())).await.unwrap();
}

#[tokio::test]
async fn reads_scans_snapshots_and_restarts_see_what_was_applied_around_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(dir.path(), FsyncPolicy::Never).unwrap();
    let mut sm = small(&stores.state);
    let view = sm.view();
    let all = ops(40);
    for (i, op) in all.iter().enumerate() {
        let index = i as u64 + 1;
        sm.apply([entry(index, op.clone())]).await.unwrap();
        // Every apply is visible at once, through every layer and the file.
        assert_eq!(contents(&view), model(&all[..=i]), "after entry {index}");
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(index)));
    }
    assert_pages(&view, &model(&all));
    // A scan from the middle, a page at a time, gives the same keys in order.
    let (first, next) = view.scan(b"k03", 2, 1_000, |_| true).unwrap();
    let (rest, _) = view
        .scan(&next.clone().unwrap(), usize::MAX, 1_000, |_| true)
        .unwrap();
    let paged: Vec<_> = first.iter().chain(&rest).cloned().collect();
    let expected: Vec<_> = model(&all)
        .into_keys()
        .filter(|k| k.as_str() >= "k03")
        .map(Bytes::from)
        .collect();
    assert_eq!(paged, expected);

    // A restart over the file: it holds a checkpoint (every 4 keys), whose offset agrees
    // with its keys, and the rest is re-applied from there.
    wait_until_quiet(&stores.state).await;
    // With the default limits, everything re-applied stays in one overlay layer, over the
    // file's older checkpoint.
    let mut restarted = StateMachine::open(stores.state.clone(), P).unwrap();
    let (at, _) = restarted.applied_state().await.unwrap();
    let at = at.expect("at least one checkpoint landed").index;
    let reread = restarted.view();
    assert_eq!(contents(&reread), model(&all[..at as usize]));
    for (i, op) in all.iter().enumerate().skip(at as usize) {
        restarted
            .apply([entry(i as u64 + 1, op.clone())])
            .await
            .unwrap();
    }
    assert_eq!(contents(&reread), model(&all));
    assert_pages(&reread, &model(&all));
    assert_eq!(reread.digest().unwrap(), view.digest().unwrap());

    // A snapshot holds everything applied, though the limits were not reached.
    let snapshot = sm.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(40)));
    let file = SnapshotFile::decode(snapshot.snapshot.get_ref()).unwrap();
    assert_eq!(file.pairs.len(), model(&all).len());
    assert_eq!(
        small(&stores.state).applied_state().await.unwrap().0,
        Some(log_id(40))
    );
}

#[tokio::test]
async fn a_snapshot_install_replaces_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(dir.path(), FsyncPolicy::Never).unwrap();
    // The snapshot: 10 entries applied elsewhere.
    let source_dir = tempfile::tempdir().unwrap();
    let source = Stores::open(source_dir.path(), FsyncPolicy::Never).unwrap();
    let mut leader = small(&source.state);
    let theirs: Vec<KvOp> = (1..=10).map(|i| set(&format!("s{i}"), "x")).collect();
    for (i, op) in theirs.iter().enumerate() {
        leader
            .apply([entry(i as u64 + 1, op.clone())])
            .await
            .unwrap();
    }
    let snapshot = leader.build_snapshot().await.unwrap();

    // This replica applied other entries (some checkpointed, some not) before it.
    let mut sm = small(&stores.state);
    let view = sm.view();
    for (i, op) in ops(6).into_iter().enumerate() {
        sm.apply([entry(i as u64 + 1, op)]).await.unwrap();
    }
    sm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(contents(&view), model(&theirs));
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(10)));
}

/// Checkpoints leave the overlay once they land, so a key's value is the file's again.
#[tokio::test]
async fn layers_leave_once_their_checkpoint_lands() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(dir.path(), FsyncPolicy::Never).unwrap();
    let mut sm = small(&stores.state);
    for i in 1..=8u64 {
        sm.apply([entry(i, set(&format!("k{i}"), "v"))])
            .await
            .unwrap();
    }
    // Eight keys at four per checkpoint: two checkpoints, and an empty active layer.
    wait_until_quiet(&stores.state).await;
    let r = stores.state.read().unwrap();
    for i in 1..=8u64 {
        assert!(r.kv_get(P, format!("k{i}").as_bytes()).unwrap().is_some());
    }
}

/// A page reads a bounded number of each layer's keys; deletes use them up without adding
/// to the page, so a page can end at that bound, and the scan resumes from there.
#[tokio::test]
async fn scans_page_past_deletes_held_in_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(dir.path(), FsyncPolicy::Never).unwrap();
    let mut sm = StateMachine::open(stores.state.clone(), P).unwrap();
    let mut all: Vec<KvOp> = (0..12).map(|i| set(&format!("k{i:02}"), "v")).collect();
    all.extend((1..9).map(|i| del(&format!("k{i:02}"))));
    for (i, op) in all.iter().enumerate() {
        sm.apply([entry(i as u64 + 1, op.clone())]).await.unwrap();
    }
    assert_pages(&sm.view(), &model(&all));
}

/// The leader's expiry sweep reads pages of the key table across the overlay's layers and
/// the file: pages of any size, resumed where each ended, name every expired key once and
/// nothing else, and an eviction entry removes exactly those.
#[tokio::test]
async fn expiry_pages_find_every_expired_key_across_layers_and_evictions_remove_them() {
    use replikv_types::Expiry;
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(dir.path(), FsyncPolicy::Never).unwrap();
    let mut sm = small(&stores.state);
    let view = sm.view();
    // Keys k00..k19; every third expires at 900 (before the entries' 1,000), every third
    // at 5,000, the rest never. Checkpoints every 4 keys spread them over layers and file.
    let mut expected = Vec::new();
    for i in 0..20u64 {
        let key = format!("k{i:02}");
        let expire = match i % 3 {
            0 => {
                expected.push(Bytes::from(key.clone()));
                Some(Expiry::At(900))
            }
            1 => Some(Expiry::At(5_000)),
            _ => None,
        };
        let op = KvOp::Set {
            key: Bytes::from(key),
            value: Bytes::from_static(b"v"),
            expire,
            keep_ttl: false,
            cond: SetCond::Always,
            get: false,
        };
        // Applied at 500, so that the first kind is live when written.
        let mut e = entry(i + 1, op);
        if let EntryPayload::Normal(req) = &mut e.payload {
            req.now_ms = 500;
        }
        sm.apply([e]).await.unwrap();
    }
    assert_eq!(view.expiring_puts(), 14);
    for visit in [1, 3, 7, 100] {
        let (mut found, mut from, mut due) = (Vec::new(), Vec::new(), None);
        loop {
            let page = view.expired(&from, visit, 1_000).unwrap();
            assert!(page.expired.len() <= visit);
            found.extend(page.expired);
            due = due.into_iter().chain(page.next_due_ms).min();
            match page.resume {
                Some(r) => from = r,
                None => break,
            }
        }
        assert_eq!(found, expected, "pages visiting {visit}");
        assert_eq!(due, Some(5_000));
    }
    let evict = KvOp::Evict {
        keys: expected.clone(),
    };
    sm.apply([entry(21, evict)]).await.unwrap();
    let page = view.expired(b"", usize::MAX, 1_000).unwrap();
    assert_eq!(page.expired, Vec::<Bytes>::new());
    let (keys, _) = view.scan(b"", usize::MAX, 0, |_| true).unwrap();
    assert_eq!(keys.len(), 20 - expected.len());
}
