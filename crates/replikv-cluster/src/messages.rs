//! What nodes say to each other, inside request and response frames (bincode, versioned by
//! the frame). Raft messages of every group and forwarded client requests share one
//! connection per peer.

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use replikv_raft::TypeConfig;
use replikv_types::{Consistency, Error, GroupId, KvOp, NodeId, Offset, ReadPreference};
pub use replikv_types::{ValueWithTtl, WriteOutcome};
use serde::{Deserialize, Serialize};

/// The first frame on a connection: who is calling and where its clients connect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub node_id: NodeId,
    pub resp_addr: String,
    pub http_addr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(GroupId, AppendEntriesRequest<TypeConfig>),
    Vote(GroupId, VoteRequest<u64>),
    InstallSnapshot(GroupId, InstallSnapshotRequest<TypeConfig>),
    Client(ClientRequest),
    /// Liveness: answered at once, so a node knows which peers it can reach. Carries the
    /// sender's wall clock (Unix ms) when it sent it, echoed back (`clock.rs`).
    Ping {
        wall_ms: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Client(Result<ClientResponse, Error>),
    /// The group is not hosted by the receiving node.
    NoSuchGroup(GroupId),
    /// The answer to a ping: where this node stands in each group it leads, and its
    /// wall clock against the pinger's (`clock.rs`).
    Pong(Pong),
    /// The node cannot take the request now (its disk is full): the sender backs off and
    /// retries, as from an unreachable node.
    Unavailable(String),
}

/// The answer to a ping.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pong {
    pub marks: Vec<LeaderMark>,
    /// The ping's `wall_ms`, echoed: the pinger's wall clock when it sent the ping.
    pub echo_wall_ms: u64,
    /// The answering node's wall clock when it answered.
    pub wall_ms: u64,
    /// Whether the answering node's clock is in step with a majority's, as it judges.
    pub in_step: bool,
}

/// A leader's position, for its followers' staleness bound (`lag.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaderMark {
    pub group: GroupId,
    /// The leader's last log offset: every committed entry is at or below it.
    pub last_offset: Offset,
    /// How long ago (leader's clock) a quorum acknowledged a message the leader sent then.
    pub quorum_ack_ms: u64,
}

/// Requests a node serves for another node (forwarding) or for operators.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    Write {
        group: GroupId,
        op: KvOp,
        level: Consistency,
    },
    Get {
        group: GroupId,
        key: Bytes,
        read: ReadPreference,
        /// Read-your-writes: the reader's last write offset in this group.
        min_offset: Option<Offset>,
    },
    Scan {
        group: GroupId,
        start: Bytes,
        count: usize,
        pattern: Option<Bytes>,
    },
    /// `WAIT`: how many replicas other than the leader hold `offset`, waiting up to
    /// `timeout_ms` (0 = no limit) for `wanted` of them.
    WaitReplicas {
        group: GroupId,
        offset: Offset,
        wanted: usize,
        timeout_ms: u64,
    },
    /// Move leadership of `group` to `to`.
    Transfer {
        group: GroupId,
        to: NodeId,
    },
    /// Sent by a transferring leader: hold elections off on this replica for `for_ms`.
    HoldElections {
        group: GroupId,
        for_ms: u64,
    },
    /// Sent to a transfer's target: campaign once the old leader's lease has run out.
    Campaign {
        group: GroupId,
        after_ms: u64,
    },
    Status,
    /// A change to the topology, for the meta group's leader; answered with the topology's
    /// version after it (`Count`).
    Meta(crate::meta::MetaChange),
}

impl ClientRequest {
    /// True for requests that change nothing, which may be sent again.
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            ClientRequest::Get { .. } | ClientRequest::Scan { .. } | ClientRequest::Status
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientResponse {
    Written(WriteOutcome),
    Value(Option<ValueWithTtl>),
    Keys {
        keys: Vec<Bytes>,
        next: Option<Bytes>,
    },
    Count(u64),
    Done,
    Status(Box<crate::status::NodeStatus>),
}
