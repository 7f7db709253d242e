//! [`StateMachine`]: applies committed entries of one partition to the `kv` table, keeps the
//! applied offset and membership beside them (same transaction, so they never disagree), and
//! builds and installs snapshots. [`KvView`] is the read side the front ends use.
//!
//! Applies are committed without fsync: the log already holds every applied entry durably,
//! and openraft re-applies from the log whatever a crash rolled back.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot};
use replikv_storage::{Store, WriteTx};
use replikv_types::{apply_op, KeyTable, Replies, StoredValue, WriteRequest};

use crate::snapshot::{SnapshotFile, SnapshotWriter};
use crate::PurgeGate;
use crate::{
    read_error, storage_error, Entry, LogId, Membership, SnapshotMeta, StorageError, TypeConfig,
};

const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";

#[derive(Clone)]
pub struct StateMachine {
    store: Store,
    partition: u32,
    snapshot_seq: Arc<AtomicU64>,
    /// Tells the log store when a snapshot is durable (`purge_gate.rs`).
    gate: PurgeGate,
}

impl StateMachine {
    pub fn open(store: Store, partition: u32) -> Result<StateMachine, StorageError> {
        let raw = store
            .read()
            .and_then(|r| r.snapshot_get(partition))
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
            partition,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            gate: PurgeGate::new(durable),
        })
    }

    /// The gate the partition's log store purges through.
    pub fn purge_gate(&self) -> PurgeGate {
        self.gate.clone()
    }

    pub fn view(&self) -> KvView {
        KvView {
            store: self.store.clone(),
            partition: self.partition,
        }
    }
}

/// Applies a write request's writes, in order, inside the writer's transaction.
fn apply_request(
    w: &mut WriteTx<'_>,
    p: u32,
    req: &WriteRequest,
) -> Result<Replies, replikv_storage::StorageError> {
    let mut table = PartitionTable { w, p };
    let mut replies = Vec::with_capacity(req.ops.len());
    for op in &req.ops {
        replies.push(apply_op(&mut table, op, req.now_ms)?);
    }
    Ok(Replies(replies))
}

/// Partition `p`'s keys in the writer's transaction.
struct PartitionTable<'a, 't> {
    w: &'a mut WriteTx<'t>,
    p: u32,
}

impl KeyTable for PartitionTable<'_, '_> {
    type Error = replikv_storage::StorageError;
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error> {
        self.w.kv_get(self.p, key)
    }
    fn put(&mut self, key: &[u8], encoded: &[u8]) -> Result<(), Self::Error> {
        self.w.kv_put(self.p, key, encoded)
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), Self::Error> {
        self.w.kv_delete(self.p, key).map(|_| ())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let r = self.store.read().map_err(read_error)?;
        let applied = r
            .meta_get(self.partition, APPLIED)
            .map_err(read_error)?
            .map(|b| bincode::deserialize::<Option<LogId>>(&b).map_err(read_error))
            .transpose()?
            .flatten();
        let membership = r
            .meta_get(self.partition, MEMBERSHIP)
            .map_err(read_error)?
            .map(|b| bincode::deserialize::<Membership>(&b).map_err(read_error))
            .transpose()?
            .unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Replies>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let p = self.partition;
        self.store
            .write(false, move |w| {
                let mut replies = Vec::with_capacity(entries.len());
                let mut last = None;
                for entry in &entries {
                    last = Some(entry.log_id);
                    let reply = match &entry.payload {
                        EntryPayload::Blank => Replies::default(),
                        EntryPayload::Normal(req) => apply_request(w, p, req)?,
                        EntryPayload::Membership(m) => {
                            let stored = Membership::new(Some(entry.log_id), m.clone());
                            let raw = bincode::serialize(&stored).expect("membership serialises");
                            w.meta_put(p, MEMBERSHIP, &raw)?;
                            Replies::default()
                        }
                    };
                    replies.push(reply);
                }
                if let Some(last) = last {
                    let raw = bincode::serialize(&Some(last)).expect("log id serialises");
                    w.meta_put(p, APPLIED, &raw)?;
                }
                Ok(replies)
            })
            .await
            .map_err(storage_error)
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
        // A snapshot that fails its checksum must never be installed. openraft treats this
        // error as fatal for the group, which stops it rather than serve wrong data.
        let file = SnapshotFile::decode(&raw).map_err(|e| {
            tracing::error!(partition = self.partition, error = %e, "refusing a corrupt snapshot");
            self.gate.snapshot_durable(None);
            storage_error(e)
        })?;
        let p = self.partition;
        let applied = bincode::serialize(&meta.last_log_id).expect("log id serialises");
        let membership = bincode::serialize(&meta.last_membership).expect("membership serialises");
        let pairs = file.pairs;
        tracing::info!(partition = p, keys = pairs.len(), last = ?meta.last_log_id, "installing snapshot");
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
            .and_then(|r| r.snapshot_get(self.partition))
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
        let p = self.partition;
        let r = self.store.read().map_err(read_error)?;
        // Applied offset, membership and keys come from one read transaction: they agree.
        let last_log_id = r
            .meta_get(p, APPLIED)
            .map_err(read_error)?
            .map(|b| bincode::deserialize::<Option<LogId>>(&b).map_err(read_error))
            .transpose()?
            .flatten();
        let last_membership = r
            .meta_get(p, MEMBERSHIP)
            .map_err(read_error)?
            .map(|b| bincode::deserialize::<Membership>(&b).map_err(read_error))
            .transpose()?
            .unwrap_or_default();
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
        tracing::info!(partition = p, bytes = raw.len(), last = ?meta.last_log_id, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(raw)),
        })
    }
}

/// Read access to one partition's keys, outside the Raft core.
#[derive(Clone)]
pub struct KvView {
    store: Store,
    partition: u32,
}

impl KvView {
    /// The live value of `key` at `now_ms`.
    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<StoredValue>, String> {
        let raw = self
            .store
            .kv_get_latest(self.partition, key)
            .map_err(|e| e.to_string())?;
        Ok(raw
            .and_then(|r| StoredValue::decode(&r))
            .filter(|v| v.is_live(now_ms)))
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
        let r = self.store.read().map_err(|e| e.to_string())?;
        let mut keys = Vec::new();
        let mut next = None;
        r.kv_for_each(self.partition, start, |k, v| {
            if keys.len() >= limit {
                next = Some(k.to_vec());
                return false;
            }
            let live = StoredValue::decode(v).is_some_and(|v| v.is_live(now_ms));
            if live && keep(k) {
                keys.push(Bytes::copy_from_slice(k));
            }
            true
        })
        .map_err(|e| e.to_string())?;
        Ok((keys, next))
    }

    /// A digest of the partition's contents (keys and raw values), for convergence checks.
    pub fn digest(&self) -> Result<(u64, u32), String> {
        let r = self.store.read().map_err(|e| e.to_string())?;
        let mut count = 0u64;
        let mut crc = 0u32;
        r.kv_for_each(self.partition, b"", |k, v| {
            count += 1;
            crc = crc32c::crc32c_append(crc, k);
            crc = crc32c::crc32c_append(crc, v);
            true
        })
        .map_err(|e| e.to_string())?;
        Ok((count, crc))
    }
}
