//! When a replica may start an election.
//!
//! openraft 0.9 has no pre-vote: a replica cut off from its peers campaigns again and again,
//! raising its term, and when the link heals that term deposes a healthy leader. replikv
//! closes the gap from outside: a replica's election timer runs only while it has heard from
//! a majority of its group within the election timeout (every peer answers a ping every
//! [`PING_EVERY`]), and not while a hold is on (a new cluster waiting for its preferred
//! leader, or a leadership transfer). Explicit campaigns (`trigger().elect()`, used by
//! transfers) are not affected.
//!
//! A leader whose process died is noticed sooner than openraft's timer would: a follower
//! holding a committed vote waits the leader lease (`election_timeout_max_ms`) plus a random
//! election timeout after the leader's last message, 0.9 to 1.2 s by default, and a campaign
//! started before the other replicas' leases ran out is refused and waits a whole timeout
//! more. When the leader's port refuses connections (its process is gone; a cut link times
//! out instead), a follower campaigns once the lease it granted has run out, plus a short
//! random delay so that two followers rarely split the vote ([`Node::campaign_if_leader_gone`]).
//! Nothing about who may vote changes, so this is as safe as any election.
//!
//! The same gate keeps a node whose wall clock is not in step with a majority's
//! (`clock.rs`) from campaigning at all, and such a node hands the partitions it leads to a
//! replica that is in step ([`Node::check_clock`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use crate::messages::{PeerRequest, PeerResponse};
use crate::node::{Group, Node};

pub(crate) const PING_EVERY: Duration = Duration::from_millis(100);

/// One group's election permission.
pub(crate) struct ElectionGate {
    hold_until: Mutex<Instant>,
    /// The start-up hold: lifted as soon as the group has a leader.
    startup: AtomicBool,
    allowed: AtomicBool,
    /// The term in which an early campaign (leader gone) was scheduled, so one is per term.
    early_for_term: Mutex<Option<u64>>,
}

impl ElectionGate {
    /// Starts open; the first check closes it unless a majority is reachable.
    pub(crate) fn new() -> ElectionGate {
        ElectionGate {
            hold_until: Mutex::new(Instant::now()),
            startup: AtomicBool::new(false),
            allowed: AtomicBool::new(true),
            early_for_term: Mutex::new(None),
        }
    }

    /// A new cluster's hold for non-preferred replicas, so the preferred leader wins first;
    /// it ends after `dur` or as soon as any leader is elected.
    pub(crate) fn hold_for_startup(&self, dur: Duration) {
        self.startup.store(true, Ordering::Relaxed);
        self.hold(dur);
    }

    /// Keeps elections off for at least `dur` from now.
    pub(crate) fn hold(&self, dur: Duration) {
        let mut until = self.hold_until.lock().expect("election hold");
        *until = (*until).max(Instant::now() + dur);
    }

    /// Keeps elections off for at least `dur` from now, starting at once (not at the gate's
    /// next check).
    pub(crate) fn hold_off(&self, dur: Duration, raft: &replikv_raft::Raft) {
        self.hold(dur);
        self.allowed.store(false, Ordering::Relaxed);
        raft.runtime_config().elect(false);
    }

    fn held(&self) -> bool {
        Instant::now() < *self.hold_until.lock().expect("election hold")
    }
}

impl Node {
    /// Whether this node has heard from a majority of partition `p`'s replicas within the
    /// election timeout. When it has not, it knows no write or read can succeed through it.
    pub(crate) fn reaches_majority(&self, p: replikv_types::GroupId) -> bool {
        let Some(pl) = self.placement_of(p) else {
            return false;
        };
        self.reachable(&pl.replicas) > pl.replicas.len() / 2
    }

    /// Replicas of `g` (this node included) heard from within the election timeout.
    fn reachable_replicas(&self, g: &Group) -> usize {
        self.reachable(&g.placement.replicas)
    }

    fn reachable(&self, replicas: &[u64]) -> usize {
        let window = Duration::from_millis(self.cfg.replication.election_timeout_max_ms);
        self.replicas_heard_within(replicas, window)
    }

    /// Of `replicas`, this node and the peers that answered anything within `window`.
    pub(crate) fn replicas_heard_within(&self, replicas: &[u64], window: Duration) -> usize {
        replicas
            .iter()
            .filter(|id| {
                **id == self.id()
                    || self
                        .transport
                        .link_stats(**id)
                        .and_then(|s| s.last_ok)
                        .is_some_and(|t| t.elapsed() <= window)
            })
            .count()
    }

    fn update_election_gate(&self, g: &Group) {
        if g.elections.startup.load(Ordering::Relaxed) && g.leader().is_some() {
            g.elections.startup.store(false, Ordering::Relaxed);
            *g.elections.hold_until.lock().expect("election hold") = Instant::now();
        }
        let majority = g.placement.replicas.len() / 2 + 1;
        // Not while unfit to lead: recovering from a damaged log (it may lack writes it
        // acknowledged), with a disk that takes no new data, or with a clock out of step
        // (its stamps would set expiries).
        let allowed = !g.elections.held()
            && self.reachable_replicas(g) >= majority
            && self.unfit_to_lead(g).is_none();
        if g.elections.allowed.swap(allowed, Ordering::Relaxed) != allowed {
            g.raft.runtime_config().elect(allowed);
            tracing::debug!(group = %g.id, allowed, "election timer");
        }
    }
}

/// Added to the lease before an early campaign: the other replicas last heard the leader a
/// little after this one did.
const EARLY_CAMPAIGN_MARGIN: Duration = Duration::from_millis(20);
/// Most random delay added on top, so that two followers seldom campaign together.
const EARLY_CAMPAIGN_JITTER_MS: u64 = 150;

impl Node {
    /// Schedules a campaign for a follower whose leader's process is gone (see the module
    /// note): at most once per term, once the lease granted to that leader has run out.
    pub(crate) fn campaign_if_leader_gone(self: &Arc<Self>, g: &Arc<Group>) {
        let (state, leader, term) = {
            let m = g.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_leader, m.current_term)
        };
        let Some(leader) = leader else { return };
        if state != openraft::ServerState::Follower
            || leader == self.id()
            || !g.elections.allowed.load(Ordering::Relaxed)
            || !self.leader_process_gone(leader)
        {
            return;
        }
        {
            let mut scheduled = g.elections.early_for_term.lock().expect("early campaign");
            if *scheduled == Some(term) {
                return;
            }
            *scheduled = Some(term);
        }
        let lease = Duration::from_millis(self.cfg.replication.election_timeout_max_ms);
        let jitter = Duration::from_millis(self.random_u64() % EARLY_CAMPAIGN_JITTER_MS);
        let wait = g
            .lease
            .campaign_wait(Instant::now(), lease)
            .unwrap_or_default()
            + EARLY_CAMPAIGN_MARGIN
            + jitter;
        let (node, g) = (self.clone(), g.clone());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // Still a follower of the same gone leader in the same term, allowed to campaign,
            // and no leader message since (which would mean it is back).
            let m = g.raft.metrics().borrow().clone();
            if m.state != openraft::ServerState::Follower
                || m.current_term != term
                || m.current_leader != Some(leader)
                || !g.elections.allowed.load(Ordering::Relaxed)
                || !node.leader_process_gone(leader)
                || g.lease.campaign_wait(Instant::now(), lease).is_some()
            {
                return;
            }
            tracing::info!(
                group = %g.id,
                leader,
                term,
                "leader's process is gone; campaigning"
            );
            node.metrics.early_campaign(g.id);
            if let Err(e) = g.raft.trigger().elect().await {
                tracing::debug!(group = %g.id, error = %e, "early campaign not started");
            }
        });
    }

    /// Whether dials of `peer` have been refused since its last answer.
    fn leader_process_gone(&self, peer: u64) -> bool {
        self.transport
            .link_stats(peer)
            .is_some_and(|s| s.refused_since.is_some() && !s.connected)
    }
}

/// After a failed hand-over of a partition by a node out of step, the next try waits this.
const HANDOFF_RETRY: Duration = Duration::from_secs(1);

impl Node {
    /// Runs the clock check (`clock.rs`) and acts on it: the change is logged once, and a
    /// node whose clock is known to be off hands each partition it leads to a replica that
    /// is in step (its preferred leader first), through the leadership transfer
    /// (`transfer.rs`). Until the transfer is done it keeps leading with its anchored clock,
    /// which its wall clock's jump did not reach.
    pub(crate) fn check_clock(self: &Arc<Self>) {
        match self.clock.check() {
            Some(false) => tracing::error!(
                max_clock_offset_ms = self.cfg.replication.max_clock_offset_ms,
                peers = ?self.clock.status().peers,
                "this node's wall clock is not in step with a majority of the cluster: it will not lead (it hands over the partitions it leads) and sends secondary reads to the leader"
            ),
            Some(true) => {
                tracing::info!(
                    "this node's wall clock is in step with a majority of the cluster again"
                )
            }
            None => {}
        }
        // Only a clock known to be off hands leadership over: one merely unconfirmed (this
        // node cut off, or too busy to read its pongs) still stamps with the anchored clock
        // of its last check in step (`ClockCheck::known_off`).
        if self.clock.in_step() || !self.clock.known_off() {
            return;
        }
        for g in &self.groups() {
            if !g.is_leader() || g.transferring.load(Ordering::Relaxed) {
                continue;
            }
            {
                let mut last = g.clock_handoff.lock().expect("handoff");
                if last.is_some_and(|t| t.elapsed() < HANDOFF_RETRY) {
                    continue;
                }
                *last = Some(Instant::now());
            }
            let in_step = |id: u64| {
                id != self.id()
                    && self.clock.peer_claims_in_step(id)
                    && self.transport.link_stats(id).is_some_and(|s| s.connected)
            };
            let pl = &g.placement;
            let Some(to) = std::iter::once(pl.preferred_leader)
                .chain(pl.replicas.iter().copied())
                .find(|id| in_step(*id))
            else {
                continue;
            };
            let (node, p) = (self.clone(), g.id);
            tracing::warn!(
                group = %p,
                to,
                "handing leadership over: this node's clock is not in step"
            );
            tokio::spawn(async move {
                if let Err(e) = node.transfer_leadership(p, to).await {
                    tracing::warn!(group = %p, to, error = %e, "hand-over failed; trying again");
                }
            });
        }
    }
}

/// Pings every peer and re-evaluates every group's gate, forever.
pub(crate) fn spawn(node: Arc<Node>) {
    let weak = Arc::downgrade(&node);
    let clock = node.clock.clone();
    node.transport.clone().start_pinger(
        PING_EVERY,
        Arc::new(move || PeerRequest::Ping {
            wall_ms: clock.wall_ms(),
        }),
        Arc::new(move |from, sent, answer| {
            if let (Some(node), PeerResponse::Pong(pong)) = (weak.upgrade(), answer) {
                node.note_pong(from, sent, &pong);
                // Out of step (at start-up, or after a jump): this sample may be the one
                // that ends it, so check now rather than at the next round.
                if !node.clock.in_step() {
                    node.check_clock();
                }
            }
        }),
    );
    for g in &node.groups() {
        node.update_election_gate(g);
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PING_EVERY);
        loop {
            tick.tick().await;
            node.watch_disk();
            node.check_clock();
            for g in &node.groups() {
                node.update_election_gate(g);
                node.campaign_if_leader_gone(g);
                if node.space.refusing() && g.is_leader() {
                    node.hand_off(g);
                }
            }
        }
    });
}
