//! This node's part of the cluster: the partition groups it hosts, the peer transport that
//! carries every group's Raft messages and forwarded requests, and the router that sends
//! each request to the replica that must serve it.
//!
//! ```text
//!  front ends ──► Node::submit_write / get / scan_partition / promote
//!                   │  key → slot → partition (replikv-placement)
//!                   ├─ local leader: propose (write.rs) or read index (read.rs)
//!                   └─ elsewhere: forward over the transport (transport.rs)
//!  peers ──► transport ──► Handler for Node (handler.rs) ──► Raft core of the partition
//! ```
//! Invariants: a write is acknowledged only once its consistency level is met (write.rs);
//! only a node whose wall clock is in step with a majority's leads, and entries are stamped
//! by its anchored clock (clock.rs);
//! a `primary` read is served only after a read index confirmed by a quorum (read.rs);
//! replica staleness is measured from the leader's commit offsets (lag.rs).

pub mod clock;
mod elections;
mod frame;
mod handler;
mod lag;
mod lease;
pub mod messages;
pub mod meta;
mod metrics;
mod network;
mod node;
mod propose;
mod read;
mod read_rounds;
mod reconcile;
pub mod status;
mod sweep;
mod transfer;
pub mod transport;
mod write;

pub use frame::{
    decode as decode_frame, encode as encode_frame, Frame as PeerFrame, FrameError,
    Kind as FrameKind,
};
pub use metrics::Metrics;
pub use node::{hosted_groups, Group, Node, NodeConfig, Replication, TopologyHook, WallClock};
pub use write::WriteFuture;
