//! The placement table: what the meta group stores and every node routes by.

use serde::{Deserialize, Serialize};

use crate::slot::{key_slot, slot_partition};
use crate::{NodeId, PartitionId};

/// A cluster member as placement sees it: its id and, optionally, its failure zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's id.
    pub id: NodeId,
    /// Failure zone (rack, availability zone). Members without one share a single
    /// unnamed zone, so a cluster with no zones at all is placed by pure rendezvous.
    pub zone: Option<String>,
}

impl Member {
    /// A member with no zone.
    pub fn new(id: NodeId) -> Self {
        Self { id, zone: None }
    }

    /// A member in `zone`.
    pub fn in_zone(id: NodeId, zone: impl Into<String>) -> Self {
        Self {
            id,
            zone: Some(zone.into()),
        }
    }
}

/// One partition's replicas and preferred leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPlacement {
    /// The partition's index.
    pub partition: PartitionId,
    /// Distinct replica nodes, the preferred leader first, the rest in rendezvous order.
    pub replicas: Vec<NodeId>,
    /// The node that should lead this partition when healthy; always `replicas[0]`.
    pub preferred_leader: NodeId,
}

/// Every partition's placement, with the version of the layout it belongs to.
///
/// Invariant (as built by [`place`](crate::place())): `partitions[i].partition == i`, and
/// there is at least one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementTable {
    /// Layout version; a later layout has a higher version.
    pub version: u64,
    /// One entry per partition, in partition order.
    pub partitions: Vec<PartitionPlacement>,
}

/// How one partition's placement differs between two tables (see [`PlacementTable::diff`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionChange {
    /// The partition.
    pub partition: PartitionId,
    /// Nodes that become replicas (join as learners, catch up, then become voters).
    pub added: Vec<NodeId>,
    /// Nodes that stop being replicas (removed once the added ones are voters).
    pub removed: Vec<NodeId>,
    /// The preferred leader before and after, when it changes.
    pub leader: Option<(NodeId, NodeId)>,
}

impl PlacementTable {
    /// Number of partitions in the table.
    pub fn partition_count(&self) -> u32 {
        u32::try_from(self.partitions.len()).expect("at most SLOT_COUNT partitions")
    }

    /// The partition that owns `key`.
    ///
    /// # Panics
    /// If the table has no partitions (never the case for a table built by
    /// [`place`](crate::place())).
    pub fn partition_for_key(&self, key: &[u8]) -> PartitionId {
        slot_partition(key_slot(key), self.partition_count())
    }

    /// Placement of partition `p`, if the table has it.
    pub fn get(&self, p: PartitionId) -> Option<&PartitionPlacement> {
        let at = usize::try_from(p).ok()?;
        match self.partitions.get(at) {
            Some(pp) if pp.partition == p => Some(pp),
            // Only reachable for a hand-built table that breaks the ordering invariant.
            _ => self.partitions.iter().find(|pp| pp.partition == p),
        }
    }

    /// Partitions whose replica set or preferred leader differs in `next`, in partition
    /// order. A partition present in only one table is reported with all its replicas
    /// added (or removed) and no leader change.
    pub fn diff(&self, next: &PlacementTable) -> Vec<PartitionChange> {
        let mut ids: Vec<PartitionId> = self
            .partitions
            .iter()
            .chain(&next.partitions)
            .map(|pp| pp.partition)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter_map(|p| {
                let (old, new) = (self.get(p), next.get(p));
                let replicas = |pp: Option<&PartitionPlacement>| -> Vec<NodeId> {
                    pp.map(|pp| pp.replicas.clone()).unwrap_or_default()
                };
                let (old_r, new_r) = (replicas(old), replicas(new));
                let added: Vec<NodeId> = new_r
                    .iter()
                    .copied()
                    .filter(|n| !old_r.contains(n))
                    .collect();
                let removed: Vec<NodeId> = old_r
                    .iter()
                    .copied()
                    .filter(|n| !new_r.contains(n))
                    .collect();
                let leader = match (old, new) {
                    (Some(o), Some(n)) if o.preferred_leader != n.preferred_leader => {
                        Some((o.preferred_leader, n.preferred_leader))
                    }
                    _ => None,
                };
                let unchanged = added.is_empty() && removed.is_empty() && leader.is_none();
                (!unchanged).then_some(PartitionChange {
                    partition: p,
                    added,
                    removed,
                    leader,
                })
            })
            .collect()
    }
}
