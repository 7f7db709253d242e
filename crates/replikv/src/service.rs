//! The RESP front end's [`Service`], implemented over this node's cluster layer.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use replikv_cluster::Node;
use replikv_resp::{
    FrontConfig, NodeFacts, PartitionFact, ReplicaFact, ScanPage, Service, SlotRange,
};
use replikv_types::{
    Consistency, Error, GroupId, KvOp, Offset, ReadPreference, ValueWithTtl, WriteOutcome,
};

use crate::config::Config;

pub struct NodeService {
    node: Arc<Node>,
    front: FrontConfig,
}

impl NodeService {
    pub fn new(node: Arc<Node>, cfg: &Config) -> NodeService {
        NodeService {
            node,
            front: FrontConfig {
                consistency: cfg.replication.consistency,
                read_preference: cfg.replication.read_preference,
                max_key_bytes: cfg.limits.max_key_bytes,
                max_value_bytes: cfg.limits.max_value_bytes,
                redirect: cfg.resp.redirect,
            },
        }
    }
}

fn split_host_port(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(0)),
        None => (addr.to_string(), 0),
    }
}

impl Service for NodeService {
    fn config(&self) -> &FrontConfig {
        &self.front
    }

    fn submit_write(
        &self,
        op: KvOp,
        level: Consistency,
    ) -> BoxFuture<'_, BoxFuture<'static, Result<WriteOutcome, Error>>> {
        Box::pin(self.node.submit_write(op, level))
    }

    fn get(
        &self,
        key: Bytes,
        read: ReadPreference,
        min_offset: Option<Offset>,
    ) -> BoxFuture<'static, Result<Option<ValueWithTtl>, Error>> {
        let node = self.node.clone();
        async move { node.get(key, read, min_offset).await }.boxed()
    }

    fn group_of(&self, key: &[u8]) -> GroupId {
        self.node.group_of(key)
    }

    fn partition_count(&self) -> u32 {
        self.node.placement().partitions.len() as u32
    }

    fn scan_partition(
        &self,
        p: GroupId,
        start: Bytes,
        count: usize,
        pattern: Option<Bytes>,
    ) -> BoxFuture<'_, Result<ScanPage, Error>> {
        async move { self.node.scan_partition(p, start, count, pattern).await }.boxed()
    }

    fn wait_replicas(
        &self,
        p: GroupId,
        offset: Offset,
        wanted: usize,
        timeout_ms: u64,
    ) -> BoxFuture<'_, Result<u64, Error>> {
        async move { self.node.wait_replicas(p, offset, wanted, timeout_ms).await }.boxed()
    }

    fn redirect_for(&self, key: &[u8]) -> Option<Error> {
        let p = self.node.group_of(key);
        let leader = self.node.leader_of(p)?;
        if leader == self.node.id() {
            return None;
        }
        let (resp, _) = self.node.endpoints(leader)?;
        Some(Error::Moved {
            slot: replikv_placement::key_slot(key),
            addr: resp,
        })
    }

    fn slots(&self) -> Vec<SlotRange> {
        let n = self.partition_count();
        self.node
            .placement()
            .partitions
            .iter()
            .map(|pl| {
                let r = replikv_placement::partition_slots(pl.partition, n);
                let leader = self
                    .node
                    .leader_of(GroupId::default_keyspace(pl.partition))
                    .unwrap_or(pl.preferred_leader);
                let mut ids = vec![leader];
                ids.extend(pl.replicas.iter().copied().filter(|id| *id != leader));
                let nodes = ids
                    .into_iter()
                    .filter_map(|id| {
                        let (resp, _) = self.node.endpoints(id)?;
                        let (host, port) = split_host_port(&resp);
                        Some((id, host, port))
                    })
                    .collect();
                SlotRange {
                    start: r.start,
                    end: r.end - 1,
                    nodes,
                }
            })
            .collect()
    }

    fn facts(&self) -> NodeFacts {
        let status = self.node.status();
        let mut facts = NodeFacts {
            node_id: status.node_id,
            partitions_hosted: status.partitions.len(),
            partitions_led: status
                .partitions
                .iter()
                .filter(|p| p.role == "leader" && p.reaches_majority)
                .count(),
            connected_peers: status.links.iter().filter(|l| l.connected).count(),
            ..Default::default()
        };
        for p in &status.partitions {
            facts.partitions.push(PartitionFact {
                partition: p.partition,
                role: p.role.clone(),
                leader: p.leader,
                applied_offset: p.applied_offset,
                staleness_ms: p.staleness_ms,
            });
            for r in p.replicas.iter().filter(|r| r.node_id != status.node_id) {
                facts.replicas.push(ReplicaFact {
                    partition: p.partition,
                    node: r.node_id,
                    matched_offset: r.matched_offset.unwrap_or(0),
                    lag_ops: r.lag_ops.unwrap_or(0),
                });
            }
        }
        facts
    }
}
