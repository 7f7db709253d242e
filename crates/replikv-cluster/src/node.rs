//! [`Node`]: this process's partition groups, the routing of each request to the replica
//! that must serve it, and the consistency waiters. Start-up reads as a script:
//! place partitions → open each group's storage → start its Raft → initialize it from the
//! static membership → let the preferred leader campaign first.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use openraft::{BasicNode, ServerState, SnapshotPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replikv_placement::{place, Member, PartitionPlacement, PlacementTable};
use replikv_raft::{AppendWaiters, CheckpointLimits, KvView, Raft};
use replikv_storage::Stores;
use replikv_types::{Consistency, GroupId, NodeId, ReadPreference};

use crate::clock::ClockCheck;
use crate::lag::FollowerLag;
use crate::meta::{GroupSpec, Topology};
use crate::metrics::Metrics;
use crate::network::GroupNetwork;
use crate::transport::Transport;

/// Everything a node needs to know to run, already validated by the binary.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// Initial members by peer address, this node included.
    pub peers: BTreeMap<NodeId, String>,
    pub replication: Replication,
    /// Test-only injected bug: `primary` reads skip the read index (`debug.skip_read_index`),
    /// so the history checker can be shown to catch stale reads.
    pub skip_read_index: bool,
    /// Test-only injected bug: blind `quorum` writes are acknowledged once the leader's own
    /// log holds them, before they commit (`debug.ack_before_commit`), so the chaos campaign
    /// can be shown to catch lost acknowledged writes.
    pub ack_before_commit: bool,
    /// Test-only injected bug: entries are stamped with the wall clock, not the anchored one
    /// (`debug.stamp_with_wall_clock`), so the chaos campaign can be shown to catch a jumped
    /// clock reaching expiries.
    pub stamp_with_wall_clock: bool,
    /// Where expiry times and write stamps come from.
    pub clock: WallClock,
    /// Seeds this node's own random draws (request ids, early-campaign jitter); `None` draws
    /// the seed from the OS. The deterministic simulation sets it, to a different value at
    /// every start of a node: the high bits of request ids come from it, and an incarnation
    /// reusing them could take an old entry for one of its own waiting writes.
    pub seed: Option<u64>,
    /// When each partition's state machine checkpoints its applied writes into the state
    /// file (`replikv-raft/src/overlay.rs`). The simulation makes it small, so that
    /// checkpoints land between its crashes.
    pub checkpoint: CheckpointLimits,
    /// Called with the topology when this node first knows it, and whenever its members
    /// or the default keyspace's placement change (the binary records them in the data
    /// directory, `node.json`).
    pub on_topology: TopologyHook,
    /// The default keyspace's placement as this node last recorded it (`node.json`): what
    /// keys route by at start until the meta replica gives the topology back, rather than
    /// a placement computed from settings a restart may not have been given.
    pub known_placement: Option<PlacementTable>,
}

/// See [`NodeConfig::on_topology`].
#[derive(Clone, Default)]
pub struct TopologyHook(Option<Arc<TopologyFn>>);

type TopologyFn = dyn Fn(&Topology) + Send + Sync;

impl TopologyHook {
    pub fn new(f: impl Fn(&Topology) + Send + Sync + 'static) -> TopologyHook {
        TopologyHook(Some(Arc::new(f)))
    }

    pub(crate) fn call(&self, t: &Topology) {
        if let Some(f) = &self.0 {
            f(t)
        }
    }
}

impl std::fmt::Debug for TopologyHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "TopologyHook(set)"
        } else {
            "TopologyHook(none)"
        })
    }
}

/// The wall clock a node reads: what its clock check compares with its peers', and what its
/// anchored clock follows while in step (`clock.rs`), never used for stamps directly.
#[derive(Clone, Copy, Debug, Default)]
pub enum WallClock {
    /// The system clock.
    #[default]
    System,
    /// `epoch_ms` at `origin`, advanced by tokio's clock: under a paused runtime (the
    /// deterministic simulation) it moves only with virtual time. `offset_ms`, when set, is
    /// added at every read: the simulation moves it to make the wall clock jump.
    Simulated {
        epoch_ms: u64,
        origin: tokio::time::Instant,
        offset_ms: Option<&'static AtomicI64>,
    },
}

impl WallClock {
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match self {
            #[allow(clippy::disallowed_methods)] // this is the seam
            WallClock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            WallClock::Simulated {
                epoch_ms,
                origin,
                offset_ms,
            } => {
                let t = epoch_ms + origin.elapsed().as_millis() as u64;
                let offset = offset_ms.map_or(0, |o| o.load(Ordering::Relaxed));
                t.saturating_add_signed(offset)
            }
        }
    }
}

/// The `replication:` section of the configuration (docs/CONFIG.md), read as YAML by the
/// binary and used as is here.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replication {
    pub partitions: u32,
    pub factor: usize,
    pub consistency: Consistency,
    pub read_preference: ReadPreference,
    pub max_lag_ms: u64,
    pub write_timeout_ms: u64,
    /// A replica not heard from within this long is UNHEALTHY.
    pub replica_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Entries kept behind a snapshot for lagging replicas (partial sync).
    pub backlog_entries: u64,
    /// Build a snapshot after this many entries.
    pub snapshot_every_entries: u64,
    /// Move leadership back to the preferred leader when it is healthy again.
    pub rebalance_leaders: bool,
    /// Serve `primary` reads under a leader lease instead of one quorum round per read
    /// batch (`lease.rs`).
    pub lease_reads: bool,
    /// Taken off the lease (`election_timeout_max_ms`) for clock drift between replicas.
    pub lease_margin_ms: u64,
    /// Most a node's wall clock may differ from a majority's for it to be in step: to lead,
    /// to be a transfer's target, to serve `secondary` reads (`clock.rs`).
    pub max_clock_offset_ms: u64,
}

impl Default for Replication {
    /// Defaults for a LAN, as DESIGN.md section 4 lists them.
    fn default() -> Self {
        Replication {
            partitions: 8,
            factor: 3,
            consistency: Consistency::Quorum,
            read_preference: ReadPreference::Primary,
            max_lag_ms: 10_000,
            write_timeout_ms: 5_000,
            replica_timeout_ms: 2_000,
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            backlog_entries: 10_000,
            snapshot_every_entries: 20_000,
            rebalance_leaders: true,
            lease_reads: true,
            lease_margin_ms: 100,
            max_clock_offset_ms: 500,
        }
    }
}

impl NodeConfig {
    pub fn new(node_id: NodeId, peers: BTreeMap<NodeId, String>) -> NodeConfig {
        NodeConfig {
            node_id,
            peers,
            replication: Replication::default(),
            skip_read_index: false,
            ack_before_commit: false,
            stamp_with_wall_clock: false,
            clock: WallClock::System,
            seed: None,
            checkpoint: CheckpointLimits::default(),
            on_topology: TopologyHook::default(),
            known_placement: None,
        }
    }
}

/// One group replica hosted by this node.
pub struct Group {
    pub id: GroupId,
    pub raft: Raft,
    pub view: KvView,
    pub placement: PartitionPlacement,
    pub(crate) waiters: Arc<AppendWaiters>,
    pub(crate) lag: Mutex<FollowerLag>,
    /// Set while leadership is being handed to another replica: writes get TRYAGAIN.
    pub(crate) transferring: Arc<AtomicBool>,
    /// Gathers writes into one log entry per batch (`propose.rs`).
    pub(crate) proposer: crate::propose::Proposer,
    /// Proposals hold it shared while they check and submit; a transfer takes it exclusively
    /// to set `transferring`, so no proposal slips in after the transfer began.
    pub(crate) propose_gate: tokio::sync::RwLock<()>,
    /// Whether this replica's election timer may run (see `elections.rs`).
    pub(crate) elections: crate::elections::ElectionGate,
    /// Read-index rounds shared by concurrent `primary` reads (see `read_rounds.rs`).
    pub(crate) read_rounds: crate::read_rounds::ReadRounds,
    /// This leader's read lease, and the wait before votes (see `lease.rs`).
    pub(crate) lease: crate::lease::ReadLease,
    /// Set while this replica recovers from a damaged log (`replikv-raft`'s `damage.rs`): it
    /// votes only for candidates holding up to the high water, and does not campaign.
    pub(crate) recovery: replikv_raft::Recovery,
    /// Hand-offs of leadership while the disk is full: when the last began, and how many
    /// have been tried (each tries the next target).
    pub(crate) hand_off: Mutex<(Option<tokio::time::Instant>, usize)>,
    /// When this node, out of step, last tried to hand this partition over (`clock.rs`).
    pub(crate) clock_handoff: Mutex<Option<Instant>>,
}

impl Group {
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn applied(&self) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0)
    }
}

pub struct Node {
    pub cfg: NodeConfig,
    pub transport: Arc<Transport>,
    /// The default keyspace's placement, as the topology last gave it.
    pub(crate) placement: RwLock<Arc<PlacementTable>>,
    pub metrics: Arc<Metrics>,
    /// The groups this node runs now: the reconciler (`reconcile.rs`) starts and stops them
    /// as the topology changes. Never held across an await.
    pub(crate) groups: RwLock<BTreeMap<GroupId, Arc<Group>>>,
    pub(crate) stores: Stores,
    /// Client endpoints (RESP, HTTP) of every node heard from, for redirects and status.
    pub(crate) endpoints: RwLock<BTreeMap<NodeId, (String, String)>>,
    /// Last leader seen for partitions this node does not host.
    pub(crate) leader_hints: Mutex<HashMap<GroupId, NodeId>>,
    /// The free space of the data directory's disk: below its reserve the node takes no new
    /// data (`replikv-storage`'s `space.rs`).
    pub(crate) space: Arc<replikv_storage::DiskSpace>,
    /// Whether the disk refused new data at the last check, to log each change once.
    pub(crate) disk_refusing: std::sync::atomic::AtomicBool,
    /// This node's random draws, seeded by `cfg.seed` when it is set.
    rng: Mutex<StdRng>,
    /// This node's wall clock against its peers', and the anchored clock it stamps with.
    pub clock: Arc<ClockCheck>,
    /// The Raft settings every group starts with.
    raft_config: Arc<openraft::Config>,
    /// Held by the meta group's leader while it makes one topology change (`meta.rs`).
    pub(crate) meta_changes: tokio::sync::Mutex<()>,
    /// The version of the last topology whose groups this node started.
    pub(crate) topology_version: std::sync::atomic::AtomicU64,
    /// Set by `shutdown`: no group starts after it.
    stopping: AtomicBool,
}

/// The groups node `me` hosts in the placement of `peers` under `replication`: what
/// `Node::start` starts (and what a damaged log's repair must cover).
pub fn hosted_groups(
    me: NodeId,
    peers: &BTreeMap<NodeId, String>,
    replication: &Replication,
) -> Result<std::collections::BTreeSet<GroupId>, String> {
    let members: Vec<Member> = peers.keys().map(|id| Member::new(*id)).collect();
    let factor = replication.factor.min(members.len());
    let placement =
        place(&members, replication.partitions, factor, 1).map_err(|e| e.to_string())?;
    Ok(placement
        .partitions
        .iter()
        .filter(|p| p.replicas.contains(&me))
        .map(|p| GroupId::default_keyspace(p.partition))
        .chain([GroupId::META])
        .collect())
}

impl Node {
    /// Starts the meta group, and then every group the topology gives this node: at once
    /// when its replica of the meta group holds a topology (a restart), otherwise once the
    /// first one is committed (a new cluster, or one made before the meta group existed,
    /// which the meta group's leader bootstraps from its configuration; `reconcile.rs`).
    pub async fn start(
        cfg: NodeConfig,
        stores: Stores,
        transport: Arc<Transport>,
    ) -> Result<Arc<Node>, String> {
        for (id, addr) in &cfg.peers {
            if *id != cfg.node_id {
                transport.add_peer(*id, addr);
            }
        }
        let raft_config = Arc::new(raft_config(&cfg)?);
        let clock = Arc::new(ClockCheck::new(
            cfg.node_id,
            cfg.peers.keys().copied().collect(),
            cfg.clock,
            cfg.replication.max_clock_offset_ms,
        ));
        let mut rng = match cfg.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let meta_placement = crate::meta::meta_placement(&cfg.peers);
        let meta = start_group(
            &cfg,
            &GroupSpec {
                id: GroupId::META,
                may_initialize: meta_placement.replicas.contains(&cfg.node_id),
                placement: meta_placement,
                peers: cfg.peers.clone(),
            },
            &stores,
            transport.clone(),
            raft_config.clone(),
            clock.clone(),
            rng.random(),
        )
        .await?;
        let topology = crate::reconcile::restored_topology(&meta, &cfg).await;
        // Until a topology is known, keys route by the placement the configuration gives
        // (the one a bootstrap proposes).
        let restored = topology
            .as_ref()
            .and_then(|t| t.default_placement().cloned());
        let placement = match restored.or_else(|| cfg.known_placement.clone()) {
            Some(placement) => placement,
            None => {
                let members: Vec<Member> = cfg.peers.keys().map(|id| Member::new(*id)).collect();
                let factor = cfg.replication.factor.min(members.len());
                place(&members, cfg.replication.partitions, factor, 1).map_err(|e| e.to_string())?
            }
        };
        let mut groups = BTreeMap::new();
        groups.insert(GroupId::META, Arc::new(meta));
        let me = transport.me().clone();
        let mut endpoints = BTreeMap::new();
        endpoints.insert(cfg.node_id, (me.resp_addr.clone(), me.http_addr.clone()));
        let space = stores.log.space();
        let node = Arc::new(Node {
            metrics: Arc::new(Metrics::new(cfg.node_id)),
            cfg,
            transport,
            placement: RwLock::new(Arc::new(placement)),
            groups: RwLock::new(groups),
            space,
            disk_refusing: std::sync::atomic::AtomicBool::new(false),
            stores,
            endpoints: RwLock::new(endpoints),
            leader_hints: Mutex::default(),
            rng: Mutex::new(rng),
            clock,
            raft_config,
            meta_changes: tokio::sync::Mutex::new(()),
            topology_version: std::sync::atomic::AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        for group in &node.groups() {
            node.group_started(group);
        }
        // The groups this node has data of start whatever the topology says (their Raft
        // membership is in their own logs): a replica whose meta group cannot re-apply the
        // topology yet (its log was cut at damage, and its leader is away) still serves.
        node.start_local_groups().await?;
        if let Some(t) = &topology {
            node.start_groups_of(t).await?;
        }
        crate::reconcile::spawn(node.clone());
        crate::elections::spawn(node.clone());
        if node.cfg.replication.rebalance_leaders {
            crate::transfer::spawn_rebalancer(node.clone());
        }
        Ok(node)
    }

    /// The tasks every group runs beside its Raft core: the watch on its leadership and its
    /// expiry sweep.
    fn group_started(self: &Arc<Self>, group: &Arc<Group>) {
        crate::transfer::watch_leadership(self.clone(), group.clone());
        crate::sweep::spawn(self.clone(), group.clone());
    }

    /// Starts every group of the default keyspace that this node's log holds records of,
    /// placed as the default keyspace's placement says.
    async fn start_local_groups(self: &Arc<Self>) -> Result<(), String> {
        let placement = self.placement();
        for id in self.stores.log.groups() {
            if id.keyspace != replikv_types::DEFAULT_KEYSPACE_ID || self.hosts(id) {
                continue;
            }
            let Some(pl) = placement.get(id.partition) else {
                tracing::warn!(group = %id, "records of a group the placement does not know; left alone");
                continue;
            };
            let spec = GroupSpec {
                id,
                placement: pl.clone(),
                may_initialize: false,
                peers: BTreeMap::new(),
            };
            self.start_group_here(&spec).await?;
        }
        Ok(())
    }

    /// Starts group `spec` on this node and the tasks beside it.
    async fn start_group_here(self: &Arc<Self>, spec: &GroupSpec) -> Result<(), String> {
        let seed = self.random_u64();
        let group = start_group(
            &self.cfg,
            spec,
            &self.stores,
            self.transport.clone(),
            self.raft_config.clone(),
            self.clock.clone(),
            seed,
        )
        .await?;
        let group = Arc::new(group);
        {
            let mut groups = self.groups.write().expect("groups");
            // Checked under the lock `shutdown` takes its list under: a group is either in
            // that list or never started.
            if self.stopping.load(Ordering::SeqCst) {
                drop(groups);
                let _ = group.raft.shutdown().await;
                return Ok(());
            }
            groups.insert(spec.id, group.clone());
        }
        self.group_started(&group);
        tracing::info!(group = %spec.id, replicas = ?spec.placement.replicas, "group started");
        Ok(())
    }

    /// Starts every group `t` gives this node that it does not run yet.
    pub(crate) async fn start_groups_of(self: &Arc<Self>, t: &Topology) -> Result<(), String> {
        if let Some(now) = t.default_placement() {
            if **self.placement.read().expect("placement") != *now {
                *self.placement.write().expect("placement") = Arc::new(now.clone());
            }
        }
        for spec in t.groups_of(self.id()) {
            if self.hosts(spec.id) {
                continue;
            }
            self.start_group_here(&spec).await?;
        }
        self.topology_version
            .fetch_max(t.version, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn id(&self) -> NodeId {
        self.cfg.node_id
    }

    /// Milliseconds since the Unix epoch, by this node's anchored clock (`clock.rs`): what
    /// its reads judge expiry by and its entries are stamped with.
    pub fn now_ms(&self) -> u64 {
        self.clock.anchored.now_ms()
    }

    /// A draw from this node's random numbers.
    pub(crate) fn random_u64(&self) -> u64 {
        self.rng.lock().expect("node rng").random()
    }

    pub fn group(&self, p: GroupId) -> Option<Arc<Group>> {
        self.groups.read().expect("groups").get(&p).cloned()
    }

    pub(crate) fn hosts(&self, p: GroupId) -> bool {
        self.groups.read().expect("groups").contains_key(&p)
    }

    /// Resolves with the new leader once this node sees partition `p` led by a node other
    /// than `from` in a later term: a request in flight to `from` will then not be answered
    /// soon, if ever. Never resolves on a node that does not host `p`.
    pub(crate) fn leader_moved(
        &self,
        p: GroupId,
        from: NodeId,
    ) -> futures::future::BoxFuture<'static, NodeId> {
        use futures::FutureExt;
        let Some(g) = self.group(p) else {
            return futures::future::pending().boxed();
        };
        let raft = g.raft.clone();
        let term = raft.metrics().borrow().current_term;
        // No leader can be replaced sooner than an election timeout: only requests still
        // waiting by then watch the metrics, so the write path's common case costs a timer.
        let settle = Duration::from_millis(self.cfg.replication.election_timeout_min_ms);
        async move {
            tokio::time::sleep(settle).await;
            let moved = raft
                .wait(None)
                .metrics(
                    move |m| m.current_term > term && m.current_leader.is_some_and(|l| l != from),
                    "leader moved",
                )
                .await;
            match moved {
                Ok(m) => m.current_leader.expect("waited for a leader"),
                // The group shut down: the caller's own timeout answers.
                Err(_) => futures::future::pending().await,
            }
        }
        .boxed()
    }

    /// The groups this node runs now.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .expect("groups")
            .values()
            .cloned()
            .collect()
    }

    /// The default keyspace's placement.
    pub fn placement(&self) -> Arc<PlacementTable> {
        self.placement.read().expect("placement").clone()
    }

    /// The group of the default keyspace that holds `key`.
    pub fn group_of(&self, key: &[u8]) -> GroupId {
        GroupId::default_keyspace(self.placement().partition_for_key(key))
    }

    /// Where group `g` is placed, when this node knows it: the default keyspace's
    /// partitions, and the meta group.
    pub fn placement_of(&self, g: GroupId) -> Option<PartitionPlacement> {
        self.with_placement(g, PartitionPlacement::clone)
    }

    /// `f` of where group `g` is placed, without copying the placement (the write path
    /// asks this of every write).
    pub(crate) fn with_placement<R>(
        &self,
        g: GroupId,
        f: impl FnOnce(&PartitionPlacement) -> R,
    ) -> Option<R> {
        if g.is_meta() {
            return self.group(g).map(|m| f(&m.placement));
        }
        if g.keyspace != replikv_types::DEFAULT_KEYSPACE_ID {
            return None;
        }
        let placement = self.placement.read().expect("placement");
        placement.get(g.partition).map(f)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.replication.write_timeout_ms)
    }

    /// Who leads `p`, as far as this node knows.
    pub fn leader_of(&self, p: GroupId) -> Option<NodeId> {
        if let Some(g) = self.group(p) {
            return g.leader();
        }
        let hint = self.leader_hints.lock().expect("hints").get(&p).copied();
        hint.or_else(|| self.placement_of(p).map(|pl| pl.preferred_leader))
    }

    pub(crate) fn note_leader(&self, p: GroupId, leader: NodeId) {
        if !self.hosts(p) {
            self.leader_hints.lock().expect("hints").insert(p, leader);
        }
    }

    /// For a partition this node does not host, whose believed leader `bad` could not be
    /// reached: point the hint at the next replica, which forwards or names the new leader.
    /// (A hosted partition learns its leader from its own Raft group.)
    pub(crate) fn try_another_replica(&self, p: GroupId, bad: NodeId) {
        if self.hosts(p) {
            return;
        }
        let Some(pl) = self.placement_of(p) else {
            return;
        };
        let n = pl.replicas.len();
        let at = pl.replicas.iter().position(|r| *r == bad).unwrap_or(n - 1);
        let next = (1..=n)
            .map(|k| pl.replicas[(at + k) % n])
            .find(|r| *r != bad);
        if let Some(next) = next {
            self.leader_hints.lock().expect("hints").insert(p, next);
        }
    }

    /// Client endpoints (RESP, HTTP) of `node`, if it has been heard from.
    pub fn endpoints(&self, node: NodeId) -> Option<(String, String)> {
        self.endpoints
            .read()
            .expect("endpoints")
            .get(&node)
            .cloned()
    }

    /// Whether every local partition has a leader (the `/ready` check).
    pub fn ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// The `/ready` check with its reason: the disk takes new data, and every local
    /// partition has a leader.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(why) = self.space.refusal() {
            return Err(format!("writes refused: {why}"));
        }
        match self.topology() {
            Some(t) => {
                if let Some(missing) = t.groups_of(self.id()).iter().find(|s| !self.hosts(s.id)) {
                    return Err(format!("{:#} is not started yet", missing.id));
                }
            }
            // A node that runs groups from its own data serves them without the topology
            // (its meta replica may be waiting for a leader); a new one has none to serve.
            None if self.groups().iter().all(|g| g.id.is_meta()) => {
                return Err("no topology yet: the meta group has not committed one".into());
            }
            None => {}
        }
        // The meta group's leader is needed for topology changes only, not to serve.
        let leaderless = self
            .groups()
            .into_iter()
            .find(|g| !g.id.is_meta() && g.leader().is_none());
        match leaderless {
            Some(g) => Err(format!("{:#} has no leader", g.id)),
            None => Ok(()),
        }
    }

    /// Why this replica of `g` must not take leadership now, if it must not: it is
    /// recovering from a damaged log (it may lack writes it acknowledged), its wall clock is
    /// not in step (its stamps would set expiries, `clock.rs`), or its disk takes no new data
    /// (it could not append a client's write).
    pub(crate) fn unfit_to_lead(&self, g: &Group) -> Option<String> {
        if let Some(hw) = g.recovery.high_water() {
            return Some(format!(
                "node {} is recovering {:#} from a damaged log (up to {hw})",
                self.id(),
                g.id
            ));
        }
        if !self.clock.in_step() {
            return Some(format!(
                "node {}'s wall clock is not in step with a majority of the cluster",
                self.id()
            ));
        }
        self.space
            .refusal()
            .map(|why| format!("node {}: {why}", self.id()))
    }

    /// Reads the disk's free space again (every ping period), and says so when the node
    /// starts or stops refusing new data.
    pub(crate) fn watch_disk(&self) {
        use std::sync::atomic::Ordering;
        let refusing = self.space.refresh();
        if self.disk_refusing.swap(refusing, Ordering::Relaxed) != refusing {
            match self.space.refusal() {
                Some(why) => tracing::error!(
                    free_bytes = self.space.free_bytes(),
                    min_free_bytes = self.space.min_free_bytes(),
                    "disk full: {why}; writes are refused and this node hands off its \
                     leaderships until there is room again (reads still work)"
                ),
                None => tracing::info!(
                    free_bytes = self.space.free_bytes(),
                    "the disk has room again: this node takes writes again"
                ),
            }
        }
    }

    /// Stops every group (their Raft cores) and the storage flusher.
    pub async fn shutdown(&self) {
        // First: a log waiting for room on a full disk gives up, since the cores wait on it.
        self.stores.log.stop();
        let groups = {
            let groups = self.groups.read().expect("groups");
            self.stopping.store(true, Ordering::SeqCst);
            groups.values().cloned().collect::<Vec<_>>()
        };
        for g in &groups {
            let _ = g.raft.shutdown().await;
        }
        self.stores.stop();
    }
}

fn raft_config(cfg: &NodeConfig) -> Result<openraft::Config, String> {
    let config = openraft::Config {
        cluster_name: "replikv".into(),
        heartbeat_interval: cfg.replication.heartbeat_ms,
        election_timeout_min: cfg.replication.election_timeout_min_ms,
        election_timeout_max: cfg.replication.election_timeout_max_ms,
        install_snapshot_timeout: 5_000,
        // Each entry is a batch of up to `propose::MAX_BATCH_BYTES`: 64 of them stay well
        // below the peer frame limit.
        max_payload_entries: 64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.replication.snapshot_every_entries),
        max_in_snapshot_log_to_keep: cfg.replication.backlog_entries,
        // Purge in steps small enough that a short backlog is honoured.
        purge_batch_size: cfg.replication.backlog_entries.clamp(1, 1_024),
        snapshot_max_chunk_size: 1 << 20,
        ..Default::default()
    };
    config.validate().map_err(|e| format!("raft settings: {e}"))
}

/// A peer among `peers` whose meta group is initialized already, if one answers.
async fn meta_runs_on(transport: &Transport, peers: Vec<NodeId>) -> Option<NodeId> {
    use crate::messages::{ClientRequest, ClientResponse, PeerRequest, PeerResponse};
    let me = transport.me().node_id;
    for id in peers.into_iter().filter(|id| *id != me) {
        let Some(peer) = transport.peer(id) else {
            continue;
        };
        let asked = peer
            .request(
                &PeerRequest::Client(ClientRequest::Status),
                Duration::from_millis(500),
            )
            .await;
        if let Ok(PeerResponse::Client(Ok(ClientResponse::Status(st)))) = asked {
            if st.meta.as_ref().is_some_and(|m| m.term > 0) || st.topology_version > 0 {
                return Some(id);
            }
        }
    }
    None
}

async fn start_group(
    cfg: &NodeConfig,
    spec: &GroupSpec,
    stores: &Stores,
    transport: Arc<Transport>,
    raft_config: Arc<openraft::Config>,
    clock: Arc<ClockCheck>,
    req_id_seed: u64,
) -> Result<Group, String> {
    let (p, part) = (spec.id, &spec.placement);
    let (log, sm) = replikv_raft::open_group(stores, p).map_err(|e| format!("{p:#}: {e}"))?;
    let sm = sm.with_checkpoint_limits(cfg.checkpoint);
    let waiters = log.waiters();
    let recovery = log.recovery();
    let view = sm.view();
    let network = GroupNetwork {
        transport: transport.clone(),
        group: p,
    };
    let raft = Raft::new(cfg.node_id, raft_config, network, log, sm)
        .await
        .map_err(|e| format!("{p:#}: {e}"))?;
    let elections = crate::elections::ElectionGate::new();
    if recovery.high_water().is_some() {
        // Not even before the gate's first check (`elections.rs`).
        raft.runtime_config().elect(false);
    }
    let restarted = raft.is_initialized().await.map_err(|e| e.to_string())?;
    // A restarted replica no longer knows when it last heard from its leader: with read
    // leases on, it waits one lease before answering votes (`lease.rs`).
    let lease_len = Duration::from_millis(cfg.replication.election_timeout_max_ms);
    let lease = crate::lease::ReadLease::new(restarted && cfg.replication.lease_reads, lease_len);
    if restarted && cfg.replication.lease_reads {
        // Nor campaign: its demoted vote would let openraft start an election within one
        // election timeout, while a leader it confirmed may still hold a lease.
        elections.hold_off(lease_len, &raft);
    }
    if !restarted && spec.may_initialize {
        let mut members = BTreeMap::new();
        for id in &part.replicas {
            let Some(addr) = spec.peers.get(id) else {
                // Never a smaller group than placed: its majority would be another one.
                return Err(format!("{p:#}: no peer address known for its replica {id}"));
            };
            members.insert(*id, BasicNode::new(addr.clone()));
        }
        // A new cluster: the preferred leader initializes the group and campaigns at once,
        // so leaders start spread out. The other replicas learn the membership from it; if
        // it is not up, they initialize with the same membership (safe, as openraft
        // documents) once a hold of two election timeouts has passed.
        // Initializing campaigns at once, past the election gate: it waits until this
        // node's clock is in step, as any campaign must (`clock.rs`).
        let hold = Duration::from_millis(cfg.replication.election_timeout_max_ms * 2);
        let preferred = part.preferred_leader == cfg.node_id;
        if !preferred {
            elections.hold_for_startup(hold);
        }
        let (r, clock) = (raft.clone(), clock.clone());
        let probe = p
            .is_meta()
            .then(|| (transport.clone(), members.keys().copied().collect()));
        tokio::spawn(async move {
            if !preferred {
                tokio::time::sleep(hold).await;
            }
            while !clock.in_step() {
                tokio::time::sleep(crate::elections::PING_EVERY).await;
            }
            if let Some((transport, peers)) = probe {
                if let Some(peer) = meta_runs_on(&transport, peers).await {
                    // A cluster already runs (this node's disk is new, or its --peers lists
                    // more than the cluster has): its meta leader sends this replica the log
                    // if it is a member; a second initialization could differ from it.
                    tracing::warn!(
                        peer,
                        "the meta group already runs on a peer: not initializing it here \
                         (a node that is not a member must be added, not started with --peers)"
                    );
                    return;
                }
            }
            if preferred {
                if let Err(e) = r.initialize(members).await {
                    tracing::debug!(group = %p, error = %e, "initialize skipped");
                }
            } else if !r.is_initialized().await.unwrap_or(true) {
                tracing::info!(
                    group = %p,
                    "preferred leader absent; initializing the group here"
                );
                let _ = r.initialize(members).await;
            }
        });
    }
    let transferring = Arc::new(AtomicBool::new(false));
    let proposer = crate::propose::Proposer::start(
        p,
        raft.clone(),
        waiters.clone(),
        transferring.clone(),
        crate::propose::Stamps {
            anchored: clock.anchored.clone(),
            wall_bug: cfg.stamp_with_wall_clock.then_some(cfg.clock),
        },
        req_id_seed,
    );
    Ok(Group {
        id: p,
        raft,
        view,
        placement: part.clone(),
        waiters,
        lag: Mutex::default(),
        transferring,
        proposer,
        propose_gate: tokio::sync::RwLock::new(()),
        elections,
        read_rounds: Default::default(),
        lease,
        recovery,
        hand_off: Mutex::new((None, 0)),
        clock_handoff: Mutex::default(),
    })
}
