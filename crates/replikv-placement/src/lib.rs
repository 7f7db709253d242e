//! # replikv-placement
//!
//! Where every key lives, computed from nothing but the member list.
//!
//! ```text
//! key ──key_slot──▶ slot (0..16384) ──slot_partition──▶ partition ──PlacementTable──▶ replicas
//!                                                                    (preferred leader first)
//! ```
//!
//! - `slot.rs`: Redis Cluster's hash slot (CRC16/XMODEM, `{hash tag}` rules) and the
//!   contiguous slot range each partition owns. Matching Redis exactly is what lets
//!   cluster-aware clients (`CLUSTER SLOTS`, `CLUSTER KEYSLOT`) route straight to leaders.
//! - [`hash`]: the fixed, platform-independent rendezvous score of a (partition, node) pair.
//! - `place.rs`, [`place()`]: members → [`PlacementTable`]: rendezvous hashing picks each
//!   partition's replicas, spreading them over distinct zones where it can, then preferred
//!   leaders are balanced across nodes (`leaders.rs`).
//! - `table.rs`, [`PlacementTable`]: the serialisable table the meta group stores, lookups
//!   on it, and the diff between two versions (what a membership change has to move).
//!
//! The crate is pure on purpose: no I/O, no clock, no randomness, no async. Every node runs
//! the same function over the same member list and must get the same table, so the output
//! may depend only on the inputs (never on member order, platform or Rust release).
//! That also makes it cheap to test exhaustively.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod hash;
mod leaders;
mod place;
mod slot;
mod table;

pub use place::{place, PlacementError};
pub use slot::{key_slot, partition_slots, slot_partition, SLOT_COUNT};
pub use table::{Member, PartitionChange, PartitionPlacement, PlacementTable};

/// A node's id in the cluster (the `node_id` of its configuration).
pub type NodeId = u64;

/// A partition's index within a keyspace: `0..partitions`.
pub type PartitionId = u32;
