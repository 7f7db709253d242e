//! SIMULATION STAND-IN for replikv's peer transport: an in-process `RaftNetworkFactory` (the
//! seam of docs/design/simulation.md stage 1) that hands each RPC to the target node's current
//! `Raft` handle after a seeded delay, and drops requests or responses, refuses cut links and
//! crashed nodes. Requests are not serialized (replikv's frames and CRCs are not exercised).
//!
//! One rule of the real node's peer handler is applied here, because stage 1 has no
//! `replikv_cluster::Node` and votes go straight to openraft: a replica recovering from a
//! damaged log refuses a candidate whose last log id does not reach its high water
//! (`Recovery::may_vote_for`, as `replikv-cluster`'s `handler.rs` does before openraft sees
//! the request).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use replikv_raft::{Raft, Recovery, TypeConfig};

#[derive(Debug)]
struct SimNetErr(&'static str);
impl std::fmt::Display for SimNetErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for SimNetErr {}

/// A node that is up, as its peers reach it: its `Raft`, and the recovery its vote rule asks.
#[derive(Clone)]
pub struct Peer {
    pub raft: Raft,
    pub recovery: Recovery,
}

pub struct NetState {
    pub rng: ChaCha8Rng,
    /// Nodes that are up, by id.
    pub rafts: BTreeMap<u64, Peer>,
    /// Directed links `(from, to)` that are cut.
    pub cut: BTreeSet<(u64, u64)>,
    /// Probability that a request, or its response, is lost.
    pub loss: f64,
    pub max_delay_ms: u64,
    pub sent: u64,
    pub lost: u64,
    /// RPCs attempted, by kind: append-entries, vote, install-snapshot chunk.
    pub kinds: [u64; 3],
    /// Self-test of the determinism check: draw delays from OS entropy.
    pub os_entropy: bool,
    /// Votes refused because the voter was recovering from a damaged log and the candidate
    /// fell short of its high water.
    pub votes_refused_recovering: u64,
}

pub type Net = Arc<Mutex<NetState>>;

enum Plan {
    Unreachable,
    Deliver {
        there: Duration,
        back: Duration,
        lose_request: bool,
        lose_response: bool,
    },
}

impl NetState {
    fn plan(&mut self, from: u64, to: u64) -> Plan {
        if self.cut.contains(&(from, to)) || !self.rafts.contains_key(&to) {
            return Plan::Unreachable;
        }
        self.sent += 1;
        let max = self.max_delay_ms.max(1);
        let there = if self.os_entropy {
            Duration::from_millis(rand::rng().random_range(0..=max))
        } else {
            Duration::from_millis(self.rng.random_range(0..=max))
        };
        let back = Duration::from_millis(self.rng.random_range(0..=max));
        let lose_request = self.rng.random_bool(self.loss);
        let lose_response = self.rng.random_bool(self.loss);
        if lose_request || lose_response {
            self.lost += 1;
        }
        Plan::Deliver {
            there,
            back,
            lose_request,
            lose_response,
        }
    }

    fn target(&self, from: u64, to: u64) -> Option<Peer> {
        if self.cut.contains(&(from, to)) {
            return None;
        }
        self.rafts.get(&to).cloned()
    }
}

#[derive(Clone)]
pub struct SimNetwork {
    pub net: Net,
    pub from: u64,
    /// The sending incarnation (see `store::Alive`): a crashed node sends nothing more.
    pub alive: crate::store::Alive,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimConn;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimConn {
        SimConn {
            net: self.net.clone(),
            from: self.from,
            to: target,
            alive: self.alive.clone(),
        }
    }
}

pub struct SimConn {
    net: Net,
    from: u64,
    to: u64,
    alive: crate::store::Alive,
}

fn unreachable<E: std::error::Error>(what: &'static str) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&SimNetErr(what)))
}

fn lost<E: std::error::Error>(what: &'static str) -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&SimNetErr(what)))
}

/// Sends one RPC: returns the target handle once the request has "arrived", or an error.
macro_rules! rpc {
    ($self:ident, $option:ident, $call:expr) => {{
        if !$self.alive.load(std::sync::atomic::Ordering::SeqCst) {
            // A task of a crashed incarnation: it never sends, and never hears back.
            std::future::pending::<()>().await;
        }
        let plan = $self.net.lock().unwrap().plan($self.from, $self.to);
        let (there, back, lose_request, lose_response) = match plan {
            Plan::Unreachable => return Err(unreachable("link cut or node down")),
            Plan::Deliver {
                there,
                back,
                lose_request,
                lose_response,
            } => (there, back, lose_request, lose_response),
        };
        tokio::time::sleep(there).await;
        if lose_request {
            tokio::time::sleep($option.hard_ttl().saturating_sub(there)).await;
            return Err(lost("request lost (timeout)"));
        }
        let Some(target) = $self.net.lock().unwrap().target($self.from, $self.to) else {
            return Err(unreachable("link cut or node down on arrival"));
        };
        let res = ($call)(target).await;
        tokio::time::sleep(back).await;
        if lose_response
            || $self
                .net
                .lock()
                .unwrap()
                .cut
                .contains(&($self.to, $self.from))
        {
            return Err(lost("response lost"));
        }
        match res {
            Ok(r) => Ok(r),
            Err(RaftError::Fatal(_)) => Err(unreachable("target shut down")),
            Err(e) => Err(RPCError::RemoteError(RemoteError::new($self.to, e))),
        }
    }};
}

impl RaftNetwork<TypeConfig> for SimConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.net.lock().unwrap().kinds[0] += 1;
        if crate::trace_on() {
            eprintln!(
                "AE {} {}->{} prev {:?} entries {:?}..{:?}",
                rpc.vote,
                self.from,
                self.to,
                rpc.prev_log_id.map(|l| l.index),
                rpc.entries.first().map(|e| e.log_id.index),
                rpc.entries.last().map(|e| e.log_id.index)
            );
        }
        rpc!(self, option, |t: Peer| async move {
            t.raft.append_entries(rpc).await
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.net.lock().unwrap().kinds[2] += 1;
        rpc!(self, option, |t: Peer| async move {
            t.raft.install_snapshot(rpc).await
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.net.lock().unwrap().kinds[1] += 1;
        let net = self.net.clone();
        rpc!(self, option, |t: Peer| async move {
            // As `replikv-cluster`'s handler.rs: a replica recovering from a damaged log votes
            // as if it still held what it lost, so a candidate short of its high water is
            // refused before openraft compares it with the shorter real log. The refusal shows
            // no log longer than the candidate's, so that no candidate waits for this replica,
            // which does not campaign.
            if !t.recovery.may_vote_for(rpc.last_log_id.as_ref()) {
                net.lock().unwrap().votes_refused_recovering += 1;
                let vote = t.raft.metrics().borrow().vote;
                return Ok(VoteResponse {
                    vote,
                    vote_granted: false,
                    last_log_id: t.raft.data_metrics().borrow().last_log.min(rpc.last_log_id),
                });
            }
            t.raft.vote(rpc).await
        })
    }
}
