//! The on-disk form of one log record: `[version u8][crc32c u32 LE of body][body]`, where the
//! body is the bincode of an openraft entry. Version 1 is the only format so far.

use crate::Entry;

const RECORD_V1: u8 = 1;

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
    out.push(RECORD_V1);
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode_record(raw: &[u8]) -> Result<Entry, RecordError> {
    if raw.len() < 5 {
        return Err(RecordError::Truncated);
    }
    if raw[0] != RECORD_V1 {
        return Err(RecordError::UnknownVersion(raw[0]));
    }
    let stored = u32::from_le_bytes(raw[1..5].try_into().expect("4 bytes"));
    let body = &raw[5..];
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    bincode::deserialize(body).map_err(|e| RecordError::Decode(e.to_string()))
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
    }
}
