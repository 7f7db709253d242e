//! Replicated write commands and how each changes one key.
//!
//! A [`WriteRequest`] is what the leader proposes to a partition's Raft log. It carries the
//! leader's wall clock (`now_ms`) so that every replica evaluates expiry identically when it
//! applies the entry: applying must be deterministic, so no replica reads its own clock here.
//! Its writes travel as [`Ops`], encoded once by the proposer and decoded once per apply.
//!
//! Time comes from the log: a relative expiry (`EX`, `PX`, `EXPIRE`...) travels as
//! [`Expiry::After`] and becomes an absolute time only at apply, with the entry's `now_ms`,
//! so every replica stores the same absolute expiry whichever node took the request; an
//! absolute one (`EXAT`, `PXAT`, `EXPIREAT`...) keeps the client's value ([`Expiry::At`]).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One entry of a partition's log, as proposed by the leader: the writes that queued while
/// the previous entry was being written, applied in order (group commit). One entry per
/// batch rather than per write means one append, one replication message and one apply per
/// batch in every replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WriteRequest {
    /// Unique per proposing node and process; lets the proposer learn the entry's offset.
    pub req_id: u64,
    /// The leader's wall clock at proposal, in Unix milliseconds.
    pub now_ms: u64,
    pub ops: Ops,
}

/// A batch's writes in their encoded form (the bincode of a `Vec<KvOp>`), held as one buffer.
///
/// An entry's writes are read far more often than they are evaluated: the leader reads each
/// entry back from its log once per follower to replicate it, each follower decodes the
/// message and encodes the entry again for its own log, and only the apply needs the writes
/// themselves. As one buffer, each of those steps costs one copy of the batch instead of an
/// allocation per key and value; [`Ops::decode`] runs once, at apply.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ops(Bytes);

impl Ops {
    pub fn encode(ops: &[KvOp]) -> Ops {
        Ops(Bytes::from(
            bincode::serialize(ops).expect("writes always serialise"),
        ))
    }

    /// The writes, in order. Fails only on bytes that were not made by [`Ops::encode`].
    pub fn decode(&self) -> Result<Vec<KvOp>, String> {
        bincode::deserialize(&self.0).map_err(|e| format!("undecodable writes: {e}"))
    }

    /// The encoded bytes, for reading writes of an older format (`replikv-raft`'s records).
    pub fn encoded(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.decode() {
            Ok(ops) => f.debug_list().entries(ops).finish(),
            Err(e) => write!(f, "<{} bytes: {e}>", self.0.len()),
        }
    }
}

/// The replies to a [`WriteRequest`]'s writes, in the order of its `ops`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Replies(pub Vec<Reply>);

/// Condition of `SET ... NX|XX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetCond {
    Always,
    IfAbsent,
    IfPresent,
}

/// Condition of `EXPIRE ... NX|XX|GT|LT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpireCond {
    Always,
    IfNoTtl,
    IfTtl,
    IfGreater,
    IfLess,
}

/// When a write makes a key expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expiry {
    /// At this Unix time in milliseconds: the client's own (`EXAT`, `PXAT`, `EXPIREAT`,
    /// `PEXPIREAT`). A time at or before the entry's `now_ms` deletes the key.
    At(u64),
    /// This many milliseconds after the entry's time stamp (`EX`, `PX`, `SETEX`, `PSETEX`,
    /// `EXPIRE`, `PEXPIRE`): resolved at apply, once, with the leader's `now_ms`. `After(0)`
    /// is how a non-positive `EXPIRE` travels: it deletes the key, as in Redis.
    After(u64),
}

impl Expiry {
    /// The absolute expiry, in Unix milliseconds, of a write applied with time stamp `now_ms`.
    pub fn resolve(self, now_ms: u64) -> u64 {
        match self {
            Expiry::At(at) => at,
            Expiry::After(ms) => now_ms.saturating_add(ms),
        }
    }
}

/// A write to keys of one partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvOp {
    Set {
        key: Bytes,
        value: Bytes,
        expire: Option<Expiry>,
        keep_ttl: bool,
        cond: SetCond,
        get: bool,
    },
    /// `MSET` (or `MSETNX` with `if_none_exist`) restricted to one partition's keys.
    MSet {
        pairs: Vec<(Bytes, Bytes)>,
        if_none_exist: bool,
    },
    Del {
        keys: Vec<Bytes>,
    },
    GetDel {
        key: Bytes,
    },
    IncrBy {
        key: Bytes,
        delta: i64,
    },
    IncrByFloat {
        key: Bytes,
        delta: f64,
    },
    Append {
        key: Bytes,
        value: Bytes,
    },
    /// `expiry: None` removes the TTL (`PERSIST`).
    Expire {
        key: Bytes,
        expiry: Option<Expiry>,
        cond: ExpireCond,
    },
    /// Proposed by a partition's leader, never by a client: removes each of `keys` whose
    /// stored expiry is at or before the entry's `now_ms` (a key written again since the
    /// leader found it expired stays). Expired keys leave every replica through the log, as
    /// Redis's master replicates a DEL; no replica deletes by its own clock.
    Evict {
        keys: Vec<Bytes>,
    },
}

impl KvOp {
    /// The keys this write touches, for routing.
    pub fn keys(&self) -> Vec<&Bytes> {
        match self {
            KvOp::Set { key, .. }
            | KvOp::GetDel { key }
            | KvOp::IncrBy { key, .. }
            | KvOp::IncrByFloat { key, .. }
            | KvOp::Append { key, .. }
            | KvOp::Expire { key, .. } => vec![key],
            KvOp::MSet { pairs, .. } => pairs.iter().map(|(k, _)| k).collect(),
            KvOp::Del { keys } | KvOp::Evict { keys } => keys.iter().collect(),
        }
    }

    /// About how many bytes the write takes in a log entry (keys and values).
    pub fn payload_bytes(&self) -> usize {
        match self {
            KvOp::Set { key, value, .. } | KvOp::Append { key, value } => key.len() + value.len(),
            KvOp::MSet { pairs, .. } => pairs.iter().map(|(k, v)| k.len() + v.len()).sum(),
            KvOp::Del { keys } | KvOp::Evict { keys } => keys.iter().map(|k| k.len()).sum(),
            KvOp::GetDel { key }
            | KvOp::IncrBy { key, .. }
            | KvOp::IncrByFloat { key, .. }
            | KvOp::Expire { key, .. } => key.len(),
        }
    }

    /// False when neither the change nor the reply depends on the key's current value (a plain
    /// `SET`), so that applying it need not read the key first.
    pub fn reads_current(&self) -> bool {
        !matches!(
            self,
            KvOp::Set {
                cond: SetCond::Always,
                get: false,
                keep_ttl: false,
                ..
            }
        )
    }

    /// True when the reply does not depend on the state before the write, so that the write
    /// can be acknowledged before it is applied (`eventual`, small `at_least`).
    pub fn is_blind(&self) -> bool {
        match self {
            KvOp::Set { cond, get, .. } => *cond == SetCond::Always && !get,
            KvOp::MSet { if_none_exist, .. } => !if_none_exist,
            _ => false,
        }
    }
}

/// A reply, independent of the protocol that carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Nil,
    Bulk(Bytes),
    Int(i64),
    Array(Vec<Reply>),
    /// An error that belongs to the command itself (wrong type of value, overflow); the
    /// write changed nothing.
    Error(String),
}

/// The result of an acknowledged write: its reply and where it sits in the partition's log
/// (the offset is the session token a client uses for read-your-writes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WriteOutcome {
    pub reply: Reply,
    pub group: crate::GroupId,
    pub offset: u64,
}

/// A value with its expiry, as a read returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ValueWithTtl {
    pub data: Bytes,
    /// The absolute expiry (Unix ms), as stored: `EXPIRETIME`, `PEXPIRETIME`.
    pub expire_at_ms: Option<u64>,
    /// The time left (ms) as the replica that served the read counted it with its own
    /// clock, when it judged the value live: `TTL`, `PTTL`. The node that answers the
    /// client may be another one, with another clock; it reports this figure as it is.
    pub ttl_ms: Option<u64>,
}

impl ValueWithTtl {
    /// `value` as read at `now_ms` by the replica serving the read (`value` must be live then).
    pub fn served_at(value: StoredValue, now_ms: u64) -> ValueWithTtl {
        ValueWithTtl {
            ttl_ms: value.expire_at_ms.map(|at| at.saturating_sub(now_ms)),
            expire_at_ms: value.expire_at_ms,
            data: value.data,
        }
    }
}

/// A value as the state machine stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredValue {
    pub data: Bytes,
    pub expire_at_ms: Option<u64>,
}

/// Format version of an encoded [`StoredValue`].
const VALUE_FORMAT_V1: u8 = 1;

impl StoredValue {
    /// `[version u8][expire_at_ms u64 LE, 0 = none][data]`
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.data.len());
        out.push(VALUE_FORMAT_V1);
        out.extend_from_slice(&self.expire_at_ms.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// The expiry of an encoded value (`Some(None)`: none), without copying its data.
    pub fn decode_expiry(raw: &[u8]) -> Option<Option<u64>> {
        if raw.len() < 9 || raw[0] != VALUE_FORMAT_V1 {
            return None;
        }
        let expire = u64::from_le_bytes(raw[1..9].try_into().ok()?);
        Some((expire != 0).then_some(expire))
    }

    pub fn decode(raw: &[u8]) -> Option<StoredValue> {
        if raw.len() < 9 || raw[0] != VALUE_FORMAT_V1 {
            return None;
        }
        let expire = u64::from_le_bytes(raw[1..9].try_into().ok()?);
        Some(StoredValue {
            data: Bytes::copy_from_slice(&raw[9..]),
            expire_at_ms: (expire != 0).then_some(expire),
        })
    }

    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expire_at_ms.is_none_or(|at| at > now_ms)
    }
}

/// What applying an op does to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Keep,
    Put(StoredValue),
    Delete,
}

/// A partition's key table as an apply sees it: encoded [`StoredValue`]s by key. The real
/// state machine implements it over a redb write transaction, the simulation over a map.
pub trait KeyTable {
    type Error;
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;
    fn put(&mut self, key: &[u8], encoded: &[u8]) -> Result<(), Self::Error>;
    fn delete(&mut self, key: &[u8]) -> Result<(), Self::Error>;
}

/// Applies one write to `table` as of `now_ms` (the proposer's clock): the one apply both
/// the state machine and the simulation run.
pub fn apply_op<T: KeyTable>(table: &mut T, op: &KvOp, now_ms: u64) -> Result<Reply, T::Error> {
    let live = |table: &mut T, key: &[u8]| -> Result<Option<StoredValue>, T::Error> {
        Ok(table
            .get(key)?
            .and_then(|raw| StoredValue::decode(&raw))
            .filter(|v| v.is_live(now_ms)))
    };
    match op {
        KvOp::MSet {
            pairs,
            if_none_exist,
        } => {
            if *if_none_exist {
                for (k, _) in pairs {
                    if live(table, k)?.is_some() {
                        return Ok(Reply::Int(0));
                    }
                }
            }
            for (k, v) in pairs {
                let stored = StoredValue {
                    data: v.clone(),
                    expire_at_ms: None,
                };
                table.put(k, &stored.encode())?;
            }
            Ok(if *if_none_exist {
                Reply::Int(1)
            } else {
                Reply::Ok
            })
        }
        KvOp::Del { keys } => {
            let mut n = 0;
            for k in keys {
                if live(table, k)?.is_some() {
                    n += 1;
                }
                table.delete(k)?;
            }
            Ok(Reply::Int(n))
        }
        KvOp::Evict { keys } => {
            let mut n = 0;
            for k in keys {
                let expired = table
                    .get(k)?
                    .and_then(|raw| StoredValue::decode_expiry(&raw))
                    .is_some_and(|at| at.is_some_and(|at| at <= now_ms));
                if expired {
                    table.delete(k)?;
                    n += 1;
                }
            }
            Ok(Reply::Int(n))
        }
        op => {
            let key = op.keys()[0].clone();
            let current = if op.reads_current() {
                live(table, &key)?
            } else {
                None
            };
            let (change, reply) = apply_one(op, current.as_ref(), now_ms);
            match change {
                Change::Keep => {}
                Change::Put(v) => table.put(&key, &v.encode())?,
                Change::Delete => table.delete(&key)?,
            }
            Ok(reply)
        }
    }
}

/// Evaluates a single-key op against the key's current live value (expired values must be
/// passed as `None`). Deterministic: depends only on its arguments.
pub fn apply_one(op: &KvOp, current: Option<&StoredValue>, now_ms: u64) -> (Change, Reply) {
    match op {
        KvOp::Set {
            value,
            expire,
            keep_ttl,
            cond,
            get,
            ..
        } => {
            let allowed = match cond {
                SetCond::Always => true,
                SetCond::IfAbsent => current.is_none(),
                SetCond::IfPresent => current.is_some(),
            };
            let old = current.map(|v| Reply::Bulk(v.data.clone()));
            let reply = match (get, allowed) {
                (true, _) => old.unwrap_or(Reply::Nil),
                (false, true) => Reply::Ok,
                (false, false) => Reply::Nil,
            };
            if !allowed {
                return (Change::Keep, reply);
            }
            let at = if *keep_ttl {
                current.and_then(|v| v.expire_at_ms)
            } else {
                expire.map(|e| e.resolve(now_ms))
            };
            if at.is_some_and(|at| at <= now_ms) {
                // Already expired (`PXAT` in the past): Redis keeps nothing of it either.
                return (Change::Delete, reply);
            }
            let put = StoredValue {
                data: value.clone(),
                expire_at_ms: at,
            };
            (Change::Put(put), reply)
        }
        KvOp::GetDel { .. } => match current {
            Some(v) => (Change::Delete, Reply::Bulk(v.data.clone())),
            None => (Change::Keep, Reply::Nil),
        },
        KvOp::IncrBy { delta, .. } => incr_by(current, *delta),
        KvOp::IncrByFloat { delta, .. } => incr_by_float(current, *delta),
        KvOp::Append { value, .. } => {
            let mut data = current.map(|v| v.data.to_vec()).unwrap_or_default();
            data.extend_from_slice(value);
            let len = data.len() as i64;
            let put = StoredValue {
                data: Bytes::from(data),
                expire_at_ms: current.and_then(|v| v.expire_at_ms),
            };
            (Change::Put(put), Reply::Int(len))
        }
        KvOp::Expire { expiry, cond, .. } => expire(current, *expiry, *cond, now_ms),
        KvOp::MSet { .. } | KvOp::Del { .. } | KvOp::Evict { .. } => {
            unreachable!("multi-key ops are split by the state machine before apply_one")
        }
    }
}

fn incr_by(current: Option<&StoredValue>, delta: i64) -> (Change, Reply) {
    let base = match current {
        None => 0,
        Some(v) => match std::str::from_utf8(&v.data)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(n) => n,
            None => return not_integer(),
        },
    };
    let Some(next) = base.checked_add(delta) else {
        return (
            Change::Keep,
            Reply::Error("ERR increment or decrement would overflow".into()),
        );
    };
    let put = StoredValue {
        data: Bytes::from(next.to_string()),
        expire_at_ms: current.and_then(|v| v.expire_at_ms),
    };
    (Change::Put(put), Reply::Int(next))
}

fn not_integer() -> (Change, Reply) {
    (
        Change::Keep,
        Reply::Error("ERR value is not an integer or out of range".into()),
    )
}

fn incr_by_float(current: Option<&StoredValue>, delta: f64) -> (Change, Reply) {
    let base = match current {
        None => 0.0,
        Some(v) => match std::str::from_utf8(&v.data)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            Some(n) if n.is_finite() => n,
            _ => {
                return (
                    Change::Keep,
                    Reply::Error("ERR value is not a valid float".into()),
                )
            }
        },
    };
    let next = base + delta;
    if !next.is_finite() {
        return (
            Change::Keep,
            Reply::Error("ERR increment would produce NaN or Infinity".into()),
        );
    }
    let text = format_float(next);
    let put = StoredValue {
        data: Bytes::from(text.clone()),
        expire_at_ms: current.and_then(|v| v.expire_at_ms),
    };
    (Change::Put(put), Reply::Bulk(Bytes::from(text)))
}

/// Redis prints floats without a trailing `.0` and with up to 17 significant digits.
pub fn format_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e17 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.17}");
        let s = s.trim_end_matches('0');
        s.trim_end_matches('.').to_string()
    }
}

/// `EXPIRE` and its family, as Redis's `expireGenericCommand`: no key, 0; a condition that
/// fails, 0; a time at or before `now_ms` deletes the key (1); otherwise it is set (1).
fn expire(
    current: Option<&StoredValue>,
    expiry: Option<Expiry>,
    cond: ExpireCond,
    now_ms: u64,
) -> (Change, Reply) {
    let Some(v) = current else {
        return (Change::Keep, Reply::Int(0));
    };
    let Some(at) = expiry.map(|e| e.resolve(now_ms)) else {
        // PERSIST
        if v.expire_at_ms.is_none() {
            return (Change::Keep, Reply::Int(0));
        }
        let put = StoredValue {
            data: v.data.clone(),
            expire_at_ms: None,
        };
        return (Change::Put(put), Reply::Int(1));
    };
    let allowed = match (cond, v.expire_at_ms) {
        (ExpireCond::Always, _) => true,
        (ExpireCond::IfNoTtl, ttl) => ttl.is_none(),
        (ExpireCond::IfTtl, ttl) => ttl.is_some(),
        // A key without a TTL counts as an infinite TTL, as in Redis.
        (ExpireCond::IfGreater, ttl) => ttl.is_some_and(|t| at > t),
        (ExpireCond::IfLess, ttl) => ttl.is_none_or(|t| at < t),
    };
    if !allowed {
        return (Change::Keep, Reply::Int(0));
    }
    if at <= now_ms {
        return (Change::Delete, Reply::Int(1));
    }
    let put = StoredValue {
        data: v.data.clone(),
        expire_at_ms: Some(at),
    };
    (Change::Put(put), Reply::Int(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(s: &str) -> StoredValue {
        StoredValue {
            data: Bytes::copy_from_slice(s.as_bytes()),
            expire_at_ms: None,
        }
    }

    fn set(cond: SetCond, get: bool) -> KvOp {
        KvOp::Set {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"new"),
            expire: None,
            keep_ttl: false,
            cond,
            get,
        }
    }

    #[test]
    fn a_write_that_does_not_read_the_key_applies_the_same_whatever_it_held() {
        let set = |keep_ttl, get, cond| KvOp::Set {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            expire: Some(Expiry::At(5_000)),
            keep_ttl,
            cond,
            get,
        };
        let plain = set(false, false, SetCond::Always);
        assert!(!plain.reads_current());
        let held = StoredValue {
            data: Bytes::from_static(b"old"),
            expire_at_ms: Some(9_000),
        };
        assert_eq!(
            apply_one(&plain, None, 1_000),
            apply_one(&plain, Some(&held), 1_000)
        );
        for reading in [
            set(true, false, SetCond::Always),
            set(false, true, SetCond::Always),
            set(false, false, SetCond::IfAbsent),
        ] {
            assert!(reading.reads_current(), "{reading:?}");
            assert_ne!(
                apply_one(&reading, None, 1_000),
                apply_one(&reading, Some(&held), 1_000)
            );
        }
    }

    #[test]
    fn set_conditions_follow_redis() {
        let old = val("old");
        assert_eq!(
            apply_one(&set(SetCond::IfAbsent, false), Some(&old), 0).1,
            Reply::Nil
        );
        assert_eq!(
            apply_one(&set(SetCond::IfAbsent, false), None, 0).1,
            Reply::Ok
        );
        assert_eq!(
            apply_one(&set(SetCond::IfPresent, false), None, 0).0,
            Change::Keep
        );
        let (change, reply) = apply_one(&set(SetCond::Always, true), Some(&old), 0);
        assert_eq!(reply, Reply::Bulk(Bytes::from_static(b"old")));
        assert_eq!(change, Change::Put(val("new")));
    }

    #[test]
    fn incr_rejects_non_integers_and_overflow() {
        let op = KvOp::IncrBy {
            key: Bytes::from_static(b"k"),
            delta: 1,
        };
        assert_eq!(apply_one(&op, None, 0).1, Reply::Int(1));
        assert_eq!(apply_one(&op, Some(&val("41")), 0).1, Reply::Int(42));
        assert!(matches!(
            apply_one(&op, Some(&val("x")), 0),
            (Change::Keep, Reply::Error(_))
        ));
        let max = val(&i64::MAX.to_string());
        assert!(matches!(
            apply_one(&op, Some(&max), 0),
            (Change::Keep, Reply::Error(_))
        ));
    }

    #[test]
    fn floats_print_as_redis_does() {
        assert_eq!(format_float(3.0), "3");
        assert_eq!(format_float(10.5), "10.5");
        assert_eq!(format_float(-0.25), "-0.25");
    }

    #[test]
    fn expire_in_the_past_deletes() {
        let op = KvOp::Expire {
            key: Bytes::from_static(b"k"),
            expiry: Some(Expiry::At(5)),
            cond: ExpireCond::Always,
        };
        assert_eq!(apply_one(&op, Some(&val("v")), 10).0, Change::Delete);
        assert_eq!(apply_one(&op, None, 10).1, Reply::Int(0));
    }

    fn with_ttl(at: u64) -> StoredValue {
        StoredValue {
            expire_at_ms: Some(at),
            ..val("v")
        }
    }

    /// The issue 16 finding: the receiving node's clock used to turn `EX` into an absolute
    /// time. Now the entry's time stamp does, the same on every replica that applies it.
    #[test]
    fn a_relative_expiry_is_resolved_with_the_entrys_time_stamp() {
        let op = KvOp::Set {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            expire: Some(Expiry::After(100_000)),
            keep_ttl: false,
            cond: SetCond::Always,
            get: false,
        };
        let (change, _) = apply_one(&op, None, 1_700_000_000_000);
        assert_eq!(change, Change::Put(with_ttl(1_700_000_100_000)));
        let absolute = KvOp::Expire {
            key: Bytes::from_static(b"k"),
            expiry: Some(Expiry::At(1_800_000_000_000)),
            cond: ExpireCond::Always,
        };
        let (change, reply) = apply_one(&absolute, Some(&val("v")), 1_700_000_000_000);
        assert_eq!(
            (change, reply),
            (Change::Put(with_ttl(1_800_000_000_000)), Reply::Int(1))
        );
        assert_eq!(Expiry::After(u64::MAX).resolve(5), u64::MAX);
    }

    /// `EXPIRE k 0` and negative times travel as `After(0)`: at apply the key is deleted,
    /// and the conditions answer as Redis's do for a time in the past (checked against
    /// redis-server 7.0: GT fails, LT, NX on a key without a TTL and XX on one with it
    /// delete).
    #[test]
    fn a_non_positive_expire_deletes_at_apply_as_redis_does() {
        let op = |cond| KvOp::Expire {
            key: Bytes::from_static(b"k"),
            expiry: Some(Expiry::After(0)),
            cond,
        };
        let now = 1_000;
        let (plain, ttl) = (val("v"), with_ttl(now + 100_000));
        let cases = [
            (ExpireCond::Always, &plain, (Change::Delete, Reply::Int(1))),
            (ExpireCond::IfGreater, &ttl, (Change::Keep, Reply::Int(0))),
            (ExpireCond::IfGreater, &plain, (Change::Keep, Reply::Int(0))),
            (ExpireCond::IfLess, &ttl, (Change::Delete, Reply::Int(1))),
            (ExpireCond::IfLess, &plain, (Change::Delete, Reply::Int(1))),
            (ExpireCond::IfNoTtl, &plain, (Change::Delete, Reply::Int(1))),
            (ExpireCond::IfNoTtl, &ttl, (Change::Keep, Reply::Int(0))),
            (ExpireCond::IfTtl, &ttl, (Change::Delete, Reply::Int(1))),
        ];
        for (cond, current, want) in cases {
            assert_eq!(apply_one(&op(cond), Some(current), now), want, "{cond:?}");
        }
        assert_eq!(
            apply_one(&op(ExpireCond::Always), None, now),
            (Change::Keep, Reply::Int(0))
        );
    }

    #[test]
    fn a_set_that_expires_before_it_applies_leaves_no_key() {
        let op = KvOp::Set {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            expire: Some(Expiry::At(1)),
            keep_ttl: false,
            cond: SetCond::Always,
            get: true,
        };
        let (change, reply) = apply_one(&op, Some(&val("old")), 1_000);
        assert_eq!(change, Change::Delete);
        assert_eq!(reply, Reply::Bulk(Bytes::from_static(b"old")));
    }

    /// A table of encoded values, for the multi-key ops.
    #[derive(Default)]
    struct Map(std::collections::BTreeMap<Vec<u8>, Vec<u8>>);

    impl KeyTable for Map {
        type Error = ();
        fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ()> {
            Ok(self.0.get(key).cloned())
        }
        fn put(&mut self, key: &[u8], encoded: &[u8]) -> Result<(), ()> {
            self.0.insert(key.to_vec(), encoded.to_vec());
            Ok(())
        }
        fn delete(&mut self, key: &[u8]) -> Result<(), ()> {
            self.0.remove(key);
            Ok(())
        }
    }

    /// An eviction deletes what has expired by the entry's time stamp, and nothing else: a
    /// key written again (with a later expiry, or none) since the leader found it expired
    /// stays, and so does a key the leader's page named but that has time left.
    #[test]
    fn an_eviction_removes_only_what_expired_by_the_entrys_time() {
        let mut t = Map::default();
        t.put(b"old", &with_ttl(900).encode()).unwrap();
        t.put(b"rewritten", &with_ttl(5_000).encode()).unwrap();
        t.put(b"persisted", &val("v").encode()).unwrap();
        t.put(b"due-now", &with_ttl(1_000).encode()).unwrap();
        let evict = KvOp::Evict {
            keys: ["old", "rewritten", "persisted", "due-now", "missing"]
                .into_iter()
                .map(Bytes::from)
                .collect(),
        };
        assert!(evict.reads_current() && !evict.is_blind());
        assert_eq!(apply_op(&mut t, &evict, 1_000), Ok(Reply::Int(2)));
        let left: Vec<&[u8]> = t.0.keys().map(Vec::as_slice).collect();
        assert_eq!(left, vec![&b"persisted"[..], &b"rewritten"[..]]);
    }

    #[test]
    fn stored_values_round_trip() {
        let v = StoredValue {
            data: Bytes::from_static(b"hello"),
            expire_at_ms: Some(1234),
        };
        assert_eq!(StoredValue::decode_expiry(&v.encode()), Some(Some(1234)));
        assert_eq!(StoredValue::decode(&v.encode()), Some(v));
        assert_eq!(StoredValue::decode(b"\x09garbage"), None);
        assert_eq!(StoredValue::decode_expiry(&val("x").encode()), Some(None));
    }
}
