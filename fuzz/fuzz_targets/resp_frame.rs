//! RESP2/RESP3 reply frames (`FrameParser`, `parse_frame`) on arbitrary bytes, and `encode`.
//!
//! Properties, beyond "never panics":
//! - The stateless `parse_frame` over the whole buffer and one `FrameParser` fed piece by
//!   piece (fuzzer-chosen cut points) give the same frames, error and unconsumed bytes.
//! - Parsing only ever removes a prefix of the buffer.
//! - Round trip: every parsed frame, encoded again with `encode`, parses (completely, with
//!   default limits) to a frame that matches it, under both protocols:
//!   - RESP3 is the identity except where the encoding is lossy by design: `NullArray` has no
//!     RESP3 form of its own and comes back as `Null` (as in Redis); an error's CR/LF become
//!     spaces (`!` blob errors may carry them, a `-` line cannot); NaN != NaN, so doubles are
//!     compared by bits with any NaN equal to any NaN.
//!   - RESP2 is the documented downgrade: map -> flat array, set/push -> array, boolean ->
//!     0/1, double/verbatim/big number -> bulk string (a double's text parses back to it).
//! - The encoding is a fixed point: encoding the frame that came back gives the same bytes.
//!
//! Input layout: see `common/mod.rs`.
#![no_main]

mod common;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use replikv_resp::codec::{encode, parse_frame, Frame, FrameParser, Limits, Protocol};

type Outcome = common::Outcome<Frame>;

fuzz_target!(|data: &[u8]| {
    let input = common::Input::new(data);
    let limits = &input.limits;

    let (whole, whole_left) = common::all_at_once(
        input.wire,
        |buf| parse_frame(buf, limits),
        check_consumption,
    );
    let mut parser = FrameParser::new();
    let (pieces, pieces_left) = common::piece_by_piece(
        &input.pieces(),
        |buf| parser.parse(buf, limits),
        check_consumption,
    );
    assert!(
        whole.len() == pieces.len() && whole.iter().zip(&pieces).all(|(a, b)| same_outcome(a, b)),
        "chunking changed the outcome: {whole:?} versus {pieces:?}"
    );
    assert_eq!(
        whole_left, pieces_left,
        "chunking changed what is left unconsumed"
    );

    for frame in whole.iter().filter_map(|r| r.as_ref().ok()).flatten() {
        for proto in [Protocol::Resp3, Protocol::Resp2] {
            round_trip(frame, proto);
        }
    }
});

fn check_consumption(before: &[u8], after: &[u8], result: &Outcome) {
    match result {
        Ok(Some(_)) => {
            assert!(after.len() < before.len(), "a frame consumed nothing");
            assert!(
                before.ends_with(after),
                "a frame removed more than a prefix"
            );
        }
        // Unlike requests, frames are never skipped: Ok(None) leaves the buffer alone.
        Ok(None) => assert_eq!(before, after, "Ok(None) changed the buffer"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// `==`, except that a NaN double equals any NaN (`Frame`'s `PartialEq` uses `f64`'s).
fn same_outcome(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (Ok(Some(a)), Ok(Some(b))) => identical(a, b),
        (a, b) => a == b,
    }
}

fn identical(a: &Frame, b: &Frame) -> bool {
    match (a, b) {
        (Frame::Double(a), Frame::Double(b)) => same_double(*a, *b),
        (Frame::Array(a), Frame::Array(b))
        | (Frame::Set(a), Frame::Set(b))
        | (Frame::Push(a), Frame::Push(b)) => same_items(a, b, identical),
        (Frame::Map(a), Frame::Map(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|((ka, va), (kb, vb))| identical(ka, kb) && identical(va, vb))
        }
        (a, b) => a == b,
    }
}

fn round_trip(frame: &Frame, proto: Protocol) {
    let mut wire = BytesMut::new();
    encode(frame, proto, &mut wire);
    let first = wire.clone();
    let back = parse_frame(&mut wire, &Limits::default())
        .unwrap_or_else(|e| panic!("{frame:?} encoded under {proto:?} does not parse: {e}"))
        .unwrap_or_else(|| panic!("{frame:?} encoded under {proto:?} is incomplete"));
    assert!(
        wire.is_empty(),
        "{frame:?} under {proto:?}: bytes left after the frame"
    );
    let matches = match proto {
        Protocol::Resp3 => same_resp3(frame, &back),
        Protocol::Resp2 => same_resp2(frame, &back),
    };
    assert!(matches, "{frame:?} came back under {proto:?} as {back:?}");
    let mut again = BytesMut::new();
    encode(&back, proto, &mut again);
    assert_eq!(
        first, again,
        "{frame:?} under {proto:?}: encoding is not a fixed point"
    );
}

/// What a line-typed frame's text becomes on the wire.
fn line_text(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

fn same_double(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn same_items(a: &[Frame], b: &[Frame], same: fn(&Frame, &Frame) -> bool) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
}

fn same_resp3(orig: &Frame, back: &Frame) -> bool {
    match (orig, back) {
        (Frame::NullArray, Frame::Null) => true,
        (Frame::Simple(a), Frame::Simple(b)) | (Frame::Error(a), Frame::Error(b)) => {
            line_text(a) == *b
        }
        (Frame::Double(a), Frame::Double(b)) => same_double(*a, *b),
        (Frame::Array(a), Frame::Array(b))
        | (Frame::Set(a), Frame::Set(b))
        | (Frame::Push(a), Frame::Push(b)) => same_items(a, b, same_resp3),
        (Frame::Map(a), Frame::Map(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|((ka, va), (kb, vb))| same_resp3(ka, kb) && same_resp3(va, vb))
        }
        (Frame::Array(_) | Frame::Set(_) | Frame::Push(_) | Frame::Map(_), _) => false,
        (a, b) => a == b,
    }
}

fn same_resp2(orig: &Frame, back: &Frame) -> bool {
    match (orig, back) {
        (Frame::Simple(a), Frame::Simple(b)) | (Frame::Error(a), Frame::Error(b)) => {
            line_text(a) == *b
        }
        (Frame::Array(a) | Frame::Set(a) | Frame::Push(a), Frame::Array(b)) => {
            same_items(a, b, same_resp2)
        }
        (Frame::Map(pairs), Frame::Array(b)) => {
            let flat: Vec<Frame> = pairs
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect();
            same_items(&flat, b, same_resp2)
        }
        (Frame::Double(d), Frame::Bulk(text)) => std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
            .is_some_and(|parsed| same_double(*d, parsed)),
        (Frame::Boolean(v), Frame::Integer(n)) => i64::from(*v) == *n,
        (Frame::Verbatim { text, .. }, Frame::Bulk(b)) => text == b,
        (Frame::BigNumber(digits), Frame::Bulk(b)) => digits.as_bytes() == &b[..],
        (
            Frame::Array(_)
            | Frame::Set(_)
            | Frame::Push(_)
            | Frame::Map(_)
            | Frame::Double(_)
            | Frame::Boolean(_)
            | Frame::Verbatim { .. }
            | Frame::BigNumber(_),
            _,
        ) => false,
        (a, b) => a == b,
    }
}
