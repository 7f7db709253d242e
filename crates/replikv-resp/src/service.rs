//! What the RESP front end needs from the rest of replikv. The binary implements it over
//! the cluster node; the protocol code knows nothing of Raft or storage.

use bytes::Bytes;
use futures::future::BoxFuture;
use replikv_types::{
    Consistency, Error, GroupId, KvOp, Offset, ReadPreference, ValueWithTtl, WriteOutcome,
};

/// One slot range and the nodes serving it, leader first: `(node id, host, resp port)`.
#[derive(Clone, Debug)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub nodes: Vec<(u64, String, u16)>,
}

/// Facts `INFO`, `ROLE` and `REPLIKV.STATUS` report.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    pub node_id: u64,
    pub partitions_led: usize,
    pub partitions_hosted: usize,
    pub connected_peers: usize,
    pub partitions: Vec<PartitionFact>,
    /// Replicas of the partitions this node leads.
    pub replicas: Vec<ReplicaFact>,
}

/// One hosted partition as this node sees it.
#[derive(Clone, Debug, Default)]
pub struct PartitionFact {
    pub partition: u32,
    pub role: String,
    pub leader: Option<u64>,
    pub applied_offset: u64,
    pub staleness_ms: Option<u64>,
}

impl NodeFacts {
    /// Sum of the applied offsets of the partitions this node leads (`master_repl_offset`).
    pub fn led_offset(&self) -> u64 {
        self.partitions
            .iter()
            .filter(|p| p.role == "leader")
            .map(|p| p.applied_offset)
            .sum()
    }

    /// Per replica node, summed over the partitions this node leads: (matched offset, lag ops).
    pub fn replica_offsets(&self) -> std::collections::BTreeMap<u64, (u64, u64)> {
        let mut out = std::collections::BTreeMap::new();
        for r in &self.replicas {
            let e = out.entry(r.node).or_insert((0, 0));
            e.0 += r.matched_offset;
            e.1 += r.lag_ops;
        }
        out
    }
}

impl PartitionFact {
    /// `role=...,leader=...,applied_offset=...,staleness_ms=...` joined by `sep`.
    pub fn describe(&self, sep: char) -> String {
        let leader = self
            .leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "none".into());
        let stale = self
            .staleness_ms
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into());
        format!(
            "role={}{sep}leader={leader}{sep}applied_offset={}{sep}staleness_ms={stale}",
            self.role, self.applied_offset
        )
    }
}

/// One replica of a partition this node leads.
#[derive(Clone, Debug, Default)]
pub struct ReplicaFact {
    pub partition: u32,
    pub node: u64,
    pub matched_offset: u64,
    pub lag_ops: u64,
}

/// One page of a partition's keys, and the key to resume from.
pub type ScanPage = (Vec<Bytes>, Option<Bytes>);

/// Limits and defaults a connection applies.
#[derive(Clone, Debug)]
pub struct FrontConfig {
    pub consistency: Consistency,
    pub read_preference: ReadPreference,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Answer `-MOVED` instead of forwarding when this node does not lead the key's partition.
    pub redirect: bool,
}

pub trait Service: Send + Sync + 'static {
    fn config(&self) -> &FrontConfig;

    /// Queues the write toward its leader (the connection's writes keep their order), then
    /// returns the future of its acknowledgement.
    fn submit_write(
        &self,
        op: KvOp,
        level: Consistency,
    ) -> BoxFuture<'_, BoxFuture<'static, Result<WriteOutcome, Error>>>;

    /// Starts a read; the future owns what it needs, so a connection can hold several
    /// (a pipeline's reads run at once).
    fn get(
        &self,
        key: Bytes,
        read: ReadPreference,
        min_offset: Option<Offset>,
    ) -> BoxFuture<'static, Result<Option<ValueWithTtl>, Error>>;

    /// The group of the connection's keyspace that holds `key` (the default keyspace).
    fn group_of(&self, key: &[u8]) -> GroupId;

    fn partition_count(&self) -> u32;

    /// Keys of group `p` from `start`, at most `count`, matching `pattern`; and where to resume.
    fn scan_partition(
        &self,
        p: GroupId,
        start: Bytes,
        count: usize,
        pattern: Option<Bytes>,
    ) -> BoxFuture<'_, Result<ScanPage, Error>>;

    /// `WAIT`: replicas other than the leader that hold `offset` of `p`.
    fn wait_replicas(
        &self,
        p: GroupId,
        offset: Offset,
        wanted: usize,
        timeout_ms: u64,
    ) -> BoxFuture<'_, Result<u64, Error>>;

    /// `-MOVED` target when `redirect` is on and this node does not lead `key`'s partition.
    fn redirect_for(&self, key: &[u8]) -> Option<Error>;

    fn slots(&self) -> Vec<SlotRange>;

    fn facts(&self) -> NodeFacts;
}
