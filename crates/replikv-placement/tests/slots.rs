//! Key → slot → partition must match Redis Cluster exactly: cluster-aware clients compute
//! slots themselves and route by `CLUSTER SLOTS`, so one differing slot sends a client to
//! the wrong node.

use replikv_placement::{key_slot, partition_slots, slot_partition, SLOT_COUNT};

#[test]
fn key_slot_matches_redis_cluster_keyslot() {
    // Values from Redis's own `CLUSTER KEYSLOT` documentation and test suites.
    let vectors: &[(&[u8], u16)] = &[
        (b"foo", 12182),
        (b"somekey", 11058),
        (b"foo{hash_tag}", 2515),
        (b"bar{hash_tag}", 2515),
        (b"{user1}.following", 8106),
        (b"8xjx7vWrfPq54mKfFD3Y1CcjjofpnAcQ", 5458),
        (b"fyimk7v1CgnBo", 0),
        (b"8HMdi", 1),
        (b"IQhHSeAVHI", 2),
        // The CRC16/XMODEM check value is 0x31C3 = 12739 < 16384.
        (b"123456789", 0x31C3),
        (b"", 0),
    ];
    for &(key, slot) in vectors {
        assert_eq!(
            key_slot(key),
            slot,
            "key {:?}",
            String::from_utf8_lossy(key)
        );
    }
}

#[test]
fn hash_tags_follow_redis_rules() {
    // Phase 1: keys sharing a non-empty tag share a slot, the tag's own.
    let tag = key_slot(b"user1000");
    assert_eq!(key_slot(b"{user1000}.following"), tag);
    assert_eq!(key_slot(b"{user1000}.followers"), tag);
    assert_eq!(key_slot(b"x{user1000}y{other}"), tag);

    // Phase 2: an empty first tag means the whole key is hashed.
    let whole = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM).checksum(b"foo{}{bar}") % SLOT_COUNT;
    assert_eq!(key_slot(b"foo{}{bar}"), whole);
    assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));

    // Phase 3: the tag ends at the first `}` after the first `{`.
    assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));

    // Phase 4: an unclosed brace hashes the whole key.
    let unclosed = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM).checksum(b"foo{bar") % SLOT_COUNT;
    assert_eq!(key_slot(b"foo{bar"), unclosed);
}

#[test]
fn partition_ranges_cover_every_slot_exactly_once() {
    for n in [1u32, 2, 3, 5, 7, 8, 16, 100, 1000, 16383, 16384] {
        let mut next = 0u16;
        let (mut smallest, mut largest) = (usize::MAX, 0);
        for p in 0..n {
            let range = partition_slots(p, n);
            assert_eq!(range.start, next, "n={n}: partition {p} is not contiguous");
            for slot in range.clone() {
                assert_eq!(slot_partition(slot, n), p, "n={n}: slot {slot}");
            }
            smallest = smallest.min(range.len());
            largest = largest.max(range.len());
            next = range.end;
        }
        assert_eq!(next, SLOT_COUNT, "n={n}: ranges stop short");
        assert!(
            largest - smallest <= 1,
            "n={n}: sizes {smallest}..={largest}"
        );
    }
}

#[test]
fn partition_ranges_are_the_documented_formula() {
    assert_eq!(partition_slots(0, 1), 0..16384);
    assert_eq!(partition_slots(0, 3), 0..5461);
    assert_eq!(partition_slots(1, 3), 5461..10922);
    assert_eq!(partition_slots(2, 3), 10922..16384);
    assert_eq!(slot_partition(5460, 3), 0);
    assert_eq!(slot_partition(5461, 3), 1);
    assert_eq!(slot_partition(16383, 3), 2);
}
