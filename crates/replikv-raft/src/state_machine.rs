//! [`StateMachine`]: applies committed entries of one partition into its [`Overlay`], which
//! checkpoints them into the `kv` table in large batches with the applied offset and
//! membership beside them (same transaction, so they never disagree), and builds and installs
//! snapshots. [`KvView`] is the read side the front ends use: the overlay over the file.
//!
//! Checkpoints are committed without fsync: the log already holds every applied entry
//! durably, and openraft re-applies from the log whatever a crash (or a checkpoint not yet
//! taken) left out of the file.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot};
use replikv_storage::{Store, WriteTx};
use replikv_types::{apply_op, GroupId, KeyTable, KvOp, Replies, StoredValue};

use crate::overlay::{merge_for_each, CheckpointLimits, Layer, Layers, Overlay};
use crate::snapshot::{SnapshotFile, SnapshotWriter};
use crate::PurgeGate;
use crate::{
    read_error, storage_error, Entry, LogId, Membership, SnapshotMeta, StorageError, TypeConfig,
};

pub(crate) const APPLIED: &str = "applied";
pub(crate) const MEMBERSHIP: &str = "membership";

#[derive(Clone)]
pub struct StateMachine {
    store: Store,
    group: GroupId,
    snapshot_seq: Arc<AtomicU64>,
    /// Tells the log store when a snapshot is durable (`purge_gate.rs`).
    gate: PurgeGate,
    /// Applied writes not yet checkpointed into the file (`overlay.rs`).
    overlay: Arc<Overlay>,
    limits: CheckpointLimits,
    /// Values with an expiry put by applies since this process opened the partition: the
    /// leader's expiry sweep idles while it stays unchanged and nothing it saw is due.
    expiring_puts: Arc<AtomicU64>,
}

impl StateMachine {
    pub fn open(store: Store, group: GroupId) -> Result<StateMachine, StorageError> {
        let raw = store
            .read()
            .and_then(|r| r.snapshot_get(group))
            .map_err(read_error)?;
        let durable = match raw {
            Some(raw) => SnapshotFile::decode_meta(&raw)
                .map_err(read_error)?
                .last_log_id
                .map(|l| l.index),
            None => None,
        };
        Ok(StateMachine {
            store,
            group,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            gate: PurgeGate::new(durable),
            overlay: Arc::default(),
            limits: CheckpointLimits::default(),
            expiring_puts: Arc::default(),
        })
    }

    /// The same state machine, checkpointing its applies at `limits` instead of the default.
    pub fn with_checkpoint_limits(mut self, limits: CheckpointLimits) -> StateMachine {
        self.limits = limits;
        self
    }

    /// The gate the partition's log store purges through.
    pub fn purge_gate(&self) -> PurgeGate {
        self.gate.clone()
    }

    pub fn view(&self) -> KvView {
        KvView {
            store: self.store.clone(),
            group: self.group,
            overlay: self.overlay.clone(),
            expiring_puts: self.expiring_puts.clone(),
        }
    }

    /// Freezes the overlay's active layer, if it holds anything, and queues its checkpoint;
    /// does not wait for it.
    fn checkpoint(&self) {
        let Some(layer) = self.overlay.freeze() else {
            return;
        };
        let p = self.group;
        let (written, check, overlay) = (layer.clone(), self.overlay.clone(), self.overlay.clone());
        self.store.submit(
            false,
            Box::new(move |w| {
                if check.failure().is_some() {
                    return Ok(());
                }
                write_layer(w, p, &written)
            }),
            Box::new(move |res| overlay.landed(&layer, res.map_err(|e| e.0))),
        );
    }

    /// Checkpoints everything applied so far and waits until the file holds it.
    async fn checkpoint_all(&self) -> Result<(), StorageError> {
        self.checkpoint();
        self.frozen_landed().await
    }

    /// Waits until every layer frozen so far has landed.
    async fn frozen_landed(&self) -> Result<(), StorageError> {
        // The writer commits jobs in order and answers a batch's jobs in order: once this
        // empty job is answered, every layer frozen before it has landed.
        self.store
            .write(false, |_| Ok(()))
            .await
            .map_err(storage_error)?;
        self.failed()
    }

    fn failed(&self) -> Result<(), StorageError> {
        match self.overlay.failure() {
            Some(e) => Err(storage_error(format!(
                "group {}: a checkpoint of applied writes failed: {e}",
                self.group
            ))),
            None => Ok(()),
        }
    }

    /// The applied offset in the file.
    pub(crate) fn applied_in_file(&self) -> Result<Option<LogId>, StorageError> {
        Ok(self.file_applied()?.0)
    }

    /// The applied offset and membership in the file.
    fn file_applied(&self) -> Result<(Option<LogId>, Membership), StorageError> {
        let r = self.store.read().map_err(read_error)?;
        file_applied(&r, self.group)
    }
}

fn file_applied(
    r: &replikv_storage::ReadTx,
    p: GroupId,
) -> Result<(Option<LogId>, Membership), StorageError> {
    let applied = r
        .meta_get(p, APPLIED)
        .map_err(read_error)?
        .map(|b| bincode::deserialize::<Option<LogId>>(&b).map_err(read_error))
        .transpose()?
        .flatten();
    let membership = r
        .meta_get(p, MEMBERSHIP)
        .map_err(read_error)?
        .map(|b| bincode::deserialize::<Membership>(&b).map_err(read_error))
        .transpose()?
        .unwrap_or_default();
    Ok((applied, membership))
}

/// A frozen layer's keys, offset and membership, in the writer's transaction.
fn write_layer(
    w: &mut WriteTx<'_>,
    p: GroupId,
    layer: &Layer,
) -> Result<(), replikv_storage::StorageError> {
    for (k, v) in &layer.keys {
        match v {
            Some(v) => w.kv_put(p, k, v)?,
            None => {
                w.kv_delete(p, k)?;
            }
        }
    }
    if let Some(m) = &layer.membership {
        w.meta_put(
            p,
            MEMBERSHIP,
            &bincode::serialize(m).expect("membership serialises"),
        )?;
    }
    if let Some(last) = layer.applied {
        let raw = bincode::serialize(&Some(last)).expect("log id serialises");
        w.meta_put(p, APPLIED, &raw)?;
    }
    Ok(())
}

/// Applies a write request's writes, in order.
fn apply_request<T: KeyTable>(
    table: &mut T,
    ops: &[KvOp],
    now_ms: u64,
) -> Result<Replies, T::Error> {
    let mut replies = Vec::with_capacity(ops.len());
    for op in ops {
        replies.push(apply_op(table, op, now_ms)?);
    }
    Ok(Replies(replies))
}

/// Partition `p`'s keys as an apply sees them: the overlay's active layer takes the writes,
/// reads fall through the layers to the file.
struct OverlayTable<'a> {
    layers: &'a mut Layers,
    store: &'a Store,
    p: GroupId,
    expiring_puts: &'a AtomicU64,
}

impl KeyTable for OverlayTable<'_> {
    type Error = replikv_storage::StorageError;
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error> {
        match self.layers.lookup(key) {
            Some(v) => Ok(v.map(<[u8]>::to_vec)),
            None => self.store.kv_get_latest(self.p, key),
        }
    }
    fn put(&mut self, key: &[u8], encoded: &[u8]) -> Result<(), Self::Error> {
        if StoredValue::decode_expiry(encoded).is_some_and(|at| at.is_some()) {
            self.expiring_puts.fetch_add(1, Ordering::Relaxed);
        }
        self.layers.active.set(key, Some(encoded));
        Ok(())
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), Self::Error> {
        self.layers.active.set(key, None);
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        // The overlay's layers are newer than the file; at start-up they are empty.
        let (applied, membership) = self.overlay.applied();
        match (applied, membership) {
            (Some(a), Some(m)) => Ok((Some(a), m)),
            (Some(a), None) => Ok((Some(a), self.file_applied()?.1)),
            (None, _) => self.file_applied(),
        }
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Replies>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.failed()?;
        let entries = entries.into_iter();
        let mut replies = Vec::with_capacity(entries.size_hint().0);
        let mut full = false;
        for entry in entries {
            // Decoded before the lock is taken: readers wait only for the evaluation.
            let ops = match &entry.payload {
                EntryPayload::Normal(req) => req
                    .ops
                    .decode()
                    .map_err(|e| storage_error(format!("log entry {}: {e}", entry.log_id)))?,
                _ => Vec::new(),
            };
            // One entry at a time under the lock: readers see each entry whole, and wait for
            // no more than one.
            let mut layers = self.overlay.write();
            let reply = match &entry.payload {
                EntryPayload::Blank => Replies::default(),
                EntryPayload::Normal(req) => {
                    let mut table = OverlayTable {
                        layers: &mut layers,
                        store: &self.store,
                        p: self.group,
                        expiring_puts: &self.expiring_puts,
                    };
                    apply_request(&mut table, &ops, req.now_ms).map_err(storage_error)?
                }
                EntryPayload::Membership(m) => {
                    layers.active.membership = Some(Membership::new(Some(entry.log_id), m.clone()));
                    Replies::default()
                }
            };
            layers.active.applied = Some(entry.log_id);
            full = Overlay::is_full(&layers, self.limits);
            drop(layers);
            replies.push(reply);
        }
        if full {
            // One layer at a time waits for the writer: when applies outrun checkpoints
            // (a replica catching up), they wait here, so the overlay holds at most two
            // layers, as before the overlay they waited for every commit.
            if self.overlay.frozen() > 0 {
                self.frozen_landed().await?;
            }
            self.checkpoint();
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        self.gate.receiving();
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let raw = snapshot.into_inner();
        // What was applied before lands first, so that no layer of it outlives the install.
        self.checkpoint_all().await?;
        // A snapshot that fails its checksum must never be installed. openraft treats this
        // error as fatal for the group, which stops it rather than serve wrong data.
        let file = SnapshotFile::decode(&raw).map_err(|e| {
            tracing::error!(group = %self.group, error = %e, "refusing a corrupt snapshot");
            self.gate.snapshot_durable(None);
            storage_error(e)
        })?;
        let p = self.group;
        let applied = bincode::serialize(&meta.last_log_id).expect("log id serialises");
        let membership = bincode::serialize(&meta.last_membership).expect("membership serialises");
        let pairs = file.pairs;
        tracing::info!(group = %p, keys = pairs.len(), last = ?meta.last_log_id, "installing snapshot");
        let result = self
            .store
            .write(true, move |w| {
                w.kv_clear(p)?;
                for (k, v) in &pairs {
                    w.kv_put(p, k, v)?;
                }
                w.meta_put(p, APPLIED, &applied)?;
                w.meta_put(p, MEMBERSHIP, &membership)?;
                w.snapshot_put(p, &raw)
            })
            .await
            .map_err(storage_error);
        self.gate.snapshot_durable(
            result
                .is_ok()
                .then(|| meta.last_log_id.map_or(0, |l| l.index)),
        );
        result
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let raw = self
            .store
            .read()
            .and_then(|r| r.snapshot_get(self.group))
            .map_err(read_error)?;
        let Some(raw) = raw else { return Ok(None) };
        let meta = SnapshotFile::decode_meta(&raw).map_err(read_error)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(raw)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let p = self.group;
        // The snapshot is read from the file, so the file must hold what was applied.
        self.checkpoint_all().await?;
        let r = self.store.read().map_err(read_error)?;
        // Applied offset, membership and keys come from one read transaction: they agree.
        let (last_log_id, last_membership) = file_applied(&r, p)?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(id) => format!(
                "{}-{}-{}-{seq}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => format!("0-0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let mut writer = SnapshotWriter::new(&meta);
        r.kv_for_each(p, b"", |k, v| {
            writer.push(k, v);
            true
        })
        .map_err(read_error)?;
        drop(r);
        let raw = writer.finish();
        let stored = raw.clone();
        self.store
            .write(true, move |w| w.snapshot_put(p, &stored))
            .await
            .map_err(storage_error)?;
        // Durable, and every earlier apply with it.
        if let Some(l) = meta.last_log_id {
            self.gate.snapshot_durable(Some(l.index));
        }
        tracing::info!(group = %p, bytes = raw.len(), last = ?meta.last_log_id, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(raw)),
        })
    }
}

/// Read access to one partition's keys, outside the Raft core: its overlay over the file.
#[derive(Clone)]
pub struct KvView {
    store: Store,
    group: GroupId,
    overlay: Arc<Overlay>,
    expiring_puts: Arc<AtomicU64>,
}

/// One page of a partition's keys looked over for expiry ([`KvView::expired`]).
#[derive(Debug, Default, PartialEq)]
pub struct ExpiryPage {
    /// Keys whose expiry is at or before the time asked about.
    pub expired: Vec<Bytes>,
    /// The earliest expiry still ahead among the keys looked at.
    pub next_due_ms: Option<u64>,
    /// The key to go on from; `None` at the end of the partition.
    pub resume: Option<Vec<u8>>,
}

impl KvView {
    /// The live value of `key` at `now_ms`.
    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<StoredValue>, String> {
        // A key no layer holds was last written by a checkpoint that has landed (a layer
        // leaves only then), so the file read after this has it.
        // Decoded under the lock: one copy of a value the overlay holds, not two.
        let layered = self
            .overlay
            .read()
            .lookup(key)
            .map(|v| v.and_then(StoredValue::decode));
        let value = match layered {
            Some(value) => value,
            None => self
                .store
                .kv_get_latest(self.group, key)
                .map_err(|e| e.to_string())?
                .and_then(|r| StoredValue::decode(&r)),
        };
        Ok(value.filter(|v| v.is_live(now_ms)))
    }

    /// Calls `f` for every key of the partition from `start` in key order, with its raw
    /// value, until `f` returns false: the overlay merged over one read of the file, taking
    /// at most `max` keys from each overlay layer. Returns the last entry applied in the
    /// state it read, and the key to resume from when it stopped at that cut before `f`
    /// asked to stop.
    fn for_each(
        &self,
        start: &[u8],
        max: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(Option<LogId>, Option<Vec<u8>>), String> {
        let (changes, bound, layered, read) =
            self.overlay.changes_from(start, max, || self.store.read());
        let r = read.map_err(|e| e.to_string())?;
        let applied = match layered {
            Some(a) => Some(a),
            None => file_applied(&r, self.group).map_err(|e| e.to_string())?.0,
        };
        // Whether `f` asked to stop; if it did not, a cut in the overlay is where to resume
        // (whether the file reached it or ended before it).
        let mut stopped = false;
        merge_for_each(
            &changes,
            |each| r.kv_for_each(self.group, start, each),
            |k, v| {
                if bound.as_ref().is_some_and(|b| k >= b.as_slice()) {
                    return false;
                }
                stopped = !f(k, v);
                !stopped
            },
        )
        .map_err(|e| e.to_string())?;
        let resume = if stopped { None } else { bound };
        Ok((applied, resume))
    }

    /// Calls `f` for every key of the partition in key order, with its raw value (expired
    /// ones included), and returns the last entry applied in that state: what a checker
    /// compares between replicas.
    pub fn contents(&self, f: impl FnMut(&[u8], &[u8]) -> bool) -> Result<Option<LogId>, String> {
        Ok(self.for_each(b"", usize::MAX, f)?.0)
    }

    /// Live keys from `start` in key order, at most `limit`, for which `keep` holds; also
    /// returns the key to resume from, if any.
    pub fn scan(
        &self,
        start: &[u8],
        limit: usize,
        now_ms: u64,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<(Vec<Bytes>, Option<Vec<u8>>), String> {
        let mut keys = Vec::new();
        let mut next = None;
        // The page visits at most about `limit` overlay keys per layer (plus one to see
        // the key after the page), as it visits at most about `limit` of the file's.
        let (_, resume) = self.for_each(start, limit.saturating_add(1), |k, v| {
            if keys.len() >= limit {
                next = Some(k.to_vec());
                return false;
            }
            let live = StoredValue::decode(v).is_some_and(|v| v.is_live(now_ms));
            if live && keep(k) {
                keys.push(Bytes::copy_from_slice(k));
            }
            true
        })?;
        Ok((keys, next.or(resume)))
    }

    /// Looks at up to `visit` keys from `start` in key order and returns those whose stored
    /// expiry is at or before `now_ms` (at most `visit` of them, so a page's memory is
    /// bounded by what it visits), with where to go on.
    pub fn expired(&self, start: &[u8], visit: usize, now_ms: u64) -> Result<ExpiryPage, String> {
        let mut page = ExpiryPage::default();
        let mut seen = 0;
        let mut next = None;
        let (_, resume) = self.for_each(start, visit.saturating_add(1), |k, v| {
            if seen >= visit {
                next = Some(k.to_vec());
                return false;
            }
            seen += 1;
            if let Some(Some(at)) = StoredValue::decode_expiry(v) {
                if at <= now_ms {
                    page.expired.push(Bytes::copy_from_slice(k));
                } else {
                    page.next_due_ms = Some(page.next_due_ms.map_or(at, |d| d.min(at)));
                }
            }
            true
        })?;
        page.resume = next.or(resume);
        Ok(page)
    }

    /// Values with an expiry that applies have put since the partition opened (a change
    /// says new keys may expire; see the leader's sweep).
    pub fn expiring_puts(&self) -> u64 {
        self.expiring_puts.load(Ordering::Relaxed)
    }

    /// A digest of the partition's contents (keys and raw values), for convergence checks.
    pub fn digest(&self) -> Result<(u64, u32), String> {
        let mut count = 0u64;
        let mut crc = 0u32;
        self.contents(|k, v| {
            count += 1;
            crc = crc32c::crc32c_append(crc, k);
            crc = crc32c::crc32c_append(crc, v);
            true
        })?;
        Ok((count, crc))
    }
}
