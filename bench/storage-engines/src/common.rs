//! What every engine under test implements, and small helpers shared by the
//! scenarios.

use std::fs;
use std::path::Path;
use std::time::Duration;

/// Entries to append to one Raft group: indexes `first, first + 1, ...`.
pub struct GroupAppend<'a> {
    pub group: usize,
    pub first: u64,
    pub payloads: &'a [Vec<u8>],
}

/// The Raft-log side of an engine.
///
/// Every `append` and `purge` is one durable commit: when it returns the data
/// has been fsync'ed (fdatasync'ed, for the engines that use that).
/// Closing is dropping.
pub trait LogStore {
    /// Create an empty store with `groups` Raft logs in `dir` (a fresh directory).
    fn create(dir: &Path, groups: usize) -> Self
    where
        Self: Sized;
    /// Open an existing store, ready to serve reads of every group.
    fn open(dir: &Path, groups: usize) -> Self
    where
        Self: Sized;
    /// Append the given entries, all groups together, as ONE durable commit
    /// where the engine can do that (raft-log cannot: it flushes one log per
    /// group, in parallel).
    fn append(&mut self, items: &[GroupAppend<'_>]);
    /// Read entries `[from, to)` of `group`; returns how many were read.
    fn read_range(&self, group: usize, from: u64, to: u64) -> usize;
    /// Delete entries `[first, upto]` of `group`, durably.
    fn purge(&mut self, group: usize, first: u64, upto: u64);
}

/// The state-machine side of an engine.
pub trait KvStore: Sized {
    fn create(dir: &Path) -> Self;
    /// One transaction, committed WITHOUT fsync.
    fn apply(&mut self, kvs: &[([u8; 16], [u8; 100])]);
    /// Make everything applied so far durable (one fsync).
    fn persist(&mut self);
    /// Point read; returns the value length if found.
    fn get(&self, key: &[u8]) -> Option<usize>;
    /// Iterate the whole keyspace; returns (entries, key+value bytes).
    fn scan(&self) -> (usize, usize);
}

/// Bytes allocated on disk under `dir` (like `du`), and apparent size.
pub fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut alloc = 0;
    let mut apparent = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let md = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if md.is_dir() {
                let (a, b) = dir_size(&e.path());
                alloc += a;
                apparent += b;
            } else {
                alloc += md.blocks() * 512;
                apparent += md.len();
            }
        }
    }
    (alloc, apparent)
}

pub fn fresh_dir(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("create bench dir");
}

/// Percentile of a sorted slice of durations.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
