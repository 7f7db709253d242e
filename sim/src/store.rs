//! SIMULATION STAND-IN: an in-memory log store and state machine implementing openraft 0.9's
//! storage-v2 traits for replikv's `TypeConfig`.
//!
//! replikv's real `LogStore`/`StateMachine` (crates/replikv-raft) sit on `replikv_storage::Store`,
//! which runs redb behind OS writer threads on files; that cannot run deterministically inside
//! one current-thread runtime without the product changes of docs/design/simulation.md stage 1
//! (writer as a task, in-memory redb backend), which are out of scope here. So this module
//! models them:
//! - the log store acknowledges an append only once it is in `Disk` (what survives a crash);
//! - the state machine applies entries with replikv's own `apply_one` (replikv-types), and
//!   MSET/DEL exactly as `replikv-raft/src/state_machine.rs::apply_request` does (a copy:
//!   that function is private);
//! - the state machine is *not* durable, as in replikv (applies are not fsynced): a restarted
//!   node starts from its last snapshot and openraft re-applies the log.
//!
//! Injected bugs (`--bug`): `lost-append` makes the log store acknowledge appends it then loses
//! on a crash; `apply-reversed` makes the state machine apply each batch in reverse order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
};
use replikv_raft::{Entry, LogId, Membership, SnapshotMeta, StorageError, TypeConfig, Vote};
use replikv_types::{apply_op, KeyTable, Replies, Reply, WriteRequest};
use std::convert::Infallible;

/// How many acknowledged-but-unflushed trailing entries `Bug::LostAppend` loses on a crash.
pub const LOST_TAIL: u64 = 8;

/// What one node keeps across a crash (its "disk").
#[derive(Default)]
pub struct Disk {
    pub vote: Option<Vote>,
    /// Every leader id `(term, node)` this node ever saved a vote for (for election safety).
    pub vote_history: BTreeSet<(u64, u64)>,
    pub log: BTreeMap<u64, Entry>,
    pub purged: Option<LogId>,
    pub committed: Option<LogId>,
    /// Lowest log index changed since the checker last looked (u64::MAX: none).
    pub recheck_from: u64,
    /// Entries this node declared committed (through `save_committed`) that the checker has
    /// not read yet: openraft can commit, apply, snapshot and purge them within one step.
    pub journal: Vec<Entry>,
    /// The last snapshot this node built or installed: (meta, serialized kv).
    pub snapshot: Option<(SnapshotMeta, Vec<u8>)>,
}

impl Disk {
    pub fn new() -> Disk {
        Disk {
            recheck_from: u64::MAX,
            ..Default::default()
        }
    }

    /// A crash. With the injected bug, the last `LOST_TAIL` entries (already acknowledged to
    /// openraft as durable) vanish.
    pub fn crash(&mut self, lost_append_bug: bool) {
        if !lost_append_bug {
            return;
        }
        let Some((&last, _)) = self.log.iter().next_back() else {
            return;
        };
        let from = last.saturating_sub(LOST_TAIL - 1).max(1);
        let floor = self.purged.map(|p| p.index + 1).unwrap_or(0);
        let from = from.max(floor);
        self.log.retain(|&i, _| i < from);
        self.recheck_from = self.recheck_from.min(from);
        // The commit point cannot stay beyond the log (openraft would try to re-apply entries
        // that are gone); the bug is that the entries are gone, not this.
        if let Some(c) = self.committed {
            if c.index >= from {
                self.committed = self
                    .log
                    .get(&(from - 1))
                    .map(|e| e.log_id)
                    .or(self.purged)
                    .filter(|l| l.index < from);
            }
        }
    }
}

pub type SharedDisk = Arc<Mutex<Disk>>;

/// One incarnation of a node: false once it crashed. A crashed process's tasks die with it;
/// here openraft's tasks of a shut-down `Raft` (replication streams, the state-machine
/// worker) may still be scheduled, so every storage call of a dead incarnation fails instead
/// of touching the disk the restarted node now owns.
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

#[derive(Clone)]
pub struct SimLog {
    pub disk: SharedDisk,
    pub alive: Alive,
}

impl RaftLogReader<TypeConfig> for SimLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        check_alive!(self);
        let d = self.disk.lock().unwrap();
        let v: Vec<Entry> = d.log.range(range.clone()).map(|(_, e)| e.clone()).collect();
        if crate::trace_on() {
            eprintln!(
                "read {:?} -> {:?}..{:?} purged {:?}",
                range,
                v.first().map(|e| e.log_id.index),
                v.last().map(|e| e.log_id.index),
                d.purged.map(|p| p.index)
            );
        }
        Ok(v)
    }

    /// As replikv's `LogStore`: a replication stream gets only the entries that run without a
    /// gap from `start` (nothing if `start` was purged), never a later suffix.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let entries = self.try_get_log_entries(start..end).await?;
        Ok(replikv_raft::contiguous_from(start, entries, |e| {
            e.log_id.index
        }))
    }
}

impl RaftLogStorage<TypeConfig> for SimLog {
    type LogReader = SimLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        check_alive!(self);
        let d = self.disk.lock().unwrap();
        let last = d.log.iter().next_back().map(|(_, e)| e.log_id).or(d.purged);
        Ok(LogState {
            last_purged_log_id: d.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        check_alive!(self);
        let mut d = self.disk.lock().unwrap();
        d.vote = Some(*vote);
        d.vote_history
            .insert((vote.leader_id.term, vote.leader_id.node_id));
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        check_alive!(self);
        Ok(self.disk.lock().unwrap().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        check_alive!(self);
        let mut d = self.disk.lock().unwrap();
        if let Some(upto) = committed {
            let prev = d.committed.map(|c| c.index).unwrap_or(0);
            let lo = prev.min(upto.index) + 1;
            let newly: Vec<Entry> = d
                .log
                .range(lo..=upto.index)
                .map(|(_, e)| e.clone())
                .collect();
            d.journal.extend(newly);
        }
        d.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        check_alive!(self);
        Ok(self.disk.lock().unwrap().committed)
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
        {
            let mut d = self.disk.lock().unwrap();
            for e in entries {
                let i = e.log_id.index;
                d.recheck_from = d.recheck_from.min(i);
                d.log.insert(i, e);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        check_alive!(self);
        let mut d = self.disk.lock().unwrap();
        d.log.retain(|&i, _| i < log_id.index);
        d.recheck_from = d.recheck_from.min(log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        check_alive!(self);
        if crate::trace_on() {
            eprintln!("purge {}", log_id);
        }
        let mut d = self.disk.lock().unwrap();
        d.log.retain(|&i, _| i > log_id.index);
        d.purged = Some(log_id);
        Ok(())
    }
}

/// The state machine's contents (volatile: lost on a crash, rebuilt from the snapshot + log).
#[derive(Default, Clone)]
pub struct SmState {
    pub applied: Option<LogId>,
    pub membership: Membership,
    /// key → `StoredValue::encode()`, as replikv's `kv` table holds it.
    pub kv: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl SmState {
    /// Rebuilds the state from a snapshot (or empty).
    pub fn from_snapshot(snap: Option<&(SnapshotMeta, Vec<u8>)>) -> SmState {
        match snap {
            None => SmState::default(),
            Some((meta, raw)) => SmState {
                applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                kv: bincode::deserialize(raw).expect("snapshot decodes"),
            },
        }
    }

    pub fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.kv.hash(&mut h);
        h.finish()
    }

    /// replikv-raft's `apply_request`: the same `apply_op`, over a BTreeMap instead of a
    /// redb write transaction.
    fn apply_request(&mut self, req: &WriteRequest) -> Replies {
        let applied: Result<Vec<Reply>, Infallible> = req
            .ops
            .iter()
            .map(|op| apply_op(self, op, req.now_ms))
            .collect();
        Replies(applied.unwrap_or_else(|never| match never {}))
    }
}

impl KeyTable for SmState {
    type Error = Infallible;
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Infallible> {
        Ok(self.kv.get(key).cloned())
    }
    fn put(&mut self, key: &[u8], encoded: &[u8]) -> Result<(), Infallible> {
        self.kv.insert(key.to_vec(), encoded.to_vec());
        Ok(())
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), Infallible> {
        self.kv.remove(key);
        Ok(())
    }
}

#[derive(Clone)]
pub struct SimSm {
    pub state: Arc<Mutex<SmState>>,
    pub disk: SharedDisk,
    pub snapshot_seq: Arc<Mutex<u64>>,
    pub alive: Alive,
    /// Injected bug (`--bug apply-reversed`): apply each batch in reverse order.
    pub apply_reversed: bool,
}

impl RaftStateMachine<TypeConfig> for SimSm {
    type SnapshotBuilder = SimSm;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        check_alive!(self);
        let s = self.state.lock().unwrap();
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Replies>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        check_alive!(self);
        let mut entries: Vec<Entry> = entries.into_iter().collect();
        let reversed = self.apply_reversed && entries.len() > 1;
        if reversed {
            entries.reverse();
        }
        let mut s = self.state.lock().unwrap();
        let mut replies = Vec::new();
        let last = entries.iter().map(|e| e.log_id).max_by_key(|l| l.index);
        for entry in entries {
            let reply = match &entry.payload {
                EntryPayload::Blank => Replies::default(),
                EntryPayload::Normal(req) => s.apply_request(req),
                EntryPayload::Membership(m) => {
                    s.membership = Membership::new(Some(entry.log_id), m.clone());
                    Replies::default()
                }
            };
            s.applied = Some(entry.log_id);
            replies.push(reply);
        }
        if reversed {
            s.applied = last;
            replies.reverse();
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        check_alive!(self);
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        check_alive!(self);
        let raw = snapshot.into_inner();
        let snap = (meta.clone(), raw);
        *self.state.lock().unwrap() = SmState::from_snapshot(Some(&snap));
        self.disk.lock().unwrap().snapshot = Some(snap);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        check_alive!(self);
        let d = self.disk.lock().unwrap();
        Ok(d.snapshot.as_ref().map(|(meta, raw)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(raw.clone())),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SimSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        check_alive!(self);
        let (applied, membership, raw) = {
            let s = self.state.lock().unwrap();
            (
                s.applied,
                s.membership.clone(),
                bincode::serialize(&s.kv).expect("kv serializes"),
            )
        };
        let seq = {
            let mut q = self.snapshot_seq.lock().unwrap();
            *q += 1;
            *q
        };
        let snapshot_id = match applied {
            Some(id) => format!(
                "{}-{}-{}-{seq}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => format!("0-0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        self.disk.lock().unwrap().snapshot = Some((meta.clone(), raw.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(raw)),
        })
    }
}
