//! Read-index rounds shared by concurrent reads.
//!
//! A `primary` read needs the leader to confirm, with a quorum, that it still leads at some
//! moment after the read began, and then to apply everything committed before that moment.
//! One confirmation serves every read that was already waiting when it started: those reads
//! all began before it. Reads that arrive while a round is running wait for the next one.
//! So a burst of N concurrent reads costs two quorum round trips at most, not N.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use replikv_types::{Commit, Error};
use tokio::sync::oneshot;

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

impl ReadRounds {
    /// Returns once a read index taken after this call began is applied on this leader.
    pub(crate) async fn confirm(&self, g: &Arc<Group>, timeout: Duration) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().expect("read rounds");
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            tokio::spawn(run_rounds(g.clone(), timeout));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::Internal("read round abandoned".into())))
    }
}

/// Runs rounds until no read is waiting.
async fn run_rounds(g: Arc<Group>, timeout: Duration) {
    loop {
        let batch = {
            let mut st = g.read_rounds.state.lock().expect("read rounds");
            if st.waiting.is_empty() {
                st.running = false;
                return;
            }
            std::mem::take(&mut st.waiting)
        };
        let result = one_round(&g, timeout).await;
        for w in batch {
            let _ = w.send(result.clone());
        }
    }
}

async fn one_round(g: &Group, timeout: Duration) -> Result<(), Error> {
    let p = g.partition;
    match tokio::time::timeout(timeout, g.raft.ensure_linearizable()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
            Err(Error::NotLeader {
                partition: p,
                leader: f.leader_id,
            })
        }
        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
            Err(Error::NoQuorum {
                committed: Commit::No,
                detail: format!("read of partition {p}: {q}"),
            })
        }
        Ok(Err(e)) => Err(Error::Internal(e.to_string())),
        Err(_) => Err(Error::Timeout {
            committed: Commit::No,
            detail: format!("the leader of partition {p} could not confirm leadership in time"),
        }),
    }
}
