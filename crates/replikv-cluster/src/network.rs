//! openraft's network interface for one partition, carried by the shared [`Transport`].

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use replikv_raft::TypeConfig;
use replikv_types::GroupId;

use crate::messages::{PeerRequest, PeerResponse};
use crate::transport::{PeerClient, Transport, TransportError};

#[derive(Clone)]
pub struct GroupNetwork {
    pub transport: Arc<Transport>,
    pub group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = GroupClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GroupClient {
        GroupClient {
            peer: self.transport.add_peer(target, &node.addr),
            target,
            group: self.group,
        }
    }
}

pub struct GroupClient {
    peer: Arc<PeerClient>,
    target: u64,
    group: GroupId,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

fn transport_err<E: std::error::Error>(e: TransportError) -> RPCError<u64, BasicNode, E> {
    match e {
        TransportError::Unreachable(_) | TransportError::NotSent(_) => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

/// The peer cannot take the request now (its disk is full): openraft backs off from an
/// unreachable node and tries again.
fn unavailable<E: std::error::Error>(why: String) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&TransportError::Unreachable(why)))
}

fn unexpected<E: std::error::Error>(resp: &PeerResponse) -> RPCError<u64, BasicNode, E> {
    if let PeerResponse::NoSuchGroup(g) = resp {
        // The peer has not started the group yet (its reconciler is behind, `reconcile.rs`)
        // or has stopped it: as from an unreachable node, openraft backs off and retries.
        return unavailable(format!("the peer does not run {g:#} (yet)"));
    }
    let e = TransportError::Protocol(format!("unexpected answer {resp:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl GroupClient {
    async fn call(
        &self,
        req: PeerRequest,
        option: &RPCOption,
    ) -> Result<PeerResponse, TransportError> {
        self.peer.request(&req, option.hard_ttl()).await
    }
}

impl RaftNetwork<TypeConfig> for GroupClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        // Big values could make one request exceed the frame limit: ask openraft to send
        // fewer entries at a time instead.
        let n = rpc.entries.len() as u64;
        if n > 1 {
            let size = bincode::serialized_size(&rpc).unwrap_or(0) as usize;
            if size > crate::frame::MAX_FRAME_BYTES / 2 {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(n / 2),
                ));
            }
        }
        let resp = self
            .call(PeerRequest::AppendEntries(self.group, rpc), &option)
            .await
            .map_err(transport_err)?;
        match resp {
            PeerResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            PeerResponse::Unavailable(why) => Err(unavailable(why)),
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let resp = self
            .call(PeerRequest::InstallSnapshot(self.group, rpc), &option)
            .await
            .map_err(transport_err)?;
        match resp {
            PeerResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            PeerResponse::Unavailable(why) => Err(unavailable(why)),
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        let resp = self
            .call(PeerRequest::Vote(self.group, rpc), &option)
            .await
            .map_err(transport_err)?;
        match resp {
            PeerResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(&other)),
        }
    }
}
