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
use replikv_resp::codec::{parse_request, Limits, RequestParser};

type Outcome = common::Outcome<Vec<Bytes>>;

fuzz_target!(|data: &[u8]| {
    let input = common::Input::new(data);
    let limits = &input.limits;

    let (whole, whole_left) = common::all_at_once(
        input.wire,
        |buf| parse_request(buf, limits),
        check_consumption,
    );
    let mut parser = RequestParser::new();
    let (pieces, pieces_left) = common::piece_by_piece(
        &input.pieces(),
        |buf| parser.parse(buf, limits),
        check_consumption,
    );
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
