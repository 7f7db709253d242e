//! The snapshot format, version 1:
//!
//! ```text
//! "RKVSNAP1" | u32 LE meta_len | bincode(SnapshotMeta) | u64 LE pair_count
//!   | pair_count × (u32 LE key_len | key | u32 LE value_len | value)
//!   | u32 LE crc32c of every byte before it
//! ```
//! Values are the state machine's encoded values, copied as stored. openraft sends the bytes in
//! chunks; each chunk travels in a peer frame with its own CRC32C, and the whole-snapshot
//! checksum above is verified before anything is installed.

use crate::SnapshotMeta;

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"RKVSNAP1";

/// A decoded snapshot.
pub struct SnapshotFile {
    pub meta: SnapshotMeta,
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Streams pairs into the version 1 format.
pub(crate) struct SnapshotWriter {
    buf: Vec<u8>,
    count_at: usize,
    count: u64,
}

impl SnapshotWriter {
    pub(crate) fn new(meta: &SnapshotMeta) -> SnapshotWriter {
        let meta_bytes = bincode::serialize(meta).expect("snapshot meta serialises");
        let mut buf = Vec::with_capacity(64 + meta_bytes.len());
        buf.extend_from_slice(SNAPSHOT_MAGIC);
        buf.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(&meta_bytes);
        let count_at = buf.len();
        buf.extend_from_slice(&0u64.to_le_bytes());
        SnapshotWriter {
            buf,
            count_at,
            count: 0,
        }
    }

    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) {
        self.buf
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(value);
        self.count += 1;
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.buf[self.count_at..self.count_at + 8].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32c::crc32c(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

impl SnapshotFile {
    /// Verifies the checksum and decodes; any defect is an error naming it.
    pub fn decode(raw: &[u8]) -> Result<SnapshotFile, String> {
        if raw.len() < SNAPSHOT_MAGIC.len() + 4 + 8 + 4 {
            return Err(format!("snapshot too short ({} bytes)", raw.len()));
        }
        let (body, crc) = raw.split_at(raw.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(format!(
                "snapshot checksum mismatch: stored {stored:08x}, computed {computed:08x}"
            ));
        }
        if &body[..8] != SNAPSHOT_MAGIC {
            return Err("not a replikv snapshot (bad magic)".into());
        }
        let mut r = Reader { buf: body, at: 8 };
        let meta_len = r.u32()? as usize;
        let meta: SnapshotMeta =
            bincode::deserialize(r.take(meta_len)?).map_err(|e| format!("snapshot meta: {e}"))?;
        let count = r.u64()?;
        let mut pairs = Vec::with_capacity(count.min(1 << 16) as usize);
        for _ in 0..count {
            let klen = r.u32()? as usize;
            let key = r.take(klen)?.to_vec();
            let vlen = r.u32()? as usize;
            let value = r.take(vlen)?.to_vec();
            pairs.push((key, value));
        }
        if r.at != body.len() {
            return Err("trailing bytes after the last pair".into());
        }
        Ok(SnapshotFile { meta, pairs })
    }

    /// Reads only the metadata (the checksum is checked when the snapshot is installed).
    pub fn decode_meta(raw: &[u8]) -> Result<SnapshotMeta, String> {
        let mut r = Reader { buf: raw, at: 8 };
        if raw.get(..8) != Some(SNAPSHOT_MAGIC.as_slice()) {
            return Err("not a replikv snapshot (bad magic)".into());
        }
        let meta_len = r.u32()? as usize;
        bincode::deserialize(r.take(meta_len)?).map_err(|e| format!("snapshot meta: {e}"))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or("snapshot truncated")?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_reject_any_flipped_byte() {
        let meta = SnapshotMeta::default();
        let mut w = SnapshotWriter::new(&meta);
        w.push(b"a", b"1");
        w.push(b"bb", b"22");
        let raw = w.finish();
        let file = SnapshotFile::decode(&raw).unwrap();
        assert_eq!(file.pairs.len(), 2);
        assert_eq!(file.pairs[1], (b"bb".to_vec(), b"22".to_vec()));
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 1;
            assert!(SnapshotFile::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(SnapshotFile::decode(&raw[..raw.len() - 1]).is_err());
    }
}
