//! The reconciler: every node runs the groups the topology gives it (`meta.rs`).
//!
//! It wakes whenever this node's replica of the meta group applies something, and once a
//! second, and then:
//! 1. with no topology yet, if this node leads the meta group, it bootstraps one from its
//!    configuration (members from `--peers`, the default keyspace from `replication:`);
//! 2. it reports this node's addresses, zone and region when the topology's record of them
//!    differs (`MetaChange::MemberUp`), so that every member can be reached by its clients;
//! 3. it starts every group the placement gives this node that it does not run yet;
//! 4. on the meta group's leader, it adds every member the meta group does not know as a
//!    learner of it (the meta group has at most five voters; the rest follow it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use replikv_types::GroupId;

use crate::meta::{
    known_topology, read_topology, KeyspacePolicy, MemberInfo, MetaChange, Role, Topology,
};
use crate::node::{Group, Node, NodeConfig};

/// The reconciler also runs this often when the meta group applies nothing.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How long a restarted node waits for its meta replica to re-apply its topology before it
/// goes on without one (and waits for the meta group's leader, like a new node).
const RESTORE_WAIT: Duration = Duration::from_secs(3);

/// The topology a restarted node's meta replica holds, once it has re-applied it; `None` for
/// a meta replica that was never initialized, or one whose topology is not back in time.
pub(crate) async fn restored_topology(meta: &Group, cfg: &NodeConfig) -> Option<Topology> {
    if !meta.raft.is_initialized().await.unwrap_or(false) {
        return None;
    }
    let deadline = tokio::time::Instant::now() + RESTORE_WAIT;
    loop {
        if let Some(t) = known_topology(&meta.view, cfg.clock.now_ms()) {
            return Some(t);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "the meta group's replica here holds no topology yet; waiting for its leader"
            );
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn spawn(node: Arc<Node>) {
    tokio::spawn(async move {
        let Some(meta) = node.group(GroupId::META) else {
            return;
        };
        let reporting = Arc::new(AtomicBool::new(false));
        let mut metrics = meta.raft.metrics();
        let mut applied = None;
        let mut recorded = None;
        loop {
            node.reconcile(&meta, &reporting).await;
            if let Some(t) = known_topology(&meta.view, node.now_ms()) {
                let now = Some((t.peers(), t.default_placement().cloned()));
                if recorded != now {
                    node.cfg.on_topology.call(&t);
                    recorded = now;
                }
            }
            // Woken by what the meta replica applies, not by every heartbeat's metrics.
            let wake = tokio::time::sleep(RECONCILE_EVERY);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    changed = metrics.changed() => {
                        if changed.is_err() {
                            return; // the meta group shut down
                        }
                        let now = metrics.borrow().last_applied;
                        if now != applied {
                            applied = now;
                            break;
                        }
                    }
                    _ = &mut wake => break,
                }
            }
        }
    });
}

impl Node {
    async fn reconcile(self: &Arc<Self>, meta: &Arc<Group>, reporting: &Arc<AtomicBool>) {
        let t = match read_topology(&meta.view, self.now_ms()) {
            Ok(Some(t)) => t,
            Ok(None) => {
                if meta.is_leader() {
                    self.bootstrap().await;
                }
                return;
            }
            // Logged by the readers that go on without it; never bootstrapped over.
            Err(_) => return,
        };
        self.report_member(&t, reporting);
        if let Err(e) = self.start_groups_of(&t).await {
            tracing::error!(error = %e, "starting the groups the topology gives this node failed");
        }
        if meta.is_leader() {
            self.add_meta_learners(meta, &t).await;
        }
    }

    /// Proposes the first topology, from this node's configuration.
    async fn bootstrap(self: &Arc<Self>) {
        let me = self.transport.me().clone();
        let members = self
            .cfg
            .peers
            .iter()
            .map(|(id, peer)| {
                let (resp, http) = if *id == self.id() {
                    (me.resp_addr.clone(), me.http_addr.clone())
                } else {
                    self.endpoints(*id).unwrap_or_default()
                };
                MemberInfo {
                    id: *id,
                    peer_addr: peer.clone(),
                    resp_addr: resp,
                    http_addr: http,
                    zone: None,
                    region: None,
                    role: Role::Voter,
                }
            })
            .collect();
        let policy = KeyspacePolicy::from_replication(&self.cfg.replication);
        let topology = match Topology::bootstrap(members, policy) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "no topology can be made from this configuration");
                return;
            }
        };
        match self
            .change_topology_here(&MetaChange::Bootstrap(topology))
            .await
        {
            Ok(v) => tracing::info!(version = v, "bootstrapped the topology"),
            Err(e) => tracing::debug!(error = %e, "bootstrap not done yet"),
        }
    }

    /// Sends this node's addresses to the meta group's leader when the topology's record of
    /// them differs; one report at a time.
    fn report_member(self: &Arc<Self>, t: &Topology, reporting: &Arc<AtomicBool>) {
        let Some(have) = t.members.get(&self.id()) else {
            return;
        };
        let me = self.transport.me();
        let up = MemberInfo {
            resp_addr: me.resp_addr.clone(),
            http_addr: me.http_addr.clone(),
            ..have.clone()
        };
        if up == *have || reporting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (node, reporting) = (self.clone(), reporting.clone());
        tokio::spawn(async move {
            if let Err(e) = node.change_topology(MetaChange::MemberUp(up)).await {
                tracing::debug!(error = %e, "reporting this node's addresses: not yet");
            }
            reporting.store(false, Ordering::Release);
        });
    }

    /// On the meta group's leader: every member it does not know yet becomes its learner.
    async fn add_meta_learners(&self, meta: &Group, t: &Topology) {
        let known: Vec<u64> = {
            let m = meta.raft.metrics();
            let m = m.borrow();
            m.membership_config.nodes().map(|(id, _)| *id).collect()
        };
        for m in t.members.values().filter(|m| !known.contains(&m.id)) {
            match meta
                .raft
                .add_learner(m.id, BasicNode::new(m.peer_addr.clone()), false)
                .await
            {
                Ok(_) => tracing::info!(node = m.id, "added as a learner of the meta group"),
                Err(e) => tracing::debug!(node = m.id, error = %e, "meta learner not added yet"),
            }
        }
    }
}
