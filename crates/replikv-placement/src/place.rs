//! Members → placement table.
//!
//! Two phases, both deterministic functions of the (sorted) member list:
//!
//! 1. **Replicas.** For each partition, rank the nodes by [`rendezvous_score`] (highest
//!    first, ties by lower id) and take `min(factor, members)` of them, first walking the
//!    ranking taking only nodes whose zone is not yet used, then filling any remaining
//!    places in ranking order. Rendezvous hashing moves little on membership change: a
//!    new node takes over only the places where it outranks a current replica (about
//!    `factor/n` of them), and a removed node's places go to the next in each ranking.
//! 2. **Preferred leaders** (see `leaders.rs`): chosen among each partition's
//!    replicas so every node leads as evenly as the replica sets allow.

use std::fmt;

use crate::hash::rendezvous_score;
use crate::leaders::balance_leaders;
use crate::slot::SLOT_COUNT;
use crate::table::{Member, PartitionPlacement, PlacementTable};
use crate::{NodeId, PartitionId};

/// Why [`place`] refused its inputs. Every variant is a configuration error: the caller
/// must fix the member list or the keyspace policy, retrying will not help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlacementError {
    /// The member list is empty.
    NoMembers,
    /// The keyspace asks for zero partitions.
    ZeroPartitions,
    /// More partitions than hash slots: some partitions would own no slot.
    TooManyPartitions {
        /// The requested partition count.
        partitions: u32,
    },
    /// The replication factor is zero.
    ZeroFactor,
    /// Two members share an id.
    DuplicateMember(NodeId),
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMembers => write!(f, "placement needs at least one member"),
            Self::ZeroPartitions => write!(f, "a keyspace needs at least one partition"),
            Self::TooManyPartitions { partitions } => write!(
                f,
                "{partitions} partitions requested, at most {SLOT_COUNT} (one per hash slot)"
            ),
            Self::ZeroFactor => write!(f, "replication factor must be at least 1"),
            Self::DuplicateMember(id) => write!(f, "node id {id} appears twice in the member list"),
        }
    }
}

impl std::error::Error for PlacementError {}

/// Place `partitions` partitions with `factor` replicas each (capped at the member count)
/// over `members`, stamping the table with `version`.
///
/// Deterministic: the same inputs give the same table on every node, whatever the order
/// of `members`. Each partition gets `min(factor, members.len())` distinct replicas,
/// spread over distinct zones as far as the zones allow, listed with the preferred leader
/// first and the rest by descending rendezvous score. Preferred leaders are balanced:
/// no node can take a preferred leadership from a node leading two or more partitions
/// more than it (through any chain of replica swaps), which makes the counts differ by at
/// most one whenever the replica sets allow it.
pub fn place(
    members: &[Member],
    partitions: u32,
    factor: usize,
    version: u64,
) -> Result<PlacementTable, PlacementError> {
    if members.is_empty() {
        return Err(PlacementError::NoMembers);
    }
    if partitions == 0 {
        return Err(PlacementError::ZeroPartitions);
    }
    if partitions > u32::from(SLOT_COUNT) {
        return Err(PlacementError::TooManyPartitions { partitions });
    }
    if factor == 0 {
        return Err(PlacementError::ZeroFactor);
    }

    // Sorting by id is what makes member order irrelevant; from here on nodes are
    // referred to by their index in this order.
    let mut sorted: Vec<&Member> = members.iter().collect();
    sorted.sort_by_key(|m| m.id);
    if let Some(pair) = sorted.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(PlacementError::DuplicateMember(pair[0].id));
    }
    let ids: Vec<NodeId> = sorted.iter().map(|m| m.id).collect();
    let zones = zone_indices(&sorted);
    let zone_count = zones.iter().max().map_or(0, |z| z + 1);
    let factor = factor.min(ids.len());

    // replicas[p]: node indices, highest rendezvous score first.
    let replicas: Vec<Vec<usize>> = (0..partitions)
        .map(|p| choose_replicas(p, &ids, &zones, zone_count, factor))
        .collect();
    let leaders = balance_leaders(&replicas, ids.len());

    let partitions = replicas
        .iter()
        .zip(leaders)
        .zip(0..)
        .map(|((set, leader), partition)| {
            let others = set.iter().copied().filter(|&n| n != leader);
            PartitionPlacement {
                partition,
                replicas: std::iter::once(leader)
                    .chain(others)
                    .map(|n| ids[n])
                    .collect(),
                preferred_leader: ids[leader],
            }
        })
        .collect();
    Ok(PlacementTable {
        version,
        partitions,
    })
}

/// Zone index of each member: distinct zone names sorted, `None` being its own (first)
/// zone, so that the result does not depend on member order.
fn zone_indices(sorted: &[&Member]) -> Vec<usize> {
    let mut names: Vec<Option<&str>> = sorted.iter().map(|m| m.zone.as_deref()).collect();
    names.sort_unstable();
    names.dedup();
    sorted
        .iter()
        .map(|m| {
            names
                .binary_search(&m.zone.as_deref())
                .expect("every member's zone is in the list")
        })
        .collect()
}

/// The `factor` replicas of partition `p` as node indices, highest score first.
fn choose_replicas(
    p: PartitionId,
    ids: &[NodeId],
    zones: &[usize],
    zone_count: usize,
    factor: usize,
) -> Vec<usize> {
    let mut ranking: Vec<usize> = (0..ids.len()).collect();
    // Highest score first; equal scores (astronomically rare) fall back to the lower id.
    ranking.sort_by_key(|&n| (std::cmp::Reverse(rendezvous_score(p, ids[n])), ids[n]));

    let mut chosen = vec![false; ids.len()];
    let mut zone_used = vec![false; zone_count];
    let mut count = 0;
    // First pass: one replica per zone, best-ranked node of each zone, best zones first.
    for &n in &ranking {
        if count == factor {
            break;
        }
        if !zone_used[zones[n]] {
            zone_used[zones[n]] = true;
            chosen[n] = true;
            count += 1;
        }
    }
    // Second pass: zones exhausted, fill the rest in ranking order.
    for &n in &ranking {
        if count == factor {
            break;
        }
        if !chosen[n] {
            chosen[n] = true;
            count += 1;
        }
    }
    ranking.into_iter().filter(|&n| chosen[n]).collect()
}
