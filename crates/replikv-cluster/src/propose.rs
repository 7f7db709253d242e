//! Group commit of proposals. openraft 0.9 turns every `client_write` into its own log entry,
//! its own `append` (which waits for the disk), its own replication message and its own
//! apply, one after another in the partition's Raft core. The proposer instead gathers the
//! writes that queue while the previous entry is being written and proposes them as one
//! entry, so each of those steps is paid once per batch.
//!
//! ```text
//!  propose_local ──Ticket──► queue ──► proposer task ──WriteRequest{ops}──► Raft core
//!        ▲                                  │ waits until the entry is durable here
//!        └── written / durable / applied ◄── fan-out task per batch
//! ```
//! A connection's writes keep their order: the queue is FIFO, and a batch is applied in the
//! order of its writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResult;
use replikv_raft::{AppendWaiters, Raft, TypeConfig};
use replikv_types::{Commit, Error, GroupId, KvOp, Ops, Reply, WriteRequest};
use tokio::sync::{mpsc, oneshot};

use crate::clock::AnchoredClock;
use crate::node::WallClock;

/// Where entries' time stamps come from.
pub(crate) struct Stamps {
    /// The anchored clock (`clock.rs`), which a jump of the wall clock does not reach.
    pub anchored: Arc<AnchoredClock>,
    /// The injected bug `debug.stamp_with_wall_clock`: the wall clock instead.
    pub wall_bug: Option<WallClock>,
}

impl Stamps {
    fn now_ms(&self) -> u64 {
        match self.wall_bug {
            Some(wall) => wall.now_ms(),
            None => self.anchored.now_ms(),
        }
    }
}

/// Most writes in one entry.
const MAX_BATCH_OPS: usize = 1024;
/// Most key and value bytes in one entry (a single larger write goes alone). With openraft's
/// `max_payload_entries` this bounds a replication message well below the peer frame limit.
pub(crate) const MAX_BATCH_BYTES: usize = 256 << 10;
/// Longest the proposer waits for one entry to reach the disk before it proposes the next
/// (a bound for when that signal never comes, such as a lost leadership).
const PACE_LIMIT: Duration = Duration::from_millis(100);

/// What a write waits for before it is acknowledged, besides its reply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Early {
    /// Nothing: the reply comes when the entry is applied.
    No,
    /// The entry is written to this leader's log (`eventual`).
    Written,
    /// The entry is on this leader's disk (`at_least(n)` below a majority).
    Durable,
}

/// The result of applying one write: its entry's offset and its reply.
pub(crate) type Applied = Result<(u64, Reply), Error>;

/// A queued write's answers.
pub(crate) struct Ticket {
    /// The entry's offset once the `Early` condition holds (absent for `Early::No`). Dropped
    /// without a value when the condition is never reported.
    pub early: Option<oneshot::Receiver<u64>>,
    /// Dropped without a value when the leader lost its leadership before answering.
    pub applied: oneshot::Receiver<Applied>,
}

struct Queued {
    op: KvOp,
    early: Option<(Early, oneshot::Sender<u64>)>,
    applied: oneshot::Sender<Applied>,
}

/// One partition's proposal queue; the task behind it ends when the queue is dropped.
pub(crate) struct Proposer {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Proposer {
    pub(crate) fn start(
        partition: GroupId,
        raft: Raft,
        waiters: Arc<AppendWaiters>,
        transferring: Arc<AtomicBool>,
        clock: Stamps,
        req_id_seed: u64,
    ) -> Proposer {
        let (queue, rx) = mpsc::unbounded_channel();
        let ids = req_id_seed & 0xffff_ffff_0000_0000;
        tokio::spawn(run(partition, raft, waiters, transferring, clock, ids, rx));
        Proposer { queue }
    }

    /// Queues `op`; the order of calls is the order in the log.
    pub(crate) fn submit(&self, op: KvOp, early: Early) -> Ticket {
        let (applied_tx, applied) = oneshot::channel();
        let (early_tx, early_rx) = match early {
            Early::No => (None, None),
            e => {
                let (tx, rx) = oneshot::channel();
                (Some((e, tx)), Some(rx))
            }
        };
        // A send fails only when the task ended (shutdown); the dropped senders then say so.
        let _ = self.queue.send(Queued {
            op,
            early: early_tx,
            applied: applied_tx,
        });
        Ticket {
            early: early_rx,
            applied,
        }
    }
}

async fn run(
    p: GroupId,
    raft: Raft,
    waiters: Arc<AppendWaiters>,
    transferring: Arc<AtomicBool>,
    clock: Stamps,
    // Random high bits: an entry another leader proposed, appended here later, must never
    // match an id this process registered.
    mut next_id: u64,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.op.payload_bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(q) => {
                    bytes += q.op.payload_bytes();
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        // A leadership transfer began after these were queued: they were never proposed.
        if transferring.load(Ordering::SeqCst) {
            for q in batch {
                let _ = q.applied.send(Err(Error::TryAgain(format!(
                    "leadership of {p:#} is moving; retry"
                ))));
            }
            continue;
        }
        let id = next_id;
        next_id += 1;
        let signals = waiters.register(id);
        let mut ops = Vec::with_capacity(batch.len());
        let mut tickets = Vec::with_capacity(batch.len());
        for q in batch {
            ops.push(q.op);
            tickets.push((q.early, q.applied));
        }
        let req = WriteRequest {
            req_id: id,
            now_ms: clock.now_ms(),
            ops: Ops::encode(&ops),
        };
        let applied = match raft.client_write_ff(req).await {
            Ok(rx) => rx,
            Err(e) => {
                waiters.forget(id);
                for (_, tx) in tickets {
                    let _ = tx.send(Err(Error::Internal(format!("{p:#} stopped: {e}"))));
                }
                continue;
            }
        };
        let (paced_tx, paced) = oneshot::channel();
        let w = waiters.clone();
        tokio::spawn(async move {
            fan_out(p, tickets, signals, applied, paced_tx).await;
            w.forget(id);
        });
        // Group commit: the writes that arrive while this entry is written form the next.
        let _ = tokio::time::timeout(PACE_LIMIT, paced).await;
    }
}

type EarlyTx = Option<(Early, oneshot::Sender<u64>)>;

/// Answers one batch's writes as its entry is written, made durable and applied; fires
/// `paced` at the first of durable or answered.
async fn fan_out<E>(
    p: GroupId,
    tickets: Vec<(EarlyTx, oneshot::Sender<Applied>)>,
    signals: replikv_raft::AppendSignals,
    applied: impl std::future::Future<Output = Result<ClientWriteResult<TypeConfig>, E>>,
    paced: oneshot::Sender<()>,
) {
    let (mut early, replies): (Vec<EarlyTx>, Vec<_>) = tickets.into_iter().unzip();
    let mut paced = Some(paced);
    let (mut written, mut durable) = (signals.written, signals.durable);
    let (mut written_done, mut durable_done) = (false, false);
    tokio::pin!(applied);
    let result = loop {
        tokio::select! {
            r = &mut written, if !written_done => {
                written_done = true;
                if let Ok(offset) = r {
                    tell(&mut early, Early::Written, offset);
                }
            }
            r = &mut durable, if !durable_done => {
                durable_done = true;
                if let Ok(offset) = r {
                    tell(&mut early, Early::Written, offset);
                    tell(&mut early, Early::Durable, offset);
                }
                if let Some(tx) = paced.take() {
                    let _ = tx.send(());
                }
            }
            r = &mut applied => break r,
        }
    };
    if let Some(tx) = paced.take() {
        let _ = tx.send(());
    }
    // Early signals not given by now never will be; dropping them lets waiters fall back
    // to the applied answer.
    drop(early);
    match result {
        Ok(Ok(resp)) => {
            let offset = resp.log_id.index;
            let (asked, got) = (replies.len(), resp.data.0.len());
            if asked != got {
                for tx in replies {
                    let _ = tx.send(Err(Error::Internal(format!(
                        "{p:#}: an entry of {asked} writes was applied with {got} replies"
                    ))));
                }
                return;
            }
            for (tx, reply) in replies.into_iter().zip(resp.data.0) {
                let _ = tx.send(Ok((offset, reply)));
            }
        }
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
            for tx in replies {
                let _ = tx.send(Err(Error::NotLeader {
                    group: p,
                    leader: f.leader_id,
                }));
            }
        }
        Ok(Err(e)) => {
            for tx in replies {
                let _ = tx.send(Err(Error::Internal(e.to_string())));
            }
        }
        Err(_) => {
            for tx in replies {
                let _ = tx.send(Err(Error::Timeout {
                    committed: Commit::Unknown,
                    detail: format!("{p:#} lost leadership before answering"),
                }));
            }
        }
    }
}

fn tell(early: &mut [EarlyTx], stage: Early, offset: u64) {
    for slot in early.iter_mut() {
        if slot.as_ref().is_some_and(|(e, _)| *e == stage) {
            if let Some((_, tx)) = slot.take() {
                let _ = tx.send(offset);
            }
        }
    }
}
