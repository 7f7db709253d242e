//! [`RaftLog`]: every partition's Raft log, votes and commit points, in append-only segment
//! files written by one writer.
//!
//! ```text
//!   callers ──submit(ops)──► writer ──one write() per batch, one fsync if any op asks──► segment
//!   readers ──────────────► in-memory index (partition, index) → (segment, offset) ──pread──┘
//! ```
//!
//! Why not redb: a redb commit rewrites B-tree pages, checksums and frees them for every batch;
//! here a batch of any number of partitions' appends costs one `write` and, when one of them
//! must be durable, one `fdatasync` (group commit). `docs/design/storage-engine.md` has the
//! measurements behind the choice.
//!
//! Format. A segment is a sequence of records `[len u32 LE][crc32c u32 LE of body][body]`,
//! where the body is `[kind u8][partition u32 LE]`, then for the kinds of one group
//! (`ENTRY`..`META`, layout 2) `[keyspace u32 LE]`, and then, by kind:
//! - `ENTRY`: `[index u64 LE][the entry's bytes]` (the Raft layer adds its own checksum);
//! - `TRUNCATE`: `[index u64 LE]`: entries at and after `index` are gone;
//! - `PURGE`: `[index u64 LE][tag]`: entries up to `index` are gone; `tag` is the caller's
//!   description of the last purged entry (its log id);
//! - `META`: `[name length u8][name][value]`: the latest value of a named field (vote,
//!   commit point);
//! - `SYNCED` (partition 0): `[upto u64 LE]`: every byte of this segment before `upto` had
//!   been synced when this record was written. Written right after each sync that covered
//!   more than the last mark (not synced itself; the next sync takes it): what tells damage
//!   from a torn write (`recover.rs`);
//! - `CUT` (partition 0): `[segment u64 LE][offset u64 LE]`: segment `segment` ends at
//!   `offset`. The first record of the segment a repair of damage creates (`recover.rs`).
//!
//! Older segments hold no `SYNCED` or `CUT` records and read the same; a build without these
//! kinds refuses a log that has them (an unknown kind), so going back to one is not supported.
//!
//! Record layouts. Layout 1 (`ENTRY` = 1 .. `META` = 4) named a group by its partition
//! alone, in the one keyspace there was; layout 2 (`ENTRY2` = 7 .. `META2` = 10, written
//! since the groups became data, issue 17) adds the keyspace after the partition, so a
//! record names a [`GroupId`]. Layout 1 records still read, as keyspace 0 (`default`): a log
//! written before the change opens as it was and goes on in layout 2. A build that knows only
//! layout 1 refuses a log holding layout 2 records (an unknown kind).
//!
//! Invariants:
//! - The state is what replaying every segment in order gives. Only whole segments are ever
//!   removed, oldest first, and only when none of their entries is still live; every segment
//!   but the first begins with a checkpoint (each partition's purge point and meta fields),
//!   and every open writes one at the end of the last segment (a crash inside a rotation can
//!   leave it without its own), so the records a removed segment held are either dead or
//!   restated later.
//! - A segment is complete and synced before the next one begins, so a record that fails its
//!   checksum before the last segment is damage of the medium: the log refuses to open. In
//!   the last segment the tear rule (`recover.rs`) tells a torn tail, which is cut, from
//!   damage, which is handed to the caller to refuse or repair, never cut silently.
//! - Entry bytes are never overwritten in place, so a reader holding a stale location still
//!   reads the bytes it asked for.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::StorageBackend;
pub use replikv_types::GroupId;
use tokio::sync::mpsc;

use crate::store::{err, spawn_flusher, spawn_writer, FsyncPolicy, StorageError, WriterKind};

mod recover;

pub use recover::{BadSpan, Damage, DamagedLog};

#[cfg(test)]
mod recover_tests;

/// A segment is closed and a new one begun once it holds this much (the default; tests and
/// the simulation use smaller segments to exercise their turnover).
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// The active segment grows in steps of this much (fewer size changes to sync); the zeros
/// after its last record mark its end.
const GROW_BYTES: u64 = 4 << 20;
const HEADER: usize = 8;
/// No record is larger: a length beyond it is a torn or damaged header.
const MAX_RECORD: usize = 1 << 30;
/// Ranges of entries are read with one `pread` per run of records this close together.
const READ_GAP: u64 = 64 << 10;
const READ_RUN: u64 = 8 << 20;

const ENTRY: u8 = 1;
const TRUNCATE: u8 = 2;
const PURGE: u8 = 3;
const META: u8 = 4;
const SYNCED: u8 = 5;
const CUT: u8 = 6;
/// Layout 2 of the four kinds of one group: `ENTRY` + this, and so on.
const LAYOUT2: u8 = 6;
const ENTRY2: u8 = ENTRY + LAYOUT2;
const META2: u8 = META + LAYOUT2;

/// Whether `kind` names a record kind this build reads.
fn is_kind(kind: u8) -> bool {
    (ENTRY..=META2).contains(&kind)
}

/// The group a record of kind `kind` names, from the bytes after its kind, with how many
/// bytes name it; `None` for the marks (`SYNCED`, `CUT`) and unknown kinds.
fn group_of(kind: u8, rest: &[u8]) -> Option<(GroupId, usize)> {
    let word = |at: usize| {
        rest.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    match kind {
        ENTRY..=META => Some((GroupId::default_keyspace(word(0)?), 4)),
        ENTRY2..=META2 => Some((GroupId::new(word(4)?, word(0)?), 8)),
        _ => None,
    }
}

/// Where segment files live: a directory for the server, memory or a simulated disk for tests.
pub trait LogDir: Send + Sync + 'static {
    /// The ids of the segments present, in any order.
    fn segments(&self) -> io::Result<Vec<u64>>;
    /// Opens segment `id`, creating it empty if it does not exist.
    fn open(&self, id: u64) -> io::Result<Arc<dyn StorageBackend>>;
    fn remove(&self, id: u64) -> io::Result<()>;
    /// Makes the creation and removal of segments durable.
    fn sync(&self) -> io::Result<()>;
    /// How messages name segment `id` (a file's path, for an operator to find it).
    fn name(&self, id: u64) -> String {
        format!("log segment {id}")
    }
    /// Creates segment `id` holding exactly `bytes`, synced and durable. A crash may leave
    /// it absent or, where the directory cannot do better (this default), holding a prefix:
    /// [`FsLogDir`] writes a temporary file and renames it, so the segment exists whole or
    /// not at all.
    fn create_whole(&self, id: u64, bytes: &[u8]) -> io::Result<Arc<dyn StorageBackend>> {
        let file = self.open(id)?;
        file.set_len(bytes.len() as u64)?;
        file.write(0, bytes)?;
        file.sync_data()?;
        self.sync()?;
        Ok(file)
    }
}

/// Segments as files `<id in hex>.seg` in a directory.
pub struct FsLogDir {
    path: PathBuf,
}

impl FsLogDir {
    pub fn new(path: &Path) -> io::Result<FsLogDir> {
        if !path.exists() {
            std::fs::create_dir_all(path)?;
            // The new directory's own entry must survive a power loss too.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
        // A repair's segment a crash left half made (`create_whole`): never renamed, so
        // never part of the log.
        for item in std::fs::read_dir(path)? {
            let item = item?.path();
            if item.to_string_lossy().ends_with(".seg.tmp") {
                std::fs::remove_file(&item)?;
            }
        }
        Ok(FsLogDir {
            path: path.to_path_buf(),
        })
    }

    fn file(&self, id: u64) -> PathBuf {
        self.path.join(format!("{id:016x}.seg"))
    }
}

impl LogDir for FsLogDir {
    fn segments(&self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for item in std::fs::read_dir(&self.path)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".seg")
                .and_then(|s| u64::from_str_radix(s, 16).ok())
            {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn open(&self, id: u64) -> io::Result<Arc<dyn StorageBackend>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.file(id))?;
        Ok(Arc::new(SegmentFile(file)))
    }

    fn remove(&self, id: u64) -> io::Result<()> {
        std::fs::remove_file(self.file(id))
    }

    fn sync(&self) -> io::Result<()> {
        std::fs::File::open(&self.path)?.sync_all()
    }

    fn name(&self, id: u64) -> String {
        self.file(id).display().to_string()
    }

    fn create_whole(&self, id: u64, bytes: &[u8]) -> io::Result<Arc<dyn StorageBackend>> {
        use std::io::Write;
        let tmp = self.path.join(format!("{id:016x}.seg.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, self.file(id))?;
        self.sync()?;
        self.open(id)
    }
}

/// One segment on the file system.
struct SegmentFile(std::fs::File);

impl fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SegmentFile").finish()
    }
}

impl StorageBackend for SegmentFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(out, offset)
    }
    /// Grows by `fallocate`: the room is reserved, or the call fails having changed nothing
    /// (`ENOSPC` on a full disk), so no later write into it can fail for lack of space. The
    /// new bytes read as zeros, which the tear rule relies on (`recover.rs`).
    fn set_len(&self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let current = self.0.metadata()?.len();
        if len <= current {
            return self.0.set_len(len);
        }
        // SAFETY: a valid open descriptor; mode 0 allocates [current, len) and extends the size.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                0,
                current as libc::off_t,
                (len - current) as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A filesystem without fallocate: extend, as before.
            Some(libc::EOPNOTSUPP) => self.0.set_len(len),
            _ => {
                // ext4 keeps what it allocated before running out, and the size with it:
                // give it back, so that a failed growth changes nothing.
                let _ = self.0.set_len(current);
                Err(e)
            }
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
}

/// Segments in memory (redb's `InMemoryBackend`), for tests; they live as long as the log.
#[derive(Default)]
pub struct MemLogDir {
    files: Mutex<BTreeMap<u64, Arc<redb::backends::InMemoryBackend>>>,
}

impl LogDir for MemLogDir {
    fn segments(&self) -> io::Result<Vec<u64>> {
        Ok(self
            .files
            .lock()
            .expect("mem dir")
            .keys()
            .copied()
            .collect())
    }
    fn open(&self, id: u64) -> io::Result<Arc<dyn StorageBackend>> {
        let mut files = self.files.lock().expect("mem dir");
        Ok(files.entry(id).or_default().clone())
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        self.files.lock().expect("mem dir").remove(&id);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One change to the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// Stores entry `index` of group `g` (replacing one already there).
    Append {
        g: GroupId,
        index: u64,
        bytes: Vec<u8>,
    },
    /// Removes group `g`'s entries from `index` on.
    TruncateFrom { g: GroupId, index: u64 },
    /// Removes group `g`'s entries up to `index` and remembers `tag` as its purge point.
    PurgeTo {
        g: GroupId,
        index: u64,
        tag: Vec<u8>,
    },
    /// Sets a named field of group `g`.
    Meta {
        g: GroupId,
        name: String,
        value: Vec<u8>,
    },
}

impl LogOp {
    /// Appends the op as one record to `buf`; returns where its entry bytes start in `buf`.
    fn encode(&self, buf: &mut Vec<u8>) -> usize {
        let start = buf.len();
        buf.extend_from_slice(&[0; HEADER]);
        let (kind, g) = match self {
            LogOp::Append { g, .. } => (ENTRY2, g),
            LogOp::TruncateFrom { g, .. } => (TRUNCATE + LAYOUT2, g),
            LogOp::PurgeTo { g, .. } => (PURGE + LAYOUT2, g),
            LogOp::Meta { g, .. } => (META2, g),
        };
        buf.push(kind);
        buf.extend_from_slice(&g.partition.to_le_bytes());
        buf.extend_from_slice(&g.keyspace.to_le_bytes());
        let mut payload = 0;
        match self {
            LogOp::Append { index, bytes, .. } => {
                buf.extend_from_slice(&index.to_le_bytes());
                payload = buf.len();
                buf.extend_from_slice(bytes);
            }
            LogOp::TruncateFrom { index, .. } => buf.extend_from_slice(&index.to_le_bytes()),
            LogOp::PurgeTo { index, tag, .. } => {
                buf.extend_from_slice(&index.to_le_bytes());
                buf.extend_from_slice(tag);
            }
            LogOp::Meta { name, value, .. } => {
                let name = &name.as_bytes()[..name.len().min(255)];
                buf.push(name.len() as u8);
                buf.extend_from_slice(name);
                buf.extend_from_slice(value);
            }
        }
        seal(buf, start);
        payload
    }

    /// Decodes a record body whose checksum held; for an entry, also where its bytes start.
    fn decode(body: &[u8]) -> Result<(LogOp, usize), String> {
        let short = || format!("record body of {} bytes is too short", body.len());
        let kind = *body.first().ok_or_else(short)?;
        if !is_kind(kind) || kind == SYNCED || kind == CUT {
            return Err(format!("unknown record kind {kind}"));
        }
        let (g, named) = group_of(kind, &body[1..]).ok_or_else(short)?;
        let rest = &body[1 + named..];
        let kind = if kind >= ENTRY2 { kind - LAYOUT2 } else { kind };
        let index = || {
            rest.get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or_else(short)
        };
        Ok(match kind {
            ENTRY => (
                LogOp::Append {
                    g,
                    index: index()?,
                    bytes: rest[8..].to_vec(),
                },
                1 + named + 8,
            ),
            TRUNCATE => (LogOp::TruncateFrom { g, index: index()? }, 0),
            PURGE => (
                LogOp::PurgeTo {
                    g,
                    index: index()?,
                    tag: rest[8..].to_vec(),
                },
                0,
            ),
            META => {
                let n = *rest.first().ok_or_else(short)? as usize;
                let name = rest.get(1..1 + n).ok_or_else(short)?;
                let name = String::from_utf8(name.to_vec()).map_err(|e| e.to_string())?;
                (
                    LogOp::Meta {
                        g,
                        name,
                        value: rest[1 + n..].to_vec(),
                    },
                    0,
                )
            }
            other => return Err(format!("unknown record kind {other}")),
        })
    }
}

/// Fills in the header of the record that begins at `start` and runs to the end of `buf`.
fn seal(buf: &mut [u8], start: usize) {
    let body = &buf[start + HEADER..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// A record body as replay reads it: a change to the log, or a mark about the segment.
enum Record {
    Op(LogOp),
    Synced(u64),
    Cut { seg: u64, offset: u64 },
}

/// Decodes a record body whose checksum held; for an entry, also where its bytes start.
fn decode_record(body: &[u8]) -> Result<(Record, usize), String> {
    let kind = body.first().copied();
    if kind != Some(SYNCED) && kind != Some(CUT) {
        return LogOp::decode(body).map(|(op, payload)| (Record::Op(op), payload));
    }
    let num = |at: usize| {
        body.get(5 + at..13 + at)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| format!("mark record of {} bytes is too short", body.len()))
    };
    Ok(match kind {
        Some(SYNCED) => (Record::Synced(num(0)?), 0),
        _ => (
            Record::Cut {
                seg: num(0)?,
                offset: num(8)?,
            },
            0,
        ),
    })
}

fn encode_mark(kind: u8, values: &[u64], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    buf.push(kind);
    buf.extend_from_slice(&0u32.to_le_bytes());
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    seal(buf, start);
}

/// A `SYNCED` record: every byte of its segment before `upto` is on the disk.
fn encode_synced(upto: u64, buf: &mut Vec<u8>) {
    encode_mark(SYNCED, &[upto], buf);
}

/// A `CUT` record: segment `seg` ends at `offset`.
fn encode_cut(seg: u64, offset: u64, buf: &mut Vec<u8>) {
    encode_mark(CUT, &[seg, offset], buf);
}

/// Where an entry's bytes are.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u64,
    off: u64,
    len: u32,
}

#[derive(Default)]
struct Part {
    entries: BTreeMap<u64, Loc>,
    purged: Option<(u64, Vec<u8>)>,
    meta: BTreeMap<String, Vec<u8>>,
}

struct Segment {
    file: Arc<dyn StorageBackend>,
    /// Entries stored in this segment that are still in the log.
    live: usize,
}

/// What readers see: the index of every partition, and the segments.
#[derive(Default)]
struct Index {
    parts: BTreeMap<GroupId, Part>,
    segments: BTreeMap<u64, Segment>,
}

impl Index {
    fn drop_loc(&mut self, loc: Loc) {
        if let Some(s) = self.segments.get_mut(&loc.seg) {
            s.live -= 1;
        }
    }

    /// Applies `op`, stored in segment `seg` with its entry bytes at `payload` (for entries).
    fn apply(&mut self, op: LogOp, seg: u64, payload: u64) {
        match op {
            LogOp::Append { g, index, bytes } => {
                let part = self.parts.entry(g).or_default();
                if part.purged.as_ref().is_some_and(|(i, _)| index <= *i) {
                    return;
                }
                let loc = Loc {
                    seg,
                    off: payload,
                    len: bytes.len() as u32,
                };
                let old = part.entries.insert(index, loc);
                if let Some(s) = self.segments.get_mut(&seg) {
                    s.live += 1;
                }
                if let Some(old) = old {
                    self.drop_loc(old);
                }
            }
            LogOp::TruncateFrom { g, index } => {
                let part = self.parts.entry(g).or_default();
                let gone = part.entries.split_off(&index);
                for loc in gone.into_values() {
                    self.drop_loc(loc);
                }
            }
            LogOp::PurgeTo { g, index, tag } => {
                let part = self.parts.entry(g).or_default();
                let kept = part.entries.split_off(&index.saturating_add(1));
                let gone = std::mem::replace(&mut part.entries, kept);
                if part.purged.as_ref().is_none_or(|(i, _)| index >= *i) {
                    part.purged = Some((index, tag));
                }
                for loc in gone.into_values() {
                    self.drop_loc(loc);
                }
            }
            LogOp::Meta { g, name, value } => {
                self.parts.entry(g).or_default().meta.insert(name, value);
            }
        }
    }

    /// Where group `g`'s entries with index in `range` are, and their segments' files.
    fn locate(&self, g: GroupId, range: Range<u64>) -> (Vec<(u64, Loc)>, Files) {
        let Some(part) = self.parts.get(&g) else {
            return Default::default();
        };
        let locs: Vec<(u64, Loc)> = part.entries.range(range).map(|(i, l)| (*i, *l)).collect();
        let mut files: Files = BTreeMap::new();
        for (_, loc) in &locs {
            if let (std::collections::btree_map::Entry::Vacant(slot), Some(s)) =
                (files.entry(loc.seg), self.segments.get(&loc.seg))
            {
                slot.insert(s.file.clone());
            }
        }
        (locs, files)
    }

    /// The records that restate every purge point and field: a new segment's first records.
    fn checkpoint(&self) -> Vec<LogOp> {
        let mut ops = Vec::new();
        for (g, part) in &self.parts {
            if let Some((index, tag)) = &part.purged {
                ops.push(LogOp::PurgeTo {
                    g: *g,
                    index: *index,
                    tag: tag.clone(),
                });
            }
            for (name, value) in &part.meta {
                ops.push(LogOp::Meta {
                    g: *g,
                    name: name.clone(),
                    value: value.clone(),
                });
            }
        }
        ops
    }
}

type Files = BTreeMap<u64, Arc<dyn StorageBackend>>;

/// Reads the entries at `locs` (in order), with one read per run of nearby records.
fn read_locs(locs: &[(u64, Loc)], files: &Files) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let mut out = Vec::with_capacity(locs.len());
    let mut i = 0;
    while i < locs.len() {
        let first = locs[i].1;
        let mut j = i + 1;
        let mut end = first.off + first.len as u64;
        while j < locs.len() {
            let l = locs[j].1;
            if l.seg != first.seg || l.off < end || l.off - end > READ_GAP {
                break;
            }
            let next_end = l.off + l.len as u64;
            if next_end - first.off > READ_RUN {
                break;
            }
            end = next_end;
            j += 1;
        }
        let file = files
            .get(&first.seg)
            .ok_or_else(|| err(format!("log segment {} is gone", first.seg)))?;
        let mut buf = vec![0; (end - first.off) as usize];
        file.read(first.off, &mut buf)
            .map_err(|e| err(format!("reading log segment {}: {e}", first.seg)))?;
        for (index, loc) in &locs[i..j] {
            let from = (loc.off - first.off) as usize;
            out.push((*index, buf[from..from + loc.len as usize].to_vec()));
        }
        i = j;
    }
    Ok(out)
}

/// The writer's own state: the segment it appends to.
struct Active {
    id: u64,
    file: Arc<dyn StorageBackend>,
    /// Where the next record goes.
    end: u64,
    /// The segment's length (zeros after `end`).
    len: u64,
    /// Records written since the last sync.
    dirty: bool,
    /// Every byte of the segment before this was synced.
    synced_to: u64,
    /// Where the last `SYNCED` mark written in this segment ends.
    mark_end: u64,
    /// Why the log stopped, after an I/O error.
    failed: Option<String>,
}

impl Active {
    /// Appending to segment `id` at `end`, nothing of it known to be synced yet.
    fn at(id: u64, file: Arc<dyn StorageBackend>, end: u64) -> Active {
        Active {
            id,
            file,
            end,
            len: end,
            dirty: false,
            synced_to: 0,
            mark_end: 0,
            failed: None,
        }
    }

    fn note_synced(&mut self) {
        self.dirty = false;
        self.synced_to = self.end;
    }
}

/// How an opened log runs: the fsync policy, its writer, its segments' size.
#[derive(Clone, Copy)]
struct OpenOptions {
    policy: FsyncPolicy,
    kind: WriterKind,
    segment_bytes: u64,
}

/// An opened log, or one whose newest segment is damaged (`recover.rs`).
pub enum Opened {
    Ready(RaftLog),
    Damaged(Box<DamagedLog>),
}

type DoneFn = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

struct Job {
    durable: bool,
    ops: Vec<LogOp>,
    done: DoneFn,
}

struct Shared {
    dir: Box<dyn LogDir>,
    index: Mutex<Index>,
    active: Mutex<Active>,
    policy: FsyncPolicy,
    kind: WriterKind,
    segment_bytes: u64,
    batches: AtomicU64,
    syncs: AtomicU64,
    stopped: AtomicBool,
    /// The free space of the disk under the log, once the node watches it.
    space: std::sync::OnceLock<Arc<crate::DiskSpace>>,
}

/// Retries of a segment's growth on a full disk.
const NO_SPACE_RETRY: Duration = Duration::from_millis(100);
static UNLIMITED: std::sync::LazyLock<crate::DiskSpace> =
    std::sync::LazyLock::new(crate::DiskSpace::unlimited);

/// The node's Raft logs. Cheap to clone; the writer stops when the last clone is dropped.
#[derive(Clone)]
pub struct RaftLog {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftLog")
            .field("policy", &self.shared.policy)
            .finish()
    }
}

impl RaftLog {
    /// Opens (or creates) the log in directory `path`, with a writer thread.
    pub fn open(path: &Path, policy: FsyncPolicy) -> Result<RaftLog, StorageError> {
        let dir = FsLogDir::new(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        RaftLog::open_with(Box::new(dir), policy, WriterKind::Thread, SEGMENT_BYTES)
    }

    /// Opens the log in memory, with a task writer (needs a tokio runtime).
    pub fn in_memory() -> Result<RaftLog, StorageError> {
        RaftLog::open_with(
            Box::new(MemLogDir::default()),
            FsyncPolicy::Always,
            WriterKind::Task,
            SEGMENT_BYTES,
        )
    }

    /// Opens the log on any [`LogDir`], with segments of about `segment_bytes`: replays
    /// every segment, cuts a torn tail, and starts the writer. Damage (`recover.rs`) is an
    /// error: use [`RaftLog::open_checked`] to repair it.
    pub fn open_with(
        dir: Box<dyn LogDir>,
        policy: FsyncPolicy,
        kind: WriterKind,
        segment_bytes: u64,
    ) -> Result<RaftLog, StorageError> {
        match RaftLog::open_checked(dir, policy, kind, segment_bytes)? {
            Opened::Ready(log) => Ok(log),
            Opened::Damaged(d) => Err(d.refusal("nothing was asked to repair it")),
        }
    }

    /// As [`RaftLog::open_with`], but damage in the newest segment comes back as a
    /// [`DamagedLog`], with nothing written, for the caller to repair or refuse.
    pub fn open_checked(
        dir: Box<dyn LogDir>,
        policy: FsyncPolicy,
        kind: WriterKind,
        segment_bytes: u64,
    ) -> Result<Opened, StorageError> {
        let open = OpenOptions {
            policy,
            kind,
            segment_bytes: segment_bytes.max(1),
        };
        let recovered = recover::recover(dir.as_ref())?;
        Ok(match recovered.damage {
            None => Opened::Ready(RaftLog::start(
                dir,
                recovered.index,
                recovered.active,
                open,
            )?),
            Some(damage) => Opened::Damaged(Box::new(DamagedLog {
                dir,
                index: recovered.index,
                active: recovered.active,
                damage,
                open,
            })),
        })
    }

    /// Writes the open's checkpoint and starts the writer.
    fn start(
        dir: Box<dyn LogDir>,
        index: Index,
        active: Active,
        open: OpenOptions,
    ) -> Result<RaftLog, StorageError> {
        let OpenOptions {
            policy,
            kind,
            segment_bytes,
        } = open;
        let shared = Arc::new(Shared {
            dir,
            index: Mutex::new(index),
            active: Mutex::new(active),
            policy,
            kind,
            segment_bytes,
            batches: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            space: std::sync::OnceLock::new(),
        });
        {
            let mut active = shared.active.lock().expect("log writer");
            shared.checkpoint(&mut active)?;
        }
        let (jobs, rx) = mpsc::unbounded_channel::<Job>();
        let writer_shared = shared.clone();
        let finish_shared = shared.clone();
        let mut batch = Vec::with_capacity(256);
        let writer = spawn_writer(
            kind,
            "replikv-log-writer",
            rx,
            move |first, rx| {
                batch.push(first);
                while let Ok(job) = rx.try_recv() {
                    batch.push(job);
                }
                writer_shared.write_batch(&mut batch);
            },
            move || finish_shared.close_segment(),
        )?;
        let log = RaftLog {
            shared,
            jobs,
            writer: Arc::new(Mutex::new(writer)),
        };
        if let Some(every) = policy.flush_every() {
            log.start_flusher(every);
        }
        Ok(log)
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.shared.policy
    }

    /// Reports a full disk to `space` (the log waits for room rather than failing); the first
    /// call wins.
    pub fn watch_space(&self, space: Arc<crate::DiskSpace>) {
        let _ = self.shared.space.set(space);
    }

    /// The disk space this log reports to (unlimited until [`RaftLog::watch_space`]).
    pub fn space(&self) -> Arc<crate::DiskSpace> {
        match self.shared.space.get() {
            Some(s) => s.clone(),
            None => Arc::new(crate::DiskSpace::unlimited()),
        }
    }

    pub fn writer_kind(&self) -> WriterKind {
        self.shared.kind
    }

    /// Batches written since the log opened (failed ones included).
    pub fn commit_count(&self) -> u64 {
        self.shared.batches.load(Ordering::Acquire)
    }

    /// Syncs made since the log opened.
    pub fn sync_count(&self) -> u64 {
        self.shared.syncs.load(Ordering::Acquire)
    }

    /// Segments present (for tests and status).
    pub fn segment_count(&self) -> usize {
        self.shared.index.lock().expect("log index").segments.len()
    }

    /// Queues `ops` for the writer; `done` runs once they are written, and synced if
    /// `durable`. Ops of one call are written in order, in one batch.
    pub fn submit(&self, durable: bool, ops: Vec<LogOp>, done: DoneFn) {
        let job = Job { durable, ops, done };
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job) {
            (job.done)(Err(StorageError("the log writer has stopped".into())));
        }
    }

    /// Writes `ops` in the next batch and waits for it.
    pub async fn write(&self, durable: bool, ops: Vec<LogOp>) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            durable,
            ops,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        rx.await
            .map_err(|_| StorageError("the log writer dropped a job".into()))?
    }

    /// Writes `ops` durably and returns once they are synced, from synchronous start-up code.
    /// A task writer may need this very thread to run, so the batch is written here.
    pub fn write_now(&self, ops: Vec<LogOp>) -> Result<(), StorageError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let done: DoneFn = Box::new(move |res| {
            let _ = tx.send(res);
        });
        match self.shared.kind {
            WriterKind::Thread => self.submit(true, ops, done),
            WriterKind::Task => self.shared.write_batch(&mut vec![Job {
                durable: true,
                ops,
                done,
            }]),
        }
        rx.recv()
            .map_err(|_| StorageError("the log writer dropped a job".into()))?
    }

    /// Entries of group `g` with index in `range`, in order.
    pub fn entries(
        &self,
        g: GroupId,
        range: Range<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        // Located under the lock, read outside it: entry bytes are never overwritten.
        let (locs, files) = self
            .shared
            .index
            .lock()
            .expect("log index")
            .locate(g, range);
        read_locs(&locs, &files)
    }

    /// Entry `index` of group `g`.
    pub fn entry(&self, g: GroupId, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .entries(g, index..index.saturating_add(1))?
            .pop()
            .map(|(_, b)| b))
    }

    /// The last entry of group `g`.
    pub fn last(&self, g: GroupId) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        // The location and its file under one lock: a truncation in between must not make
        // the last entry look absent.
        let last = {
            let index = self.shared.index.lock().expect("log index");
            let last = index
                .parts
                .get(&g)
                .and_then(|part| part.entries.iter().next_back().map(|(i, l)| (*i, *l)));
            last.and_then(|(i, loc)| {
                let file = index.segments.get(&loc.seg)?.file.clone();
                Some((i, loc, file))
            })
        };
        let Some((i, loc, file)) = last else {
            return Ok(None);
        };
        let mut bytes = vec![0; loc.len as usize];
        file.read(loc.off, &mut bytes)
            .map_err(|e| err(format!("reading log segment {}: {e}", loc.seg)))?;
        Ok(Some((i, bytes)))
    }

    /// Every group with records in the log (entries, a purge point or a field).
    pub fn groups(&self) -> Vec<GroupId> {
        let index = self.shared.index.lock().expect("log index");
        index.parts.keys().copied().collect()
    }

    /// How many entries group `g` holds.
    pub fn len(&self, g: GroupId) -> u64 {
        let index = self.shared.index.lock().expect("log index");
        index
            .parts
            .get(&g)
            .map_or(0, |part| part.entries.len() as u64)
    }

    /// Group `g`'s purge point: the index and tag of the last `PurgeTo`.
    pub fn purged(&self, g: GroupId) -> Option<(u64, Vec<u8>)> {
        let index = self.shared.index.lock().expect("log index");
        index.parts.get(&g).and_then(|part| part.purged.clone())
    }

    /// The value of group `g`'s field `name`, as last written.
    pub fn meta(&self, g: GroupId, name: &str) -> Option<Vec<u8>> {
        let index = self.shared.index.lock().expect("log index");
        index
            .parts
            .get(&g)
            .and_then(|part| part.meta.get(name).cloned())
    }

    fn start_flusher(&self, every: Duration) {
        let shared = self.shared.clone();
        // A weak sender: the flusher must not keep the writer (and `close`) waiting.
        let jobs = self.jobs.downgrade();
        let flush = move || {
            if let Some(jobs) = jobs.upgrade() {
                let _ = jobs.send(Job {
                    durable: true,
                    ops: Vec::new(),
                    done: Box::new(|_| {}),
                });
            }
        };
        spawn_flusher(self.shared.kind, "replikv-log-flusher", every, move || {
            flush();
            !shared.stopped.load(Ordering::Relaxed)
        });
    }

    /// Stops the flusher (the writer stops when the last clone is dropped).
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
    }

    /// Closes this handle and, when it is the last one, waits until the writer has synced
    /// everything and stopped. A task writer is not waited for.
    pub fn close(self) {
        self.stop();
        let writer = self.writer.clone();
        drop(self);
        if Arc::strong_count(&writer) == 1 {
            if let Some(handle) = writer.lock().expect("writer handle").take() {
                let _ = handle.join();
            }
        }
    }
}

impl Shared {
    /// Writes every job's ops in one `write`, syncs once if any job is durable, then answers
    /// the jobs and, when the segment is full, begins the next one.
    fn write_batch(&self, batch: &mut Vec<Job>) {
        let durable = batch.iter().any(|j| j.durable && self.syncs_now(&j.ops));
        let mut active = self.active.lock().expect("log writer");
        let size: usize = batch
            .iter()
            .flat_map(|j| &j.ops)
            .map(|op| match op {
                LogOp::Append { bytes, .. } => bytes.len() + 32,
                _ => 64,
            })
            .sum();
        let mut buf = Vec::with_capacity(size + 32);
        let mut placed = Vec::new();
        for job in batch.iter_mut() {
            for op in std::mem::take(&mut job.ops) {
                let payload = op.encode(&mut buf);
                placed.push((op, payload));
            }
        }
        let result = match &active.failed {
            Some(why) => Err(err(format!(
                "the Raft log stopped after an I/O error: {why}"
            ))),
            None => {
                let end = active.end + buf.len() as u64;
                let (a, room) = self.grow_when_room(active, end);
                active = a;
                match room {
                    Ok(()) => self.append(&mut active, &buf, placed, durable),
                    Err(e) => Err(err(e)),
                }
            }
        };
        self.batches.fetch_add(1, Ordering::Release);
        let after = match &result {
            Ok(()) if active.end >= self.segment_bytes => self.rotate(&mut active),
            other => other.clone(),
        };
        // After a failed write or fsync nothing says what reached the disk (a failed fsync
        // may even have dropped the pages it could not write), so the log stops: every later
        // job fails, and the node's Raft groups stop on the storage error.
        if let (Err(e), None) = (&after, &active.failed) {
            tracing::error!(error = %e, "the Raft log failed; it accepts no more writes");
            active.failed = Some(e.to_string());
        }
        // Answered with the writer unlocked: a callback may queue (or, on a task writer,
        // write) again.
        drop(active);
        for job in batch.drain(..) {
            (job.done)(result.clone());
        }
    }

    /// Whether a durable job of `ops` is synced before it is answered. Under `always`, every
    /// one. Under `everysec` and `never`, entries are answered once written to the OS (a
    /// `kill -9` keeps them; a power loss may cut the log back to the last sync) and the
    /// flusher syncs them; votes, truncations, purges and the flusher's own empty job are
    /// always synced.
    fn syncs_now(&self, ops: &[LogOp]) -> bool {
        self.policy == FsyncPolicy::Always
            || ops.is_empty()
            || ops.iter().any(|op| !matches!(op, LogOp::Append { .. }))
    }

    /// Writes `buf` at the end of the active segment, makes its ops visible to readers, and
    /// syncs if asked.
    fn append(
        &self,
        active: &mut Active,
        buf: &[u8],
        placed: Vec<(LogOp, usize)>,
        durable: bool,
    ) -> Result<(), StorageError> {
        let purges = placed
            .iter()
            .any(|(op, _)| matches!(op, LogOp::PurgeTo { .. }));
        if !buf.is_empty() {
            let end = active.end + buf.len() as u64;
            self.grow(active, end).map_err(err)?;
            active.file.write(active.end, buf).map_err(err)?;
            let base = active.end;
            active.end = end;
            active.dirty = true;
            let mut index = self.index.lock().expect("log index");
            for (op, payload) in placed {
                index.apply(op, active.id, base + payload as u64);
            }
        }
        if durable && active.dirty {
            active.file.sync_data().map_err(err)?;
            self.syncs.fetch_add(1, Ordering::Release);
            self.mark_synced(active);
        }
        if purges {
            self.remove_dead_segments(active.id);
        }
        Ok(())
    }

    /// Right after a sync: notes it, and writes a `SYNCED` mark saying so (not synced itself:
    /// the next sync takes it). So even the last synced batch has its proof after it once a
    /// process dies, and replay never takes damage of it for a torn write (`recover.rs`). No
    /// mark when the sync covered nothing but the last mark, so an idle log stays as it is.
    /// Best effort: a mark that cannot be written is left out, and the next records go where
    /// it would have.
    fn mark_synced(&self, active: &mut Active) {
        active.note_synced();
        if active.synced_to <= active.mark_end {
            return;
        }
        let mut buf = Vec::new();
        encode_synced(active.synced_to, &mut buf);
        let end = active.end + buf.len() as u64;
        if self.grow(active, end).is_ok() && active.file.write(active.end, &buf).is_ok() {
            active.end = end;
            active.mark_end = end;
            active.dirty = true;
        }
    }

    /// Makes the active segment at least `end` bytes long, in steps of [`GROW_BYTES`]. Fails
    /// having changed nothing when the disk has no room (`space.rs`).
    fn grow(&self, active: &mut Active, end: u64) -> io::Result<()> {
        if end > active.len {
            let step = GROW_BYTES.min(self.segment_bytes);
            let len = end.div_ceil(step) * step;
            active.file.set_len(len)?;
            active.len = len;
        }
        Ok(())
    }

    /// Grows the active segment to hold `end` bytes, waiting while the disk is full: a
    /// failed growth wrote nothing, so the batch is simply written once there is room, and
    /// the log never stops for it. Gives up when the log is stopped, or on any other error.
    fn grow_when_room<'a>(
        &'a self,
        mut active: std::sync::MutexGuard<'a, Active>,
        end: u64,
    ) -> (std::sync::MutexGuard<'a, Active>, io::Result<()>) {
        let mut waited = false;
        let result = loop {
            match self.grow(&mut active, end) {
                Ok(()) => break Ok(()),
                Err(e)
                    if crate::space::is_no_space(&e)
                        && self.kind == WriterKind::Thread
                        && !self.stopped.load(Ordering::Relaxed) =>
                {
                    if !waited {
                        tracing::error!(
                            segment = active.id,
                            error = %e,
                            "the disk is full: the Raft log waits for room to grow (writes are \
                             refused meanwhile)"
                        );
                        waited = true;
                    }
                    self.space().set_full(true);
                    // Only this thread changes the active segment: unlocked while it waits.
                    drop(active);
                    std::thread::sleep(NO_SPACE_RETRY);
                    active = self.active.lock().expect("log writer");
                }
                Err(e) => break Err(e),
            }
        };
        if waited {
            tracing::info!("the disk has room again: the Raft log writes on");
            self.space().set_full(false);
        }
        (active, result)
    }

    /// The disk space this log watches (unlimited unless [`RaftLog::watch_space`] was called).
    fn space(&self) -> &crate::DiskSpace {
        self.space.get().map_or(&UNLIMITED, |s| s.as_ref())
    }

    /// Closes the full active segment (trimmed and synced) and begins the next with a
    /// checkpoint, synced before any older segment may go.
    fn rotate(&self, active: &mut Active) -> Result<(), StorageError> {
        // Trimmed and synced before the next segment exists: no crash may leave a newer
        // segment behind one with an unsynced tail (that tail would be "damage before the
        // last segment").
        active.file.set_len(active.end).map_err(err)?;
        active.len = active.end;
        active.file.sync_data().map_err(err)?;
        active.note_synced();
        let id = active.id + 1;
        let file = self.dir.open(id).map_err(err)?;
        let mut next = Active::at(id, file.clone(), 0);
        // Room for its checkpoint first: on a full disk the rotation is left for a later
        // batch (the empty file goes again), and the active segment grows on meanwhile.
        if let Err(e) = self.grow(&mut next, GROW_BYTES.min(self.segment_bytes)) {
            if crate::space::is_no_space(&e) {
                tracing::warn!(segment = id, error = %e, "no room to begin the next log segment yet");
                drop((next, file));
                let _ = self.dir.remove(id).and_then(|()| self.dir.sync());
                return Ok(());
            }
            return Err(err(e));
        }
        self.dir.sync().map_err(err)?;
        self.index.lock().expect("log index").segments.insert(
            id,
            Segment {
                file: file.clone(),
                live: 0,
            },
        );
        // The new segment takes records only once its checkpoint is written and synced.
        self.checkpoint(&mut next)?;
        *active = next;
        self.remove_dead_segments(id);
        while self.compact_oldest(active)? {
            self.remove_dead_segments(active.id);
        }
        Ok(())
    }

    /// The entries of a quiet partition could keep the oldest segment, and with it every
    /// later one, from ever being removed: the log would grow with everything the node ever
    /// wrote. When the oldest segment's live entries are at most a quarter of a segment, they
    /// are written again at the end of the active one (same indexes; replay keeps the later
    /// copy), synced, which leaves the old segment dead. Returns whether it copied.
    fn compact_oldest(&self, active: &mut Active) -> Result<bool, StorageError> {
        let (seg, file, live) = {
            let index = self.index.lock().expect("log index");
            let Some((&seg, segment)) = index.segments.iter().next() else {
                return Ok(false);
            };
            if seg == active.id || segment.live == 0 {
                return Ok(false);
            }
            let mut live = Vec::new();
            let mut bytes = 0;
            for (p, part) in &index.parts {
                for (i, loc) in &part.entries {
                    if loc.seg == seg {
                        live.push((*p, *i, *loc));
                        bytes += loc.len as u64;
                    }
                }
            }
            if bytes > self.segment_bytes / 4 {
                return Ok(false);
            }
            (seg, segment.file.clone(), live)
        };
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(live.len());
        for (g, index, loc) in live {
            let mut bytes = vec![0; loc.len as usize];
            file.read(loc.off, &mut bytes)
                .map_err(|e| err(format!("reading log segment {seg}: {e}")))?;
            let op = LogOp::Append { g, index, bytes };
            let payload = op.encode(&mut buf);
            placed.push((op, payload));
        }
        if let Err(e) = self.grow(active, active.end + buf.len() as u64) {
            if crate::space::is_no_space(&e) {
                // Only an optimisation: left for a rotation with room.
                return Ok(false);
            }
            return Err(err(e));
        }
        tracing::debug!(
            segment = seg,
            entries = placed.len(),
            "copying the live entries of the oldest log segment forward"
        );
        self.append(active, &buf, placed, true)?;
        Ok(true)
    }

    /// Restates every partition's purge point and fields at the end of `active`, synced:
    /// what makes the segments before it removable. Written at each rotation, and at each
    /// open, since a crash inside a rotation can leave the last segment without one.
    fn checkpoint(&self, active: &mut Active) -> Result<(), StorageError> {
        let ops = self.index.lock().expect("log index").checkpoint();
        let mut buf = Vec::new();
        for op in &ops {
            op.encode(&mut buf);
        }
        // It only restates what the index holds: nothing to apply.
        self.append(active, &buf, Vec::new(), true)
    }

    /// Removes the oldest segments while none of their entries is live, syncing the
    /// directory after each removal so that no crash can keep an older segment while a newer
    /// one is gone. A removal that fails is left for the next purge.
    fn remove_dead_segments(&self, active: u64) {
        loop {
            let victim = {
                let index = self.index.lock().expect("log index");
                match index.segments.iter().next() {
                    Some((id, s)) if *id != active && s.live == 0 => *id,
                    _ => break,
                }
            };
            let removed = match self.dir.remove(victim) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            };
            if let Err(e) = removed.and_then(|()| self.dir.sync()) {
                tracing::warn!(segment = victim, error = %e, "removing a purged log segment failed");
                return;
            }
            self.index
                .lock()
                .expect("log index")
                .segments
                .remove(&victim);
        }
    }

    /// At the writer's end: syncs what is written, then marks it all synced, so that the
    /// next open can tell damage anywhere in the segment from a torn write (`recover.rs`).
    fn close_segment(&self) {
        let mut active = self.active.lock().expect("log writer");
        if active.failed.is_some() {
            return;
        }
        // Synced, marked, and the mark synced too.
        for _ in 0..2 {
            if active.dirty && active.file.sync_data().is_ok() {
                self.syncs.fetch_add(1, Ordering::Release);
                self.mark_synced(&mut active);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partition `p` of the default keyspace.
    fn g(p: u32) -> GroupId {
        GroupId::default_keyspace(p)
    }

    fn put(p: u32, index: u64, bytes: &[u8]) -> LogOp {
        LogOp::Append {
            g: g(p),
            index,
            bytes: bytes.to_vec(),
        }
    }

    fn purge(p: u32, index: u64, tag: &[u8]) -> LogOp {
        LogOp::PurgeTo {
            g: g(p),
            index,
            tag: tag.to_vec(),
        }
    }

    fn vote(p: u32, value: &[u8]) -> LogOp {
        LogOp::Meta {
            g: g(p),
            name: "vote".into(),
            value: value.to_vec(),
        }
    }

    /// A log in `dir` with 64 KiB segments.
    fn small(dir: &Path) -> RaftLog {
        let fs = FsLogDir::new(dir).unwrap();
        RaftLog::open_with(
            Box::new(fs),
            FsyncPolicy::Never,
            WriterKind::Thread,
            64 << 10,
        )
        .unwrap()
    }

    fn indexes(log: &RaftLog, p: u32) -> Vec<u64> {
        log.entries(g(p), 0..u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect()
    }

    #[tokio::test]
    async fn appends_truncations_purges_and_fields_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftLog::open(dir.path(), FsyncPolicy::Always).unwrap();
            let ops = (1..=10).map(|i| put(7, i, &[i as u8; 3])).collect();
            log.write(true, ops).await.unwrap();
            log.write(true, vec![put(8, 1, b"other")]).await.unwrap();
            log.write(true, vec![LogOp::TruncateFrom { g: g(7), index: 8 }])
                .await
                .unwrap();
            log.write(true, vec![put(7, 8, b"new")]).await.unwrap();
            log.write(true, vec![purge(7, 3, b"t3")]).await.unwrap();
            log.write(false, vec![vote(7, b"v1")]).await.unwrap();
            log.close();
        }
        let log = RaftLog::open(dir.path(), FsyncPolicy::Always).unwrap();
        assert_eq!(indexes(&log, 7), vec![4, 5, 6, 7, 8]);
        assert_eq!(log.entry(g(7), 8).unwrap().unwrap(), b"new");
        assert_eq!(log.entry(g(7), 5).unwrap().unwrap(), vec![5; 3]);
        assert_eq!(log.last(g(8)).unwrap().unwrap(), (1, b"other".to_vec()));
        assert_eq!(log.purged(g(7)), Some((3, b"t3".to_vec())));
        assert_eq!(log.meta(g(7), "vote").unwrap(), b"v1");
        assert_eq!(log.meta(g(8), "vote"), None);
    }

    /// A record of layout 1, as builds before keyspaces wrote it: `[kind][partition]`, then
    /// the kind's fields.
    fn layout1(kind: u8, p: u32, fields: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; HEADER];
        buf.push(kind);
        buf.extend_from_slice(&p.to_le_bytes());
        buf.extend_from_slice(fields);
        seal(&mut buf, 0);
        buf
    }

    /// A segment written in layout 1 opens with its records as the default keyspace's, and
    /// the log goes on in layout 2 beside them; a partition of another keyspace with the same
    /// number is a group of its own.
    #[tokio::test]
    async fn records_of_layout_1_read_as_the_default_keyspace() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = Vec::new();
        for i in 1..=3u64 {
            let mut fields = i.to_le_bytes().to_vec();
            fields.extend_from_slice(format!("old-{i}").as_bytes());
            old.extend(layout1(ENTRY, 2, &fields));
        }
        old.extend(layout1(
            PURGE,
            2,
            &[1u64.to_le_bytes().to_vec(), b"t1".to_vec()].concat(),
        ));
        old.extend(layout1(META, 2, &[&[4u8][..], b"vote", b"v-old"].concat()));
        old.extend(layout1(TRUNCATE, 5, &9u64.to_le_bytes()));
        std::fs::write(dir.path().join(format!("{:016x}.seg", 1)), &old).unwrap();

        let other = GroupId::new(3, 2);
        {
            let log = RaftLog::open(dir.path(), FsyncPolicy::Always).unwrap();
            assert_eq!(indexes(&log, 2), vec![2, 3]);
            assert_eq!(log.entry(g(2), 3).unwrap().unwrap(), b"old-3");
            assert_eq!(log.purged(g(2)), Some((1, b"t1".to_vec())));
            assert_eq!(log.meta(g(2), "vote").unwrap(), b"v-old");
            assert_eq!(log.len(other), 0);
            let ops = vec![
                put(2, 4, b"new-4"),
                LogOp::Append {
                    g: other,
                    index: 1,
                    bytes: b"ks3".to_vec(),
                },
                LogOp::Meta {
                    g: GroupId::META,
                    name: "vote".into(),
                    value: b"v-meta".to_vec(),
                },
            ];
            log.write(true, ops).await.unwrap();
            log.close();
        }
        let log = RaftLog::open(dir.path(), FsyncPolicy::Always).unwrap();
        assert_eq!(indexes(&log, 2), vec![2, 3, 4]);
        assert_eq!(log.entry(g(2), 4).unwrap().unwrap(), b"new-4");
        assert_eq!(
            log.entries(other, 0..u64::MAX).unwrap(),
            vec![(1, b"ks3".to_vec())]
        );
        assert_eq!(log.meta(GroupId::META, "vote").unwrap(), b"v-meta");
        assert_eq!(log.meta(other, "vote"), None);
        // What this build writes is layout 2: the new records name their keyspace.
        let seg = std::fs::read(dir.path().join(format!("{:016x}.seg", 1))).unwrap();
        let (mut at, mut kinds) = (old.len(), Vec::new());
        while at + HEADER < seg.len() && seg[at..at + 4] != [0; 4] {
            let len = u32::from_le_bytes(seg[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(seg[at + HEADER]);
            at += HEADER + len;
        }
        assert!(kinds.contains(&ENTRY2), "{kinds:?}");
        assert!(
            kinds.iter().all(|k| *k > META),
            "only layout 2 records and marks: {kinds:?}"
        );
    }

    /// A torn last record (a prefix of it reached the disk) is cut; the records before it and
    /// new appends after it read back whole.
    #[tokio::test]
    async fn a_torn_tail_is_cut_and_appends_continue_after_the_last_good_record() {
        let dir = tempfile::tempdir().unwrap();
        let seg = {
            let log = RaftLog::open(dir.path(), FsyncPolicy::Always).unwrap();
            log.write(true, (1..=3).map(|i| put(0, i, b"abcdef")).collect())
                .await
                .unwrap();
            log.close();
            let mut segs: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(segs.len(), 1);
            segs.pop().unwrap().unwrap().path()
        };
        // Tear the last entry: drop its last 2 bytes and the closing sync mark after it
        // (`HEADER` + 13 bytes), as if the write was cut.
        let bytes = std::fs::read(&seg).unwrap();
        let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
        std::fs::write(&seg, &bytes[..end - (HEADER + 13) - 2]).unwrap();

        let log = RaftLog::open(dir.path(), FsyncPolicy::Always).unwrap();
        assert_eq!(indexes(&log, 0), vec![1, 2]);
        log.write(true, vec![put(0, 3, b"again")]).await.unwrap();
        log.close();
        let log = RaftLog::open(dir.path(), FsyncPolicy::Always).unwrap();
        assert_eq!(indexes(&log, 0), vec![1, 2, 3]);
        assert_eq!(log.entry(g(0), 3).unwrap().unwrap(), b"again");
    }

    /// A record that fails its checksum before the last segment is damage, not a torn write:
    /// the log refuses to open rather than drop what came after it.
    #[tokio::test]
    async fn damage_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = small(dir.path());
            for i in 1..=100 {
                log.write(true, vec![put(0, i, &[9; 1 << 10])])
                    .await
                    .unwrap();
            }
            assert_eq!(log.segment_count(), 2);
            log.close();
        }
        let first = dir.path().join(format!("{:016x}.seg", 1));
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[5000] ^= 0x10;
        std::fs::write(&first, &bytes).unwrap();
        let fs = FsLogDir::new(dir.path()).unwrap();
        let e = RaftLog::open_with(
            Box::new(fs),
            FsyncPolicy::Never,
            WriterKind::Thread,
            64 << 10,
        )
        .unwrap_err();
        assert!(e.0.contains("(segment 1 of 2)"), "{e}");
        assert_eq!(std::fs::read(&first).unwrap(), bytes, "nothing was cut");
    }

    /// Segments whose entries are all purged go, oldest first; what they held of purge points
    /// and fields survives in the checkpoints of later segments.
    #[tokio::test]
    async fn purged_segments_are_removed_and_their_fields_kept() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![0x5a; 1 << 10];
        {
            let log = small(dir.path());
            log.write(true, vec![vote(1, b"early")]).await.unwrap();
            // 150 KiB: three segments of 64 KiB.
            for i in 1..=150 {
                log.write(true, vec![put(1, i, &big)]).await.unwrap();
            }
            assert_eq!(log.segment_count(), 3);
            log.write(true, vec![purge(1, 140, b"p140")]).await.unwrap();
            assert_eq!(
                log.segment_count(),
                1,
                "the first two segments hold only purged entries"
            );
            log.close();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let log = small(dir.path());
        assert_eq!(indexes(&log, 1), (141..=150).collect::<Vec<_>>());
        assert_eq!(log.purged(g(1)), Some((140, b"p140".to_vec())));
        assert_eq!(log.meta(g(1), "vote").unwrap(), b"early");
        assert_eq!(log.entry(g(1), 150).unwrap().unwrap(), big);
    }

    /// Replay applies a truncation recorded in one segment to the entries of an older one.
    #[tokio::test]
    async fn a_truncation_in_a_later_segment_removes_entries_of_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![1; 1 << 10];
        {
            let log = small(dir.path());
            for i in 1..=70 {
                log.write(true, vec![put(2, i, &big)]).await.unwrap();
            }
            // Segment 2 begins; truncate 30.. (entries in segment 1) and append afresh.
            log.write(true, vec![LogOp::TruncateFrom { g: g(2), index: 30 }])
                .await
                .unwrap();
            for i in 30..=100 {
                log.write(true, vec![put(2, i, b"second term")])
                    .await
                    .unwrap();
            }
            log.close();
        }
        let log = small(dir.path());
        assert_eq!(indexes(&log, 2), (1..=100).collect::<Vec<_>>());
        assert_eq!(log.entry(g(2), 50).unwrap().unwrap(), b"second term");
        assert_eq!(log.entry(g(2), 29).unwrap().unwrap(), big);
    }

    /// `always` syncs every durable append; `everysec` answers appends once written and
    /// leaves them to the flusher, but syncs a vote at once.
    #[tokio::test]
    async fn everysec_leaves_appends_to_the_flusher_and_syncs_votes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        for policy in [FsyncPolicy::Always, FsyncPolicy::Everysec] {
            let log = RaftLog::open(&dir.path().join(format!("{policy:?}")), policy).unwrap();
            let before = log.sync_count();
            log.write(true, vec![put(0, 1, b"e")]).await.unwrap();
            let after_append = log.sync_count();
            let vote = vote(0, b"v");
            log.write(true, vec![vote]).await.unwrap();
            let after_vote = log.sync_count();
            match policy {
                FsyncPolicy::Always => assert_eq!(after_append, before + 1),
                _ => assert!(after_append <= before + 1, "at most the flusher's sync"),
            }
            assert!(
                after_vote > after_append,
                "{policy:?}: a vote is synced at once"
            );
            if policy == FsyncPolicy::Everysec {
                log.write(true, vec![put(0, 2, b"e")]).await.unwrap();
                crate::test_util::wait_for_a_sync(|| log.sync_count(), 10, "no flusher sync").await;
            }
            log.close();
        }
    }

    /// A segment whose writes fail from a given moment.
    #[derive(Debug, Default)]
    struct Failing {
        inner: redb::backends::InMemoryBackend,
        fail: Arc<AtomicBool>,
    }

    impl StorageBackend for Failing {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(io::Error::other("injected fsync failure"));
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.inner.write(offset, data)
        }
    }

    struct FailingDir(Arc<AtomicBool>);

    impl LogDir for FailingDir {
        fn segments(&self) -> io::Result<Vec<u64>> {
            Ok(Vec::new())
        }
        fn open(&self, _id: u64) -> io::Result<Arc<dyn StorageBackend>> {
            Ok(Arc::new(Failing {
                fail: self.0.clone(),
                ..Failing::default()
            }))
        }
        fn remove(&self, _id: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// After a failed fsync nothing says what reached the disk: the write fails with the
    /// error, and so does every later one, even once the disk would work again.
    #[tokio::test]
    async fn a_failed_fsync_stops_the_log() {
        let fail = Arc::new(AtomicBool::new(false));
        let dir = Box::new(FailingDir(fail.clone()));
        let log =
            RaftLog::open_with(dir, FsyncPolicy::Always, WriterKind::Task, SEGMENT_BYTES).unwrap();
        log.write(true, vec![put(0, 1, b"a")]).await.unwrap();
        fail.store(true, Ordering::Relaxed);
        let e = log.write(true, vec![put(0, 2, b"b")]).await.unwrap_err();
        assert!(e.0.contains("injected fsync failure"), "{e}");
        fail.store(false, Ordering::Relaxed);
        let e = log.write(true, vec![put(0, 3, b"c")]).await.unwrap_err();
        assert!(e.0.contains("stopped after an I/O error"), "{e}");
        assert_eq!(log.entry(g(0), 1).unwrap().unwrap(), b"a");
    }

    /// A segment whose growth fails with `ENOSPC` while `full` is set, as `fallocate` does
    /// on a full disk: nothing is written.
    #[derive(Debug, Default)]
    struct NoRoom {
        inner: redb::backends::InMemoryBackend,
        full: Arc<AtomicBool>,
    }

    impl StorageBackend for NoRoom {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            if len > self.inner.len()? && self.full.load(Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.inner.write(offset, data)
        }
    }

    struct NoRoomDir(Arc<AtomicBool>);

    impl LogDir for NoRoomDir {
        fn segments(&self) -> io::Result<Vec<u64>> {
            Ok(Vec::new())
        }
        fn open(&self, _id: u64) -> io::Result<Arc<dyn StorageBackend>> {
            Ok(Arc::new(NoRoom {
                full: self.0.clone(),
                ..NoRoom::default()
            }))
        }
        fn remove(&self, _id: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A full disk does not stop the log: a write that needs the segment to grow waits,
    /// says so to the disk-space watch, and is written once there is room; nothing fails.
    #[tokio::test]
    async fn a_full_disk_makes_writes_wait_not_fail() {
        let full = Arc::new(AtomicBool::new(false));
        let dir = Box::new(NoRoomDir(full.clone()));
        let log = RaftLog::open_with(dir, FsyncPolicy::Always, WriterKind::Thread, SEGMENT_BYTES)
            .unwrap();
        let space = Arc::new(crate::DiskSpace::unlimited());
        log.watch_space(space.clone());
        log.write(true, vec![put(0, 1, b"a")]).await.unwrap();
        full.store(true, Ordering::Relaxed);
        // More than the room the first growth made (4 MiB).
        let big = vec![7u8; (GROW_BYTES + 1) as usize];
        let writer = {
            let log = log.clone();
            tokio::spawn(async move { log.write(true, vec![put(0, 2, &big)]).await })
        };
        crate::test_util::wait_until(10, "the log reports the full disk", || space.full()).await;
        assert!(!writer.is_finished(), "a write finished on a full disk");
        full.store(false, Ordering::Relaxed);
        writer.await.unwrap().unwrap();
        assert!(!space.full());
        log.write(true, vec![put(0, 3, b"c")]).await.unwrap();
        assert_eq!(indexes(&log, 0), vec![1, 2, 3]);
        log.close();
    }

    /// A power loss inside a rotation can leave the newest segment without its checkpoint.
    /// The open restates the fields there, so removing the older segments loses no vote.
    /// (Found by the simulation, `sim/src/disk.rs`.)
    #[tokio::test]
    async fn a_rotation_cut_before_its_checkpoint_loses_no_field() {
        let dir = tempfile::tempdir().unwrap();
        let vote = vote(4, b"v1");
        {
            let log = small(dir.path());
            log.write(true, vec![vote]).await.unwrap();
            for i in 1..=70 {
                log.write(true, vec![put(4, i, &[7; 1 << 10])])
                    .await
                    .unwrap();
            }
            assert_eq!(log.segment_count(), 2);
            log.close();
        }
        // The next segment was created, and the power failed before its checkpoint.
        std::fs::File::create(dir.path().join(format!("{:016x}.seg", 3))).unwrap();
        {
            let log = small(dir.path());
            let purge = purge(4, 70, b"p70");
            log.write(true, vec![purge]).await.unwrap();
            assert_eq!(
                log.segment_count(),
                1,
                "segments 1 and 2 hold only purged entries"
            );
            log.close();
        }
        let log = small(dir.path());
        assert_eq!(log.meta(g(4), "vote").unwrap(), b"v1");
        assert_eq!(log.purged(g(4)), Some((70, b"p70".to_vec())));
        assert_eq!(log.len(g(4)), 0);
    }

    /// A partition that wrote a few entries and then went quiet must not keep every segment
    /// after its own: its entries are copied forward and the old segments go.
    #[tokio::test]
    async fn a_quiet_partition_does_not_pin_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = small(dir.path());
            log.write(true, (1..=3).map(|i| put(1, i, b"quiet")).collect())
                .await
                .unwrap();
            for i in 1..=600u64 {
                log.write(true, vec![put(2, i, &[2; 1 << 10])])
                    .await
                    .unwrap();
                if i % 10 == 0 {
                    let purge = purge(2, i - 10, b"");
                    log.write(true, vec![purge]).await.unwrap();
                }
            }
            assert!(
                log.segment_count() <= 3,
                "{} segments for about 600 KiB written and 20 KiB live",
                log.segment_count()
            );
            log.close();
        }
        let log = small(dir.path());
        assert_eq!(indexes(&log, 1), vec![1, 2, 3]);
        assert_eq!(log.entry(g(1), 2).unwrap().unwrap(), b"quiet");
        assert_eq!(indexes(&log, 2), (591..=600).collect::<Vec<_>>());
        assert_eq!(log.entry(g(2), 600).unwrap().unwrap(), vec![2; 1 << 10]);
    }

    #[tokio::test]
    async fn ranges_read_across_batches_and_partitions() {
        let log = RaftLog::in_memory().unwrap();
        for i in 1..=50u64 {
            log.write(
                i % 2 == 0,
                vec![put(0, i, &i.to_le_bytes()), put(1, i, b"x")],
            )
            .await
            .unwrap();
        }
        let got = log.entries(g(0), 10..20).unwrap();
        assert_eq!(got.len(), 10);
        for (i, bytes) in got {
            assert_eq!(bytes, i.to_le_bytes());
        }
        assert_eq!(log.len(g(1)), 50);
    }
}
