//! Key → hash slot → partition.
//!
//! The slot function is Redis Cluster's, bit for bit: CRC16/XMODEM (poly 0x1021, init 0,
//! no reflection) of the key, or of its hash tag, modulo 16384. The hash tag is the bytes
//! between the first `{` and the first `}` after it, used only when non-empty; otherwise
//! the whole key is hashed. So `foo{}{bar}` hashes the whole key and `foo{{bar}}zap`
//! hashes `{bar`, exactly as Redis does.
//!
//! Partitions own contiguous slot ranges, so `CLUSTER SLOTS` can report one range per
//! partition: partition `p` of `n` owns `[p*16384/n, (p+1)*16384/n)` (integer division).

use std::ops::Range;

use crate::PartitionId;

/// Number of hash slots, as in Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

const CRC16_XMODEM: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// Redis Cluster's hash slot of `key`: CRC16/XMODEM of the key (or of its first non-empty
/// `{hash tag}`) modulo [`SLOT_COUNT`].
pub fn key_slot(key: &[u8]) -> u16 {
    CRC16_XMODEM.checksum(hash_tag(key)) % SLOT_COUNT
}

/// The bytes Redis hashes for `key`: the first non-empty `{...}` section, else the key.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let rest = &key[open + 1..];
    match rest.iter().position(|&b| b == b'}') {
        Some(close) if close > 0 => &rest[..close],
        // No closing brace, or `{}`: Redis hashes the whole key.
        _ => key,
    }
}

/// The partition owning `slot` when the keyspace has `partitions` partitions.
///
/// The inverse of [`partition_slots`]: the largest `p` with `p*16384/n <= slot`, that is
/// `((slot+1)*n - 1) / 16384`.
///
/// # Panics
/// If `partitions` is 0 or `slot >= SLOT_COUNT` (both are caller bugs: a keyspace always
/// has at least one partition and [`key_slot`] never returns more than 16383).
pub fn slot_partition(slot: u16, partitions: u32) -> PartitionId {
    assert!(partitions > 0, "a keyspace has at least one partition");
    assert!(slot < SLOT_COUNT, "slot {slot} out of range");
    let p = ((u64::from(slot) + 1) * u64::from(partitions) - 1) / u64::from(SLOT_COUNT);
    PartitionId::try_from(p).expect("p < partitions, which is a u32")
}

/// The slots partition `p` of `partitions` owns: `[p*16384/n, (p+1)*16384/n)`.
///
/// The ranges of `0..partitions` are contiguous, disjoint and cover `0..16384`. When
/// `partitions > 16384` some ranges are empty; [`place`](crate::place()) refuses such counts.
///
/// # Panics
/// If `partitions` is 0 or `p >= partitions`.
pub fn partition_slots(p: PartitionId, partitions: u32) -> Range<u16> {
    assert!(partitions > 0, "a keyspace has at least one partition");
    assert!(p < partitions, "partition {p} out of range 0..{partitions}");
    let bound = |i: u32| {
        let slot = u64::from(i) * u64::from(SLOT_COUNT) / u64::from(partitions);
        u16::try_from(slot).expect("i <= partitions, so slot <= SLOT_COUNT")
    };
    bound(p)..bound(p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tag_follows_redis_rules() {
        assert_eq!(hash_tag(b"foo"), b"foo");
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"foo{bar"), b"foo{bar");
        assert_eq!(hash_tag(b"foo}bar{"), b"foo}bar{");
        assert_eq!(hash_tag(b"{}"), b"{}");
        assert_eq!(hash_tag(b""), b"");
    }

    #[test]
    fn slot_partition_inverts_partition_slots_at_the_edges() {
        for n in [1u32, 2, 3, 7, 16, 100, 16383, 16384] {
            for p in [0, n / 2, n - 1] {
                let r = partition_slots(p, n);
                assert!(!r.is_empty(), "n={n} p={p}");
                assert_eq!(slot_partition(r.start, n), p);
                assert_eq!(slot_partition(r.end - 1, n), p);
            }
        }
    }
}
