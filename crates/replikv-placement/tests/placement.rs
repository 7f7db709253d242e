//! Placement promises (DESIGN.md §2): deterministic from the member list, replicas spread
//! over distinct zones where possible, preferred leaders balanced, little movement when
//! membership changes.

use std::collections::{BTreeMap, BTreeSet};

use replikv_placement::{
    key_slot, place, slot_partition, Member, NodeId, PlacementError, PlacementTable,
};

fn members(ids: impl IntoIterator<Item = NodeId>) -> Vec<Member> {
    ids.into_iter().map(Member::new).collect()
}

fn leader_counts(table: &PlacementTable) -> BTreeMap<NodeId, usize> {
    let mut counts = BTreeMap::new();
    for pp in &table.partitions {
        *counts.entry(pp.preferred_leader).or_default() += 1;
    }
    counts
}

/// Leader counts for every node in `ids`, including those leading nothing.
fn leader_spread(table: &PlacementTable, ids: &[NodeId]) -> (usize, usize) {
    let counts = leader_counts(table);
    let loads: Vec<usize> = ids
        .iter()
        .map(|id| counts.get(id).copied().unwrap_or(0))
        .collect();
    (
        *loads.iter().min().expect("ids"),
        *loads.iter().max().expect("ids"),
    )
}

fn assignments(table: &PlacementTable) -> BTreeSet<(u32, NodeId)> {
    table
        .partitions
        .iter()
        .flat_map(|pp| pp.replicas.iter().map(move |&n| (pp.partition, n)))
        .collect()
}

#[test]
fn same_inputs_give_same_table_whatever_member_order() {
    let forward = vec![
        Member::in_zone(1, "a"),
        Member::in_zone(2, "b"),
        Member::in_zone(3, "a"),
        Member::new(4),
        Member::in_zone(5, "c"),
    ];
    let mut backward = forward.clone();
    backward.reverse();
    let mut shuffled = forward.clone();
    shuffled.swap(0, 3);
    shuffled.swap(1, 4);

    let expected = place(&forward, 64, 3, 7).expect("valid");
    assert_eq!(place(&forward, 64, 3, 7).expect("valid"), expected);
    assert_eq!(place(&backward, 64, 3, 7).expect("valid"), expected);
    assert_eq!(place(&shuffled, 64, 3, 7).expect("valid"), expected);
    assert_eq!(expected.version, 7);
}

#[test]
fn every_partition_gets_min_factor_members_distinct_replicas_leader_first() {
    for n in 1..=7u64 {
        let ids = members(1..=n);
        for factor in 1..=5usize {
            for partitions in [1u32, 3, 8, 16, 64] {
                let table = place(&ids, partitions, factor, 1).expect("valid");
                assert_eq!(table.partitions.len(), partitions as usize);
                for (i, pp) in table.partitions.iter().enumerate() {
                    assert_eq!(pp.partition as usize, i);
                    let distinct: BTreeSet<_> = pp.replicas.iter().collect();
                    assert_eq!(distinct.len(), factor.min(n as usize), "{pp:?}");
                    assert_eq!(pp.replicas.len(), distinct.len(), "{pp:?}");
                    assert!(pp.replicas.iter().all(|id| (1..=n).contains(id)));
                    assert_eq!(pp.replicas[0], pp.preferred_leader, "{pp:?}");
                }
            }
        }
    }
}

#[test]
fn replicas_spread_over_three_zones() {
    // Ids interleaved so zones do not line up with id order.
    let ids = vec![
        Member::in_zone(1, "us-east-1a"),
        Member::in_zone(2, "us-east-1b"),
        Member::in_zone(3, "us-east-1c"),
        Member::in_zone(4, "us-east-1a"),
        Member::in_zone(5, "us-east-1b"),
        Member::in_zone(6, "us-east-1c"),
    ];
    let zone: BTreeMap<NodeId, &str> = ids
        .iter()
        .map(|m| (m.id, m.zone.as_deref().expect("zoned")))
        .collect();
    let table = place(&ids, 64, 3, 1).expect("valid");
    for pp in &table.partitions {
        let zones: BTreeSet<_> = pp.replicas.iter().map(|id| zone[id]).collect();
        assert_eq!(zones.len(), 3, "{pp:?}");
    }
    // Every node is used, not only the best-ranked node of each zone.
    let used: BTreeSet<NodeId> = assignments(&table).into_iter().map(|(_, n)| n).collect();
    assert_eq!(used.len(), 6);
    let (low, high) = leader_spread(&table, &[1, 2, 3, 4, 5, 6]);
    assert!(high - low <= 1, "leaders {:?}", leader_counts(&table));
}

#[test]
fn replicas_use_every_zone_when_zones_are_fewer_than_the_factor() {
    let ids = vec![
        Member::in_zone(1, "a"),
        Member::in_zone(2, "a"),
        Member::in_zone(3, "a"),
        Member::in_zone(4, "b"),
    ];
    let table = place(&ids, 32, 3, 1).expect("valid");
    for pp in &table.partitions {
        assert!(pp.replicas.contains(&4), "zone b unused in {pp:?}");
        assert_eq!(pp.replicas.len(), 3);
    }
}

#[test]
fn preferred_leaders_balance_three_nodes_eight_partitions() {
    let table = place(&members(1..=3), 8, 3, 1).expect("valid");
    let counts = leader_counts(&table);
    let mut loads: Vec<usize> = counts.values().copied().collect();
    loads.sort_unstable();
    assert_eq!(loads, vec![2, 3, 3], "{counts:?}");
}

#[test]
fn preferred_leaders_balance_five_nodes_sixteen_partitions() {
    let table = place(&members(1..=5), 16, 3, 1).expect("valid");
    let counts = leader_counts(&table);
    let mut loads: Vec<usize> = counts.values().copied().collect();
    loads.sort_unstable();
    assert_eq!(loads, vec![3, 3, 3, 3, 4], "{counts:?}");
}

#[test]
fn preferred_leaders_differ_by_at_most_one_across_shapes() {
    for n in 1..=9u64 {
        let ids: Vec<NodeId> = (1..=n).collect();
        for factor in 2..=3usize {
            for partitions in [1u32, 2, 5, 8, 16, 33, 64, 256] {
                let table = place(&members(ids.clone()), partitions, factor, 1).expect("valid");
                // A node can lead at most the partitions it holds; only demand balance
                // where every node holds at least its fair share of leaderships.
                let fair = (partitions as usize).div_ceil(n as usize);
                let held = assignments(&table);
                let holds_enough = ids
                    .iter()
                    .all(|id| held.iter().filter(|(_, n)| n == id).count() >= fair);
                if !holds_enough {
                    continue;
                }
                let (low, high) = leader_spread(&table, &ids);
                assert!(
                    high - low <= 1,
                    "n={n} factor={factor} partitions={partitions}: {:?}",
                    leader_counts(&table)
                );
            }
        }
    }
}

#[test]
fn replicas_spread_evenly_over_nodes() {
    // Checks the rendezvous hash has no bias: 1000 partitions x 3 replicas over 5 nodes
    // is 600 each on average.
    let table = place(&members(1..=5), 1000, 3, 1).expect("valid");
    let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
    for (_, n) in assignments(&table) {
        *per_node.entry(n).or_default() += 1;
    }
    for (&n, &count) in &per_node {
        assert!(
            (510..=690).contains(&count),
            "node {n} holds {count}: {per_node:?}"
        );
    }
}

#[test]
fn adding_a_fourth_node_moves_few_replicas() {
    for factor in [2usize, 3] {
        let before = place(&members(1..=3), 64, factor, 1).expect("valid");
        let after = place(&members(1..=4), 64, factor, 2).expect("valid");
        let (old, new) = (assignments(&before), assignments(&after));
        let moved = new.difference(&old).count();
        let leaders_moved = before
            .partitions
            .iter()
            .zip(&after.partitions)
            .filter(|(b, a)| b.preferred_leader != a.preferred_leader)
            .count();
        eprintln!(
            "factor {factor}: 3 -> 4 nodes moved {moved} of {} replica assignments \
             ({:.0}%; ideal {:.0}%), {leaders_moved} of 64 preferred leaders",
            new.len(),
            100.0 * moved as f64 / new.len() as f64,
            100.0 * (1.0 / 4.0),
        );
        assert!(moved * 2 < new.len(), "moved {moved} of {}", new.len());
        assert!(
            leaders_moved * 2 < 64,
            "{leaders_moved} preferred leaders moved"
        );
        // Rendezvous hashing only ever moves replicas onto the new node.
        for change in before.diff(&after) {
            assert!(change.added.iter().all(|&n| n == 4), "{change:?}");
            assert!(change.removed.len() <= 1, "{change:?}");
        }
    }
}

#[test]
fn removing_a_node_only_touches_the_partitions_it_held() {
    let before = place(&members(1..=5), 64, 3, 1).expect("valid");
    let after = place(&members([1, 2, 3, 5]), 64, 3, 2).expect("valid");
    for change in before.diff(&after) {
        if change.added.is_empty() && change.removed.is_empty() {
            continue; // only the preferred leader moved
        }
        assert_eq!(change.removed, vec![4], "{change:?}");
        assert_eq!(change.added.len(), 1, "{change:?}");
    }
}

#[test]
fn partition_for_key_routes_by_slot() {
    let table = place(&members(1..=3), 16, 3, 1).expect("valid");
    for key in [&b"foo"[..], b"bar", b"{user1000}.following", b""] {
        let p = table.partition_for_key(key);
        assert_eq!(p, slot_partition(key_slot(key), 16));
        assert_eq!(table.get(p).expect("present").partition, p);
    }
    assert_eq!(
        table.partition_for_key(b"{user1000}.following"),
        table.partition_for_key(b"{user1000}.followers")
    );
    assert!(table.get(16).is_none());
}

#[test]
fn diff_of_identical_tables_is_empty() {
    let table = place(&members(1..=4), 32, 3, 1).expect("valid");
    assert!(table.diff(&table).is_empty());
}

#[test]
fn factor_is_capped_at_the_member_count() {
    let table = place(&members([42]), 4, 3, 1).expect("valid");
    for pp in &table.partitions {
        assert_eq!(pp.replicas, vec![42]);
        assert_eq!(pp.preferred_leader, 42);
    }
}

#[test]
fn invalid_inputs_are_refused() {
    let three = members(1..=3);
    assert_eq!(place(&[], 8, 3, 1), Err(PlacementError::NoMembers));
    assert_eq!(place(&three, 0, 3, 1), Err(PlacementError::ZeroPartitions));
    assert_eq!(place(&three, 8, 0, 1), Err(PlacementError::ZeroFactor));
    assert_eq!(
        place(&three, 16385, 3, 1),
        Err(PlacementError::TooManyPartitions { partitions: 16385 })
    );
    assert!(place(&three, 16384, 1, 1).is_ok());
    let duplicated = vec![Member::new(1), Member::new(2), Member::in_zone(1, "a")];
    assert_eq!(
        place(&duplicated, 8, 3, 1),
        Err(PlacementError::DuplicateMember(1))
    );

    let error: Box<dyn std::error::Error> = Box::new(PlacementError::DuplicateMember(1));
    assert_eq!(
        error.to_string(),
        "node id 1 appears twice in the member list"
    );
}
