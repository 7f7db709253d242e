//! How stale a replica is, measured honestly from what the leader told it.
//!
//! A replica learns the leader's position from the answers to its own pings: each ping is
//! stamped with this node's clock when it is sent, and the leader answers with its last log
//! offset and how long ago a quorum last acknowledged it (openraft measures that from when
//! the acknowledged message was *sent*). Every entry committed before that acknowledgement
//! is in the leader's log, so it is at or below the offset; and the acknowledgement happened
//! no earlier than `sent - quorum_age` on this node's clock. Hence the sample
//! `(sent - quorum_age, offset)`: everything committed before that moment has an offset of
//! at most `offset`. A replica that applied `a` is then current as of the newest sample
//! whose offset is at most `a`.
//!
//! Stamping with this node's send time, never with the time an answer or an AppendEntries
//! arrives, is what keeps the bound true when messages are delayed: a replica that was paused
//! (SIGSTOP) or cut off and then handed old messages does not mistake them for news. A
//! deposed leader that still believes it leads answers with an old quorum acknowledgement,
//! so its samples date from before the majority moved on.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

const MAX_SAMPLES: usize = 512;

#[derive(Default)]
pub struct FollowerLag {
    /// (moment on this node's clock, leader's last offset then), oldest first.
    samples: VecDeque<(Instant, u64)>,
}

impl FollowerLag {
    /// Records that everything committed before `as_of` has an offset of at most `offset`.
    pub fn record(&mut self, as_of: Instant, offset: u64) {
        // Answers may come back out of order: keep the samples sorted by time.
        let at = self.samples.partition_point(|(t, _)| *t <= as_of);
        self.samples.insert(at, (as_of, offset));
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// Staleness of a replica that applied up to `applied`: the time since the newest moment
    /// as of which it held everything committed. `None` when nothing bounds it.
    pub fn staleness(&self, applied: u64) -> Option<Duration> {
        self.samples
            .iter()
            .rev()
            .find(|(_, c)| *c <= applied)
            .map(|(t, _)| t.elapsed())
    }

    /// The newest known leader offset.
    pub fn leader_offset(&self) -> Option<u64> {
        self.samples.back().map(|(_, c)| *c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_is_bounded_by_the_newest_covered_sample() {
        let mut lag = FollowerLag::default();
        assert_eq!(lag.staleness(10), None);
        let now = Instant::now();
        lag.record(now - Duration::from_secs(5), 5);
        lag.record(now, 9);
        assert!(lag.staleness(9).unwrap() < Duration::from_secs(1));
        assert!(lag.staleness(5).unwrap() >= Duration::from_secs(5));
        assert_eq!(lag.staleness(4), None);
        assert_eq!(lag.leader_offset(), Some(9));
    }

    #[test]
    fn a_late_answer_about_the_past_does_not_make_a_replica_look_fresh() {
        let mut lag = FollowerLag::default();
        let now = Instant::now();
        lag.record(now - Duration::from_secs(1), 100);
        // An answer to a ping sent 3 s ago (say, before a SIGSTOP) arrives last.
        lag.record(now - Duration::from_secs(3), 40);
        assert_eq!(lag.leader_offset(), Some(100));
        assert!(lag.staleness(50).unwrap() >= Duration::from_secs(3));
    }
}
