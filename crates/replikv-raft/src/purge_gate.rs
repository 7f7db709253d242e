//! [`PurgeGate`]: keeps a follower's log from being purged past a snapshot before that
//! snapshot is durable in the state file.
//!
//! The log and the state machines live in two files with a writer each (`Stores`), and a
//! restart needs every entry after the state file's durable snapshot. openraft 0.9.25 breaks
//! that order on a follower: when the last chunk of a leader's snapshot arrives,
//! `install_full_snapshot` queues the install for the state machine and, in the same step,
//! `PurgeLog` up to the snapshot for the log store, with nothing making the purge wait. The
//! small purge commit can reach the disk first; a crash (`kill -9` or power loss) before the
//! install's commit then leaves a log purged past what the state file holds, and the replica
//! can no longer open its partition. (Found by the simulation with its simulated disk,
//! `sim/README.md`.)
//!
//! So the state machine tells the gate when a snapshot starts arriving and when a snapshot
//! (received or built here) has been committed durably, and the log store's `purge` waits
//! while a snapshot is arriving and the purge would reach past the durable one. A purge that
//! stays below the durable snapshot (every purge after a snapshot built here) never waits.

use std::sync::Arc;

use tokio::sync::watch;

use crate::StorageError;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct State {
    /// Last log index covered by the state file's durable snapshot.
    durable: Option<u64>,
    /// A leader's snapshot is arriving or being installed.
    receiving: bool,
    /// The last install failed: a purge past `durable` must not happen.
    failed: bool,
}

/// Shared by one partition's log store and state machine.
#[derive(Clone)]
pub struct PurgeGate {
    state: Arc<watch::Sender<State>>,
}

impl PurgeGate {
    /// `durable`: the last index of the snapshot the state file holds at open.
    pub fn new(durable: Option<u64>) -> PurgeGate {
        let (tx, _) = watch::channel(State {
            durable,
            ..State::default()
        });
        PurgeGate {
            state: Arc::new(tx),
        }
    }

    /// A leader's snapshot has started to arrive.
    pub(crate) fn receiving(&self) {
        self.state.send_modify(|s| {
            s.receiving = true;
            s.failed = false;
        });
    }

    /// A snapshot up to `index` is committed durably in the state file (or, with `None`,
    /// an install failed).
    pub(crate) fn snapshot_durable(&self, index: Option<u64>) {
        self.state.send_modify(|s| {
            s.receiving = false;
            match index {
                Some(i) => s.durable = s.durable.max(Some(i)),
                None => s.failed = true,
            }
        });
    }

    /// Returns once the log may be purged up to `index`.
    pub(crate) async fn ready_to_purge(&self, index: u64) -> Result<(), StorageError> {
        let mut rx = self.state.subscribe();
        let s = *rx
            .wait_for(|s| !s.receiving || s.durable >= Some(index))
            .await
            .map_err(crate::storage_error)?;
        if s.failed && s.durable < Some(index) {
            return Err(crate::storage_error(format!(
                "not purging the log to {index}: the snapshot installed before it failed"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn purges_wait_only_while_a_snapshot_is_arriving_and_beyond_the_durable_one() {
        let gate = PurgeGate::new(Some(10));
        // Nothing arriving: any purge goes ahead (openraft's storage suite purges with no
        // snapshot at all).
        gate.ready_to_purge(50).await.unwrap();

        gate.receiving();
        gate.ready_to_purge(10).await.unwrap();
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.ready_to_purge(99).await })
        };
        // Nothing can let it through before the install below: it must still be waiting.
        let early = tokio::time::timeout(Duration::from_millis(50), async {
            while !waiting.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(early.is_err(), "purged past a snapshot still arriving");
        gate.snapshot_durable(Some(99));
        waiting.await.unwrap().unwrap();

        gate.receiving();
        let refused = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.ready_to_purge(150).await })
        };
        gate.snapshot_durable(None);
        assert!(
            refused.await.unwrap().is_err(),
            "purged past a failed install"
        );
        gate.ready_to_purge(99).await.unwrap();
    }
}
