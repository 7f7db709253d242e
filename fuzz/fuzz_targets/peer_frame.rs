//! Peer frames between nodes (`replikv_cluster::decode_frame` / `encode_frame`).
//!
//! Every input is used twice:
//! 1. As raw bytes off a peer connection. Decoding never panics; `Ok(None)` leaves the buffer
//!    as it was; a decoded frame took exactly a prefix, and encoding it again gives exactly
//!    those bytes; decoding the same bytes fed in pieces gives the same frames and error.
//! 2. As a frame to send: byte 0 picks the kind, bytes 1-8 the id (LE), bytes 9-10 a bit
//!    index, the rest is the payload. `encode_frame` then `decode_frame` must give back the
//!    same frame and consume all of it. Then single flipped bits (every bit for frames of up
//!    to 64 bytes, else the chosen one) must never decode to a frame: the checksum covers
//!    everything after the length, and a corrupted length is refused as too short or too
//!    large, fails the checksum, or (when it grew) waits for bytes that are not there.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use replikv_cluster::{decode_frame, encode_frame, FrameError, FrameKind, PeerFrame};

type Outcome = Result<Option<PeerFrame>, FrameError>;

/// Bytes of the `len` field at the front of a frame, the one part outside the checksum.
const LEN_FIELD: usize = 4;

fuzz_target!(|data: &[u8]| {
    raw_bytes(data);
    round_trip(data);
});

fn raw_bytes(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut whole = Vec::new();
    loop {
        let before = buf.clone();
        let result = decode_frame(&mut buf);
        match &result {
            Ok(Some(frame)) => {
                assert!(before.ends_with(&buf) && buf.len() < before.len());
                let consumed = &before[..before.len() - buf.len()];
                let mut again = BytesMut::new();
                encode_frame(frame.kind, frame.id, &frame.payload, &mut again);
                assert_eq!(
                    &again[..],
                    consumed,
                    "a decoded frame re-encodes differently"
                );
            }
            Ok(None) => assert_eq!(buf, before, "Ok(None) changed the buffer"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        let done = !matches!(result, Ok(Some(_)));
        whole.push(result);
        if done {
            break;
        }
    }

    // The same bytes arriving in pieces of 1 to 16 bytes (size picked by the first byte).
    let step = 1 + data.first().map_or(0, |b| usize::from(b % 16));
    let mut pieces = data.chunks(step);
    let mut buf = BytesMut::new();
    let mut chunked: Vec<Outcome> = Vec::new();
    loop {
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => chunked.push(Ok(Some(frame))),
            Ok(None) => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => {
                    chunked.push(Ok(None));
                    break;
                }
            },
            Err(e) => {
                chunked.push(Err(e));
                break;
            }
        }
    }
    assert_eq!(whole, chunked, "chunking changed the outcome");
}

fn round_trip(data: &[u8]) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let kind = match byte(0) % 3 {
        0 => FrameKind::Hello,
        1 => FrameKind::Request,
        _ => FrameKind::Response,
    };
    let id = u64::from_le_bytes(std::array::from_fn(|i| byte(1 + i)));
    let chosen_bit = usize::from(u16::from_le_bytes([byte(9), byte(10)]));
    let payload = data.get(11..).unwrap_or(&[]);

    let mut wire = BytesMut::new();
    encode_frame(kind, id, payload, &mut wire);
    let encoded = wire.clone();
    let frame = decode_frame(&mut wire)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is complete");
    assert_eq!(
        (frame.kind, frame.id, &frame.payload[..]),
        (kind, id, payload)
    );
    assert!(wire.is_empty(), "bytes left after an encoded frame");

    let bits = encoded.len() * 8;
    if encoded.len() <= 64 {
        for bit in 0..bits {
            flipped_is_refused(&encoded, bit);
        }
    } else {
        flipped_is_refused(&encoded, chosen_bit % bits);
    }
}

fn flipped_is_refused(encoded: &[u8], bit: usize) {
    let mut bad = BytesMut::from(encoded);
    bad[bit / 8] ^= 1 << (bit % 8);
    match decode_frame(&mut bad) {
        Err(_) => {}
        // A length that grew by the flip waits for bytes that never come; the connection's
        // read timeout or the next frame's checksum ends it.
        Ok(None) => assert!(
            bit < LEN_FIELD * 8,
            "bit {bit} flipped: frame looks incomplete"
        ),
        Ok(Some(frame)) => panic!("bit {bit} flipped, yet it decoded to {frame:?}"),
    }
}
