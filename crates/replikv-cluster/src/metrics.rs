//! Prometheus metrics under `replikv_` (DESIGN.md section 4), labelled by keyspace,
//! partition and node. Event counters are bumped where the event happens; gauges that
//! describe state (lag, offsets, connections) are refreshed from the node's status when
//! `/metrics` is scraped, so they are never older than the scrape.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::status::NodeStatus;
use replikv_types::GroupId;

/// The `keyspace` label of group `g`'s series: `default`, `meta`, or the keyspace's number
/// until this node knows its name.
pub fn keyspace_label(g: GroupId) -> String {
    match g.keyspace {
        replikv_types::DEFAULT_KEYSPACE_ID => replikv_types::DEFAULT_KEYSPACE.to_string(),
        _ if g.is_meta() => "meta".to_string(),
        n => n.to_string(),
    }
}

pub struct Metrics {
    node: String,
    registry: Registry,
    lag_seconds: GaugeVec,
    lag_ops: IntGaugeVec,
    applied: IntCounterVec,
    replicated: IntCounterVec,
    pending: IntGaugeVec,
    follower_connected: IntGaugeVec,
    active_followers: IntGaugeVec,
    is_leader: IntGaugeVec,
    writes: IntCounterVec,
    writes_failed: IntCounterVec,
    reads: IntCounterVec,
    read_rounds: IntCounterVec,
    elections: IntCounterVec,
    early_campaigns: IntCounterVec,
    failovers: IntCounterVec,
    snapshots: IntCounterVec,
    sync_errors: IntCounterVec,
    last_sync: GaugeVec,
    sync_duration: HistogramVec,
    sync_batch: HistogramVec,
    storage_commits: IntCounterVec,
    storage_fsyncs: IntCounterVec,
    disk_free: IntGaugeVec,
    disk_refusing: IntGaugeVec,
    connections: IntGaugeVec,
    max_connections: IntGaugeVec,
    rejected_connections: IntCounterVec,
    evicted: IntCounterVec,
    clock_in_step: IntGaugeVec,
    topology_version: IntGaugeVec,
    clock_offset: GaugeVec,
    clock_uncertainty: GaugeVec,
    /// Last offsets folded into the counters above, to add only what is new.
    seen: Mutex<HashMap<(String, GroupId, u64), u64>>,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn igauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &["keyspace", "partition", "node"],
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

const P: &[&str] = &["keyspace", "partition", "node"];
const R: &[&str] = &["keyspace", "partition", "node", "replica"];

impl Metrics {
    pub fn new(node: u64) -> Metrics {
        let r = Registry::new();
        Metrics {
            node: node.to_string(),
            lag_seconds: gauge(
                &r,
                "replikv_replication_lag_seconds",
                "Age of the oldest entry a replica lacks, as its leader sees it",
                R,
            ),
            lag_ops: igauge(
                &r,
                "replikv_replication_lag_ops",
                "Entries a replica lacks behind its leader's last offset",
                R,
            ),
            applied: counter(
                &r,
                "replikv_changes_applied_total",
                "Log entries applied to this replica's state machine",
                P,
            ),
            replicated: counter(
                &r,
                "replikv_writes_replicated_total",
                "Entries a replica acknowledged to this leader",
                R,
            ),
            pending: igauge(
                &r,
                "replikv_changes_pending",
                "Entries in this replica's log not yet applied",
                P,
            ),
            follower_connected: igauge(
                &r,
                "replikv_follower_connected",
                "1 when the peer link to the node is up",
                &["node", "peer"],
            ),
            active_followers: igauge(
                &r,
                "replikv_active_followers",
                "Healthy followers of a partition this node leads",
                P,
            ),
            is_leader: igauge(
                &r,
                "replikv_partition_leader",
                "1 when this node leads the partition",
                P,
            ),
            writes: counter(
                &r,
                "replikv_writes_primary_total",
                "Writes acknowledged by this node as leader",
                P,
            ),
            writes_failed: counter(
                &r,
                "replikv_writes_failed_total",
                "Writes this leader refused or could not complete",
                P,
            ),
            reads: counter(
                &r,
                "replikv_reads_total",
                "Reads served here, by who served them (leader or replica)",
                &["keyspace", "partition", "node", "served_by"],
            ),
            read_rounds: counter(
                &r,
                "replikv_read_index_rounds_total",
                "Quorum confirmations this leader ran for primary reads (one serves every read \
                 waiting for it; under a leader lease most reads need none)",
                P,
            ),
            elections: counter(
                &r,
                "replikv_elections_total",
                "Terms started in a partition, as this node saw them",
                P,
            ),
            early_campaigns: counter(
                &r,
                "replikv_early_campaigns_total",
                "Campaigns this replica started because its leader's process was gone (its \
                 port refused connections), once the lease it granted that leader had run out",
                P,
            ),
            failovers: counter(
                &r,
                "replikv_failovers_total",
                "Leader changes in a partition, as this node saw them",
                P,
            ),
            snapshots: counter(
                &r,
                "replikv_snapshot_transfers_total",
                "Snapshots installed on this replica (full syncs)",
                P,
            ),
            sync_errors: counter(
                &r,
                "replikv_sync_errors_total",
                "Replication requests from a leader that failed here",
                P,
            ),
            last_sync: gauge(
                &r,
                "replikv_last_sync_timestamp_seconds",
                "Unix time of the last replication request applied here",
                P,
            ),
            sync_duration: histogram(
                &r,
                "replikv_sync_duration_seconds",
                "Time to handle one replication request",
                prometheus::exponential_buckets(0.0001, 2.0, 16).expect("buckets"),
            ),
            sync_batch: histogram(
                &r,
                "replikv_sync_batch_size",
                "Entries per replication request",
                prometheus::exponential_buckets(1.0, 2.0, 12).expect("buckets"),
            ),
            storage_commits: counter(
                &r,
                "replikv_storage_commits_total",
                "Write transactions committed to the node's log or state file",
                &["node", "store"],
            ),
            storage_fsyncs: counter(
                &r,
                "replikv_storage_fsyncs_total",
                "Of those commits, the ones that waited for the disk (fsync)",
                &["node", "store"],
            ),
            disk_free: igauge(
                &r,
                "replikv_storage_free_bytes",
                "Free space of the data directory's disk",
                &["node"],
            ),
            disk_refusing: igauge(
                &r,
                "replikv_storage_disk_full",
                "1 while the node refuses new data: its disk is full or below storage.min_free_bytes",
                &["node"],
            ),
            connections: igauge(
                &r,
                "replikv_connections",
                "Connections open now on a front end's listener (resp: clients, http)",
                &["node", "listener"],
            ),
            max_connections: igauge(
                &r,
                "replikv_max_connections",
                "The cap on a listener's open connections (resp: maxclients), as fitted to the open files limit",
                &["node", "listener"],
            ),
            rejected_connections: counter(
                &r,
                "replikv_rejected_connections_total",
                "Connections refused because their listener was at its cap",
                &["node", "listener"],
            ),
            evicted: counter(
                &r,
                "replikv_expired_keys_evicted_total",
                "Expired keys this leader removed through the log (its expiry sweep)",
                P,
            ),
            topology_version: igauge(
                &r,
                "replikv_topology_version",
                "The version of the last topology whose groups this node started (meta group)",
                &["node"],
            ),
            clock_in_step: igauge(
                &r,
                "replikv_clock_in_step",
                "1 when this node's wall clock is within max_clock_offset_ms of a majority of \
                 the cluster's: only then does it lead or serve secondary reads",
                &["node"],
            ),
            clock_offset: gauge(
                &r,
                "replikv_clock_offset_seconds",
                "A peer's wall clock minus this node's, from the best recent ping",
                &["node", "peer"],
            ),
            clock_uncertainty: gauge(
                &r,
                "replikv_clock_offset_uncertainty_seconds",
                "Half the round trip of the ping that gave replikv_clock_offset_seconds",
                &["node", "peer"],
            ),
            registry: r,
            seen: Mutex::default(),
        }
    }

    fn p(&self, g: GroupId) -> [String; 3] {
        [
            keyspace_label(g),
            g.partition.to_string(),
            self.node.clone(),
        ]
    }

    pub fn write_ok(&self, p: GroupId) {
        let l = self.p(p);
        self.writes.with_label_values(&[&l[0], &l[1], &l[2]]).inc();
    }

    pub fn write_failed(&self, p: GroupId) {
        let l = self.p(p);
        self.writes_failed
            .with_label_values(&[&l[0], &l[1], &l[2]])
            .inc();
    }

    pub fn read_served(&self, p: GroupId, by: &str) {
        let l = self.p(p);
        self.reads
            .with_label_values(&[&l[0], &l[1], &l[2], by])
            .inc();
    }

    pub fn read_round(&self, p: GroupId) {
        let l = self.p(p);
        self.read_rounds
            .with_label_values(&[&l[0], &l[1], &l[2]])
            .inc();
    }

    pub fn election(&self, p: GroupId) {
        let l = self.p(p);
        self.elections
            .with_label_values(&[&l[0], &l[1], &l[2]])
            .inc();
    }

    pub fn early_campaign(&self, p: GroupId) {
        let l = self.p(p);
        self.early_campaigns
            .with_label_values(&[&l[0], &l[1], &l[2]])
            .inc();
    }

    pub fn failover(&self, p: GroupId) {
        let l = self.p(p);
        self.failovers
            .with_label_values(&[&l[0], &l[1], &l[2]])
            .inc();
    }

    pub fn evicted(&self, p: GroupId, n: u64) {
        let l = self.p(p);
        self.evicted
            .with_label_values(&[&l[0], &l[1], &l[2]])
            .inc_by(n);
    }

    pub fn snapshot_received(&self, p: GroupId) {
        let l = self.p(p);
        self.snapshots
            .with_label_values(&[&l[0], &l[1], &l[2]])
            .inc();
    }

    pub fn synced(&self, p: GroupId, entries: usize, took: Duration, ok: bool) {
        let l = self.p(p);
        let labels = [l[0].as_str(), l[1].as_str(), l[2].as_str()];
        if !ok {
            self.sync_errors.with_label_values(&labels).inc();
            return;
        }
        self.sync_duration
            .with_label_values(&labels)
            .observe(took.as_secs_f64());
        if entries > 0 {
            self.sync_batch
                .with_label_values(&labels)
                .observe(entries as f64);
        }
        // A metric for people reading dashboards, not an input to any decision.
        #[allow(clippy::disallowed_methods)]
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_sync.with_label_values(&labels).set(now);
    }

    /// Adds to `counter` what `value` grew by since the last call for the same key.
    fn advance(
        &self,
        counter: &IntCounterVec,
        labels: &[&str],
        key: (String, GroupId, u64),
        value: u64,
    ) {
        let mut seen = self.seen.lock().expect("metrics");
        let prev = seen.insert(key, value).unwrap_or(0);
        if value > prev {
            counter.with_label_values(labels).inc_by(value - prev);
        }
    }

    /// Refreshes a front end's connection gauges (the front ends count their own
    /// connections; call before [`Metrics::render`]).
    pub fn listener(&self, listener: &str, open: usize, max: usize, rejected: u64) {
        let labels = [self.node.as_str(), listener];
        self.connections.with_label_values(&labels).set(open as i64);
        self.max_connections
            .with_label_values(&labels)
            .set(max as i64);
        let key = (format!("rejected:{listener}"), GroupId::default(), 0);
        self.advance(&self.rejected_connections, &labels, key, rejected);
    }

    /// Refreshes the state gauges from `status` and renders the Prometheus text format.
    pub fn render(&self, status: &NodeStatus) -> String {
        self.clock_in_step
            .with_label_values(&[&self.node])
            .set(status.clock.in_step as i64);
        for peer in &status.clock.peers {
            let labels = [self.node.clone(), peer.node_id.to_string()];
            let labels = [labels[0].as_str(), labels[1].as_str()];
            match (peer.offset_ms, peer.uncertainty_ms) {
                (Some(o), Some(u)) => {
                    self.clock_offset
                        .with_label_values(&labels)
                        .set(o as f64 / 1000.0);
                    self.clock_uncertainty
                        .with_label_values(&labels)
                        .set(u as f64 / 1000.0);
                }
                // No recent sample: no figure rather than a stale one.
                _ => {
                    let _ = self.clock_offset.remove_label_values(&labels);
                    let _ = self.clock_uncertainty.remove_label_values(&labels);
                }
            }
        }
        for link in &status.links {
            self.follower_connected
                .with_label_values(&[&self.node, &link.node_id.to_string()])
                .set(link.connected as i64);
        }
        for st in &status.storage {
            let labels = [self.node.as_str(), st.store.as_str()];
            let key = |what: &str| (format!("{what}:{}", st.store), GroupId::default(), 0);
            self.advance(&self.storage_commits, &labels, key("commits"), st.commits);
            self.advance(&self.storage_fsyncs, &labels, key("fsyncs"), st.fsyncs);
        }
        self.topology_version
            .with_label_values(&[&self.node])
            .set(status.topology_version.min(i64::MAX as u64) as i64);
        self.disk_free
            .with_label_values(&[&self.node])
            .set(status.disk.free_bytes.min(i64::MAX as u64) as i64);
        self.disk_refusing
            .with_label_values(&[&self.node])
            .set(status.disk.refusing.is_some() as i64);
        for part in status.partitions.iter().chain(status.meta.iter()) {
            let g = part.group();
            let ps = part.partition.to_string();
            let labels = [part.keyspace.as_str(), ps.as_str(), self.node.as_str()];
            self.advance(
                &self.applied,
                &labels,
                ("applied".into(), g, 0),
                part.applied_offset,
            );
            self.pending
                .with_label_values(&labels)
                .set(part.last_offset.saturating_sub(part.applied_offset) as i64);
            self.is_leader
                .with_label_values(&labels)
                .set((part.role == "leader") as i64);
            let mut healthy = 0;
            for rep in part.replicas.iter().filter(|r| r.node_id != status.node_id) {
                let rs = rep.node_id.to_string();
                let rl = [
                    part.keyspace.as_str(),
                    ps.as_str(),
                    self.node.as_str(),
                    rs.as_str(),
                ];
                self.lag_ops
                    .with_label_values(&rl)
                    .set(rep.lag_ops.unwrap_or(0) as i64);
                self.lag_seconds
                    .with_label_values(&rl)
                    .set(rep.lag_ms.unwrap_or(0) as f64 / 1000.0);
                if let Some(m) = rep.matched_offset {
                    self.advance(
                        &self.replicated,
                        &rl,
                        ("replicated".into(), g, rep.node_id),
                        m,
                    );
                }
                healthy += (rep.health == "HEALTHY") as i64;
            }
            self.active_followers
                .with_label_values(&labels)
                .set(healthy);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
