//! The read path (DESIGN.md section 3, reads).
//!
//! - `primary`: served by the leader under its read lease (`lease.rs`), or after openraft's
//!   read index (`ensure_linearizable`: the leader confirms with a quorum that it still leads,
//!   then waits until it has applied everything committed before the read began) when it
//!   holds no lease or leases are off (`replication.lease_reads: false`).
//! - `secondary`, `nearest`, `any`: served by a follower whose measured staleness is within
//!   `max_lag_ms` (see `lag.rs`) and which has applied the reader's last write (session
//!   token); otherwise, and always on the leader, the read goes through the read index.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use replikv_types::{Commit, Error, GroupId, Offset, ReadPreference};

use crate::messages::{ClientRequest, ClientResponse, PeerRequest, PeerResponse, ValueWithTtl};
use crate::node::{Group, Node};
use crate::read_rounds::RoundSettings;
use crate::transport::TransportError;

/// How long a replica waits to apply a reader's own last write before sending the read on.
const SESSION_WAIT: Duration = Duration::from_millis(500);
/// Pause before asking again when the leader could not be reached.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

impl Node {
    /// Reads `key` with the given preference; `min_offset` is the reader's last write offset
    /// in the key's partition (read-your-writes).
    pub async fn get(
        self: &Arc<Self>,
        key: Bytes,
        read: ReadPreference,
        min_offset: Option<Offset>,
    ) -> Result<Option<ValueWithTtl>, Error> {
        let p = self.group_of(&key);
        if read != ReadPreference::Primary {
            if let Some(g) = self.group(p) {
                // A leader serves every read through the read index: its own state machine
                // may trail what it has committed (just elected, or restarted), and its quorum
                // acknowledgement says nothing about that.
                // Not with a clock out of step: it decides what has expired (`clock.rs`).
                if !g.is_leader() && self.clock.in_step() && self.fresh_enough(&g, min_offset).await
                {
                    tracing::debug!(
                        group = %p,
                        applied = g.applied(),
                        ?min_offset,
                        staleness = ?self.staleness(&g),
                        "follower read served here"
                    );
                    self.metrics.read_served(p, "replica");
                    return self.local_value(&g, &key);
                }
            }
        }
        let deadline = Instant::now() + self.write_timeout();
        let req = ClientRequest::Get {
            group: p,
            key,
            read: ReadPreference::Primary,
            min_offset,
        };
        match self.at_leader(p, req, deadline).await? {
            ClientResponse::Value(v) => Ok(v),
            other => Err(Error::Internal(format!(
                "unexpected answer to a read: {other:?}"
            ))),
        }
    }

    /// Runs `req` at the leader of `p`: here when this node leads it, otherwise forwarded.
    /// Follows "not the leader" answers, and waits out an election or a leader that cannot
    /// be reached, until `deadline`.
    pub(crate) async fn at_leader(
        self: &Arc<Self>,
        p: GroupId,
        req: ClientRequest,
        deadline: Instant,
    ) -> Result<ClientResponse, Error> {
        let mut redirects = 0;
        loop {
            let leader = match self.leader_of(p) {
                Some(l) => l,
                None => self.await_leader(p, None, deadline).await?,
            };
            let result = if leader == self.id() {
                Box::pin(self.serve_client(req.clone())).await
            } else if req.is_read() {
                // A read is safe to send again: stop waiting for a leader that has been
                // replaced, and ask the new one.
                tokio::select! {
                    r = self.ask(leader, req.clone(), deadline) => r,
                    new = self.leader_moved(p, leader) => Err(Error::NotLeader {
                        group: p,
                        leader: Some(new),
                    }),
                }
            } else {
                self.ask(leader, req.clone(), deadline).await
            };
            match result {
                Err(Error::NotLeader { leader: hint, .. })
                    if redirects < 8 && Instant::now() < deadline =>
                {
                    redirects += 1;
                    match hint {
                        Some(l) if l != leader => self.note_leader(p, l),
                        _ => {
                            self.await_leader(p, Some(leader), deadline).await?;
                        }
                    }
                }
                Err(Error::TryAgain(m)) if !self.reaches_majority(p) => {
                    return Err(Error::NoQuorum {
                        committed: Commit::No,
                        detail: format!(
                            "this node cannot reach a majority of {p:#}'s replicas ({m})"
                        ),
                    })
                }
                Err(Error::TryAgain(_)) if Instant::now() + RETRY_PAUSE < deadline => {
                    self.try_another_replica(p, leader);
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// Whether this replica may serve a stale read now.
    async fn fresh_enough(&self, g: &Group, min_offset: Option<Offset>) -> bool {
        if let Some(want) = min_offset {
            if g.applied() < want {
                let waited = g
                    .raft
                    .wait(Some(SESSION_WAIT))
                    .applied_index_at_least(Some(want), "session token")
                    .await;
                if waited.is_err() {
                    return false;
                }
            }
        }
        self.follower_staleness(g)
            .is_some_and(|s| s <= Duration::from_millis(self.cfg.replication.max_lag_ms))
    }

    /// A follower's staleness bound (`lag.rs`); `None` on a leader, which must not serve
    /// from its state machine without a read index, even if it became leader a moment ago.
    fn follower_staleness(&self, g: &Group) -> Option<Duration> {
        if g.raft.metrics().borrow().state == openraft::ServerState::Leader {
            return None;
        }
        g.lag.lock().expect("lag").staleness(g.applied())
    }

    /// How far behind the leader this replica's applied state may be.
    pub fn staleness(&self, g: &Group) -> Option<Duration> {
        let (is_leader, quorum_age) = {
            let m = g.raft.metrics();
            let m = m.borrow();
            (
                m.state == openraft::ServerState::Leader,
                m.millis_since_quorum_ack,
            )
        };
        if is_leader {
            // A leader is current as of its last quorum acknowledgement (plus one heartbeat:
            // openraft computes the age only when it publishes metrics). A leader that has
            // none yet is not known to be current at all.
            let hb = self.cfg.replication.heartbeat_ms;
            return quorum_age.map(|age| Duration::from_millis(age + hb));
        }
        g.lag.lock().expect("lag").staleness(g.applied())
    }

    /// `key` as this replica holds it, judged live and its TTL counted by this node's clock
    /// (the replica that serves a read decides both, whoever answers the client).
    pub(crate) fn local_value(&self, g: &Group, key: &[u8]) -> Result<Option<ValueWithTtl>, Error> {
        let now = self.now_ms();
        let v = g.view.get(key, now).map_err(Error::Internal)?;
        Ok(v.map(|v| ValueWithTtl::served_at(v, now)))
    }

    /// Confirms leadership with a quorum and waits for the read index to be applied.
    pub(crate) async fn read_index(
        &self,
        p: GroupId,
        min_offset: Option<Offset>,
    ) -> Result<Arc<Group>, Error> {
        let Some(g) = self.group(p) else {
            return Err(Error::NotLeader {
                group: p,
                leader: self.leader_of(p),
            });
        };
        if self.cfg.skip_read_index {
            // A known bug, injected on purpose (`debug.skip_read_index`): serve whatever this
            // node has applied, as a deposed leader would. Only the checker tests set it.
            return if g.is_leader() {
                Ok(g)
            } else {
                Err(Error::NotLeader {
                    group: p,
                    leader: g.leader(),
                })
            };
        }
        if !self.under_lease(&g) {
            // While leadership moves, a round's heartbeats would keep the target from
            // campaigning (`lease.rs`): the read is sent again, to whoever leads next.
            if g.transferring.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::TryAgain(format!(
                    "leadership of {p:#} is moving; retry"
                )));
            }
            g.read_rounds.confirm(&g, self.round_settings()).await?;
        }
        if let Some(want) = min_offset {
            let _ = g
                .raft
                .wait(Some(self.write_timeout()))
                .applied_index_at_least(Some(want), "session token")
                .await;
        }
        Ok(g)
    }

    /// Whether this leader may serve a read now without a round: it holds a lease for its
    /// current leadership and has applied that lease's read index. Renews a lease that is
    /// half spent, in the background.
    fn under_lease(&self, g: &Arc<Group>) -> bool {
        let Some(lease) = self.read_lease() else {
            return false;
        };
        // One look at the metrics per read: role, leadership and applied index together.
        let (state, vote, applied) = {
            let m = g.raft.metrics();
            let m = m.borrow();
            (m.state, m.vote, m.last_applied.map_or(0, |l| l.index))
        };
        if state != openraft::ServerState::Leader {
            return false;
        }
        match g.lease.valid(&vote, Instant::now()) {
            Some(v) if applied >= v.floor => {
                // Not during a transfer: a round's heartbeats would renew the followers'
                // leases too, and keep them refusing the target's votes.
                let transferring = g.transferring.load(std::sync::atomic::Ordering::Relaxed);
                if v.remaining < lease / 2 && !transferring {
                    g.read_rounds.renew(g, self.round_settings());
                }
                true
            }
            _ => false,
        }
    }

    /// The lease a successful read-index round grants, `None` when leases are off.
    fn read_lease(&self) -> Option<Duration> {
        let r = &self.cfg.replication;
        r.lease_reads.then(|| {
            Duration::from_millis(r.election_timeout_max_ms.saturating_sub(r.lease_margin_ms))
        })
    }

    fn round_settings(&self) -> RoundSettings {
        RoundSettings {
            metrics: self.metrics.clone(),
            timeout: self.write_timeout(),
            lease: self.read_lease(),
        }
    }

    pub(crate) async fn linearizable_get(
        &self,
        p: GroupId,
        key: &[u8],
        min_offset: Option<Offset>,
    ) -> Result<Option<ValueWithTtl>, Error> {
        let g = self.read_index(p, min_offset).await?;
        tracing::debug!(
            group = %p,
            applied = g.applied(),
            ?min_offset,
            "primary read served here"
        );
        self.metrics.read_served(p, "leader");
        self.local_value(&g, key)
    }

    /// Keys of one partition from `start`, read at the leader (linearizable).
    pub async fn scan_partition(
        self: &Arc<Self>,
        p: GroupId,
        start: Bytes,
        count: usize,
        pattern: Option<Bytes>,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), Error> {
        let deadline = Instant::now() + self.write_timeout();
        let req = ClientRequest::Scan {
            group: p,
            start,
            count,
            pattern,
        };
        match self.at_leader(p, req, deadline).await? {
            ClientResponse::Keys { keys, next } => Ok((keys, next)),
            other => Err(Error::Internal(format!(
                "unexpected answer to a scan: {other:?}"
            ))),
        }
    }

    /// A scan of this node's replica of `p`, after a read index (this node must lead `p`).
    pub(crate) async fn local_scan(
        &self,
        p: GroupId,
        start: Bytes,
        count: usize,
        pattern: Option<Bytes>,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), Error> {
        let g = self.read_index(p, None).await?;
        let keep = |k: &[u8]| {
            pattern
                .as_ref()
                .is_none_or(|pat| replikv_types::glob_match(pat, k))
        };
        let (keys, next) = g
            .view
            .scan(&start, count, self.now_ms(), keep)
            .map_err(Error::Internal)?;
        Ok((keys, next.map(Bytes::from)))
    }

    /// Sends a client request to `node` and returns its answer.
    pub(crate) async fn ask(
        &self,
        node: u64,
        req: ClientRequest,
        deadline: Instant,
    ) -> Result<ClientResponse, Error> {
        let Some(peer) = self.transport.peer(node) else {
            return Err(Error::Internal(format!("node {node} is not a known peer")));
        };
        let timeout =
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(200);
        match peer.request(&PeerRequest::Client(req), timeout).await {
            Ok(PeerResponse::Client(r)) => r,
            Ok(PeerResponse::NoSuchGroup(p)) => Err(Error::NotLeader {
                group: p,
                leader: None,
            }),
            Ok(other) => Err(Error::Internal(format!("unexpected peer answer {other:?}"))),
            // Never delivered: safe to retry once the partition has a reachable leader.
            Err(TransportError::NotSent(m)) => {
                Err(Error::TryAgain(format!("node {node} is unreachable: {m}")))
            }
            Err(e) => Err(Error::NoQuorum {
                committed: Commit::No,
                detail: format!("node {node} did not answer: {e}"),
            }),
        }
    }
}
