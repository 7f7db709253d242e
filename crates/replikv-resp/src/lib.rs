//! The Redis protocol front end: RESP2/RESP3 framing (`codec`), the connection loop (`conn`)
//! and one file per command family (`cmd_*`). Commands call the [`Service`] trait this crate
//! defines; the binary implements it over the cluster, so the protocol is free of storage.
//!
//! ```text
//!  socket ─► RequestParser ─► dispatch (cmd_*) ─► Service ─► reply Frame ─► encode ─► socket
//! ```
//! Pipelined writes are queued in order and awaited together; any other command first waits
//! for the connection's earlier writes, so a client always reads its own writes.
//!
//! `serve` keeps at most `maxclients` connections open, as Redis does: one more is told
//! `-ERR max number of clients reached` and closed, so clients never take the file
//! descriptors the node keeps for its peers.

mod cmd_cluster;
mod cmd_connection;
mod cmd_keys;
mod cmd_strings;
pub mod codec;
mod conn;
mod service;

pub use conn::{serve, ConnState};
pub use service::{
    FrontConfig, NodeFacts, PartitionFact, ReplicaFact, ScanPage, Service, SlotRange,
};
