//! Opening the log: every segment is replayed in order into the index, and where the newest
//! segment's good records end is judged — a torn tail, which is cut, or damage, which is never
//! cut silently.
//!
//! **The tear rule.** Replay of a segment stops at the first record that fails: its header is
//! cut short, its length is zero with non-zero bytes after it, runs past the end of the file
//! or beyond [`MAX_RECORD`], or its checksum does not match (the *stop*). Then:
//! 1. Every byte from the stop to the end of the file is zero: the clean end (the zeros a
//!    segment grows by), not a stop at all.
//! 2. No valid record anywhere after the stop (every byte offset is tried): a **tear**, the
//!    incomplete last record or the garbage after the last complete one that a crash leaves.
//!    Cut at the stop.
//! 3. Valid records after the stop, and a sync mark among them says the bytes at the stop had
//!    been synced: **damage**.
//! 4. Valid records after the stop, no such mark: the bytes at the stop may be part of the
//!    unsynced tail, which a power loss can persist out of order. A torn write leaves whole
//!    sectors unwritten, and unwritten bytes of a segment read as zeros (a segment grows by
//!    zero-filled extension and no byte of it is written twice): if an aligned 512-byte
//!    sector between the stop and the next valid record is all zeros, it is a **tear** (cut
//!    at the stop, with everything after it: never synced, so never acknowledged under
//!    `fsync: always`); otherwise **damage**.
//!
//! In a segment before the newest, any stop is damage: each was synced whole before the next
//! began. The one exception is a stop that the next segment's first record names (a `CUT`):
//! the cut a repair made (below), whose trim of the damaged segment a crash interrupted.
//!
//! **Damage** is never cut here. [`RaftLog::open_checked`] returns a [`DamagedLog`] with the
//! stop and the valid records after it, and the caller decides: refuse to start
//! ([`DamagedLog::refusal`]), or [`DamagedLog::repair`]: a new segment is created whole
//! (atomically: it exists with all its bytes or not at all) holding a `CUT` of the damaged
//! segment at the stop, a checkpoint, and the caller's records (what it must remember about
//! what was lost); then the damaged segment is trimmed at the stop. A crash at any point
//! leaves either the damage as found (the repair runs again) or the repair whole.

use std::collections::BTreeSet;
use std::sync::Arc;

use redb::StorageBackend;

use super::{
    decode_record, err, group_of, read_locs, Active, GroupId, Index, LogDir, LogOp, Record,
    Segment, StorageError, HEADER, MAX_RECORD,
};

/// The unit a torn write leaves unwritten.
const SECTOR: usize = 512;
/// The resynchronising scan gives up (and calls the stop damage, of unknown extent) after
/// checksumming this many times the segment's bytes, over the whole judgement.
const SCAN_WORK_FACTOR: usize = 64;
/// No record the scan looks for is longer (a value is at most 32 MiB, `limits`).
const SCAN_MAX_RECORD: usize = 64 << 20;
/// Partitions below this are looked for even if no record before the stop named them.
const SCAN_SMALL_PARTITIONS: u32 = 4096;

/// What replaying the segments gave: the index, the segment to append to, and any damage.
pub(super) struct Recovered {
    pub index: Index,
    pub active: Active,
    pub damage: Option<Damage>,
}

/// Damage in the newest segment: a record that fails, with valid records after it.
#[derive(Clone, Debug)]
pub struct Damage {
    pub segment: u64,
    /// The segment's file, as its directory names it.
    pub file: String,
    /// Where the good records end.
    pub offset: u64,
    pub reason: String,
    /// Whether a later sync mark proves the damaged bytes had been synced.
    pub proven_synced: bool,
    /// The valid records after the damage, in order: what a repair discards.
    pub after: Vec<LogOp>,
    /// Where each record of `after` begins in the segment.
    pub after_offsets: Vec<u64>,
    /// The spans of the segment in records that failed (the damaged one first, then any
    /// later): what of the log was lost besides `after` lies in them.
    pub bad_spans: Vec<BadSpan>,
    /// Their total length.
    pub lost_bytes: u64,
    /// False when the scan gave up: `after` and `lost_bytes` are then only a part, and the
    /// damage may have held anything.
    pub complete: bool,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {}: {}, and {} valid records follow it ({}), so it is damage of the \
             medium, not a torn write",
            self.file,
            self.offset,
            self.reason,
            self.after.len(),
            if self.proven_synced {
                "a later sync mark shows those bytes had been synced"
            } else {
                "no zeroed sector, as a torn write would leave"
            }
        )
    }
}

/// A span of the segment whose records failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadSpan {
    pub start: u64,
    pub end: u64,
    /// The span is exactly one record: the valid record after it begins where the damaged
    /// record's own length says it ends.
    pub one_record: bool,
}

/// Where one segment's replay stopped, and why (`None`: at its clean end).
struct Stop {
    end: usize,
    why: Option<String>,
}

/// Replays every segment in order into an index and judges the newest one's end (module
/// note). A tear is cut; damage is returned, with nothing cut.
pub(super) fn recover(dir: &dyn LogDir) -> Result<Recovered, StorageError> {
    let mut ids = dir.segments().map_err(err)?;
    ids.sort_unstable();
    let mut index = Index::default();
    let mut last: Option<(u64, Arc<dyn StorageBackend>, u64, u64)> = None;
    let mut damage = None;
    for (k, &id) in ids.iter().enumerate() {
        let file = dir.open(id).map_err(err)?;
        let len = file.len().map_err(err)?;
        let mut bytes = vec![0; len as usize];
        file.read(0, &mut bytes).map_err(err)?;
        index.segments.insert(
            id,
            Segment {
                file: file.clone(),
                live: 0,
            },
        );
        let stop = replay(&bytes, id, &mut index)?;
        let end = stop.end as u64;
        // Whether to cut the file at `end`: not for the zeros of a clean end (room already
        // allocated; keeping it lets a start on a full disk write its checkpoint).
        let mut cut = false;
        if let Some(why) = stop.why {
            match ids.get(k + 1) {
                Some(&next) => {
                    if !cut_by_next(dir, next, id, end)? {
                        // Every segment before the last was synced whole before the next
                        // began: this is damage, not a torn write. Cutting here would drop
                        // synced votes and acknowledged entries, and could bring back
                        // truncated ones.
                        return Err(err(format!(
                            "the Raft log is damaged: {} (segment {id} of {}), offset {end}: \
                             {why}. Refusing to start on it; move this node's data directory \
                             away and start the node on an empty one to take a fresh copy \
                             from its replicas",
                            dir.name(id),
                            ids.len()
                        )));
                    }
                    // A repair's cut, whose trim a crash interrupted: the segment ends here.
                    tracing::info!(segment = id, offset = end, "finishing a repair's cut");
                    cut = true;
                }
                None => match judge(
                    &bytes,
                    stop.end,
                    why,
                    &index.parts.keys().copied().collect(),
                ) {
                    Judgement::Tear(why) => {
                        cut = true;
                        tracing::warn!(
                            segment = id,
                            offset = end,
                            reason = %why,
                            "cutting a torn tail off the Raft log (an incomplete last write); \
                             leaders send those entries again"
                        );
                    }
                    Judgement::Damage(mut d) => {
                        d.segment = id;
                        d.file = dir.name(id);
                        // The segment is left exactly as found until the caller decides.
                        damage = Some(d);
                    }
                },
            }
        }
        let mut kept = len;
        if cut {
            // Cut the torn tail so that the next records are written right after the last
            // good one, over zeros.
            file.set_len(end).map_err(err)?;
            file.sync_data().map_err(err)?;
            kept = end;
        }
        last = Some((id, file, end, kept));
    }
    let active = match last {
        Some((id, file, end, len)) => {
            let mut active = Active::at(id, file, end);
            active.len = len;
            active
        }
        None => {
            let file = dir.open(1).map_err(err)?;
            dir.sync().map_err(err)?;
            index.segments.insert(
                1,
                Segment {
                    file: file.clone(),
                    live: 0,
                },
            );
            Active::at(1, file, 0)
        }
    };
    Ok(Recovered {
        index,
        active,
        damage,
    })
}

/// Applies one segment's records to `index`; stops at the first record that fails.
fn replay(bytes: &[u8], seg: u64, index: &mut Index) -> Result<Stop, StorageError> {
    let mut off = 0usize;
    loop {
        match read_at(bytes, off) {
            Read::End => {
                return Ok(Stop {
                    end: off,
                    why: None,
                })
            }
            Read::Bad(why) => {
                return Ok(Stop {
                    end: off,
                    why: Some(why),
                })
            }
            Read::Good { len, body } => {
                let (record, payload) = decode_record(body).map_err(|e| {
                    err(format!(
                        "Raft log segment {seg}, offset {off}: {e} (written by a newer replikv?)"
                    ))
                })?;
                if let Record::Op(op) = record {
                    index.apply(op, seg, (off + HEADER + payload) as u64);
                }
                off += HEADER + len;
            }
        }
    }
}

enum Read<'a> {
    /// Only zeros from here on.
    End,
    Bad(String),
    Good {
        len: usize,
        body: &'a [u8],
    },
}

/// Reads the record at `off`, checking its length and checksum.
fn read_at(bytes: &[u8], off: usize) -> Read<'_> {
    if off + HEADER > bytes.len() {
        return match bytes[off.min(bytes.len())..].iter().all(|b| *b == 0) {
            true => Read::End,
            false => Read::Bad("a partial record header".into()),
        };
    }
    let len = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return match bytes[off..].iter().all(|b| *b == 0) {
            true => Read::End,
            false => Read::Bad("a record header of zero length before non-zero bytes".into()),
        };
    }
    if len > MAX_RECORD || off + HEADER + len > bytes.len() {
        return Read::Bad(format!("a record of {len} bytes runs past the end"));
    }
    let stored = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().expect("4 bytes"));
    let body = &bytes[off + HEADER..off + HEADER + len];
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Read::Bad(format!(
            "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
        ));
    }
    Read::Good { len, body }
}

enum Judgement {
    Tear(String),
    Damage(Damage),
}

/// Decides whether the newest segment's stop at `stop` is a tear or damage (module note).
/// `known`: the groups seen before the stop, which the scan for valid records looks for.
fn judge(bytes: &[u8], stop: usize, why: String, known: &BTreeSet<GroupId>) -> Judgement {
    let mut scan = Scanner {
        bytes,
        known,
        budget: SCAN_WORK_FACTOR * bytes.len().max(1 << 20),
    };
    let damage = |after: Vec<(u64, LogOp)>, proven_synced, bad_spans: Vec<BadSpan>, complete| {
        let (after_offsets, after) = after.into_iter().unzip();
        Judgement::Damage(Damage {
            segment: 0,
            file: String::new(),
            offset: stop as u64,
            reason: why.clone(),
            proven_synced,
            after,
            after_offsets,
            lost_bytes: bad_spans.iter().map(|s| s.end - s.start).sum(),
            bad_spans,
            complete,
        })
    };
    let span = |start: usize, end: usize, one_record: bool| BadSpan {
        start: start as u64,
        end: end as u64,
        one_record,
    };
    let (first, one) = match scan.next_valid(stop) {
        Scan::Found(at, one) => (at, one),
        Scan::None => return Judgement::Tear(format!("{why}; no valid record after it")),
        // Too much work to tell: never a silent cut. Everything after the stop counts as
        // lost, and as possibly anything.
        Scan::GaveUp => {
            return damage(
                Vec::new(),
                false,
                vec![span(stop, bytes.len(), false)],
                false,
            );
        }
    };
    let mut after = Vec::new();
    let mut proven_synced = false;
    let mut spans = vec![span(stop, first, one)];
    let mut complete = true;
    let mut off = first;
    loop {
        match read_at(bytes, off) {
            Read::End => break,
            Read::Bad(_) => match scan.next_valid(off) {
                Scan::Found(next, one) => {
                    spans.push(span(off, next, one));
                    off = next;
                }
                Scan::None => {
                    let written = bytes.iter().rposition(|b| *b != 0).map_or(off, |i| i + 1);
                    if written > off {
                        spans.push(span(off, written, false));
                    }
                    break;
                }
                Scan::GaveUp => {
                    spans.push(span(off, bytes.len(), false));
                    complete = false;
                    break;
                }
            },
            Read::Good { len, body } => {
                match decode_record(body) {
                    Ok((Record::Op(op), _)) => after.push((off as u64, op)),
                    Ok((Record::Synced(upto), _)) => {
                        proven_synced |= upto as usize > stop && upto as usize <= off
                    }
                    Ok((Record::Cut { .. }, _)) | Err(_) => {}
                }
                off += HEADER + len;
            }
        }
    }
    if !proven_synced
        && (zeroed_sector(bytes, stop, first) || zero_to_sector_end(bytes, stop, first))
    {
        return Judgement::Tear(format!(
            "{why}; a zeroed sector follows (a write cut short), and no sync mark shows those \
             bytes had reached the disk"
        ));
    }
    damage(after, proven_synced, spans, complete)
}

/// The resynchronising scan for valid records after a stop, with one bound on its work for
/// the whole judgement (a scan through hostile or random bytes could otherwise checksum
/// every offset's claimed length, quadratic in the segment).
struct Scanner<'a> {
    bytes: &'a [u8],
    known: &'a BTreeSet<GroupId>,
    budget: usize,
}

enum Scan {
    /// A valid record begins here; `true` when that is where the damaged record's own
    /// length says it ends.
    Found(usize, bool),
    None,
    GaveUp,
}

impl Scanner<'_> {
    /// The first offset after `stop` where a valid record begins, trying the damaged
    /// record's own length first, then every byte offset.
    fn next_valid(&mut self, stop: usize) -> Scan {
        let bytes = self.bytes;
        if let Some(len) = bytes
            .get(stop..stop + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        {
            let next = stop + HEADER + len;
            if len > 0 && len <= MAX_RECORD && is_valid(bytes, next) {
                return Scan::Found(next, true);
            }
        }
        let mut at = stop + 1;
        while at + HEADER + 5 <= bytes.len() {
            if self.candidate(at) {
                let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
                let len = len as usize;
                if self.budget < len {
                    return Scan::GaveUp;
                }
                self.budget -= len;
                if is_valid(bytes, at) {
                    return Scan::Found(at, false);
                }
            }
            at += 1;
        }
        Scan::None
    }

    /// Cheap checks before a checksum: a plausible length, a known kind, and a group seen
    /// before the stop (or a small partition number, or the meta group: a group's first
    /// records may follow it). The marks (`SYNCED`, `CUT`) name partition 0.
    fn candidate(&self, at: usize) -> bool {
        let bytes = self.bytes;
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if !(5..=SCAN_MAX_RECORD).contains(&len) || at + HEADER + len > bytes.len() {
            return false;
        }
        let kind = bytes[at + HEADER];
        if !super::is_kind(kind) {
            return false;
        }
        let rest = &bytes[at + HEADER + 1..at + HEADER + len];
        match group_of(kind, rest) {
            Some((g, _)) => {
                g.partition < SCAN_SMALL_PARTITIONS || g.is_meta() || self.known.contains(&g)
            }
            None => rest.get(..4) == Some(&[0; 4][..]),
        }
    }
}

/// Whether a record that passes its checksum and decodes begins at `at`.
fn is_valid(bytes: &[u8], at: usize) -> bool {
    match read_at(bytes, at) {
        Read::Good { body, .. } => decode_record(body).is_ok(),
        _ => false,
    }
}

/// Whether an aligned sector lying wholly between `from` and `to` is all zeros.
fn zeroed_sector(bytes: &[u8], from: usize, to: usize) -> bool {
    let mut s = from.div_ceil(SECTOR) * SECTOR;
    while s + SECTOR <= to.min(bytes.len()) {
        if bytes[s..s + SECTOR].iter().all(|b| *b == 0) {
            return true;
        }
        s += SECTOR;
    }
    false
}

/// Whether the bytes from `stop` to the end of its sector (or to `to`) are all zeros: the
/// sector that held the end of the last synced write and the start of a torn one, persisted
/// as it was before that write.
fn zero_to_sector_end(bytes: &[u8], stop: usize, to: usize) -> bool {
    let end = ((stop / SECTOR + 1) * SECTOR).min(to).min(bytes.len());
    end > stop && bytes[stop..end].iter().all(|b| *b == 0)
}

/// Whether segment `next` begins with a repair's cut of segment `seg` at `offset`.
fn cut_by_next(dir: &dyn LogDir, next: u64, seg: u64, offset: u64) -> Result<bool, StorageError> {
    let file = dir.open(next).map_err(err)?;
    let len = file.len().map_err(err)? as usize;
    let mut head = vec![0; len.min(HEADER + 64)];
    file.read(0, &mut head).map_err(err)?;
    Ok(match read_at(&head, 0) {
        Read::Good { body, .. } => matches!(
            decode_record(body),
            Ok((Record::Cut { seg: s, offset: o }, _)) if s == seg && o == offset
        ),
        _ => false,
    })
}

/// A log whose newest segment is damaged (module note): the state replayed up to the damage,
/// readable, and nothing written yet. [`DamagedLog::repair`] or [`DamagedLog::refusal`].
pub struct DamagedLog {
    pub(super) dir: Box<dyn LogDir>,
    pub(super) index: Index,
    pub(super) active: Active,
    pub(super) damage: Damage,
    pub(super) open: super::OpenOptions,
}

impl DamagedLog {
    pub fn damage(&self) -> &Damage {
        &self.damage
    }

    /// Every group with records before the damage.
    pub fn groups(&self) -> Vec<GroupId> {
        self.index.parts.keys().copied().collect()
    }

    /// Entries of group `g` before the damage, with index in `range`.
    pub fn entries(
        &self,
        g: GroupId,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let (locs, files) = self.index.locate(g, range);
        read_locs(&locs, &files)
    }

    /// The indexes of group `g`'s entries before the damage, in `range`.
    pub fn indexes(&self, g: GroupId, range: std::ops::Range<u64>) -> Vec<u64> {
        self.index
            .parts
            .get(&g)
            .map(|x| x.entries.range(range).map(|(i, _)| *i).collect())
            .unwrap_or_default()
    }

    /// The last entry of group `g` before the damage.
    pub fn last(&self, g: GroupId) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let Some(&last) = self
            .index
            .parts
            .get(&g)
            .and_then(|x| x.entries.keys().last())
        else {
            return Ok(None);
        };
        Ok(self.entries(g, last..last + 1)?.pop())
    }

    /// Group `g`'s field `name` as of the damage.
    pub fn meta(&self, g: GroupId, name: &str) -> Option<Vec<u8>> {
        self.index.parts.get(&g)?.meta.get(name).cloned()
    }

    /// Group `g`'s purge point as of the damage.
    pub fn purged(&self, g: GroupId) -> Option<(u64, Vec<u8>)> {
        self.index.parts.get(&g)?.purged.clone()
    }

    /// The error to start with when nothing can replace what the damage lost: names the
    /// file, the offset, `why` no repair is possible, and how to recover.
    pub fn refusal(&self, why: &str) -> StorageError {
        let d = &self.damage;
        err(format!(
            "the Raft log is damaged: {d}. Refusing to start: {why}. To recover, restore this \
             node's data directory from a backup, or start it on an empty one if other \
             replicas hold the data; or, to start anyway and lose every record from that \
             offset on, cut the file there (truncate -s {} {}) and start again",
            d.offset, d.file
        ))
    }

    /// Repairs the log (module note): the damaged segment ends at the damage, and `ops` (the
    /// caller's account of what was lost) are written in the same new segment as the cut.
    pub fn repair(self, ops: Vec<LogOp>) -> Result<super::RaftLog, StorageError> {
        let DamagedLog {
            dir,
            mut index,
            active,
            damage,
            open,
        } = self;
        let id = active.id + 1;
        let mut buf = Vec::new();
        super::encode_cut(damage.segment, damage.offset, &mut buf);
        for op in index.checkpoint() {
            op.encode(&mut buf);
        }
        let mut placed = Vec::new();
        for op in ops {
            let payload = op.encode(&mut buf);
            placed.push((op, payload));
        }
        let file = dir.create_whole(id, &buf).map_err(err)?;
        index.segments.insert(
            id,
            Segment {
                file: file.clone(),
                live: 0,
            },
        );
        for (op, payload) in placed {
            index.apply(op, id, payload as u64);
        }
        // The new segment holds the cut: now the damaged one may lose its tail.
        active.file.set_len(damage.offset).map_err(err)?;
        active.file.sync_data().map_err(err)?;
        tracing::error!(
            file = %damage.file,
            offset = damage.offset,
            discarded_records = damage.after.len(),
            "the Raft log was damaged; cut at the damage, with what was lost recorded"
        );
        let mut next = Active::at(id, file, buf.len() as u64);
        next.synced_to = next.end;
        super::RaftLog::start(dir, index, next, open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zeroed_sector_must_lie_wholly_inside_the_range() {
        let mut bytes = vec![1u8; 4 * SECTOR];
        bytes[SECTOR..2 * SECTOR].fill(0);
        assert!(zeroed_sector(&bytes, 10, 2 * SECTOR));
        assert!(!zeroed_sector(&bytes, SECTOR + 1, 4 * SECTOR));
        assert!(!zeroed_sector(&bytes, 0, 2 * SECTOR - 1));
    }
}
