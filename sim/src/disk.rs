//! `SimDisk`: a simulated disk under one redb database, that outlives the `Database` on it.
//!
//! It keeps two images of the file: the bytes as written (what the OS page cache holds) and
//! the bytes as of the last `sync_data` (what is on the platter), plus the writes made since
//! that sync, in order. A crash detaches the disk from the crashed process's `Database` first:
//! whatever that `Database` writes afterwards (redb's clean-close commit when it drops, jobs
//! still queued on the crashed store's writer) lands on a copy nobody reads again. The image a
//! restart opens is then:
//! - after a process crash, the written image (the OS kept its page cache), still unsynced;
//! - after a power loss, the synced image;
//! - after a power loss with a torn tail, the synced image plus a prefix of the unsynced
//!   writes, the last of them cut to a prefix of its bytes.
//!
//! The power can also fail inside a write or a sync (`Power::arm`), in the middle of a commit:
//! the disk detaches itself at that instant and clears the node's `alive` flag, so that no
//! storage call of the node succeeds from then on; the driver completes the crash after the
//! step. Tearing the unsynced tail then tears the commit in progress.
//!
//! Tearing stays within what redb says it
//!   tolerates (docs/design.md, "Assumptions about underlying media"): single bytes are
//!   written atomically, a synced write is durable, and a write changes no byte outside its
//!   range.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use redb::StorageBackend;

/// One write since the last sync, in the order redb made it.
#[derive(Clone)]
enum Op {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

impl Op {
    fn apply(&self, to: &mut Vec<u8>) {
        match self {
            Op::Write { offset, data } => to[*offset..*offset + data.len()].copy_from_slice(data),
            Op::SetLen(len) => to.resize(*len, 0),
        }
    }
}

#[derive(Clone, Default)]
struct Image {
    /// The file as written (the page cache).
    written: Vec<u8>,
    /// The file as of the last `sync_data`.
    synced: Vec<u8>,
    /// Every write since that sync, oldest first: replayed onto `synced` at the next sync.
    unsynced: Vec<Op>,
}

/// How a node went down, for the image its restart opens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CrashKind {
    /// The process died; the machine (and its page cache) did not.
    Process,
    /// The machine lost power: only synced bytes are left, and with `Power::tear`, a prefix
    /// of the unsynced writes, the last in part.
    PowerLoss,
}

/// What one crash did to one disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashEffect {
    /// Unsynced writes at the crash.
    pub unsynced: usize,
    /// Of those, how many reached the disk (all after a process crash, none after a clean
    /// power loss), and whether the next one reached it in part (a torn write).
    pub kept: usize,
    pub torn: bool,
}

/// One machine's power supply, shared by its disks (one incarnation: a restart gets a new
/// one). `arm` makes the power fail inside the n-th write or sync to come, on either disk: in
/// the middle of a commit, between its writes and its fsync, or inside the fsync.
pub struct Power {
    /// The incarnation's `alive` flag, cleared when the power fails, so that the node's tasks
    /// see no storage call succeed from then on.
    alive: Arc<AtomicBool>,
    countdown: Option<u64>,
    failed: bool,
    /// Whether the unsynced tail is torn, and the stream that picks how much of it survives.
    tear: bool,
    rng: ChaCha8Rng,
}

pub type SharedPower = Arc<Mutex<Power>>;

impl Power {
    pub fn new(alive: Arc<AtomicBool>) -> SharedPower {
        Arc::new(Mutex::new(Power {
            alive,
            countdown: None,
            failed: false,
            tear: false,
            rng: ChaCha8Rng::seed_from_u64(0),
        }))
    }

    /// The power fails inside the `ops`-th write or sync from now (0: the next one).
    pub fn arm(&mut self, ops: u64, tear: bool, seed: u64) {
        self.countdown = Some(ops);
        self.set_tear(tear, seed);
    }

    pub fn set_tear(&mut self, tear: bool, seed: u64) {
        self.tear = tear;
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// No failure to come (the healed phase).
    pub fn disarm(&mut self) {
        if !self.failed {
            self.countdown = None;
        }
    }

    pub fn armed(&self) -> bool {
        self.countdown.is_some() && !self.failed
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Counts one write or sync; true once the power has failed (this call included).
    fn tick(&mut self) -> bool {
        if !self.failed {
            match self.countdown {
                Some(0) => {
                    self.failed = true;
                    self.alive.store(false, Ordering::SeqCst);
                }
                Some(c) => self.countdown = Some(c - 1),
                None => {}
            }
        }
        self.failed
    }
}

struct Disk {
    /// What the current incarnation sees (after a crash, a copy only it uses).
    live: Image,
    /// Set at the crash: the image the next incarnation opens. From then on the disk is
    /// detached: `live` changes, this does not.
    restart: Option<(Image, CrashEffect)>,
}

impl Image {
    fn after(&self, kind: CrashKind, power: &mut Power) -> (Image, CrashEffect) {
        let unsynced = self.unsynced.len();
        let mut effect = CrashEffect {
            unsynced,
            ..Default::default()
        };
        if kind == CrashKind::Process {
            effect.kept = unsynced;
            return (self.clone(), effect);
        }
        let mut disk = self.synced.clone();
        if power.tear {
            let kept = power.rng.random_range(0..=unsynced);
            for op in &self.unsynced[..kept] {
                op.apply(&mut disk);
            }
            effect.kept = kept;
            if let Some(Op::Write { offset, data }) = self.unsynced.get(kept) {
                let part = power.rng.random_range(0..data.len().max(1));
                if part > 0 {
                    disk[*offset..*offset + part].copy_from_slice(&data[..part]);
                    effect.torn = true;
                }
            }
        }
        let image = Image {
            written: disk.clone(),
            synced: disk,
            unsynced: Vec::new(),
        };
        (image, effect)
    }
}

/// The driver's handle on one of a node's disks. `backend()` gives the redb backend of the
/// current incarnation; `crash()` detaches it, and the next `backend()` opens the image the
/// crash left.
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk {
            disk: Arc::new(Mutex::new(Disk {
                live: Image::default(),
                restart: None,
            })),
        }
    }

    /// The backend to open the next `Database` on, powered by `power`.
    pub fn backend(&self, power: SharedPower) -> DiskBackend {
        DiskBackend {
            disk: self.disk.clone(),
            power,
        }
    }

    /// The node crashed: detaches the disk (unless the power already failed inside a storage
    /// call, which detached it then), so that nothing the crashed incarnation still writes
    /// reaches it, and readies the image the restart opens.
    pub fn crash(&mut self, kind: CrashKind, power: &SharedPower) -> CrashEffect {
        let (image, effect) = {
            let mut disk = self.disk.lock().unwrap();
            let disk = &mut *disk;
            disk.restart
                .take()
                .unwrap_or_else(|| disk.live.after(kind, &mut power.lock().unwrap()))
        };
        self.disk = Arc::new(Mutex::new(Disk {
            live: image,
            restart: None,
        }));
        effect
    }
}

/// A redb `StorageBackend` over one incarnation's view of a `SimDisk`.
pub struct DiskBackend {
    disk: Arc<Mutex<Disk>>,
    power: SharedPower,
}

impl DiskBackend {
    /// Before each write or sync: once the power has failed, the disk is detached, with the
    /// image it had at that instant.
    fn tick(&self, disk: &mut Disk) {
        if disk.restart.is_some() {
            return;
        }
        let mut power = self.power.lock().unwrap();
        if power.tick() {
            disk.restart = Some(disk.live.after(CrashKind::PowerLoss, &mut power));
        }
    }
}

impl fmt::Debug for DiskBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("DiskBackend")
            .field("len", &disk.live.written.len())
            .field("unsynced_writes", &disk.live.unsynced.len())
            .finish()
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "beyond the end of the disk")
}

impl StorageBackend for DiskBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.disk.lock().unwrap().live.written.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let disk = self.disk.lock().unwrap();
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = offset.checked_add(out.len()).ok_or_else(out_of_range)?;
        let src = disk
            .live
            .written
            .get(offset..end)
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let mut disk = self.disk.lock().unwrap();
        self.tick(&mut disk);
        disk.live.written.resize(len, 0);
        disk.live.unsynced.push(Op::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut disk = self.disk.lock().unwrap();
        self.tick(&mut disk);
        let image = &mut disk.live;
        for op in image.unsynced.drain(..) {
            op.apply(&mut image.synced);
        }
        debug_assert_eq!(image.synced.len(), image.written.len());
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = offset.checked_add(data.len()).ok_or_else(out_of_range)?;
        let mut disk = self.disk.lock().unwrap();
        self.tick(&mut disk);
        disk.live
            .written
            .get_mut(offset..end)
            .ok_or_else(out_of_range)?
            .copy_from_slice(data);
        disk.live.unsynced.push(Op::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, Durability, ReadableDatabase, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn put(db: &Database, k: u64, durability: Durability) {
        let mut tx = db.begin_write().unwrap();
        tx.set_durability(durability).unwrap();
        tx.open_table(T).unwrap().insert(k, k).unwrap();
        tx.commit().unwrap();
    }

    fn keys(db: &Database) -> Vec<u64> {
        let tx = db.begin_read().unwrap();
        let Ok(t) = tx.open_table(T) else {
            return Vec::new();
        };
        use redb::ReadableTable;
        t.iter().unwrap().map(|r| r.unwrap().0.value()).collect()
    }

    fn open(disk: &SimDisk, power: &SharedPower) -> Database {
        redb::Builder::new()
            .create_with_backend(disk.backend(power.clone()))
            .unwrap()
    }

    #[test]
    fn images_after_a_process_crash_and_a_power_loss() {
        let bytes = |b: &DiskBackend| {
            let mut out = vec![0; b.len().unwrap() as usize];
            b.read(0, &mut out).unwrap();
            out
        };
        let mut disk = SimDisk::new();
        let power = Power::new(Default::default());
        let b = disk.backend(power.clone());
        b.set_len(4).unwrap();
        b.write(0, b"abcd").unwrap();
        b.sync_data().unwrap();
        b.write(1, b"XY").unwrap();
        let e = disk.crash(CrashKind::Process, &power);
        assert_eq!((e.unsynced, e.kept), (1, 1));
        // The crashed incarnation writes on, to a detached copy.
        b.write(0, b"zzzz").unwrap();
        let b = disk.backend(power.clone());
        assert_eq!(bytes(&b), b"aXYd");
        // Still unsynced after the process crash: a power loss now loses it.
        let e = disk.crash(CrashKind::PowerLoss, &power);
        assert_eq!((e.unsynced, e.kept, e.torn), (1, 0, false));
        assert_eq!(bytes(&disk.backend(power.clone())), b"abcd");
    }

    #[test]
    fn a_torn_tail_is_a_prefix_of_the_unsynced_writes() {
        for seed in 0..50 {
            let mut disk = SimDisk::new();
            let power = Power::new(Default::default());
            let b = disk.backend(power.clone());
            b.set_len(8).unwrap();
            b.sync_data().unwrap();
            b.write(0, b"1111").unwrap();
            b.write(4, b"2222").unwrap();
            power.lock().unwrap().set_tear(true, seed);
            let e = disk.crash(CrashKind::PowerLoss, &power);
            let b = disk.backend(power.clone());
            let mut out = [0u8; 8];
            b.read(0, &mut out).unwrap();
            let s: String = out
                .iter()
                .map(|&c| if c == 0 { '.' } else { c as char })
                .collect();
            let torn_len = s.trim_end_matches('.').len();
            assert!(s.starts_with(&"11112222"[..torn_len]), "{s}");
            assert_eq!(e.kept, torn_len / 4, "{s} {e:?}");
            assert_eq!(e.torn, !torn_len.is_multiple_of(4), "{s} {e:?}");
        }
    }

    #[test]
    fn redb_keeps_durable_commits_across_a_power_loss() {
        let mut disk = SimDisk::new();
        let power = Power::new(Default::default());
        let db = open(&disk, &power);
        put(&db, 1, Durability::Immediate);
        put(&db, 2, Durability::None);
        disk.crash(CrashKind::PowerLoss, &power);
        drop(db);
        let db = open(&disk, &power);
        assert_eq!(keys(&db), vec![1]);
    }

    /// The power fails inside every write or sync of a durable commit in turn: redb reopens
    /// the image each time, with the commit either whole or absent.
    #[test]
    fn redb_reopens_after_a_power_loss_inside_a_commit() {
        for ops in 0..40 {
            for tear in [false, true] {
                let mut disk = SimDisk::new();
                let alive = Arc::new(AtomicBool::new(true));
                let power = Power::new(alive.clone());
                let db = open(&disk, &power);
                put(&db, 1, Durability::Immediate);
                power.lock().unwrap().arm(ops, tear, ops);
                put(&db, 2, Durability::Immediate);
                let failed = power.lock().unwrap().failed();
                assert_eq!(failed, !alive.load(Ordering::SeqCst));
                disk.crash(CrashKind::PowerLoss, &power);
                drop(db);
                let db = open(&disk, &Power::new(Default::default()));
                let got = keys(&db);
                assert!(
                    got == vec![1] || (got == vec![1, 2]),
                    "ops {ops} tear {tear}: {got:?}"
                );
                if !failed {
                    assert_eq!(got, vec![1, 2]);
                }
            }
        }
    }
}
