//! The faults a campaign injects, each a real one: `kill -9` and restart from disk,
//! SIGSTOP/SIGCONT, packets dropped, lost or held back by the kernel between the nodes'
//! network namespaces (replikv-testkit's `Netns` and `netem`), a data directory's tmpfs cut
//! down, and bytes of a stopped node's Raft log inverted.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use replikv_testkit::netem::{DelaySpec, PacketDelay};
use replikv_testkit::netns::PEER_PORT;
use replikv_testkit::{Cluster, Rule};
use serde::{Deserialize, Serialize};

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Fault {
    /// `kill -9` of one node, restarted from its data directory when healed.
    KillOne,
    /// `kill -9` of the leader of a partition.
    KillLeader,
    /// `kill -9` of a minority of the nodes at once.
    KillMinority,
    /// `kill -9` of every node at once; nothing acknowledged at `quorum` or `all` may be lost.
    KillAll,
    /// SIGSTOP of one node: it keeps its sockets but answers nothing until SIGCONT.
    PauseOne,
    /// SIGSTOP of the leader of a partition.
    PauseLeader,
    /// The leader of a partition cut off from every other node.
    IsolateLeader,
    /// The nodes split at random into a majority and a minority.
    Split,
    /// Two halves that cannot reach each other, and one node that reaches both.
    Bridge,
    /// A leader's packets to the other nodes are dropped; theirs still reach it.
    OneWay,
    /// A fifth of the packets between nodes are lost, both directions.
    Loss,
    /// Packets between nodes held back 30 ms ± 30 ms, so they also arrive out of order.
    Delay,
    /// Every node's clocks run at their own rate for the whole run (libfaketime: 5% slow,
    /// exact, 5% fast, within `lease_margin_ms`); each cycle isolates a leader, which must
    /// stop serving reads under its lease before the others elect a new one.
    ClockDrift,
    /// Every node's data directory is on a tmpfs; each cycle cuts the tmpfs of a partition's
    /// leader down to what it holds plus 1 MiB (below `storage.min_free_bytes`): it must
    /// refuse writes with `-MISCONF`, hand off its leaderships and lag, and catch up once the
    /// tmpfs is grown back.
    DiskFull,
    /// A partition's leader's wall clock jumps (libfaketime's timestamp file, the monotonic
    /// clock untouched): by 30 s to an hour either way, or, one time in four, by 100–400 ms
    /// (within `max_clock_offset_ms`); healed by jumping back. The leader must stop
    /// stamping with it at once and hand its partitions over.
    ClockOffset,
    /// `kill -9` of one node (half the time the leader of a partition), then bit rot in its
    /// newest Raft log segment: 16 bytes inverted at a random 5–90% of its written length,
    /// where records with whole ones after them had been synced. At heal it restarts; it must
    /// find the damage (never cut it as a torn tail), cut there with a high water, vote and
    /// abstain as if it still held what it lost, and catch up from the leaders.
    LogDamage,
    /// Each cycle draws one of the faults above (except `clock-drift` and `disk-full`, which
    /// are set up when the cluster starts).
    Mixed,
}

/// Each node's tmpfs in a `disk-full` run, and the reserve below which it refuses new data.
pub const DISK_FULL_TMPFS_BYTES: u64 = 2 << 30;
pub const DISK_FULL_MIN_FREE_BYTES: u64 = 16 << 20;

/// Bytes a `log-damage` fault inverts: the repro (16 bytes of an entry).
pub const LOG_DAMAGE_BYTES: usize = 16;
/// Where in the newest segment's written bytes the damage goes, as a fraction: past the
/// open's checkpoint at the start, and short of the last records, so that whole records
/// follow it (a synced record with nothing valid after it is what a torn write leaves).
pub const LOG_DAMAGE_AT: std::ops::Range<f64> = 0.05..0.9;
/// What a node logs when it finds damage and repairs it, and what it logs when it cuts a
/// torn tail instead (`replikv-storage`'s `raft_log/recover.rs`).
pub const LOGGED_DAMAGE: &str = "the Raft log was damaged; cut at the damage";
pub const LOGGED_TEAR: &str = "cutting a torn tail";

/// Clock rates of the nodes in a `clock-drift` run, by node id from 1: the slowest and the
/// fastest differ by 10.5%, inside the default lease margin (100 ms of 600 ms).
pub const CLOCK_RATES: [f64; 3] = [0.95, 1.0, 1.05];

/// Every fault a full campaign runs, in order.
pub const ALL: [Fault; 17] = [
    Fault::KillOne,
    Fault::KillLeader,
    Fault::KillMinority,
    Fault::KillAll,
    Fault::PauseOne,
    Fault::PauseLeader,
    Fault::IsolateLeader,
    Fault::Split,
    Fault::Bridge,
    Fault::OneWay,
    Fault::Loss,
    Fault::Delay,
    Fault::ClockDrift,
    Fault::DiskFull,
    Fault::ClockOffset,
    Fault::LogDamage,
    Fault::Mixed,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillOne => "kill-one",
            Fault::KillLeader => "kill-leader",
            Fault::KillMinority => "kill-minority",
            Fault::KillAll => "kill-all",
            Fault::PauseOne => "pause-one",
            Fault::PauseLeader => "pause-leader",
            Fault::IsolateLeader => "isolate-leader",
            Fault::Split => "split",
            Fault::Bridge => "bridge",
            Fault::OneWay => "one-way",
            Fault::Loss => "loss",
            Fault::Delay => "delay",
            Fault::ClockDrift => "clock-drift",
            Fault::DiskFull => "disk-full",
            Fault::ClockOffset => "clock-offset",
            Fault::LogDamage => "log-damage",
            Fault::Mixed => "mixed",
        }
    }

    /// Nodes a run of this fault needs: a minority of more than one, and a bridge between two
    /// real halves, need five.
    pub fn nodes(self) -> u64 {
        match self {
            Fault::KillMinority | Fault::Bridge => 5,
            _ => 3,
        }
    }

    /// Faults that need the cluster started for them (clock rates, tmpfs data directories),
    /// so `mixed` never draws them.
    pub fn set_up_at_start(self) -> bool {
        matches!(self, Fault::ClockDrift | Fault::DiskFull)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        ALL.iter().copied().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault {s:?}; one of: {}", names.join(", "))
        })
    }
}

/// A fault in force, and what undoes it.
pub struct Injected {
    pub fault: Fault,
    /// What was done, for the report ("kill -9 node 2 (leader of partition 1)").
    pub detail: String,
    killed: Vec<u64>,
    paused: Vec<u64>,
    net: bool,
    delays: Vec<PacketDelay>,
    /// Nodes whose tmpfs was cut down, to grow back.
    filled: Vec<u64>,
    /// Nodes whose wall clock was moved, and by how much (ms).
    clocks: Vec<(u64, i64)>,
    /// Killed nodes whose log was damaged, with how long their log file was before the
    /// restart (what the restart logs comes after).
    damaged: Vec<(u64, usize)>,
}

/// A node whose wall clock is off by more than this must lead nothing once the hold is
/// over (the cluster's default `max_clock_offset_ms`).
const OFF_CLOCK_MS: i64 = 500;

/// What healing a fault found.
#[derive(Default)]
pub struct Healed {
    /// For the report ("node 2: the Raft log was damaged; cut at the damage ...").
    pub notes: String,
    /// A damaged log that its node did not report as damage (a run with one fails).
    pub damage_not_found: Vec<String>,
    /// Promises the fault itself broke (a leader with a clock far off still leading).
    pub broken: Vec<String>,
}

/// The leader of a random partition as a live node sees it, or a random live node.
fn some_leader(c: &Cluster, rng: &mut StdRng) -> (u64, String) {
    let live = c.live();
    let partition = rng.random_range(0..c.opts.partitions as u64);
    let asked = *live.choose(rng).expect("a live node");
    match c.leader_seen_by(asked, partition) {
        Some(l) if live.contains(&l) => (l, format!("leader of partition {partition}")),
        _ => (
            *live.choose(rng).expect("a live node"),
            "no leader known; a random node".into(),
        ),
    }
}

fn shuffled(c: &Cluster, rng: &mut StdRng) -> Vec<u64> {
    let mut ids: Vec<u64> = c.nodes.keys().copied().collect();
    ids.shuffle(rng);
    ids
}

/// The faults `mixed` draws from on a cluster of `nodes`: those that fit it and need no
/// set-up at start.
fn mixable(nodes: u64) -> Vec<Fault> {
    ALL.iter()
        .copied()
        .filter(|f| *f != Fault::Mixed && f.nodes() <= nodes && !f.set_up_at_start())
        .collect()
}

/// Injects `fault` (for `Mixed`, one drawn at random) into `c`.
pub fn inject(c: &mut Cluster, fault: Fault, rng: &mut StdRng) -> std::io::Result<Injected> {
    let fault = if fault == Fault::Mixed {
        *mixable(c.nodes.len() as u64).choose(rng).expect("faults")
    } else {
        fault
    };
    let mut done = Injected {
        fault,
        detail: String::new(),
        killed: Vec::new(),
        paused: Vec::new(),
        net: false,
        delays: Vec::new(),
        filled: Vec::new(),
        clocks: Vec::new(),
        damaged: Vec::new(),
    };
    let n = c.nodes.len();
    match fault {
        Fault::KillOne | Fault::PauseOne | Fault::KillLeader | Fault::PauseLeader => {
            let (id, why) = if matches!(fault, Fault::KillOne | Fault::PauseOne) {
                (*c.live().choose(rng).expect("a live node"), None)
            } else {
                let (id, why) = some_leader(c, rng);
                (id, Some(why))
            };
            let how = if matches!(fault, Fault::KillOne | Fault::KillLeader) {
                c.kill(id);
                done.killed.push(id);
                "kill -9"
            } else {
                c.pause(id);
                done.paused.push(id);
                "SIGSTOP"
            };
            done.detail = match why {
                Some(why) => format!("{how} node {id} ({why})"),
                None => format!("{how} node {id}"),
            };
        }
        Fault::KillMinority => {
            let victims: Vec<u64> = shuffled(c, rng).into_iter().take((n - 1) / 2).collect();
            for id in &victims {
                c.kill(*id);
            }
            done.detail = format!("kill -9 nodes {victims:?}");
            done.killed = victims;
        }
        Fault::KillAll => {
            let victims: Vec<u64> = c.nodes.keys().copied().collect();
            for id in &victims {
                c.kill(*id);
            }
            done.detail = "kill -9 every node".into();
            done.killed = victims;
        }
        Fault::IsolateLeader | Fault::ClockDrift => {
            let (id, why) = some_leader(c, rng);
            let others: Vec<u64> = c.nodes.keys().copied().filter(|o| *o != id).collect();
            c.partition(&[vec![id], others])?;
            done.net = true;
            done.detail = match c.node(id).clock_rate {
                Some(rate) => format!("isolate node {id} ({why}; its clock at x{rate})"),
                None => format!("isolate node {id} ({why})"),
            };
        }
        Fault::Split => {
            let ids = shuffled(c, rng);
            let (minority, majority) = ids.split_at((n - 1) / 2);
            c.partition(&[minority.to_vec(), majority.to_vec()])?;
            done.net = true;
            done.detail = format!("split {minority:?} | {majority:?}");
        }
        Fault::Bridge => {
            let ids = shuffled(c, rng);
            let (middle, rest) = (ids[0], &ids[1..]);
            let (left, right) = rest.split_at(rest.len() / 2);
            for a in left {
                for b in right {
                    c.apply(&Rule::Cut(*a, *b))?;
                }
            }
            done.net = true;
            done.detail = format!("bridge {left:?} - {middle} - {right:?}");
        }
        Fault::OneWay => {
            let (id, why) = some_leader(c, rng);
            for o in c.nodes.keys().copied().filter(|o| *o != id) {
                c.apply(&Rule::OneWay { from: id, to: o })?;
            }
            done.net = true;
            done.detail =
                format!("drop node {id}'s packets to the others ({why}); theirs reach it");
        }
        Fault::Loss => {
            let ids: Vec<u64> = c.nodes.keys().copied().collect();
            for a in &ids {
                for b in ids.iter().filter(|b| *b != a) {
                    c.apply(&Rule::Loss {
                        from: *a,
                        to: *b,
                        probability: 0.2,
                    })?;
                }
            }
            done.net = true;
            done.detail = "lose 20% of the packets between nodes".into();
        }
        Fault::Delay => {
            let net = c.net().expect("network faults need namespaces");
            for (i, id) in c.nodes.keys().enumerate() {
                let spec = DelaySpec {
                    delay: Duration::from_millis(30),
                    jitter: Duration::from_millis(30),
                    seed: rng.random(),
                };
                // Peer traffic only (the peer port, either way): clients see the cluster's
                // delay, not their own links'.
                let port = PEER_PORT.to_string();
                let matcher = ["-p", "tcp", "-m", "multiport", "--ports", port.as_str()];
                done.delays.push(PacketDelay::start(
                    &net.node_ns(*id),
                    100 + i as u16,
                    &matcher,
                    spec,
                )?);
            }
            done.detail = "hold packets between nodes 30 ms ± 30 ms (reordered)".into();
        }
        Fault::DiskFull => {
            let (id, why) = some_leader(c, rng);
            let used = c.tmpfs_used(id);
            c.resize_tmpfs(id, used + (1 << 20))?;
            done.filled.push(id);
            done.detail = format!(
                "fill node {id}'s disk ({why}): its tmpfs cut to the {} MiB it holds plus 1 MiB",
                used >> 20
            );
        }
        Fault::ClockOffset => {
            let (id, why) = some_leader(c, rng);
            let magnitude = if rng.random_bool(0.25) {
                rng.random_range(100..=400)
            } else {
                rng.random_range(30_000..=3_600_000)
            };
            let offset = if rng.random_bool(0.5) {
                magnitude
            } else {
                -magnitude
            };
            c.set_clock_offset(id, offset);
            done.clocks.push((id, offset));
            done.detail = format!("jump node {id}'s wall clock by {offset:+} ms ({why})");
        }
        Fault::LogDamage => {
            let (id, why) = if rng.random_bool(0.5) {
                some_leader(c, rng)
            } else {
                (
                    *c.live().choose(rng).expect("a live node"),
                    "a random node".into(),
                )
            };
            c.kill(id);
            let fraction = rng.random_range(LOG_DAMAGE_AT);
            let (_, written) = c.newest_log_segment(id);
            let (path, at) = c.damage_log(id, fraction, LOG_DAMAGE_BYTES);
            done.killed.push(id);
            done.damaged.push((id, c.node(id).log_text().len()));
            done.detail = format!(
                "kill -9 node {id} ({why}); {LOG_DAMAGE_BYTES} bytes of {} inverted at offset \
                 {at} of its {written} written ({:.0}%)",
                path.file_name().unwrap_or_default().to_string_lossy(),
                fraction * 100.0
            );
        }
        Fault::Mixed => unreachable!("drawn above"),
    }
    Ok(done)
}

/// `line` without its terminal colours (the nodes' logs colour their fields).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, up to a final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What a damaged node logged at its restart: `Ok` with the damage found and cut (and the
/// partitions it is recovering), `Err` when it cut a torn tail instead or logged neither.
fn damage_found(c: &Cluster, id: u64, log_from: usize) -> Result<String, String> {
    let text = c.node(id).log_text();
    let since = text.get(log_from..).unwrap_or_default();
    let line = |what: &str| {
        since
            .lines()
            .find_map(|l| l.find(what).map(|at| plain(l[at..].trim())))
    };
    match (line(LOGGED_DAMAGE), line(LOGGED_TEAR)) {
        (Some(found), None) => {
            let recovering = match c.recovering(id) {
                Ok(ps) => format!("{ps:?}"),
                Err(e) => format!("unknown ({e})"),
            };
            Ok(format!(
                "node {id}: {found}; partitions recovering at restart: {recovering}"
            ))
        }
        (found, tear) => Err(format!(
            "node {id}'s damaged log was not reported as damage (expected \"{LOGGED_DAMAGE}\"): {}",
            tear.or(found)
                .unwrap_or_else(|| "it logged neither damage nor a torn tail".into())
        )),
    }
}

/// Undoes a fault: heals the network, resumes paused nodes, restarts killed ones.
pub fn heal(c: &mut Cluster, injected: Injected) -> Healed {
    let mut notes = Vec::new();
    let mut broken = Vec::new();
    let mut damage_not_found = Vec::new();
    // Before the clocks come back: a node whose clock is far off must have handed over.
    for (id, offset) in &injected.clocks {
        let led = c.led_by(*id);
        if offset.abs() > OFF_CLOCK_MS {
            if led.is_empty() {
                notes.push(format!("node {id} led nothing at the end of the hold"));
            } else {
                broken.push(format!(
                    "node {id}, its clock {offset:+} ms off, still led partitions {led:?} at the end of the hold"
                ));
            }
        }
    }
    let held: u64 = injected.delays.iter().map(|d| d.stats().0).sum();
    let reordered: u64 = injected.delays.iter().map(|d| d.stats().1).sum();
    if !injected.delays.is_empty() {
        notes.push(format!(
            "{held} packets held, {reordered} released out of order"
        ));
    }
    drop(injected.delays);
    for (id, _) in injected.clocks {
        c.set_clock_offset(id, 0);
    }
    if injected.net {
        c.heal();
    }
    for id in injected.filled {
        if let Err(e) = c.resize_tmpfs(id, DISK_FULL_TMPFS_BYTES) {
            notes.push(format!("growing node {id}'s tmpfs back failed: {e}"));
        }
    }
    for id in injected.paused {
        c.resume(id);
    }
    for id in injected.killed {
        c.restart(id);
    }
    for (id, log_from) in injected.damaged {
        match damage_found(c, id, log_from) {
            Ok(note) => notes.push(note),
            Err(why) => {
                notes.push(why.clone());
                damage_not_found.push(why);
            }
        }
    }
    Healed {
        notes: notes.join("; "),
        broken,
        damage_not_found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_draws_every_fault_that_needs_no_set_up() {
        let three = mixable(3);
        assert!(three.contains(&Fault::LogDamage));
        assert!(three.contains(&Fault::KillLeader));
        for f in [
            Fault::Mixed,
            Fault::ClockDrift,
            Fault::DiskFull,
            Fault::Bridge,
            Fault::KillMinority,
        ] {
            assert!(!three.contains(&f), "{f}");
        }
        assert!(mixable(5).contains(&Fault::Bridge));
        assert_eq!(ALL.last(), Some(&Fault::Mixed));
    }

    #[test]
    fn log_lines_lose_their_colours() {
        assert_eq!(
            plain("cut \x1b[3mfile\x1b[0m\x1b[2m=\x1b[0m/x offset=3"),
            "cut file=/x offset=3"
        );
    }

    #[test]
    fn every_fault_parses_from_its_name() {
        for f in ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
        }
    }
}
