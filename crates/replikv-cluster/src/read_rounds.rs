//! Read-index rounds shared by concurrent reads.
//!
//! A `primary` read needs the leader to confirm, with a quorum, that it still leads at some
//! moment after the read began, and then to apply everything committed before that moment.
//! One confirmation serves every read that was already waiting when it started: those reads
//! all began before it. Reads that arrive while a round is running wait for the next one.
//! So a burst of N concurrent reads costs two quorum round trips at most, not N.
//!
//! A successful round also grants the leader a read lease (`lease.rs`), under which reads
//! need no round at all; rounds then run in the background, to renew it before it ends.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use openraft::error::{CheckIsLeaderError, RaftError};
use replikv_types::{Commit, Error};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::node::Group;

type Waiter = oneshot::Sender<Result<(), Error>>;

#[derive(Default)]
pub(crate) struct ReadRounds {
    state: Mutex<RoundState>,
}

#[derive(Default)]
struct RoundState {
    running: bool,
    waiting: Vec<Waiter>,
}

/// What every round needs: where to count it, how long it may take, and the lease a
/// successful one grants (`None` when leases are off).
#[derive(Clone)]
pub(crate) struct RoundSettings {
    pub metrics: Arc<Metrics>,
    pub timeout: Duration,
    pub lease: Option<Duration>,
}

impl ReadRounds {
    /// Returns once a read index taken after this call began is applied on this leader.
    pub(crate) async fn confirm(
        &self,
        g: &Arc<Group>,
        settings: RoundSettings,
    ) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().expect("read rounds");
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            tokio::spawn(run_rounds(g.clone(), settings, false));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::Internal("read round abandoned".into())))
    }

    /// Starts a round in the background unless one is running: renews the read lease
    /// before it runs out, so that reads under it never wait for one.
    pub(crate) fn renew(&self, g: &Arc<Group>, settings: RoundSettings) {
        let start = !std::mem::replace(&mut self.state.lock().expect("read rounds").running, true);
        if start {
            tokio::spawn(run_rounds(g.clone(), settings, true));
        }
    }
}

/// Runs rounds until no read is waiting (and at least one, for a renewal).
async fn run_rounds(g: Arc<Group>, settings: RoundSettings, mut renewal: bool) {
    loop {
        let batch = {
            let mut st = g.read_rounds.state.lock().expect("read rounds");
            if st.waiting.is_empty() && !renewal {
                st.running = false;
                return;
            }
            std::mem::take(&mut st.waiting)
        };
        renewal = false;
        let result = one_round(&g, &settings).await;
        for w in batch {
            let _ = w.send(result.clone());
        }
    }
}

async fn one_round(g: &Group, settings: &RoundSettings) -> Result<(), Error> {
    let p = g.id;
    settings.metrics.read_round(p);
    // Taken before the round: the heartbeats that confirm it are all sent after this moment.
    let started = Instant::now();
    let vote = g.raft.metrics().borrow().vote;
    let transferring = g.transferring.load(Ordering::SeqCst);
    match tokio::time::timeout(settings.timeout, g.raft.ensure_linearizable()).await {
        Ok(Ok(read_log_id)) => {
            match settings.lease {
                // A transfer's target may campaign a lease after it was told to, and it may
                // have been told already: only rounds that began before the transfer count.
                Some(lease) if !transferring => {
                    let floor = read_log_id.map_or(0, |l| l.index);
                    g.lease.confirmed(vote, started, lease, floor);
                }
                _ => {}
            }
            Ok(())
        }
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
            Err(Error::NotLeader {
                group: p,
                leader: f.leader_id,
            })
        }
        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
            Err(Error::NoQuorum {
                committed: Commit::No,
                detail: format!("read of {p:#}: {q}"),
            })
        }
        Ok(Err(e)) => Err(Error::Internal(e.to_string())),
        Err(_) => Err(Error::Timeout {
            committed: Commit::No,
            detail: format!("the leader of {p:#} could not confirm leadership in time"),
        }),
    }
}
