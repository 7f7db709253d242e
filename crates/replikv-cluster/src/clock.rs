//! Wall clocks: this node's against its peers', and the anchored clock that stamps entries
//! and dates reads (issue 16).
//!
//! Expiry is wall-clock time: a relative expiry is resolved at apply with the entry's time
//! stamp (the leader's clock), and each replica that serves a read decides with its own
//! clock whether a value is still live and how long it has left. So a clock far off is
//! wrong data: a leader an hour ahead would give every `EX 100` write an expiry an hour
//! too late, and a follower an hour ahead would serve it as gone. Two parts keep clocks
//! out of the way:
//!
//! - **The check.** Every ping carries the sender's wall clock and every pong echoes it
//!   with the answering node's own (`elections.rs`, every 100 ms). A pong that comes back
//!   after a round trip `rtt` gives the sample
//!   `offset = peer_wall − (local_wall_at_send + rtt/2)`, within `± rtt/2`. Of each peer's
//!   samples of the last [`SAMPLE_WINDOW`] the one with the least uncertainty counts. A node
//!   is **in step** when at least a majority of the cluster's nodes, itself included, have
//!   clocks within `max_clock_offset_ms` of its own (a peer counts when
//!   `|offset| ≤ max_clock_offset_ms + uncertainty`). No samples from a majority yet counts
//!   as not in step, except in a single-node cluster. A node not in step does not campaign,
//!   is not the target of a transfer or a rebalance, and sends `secondary` reads to the
//!   leader instead of serving them; one whose clock is *known* off (a peer's sample since
//!   its last jump disagrees) also hands the partitions it leads to an in-step replica
//!   (`elections.rs`, `transfer.rs`, `read.rs`).
//! - **The anchored clock.** Stamps (entries' `now_ms`) and read times (liveness, TTLs) come
//!   from [`AnchoredClock`]: the last wall-clock reading taken while in step, plus the
//!   monotonic time elapsed since, never going backwards. A wall clock that jumps does not
//!   reach them: every check compares the wall clock with its reading at the last check
//!   advanced by the monotonic clock, and a difference over the jump tolerance (a quarter
//!   of `max_clock_offset_ms`) voids every sample taken before it, so the node is not in step
//!   until fresh samples show its new wall clock agrees with a majority. Only then does the
//!   anchored clock follow it (forward at once; backward by standing still until the wall
//!   clock catches up). A leader whose wall clock jumps therefore keeps stamping with the
//!   anchored clock until it has handed its partitions over: it steps down.
//!
//! A single-node cluster has no one to compare with: it is always in step and its anchored
//! clock follows its wall clock at each check (never backwards).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use replikv_types::NodeId;
use serde::{Deserialize, Serialize};

use crate::node::WallClock;

/// Samples older than this are not used.
pub(crate) const SAMPLE_WINDOW: Duration = Duration::from_secs(2);
/// Samples kept per peer (20 at one ping per 100 ms).
const SAMPLES_KEPT: usize = 20;
/// A peer's own claim to be in step counts for this long after its pong.
const CLAIM_FRESH: Duration = Duration::from_secs(1);

/// The time of day that stamps entries and dates reads: a wall-clock reading taken while in
/// step, advanced by the monotonic clock, never going backwards.
///
/// Until the first check in step there is no anchor, and the wall clock is read as it is:
/// a node starts with a wall clock nobody has vouched for (the simulation found it: a node
/// started an hour ahead, corrected later, kept an anchor an hour ahead, never going back,
/// and led with it once in step). Nothing it hands out then stamps an entry, since a node
/// out of step does not lead, and nothing holds the clock back once it is anchored.
pub struct AnchoredClock {
    wall: WallClock,
    /// (wall-clock reading in Unix ms, the monotonic instant it was taken), once in step.
    anchor: RwLock<Option<(u64, Instant)>>,
    /// The latest anchored time handed out: the clock never goes below it.
    last_ms: AtomicU64,
}

impl AnchoredClock {
    pub fn new(wall: WallClock) -> AnchoredClock {
        AnchoredClock {
            wall,
            anchor: RwLock::new(None),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Milliseconds since the Unix epoch, as this node stamps and reads.
    pub fn now_ms(&self) -> u64 {
        match self.projected() {
            Some(t) => self.last_ms.fetch_max(t, Ordering::Relaxed).max(t),
            None => self.wall.now_ms(),
        }
    }

    /// The anchor advanced by the monotonic clock (may be below what was handed out).
    fn projected(&self) -> Option<u64> {
        let (wall_ms, at) = (*self.anchor.read().expect("anchor"))?;
        Some(wall_ms.saturating_add(at.elapsed().as_millis() as u64))
    }

    /// Follows the wall clock from now on (`wall_ms`, read a moment ago).
    fn anchor_at(&self, wall_ms: u64) {
        *self.anchor.write().expect("anchor") = Some((wall_ms, Instant::now()));
    }
}

/// One offset sample of a peer's wall clock against this node's.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// When the pong arrived.
    at: Instant,
    /// Peer's wall clock minus this node's, in ms.
    offset_ms: i64,
    /// Half the round trip: the true offset is within `offset_ms ± uncertainty_ms`.
    uncertainty_ms: u64,
}

#[derive(Default)]
struct State {
    samples: BTreeMap<NodeId, VecDeque<Sample>>,
    /// Each peer's own answer to "are you in step", and when it came.
    claims: BTreeMap<NodeId, (bool, Instant)>,
    /// When this node's wall clock last jumped against its monotonic clock: samples of
    /// pings sent before it are void.
    jumped_at: Option<Instant>,
    /// The wall clock at the last check, and when (monotonic): the reference a jump is
    /// measured against.
    last_check: Option<(u64, Instant)>,
}

/// What the check knows of one peer's clock, for status and metrics.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerClock {
    pub node_id: NodeId,
    /// Its wall clock minus this node's (ms), from the best recent sample.
    pub offset_ms: Option<i64>,
    pub uncertainty_ms: Option<u64>,
    /// Whether it counts as within `max_clock_offset_ms` of this node.
    pub within: bool,
    /// Whether it says it is in step itself (its last pong, if recent).
    pub claims_in_step: Option<bool>,
}

/// This node's clock check, for `/v1/_replication/state`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClockStatus {
    pub in_step: bool,
    pub max_clock_offset_ms: u64,
    /// The anchored clock minus the wall clock (ms): how far stamps are from the wall clock
    /// (0 while in step, but for the few ms between checks).
    pub anchored_minus_wall_ms: i64,
    pub peers: Vec<PeerClock>,
}

/// The check of this node's wall clock against its peers' (see the module note).
pub struct ClockCheck {
    me: NodeId,
    members: Vec<NodeId>,
    wall: WallClock,
    max_offset_ms: u64,
    pub(crate) anchored: std::sync::Arc<AnchoredClock>,
    in_step: AtomicBool,
    state: Mutex<State>,
}

impl ClockCheck {
    pub(crate) fn new(
        me: NodeId,
        members: Vec<NodeId>,
        wall: WallClock,
        max_offset_ms: u64,
    ) -> ClockCheck {
        let single = members.len() <= 1;
        let anchored = AnchoredClock::new(wall);
        if single {
            anchored.anchor_at(wall.now_ms());
        }
        ClockCheck {
            me,
            members,
            wall,
            max_offset_ms,
            anchored: std::sync::Arc::new(anchored),
            in_step: AtomicBool::new(single),
            state: Mutex::default(),
        }
    }

    /// The wall clock, as pings and pongs carry it.
    pub(crate) fn wall_ms(&self) -> u64 {
        self.wall.now_ms()
    }

    /// Whether this node's clock is in step with a majority's, as of the last check.
    pub fn in_step(&self) -> bool {
        self.in_step.load(Ordering::Relaxed)
    }

    /// A pong from `from` to a ping sent at `sent` (monotonic) carrying `sent_wall_ms`:
    /// the peer's wall clock read `peer_wall_ms`, and it said it was `peer_in_step`.
    pub(crate) fn note_pong(
        &self,
        from: NodeId,
        sent: Instant,
        sent_wall_ms: u64,
        peer_wall_ms: u64,
        peer_in_step: bool,
    ) {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(sent).as_millis() as u64;
        let mut s = self.state.lock().expect("clock state");
        s.claims.insert(from, (peer_in_step, now));
        if s.jumped_at.is_some_and(|j| sent < j) {
            return;
        }
        let offset_ms = peer_wall_ms as i64 - (sent_wall_ms as i64 + (rtt / 2) as i64);
        let ring = s.samples.entry(from).or_default();
        ring.push_back(Sample {
            at: now,
            offset_ms,
            uncertainty_ms: rtt.div_ceil(2),
        });
        while ring.len() > SAMPLES_KEPT {
            ring.pop_front();
        }
    }

    /// The best recent sample of `peer`.
    fn best(s: &State, peer: NodeId) -> Option<Sample> {
        s.samples
            .get(&peer)?
            .iter()
            .filter(|x| x.at.elapsed() <= SAMPLE_WINDOW)
            .min_by_key(|x| (x.uncertainty_ms, std::cmp::Reverse(x.at)))
            .copied()
    }

    fn within(&self, sample: &Sample) -> bool {
        sample.offset_ms.unsigned_abs() <= self.max_offset_ms + sample.uncertainty_ms
    }

    /// Runs the check (every ping round): a jump of the wall clock against the anchored
    /// one, then whether a majority's clocks agree with this one, then the anchored clock
    /// follows the wall clock if they do. Returns the new state when it changed.
    pub(crate) fn check(&self) -> Option<bool> {
        self.check_at(self.wall.now_ms())
    }

    /// [`ClockCheck::check`] with the wall clock reading `wall`.
    fn check_at(&self, wall: u64) -> Option<bool> {
        let now = Instant::now();
        let tolerance = (self.max_offset_ms / 4).max(1);
        let mut s = self.state.lock().expect("clock state");
        // Against the last check, not the anchor: a node out of step keeps its anchor, and
        // a wall clock that jumped once must still be able to show it agrees again.
        let drift = s.last_check.map_or(0, |(w, at)| {
            wall as i64 - (w as i64 + now.saturating_duration_since(at).as_millis() as i64)
        });
        s.last_check = Some((wall, now));
        if drift.unsigned_abs() > tolerance {
            if self.members.len() > 1 {
                tracing::warn!(
                    jump_ms = drift,
                    "the wall clock moved against the monotonic clock; comparing it with the peers' again"
                );
            }
            s.jumped_at = Some(now);
            s.samples.clear();
        }
        let in_step = self.members.len() <= 1 || {
            let within = self
                .members
                .iter()
                .filter(|id| **id != self.me)
                .filter(|id| Self::best(&s, **id).is_some_and(|b| self.within(&b)))
                .count();
            1 + within > self.members.len() / 2
        };
        drop(s);
        if in_step {
            self.anchored.anchor_at(wall);
        }
        let was = self.in_step.swap(in_step, Ordering::Relaxed);
        (was != in_step).then_some(in_step)
    }

    /// Whether this node's clock is known to be off, not merely unconfirmed: a peer's recent
    /// sample (taken since its last jump, if any) disagrees with it. A node out of step for
    /// lack of samples (cut off, too busy to read its pongs, or a jump not yet compared)
    /// keeps stamping with the anchored clock of its last check in step, which only its
    /// monotonic clock's drift moves; one known off must not lead. So a small jump, which
    /// the next pongs show still within the bound, moves no leadership.
    pub(crate) fn known_off(&self) -> bool {
        let s = self.state.lock().expect("clock state");
        self.members
            .iter()
            .filter(|id| **id != self.me)
            .any(|id| Self::best(&s, *id).is_some_and(|b| !self.within(&b)))
    }

    /// Whether `peer` said it was in step in a pong of the last second.
    pub(crate) fn peer_claims_in_step(&self, peer: NodeId) -> bool {
        let s = self.state.lock().expect("clock state");
        s.claims
            .get(&peer)
            .is_some_and(|(claim, at)| *claim && at.elapsed() <= CLAIM_FRESH)
    }

    pub fn status(&self) -> ClockStatus {
        let s = self.state.lock().expect("clock state");
        let peers = self
            .members
            .iter()
            .filter(|id| **id != self.me)
            .map(|id| {
                let best = Self::best(&s, *id);
                PeerClock {
                    node_id: *id,
                    offset_ms: best.map(|b| b.offset_ms),
                    uncertainty_ms: best.map(|b| b.uncertainty_ms),
                    within: best.is_some_and(|b| self.within(&b)),
                    claims_in_step: s
                        .claims
                        .get(id)
                        .filter(|(_, at)| at.elapsed() <= CLAIM_FRESH)
                        .map(|(c, _)| *c),
                }
            })
            .collect();
        drop(s);
        ClockStatus {
            in_step: self.in_step(),
            max_clock_offset_ms: self.max_offset_ms,
            anchored_minus_wall_ms: self.anchored.now_ms() as i64 - self.wall.now_ms() as i64,
            peers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    fn check(members: &[NodeId]) -> ClockCheck {
        ClockCheck::new(1, members.to_vec(), WallClock::System, 500)
    }

    /// A pong with the peer's clock `offset_ms` ahead, after a round trip of about `rtt_ms`.
    fn pong(c: &ClockCheck, from: NodeId, offset_ms: i64, rtt_ms: u64) {
        let sent = Instant::now() - Duration::from_millis(rtt_ms);
        let sent_wall = c.wall_ms() - rtt_ms;
        let peer_wall = (sent_wall as i64 + (rtt_ms / 2) as i64 + offset_ms) as u64;
        c.note_pong(from, sent, sent_wall, peer_wall, true);
    }

    #[test]
    fn a_single_node_is_always_in_step() {
        let c = check(&[1]);
        assert!(c.in_step());
        assert_eq!(c.check(), None);
        assert!(c.in_step());
    }

    #[test]
    fn unknown_clocks_are_not_in_step_and_a_majority_within_the_bound_is() {
        let c = check(&[1, 2, 3]);
        assert!(!c.in_step(), "no samples yet");
        assert_eq!(c.check(), None);
        pong(&c, 2, 3_600_000, 2);
        pong(&c, 3, -3_600_000, 2);
        assert_eq!(c.check(), None, "both peers an hour off");
        pong(&c, 3, 120, 2);
        assert_eq!(c.check(), Some(true), "itself and node 3 are a majority");
        let st = c.status();
        assert!(st.in_step);
        let p3 = st.peers.iter().find(|p| p.node_id == 3).unwrap();
        assert!(p3.within);
        assert!((118..=122).contains(&p3.offset_ms.unwrap()), "{p3:?}");
    }

    /// A sample after a long round trip (a pause, a slow link) is uncertain by half of it;
    /// the best recent sample decides, and an uncertain one is not taken for a far clock.
    #[test]
    fn the_least_uncertain_recent_sample_counts() {
        let c = check(&[1, 2, 3]);
        // Answered at once, but the answer was read 3 s later: it looks 1.5 s behind.
        pong(&c, 2, -1_500, 3_000);
        assert_eq!(c.check(), Some(true), "within 500 ms give or take 1.5 s");
        pong(&c, 2, 900, 4);
        assert_eq!(
            c.check(),
            Some(false),
            "the precise sample says 900 ms ahead"
        );
    }

    /// A wall clock that jumps an hour: samples from before the jump are void at once, so
    /// the node is out of step at that check, and the anchored clock (its stamps) does not
    /// move with the wall clock; once peers' fresh pongs show the new wall clock agrees with
    /// theirs (it was a correction), the anchored clock follows it.
    #[test]
    fn a_jump_of_the_wall_clock_voids_the_samples_and_does_not_reach_the_stamps() {
        let c = check(&[1, 2, 3]);
        let w = c.wall_ms();
        pong(&c, 2, 10, 2);
        pong(&c, 3, -10, 2);
        assert_eq!(c.check_at(w), Some(true));
        let stamp = c.anchored.now_ms();
        let jumped = w + 3_600_000;
        assert_eq!(c.check_at(jumped), Some(false));
        assert!(
            c.anchored.now_ms() < stamp + 60_000,
            "the jump reached the anchored clock"
        );
        assert_eq!(c.check_at(jumped), None, "still no sample since the jump");
        // Peers whose clocks agree with the new reading answer pings sent after the jump.
        c.note_pong(2, Instant::now(), jumped, jumped + 5, true);
        assert_eq!(c.check_at(jumped), Some(true));
        assert!(c.anchored.now_ms() >= jumped);
    }

    /// A node that starts with its wall clock an hour ahead and out of step, then has it
    /// corrected: once in step its clock is the corrected one, not an hour ahead standing
    /// still (found by the simulation, seeds 14, 20 and 62).
    #[tokio::test]
    async fn a_clock_never_in_step_is_not_an_anchor() {
        let offset: &'static AtomicI64 = Box::leak(Box::new(AtomicI64::new(HOUR)));
        let wall = WallClock::Simulated {
            epoch_ms: 1_700_000_000_000,
            origin: Instant::now(),
            offset_ms: Some(offset),
        };
        let c = ClockCheck::new(1, vec![1, 2, 3], wall, 500);
        let peers_ms = || 1_700_000_000_000 + Instant::now().elapsed().as_millis() as u64;
        let pong_now = |from| {
            let sent = Instant::now();
            c.note_pong(from, sent, c.wall_ms(), peers_ms(), true);
        };
        pong_now(2);
        pong_now(3);
        assert_eq!(c.check(), None, "an hour ahead of both peers");
        let before = c.anchored.now_ms();
        assert!(
            before >= peers_ms() + 3_000_000,
            "not anchored: the wall clock as it is"
        );
        offset.store(0, Ordering::Relaxed);
        assert_eq!(c.check(), None, "the correction is a jump: samples void");
        pong_now(2);
        assert_eq!(c.check(), Some(true));
        let now = c.anchored.now_ms();
        assert!(now < peers_ms() + 1_000, "anchored an hour ahead: {now}");
    }

    const HOUR: i64 = 3_600_000;

    #[test]
    fn the_anchored_clock_never_goes_backwards() {
        let a = AnchoredClock::new(WallClock::System);
        a.anchor_at(WallClock::System.now_ms());
        let t = a.now_ms();
        a.anchor_at(t - 10_000);
        assert!(a.now_ms() >= t);
        a.anchor_at(t + 10_000);
        assert!(a.now_ms() >= t + 10_000);
    }
}
