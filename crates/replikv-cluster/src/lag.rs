//! How stale a replica is, measured honestly from what the leader told it.
//!
//! Each AppendEntries (heartbeats included) carries the leader's commit offset. A replica
//! that has applied offset `a` holds everything the leader had committed at any moment when
//! the leader's commit was ≤ `a`; the newest such moment bounds the replica's staleness.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const MAX_SAMPLES: usize = 512;
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct FollowerLag {
    /// (when received, leader's commit offset then), oldest first.
    samples: VecDeque<(Instant, u64)>,
}

impl FollowerLag {
    pub fn record(&mut self, leader_commit: u64) {
        let now = Instant::now();
        if let Some((t, c)) = self.samples.back_mut() {
            if *c == leader_commit && now.duration_since(*t) < SAMPLE_EVERY {
                // Same commit, recent sample: just refresh its time.
                *t = now;
                return;
            }
        }
        self.samples.push_back((now, leader_commit));
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// Staleness of a replica that applied up to `applied`: the time since the newest moment
    /// at which it held everything committed. `None` when nothing bounds it.
    pub fn staleness(&self, applied: u64) -> Option<Duration> {
        self.samples
            .iter()
            .rev()
            .find(|(_, c)| *c <= applied)
            .map(|(t, _)| t.elapsed())
    }

    /// The leader's newest known commit offset.
    pub fn leader_commit(&self) -> Option<u64> {
        self.samples.back().map(|(_, c)| *c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_is_bounded_by_the_newest_covered_commit() {
        let mut lag = FollowerLag::default();
        assert_eq!(lag.staleness(10), None);
        lag.record(5);
        lag.record(9);
        assert!(lag.staleness(9).unwrap() < Duration::from_secs(1));
        assert!(lag.staleness(5).is_some());
        assert_eq!(lag.staleness(4), None);
        assert_eq!(lag.leader_commit(), Some(9));
    }
}
