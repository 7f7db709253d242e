//! [`LogStore`]: one partition's Raft log, vote and purge point in the node's [`RaftLog`].
//!
//! Invariants:
//! - records of the partition are contiguous from `purged + 1` to the last index;
//! - `append` returns only after the batch holding it committed durably (under
//!   `fsync: always`): openraft 0.9 answers the leader when `append` returns, so this is what
//!   keeps a follower from acknowledging an entry it could lose;
//! - at open, any record that fails its checksum is cut together with everything after it
//!   (a torn or corrupt tail); the leader sends those entries again. A record whose
//!   checksum holds but whose format is unknown (a newer replikv wrote it) is not cut: the
//!   open fails;
//! - a partition whose log was cut at damage (`damage.rs`) is *recovering* until an append
//!   reaches its high water; the append that does clears the mark in the same batch
//!   ([`Recovery`]).

use std::collections::HashMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader};
use replikv_storage::{LogOp, RaftLog};
use replikv_types::GroupId;
use tokio::sync::oneshot;

use crate::record::{decode_record, encode_record, RecordError};
use crate::{read_error, storage_error, Entry, LogId, PurgeGate, StorageError, TypeConfig, Vote};

pub(crate) const VOTE: &str = "vote";
pub(crate) const COMMITTED: &str = "committed";
/// The high water of a partition whose log was cut at damage (`damage.rs`).
pub(crate) const RECOVER_TO: &str = "recover_to";

/// Whether a log ending at `log` holds everything a log ending at `high_water` held that can
/// matter, by openraft's own order of log ids (the order its vote rule uses): the leader id
/// (term, then node id: openraft 0.9's default mode lets two leaders of one term exist, and
/// orders them), then the index. A greater leader id suffices whatever the index: that
/// leader's log held every entry committed before it, and a log with one of its entries
/// holds its log up to there.
pub(crate) fn covers(log: &LogId, high_water: &LogId) -> bool {
    log >= high_water
}

/// A replica's recovery from a damaged log (`damage.rs`): the high water its log must reach
/// again before it votes for any candidate below it or campaigns. Shared by the log store,
/// which clears it, and the node, which asks it.
#[derive(Clone, Debug, Default)]
pub struct Recovery(Arc<Mutex<Option<LogId>>>);

impl Recovery {
    /// The high water, while recovering.
    pub fn high_water(&self) -> Option<LogId> {
        *self.0.lock().expect("recovery")
    }

    /// Whether this replica may vote for a candidate whose log ends at `candidate_last`: as
    /// if it still held what it lost.
    pub fn may_vote_for(&self, candidate_last: Option<&LogId>) -> bool {
        match self.high_water() {
            None => true,
            Some(hw) => candidate_last.is_some_and(|l| covers(l, &hw)),
        }
    }
}

/// Batches whose append times are remembered, for replica lag in milliseconds.
const APPEND_CLOCK_BATCHES: usize = 4096;

/// Proposers waiting for their entry to be written to this node's log and to reach its disk,
/// by request id; and when recent entries were appended here, so a leader can tell how old a
/// replica's lag is.
#[derive(Default)]
pub struct AppendWaiters {
    /// req_id → who to tell the offset when the entry is written, and when it is durable.
    waiting: Mutex<HashMap<u64, Waiter>>,
    /// (last offset of a flushed batch, when it flushed), oldest first.
    clock: Mutex<std::collections::VecDeque<(u64, tokio::time::Instant)>>,
}

struct Waiter {
    written: Option<oneshot::Sender<u64>>,
    durable: oneshot::Sender<u64>,
}

/// The two signals of one registered request: its entry's offset once written to the log,
/// and again once that write reached the disk under the fsync policy.
pub struct AppendSignals {
    pub written: oneshot::Receiver<u64>,
    pub durable: oneshot::Receiver<u64>,
}

impl AppendWaiters {
    /// Registers request `req_id`; see [`AppendSignals`].
    pub fn register(&self, req_id: u64) -> AppendSignals {
        let (written_tx, written) = oneshot::channel();
        let (durable_tx, durable) = oneshot::channel();
        self.waiting.lock().expect("append waiters").insert(
            req_id,
            Waiter {
                written: Some(written_tx),
                durable: durable_tx,
            },
        );
        AppendSignals { written, durable }
    }

    pub fn forget(&self, req_id: u64) {
        self.waiting.lock().expect("append waiters").remove(&req_id);
    }

    /// How long ago the first entry after `offset` was appended here; `None` when no entry
    /// after `offset` has been appended since this process started.
    pub fn age_of_first_after(&self, offset: u64) -> Option<std::time::Duration> {
        let clock = self.clock.lock().expect("append clock");
        clock
            .iter()
            .find(|(last, _)| *last > offset)
            .map(|(_, t)| t.elapsed())
    }

    fn flushed(&self, last: u64) {
        let mut clock = self.clock.lock().expect("append clock");
        clock.push_back((last, tokio::time::Instant::now()));
        while clock.len() > APPEND_CLOCK_BATCHES {
            clock.pop_front();
        }
    }

    /// Tells the waiters of `entries` (req_id, offset) that the entries are written, or
    /// (`durable`) that they reached the disk, which ends the wait.
    fn appended(&self, entries: &[(u64, u64)], durable: bool) {
        let mut waiting = self.waiting.lock().expect("append waiters");
        if waiting.is_empty() {
            return;
        }
        for (req_id, index) in entries {
            if durable {
                if let Some(w) = waiting.remove(req_id) {
                    if let Some(tx) = w.written {
                        let _ = tx.send(*index);
                    }
                    let _ = w.durable.send(*index);
                }
            } else if let Some(tx) = waiting.get_mut(req_id).and_then(|w| w.written.take()) {
                let _ = tx.send(*index);
            }
        }
    }
}

#[derive(Clone)]
pub struct LogStore {
    log: RaftLog,
    group: GroupId,
    waiters: Arc<AppendWaiters>,
    /// Purges wait here for a snapshot being installed (`purge_gate.rs`).
    gate: PurgeGate,
    recovery: Recovery,
}

impl LogStore {
    /// Opens the partition's log and cuts a corrupt tail.
    pub fn open(log: RaftLog, group: GroupId, gate: PurgeGate) -> Result<LogStore, StorageError> {
        let log = LogStore {
            log,
            group,
            waiters: Arc::new(AppendWaiters::default()),
            gate,
            recovery: Recovery::default(),
        };
        log.cut_corrupt_tail()?;
        log.demote_saved_vote()?;
        let high_water: Option<LogId> = log.read_meta::<Option<LogId>>(RECOVER_TO)?.flatten();
        if let Some(hw) = high_water {
            tracing::warn!(
                group = %group,
                high_water = %hw,
                "recovering from a damaged log: votes only for candidates holding up to the \
                 high water, and no campaign, until the leader has sent it that far again"
            );
        }
        *log.recovery.0.lock().expect("recovery") = high_water;
        Ok(log)
    }

    /// This partition's recovery from a damaged log, if any (see [`Recovery`]).
    pub fn recovery(&self) -> Recovery {
        self.recovery.clone()
    }

    /// A node that led before it stopped would restart as leader: openraft 0.9 restores a
    /// committed vote of its own as leadership of the same term, with no new first entry, so
    /// its read index is only the saved commit point, which is written without waiting and
    /// may be older than writes already acknowledged. Its state machine (applied without
    /// fsync) may be older still. Keep the vote but drop its "committed" mark: the node must
    /// win a new election, whose first entry makes every read wait for all that was
    /// committed. A log with a cut tail cannot win it, so a replica with the full log leads.
    /// (Found by `replikv-chaos` `kill-all`: a primary read returned a value overwritten by
    /// a write acknowledged before every node was killed.)
    fn demote_saved_vote(&self) -> Result<(), StorageError> {
        let vote: Option<Vote> = self.read_meta(VOTE)?;
        let Some(v) = vote.filter(|v| v.committed) else {
            return Ok(());
        };
        let demoted = bincode::serialize(&Vote {
            committed: false,
            ..v
        })
        .map_err(storage_error)?;
        self.log
            .write_now(vec![self.meta_op(VOTE, demoted)])
            .map_err(storage_error)
    }

    pub fn waiters(&self) -> Arc<AppendWaiters> {
        self.waiters.clone()
    }

    fn cut_corrupt_tail(&self) -> Result<(), StorageError> {
        let records = self
            .log
            .entries(self.group, 0..u64::MAX)
            .map_err(read_error)?;
        let Some((bad, why)) = records
            .iter()
            .find_map(|(i, raw)| decode_record(raw).err().map(|e| (*i, e)))
        else {
            return Ok(());
        };
        if matches!(why, RecordError::UnknownVersion(_) | RecordError::Decode(_)) {
            // Its checksum held: this is no torn write but a format this build does not
            // read (a newer replikv wrote it). Cutting would drop committed entries.
            return Err(read_error(format!(
                "group {}: log record {bad}: {why}. It was written by a newer replikv; \
                 refusing to open the log rather than cut it (run the newer version)",
                self.group
            )));
        }
        let last = records.last().map(|(i, _)| *i).unwrap_or(bad);
        tracing::warn!(
            group = %self.group,
            first_bad = bad,
            last,
            reason = %why,
            "cutting the log tail that fails its checksum; the leader will send it again"
        );
        // The saved commit point must not lie beyond the log any more: openraft would try
        // to apply entries that are gone. Entries before the cut keep their commit status.
        let committed: Option<LogId> = self.read_meta::<Option<LogId>>(COMMITTED)?.flatten();
        let mut ops = Vec::new();
        if committed.is_some_and(|c| c.index >= bad) {
            let before = records
                .iter()
                .rev()
                .find(|(i, _)| *i < bad)
                .and_then(|(_, raw)| decode_record(raw).ok())
                .map(|e| e.log_id);
            ops.push(self.meta_op(
                COMMITTED,
                bincode::serialize(&before).map_err(storage_error)?,
            ));
        }
        // A vote this node gave itself is demoted at every open (`demote_saved_vote`).
        ops.push(LogOp::TruncateFrom {
            g: self.group,
            index: bad,
        });
        self.log.write_now(ops).map_err(storage_error)
    }

    fn meta_op(&self, name: &str, value: Vec<u8>) -> LogOp {
        LogOp::Meta {
            g: self.group,
            name: name.to_string(),
            value,
        }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StorageError> {
        let raw = self.log.meta(self.group, name);
        raw.map(|b| bincode::deserialize(&b).map_err(read_error))
            .transpose()
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        name: &'static str,
        value: &T,
        durable: bool,
    ) -> Result<(), StorageError> {
        let bytes = bincode::serialize(value).map_err(storage_error)?;
        self.log
            .write(durable, vec![self.meta_op(name, bytes)])
            .await
            .map_err(storage_error)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let records = self
            .log
            .entries(self.group, start..end)
            .map_err(read_error)?;
        records
            .into_iter()
            .map(|(i, raw)| {
                decode_record(&raw).map_err(|e| read_error(format!("log record {i}: {e}")))
            })
            .collect()
    }

    /// What a replication stream sends after `start - 1`: see [`contiguous_from`].
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let entries = self.try_get_log_entries(start..end).await?;
        Ok(contiguous_from(start, entries, |e| e.log_id.index))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = match self.log.purged(self.group) {
            Some((_, tag)) => bincode::deserialize(&tag).map_err(read_error)?,
            None => None,
        };
        let last = self.log.last(self.group).map_err(read_error)?;
        let last_log_id = match last {
            Some((i, raw)) => Some(
                decode_record(&raw)
                    .map_err(|e| read_error(format!("log record {i}: {e}")))?
                    .log_id,
            ),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote, true).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Neither durable nor awaited, on purpose: it only speeds up re-applying after a
        // restart, and the Raft core calls it on every commit; waiting here would stall the
        // core behind the log writer's fsyncs.
        let bytes = bincode::serialize(&committed).map_err(storage_error)?;
        self.log.submit(
            false,
            vec![self.meta_op(COMMITTED, bytes)],
            Box::new(|res| {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "saving the commit point failed");
                }
            }),
        );
        Ok(())
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
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let p = self.group;
        let mut records = Vec::new();
        let mut proposed = Vec::new();
        let mut last = None;
        let mut last_id = None;
        for entry in entries {
            if let EntryPayload::Normal(req) = &entry.payload {
                proposed.push((req.req_id, entry.log_id.index));
            }
            last = Some(entry.log_id.index);
            last_id = Some(entry.log_id);
            records.push(LogOp::Append {
                g: p,
                index: entry.log_id.index,
                bytes: encode_record(&entry),
            });
        }
        // Back at the high water of a recovery: this batch makes it an ordinary replica
        // again, and says so on disk in the same write.
        let recovered = match (self.recovery.high_water(), last_id) {
            (Some(hw), Some(id)) if covers(&id, &hw) => {
                let none: Option<LogId> = None;
                let bytes = bincode::serialize(&none).map_err(storage_error)?;
                records.push(self.meta_op(RECOVER_TO, bytes));
                true
            }
            _ => false,
        };
        let waiters = self.waiters.clone();
        // Written to this node's log now (the writer commits it in order); `eventual` writes
        // are acknowledged here, the others once the commit is durable.
        waiters.appended(&proposed, false);
        // Return only once the entries are durable. openraft 0.9 answers a leader's
        // AppendEntries as soon as `append` returns (it does not wait for the callback), so
        // returning earlier would let a follower acknowledge entries it could still lose, and
        // a write committed on such acknowledgements could vanish when every node crashes.
        // Concurrent appends of other partitions still share one fsync (group commit).
        let (done_tx, done_rx) = oneshot::channel();
        self.log.submit(
            true,
            records,
            Box::new(move |res| {
                let _ = done_tx.send(res);
            }),
        );
        match done_rx.await {
            Ok(Ok(())) => {
                if recovered {
                    tracing::info!(
                        group = %p,
                        "recovered from the damaged log: the leader has sent everything it held"
                    );
                    *self.recovery.0.lock().expect("recovery") = None;
                }
                if let Some(last) = last {
                    waiters.flushed(last);
                }
                waiters.appended(&proposed, true);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Ok(Err(e)) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(storage_error(e))
            }
            Err(_) => Err(storage_error("the storage writer stopped")),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let op = LogOp::TruncateFrom {
            g: self.group,
            index: log_id.index,
        };
        self.log.write(true, vec![op]).await.map_err(storage_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.gate.ready_to_purge(log_id.index).await?;
        // One record moves the purge point and drops the entries: no crash can leave one
        // without the other.
        let op = LogOp::PurgeTo {
            g: self.group,
            index: log_id.index,
            tag: bincode::serialize(&Some(log_id)).map_err(storage_error)?,
        };
        self.log.write(true, vec![op]).await.map_err(storage_error)
    }
}

/// The entries that run without a gap from `start`: nothing if `start` itself is missing.
///
/// openraft allows a log reader to leave out entries it no longer has, and sends what it gets
/// as the entries after the requested start. A replication stream that outlived its leader's
/// term (openraft 0.9 does not stop them at once) can ask for a range whose start was purged
/// meanwhile; handing it a later suffix would make it send entries after a hole, which a
/// follower still holding that old vote accepts. An empty answer is sent as a heartbeat.
/// (Found by the deterministic simulation, `sim/`, seed 432.)
pub fn contiguous_from<T>(start: u64, items: Vec<T>, index: impl Fn(&T) -> u64) -> Vec<T> {
    items
        .into_iter()
        .zip(start..)
        .take_while(|(item, expected)| index(item) == *expected)
        .map(|(item, _)| item)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::contiguous_from;

    fn run(start: u64, present: &[u64]) -> Vec<u64> {
        contiguous_from(start, present.to_vec(), |i| *i)
    }

    #[test]
    fn a_read_from_a_purged_start_returns_nothing_not_a_later_suffix() {
        assert_eq!(run(40, &[90, 91]), Vec::<u64>::new());
    }

    #[test]
    fn a_read_stops_at_the_first_gap() {
        assert_eq!(run(5, &[5, 6, 8]), vec![5, 6]);
        assert_eq!(run(5, &[]), Vec::<u64>::new());
    }
}
