//! `SimDisk`: a simulated disk under one redb database (or one Raft log segment), that
//! outlives the `Database` (or `RaftLog`) on it. `SimLogDir`: a simulated directory of log
//! segments, one `SimDisk` per segment, whose creations and removals are durable only once
//! the directory is synced (below, at `SimLogDir`).
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use redb::StorageBackend;
use replikv_storage::LogDir;

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
/// one). `arm` makes the power fail inside the n-th write or sync to come, on any of its
/// disks (a segment's creation, removal and the log directory's sync count too): in the
/// middle of a commit, between its writes and its fsync, or inside the fsync.
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
/// crash left. (A clone shares the disk until one of them crashes: `SimLogDir` keeps the
/// crashed incarnation's handles on the old disks.)
#[derive(Clone)]
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

/// One storage call's tick of the power supply: if the power fails now, `restart` takes what
/// `after` says survives (unless the power already failed).
fn power_tick<T>(
    power: &SharedPower,
    restart: &mut Option<T>,
    after: impl FnOnce(&mut Power) -> T,
) {
    if restart.is_some() {
        return;
    }
    let mut power = power.lock().unwrap();
    if power.tick() {
        *restart = Some(after(&mut power));
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
        power_tick(&self.power, &mut disk.restart, |power| {
            disk.live.after(CrashKind::PowerLoss, power)
        });
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

/// A change to a log directory's listing since its last `sync` (a directory fsync).
#[derive(Clone, Copy, Debug)]
enum DirOp {
    /// Segment `id` was created, as file `inode`.
    Create {
        id: u64,
        inode: u64,
    },
    Remove {
        id: u64,
    },
}

/// A log directory's listing: segment id → file (an inode number of `Dir::files`).
#[derive(Clone, Default)]
struct Listing {
    /// As of the last directory sync.
    synced: BTreeMap<u64, u64>,
    /// The creations and removals since, oldest first.
    unsynced: Vec<DirOp>,
}

impl Listing {
    /// `synced` with the first `n` unsynced changes applied.
    fn with(&self, n: usize) -> BTreeMap<u64, u64> {
        let mut names = self.synced.clone();
        for op in &self.unsynced[..n] {
            match *op {
                DirOp::Create { id, inode } => {
                    names.insert(id, inode);
                }
                DirOp::Remove { id } => {
                    names.remove(&id);
                }
            }
        }
        names
    }

    /// The listing as the process sees it.
    fn current(&self) -> BTreeMap<u64, u64> {
        self.with(self.unsynced.len())
    }

    /// Every file the listing names, or may name again after a power loss.
    fn files(&self) -> BTreeSet<u64> {
        let mut files: BTreeSet<u64> = self.synced.values().copied().collect();
        for op in &self.unsynced {
            if let DirOp::Create { inode, .. } = op {
                files.insert(*inode);
            }
        }
        files
    }

    /// The listing a crash of `kind` leaves, as `Image::after` does for a file's bytes: all of
    /// it after a process crash, the synced listing after a power loss, and with a torn tail,
    /// the synced listing plus a prefix of the unsynced changes.
    fn after(&self, kind: CrashKind, power: &mut Power) -> (Listing, CrashEffect) {
        let unsynced = self.unsynced.len();
        let mut effect = CrashEffect {
            unsynced,
            ..Default::default()
        };
        if kind == CrashKind::Process {
            effect.kept = unsynced;
            return (self.clone(), effect);
        }
        let kept = if power.tear {
            power.rng.random_range(0..=unsynced)
        } else {
            0
        };
        effect.kept = kept;
        let listing = Listing {
            synced: self.with(kept),
            unsynced: Vec::new(),
        };
        (listing, effect)
    }
}

struct Dir {
    /// Every segment file the listing names or may name again after a power loss (in either
    /// listing, when the directory is detached), by inode number.
    files: BTreeMap<u64, SimDisk>,
    next_inode: u64,
    /// What the current incarnation sees.
    live: Listing,
    /// As `Disk::restart`: set once the power failed inside a storage call of this directory.
    restart: Option<(Listing, CrashEffect)>,
    /// Segments created and removed, over every incarnation (for the statistics).
    created: u64,
    removed: u64,
}

impl Dir {
    /// Forgets the files no listing can name any more.
    fn collect(&mut self) {
        let mut keep = self.live.files();
        if let Some((restart, _)) = &self.restart {
            keep.extend(restart.files());
        }
        self.files.retain(|inode, _| keep.contains(inode));
    }
}

/// The driver's handle on a node's Raft log directory: one `SimDisk` per segment file, and a
/// listing whose changes (creating and removing segments) are durable only once the
/// directory is synced, as on a real file system. `backend()` gives the
/// `replikv_storage::LogDir` of the current incarnation; `crash()` detaches the directory and
/// every segment disk and readies what the restart opens:
/// - process crash: the listing as it was, changes since the last directory sync included
///   (still unsynced: a later power loss can still undo them), and each segment file as
///   written;
/// - power loss: the listing as of the last directory sync (an unsynced removal is undone,
///   an unsynced creation dropped), and each segment file as of its last `sync_data`;
/// - power loss with a torn tail (`Power::set_tear`): the synced listing plus a prefix of the
///   unsynced changes, and each segment file with a torn tail of its own.
///
/// Creating, removing and syncing count as storage calls for `Power::arm`, so the power can
/// fail between a segment's creation or removal and the directory sync.
pub struct SimLogDir {
    dir: Arc<Mutex<Dir>>,
}

/// What one crash did to a node's log directory.
#[derive(Clone, Debug, Default)]
pub struct DirCrashEffect {
    /// The creations and removals of segments not yet synced, and how many of them survived.
    pub listing: CrashEffect,
    /// Every segment file the restart sees, by segment id.
    pub segments: Vec<(u64, CrashEffect)>,
}

impl SimLogDir {
    pub fn new() -> SimLogDir {
        SimLogDir {
            dir: Arc::new(Mutex::new(Dir {
                files: BTreeMap::new(),
                next_inode: 1,
                live: Listing::default(),
                restart: None,
                created: 0,
                removed: 0,
            })),
        }
    }

    /// The `LogDir` to open the next `RaftLog` on, powered by `power`.
    pub fn backend(&self, power: SharedPower) -> LogDirBackend {
        LogDirBackend {
            dir: self.dir.clone(),
            power,
        }
    }

    /// Segments created and removed so far, over every incarnation.
    pub fn counts(&self) -> (u64, u64) {
        let dir = self.dir.lock().unwrap();
        (dir.created, dir.removed)
    }

    /// The node crashed: detaches the directory and every segment disk (the crashed
    /// incarnation goes on with copies nobody reads again), and readies the listing and the
    /// files the restart opens. Segments in inode order, so the torn tails drawn from the
    /// power's stream are the same on every run.
    pub fn crash(&mut self, kind: CrashKind, power: &SharedPower) -> DirCrashEffect {
        let (next, effect) = {
            let mut guard = self.dir.lock().unwrap();
            let dir = &mut *guard;
            let (listing, listing_effect) = dir
                .restart
                .take()
                .unwrap_or_else(|| dir.live.after(kind, &mut power.lock().unwrap()));
            let names: BTreeMap<u64, u64> = listing
                .current()
                .into_iter()
                .map(|(id, inode)| (inode, id))
                .collect();
            let mut files = BTreeMap::new();
            let mut segments = Vec::new();
            for inode in listing.files() {
                // A clone: the crashed incarnation's directory keeps the old disk.
                let mut disk = dir
                    .files
                    .get(&inode)
                    .expect("a listed segment file")
                    .clone();
                let e = disk.crash(kind, power);
                if let Some(id) = names.get(&inode) {
                    segments.push((*id, e));
                }
                files.insert(inode, disk);
            }
            segments.sort_by_key(|(id, _)| *id);
            let next = Dir {
                files,
                next_inode: dir.next_inode,
                live: listing,
                restart: None,
                created: dir.created,
                removed: dir.removed,
            };
            let effect = DirCrashEffect {
                listing: listing_effect,
                segments,
            };
            (next, effect)
        };
        self.dir = Arc::new(Mutex::new(next));
        effect
    }
}

/// Where bit rot inverted bytes of a log segment (`SimLogDir::rot`).
#[derive(Clone, Copy, Debug)]
pub struct Rot {
    pub segment: u64,
    pub offset: usize,
    pub len: usize,
}

/// One record of a segment image: where it lies, its kind (of layout 1: a layout 2 kind
/// is read as the layout 1 kind it stands for), its partition, and where in its body the
/// kind's fields begin (after the group it names).
struct Record {
    start: usize,
    kind: u8,
    partition: u32,
    fields: usize,
}

/// The kind byte of an entry record (`replikv_storage`'s raft_log format, layout 1).
const ENTRY_RECORD: u8 = 1;
/// Layout 2's kinds of one group are layout 1's plus this; they name the keyspace after the
/// partition.
const LAYOUT2: u8 = 6;

/// The records of a segment image from offset 0 while they run valid, and where the last
/// one ends. The framing is `replikv_storage`'s (raft_log/mod.rs: `[len u32 LE][crc32c u32
/// LE of body][body]`, the body `[kind u8][partition u32 LE]`, for layout 2 kinds then
/// `[keyspace u32 LE]`, ...); the simulation reads it
/// only to place bit rot where the tear rule must call it damage.
fn records(bytes: &[u8]) -> (Vec<Record>, usize) {
    const HEADER: usize = 8;
    let (mut out, mut at) = (Vec::new(), 0);
    while at + HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let end = at + HEADER + len;
        if len < 5 || end > bytes.len() || crc32c::crc32c(&bytes[at + HEADER..end]) != crc {
            break;
        }
        let body = &bytes[at + HEADER..end];
        let (kind, fields) = match body[0] {
            k @ 7..=10 if len >= 9 => (k - LAYOUT2, 9),
            k => (k, 5),
        };
        out.push(Record {
            start: at,
            kind,
            partition: u32::from_le_bytes(body[1..5].try_into().expect("4 bytes")),
            fields,
        });
        at = end;
    }
    (out, at)
}

impl SimLogDir {
    /// Every segment the restart will open, with its records (for `-v`): kind, partition and
    /// index (or field name), with offsets.
    pub fn describe(&self) -> String {
        let dir = self.dir.lock().unwrap();
        let mut out = String::new();
        for (id, inode) in dir.live.current() {
            let disk = dir.files[&inode].disk.lock().unwrap();
            let bytes = &disk.live.written;
            let (recs, end) = records(bytes);
            out.push_str(&format!(
                "  segment {id} ({} bytes, records end at {end}):",
                bytes.len()
            ));
            for r in &recs {
                let body = &bytes[r.start + 8..];
                let f = r.fields;
                let what = match r.kind {
                    1..=3 => format!(
                        "{}{}",
                        ["", "A", "T", "P"][r.kind as usize],
                        u64::from_le_bytes(body[f..f + 8].try_into().expect("8 bytes"))
                    ),
                    4 => {
                        String::from_utf8_lossy(&body[f + 1..f + 1 + body[f] as usize]).into_owned()
                    }
                    5 => "synced".into(),
                    _ => "cut".into(),
                };
                out.push_str(&format!(" {}:p{}:{what}", r.start, r.partition));
            }
            out.push('\n');
        }
        out
    }
}

impl SimLogDir {
    /// Bit rot while the node is down (after its crash, before its restart): inverts `len`
    /// bytes of the newest segment the restart will open, in records that had been synced,
    /// at a place drawn from `rng`. The place always has a whole record after it in the file
    /// (with `entry_of`, an entry of that partition), because a synced record with nothing
    /// valid after it is exactly what a write torn by a crash leaves, and the tear rule cuts
    /// it (docs/design/durability.md): that is damage no log can tell from a tear. `None`
    /// when the segment has no such place (or a write not yet synced covers it).
    pub fn rot(&self, rng: &mut ChaCha8Rng, len: usize, entry_of: Option<u32>) -> Option<Rot> {
        let dir = self.dir.lock().unwrap();
        assert!(dir.restart.is_none(), "bit rot while the node is down");
        let (&segment, &inode) = dir.live.current().iter().next_back()?;
        let disk = dir.files.get(&inode)?;
        let mut disk = disk.disk.lock().unwrap();
        assert!(disk.restart.is_none(), "bit rot while the node is down");
        let image = &mut disk.live;
        let (written, _) = records(&image.written);
        let (_, synced_end) = records(&image.synced);
        let follows = written
            .iter()
            .rev()
            .find(|r| entry_of.is_none_or(|p| r.kind == ENTRY_RECORD && r.partition == p))?;
        let hi = follows.start.min(synced_end);
        if hi < len {
            return None;
        }
        let offset = rng.random_range(0..=hi - len);
        let range = offset..offset + len;
        // A write since the last sync that touches the range would put old bytes back at
        // the next sync: rot only what no pending write covers.
        let pending = image.unsynced.iter().any(|op| match op {
            Op::Write { offset: o, data } => *o < range.end && o + data.len() > range.start,
            Op::SetLen(l) => *l < range.end,
        });
        if pending || image.written[range.clone()] != image.synced[range.clone()] {
            return None;
        }
        for b in image.written[range.clone()]
            .iter_mut()
            .chain(image.synced[range].iter_mut())
        {
            *b = !*b;
        }
        Some(Rot {
            segment,
            offset,
            len,
        })
    }
}

/// `replikv_storage::LogDir` over one incarnation's view of a `SimLogDir`.
pub struct LogDirBackend {
    dir: Arc<Mutex<Dir>>,
    power: SharedPower,
}

impl LogDirBackend {
    /// Before each creation, removal or sync: as `DiskBackend::tick`, the directory detaches
    /// itself with the listing it had when the power failed.
    fn tick(&self, dir: &mut Dir) {
        power_tick(&self.power, &mut dir.restart, |power| {
            dir.live.after(CrashKind::PowerLoss, power)
        });
    }
}

impl LogDir for LogDirBackend {
    fn segments(&self) -> io::Result<Vec<u64>> {
        Ok(self
            .dir
            .lock()
            .unwrap()
            .live
            .current()
            .into_keys()
            .collect())
    }

    fn open(&self, id: u64) -> io::Result<Arc<dyn StorageBackend>> {
        let mut dir = self.dir.lock().unwrap();
        let inode = match dir.live.current().get(&id) {
            Some(inode) => *inode,
            None => {
                self.tick(&mut dir);
                let inode = dir.next_inode;
                dir.next_inode += 1;
                dir.files.insert(inode, SimDisk::new());
                dir.live.unsynced.push(DirOp::Create { id, inode });
                dir.created += 1;
                inode
            }
        };
        Ok(Arc::new(dir.files[&inode].backend(self.power.clone())))
    }

    fn remove(&self, id: u64) -> io::Result<()> {
        let mut dir = self.dir.lock().unwrap();
        if !dir.live.current().contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no log segment {id}"),
            ));
        }
        self.tick(&mut dir);
        dir.live.unsynced.push(DirOp::Remove { id });
        dir.removed += 1;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut dir = self.dir.lock().unwrap();
        self.tick(&mut dir);
        let dir = &mut *dir;
        dir.live.synced = dir.live.current();
        dir.live.unsynced.clear();
        dir.collect();
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

    fn listing(dir: &SimLogDir, power: &SharedPower) -> Vec<u64> {
        let mut ids = dir.backend(power.clone()).segments().unwrap();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn segment_creations_and_removals_last_once_the_directory_is_synced() {
        let mut dir = SimLogDir::new();
        let power = Power::new(Default::default());
        let d = dir.backend(power.clone());
        d.open(1).unwrap();
        d.open(2).unwrap();
        d.sync().unwrap();
        d.remove(1).unwrap();
        d.open(3).unwrap();
        // A process crash keeps both changes, still unsynced ...
        let e = dir.crash(CrashKind::Process, &power);
        assert_eq!((e.listing.unsynced, e.listing.kept), (2, 2));
        assert_eq!(listing(&dir, &power), vec![2, 3]);
        // ... so a power loss now undoes them: segment 1 is back, 3 is gone.
        let e = dir.crash(CrashKind::PowerLoss, &power);
        assert_eq!((e.listing.unsynced, e.listing.kept), (2, 0));
        assert_eq!(listing(&dir, &power), vec![1, 2]);
        // Synced changes survive a power loss.
        let d = dir.backend(power.clone());
        d.remove(1).unwrap();
        d.sync().unwrap();
        dir.crash(CrashKind::PowerLoss, &power);
        assert_eq!(listing(&dir, &power), vec![2]);
        assert_eq!(dir.counts(), (3, 2));
    }

    #[test]
    fn a_torn_listing_is_a_prefix_of_the_unsynced_changes() {
        let mut seen = BTreeSet::new();
        for seed in 0..40 {
            let mut dir = SimLogDir::new();
            let power = Power::new(Default::default());
            let d = dir.backend(power.clone());
            d.open(1).unwrap();
            d.sync().unwrap();
            d.open(2).unwrap();
            d.remove(1).unwrap();
            d.open(3).unwrap();
            power.lock().unwrap().set_tear(true, seed);
            let e = dir.crash(CrashKind::PowerLoss, &power);
            let got = listing(&dir, &power);
            let want = [vec![1], vec![1, 2], vec![2], vec![2, 3]][e.listing.kept].clone();
            assert_eq!(got, want, "seed {seed}");
            seen.insert(e.listing.kept);
        }
        assert_eq!(seen.len(), 4);
    }

    /// The real `RaftLog` on `dir`, with 1 KiB segments and a task writer.
    fn open_small_log(dir: &SimLogDir, power: &SharedPower) -> replikv_storage::RaftLog {
        use replikv_storage::{FsyncPolicy, RaftLog, WriterKind};
        RaftLog::open_with(
            Box::new(dir.backend(power.clone())),
            FsyncPolicy::Always,
            WriterKind::Task,
            1024,
        )
        .unwrap()
    }

    /// The real `RaftLog` on a `SimLogDir` with small segments (rotations, checkpoints and
    /// removals of purged segments), the power failing inside each of its storage calls in
    /// turn: every acknowledged durable append survives, the log runs without a hole from its
    /// purge point, and each entry reads back as written.
    #[test]
    fn the_raft_log_reopens_after_a_power_loss_at_each_storage_call() {
        use replikv_storage::LogOp;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let open = open_small_log;
        let bytes = |i: u64| vec![i as u8; 60 + (i % 7) as usize];
        let (mut rotated, mut removed) = (false, false);
        for ops in (0..400).step_by(3) {
            for tear in [false, true] {
                let mut dir = SimLogDir::new();
                let alive = Arc::new(AtomicBool::new(true));
                let power = Power::new(alive.clone());
                let log = open(&dir, &power);
                power.lock().unwrap().arm(ops, tear, ops);
                let mut acked = 0;
                for i in 1..=120u64 {
                    let mut batch = vec![LogOp::Append {
                        p: 0,
                        index: i,
                        bytes: bytes(i),
                    }];
                    if i % 20 == 0 {
                        batch.push(LogOp::PurgeTo {
                            p: 0,
                            index: i - 5,
                            tag: (i - 5).to_le_bytes().to_vec(),
                        });
                    }
                    let ok = log.write_now(batch).is_ok();
                    if !alive.load(Ordering::SeqCst) {
                        break;
                    }
                    assert!(ok);
                    acked = i;
                }
                let (created, gone) = dir.counts();
                rotated |= created > 2;
                removed |= gone > 0;
                dir.crash(CrashKind::PowerLoss, &power);
                drop(log);
                let log = open(&dir, &Power::new(Default::default()));
                let purged = log.purged(0).map_or(0, |(i, _)| i);
                let last = log.last(0).unwrap().map_or(purged, |(i, _)| i);
                let why = format!("ops {ops} tear {tear}: acked {acked}, purged {purged}");
                assert!(last >= acked, "{why}, last {last}");
                let got = log.entries(0, 0..u64::MAX).unwrap();
                let want: Vec<(u64, Vec<u8>)> =
                    (purged + 1..=last).map(|i| (i, bytes(i))).collect();
                assert_eq!(got, want, "{why}");
            }
        }
        assert!(rotated && removed);
    }

    /// Bit rot (`SimLogDir::rot`) lands where the tear rule must call it damage: the real
    /// log, reopened on the rotted image, reports damage at or before the rotted bytes in the
    /// rotted segment, every time.
    #[test]
    fn bit_rot_in_synced_records_is_found_as_damage() {
        use replikv_storage::{FsyncPolicy, LogOp, Opened, RaftLog, WriterKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut found = 0;
        for seed in 0..40u64 {
            let mut dir = SimLogDir::new();
            let power = Power::new(Default::default());
            let log = open_small_log(&dir, &power);
            for i in 1..=(10 + seed) {
                log.write_now(vec![LogOp::Append {
                    p: 0,
                    index: i,
                    bytes: vec![i as u8; 60],
                }])
                .unwrap();
            }
            dir.crash(CrashKind::Process, &power);
            drop(log);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let Some(rot) = dir.rot(&mut rng, 16, Some(0)) else {
                continue;
            };
            let opened = RaftLog::open_checked(
                Box::new(dir.backend(Power::new(Default::default()))),
                FsyncPolicy::Always,
                WriterKind::Task,
                1024,
            )
            .unwrap();
            let Opened::Damaged(d) = opened else {
                panic!("seed {seed}: {rot:?} opened as a whole log");
            };
            let damage = d.damage();
            assert_eq!(damage.segment, rot.segment, "seed {seed}");
            assert!(
                damage.offset as usize <= rot.offset,
                "seed {seed}: {damage}"
            );
            assert!(
                damage
                    .after
                    .iter()
                    .any(|op| matches!(op, LogOp::Append { .. })),
                "seed {seed}: an entry follows the rot"
            );
            found += 1;
        }
        assert!(found >= 30, "only {found} of 40 logs had room for bit rot");
    }

    /// The power fails inside a rotation, after the new segment's creation is synced in the
    /// directory but before its checkpoint is: the fields only the old segment held must
    /// survive the old segment's removal. Failed before every open wrote a checkpoint (the
    /// vote was lost with the power failing inside the checkpoint's write or sync, or inside
    /// the directory sync with the creation kept): see "Findings" in README.md.
    #[test]
    fn fields_survive_a_power_loss_inside_a_rotation_and_the_old_segments_removal() {
        use replikv_storage::LogOp;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let open = open_small_log;
        let put = |i: u64| LogOp::Append {
            p: 0,
            index: i,
            bytes: vec![7; 100],
        };
        let mut lost = Vec::new();
        for ops in 0..60 {
            for tear in [false, true] {
                let mut dir = SimLogDir::new();
                let alive = Arc::new(AtomicBool::new(true));
                let power = Power::new(alive.clone());
                let log = open(&dir, &power);
                log.write_now(vec![LogOp::Meta {
                    p: 0,
                    name: "vote".into(),
                    value: b"v1".to_vec(),
                }])
                .unwrap();
                power.lock().unwrap().arm(ops, tear, ops);
                let mut i = 0;
                while alive.load(Ordering::SeqCst) && log.segment_count() < 3 {
                    i += 1;
                    log.write_now(vec![put(i)]).unwrap();
                }
                dir.crash(CrashKind::PowerLoss, &power);
                drop(log);
                let power = Power::new(Default::default());
                let log = open(&dir, &power);
                let last = log.last(0).unwrap().map_or(0, |(i, _)| i);
                for j in last + 1..=last + 3 {
                    log.write_now(vec![put(j)]).unwrap();
                }
                log.write_now(vec![LogOp::PurgeTo {
                    p: 0,
                    index: last + 3,
                    tag: Vec::new(),
                }])
                .unwrap();
                dir.crash(CrashKind::Process, &power);
                drop(log);
                let log = open(&dir, &Power::new(Default::default()));
                if log.meta(0, "vote").is_none() {
                    lost.push((ops, tear));
                }
            }
        }
        assert!(
            lost.is_empty(),
            "the vote is lost with the power failing at {lost:?}"
        );
    }
}
