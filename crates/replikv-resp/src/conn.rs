//! The connection loop and the per-connection state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::codec::{encode, Frame, Limits, Protocol, RequestParser};
use crate::service::Service;
use replikv_types::{
    refuse, AcceptBackoff, ConnLimit, ConnSlot, Consistency, Error, GroupId, Offset,
    ReadPreference, WarnEvery,
};

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// What a connection remembers between commands.
pub struct ConnState {
    pub id: u64,
    pub name: Option<Bytes>,
    pub proto: Protocol,
    /// `REPLIKV.CONSISTENCY`; `None` = the keyspace default.
    pub consistency: Option<Consistency>,
    /// `REPLIKV.READ` / `READONLY`; `None` = the keyspace default.
    pub read: Option<ReadPreference>,
    /// Session token: offset of this connection's last acknowledged write per partition.
    pub session: HashMap<GroupId, Offset>,
    pub quit: bool,
    /// Whether the pipeline's answers hold a write (`Later`) or a read (`Read`) still under
    /// way: the wait before each command skips the scan of the answers when none does.
    pending_writes: bool,
    pending_reads: bool,
    /// The front end's client count and `maxclients`, for `INFO` and `CONFIG GET`.
    pub(crate) clients: Arc<ConnLimit>,
}

impl ConnState {
    fn new(clients: Arc<ConnLimit>) -> ConnState {
        ConnState {
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            name: None,
            proto: Protocol::Resp2,
            consistency: None,
            read: None,
            session: HashMap::new(),
            quit: false,
            pending_writes: false,
            pending_reads: false,
            clients,
        }
    }
}

/// A queued write's reply and the session token it produced.
pub(crate) type Acked = BoxFuture<'static, (Frame, Vec<(GroupId, Offset)>)>;

/// A command's answer: ready now, or a queued write still to be acknowledged.
pub(crate) enum Answer {
    Now(Frame),
    /// The reply, and the session token the write produced.
    Later(Acked),
    /// A read under way: later reads run beside it, a later write waits for it.
    Read(BoxFuture<'static, Frame>),
}

pub(crate) fn err(e: &Error) -> Frame {
    Frame::Error(e.to_resp())
}

/// Redis's answer to a connection beyond `maxclients`, written before it is closed.
const MAX_CLIENTS_REACHED: &[u8] = b"-ERR max number of clients reached\r\n";

/// Serves RESP clients on `listener` until `shutdown` turns true, at most `clients.max()` at
/// once. As Redis does, a connection beyond that is accepted, told
/// `-ERR max number of clients reached` and closed at once, inside this loop: it never
/// holds its descriptor for longer than that, so a flood of them cannot reach into the
/// descriptors kept for peers.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    clients: Arc<ConnLimit>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    let mut full = WarnEvery::new(FULL_WARNING_EVERY);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    backoff.succeeded();
                    match clients.try_open() {
                        Some(slot) => {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(connection(stream, service.clone(), clients.clone(), slot));
                        }
                        None => {
                            if let Some(more) = full.due(Instant::now()) {
                                tracing::warn!(maxclients = clients.max(), refused_since_last_warning = more, %remote,
                                    "RESP clients at maxclients: refusing new connections");
                            }
                            if let Ok(stream) = stream.into_std() {
                                refuse(stream, MAX_CLIENTS_REACHED);
                            }
                        }
                    }
                }
                Err(e) => {
                    let (wait, warn) = backoff.failed(Instant::now());
                    if let Some(more) = warn {
                        tracing::warn!(error = %e, failures_since_last_warning = more, retry_in_ms = wait.as_millis() as u64,
                            "RESP accept failed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// How often a full client table is reported while connections keep being refused.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Serves one client; `_slot` keeps its place under `maxclients` until it closes.
async fn connection<S: Service>(
    mut stream: TcpStream,
    service: Arc<S>,
    clients: Arc<ConnLimit>,
    _slot: ConnSlot,
) {
    let cfg = service.config().clone();
    // Arguments somewhat over the value limit are read and refused with a clear error on a
    // connection that stays open; far larger ones are a protocol error that closes it.
    let limits = Limits {
        max_bulk_len: (cfg.max_value_bytes.max(cfg.max_key_bytes) * 2).max(1 << 20),
        ..Limits::default()
    };
    let mut state = ConnState::new(clients);
    let mut parser = RequestParser::new();
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut output = BytesMut::with_capacity(16 * 1024);
    let mut answers: Vec<Answer> = Vec::new();
    loop {
        match stream.read_buf(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut fatal = None;
        loop {
            match parser.parse(&mut input, &limits) {
                Ok(Some(args)) => {
                    let answer =
                        crate::cmd_connection::dispatch(&*service, &mut state, &mut answers, args)
                            .await;
                    match answer {
                        Answer::Later(_) => state.pending_writes = true,
                        Answer::Read(_) => state.pending_reads = true,
                        Answer::Now(_) => {}
                    }
                    answers.push(answer);
                    if state.quit {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // As Redis does: answer the protocol error, then close the connection.
                    fatal = Some(Frame::Error(e.to_string()));
                    break;
                }
            }
        }
        flush_answers(&mut state, &mut answers, &mut output).await;
        if let Some(f) = &fatal {
            encode(f, state.proto, &mut output);
        }
        if stream.write_all(&output).await.is_err() {
            return;
        }
        output.clear();
        if fatal.is_some() || state.quit {
            let _ = stream.shutdown().await;
            return;
        }
        // Do not keep a huge buffer alive after one big request.
        if input.capacity() > 4 << 20 && input.is_empty() {
            input = BytesMut::with_capacity(16 * 1024);
        }
    }
}

/// Resolves every queued answer in order and encodes it.
pub(crate) async fn flush_answers(
    state: &mut ConnState,
    answers: &mut Vec<Answer>,
    out: &mut BytesMut,
) {
    settle_all(state, answers).await;
    for a in answers.drain(..) {
        if let Answer::Now(f) = a {
            encode(&f, state.proto, out);
        }
    }
}

/// Waits for the connection's queued writes (keeping their answers in place), so that what
/// follows observes them. Reads under way are left running.
pub(crate) async fn settle(state: &mut ConnState, answers: &mut [Answer]) {
    resolve(state, answers, true, false).await;
}

/// Waits for the reads under way only, before a write: it must not overtake a read the
/// client sent earlier. Queued writes keep running.
pub(crate) async fn settle_reads(state: &mut ConnState, answers: &mut [Answer]) {
    resolve(state, answers, false, true).await;
}

/// Waits for every queued write and read: what follows is ordered after all of them.
pub(crate) async fn settle_all(state: &mut ConnState, answers: &mut [Answer]) {
    resolve(state, answers, true, true).await;
}

/// Waits for the queued writes and/or reads the flags name, keeping their answers in place.
async fn resolve(state: &mut ConnState, answers: &mut [Answer], writes: bool, reads: bool) {
    let writes = writes && std::mem::take(&mut state.pending_writes);
    let reads = reads && std::mem::take(&mut state.pending_reads);
    if !writes && !reads {
        return;
    }
    // Drive every queued write (and read) at once: each has its own deadline, and one
    // waiting out a failover must not use up the time of those queued behind it.
    let mut slots = Vec::new();
    let mut pending: Vec<Acked> = Vec::new();
    for (i, a) in answers.iter_mut().enumerate() {
        let take = match a {
            Answer::Later(_) => writes,
            Answer::Read(_) => reads,
            Answer::Now(_) => false,
        };
        if !take {
            continue;
        }
        match std::mem::replace(a, Answer::Now(Frame::Null)) {
            Answer::Later(fut) => pending.push(fut),
            Answer::Read(fut) => pending.push(Box::pin(fut.map(|f| (f, Vec::new())))),
            Answer::Now(_) => unreachable!("only pending answers are taken"),
        }
        slots.push(i);
    }
    for (i, (frame, tokens)) in slots
        .into_iter()
        .zip(futures::future::join_all(pending).await)
    {
        for (p, offset) in tokens {
            let e = state.session.entry(p).or_insert(0);
            *e = (*e).max(offset);
        }
        answers[i] = Answer::Now(frame);
    }
}

/// The arguments of one command, with Redis's error messages for bad ones.
pub(crate) struct Args {
    pub name: String,
    pub args: Vec<Bytes>,
}

impl Args {
    pub fn len(&self) -> usize {
        self.args.len()
    }

    pub fn arity_error(&self) -> Frame {
        Frame::Error(format!(
            "ERR wrong number of arguments for '{}' command",
            self.name.to_ascii_lowercase()
        ))
    }

    pub fn int(&self, i: usize) -> Result<i64, Frame> {
        std::str::from_utf8(&self.args[i])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| Frame::Error("ERR value is not an integer or out of range".into()))
    }

    pub fn float(&self, i: usize) -> Result<f64, Frame> {
        std::str::from_utf8(&self.args[i])
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|f| !f.is_nan())
            .ok_or_else(|| Frame::Error("ERR value is not a valid float".into()))
    }

    pub fn upper(&self, i: usize) -> String {
        String::from_utf8_lossy(&self.args[i]).to_ascii_uppercase()
    }

    pub fn text(&self, i: usize) -> String {
        String::from_utf8_lossy(&self.args[i]).into_owned()
    }
}

pub(crate) fn syntax_error() -> Frame {
    Frame::Error("ERR syntax error".into())
}

pub(crate) fn ok() -> Frame {
    Frame::Simple("OK".into())
}

pub(crate) fn reply_frame(r: replikv_types::Reply) -> Frame {
    use replikv_types::Reply;
    match r {
        Reply::Ok => ok(),
        Reply::Nil => Frame::Null,
        Reply::Bulk(b) => Frame::Bulk(b),
        Reply::Int(i) => Frame::Integer(i),
        Reply::Array(a) => Frame::Array(a.into_iter().map(reply_frame).collect()),
        Reply::Error(e) => Frame::Error(e),
    }
}
