//! The rendezvous (highest-random-weight) score of a (partition, node) pair.
//!
//! Every node must compute the same placement, today and after an upgrade, on any
//! platform, so the score is a fixed function written out here rather than std's
//! `DefaultHasher` (whose output may change between Rust releases):
//!
//! ```text
//! mix(z)        = splitmix64 finaliser:
//!                 z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
//!                 z = (z ^ (z >> 27)) * 0x94d049bb133111eb
//!                 z ^ (z >> 31)                      (wrapping u64 arithmetic)
//! score(p, n)   = mix(mix(p + PARTITION_SALT) ^ mix(n + NODE_SALT))
//! ```
//!
//! Mixing each input before combining keeps small, sequential ids (partitions 0, 1, 2…,
//! nodes 1, 2, 3…) from producing correlated rankings; the outer mix spreads the
//! combination over all 64 bits. Changing any constant here moves data on upgrade: treat
//! it as an on-disk format.

use crate::{NodeId, PartitionId};

/// Added to a partition id before mixing (the splitmix64 increment, the golden ratio).
const PARTITION_SALT: u64 = 0x9e37_79b9_7f4a_7c15;
/// Added to a node id before mixing, distinct from [`PARTITION_SALT`] so that a partition
/// and a node with equal ids do not cancel out in the xor.
const NODE_SALT: u64 = 0xd1b5_4a32_d192_ed03;

/// The splitmix64 finaliser: a bijection on `u64` with full avalanche.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous score of `node` for `partition`: the partition's replicas are the nodes
/// with the highest scores.
pub fn rendezvous_score(partition: PartitionId, node: NodeId) -> u64 {
    let p = mix64(u64::from(partition).wrapping_add(PARTITION_SALT));
    let n = mix64(node.wrapping_add(NODE_SALT));
    mix64(p ^ n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the function: if this fails, every deployed cluster would re-place its data
    /// on upgrade. Change the expected values only together with a migration plan.
    #[test]
    fn rendezvous_score_is_pinned() {
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        assert_eq!(rendezvous_score(0, 1), PINNED_0_1);
        assert_eq!(rendezvous_score(7, 3), PINNED_7_3);
    }

    /// Computed independently from the formula in the module docs.
    const PINNED_0_1: u64 = 0x0893_1fbe_7122_476e;
    const PINNED_7_3: u64 = 0xb578_f4fd_29b4_f73d;
}
