//! How a node serves its peers: Raft messages go to the partition's Raft core (and feed the
//! follower staleness measure); client requests forwarded by other nodes run here.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use replikv_types::{Error, ReadPreference};

use crate::messages::{
    ClientRequest, ClientResponse, Hello, LeaderMark, PeerRequest, PeerResponse, Pong,
};
use crate::node::Node;
use crate::transport::Handler;
use crate::write::ready;

impl Handler for Node {
    // Two phases on purpose: the outer future submits (the ordering point), the inner one
    // waits for the acknowledgement.
    #[allow(clippy::async_yields_async)]
    fn accept(
        self: Arc<Self>,
        from: u64,
        req: PeerRequest,
    ) -> BoxFuture<'static, BoxFuture<'static, PeerResponse>> {
        async move {
            match req {
                PeerRequest::Client(ClientRequest::Write { group, op, level }) => {
                    // Proposed here, in arrival order; only the wait is left to the future.
                    let pending = if self.group(group).is_some() {
                        self.propose_local(group, op, level).await
                    } else {
                        ready(Err(Error::NotLeader {
                            group,
                            leader: self.leader_of(group),
                        }))
                    };
                    async move { PeerResponse::Client(pending.await.map(ClientResponse::Written)) }
                        .boxed()
                }
                other => self.serve(from, other).boxed(),
            }
        }
        .boxed()
    }

    fn hello(&self, hello: &Hello) {
        self.endpoints.write().expect("endpoints").insert(
            hello.node_id,
            (hello.resp_addr.clone(), hello.http_addr.clone()),
        );
    }
}

impl Node {
    /// This node's position in each partition it leads, for a ping's answer.
    fn leader_marks(&self) -> Vec<LeaderMark> {
        self.groups()
            .iter()
            .filter_map(|g| {
                let m = g.raft.metrics();
                let m = m.borrow();
                (m.state == openraft::ServerState::Leader).then_some(())?;
                // openraft computes the age when it publishes its metrics, which it does at
                // least once per heartbeat: add a heartbeat so the age is never understated.
                let age = m.millis_since_quorum_ack? + self.cfg.replication.heartbeat_ms;
                Some(LeaderMark {
                    group: g.id,
                    last_offset: m.last_log_index.unwrap_or(0),
                    quorum_ack_ms: age,
                })
            })
            .collect()
    }

    /// A ping sent at `sent` came back from `from`: its wall clock goes to the clock check
    /// (`clock.rs`), and its leader marks are recorded for the partitions this node follows
    /// `from` in (`lag.rs` says why this bound holds).
    pub(crate) fn note_pong(&self, from: u64, sent: Instant, pong: &Pong) {
        self.clock
            .note_pong(from, sent, pong.echo_wall_ms, pong.wall_ms, pong.in_step);
        for mark in &pong.marks {
            let Some(g) = self.group(mark.group) else {
                continue;
            };
            if g.leader() != Some(from) {
                continue;
            }
            let as_of = sent
                .checked_sub(Duration::from_millis(mark.quorum_ack_ms))
                .unwrap_or(sent);
            g.lag.lock().expect("lag").record(as_of, mark.last_offset);
        }
    }

    async fn serve(self: Arc<Self>, _from: u64, req: PeerRequest) -> PeerResponse {
        match req {
            PeerRequest::AppendEntries(p, rpc) => {
                let Some(g) = self.group(p) else {
                    return PeerResponse::NoSuchGroup(p);
                };
                // New entries are new data: not into the disk's reserve, which is for votes,
                // checkpoints and purges. The leader gets no acknowledgement and retries them
                // as if this node were away. This node still hears the leader as from a Raft
                // heartbeat, which is this message without its entries: so it knows the
                // leader and its term, and commits (up to `prev_log_id`, which the leader
                // vouched for, openraft's `commit_entries`) what it already holds.
                if !rpc.entries.is_empty() {
                    if let Some(why) = self.space.refusal() {
                        let heartbeat = openraft::raft::AppendEntriesRequest {
                            vote: rpc.vote,
                            prev_log_id: rpc.prev_log_id,
                            leader_commit: rpc.leader_commit,
                            entries: Vec::new(),
                        };
                        let _ = g.raft.append_entries(heartbeat).await;
                        g.lease.leader_heard();
                        return PeerResponse::Unavailable(why);
                    }
                }
                let entries = rpc.entries.len();
                let started = Instant::now();
                let r = g.raft.append_entries(rpc).await;
                // Even when refused: noting contact too often only delays a campaign.
                g.lease.leader_heard();
                self.metrics
                    .synced(p, entries, started.elapsed(), r.is_ok());
                PeerResponse::AppendEntries(r)
            }
            PeerRequest::Vote(p, rpc) => match self.group(p) {
                Some(g) => {
                    // Not while this replica's read lease, or a restart's, may still hold
                    // (`lease.rs`): answering late is answering no sooner than allowed.
                    // Again after each wait: a round may have renewed the lease meanwhile.
                    while let Some(wait) = g.lease.vote_wait(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                    // A replica recovering from a damaged log votes as if it still held what
                    // it lost (`replikv-raft`'s `damage.rs`): a candidate short of that is
                    // refused here, before openraft compares it with the shorter real log.
                    // openraft reads a refusal's last log id only to delay the next campaign
                    // of a candidate shown a longer log than its own, so that the longer log's
                    // holder campaigns first. This replica does not campaign, so no one should
                    // wait for it: the refusal shows no log longer than the candidate's. Showing
                    // the high water, or a real log longer than both intact replicas', made
                    // every candidate wait alike, and two intact replicas whose timers ran
                    // together split their votes for good (simulation stage 2, seeds 46, 184).
                    if !g.recovery.may_vote_for(rpc.last_log_id.as_ref()) {
                        let vote = g.raft.metrics().borrow().vote;
                        tracing::info!(
                            group = %p,
                            candidate = rpc.vote.leader_id().voted_for(),
                            candidate_last = ?rpc.last_log_id,
                            high_water = ?g.recovery.high_water(),
                            "vote refused: recovering from a damaged log"
                        );
                        let last = g.raft.data_metrics().borrow().last_log;
                        return PeerResponse::Vote(Ok(openraft::raft::VoteResponse {
                            vote,
                            vote_granted: false,
                            last_log_id: last.min(rpc.last_log_id),
                        }));
                    }
                    PeerResponse::Vote(g.raft.vote(rpc).await)
                }
                None => PeerResponse::NoSuchGroup(p),
            },
            PeerRequest::InstallSnapshot(p, rpc) => match self.group(p) {
                Some(_) if self.space.refusing() => {
                    PeerResponse::Unavailable(self.space.refusal().unwrap_or_default())
                }
                Some(g) => {
                    let done = rpc.done;
                    let r = g.raft.install_snapshot(rpc).await;
                    g.lease.leader_heard();
                    if done && r.is_ok() {
                        self.metrics.snapshot_received(p);
                    }
                    PeerResponse::InstallSnapshot(r)
                }
                None => PeerResponse::NoSuchGroup(p),
            },
            PeerRequest::Client(req) => PeerResponse::Client(self.serve_client(req).await),
            PeerRequest::Ping { wall_ms } => PeerResponse::Pong(Pong {
                marks: self.leader_marks(),
                echo_wall_ms: wall_ms,
                wall_ms: self.clock.wall_ms(),
                in_step: self.clock.in_step(),
            }),
        }
    }

    pub(crate) async fn serve_client(
        self: &Arc<Self>,
        req: ClientRequest,
    ) -> Result<ClientResponse, Error> {
        match req {
            ClientRequest::Write { group, op, level } => {
                let pending = self.propose_local(group, op, level).await;
                pending.await.map(ClientResponse::Written)
            }
            ClientRequest::Get {
                group,
                key,
                read,
                min_offset,
            } => {
                let v = if read == ReadPreference::Primary {
                    self.linearizable_get(group, &key, min_offset).await?
                } else {
                    self.get(key, read, min_offset).await?
                };
                Ok(ClientResponse::Value(v))
            }
            ClientRequest::Scan {
                group,
                start,
                count,
                pattern,
            } => {
                let (keys, next) = self.local_scan(group, start, count, pattern).await?;
                Ok(ClientResponse::Keys { keys, next })
            }
            ClientRequest::WaitReplicas {
                group,
                offset,
                wanted,
                timeout_ms,
            } => {
                let Some(g) = self.group(group) else {
                    return Err(Error::NotLeader {
                        group,
                        leader: self.leader_of(group),
                    });
                };
                if !g.is_leader() {
                    return Err(Error::NotLeader {
                        group,
                        leader: g.leader(),
                    });
                }
                Ok(ClientResponse::Count(
                    self.count_replicas(&g, offset, wanted, timeout_ms).await,
                ))
            }
            ClientRequest::Transfer { group, to } => {
                self.transfer_leadership(group, to).await?;
                Ok(ClientResponse::Done)
            }
            ClientRequest::HoldElections { group, for_ms } => {
                self.hold_elections(group, Duration::from_millis(for_ms));
                Ok(ClientResponse::Done)
            }
            ClientRequest::Campaign { group, after_ms } => {
                self.campaign(group, Duration::from_millis(after_ms))
                    .await?;
                Ok(ClientResponse::Done)
            }
            ClientRequest::Status => Ok(ClientResponse::Status(Box::new(self.status()))),
            ClientRequest::Meta(change) => self
                .change_topology_here(&change)
                .await
                .map(ClientResponse::Count),
        }
    }
}
