//! What a node does when its Raft log is damaged: a record in the newest segment fails its
//! checksum with valid records after it (`replikv-storage`'s `raft_log/recover.rs` has the rule
//! that tells this from a torn write). Whatever followed the damage is lost to this node, and
//! some of it may be committed entries that this node acknowledged.
//!
//! - **No other voter.** A partition whose only voter is this node (a single-node cluster, or
//!   a replication factor of 1) has no one to take the lost entries from: the node refuses to
//!   start, naming the file and offset (`DamagedLog::refusal`). Nothing is written.
//! - **Other voters.** The log is cut at the damage, and each partition records its *high
//!   water*: the greatest log id it may have held before, by openraft's order (leader id,
//!   then index). That is its newest discarded entry; for damaged spans after that (with
//!   nothing of the partition after them), one more entry per span that is exactly one record
//!   (the valid record after it begins where its own length says it ends), else per
//!   [`MIN_ENTRY_RECORD`] bytes, of the newest leader it knew; and when the scan for valid records
//!   gave up, an index past any, which only a later leader's entry reaches. Until its log
//!   again reaches the high water (`LogStore`'s [`Recovery`]), the replica votes only for
//!   candidates whose log reaches it, and does not campaign (`replikv-cluster`'s `handler.rs`,
//!   `elections.rs`): it votes as if it still held what it lost, so no candidate missing a
//!   write it acknowledged can win with its vote. Its acknowledgements of new entries stay
//!   sound (openraft appends only after the leader's consistency check), so it keeps
//!   replicating and catches up from the leader; once an entry at or past the high water from
//!   a leader is on its disk, it is an ordinary replica again.
//! - **Votes.** A vote record after the damage (votes only grow) restores the vote; so does
//!   the leader of the newest discarded entry (this node had accepted it as leader). A damaged
//!   record that was itself a vote, with nothing of the partition after it, cannot be
//!   restored: that window is a vote for a candidate that then had nothing accepted by this
//!   node, and docs/design/durability.md says why a second vote then cannot give a second
//!   leader that works.
//! - Every decision is made before anything is written: a refusal leaves the node's files
//!   as they were.

use std::collections::BTreeSet;

use openraft::{CommittedLeaderId, EntryPayload};
use replikv_storage::{Damage, DamagedLog, LogOp, RaftLog, Store};
use replikv_types::GroupId;

use crate::log_store::{covers, COMMITTED, RECOVER_TO, VOTE};
use crate::record::decode_record;
use crate::{LogId, Membership, Vote};

type Result<T> = std::result::Result<T, replikv_storage::StorageError>;

/// No log record of an entry is smaller (segment header, kind, partition, index, the entry
/// record's own header and a blank entry's bincode): lost bytes hold at most one entry each.
pub const MIN_ENTRY_RECORD: u64 = 48;
/// Entries read at a time when a partition's log is searched for memberships.
const SCAN_CHUNK: u64 = 256;

fn err(e: impl std::fmt::Display) -> replikv_storage::StorageError {
    replikv_storage::StorageError(e.to_string())
}

/// [`repair_log_hosting`] for the partitions the log and the state file know of.
pub fn repair_log(
    me: u64,
    members: &BTreeSet<u64>,
    state: &Store,
    log: DamagedLog,
) -> Result<RaftLog> {
    repair_log_hosting(me, members, &BTreeSet::new(), state, log)
}

/// Repairs node `me`'s damaged log when every partition that may have lost entries has
/// another voter, and refuses otherwise (module note). `state` is the node's state file, for
/// the memberships and applied points it holds; `members`, the cluster's configured members,
/// stand in for a partition whose membership nothing recorded yet; `hosted`, the partitions
/// the node hosts, also get a high water when the log holds nothing of theirs (the damaged
/// record may have been their first).
pub fn repair_log_hosting(
    me: u64,
    members: &BTreeSet<u64>,
    hosted: &BTreeSet<GroupId>,
    state: &Store,
    log: DamagedLog,
) -> Result<RaftLog> {
    let damage = log.damage().clone();
    let mut parts: BTreeSet<GroupId> = log.groups().into_iter().collect();
    parts.extend(damage.after.iter().map(group_of));
    parts.extend(hosted.iter().copied());
    let newest_leader = newest_leader(&log, &damage, &parts)?;
    let mut ops = Vec::new();
    let mut snapshots_to_drop = Vec::new();
    let mut refusals = Vec::new();
    let mut alone = Vec::new();
    for p in parts {
        let lost = Lost::of(&damage, p)?;
        let mut voters = latest_membership(&log, state, p, &lost)?;
        if voters.is_empty() {
            voters = members.clone();
        }
        if !voters.iter().any(|v| *v != me) {
            alone.push(p);
            continue;
        }
        // An earlier repair's high water, before the damage or among what it discards (a
        // second damage can hit the first repair's own records; found by the simulation).
        let recorded = log
            .meta(p, RECOVER_TO)
            .map(|raw| bincode::deserialize::<Option<LogId>>(&raw).map_err(err))
            .transpose()?
            .flatten();
        let vote_before = log
            .meta(p, VOTE)
            .map(|raw| bincode::deserialize::<Vote>(&raw).map_err(err))
            .transpose()?;
        let mut dropped = None;
        match mend_the_start(&log, state, p, &lost)? {
            Mend::Refuse(why) => refusals.push(why),
            Mend::Ops {
                ops: mended,
                drop_snapshot,
                dropped: d,
            } => {
                ops.extend(mended);
                if drop_snapshot {
                    snapshots_to_drop.push(p);
                }
                dropped = d;
            }
        }
        // The entries the mend drops were held before the damage and may have been
        // acknowledged: the high water covers them as it covers the discarded ones (found by
        // the simulation, stage 2 seed 146).
        let high_water = [
            recorded,
            lost.recover_to,
            dropped,
            Some(lost.high_water(&log, p, vote_before.as_ref(), &damage, newest_leader)?),
        ]
        .into_iter()
        .flatten()
        .max()
        .expect("one high water at least");
        tracing::error!(
            group = %p,
            discarded_entries = lost.entries.len(),
            first_discarded = lost.entries.first().map(|l| l.index),
            last_discarded = lost.entries.last().map(|l| l.index),
            high_water = %high_water,
            "Raft log damaged: discarding this partition's records after the damage; it votes \
             only for candidates holding up to the high water, and campaigns only after the \
             leader has sent it that far again"
        );
        ops.push(meta(
            p,
            RECOVER_TO,
            bincode::serialize(&Some(high_water)).map_err(err)?,
        ));
        // The saved commit point may lie beyond what the cut kept (it is written apart from
        // the entries; found by the simulation, seed 127): forgotten, openraft re-applies from
        // the applied point, as it does after any restart.
        let none: Option<LogId> = None;
        ops.push(meta(p, COMMITTED, bincode::serialize(&none).map_err(err)?));
        if let Some(v) = lost.restored_vote(vote_before.as_ref()) {
            ops.push(meta(p, VOTE, bincode::serialize(&v).map_err(err)?));
        }
    }
    if !alone.is_empty() {
        let alone: Vec<String> = alone.iter().map(|g| g.to_string()).collect();
        return Err(log.refusal(&format!(
            "group(s) {} have no replica but this node to take the lost entries from",
            alone.join(", ")
        )));
    }
    if !refusals.is_empty() {
        return Err(log.refusal(&refusals.join("; ")));
    }
    // Decided: now written. A crash in between leaves the damage as found (the repair runs
    // again); a snapshot dropped is one openraft builds again.
    for p in snapshots_to_drop {
        state.write_now(move |w| w.snapshot_delete(p))?;
    }
    log.repair(ops)
}

fn meta(p: GroupId, name: &str, value: Vec<u8>) -> LogOp {
    LogOp::Meta {
        g: p,
        name: name.to_string(),
        value,
    }
}

fn group_of(op: &LogOp) -> GroupId {
    match op {
        LogOp::Append { g: p, .. }
        | LogOp::TruncateFrom { g: p, .. }
        | LogOp::PurgeTo { g: p, .. }
        | LogOp::Meta { g: p, .. } => *p,
    }
}

/// The greatest leader id this node knows of in any partition (its votes and last entries,
/// before and after the damage), for a partition that has nothing of its own.
fn newest_leader(
    log: &DamagedLog,
    damage: &Damage,
    parts: &BTreeSet<GroupId>,
) -> Result<Option<CommittedLeaderId<u64>>> {
    let mut newest = None;
    let mut see = |l: CommittedLeaderId<u64>| newest = newest.max(Some(l));
    for p in parts {
        if let Some(raw) = log.meta(*p, VOTE) {
            see(bincode::deserialize::<Vote>(&raw).map_err(err)?.leader_id);
        }
        if let Some((_, raw)) = log.last(*p)? {
            see(decode_record(&raw).map_err(err)?.log_id.leader_id);
        }
    }
    for op in &damage.after {
        match op {
            LogOp::Meta { name, value, .. } if name == VOTE => {
                see(bincode::deserialize::<Vote>(value).map_err(err)?.leader_id)
            }
            LogOp::Append { bytes, .. } => {
                if let Ok(e) = decode_record(bytes) {
                    see(e.log_id.leader_id)
                }
            }
            _ => {}
        }
    }
    Ok(newest)
}

/// What to do about the start of partition `p`'s log.
enum Mend {
    /// The mend's records; whether the stored snapshot must go; and the newest entry it
    /// drops of those held before the damage.
    Ops {
        ops: Vec<LogOp>,
        drop_snapshot: bool,
        dropped: Option<LogId>,
    },
    Refuse(String),
}

/// Records after the damage may already have removed older segments: a purge (a segment
/// goes once all its entries are purged) or a rotation's compaction (a segment goes once its
/// live entries are copied forward). Discarding them leaves the log without entries it held,
/// at its start (found by the simulation). So:
/// - the discarded purges are kept: a purge only ever follows a snapshot the state file holds
///   durably;
/// - if the log still does not run without a gap from its purge point, or ends below the
///   state file's applied point `A`, it is purged up to `A` (which holds everything up to
///   there, and never lies below the purge point), what runs on without a gap from `A + 1`
///   is kept and the rest cut, and the stored snapshot is dropped so that openraft builds one
///   at `A` (it requires a snapshot at or past the purge point). A partition whose state file
///   has applied nothing, and whose log was never purged, starts empty. The leader sends the
///   rest; the high water covers what this replica held.
fn mend_the_start(log: &DamagedLog, state: &Store, p: GroupId, lost: &Lost) -> Result<Mend> {
    let mut ops = Vec::new();
    let mut purged = log.purged(p).map(|(i, _)| i);
    if let Some((index, tag)) = &lost.purge {
        if purged.is_none_or(|i| *index > i) {
            ops.push(LogOp::PurgeTo {
                g: p,
                index: *index,
                tag: tag.clone(),
            });
            purged = Some(*index);
        }
    }
    let runs_from = |from: u64| -> bool {
        let kept = log.indexes(p, from..u64::MAX);
        kept.iter().copied().eq(from..from + kept.len() as u64)
    };
    let applied = state
        .read()
        .map_err(err)?
        .meta_get(p, crate::state_machine::APPLIED)?
        .map(|raw| bincode::deserialize::<Option<LogId>>(&raw).map_err(err))
        .transpose()?
        .flatten();
    // The cut may also leave the log ending below what the state machine applied: openraft
    // would then purge up to the applied point past its snapshot (its invariant: a purge
    // never passes the snapshot). The same mend serves.
    let log_end = log.last(p)?.map(|(i, _)| i).max(purged);
    let behind = applied.is_some_and(|a| log_end.is_none_or(|e| a.index > e));
    if !behind && runs_from(purged.map_or(0, |i| i + 1)) {
        return Ok(Mend::Ops {
            ops,
            drop_snapshot: false,
            dropped: None,
        });
    }
    // Everything the log holds past the applied point may go (below it, the state file holds
    // it): its newest entry is what the high water must reach.
    let dropped = match log.last(p)? {
        Some((i, raw)) if applied.is_none_or(|a| i > a.index) => {
            Some(decode_record(&raw).map_err(err)?.log_id)
        }
        _ => None,
    };
    let (restart_at, drop_snapshot) = match applied {
        Some(a) if purged.is_none_or(|i| a.index >= i) => {
            ops.push(LogOp::PurgeTo {
                g: p,
                index: a.index,
                tag: bincode::serialize(&Some(a)).map_err(err)?,
            });
            if !runs_from(a.index + 1) {
                ops.push(LogOp::TruncateFrom {
                    g: p,
                    index: a.index + 1,
                });
            }
            (a.index + 1, true)
        }
        None if purged.is_none() => {
            ops.push(LogOp::TruncateFrom { g: p, index: 0 });
            (0, false)
        }
        _ => {
            return Ok(Mend::Refuse(format!(
                "group {p}: its log has a gap at its start, and its state file's applied \
                 offset ({applied:?}) is behind the log's purge point ({purged:?}), so no \
                 repair in place can give it a consistent start"
            )))
        }
    };
    tracing::error!(
        group = %p,
        restart_at,
        "Raft log damaged: the records after the damage had removed older segments, or the \
         cut left the log below what was applied; this partition's log restarts at the state \
         file's applied point"
    );
    Ok(Mend::Ops {
        ops,
        drop_snapshot,
        dropped,
    })
}

/// What partition `p` had after the damage: its discarded entries' ids (in log order) and
/// where the newest of them lies, the newest membership among them, its last vote and
/// high-water records there, and its furthest purge.
struct Lost {
    entries: Vec<LogId>,
    /// Where in the segment the newest discarded entry (by log id) lies.
    newest_at: Option<(LogId, u64)>,
    membership: Option<(LogId, BTreeSet<u64>)>,
    vote: Option<Vote>,
    recover_to: Option<LogId>,
    purge: Option<(u64, Vec<u8>)>,
}

impl Lost {
    fn of(damage: &Damage, p: GroupId) -> Result<Lost> {
        let mut lost = Lost {
            entries: Vec::new(),
            newest_at: None,
            membership: None,
            vote: None,
            recover_to: None,
            purge: None,
        };
        for (op, at) in damage.after.iter().zip(&damage.after_offsets) {
            match op {
                LogOp::Append { g: q, bytes, .. } if *q == p => {
                    // Its checksum held: a record this build cannot read is a newer format,
                    // and losing track of it could undercount what was lost.
                    let entry = decode_record(bytes)
                        .map_err(|e| err(format!("group {p}: a record after the damage: {e}")))?;
                    if let EntryPayload::Membership(m) = &entry.payload {
                        lost.membership = Some((entry.log_id, m.voter_ids().collect()));
                    }
                    if lost.newest_at.is_none_or(|(n, _)| entry.log_id >= n) {
                        lost.newest_at = Some((entry.log_id, *at));
                    }
                    lost.entries.push(entry.log_id);
                }
                LogOp::Meta { g: q, name, value } if *q == p && name == VOTE => {
                    lost.vote = Some(bincode::deserialize(value).map_err(err)?);
                }
                LogOp::Meta { g: q, name, value } if *q == p && name == RECOVER_TO => {
                    let hw: Option<LogId> = bincode::deserialize(value).map_err(err)?;
                    if let Some(hw) = hw {
                        if lost.recover_to.is_none_or(|b| covers(&hw, &b)) {
                            lost.recover_to = Some(hw);
                        }
                    }
                }
                LogOp::PurgeTo { g: q, index, tag }
                    if *q == p && lost.purge.as_ref().is_none_or(|(i, _)| index > i) =>
                {
                    lost.purge = Some((*index, tag.clone()));
                }
                _ => {}
            }
        }
        Ok(lost)
    }

    /// The greatest log id partition `p` may have held (module note).
    fn high_water(
        &self,
        log: &DamagedLog,
        p: GroupId,
        vote: Option<&Vote>,
        damage: &Damage,
        newest_leader: Option<CommittedLeaderId<u64>>,
    ) -> Result<LogId> {
        // The bytes lost after what survives of this partition could have held that many
        // more of its entries.
        // A span that is exactly one record held at most one entry.
        let lost_after = |from: u64| -> u64 {
            damage
                .bad_spans
                .iter()
                .filter(|s| s.start >= from)
                .map(|s| match s.one_record {
                    true => 1,
                    false => (s.end - s.start).div_ceil(MIN_ENTRY_RECORD),
                })
                .sum()
        };
        let last = match log.last(p)? {
            Some((_, raw)) => Some(decode_record(&raw).map_err(err)?.log_id),
            None => log
                .purged(p)
                .map(|(_, tag)| bincode::deserialize::<Option<LogId>>(&tag).map_err(err))
                .transpose()?
                .flatten(),
        };
        // The newest leader it may have taken an entry from: of its last entry, its votes,
        // or, with nothing of its own, any partition's.
        let own = [
            last.map(|l| l.leader_id),
            vote.map(|v| v.leader_id),
            self.vote.as_ref().map(|v| v.leader_id),
            self.newest_at.map(|(l, _)| l.leader_id),
        ]
        .into_iter()
        .flatten()
        .max();
        let leader = own.or(newest_leader).unwrap_or_default();
        if !damage.complete {
            // The scan gave up: anything may have been lost. Only an entry of a later leader
            // reaches this.
            return Ok(LogId::new(leader, u64::MAX));
        }
        Ok(match self.newest_at {
            Some((newest, at)) => {
                let more = lost_after(at);
                if more == 0 {
                    newest
                } else {
                    LogId::new(leader, newest.index.saturating_add(more))
                }
            }
            // Nothing of it after the damage: every lost byte may have been its next entries.
            None => LogId::new(
                leader,
                last.map_or(0, |l| l.index.saturating_add(1))
                    .saturating_add(lost_after(0).max(1) - 1),
            ),
        })
    }

    /// The vote to restore, when what was lost holds a later one than `before`.
    fn restored_vote(&self, before: Option<&Vote>) -> Option<Vote> {
        let mut best = before.copied();
        if let Some(v) = self.vote {
            // Written after `before`: votes only grow.
            best = Some(v);
        }
        if let Some(l) = self.entries.iter().map(|l| l.leader_id).max() {
            // This node took that entry from that leader, having voted for it.
            if best.is_none_or(|b| l > b.leader_id) {
                best = Some(Vote::new(l.term, l.node_id));
            }
        }
        (best.as_ref() != before).then_some(best).flatten()
    }
}

/// The voters of partition `p` in its newest membership: among the state file's, the log's
/// before the damage (read a chunk at a time), and the discarded entries'.
fn latest_membership(
    log: &DamagedLog,
    state: &Store,
    p: GroupId,
    lost: &Lost,
) -> Result<BTreeSet<u64>> {
    let mut best: Option<(Option<LogId>, BTreeSet<u64>)> = None;
    let mut consider = |at: Option<LogId>, voters: BTreeSet<u64>| {
        if best.as_ref().is_none_or(|(b, _)| at >= *b) {
            best = Some((at, voters));
        }
    };
    let r = state.read().map_err(err)?;
    if let Some(raw) = r.meta_get(p, crate::state_machine::MEMBERSHIP)? {
        let m: Membership = bincode::deserialize(&raw).map_err(err)?;
        consider(*m.log_id(), m.membership().voter_ids().collect());
    }
    let indexes = log.indexes(p, 0..u64::MAX);
    for chunk in indexes.chunks(SCAN_CHUNK as usize) {
        let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
        for (i, raw) in log.entries(p, first..last + 1)? {
            let entry =
                decode_record(&raw).map_err(|e| err(format!("group {p}: log record {i}: {e}")))?;
            if let EntryPayload::Membership(m) = &entry.payload {
                consider(Some(entry.log_id), m.voter_ids().collect());
            }
        }
    }
    if let Some((at, voters)) = &lost.membership {
        consider(Some(*at), voters.clone());
    }
    Ok(best.map(|(_, v)| v).unwrap_or_default())
}

/// Opens node `me`'s stores under `dir`, repairing a damaged log where the node's partitions
/// have other voters (module note). `members`: the cluster's configured members; `hosted`:
/// the partitions this node hosts.
pub fn open_stores(
    dir: &std::path::Path,
    policy: replikv_storage::FsyncPolicy,
    me: u64,
    members: &BTreeSet<u64>,
    hosted: &BTreeSet<GroupId>,
) -> Result<replikv_storage::Stores> {
    replikv_storage::Stores::open_repairing(dir, policy, |state, log| {
        repair_log_hosting(me, members, hosted, state, log)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    const G0: GroupId = GroupId::default_keyspace(0);
    use openraft::CommittedLeaderId;
    use replikv_storage::{FsLogDir, FsyncPolicy, Opened, WriterKind, SEGMENT_BYTES};

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn record(term: u64, index: u64) -> Vec<u8> {
        crate::record::encode_record(&crate::Entry {
            log_id: id(term, index),
            payload: EntryPayload::Blank,
        })
    }

    /// Simulation stage 2, seed 146: the records after the damage were a rotation's copies
    /// of old entries, whose originals' segment was gone, so the cut left a gap; the mend
    /// purged to the state file's applied point and dropped what lay past the gap, entries of
    /// a later term this replica had acknowledged. Its high water covered only the discarded
    /// copies, so it voted for a candidate without those entries, and a committed write was
    /// lost.
    #[tokio::test]
    async fn the_high_water_covers_the_entries_a_mend_drops() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("log");
        let log = RaftLog::open(&log_dir, FsyncPolicy::Always).unwrap();
        // Entries 0..=2 and 6..=8 (the last two of later terms), then copies of 3..=5 as a
        // rotation writes them; each batch synced.
        for (term, index) in [(1, 0), (1, 1), (1, 2), (1, 6), (2, 7), (3, 8)]
            .into_iter()
            .chain((3..=5).map(|i| (1, i)))
        {
            let op = LogOp::Append {
                g: G0,
                index,
                bytes: record(term, index),
            };
            log.write(true, vec![op]).await.unwrap();
        }
        log.close();
        let seg = std::fs::read_dir(&log_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let copy = record(1, 3);
        let at = bytes
            .windows(copy.len())
            .position(|w| w == copy)
            .expect("the copy of entry 3");
        for b in &mut bytes[at + copy.len() / 2..][..4] {
            *b = !*b;
        }
        std::fs::write(&seg, &bytes).unwrap();

        let state = Store::open(&dir.path().join("state"), FsyncPolicy::Always).unwrap();
        let applied = bincode::serialize(&Some(id(1, 1))).unwrap();
        state
            .write_now(move |w| w.meta_put(G0, crate::state_machine::APPLIED, &applied))
            .unwrap();
        let fs = FsLogDir::new(&log_dir).unwrap();
        let opened = RaftLog::open_checked(
            Box::new(fs),
            FsyncPolicy::Always,
            WriterKind::Thread,
            SEGMENT_BYTES,
        )
        .unwrap();
        let Opened::Damaged(d) = opened else {
            panic!("the inverted copy was not found as damage");
        };
        let members: BTreeSet<u64> = [1, 2, 3].into();
        let repaired = repair_log(1, &members, &state, *d).unwrap();
        let kept: Vec<u64> = repaired
            .entries(G0, 0..u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert!(
            kept.is_empty(),
            "the mend keeps nothing past the gap: {kept:?}"
        );
        let high_water: Option<LogId> =
            bincode::deserialize(&repaired.meta(G0, RECOVER_TO).unwrap()).unwrap();
        assert_eq!(high_water, Some(id(3, 8)), "the newest entry dropped");
        repaired.close();
    }
}
