//! Client requests (`RequestParser`, `parse_request`) on arbitrary bytes.
//!
//! Properties, beyond "never panics":
//! - Parsing the whole buffer with the stateless `parse_request` and feeding it piece by
//!   piece (at fuzzer-chosen cut points) to one `RequestParser` give the same requests, the
//!   same error and the same unconsumed bytes.
//! - `Ok(None)` and `Ok(Some)` only ever remove a prefix of the buffer; `Ok(Some)` removes
//!   something and returns at least one argument.
//! - No argument is longer than the limits allow.
//! - Every request, re-encoded as a multibulk array, parses back to the same arguments.
//!
//! Input layout: see `common/mod.rs`.
#![no_main]

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use replikv_resp::codec::{parse_request, Limits, ProtocolError, RequestParser};

type Outcome = Result<Option<Vec<Bytes>>, ProtocolError>;

fuzz_target!(|data: &[u8]| {
    let input = common::Input::new(data);
    let limits = &input.limits;

    let (whole, whole_left) = all_at_once(input.wire, limits);
    let (pieces, pieces_left) = piece_by_piece(&input.pieces(), limits);
    assert_eq!(whole, pieces, "chunking changed the outcome");
    assert_eq!(
        whole_left, pieces_left,
        "chunking changed what is left unconsumed"
    );

    let longest = limits.max_bulk_len.max(limits.max_inline_len);
    for args in whole.iter().filter_map(|r| r.as_ref().ok()).flatten() {
        for arg in args {
            assert!(arg.len() <= longest, "argument of {} bytes", arg.len());
        }
        reencoded_parses_back(args);
    }
});

/// The stateless parser, called until it stops producing requests.
fn all_at_once(wire: &[u8], limits: &Limits) -> (Vec<Outcome>, Option<BytesMut>) {
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    loop {
        let before = buf.clone();
        let result = parse_request(&mut buf, limits);
        check_consumption(&before, &buf, &result);
        match result {
            Ok(Some(args)) => out.push(Ok(Some(args))),
            Ok(None) => {
                out.push(Ok(None));
                return (out, Some(buf));
            }
            Err(e) => {
                out.push(Err(e));
                return (out, None);
            }
        }
    }
}

/// One `RequestParser`, the bytes appended piece by piece as a socket would deliver them.
fn piece_by_piece(pieces: &[&[u8]], limits: &Limits) -> (Vec<Outcome>, Option<BytesMut>) {
    let mut parser = RequestParser::new();
    let mut buf = BytesMut::new();
    let mut pieces = pieces.iter();
    let mut out = Vec::new();
    loop {
        let before = buf.clone();
        let result = parser.parse(&mut buf, limits);
        check_consumption(&before, &buf, &result);
        match result {
            Ok(Some(args)) => out.push(Ok(Some(args))),
            Ok(None) => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => {
                    out.push(Ok(None));
                    return (out, Some(buf));
                }
            },
            Err(e) => {
                out.push(Err(e));
                return (out, None);
            }
        }
    }
}

fn check_consumption(before: &[u8], after: &[u8], result: &Outcome) {
    match result {
        Ok(Some(args)) => {
            assert!(!args.is_empty(), "a request with no arguments");
            assert!(after.len() < before.len(), "a request consumed nothing");
            assert!(
                before.ends_with(after),
                "a request removed more than a prefix"
            );
        }
        // Empty requests (blank lines, `*0`, `*-1`) may be skipped; nothing else goes.
        Ok(None) => assert!(before.ends_with(after), "Ok(None) changed the buffer"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// What a client library would send for these arguments.
fn reencoded_parses_back(args: &[Bytes]) {
    let mut wire = BytesMut::new();
    wire.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        wire.put_slice(format!("${}\r\n", arg.len()).as_bytes());
        wire.put_slice(arg);
        wire.put_slice(b"\r\n");
    }
    let back = parse_request(&mut wire, &Limits::default())
        .expect("a multibulk encoding parses")
        .expect("a multibulk encoding is complete");
    assert_eq!(back, args, "re-encoded request parsed differently");
    assert!(wire.is_empty(), "re-encoded request left bytes behind");
}
