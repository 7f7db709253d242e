//! RESP2/RESP3 wire codec: client requests in, reply frames out.
//!
//! How data flows:
//! - Requests: the connection loop appends socket reads to a `BytesMut` and calls
//!   [`RequestParser::parse`] (or the stateless [`parse_request`]) until it gets `Ok(None)`.
//!   Each `Ok(Some(args))` is one command; its arguments are zero-copy slices of the read
//!   buffer. Clients send arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or, from a
//!   terminal, inline lines (`GET k\r\n`) split with Redis's quoting rules.
//! - Replies: the command layer builds a [`Frame`] and [`encode`] appends it to the write
//!   buffer, downgrading RESP3-only types the way Redis does when the connection speaks RESP2.
//! - [`parse_frame`] / [`FrameParser`] read any RESP2/RESP3 value. The server does not need
//!   them; replikv's client tools, the tests and the fuzz target do.
//!
//! Both parsers work in two steps, so incomplete input never consumes a byte:
//! 1. scan: walk the headers from the front of the buffer, checking each length against
//!    [`Limits`] before believing it, and record where payloads lie as offsets. Nothing is
//!    sized from an untrusted header beyond `PREALLOC_CAP` elements, and bulk payloads are
//!    skipped by length, never searched.
//! 2. cut: once the whole value is present, split it off with one `split_to`, freeze it and
//!    hand out `Bytes::slice`s of it.
//!
//! The `*Parser` types also remember how far the scan got, so a request that trickles in over
//! many reads is scanned once rather than once per read (which would be quadratic, and a cheap
//! way for a slow client to burn server CPU). Every [`ProtocolError`] is fatal for the
//! connection: the caller sends its text as an error reply and closes.

use std::ops::Range;
use std::str::FromStr;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Most elements reserved up front from a count header. A header is only a claim until the
/// elements arrive, so `*99999999` must cost no more than `*1024` before its data is here.
const PREALLOC_CAP: usize = 1024;

/// The protocol version a connection speaks; `HELLO 3` switches a connection to RESP3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// What every connection starts with.
    #[default]
    Resp2,
    Resp3,
}

/// One RESP value.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// `+OK\r\n`. Must not contain CR or LF; [`encode`] turns them into spaces.
    Simple(String),
    /// `-ERR message\r\n` (a RESP3 blob error `!` parses to this too). CR/LF become spaces.
    Error(String),
    /// `:42\r\n`
    Integer(i64),
    /// `$5\r\nhello\r\n`; binary safe.
    Bulk(Bytes),
    /// RESP3 `_\r\n`; RESP2 null bulk string `$-1\r\n`.
    Null,
    /// RESP2 null array `*-1\r\n`; encoded as `_\r\n` under RESP3, as Redis does.
    NullArray,
    /// `*2\r\n...`
    Array(Vec<Frame>),
    /// RESP3 `%1\r\n<key><value>`
    Map(Vec<(Frame, Frame)>),
    /// RESP3 `~2\r\n...`
    Set(Vec<Frame>),
    /// RESP3 `,1.5\r\n` (also `,inf`, `,-inf`, `,nan`)
    Double(f64),
    /// RESP3 `#t\r\n` / `#f\r\n`
    Boolean(bool),
    /// RESP3 `=9\r\ntxt:hello\r\n`: text with a three-byte format such as `txt` or `mkd`.
    Verbatim { format: [u8; 3], text: Bytes },
    /// RESP3 `(12345678901234567890\r\n`: an integer of any size, kept as its decimal digits.
    BigNumber(String),
    /// RESP3 out-of-band `>3\r\n...` (pub/sub messages, client-side caching invalidations).
    Push(Vec<Frame>),
}

/// Bounds on what a peer may make us hold or walk. Lengths over a bound are protocol errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string payload, in bytes (Redis's `proto-max-bulk-len`).
    pub max_bulk_len: usize,
    /// Most elements in one array, set or push, or pairs in one map; also most arguments in
    /// one request.
    pub max_array_len: usize,
    /// Most aggregate levels nested in one frame; the outermost aggregate is level 1.
    /// Requests are flat and do not use it.
    pub max_depth: usize,
    /// Longest inline request line, in bytes, counting everything before its `\n` (a `\r`
    /// too); also the longest text of a line-typed frame (`+ - : , # ( _`) before its `\r\n`.
    pub max_inline_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: 1024 * 1024,
            max_depth: 32,
            max_inline_len: 64 * 1024,
        }
    }
}

/// Malformed or over-limit input. Every variant means the same thing to the caller: reply
/// with the error's text and close the connection, since the stream can no longer be framed.
/// Texts use Redis's wording where Redis has one, so clients see familiar messages.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// A bulk length that is not a number, is negative (other than a RESP2 null), or is
    /// larger than [`Limits::max_bulk_len`].
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// An element count that is not a number, is negative (other than a null array), or is
    /// larger than [`Limits::max_array_len`].
    #[error("Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    /// An inline line longer than [`Limits::max_inline_len`].
    #[error("Protocol error: too big inline request")]
    TooBigInlineRequest,
    /// An inline quote left open, or closed and followed by something other than a space.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A request array element that is not a bulk string.
    #[error("Protocol error: expected '$', got '{}'", .got.escape_ascii())]
    ExpectedBulk { got: u8 },
    /// A bulk payload or line not followed by `\r\n`.
    #[error("Protocol error: expected '\\r\\n'")]
    MissingCrlf,
    /// A line-typed frame longer than [`Limits::max_inline_len`].
    #[error("Protocol error: line longer than {max_len} bytes")]
    LineTooLong { max_len: usize },
    /// A frame starting with a byte that is no RESP2/RESP3 type (attributes `|` and streamed
    /// types are not supported either).
    #[error("Protocol error: unknown type byte '{}'", .got.escape_ascii())]
    UnknownType { got: u8 },
    /// A scalar whose text does not parse as its type (`kind` is e.g. "integer", "double").
    #[error("Protocol error: invalid {kind}")]
    InvalidValue { kind: &'static str },
    /// Aggregates nested deeper than [`Limits::max_depth`].
    #[error("Protocol error: nesting deeper than {max_depth} levels")]
    TooDeep { max_depth: usize },
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// Parses one client request from the front of `buf`.
///
/// `Ok(Some(args))`: the request's bytes were removed from `buf`; `args` is never empty and
/// its elements are slices of the read buffer (they keep that allocation alive, so copy an
/// argument before storing it for long). `Ok(None)`: more bytes are needed and `buf` is
/// untouched, except that empty requests (a blank inline line, `*0`, `*-1`) are consumed and
/// skipped as Redis does. `Err`: reply with the error and close.
///
/// This forgets its progress between calls; a connection should keep a [`RequestParser`]
/// instead, which resumes where the last incomplete call stopped.
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    RequestParser::new().parse(buf, limits)
}

/// [`parse_request`] with memory: keep one per connection.
///
/// Contract: between a call that returned `Ok(None)` and the next call, the caller only
/// appends to `buf`. (Breaking it cannot cause a panic, only a wrong parse.)
#[derive(Debug, Default)]
pub struct RequestParser {
    progress: Progress,
    /// Payload offsets of the arguments scanned so far in the current multibulk request.
    /// Kept across requests so the common case allocates only the returned `Vec`.
    spans: Vec<Range<usize>>,
}

#[derive(Clone, Copy, Debug, Default)]
enum Progress {
    /// At a request boundary.
    #[default]
    Idle,
    /// Inside an inline line; the first `scanned` bytes hold no newline.
    Inline { scanned: usize },
    /// Inside a multibulk request of `expected` arguments; `spans` covers those before `pos`.
    Multibulk { expected: usize, pos: usize },
}

/// What one attempt at the front of the buffer produced.
enum Step {
    Incomplete,
    /// An empty request was consumed; try again.
    Skipped,
    Request(Vec<Bytes>),
}

impl RequestParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`parse_request`]; identical results, but resumes an incomplete scan.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            match self.step(buf, limits) {
                Ok(Step::Incomplete) => return Ok(None),
                Ok(Step::Skipped) => continue,
                Ok(Step::Request(args)) => return Ok(Some(args)),
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
    }

    fn reset(&mut self) {
        self.progress = Progress::Idle;
        self.spans.clear();
    }

    fn step(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Step, ProtocolError> {
        // A saved offset past the end means the caller shrank or replaced `buf`; starting
        // over is the only safe reading of that.
        let saved_offset = match self.progress {
            Progress::Idle => 0,
            Progress::Inline { scanned } => scanned,
            Progress::Multibulk { pos, .. } => pos,
        };
        if saved_offset > buf.len() {
            self.reset();
        }
        match self.progress {
            Progress::Multibulk { expected, pos } => {
                self.multibulk_args(buf, limits, expected, pos)
            }
            Progress::Inline { scanned } => self.inline(buf, limits, scanned),
            Progress::Idle => match buf.first() {
                None => Ok(Step::Incomplete),
                Some(b'*') => self.multibulk(buf, limits),
                Some(_) => self.inline(buf, limits, 0),
            },
        }
    }

    /// `*<count>\r\n` then `count` bulk strings.
    fn multibulk(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Step, ProtocolError> {
        let Some((count, pos)) =
            read_len(buf, 1).map_err(|BadLength| ProtocolError::InvalidMultibulkLength)?
        else {
            return Ok(Step::Incomplete);
        };
        // Redis treats an empty or null array as no request at all.
        if count == 0 || count == -1 {
            buf.advance(pos);
            return Ok(Step::Skipped);
        }
        let expected = checked_count(count, limits)?;
        self.spans.clear();
        self.spans.reserve(expected.min(PREALLOC_CAP));
        self.multibulk_args(buf, limits, expected, pos)
    }

    /// The hot path: one pass over the argument headers from `pos`, skipping payloads by length.
    fn multibulk_args(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
        expected: usize,
        mut pos: usize,
    ) -> Result<Step, ProtocolError> {
        while self.spans.len() < expected {
            let Some(&type_byte) = buf.get(pos) else {
                return Ok(self.suspend(expected, pos));
            };
            if type_byte != b'$' {
                return Err(ProtocolError::ExpectedBulk { got: type_byte });
            }
            let Some((len, start)) =
                read_len(buf, pos + 1).map_err(|BadLength| ProtocolError::InvalidBulkLength)?
            else {
                return Ok(self.suspend(expected, pos));
            };
            let len = checked_bulk_len(len, limits)?;
            let Some(end) = read_payload(buf, start, len)? else {
                return Ok(self.suspend(expected, pos));
            };
            self.spans.push(start..end);
            pos = end + 2;
        }
        let request = buf.split_to(pos).freeze();
        let args = self
            .spans
            .drain(..)
            .map(|span| request.slice(span))
            .collect();
        // One huge request should not pin its span table for the connection's lifetime.
        self.spans.shrink_to(PREALLOC_CAP);
        self.progress = Progress::Idle;
        Ok(Step::Request(args))
    }

    fn suspend(&mut self, expected: usize, pos: usize) -> Step {
        self.progress = Progress::Multibulk { expected, pos };
        Step::Incomplete
    }

    /// A line up to `\n` (an `\r` before it is dropped), split like Redis's `sdssplitargs`.
    fn inline(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
        scanned: usize,
    ) -> Result<Step, ProtocolError> {
        let max_len = limits.max_inline_len;
        // A newline at index `max_len` ends a line of exactly `max_len` bytes; one further on
        // is too far, so the search never looks past it.
        let window_end = buf.len().min(max_len.saturating_add(1));
        let newline = buf
            .get(scanned..window_end)
            .and_then(|window| window.iter().position(|&b| b == b'\n'))
            .map(|offset| scanned + offset);
        let Some(newline) = newline else {
            if buf.len() > max_len {
                return Err(ProtocolError::TooBigInlineRequest);
            }
            self.progress = Progress::Inline { scanned: buf.len() };
            return Ok(Step::Incomplete);
        };
        self.progress = Progress::Idle;
        let line = buf.split_to(newline + 1).freeze();
        let mut end = newline;
        if end > 0 && line[end - 1] == b'\r' {
            end -= 1;
        }
        // Redis hands the line to sdssplitargs as a C string, so a NUL ends it. Matching that
        // keeps an inline request meaning the same thing here as in Redis.
        if let Some(nul) = line[..end].iter().position(|&b| b == 0) {
            end = nul;
        }
        let pieces = split_inline(&line[..end])?;
        if pieces.is_empty() {
            return Ok(Step::Skipped);
        }
        Ok(Step::Request(
            pieces.into_iter().map(|p| p.into_bytes(&line)).collect(),
        ))
    }
}

/// One inline argument: a range of the line while it is a contiguous copy of it (the usual
/// case, zero-copy), otherwise its own bytes (after escapes or quotes joined mid-word).
enum Piece {
    Span(Range<usize>),
    Owned(Vec<u8>),
}

impl Piece {
    /// Appends the line's byte at `at`, staying a span while that is possible.
    fn push_from_line(&mut self, line: &[u8], at: usize) {
        match self {
            Piece::Span(span) if span.start == span.end => *span = at..at + 1,
            Piece::Span(span) if span.end == at => span.end += 1,
            Piece::Span(_) => self.push_byte(line, line[at]),
            Piece::Owned(bytes) => bytes.push(line[at]),
        }
    }

    /// Appends a byte that is not the next byte of the line (an escape's result).
    fn push_byte(&mut self, line: &[u8], byte: u8) {
        match self {
            Piece::Span(span) => {
                let mut bytes = line[span.clone()].to_vec();
                bytes.push(byte);
                *self = Piece::Owned(bytes);
            }
            Piece::Owned(bytes) => bytes.push(byte),
        }
    }

    fn into_bytes(self, line: &Bytes) -> Bytes {
        match self {
            Piece::Span(span) => line.slice(span),
            Piece::Owned(bytes) => Bytes::from(bytes),
        }
    }
}

/// C's `isspace`, which sdssplitargs uses between arguments and after a closing quote.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Redis's `sdssplitargs`: arguments separated by blanks; `"..."` with `\xHH`, `\n`, `\r`,
/// `\t`, `\b`, `\a` and `\<any>` escapes; `'...'` with only `\'`; a closing quote must be
/// followed by a blank or the end. Quotes may also open mid-word (`ab"c d"` is `abc d`).
fn split_inline(line: &[u8]) -> Result<Vec<Piece>, ProtocolError> {
    let at = |i: usize| line.get(i).copied();
    let closes_cleanly = |i: usize| at(i + 1).is_none_or(is_c_space);
    let mut pieces = Vec::new();
    let mut p = 0;
    loop {
        while at(p).is_some_and(is_c_space) {
            p += 1;
        }
        if p >= line.len() {
            return Ok(pieces);
        }
        let mut piece = Piece::Span(p..p);
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = at(p);
            if in_double {
                match c {
                    None => return Err(ProtocolError::UnbalancedQuotes),
                    Some(b'\\') => match (at(p + 1), at(p + 2), at(p + 3)) {
                        (Some(b'x'), Some(hi), Some(lo))
                            if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() =>
                        {
                            piece.push_byte(line, (hex_value(hi) << 4) | hex_value(lo));
                            p += 4;
                        }
                        (Some(escaped), _, _) => {
                            match escaped {
                                b'n' => piece.push_byte(line, b'\n'),
                                b'r' => piece.push_byte(line, b'\r'),
                                b't' => piece.push_byte(line, b'\t'),
                                b'b' => piece.push_byte(line, 0x08),
                                b'a' => piece.push_byte(line, 0x07),
                                _ => piece.push_from_line(line, p + 1),
                            }
                            p += 2;
                        }
                        // A backslash ending the line is a literal one, then the quote is open.
                        (None, _, _) => {
                            piece.push_from_line(line, p);
                            p += 1;
                        }
                    },
                    Some(b'"') => {
                        if !closes_cleanly(p) {
                            return Err(ProtocolError::UnbalancedQuotes);
                        }
                        p += 1;
                        break;
                    }
                    Some(_) => {
                        piece.push_from_line(line, p);
                        p += 1;
                    }
                }
            } else if in_single {
                match c {
                    None => return Err(ProtocolError::UnbalancedQuotes),
                    Some(b'\\') if at(p + 1) == Some(b'\'') => {
                        piece.push_from_line(line, p + 1);
                        p += 2;
                    }
                    Some(b'\'') => {
                        if !closes_cleanly(p) {
                            return Err(ProtocolError::UnbalancedQuotes);
                        }
                        p += 1;
                        break;
                    }
                    Some(_) => {
                        piece.push_from_line(line, p);
                        p += 1;
                    }
                }
            } else {
                match c {
                    None => break,
                    // Unlike the blank-skipping above, only these end an unquoted word.
                    Some(b' ' | b'\n' | b'\r' | b'\t') => {
                        p += 1;
                        break;
                    }
                    Some(b'"') => {
                        in_double = true;
                        p += 1;
                    }
                    Some(b'\'') => {
                        in_single = true;
                        p += 1;
                    }
                    Some(_) => {
                        piece.push_from_line(line, p);
                        p += 1;
                    }
                }
            }
        }
        pieces.push(piece);
    }
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Shared header readers
// ---------------------------------------------------------------------------------------------

/// A length header that is not a Redis-strict decimal; the caller picks the error wording.
struct BadLength;

/// Reads `-?digits\r\n` at `pos` the way Redis's `string2ll` accepts it: no sign other than
/// `-`, no leading zeros, no `-0`, no overflow. Returns the value and the offset after CRLF.
///
/// It goes byte by byte, so a stray byte fails at once and an incomplete header can never be
/// more than ~21 bytes: a peer cannot make us wait on, or rescan, a long "length" line.
fn read_len(buf: &[u8], pos: usize) -> Result<Option<(i64, usize)>, BadLength> {
    let mut i = pos;
    let negative = buf.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let digits_start = i;
    let mut magnitude: i64 = 0;
    loop {
        match buf.get(i) {
            None => return Ok(None),
            Some(b'\r') => break,
            Some(&digit @ b'0'..=b'9') => {
                if i > digits_start && magnitude == 0 {
                    return Err(BadLength); // leading zero
                }
                magnitude = magnitude
                    .checked_mul(10)
                    .and_then(|m| m.checked_add(i64::from(digit - b'0')))
                    .ok_or(BadLength)?;
                i += 1;
            }
            Some(_) => return Err(BadLength),
        }
    }
    if i == digits_start || (negative && magnitude == 0) {
        return Err(BadLength);
    }
    match buf.get(i + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((if negative { -magnitude } else { magnitude }, i + 2))),
        Some(_) => Err(BadLength),
    }
}

fn checked_bulk_len(len: i64, limits: &Limits) -> Result<usize, ProtocolError> {
    usize::try_from(len)
        .ok()
        .filter(|&len| len <= limits.max_bulk_len)
        .ok_or(ProtocolError::InvalidBulkLength)
}

fn checked_count(count: i64, limits: &Limits) -> Result<usize, ProtocolError> {
    usize::try_from(count)
        .ok()
        .filter(|&count| count <= limits.max_array_len)
        .ok_or(ProtocolError::InvalidMultibulkLength)
}

/// Checks that `len` payload bytes at `start` are present and followed by CRLF; returns the
/// payload's end. A wrong byte where the CR or LF belongs fails as soon as it is visible.
fn read_payload(buf: &[u8], start: usize, len: usize) -> Result<Option<usize>, ProtocolError> {
    let end = start
        .checked_add(len)
        .ok_or(ProtocolError::InvalidBulkLength)?;
    match (buf.get(end), buf.get(end.saturating_add(1))) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some(end)),
        _ => Err(ProtocolError::MissingCrlf),
    }
}

/// Reads a line-typed frame's text at `pos` up to CRLF; returns its range and the offset
/// after CRLF. A bare CR or LF inside the text is an error, as neither may appear there.
fn read_line(
    buf: &[u8],
    pos: usize,
    max_len: usize,
) -> Result<Option<(Range<usize>, usize)>, ProtocolError> {
    let window_end = buf.len().min(pos.saturating_add(max_len).saturating_add(1));
    let terminator = buf
        .get(pos..window_end)
        .and_then(|window| window.iter().position(|&b| b == b'\r' || b == b'\n'))
        .map(|offset| pos + offset);
    let Some(cr) = terminator else {
        if buf.len().saturating_sub(pos) > max_len {
            return Err(ProtocolError::LineTooLong { max_len });
        }
        return Ok(None);
    };
    match (buf.get(cr), buf.get(cr + 1)) {
        (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some((pos..cr, cr + 2))),
        _ => Err(ProtocolError::MissingCrlf),
    }
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Parses any single RESP2/RESP3 frame from the front of `buf`, with the same contract as
/// [`parse_request`]: `Ok(None)` leaves `buf` untouched. Aggregates are walked with an explicit
/// stack bounded by [`Limits::max_depth`], never by recursion.
///
/// Simple strings, errors and big numbers that are not UTF-8 are decoded lossily: a tool
/// reading a server's error should show it, not fail on it.
pub fn parse_frame(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, ProtocolError> {
    FrameParser::new().parse(buf, limits)
}

/// [`parse_frame`] with memory, for reading a large reply that arrives over many reads.
/// Same contract as [`RequestParser`]: only append to `buf` between calls.
#[derive(Debug, Default)]
pub struct FrameParser {
    /// Offset just past the last scanned token.
    pos: usize,
    /// Elements still missing from each open aggregate, outermost first. A map counts keys
    /// and values separately.
    open: Vec<usize>,
    /// Every token scanned so far, in order: the frame's shape with payloads as offsets.
    tape: Vec<Token>,
}

/// One scanned header with its payload located (and scalars already parsed).
#[derive(Debug)]
enum Token {
    Simple(Range<usize>),
    Error(Range<usize>),
    Integer(i64),
    Bulk(Range<usize>),
    Null,
    NullArray,
    Double(f64),
    Boolean(bool),
    Verbatim([u8; 3], Range<usize>),
    BigNumber(Range<usize>),
    /// An aggregate header and how many frames follow it (twice the pairs for a map).
    Aggregate(Aggregate, usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aggregate {
    Array,
    Map,
    Set,
    Push,
}

impl FrameParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`parse_frame`]; identical results, but resumes an incomplete scan.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Frame>, ProtocolError> {
        if self.pos > buf.len() {
            self.reset(); // `buf` shrank: the contract was broken, start over.
        }
        match self.scan(buf, limits) {
            Ok(false) => Ok(None),
            Ok(true) => {
                let bytes = buf.split_to(self.pos).freeze();
                let frame = build(&bytes, &mut self.tape);
                self.reset();
                Ok(Some(frame))
            }
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }

    fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
        self.tape.clear();
        self.tape.shrink_to(PREALLOC_CAP);
    }

    /// Extends the tape until the outermost value is complete (`true`) or input runs out.
    fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<bool, ProtocolError> {
        loop {
            let Some((token, next)) = read_token(buf, self.pos, limits)? else {
                return Ok(false);
            };
            let children = match token {
                Token::Aggregate(_, children) => {
                    if self.open.len() >= limits.max_depth {
                        return Err(ProtocolError::TooDeep {
                            max_depth: limits.max_depth,
                        });
                    }
                    children
                }
                _ => 0,
            };
            self.tape.push(token);
            self.pos = next;
            if children > 0 {
                self.open.push(children);
                continue;
            }
            // A value is complete: it fills a slot in its parent, which may complete that too.
            loop {
                let Some(missing) = self.open.last_mut() else {
                    return Ok(true);
                };
                *missing -= 1;
                if *missing > 0 {
                    break;
                }
                self.open.pop();
            }
        }
    }
}

/// An aggregate being assembled from the tape.
struct OpenAggregate {
    kind: Aggregate,
    missing: usize,
    items: Vec<Frame>,
}

impl OpenAggregate {
    fn finish(self) -> Frame {
        finish_aggregate(self.kind, self.items)
    }
}

fn finish_aggregate(kind: Aggregate, items: Vec<Frame>) -> Frame {
    match kind {
        Aggregate::Array => Frame::Array(items),
        Aggregate::Set => Frame::Set(items),
        Aggregate::Push => Frame::Push(items),
        Aggregate::Map => {
            let mut pairs = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(key), Some(value)) = (items.next(), items.next()) {
                pairs.push((key, value));
            }
            Frame::Map(pairs)
        }
    }
}

/// Turns a complete tape into a frame; `bytes` is exactly the scanned frame.
fn build(bytes: &Bytes, tape: &mut Vec<Token>) -> Frame {
    let lossy = |span: Range<usize>| String::from_utf8_lossy(&bytes[span]).into_owned();
    let mut open: Vec<OpenAggregate> = Vec::new();
    let mut tokens = tape.drain(..);
    loop {
        let token = tokens
            .next()
            .expect("scan ends the tape with the token that completes the outermost frame");
        let mut value = match token {
            Token::Simple(span) => Frame::Simple(lossy(span)),
            Token::Error(span) => Frame::Error(lossy(span)),
            Token::Integer(n) => Frame::Integer(n),
            Token::Bulk(span) => Frame::Bulk(bytes.slice(span)),
            Token::Null => Frame::Null,
            Token::NullArray => Frame::NullArray,
            Token::Double(d) => Frame::Double(d),
            Token::Boolean(b) => Frame::Boolean(b),
            Token::Verbatim(format, span) => Frame::Verbatim {
                format,
                text: bytes.slice(span),
            },
            Token::BigNumber(span) => Frame::BigNumber(lossy(span)),
            Token::Aggregate(kind, 0) => finish_aggregate(kind, Vec::new()),
            Token::Aggregate(kind, children) => {
                // Exact capacity is safe here: every child is already in `bytes`.
                open.push(OpenAggregate {
                    kind,
                    missing: children,
                    items: Vec::with_capacity(children),
                });
                continue;
            }
        };
        loop {
            let Some(mut parent) = open.pop() else {
                return value;
            };
            parent.items.push(value);
            parent.missing -= 1;
            if parent.missing > 0 {
                open.push(parent);
                break;
            }
            value = parent.finish();
        }
    }
}

/// Reads one token at `pos`; `Ok(None)` if it is not all there yet.
fn read_token(
    buf: &[u8],
    pos: usize,
    limits: &Limits,
) -> Result<Option<(Token, usize)>, ProtocolError> {
    let invalid = |kind| ProtocolError::InvalidValue { kind };
    let Some(&type_byte) = buf.get(pos) else {
        return Ok(None);
    };
    let body = pos + 1;
    match type_byte {
        b'+' => with_line(buf, body, limits, |_, span| Ok(Token::Simple(span))),
        b'-' => with_line(buf, body, limits, |_, span| Ok(Token::Error(span))),
        b':' => with_line(buf, body, limits, |text, _| {
            parse_ascii(text)
                .map(Token::Integer)
                .ok_or(invalid("integer"))
        }),
        b',' => with_line(buf, body, limits, |text, _| {
            parse_ascii(text)
                .map(Token::Double)
                .ok_or(invalid("double"))
        }),
        b'#' => with_line(buf, body, limits, |text, _| match text {
            b"t" => Ok(Token::Boolean(true)),
            b"f" => Ok(Token::Boolean(false)),
            _ => Err(invalid("boolean")),
        }),
        b'(' => with_line(buf, body, limits, |text, span| {
            let digits = text
                .strip_prefix(b"-")
                .or_else(|| text.strip_prefix(b"+"))
                .unwrap_or(text);
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(invalid("big number"));
            }
            Ok(Token::BigNumber(span))
        }),
        b'_' => with_line(buf, body, limits, |text, _| match text {
            b"" => Ok(Token::Null),
            _ => Err(invalid("null")),
        }),
        b'$' => with_blob(buf, body, limits, Some(Token::Null), |_, span| {
            Ok(Token::Bulk(span))
        }),
        b'!' => with_blob(buf, body, limits, None, |_, span| Ok(Token::Error(span))),
        b'=' => with_blob(buf, body, limits, None, |text, span| match text {
            [a, b, c, b':', ..] => Ok(Token::Verbatim([*a, *b, *c], span.start + 4..span.end)),
            _ => Err(invalid("verbatim string")),
        }),
        b'*' => with_count(buf, body, limits, Aggregate::Array),
        b'%' => with_count(buf, body, limits, Aggregate::Map),
        b'~' => with_count(buf, body, limits, Aggregate::Set),
        b'>' => with_count(buf, body, limits, Aggregate::Push),
        got => Err(ProtocolError::UnknownType { got }),
    }
}

fn with_line(
    buf: &[u8],
    pos: usize,
    limits: &Limits,
    make: impl FnOnce(&[u8], Range<usize>) -> Result<Token, ProtocolError>,
) -> Result<Option<(Token, usize)>, ProtocolError> {
    let Some((span, next)) = read_line(buf, pos, limits.max_inline_len)? else {
        return Ok(None);
    };
    Ok(Some((make(&buf[span.clone()], span)?, next)))
}

/// A length-prefixed payload; `null` is what a length of -1 means, if anything.
fn with_blob(
    buf: &[u8],
    pos: usize,
    limits: &Limits,
    null: Option<Token>,
    make: impl FnOnce(&[u8], Range<usize>) -> Result<Token, ProtocolError>,
) -> Result<Option<(Token, usize)>, ProtocolError> {
    let Some((len, start)) =
        read_len(buf, pos).map_err(|BadLength| ProtocolError::InvalidBulkLength)?
    else {
        return Ok(None);
    };
    if let (-1, Some(null)) = (len, null) {
        return Ok(Some((null, start)));
    }
    let len = checked_bulk_len(len, limits)?;
    let Some(end) = read_payload(buf, start, len)? else {
        return Ok(None);
    };
    Ok(Some((make(&buf[start..end], start..end)?, end + 2)))
}

fn with_count(
    buf: &[u8],
    pos: usize,
    limits: &Limits,
    kind: Aggregate,
) -> Result<Option<(Token, usize)>, ProtocolError> {
    let Some((count, next)) =
        read_len(buf, pos).map_err(|BadLength| ProtocolError::InvalidMultibulkLength)?
    else {
        return Ok(None);
    };
    if kind == Aggregate::Array && count == -1 {
        return Ok(Some((Token::NullArray, next)));
    }
    let count = checked_count(count, limits)?;
    let children = match kind {
        Aggregate::Map => count
            .checked_mul(2)
            .ok_or(ProtocolError::InvalidMultibulkLength)?,
        _ => count,
    };
    Ok(Some((Token::Aggregate(kind, children), next)))
}

fn parse_ascii<T: FromStr>(text: &[u8]) -> Option<T> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Appends the encoding of `frame` to `out`. Under [`Protocol::Resp2`], RESP3-only types are
/// downgraded as Redis does: `Null` -> `$-1`, `Map` -> flat array `k,v,k,v`, `Set`/`Push` ->
/// array, `Boolean` -> `:1`/`:0`, `Double`, `Verbatim` (its text only) and `BigNumber` ->
/// bulk strings. `NullArray` is `*-1` under RESP2 and `_` under RESP3.
pub fn encode(frame: &Frame, proto: Protocol, out: &mut BytesMut) {
    let resp3 = proto == Protocol::Resp3;
    match frame {
        Frame::Simple(text) => put_line(out, b'+', text.as_bytes()),
        Frame::Error(text) => put_line(out, b'-', text.as_bytes()),
        Frame::Integer(n) => {
            out.put_u8(b':');
            put_i64(out, *n);
            out.put_slice(b"\r\n");
        }
        Frame::Bulk(payload) => put_blob(out, b'$', payload),
        Frame::Null => {
            let encoded: &[u8] = if resp3 { b"_\r\n" } else { b"$-1\r\n" };
            out.put_slice(encoded);
        }
        Frame::NullArray => {
            let encoded: &[u8] = if resp3 { b"_\r\n" } else { b"*-1\r\n" };
            out.put_slice(encoded);
        }
        Frame::Array(items) => put_sequence(out, b'*', items, proto),
        Frame::Set(items) => put_sequence(out, if resp3 { b'~' } else { b'*' }, items, proto),
        Frame::Push(items) => put_sequence(out, if resp3 { b'>' } else { b'*' }, items, proto),
        Frame::Map(pairs) => {
            if resp3 {
                put_header(out, b'%', pairs.len());
            } else {
                put_header(out, b'*', pairs.len() * 2);
            }
            for (key, value) in pairs {
                encode(key, proto, out);
                encode(value, proto, out);
            }
        }
        Frame::Double(value) => {
            let text = format_double(*value);
            if resp3 {
                put_line(out, b',', text.as_bytes());
            } else {
                put_blob(out, b'$', text.as_bytes());
            }
        }
        Frame::Boolean(value) => {
            let encoded: &[u8] = match (resp3, value) {
                (true, true) => b"#t\r\n",
                (true, false) => b"#f\r\n",
                (false, true) => b":1\r\n",
                (false, false) => b":0\r\n",
            };
            out.put_slice(encoded);
        }
        Frame::Verbatim { format, text } => {
            if resp3 {
                put_header(out, b'=', text.len() + 4);
                out.put_slice(format);
                out.put_u8(b':');
                out.put_slice(text);
                out.put_slice(b"\r\n");
            } else {
                put_blob(out, b'$', text);
            }
        }
        Frame::BigNumber(digits) => {
            if resp3 {
                put_line(out, b'(', digits.as_bytes());
            } else {
                put_blob(out, b'$', digits.as_bytes());
            }
        }
    }
}

fn put_sequence(out: &mut BytesMut, type_byte: u8, items: &[Frame], proto: Protocol) {
    put_header(out, type_byte, items.len());
    for item in items {
        encode(item, proto, out);
    }
}

/// A line-typed frame. CR and LF would end the line early and desynchronise the peer, so
/// they become spaces, as in Redis's `addReplyError`.
fn put_line(out: &mut BytesMut, type_byte: u8, text: &[u8]) {
    out.reserve(text.len() + 3);
    out.put_u8(type_byte);
    if text.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend(
            text.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    } else {
        out.put_slice(text);
    }
    out.put_slice(b"\r\n");
}

fn put_blob(out: &mut BytesMut, type_byte: u8, payload: &[u8]) {
    out.reserve(payload.len() + 24);
    put_header(out, type_byte, payload.len());
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

fn put_header(out: &mut BytesMut, type_byte: u8, len: usize) {
    out.put_u8(type_byte);
    put_u64(out, len as u64);
    out.put_slice(b"\r\n");
}

fn put_i64(out: &mut BytesMut, n: i64) {
    if n < 0 {
        out.put_u8(b'-');
    }
    put_u64(out, n.unsigned_abs());
}

/// Decimal digits without going through `fmt`: headers are on every reply.
fn put_u64(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[start..]);
}

/// The shortest text that parses back to the same `f64`, in exponent form only where plain
/// digits would be long (Rust's `Display` spells 1e300 with 301 digits). `inf`, `-inf` and
/// `nan` are RESP3's spellings.
fn format_double(value: f64) -> String {
    if value.is_nan() {
        "nan".to_owned()
    } else if value == f64::INFINITY {
        "inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-inf".to_owned()
    } else if value == 0.0 || (1e-5..1e17).contains(&value.abs()) {
        format!("{value}")
    } else {
        format!("{value:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &[u8]) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(text))
    }

    fn args(list: &[&[u8]]) -> Vec<Bytes> {
        list.iter().map(|a| Bytes::copy_from_slice(a)).collect()
    }

    fn request(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse_request(&mut BytesMut::from(input), &Limits::default())
    }

    fn frame(input: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        parse_frame(&mut BytesMut::from(input), &Limits::default())
    }

    fn encoded(frame: &Frame, proto: Protocol) -> BytesMut {
        let mut out = BytesMut::new();
        encode(frame, proto, &mut out);
        out
    }

    /// Encodes `frame`, checks the exact bytes, parses them back and checks the result.
    fn check_wire(frame: &Frame, proto: Protocol, wire: &[u8], parsed: &Frame) {
        let mut out = encoded(frame, proto);
        assert_eq!(&out[..], wire, "{frame:?} under {proto:?}");
        let back = parse_frame(&mut out, &Limits::default())
            .expect("own encoding parses")
            .expect("own encoding is complete");
        assert_eq!(&back, parsed, "{frame:?} under {proto:?}");
        assert!(out.is_empty(), "parse consumed exactly the frame");
    }

    /// Phase 1 checks every frame type's bytes and its round trip under RESP3, phase 2 the
    /// RESP2 downgrades (which round-trip to the downgraded frame).
    #[test]
    fn every_frame_type_round_trips_under_both_protocols() {
        let verbatim = Frame::Verbatim {
            format: *b"txt",
            text: Bytes::from_static(b"hi\r\nthere"),
        };
        let nested = Frame::Array(vec![
            Frame::Integer(1),
            Frame::Array(vec![bulk(b""), Frame::Null]),
            Frame::Array(vec![]),
        ]);
        let map = Frame::Map(vec![
            (bulk(b"k"), Frame::Integer(-7)),
            (
                Frame::Simple("s".into()),
                Frame::Set(vec![Frame::Boolean(true)]),
            ),
        ]);
        #[rustfmt::skip]
        let cases: Vec<(Frame, &[u8], &[u8], Frame)> = vec![
            // (frame, RESP3 bytes, RESP2 bytes, what RESP2 bytes parse back to)
            (Frame::Simple("OK".into()), b"+OK\r\n", b"+OK\r\n", Frame::Simple("OK".into())),
            (Frame::Error("ERR bad".into()), b"-ERR bad\r\n", b"-ERR bad\r\n", Frame::Error("ERR bad".into())),
            (Frame::Integer(0), b":0\r\n", b":0\r\n", Frame::Integer(0)),
            (Frame::Integer(i64::MIN), b":-9223372036854775808\r\n", b":-9223372036854775808\r\n", Frame::Integer(i64::MIN)),
            (Frame::Integer(i64::MAX), b":9223372036854775807\r\n", b":9223372036854775807\r\n", Frame::Integer(i64::MAX)),
            (bulk(b"a\r\n\0b"), b"$5\r\na\r\n\0b\r\n", b"$5\r\na\r\n\0b\r\n", bulk(b"a\r\n\0b")),
            (bulk(b""), b"$0\r\n\r\n", b"$0\r\n\r\n", bulk(b"")),
            (Frame::Null, b"_\r\n", b"$-1\r\n", Frame::Null),
            (Frame::Array(vec![]), b"*0\r\n", b"*0\r\n", Frame::Array(vec![])),
            (nested.clone(), b"*3\r\n:1\r\n*2\r\n$0\r\n\r\n_\r\n*0\r\n", b"*3\r\n:1\r\n*2\r\n$0\r\n\r\n$-1\r\n*0\r\n", nested),
            (map.clone(), b"%2\r\n$1\r\nk\r\n:-7\r\n+s\r\n~1\r\n#t\r\n", b"*4\r\n$1\r\nk\r\n:-7\r\n+s\r\n*1\r\n:1\r\n",
                Frame::Array(vec![bulk(b"k"), Frame::Integer(-7), Frame::Simple("s".into()), Frame::Array(vec![Frame::Integer(1)])])),
            (Frame::Map(vec![]), b"%0\r\n", b"*0\r\n", Frame::Array(vec![])),
            (Frame::Set(vec![bulk(b"x")]), b"~1\r\n$1\r\nx\r\n", b"*1\r\n$1\r\nx\r\n", Frame::Array(vec![bulk(b"x")])),
            (Frame::Push(vec![bulk(b"message")]), b">1\r\n$7\r\nmessage\r\n", b"*1\r\n$7\r\nmessage\r\n", Frame::Array(vec![bulk(b"message")])),
            (Frame::Double(1.5), b",1.5\r\n", b"$3\r\n1.5\r\n", bulk(b"1.5")),
            (Frame::Double(-2.0), b",-2\r\n", b"$2\r\n-2\r\n", bulk(b"-2")),
            (Frame::Double(1e300), b",1e300\r\n", b"$5\r\n1e300\r\n", bulk(b"1e300")),
            (Frame::Double(1.25e-7), b",1.25e-7\r\n", b"$7\r\n1.25e-7\r\n", bulk(b"1.25e-7")),
            (Frame::Double(f64::INFINITY), b",inf\r\n", b"$3\r\ninf\r\n", bulk(b"inf")),
            (Frame::Double(f64::NEG_INFINITY), b",-inf\r\n", b"$4\r\n-inf\r\n", bulk(b"-inf")),
            (Frame::Boolean(true), b"#t\r\n", b":1\r\n", Frame::Integer(1)),
            (Frame::Boolean(false), b"#f\r\n", b":0\r\n", Frame::Integer(0)),
            (verbatim.clone(), b"=13\r\ntxt:hi\r\nthere\r\n", b"$9\r\nhi\r\nthere\r\n", bulk(b"hi\r\nthere")),
            (Frame::BigNumber("-123456789012345678901234567890".into()), b"(-123456789012345678901234567890\r\n",
                b"$31\r\n-123456789012345678901234567890\r\n", bulk(b"-123456789012345678901234567890")),
        ];
        for (frame, resp3, resp2, resp2_parsed) in &cases {
            check_wire(frame, Protocol::Resp3, resp3, frame);
            check_wire(frame, Protocol::Resp2, resp2, resp2_parsed);
        }
        // The two types whose round trip is not the identity.
        check_wire(
            &Frame::NullArray,
            Protocol::Resp2,
            b"*-1\r\n",
            &Frame::NullArray,
        );
        check_wire(&Frame::NullArray, Protocol::Resp3, b"_\r\n", &Frame::Null);
        let mut nan = encoded(&Frame::Double(f64::NAN), Protocol::Resp3);
        assert_eq!(&nan[..], b",nan\r\n");
        match parse_frame(&mut nan, &Limits::default()) {
            Ok(Some(Frame::Double(d))) => assert!(d.is_nan()),
            other => panic!("nan did not round-trip: {other:?}"),
        }
    }

    #[test]
    fn line_frames_never_carry_cr_or_lf_onto_the_wire() {
        let out = encoded(&Frame::Error("ERR a\r\nb".into()), Protocol::Resp2);
        assert_eq!(&out[..], b"-ERR a  b\r\n");
        let out = encoded(&Frame::Simple("x\ny".into()), Protocol::Resp3);
        assert_eq!(&out[..], b"+x y\r\n");
    }

    #[test]
    fn resp3_extras_parse() {
        assert_eq!(
            frame(b"!5\r\nERR x\r\n"),
            Ok(Some(Frame::Error("ERR x".into())))
        );
        assert_eq!(frame(b"$-1\r\n"), Ok(Some(Frame::Null)));
        assert_eq!(frame(b"*-1\r\n"), Ok(Some(Frame::NullArray)));
        assert_eq!(frame(b":+5\r\n"), Ok(Some(Frame::Integer(5))));
        assert_eq!(frame(b",1e3\r\n"), Ok(Some(Frame::Double(1000.0))));
        assert_eq!(frame(b"(+12\r\n"), Ok(Some(Frame::BigNumber("+12".into()))));
        assert_eq!(
            frame(b"+caf\xc3\xa9 \xff\r\n"),
            Ok(Some(Frame::Simple("café \u{fffd}".into())))
        );
    }

    #[test]
    fn pipelined_requests_come_out_one_at_a_time_in_order() {
        let mut buf = BytesMut::from(
            &b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nECHO 'a b'\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n*1\r\n$4\r\nPI"[..],
        );
        let limits = Limits::default();
        let mut parser = RequestParser::new();
        let mut seen = Vec::new();
        while let Some(args) = parser.parse(&mut buf, &limits).expect("valid input") {
            seen.push(args);
        }
        assert_eq!(
            seen,
            vec![
                args(&[b"PING"]),
                args(&[b"GET", b"k"]),
                args(&[b"ECHO", b"a b"]),
                args(&[b"SET", b"k", b""]),
            ]
        );
        assert_eq!(&buf[..], b"*1\r\n$4\r\nPI", "the incomplete tail stays");
        buf.extend_from_slice(b"NG\r\n");
        assert_eq!(parser.parse(&mut buf, &limits), Ok(Some(args(&[b"PING"]))));
        assert!(buf.is_empty());
    }

    #[test]
    fn multibulk_arguments_are_slices_of_the_read_buffer() {
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$5\r\nvalue\r\n"[..]);
        let base = buf.as_ptr() as usize;
        let inside = base..base + buf.len();
        let parsed = parse_request(&mut buf, &Limits::default())
            .expect("valid")
            .expect("complete");
        for arg in &parsed {
            assert!(
                inside.contains(&(arg.as_ptr() as usize)),
                "{arg:?} was copied"
            );
        }
        let mut buf = BytesMut::from(&b"SET k \"v w\"\r\n"[..]);
        let base = buf.as_ptr() as usize;
        let parsed = parse_request(&mut buf, &Limits::default())
            .expect("valid")
            .expect("complete");
        assert_eq!(parsed, args(&[b"SET", b"k", b"v w"]));
        assert_eq!(
            parsed[2].as_ptr() as usize,
            base + 7,
            "quoted span is zero-copy"
        );
    }

    /// Every strict prefix must be "incomplete" without touching the buffer, both for the
    /// stateless function and for a parser fed one byte at a time.
    #[test]
    fn every_prefix_of_a_request_is_incomplete_and_untouched() {
        let cases: Vec<(&[u8], Vec<Bytes>)> = vec![
            (
                b"*2\r\n$3\r\nGET\r\n$4\r\nk\r\n\0\r\n",
                args(&[b"GET", b"k\r\n\0"]),
            ),
            (
                b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$10\r\n0123456789\r\n",
                args(&[b"SET", b"", b"0123456789"]),
            ),
            (
                b"SET k \"a\\x41\\\"\" 'it\\'s'\r\n",
                args(&[b"SET", b"k", b"aA\"", b"it's"]),
            ),
            (b"PING\n", args(&[b"PING"])),
        ];
        let limits = Limits::default();
        for (wire, expected) in &cases {
            for cut in 0..wire.len() {
                let mut buf = BytesMut::from(&wire[..cut]);
                assert_eq!(parse_request(&mut buf, &limits), Ok(None), "prefix {cut}");
                assert_eq!(&buf[..], &wire[..cut], "prefix {cut} left untouched");
            }
            let mut parser = RequestParser::new();
            let mut buf = BytesMut::new();
            for (i, byte) in wire.iter().enumerate() {
                buf.put_u8(*byte);
                let result = parser.parse(&mut buf, &limits);
                if i + 1 < wire.len() {
                    assert_eq!(result, Ok(None));
                    assert_eq!(&buf[..], &wire[..=i]);
                } else {
                    assert_eq!(result.as_ref(), Ok(&Some(expected.clone())));
                    assert!(buf.is_empty());
                }
            }
            assert_eq!(request(wire), Ok(Some(expected.clone())));
        }
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete_and_untouched() {
        let frame_value = Frame::Map(vec![
            (
                bulk(b"k"),
                Frame::Array(vec![Frame::Double(0.5), Frame::Null]),
            ),
            (
                Frame::Integer(3),
                Frame::Verbatim {
                    format: *b"mkd",
                    text: Bytes::from_static(b"# x"),
                },
            ),
        ]);
        let wire = encoded(&frame_value, Protocol::Resp3);
        let limits = Limits::default();
        let mut parser = FrameParser::new();
        let mut fed = BytesMut::new();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(parse_frame(&mut buf, &limits), Ok(None), "prefix {cut}");
            assert_eq!(&buf[..], &wire[..cut]);
            fed.put_u8(wire[cut]);
            let result = parser.parse(&mut fed, &limits);
            if cut + 1 < wire.len() {
                assert_eq!(result, Ok(None));
            } else {
                assert_eq!(result, Ok(Some(frame_value.clone())));
            }
        }
    }

    #[test]
    fn inline_requests_follow_redis_quoting() {
        let ok: Vec<(&[u8], Vec<Bytes>)> = vec![
            (b"  GET   k  \r\n", args(&[b"GET", b"k"])),
            (
                b"SET k \"hello world\"\r\n",
                args(&[b"SET", b"k", b"hello world"]),
            ),
            (b"SET k 'it\\'s'\r\n", args(&[b"SET", b"k", b"it's"])),
            (
                b"ECHO 'no \\n escapes'\r\n",
                args(&[b"ECHO", b"no \\n escapes"]),
            ),
            (
                b"ECHO \"\\x41\\x4a\\t\\n\\r\\a\\b\\\\\\\"\\q\"\r\n",
                args(&[b"ECHO", b"AJ\t\n\r\x07\x08\\\"q"]),
            ),
            (b"ECHO \"\\xZZ\"\r\n", args(&[b"ECHO", b"xZZ"])),
            (
                b"ECHO ab\"cd ef\" x\r\n",
                args(&[b"ECHO", b"abcd ef", b"x"]),
            ),
            (b"ECHO \"\" ''\r\n", args(&[b"ECHO", b"", b""])),
            (b"ECHO \"a\"\tb\r\n", args(&[b"ECHO", b"a", b"b"])),
            (b"ECHO a\x0bb\r\n", args(&[b"ECHO", b"a\x0bb"])),
            (b"GET a\0b c\r\n", args(&[b"GET", b"a"])),
            (b"ECHO \"\xff\"\n", args(&[b"ECHO", b"\xff"])),
        ];
        for (line, expected) in ok {
            assert_eq!(request(line), Ok(Some(expected)), "{}", line.escape_ascii());
        }
        let unbalanced: [&[u8]; 6] = [
            b"ECHO \"abc\r\n",
            b"ECHO 'abc\r\n",
            b"ECHO \"a\"b\r\n",
            b"ECHO 'a'b\r\n",
            b"ECHO \"a\\\"\r\n",
            b"ECHO \"a\0\"\r\n",
        ];
        for line in unbalanced {
            assert_eq!(
                request(line),
                Err(ProtocolError::UnbalancedQuotes),
                "{}",
                line.escape_ascii()
            );
        }
    }

    #[test]
    fn empty_requests_are_skipped_not_returned() {
        let mut buf = BytesMut::from(&b"\r\n   \n*0\r\n*-1\r\n\nPING\r\n\r\n"[..]);
        let limits = Limits::default();
        assert_eq!(parse_request(&mut buf, &limits), Ok(Some(args(&[b"PING"]))));
        assert_eq!(parse_request(&mut buf, &limits), Ok(None));
        assert!(buf.is_empty(), "the trailing blank line was consumed");
    }

    #[test]
    fn length_headers_over_the_limits_are_refused_before_any_data() {
        assert_eq!(
            request(b"*1\r\n$4000000000\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            request(b"*99999999\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            frame(b"$4000000000\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            frame(b"*99999999\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            frame(b"%1048577\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            request(b"*1\r\n$99999999999999999999999"),
            Err(ProtocolError::InvalidBulkLength)
        );
        // At the limits the header is accepted and the parser just waits for the bytes.
        assert_eq!(request(b"*1048576\r\n$536870912\r\nabc"), Ok(None));
        assert_eq!(frame(b"*1048576\r\n*1048576\r\n$536870912\r\n"), Ok(None));
        let tight = Limits {
            max_bulk_len: 3,
            max_array_len: 2,
            ..Limits::default()
        };
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nabc\r\n$4\r\n"[..]);
        assert_eq!(
            parse_request(&mut buf, &tight),
            Err(ProtocolError::InvalidBulkLength)
        );
        let mut buf = BytesMut::from(&b"*3\r\n"[..]);
        assert_eq!(
            parse_request(&mut buf, &tight),
            Err(ProtocolError::InvalidMultibulkLength)
        );
    }

    #[test]
    fn negative_and_malformed_lengths_are_refused() {
        use ProtocolError::{InvalidBulkLength as Bulk, InvalidMultibulkLength as Multi};
        let cases: [(&[u8], ProtocolError); 13] = [
            (b"*-2\r\n", Multi),
            (b"*x\r\n", Multi),
            (b"*\r\n", Multi),
            (b"*01\r\n", Multi),
            (b"*-0\r\n", Multi),
            (b"*+1\r\n", Multi),
            (b"*1\n", Multi),
            (b"*1\r\r", Multi),
            (b"*1\r\n$-1\r\n", Bulk),
            (b"*1\r\n$-5\r\n", Bulk),
            (b"*1\r\n$abc\r\n", Bulk),
            (b"*1\r\n$3x\r\n", Bulk),
            (b"*1\r\n$ 3\r\n", Bulk),
        ];
        for (wire, error) in cases {
            assert_eq!(request(wire), Err(error), "{}", wire.escape_ascii());
        }
        assert_eq!(frame(b"$-2\r\n"), Err(Bulk));
        assert_eq!(frame(b"=-1\r\n"), Err(Bulk));
        assert_eq!(frame(b"%-1\r\n"), Err(Multi));
        assert_eq!(frame(b"~-1\r\n"), Err(Multi));
        assert_eq!(frame(b"*-2\r\n"), Err(Multi));
        assert_eq!(
            frame(b"$?\r\n"),
            Err(Bulk),
            "streamed strings are not supported"
        );
    }

    #[test]
    fn payload_without_crlf_is_refused() {
        assert_eq!(
            request(b"*1\r\n$3\r\nGETxx"),
            Err(ProtocolError::MissingCrlf)
        );
        assert_eq!(
            request(b"*1\r\n$3\r\nGET\rx"),
            Err(ProtocolError::MissingCrlf)
        );
        assert_eq!(request(b"*1\r\n$3\r\nGET\r"), Ok(None));
        assert_eq!(frame(b"$1\r\nab\r\n"), Err(ProtocolError::MissingCrlf));
        assert_eq!(frame(b"+a\nb\r\n"), Err(ProtocolError::MissingCrlf));
        assert_eq!(frame(b"+ab\rc"), Err(ProtocolError::MissingCrlf));
    }

    #[test]
    fn non_bulk_element_in_a_request_is_refused_with_redis_text() {
        let error = request(b"*1\r\n:3\r\n").expect_err("integers are not arguments");
        assert_eq!(error, ProtocolError::ExpectedBulk { got: b':' });
        assert_eq!(error.to_string(), "Protocol error: expected '$', got ':'");
        let error = request(b"*1\r\n\r\n").expect_err("blank is not a bulk");
        assert_eq!(error.to_string(), "Protocol error: expected '$', got '\\r'");
    }

    #[test]
    fn error_texts_match_redis() {
        let texts = [
            (
                ProtocolError::InvalidBulkLength,
                "Protocol error: invalid bulk length",
            ),
            (
                ProtocolError::InvalidMultibulkLength,
                "Protocol error: invalid multibulk length",
            ),
            (
                ProtocolError::TooBigInlineRequest,
                "Protocol error: too big inline request",
            ),
            (
                ProtocolError::UnbalancedQuotes,
                "Protocol error: unbalanced quotes in request",
            ),
            (
                ProtocolError::ExpectedBulk { got: b'x' },
                "Protocol error: expected '$', got 'x'",
            ),
            (
                ProtocolError::TooDeep { max_depth: 32 },
                "Protocol error: nesting deeper than 32 levels",
            ),
            (
                ProtocolError::UnknownType { got: 0xff },
                "Protocol error: unknown type byte '\\xff'",
            ),
            (
                ProtocolError::InvalidValue { kind: "integer" },
                "Protocol error: invalid integer",
            ),
            (
                ProtocolError::MissingCrlf,
                "Protocol error: expected '\\r\\n'",
            ),
        ];
        for (error, text) in texts {
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let bomb = b"*1\r\n".repeat(10_000);
        assert_eq!(frame(&bomb), Err(ProtocolError::TooDeep { max_depth: 32 }));
        let mut at_limit = b"*1\r\n".repeat(31);
        at_limit.extend_from_slice(b"*0\r\n");
        assert!(matches!(frame(&at_limit), Ok(Some(Frame::Array(_)))));
        let mut over = b"*1\r\n".repeat(32);
        over.extend_from_slice(b"*0\r\n");
        assert_eq!(frame(&over), Err(ProtocolError::TooDeep { max_depth: 32 }));
        let unlimited = Limits {
            max_depth: usize::MAX,
            ..Limits::default()
        };
        let mut bomb = BytesMut::from(&bomb[..]);
        assert_eq!(
            parse_frame(&mut bomb, &unlimited),
            Ok(None),
            "the scan itself never recurses"
        );
        // A request is flat, so nesting there is just a wrong element type.
        assert_eq!(
            request(b"*1\r\n*1\r\n"),
            Err(ProtocolError::ExpectedBulk { got: b'*' })
        );
    }

    #[test]
    fn malformed_scalars_are_refused() {
        let invalid = |kind| Err(ProtocolError::InvalidValue { kind });
        assert_eq!(frame(b":abc\r\n"), invalid("integer"));
        assert_eq!(frame(b":99999999999999999999\r\n"), invalid("integer"));
        assert_eq!(frame(b",x\r\n"), invalid("double"));
        assert_eq!(frame(b",\r\n"), invalid("double"));
        assert_eq!(frame(b"#x\r\n"), invalid("boolean"));
        assert_eq!(frame(b"(12a\r\n"), invalid("big number"));
        assert_eq!(frame(b"(-\r\n"), invalid("big number"));
        assert_eq!(frame(b"_x\r\n"), invalid("null"));
        assert_eq!(frame(b"=3\r\ntxt\r\n"), invalid("verbatim string"));
        assert_eq!(frame(b"=5\r\ntxtxa\r\n"), invalid("verbatim string"));
    }

    #[test]
    fn binary_garbage_is_refused_or_waited_on_never_misparsed() {
        assert_eq!(
            frame(b"\xff\x00\x80garbage"),
            Err(ProtocolError::UnknownType { got: 0xff })
        );
        assert_eq!(
            frame(b"|1\r\n+a\r\n+b\r\n"),
            Err(ProtocolError::UnknownType { got: b'|' })
        );
        // Garbage without a newline is an inline request in progress, until it is too long.
        assert_eq!(request(b"\xff\x00\x80garbage"), Ok(None));
        let garbage: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
        assert_eq!(request(&garbage), Err(ProtocolError::TooBigInlineRequest));
    }

    #[test]
    fn oversized_inline_lines_are_refused() {
        let limits = Limits {
            max_inline_len: 8,
            ..Limits::default()
        };
        let run = |wire: &[u8]| parse_request(&mut BytesMut::from(wire), &limits);
        assert_eq!(run(b"12345678\n"), Ok(Some(args(&[b"12345678"]))));
        assert_eq!(run(b"1234567\r\n"), Ok(Some(args(&[b"1234567"]))));
        assert_eq!(run(b"12345678"), Ok(None));
        assert_eq!(run(b"123456789"), Err(ProtocolError::TooBigInlineRequest));
        assert_eq!(run(b"123456789\n"), Err(ProtocolError::TooBigInlineRequest));
        // Same bound whether the bytes come at once or a few at a time.
        let mut parser = RequestParser::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"1234");
        assert_eq!(parser.parse(&mut buf, &limits), Ok(None));
        buf.extend_from_slice(b"56789");
        assert_eq!(
            parser.parse(&mut buf, &limits),
            Err(ProtocolError::TooBigInlineRequest)
        );
        // Default: 64 KiB.
        let mut line = vec![b'a'; 64 * 1024];
        assert_eq!(request(&line), Ok(None));
        line.push(b'a');
        assert_eq!(request(&line), Err(ProtocolError::TooBigInlineRequest));
        // Line-typed frames share the bound.
        let mut buf = BytesMut::from(&b"+123456789"[..]);
        assert_eq!(
            parse_frame(&mut buf, &limits),
            Err(ProtocolError::LineTooLong { max_len: 8 })
        );
    }

    #[test]
    fn a_parser_recovers_when_the_caller_shrinks_the_buffer() {
        let limits = Limits::default();
        let mut parser = RequestParser::new();
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1"[..]);
        assert_eq!(parser.parse(&mut buf, &limits), Ok(None));
        buf.clear();
        buf.extend_from_slice(b"PING\r\n");
        assert_eq!(parser.parse(&mut buf, &limits), Ok(Some(args(&[b"PING"]))));
        let mut frames = FrameParser::new();
        let mut buf = BytesMut::from(&b"*2\r\n:1\r\n"[..]);
        assert_eq!(frames.parse(&mut buf, &limits), Ok(None));
        buf.clear();
        buf.extend_from_slice(b":7\r\n");
        assert_eq!(frames.parse(&mut buf, &limits), Ok(Some(Frame::Integer(7))));
    }

    #[test]
    fn default_limits_match_redis() {
        let limits = Limits::default();
        assert_eq!(limits.max_bulk_len, 512 * 1024 * 1024);
        assert_eq!(limits.max_array_len, 1_048_576);
        assert_eq!(limits.max_depth, 32);
        assert_eq!(limits.max_inline_len, 65_536);
    }

    /// xorshift64: deterministic, dependency-free noise.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Mostly protocol-shaped bytes, so the parsers get past the first byte often.
        fn buffer(&mut self) -> Vec<u8> {
            const ALPHABET: &[u8] = b"*$:+-_,#(=!%~>|\r\n\r\n0123456789-1 \"'\\xtf";
            const SEEDS: [&[u8]; 4] = [
                b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
                b"%1\r\n+a\r\n*2\r\n,1.5\r\n#t\r\n",
                b"SET k \"v\\x41\" 'w'\r\n",
                b"=7\r\ntxt:abc\r\n>1\r\n(12\r\n",
            ];
            let mut out = Vec::new();
            let len = self.below(48);
            while out.len() < len {
                match self.below(4) {
                    0 => out.push(self.next() as u8),
                    1 => out.extend_from_slice(SEEDS[self.below(SEEDS.len())]),
                    _ => out.push(ALPHABET[self.below(ALPHABET.len())]),
                }
            }
            out
        }
    }

    /// Drives a parser over `wire` in random chunks and returns everything it produced,
    /// ending with the error or `None` that stopped it. Asserts the consumption contract.
    fn drain_requests(
        wire: &[u8],
        chunks: &mut Noise,
        limits: &Limits,
    ) -> Vec<Result<Option<Vec<Bytes>>, ProtocolError>> {
        let mut parser = RequestParser::new();
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut results = Vec::new();
        loop {
            let before = buf.clone();
            match parser.parse(&mut buf, limits) {
                Ok(Some(args)) => {
                    assert!(
                        !args.is_empty(),
                        "empty argument vector for {}",
                        wire.escape_ascii()
                    );
                    assert!(buf.len() < before.len(), "a request consumes bytes");
                    results.push(Ok(Some(args)));
                }
                Ok(None) => {
                    if fed == wire.len() {
                        results.push(Ok(None));
                        return results;
                    }
                    let step = 1 + chunks.below(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + step]);
                    fed += step;
                }
                Err(e) => {
                    results.push(Err(e));
                    return results;
                }
            }
        }
    }

    #[test]
    fn random_garbage_never_panics_and_chunking_never_changes_the_outcome() {
        let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
        let tight = Limits {
            max_bulk_len: 16,
            max_array_len: 4,
            max_depth: 3,
            max_inline_len: 24,
        };
        // Outcome tallies, so a change that makes the noise useless fails here, not silently.
        let (mut requests, mut request_errors, mut frames, mut frame_errors) = (0, 0, 0, 0);
        for round in 0..4000 {
            let limits = if round % 2 == 0 {
                Limits::default()
            } else {
                tight.clone()
            };
            let wire = noise.buffer();

            // Requests: whole buffer at once versus random chunks through one parser.
            let mut whole = BytesMut::from(&wire[..]);
            let mut at_once = Vec::new();
            loop {
                let before = whole.clone();
                let result = parse_request(&mut whole, &limits);
                if result == Ok(None) {
                    assert!(whole.len() <= before.len());
                    assert!(before.ends_with(&whole), "only a prefix may be consumed");
                }
                let stop = !matches!(result, Ok(Some(_)));
                at_once.push(result);
                if stop {
                    break;
                }
            }
            let chunked = drain_requests(&wire, &mut noise, &limits);
            assert_eq!(at_once, chunked, "input {}", wire.escape_ascii());
            requests += at_once.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
            request_errors += at_once.iter().filter(|r| r.is_err()).count();

            // Frames: whatever parses must re-encode to a fixed point.
            let mut buf = BytesMut::from(&wire[..]);
            loop {
                let parsed = match parse_frame(&mut buf, &limits) {
                    Ok(Some(parsed)) => parsed,
                    Ok(None) => break,
                    Err(_) => {
                        frame_errors += 1;
                        break;
                    }
                };
                frames += 1;
                for proto in [Protocol::Resp2, Protocol::Resp3] {
                    let first = encoded(&parsed, proto);
                    let again = parse_frame(&mut first.clone(), &Limits::default())
                        .expect("own encoding parses")
                        .expect("own encoding is complete");
                    assert_eq!(first, encoded(&again, proto), "{parsed:?} under {proto:?}");
                }
            }

            // Flip one byte of a valid request: any outcome but a panic is fine.
            let mut mutated = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n".to_vec();
            let at = noise.below(mutated.len());
            mutated[at] = noise.next() as u8;
            let _ = request(&mutated);
            let _ = frame(&mutated);
        }
        for tally in [requests, request_errors, frames, frame_errors] {
            assert!(
                tally > 500,
                "requests {requests}/{request_errors} frames {frames}/{frame_errors}"
            );
        }
    }
}
