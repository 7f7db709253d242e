//! [`Store`]: the redb database, its writer (an OS thread, or a tokio task) and the typed
//! transactions.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::backends::InMemoryBackend;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::raft_log::{DamagedLog, FsLogDir, Opened, RaftLog, SEGMENT_BYTES};
use replikv_types::{GroupId, KeyspaceId, DEFAULT_KEYSPACE_ID};

/// The tables of one keyspace, each keyed by partition first: `meta`, `kv` and `snapshot`
/// for keyspace 0 (`default`, the names of every state file written before there were other
/// keyspaces, so that such a file opens as it is), `meta@N`, `kv@N` and `snapshot@N` for
/// keyspace `N` (dropping a keyspace drops its tables). The meta group's are those of
/// keyspace `GroupId::META_KEYSPACE`.
struct TableNames {
    meta: String,
    kv: String,
    snapshot: String,
}

impl TableNames {
    fn of(keyspace: KeyspaceId) -> TableNames {
        let name = |base: &str| match keyspace {
            0 => base.to_string(),
            n => format!("{base}@{n}"),
        };
        TableNames {
            meta: name("meta"),
            kv: name("kv"),
            snapshot: name("snapshot"),
        }
    }

    fn meta(&self) -> TableDefinition<'_, (u32, &'static str), &'static [u8]> {
        TableDefinition::new(&self.meta)
    }

    fn kv(&self) -> TableDefinition<'_, (u32, &'static [u8]), &'static [u8]> {
        TableDefinition::new(&self.kv)
    }

    fn snapshot(&self) -> TableDefinition<'_, u32, &'static [u8]> {
        TableDefinition::new(&self.snapshot)
    }
}

/// A table that no write has created yet reads as empty.
fn absent_is_empty<T>(r: Result<T, redb::TableError>) -> Result<Option<T>, StorageError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// Most jobs one write transaction takes; bounds the latency of the first job in a batch.
const MAX_JOBS_PER_COMMIT: usize = 4096;

#[derive(Debug, thiserror::Error, Clone)]
#[error("storage: {0}")]
pub struct StorageError(pub String);

pub(crate) fn err(e: impl std::fmt::Display) -> StorageError {
    StorageError(e.to_string())
}

/// When a commit reaches the disk (`storage.fsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every durable write is fsynced before it is acknowledged; concurrent writes share one
    /// fsync (group commit).
    #[default]
    Always,
    /// As `always` for durable writes (the Raft log, votes, snapshots), plus a background
    /// flush once a second that also makes the other writes (checkpoints of applies) durable.
    Everysec,
    /// As `always` for durable writes, with a checkpoint every 10 s. Durable writes stay
    /// fsynced: an unsynced Raft log lets a crash of every node lose acknowledged writes and
    /// diverge replicas (`docs/design/durability.md`).
    Never,
}

impl FsyncPolicy {
    /// How often a store's background flusher syncs under this policy: never under `always`,
    /// once a second under `everysec`, every 10 s under `never`.
    pub fn flush_every(self) -> Option<Duration> {
        match self {
            FsyncPolicy::Always => None,
            FsyncPolicy::Everysec => Some(Duration::from_secs(1)),
            FsyncPolicy::Never => Some(Duration::from_secs(10)),
        }
    }
}

/// Starts a store's writer on the executor `kind` names: `batch` runs for each job the writer
/// wakes up for (it may drain more from the queue), and `finish` once every sender is gone.
/// Returns the thread to join, for a thread writer.
pub(crate) fn spawn_writer<J: Send + 'static>(
    kind: WriterKind,
    name: &str,
    mut rx: mpsc::UnboundedReceiver<J>,
    mut batch: impl FnMut(J, &mut mpsc::UnboundedReceiver<J>) + Send + 'static,
    finish: impl FnOnce() + Send + 'static,
) -> Result<Option<std::thread::JoinHandle<()>>, StorageError> {
    match kind {
        WriterKind::Thread => std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    batch(first, &mut rx);
                }
                finish();
            })
            .map(Some)
            .map_err(err),
        WriterKind::Task => {
            let runtime = tokio::runtime::Handle::try_current()
                .map_err(|e| err(format!("a task writer needs a tokio runtime: {e}")))?;
            runtime.spawn(async move {
                while let Some(first) = rx.recv().await {
                    batch(first, &mut rx);
                }
                finish();
            });
            Ok(None)
        }
    }
}

/// Runs `tick` every `every` on the executor `kind` names (the writer's), until it returns
/// false: a store's background flusher.
pub(crate) fn spawn_flusher(
    kind: WriterKind,
    name: &str,
    every: Duration,
    tick: impl Fn() -> bool + Send + 'static,
) {
    match kind {
        WriterKind::Thread => {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    std::thread::sleep(every);
                    while tick() {
                        std::thread::sleep(every);
                    }
                })
                .expect("spawning a flusher thread");
        }
        WriterKind::Task => {
            tokio::spawn(async move {
                tokio::time::sleep(every).await;
                while tick() {
                    tokio::time::sleep(every).await;
                }
            });
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "everysec" => Ok(FsyncPolicy::Everysec),
            "never" => Ok(FsyncPolicy::Never),
            _ => Err(format!(
                "unknown fsync policy {s:?}; allowed: always, everysec, never"
            )),
        }
    }
}

type JobFn = Box<dyn FnOnce(&mut WriteTx<'_>) -> Result<(), StorageError> + Send>;
type DoneFn = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

struct Job {
    /// Must reach the disk (fsync) before `done` runs, under every policy: the Raft log's
    /// appends, votes and snapshots ask for it (`docs/design/durability.md`).
    durable: bool,
    run: JobFn,
    done: DoneFn,
}

/// Where a store's writer (and its flusher, under `everysec` and `never`) runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterKind {
    /// A dedicated OS thread: the server's choice, so that commits and fsyncs never hold up
    /// the async runtime.
    Thread,
    /// A task on the current tokio runtime, which must exist when the store opens. For the
    /// deterministic simulation, where everything runs on one thread: the writer then commits
    /// only when the runtime polls it.
    Task,
}

/// The node's Raft logs (append-only segment files, `raft_log.rs`) and state machines (a redb
/// file), each with a writer of its own, so that applying committed entries never waits
/// behind the log's fsyncs.
///
/// Safe across crashes because the state file's durable point never falls behind what the
/// log has purged: the log is purged only below a snapshot, writing a snapshot is a durable
/// commit of the state file, which makes every earlier apply durable too, and a purge after a
/// leader's snapshot waits for that snapshot's commit (`replikv-raft`'s `PurgeGate`).
#[derive(Clone)]
pub struct Stores {
    /// Raft logs, votes and commit points.
    pub log: RaftLog,
    /// State machines, applied offsets, memberships and snapshots.
    pub state: Store,
}

impl Stores {
    /// The directory of the Raft log's segments.
    pub const LOG_DIR: &'static str = "log";
    pub const STATE_FILE: &'static str = "state.redb";
    /// Where releases before the segment log kept the Raft log.
    const OLD_LOG_FILE: &'static str = "log.redb";

    /// Opens both stores under `dir`; a damaged Raft log (`raft_log/recover.rs`) is refused.
    pub fn open(dir: &Path, policy: FsyncPolicy) -> Result<Stores, StorageError> {
        Stores::open_repairing(dir, policy, |_, damaged| {
            Err(damaged.refusal("this open does not repair damage"))
        })
    }

    /// Opens both stores under `dir`, the state file first; a damaged Raft log goes to
    /// `repair` with the state file, which either repairs it or returns the refusal.
    pub fn open_repairing(
        dir: &Path,
        policy: FsyncPolicy,
        repair: impl FnOnce(&Store, DamagedLog) -> Result<RaftLog, StorageError>,
    ) -> Result<Stores, StorageError> {
        if dir.join(Stores::OLD_LOG_FILE).exists() {
            return Err(err(format!(
                "{} holds a Raft log in {}, the format of an earlier replikv; this release keeps \
                 the log in segment files ({}/). Start the node on an empty data directory: it \
                 receives its data from the other replicas",
                dir.display(),
                Stores::OLD_LOG_FILE,
                Stores::LOG_DIR
            )));
        }
        let state = Store::open_file(dir, Stores::STATE_FILE, policy)?;
        let log_dir = dir.join(Stores::LOG_DIR);
        let fs = FsLogDir::new(&log_dir).map_err(|e| err(format!("{}: {e}", log_dir.display())))?;
        let log =
            match RaftLog::open_checked(Box::new(fs), policy, WriterKind::Thread, SEGMENT_BYTES)? {
                Opened::Ready(log) => log,
                Opened::Damaged(damaged) => repair(&state, *damaged)?,
            };
        Ok(Stores { log, state })
    }

    /// Both stores in memory (segments in memory, redb's `InMemoryBackend`), with task
    /// writers: what the deterministic simulation runs on. Must be called inside a tokio
    /// runtime. What is written lives as long as a clone of the returned handles does;
    /// reopening a partition over them is a process restart that keeps everything written.
    pub fn in_memory() -> Result<Stores, StorageError> {
        Ok(Stores {
            log: RaftLog::in_memory()?,
            state: Store::open_with_backend(
                InMemoryBackend::new(),
                FsyncPolicy::Always,
                WriterKind::Task,
            )?,
        })
    }

    pub fn stop(&self) {
        self.log.stop();
        self.state.stop();
    }
}

/// What a store's writer has done since it opened.
#[derive(Default)]
struct Commits {
    commits: AtomicU64,
    syncs: AtomicU64,
    /// The key table as of commit number `.0`, shared by point reads until the next commit
    /// (a read transaction and a table open per GET were a tenth of a read's CPU). The
    /// writer drops it at each commit, so it pins no page the writer has since freed.
    latest_kv: std::sync::Mutex<Option<Latest>>,
}

type KvTable = redb::ReadOnlyTable<(u32, &'static [u8]), &'static [u8]>;

/// The read view `kv_get_latest` reuses while no commit comes: as of commit count `at`, with
/// the `kv` table of each keyspace read so far (`None`: not created yet).
struct Latest {
    at: u64,
    tx: redb::ReadTransaction,
    tables: std::collections::HashMap<KeyspaceId, Option<Arc<KvTable>>>,
}

/// One redb database shared by every partition.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    jobs: mpsc::UnboundedSender<Job>,
    policy: FsyncPolicy,
    kind: WriterKind,
    /// Batches committed, and fsynced, since the store opened.
    counts: Arc<Commits>,
    stopped: Arc<AtomicBool>,
    /// The writer thread, to join on `close` (none for a task writer).
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Store {
    /// Opens (or creates) the database in `dir` and starts the writer thread.
    pub fn open(dir: &Path, policy: FsyncPolicy) -> Result<Store, StorageError> {
        Store::open_file(dir, "replikv.redb", policy)
    }

    /// Opens (or creates) the database file `name` in `dir` and starts its writer thread.
    ///
    /// The whole file is verified first: redb checks page checksums only when asked (or when
    /// it repairs after a crash), and its reads never do, so damage to a cleanly closed file
    /// would otherwise be served as wrong values or missing keys (docs/design/durability.md,
    /// "The state file"). About 1.5 to 3 s per GB at open.
    pub fn open_file(dir: &Path, name: &str, policy: FsyncPolicy) -> Result<Store, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create {}: {e}", dir.display())))?;
        let path = dir.join(name);
        let db = redb::Builder::new()
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)) => err(format!(
                    "the state file {} is damaged ({why}). Refusing to start on it; move this \
                     node's data directory away and start the node on an empty one to take a \
                     fresh copy from its replicas, or restore it from a backup",
                    path.display()
                )),
                e => err(format!("{}: {e}", path.display())),
            })?;
        Store::start(db, policy, WriterKind::Thread)
    }

    /// Opens (or creates) a database on any redb backend (for example `InMemoryBackend`),
    /// with its writer as `kind` says. A `Task` writer needs a current tokio runtime.
    pub fn open_with_backend(
        backend: impl StorageBackend,
        policy: FsyncPolicy,
        kind: WriterKind,
    ) -> Result<Store, StorageError> {
        let db = redb::Builder::new()
            .create_with_backend(backend)
            .map_err(err)?;
        Store::start(db, policy, kind)
    }

    /// Creates the tables and starts the writer (and the flusher the policy needs).
    fn start(db: Database, policy: FsyncPolicy, kind: WriterKind) -> Result<Store, StorageError> {
        let tx = db.begin_write().map_err(err)?;
        {
            let names = TableNames::of(DEFAULT_KEYSPACE_ID);
            tx.open_table(names.meta()).map_err(err)?;
            tx.open_table(names.kv()).map_err(err)?;
            tx.open_table(names.snapshot()).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::unbounded_channel::<Job>();
        let stopped = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Commits::default());
        let writer_db = db.clone();
        let writer_counts = counts.clone();
        let finish_db = writer_db.clone();
        let mut batch = Vec::with_capacity(256);
        let writer = spawn_writer(
            kind,
            "replikv-storage-writer",
            rx,
            move |first, rx| write_batch(&writer_db, &writer_counts, &mut batch, first, rx),
            move || close_durably(&finish_db),
        )?;
        let store = Store {
            db,
            jobs,
            policy,
            kind,
            counts,
            stopped,
            writer: Arc::new(std::sync::Mutex::new(writer)),
        };
        // redb frees pages only at durable commits, so even `never` checkpoints now and then;
        // nothing on the write path waits for it.
        if let Some(every) = policy.flush_every() {
            let flusher = store.clone();
            spawn_flusher(kind, "replikv-storage-flusher", every, move || {
                flusher.flush_once();
                !flusher.stopped.load(Ordering::Relaxed)
            });
        }
        Ok(store)
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// Where the writer runs.
    pub fn writer_kind(&self) -> WriterKind {
        self.kind
    }

    /// How many batches have been committed since the store opened (failed ones included):
    /// while it stays the same, nothing in the store has changed.
    pub fn commit_count(&self) -> u64 {
        self.counts.commits.load(Ordering::Acquire)
    }

    /// How many of those commits were durable (fsynced), failed ones included.
    pub fn sync_count(&self) -> u64 {
        self.counts.syncs.load(Ordering::Acquire)
    }

    /// One tick of the flusher: a durable empty job makes every earlier commit durable.
    fn flush_once(&self) {
        self.submit(true, Box::new(|_| Ok(())), Box::new(|_| {}));
    }

    /// Queues `run` for the writer; `done` runs after the batch containing it commits.
    pub fn submit(&self, durable: bool, run: JobFn, done: DoneFn) {
        let job = Job { durable, run, done };
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job) {
            (job.done)(Err(StorageError("the storage writer has stopped".into())));
        }
    }

    /// Runs `f` in a durable commit of its own and returns once it is committed, from
    /// synchronous code. Meant for start-up (opening a partition, before its Raft core
    /// exists), when nothing else is queued. A thread writer gets it as a job and this
    /// blocks until the writer answers. A task writer may be waiting for this very thread
    /// to give it a turn (on a current-thread runtime it always is), so the commit is made
    /// here, as the writer would make it.
    pub fn write_now<F>(&self, f: F) -> Result<(), StorageError>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<(), StorageError> + Send + 'static,
    {
        match self.kind {
            WriterKind::Thread => {
                let (tx, rx) = std::sync::mpsc::channel();
                self.submit(
                    true,
                    Box::new(f),
                    Box::new(move |res| {
                        let _ = tx.send(res);
                    }),
                );
                rx.recv()
                    .map_err(|_| StorageError("the storage writer dropped a job".into()))?
            }
            WriterKind::Task => {
                let (tx, rx) = std::sync::mpsc::channel();
                let job = Job {
                    durable: true,
                    run: Box::new(f),
                    done: Box::new(move |res| {
                        let _ = tx.send(res);
                    }),
                };
                commit_and_answer(&self.db, &self.counts, &mut vec![job]);
                rx.recv()
                    .map_err(|_| StorageError("an inline commit gave no answer".into()))?
            }
        }
    }

    /// Runs `f` in the next write batch and waits for the commit.
    pub async fn write<R, F>(&self, durable: bool, f: F) -> Result<R, StorageError>
    where
        R: Send + 'static,
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, StorageError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot: Arc<std::sync::Mutex<Option<R>>> = Arc::new(std::sync::Mutex::new(None));
        let out = slot.clone();
        self.submit(
            durable,
            Box::new(move |w| {
                let r = f(w)?;
                *out.lock().expect("result slot") = Some(r);
                Ok(())
            }),
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        rx.await
            .map_err(|_| StorageError("the storage writer dropped a job".into()))??;
        let r = slot.lock().expect("result slot").take();
        r.ok_or_else(|| StorageError("write job produced no result".into()))
    }

    /// The value of `key` in group `g` as of every commit answered so far: what
    /// `read().kv_get(g, key)` gives, without a read transaction of its own when no commit
    /// came since the last such read.
    pub fn kv_get_latest(&self, g: GroupId, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        // The count is read before the transaction begins: a view opened now holds at least
        // every commit counted, and is reused only while the count stays the same. The
        // writer counts a commit before it answers the commit's jobs.
        let seen = self.counts.commits.load(Ordering::Acquire);
        let table = {
            let mut latest = self.counts.latest_kv.lock().expect("latest kv");
            if latest.as_ref().is_none_or(|l| l.at != seen) {
                *latest = Some(Latest {
                    at: seen,
                    tx: self.db.begin_read().map_err(err)?,
                    tables: Default::default(),
                });
            }
            let latest = latest.as_mut().expect("set above");
            match latest.tables.get(&g.keyspace) {
                Some(table) => table.clone(),
                None => {
                    let names = TableNames::of(g.keyspace);
                    let table = absent_is_empty(latest.tx.open_table(names.kv()))?.map(Arc::new);
                    latest.tables.insert(g.keyspace, table.clone());
                    table
                }
            }
        };
        let Some(table) = table else {
            return Ok(None);
        };
        let value = table.get((g.partition, key)).map_err(err)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// A consistent read view of everything committed so far.
    pub fn read(&self) -> Result<ReadTx, StorageError> {
        Ok(ReadTx {
            tx: self.db.begin_read().map_err(err)?,
        })
    }

    /// Stops the background flusher (the writer stops when the last `Store` is dropped).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Closes this handle and, when it is the last one, waits until the writer has made
    /// everything durable and released the database file (another process may open it next).
    /// A task writer is not waited for: it finishes once the runtime polls it.
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

/// The writer's loop body, for both writer kinds: `first` (the job the writer woke up for)
/// and whatever else is queued, up to `MAX_JOBS_PER_COMMIT`, committed in one transaction
/// (group commit); then every job is answered.
fn write_batch(
    db: &Database,
    counts: &Commits,
    batch: &mut Vec<Job>,
    first: Job,
    rx: &mut mpsc::UnboundedReceiver<Job>,
) {
    batch.push(first);
    while batch.len() < MAX_JOBS_PER_COMMIT {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    commit_and_answer(db, counts, batch);
}

/// Commits `batch` in one transaction (durable if any job asks for it) and answers its jobs,
/// leaving `batch` empty.
fn commit_and_answer(db: &Database, counts: &Commits, batch: &mut Vec<Job>) {
    let durable = batch.iter().any(|j| j.durable);
    let durability = if durable {
        Durability::Immediate
    } else {
        Durability::None
    };
    let result = commit_batch(db, batch, durability);
    if durable {
        counts.syncs.fetch_add(1, Ordering::Release);
    }
    counts.commits.fetch_add(1, Ordering::Release);
    // Released after the lock: ending a read transaction takes redb's own lock.
    let stale = counts.latest_kv.lock().expect("latest kv").take();
    drop(stale);
    if let Err(e) = &result {
        tracing::error!(error = %e, jobs = batch.len(), "storage commit failed");
    }
    for job in batch.drain(..) {
        (job.done)(result.clone());
    }
}

/// Every sender is gone: make whatever the OS holds durable before the process ends.
fn close_durably(db: &Database) {
    if let Ok(mut tx) = db.begin_write() {
        if tx.set_durability(Durability::Immediate).is_ok() {
            let _ = tx.commit();
        }
    }
}

fn commit_batch(
    db: &Database,
    batch: &mut [Job],
    durability: Durability,
) -> Result<(), StorageError> {
    let mut tx = db.begin_write().map_err(err)?;
    tx.set_durability(durability).map_err(err)?;
    {
        let mut w = WriteTx {
            tx: &tx,
            tables: Default::default(),
        };
        for job in batch.iter_mut() {
            let run = std::mem::replace(&mut job.run, Box::new(|_| Ok(())));
            run(&mut w)?;
        }
    }
    tx.commit().map_err(err)
}

/// The tables of one keyspace in a write transaction.
struct WriteTables<'t> {
    meta: redb::Table<'t, (u32, &'static str), &'static [u8]>,
    kv: redb::Table<'t, (u32, &'static [u8]), &'static [u8]>,
    snapshot: redb::Table<'t, u32, &'static [u8]>,
}

/// One write transaction, as the writer hands it to a job: each keyspace's tables are opened
/// (and created) when a job first touches them.
pub struct WriteTx<'t> {
    tx: &'t redb::WriteTransaction,
    tables: std::collections::HashMap<KeyspaceId, WriteTables<'t>>,
}

impl<'t> WriteTx<'t> {
    fn tables(&mut self, keyspace: KeyspaceId) -> Result<&mut WriteTables<'t>, StorageError> {
        use std::collections::hash_map::Entry;
        match self.tables.entry(keyspace) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let names = TableNames::of(keyspace);
                Ok(v.insert(WriteTables {
                    meta: self.tx.open_table(names.meta()).map_err(err)?,
                    kv: self.tx.open_table(names.kv()).map_err(err)?,
                    snapshot: self.tx.open_table(names.snapshot()).map_err(err)?,
                }))
            }
        }
    }

    pub fn meta_put(&mut self, g: GroupId, name: &str, value: &[u8]) -> Result<(), StorageError> {
        let t = self.tables(g.keyspace)?;
        t.meta.insert((g.partition, name), value).map_err(err)?;
        Ok(())
    }

    pub fn kv_get(&mut self, g: GroupId, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let t = self.tables(g.keyspace)?;
        Ok(t.kv
            .get((g.partition, key))
            .map_err(err)?
            .map(|v| v.value().to_vec()))
    }

    pub fn kv_put(&mut self, g: GroupId, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let t = self.tables(g.keyspace)?;
        t.kv.insert((g.partition, key), value).map_err(err)?;
        Ok(())
    }

    pub fn kv_delete(&mut self, g: GroupId, key: &[u8]) -> Result<bool, StorageError> {
        let t = self.tables(g.keyspace)?;
        Ok(t.kv.remove((g.partition, key)).map_err(err)?.is_some())
    }

    /// Removes every key of group `g` (before installing a snapshot). Only the partition's
    /// key range is visited: a scan of the whole table made each install cost as much as
    /// every other partition's keys.
    pub fn kv_clear(&mut self, g: GroupId) -> Result<(), StorageError> {
        let none: &[u8] = &[];
        let p = g.partition;
        let t = self.tables(g.keyspace)?;
        match p.checked_add(1) {
            Some(next) => t.kv.retain_in((p, none)..(next, none), |_, _| false),
            None => t.kv.retain_in((p, none).., |_, _| false),
        }
        .map_err(err)
    }

    pub fn snapshot_put(&mut self, g: GroupId, bytes: &[u8]) -> Result<(), StorageError> {
        let t = self.tables(g.keyspace)?;
        t.snapshot.insert(g.partition, bytes).map_err(err)?;
        Ok(())
    }

    pub fn snapshot_delete(&mut self, g: GroupId) -> Result<(), StorageError> {
        let t = self.tables(g.keyspace)?;
        t.snapshot.remove(g.partition).map_err(err)?;
        Ok(())
    }
}

/// A read-only, consistent view.
pub struct ReadTx {
    tx: redb::ReadTransaction,
}

impl ReadTx {
    pub fn meta_get(&self, g: GroupId, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let names = TableNames::of(g.keyspace);
        let Some(t) = absent_is_empty(self.tx.open_table(names.meta()))? else {
            return Ok(None);
        };
        let value = t.get((g.partition, name)).map_err(err)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    pub fn kv_get(&self, g: GroupId, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let names = TableNames::of(g.keyspace);
        let Some(t) = absent_is_empty(self.tx.open_table(names.kv()))? else {
            return Ok(None);
        };
        let value = t.get((g.partition, key)).map_err(err)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Calls `f` for every key of group `g` in key order, from `start` (inclusive); stops
    /// when `f` returns false.
    pub fn kv_for_each(
        &self,
        g: GroupId,
        start: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let names = TableNames::of(g.keyspace);
        let Some(t) = absent_is_empty(self.tx.open_table(names.kv()))? else {
            return Ok(());
        };
        for item in t.range((g.partition, start)..).map_err(err)? {
            let (k, v) = item.map_err(err)?;
            let (part, key) = k.value();
            if part != g.partition || !f(key, v.value()) {
                break;
            }
        }
        Ok(())
    }

    pub fn snapshot_get(&self, g: GroupId) -> Result<Option<Vec<u8>>, StorageError> {
        let names = TableNames::of(g.keyspace);
        let Some(t) = absent_is_empty(self.tx.open_table(names.snapshot()))? else {
            return Ok(None);
        };
        let value = t.get(g.partition).map_err(err)?;
        Ok(value.map(|v| v.value().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partition `p` of the default keyspace.
    fn g(p: u32) -> GroupId {
        GroupId::default_keyspace(p)
    }

    #[tokio::test]
    async fn writes_are_visible_to_reads_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), FsyncPolicy::Always).unwrap();
            store
                .write(true, |w| {
                    w.kv_put(g(2), b"k", b"other partition")?;
                    w.kv_put(g(1), b"k", b"v")?;
                    w.meta_put(g(1), "vote", b"x")
                })
                .await
                .unwrap();
            let r = store.read().unwrap();
            assert_eq!(r.kv_get(g(1), b"k").unwrap(), Some(b"v".to_vec()));
            store.stop();
        }
        // The writer thread holds the database until its channel closes; reopen in a loop.
        let store = reopen(dir.path());
        let r = store.read().unwrap();
        assert_eq!(r.kv_get(g(1), b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(r.meta_get(g(1), "vote").unwrap(), Some(b"x".to_vec()));
        assert_eq!(
            r.kv_get(g(2), b"k").unwrap(),
            Some(b"other partition".to_vec())
        );
    }

    fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Store::open(dir, FsyncPolicy::Always) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::yield_now();
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    /// Point reads share one view between commits, and every answered commit is in the
    /// view the next read uses, from any handle of the store.
    #[tokio::test]
    async fn latest_reads_see_every_answered_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FsyncPolicy::Never).unwrap();
        let other = store.clone();
        assert_eq!(store.kv_get_latest(g(1), b"k").unwrap(), None);
        for i in 0..50u32 {
            let v = i.to_le_bytes();
            other
                .write(false, move |w| w.kv_put(g(1), b"k", &v))
                .await
                .unwrap();
            // Twice: the second read takes the shared view the first one opened.
            for _ in 0..2 {
                assert_eq!(store.kv_get_latest(g(1), b"k").unwrap(), Some(v.to_vec()));
                assert_eq!(store.kv_get_latest(g(2), b"k").unwrap(), None);
            }
        }
        other
            .write(false, |w| w.kv_delete(g(1), b"k").map(|_| ()))
            .await
            .unwrap();
        assert_eq!(store.kv_get_latest(g(1), b"k").unwrap(), None);
        // A commit drops the shared view: it pins nothing once the writer moves on.
        other
            .write(false, |w| w.kv_put(g(3), b"x", b"y"))
            .await
            .unwrap();
        assert!(store.counts.latest_kv.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn kv_clear_touches_one_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FsyncPolicy::Never).unwrap();
        store
            .write(false, |w| {
                w.kv_put(g(1), b"a", b"1")?;
                w.kv_put(g(2), b"a", b"2")
            })
            .await
            .unwrap();
        store.write(false, |w| w.kv_clear(g(1))).await.unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.kv_get(g(1), b"a").unwrap(), None);
        assert_eq!(r.kv_get(g(2), b"a").unwrap(), Some(b"2".to_vec()));
        let mut keys = 0;
        r.kv_for_each(g(2), b"", |_, _| {
            keys += 1;
            true
        })
        .unwrap();
        assert_eq!(keys, 1);
    }

    /// Each keyspace has tables of its own: the same partition number and key in two
    /// keyspaces are two values, a keyspace no write has touched reads as empty, and the
    /// default keyspace keeps the table names older state files have.
    #[tokio::test]
    async fn keyspaces_have_tables_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let other = GroupId::new(7, 1);
        {
            let store = Store::open(dir.path(), FsyncPolicy::Always).unwrap();
            let r = store.read().unwrap();
            assert_eq!(r.kv_get(other, b"a").unwrap(), None);
            assert_eq!(r.snapshot_get(other).unwrap(), None);
            assert_eq!(store.kv_get_latest(other, b"a").unwrap(), None);
            store
                .write(true, move |w| {
                    w.kv_put(g(1), b"a", b"default")?;
                    w.kv_put(other, b"a", b"seven")?;
                    w.meta_put(GroupId::META, "applied", b"m")
                })
                .await
                .unwrap();
            assert_eq!(store.kv_get_latest(other, b"a").unwrap().unwrap(), b"seven");
            store.write(true, move |w| w.kv_clear(other)).await.unwrap();
            assert_eq!(store.kv_get_latest(other, b"a").unwrap(), None);
            store
                .write(true, move |w| w.kv_put(other, b"b", b"7b"))
                .await
                .unwrap();
            store.close();
        }
        let store = Store::open(dir.path(), FsyncPolicy::Always).unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.kv_get(g(1), b"a").unwrap().unwrap(), b"default");
        assert_eq!(r.kv_get(other, b"b").unwrap().unwrap(), b"7b");
        assert_eq!(r.meta_get(GroupId::META, "applied").unwrap().unwrap(), b"m");
        assert_eq!(r.meta_get(g(0), "applied").unwrap(), None);
        let tables: Vec<String> =
            r.tx.list_tables()
                .unwrap()
                .map(|t| redb::TableHandle::name(&t).to_string())
                .collect();
        for name in ["kv", "meta", "snapshot", "kv@7", "meta@4294967295"] {
            assert!(tables.iter().any(|t| t == name), "{name} in {tables:?}");
        }
    }

    /// The simulation's stores: everything runs on one thread, so the writer must be a task,
    /// and a synchronous start-up write must not wait for it.
    #[test]
    fn in_memory_stores_with_task_writers_on_one_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let stores = Stores::in_memory().unwrap();
            assert_eq!(stores.log.writer_kind(), WriterKind::Task);
            // Several jobs queued before the writer runs: committed together, all answered.
            let writes: Vec<_> = (1..=5u64)
                .map(|i| {
                    let log = stores.log.clone();
                    let op = crate::LogOp::Append {
                        g: g(1),
                        index: i,
                        bytes: b"e".to_vec(),
                    };
                    tokio::spawn(async move { log.write(true, vec![op]).await })
                })
                .collect();
            for w in writes {
                w.await.unwrap().unwrap();
            }
            // Inline, from synchronous code on the runtime's only thread.
            let vote = crate::LogOp::Meta {
                g: g(1),
                name: "vote".into(),
                value: b"v".to_vec(),
            };
            stores.log.write_now(vec![vote]).unwrap();
            assert_eq!(stores.log.len(g(1)), 5);
            // The queued jobs share batches; the inline one has its own.
            assert!((2..=6).contains(&stores.log.commit_count()));
            assert_eq!(stores.log.meta(g(1), "vote"), Some(b"v".to_vec()));
        });
    }

    #[tokio::test]
    async fn kv_clear_of_the_last_partition_number_leaves_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FsyncPolicy::Never).unwrap();
        store
            .write(false, |w| {
                w.kv_put(g(u32::MAX), b"a", b"1")?;
                w.kv_put(g(u32::MAX - 1), b"a", b"2")?;
                w.kv_put(g(0), b"", b"3")
            })
            .await
            .unwrap();
        store
            .write(false, |w| w.kv_clear(g(u32::MAX)))
            .await
            .unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.kv_get(g(u32::MAX), b"a").unwrap(), None);
        assert_eq!(
            r.kv_get(g(u32::MAX - 1), b"a").unwrap(),
            Some(b"2".to_vec())
        );
        assert_eq!(r.kv_get(g(0), b"").unwrap(), Some(b"3".to_vec()));
    }

    /// Writes one key per index in `indexes`, each in its own commit; returns the
    /// fsyncs they took.
    async fn syncs_for_writes(
        store: &Store,
        durable: bool,
        indexes: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        let before = store.sync_count();
        for i in indexes {
            store
                .write(durable, move |w| w.kv_put(g(1), &i.to_le_bytes(), b"e"))
                .await
                .unwrap();
        }
        store.sync_count() - before
    }

    /// A durable write is fsynced under every policy; the others are not, and the flusher of
    /// `everysec` makes them durable within about a second.
    #[tokio::test]
    async fn durable_writes_fsync_under_every_policy_and_everysec_flushes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Everysec,
            FsyncPolicy::Never,
        ] {
            let store = Store::open_file(dir.path(), &format!("{policy:?}.redb"), policy).unwrap();
            let started = std::time::Instant::now();
            let durable = syncs_for_writes(&store, true, 1..=20).await;
            let other = syncs_for_writes(&store, false, 21..=40).await;
            // A flusher tick may land in either loop: at most one a second.
            let ticks = started.elapsed().as_secs() + 1;
            assert!(
                (20..=20 + ticks).contains(&durable),
                "{policy:?}: {durable} fsyncs for 20 durable writes"
            );
            assert!(
                other <= ticks,
                "{policy:?}: {other} fsyncs for 20 other writes"
            );
            if policy == FsyncPolicy::Everysec {
                let what = "the everysec flusher never synced";
                crate::test_util::wait_for_a_sync(|| store.sync_count(), 30, what).await;
            }
            store.close();
        }
    }

    /// Under `everysec` and `never` the flusher of a task writer is a task too (spawning it
    /// needs the runtime; no OS thread is started).
    #[tokio::test(flavor = "current_thread")]
    async fn a_task_writer_opens_under_every_policy() {
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Everysec,
            FsyncPolicy::Never,
        ] {
            let store =
                Store::open_with_backend(InMemoryBackend::new(), policy, WriterKind::Task).unwrap();
            store
                .write(false, |w| w.kv_put(g(1), b"k", b"v"))
                .await
                .unwrap();
            assert_eq!(
                store.read().unwrap().kv_get(g(1), b"k").unwrap(),
                Some(b"v".to_vec()),
                "{policy:?}"
            );
            store.stop();
        }
    }

    #[test]
    fn write_now_with_a_thread_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FsyncPolicy::Always).unwrap();
        store.write_now(|w| w.kv_put(g(3), b"k", b"x")).unwrap();
        assert_eq!(
            store.read().unwrap().kv_get(g(3), b"k").unwrap(),
            Some(b"x".to_vec())
        );
    }
}
