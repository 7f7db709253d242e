//! The node's view of its partitions and replicas, for `/v1/_replication/state`,
//! `/api/replication/stats`, `REPLIKV.STATUS`, `INFO` and `replikv admin status`.
//!
//! Replica figures are the leader's: `matched_offset` is what the replica acknowledged as
//! durably appended; `lag_ops = leader_last_offset - matched_offset`; `lag_ms` is the age of
//! the oldest entry the replica lacks (0 when it lacks none).

use std::time::Duration;

use openraft::ServerState;
use replikv_placement::partition_slots;
use serde::{Deserialize, Serialize};

use crate::node::{Group, Node};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub resp_addr: String,
    pub http_addr: String,
    /// The replicas of keyspaces' partitions this node hosts.
    pub partitions: Vec<PartitionStatus>,
    /// This node's replica of the meta group (`meta.rs`), and the topology version whose
    /// groups it started.
    pub meta: Option<PartitionStatus>,
    pub topology_version: u64,
    pub links: Vec<LinkStatus>,
    /// The node's two redb files (`log`, `state`): commits and fsyncs since it started.
    #[serde(default)]
    pub storage: Vec<StoreStatus>,
    /// This node's wall clock against its peers' (`clock.rs`).
    #[serde(default)]
    pub clock: crate::clock::ClockStatus,
    /// The data directory's disk: free space, the reserve, and why new data is refused.
    pub disk: DiskStatus,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub min_free_bytes: u64,
    /// Set while writes are refused (the disk is full, or below `min_free_bytes`).
    pub refusing: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreStatus {
    pub store: String,
    pub fsync: replikv_storage::FsyncPolicy,
    pub commits: u64,
    pub fsyncs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    pub node_id: u64,
    pub connected: bool,
    pub last_ok_ms_ago: Option<u64>,
    pub rtt_us: Option<u64>,
    pub link_cut: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// The keyspace's name (`default`), and its number (its `db`).
    pub keyspace: String,
    pub keyspace_id: u32,
    pub partition: u32,
    pub slots: [u16; 2],
    pub role: String,
    pub leader: Option<u64>,
    pub preferred_leader: u64,
    pub term: u64,
    pub last_offset: u64,
    pub applied_offset: u64,
    pub snapshot_offset: Option<u64>,
    pub purged_offset: Option<u64>,
    /// Leader: age of the last quorum acknowledgement. Others: measured staleness.
    pub staleness_ms: Option<u64>,
    /// Others: committed entries (as of the leader's last message) not yet applied here.
    pub behind_ops: Option<u64>,
    /// Whether this node heard from a majority of the partition's replicas within the
    /// election timeout. A "leader" without it is cut off: openraft 0.9 keeps it in the
    /// Leader state until it sees a higher term, but it refuses writes and reads.
    pub reaches_majority: bool,
    /// While this replica recovers from a damaged log: the offset its log must reach again
    /// before it votes for a candidate short of it or campaigns (durability.md).
    pub recovering_to: Option<u64>,
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node_id: u64,
    pub role: String,
    pub matched_offset: Option<u64>,
    pub lag_ops: Option<u64>,
    pub lag_ms: Option<u64>,
    /// ACTIVE | SYNCING | FAILED
    pub state: String,
    /// HEALTHY | DEGRADED | UNHEALTHY | UNKNOWN
    pub health: String,
    pub last_heartbeat_ms_ago: Option<u64>,
}

impl PartitionStatus {
    /// The group this status is of.
    pub fn group(&self) -> replikv_types::GroupId {
        replikv_types::GroupId::new(self.keyspace_id, self.partition)
    }
}

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Node {
    pub fn status(&self) -> NodeStatus {
        let me = self.transport.me();
        let mut links = Vec::new();
        for id in self.cfg.peers.keys().filter(|id| **id != self.id()) {
            let s = self.transport.link_stats(*id).unwrap_or_default();
            links.push(LinkStatus {
                node_id: *id,
                connected: s.connected,
                last_ok_ms_ago: s.last_ok.map(|t| t.elapsed().as_millis() as u64),
                rtt_us: s.rtt_us,
                link_cut: self.transport.faults.is_blocked(*id),
            });
        }
        NodeStatus {
            node_id: self.id(),
            resp_addr: me.resp_addr.clone(),
            http_addr: me.http_addr.clone(),
            partitions: self
                .groups()
                .iter()
                .filter(|g| !g.id.is_meta())
                .map(|g| self.partition_status(g))
                .collect(),
            meta: self
                .group(replikv_types::GroupId::META)
                .map(|g| self.partition_status(&g)),
            topology_version: self
                .topology_version
                .load(std::sync::atomic::Ordering::Relaxed),
            links,
            storage: vec![
                StoreStatus {
                    store: "log".into(),
                    fsync: self.stores.log.policy(),
                    commits: self.stores.log.commit_count(),
                    fsyncs: self.stores.log.sync_count(),
                },
                StoreStatus {
                    store: "state".into(),
                    fsync: self.stores.state.policy(),
                    commits: self.stores.state.commit_count(),
                    fsyncs: self.stores.state.sync_count(),
                },
            ],
            disk: DiskStatus {
                free_bytes: self.space.free_bytes(),
                total_bytes: self.space.total_bytes(),
                min_free_bytes: self.space.min_free_bytes(),
                refusing: self.space.refusal(),
            },
            clock: self.clock.status(),
        }
    }

    pub fn partition_status(&self, g: &Group) -> PartitionStatus {
        let m = g.raft.metrics().borrow().clone();
        let slots = partition_slots(g.id.partition, self.placement().partitions.len() as u32);
        let last = m.last_log_index.unwrap_or(0);
        let replicas = match &m.replication {
            Some(rep) => g
                .placement
                .replicas
                .iter()
                .map(|id| {
                    self.replica_status(
                        g,
                        *id,
                        rep.get(id).copied().flatten().map(|l| l.index),
                        last,
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        PartitionStatus {
            keyspace: crate::metrics::keyspace_label(g.id),
            keyspace_id: g.id.keyspace,
            partition: g.id.partition,
            slots: [slots.start, slots.end.saturating_sub(1)],
            role: role_name(m.state).into(),
            leader: m.current_leader,
            preferred_leader: g.placement.preferred_leader,
            term: m.current_term,
            last_offset: last,
            applied_offset: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_offset: m.snapshot.map(|l| l.index),
            purged_offset: m.purged.map(|l| l.index),
            staleness_ms: self.staleness(g).map(|d| d.as_millis() as u64),
            behind_ops: g
                .lag
                .lock()
                .expect("lag")
                .leader_offset()
                .map(|c| c.saturating_sub(m.last_applied.map(|l| l.index).unwrap_or(0))),
            reaches_majority: self.reaches_majority(g.id),
            recovering_to: g.recovery.high_water().map(|l| l.index),
            replicas,
        }
    }

    fn replica_status(&self, g: &Group, id: u64, matched: Option<u64>, last: u64) -> ReplicaStatus {
        let lag_ops = matched.map(|m| last.saturating_sub(m)).or(Some(last));
        let lag_ms = matched.map(|m| {
            g.waiters
                .age_of_first_after(m)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        });
        let (heard, connected) = if id == self.id() {
            (Some(Duration::ZERO), true)
        } else {
            let s = self.transport.link_stats(id).unwrap_or_default();
            (s.last_ok.map(|t| t.elapsed()), s.connected)
        };
        let timeout = Duration::from_millis(self.cfg.replication.replica_timeout_ms);
        let health = match heard {
            None => "UNKNOWN",
            Some(h) if h > timeout || !connected => "UNHEALTHY",
            Some(_) if lag_ms.unwrap_or(u64::MAX) > self.cfg.replication.max_lag_ms => "DEGRADED",
            Some(_) => "HEALTHY",
        };
        let purged = g.raft.metrics().borrow().purged.map(|l| l.index);
        let state = if health == "UNHEALTHY" || health == "UNKNOWN" {
            "FAILED"
        } else if matched.unwrap_or(0) < purged.unwrap_or(0)
            || lag_ops.unwrap_or(0) > self.cfg.replication.backlog_entries
        {
            "SYNCING"
        } else {
            "ACTIVE"
        };
        ReplicaStatus {
            node_id: id,
            role: if Some(id) == g.leader() {
                "leader".into()
            } else {
                "follower".into()
            },
            matched_offset: matched,
            lag_ops,
            lag_ms,
            state: state.into(),
            health: health.into(),
            last_heartbeat_ms_ago: heard.map(|d| d.as_millis() as u64),
        }
    }
}
