//! The write path: route to the partition's leader, propose, and wait for the requested
//! consistency level (DESIGN.md section 3).
//!
//! | level        | acknowledged when                                                    |
//! |--------------|----------------------------------------------------------------------|
//! | eventual     | the leader's log store took the entry (blind writes); else applied    |
//! | at_least(n)  | n replicas, leader included, report the entry durably matched        |
//! | quorum       | openraft committed and applied it on the leader                      |
//! | all          | committed, and every voter reports it durably matched                |
//!
//! A write whose reply depends on prior state (INCR, SET NX, DEL...) is always applied
//! before it is acknowledged, whatever the level: its reply needs the applied result.
//!
//! Before proposing, the leader fails fast when the level cannot be met: no leader, no
//! quorum heard from within the election timeout, or fewer healthy replicas than asked.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use openraft::ServerState;
use replikv_types::{Commit, Consistency, Error, GroupId, KvOp, Reply};

use crate::messages::{ClientRequest, ClientResponse, PeerRequest, PeerResponse, WriteOutcome};
use crate::node::{Group, Node};
use crate::propose::Early;

/// How many times a write follows "not the leader" answers before giving up.
const MAX_REDIRECTS: usize = 8;
/// Pause before routing again a write that met a leadership transfer.
const TRY_AGAIN_PAUSE: Duration = Duration::from_millis(50);

pub type WriteFuture = BoxFuture<'static, Result<WriteOutcome, Error>>;

impl Node {
    /// Submits a write to the partition of its keys. The write is queued toward the leader
    /// before this returns (so a connection's writes keep their order); the returned future
    /// resolves when the level is met.
    pub async fn submit_write(self: &Arc<Self>, op: KvOp, level: Consistency) -> WriteFuture {
        let Some(first) = op.keys().first().map(|k| k.to_vec()) else {
            return ready(Err(Error::InvalidArgument("a write needs a key".into())));
        };
        let p = self.group_of(&first);
        if let Err(e) = self.check_level(p, level) {
            return ready(Err(e));
        }
        let deadline = Instant::now() + self.write_timeout();
        self.route_write(p, op, level, deadline, 0).await
    }

    fn check_level(&self, p: GroupId, level: Consistency) -> Result<(), Error> {
        let replicas = self.with_placement(p, |pl| pl.replicas.len()).unwrap_or(1);
        match level {
            Consistency::AtLeast(n) if n as usize > replicas => Err(Error::InvalidArgument(
                format!("at_least:{n} asks for more copies than the {replicas} replicas of {p:#}"),
            )),
            _ => Ok(()),
        }
    }

    // Two phases on purpose: the outer future queues the write toward the leader (the
    // ordering point), the inner one waits for its acknowledgement.
    #[allow(clippy::async_yields_async)]
    fn route_write(
        self: &Arc<Self>,
        p: GroupId,
        op: KvOp,
        level: Consistency,
        deadline: Instant,
        redirects: usize,
    ) -> BoxFuture<'_, WriteFuture> {
        async move {
            let leader = match self.leader_of(p) {
                Some(l) => l,
                None => match self.await_leader(p, None, deadline).await {
                    Ok(l) => l,
                    Err(e) => return ready(Err(e)),
                },
            };
            let pending = if leader == self.id() {
                self.propose_local(p, op.clone(), level).await
            } else {
                self.forward_write(leader, p, op.clone(), level, deadline)
            };
            let node = self.clone();
            async move {
                match pending.await {
                    Err(Error::NotLeader { leader: hint, .. })
                        if redirects < MAX_REDIRECTS && Instant::now() < deadline =>
                    {
                        tracing::debug!(
                            group = %p,
                            asked = leader,
                            ?hint,
                            redirects,
                            "write redirected"
                        );
                        match hint {
                            Some(l) if l != leader => node.note_leader(p, l),
                            // The node we asked no longer leads and knows no successor yet.
                            _ => {
                                node.await_leader(p, Some(leader), deadline).await?;
                            }
                        }
                        node.route_write(p, op, level, deadline, redirects + 1)
                            .await
                            .await
                    }
                    // Leadership is moving (a transfer): the write was not proposed. Wait a
                    // little and route again, rather than hand the client a retry.
                    // The leader is unreachable and so is a majority: nothing can succeed
                    // from this side of the network, so say so at once.
                    Err(Error::TryAgain(m)) if !node.reaches_majority(p) => Err(Error::NoQuorum {
                        committed: Commit::No,
                        detail: format!(
                            "this node cannot reach a majority of {p:#}'s replicas ({m})"
                        ),
                    }),
                    Err(Error::TryAgain(_)) if Instant::now() + TRY_AGAIN_PAUSE < deadline => {
                        node.try_another_replica(p, leader);
                        tokio::time::sleep(TRY_AGAIN_PAUSE).await;
                        node.route_write(p, op, level, deadline, redirects)
                            .await
                            .await
                    }
                    other => other,
                }
            }
            .boxed()
        }
        .boxed()
    }

    /// Waits (bounded) until the partition has a leader other than `not`; fails fast with
    /// CLUSTERDOWN when none appears within about one failover.
    pub(crate) async fn await_leader(
        &self,
        p: GroupId,
        not: Option<u64>,
        deadline: Instant,
    ) -> Result<u64, Error> {
        // A dead leader's lease runs out, then one election: about two maximum timeouts.
        let election = Duration::from_millis(self.cfg.replication.election_timeout_max_ms * 3);
        let limit = deadline.min(Instant::now() + election);
        if let Some(g) = self.group(p) {
            let wait = limit.saturating_duration_since(Instant::now());
            // `not` said it does not lead: accept a leader of a later term (it may win
            // again) or another node.
            let term = g.raft.metrics().borrow().current_term;
            if let Ok(m) = g
                .raft
                .wait(Some(wait))
                .metrics(
                    move |m| {
                        m.current_leader.is_some()
                            && (not.is_none() || m.current_leader != not || m.current_term > term)
                    },
                    "leader elected",
                )
                .await
            {
                return Ok(m.current_leader.expect("waited for a leader"));
            }
        } else {
            // Not hosted here: ask another replica next; its answer names the new leader.
            if let Some(bad) = not {
                self.try_another_replica(p, bad);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Some(l) = self.leader_of(p) {
                return Ok(l);
            }
        }
        tracing::debug!(group = %p, ?not, "no leader within the failover wait");
        Err(Error::ClusterDown {
            group: p,
            detail: "no leader elected (election under way, or a majority of its replicas is down)"
                .into(),
        })
    }

    fn forward_write(
        &self,
        leader: u64,
        p: GroupId,
        op: KvOp,
        level: Consistency,
        deadline: Instant,
    ) -> WriteFuture {
        let Some(peer) = self.transport.peer(leader) else {
            return ready(Err(Error::NotLeader {
                group: p,
                leader: None,
            }));
        };
        let req = PeerRequest::Client(ClientRequest::Write {
            group: p,
            op,
            level,
        });
        let timeout =
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(200);
        let answer = peer.start(&req, timeout);
        let moved = self.leader_moved(p, leader);
        async move {
            // A leader that lost its partition (cut off, frozen) may hold the write for
            // the whole timeout; once another node leads in a later term, say at once that
            // the outcome is unknown, so the client can go on.
            let answer = tokio::select! {
                a = answer => a,
                new = moved => {
                    return Err(Error::Timeout {
                        committed: Commit::Unknown,
                        detail: format!(
                            "node {new} now leads {p:#}; the write sent to node {leader} may still be applied"
                        ),
                    })
                }
            };
            match answer {
                Ok(PeerResponse::Client(Ok(ClientResponse::Written(w)))) => Ok(w),
                Ok(PeerResponse::Client(Err(e))) => Err(e),
                Ok(PeerResponse::NoSuchGroup(_)) => Err(Error::NotLeader {
                    group: p,
                    leader: None,
                }),
                Ok(other) => Err(Error::Internal(format!(
                    "unexpected answer to a write: {other:?}"
                ))),
                // Never delivered: route again once the partition has a reachable leader.
                Err(crate::transport::TransportError::NotSent(m)) => Err(Error::TryAgain(format!(
                    "leader node {leader} of {p:#} is unreachable: {m}"
                ))),
                // The leader may have taken the write before the link failed.
                Err(e) => Err(Error::Timeout {
                    committed: Commit::Unknown,
                    detail: format!("lost the answer from leader node {leader}: {e}"),
                }),
            }
        }
        .boxed()
    }

    /// Proposes on this node, which leads `p`. Returns once the entry is queued in Raft.
    pub(crate) async fn propose_local(
        self: &Arc<Self>,
        p: GroupId,
        op: KvOp,
        level: Consistency,
    ) -> WriteFuture {
        let Some(group) = self.group(p) else {
            return ready(Err(Error::NotLeader {
                group: p,
                leader: self.leader_of(p),
            }));
        };
        let gate = group.propose_gate.read().await;
        if let Err(e) = self.can_accept(&group, level) {
            self.metrics.write_failed(p);
            return ready(Err(e));
        }
        let voters = group.placement.replicas.len();
        let majority = voters / 2 + 1;
        let early = op.is_blind()
            && match level {
                Consistency::Eventual => true,
                Consistency::AtLeast(n) => (n as usize) < majority,
                // A known bug, injected on purpose (`debug.ack_before_commit`).
                Consistency::Quorum => self.cfg.ack_before_commit,
                Consistency::All => false,
            };
        let want = match (early, level) {
            (false, _) => Early::No,
            (true, Consistency::Eventual) => Early::Written,
            (true, _) => Early::Durable,
        };
        let ticket = group.proposer.submit(op, want);
        drop(gate);
        let timeout = self.write_timeout();
        let node = self.clone();
        async move {
            let started = Instant::now();
            let lost = || Error::Timeout {
                committed: Commit::Unknown,
                detail: format!("{p:#} lost leadership before answering"),
            };
            let applied = ticket.applied;
            let (offset, reply) = match ticket.early {
                // Acknowledged when the leader's log takes it (or has it on disk), or, should
                // that signal be missed, when it is applied (later, never sooner).
                Some(rx) => {
                    let first = tokio::time::timeout(timeout, async {
                        tokio::select! {
                            Ok(offset) = rx => Ok(offset),
                            r = applied => r.map_err(|_| lost())?.map(|(offset, _)| offset),
                        }
                    })
                    .await;
                    match first {
                        Ok(Ok(offset)) => (offset, Reply::Ok),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            return Err(Error::Timeout {
                                committed: Commit::Unknown,
                                detail: format!(
                                    "the leader did not append the write within {} ms",
                                    timeout.as_millis()
                                ),
                            })
                        }
                    }
                }
                None => match tokio::time::timeout(timeout, applied).await {
                    Ok(Ok(r)) => r?,
                    Ok(Err(_)) => return Err(lost()),
                    Err(_) => {
                        return Err(Error::Timeout {
                            committed: Commit::Unknown,
                            detail: format!("not committed within {} ms", timeout.as_millis()),
                        })
                    }
                },
            };
            let copies = match level {
                Consistency::All => voters,
                Consistency::AtLeast(n) => n as usize,
                _ => 1,
            };
            if copies > 1 {
                let remaining = timeout.saturating_sub(started.elapsed());
                node.await_copies(&group, offset, copies, remaining, !early)
                    .await?;
            }
            node.metrics.write_ok(p);
            Ok(WriteOutcome {
                reply,
                group: p,
                offset,
            })
        }
        .boxed()
    }

    /// Fails fast when this leader cannot meet `level` now.
    fn can_accept(&self, group: &Group, level: Consistency) -> Result<(), Error> {
        let p = group.id;
        let (state, leader) = {
            let m = group.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_leader)
        };
        if state != ServerState::Leader {
            return Err(Error::NotLeader { group: p, leader });
        }
        if group.transferring.load(Ordering::Relaxed) {
            return Err(Error::TryAgain(format!(
                "leadership of {p:#} is moving; retry"
            )));
        }
        // A write this leader cannot make durable fails now, having changed nothing.
        if let Some(why) = self.space.refusal() {
            return Err(Error::DiskFull(format!(
                "node {} leads {p:#}, and {why}",
                self.id()
            )));
        }
        // Reachability comes from the peers' ping answers, not from openraft's last quorum
        // acknowledgement: under a heavy write load acknowledgements queue behind fsyncs and
        // would make a healthy leader look cut off.
        if !self.reaches_majority(p) {
            return Err(Error::NoQuorum {
                committed: Commit::No,
                detail: format!(
                    "the leader of {p:#} has not heard from a majority of its replicas within {} ms",
                    self.cfg.replication.election_timeout_max_ms
                ),
            });
        }
        let wanted = match level {
            Consistency::All => group.placement.replicas.len(),
            Consistency::AtLeast(n) => n as usize,
            _ => return Ok(()),
        };
        let healthy = self.healthy_replicas(group);
        if healthy < wanted {
            return Err(Error::NoQuorum {
                committed: Commit::No,
                detail: format!(
                    "{level} needs {wanted} replicas of {p:#} but only {healthy} are reachable"
                ),
            });
        }
        Ok(())
    }

    /// Replicas of `group` (this node included) heard from within `replica_timeout_ms`.
    pub(crate) fn healthy_replicas(&self, group: &Group) -> usize {
        let window = Duration::from_millis(self.cfg.replication.replica_timeout_ms);
        self.replicas_heard_within(&group.placement.replicas, window)
    }

    /// Waits until `copies` replicas (leader included) durably hold `offset`.
    async fn await_copies(
        &self,
        group: &Group,
        offset: u64,
        copies: usize,
        timeout: Duration,
        committed: bool,
    ) -> Result<(), Error> {
        let count = move |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
            m.replication
                .as_ref()
                .map(|r| {
                    r.values()
                        .filter(|l| l.is_some_and(|l| l.index >= offset))
                        .count()
                })
                .unwrap_or(0)
        };
        let waited = group
            .raft
            .wait(Some(timeout))
            .metrics(move |m| count(m) >= copies, "copies")
            .await;
        match waited {
            Ok(_) => Ok(()),
            Err(_) => {
                let have = count(&group.raft.metrics().borrow());
                Err(Error::Timeout {
                    committed: if committed { Commit::Yes } else { Commit::Unknown },
                    detail: format!(
                        "only {have} of the {copies} copies asked for hold offset {offset} of {:#} after {} ms",
                        group.id,
                        timeout.as_millis()
                    ),
                })
            }
        }
    }

    /// `WAIT`: replicas other than the leader that hold `offset`, waiting for `wanted`.
    pub(crate) async fn count_replicas(
        &self,
        group: &Group,
        offset: u64,
        wanted: usize,
        timeout_ms: u64,
    ) -> u64 {
        let me = self.id();
        let count = move |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
            m.replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .filter(|(id, l)| **id != me && l.is_some_and(|l| l.index >= offset))
                        .count()
                })
                .unwrap_or(0)
        };
        let timeout = if timeout_ms == 0 {
            None
        } else {
            Some(Duration::from_millis(timeout_ms))
        };
        let _ = group
            .raft
            .wait(timeout)
            .metrics(move |m| count(m) >= wanted, "wait replicas")
            .await;
        count(&group.raft.metrics().borrow()) as u64
    }
}

pub(crate) fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    futures::future::ready(v).boxed()
}

impl Node {
    /// `WAIT` for one partition: replicas other than the leader holding `offset`, waiting up
    /// to `timeout_ms` (0 = no limit, as in Redis) for `wanted` of them.
    pub async fn wait_replicas(
        self: &Arc<Self>,
        p: GroupId,
        offset: u64,
        wanted: usize,
        timeout_ms: u64,
    ) -> Result<u64, Error> {
        let limit = if timeout_ms == 0 {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            Duration::from_millis(timeout_ms)
        };
        let deadline = Instant::now() + limit;
        let req = ClientRequest::WaitReplicas {
            group: p,
            offset,
            wanted,
            timeout_ms,
        };
        match self.at_leader(p, req, deadline).await? {
            ClientResponse::Count(n) => Ok(n),
            other => Err(Error::Internal(format!(
                "unexpected answer to WAIT: {other:?}"
            ))),
        }
    }
}
