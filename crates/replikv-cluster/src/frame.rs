//! Peer frames, version 4. Every message between nodes travels as
//!
//! ```text
//! u32 LE len | u32 LE crc32c(rest) | rest = u8 version | u8 kind | u64 LE id | payload
//! ```
//! where `len` counts `crc32c` and `rest`. A frame that fails its checksum, names an unknown
//! version or kind, or is longer than [`MAX_FRAME_BYTES`] closes the connection: the peer
//! reconnects and openraft resends what was lost.
//!
//! Version 4 names every group by `GroupId { keyspace, partition }` (Raft messages, forwarded
//! requests, leader marks, errors, write outcomes, status) where version 3 named a partition
//! of the one keyspace; nothing else changed.
//! Version 3 changed the writes inside log entries (expiries as `Expiry`: relative ones are
//! resolved at apply; log records of version 3) and the messages: a read's value carries
//! the TTL its serving replica counted, and pings and pongs carry wall-clock stamps.
//! Version 2 had changed how a log entry's writes are encoded (one byte string, `Ops`).
//! Nodes of different versions do not talk: each closes the other's connections with
//! "unknown peer frame version" (reported at warn). Upgraded one node at a time, a 3-node
//! cluster has no majority of one version while the second node restarts: the two running
//! nodes differ, so writes pause until it is back. Going back is not supported: a build of
//! version 3 refuses to open a log holding records of layout 2 (`replikv-storage`'s
//! `raft_log`), one of version 2 a log holding records of version 3, and one of version 1
//! cuts them as a damaged tail.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const FRAME_VERSION: u8 = 4;
/// Large enough for a snapshot chunk plus headers; small enough to bound a bad header.
pub const MAX_FRAME_BYTES: usize = 64 << 20;
const HEADER: usize = 4 + 4 + 1 + 1 + 8;
/// Most bytes reserved ahead of a frame's data. A length is only a claim until the bytes
/// arrive, so a bare 4-byte header must not cost [`MAX_FRAME_BYTES`] of memory; the buffer
/// still grows (doubling) as the bytes of a large frame come in.
const MAX_RESERVE_AHEAD: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Request = 2,
    Response = 3,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub id: u64,
    pub payload: Bytes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    TooLarge(usize),
    TooShort(usize),
    Checksum,
    Version(u8),
    Kind(u8),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => write!(f, "peer frame of {n} bytes exceeds the limit"),
            FrameError::TooShort(n) => {
                write!(f, "peer frame of {n} bytes is shorter than its header")
            }
            FrameError::Checksum => f.write_str("peer frame checksum mismatch"),
            FrameError::Version(v) => write!(f, "unknown peer frame version {v}"),
            FrameError::Kind(k) => write!(f, "unknown peer frame kind {k}"),
        }
    }
}

pub fn encode(kind: Kind, id: u64, payload: &[u8], out: &mut BytesMut) {
    let len = 4 + 1 + 1 + 8 + payload.len();
    out.reserve(4 + len);
    out.put_u32_le(len as u32);
    let crc_at = out.len();
    out.put_u32_le(0);
    let rest_at = out.len();
    out.put_u8(FRAME_VERSION);
    out.put_u8(kind as u8);
    out.put_u64_le(id);
    out.put_slice(payload);
    let crc = crc32c::crc32c(&out[rest_at..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Takes one frame off the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    if len < HEADER - 4 {
        return Err(FrameError::TooShort(len));
    }
    if buf.len() < 4 + len {
        buf.reserve((4 + len - buf.len()).min(MAX_RESERVE_AHEAD));
        return Ok(None);
    }
    buf.advance(4);
    let mut frame = buf.split_to(len);
    let stored = frame.get_u32_le();
    if crc32c::crc32c(&frame) != stored {
        return Err(FrameError::Checksum);
    }
    let version = frame.get_u8();
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = match frame.get_u8() {
        1 => Kind::Hello,
        2 => Kind::Request,
        3 => Kind::Response,
        k => return Err(FrameError::Kind(k)),
    };
    let id = frame.get_u64_le();
    Ok(Some(Frame {
        kind,
        id,
        payload: frame.freeze(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let mut wire = BytesMut::new();
        encode(Kind::Request, 7, b"hello", &mut wire);
        encode(Kind::Response, 8, b"", &mut wire);
        let all = wire.clone();
        let first = decode(&mut wire).unwrap().unwrap();
        assert_eq!(
            (first.kind, first.id, &first.payload[..]),
            (Kind::Request, 7, &b"hello"[..])
        );
        assert_eq!(decode(&mut wire).unwrap().unwrap().id, 8);
        assert_eq!(decode(&mut wire).unwrap(), None);

        let mut partial = BytesMut::new();
        for (i, b) in all.iter().enumerate() {
            partial.put_u8(*b);
            if i + 1 < 23 {
                assert_eq!(decode(&mut partial).unwrap(), None);
            }
        }
    }

    #[test]
    fn corrupt_or_oversized_frames_are_refused() {
        let mut wire = BytesMut::new();
        encode(Kind::Request, 1, b"payload", &mut wire);
        let mut bad = wire.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode(&mut bad), Err(FrameError::Checksum));
        let mut huge = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert!(matches!(decode(&mut huge), Err(FrameError::TooLarge(_))));
        let mut short = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert!(matches!(decode(&mut short), Err(FrameError::TooShort(_))));
    }

    /// Seen while fuzzing (`peer_frame` ran slowly): a header claiming 64 MiB made the decoder
    /// reserve 64 MiB before a byte of the frame had arrived.
    #[test]
    fn a_bare_header_claiming_a_huge_frame_reserves_little() {
        let mut header = BytesMut::from(&(MAX_FRAME_BYTES as u32).to_le_bytes()[..]);
        assert_eq!(decode(&mut header), Ok(None));
        assert!(
            header.capacity() <= 2 * MAX_RESERVE_AHEAD,
            "{}",
            header.capacity()
        );
        assert_eq!(&header[..], &(MAX_FRAME_BYTES as u32).to_le_bytes()[..]);
    }

    #[test]
    fn a_frame_larger_than_the_reservation_still_arrives_in_pieces() {
        let payload: Vec<u8> = (0..3 * MAX_RESERVE_AHEAD + 5).map(|i| i as u8).collect();
        let mut wire = BytesMut::new();
        encode(Kind::Request, 42, &payload, &mut wire);
        let mut buf = BytesMut::new();
        let mut pieces = wire.chunks(10_000);
        let frame = loop {
            match decode(&mut buf).unwrap() {
                Some(frame) => break frame,
                None => buf.extend_from_slice(pieces.next().expect("frame completes")),
            }
        };
        assert_eq!(
            (frame.kind, frame.id, &frame.payload[..]),
            (Kind::Request, 42, &payload[..])
        );
        assert!(pieces.next().is_none() && buf.is_empty());
    }
}
