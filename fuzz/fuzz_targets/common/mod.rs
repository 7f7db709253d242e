//! The input layout shared by the two RESP targets, so a seed file is a small header followed
//! by real protocol bytes:
//!
//! ```text
//! byte 0       limits: bit 7 set = `Limits::default()`, otherwise small limits from bits 0-6
//! byte 1       n = number of chunk sizes that follow (taken modulo 17, so 0..=16)
//! n bytes      chunk sizes, each byte b meaning b + 1 bytes, used in a cycle; n = 0 means
//!              one byte at a time
//! the rest     the wire bytes
//! ```
//!
//! A header byte of `0x80 0x00` therefore means "default limits, fed one byte at a time".

use bytes::BytesMut;
use replikv_resp::codec::{Limits, ProtocolError};

pub struct Input<'a> {
    pub limits: Limits,
    pub chunks: Vec<usize>,
    pub wire: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        let (&limits_byte, rest) = data.split_first().unwrap_or((&0x80, &[]));
        let (&count, rest) = rest.split_first().unwrap_or((&0, &[]));
        let count = (count as usize % 17).min(rest.len());
        let (sizes, wire) = rest.split_at(count);
        Input {
            limits: limits(limits_byte),
            chunks: sizes.iter().map(|&b| b as usize + 1).collect(),
            wire,
        }
    }

    /// The chunk sizes to feed `wire` in, in order, covering it exactly.
    pub fn pieces(&self) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut rest = self.wire;
        let mut sizes = self.chunks.iter().copied().cycle();
        while !rest.is_empty() {
            let size = if self.chunks.is_empty() {
                1
            } else {
                sizes.next().expect("cycle of a non-empty list")
            };
            let (piece, tail) = rest.split_at(size.min(rest.len()));
            out.push(piece);
            rest = tail;
        }
        out
    }
}

/// Small limits, zero included, so every limit check is reached with short inputs.
fn limits(b: u8) -> Limits {
    if b & 0x80 != 0 {
        return Limits::default();
    }
    let b = b as usize;
    Limits {
        max_bulk_len: (b & 0x07) * 3,                // 0..=21
        max_array_len: (b >> 3) & 0x03,              // 0..=3
        max_depth: (b >> 5) & 0x03,                  // 0..=3
        max_inline_len: (((b >> 1) & 0x07) + 1) * 4, // 4..=32
    }
}

/// What one parse call gave.
pub type Outcome<T> = Result<Option<T>, ProtocolError>;

/// Calls a stateless `parse` on the whole wire until it stops producing; returns every
/// outcome, and the bytes left unconsumed unless it ended in an error. `check` sees the
/// buffer before and after each call.
pub fn all_at_once<T>(
    wire: &[u8],
    mut parse: impl FnMut(&mut BytesMut) -> Outcome<T>,
    check: impl Fn(&[u8], &[u8], &Outcome<T>),
) -> (Vec<Outcome<T>>, Option<BytesMut>) {
    let mut buf = BytesMut::from(wire);
    let mut pieces = std::iter::empty::<&[u8]>();
    drive(&mut buf, &mut pieces, &mut parse, &check)
}

/// Feeds `pieces` one after another to a stateful `parse`, as a socket would deliver them;
/// returns what [`all_at_once`] returns.
pub fn piece_by_piece<T>(
    pieces: &[&[u8]],
    mut parse: impl FnMut(&mut BytesMut) -> Outcome<T>,
    check: impl Fn(&[u8], &[u8], &Outcome<T>),
) -> (Vec<Outcome<T>>, Option<BytesMut>) {
    let mut buf = BytesMut::new();
    let mut pieces = pieces.iter().copied();
    drive(&mut buf, &mut pieces, &mut parse, &check)
}

fn drive<T>(
    buf: &mut BytesMut,
    pieces: &mut dyn Iterator<Item = &[u8]>,
    parse: &mut impl FnMut(&mut BytesMut) -> Outcome<T>,
    check: &impl Fn(&[u8], &[u8], &Outcome<T>),
) -> (Vec<Outcome<T>>, Option<BytesMut>) {
    let mut out = Vec::new();
    loop {
        let before = buf.clone();
        let result = parse(buf);
        check(&before, buf, &result);
        match result {
            Ok(Some(item)) => out.push(Ok(Some(item))),
            Ok(None) => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => {
                    out.push(Ok(None));
                    return (out, Some(buf.clone()));
                }
            },
            Err(e) => {
                out.push(Err(e));
                return (out, None);
            }
        }
    }
}
