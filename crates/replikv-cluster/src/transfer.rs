//! Leadership: watching it change (metrics), moving it on request (`promote`), and moving it
//! back to the preferred leader once that replica is healthy again.
//!
//! openraft 0.9 has no leadership-transfer call, so a transfer is built from what it does
//! have, and relies on Raft's own safety (a candidate wins only with an up-to-date log):
//! 1. the leader stops taking writes (TRYAGAIN) and waits until the target matches its log;
//! 2. the other replicas hold their election timers off for a while;
//! 3. the leader stops heartbeating, so every replica's leader lease runs out;
//! 4. the target campaigns once the lease has expired and wins, being the only candidate
//!    with the full log;
//! 5. the old leader resumes its timers and follows.
//!
//! If any step fails the old leader resumes heartbeats and answers TRYAGAIN: leadership
//! either moved or stayed, and no write was acknowledged in between.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use openraft::ServerState;
use replikv_types::{Error, GroupId};

use crate::messages::{ClientRequest, ClientResponse};
use crate::node::{Group, Node};

/// Consecutive healthy checks before a preferred leader asks for its leadership back.
const STABLE_CHECKS: u32 = 3;

impl Node {
    /// Moves leadership of partition `p` to replica `to`. Called on any node: it is forwarded
    /// to the current leader.
    pub async fn promote(self: &Arc<Self>, p: GroupId, to: u64) -> Result<(), Error> {
        let Some(pl) = self.placement_of(p) else {
            return Err(Error::InvalidArgument(format!("no {p:#}")));
        };
        if !pl.replicas.contains(&to) {
            return Err(Error::InvalidArgument(format!(
                "node {to} is not a replica of {p:#} (replicas: {:?})",
                pl.replicas
            )));
        }
        let deadline = Instant::now()
            + Duration::from_millis(self.cfg.replication.election_timeout_max_ms * 6 + 3_000);
        let leader = match self.leader_of(p) {
            Some(l) => l,
            None => self.await_leader(p, None, deadline).await?,
        };
        if leader == self.id() {
            return self.transfer_leadership(p, to).await;
        }
        match self
            .ask(leader, ClientRequest::Transfer { group: p, to }, deadline)
            .await?
        {
            ClientResponse::Done => Ok(()),
            other => Err(Error::Internal(format!(
                "unexpected answer to a transfer: {other:?}"
            ))),
        }
    }

    pub(crate) async fn transfer_leadership(
        self: &Arc<Self>,
        p: GroupId,
        to: u64,
    ) -> Result<(), Error> {
        let Some(g) = self.group(p) else {
            return Err(Error::NotLeader {
                group: p,
                leader: self.leader_of(p),
            });
        };
        if !g.is_leader() {
            return Err(Error::NotLeader {
                group: p,
                leader: g.leader(),
            });
        }
        if to == self.id() {
            return Ok(());
        }
        // A leader must have a clock in step with a majority's (`clock.rs`); the target's
        // own judgement, from its last pong, decides (it refuses to campaign otherwise).
        if !self.clock.peer_claims_in_step(to) {
            return Err(Error::TryAgain(format!(
                "node {to}'s clock is not known to be in step with a majority of the cluster; not moving {p:#} to it"
            )));
        }
        let already = {
            let _exclusive = g.propose_gate.write().await;
            g.transferring.swap(true, Ordering::SeqCst)
        };
        if already {
            return Err(Error::TryAgain(format!(
                "a transfer of {p:#} is already under way"
            )));
        }
        let result = self.run_transfer(&g, to).await;
        // Elections come back on when this node's hold ends (`elections.rs`).
        g.raft.runtime_config().heartbeat(true);
        g.transferring.store(false, Ordering::SeqCst);
        match &result {
            Ok(()) => tracing::info!(group = %p, to, "leadership transferred"),
            Err(e) => tracing::warn!(group = %p, to, error = %e, "leadership transfer failed"),
        }
        result
    }

    async fn run_transfer(self: &Arc<Self>, g: &Arc<Group>, to: u64) -> Result<(), Error> {
        let p = g.id;
        let lease = Duration::from_millis(self.cfg.replication.election_timeout_max_ms);
        let catch_up = g
            .raft
            .wait(Some(Duration::from_secs(3)))
            .metrics(
                move |m| {
                    // Every entry proposed before the transfer began is applied (its client
                    // has its answer) and the target holds all of them.
                    let last = m.last_log_index.unwrap_or(0);
                    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
                    applied >= last
                        && m.replication
                            .as_ref()
                            .and_then(|r| r.get(&to).copied().flatten())
                            .is_some_and(|l| l.index >= last)
                },
                "target caught up",
            )
            .await;
        if catch_up.is_err() {
            return Err(Error::TryAgain(format!(
                "node {to} has not caught up with {p:#}; retry"
            )));
        }
        let hold = lease * 4;
        let deadline = Instant::now() + hold;
        for other in g
            .placement
            .replicas
            .iter()
            .filter(|id| **id != to && **id != self.id())
        {
            let req = ClientRequest::HoldElections {
                group: p,
                for_ms: hold.as_millis() as u64,
            };
            if let Err(e) = self.ask(*other, req, Instant::now() + lease).await {
                tracing::debug!(group = %p, node = other, error = %e, "could not hold elections");
            }
        }
        self.hold_elections(p, hold);
        g.raft.runtime_config().heartbeat(false);
        let req = ClientRequest::Campaign {
            group: p,
            after_ms: lease.as_millis() as u64 + 50,
        };
        self.ask(to, req, deadline).await?;
        let moved = g
            .raft
            .wait(Some(lease * 2))
            .metrics(move |m| m.current_leader == Some(to), "leader moved")
            .await;
        moved
            .map(|_| ())
            .map_err(|_| Error::TryAgain(format!("node {to} did not take over {p:#}; retry")))
    }

    /// Keeps this replica of `p` from starting elections for `dur`.
    pub(crate) fn hold_elections(&self, p: GroupId, dur: Duration) {
        if let Some(g) = self.group(p) {
            g.elections.hold_off(dur, &g.raft);
        }
    }

    /// Campaigns for leadership of `p` once the old leader's lease has run out.
    pub(crate) async fn campaign(&self, p: GroupId, after: Duration) -> Result<(), Error> {
        let Some(g) = self.group(p) else {
            return Err(Error::NotLeader {
                group: p,
                leader: None,
            });
        };
        if let Some(why) = self.unfit_to_lead(&g) {
            return Err(Error::TryAgain(format!(
                "{why}: it takes no leadership until then"
            )));
        }
        // Waiting out the lease is the protocol: votes are refused until it expires.
        tokio::time::sleep(after).await;
        if let Some(why) = self.unfit_to_lead(&g) {
            return Err(Error::TryAgain(format!(
                "{why}: it takes no leadership until then"
            )));
        }
        let term_wait = Duration::from_millis(self.cfg.replication.election_timeout_max_ms);
        // This replica granted a lease to every leader whose messages it accepted, and an
        // explicit campaign is not checked against it by openraft: wait it out here. A
        // leader still heartbeating (the transfer failed, or another was elected) keeps this
        // replica from campaigning at all (`lease.rs`).
        let give_up = Instant::now() + term_wait * 2;
        while let Some(wait) = g.lease.campaign_wait(Instant::now(), term_wait) {
            if Instant::now() + wait > give_up {
                return Err(Error::TryAgain(format!(
                    "{p:#} still hears from a leader; not campaigning"
                )));
            }
            tokio::time::sleep(wait).await;
        }
        for _ in 0..3 {
            if let Some(wait) = g.lease.campaign_wait(Instant::now(), term_wait) {
                tokio::time::sleep(wait).await;
                continue;
            }
            // Again: the waits above take a second or more, and the disk may have filled
            // meanwhile (found by the simulation: a hand-off's target whose disk filled
            // during the transfer took the leadership and refused every write).
            if let Some(why) = self.unfit_to_lead(&g) {
                return Err(Error::TryAgain(format!(
                    "{why}: it takes no leadership until then"
                )));
            }
            let _ = g.raft.trigger().elect().await;
            let won = g
                .raft
                .wait(Some(term_wait))
                .state(ServerState::Leader, "campaign")
                .await;
            if won.is_ok() {
                return Ok(());
            }
        }
        Err(Error::TryAgain(format!("campaign for {p:#} did not win")))
    }
}

impl Node {
    /// Hands leadership of `g`, which this node leads but cannot serve writes for (its disk
    /// takes no new data), to a reachable replica: the one holding the most of its log first,
    /// the next one after each attempt that did not move it (that target may be unfit to
    /// lead itself). Called every ping period from the election ticker; an attempt at most
    /// every [`HAND_OFF_EVERY`].
    pub(crate) fn hand_off(self: &Arc<Self>, g: &Arc<Group>) {
        if g.transferring.load(Ordering::SeqCst) {
            return;
        }
        let attempt = {
            let mut h = g.hand_off.lock().expect("hand-off");
            if h.0.is_some_and(|t| t.elapsed() < HAND_OFF_EVERY) {
                return;
            }
            h.0 = Some(Instant::now());
            h.1 += 1;
            h.1 - 1
        };
        let window = Duration::from_millis(self.cfg.replication.replica_timeout_ms);
        let matched = g
            .raft
            .metrics()
            .borrow()
            .replication
            .clone()
            .unwrap_or_default();
        let mut targets: Vec<u64> = g
            .placement
            .replicas
            .iter()
            .copied()
            .filter(|id| *id != self.id())
            .filter(|id| self.replicas_heard_within(&[*id], window) == 1)
            .collect();
        if targets.is_empty() {
            return;
        }
        // In-step clocks first (one out of step would not take it), then the most of the log.
        targets.sort_by_key(|id| {
            std::cmp::Reverse((
                self.clock.peer_claims_in_step(*id),
                matched.get(id).copied().flatten().map(|l| l.index),
            ))
        });
        let to = targets[attempt % targets.len()];
        let (node, p) = (self.clone(), g.id);
        tokio::spawn(async move {
            match node.transfer_leadership(p, to).await {
                Ok(()) => {
                    tracing::info!(group = %p, to, "leadership handed off: the disk is full")
                }
                Err(e) => tracing::debug!(group = %p, to, error = %e, "hand-off not done yet"),
            }
        });
    }
}

/// Hand-offs of a full disk's leaderships are tried at most this often per partition.
const HAND_OFF_EVERY: Duration = Duration::from_secs(2);

/// Counts elections and failovers of one group as its metrics change.
pub(crate) fn watch_leadership(node: Arc<Node>, g: Arc<Group>) {
    tokio::spawn(async move {
        let mut rx = g.raft.metrics();
        let (mut term, mut leader) = {
            let m = rx.borrow();
            (m.current_term, m.current_leader)
        };
        while rx.changed().await.is_ok() {
            let (t, l, running) = {
                let m = rx.borrow();
                (m.current_term, m.current_leader, m.running_state.clone())
            };
            // The Raft core stopped: at shutdown, or after a fatal error (storage failure, a
            // refused corrupt snapshot); openraft's own logs are off by default, so say it.
            if let Err(e) = running {
                match e {
                    openraft::error::Fatal::Stopped => {
                        tracing::info!(group = %g.id, "partition group stopped")
                    }
                    e => {
                        tracing::error!(group = %g.id, error = %e, "partition group stopped on a fatal error")
                    }
                }
                return;
            }
            if t != term {
                node.metrics.election(g.id);
                term = t;
            }
            if l != leader {
                if leader.is_some() && l.is_some() {
                    node.metrics.failover(g.id);
                }
                if let Some(l) = l {
                    tracing::info!(
                        group = %g.id,
                        leader = l,
                        term = t,
                        "leader known"
                    );
                }
                leader = l;
            }
        }
    });
}

/// Moves leadership back to this node for partitions it prefers to lead, once it has been
/// following a live leader closely for a few checks in a row.
pub(crate) fn spawn_rebalancer(node: Arc<Node>) {
    tokio::spawn(async move {
        let mut stable = std::collections::HashMap::<GroupId, u32>::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for g in &node.groups() {
                let p = g.id;
                let count = stable.entry(p).or_default();
                let wants = g.placement.preferred_leader == node.id()
                    && node.unfit_to_lead(g).is_none()
                    && g.leader().is_some_and(|l| l != node.id())
                    && node.staleness(g).is_some_and(|s| {
                        s < Duration::from_millis(node.cfg.replication.election_timeout_min_ms)
                    });
                *count = if wants { *count + 1 } else { 0 };
                if *count >= STABLE_CHECKS {
                    *count = 0;
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = node.promote(p, node.id()).await {
                            tracing::debug!(group = %p, error = %e, "preferred leader not restored yet");
                        }
                    });
                }
            }
        }
    });
}
