//! The tear rule and the repair of damage (`recover.rs`), on real segment files.

use std::path::{Path, PathBuf};

use super::*;

/// Partition `p` of the default keyspace.
fn g(p: u32) -> GroupId {
    GroupId::default_keyspace(p)
}

/// The bytes of an entry record before the entry: kind, group, index.
const ENTRY_PREFIX: usize = 1 + 8 + 8;

fn put(p: u32, index: u64, bytes: &[u8]) -> LogOp {
    LogOp::Append {
        g: g(p),
        index,
        bytes: bytes.to_vec(),
    }
}

/// The payload of entry `i`: a kilobyte no other entry shares.
fn payload(i: u64) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8 + 1; 1 << 10];
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

fn open_checked(dir: &Path) -> Opened {
    let fs = FsLogDir::new(dir).unwrap();
    RaftLog::open_checked(
        Box::new(fs),
        FsyncPolicy::Always,
        WriterKind::Thread,
        SEGMENT_BYTES,
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

fn only_segment(dir: &Path) -> PathBuf {
    let segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].clone()
}

fn offset_of(bytes: &[u8], i: u64) -> usize {
    let needle = payload(i);
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("entry in the segment")
}

/// Writes entries 1..=n of partition 0, each in its own synced batch, then closes cleanly.
async fn written(dir: &Path, n: u64) -> PathBuf {
    let log = RaftLog::open(dir, FsyncPolicy::Always).unwrap();
    for i in 1..=n {
        log.write(true, vec![put(0, i, &payload(i))]).await.unwrap();
    }
    log.close();
    only_segment(dir)
}

fn invert(path: &Path, at: usize, n: usize) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    for b in &mut bytes[at..at + n] {
        *b = !*b;
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Sixteen inverted bytes inside an entry of the newest segment, with valid records after
/// it, are damage at the start, in the middle and at the end: never cut, whether the log is
/// opened to check or to serve.
#[tokio::test]
async fn damage_in_the_newest_segment_is_refused_at_its_start_middle_and_end() {
    for (damaged, n) in [(1, 100), (50, 100), (99, 100)] {
        let dir = tempfile::tempdir().unwrap();
        let seg = written(dir.path(), n).await;
        let before = std::fs::read(&seg).unwrap();
        let at = offset_of(&before, damaged) + 500;
        let bytes = invert(&seg, at, 16);

        let fs = FsLogDir::new(dir.path()).unwrap();
        let e = RaftLog::open_with(
            Box::new(fs),
            FsyncPolicy::Always,
            WriterKind::Thread,
            SEGMENT_BYTES,
        )
        .unwrap_err();
        assert!(e.0.contains(&seg.display().to_string()), "{e}");
        assert!(e.0.contains("damage of the medium"), "{e}");
        assert!(e.0.contains("truncate -s"), "{e}");
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was cut");

        let Opened::Damaged(d) = open_checked(dir.path()) else {
            panic!("entry {damaged}: damage taken for a clean log");
        };
        assert!(d.damage().proven_synced || damaged == n - 1);
        let after: Vec<u64> = d
            .damage()
            .after
            .iter()
            .filter_map(|op| match op {
                LogOp::Append { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(
            after,
            (damaged + 1..=n).collect::<Vec<_>>(),
            "entry {damaged}"
        );
        let kept: Vec<u64> = d
            .entries(g(0), 0..u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(kept, (1..damaged).collect::<Vec<_>>());
        drop(d);
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was cut");
    }
}

/// Damage to a record's length, so that its end cannot be found from its header: the scan
/// through every byte offset still finds the records after it.
#[tokio::test]
async fn damage_to_a_record_header_is_found_by_scanning() {
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 20).await;
    let bytes = std::fs::read(&seg).unwrap();
    // The header is 8 bytes, the entry's own prefix comes before its payload.
    let header = offset_of(&bytes, 10) - ENTRY_PREFIX - HEADER;
    invert(&seg, header, 4);
    let Opened::Damaged(d) = open_checked(dir.path()) else {
        panic!("damaged header taken for a clean log");
    };
    assert_eq!(d.damage().offset, header as u64);
    assert_eq!(
        d.damage()
            .after
            .iter()
            .filter(|op| matches!(op, LogOp::Append { .. }))
            .count(),
        10
    );
}

/// The bytes a crash left: a copy of the segment taken while the log was still open (written
/// to the OS, with no closing sync). `last_synced: false` writes the last batch without a
/// sync, as the only batch a power loss can tear under `fsync: always`.
async fn crashed_after(
    dir: &Path,
    batches: Vec<Vec<LogOp>>,
    last_synced: bool,
) -> (PathBuf, Vec<u8>) {
    let log = RaftLog::open(dir, FsyncPolicy::Always).unwrap();
    let n = batches.len();
    for (k, ops) in batches.into_iter().enumerate() {
        log.write(last_synced || k + 1 < n, ops).await.unwrap();
    }
    let seg = only_segment(dir);
    let bytes = std::fs::read(&seg).unwrap();
    log.close();
    std::fs::write(&seg, &bytes).unwrap();
    (seg, bytes)
}

/// A power loss can persist the last, unsynced write out of order: a sector of it stays
/// zeros while later sectors landed. That is a torn write, cut with what follows it.
#[tokio::test]
async fn a_torn_write_that_left_a_zeroed_sector_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let big = |i| put(0, i, &[7; 3000]);
    let last: Vec<LogOp> = vec![big(3), put(0, 4, &payload(4)), put(0, 5, &payload(5))];
    let (seg, mut bytes) = crashed_after(
        dir.path(),
        vec![vec![put(0, 1, &payload(1))], vec![big(2)], last],
        false,
    )
    .await;
    // Zero the second whole sector inside entry 3 (the last batch's first record).
    let e3 = bytes
        .windows(3000)
        .rposition(|w| w.iter().all(|b| *b == 7))
        .unwrap();
    let sector = (e3.div_ceil(512) + 1) * 512;
    bytes[sector..sector + 512].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let Opened::Ready(log) = open_checked(dir.path()) else {
        panic!("a torn write was taken for damage");
    };
    assert_eq!(indexes(&log, 0), vec![1, 2]);
    log.close();
}

/// The same zeroed sector in a batch that a later sync mark shows was synced is damage: a
/// synced write cannot be torn.
#[tokio::test]
async fn a_zeroed_sector_in_a_synced_batch_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, mut bytes) = crashed_after(
        dir.path(),
        vec![
            vec![put(0, 1, &payload(1))],
            vec![put(0, 2, &[7; 3000])],
            vec![put(0, 3, &payload(3))],
        ],
        true,
    )
    .await;
    let e2 = bytes
        .windows(3000)
        .position(|w| w.iter().all(|b| *b == 7))
        .unwrap();
    let sector = (e2.div_ceil(512) + 1) * 512;
    bytes[sector..sector + 512].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let Opened::Damaged(d) = open_checked(dir.path()) else {
        panic!("damage of a synced batch was cut as a torn write");
    };
    assert!(d.damage().proven_synced);
}

/// Inverted bytes in the last batch, which no mark shows synced, and no zeroed sector: no
/// torn write looks like that, so it is damage.
#[tokio::test]
async fn inverted_bytes_in_the_last_unsynced_batch_are_damage() {
    let dir = tempfile::tempdir().unwrap();
    let last = (1..=5).map(|i| put(0, i, &payload(i))).collect();
    let (seg, bytes) = crashed_after(dir.path(), vec![last], false).await;
    invert(&seg, offset_of(&bytes, 2) + 100, 16);
    let Opened::Damaged(d) = open_checked(dir.path()) else {
        panic!("damage taken for a torn write");
    };
    assert!(!d.damage().proven_synced);
    assert_eq!(d.damage().after.len(), 3);
}

/// A repair ends the damaged segment at the damage and keeps the caller's records; the log
/// then serves and reopens clean. A crash between the repair's new segment and its trim of
/// the damaged one is finished at the next open.
#[tokio::test]
async fn a_repair_cuts_at_the_damage_and_keeps_the_callers_records() {
    for trim_lost in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let seg = written(dir.path(), 30).await;
        let bytes = std::fs::read(&seg).unwrap();
        let damaged = invert(&seg, offset_of(&bytes, 20) + 10, 16);
        let Opened::Damaged(d) = open_checked(dir.path()) else {
            panic!("damage taken for a clean log");
        };
        let note = LogOp::Meta {
            g: g(0),
            name: "lost".into(),
            value: b"20..=30".to_vec(),
        };
        let log = d.repair(vec![note]).unwrap();
        assert_eq!(indexes(&log, 0), (1..20).collect::<Vec<_>>());
        assert_eq!(log.meta(g(0), "lost").unwrap(), b"20..=30");
        log.write(true, vec![put(0, 20, b"again")]).await.unwrap();
        log.close();
        if trim_lost {
            // The damaged segment as it was before the trim (the repair's own segment whole).
            std::fs::write(&seg, &damaged).unwrap();
        }
        let Opened::Ready(log) = open_checked(dir.path()) else {
            panic!("a repaired log is still damaged (trim lost: {trim_lost})");
        };
        assert_eq!(indexes(&log, 0), (1..=20).collect::<Vec<_>>());
        assert_eq!(log.entry(g(0), 20).unwrap().unwrap(), b"again");
        assert_eq!(log.meta(g(0), "lost").unwrap(), b"20..=30");
        log.close();
    }
}

/// A true torn tail (the last record cut short by a crash) is still cut and the log serves.
#[tokio::test]
async fn a_torn_last_record_is_still_cut() {
    let dir = tempfile::tempdir().unwrap();
    let batches = (1..=4).map(|i| vec![put(0, i, &payload(i))]).collect();
    let (seg, bytes) = crashed_after(dir.path(), batches, false).await;
    let end = offset_of(&bytes, 4) + 600;
    std::fs::write(&seg, &bytes[..end]).unwrap();
    let Opened::Ready(log) = open_checked(dir.path()) else {
        panic!("a torn tail taken for damage");
    };
    assert_eq!(indexes(&log, 0), vec![1, 2, 3]);
    log.close();
}

/// The last batch, synced and acknowledged, holding a value of zeros: 16 inverted bytes in
/// it are damage, not a tear, though the value holds zeroed sectors. The mark written right
/// after its sync proves it reached the disk (found by review: before that mark, the last
/// batch had no proof, and this was cut silently).
#[tokio::test]
async fn damage_to_zero_filled_values_in_the_last_synced_batch_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let last = vec![put(0, 2, &[0; 3000]), put(0, 3, &payload(3))];
    let (seg, bytes) =
        crashed_after(dir.path(), vec![vec![put(0, 1, &payload(1))], last], true).await;
    let e2 = offset_of(&bytes, 3) - ENTRY_PREFIX - HEADER - 3000;
    invert(&seg, e2 + 1000, 16);
    let Opened::Damaged(d) = open_checked(dir.path()) else {
        panic!("damage of an acknowledged batch was cut as a torn write");
    };
    assert!(d.damage().proven_synced);
}

/// A value of random bytes, torn by a crash in the middle of its write, and one whose length
/// field is damaged: both judged at once (the scan's candidates are filtered before any
/// checksum, and its work is bounded over the whole judgement), the torn one cut, the
/// damaged one refused.
#[tokio::test]
async fn large_random_records_are_judged_without_a_quadratic_scan() {
    let random = |n: usize, seed: u64| -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let big = random(16 << 20, 7);
    // Torn: the write stopped a quarter into the value; the rest of the segment is zeros.
    let dir = tempfile::tempdir().unwrap();
    let (seg, bytes) = crashed_after(
        dir.path(),
        vec![vec![put(0, 1, &payload(1))], vec![put(0, 2, &big)]],
        false,
    )
    .await;
    let start = bytes.windows(64).position(|w| w == &big[..64]).unwrap();
    let mut torn = bytes.clone();
    torn[start + (4 << 20)..].fill(0);
    std::fs::write(&seg, &torn).unwrap();
    let begun = std::time::Instant::now();
    let Opened::Ready(log) = open_checked(dir.path()) else {
        panic!("a torn write of a large value taken for damage");
    };
    assert_eq!(indexes(&log, 0), vec![1]);
    log.close();
    eprintln!("torn 16 MiB record judged in {:?}", begun.elapsed());

    // Damaged length of a synced large record, with its sync mark after it.
    let dir = tempfile::tempdir().unwrap();
    let (seg, bytes) = crashed_after(
        dir.path(),
        vec![vec![put(0, 1, &payload(1))], vec![put(0, 2, &big)]],
        true,
    )
    .await;
    let start = bytes.windows(64).position(|w| w == &big[..64]).unwrap();
    invert(&seg, start - ENTRY_PREFIX - HEADER + 1, 2);
    let begun = std::time::Instant::now();
    let Opened::Damaged(d) = open_checked(dir.path()) else {
        panic!("a damaged length of a synced record taken for a tear");
    };
    assert!(d.damage().proven_synced && d.damage().complete);
    eprintln!("damaged 16 MiB record judged in {:?}", begun.elapsed());
}
