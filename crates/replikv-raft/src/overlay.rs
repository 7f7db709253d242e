//! [`Overlay`]: a partition's applied writes, held in memory until a checkpoint commits them
//! to the state file in one large transaction.
//!
//! An apply into redb rewrote every B-tree page it touched and paid a commit per batch of
//! entries: the largest storage cost of a write (docs/BENCHMARKS.md). Applies now go into the
//! overlay's *active* layer. When it grows past [`CheckpointLimits`] (or a snapshot or an
//! install needs the file current) the active layer is *frozen* and handed to the store's
//! writer; it leaves the overlay once its commit has landed. Readers look in the active
//! layer, then the frozen ones newest first, then the file.
//!
//! Crash safety is the log's, as before: a checkpoint writes the applied offset in the same
//! transaction as the keys, so the file's offset never claims a key it does not hold, and
//! openraft re-applies from the log whatever a crash (or a checkpoint not yet taken) left
//! out. The log is purged only below a durable snapshot, and a snapshot is built from the
//! file after a checkpoint of everything applied.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use crate::{LogId, Membership};

/// Applied values by key; `None` is a delete.
pub(crate) type Changes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// When the active layer is checkpointed.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointLimits {
    /// Distinct keys changed since the last checkpoint.
    pub keys: usize,
    /// Bytes of keys and values changed since the last checkpoint (an upper bound: an
    /// overwrite counts again).
    pub bytes: usize,
}

impl Default for CheckpointLimits {
    /// 8,192 keys or 4 MiB per partition: large enough that a checkpoint rewrites each
    /// B-tree page it touches once for many keys, small enough that the overlays of a
    /// node's partitions stay within tens of MiB and a restart re-applies little.
    fn default() -> Self {
        CheckpointLimits {
            keys: 8_192,
            bytes: 4 << 20,
        }
    }
}

/// What one layer holds: the keys it changed and the offset and membership it reached.
#[derive(Default)]
pub(crate) struct Layer {
    pub keys: Changes,
    pub bytes: usize,
    /// The last entry applied into this layer.
    pub applied: Option<LogId>,
    /// The membership the layer's entries set, if any did.
    pub membership: Option<Membership>,
}

impl Layer {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.applied.is_none() && self.membership.is_none()
    }

    pub fn set(&mut self, key: &[u8], value: Option<&[u8]>) {
        self.bytes += key.len() + value.map_or(0, <[u8]>::len) + 48;
        self.keys.insert(key.to_vec(), value.map(<[u8]>::to_vec));
    }
}

#[derive(Default)]
pub(crate) struct Layers {
    pub active: Layer,
    /// Handed to the writer, oldest first; each leaves when its commit has landed.
    frozen: VecDeque<Arc<Layer>>,
}

impl Layers {
    /// The overlay's value of `key`: `None` when no layer has it (the file decides),
    /// `Some(None)` when the newest layer that has it deleted it.
    pub fn lookup(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        std::iter::once(&self.active)
            .chain(self.frozen.iter().rev().map(|l| &**l))
            .find_map(|l| l.keys.get(key))
            .map(|v| v.as_deref())
    }

    /// The newest applied offset and membership in any layer.
    fn applied(&self) -> (Option<LogId>, Option<Membership>) {
        let layers = || std::iter::once(&self.active).chain(self.frozen.iter().rev().map(|l| &**l));
        (
            layers().find_map(|l| l.applied),
            layers().find_map(|l| l.membership.clone()),
        )
    }
}

/// One partition's overlay, shared by its state machine, its snapshot builder and its
/// readers.
#[derive(Default)]
pub(crate) struct Overlay {
    layers: RwLock<Layers>,
    /// Why a checkpoint failed. From then on no checkpoint of this partition writes
    /// anything (a later one would record an offset past the keys the failed one lost),
    /// its layers stay readable, and the next apply returns the error: the group stops.
    failed: Mutex<Option<String>>,
}

impl Overlay {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Layers> {
        self.layers.read().expect("overlay lock")
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, Layers> {
        self.layers.write().expect("overlay lock")
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("overlay failure").clone()
    }

    /// The newest applied offset and membership the layers hold.
    pub fn applied(&self) -> (Option<LogId>, Option<Membership>) {
        self.read().applied()
    }

    /// How many frozen layers wait for their checkpoint to land.
    pub fn frozen(&self) -> usize {
        self.read().frozen.len()
    }

    /// Whether the active layer has reached `limits`.
    pub fn is_full(layers: &Layers, limits: CheckpointLimits) -> bool {
        layers.active.keys.len() >= limits.keys || layers.active.bytes >= limits.bytes
    }

    /// Freezes the active layer, unless it is empty, and returns it for the writer.
    pub fn freeze(&self) -> Option<Arc<Layer>> {
        let mut layers = self.write();
        if layers.active.is_empty() {
            return None;
        }
        let layer = Arc::new(std::mem::take(&mut layers.active));
        layers.frozen.push_back(layer.clone());
        Some(layer)
    }

    /// A frozen layer's commit has landed (or failed): the file now answers for its keys.
    pub fn landed(&self, layer: &Arc<Layer>, result: Result<(), String>) {
        let mut failed = self.failed.lock().expect("overlay failure");
        if let Err(e) = result {
            failed.get_or_insert(e);
        }
        if failed.is_none() {
            self.write().frozen.retain(|l| !Arc::ptr_eq(l, layer));
        }
    }

    /// The changes from `start` on (newest value per key), the newest applied offset in the
    /// layers, and `open()`'s result, taken while no layer can leave the overlay: together
    /// they are one consistent state. At most `max` keys are taken from each layer, so a
    /// page of a scan costs what the page needs, not the whole overlay: when a layer has
    /// more, the changes stop short of the first key not taken (returned as the bound), and
    /// a reader must stop there too.
    pub fn changes_from<R>(
        &self,
        start: &[u8],
        max: usize,
        open: impl FnOnce() -> R,
    ) -> (Changes, Option<Vec<u8>>, Option<LogId>, R) {
        let layers = self.read();
        let mut changes = Changes::new();
        let mut bound: Option<Vec<u8>> = None;
        // Oldest first: a newer layer's value replaces an older one's.
        for layer in layers.frozen.iter().map(|l| &**l).chain([&layers.active]) {
            let mut range = layer.keys.range(start.to_vec()..);
            for (k, v) in range.by_ref().take(max) {
                changes.insert(k.clone(), v.clone());
            }
            if let Some((next, _)) = range.next() {
                if bound.as_ref().is_none_or(|b| next < b) {
                    bound = Some(next.clone());
                }
            }
        }
        // Below the bound every layer's keys were all taken; at and above it, not.
        if let Some(b) = &bound {
            changes.split_off(b);
        }
        let opened = open();
        (changes, bound, layers.applied().0, opened)
    }
}

/// Calls `f` for every live entry of the merge of `changes` (newer) over `file_each` (the
/// file's entries in key order, fed through the callback it is given), in key order, until
/// `f` returns false. `changes` must hold only keys at or after where `file_each` starts.
pub(crate) fn merge_for_each<E>(
    changes: &Changes,
    file_each: impl FnOnce(&mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), E>,
    mut f: impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), E> {
    let mut pending = changes.iter().peekable();
    let mut more = true;
    file_each(&mut |k, v| {
        while let Some((ck, cv)) = pending.next_if(|(ck, _)| ck.as_slice() < k) {
            if let Some(cv) = cv {
                if !f(ck, cv) {
                    more = false;
                    return false;
                }
            }
        }
        let value = match pending.next_if(|(ck, _)| ck.as_slice() == k) {
            Some((_, None)) => return true,
            Some((_, Some(cv))) => cv.as_slice(),
            None => v,
        };
        more = f(k, value);
        more
    })?;
    if more {
        for (ck, cv) in pending {
            if let Some(cv) = cv {
                if !f(ck, cv) {
                    break;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(items: &[(&str, Option<&str>)]) -> Changes {
        items
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
            .collect()
    }

    fn merged(changes: &Changes, file: &[(&str, &str)], stop_after: usize) -> Vec<String> {
        let mut out = Vec::new();
        merge_for_each::<()>(
            changes,
            |each| {
                for (k, v) in file {
                    if !each(k.as_bytes(), v.as_bytes()) {
                        break;
                    }
                }
                Ok(())
            },
            |k, v| {
                out.push(format!(
                    "{}={}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                ));
                out.len() < stop_after
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn the_merge_prefers_the_overlay_skips_its_deletes_and_keeps_key_order() {
        let c = changes(&[
            ("a", Some("A")),
            ("c", None),
            ("d", Some("D2")),
            ("f", Some("F")),
            ("z", None),
        ]);
        let file = [("b", "b"), ("c", "c"), ("d", "d"), ("e", "e")];
        assert_eq!(
            merged(&c, &file, usize::MAX),
            ["a=A", "b=b", "d=D2", "e=e", "f=F"]
        );
        // Stops where `f` says, whether the stop falls on a change or a file entry.
        assert_eq!(merged(&c, &file, 1), ["a=A"]);
        assert_eq!(merged(&c, &file, 3), ["a=A", "b=b", "d=D2"]);
        assert_eq!(merged(&c, &file, 5), ["a=A", "b=b", "d=D2", "e=e", "f=F"]);
        assert_eq!(merged(&c, &[], usize::MAX), ["a=A", "d=D2", "f=F"]);
        assert_eq!(merged(&Changes::new(), &file, 2), ["b=b", "c=c"]);
    }

    #[test]
    fn lookups_take_the_newest_layer_and_a_landed_layer_leaves() {
        let overlay = Overlay::default();
        overlay.write().active.set(b"k", Some(b"old"));
        overlay.write().active.set(b"gone", Some(b"x"));
        let first = overlay.freeze().expect("a non-empty layer freezes");
        assert!(overlay.freeze().is_none(), "an empty active layer does not");
        overlay.write().active.set(b"k", Some(b"new"));
        overlay.write().active.set(b"gone", None);
        let second = overlay.freeze().unwrap();
        overlay.write().active.set(b"other", Some(b"o"));
        {
            let layers = overlay.read();
            assert_eq!(layers.lookup(b"k"), Some(Some(&b"new"[..])));
            assert_eq!(layers.lookup(b"gone"), Some(None));
            assert_eq!(layers.lookup(b"absent"), None);
        }
        overlay.landed(&first, Ok(()));
        assert_eq!(overlay.read().lookup(b"k"), Some(Some(&b"new"[..])));
        overlay.landed(&second, Ok(()));
        assert_eq!(overlay.read().lookup(b"k"), None);
        assert_eq!(overlay.read().lookup(b"other"), Some(Some(&b"o"[..])));
    }

    #[test]
    fn a_bounded_read_of_the_changes_stops_where_a_layer_was_cut() {
        let overlay = Overlay::default();
        for k in ["a", "c", "e", "g"] {
            overlay.write().active.set(k.as_bytes(), Some(b"old"));
        }
        overlay.freeze().unwrap();
        for k in ["b", "c", "d"] {
            overlay.write().active.set(k.as_bytes(), None);
        }
        let keys = |c: &Changes| -> Vec<String> {
            c.iter()
                .map(|(k, v)| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(k),
                        if v.is_some() { "" } else { "-" }
                    )
                })
                .collect()
        };
        // Two keys per layer: the frozen one stops before e, the active one before d.
        let (changes, bound, _, ()) = overlay.changes_from(b"", 2, || ());
        assert_eq!(keys(&changes), ["a", "b-", "c-"]);
        assert_eq!(bound.as_deref(), Some(&b"d"[..]));
        // From c: the frozen layer gives c, e (stops before g); the active one c, d (all).
        let (changes, bound, _, ()) = overlay.changes_from(b"c", 2, || ());
        assert_eq!(keys(&changes), ["c-", "d-", "e"]);
        assert_eq!(bound.as_deref(), Some(&b"g"[..]));
        // Unbounded: everything, newest first.
        let (changes, bound, _, ()) = overlay.changes_from(b"", usize::MAX, || ());
        assert_eq!(keys(&changes), ["a", "b-", "c-", "d-", "e", "g"]);
        assert_eq!(bound, None);
    }

    #[test]
    fn after_a_failed_checkpoint_every_layer_stays() {
        let overlay = Overlay::default();
        overlay.write().active.set(b"a", Some(b"1"));
        let first = overlay.freeze().unwrap();
        overlay.write().active.set(b"b", Some(b"2"));
        let second = overlay.freeze().unwrap();
        overlay.landed(&first, Err("disk full".into()));
        overlay.landed(&second, Ok(()));
        assert_eq!(overlay.failure().as_deref(), Some("disk full"));
        let layers = overlay.read();
        assert_eq!(layers.lookup(b"a"), Some(Some(&b"1"[..])));
        assert_eq!(layers.lookup(b"b"), Some(Some(&b"2"[..])));
    }
}
