//! Leader leases for `primary` reads (DESIGN.md section 3, reads: "a read index or a leader
//! lease with a bounded clock-drift margin").
//!
//! A read-index round (`read_rounds.rs`) that starts at `t0` and succeeds proves that a
//! quorum accepted this leader's heartbeats, all sent after `t0`. openraft 0.9 makes a
//! replica that accepted a heartbeat refuse every vote for `election_timeout_max_ms` after
//! it (its own leader lease, `Engine::handle_vote_req`), and keeps its own election timer off
//! for longer still. So no other leader can be elected before `t0 + election_timeout_max_ms`
//! on that replica's clock, and this leader may serve `primary` reads from its state machine,
//! with no round trip, until
//!
//! ```text
//! t0 + election_timeout_max_ms - lease_margin_ms
//! ```
//!
//! on its own clock, provided it has applied the round's read index (which covers the entry
//! that opened its term, so every write committed by an earlier leader). Every `quorum` or
//! `all` write it acknowledged is already applied here, because it acknowledges after apply.
//!
//! Only the rate of the monotonic clocks matters, not their offset: the margin must cover
//! how much faster a follower's clock may run than the leader's over one lease
//! (100 ms of 600 ms by default: a drift of 1/6, where quartz clocks drift about 1/10,000).
//!
//! openraft's rule leaves gaps, which replikv closes:
//! - **A replica that restarted** has forgotten when it last heard from the leader (and its
//!   saved vote is demoted, `demote_saved_vote`), so openraft would let it vote, and campaign,
//!   within one election timeout. So after a restart each group answers votes only once one
//!   lease has passed ([`ReadLease::vote_wait`], used by the peer handler), and its election
//!   timer is held off as long (`node.rs`, `start_group`).
//! - **The leader itself** may grant a vote to a candidate with a newer term and an equal log,
//!   and the candidate then needs only one more vote. So a leader answers votes only once its
//!   own read lease has run out, as the lease says no other leader can exist until then.
//! - **A leadership transfer** makes its target campaign on purpose, which openraft does not
//!   check against the lease the target granted. So the target campaigns only once a whole
//!   lease has passed since it last accepted a message from any leader
//!   ([`ReadLease::campaign_wait`]); a transfer that failed, with its old leader heartbeating
//!   again, or a leader elected meanwhile, keeps it from campaigning at all. Rounds that
//!   start while a transfer is under way grant no lease, and renewals pause.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use openraft::Vote;
use replikv_types::NodeId;

/// One group's read lease, and when it may answer votes again.
pub(crate) struct ReadLease {
    held: Mutex<Option<Held>>,
    /// After a restart: no vote is answered before this moment.
    votes_from: Instant,
    /// When this replica last finished handling an AppendEntries or snapshot chunk that its
    /// Raft accepted: each one renews the lease it grants its leader.
    leader_contact: Mutex<Option<Instant>>,
}

#[derive(Clone, Copy)]
struct Held {
    /// The leadership the lease was confirmed for.
    vote: Vote<NodeId>,
    until: Instant,
    /// The read index of the round that confirmed it: the state machine must have applied
    /// this far before a read is served under the lease.
    floor: u64,
}

/// A lease that is valid now.
pub(crate) struct Valid {
    pub floor: u64,
    pub remaining: Duration,
}

impl ReadLease {
    /// `restarted`: this replica held state before this start (its votes wait one `lease`).
    pub(crate) fn new(restarted: bool, lease: Duration) -> ReadLease {
        let now = Instant::now();
        ReadLease {
            held: Mutex::new(None),
            votes_from: if restarted { now + lease } else { now },
            leader_contact: Mutex::new(None),
        }
    }

    /// A leader's AppendEntries or snapshot chunk was accepted: noted once handled, so never
    /// earlier than openraft noted it.
    pub(crate) fn leader_heard(&self) {
        *self.leader_contact.lock().expect("read lease") = Some(Instant::now());
    }

    /// How long this replica must still wait, from `now`, before it may campaign: until
    /// `lease` has passed since it last accepted a leader's message, as the lease it granted
    /// that leader promises.
    pub(crate) fn campaign_wait(&self, now: Instant, lease: Duration) -> Option<Duration> {
        let heard = (*self.leader_contact.lock().expect("read lease"))?;
        let until = heard + lease;
        (until > now).then(|| until - now)
    }

    /// The lease confirmed for `vote`, if it has not run out at `now`.
    pub(crate) fn valid(&self, vote: &Vote<NodeId>, now: Instant) -> Option<Valid> {
        let held = (*self.held.lock().expect("read lease"))?;
        (held.vote == *vote && now < held.until).then(|| Valid {
            floor: held.floor,
            remaining: held.until - now,
        })
    }

    /// Records a round that confirmed `vote` and began at `started`; `lease` is the
    /// configured lease less the drift margin.
    pub(crate) fn confirmed(
        &self,
        vote: Vote<NodeId>,
        started: Instant,
        lease: Duration,
        floor: u64,
    ) {
        let until = started + lease;
        let mut held = self.held.lock().expect("read lease");
        *held = Some(match *held {
            Some(h) if h.vote == vote => Held {
                vote,
                until: h.until.max(until),
                floor: h.floor.max(floor),
            },
            _ => Held { vote, until, floor },
        });
    }

    /// How long a vote request must wait before this replica may answer it: until a restart
    /// has been followed by one lease, and until this leader's own read lease has run out.
    pub(crate) fn vote_wait(&self, now: Instant) -> Option<Duration> {
        let lease_end = self.held.lock().expect("read lease").map(|h| h.until);
        let until = lease_end.map_or(self.votes_from, |u| u.max(self.votes_from));
        (until > now).then(|| until - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn vote(term: u64, node: NodeId) -> Vote<NodeId> {
        Vote::new_committed(term, node)
    }

    #[test]
    fn a_lease_serves_only_its_own_leadership_and_only_until_it_ends() {
        let l = ReadLease::new(false, Duration::from_millis(600));
        let t0 = Instant::now();
        assert!(l.valid(&vote(2, 1), t0).is_none(), "no round yet");
        l.confirmed(vote(2, 1), t0, Duration::from_millis(500), 7);
        let v = l
            .valid(&vote(2, 1), t0 + Duration::from_millis(100))
            .unwrap();
        assert_eq!(v.floor, 7);
        assert_eq!(v.remaining, Duration::from_millis(400));
        assert!(l
            .valid(&vote(2, 1), t0 + Duration::from_millis(500))
            .is_none());
        assert!(l.valid(&vote(3, 1), t0).is_none(), "another term");
    }

    #[test]
    fn a_later_round_extends_and_a_new_term_replaces() {
        let l = ReadLease::new(false, Duration::from_millis(600));
        let t0 = Instant::now();
        let d = Duration::from_millis(500);
        l.confirmed(vote(2, 1), t0 + Duration::from_millis(200), d, 9);
        // A slower round that began earlier neither shortens the lease nor lowers the floor.
        l.confirmed(vote(2, 1), t0, d, 5);
        let v = l
            .valid(&vote(2, 1), t0 + Duration::from_millis(600))
            .unwrap();
        assert_eq!((v.floor, v.remaining), (9, Duration::from_millis(100)));
        l.confirmed(vote(4, 1), t0, d, 3);
        assert!(l.valid(&vote(2, 1), t0).is_none());
        assert_eq!(l.valid(&vote(4, 1), t0).unwrap().floor, 3);
    }

    #[test]
    fn votes_wait_for_a_restart_and_for_the_leaders_own_lease() {
        let fresh = ReadLease::new(false, Duration::from_millis(600));
        let now = Instant::now();
        assert_eq!(fresh.vote_wait(now), None);
        fresh.confirmed(vote(2, 1), now, Duration::from_millis(500), 1);
        assert_eq!(fresh.vote_wait(now), Some(Duration::from_millis(500)));
        assert_eq!(fresh.vote_wait(now + Duration::from_millis(500)), None);

        let restarted = ReadLease::new(true, Duration::from_millis(600));
        assert_eq!(
            restarted.campaign_wait(now, Duration::from_millis(600)),
            None
        );
        let w = restarted.vote_wait(Instant::now()).unwrap();
        assert!(w > Duration::from_millis(500) && w <= Duration::from_millis(600));
    }

    #[test]
    fn a_replica_campaigns_only_a_lease_after_its_last_leader_message() {
        let l = ReadLease::new(false, Duration::from_millis(600));
        let lease = Duration::from_millis(600);
        assert_eq!(
            l.campaign_wait(Instant::now(), lease),
            None,
            "never heard a leader"
        );
        l.leader_heard();
        let now = Instant::now();
        let w = l.campaign_wait(now, lease).unwrap();
        assert!(w > Duration::from_millis(500) && w <= lease, "{w:?}");
        assert_eq!(l.campaign_wait(now + lease, lease), None);
    }
}
