//! Expired keys leave through the log (issue 16).
//!
//! A key whose expiry has passed is hidden from reads at once: the replica that serves a
//! read judges liveness by its own clock. But it stays in the state machine until an entry
//! removes it. No replica deletes by its own clock, or replicas of one partition would hold
//! different keys at the same applied offset (Redis's replicas do the same: their master
//! replicates each expiry as a `DEL`). The leader of each partition looks over its keys a
//! page at a time, [`VISIT_PER_ROUND`] keys every [`SWEEP_EVERY`], with a cursor over the
//! key table that wraps at its end, and proposes `KvOp::Evict` with the keys it found
//! expired by its clock. The apply removes each key still expired by the entry's own time
//! stamp, so a key written again since the leader looked stays.
//!
//! Memory: a page holds at most [`VISIT_PER_ROUND`] keys, the cursor one key. Cost: a pass
//! that found no expiry still ahead, and no value with an expiry applied since it began,
//! puts the sweep to rest until one is applied; one that found expiries ahead rests until
//! the earliest is due. A partition whose keys never expire costs a look at a counter every
//! round.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use replikv_types::{Consistency, KvOp, Reply};

use crate::node::{Group, Node};

/// How often each partition's leader looks at a page of its keys.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Keys looked at per round and partition (so at most this many evicted per entry).
pub(crate) const VISIT_PER_ROUND: usize = 1_000;

/// Where one partition's sweep stands.
#[derive(Default)]
struct Cursor {
    /// The key the pass under way goes on from; `None` when no pass is under way.
    from: Option<Vec<u8>>,
    /// The partition's count of expiring puts when the pass began.
    pass_puts: u64,
    /// The earliest expiry still ahead among the keys this pass looked at.
    next_due_ms: Option<u64>,
    /// After a pass: rest until the count of expiring puts is no longer this, or the time
    /// (Unix ms) comes.
    rest: Option<(u64, Option<u64>)>,
}

/// Starts the sweep of group `g`, which runs while this node leads it, until the group
/// shuts down.
pub(crate) fn spawn(node: Arc<Node>, g: Arc<Group>) {
    {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut cursor = Cursor::default();
            let mut leading = false;
            loop {
                tick.tick().await;
                if g.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
                    return;
                }
                let leads = g.is_leader() && !g.transferring.load(Ordering::Relaxed);
                if leads && !leading {
                    // A new leadership: what this replica holds may have come from a
                    // snapshot since its last pass, which the counter does not see.
                    cursor = Cursor::default();
                }
                leading = leads;
                if leads {
                    node.sweep_round(&g, &mut cursor).await;
                }
            }
        });
    }
}

impl Node {
    /// One round of partition `g`'s sweep: a page looked at, its expired keys proposed for
    /// eviction (waiting for the entry, so that rounds never pile up).
    async fn sweep_round(self: &Arc<Self>, g: &Arc<Group>, cursor: &mut Cursor) {
        let now = self.now_ms();
        let puts = g.view.expiring_puts();
        if let Some((at_puts, due)) = cursor.rest {
            if puts == at_puts && due.is_none_or(|d| now < d) {
                return;
            }
            cursor.rest = None;
        }
        let from = cursor.from.get_or_insert_with(|| {
            cursor.pass_puts = puts;
            cursor.next_due_ms = None;
            Vec::new()
        });
        let page = match g.view.expired(from, VISIT_PER_ROUND, now) {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(group = %g.id, error = %e, "expiry sweep could not read the partition");
                return;
            }
        };
        cursor.next_due_ms = cursor.next_due_ms.into_iter().chain(page.next_due_ms).min();
        if !page.expired.is_empty() {
            let found = page.expired.len();
            let op = KvOp::Evict { keys: page.expired };
            match self
                .propose_local(g.id, op, Consistency::Quorum)
                .await
                .await
            {
                Ok(w) => {
                    let n = if let Reply::Int(n) = w.reply { n } else { 0 };
                    self.metrics.evicted(g.id, n.max(0) as u64);
                    tracing::debug!(
                        group = %g.id,
                        found,
                        evicted = n,
                        "expired keys evicted"
                    );
                }
                // Not leading any more, or no quorum: the next leader's sweep finds them.
                Err(e) => {
                    tracing::debug!(group = %g.id, error = %e, "eviction not proposed");
                    return;
                }
            }
        }
        match page.resume {
            Some(next) => cursor.from = Some(next),
            None => {
                cursor.from = None;
                cursor.rest = Some((cursor.pass_puts, cursor.next_due_ms));
            }
        }
    }
}
