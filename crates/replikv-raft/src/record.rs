//! The on-disk form of one log record: `[version u8][crc32c u32 LE of body][body]`, where the
//! body is the bincode of an openraft entry.
//!
//! - Version 3 (written now): a normal entry's writes are one byte string ([`Ops`]) of
//!   today's `KvOp`, whose expiries are [`Expiry`]: relative ones are resolved at apply.
//! - Version 2 (still read): the same entry, but its writes' expiries were absolute Unix
//!   milliseconds, computed by whichever node took the request ([`KvOpV2`]).
//! - Version 1 (still read): the writes were a sequence of version 2's `KvOp`s, not a byte
//!   string.
//!
//! Decoding an older record converts its writes (an absolute expiry becomes
//! [`Expiry::At`], which applies exactly as before) and encodes them again as [`Ops`], so
//! everything after this module sees one format.

use bytes::Bytes;
use openraft::{EntryPayload, LogId, Membership};
use replikv_types::{ExpireCond, Expiry, KvOp, Ops, SetCond, WriteRequest};
use serde::Deserialize;

use crate::Entry;

const RECORD_V1: u8 = 1;
const RECORD_V2: u8 = 2;
const RECORD_V3: u8 = 3;

#[derive(Debug, PartialEq, Eq)]
pub enum RecordError {
    Truncated,
    UnknownVersion(u8),
    Checksum { stored: u32, computed: u32 },
    Decode(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated => f.write_str("record shorter than its header"),
            RecordError::UnknownVersion(v) => write!(f, "unknown record version {v}"),
            RecordError::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
                )
            }
            RecordError::Decode(e) => write!(f, "undecodable record: {e}"),
        }
    }
}

pub fn encode_record(entry: &Entry) -> Vec<u8> {
    let body = bincode::serialize(entry).expect("entries always serialise");
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(RECORD_V3);
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode_record(raw: &[u8]) -> Result<Entry, RecordError> {
    if raw.len() < 5 {
        return Err(RecordError::Truncated);
    }
    let version = raw[0];
    if !(RECORD_V1..=RECORD_V3).contains(&version) {
        return Err(RecordError::UnknownVersion(version));
    }
    let stored = u32::from_le_bytes(raw[1..5].try_into().expect("4 bytes"));
    let body = &raw[5..];
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    let decode_error = |e: bincode::Error| RecordError::Decode(e.to_string());
    if version == RECORD_V3 {
        return bincode::deserialize(body).map_err(decode_error);
    }
    let convert =
        |ops: Vec<KvOpV2>| Ops::encode(&ops.into_iter().map(KvOp::from).collect::<Vec<_>>());
    if version == RECORD_V2 {
        // The entry's shape is today's: only the bytes inside its `Ops` differ.
        let mut entry: Entry = bincode::deserialize(body).map_err(decode_error)?;
        if let EntryPayload::Normal(req) = &mut entry.payload {
            let ops: Vec<KvOpV2> = bincode::deserialize(req.ops.encoded()).map_err(decode_error)?;
            req.ops = convert(ops);
        }
        return Ok(entry);
    }
    let v1: EntryV1 = bincode::deserialize(body).map_err(decode_error)?;
    Ok(Entry {
        log_id: v1.log_id,
        payload: match v1.payload {
            PayloadV1::Blank => EntryPayload::Blank,
            PayloadV1::Normal(r) => EntryPayload::Normal(WriteRequest {
                req_id: r.req_id,
                now_ms: r.now_ms,
                ops: convert(r.ops),
            }),
            PayloadV1::Membership(m) => EntryPayload::Membership(m),
        },
    })
}

/// A version 1 entry: openraft's `Entry` and `EntryPayload`, field for field and variant for
/// variant, with the writes as a sequence.
#[derive(Deserialize)]
struct EntryV1 {
    log_id: LogId<u64>,
    payload: PayloadV1,
}

#[derive(Deserialize)]
enum PayloadV1 {
    Blank,
    Normal(WriteRequestV1),
    Membership(Membership<u64, openraft::BasicNode>),
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize, Debug, Clone))]
struct WriteRequestV1 {
    req_id: u64,
    now_ms: u64,
    ops: Vec<KvOpV2>,
}

/// `KvOp` as records of versions 1 and 2 hold it, variant for variant and field for field
/// (bincode keeps neither names, only order): expiries were absolute Unix milliseconds.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize, Debug, Clone))]
enum KvOpV2 {
    Set {
        key: Bytes,
        value: Bytes,
        expire_at_ms: Option<u64>,
        keep_ttl: bool,
        cond: SetCond,
        get: bool,
    },
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
    Expire {
        key: Bytes,
        at_ms: Option<u64>,
        cond: ExpireCond,
    },
}

impl From<KvOpV2> for KvOp {
    /// The old builds had already turned every relative expiry into an absolute one, so an
    /// old write applies as `Expiry::At` exactly as it applied then.
    fn from(op: KvOpV2) -> KvOp {
        match op {
            KvOpV2::Set {
                key,
                value,
                expire_at_ms,
                keep_ttl,
                cond,
                get,
            } => KvOp::Set {
                key,
                value,
                expire: expire_at_ms.map(Expiry::At),
                keep_ttl,
                cond,
                get,
            },
            KvOpV2::MSet {
                pairs,
                if_none_exist,
            } => KvOp::MSet {
                pairs,
                if_none_exist,
            },
            KvOpV2::Del { keys } => KvOp::Del { keys },
            KvOpV2::GetDel { key } => KvOp::GetDel { key },
            KvOpV2::IncrBy { key, delta } => KvOp::IncrBy { key, delta },
            KvOpV2::IncrByFloat { key, delta } => KvOp::IncrByFloat { key, delta },
            KvOpV2::Append { key, value } => KvOp::Append { key, value },
            KvOpV2::Expire { key, at_ms, cond } => KvOp::Expire {
                key,
                expiry: at_ms.map(Expiry::At),
                cond,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    #[test]
    fn records_round_trip_and_detect_corruption() {
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 42),
            payload: EntryPayload::Blank,
        };
        let mut raw = encode_record(&entry);
        assert_eq!(decode_record(&raw).unwrap().log_id.index, 42);
        let last = raw.len() - 1;
        raw[last] ^= 0x40;
        assert!(matches!(
            decode_record(&raw),
            Err(RecordError::Checksum { .. })
        ));
        assert_eq!(decode_record(&raw[..3]), Err(RecordError::Truncated));
        raw[0] = 9;
        assert_eq!(decode_record(&raw), Err(RecordError::UnknownVersion(9)));
    }

    fn ops() -> Vec<KvOp> {
        vec![
            KvOp::Set {
                key: "a".into(),
                value: "1".into(),
                expire: Some(Expiry::After(7)),
                keep_ttl: false,
                cond: SetCond::Always,
                get: true,
            },
            KvOp::Del {
                keys: vec!["b".into(), "c".into()],
            },
        ]
    }

    /// [`ops`] as the builds before version 3 held them (their expiry absolute), and what
    /// decoding turns them into.
    fn old_ops() -> (Vec<KvOpV2>, Vec<KvOp>) {
        let old = vec![
            KvOpV2::Set {
                key: "a".into(),
                value: "1".into(),
                expire_at_ms: Some(7),
                keep_ttl: false,
                cond: SetCond::Always,
                get: true,
            },
            KvOpV2::Del {
                keys: vec!["b".into(), "c".into()],
            },
        ];
        let mut new = ops();
        if let KvOp::Set { expire, .. } = &mut new[0] {
            *expire = Some(Expiry::At(7));
        }
        (old, new)
    }

    #[test]
    fn normal_entries_round_trip_with_their_writes() {
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 3), 9),
            payload: EntryPayload::Normal(WriteRequest {
                req_id: 5,
                now_ms: 1_000,
                ops: Ops::encode(&ops()),
            }),
        };
        let raw = encode_record(&entry);
        assert_eq!(raw[0], RECORD_V3);
        let back = decode_record(&raw).unwrap();
        assert_eq!(back, entry);
        let EntryPayload::Normal(req) = back.payload else {
            panic!("not a normal entry")
        };
        assert_eq!(req.ops.decode().unwrap(), ops());
    }

    /// The writes of `tests/fixtures/record-v2-normal.bin`, one of each kind, as this build
    /// decodes them: the absolute expiries the old build wrote are `Expiry::At`.
    fn fixture_ops() -> Vec<KvOp> {
        vec![
            KvOp::Set {
                key: "exat".into(),
                value: "v1".into(),
                expire: Some(Expiry::At(4_102_444_800_000)),
                keep_ttl: false,
                cond: SetCond::IfAbsent,
                get: true,
            },
            KvOp::Set {
                key: "kept".into(),
                value: "v2".into(),
                expire: None,
                keep_ttl: true,
                cond: SetCond::IfPresent,
                get: false,
            },
            KvOp::MSet {
                pairs: vec![("m1".into(), "a".into()), ("m2".into(), "b".into())],
                if_none_exist: true,
            },
            KvOp::Del {
                keys: vec!["d1".into(), "d2".into()],
            },
            KvOp::GetDel { key: "gd".into() },
            KvOp::IncrBy {
                key: "n".into(),
                delta: -7,
            },
            KvOp::IncrByFloat {
                key: "f".into(),
                delta: 2.5,
            },
            KvOp::Append {
                key: "s".into(),
                value: "tail".into(),
            },
            KvOp::Expire {
                key: "e".into(),
                expiry: Some(Expiry::At(4_133_980_800_000)),
                cond: ExpireCond::IfGreater,
            },
            KvOp::Expire {
                key: "p".into(),
                expiry: None,
                cond: ExpireCond::Always,
            },
        ]
    }

    /// The committed bytes of a version 2 record, written by the build before version 3
    /// (`write_the_version_2_fixture` at 51b75d4, with that build's `encode_record`), decode
    /// to the entry they were made from, its writes converted.
    #[test]
    fn the_version_2_fixture_written_by_the_old_build_decodes() {
        let raw = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/record-v2-normal.bin"
        ))
        .unwrap();
        assert_eq!(raw[0], RECORD_V2);
        let back = decode_record(&raw).unwrap();
        assert_eq!(back.log_id, LogId::new(CommittedLeaderId::new(7, 2), 31));
        let EntryPayload::Normal(req) = back.payload else {
            panic!("not a normal entry")
        };
        assert_eq!(
            (req.req_id, req.now_ms),
            (0x1234_5678_0000_0009, 1_765_000_000_000)
        );
        assert_eq!(req.ops.decode().unwrap(), fixture_ops());
        // Written again, it is a version 3 record of the same entry.
        let again = Entry {
            log_id: back.log_id,
            payload: EntryPayload::Normal(req),
        };
        assert_eq!(decode_record(&encode_record(&again)).unwrap(), again);
    }

    /// Version 2 records made as the old build made them (today's entry shape, the old
    /// writes' bincode inside `Ops`) decode with their writes converted; blank and
    /// membership entries are unchanged.
    #[test]
    fn version_2_records_still_decode() {
        let record = |payload: EntryPayload<crate::TypeConfig>| {
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(5, 1), 20),
                payload,
            };
            let body = bincode::serialize(&entry).unwrap();
            let mut raw = vec![RECORD_V2];
            raw.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            raw.extend_from_slice(&body);
            (entry, raw)
        };
        let (old, new) = old_ops();
        // `Ops` holds whatever bytes it is given: the old writes go in through its serde form.
        let old_bytes = bincode::serialize(&old).unwrap();
        let old_ops: Ops = bincode::deserialize(&bincode::serialize(&old_bytes).unwrap()).unwrap();
        let (_, raw) = record(EntryPayload::Normal(WriteRequest {
            req_id: 3,
            now_ms: 9,
            ops: old_ops,
        }));
        let EntryPayload::Normal(req) = decode_record(&raw).unwrap().payload else {
            panic!("not a normal entry")
        };
        assert_eq!((req.req_id, req.now_ms), (3, 9));
        assert_eq!(req.ops.decode().unwrap(), new);
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Membership(Membership::new(vec![[1, 2, 3].into()], None)),
        ] {
            let (entry, raw) = record(payload);
            assert_eq!(decode_record(&raw).unwrap(), entry);
        }
    }

    openraft::declare_raft_types!(
        /// The type configuration of the builds that wrote version 1: writes as a sequence.
        V1Config:
            D = WriteRequestV1,
            R = (),
            NodeId = u64,
            Node = openraft::BasicNode,
            SnapshotData = std::io::Cursor<Vec<u8>>,
    );

    /// A log written before the writes were one byte string still opens: version 1 records,
    /// made here by openraft's own `Entry` as those builds made them, decode to the same
    /// entries.
    #[test]
    fn version_1_records_still_decode() {
        let log_id = LogId::new(CommittedLeaderId::new(4, 1), 12);
        let v1_record = |payload: EntryPayload<V1Config>| {
            let entry = openraft::Entry::<V1Config> { log_id, payload };
            let body = bincode::serialize(&entry).unwrap();
            let mut raw = vec![RECORD_V1];
            raw.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            raw.extend_from_slice(&body);
            raw
        };
        let (old, new) = old_ops();
        let normal = decode_record(&v1_record(EntryPayload::Normal(WriteRequestV1 {
            req_id: 77,
            now_ms: 5,
            ops: old,
        })))
        .unwrap();
        assert_eq!(normal.log_id, log_id);
        let EntryPayload::Normal(req) = normal.payload else {
            panic!("not a normal entry")
        };
        assert_eq!((req.req_id, req.now_ms), (77, 5));
        assert_eq!(req.ops.decode().unwrap(), new);

        let blank = decode_record(&v1_record(EntryPayload::Blank)).unwrap();
        assert!(matches!(blank.payload, EntryPayload::Blank));

        let members = Membership::new(vec![[1, 2, 3].into()], None);
        let change = decode_record(&v1_record(EntryPayload::Membership(members.clone()))).unwrap();
        assert_eq!(change.payload, EntryPayload::Membership(members));
    }
}
