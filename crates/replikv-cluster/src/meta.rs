//! The meta group: the cluster's topology as replicated data (issue 17, DESIGN.md section 2).
//!
//! The meta group ([`GroupId::META`]) is a Raft group like the partitions' (the same log,
//! state machine and transport), run by up to [`MAX_META_VOTERS`] voters; it holds one key,
//! [`TOPOLOGY_KEY`], whose value is the [`Topology`]: the members (id, addresses, zone,
//! region, role), the keyspaces with their policies, and each keyspace's placement table
//! (partition → replicas, preferred leader), with a version that every change raises.
//!
//! Changes are made by the meta group's leader only, one at a time: it takes its change
//! lock, confirms its leadership and applies everything committed before (a read index, so
//! a change never starts from a topology an earlier leader had already changed), computes
//! the new topology, and proposes it as one write at `quorum`. A node that does not lead
//! the meta group sends its change to the one that does ([`ClientRequest::Meta`]).
//!
//! Every node reads the topology from its own replica of the meta group: the reconciler
//! (`reconcile.rs`) starts the groups the placement gives it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replikv_placement::{place, Member, PartitionPlacement, PlacementTable};
use replikv_types::{
    Consistency, Error, GroupId, KeyspaceId, KvOp, NodeId, ReadPreference, SetCond,
    DEFAULT_KEYSPACE, DEFAULT_KEYSPACE_ID,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::messages::{ClientRequest, ClientResponse};
use crate::node::{Node, Replication};

/// The meta group's one key.
pub const TOPOLOGY_KEY: &[u8] = b"replikv:topology";
/// The first byte of the topology's stored value: its encoding's version.
const TOPOLOGY_FORMAT_V1: u8 = 1;
/// Most voters the meta group has; other members follow it as learners.
pub const MAX_META_VOTERS: usize = 5;

/// What a member does: a voter hosts replicas that vote; a read replica (issue 19) only
/// learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Voter,
    Replica,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Replica => "replica",
        }
    }
}

/// One member of the cluster, as the meta group records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub peer_addr: String,
    /// Empty until the member has reported it (it does at start, `reconcile.rs`).
    pub resp_addr: String,
    pub http_addr: String,
    pub zone: Option<String>,
    pub region: Option<String>,
    pub role: Role,
}

/// A keyspace's policy: what its groups use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspacePolicy {
    pub partitions: u32,
    pub factor: usize,
    pub consistency: Consistency,
    pub read_preference: ReadPreference,
    pub max_lag_ms: u64,
}

impl KeyspacePolicy {
    /// The policy the `replication:` settings give the default keyspace.
    pub fn from_replication(r: &Replication) -> KeyspacePolicy {
        KeyspacePolicy {
            partitions: r.partitions,
            factor: r.factor,
            consistency: r.consistency,
            read_preference: r.read_preference,
            max_lag_ms: r.max_lag_ms,
        }
    }
}

/// A keyspace: its name, number (its `db`), policy, and placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceState {
    pub name: String,
    pub id: KeyspaceId,
    pub policy: KeyspacePolicy,
    /// The placement the keyspace was created with: the replicas that may initialize each
    /// group (a replica added later by a move never does; it learns from the leader).
    pub created: PlacementTable,
    /// Where its groups are now.
    pub placement: PlacementTable,
}

/// Everything the meta group holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Raised by every change.
    pub version: u64,
    pub members: BTreeMap<NodeId, MemberInfo>,
    pub keyspaces: BTreeMap<KeyspaceId, KeyspaceState>,
}

/// One group a node should run, as the topology places it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    pub id: GroupId,
    pub placement: PartitionPlacement,
    /// Whether this node may initialize the group (it is one of the group's first replicas).
    pub may_initialize: bool,
    /// The peer address of each replica (what an initialization records).
    pub peers: BTreeMap<NodeId, String>,
}

/// A change to the topology, made by the meta group's leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaChange {
    /// The first topology of a new cluster (or of one made before the meta group existed):
    /// applied only while there is none.
    Bootstrap(Topology),
    /// A member reports where it listens, its zone and region (at every start): recorded
    /// when they differ from what the topology holds.
    MemberUp(MemberInfo),
}

impl Topology {
    /// `[format u8][bincode]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![TOPOLOGY_FORMAT_V1];
        out.extend(bincode::serialize(self).expect("a topology always encodes"));
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Topology, String> {
        match raw.split_first() {
            Some((&TOPOLOGY_FORMAT_V1, body)) => {
                bincode::deserialize(body).map_err(|e| format!("the topology does not decode: {e}"))
            }
            Some((v, _)) => Err(format!(
                "the topology is of format {v}, which this build does not know (written by a newer replikv)"
            )),
            None => Err("the topology is empty".into()),
        }
    }

    /// The first topology: `members`, and the default keyspace under `policy`, placed over
    /// the voters.
    pub fn bootstrap(members: Vec<MemberInfo>, policy: KeyspacePolicy) -> Result<Topology, String> {
        let members: BTreeMap<NodeId, MemberInfo> =
            members.into_iter().map(|m| (m.id, m)).collect();
        let mut topology = Topology {
            version: 1,
            members,
            keyspaces: BTreeMap::new(),
        };
        let placement = topology.place(&policy, 1)?;
        topology.keyspaces.insert(
            DEFAULT_KEYSPACE_ID,
            KeyspaceState {
                name: DEFAULT_KEYSPACE.into(),
                id: DEFAULT_KEYSPACE_ID,
                policy,
                created: placement.clone(),
                placement,
            },
        );
        Ok(topology)
    }

    /// Places a keyspace of `policy` over the voting members (zone-aware rendezvous).
    fn place(&self, policy: &KeyspacePolicy, version: u64) -> Result<PlacementTable, String> {
        let voters: Vec<Member> = self
            .members
            .values()
            .filter(|m| m.role == Role::Voter)
            .map(|m| Member {
                id: m.id,
                zone: m.zone.clone(),
            })
            .collect();
        let factor = policy.factor.min(voters.len());
        place(&voters, policy.partitions, factor, version).map_err(|e| e.to_string())
    }

    /// The groups node `me` runs: a replica of each partition the placement gives it.
    pub fn groups_of(&self, me: NodeId) -> Vec<GroupSpec> {
        let mut out = Vec::new();
        for ks in self.keyspaces.values() {
            for pl in &ks.placement.partitions {
                if !pl.replicas.contains(&me) {
                    continue;
                }
                let first = ks
                    .created
                    .get(pl.partition)
                    .is_some_and(|c| c.replicas.contains(&me));
                let peers = pl
                    .replicas
                    .iter()
                    .filter_map(|id| Some((*id, self.members.get(id)?.peer_addr.clone())))
                    .collect();
                out.push(GroupSpec {
                    id: GroupId::new(ks.id, pl.partition),
                    placement: pl.clone(),
                    may_initialize: first,
                    peers,
                });
            }
        }
        out
    }

    pub fn keyspace(&self, id: KeyspaceId) -> Option<&KeyspaceState> {
        self.keyspaces.get(&id)
    }

    /// Every member's peer address.
    pub fn peers(&self) -> BTreeMap<NodeId, String> {
        self.members
            .values()
            .map(|m| (m.id, m.peer_addr.clone()))
            .collect()
    }

    /// The default keyspace's placement.
    pub fn default_placement(&self) -> Option<&PlacementTable> {
        self.keyspace(DEFAULT_KEYSPACE_ID).map(|ks| &ks.placement)
    }

    /// Applies `change` to a copy, raising the version; `Ok(None)` when it changes nothing.
    pub fn apply(&self, change: &MetaChange) -> Result<Option<Topology>, Error> {
        let mut next = self.clone();
        match change {
            MetaChange::Bootstrap(t) => {
                if self.version != 0 {
                    return Ok(None);
                }
                next = t.clone();
            }
            MetaChange::MemberUp(m) => {
                let Some(have) = next.members.get_mut(&m.id) else {
                    return Err(Error::InvalidArgument(format!(
                        "node {} is not a member of this cluster",
                        m.id
                    )));
                };
                if have.peer_addr != m.peer_addr {
                    // Other members reach it by that address: a restart on another address
                    // is a remove and a join (issue 17's `members`), not an update.
                    return Err(Error::InvalidArgument(format!(
                        "node {} is a member at peer address {}, not {}",
                        m.id, have.peer_addr, m.peer_addr
                    )));
                }
                if have == m {
                    return Ok(None);
                }
                *have = m.clone();
                next.version = self.version + 1;
            }
        }
        Ok(Some(next))
    }
}

/// The meta group's replicas in a cluster whose initial members are `peers`: the first
/// [`MAX_META_VOTERS`] ids, the lowest preferred to lead.
pub fn meta_placement(peers: &BTreeMap<NodeId, String>) -> PartitionPlacement {
    let replicas: Vec<NodeId> = peers.keys().copied().take(MAX_META_VOTERS).collect();
    PartitionPlacement {
        partition: GroupId::META.partition,
        preferred_leader: replicas.first().copied().unwrap_or(0),
        replicas,
    }
}

impl Node {
    /// The topology as this node's replica of the meta group has applied it; `None` before
    /// the first one is committed (or on a node without the meta group).
    pub fn topology(&self) -> Option<Topology> {
        let meta = self.group(GroupId::META)?;
        known_topology(&meta.view, self.now_ms())
    }

    /// Makes `change` on the meta group's leader, wherever it is, within the write timeout.
    pub async fn change_topology(self: &Arc<Self>, change: MetaChange) -> Result<u64, Error> {
        let deadline = Instant::now() + self.write_timeout();
        loop {
            let leader = match self.leader_of(GroupId::META) {
                Some(l) => l,
                None => self.await_leader(GroupId::META, None, deadline).await?,
            };
            let result = if leader == self.id() {
                self.change_topology_here(&change).await
            } else {
                match self
                    .ask(leader, ClientRequest::Meta(change.clone()), deadline)
                    .await
                {
                    Ok(ClientResponse::Count(v)) => Ok(v),
                    Ok(other) => Err(Error::Internal(format!(
                        "unexpected answer to a topology change: {other:?}"
                    ))),
                    Err(e) => Err(e),
                }
            };
            match result {
                Err(Error::NotLeader { .. } | Error::TryAgain(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Makes `change` here, as the meta group's leader: returns the topology's version after
    /// it.
    pub(crate) async fn change_topology_here(
        self: &Arc<Self>,
        change: &MetaChange,
    ) -> Result<u64, Error> {
        let _one_at_a_time = self.meta_changes.lock().await;
        // Leadership confirmed, and everything committed before applied here.
        let meta = self.read_index(GroupId::META, None).await?;
        // An unreadable topology is never taken for an absent one: that would bootstrap over
        // it.
        let now = read_topology(&meta.view, self.now_ms())
            .map_err(|e| Error::Internal(format!("no topology change: {e}")))?
            .unwrap_or_default();
        let Some(next) = now.apply(change)? else {
            return Ok(now.version);
        };
        let op = KvOp::Set {
            key: Bytes::from_static(TOPOLOGY_KEY),
            value: Bytes::from(next.encode()),
            expire: None,
            keep_ttl: false,
            cond: SetCond::Always,
            get: false,
        };
        let pending = self
            .propose_local(GroupId::META, op, Consistency::Quorum)
            .await;
        pending.await?;
        tracing::info!(version = next.version, change = ?change_name(change), "topology changed");
        Ok(next.version)
    }
}

/// A member as `/v1/cluster/members` and `admin members list` show it.
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub id: NodeId,
    pub peer: String,
    pub resp: String,
    pub http: String,
    pub zone: Option<String>,
    pub region: Option<String>,
    pub role: &'static str,
    /// In the meta group: `voter`, `learner`, or `none` (not added yet).
    pub meta: &'static str,
    /// The replicas of keyspaces' partitions the placement gives it, and how many it leads
    /// as far as this node knows.
    pub replicas: usize,
    pub leads: usize,
}

/// A keyspace as `/v1/keyspaces` and `admin keyspaces list` show it.
#[derive(Clone, Debug, Serialize)]
pub struct KeyspaceView {
    pub name: String,
    pub db: KeyspaceId,
    pub partitions: u32,
    /// As asked for, and as placed (fewer when there are fewer voting members).
    pub factor: usize,
    pub placed_factor: usize,
    pub consistency: String,
    pub read_preference: String,
    pub max_lag_ms: u64,
}

impl Node {
    /// The members as the topology lists them, with the topology's version.
    pub fn member_views(&self) -> Option<(u64, Vec<MemberView>)> {
        let t = self.topology()?;
        let meta = self.group(GroupId::META);
        let (voters, learners): (Vec<NodeId>, Vec<NodeId>) = match &meta {
            Some(g) => {
                let m = g.raft.metrics();
                let m = m.borrow();
                let c = m.membership_config.membership();
                (c.voter_ids().collect(), c.learner_ids().collect())
            }
            None => (Vec::new(), Vec::new()),
        };
        let views = t
            .members
            .values()
            .map(|m| {
                let placed: Vec<GroupId> = t
                    .keyspaces
                    .values()
                    .flat_map(|ks| {
                        ks.placement
                            .partitions
                            .iter()
                            .filter(|p| p.replicas.contains(&m.id))
                            .map(|p| GroupId::new(ks.id, p.partition))
                    })
                    .collect();
                MemberView {
                    id: m.id,
                    peer: m.peer_addr.clone(),
                    resp: m.resp_addr.clone(),
                    http: m.http_addr.clone(),
                    zone: m.zone.clone(),
                    region: m.region.clone(),
                    role: m.role.as_str(),
                    meta: if voters.contains(&m.id) {
                        "voter"
                    } else if learners.contains(&m.id) {
                        "learner"
                    } else {
                        "none"
                    },
                    replicas: placed.len(),
                    leads: placed
                        .iter()
                        .filter(|g| self.leader_of(**g) == Some(m.id))
                        .count(),
                }
            })
            .collect();
        Some((t.version, views))
    }

    /// The keyspaces as the topology lists them, with the topology's version.
    pub fn keyspace_views(&self) -> Option<(u64, Vec<KeyspaceView>)> {
        let t = self.topology()?;
        let views = t
            .keyspaces
            .values()
            .map(|ks| KeyspaceView {
                name: ks.name.clone(),
                db: ks.id,
                partitions: ks.policy.partitions,
                factor: ks.policy.factor,
                placed_factor: ks
                    .placement
                    .partitions
                    .first()
                    .map_or(0, |p| p.replicas.len()),
                consistency: ks.policy.consistency.to_string(),
                read_preference: ks.policy.read_preference.to_string(),
                max_lag_ms: ks.policy.max_lag_ms,
            })
            .collect();
        Some((t.version, views))
    }
}

fn change_name(change: &MetaChange) -> String {
    match change {
        MetaChange::Bootstrap(_) => "bootstrap".into(),
        MetaChange::MemberUp(m) => format!("member {} up", m.id),
    }
}

/// The topology a meta replica's state holds: `Ok(None)` when there is none yet, `Err` when
/// it cannot be read (a storage error, or a format this build does not know). The two must
/// stay apart: only an absent topology may be bootstrapped.
pub(crate) fn read_topology(
    view: &replikv_raft::KvView,
    now_ms: u64,
) -> Result<Option<Topology>, String> {
    let stored = view
        .get(TOPOLOGY_KEY, now_ms)
        .map_err(|e| format!("reading the topology: {e}"))?;
    match stored {
        None => Ok(None),
        Some(v) => Topology::decode(&v.data).map(Some),
    }
}

/// [`read_topology`] for readers that can go on without it: an unreadable topology is
/// logged (once a minute at most) and taken as unknown.
pub(crate) fn known_topology(view: &replikv_raft::KvView, now_ms: u64) -> Option<Topology> {
    static LAST_WARNED_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    match read_topology(view, now_ms) {
        Ok(t) => t,
        Err(e) => {
            use std::sync::atomic::Ordering;
            let last = LAST_WARNED_MS.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) >= 60_000
                && LAST_WARNED_MS
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::error!(error = %e, "the meta group's topology is unreadable here");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: NodeId) -> MemberInfo {
        MemberInfo {
            id,
            peer_addr: format!("10.0.0.{id}:7380"),
            resp_addr: String::new(),
            http_addr: String::new(),
            zone: None,
            region: None,
            role: Role::Voter,
        }
    }

    fn policy() -> KeyspacePolicy {
        KeyspacePolicy::from_replication(&Replication::default())
    }

    #[test]
    fn the_bootstrap_places_the_default_keyspace_as_the_static_placement_did() {
        let t = Topology::bootstrap((1..=3).map(member).collect(), policy()).unwrap();
        let members: Vec<Member> = (1..=3).map(Member::new).collect();
        let expected = place(&members, 8, 3, 1).unwrap();
        let ks = t.keyspace(DEFAULT_KEYSPACE_ID).unwrap();
        assert_eq!(ks.placement, expected);
        assert_eq!(ks.created, expected);
        assert_eq!(t.version, 1);
        let mine = t.groups_of(2);
        assert_eq!(mine.len(), 8);
        assert!(mine.iter().all(|g| g.may_initialize && g.id.keyspace == 0));
    }

    #[test]
    fn the_topology_round_trips_and_refuses_unknown_formats() {
        let t = Topology::bootstrap((1..=5).map(member).collect(), policy()).unwrap();
        let raw = t.encode();
        assert_eq!(Topology::decode(&raw).unwrap(), t);
        let mut newer = raw.clone();
        newer[0] = 2;
        assert!(Topology::decode(&newer).unwrap_err().contains("format 2"));
        assert!(Topology::decode(&[]).is_err());
    }

    #[test]
    fn member_up_records_addresses_once_and_refuses_strangers_and_moved_peers() {
        let t = Topology::bootstrap((1..=3).map(member).collect(), policy()).unwrap();
        let mut up = member(2);
        up.resp_addr = "10.0.0.2:6379".into();
        let next = t.apply(&MetaChange::MemberUp(up.clone())).unwrap().unwrap();
        assert_eq!(next.version, 2);
        assert_eq!(next.members[&2].resp_addr, "10.0.0.2:6379");
        assert_eq!(next.apply(&MetaChange::MemberUp(up.clone())).unwrap(), None);
        assert!(t.apply(&MetaChange::MemberUp(member(9))).is_err());
        let mut moved = up;
        moved.peer_addr = "10.9.9.9:1".into();
        assert!(t.apply(&MetaChange::MemberUp(moved)).is_err());
        // A second bootstrap changes nothing.
        assert_eq!(next.apply(&MetaChange::Bootstrap(t.clone())).unwrap(), None);
    }

    #[test]
    fn the_meta_group_has_at_most_five_voters_the_lowest_preferred() {
        let peers: BTreeMap<NodeId, String> = (1..=7).map(|i| (i, format!("n{i}"))).collect();
        let pl = meta_placement(&peers);
        assert_eq!(pl.replicas, vec![1, 2, 3, 4, 5]);
        assert_eq!(pl.preferred_leader, 1);
    }
}
