//! replikv's REAL storage, as the simulation runs it: `replikv_raft::LogStore` over a
//! `replikv_storage::RaftLog` on a simulated log directory and `StateMachine` over a
//! `replikv_storage::Store` on a simulated disk (`crate::disk`, the storage writers as tokio
//! tasks). This module only wraps them, for three things the real code
//! does not do:
//! - observe: every saved vote (for election safety), every append and vote save acknowledged
//!   while the node was up (they must survive any crash), and every entry the node is told is
//!   committed (`save_committed`: openraft can commit, apply, snapshot and purge an entry
//!   within one simulated millisecond, before the checker looks);
//! - fence: a crashed incarnation's tasks (openraft's replication streams and state-machine
//!   worker may still be scheduled after `shutdown`) touch the storage no more;
//! - inject the `--bug`s: `lost-append` corrupts the last records of a restarting node's log, so
//!   that the real `cut_corrupt_tail` drops entries the node had acknowledged; `apply-reversed`
//!   hands the real state machine each batch's writes in reverse order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
};
use replikv_raft::{
    Entry, LogId, LogStore, Membership, SnapshotMeta, StateMachine, StorageError, TypeConfig, Vote,
};
use replikv_storage::{LogOp, RaftLog};
use replikv_types::Replies;

/// The partition every simulated node's group runs as.
pub const PARTITION: replikv_types::GroupId = replikv_types::GroupId::default_keyspace(0);

/// How many trailing log records `--bug lost-append` corrupts on a crash.
pub const LOST_TAIL: u64 = 8;

/// What the simulation has seen of one node's storage, across its incarnations. (The storage
/// itself is the node's `Stores`.)
pub struct Obs {
    /// Every leader id `(term, node)` this node ever saved a vote for.
    pub vote_history: BTreeSet<(u64, u64)>,
    /// Lowest log index changed since the checker last looked (u64::MAX: none).
    pub recheck_from: u64,
    /// Entries this node was told are committed that the checker has not read yet.
    pub journal: Vec<Entry>,
    /// The last commit point passed to `save_committed` (or read at a restart).
    pub committed: Option<LogId>,
    /// Every entry whose append the log store acknowledged (the append returned, so its
    /// batch was committed and fsynced) while the node was up, less those truncated or purged
    /// since: each must still be in the log after any crash, a power loss included.
    pub durable_log: BTreeMap<u64, LogId>,
    /// The last vote whose save returned while the node was up: a restart must read it (or a
    /// later one) back.
    pub durable_vote: Option<Vote>,
}

impl Obs {
    pub fn new() -> Obs {
        Obs {
            vote_history: BTreeSet::new(),
            recheck_from: u64::MAX,
            journal: Vec::new(),
            committed: None,
            durable_log: BTreeMap::new(),
            durable_vote: None,
        }
    }
}

pub type SharedObs = Arc<Mutex<Obs>>;

/// One incarnation of a node: false once it crashed.
pub type Alive = Arc<AtomicBool>;

fn dead() -> StorageError {
    openraft::StorageIOError::<u64>::read(&std::io::Error::other("node crashed")).into()
}

macro_rules! check_alive {
    ($self:ident) => {
        if !$self.alive.load(Ordering::SeqCst) {
            return Err(dead());
        }
    };
}

/// A write, fenced on both sides: the node may have died while it waited for its commit (the
/// power can fail inside a commit: `disk::Power::arm`). Whatever the commit did then reached
/// only the detached disk, so the node must not see it succeed.
macro_rules! fenced_write {
    ($self:ident, $call:expr) => {{
        check_alive!($self);
        let r = $call.await;
        check_alive!($self);
        r
    }};
}

/// Runs a storage call that never waits (a read of the real stores) to completion, from the
/// checker, which must not await. Panics if it would wait.
pub fn now<T>(f: impl Future<Output = T>) -> T {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a storage read waited"),
    }
}

/// `--bug lost-append`, at a restart, on the log the crash left, before the log store opens:
/// the last `LOST_TAIL` entries of the node's log are written again with a flipped byte, so
/// that their records (replikv-raft's, with their own CRC) fail their checksum. The real
/// `LogStore::open` then cuts them (and clamps the commit point): the node loses entries it
/// acknowledged as durable. Returns the first index corrupted.
pub fn corrupt_log_tail(log: &RaftLog) -> Option<u64> {
    let records = log.entries(PARTITION, 0..u64::MAX).ok()?;
    let from = records.len().saturating_sub(LOST_TAIL as usize);
    let first = records.get(from)?.0;
    let ops = records[from..]
        .iter()
        .map(|(i, raw)| {
            let mut bytes = raw.clone();
            if let Some(last) = bytes.last_mut() {
                *last ^= 0x5a;
            }
            LogOp::Append {
                g: PARTITION,
                index: *i,
                bytes,
            }
        })
        .collect();
    log.write_now(ops).ok()?;
    Some(first)
}

/// The real log store, observed and fenced.
#[derive(Clone)]
pub struct SimLog {
    pub inner: LogStore,
    pub obs: SharedObs,
    pub alive: Alive,
}

impl RaftLogReader<TypeConfig> for SimLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        check_alive!(self);
        self.inner.try_get_log_entries(range).await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        check_alive!(self);
        let v = self.inner.limited_get_log_entries(start, end).await?;
        if crate::trace_on() {
            eprintln!(
                "read {start}..{end} -> {:?}..{:?}",
                v.first().map(|e| e.log_id.index),
                v.last().map(|e| e.log_id.index),
            );
        }
        Ok(v)
    }
}

impl RaftLogStorage<TypeConfig> for SimLog {
    type LogReader = SimLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        check_alive!(self);
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        SimLog {
            inner: self.inner.get_log_reader().await,
            obs: self.obs.clone(),
            alive: self.alive.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // Recorded before the save (which a crash may lose, or leave on the crashed
        // incarnation's detached disk): the history may hold more than the disk, never less.
        // The vote a restart reads back is added to it as well.
        self.obs
            .lock()
            .unwrap()
            .vote_history
            .insert((vote.leader_id.term, vote.leader_id.node_id));
        fenced_write!(self, self.inner.save_vote(vote))?;
        self.obs.lock().unwrap().durable_vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        check_alive!(self);
        self.inner.read_vote().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        check_alive!(self);
        if let Some(upto) = committed {
            let prev = self.obs.lock().unwrap().committed.map(|c| c.index);
            let lo = prev.map_or(0, |p| p.min(upto.index) + 1);
            let newly = self.inner.try_get_log_entries(lo..=upto.index).await?;
            self.obs.lock().unwrap().journal.extend(newly);
        }
        self.obs.lock().unwrap().committed = committed;
        self.inner.save_committed(committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        check_alive!(self);
        self.inner.read_committed().await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        check_alive!(self);
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(first) = entries.first() {
            let mut obs = self.obs.lock().unwrap();
            obs.recheck_from = obs.recheck_from.min(first.log_id.index);
        }
        let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
        fenced_write!(self, self.inner.append(entries, callback))?;
        // Acknowledged while the node was up (on one thread, nothing ran between the commit's
        // answer and here): the batch is on the disk, fsynced.
        let mut obs = self.obs.lock().unwrap();
        for id in ids {
            obs.durable_log.insert(id.index, id);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        check_alive!(self);
        {
            let mut obs = self.obs.lock().unwrap();
            obs.recheck_from = obs.recheck_from.min(log_id.index);
            // From the call on: a crash before the removal commits may keep them, or not.
            obs.durable_log.split_off(&log_id.index);
        }
        fenced_write!(self, self.inner.truncate(log_id))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        check_alive!(self);
        if crate::trace_on() {
            eprintln!("purge {log_id}");
        }
        {
            let mut obs = self.obs.lock().unwrap();
            obs.durable_log = obs.durable_log.split_off(&(log_id.index + 1));
        }
        fenced_write!(self, self.inner.purge(log_id))
    }
}

/// The real state machine, fenced; with `apply_reversed` (the injected bug), the writes of
/// each batch are applied in reverse order.
#[derive(Clone)]
pub struct SimSm {
    pub inner: StateMachine,
    pub alive: Alive,
    pub apply_reversed: bool,
}

/// `--bug apply-reversed`: the batch keeps its log ids and its blank and membership entries
/// in place, but its writes trade places, first with last. The real state machine then
/// applies them in reverse order and records the right applied log id.
fn reverse_writes(entries: &mut [Entry]) -> bool {
    let at: Vec<usize> = (0..entries.len())
        .filter(|&i| matches!(entries[i].payload, EntryPayload::Normal(_)))
        .collect();
    if at.len() < 2 {
        return false;
    }
    let mut payloads: Vec<EntryPayload<TypeConfig>> = at
        .iter()
        .map(|&i| std::mem::replace(&mut entries[i].payload, EntryPayload::Blank))
        .collect();
    payloads.reverse();
    for (&i, p) in at.iter().zip(payloads) {
        entries[i].payload = p;
    }
    true
}

impl RaftStateMachine<TypeConfig> for SimSm {
    type SnapshotBuilder = SimSm;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        check_alive!(self);
        self.inner.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Replies>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        check_alive!(self);
        let mut entries: Vec<Entry> = entries.into_iter().collect();
        if self.apply_reversed {
            reverse_writes(&mut entries);
        }
        fenced_write!(self, self.inner.apply(entries))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SimSm {
            inner: self.inner.get_snapshot_builder().await,
            alive: self.alive.clone(),
            apply_reversed: self.apply_reversed,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        check_alive!(self);
        self.inner.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        check_alive!(self);
        fenced_write!(self, self.inner.install_snapshot(meta, snapshot))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        check_alive!(self);
        self.inner.get_current_snapshot().await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SimSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        check_alive!(self);
        fenced_write!(self, self.inner.build_snapshot())
    }
}
