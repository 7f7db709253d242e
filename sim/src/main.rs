//! replikv-sim: a deterministic simulation of replikv's replication core (one openraft group
//! of N nodes with replikv's `TypeConfig`), after docs/design/simulation.md stage 1, cut down.
//! See README.md for what is real and what is a stand-in.

mod disk;
mod net;
mod nodes;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::RaftLogReader;
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use replikv_raft::{LogId, LogStore, Raft, Recovery, StateMachine, Vote};
use replikv_storage::{DamagedLog, FsyncPolicy, LogOp, Opened, RaftLog, Store, Stores, WriterKind};
use replikv_types::{KvOp, Ops, SetCond, StoredValue, WriteRequest};

use disk::{CrashKind, Power, SharedPower, SimDisk, SimLogDir};
use net::{NetState, SimNetwork};
use store::{now, Obs, SharedObs, SimLog, SimSm, PARTITION};

const KEYS: &[&str] = &["k0", "k1", "k2", "k3"];
/// Raft log segments this small (the product's default is 64 MiB) are begun, checkpointed
/// and removed once purged many times in a run.
pub const SEGMENT_BYTES: u64 = 4 << 10;
/// The virtual wall clock (`now_ms`) at step 0.
const EPOCH_MS: u64 = 1_750_000_000_000;
/// Bytes inverted by one bit rot: the repro (16 bytes of an entry).
const ROT_BYTES: usize = 16;
/// The log store's field holding a partition's vote (`replikv-raft`'s log_store.rs).
const VOTE_FIELD: &str = "vote";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bug {
    None,
    /// A restart finds the last few log records torn, which the node had acknowledged as
    /// durable.
    LostAppend,
    /// The state machine applies each batch of entries in reverse order.
    ApplyReversed,
    /// A replica repaired after bit rot acts as if the repair had recorded no high water: it
    /// votes for any candidate openraft would, and campaigns.
    ForgetHighWater,
    /// Not a replikv bug: network delays drawn from an OS-seeded RNG, to show that
    /// `--check-determinism` catches a leak of outside entropy.
    Nondeterministic,
}

impl Bug {
    fn flag(self) -> &'static str {
        match self {
            Bug::None => "",
            Bug::LostAppend => " --bug lost-append",
            Bug::ApplyReversed => " --bug apply-reversed",
            Bug::ForgetHighWater => " --bug forget-high-water",
            Bug::Nondeterministic => " --bug nondeterministic",
        }
    }
}

#[derive(Clone, Debug)]
struct Opts {
    nodes: u64,
    steps: u64,
    settle: u64,
    bug: Bug,
    snapshots: bool,
    verbose: bool,
    unseeded_tokio: bool,
    /// Bit rot in the newest log segment of crashed nodes (off by default until the open
    /// findings in README.md are fixed: with it, seeds 1..=300 fail in 10).
    bit_rot: bool,
}

/// One entry the checker has seen committed.
#[derive(Clone, Debug)]
struct Ledger {
    log_id: LogId,
    hash: u64,
    /// `(req_id, key, value)` of a SET.
    set: Option<(u64, Vec<u8>, Vec<u8>)>,
}

#[derive(Clone, Debug)]
struct Ack {
    req_id: u64,
    key: Vec<u8>,
    value: Vec<u8>,
    log_id: LogId,
}

struct Node {
    id: u64,
    config: Arc<Config>,
    /// The node's simulated Raft log directory (a disk per segment) and state disk: they
    /// outlive every incarnation.
    log_dir: SimLogDir,
    state_disk: SimDisk,
    /// The current incarnation's stores (the Raft log on the directory, a redb database on
    /// the state disk, task writers), and the power supply of its disks.
    stores: Option<Stores>,
    power: SharedPower,
    /// Times the node has started.
    starts: u64,
    /// At its last crash: the node's applied index and last log index, as its stores showed
    /// them (unsynced commits included).
    at_crash: (u64, u64),
    obs: SharedObs,
    /// The current incarnation's log store and state machine (the checker reads through them).
    log: Option<LogStore>,
    sm: Option<StateMachine>,
    raft: Option<Raft>,
    alive: store::Alive,
    /// Step at which a crashed node comes back.
    restart_at: u64,
    /// The current (or, while down, the last) incarnation's recovery from a damaged log, as
    /// its log store keeps it; and the one its vote and campaign rules ask (the same, except
    /// under `--bug forget-high-water`).
    recovery: Recovery,
    gate: Recovery,
    /// Whether its election timer is off (while recovering it does not campaign).
    elect_off: bool,
    /// Bit rot to apply before its next restart (the two-of-three fault): `Some(entry_of)`,
    /// see `SimLogDir::rot`.
    rot_next: Option<Option<u32>>,
    checked_upto: u64,
    /// The stores' commit counts at the last check that read them, and the commit point and
    /// applied index it found: while the counts stay the same, nothing stored has changed.
    checked_at: Option<(u64, u64)>,
    last_seen: (u64, u64),
}

#[derive(Default, Debug)]
struct Stats {
    writes: u64,
    acked: u64,
    crashes: u64,
    /// Crashes that lost power (only synced bytes left), and of those, disks left with a torn
    /// unsynced tail (a prefix of the unsynced writes, the last in part).
    power_losses: u64,
    /// Power losses inside a write or sync (in the middle of a commit).
    mid_io: u64,
    torn: u64,
    /// Unsynced writes lost at crashes.
    writes_lost: u64,
    /// Creations and removals of log segments not yet synced in their directory at a power
    /// loss, and of those, the ones it undid.
    dir_changes: u64,
    dir_changes_lost: u64,
    /// Log segments begun and removed (once their entries were all purged), over all nodes.
    segments_created: u64,
    segments_removed: u64,
    /// Restarts that came back with an older applied state (and re-applied), or a shorter log.
    sm_rollbacks: u64,
    log_rollbacks: u64,
    partitions: u64,
    /// Restarts after bit rot in the newest log segment (repaired), restarts that drew bit rot
    /// but whose segment had no synced record with a record after it, and the two-of-three
    /// events (every node killed, a majority rotted, the rest back last).
    rot: u64,
    rot_no_room: u64,
    rot_majority: u64,
    /// Records after the damage that repairs discarded, of them entries of the partition.
    rot_records_discarded: u64,
    rot_entries_discarded: u64,
    /// Votes a recovering replica refused, recoveries completed (the high water reached
    /// again), and repairs that could not restore the last vote saved (docs/design/
    /// durability.md: a damaged record that was itself the vote).
    votes_refused_recovering: u64,
    recoveries: u64,
    votes_lost_to_rot: u64,
    multi_leader_terms: u64,
    max_term: u64,
    max_committed: u64,
}

struct Violation {
    step: u64,
    invariant: &'static str,
    detail: String,
}

struct SeedResult {
    violation: Option<Violation>,
    trace: Vec<u64>,
    stats: Stats,
    lost: u64,
    sent: u64,
    kinds: [u64; 3],
}

impl Node {
    /// What the node's stores hold, for `-v`: commit point, purge point, last log id,
    /// snapshot and applied index (`None` while it is down).
    fn describe_storage(&self) -> Option<String> {
        let (mut log, mut sm) = (self.log.clone()?, self.sm.clone()?);
        let state = now(log.get_log_state()).ok();
        let snapshot = now(sm.get_current_snapshot())
            .ok()
            .flatten()
            .map(|s| s.meta.last_log_id);
        Some(format!(
            "committed {:?} purged {:?} last log {:?} snapshot {snapshot:?} applied {:?}",
            self.committed(),
            state.as_ref().and_then(|s| s.last_purged_log_id),
            state.as_ref().and_then(|s| s.last_log_id),
            self.applied(),
        ))
    }

    /// The commit point saved in the node's log store.
    fn committed(&self) -> Option<LogId> {
        now(self.log.clone()?.read_committed()).ok().flatten()
    }

    /// The last entry applied by the node's state machine (saved with what it applied).
    fn applied(&self) -> Option<LogId> {
        now(self.sm.clone()?.applied_state()).ok()?.0
    }

    /// The node's keys and values, as its state machine holds them (its overlay over the
    /// `kv` table).
    fn kv(&self) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
        let sm = self.sm.as_ref().ok_or("the node is down")?;
        let mut out = BTreeMap::new();
        let mut bad = None;
        sm.view()
            .contents(|k, raw| match StoredValue::decode(raw) {
                Some(val) => {
                    out.insert(k.to_vec(), val.data.to_vec());
                    true
                }
                None => {
                    bad = Some(String::from_utf8_lossy(k).into_owned());
                    false
                }
            })?;
        match bad {
            Some(k) => Err(format!("undecodable value of key {k}")),
            None => Ok(out),
        }
    }
}

fn entry_hash(e: &replikv_raft::Entry) -> u64 {
    let raw = bincode::serialize(e).expect("entry serializes");
    fnv(&raw)
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn mix(h: u64, v: u64) -> u64 {
    fnv(&[h.to_le_bytes(), v.to_le_bytes()].concat())
}

static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// The one liveness check (the others are safety).
const LIVENESS: &str = "convergence after healing";

/// `REPLIKV_SIM_TRACE=1`: print every AppendEntries sent, every log read and purge, and every
/// node's term/leader/vote each 50 steps, to stderr (for analysing one seed).
pub fn trace_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("REPLIKV_SIM_TRACE").is_some())
}

struct Sim {
    opts: Opts,
    seed: u64,
    rng: ChaCha8Rng,
    net: net::Net,
    nodes: Vec<Node>,
    ledger: BTreeMap<u64, Ledger>,
    applied_digest: BTreeMap<u64, (LogId, u64)>,
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    acks: Arc<Mutex<Vec<Ack>>>,
    next_req: u64,
    /// Active partitions: (heal at step, links cut).
    cuts: Vec<(u64, Vec<(u64, u64)>)>,
    stats: Stats,
    trace: Vec<u64>,
    hash: u64,
    /// Per-step probabilities of a crash and of a new partition (drawn per seed).
    crash_p: f64,
    cut_p: f64,
    /// Bit rot's own stream (so that a seed that draws none runs as it did before bit rot
    /// existed), its probability at a restart of the fault phase, and the per-step
    /// probability of the two-of-three event.
    rot_rng: ChaCha8Rng,
    rot_p: f64,
    rot_majority_p: f64,
}

/// What a repair discarded, read from the damaged log before the repair.
struct Discarded {
    /// Lowest index of the partition appended or truncated after the damage: from there on
    /// the repaired log may hold less, or older entries, than the node acknowledged.
    first: Option<u64>,
    records: u64,
    entries: u64,
    /// The least vote (term, node) the repaired log must hold: the vote as of the damage, a
    /// vote record after it, or the leader of an entry after it (`damage.rs`).
    vote_floor: Option<(u64, u64)>,
}

impl Discarded {
    fn of(d: &DamagedLog) -> Result<Discarded, String> {
        let vote = |raw: &[u8]| {
            bincode::deserialize::<Vote>(raw)
                .map(|v| (v.leader_id.term, v.leader_id.node_id))
                .map_err(|e| e.to_string())
        };
        let mut out = Discarded {
            first: None,
            records: d.damage().after.len() as u64,
            entries: 0,
            vote_floor: d
                .meta(PARTITION, VOTE_FIELD)
                .map(|v| vote(&v))
                .transpose()?,
        };
        let floor = |v: (u64, u64), out: &mut Discarded| {
            out.vote_floor = out.vote_floor.max(Some(v));
        };
        for op in &d.damage().after {
            match op {
                LogOp::Append { g: p, index, bytes } if *p == PARTITION => {
                    let e = replikv_raft::decode_record(bytes).map_err(|e| e.to_string())?;
                    out.entries += 1;
                    out.first = Some(out.first.map_or(*index, |f| f.min(*index)));
                    floor(
                        (e.log_id.leader_id.term, e.log_id.leader_id.node_id),
                        &mut out,
                    );
                }
                LogOp::TruncateFrom { g: p, index } if *p == PARTITION => {
                    out.first = Some(out.first.map_or(*index, |f| f.min(*index)));
                }
                LogOp::Meta { g: p, name, value } if *p == PARTITION && name == VOTE_FIELD => {
                    floor(vote(value)?, &mut out);
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

impl Sim {
    /// Must run inside the simulation's runtime (the stores' writers are tasks).
    fn new(seed: u64, opts: Opts) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let net_rng = ChaCha8Rng::seed_from_u64(rng.random());
        let loss = [0.0, 0.01, 0.05, 0.15][rng.random_range(0..4)];
        let max_delay_ms = [2, 10, 40][rng.random_range(0..3)];
        let crash_p = [0.0001, 0.0003, 0.001][rng.random_range(0..3)];
        let cut_p = [0.0001, 0.0003, 0.001][rng.random_range(0..3)];
        let mut rot_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb17_2075);
        let (rot_p, rot_majority_p) = if opts.nodes >= 2 && opts.bit_rot {
            (
                [0.0, 0.1, 0.3][rot_rng.random_range(0..3)],
                [0.0, 0.0, 0.0001][rot_rng.random_range(0..3)],
            )
        } else {
            // A single node refuses damage (no other replica holds what it lost).
            (0.0, 0.0)
        };
        let net = Arc::new(Mutex::new(NetState {
            rng: net_rng,
            rafts: BTreeMap::new(),
            cut: BTreeSet::new(),
            loss,
            max_delay_ms,
            sent: 0,
            lost: 0,
            kinds: [0; 3],
            os_entropy: opts.bug == Bug::Nondeterministic,
            votes_refused_recovering: 0,
        }));
        let mut nodes = Vec::new();
        for id in 1..=opts.nodes {
            // openraft draws each replica's election timeout once, in Raft::new, from
            // rand::thread_rng (not seeded). A range of exactly one value removes that draw's
            // effect; the value itself comes from the seed.
            let min = rng.random_range(300..600u64);
            let config = Config {
                cluster_name: "replikv-sim".into(),
                heartbeat_interval: 100,
                election_timeout_min: min,
                election_timeout_max: min + 1,
                install_snapshot_timeout: 2_000,
                max_payload_entries: 64,
                snapshot_policy: if opts.snapshots {
                    SnapshotPolicy::LogsSinceLast(50)
                } else {
                    SnapshotPolicy::Never
                },
                max_in_snapshot_log_to_keep: 10,
                purge_batch_size: 1,
                snapshot_max_chunk_size: 64,
                ..Default::default()
            };
            let config = Arc::new(config.validate().expect("valid raft config"));
            nodes.push(Node {
                id,
                config,
                log_dir: SimLogDir::new(),
                state_disk: SimDisk::new(),
                stores: None,
                power: Power::new(Default::default()),
                starts: 0,
                at_crash: (0, 0),
                obs: Arc::new(Mutex::new(Obs::new())),
                log: None,
                sm: None,
                raft: None,
                alive: Default::default(),
                restart_at: 0,
                recovery: Recovery::default(),
                gate: Recovery::default(),
                elect_off: false,
                rot_next: None,
                checked_upto: 0,
                checked_at: None,
                last_seen: (0, 0),
            });
        }
        Sim {
            opts,
            seed,
            rng,
            net,
            nodes,
            ledger: BTreeMap::new(),
            applied_digest: BTreeMap::new(),
            leaders: BTreeMap::new(),
            acks: Arc::new(Mutex::new(Vec::new())),
            next_req: 1,
            cuts: Vec::new(),
            stats: Stats::default(),
            trace: Vec::new(),
            hash: 0,
            crash_p,
            cut_p,
            rot_rng,
            rot_p,
            rot_majority_p,
        }
    }

    /// Whether any node but `k` is recovering from a damaged log (a down node: as its last
    /// incarnation left it).
    fn others_recovering(&self, k: usize) -> bool {
        (0..self.nodes.len()).any(|o| o != k && self.nodes[o].recovery.high_water().is_some())
    }

    /// Bit rot before node `k`'s restart: the rot the two-of-three event left it, or, in the
    /// fault phase, one drawn at `rot_p`. Not while another node is recovering: two damaged
    /// replicas whose lost entries no third one holds leave the group without a leader for
    /// good, which is right (those entries may be committed) but ends the run's liveness.
    /// The two-of-three event makes that case with a third replica that holds them.
    fn rot(&mut self, k: usize, step: u64) -> Option<disk::Rot> {
        if self.nodes[k].starts == 0 {
            return None;
        }
        let forced = self.nodes[k].rot_next.take();
        let drawn = step < self.opts.steps && self.rot_rng.random_bool(self.rot_p);
        let entry_of = match forced {
            Some(entry_of) => entry_of,
            None if drawn && !self.others_recovering(k) => None,
            None => return None,
        };
        let rot = self.nodes[k]
            .log_dir
            .rot(&mut self.rot_rng, ROT_BYTES, entry_of);
        match rot {
            Some(_) => self.stats.rot += 1,
            None => self.stats.rot_no_room += 1,
        }
        rot
    }

    /// The two-of-three event (with N nodes: a majority of N): every node is killed (a
    /// process crash, so each log comes back as written), bit rot hits a majority of them,
    /// each in front of an entry, so that each repair discards entries and records a high
    /// water, and the others, whose logs end furthest, come back 1.5–3 s after the last of
    /// them. Until then the damaged replicas must elect no leader (each refuses the other's
    /// shorter log, and none campaigns): losing the entries they discarded would lose
    /// commits. Then they vote for the intact replica, which holds everything they lost.
    async fn rot_majority(&mut self, step: u64) {
        let n = self.nodes.len();
        let last = |node: &Node| {
            node.log
                .clone()
                .and_then(|mut l| now(l.get_log_state()).ok())
                .and_then(|s| s.last_log_id)
                .map(|l| (l.leader_id.term, l.index))
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&k| std::cmp::Reverse((last(&self.nodes[k]), k)));
        let intact = n - (n / 2 + 1);
        for k in 0..n {
            self.crash(k, step, CrashKind::Process).await;
        }
        let mut back = step;
        for &k in &order[intact..] {
            self.nodes[k].rot_next = Some(Some(PARTITION.partition));
            self.nodes[k].restart_at = step + self.rot_rng.random_range(100..1_000);
            back = back.max(self.nodes[k].restart_at);
        }
        for &k in &order[..intact] {
            self.nodes[k].restart_at = back + self.rot_rng.random_range(1_500..3_000);
        }
        self.stats.rot_majority += 1;
        if self.opts.verbose {
            eprintln!(
                "step {step}: every node killed; bit rot for nodes {:?}, node(s) {:?} back last",
                order[intact..].iter().map(|&k| k + 1).collect::<Vec<_>>(),
                order[..intact].iter().map(|&k| k + 1).collect::<Vec<_>>()
            );
        }
    }

    /// A replica recovering from a damaged log does not campaign (as `replikv-cluster`'s
    /// elections.rs holds its election timer off): its timer is off from its start until
    /// the append that reaches its high water.
    fn gate_campaigns(&mut self) {
        for n in &mut self.nodes {
            let Some(raft) = &n.raft else { continue };
            let recovering = n.gate.high_water().is_some();
            if recovering != n.elect_off {
                raft.runtime_config().elect(!recovering);
                n.elect_off = recovering;
                self.stats.recoveries += !recovering as u64;
            }
        }
    }

    /// Starts (or restarts) node `k`: opens its Raft log on its log directory (the log replays
    /// its segments and cuts a torn tail) and a redb database on its state disk (after a
    /// crash, redb repairs what the crash left), then the partition through replikv's open
    /// path: the log store checks every record and cuts a corrupt tail, demotes a vote of its
    /// own; openraft reads the applied state and the snapshot and re-applies the committed
    /// log after it. Checks that every append and vote save acknowledged before a crash
    /// survived it.
    async fn start(&mut self, k: usize, step: u64) -> Result<(), Violation> {
        let v = |invariant: &'static str, detail: String| Violation {
            step,
            invariant,
            detail,
        };
        let lost_append = self.opts.bug == Bug::LostAppend;
        if self.opts.verbose && self.opts.bit_rot && self.nodes[k].starts > 0 {
            let n = &self.nodes[k];
            eprint!(
                "step {step}: node {} log before its restart:\n{}",
                n.id,
                n.log_dir.describe()
            );
        }
        let rot = self.rot(k, step);
        let members: BTreeSet<u64> = self.nodes.iter().map(|n| n.id).collect();
        let n = &mut self.nodes[k];
        let id = n.id;
        n.alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        n.power = Power::new(n.alive.clone());
        let power = n.power.clone();
        let opened = RaftLog::open_checked(
            Box::new(n.log_dir.backend(power.clone())),
            FsyncPolicy::Always,
            WriterKind::Task,
            SEGMENT_BYTES,
        )
        .map_err(|e| {
            v(
                "the Raft log opens the segments a crash left",
                format!("node {id}: {e}"),
            )
        })?;
        let state = Store::open_with_backend(
            n.state_disk.backend(power.clone()),
            FsyncPolicy::Always,
            WriterKind::Task,
        )
        .map_err(|e| {
            v(
                "redb opens the image a crash left",
                format!("node {id}: state database: {e}"),
            )
        })?;
        // The server's open (`replikv_raft::open_stores`): damage goes to the repair, which
        // cuts it where other replicas hold what it lost. Damage must be found exactly where
        // bit rot was put: rot in synced records with a record after them is never a tear,
        // and a crash's torn tail is never damage.
        let (log, discarded) = match (opened, rot) {
            (Opened::Ready(log), None) => (log, None),
            (Opened::Ready(_), Some(r)) => {
                return Err(v(
                    "bit rot in synced records is found as damage, never cut as a tear",
                    format!("node {id}: {r:?} opened as a whole log"),
                ))
            }
            (Opened::Damaged(d), None) => {
                return Err(v(
                    "a crash alone leaves no damage (a torn tail is cut)",
                    format!("node {id}: {}", d.damage()),
                ))
            }
            (Opened::Damaged(d), Some(r)) => {
                let discarded = Discarded::of(&d).map_err(|e| {
                    v(
                        "the records after the damage decode",
                        format!("node {id}: {e}"),
                    )
                })?;
                if self.opts.verbose {
                    eprintln!(
                        "step {step}: node {id}: bit rot of {} bytes at offset {} of segment {}: {}; {} records after it, {} entries (from index {:?})",
                        r.len,
                        r.offset,
                        r.segment,
                        d.damage(),
                        discarded.records,
                        discarded.entries,
                        discarded.first
                    );
                    let ops: Vec<String> = d
                        .damage()
                        .after
                        .iter()
                        .map(|op| match op {
                            LogOp::Append { g: p, index, .. } => format!("p{p} append {index}"),
                            LogOp::TruncateFrom { g: p, index } => format!("p{p} truncate {index}"),
                            LogOp::PurgeTo { g: p, index, .. } => format!("p{p} purge {index}"),
                            LogOp::Meta { g: p, name, .. } => format!("p{p} {name}"),
                        })
                        .collect();
                    let held = d
                        .entries(PARTITION, 0..u64::MAX)
                        .map(|e| (e.first().map(|x| x.0), e.last().map(|x| x.0), e.len()));
                    eprintln!(
                        "  discarded: {ops:?}; before the damage: entries (first, last, count) {held:?}, purged {:?}",
                        d.purged(PARTITION).map(|x| x.0)
                    );
                }
                let log = replikv_raft::repair_log(id, &members, &state, *d).map_err(|e| {
                    v(
                        "a damaged log is repaired where other replicas hold what it lost",
                        format!("node {id}: {e}"),
                    )
                })?;
                self.stats.rot_records_discarded += discarded.records;
                self.stats.rot_entries_discarded += discarded.entries;
                (log, Some(discarded))
            }
        };
        // What the node acknowledged from the damage on is lost to it, legitimately (the
        // repair's high water keeps the group from losing it): the durability check (5)
        // starts from the cut, and the checker reads those indexes again.
        if let Some(d) = &discarded {
            // The first index the repaired log does not hold (0: it holds none).
            let end = log
                .last(PARTITION)
                .ok()
                .flatten()
                .map(|(i, _)| i)
                .or_else(|| log.purged(PARTITION).map(|(i, _)| i))
                .map_or(0, |i| i + 1);
            let from = d.first.unwrap_or(u64::MAX).min(end);
            let mut obs = n.obs.lock().unwrap();
            obs.durable_log.split_off(&from);
            // A repair that mends a gap at the log's start purges up to the state file's
            // applied point: those entries are applied, not lost.
            if let Some((purged, _)) = log.purged(PARTITION) {
                obs.durable_log = obs.durable_log.split_off(&(purged + 1));
            }
            obs.recheck_from = obs.recheck_from.min(from);
        }
        let stores = Stores { log, state };
        if lost_append && n.starts > 0 {
            if let Some(from) = store::corrupt_log_tail(&stores.log) {
                let mut obs = n.obs.lock().unwrap();
                obs.recheck_from = obs.recheck_from.min(from);
            }
        }
        n.starts += 1;
        let (log, sm) = replikv_raft::open_group(&stores, PARTITION).map_err(|e| {
            v(
                "a node reopens its log store and state machine",
                format!("node {id}: {e}"),
            )
        })?;
        // A checkpoint every few keys (of the workload's four), so that checkpoints land
        // between crashes and power losses, not only at snapshots.
        let sm = sm.with_checkpoint_limits(replikv_raft::CheckpointLimits {
            keys: 2,
            bytes: usize::MAX,
        });
        let read = |what: &str, e: replikv_raft::StorageError| {
            v("storage reads succeed", format!("node {id}: {what}: {e}"))
        };
        {
            let mut obs = n.obs.lock().unwrap();
            obs.committed = now(log.clone().read_committed()).map_err(|e| read("committed", e))?;
            // (5) what the node acknowledged as durable survived the crash.
            let vote = now(log.clone().read_vote()).map_err(|e| read("vote", e))?;
            if let Some(saved) = obs.durable_vote {
                // The saved vote, or a later one the node tried to save: a save in flight at
                // the crash may persist (a vote record is one small write, and a torn write
                // whose missing bytes were zeros anyway is whole). Later in openraft's order:
                // leader ids (term, node) compare as pairs in the advanced leader-id mode.
                let saved_id = (saved.leader_id.term, saved.leader_id.node_id);
                let back = vote.map(|b| (b.leader_id.term, b.leader_id.node_id));
                let mut ok = back.is_some_and(|b| {
                    b == saved_id || (b > saved_id && obs.vote_history.contains(&b))
                });
                // After a repair: at least every vote the repair can know of, and one the
                // node saved. A damaged record that was itself the last vote cannot be
                // restored (durability.md says why that window is harmless).
                if let (false, Some(d)) = (ok, &discarded) {
                    // None at all, when the repair could know of none (the damaged record
                    // was the partition's only vote).
                    let known = back.is_none_or(|b| obs.vote_history.contains(&b));
                    if back >= d.vote_floor && known {
                        ok = true;
                        obs.durable_vote = vote;
                        self.stats.votes_lost_to_rot += 1;
                    }
                }
                if !ok {
                    return Err(v(
                        "acknowledged votes survive a crash",
                        format!("node {id} saved vote {saved} but reads back {vote:?}"),
                    ));
                }
            }
            if let Some(b) = vote {
                obs.vote_history
                    .insert((b.leader_id.term, b.leader_id.node_id));
            }
            if let (Some((&lo, _)), Some((&hi, _))) = (
                obs.durable_log.first_key_value(),
                obs.durable_log.last_key_value(),
            ) {
                let held: BTreeMap<u64, LogId> = now(log.clone().try_get_log_entries(lo..=hi))
                    .map_err(|e| read("log", e))?
                    .into_iter()
                    .map(|e| (e.log_id.index, e.log_id))
                    .collect();
                for (i, acked) in &obs.durable_log {
                    if held.get(i) != Some(acked) {
                        return Err(v(
                            "acknowledged appends survive a crash",
                            format!(
                                "node {id} acknowledged {acked} as appended, but after its restart its log holds {:?} at {i}",
                                held.get(i)
                            ),
                        ));
                    }
                }
            }
        }
        // The log must still hold every entry after the state machine's applied point (or
        // openraft cannot re-apply them): purged <= applied.
        let purged = now(log.clone().get_log_state())
            .map_err(|e| read("log state", e))?
            .last_purged_log_id;
        let applied = now(sm.clone().applied_state())
            .map_err(|e| read("applied", e))?
            .0;
        if purged.map(|p| p.index) > applied.map(|a| a.index) {
            return Err(v(
                "a restarted node's log reaches back to its applied state",
                format!(
                    "node {id}: log purged up to {}, but its state machine has applied only up to {} (snapshot {})",
                    show_id(purged),
                    show_id(applied),
                    show_id(
                        now(sm.clone().get_current_snapshot())
                            .ok()
                            .flatten()
                            .and_then(|s| s.meta.last_log_id)
                    )
                ),
            ));
        }
        if n.starts > 1 {
            let applied = now(sm.clone().applied_state())
                .map_err(|e| read("applied", e))?
                .0
                .map_or(0, |a| a.index);
            let last_log = now(log.clone().get_log_state())
                .map_err(|e| read("log state", e))?
                .last_log_id
                .map_or(0, |l| l.index);
            self.stats.sm_rollbacks += (applied < n.at_crash.0) as u64;
            self.stats.log_rollbacks += (last_log < n.at_crash.1) as u64;
        }
        if self.opts.verbose {
            let state = now(log.clone().get_log_state()).ok();
            eprintln!(
                "step {step}: node {id} opened: vote {:?} committed {:?} purged {:?} last log {:?} snapshot {:?} applied {:?}",
                now(log.clone().read_vote()).ok().flatten(),
                now(log.clone().read_committed()).ok().flatten(),
                state.as_ref().and_then(|s| s.last_purged_log_id),
                state.as_ref().and_then(|s| s.last_log_id),
                now(sm.clone().get_current_snapshot())
                    .ok()
                    .flatten()
                    .map(|s| s.meta.last_log_id),
                now(sm.clone().applied_state()).ok().map(|a| a.0),
            );
        }
        n.stores = Some(stores);
        n.checked_at = None;
        n.recovery = log.recovery();
        n.gate = if self.opts.bug == Bug::ForgetHighWater {
            Recovery::default()
        } else {
            n.recovery.clone()
        };
        n.log = Some(log.clone());
        n.sm = Some(sm.clone());
        let log = SimLog {
            inner: log,
            obs: n.obs.clone(),
            alive: n.alive.clone(),
        };
        let sm = SimSm {
            inner: sm,
            alive: n.alive.clone(),
            apply_reversed: self.opts.bug == Bug::ApplyReversed,
        };
        let network = SimNetwork {
            net: self.net.clone(),
            from: n.id,
            alive: n.alive.clone(),
        };
        let raft = Raft::new(n.id, n.config.clone(), network, log, sm)
            .await
            .map_err(|e| v("a node restarts", format!("node {id}: Raft::new: {e}")))?;
        // Before its first election timeout could fire (`gate_campaigns` keeps it so).
        n.elect_off = n.gate.high_water().is_some();
        if n.elect_off {
            raft.runtime_config().elect(false);
        }
        self.net.lock().unwrap().rafts.insert(
            n.id,
            net::Peer {
                raft: raft.clone(),
                recovery: n.gate.clone(),
            },
        );
        n.raft = Some(raft);
        Ok(())
    }

    /// Node `k` goes down, now: a process crash, or a power loss (with, half the time, a torn
    /// unsynced tail on each disk), or it already lost power inside a storage call (`arm`).
    /// In this order, as in a real crash:
    /// 1. its disks are detached: nothing the crashed incarnation writes from here on (jobs
    ///    still queued on its store writers, redb's clean-close commit when a `Database`
    ///    drops) reaches them; each disk's image for the restart is fixed now;
    /// 2. its tasks are fenced (storage calls and RPCs fail) and its `Raft` is shut down;
    /// 3. its `Raft`, log store, state machine and stores are dropped (the store writers end
    ///    once the last handle is gone, writing only to the detached copies).
    async fn crash(&mut self, k: usize, step: u64, kind: CrashKind) {
        let Some(raft) = self.nodes[k].raft.take() else {
            return;
        };
        self.stats.crashes += 1;
        let id = self.nodes[k].id;
        let at_crash = {
            let n = &self.nodes[k];
            let last_log = n
                .log
                .clone()
                .and_then(|mut l| now(l.get_log_state()).ok())
                .and_then(|s| s.last_log_id)
                .map_or(0, |l| l.index);
            (n.applied().map_or(0, |a| a.index), last_log)
        };
        self.nodes[k].at_crash = at_crash;
        if self.opts.verbose {
            let n = &self.nodes[k];
            if let Some(stored) = n.describe_storage() {
                eprintln!(
                    "step {step}: node {id} at its crash: {stored}, power failed inside a storage call: {}",
                    n.power.lock().unwrap().failed(),
                );
            }
        }
        // A power failure inside a storage call has already detached the disks it wrote to.
        let mid_io = self.nodes[k].power.lock().unwrap().failed();
        let kind = if mid_io { CrashKind::PowerLoss } else { kind };
        let power = kind == CrashKind::PowerLoss;
        if power && !mid_io {
            let (tear, seed) = (self.rng.random_bool(0.5), self.rng.random());
            self.nodes[k].power.lock().unwrap().set_tear(tear, seed);
        }
        let n = &mut self.nodes[k];
        let log_effects = n.log_dir.crash(kind, &n.power);
        let state_effect = n.state_disk.crash(kind, &n.power);
        self.stats.power_losses += power as u64;
        self.stats.mid_io += mid_io as u64;
        let disks = log_effects.segments.iter().map(|(_, e)| e);
        for e in disks.chain([&state_effect]) {
            self.stats.torn += e.torn as u64;
            self.stats.writes_lost += (e.unsynced - e.kept) as u64;
        }
        if power {
            let l = &log_effects.listing;
            self.stats.dir_changes += l.unsynced as u64;
            self.stats.dir_changes_lost += (l.unsynced - l.kept) as u64;
        }
        // The process is gone at this instant: its tasks touch neither disk nor network again.
        self.nodes[k]
            .alive
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.net.lock().unwrap().rafts.remove(&id);
        let _ = raft.shutdown().await;
        drop(raft);
        let n = &mut self.nodes[k];
        n.log = None;
        n.sm = None;
        n.stores = None;
        n.restart_at = step + self.rng.random_range(100..3_000);
        if self.opts.verbose {
            eprintln!(
                "step {step}: crash node {id} ({kind:?}; log directory {:?}, state disk {state_effect:?})",
                log_effects
            );
        }
    }

    fn up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&k| self.nodes[k].raft.is_some())
            .collect()
    }

    async fn faults(&mut self, step: u64) {
        let n = self.nodes.len();
        // Bit rot on a majority, with every node killed (drawn from its own stream first,
        // every step, so that the other draws stay as they were).
        if self.rot_rng.random_bool(self.rot_majority_p)
            && n >= 3
            && self.up().len() == n
            && (0..n).all(|k| self.nodes[k].recovery.high_water().is_none())
        {
            self.rot_majority(step).await;
        }
        // Crash one node.
        if self.rng.random_bool(self.crash_p) {
            let up = self.up();
            if !up.is_empty() {
                let k = up[self.rng.random_range(0..up.len())];
                match self.rng.random_range(0..4) {
                    0 | 1 => self.crash(k, step, CrashKind::Process).await,
                    2 => self.crash(k, step, CrashKind::PowerLoss).await,
                    _ => {
                        // The power fails inside one of the node's next writes or syncs (in
                        // the middle of a commit, or inside its fsync); the driver completes
                        // the crash after that step.
                        let (ops, tear, seed) = (
                            self.rng.random_range(0..64),
                            self.rng.random_bool(0.5),
                            self.rng.random(),
                        );
                        let mut power = self.nodes[k].power.lock().unwrap();
                        if !power.armed() {
                            power.arm(ops, tear, seed);
                        }
                    }
                }
            }
        }
        // Crash a majority at once (a power loss), rarer.
        if self.rng.random_bool(self.crash_p / 4.0) {
            let mut up = self.up();
            let m = n / 2 + 1;
            while up.len() > n - m {
                let i = self.rng.random_range(0..up.len());
                let k = up.remove(i);
                self.crash(k, step, CrashKind::PowerLoss).await;
            }
        }
        // Partition: cut a random non-empty proper subset from the rest, both ways or one way.
        if self.cuts.len() < 2 && self.rng.random_bool(self.cut_p) {
            let side: Vec<u64> = (1..=n as u64)
                .filter(|_| self.rng.random_bool(0.5))
                .collect();
            if !side.is_empty() && side.len() < n {
                let one_way = self.rng.random_bool(0.25);
                let mut links = Vec::new();
                for &a in &side {
                    for b in 1..=n as u64 {
                        if !side.contains(&b) {
                            links.push((a, b));
                            if !one_way {
                                links.push((b, a));
                            }
                        }
                    }
                }
                let until = step + self.rng.random_range(200..5_000);
                self.net.lock().unwrap().cut.extend(links.iter().copied());
                self.cuts.push((until, links));
                self.stats.partitions += 1;
            }
        }
        self.heal_due(step);
    }

    fn heal_due(&mut self, step: u64) {
        let mut changed = false;
        self.cuts.retain(|(until, _)| {
            let keep = *until > step;
            changed |= !keep;
            keep
        });
        if changed {
            let mut net = self.net.lock().unwrap();
            net.cut = self
                .cuts
                .iter()
                .flat_map(|(_, l)| l.iter().copied())
                .collect();
        }
    }

    fn leader(&mut self) -> Option<Raft> {
        let up = self.up();
        let leaders: Vec<usize> = up
            .iter()
            .copied()
            .filter(|&k| {
                let m = self.nodes[k].raft.as_ref().unwrap().metrics();
                let s = m.borrow().state;
                s == ServerState::Leader
            })
            .collect();
        let pick = if leaders.is_empty() { &up } else { &leaders };
        if pick.is_empty() {
            return None;
        }
        let k = pick[self.rng.random_range(0..pick.len())];
        self.nodes[k].raft.clone()
    }

    fn write(&mut self, step: u64) {
        let Some(raft) = self.leader() else { return };
        let key = KEYS[self.rng.random_range(0..KEYS.len())]
            .as_bytes()
            .to_vec();
        let req_id = self.next_req;
        self.next_req += 1;
        let value = format!("s{}-w{req_id}", self.seed).into_bytes();
        let req = WriteRequest {
            req_id,
            now_ms: EPOCH_MS + step,
            ops: Ops::encode(&[KvOp::Set {
                key: Bytes::from(key.clone()),
                value: Bytes::from(value.clone()),
                expire: None,
                keep_ttl: false,
                cond: SetCond::Always,
                get: false,
            }]),
        };
        self.stats.writes += 1;
        let acks = self.acks.clone();
        tokio::spawn(async move {
            let res = tokio::time::timeout(Duration::from_secs(3), raft.client_write(req)).await;
            if let Ok(Ok(resp)) = res {
                acks.lock().unwrap().push(Ack {
                    req_id,
                    key,
                    value,
                    log_id: resp.log_id,
                });
            }
        });
    }

    /// The invariants, checked with the world stopped (no await, no RNG draw, no change to
    /// any node). Also extends the trace hash.
    fn check(&mut self, step: u64) -> Result<(), Violation> {
        let v = |invariant: &'static str, detail: String| Violation {
            step,
            invariant,
            detail,
        };
        if let Some(p) = PANIC.lock().unwrap().take() {
            return Err(v("no panic in a node task (openraft assertion)", p));
        }
        let n = self.nodes.len();
        let majority = n / 2 + 1;
        let mut h = self.hash;
        for k in 0..n {
            let node = &mut self.nodes[k];
            let up = node.raft.is_some();
            let journal = std::mem::take(&mut node.obs.lock().unwrap().journal);
            // A crashed node has no stores until it restarts (its disks are detached; the
            // restart opens new stores on the images the crash left), so only the entries it
            // reported committed are checked while it is down.
            let mut present = Vec::new();
            let (mut committed, mut applied) = (0, 0);
            let counts = node
                .stores
                .as_ref()
                .map(|s| (s.log.commit_count(), s.state.commit_count()));
            if !up {
                node.checked_at = None;
            } else if node.checked_at == counts {
                (committed, applied) = node.last_seen;
            } else {
                let id = node.id;
                let read = |what: &str, e: replikv_raft::StorageError| {
                    v("storage reads succeed", format!("node {id}: {what}: {e}"))
                };
                let mut log = node.log.clone().expect("a started node has a log store");
                let committed_id = now(log.read_committed()).map_err(|e| read("committed", e))?;
                committed = committed_id.map_or(0, |c| c.index);
                let from = node
                    .obs
                    .lock()
                    .unwrap()
                    .recheck_from
                    .min(node.checked_upto + 1)
                    .max(1);
                if committed >= from {
                    present = now(log.try_get_log_entries(from..=committed))
                        .map_err(|e| read("log", e))?;
                }
                // Sanity: the log's records run without a hole from its purge point.
                let state = now(log.get_log_state()).map_err(|e| read("log state", e))?;
                let first = state.last_purged_log_id.map_or(0, |p| p.index + 1);
                let stores = node.stores.as_ref().expect("a started node has stores");
                let len = stores.log.len(PARTITION);
                if let Some(last) = state.last_log_id.map(|l| l.index).filter(|&l| l >= first) {
                    if last - first + 1 != len {
                        return Err(v(
                            "a log has no holes",
                            format!("node {}: {len} entries between {first} and {last}", node.id),
                        ));
                    }
                }
                if let Some(c) = committed_id {
                    let at = now(log.try_get_log_entries(c.index..=c.index))
                        .map_err(|e| read("log", e))?;
                    if let Some(e) = at.first() {
                        if e.log_id != c {
                            return Err(v(
                                "committed entries never change",
                                format!(
                                    "node {} commit point {c} but its log holds {}",
                                    node.id, e.log_id
                                ),
                            ));
                        }
                    }
                }
                node.checked_upto = committed;
                node.obs.lock().unwrap().recheck_from = u64::MAX;
                // (2) applied state machines identical at equal applied index.
                let mut sm = node.sm.clone().expect("a started node has a state machine");
                let (applied_id, _) = now(sm.applied_state()).map_err(|e| read("applied", e))?;
                if let Some(a) = applied_id {
                    let (count, crc) = sm.view().digest().map_err(|e| {
                        v("storage reads succeed", format!("node {}: {e}", node.id))
                    })?;
                    let d = (count << 32) ^ crc as u64;
                    match self.applied_digest.get(&a.index) {
                        Some((id, d0)) if *id != a || *d0 != d => {
                            return Err(v(
                                "applied state machines identical",
                                format!(
                                    "node {} applied {a} with digest {d:x}; earlier {id} had {d0:x}",
                                    node.id
                                ),
                            ));
                        }
                        Some(_) => {}
                        None => {
                            self.applied_digest.insert(a.index, (a, d));
                        }
                    }
                }
                applied = applied_id.map_or(0, |a| a.index);
                node.checked_at = counts;
                node.last_seen = (committed, applied);
            }
            // (1) committed entries never change, and all nodes agree on them.
            for e in journal.iter().chain(present.iter()) {
                let i = e.log_id.index;
                let hash = entry_hash(e);
                match self.ledger.get(&i) {
                    Some(l) if l.log_id != e.log_id || l.hash != hash => {
                        return Err(v(
                            "committed entries never change",
                            format!(
                                "node {} holds {} at committed index {i}, but {} was committed there before{}",
                                node.id,
                                e.log_id,
                                l.log_id,
                                if l.log_id == e.log_id { " (same log id, different payload)" } else { "" }
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        let set = match &e.payload {
                            openraft::EntryPayload::Normal(WriteRequest {
                                req_id, ops, ..
                            }) => match ops.decode().as_deref() {
                                Ok([KvOp::Set { key, value, .. }]) => {
                                    Some((*req_id, key.to_vec(), value.to_vec()))
                                }
                                _ => None,
                            },
                            _ => None,
                        };
                        self.ledger.insert(
                            i,
                            Ledger {
                                log_id: e.log_id,
                                hash,
                                set,
                            },
                        );
                    }
                }
            }
            // (3) election safety, in the form openraft's advanced leader-id mode promises.
            let (term, leader, last_log, is_leader, vote, fatal) = match &node.raft {
                Some(r) => {
                    let m = r.metrics();
                    let m = m.borrow();
                    (
                        m.current_term,
                        m.current_leader.unwrap_or(0),
                        m.last_log_index.unwrap_or(0),
                        m.state == ServerState::Leader,
                        m.vote,
                        m.running_state.as_ref().err().map(|e| e.to_string()),
                    )
                }
                None => (0, 0, 0, false, Default::default(), None),
            };
            if crate::trace_on() && step.is_multiple_of(50) {
                eprintln!("step {step} node {} term {term} leader {leader} is_leader {is_leader} vote {vote}", node.id);
            }
            if let Some(f) = fatal {
                return Err(v(
                    "no node stops on a fatal error",
                    format!("node {}: {f}", node.id),
                ));
            }
            if is_leader && node.gate.high_water().is_some() {
                return Err(v(
                    "a replica recovering from a damaged log never leads",
                    format!(
                        "node {} leads with vote {vote}, recovering to {:?}",
                        node.id,
                        node.gate.high_water()
                    ),
                ));
            }
            if is_leader {
                let lid = (vote.leader_id.term, vote.leader_id.node_id);
                if lid.1 != node.id || !vote.committed {
                    return Err(v(
                        "election safety",
                        format!("node {} is leader with vote {vote}", node.id),
                    ));
                }
                let granted = self
                    .nodes
                    .iter()
                    .filter(|o| o.obs.lock().unwrap().vote_history.contains(&lid))
                    .count();
                if granted < majority {
                    return Err(v(
                        "election safety",
                        format!(
                            "node {} leads with vote {vote} but only {granted} of {n} nodes ever saved that vote",
                            self.nodes[k].id
                        ),
                    ));
                }
                let set = self.leaders.entry(lid.0).or_default();
                if set.insert(lid.1) && set.len() == 2 {
                    self.stats.multi_leader_terms += 1;
                }
            }
            self.stats.max_term = self.stats.max_term.max(term);
            self.stats.max_committed = self.stats.max_committed.max(committed);
            for x in [
                term,
                leader,
                last_log,
                committed,
                applied,
                self.nodes[k].raft.is_some() as u64,
            ] {
                h = mix(h, x);
            }
        }
        self.hash = h;
        self.trace.push(h);
        Ok(())
    }

    /// (4) after healing and settling: every node is up, has applied everything committed,
    /// every acknowledged write is in the committed log, and every node's value of each key is
    /// the last committed SET of it (a reference model over the committed log).
    fn check_final(&mut self, step: u64) -> Result<(), Violation> {
        let v = |invariant: &'static str, detail: String| Violation {
            step,
            invariant,
            detail,
        };
        let acks = self.acks.lock().unwrap().clone();
        self.stats.acked = acks.len() as u64;
        if self.opts.verbose {
            for n in &self.nodes {
                let Some(mut log) = n.log.clone() else {
                    continue;
                };
                if let Some(stored) = n.describe_storage() {
                    let vote = now(log.read_vote()).ok().flatten();
                    eprintln!("node {}: vote {vote:?} {stored}", n.id);
                }
            }
            let missing: Vec<u64> = (1..=self.ledger.keys().next_back().copied().unwrap_or(0))
                .filter(|i| !self.ledger.contains_key(i))
                .collect();
            eprintln!(
                "ledger: {} entries, missing {:?}",
                self.ledger.len(),
                missing
            );
        }
        let max_committed = self
            .nodes
            .iter()
            .map(|n| n.committed().map_or(0, |c| c.index))
            .max()
            .unwrap_or(0);
        for n in &self.nodes {
            let applied = n.applied().map_or(0, |a| a.index);
            if n.raft.is_none() || applied < max_committed {
                return Err(v(
                    LIVENESS,
                    format!("node {} applied {applied} of {max_committed}", n.id),
                ));
            }
        }
        for a in &acks {
            match self.ledger.get(&a.log_id.index) {
                Some(l)
                    if l.log_id == a.log_id && l.set.as_ref().map(|s| s.0) == Some(a.req_id) => {}
                other => {
                    return Err(v(
                        "acknowledged writes present",
                        format!(
                            "write {} ({}={}) acked at {} but the committed log holds {:?}",
                            a.req_id,
                            String::from_utf8_lossy(&a.key),
                            String::from_utf8_lossy(&a.value),
                            a.log_id,
                            other.map(|l| l.log_id)
                        ),
                    ))
                }
            }
        }
        // Reference model: the last committed SET of each key.
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for l in self.ledger.values() {
            if let Some((_, k, val)) = &l.set {
                model.insert(k.clone(), val.clone());
            }
        }
        for n in &self.nodes {
            let got = n
                .kv()
                .map_err(|e| v("storage reads succeed", format!("node {}: {e}", n.id)))?;
            if got != model {
                return Err(v(
                    "acknowledged writes present",
                    format!(
                        "node {}: state machine {:?} != committed log model {:?}",
                        n.id,
                        show(&got),
                        show(&model)
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn run(mut self) -> SeedResult {
        *PANIC.lock().unwrap() = None;
        for k in 0..self.nodes.len() {
            if let Err(v) = self.start(k, 0).await {
                return self.finish(Some(v)).await;
            }
        }
        let members: BTreeMap<u64, BasicNode> = self
            .nodes
            .iter()
            .map(|n| (n.id, BasicNode::new(format!("sim-{}", n.id))))
            .collect();
        self.nodes[0]
            .raft
            .as_ref()
            .unwrap()
            .initialize(members)
            .await
            .expect("initialize");
        let write_p = self.rng.random_range(0.005..0.05);
        let t0 = tokio::time::Instant::now();
        let total = self.opts.steps + self.opts.settle;
        let mut violation = None;
        'steps: for step in 0..total {
            if step < self.opts.steps {
                self.faults(step).await;
                if self.rng.random_bool(write_p) {
                    self.write(step);
                }
            } else if step == self.opts.steps {
                // Heal everything: links, loss; crashed nodes come back below.
                self.cuts.clear();
                let mut net = self.net.lock().unwrap();
                net.cut.clear();
                net.loss = 0.0;
                drop(net);
                for n in self.nodes.iter_mut() {
                    n.restart_at = n.restart_at.min(step);
                    n.power.lock().unwrap().disarm();
                }
            }
            for k in 0..self.nodes.len() {
                if self.nodes[k].raft.is_none() && self.nodes[k].restart_at <= step {
                    if self.opts.verbose {
                        eprintln!("step {step}: restart node {}", self.nodes[k].id);
                    }
                    if let Err(e) = self.start(k, step).await {
                        violation = Some(e);
                        break 'steps;
                    }
                }
            }
            self.gate_campaigns();
            tokio::time::sleep(Duration::from_millis(1)).await;
            // Nodes whose power failed inside a storage call during this step: their tasks
            // are fenced already; shut them down before the checker looks.
            for k in 0..self.nodes.len() {
                let failed = self.nodes[k].power.lock().unwrap().failed();
                if failed && self.nodes[k].raft.is_some() {
                    self.crash(k, step, CrashKind::PowerLoss).await;
                }
            }
            if let Err(e) = self.check(step) {
                violation = Some(e);
                break;
            }
        }
        if violation.is_none() {
            if let Err(e) = self.check_final(total) {
                violation = Some(e);
            }
        }
        if self.opts.verbose {
            eprintln!("virtual time elapsed: {:?}", t0.elapsed());
        }
        self.finish(violation).await
    }

    async fn finish(mut self, violation: Option<Violation>) -> SeedResult {
        self.stats.acked = self.acks.lock().unwrap().len() as u64;
        for n in &self.nodes {
            let (created, removed) = n.log_dir.counts();
            self.stats.segments_created += created;
            self.stats.segments_removed += removed;
            if let Some(r) = &n.raft {
                let _ = r.shutdown().await;
            }
        }
        let net = self.net.lock().unwrap();
        self.stats.votes_refused_recovering = net.votes_refused_recovering;
        SeedResult {
            violation,
            trace: std::mem::take(&mut self.trace),
            stats: std::mem::take(&mut self.stats),
            lost: net.lost,
            sent: net.sent,
            kinds: net.kinds,
        }
    }
}

fn show_id(id: Option<LogId>) -> String {
    id.map_or("none".into(), |i| i.to_string())
}

fn show(m: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(String, String)> {
    m.iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

fn run_seed(seed: u64, opts: &Opts) -> SeedResult {
    let mut bytes = *b"replikv-sim-seed........";
    bytes[16..].copy_from_slice(&seed.to_le_bytes());
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    if !opts.unseeded_tokio {
        builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&bytes));
    }
    let rt = builder.build().expect("runtime");
    // Inside the runtime: the stores' writers are its tasks.
    let res = rt.block_on(async { Sim::new(seed, opts.clone()).run().await });
    drop(rt);
    res
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    if let Some((a, b)) = s.split_once("..") {
        let a: u64 = a.parse().map_err(|_| format!("bad seed range {s}"))?;
        // Both ends inclusive, `1..100` as well as `1..=100`: 100 seeds.
        let b = b.strip_prefix('=').unwrap_or(b);
        let b: u64 = b.parse().map_err(|_| format!("bad seed range {s}"))?;
        Ok((a, b))
    } else {
        let n: u64 = s.parse().map_err(|_| format!("bad seeds {s}"))?;
        Ok((1, n))
    }
}

const USAGE: &str = "usage: replikv-sim [--seeds A..B | --seeds N | --seed S] [--nodes N] [--steps N]
                   [--settle N] [--check-determinism [K]]
                   [--bug lost-append|apply-reversed|forget-high-water|nondeterministic]
                   [--no-bit-rot] [--expect-violation] [--no-snapshots] [--unseeded-tokio] [-v]
  --seeds 1..100   seeds 1 to 100, both ends included (1..=100 too; a plain N means 1..N); default 1..20
  --seed S         replay one seed
  --steps N        fault-phase steps of 1 ms simulated time (default 10000)
  --settle N       healed steps before the final checks (default 5000)
  --check-determinism [K]  run the first K seeds (default all) twice; compare per-step trace hashes
  --bug lost-append        inject a log-store bug: acked appends lost on a crash
  --bug apply-reversed     inject a state-machine bug: each applied batch in reverse order
  --no-bit-rot             no bit rot in crashed nodes' newest log segment (on by default:
                           repaired at restart, docs/design/durability.md)
  --bug forget-high-water  a replica repaired after bit rot votes and campaigns as if whole
  --expect-violation       self-test: succeed only if some seed fails a safety check (with --bug)
  --bug nondeterministic   self-test of --check-determinism: network delays from OS entropy
  --unseeded-tokio         build the runtime without rng_seed (to see whether it matters)";

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("nodes") {
        return nodes::main(std::env::args().skip(2).collect());
    }
    let mut args = std::env::args().skip(1).peekable();
    let mut opts = Opts {
        nodes: 3,
        steps: 10_000,
        settle: 5_000,
        bug: Bug::None,
        snapshots: true,
        verbose: false,
        unseeded_tokio: false,
        bit_rot: true,
    };
    let (mut first, mut last) = (1u64, 20u64);
    let mut determinism: Option<u64> = None;
    let mut expect_violation = false;
    while let Some(a) = args.next() {
        let mut val = |name: &str| -> String {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value\n{USAGE}");
                std::process::exit(2)
            })
        };
        let num = |s: String| -> u64 {
            s.parse().unwrap_or_else(|_| {
                eprintln!("not a number: {s}\n{USAGE}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--seeds" => match parse_range(&val("--seeds")) {
                Ok((a, b)) => (first, last) = (a, b),
                Err(e) => {
                    eprintln!("{e}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--seed" => {
                let s = num(val("--seed"));
                (first, last) = (s, s);
            }
            "--nodes" => opts.nodes = num(val("--nodes")),
            "--steps" => opts.steps = num(val("--steps")),
            "--settle" => opts.settle = num(val("--settle")),
            "--no-snapshots" => opts.snapshots = false,
            "--bit-rot" => opts.bit_rot = true,
            "--no-bit-rot" => opts.bit_rot = false,
            "--unseeded-tokio" => opts.unseeded_tokio = true,
            "-v" | "--verbose" => opts.verbose = true,
            "--expect-violation" => expect_violation = true,
            "--bug" => {
                opts.bug = match val("--bug").as_str() {
                    "lost-append" => Bug::LostAppend,
                    "apply-reversed" => Bug::ApplyReversed,
                    "forget-high-water" => Bug::ForgetHighWater,
                    "nondeterministic" => Bug::Nondeterministic,
                    other => {
                        eprintln!("unknown bug {other}\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            "--check-determinism" => {
                determinism = Some(u64::MAX);
                if let Some(next) = args.peek() {
                    if let Ok(k) = next.parse::<u64>() {
                        determinism = Some(k);
                        args.next();
                    }
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if opts.nodes == 0 {
        eprintln!("--nodes must be at least 1");
        return ExitCode::from(2);
    }
    // A panic in any node task (tokio catches them) is recorded and reported as a violation.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("panic: {info}");
        let mut p = PANIC.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some(info.to_string());
        }
    }));
    let started = Instant::now();
    let (mut seeds, mut violations, mut det_checked, mut det_failed) = (0u64, 0u64, 0u64, 0u64);
    // Log segments created and removed, over all seeds.
    let mut segments = (0u64, 0u64);
    // Seeds whose nodes restarted on a log with bit rot, and of those with the two-of-three
    // event; seeds that failed a safety check (what `--expect-violation` counts).
    let (mut rot_seeds, mut rot_majority_seeds, mut caught) = (0u64, 0u64, 0u64);
    for seed in first..=last {
        let t = Instant::now();
        let r = run_seed(seed, &opts);
        seeds += 1;
        let s = &r.stats;
        segments.0 += s.segments_created;
        segments.1 += s.segments_removed;
        rot_seeds += (s.rot > 0) as u64;
        rot_majority_seeds += (s.rot_majority > 0) as u64;
        let mut line = format!(
            "seed {seed}: {} steps, term {}, committed {}, writes {} acked {}, crashes {} (power losses {}, {} of them mid-IO, torn disks {}, unsynced writes lost {}, unsynced segment creations/removals {} undone {}; restarts with an older applied state {}, a shorter log {}), log segments created {} removed {}, bit rot {} (no room {}, on a majority {}; records discarded {}, entries {}; votes refused while recovering {}, recoveries {}, votes lost {}), partitions {}, terms with 2+ leaders {}, rpcs {} (append {} vote {} snapshot {}) lost {}, trace {:016x}, {:.2}s",
            r.trace.len(),
            s.max_term,
            s.max_committed,
            s.writes,
            s.acked,
            s.crashes,
            s.power_losses,
            s.mid_io,
            s.torn,
            s.writes_lost,
            s.dir_changes,
            s.dir_changes_lost,
            s.sm_rollbacks,
            s.log_rollbacks,
            s.segments_created,
            s.segments_removed,
            s.rot,
            s.rot_no_room,
            s.rot_majority,
            s.rot_records_discarded,
            s.rot_entries_discarded,
            s.votes_refused_recovering,
            s.recoveries,
            s.votes_lost_to_rot,
            s.partitions,
            s.multi_leader_terms,
            r.sent,
            r.kinds[0],
            r.kinds[1],
            r.kinds[2],
            r.lost,
            r.trace.last().copied().unwrap_or(0),
            t.elapsed().as_secs_f64()
        );
        if determinism.is_some_and(|k| seed - first < k) {
            let again = run_seed(seed, &opts);
            det_checked += 1;
            let diverged = r
                .trace
                .iter()
                .zip(again.trace.iter())
                .position(|(a, b)| a != b)
                .or((r.trace.len() != again.trace.len())
                    .then_some(r.trace.len().min(again.trace.len())));
            match diverged {
                None => line.push_str(", deterministic"),
                Some(step) => {
                    det_failed += 1;
                    line.push_str(&format!(
                        ", NOT DETERMINISTIC: traces differ from step {step}"
                    ));
                }
            }
        }
        println!("{line}");
        if let Some(v) = r.violation {
            violations += 1;
            caught += (v.invariant != LIVENESS) as u64;
            println!(
                "VIOLATION seed {seed} step {}: {}: {}\n  replay: replikv-sim --seed {seed} --nodes {} --steps {} --settle {}{}{}{}",
                v.step,
                v.invariant,
                v.detail,
                opts.nodes,
                opts.steps,
                opts.settle,
                opts.bug.flag(),
                if opts.snapshots { "" } else { " --no-snapshots" },
                if opts.bit_rot { "" } else { " --no-bit-rot" },
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds, {violations} violations, determinism checked on {det_checked} seeds ({det_failed} failed), log segments created {} removed {}, bit rot in {rot_seeds} seeds ({rot_majority_seeds} on a majority), {:.1}s ({:.1} seeds/min)",
        segments.0,
        segments.1,
        secs,
        seeds as f64 * 60.0 / secs.max(1e-9)
    );
    // A seed that only failed to converge does not count as caught.
    verdict(expect_violation, caught, seeds, violations, det_failed)
}

/// A run's exit code. As the self-test (`--expect-violation`) a safety check must have
/// caught the injected bug in some seed; otherwise any violation or nondeterminism fails.
fn verdict(
    expect_violation: bool,
    caught: u64,
    seeds: u64,
    violations: u64,
    det_failed: u64,
) -> ExitCode {
    if expect_violation {
        return if caught > 0 && det_failed == 0 {
            println!("the checks caught the injected bug in {caught} of {seeds} seeds");
            ExitCode::SUCCESS
        } else {
            println!("SELF-TEST FAILED: no seed caught the injected bug");
            ExitCode::FAILURE
        };
    }
    if violations > 0 || det_failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
