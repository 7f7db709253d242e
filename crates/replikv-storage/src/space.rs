//! [`DiskSpace`]: how much room the data directory's filesystem has left, and whether new
//! writes may still take it.
//!
//! Below `storage.min_free_bytes` free, the node takes no new data (its leaders refuse
//! writes, its followers refuse new entries) so that what must still be written always fits:
//! votes, truncations, purges (which free space), segment checkpoints and the state file's
//! checkpoints of entries already in the log. The log writer meanwhile never fails on a full
//! disk: a segment grows by `fallocate`, which either reserves the room or fails having
//! written nothing, and the writer retries that until there is room again
//! (docs/design/durability.md, "A full disk").

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The data directory's free space, refreshed by the caller's clock (the node's ticker).
#[derive(Debug)]
pub struct DiskSpace {
    path: PathBuf,
    min_free_bytes: u64,
    free: AtomicU64,
    total: AtomicU64,
    /// Free space is below `min_free_bytes`.
    low: AtomicBool,
    /// The log writer is waiting for room to grow a segment (`ENOSPC`).
    full: AtomicBool,
}

/// Free space is "back" only this far above the reserve, so that the state does not flap.
const HYSTERESIS_BYTES: u64 = 4 << 20;

impl DiskSpace {
    /// Watches the filesystem of `path`, keeping `min_free_bytes` in reserve.
    pub fn new(path: &Path, min_free_bytes: u64) -> DiskSpace {
        let space = DiskSpace {
            path: path.to_path_buf(),
            min_free_bytes,
            free: AtomicU64::new(u64::MAX),
            total: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
            full: AtomicBool::new(false),
        };
        space.refresh();
        space
    }

    /// A filesystem that never runs out (memory, the simulation's disks).
    pub fn unlimited() -> DiskSpace {
        DiskSpace::simulated(0, u64::MAX)
    }

    /// No filesystem behind it: the free space is whatever [`DiskSpace::set_free_bytes`]
    /// last said (the seam the deterministic simulation fills a node's disk through).
    pub fn simulated(min_free_bytes: u64, free_bytes: u64) -> DiskSpace {
        let space = DiskSpace {
            path: PathBuf::new(),
            min_free_bytes,
            free: AtomicU64::new(free_bytes),
            total: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
            full: AtomicBool::new(false),
        };
        space.refresh();
        space
    }

    /// Sets the free space of a [`DiskSpace::simulated`] one (a real one reads it again at
    /// its next refresh).
    pub fn set_free_bytes(&self, free: u64) {
        self.free.store(free, Ordering::Relaxed);
    }

    /// Reads the free space again; returns whether new writes are refused now.
    pub fn refresh(&self) -> bool {
        if let Some((free, total)) = statvfs(&self.path) {
            self.free.store(free, Ordering::Relaxed);
            self.total.store(total, Ordering::Relaxed);
        }
        let free = self.free.load(Ordering::Relaxed);
        let low = self.low.load(Ordering::Relaxed);
        let now_low = if low {
            free < self.min_free_bytes.saturating_add(HYSTERESIS_BYTES)
        } else {
            free < self.min_free_bytes
        };
        self.low.store(now_low, Ordering::Relaxed);
        self.refusing()
    }

    /// Whether new data is refused: free space is below the reserve, or the log is waiting
    /// for room.
    pub fn refusing(&self) -> bool {
        self.low.load(Ordering::Relaxed) || self.full.load(Ordering::Relaxed)
    }

    /// Whether the log writer is waiting for room (the filesystem is full).
    pub fn full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    pub(crate) fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Relaxed);
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why new data is refused, for errors, `/ready` and logs; `None` when it is not.
    pub fn refusal(&self) -> Option<String> {
        let free = self.free_bytes();
        if self.full() {
            Some(format!(
                "the disk holding {} is full ({} bytes free): the Raft log cannot grow",
                self.path.display(),
                free
            ))
        } else if self.low.load(Ordering::Relaxed) {
            Some(format!(
                "the disk holding {} has {free} bytes free, below storage.min_free_bytes ({})",
                self.path.display(),
                self.min_free_bytes
            ))
        } else {
            None
        }
    }
}

/// (free bytes for unprivileged users, total bytes) of the filesystem holding `path`.
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().is_empty() {
        return None;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

/// Whether `e` says the filesystem is out of room.
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}
