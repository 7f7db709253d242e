//! Stage 2 (`replikv-sim nodes`): the real `replikv_cluster::Node` — partition groups,
//! peer transport and frames, forwarding, write levels, read index and lease, election gate,
//! early campaigns, leadership transfer — on turmoil hosts, one per node, with the peer
//! transport's connections over turmoil TCP (`Transport::with_dialer`, `serve_stream`).
//!
//! Each host opens its stores on the node's simulated disks (`disk.rs`), starts a `Node`, and
//! runs a client that writes unique values at `quorum` and reads at `primary` through that
//! node (so forwarding is exercised), recording a history. Faults: a node crashes (process or
//! power loss, its disks keeping what that crash leaves) and restarts from its disks later,
//! sometimes with bit rot in its newest log segment (found and repaired by the server's
//! open path: `RaftLog::open_checked`, `replikv_raft::repair_log`); a node is cut off from
//! the others and healed; a node's disk fills below its reserve (`DiskSpace::simulated`)
//! and empties again. After the faults, every host reads every key once more, and the run
//! checks:
//! - after every step: replicas of a partition that applied the same log id hold the same
//!   contents (state digests read in one transaction with the applied id), and no replica
//!   recovering from a damaged log leads;
//! - at each open: bit rot is found as damage where it was put, and nothing else is;
//! - at the end: the history is linearizable per key (Wing–Gong search, `replikv-checker`),
//!   which includes every acknowledged write being visible to the final reads, and every
//!   replica of each partition holds the same contents;
//! - at the end: every read of an expiring key (written with a relative expiry, one key
//!   per write) fits the key's lifetime by the simulation's own clock ([`check_ttls`]), and
//!   the digests above cover each key's stored expiry, so replicas agree on it.
//!
//! Clocks: in half the seeds one node's wall clock starts off by up to 300 ms (within
//! `max_clock_offset_ms`) and jumps an hour either way while it runs, or (one in four)
//! starts an hour off and comes back (`WallClock::Simulated`'s `offset_ms`).
//!
//! One `u64` seed fixes turmoil's network, the fault schedule, each node's own draws
//! (`NodeConfig::seed`) and each host runtime's scheduler; a failing seed replays exactly.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::ServerState;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replikv_checker::{check_linearizable, History, Op, OpKind, Outcome};
use replikv_cluster::messages::Hello;
use replikv_cluster::transport::{Dialer, Handler, ReadHalf, Transport, WriteHalf};
use replikv_cluster::{Node, NodeConfig, Replication, WallClock};
use replikv_storage::{DiskSpace, FsyncPolicy, LogOp, Opened, RaftLog, Store, Stores, WriterKind};
use replikv_types::{
    Consistency, Error, Expiry, GroupId, KvOp, ReadPreference, SetCond, StoredValue,
};

use crate::disk::{CrashKind, Power, Rot, SharedPower, SimDisk, SimLogDir};
use crate::{fnv, mix, ROT_BYTES};

const PEER_PORT: u16 = 7380;
const KEYS: &[&str] = &["a", "b", "c", "d", "e", "f"];
const EPOCH_MS: u64 = 1_750_000_000_000;
const PARTITIONS: u32 = 3;

/// Every group a node of the simulation may run: the default keyspace's partitions and the
/// meta group.
fn groups() -> impl Iterator<Item = GroupId> {
    (0..PARTITIONS)
        .map(GroupId::default_keyspace)
        .chain([GroupId::META])
}
const CLIENTS_PER_HOST: u64 = 3;
/// Per-op deadline of the clients (the node's write timeout is shorter).
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Lifetimes (ms) of expiring keys.
const TTL_MS: std::ops::Range<u64> = 200..3_000;
/// How far a key's expiry may be from the simulation's clock: twice the default
/// `max_clock_offset_ms` (two nodes in step may differ by that).
const TTL_MARGIN_MS: u64 = 1_000;
/// Offsets (ms) a skewed node's wall clock takes: none or within the bound (the first
/// three), an hour off (the last two). It starts near and jumps far, or (one seed in four)
/// the other way round.
const SKEWS_MS: [i64; 5] = [0, 300, -300, 3_600_000, -3_600_000];
/// Whether a clock offset puts a node out of step (beyond every node's default
/// `replication.max_clock_offset_ms`).
fn clock_off(offset_ms: i64) -> bool {
    offset_ms.unsigned_abs() > Replication::default().max_clock_offset_ms
}
/// Each node's reserve (`storage.min_free_bytes`), and the free space its disk reports while
/// it has room and while it is full (below the reserve).
const MIN_FREE_BYTES: u64 = 16 << 20;
const ROOMY_BYTES: u64 = 1 << 30;
const FULL_BYTES: u64 = 1 << 20;
/// The log's field holding a partition's high water while it recovers from damage
/// (`replikv-raft`'s `RECOVER_TO`).
const RECOVER_TO_FIELD: &str = "recover_to";

#[derive(Clone, Debug)]
pub struct NodesOpts {
    pub nodes: u64,
    pub steps: u64,
    pub settle: u64,
    pub verbose: bool,
    pub bug: NodeBug,
    /// Bit rot in restarting nodes' newest log segment (on unless `--no-bit-rot`).
    pub bit_rot: bool,
    /// Nodes' disks filled below their reserve for a while (on unless `--no-disk-full`).
    pub disk_full: bool,
}

/// A known bug switched on in every node (replikv's own test-only settings), to show that
/// the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NodeBug {
    None,
    /// `debug.skip_read_index`: `primary` reads served without a read index or lease.
    SkipReadIndex,
    /// `debug.ack_before_commit`: `quorum` writes acknowledged before they commit.
    AckBeforeCommit,
    /// `debug.stamp_with_wall_clock`: entries stamped by the wall clock, jumps and all.
    StampWithWallClock,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    /// Clients issue random reads and writes.
    Run,
    /// Clients stop issuing ops (the harness heals everything).
    Quiet,
    /// Each host's client reads every key once, then counts itself done.
    FinalRead,
}

/// What outlives a node's incarnations, shared by its host closure and the harness.
struct Slot {
    id: u64,
    log_dir: SimLogDir,
    state_disk: SimDisk,
    power: SharedPower,
    starts: u64,
    /// The running incarnation's node and stores (None while it is down or starting).
    node: Option<(Arc<Node>, Stores)>,
    /// The state store's commit count and the sum of the groups' applied indexes at the
    /// last digest check: both unchanged, nothing to check.
    checked: Option<(u64, u64)>,
    /// Peer requests served, and their answers, by kind (for `-v`).
    counts: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    /// Added to this node's wall clock (every incarnation's): the harness moves it.
    clock_offset: &'static AtomicI64,
    /// The free space of the node's disk, as its log reports it (`DiskSpace::simulated`): one
    /// disk for all its incarnations, filled and emptied by the harness.
    space: Arc<DiskSpace>,
    /// Bit rot put into the log since the last open, for the next open to find.
    rot: Option<Rot>,
    /// What the last open broke (the invariant and why), for the harness to report.
    open_failed: Option<(&'static str, String)>,
    /// Partitions whose log records a high water (recovering from a damaged log), as of the
    /// last check (while down: as its last incarnation left them).
    recovering: Vec<GroupId>,
    /// Opens that found bit rot and repaired it; records and entries they discarded.
    repairs: u64,
    rot_records: u64,
    rot_entries: u64,
}

/// The node's peer handler, counting what it serves.
struct Counting {
    node: Arc<Node>,
    counts: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

impl Handler for Counting {
    // Two phases, as the node's own handler: the outer future accepts, the inner answers.
    #[allow(clippy::async_yields_async)]
    fn accept(
        self: Arc<Self>,
        from: u64,
        req: replikv_cluster::messages::PeerRequest,
    ) -> futures::future::BoxFuture<
        'static,
        futures::future::BoxFuture<'static, replikv_cluster::messages::PeerResponse>,
    > {
        use replikv_cluster::messages::{PeerRequest as Q, PeerResponse as A};
        let kind = match &req {
            Q::AppendEntries(p, r) => format!("append p{p} from {from} {}", r.vote),
            Q::Vote(p, r) => format!("vote p{p} from {from} {}", r.vote),
            Q::InstallSnapshot(p, _) => format!("snapshot p{p} from {from}"),
            Q::Client(_) => "client".into(),
            Q::Ping { .. } => "ping".into(),
        };
        let counts = self.counts.clone();
        if !kind.starts_with("ping") {
            let head: String = kind.split(" T").next().unwrap_or("").to_string();
            *counts
                .lock()
                .unwrap()
                .entry(format!("{head} received"))
                .or_default() += 1;
        }
        let inner = self.node.clone().accept(from, req);
        Box::pin(async move {
            let finish = inner.await;
            let b: futures::future::BoxFuture<'static, A> = Box::pin(async move {
                let a = finish.await;
                let answer = match &a {
                    A::AppendEntries(Ok(r)) => format!("{kind} -> {r}"),
                    A::Vote(Ok(r)) => format!("{kind} -> {r:?}"),
                    // A full disk refuses new entries and snapshots.
                    A::Unavailable(_) => REFUSED.to_string(),
                    _ => format!("{kind} -> other"),
                };
                *counts.lock().unwrap().entry(answer).or_default() += 1;
                a
            });
            b
        })
    }

    fn hello(&self, hello: &Hello) {
        self.node.hello(hello)
    }
}

/// The count, in a slot's `counts`, of peer requests refused as `Unavailable` (a full disk).
const REFUSED: &str = "refused: unavailable (disk full)";

/// The workload's shared state: the history and the phase.
struct Workload {
    seed: u64,
    phase: Cell<Phase>,
    ops: RefCell<Vec<Op>>,
    next_value: Cell<u64>,
    final_reads_done: RefCell<BTreeSet<u64>>,
    /// Writes and reads of expiring keys.
    ttl_ops: RefCell<Vec<TtlOp>>,
    /// Acknowledged expiring keys still worth reading: (key, read until ns).
    ttl_recent: RefCell<VecDeque<(String, u64)>>,
    /// Writes refused with `Error::DiskFull` (`-MISCONF`): definite failures.
    refused_disk_full: Cell<u64>,
}

/// One op on an expiring key (sim ns).
#[derive(Clone, Debug)]
struct TtlOp {
    key: String,
    invoke_ns: u64,
    /// `None`: no definite answer.
    complete_ns: Option<u64>,
    kind: TtlKind,
}

#[derive(Clone, Debug)]
enum TtlKind {
    /// `SET key v` with `Expiry::After(ttl_ms)`, acknowledged or not.
    Write { ttl_ms: u64, acked: bool },
    /// A `primary` read: `None` absent, `Some(ttl_ms)` present with that time left.
    Read(Option<Option<u64>>),
}

pub struct NodesResult {
    pub violation: Option<(u64, &'static str, String)>,
    pub summary: String,
}

struct TurmoilDialer;

impl Dialer for TurmoilDialer {
    fn dial(
        &self,
        addr: &str,
    ) -> futures::future::BoxFuture<'static, std::io::Result<(ReadHalf, WriteHalf)>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(addr.as_str()).await?;
            let (rd, wr) = stream.into_split();
            Ok((Box::new(rd) as ReadHalf, Box::new(wr) as WriteHalf))
        })
    }
}

fn host_name(id: u64) -> String {
    format!("n{id}")
}

fn sim_ns() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_nanos() as u64
}

/// Partitions whose log records a high water: the replica is recovering them from a damaged
/// log (`replikv-raft`'s `damage.rs`) and may lack writes it acknowledged.
fn recovering(log: &RaftLog) -> Vec<GroupId> {
    groups()
        .filter(|g| {
            log.meta(*g, RECOVER_TO_FIELD)
                .and_then(|raw| bincode::deserialize::<Option<replikv_raft::LogId>>(&raw).ok())
                .flatten()
                .is_some()
        })
        .collect()
}

const ROT_FOUND: &str = "bit rot in synced records is found as damage, never cut as a tear";
const NO_DAMAGE_WITHOUT_ROT: &str = "a crash alone leaves no damage (a torn tail is cut)";
const REPAIRED: &str = "a damaged log is repaired where other replicas hold what it lost";
const NO_RECOVERING_LEADER: &str = "a replica recovering from a damaged log never leads";
const NO_FULL_LEADER: &str = "a node whose disk is full wins no election";

/// Opens a node's stores on its disks, powered by a new supply (one per incarnation), as the
/// server's `replikv_raft::open_stores` does: a log found damaged is repaired where the
/// other `members` hold what it lost. Damage must be found exactly where bit rot was put
/// (rot in synced records with a record after them is never a tear, and a crash's torn tail
/// is never damage); what breaks that is left in `open_failed`.
fn open_stores(slot: &Rc<RefCell<Slot>>, members: &BTreeSet<u64>) -> Result<Stores, String> {
    let mut s = slot.borrow_mut();
    let s = &mut *s;
    let id = s.id;
    s.power = Power::new(Arc::new(AtomicBool::new(true)));
    let opened = RaftLog::open_checked(
        Box::new(s.log_dir.backend(s.power.clone())),
        FsyncPolicy::Always,
        WriterKind::Task,
        crate::SEGMENT_BYTES,
    )
    .map_err(|e| format!("log: {e}"))?;
    let state = Store::open_with_backend(
        s.state_disk.backend(s.power.clone()),
        FsyncPolicy::Always,
        WriterKind::Task,
    )
    .map_err(|e| format!("state: {e}"))?;
    let mut fail = |invariant: &'static str, detail: String| {
        s.open_failed = Some((invariant, detail.clone()));
        detail
    };
    let log = match (opened, s.rot.take()) {
        (Opened::Ready(log), None) => log,
        (Opened::Ready(_), Some(r)) => {
            return Err(fail(
                ROT_FOUND,
                format!("node {id}: {r:?} opened as a whole log"),
            ))
        }
        (Opened::Damaged(d), None) => {
            return Err(fail(
                NO_DAMAGE_WITHOUT_ROT,
                format!("node {id}: {}", d.damage()),
            ))
        }
        (Opened::Damaged(d), Some(r)) => {
            let after = &d.damage().after;
            let entries = after
                .iter()
                .filter(|op| matches!(op, LogOp::Append { .. }))
                .count();
            if crate::trace_on() {
                eprintln!(
                    "node {id}: bit rot {r:?}: {}; {} records after it, {entries} entries",
                    d.damage(),
                    after.len()
                );
            }
            let (records, entries) = (after.len() as u64, entries as u64);
            let log = replikv_raft::repair_log(id, members, &state, *d)
                .map_err(|e| fail(REPAIRED, format!("node {id}: {e}")))?;
            s.repairs += 1;
            s.rot_records += records;
            s.rot_entries += entries;
            log
        }
    };
    s.recovering = recovering(&log);
    // As the server's `DiskSpace::new`: read at once, then every ping period by the node.
    s.space.refresh();
    log.watch_space(s.space.clone());
    Ok(Stores { log, state })
}

/// One incarnation of node `id`: stores from its disks, the node, its peer listener, and
/// its client.
async fn run_host(
    slot: Rc<RefCell<Slot>>,
    work: Rc<Workload>,
    peers: BTreeMap<u64, String>,
    replication: Replication,
    bug: NodeBug,
) -> turmoil::Result {
    let (id, starts) = {
        let mut s = slot.borrow_mut();
        s.starts += 1;
        (s.id, s.starts)
    };
    let members: BTreeSet<u64> = peers.keys().copied().collect();
    let stores = open_stores(&slot, &members)?;
    let mut cfg = NodeConfig::new(id, peers);
    cfg.replication = replication;
    cfg.clock = WallClock::Simulated {
        epoch_ms: EPOCH_MS + turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64,
        origin: tokio::time::Instant::now(),
        offset_ms: Some(slot.borrow().clock_offset),
    };
    cfg.seed = Some(work.seed ^ (id << 48) ^ (starts << 32));
    // A checkpoint every few keys, so that checkpoints land between crashes and power
    // losses, not only at snapshots.
    cfg.checkpoint = replikv_raft::CheckpointLimits {
        keys: 3,
        bytes: usize::MAX,
    };
    cfg.skip_read_index = bug == NodeBug::SkipReadIndex;
    cfg.ack_before_commit = bug == NodeBug::AckBeforeCommit;
    cfg.stamp_with_wall_clock = bug == NodeBug::StampWithWallClock;
    let transport = Transport::with_dialer(
        Hello {
            node_id: id,
            resp_addr: String::new(),
            http_addr: String::new(),
        },
        Arc::new(TurmoilDialer),
    );
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PEER_PORT)).await?;
    let node = Node::start(cfg, stores.clone(), transport.clone()).await?;
    slot.borrow_mut().node = Some((node.clone(), stores));
    // Several clients per host, so that a write stuck behind a cut does not stop the reads.
    for c in 0..CLIENTS_PER_HOST {
        tokio::task::spawn_local(client(node.clone(), work.clone(), id, starts, c));
    }
    let handler: Arc<dyn Handler> = Arc::new(Counting {
        node,
        counts: slot.borrow().counts.clone(),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let (rd, wr) = stream.into_split();
        transport.serve_stream(Box::new(rd), Box::new(wr), handler.clone());
    }
}

/// Records an op's invocation; returns its index for [`complete`].
fn invoke(work: &Workload, client: u64, key: &str, kind: OpKind) -> usize {
    let mut ops = work.ops.borrow_mut();
    ops.push(Op {
        client,
        key: key.to_string(),
        kind,
        invoke_ns: sim_ns(),
        complete_ns: None,
        outcome: Outcome::Unknown,
    });
    ops.len() - 1
}

fn complete(work: &Workload, at: usize, outcome: Outcome) {
    let mut ops = work.ops.borrow_mut();
    ops[at].complete_ns = Some(sim_ns());
    ops[at].outcome = outcome;
}

async fn write(node: &Arc<Node>, work: &Workload, client: u64, key: &str) {
    let n = work.next_value.get();
    work.next_value.set(n + 1);
    let value = format!("v{n}");
    let at = invoke(work, client, key, OpKind::Write(value.clone()));
    let op = KvOp::Set {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(value),
        expire: None,
        keep_ttl: false,
        cond: SetCond::Always,
        get: false,
    };
    let done = tokio::time::timeout(OP_TIMEOUT, async {
        node.submit_write(op, Consistency::Quorum).await.await
    })
    .await;
    match done {
        Ok(Ok(_)) => complete(work, at, Outcome::Written),
        // Refused before it was proposed (a leader whose disk is below its reserve): a
        // definite failure, so a refused write that took effect anyway is a violation.
        Ok(Err(Error::DiskFull(_))) => {
            work.refused_disk_full.set(work.refused_disk_full.get() + 1);
            complete(work, at, Outcome::Failed);
        }
        // Anything else may still take effect later: the checker treats it so.
        _ => {}
    }
}

/// A `primary` read; why it was not answered, if it was not.
async fn read(node: &Arc<Node>, work: &Workload, client: u64, key: &str) -> Result<(), String> {
    let at = invoke(work, client, key, OpKind::Read);
    let got = tokio::time::timeout(
        OP_TIMEOUT,
        node.get(Bytes::from(key.to_string()), ReadPreference::Primary, None),
    )
    .await;
    match got {
        Ok(Ok(v)) => {
            let seen = v.map(|v| String::from_utf8_lossy(&v.data).into_owned());
            complete(work, at, Outcome::Read(seen));
            Ok(())
        }
        // A read that was not answered constrains nothing.
        Ok(Err(e)) => {
            complete(work, at, Outcome::Failed);
            Err(e.to_string())
        }
        Err(_) => {
            complete(work, at, Outcome::Failed);
            Err("timed out".into())
        }
    }
}

/// Writes a fresh key with a relative expiry, at `quorum`.
async fn ttl_write(node: &Arc<Node>, work: &Workload, rng: &mut ChaCha8Rng) {
    let n = work.next_value.get();
    work.next_value.set(n + 1);
    let key = format!("t{n}");
    let ttl_ms = rng.random_range(TTL_MS);
    let op = KvOp::Set {
        key: Bytes::from(key.clone()),
        value: Bytes::from_static(b"x"),
        expire: Some(Expiry::After(ttl_ms)),
        keep_ttl: false,
        cond: SetCond::Always,
        get: false,
    };
    let invoke_ns = sim_ns();
    let done = tokio::time::timeout(OP_TIMEOUT, async {
        node.submit_write(op, Consistency::Quorum).await.await
    })
    .await;
    let acked = matches!(done, Ok(Ok(_)));
    let complete_ns = sim_ns();
    if acked {
        let until = complete_ns + (ttl_ms + TTL_MARGIN_MS + 1_000) * 1_000_000;
        work.ttl_recent.borrow_mut().push_back((key.clone(), until));
    }
    work.ttl_ops.borrow_mut().push(TtlOp {
        key,
        invoke_ns,
        complete_ns: acked.then_some(complete_ns),
        kind: TtlKind::Write { ttl_ms, acked },
    });
}

/// Reads a recently acknowledged expiring key at `primary`.
async fn ttl_read(node: &Arc<Node>, work: &Workload, rng: &mut ChaCha8Rng) {
    let key = {
        let mut recent = work.ttl_recent.borrow_mut();
        let now = sim_ns();
        while recent.front().is_some_and(|(_, until)| *until < now) {
            recent.pop_front();
        }
        if recent.is_empty() {
            return;
        }
        // Half the reads look at the newest keys: a key whose expiry is wrong shows it
        // soonest (gone at once, or a time left far too long).
        let from = if rng.random_bool(0.5) {
            recent.len().saturating_sub(5)
        } else {
            0
        };
        recent[rng.random_range(from..recent.len())].0.clone()
    };
    let invoke_ns = sim_ns();
    let got = tokio::time::timeout(
        OP_TIMEOUT,
        node.get(Bytes::from(key.clone()), ReadPreference::Primary, None),
    )
    .await;
    if let Ok(Ok(v)) = got {
        work.ttl_ops.borrow_mut().push(TtlOp {
            key,
            invoke_ns,
            complete_ns: Some(sim_ns()),
            kind: TtlKind::Read(Some(v.map(|v| v.ttl_ms.unwrap_or(u64::MAX)))),
        });
    }
}

/// Every read of an acknowledged expiring key fits its lifetime by the simulation's clock:
/// present from the write's acknowledgement until `invoke + ttl - margin`, absent from
/// `complete + ttl + margin`, and a TTL that puts its expiry inside that window.
fn check_ttls(ops: &[TtlOp]) -> Result<usize, String> {
    let ms = |ns: u64| ns as f64 / 1e6;
    let writes: BTreeMap<&str, (f64, f64, f64)> = ops
        .iter()
        .filter_map(|o| match (&o.kind, o.complete_ns) {
            (
                TtlKind::Write {
                    ttl_ms,
                    acked: true,
                },
                Some(done),
            ) => Some((o.key.as_str(), (ms(o.invoke_ns), ms(done), *ttl_ms as f64))),
            _ => None,
        })
        .collect();
    let margin = TTL_MARGIN_MS as f64;
    let mut checked = 0;
    for o in ops {
        let (TtlKind::Read(Some(seen)), Some(done)) = (&o.kind, o.complete_ns) else {
            continue;
        };
        let Some((wi, wc, ttl)) = writes.get(o.key.as_str()) else {
            continue;
        };
        checked += 1;
        let (lo, hi) = (wi + ttl - margin, wc + ttl + margin);
        let (ri, rc) = (ms(o.invoke_ns), ms(done));
        let bad = match seen {
            None => ri >= *wc && rc < lo,
            Some(left) => ri > hi || ri + *left as f64 > hi || rc + (*left as f64) < lo,
        };
        if bad {
            return Err(format!(
                "{} written with a lifetime of {ttl} ms at {wi:.0}..{wc:.0} ms read at {ri:.0}..{rc:.0} ms: {}",
                o.key,
                match seen {
                    None => "absent".to_string(),
                    Some(left) => format!("{left} ms left"),
                }
            ));
        }
    }
    Ok(checked)
}

/// The client of one host incarnation: random ops through its node, then the final reads.
async fn client(node: Arc<Node>, work: Rc<Workload>, id: u64, starts: u64, c: u64) {
    let mut rng =
        ChaCha8Rng::seed_from_u64(work.seed ^ (id << 40) ^ (starts << 24) ^ (c << 16) ^ 0xc1);
    let me = id * 10_000 + starts * 10 + c;
    while work.phase.get() == Phase::Run {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..40))).await;
        if work.phase.get() != Phase::Run {
            break;
        }
        let key = KEYS[rng.random_range(0..KEYS.len())];
        match rng.random_range(0..10) {
            0..4 => write(&node, &work, me, key).await,
            4..8 => {
                let _ = read(&node, &work, me, key).await;
            }
            8 => ttl_write(&node, &work, &mut rng).await,
            _ => ttl_read(&node, &work, &mut rng).await,
        }
    }
    if c != 0 {
        return;
    }
    while work.phase.get() != Phase::FinalRead {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for key in KEYS {
        while let Err(e) = read(&node, &work, me, key).await {
            if crate::trace_on() {
                eprintln!("node {id}: final read of {key}: {e}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if c == 0 {
        work.final_reads_done.borrow_mut().insert(id);
    }
}

/// A replica's applied log id (term, index), if any.
type Applied = Option<(u64, u64)>;

/// The digest of one partition's keys and values.
#[derive(Default)]
struct Digest {
    h: u64,
    bad: Option<String>,
}

impl Digest {
    fn add(&mut self, k: &[u8], raw: &[u8]) {
        match StoredValue::decode(raw) {
            // The expiry too: replicas must agree on it, not only on the value.
            Some(v) => {
                self.h = mix(
                    mix(mix(self.h, fnv(k)), fnv(&v.data)),
                    v.expire_at_ms.unwrap_or(0),
                )
            }
            None => self.bad = Some(String::from_utf8_lossy(k).into_owned()),
        }
    }

    fn finish(self, g: GroupId) -> Result<u64, String> {
        match self.bad {
            Some(k) => Err(format!("{g:#}: undecodable value of key {k}")),
            None => Ok(self.h),
        }
    }
}

/// The applied log id and content digest of each partition in a node's state *file*, read in
/// one transaction (a checkpoint commits the applied id with the keys it covers).
fn file_digests(stores: &Stores) -> Result<BTreeMap<GroupId, (Applied, u64)>, String> {
    let r = stores.state.read().map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for g in groups() {
        let applied = r
            .meta_get(g, "applied")
            .map_err(|e| e.to_string())?
            .map(|b| bincode::deserialize::<Option<replikv_raft::LogId>>(&b))
            .transpose()
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|l| (l.leader_id.term, l.index));
        let mut d = Digest::default();
        r.kv_for_each(g, b"", |k, raw| {
            d.add(k, raw);
            true
        })
        .map_err(|e| e.to_string())?;
        out.insert(g, (applied, d.finish(g)?));
    }
    Ok(out)
}

/// The applied log id and content digest of each partition as the node's state machines
/// hold them: the in-memory overlay over the file, read consistently.
fn view_digests(node: &Node) -> Result<BTreeMap<GroupId, (Applied, u64)>, String> {
    let mut out = BTreeMap::new();
    for g in node.groups() {
        let mut d = Digest::default();
        let applied = g.view.contents(|k, raw| {
            d.add(k, raw);
            true
        })?;
        let applied = applied.map(|l| (l.leader_id.term, l.index));
        out.insert(g.id, (applied, d.finish(g.id)?));
    }
    Ok(out)
}

/// A full disk: from when, until when, and how long the node kept a leadership meanwhile.
struct Fill {
    since: u64,
    until: u64,
    /// The last step at which the node still led a partition (a full node hands off).
    led_at: Option<u64>,
}

struct Harness {
    opts: NodesOpts,
    rng: ChaCha8Rng,
    /// Bit rot's own stream and its rate per restart in the fault phase, and the disk-full
    /// fault's stream and its rate per step: a seed that draws neither runs exactly as it
    /// did without them.
    rot_rng: ChaCha8Rng,
    rot_p: f64,
    disk_rng: ChaCha8Rng,
    fill_p: f64,
    /// Nodes whose disk is full now.
    full: BTreeMap<u64, Fill>,
    /// How long after its disk fills a node may still win an election already under way: it
    /// sees the disk within 100 ms (`Node::watch_disk`) and closes its election gate at the
    /// next ping (100 ms); a campaign begun before that has its votes within openraft's vote
    /// timeout (`election_timeout_min_ms`) and a message's latency each way.
    full_election_ms: u64,
    slots: Vec<Rc<RefCell<Slot>>>,
    work: Rc<Workload>,
    /// (partition, applied term, applied index) → (digest, node that first showed it).
    applied: BTreeMap<(GroupId, u64, u64), (u64, u64)>,
    /// (partition, term) → nodes seen leading it.
    leaders: BTreeMap<(GroupId, u64), BTreeSet<u64>>,
    /// Crashed nodes and the step they restart at.
    down: BTreeMap<u64, u64>,
    /// Cut-off nodes and the step they are healed at.
    cut: BTreeMap<u64, u64>,
    trace: u64,
    crashes: u64,
    power_losses: u64,
    cuts: u64,
    /// A node whose wall clock is off, its first offset, the step it jumps at and to what.
    skew: Option<(u64, i64, u64, i64)>,
    /// Restarts with bit rot drawn, and those whose newest segment had no place for it.
    rots: u64,
    rot_no_room: u64,
    fills: u64,
    /// The longest a full node went on leading a partition after its disk filled (ms).
    full_led_ms: u64,
    /// Leaderships won by a node whose disk was full, and the latest after the fill (ms).
    won_while_full: u64,
    won_while_full_ms: u64,
}

type Violation = (u64, &'static str, String);

const LINEARIZABLE: &str = "the history is linearizable per key";
const SAME_CONTENTS: &str = "replicas that applied the same entry hold the same contents";
const TTLS: &str = "expiring keys live out their lifetime, and no longer";

/// Removes and returns the nodes whose scheduled step (restart or heal) has come.
fn take_due(schedule: &mut BTreeMap<u64, u64>, step: u64) -> Vec<u64> {
    let due: Vec<u64> = schedule
        .iter()
        .filter(|(_, at)| **at <= step)
        .map(|(id, _)| *id)
        .collect();
    for id in &due {
        schedule.remove(id);
    }
    due
}

impl Harness {
    fn check(&mut self, step: u64) -> Result<(), Violation> {
        for slot in &self.slots {
            let mut s = slot.borrow_mut();
            let id = s.id;
            let Some((node, stores)) = s.node.clone() else {
                continue;
            };
            s.recovering = recovering(&stores.log);
            for g in node.groups() {
                let m = g.raft.metrics().borrow().clone();
                if m.state == ServerState::Leader {
                    if s.recovering.contains(&g.id) {
                        return Err((
                            step,
                            NO_RECOVERING_LEADER,
                            format!(
                                "node {id} leads {:#} in term {} while recovering",
                                g.id, m.current_term
                            ),
                        ));
                    }
                    let won = self
                        .leaders
                        .entry((g.id, m.current_term))
                        .or_default()
                        .insert(id);
                    if let Some(fill) = self.full.get_mut(&id) {
                        fill.led_at = Some(step);
                        if won {
                            let after = step - fill.since;
                            self.won_while_full += 1;
                            self.won_while_full_ms = self.won_while_full_ms.max(after);
                            if after > self.full_election_ms {
                                return Err((
                                    step,
                                    NO_FULL_LEADER,
                                    format!(
                                        "node {id} won {:#} in term {}, {after} ms after its disk filled",
                                        g.id, m.current_term
                                    ),
                                ));
                            }
                        }
                    }
                }
                if crate::trace_on() {
                    eprintln!(
                        "{step} n{id} {} {:?} term {} leader {:?} applied {:?}",
                        g.id,
                        m.state,
                        m.current_term,
                        m.current_leader,
                        m.last_applied.map(|l| l.index)
                    );
                }
                self.trace = mix(
                    self.trace,
                    mix(
                        (g.id.keyspace as u64) << 40 | id << 8 | g.id.partition as u64,
                        m.current_term << 32 | m.last_applied.map_or(0, |l| l.index),
                    ),
                );
            }
            // Applies change the state machines without a commit (they go to the overlay):
            // check again when either moved.
            let applied: u64 = node
                .groups()
                .iter()
                .map(|g| {
                    g.raft
                        .metrics()
                        .borrow()
                        .last_applied
                        .map_or(0, |l| l.index)
                })
                .sum();
            let stamp = (stores.state.commit_count(), applied);
            if s.checked == Some(stamp) {
                continue;
            }
            s.checked = Some(stamp);
            // Both the file's checkpoints and the state machines' views: equal applied ids,
            // equal contents, whichever of the two each digest comes from.
            let digests = file_digests(&stores)
                .and_then(|f| Ok(f.into_iter().chain(view_digests(&node)?)))
                .map_err(|e| {
                    (
                        step,
                        "the state store reads back",
                        format!("node {id}: {e}"),
                    )
                })?;
            for (p, (applied, digest)) in digests {
                let Some((term, index)) = applied else {
                    continue;
                };
                match self.applied.get(&(p, term, index)) {
                    Some((d, other)) if *d != digest => {
                        return Err((
                            step,
                            SAME_CONTENTS,
                            format!(
                                "{p:#} at {term}-{index}: node {other} digest {d:x}, node {id} digest {digest:x}"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.applied.insert((p, term, index), (digest, id));
                    }
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self, sim: &mut turmoil::Sim, id: u64, step: u64) {
        let kind = if self.rng.random_bool(0.5) {
            CrashKind::PowerLoss
        } else {
            CrashKind::Process
        };
        {
            let mut s = self.slots[id as usize - 1].borrow_mut();
            let s = &mut *s;
            if kind == CrashKind::PowerLoss {
                let (tear, seed) = (self.rng.random_bool(0.5), self.rng.random());
                s.power.lock().unwrap().set_tear(tear, seed);
            }
            s.log_dir.crash(kind, &s.power);
            s.state_disk.crash(kind, &s.power);
            s.node = None;
            s.checked = None;
        }
        sim.crash(host_name(id));
        self.crashes += 1;
        self.power_losses += (kind == CrashKind::PowerLoss) as u64;
        let back = step + self.rng.random_range(200..3000);
        self.down.insert(id, back);
        if self.opts.verbose {
            eprintln!("step {step}: crash node {id} ({kind:?}), back at {back}");
        }
    }

    fn set_cut(&self, sim: &turmoil::Sim, id: u64, cut: bool) {
        for other in 1..=self.opts.nodes {
            if other != id {
                // Held, not dropped: turmoil's TCP has no retransmission, so a dropped
                // segment would leave a hole in the byte stream, which real TCP never does.
                // Held segments arrive after the heal, as retransmitted ones would.
                if cut {
                    sim.hold(host_name(id), host_name(other));
                } else {
                    sim.release(host_name(id), host_name(other));
                }
            }
        }
    }

    /// Bit rot before node `id`'s restart, drawn at `rot_p` (stage 1's rule): 16 bytes of
    /// the newest segment its restart opens, in synced records with a whole record after
    /// them. Not while another node is recovering or has its wall clock off: two impaired
    /// replicas of three can leave a group without a leader for good, which is right but
    /// ends the run's liveness. Two damaged replicas whose lost entries no third one holds
    /// may not elect (those entries may be committed); nor may a recovering replica and a
    /// behind one when the longest log is on the node whose clock is off, since it does not
    /// lead until its clock is in step again (seeds 15, 19, 26, 50, 66 of 100 did).
    fn rot(&mut self, id: u64, step: u64) {
        if !self.rot_rng.random_bool(self.rot_p) {
            return;
        }
        let others_impaired = self.slots.iter().any(|o| {
            let o = o.borrow();
            o.id != id
                && (!o.recovering.is_empty() || clock_off(o.clock_offset.load(Ordering::Relaxed)))
        });
        if others_impaired {
            return;
        }
        let mut s = self.slots[id as usize - 1].borrow_mut();
        match s.log_dir.rot(&mut self.rot_rng, ROT_BYTES, None) {
            Some(r) => {
                self.rots += 1;
                if self.opts.verbose {
                    eprintln!("step {step}: bit rot in node {id}'s log: {r:?}");
                }
                s.rot = Some(r);
            }
            None => self.rot_no_room += 1,
        }
    }

    /// Fills node `id`'s disk below its reserve (`fill`), or gives it room again.
    fn set_full(&mut self, id: u64, fill: Option<Fill>, step: u64) {
        let s = self.slots[id as usize - 1].borrow();
        match fill {
            Some(f) => {
                s.space.set_free_bytes(FULL_BYTES);
                if self.opts.verbose {
                    eprintln!("step {step}: node {id}'s disk full until {}", f.until);
                }
                self.fills += 1;
                self.full.insert(id, f);
            }
            None => {
                s.space.set_free_bytes(ROOMY_BYTES);
                if let Some(f) = self.full.remove(&id) {
                    let led = f.led_at.map_or(0, |at| at.saturating_sub(f.since));
                    self.full_led_ms = self.full_led_ms.max(led);
                }
                if self.opts.verbose {
                    eprintln!("step {step}: node {id}'s disk has room again");
                }
            }
        }
    }

    fn faults(&mut self, sim: &mut turmoil::Sim, step: u64) {
        if let Some((id, first, at, jumped)) = self.skew {
            // Not while another node is recovering from a damaged log: the two impaired
            // replicas the bit rot above avoids, the other way round (seed 192). It waits.
            let others_recovering = self.slots.iter().any(|o| {
                let o = o.borrow();
                o.id != id && !o.recovering.is_empty()
            });
            if step == at && others_recovering && clock_off(jumped) {
                self.skew = Some((id, first, at + 1, jumped));
            } else if step == at {
                self.slots[id as usize - 1]
                    .borrow()
                    .clock_offset
                    .store(jumped, Ordering::Relaxed);
                if self.opts.verbose {
                    eprintln!("step {step}: node {id}'s wall clock jumps to {jumped:+} ms");
                }
            }
        }
        for id in take_due(&mut self.down, step) {
            self.rot(id, step);
            sim.bounce(host_name(id));
            if self.opts.verbose {
                eprintln!("step {step}: restart node {id}");
            }
        }
        let due: Vec<u64> = self
            .full
            .iter()
            .filter(|(_, f)| f.until <= step)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.set_full(id, None, step);
        }
        if self.disk_rng.random_bool(self.fill_p) {
            let id = self.disk_rng.random_range(1..=self.opts.nodes);
            let until = step + self.disk_rng.random_range(500..3000);
            if !self.full.contains_key(&id) {
                let fill = Fill {
                    since: step,
                    until,
                    led_at: None,
                };
                self.set_full(id, Some(fill), step);
            }
        }
        for id in take_due(&mut self.cut, step) {
            self.set_cut(sim, id, false);
            if self.opts.verbose {
                eprintln!("step {step}: heal node {id}");
            }
        }
        let id = self.rng.random_range(1..=self.opts.nodes);
        if self.rng.random_bool(0.0008) && !self.down.contains_key(&id) {
            self.crash(sim, id, step);
        } else if self.rng.random_bool(0.0008) && !self.cut.contains_key(&id) {
            let until = step + self.rng.random_range(100..3000);
            self.cut.insert(id, until);
            self.set_cut(sim, id, true);
            self.cuts += 1;
            if self.opts.verbose {
                eprintln!("step {step}: cut off node {id} until {until}");
            }
        }
    }

    fn heal_all(&mut self, sim: &mut turmoil::Sim, step: u64) {
        for id in std::mem::take(&mut self.cut).into_keys() {
            self.set_cut(sim, id, false);
        }
        let full: Vec<u64> = self.full.keys().copied().collect();
        for id in full {
            self.set_full(id, None, step);
        }
        for id in std::mem::take(&mut self.down).into_keys() {
            sim.bounce(host_name(id));
        }
    }

    /// Every node's links and groups, for `-v`.
    fn dump(&self) {
        for slot in &self.slots {
            let s = slot.borrow();
            let Some((node, _)) = &s.node else {
                eprintln!("node {}: down", s.id);
                continue;
            };
            for peer in 1..=self.opts.nodes {
                if let Some(l) = node.transport.link_stats(peer) {
                    // (Instants of a host's paused clock cannot be read from out here.)
                    eprintln!(
                        "node {} -> {peer}: connected {}, refused {}, rtt {:?} us",
                        s.id,
                        l.connected,
                        l.refused_since.is_some(),
                        l.rtt_us
                    );
                }
            }
            for (k, n) in s.counts.lock().unwrap().iter() {
                eprintln!("node {} served {n} × {k}", s.id);
            }
            for g in node.groups() {
                let m = g.raft.metrics().borrow().clone();
                eprintln!(
                    "node {} {}: {:?} vote {} last log {:?} applied {:?} leader {:?} replication {:?}",
                    s.id, g.id, m.state, m.vote, m.last_log_index, m.last_applied.map(|l| l.index), m.current_leader,
                    m.replication
                );
            }
        }
    }

    /// After the final reads: every replica of each partition applied the same entries and
    /// holds the same contents.
    fn converged(&self) -> Result<(), String> {
        let mut seen: BTreeMap<GroupId, (Applied, u64, u64)> = BTreeMap::new();
        for slot in &self.slots {
            let s = slot.borrow();
            let Some((node, _)) = &s.node else {
                return Err(format!("node {} is not up", s.id));
            };
            for (p, (applied, digest)) in view_digests(node)? {
                match seen.get(&p) {
                    None => {
                        seen.insert(p, (applied, digest, s.id));
                    }
                    Some((a, d, other)) if (*a, *d) != (applied, digest) => {
                        return Err(format!(
                            "{p:#}: node {other} applied {a:?} digest {d:x}, node {} applied {applied:?} digest {digest:x}",
                            s.id
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

pub fn run_seed(seed: u64, opts: &NodesOpts) -> NodesResult {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut builder = turmoil::Builder::new();
    let max_latency = [1, 5, 20][rng.random_range(0..3)];
    builder
        .rng_seed(rng.random())
        .tick_duration(Duration::from_millis(1))
        .simulation_duration(Duration::from_secs(24 * 3600))
        .min_message_latency(Duration::from_micros(100))
        .max_message_latency(Duration::from_millis(max_latency));
    let mut sim = builder.build();
    // openraft draws each replica's election timeout from an unseeded RNG: a range of one
    // value removes the draw. Every replica gets the same one, as the lease requires the
    // same `election_timeout_max_ms` everywhere.
    let timeout = rng.random_range(300..600u64);
    let replication = Replication {
        partitions: PARTITIONS,
        factor: 3,
        write_timeout_ms: 2_000,
        election_timeout_min_ms: timeout,
        election_timeout_max_ms: timeout + 1,
        snapshot_every_entries: 40,
        backlog_entries: 10,
        ..Replication::default()
    };
    let peers: BTreeMap<u64, String> = (1..=opts.nodes)
        .map(|id| (id, format!("{}:{PEER_PORT}", host_name(id))))
        .collect();
    let work = Rc::new(Workload {
        seed,
        phase: Cell::new(Phase::Run),
        ops: RefCell::new(Vec::new()),
        next_value: Cell::new(1),
        final_reads_done: RefCell::new(BTreeSet::new()),
        ttl_ops: RefCell::default(),
        ttl_recent: RefCell::default(),
        refused_disk_full: Cell::new(0),
    });
    let mut slots = Vec::new();
    for id in 1..=opts.nodes {
        let slot = Rc::new(RefCell::new(Slot {
            id,
            log_dir: SimLogDir::new(),
            state_disk: SimDisk::new(),
            power: Power::new(Arc::new(AtomicBool::new(true))),
            starts: 0,
            node: None,
            checked: None,
            counts: Default::default(),
            // One per node and seed; the process runs one seed.
            clock_offset: Box::leak(Box::new(AtomicI64::new(0))),
            space: Arc::new(DiskSpace::simulated(MIN_FREE_BYTES, ROOMY_BYTES)),
            rot: None,
            open_failed: None,
            recovering: Vec::new(),
            repairs: 0,
            rot_records: 0,
            rot_entries: 0,
        }));
        let (s, w, p, r) = (
            slot.clone(),
            work.clone(),
            peers.clone(),
            replication.clone(),
        );
        let bug = opts.bug;
        sim.host(host_name(id), move || {
            run_host(s.clone(), w.clone(), p.clone(), r.clone(), bug)
        });
        slots.push(slot);
    }
    // Drawn from a stream of its own, so the fault schedule stays that of the seed.
    let skew = {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x5ce3_c10c);
        let mut pick = |from: &[i64]| from[r.random_range(0..from.len())];
        let (near, far) = (&SKEWS_MS[..3], &SKEWS_MS[3..]);
        let (first, then) = if pick(&[0, 0, 0, 1]) == 0 {
            // In step, then an hour off while it may lead: what the anchored clock is for.
            (pick(near), pick(far))
        } else {
            (pick(far), pick(near))
        };
        r.random_bool(0.5).then(|| {
            let id = r.random_range(1..=opts.nodes);
            let at = 2_000 + r.random_range(0..opts.steps.max(1));
            (id, first, at, then)
        })
    };
    if let Some((id, first, _, _)) = skew {
        slots[id as usize - 1]
            .borrow()
            .clock_offset
            .store(first, Ordering::Relaxed);
    }
    let mut rot_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb17_2075);
    let rot_p = if opts.bit_rot {
        [0.0, 0.1, 0.3][rot_rng.random_range(0..3)]
    } else {
        0.0
    };
    let mut disk_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd15c_f011);
    let fill_p = if opts.disk_full {
        [0.0, 0.0002, 0.0005][disk_rng.random_range(0..3)]
    } else {
        0.0
    };
    let mut h = Harness {
        skew,
        opts: opts.clone(),
        rng,
        rot_rng,
        rot_p,
        disk_rng,
        fill_p,
        full: BTreeMap::new(),
        full_election_ms: 200 + timeout + 2 * max_latency,
        slots,
        work: work.clone(),
        applied: BTreeMap::new(),
        leaders: BTreeMap::new(),
        down: BTreeMap::new(),
        cut: BTreeMap::new(),
        trace: seed,
        crashes: 0,
        power_losses: 0,
        cuts: 0,
        rots: 0,
        rot_no_room: 0,
        fills: 0,
        full_led_ms: 0,
        won_while_full: 0,
        won_while_full_ms: 0,
    };
    let started = Instant::now();
    let mut step = 0u64;
    let run = |sim: &mut turmoil::Sim, h: &mut Harness, step: &mut u64| -> Result<(), Violation> {
        *step += 1;
        sim.step().map_err(|e| {
            // A host that stopped on what its open found says which invariant broke.
            let failed = h
                .slots
                .iter()
                .find_map(|s| s.borrow_mut().open_failed.take());
            match failed {
                Some((invariant, detail)) => (*step, invariant, detail),
                None => (*step, "the simulation runs", e.to_string()),
            }
        })?;
        h.check(*step)
    };
    let result = (|| -> Result<(), Violation> {
        // Let the cluster form before the faults start.
        for _ in 0..2_000 {
            run(&mut sim, &mut h, &mut step)?;
        }
        for _ in 0..opts.steps {
            h.faults(&mut sim, step);
            run(&mut sim, &mut h, &mut step)?;
        }
        h.work.phase.set(Phase::Quiet);
        h.heal_all(&mut sim, step);
        for _ in 0..opts.settle {
            run(&mut sim, &mut h, &mut step)?;
        }
        h.work.phase.set(Phase::FinalRead);
        let deadline = step + 20_000;
        while h.work.final_reads_done.borrow().len() < opts.nodes as usize {
            if step > deadline {
                if h.opts.verbose {
                    h.dump();
                }
                return Err((
                    step,
                    "every node answers the final reads",
                    format!("done: {:?}", h.work.final_reads_done.borrow()),
                ));
            }
            run(&mut sim, &mut h, &mut step)?;
        }
        // Replicas apply what they learn is committed a heartbeat later.
        let deadline = step + 5_000;
        loop {
            match h.converged() {
                Ok(()) => break,
                Err(e) if step > deadline => {
                    return Err((step, "replicas converge after healing", e));
                }
                Err(_) => run(&mut sim, &mut h, &mut step)?,
            }
        }
        Ok(())
    })();
    let history = History {
        ops: work.ops.borrow().clone(),
    };
    let mut violation = result.err();
    let report = check_linearizable(&history, 2_000_000);
    if violation.is_none() {
        if let Some(v) = report.violations.first() {
            violation = Some((step, LINEARIZABLE, format!("{v:?}")));
        } else if !report.keys_timed_out.is_empty() {
            violation = Some((
                step,
                "the linearizability search finishes",
                format!("keys timed out: {:?}", report.keys_timed_out),
            ));
        } else if !report.is_linearizable() {
            violation = Some((
                step,
                "the history is well formed",
                format!("{:?}", report.malformed),
            ));
        }
    }
    let ttl_checked = match check_ttls(&work.ttl_ops.borrow()) {
        Ok(n) => n,
        Err(e) => {
            violation = violation.or(Some((step, TTLS, e)));
            0
        }
    };
    let acked = history
        .ops
        .iter()
        .filter(|o| o.outcome == Outcome::Written)
        .count();
    let multi = h.leaders.values().filter(|s| s.len() > 1).count();
    let max_term = h.leaders.keys().map(|(_, t)| *t).max().unwrap_or(0);
    let (created, removed) = h.slots.iter().fold((0, 0), |(c, r), s| {
        let (c1, r1) = s.borrow().log_dir.counts();
        (c + c1, r + r1)
    });
    let skew = match h.skew {
        Some((id, first, at, then)) => {
            format!("node {id}'s clock {first:+} ms then {then:+} ms from step {at}")
        }
        None => "clocks agree".into(),
    };
    let sum = |f: &dyn Fn(&Slot) -> u64| h.slots.iter().map(|s| f(&s.borrow())).sum::<u64>();
    let repairs = sum(&|s| s.repairs);
    let rot_records = sum(&|s| s.rot_records);
    let rot_entries = sum(&|s| s.rot_entries);
    let refused_appends = sum(&|s| s.counts.lock().unwrap().get(REFUSED).copied().unwrap_or(0));
    let summary = format!(
        "seed {seed}: {} ops ({acked} acknowledged writes), {ttl_checked} reads of expiring keys checked, {skew}, {} crashes ({} power losses), {} cut-offs, bit rot {} (no room {}; repaired {repairs}, discarding {rot_records} records, {rot_entries} entries), disks full {} (writes refused {}, appends refused {refused_appends}, led up to {} ms after the fill, leaderships won while full {} up to {} ms after), max term {max_term}, {multi} terms with two leaders, log segments created {created} removed {removed}, trace {:016x}, {:.1} s",
        history.ops.len(),
        h.crashes,
        h.power_losses,
        h.cuts,
        h.rots,
        h.rot_no_room,
        h.fills,
        work.refused_disk_full.get(),
        h.full_led_ms,
        h.won_while_full,
        h.won_while_full_ms,
        h.trace,
        started.elapsed().as_secs_f64(),
    );
    NodesResult { violation, summary }
}

const NODES_USAGE: &str =
    "usage: replikv-sim nodes [--seeds A..B | --seeds N | --seed S] [--steps N] [--settle N]
                         [--check-determinism [K]] [--no-bit-rot] [--no-disk-full] [-v]
  Stage 2: real replikv nodes (replikv_cluster::Node and its peer transport) on turmoil hosts.
  --seeds 1..20    seeds to run (a plain N means 1..N); default 1..5
  --steps N        fault-phase steps of 1 ms simulated time (default 10000)
  --settle N       healed steps before the final reads (default 3000)
  --check-determinism [K]  run the first K seeds (default all) twice; compare trace hashes
  --bug skip-read-index    every node serves primary reads without a read index or lease
  --bug ack-before-commit  every node acknowledges quorum writes before they commit
  --bug stamp-with-wall-clock  every node stamps entries with its wall clock, jumps and all
  --no-bit-rot     no bit rot in restarting nodes' newest log segment (on by default)
  --no-disk-full   no node's disk fills below its reserve (on by default)
  --expect-violation       self-test: succeed only if some seed fails a check (with --bug)
  Each seed of a range runs in a process of its own, exactly as its replay (--seed S) does.";

/// The arguments that replay `seed` with `opts`.
fn replay_args(seed: u64, opts: &NodesOpts) -> Vec<String> {
    let mut a = vec![
        "--seed".to_string(),
        seed.to_string(),
        "--steps".into(),
        opts.steps.to_string(),
        "--settle".into(),
        opts.settle.to_string(),
    ];
    match opts.bug {
        NodeBug::None => {}
        NodeBug::SkipReadIndex => a.extend(["--bug".into(), "skip-read-index".into()]),
        NodeBug::AckBeforeCommit => a.extend(["--bug".into(), "ack-before-commit".into()]),
        NodeBug::StampWithWallClock => a.extend(["--bug".into(), "stamp-with-wall-clock".into()]),
    }
    if !opts.bit_rot {
        a.push("--no-bit-rot".into());
    }
    if !opts.disk_full {
        a.push("--no-disk-full".into());
    }
    a
}

/// Runs one seed in a process of its own (the same binary, `nodes --seed S`) and returns
/// what it printed. A seed's result must not depend on what ran before it in the same
/// process; tokio's task ids and the like are process-wide, so a fresh process is what a
/// replay gets, and what every seed gets here.
fn run_child(seed: u64, opts: &NodesOpts) -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .arg("nodes")
        .args(replay_args(seed, opts))
        .stderr(std::process::Stdio::inherit())
        .output();
    match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let ran = text.starts_with(&format!("seed {seed}:"));
            let violated = text.lines().any(|l| l.starts_with("VIOLATION"));
            if ran && (o.status.success() || violated) {
                return Some(text);
            }
            // A seed that crashed (a panic outside a node task, an abort) is a failure too.
            Some(format!(
                "seed {seed}: did not finish ({})\nVIOLATION seed {seed} step 0: the seed runs to its end: {}\n  replay: replikv-sim nodes {}",
                o.status,
                text.lines().last().unwrap_or("no output"),
                replay_args(seed, opts).join(" ")
            ))
        }
        Err(e) => {
            eprintln!("running seed {seed}: {e}");
            None
        }
    }
}

/// The trace hash in a seed's summary line.
fn trace_of(out: &str) -> Option<&str> {
    let line = out.lines().next()?;
    let at = line.find("trace ")? + "trace ".len();
    line[at..].split(',').next()
}

/// `replikv-sim nodes ...`
pub fn main(args: Vec<String>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let mut opts = NodesOpts {
        nodes: 3,
        steps: 10_000,
        settle: 3_000,
        verbose: false,
        bug: NodeBug::None,
        bit_rot: true,
        disk_full: true,
    };
    let (mut first, mut last) = (1u64, 5u64);
    let mut determinism: Option<u64> = None;
    let mut expect_violation = false;
    let mut args = args.into_iter().peekable();
    let fail = |msg: String| {
        eprintln!("{msg}\n{NODES_USAGE}");
        ExitCode::from(2)
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let parsed = match a.as_str() {
            "--seeds" => value()
                .and_then(|v| crate::parse_range(&v))
                .map(|r| (first, last) = r),
            "--seed" => value()
                .and_then(|v| v.parse().map_err(|_| format!("not a number: {v}")))
                .map(|s: u64| (first, last) = (s, s)),
            "--steps" | "--settle" => value()
                .and_then(|v| v.parse().map_err(|_| format!("not a number: {v}")))
                .map(|n| match a.as_str() {
                    "--steps" => opts.steps = n,
                    _ => opts.settle = n,
                }),
            "--check-determinism" => {
                determinism = Some(u64::MAX);
                if let Some(k) = args.peek().and_then(|n| n.parse::<u64>().ok()) {
                    determinism = Some(k);
                    args.next();
                }
                Ok(())
            }
            "-v" | "--verbose" => {
                opts.verbose = true;
                Ok(())
            }
            "--no-bit-rot" => {
                opts.bit_rot = false;
                Ok(())
            }
            "--no-disk-full" => {
                opts.disk_full = false;
                Ok(())
            }
            "--expect-violation" => {
                expect_violation = true;
                Ok(())
            }
            "--bug" => value().and_then(|v| {
                opts.bug = match v.as_str() {
                    "skip-read-index" => NodeBug::SkipReadIndex,
                    "ack-before-commit" => NodeBug::AckBeforeCommit,
                    "stamp-with-wall-clock" => NodeBug::StampWithWallClock,
                    other => return Err(format!("unknown bug {other}")),
                };
                Ok(())
            }),
            "-h" | "--help" => {
                println!("{NODES_USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other}")),
        };
        if let Err(e) = parsed {
            return fail(e);
        }
    }
    if std::env::var_os("RUST_LOG").is_some() {
        // Node logs for one seed's story; host names come with each line's span.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .without_time()
            .with_ansi(false)
            .try_init();
    }
    let started = Instant::now();
    if first == last && determinism.is_none() && !expect_violation {
        // One seed, in this process: a replay, or one seed of a range run by the parent.
        let r = run_seed(first, &opts);
        println!("{}", r.summary);
        if let Some((step, invariant, detail)) = &r.violation {
            println!(
                "VIOLATION seed {first} step {step}: {invariant}: {detail}\n  replay: replikv-sim nodes {}",
                replay_args(first, &opts).join(" ")
            );
        }
        return if r.violation.is_some() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let (mut seeds, mut violations, mut det_checked, mut det_failed) = (0u64, 0u64, 0u64, 0u64);
    // Seeds that failed a safety check (not liveness): what the self-test counts.
    let mut caught = 0u64;
    for seed in first..=last {
        let Some(out) = run_child(seed, &opts) else {
            return ExitCode::FAILURE;
        };
        seeds += 1;
        let mut lines = out.lines();
        let mut line = lines.next().unwrap_or_default().to_string();
        let rest: Vec<&str> = lines.collect();
        if determinism.is_some_and(|k| seed - first < k) {
            det_checked += 1;
            let again = run_child(seed, &opts).unwrap_or_default();
            let again_trace = trace_of(&again);
            if again_trace.is_some() && again_trace == trace_of(&out) {
                line.push_str(", deterministic");
            } else {
                det_failed += 1;
                line.push_str(&format!(
                    ", NOT DETERMINISTIC: trace {} the second time",
                    again_trace.unwrap_or("missing")
                ));
            }
        }
        println!("{line}");
        for l in &rest {
            println!("{l}");
        }
        violations += rest.iter().any(|l| l.starts_with("VIOLATION")) as u64;
        caught += rest.iter().any(|l| {
            l.starts_with("VIOLATION")
                && (l.contains(LINEARIZABLE) || l.contains(SAME_CONTENTS) || l.contains(TTLS))
        }) as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds, {violations} violations, determinism checked on {det_checked} seeds ({det_failed} failed), {secs:.1}s"
    );
    // A seed that only failed to finish its final reads does not count as caught.
    crate::verdict(expect_violation, caught, seeds, violations, det_failed)
}
