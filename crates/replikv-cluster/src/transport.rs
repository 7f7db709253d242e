//! The peer transport: one outgoing TCP connection per peer, multiplexed by request id and
//! shared by every partition's Raft messages and by forwarded client requests.
//!
//! ```text
//!  start(req) ─► queue ─► writer task ─► socket ─► peer's serve loop ─► Handler::accept
//!     ▲                                                         │ (ordering point, in the
//!     └─ pending[id] ◄─ reader task ◄─ socket ◄─ response frame ◄┘  connection's read loop)
//! ```
//! `start` queues the frame before it returns, and the serving side accepts requests of one
//! connection in arrival order, so two writes one client pipelines through this node reach
//! the leader's Raft log in the order the client sent them.
//!
//! [`Faults`] is the fault seam for tests: a blocked peer's requests fail at once as
//! unreachable and its incoming frames are dropped unanswered, as if the link were cut.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::frame::{self, Kind};
use crate::messages::{Hello, PeerRequest, PeerResponse};
use replikv_types::{AcceptBackoff, NodeId};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed dial, requests to that peer fail at once for this long.
const REDIAL_BACKOFF: Duration = Duration::from_millis(100);
/// A connection is dropped and dialled again when requests written in full have had no byte
/// back for this long (the pinger asks every 100 ms), or when a write has made no progress
/// and nothing has been read for this long. Otherwise a connection whose peer's host is
/// gone stays open until TCP gives up, minutes later, and every request on it times out.
const SILENT_LINK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The request never left this node (link cut, peer down, dial failed): safe to retry.
    NotSent(String),
    /// The connection broke after the request was sent: it may have been served.
    Unreachable(String),
    Timeout,
    Protocol(String),
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::NotSent(m) => write!(f, "peer unreachable, request not sent: {m}"),
            TransportError::Unreachable(m) => write!(f, "peer unreachable: {m}"),
            TransportError::Timeout => f.write_str("peer request timed out"),
            TransportError::Protocol(m) => write!(f, "peer protocol error: {m}"),
        }
    }
}

impl std::error::Error for TransportError {}

/// Serves requests that arrive from peers.
pub trait Handler: Send + Sync + 'static {
    /// Called in arrival order per connection. Work whose order matters (submitting a
    /// forwarded write to Raft) is done before this returns; the returned future finishes it.
    fn accept(
        self: Arc<Self>,
        from: NodeId,
        req: PeerRequest,
    ) -> BoxFuture<'static, BoxFuture<'static, PeerResponse>>;
    /// A peer announced itself.
    fn hello(&self, hello: &Hello);
}

/// The two halves of a connection to a peer.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Opens connections to peers: TCP in the binary ([`TcpDialer`]); the deterministic
/// simulation supplies its own, over its simulated network.
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `addr`. A refusal must come back as `ErrorKind::ConnectionRefused`: it is
    /// how a node tells that a peer's process is gone (`LinkStats::refused_since`).
    fn dial(&self, addr: &str) -> BoxFuture<'static, std::io::Result<(ReadHalf, WriteHalf)>>;
}

/// Plain TCP, with Nagle off.
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial(&self, addr: &str) -> BoxFuture<'static, std::io::Result<(ReadHalf, WriteHalf)>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            let _ = stream.set_nodelay(true);
            let (rd, wr) = stream.into_split();
            Ok((Box::new(rd) as ReadHalf, Box::new(wr) as WriteHalf))
        })
    }
}

/// Links cut by tests: both directions to a blocked peer are dropped.
#[derive(Default)]
pub struct Faults {
    blocked: RwLock<HashSet<NodeId>>,
}

impl Faults {
    pub fn set_blocked(&self, peers: impl IntoIterator<Item = NodeId>) {
        *self.blocked.write().expect("faults") = peers.into_iter().collect();
    }
    pub fn is_blocked(&self, peer: NodeId) -> bool {
        self.blocked.read().expect("faults").contains(&peer)
    }
    pub fn blocked(&self) -> Vec<NodeId> {
        let mut v: Vec<_> = self
            .blocked
            .read()
            .expect("faults")
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }
}

/// What this node knows about the link to one peer.
#[derive(Clone, Debug, Default)]
pub struct LinkStats {
    pub connected: bool,
    pub last_ok: Option<Instant>,
    /// Smoothed round trip of answered requests.
    pub rtt_us: Option<u64>,
    /// Since when every dial of the peer has been refused (nothing listens on its port: the
    /// process is gone), until a dial succeeds. A cut or silent link times out instead.
    pub refused_since: Option<Instant>,
}

/// What the watchdog of one connection reads (see [`SILENT_LINK`]).
#[derive(Clone, Copy)]
struct Liveness {
    /// When the first write completed since the last byte read (`None`: nothing awaited).
    awaiting_since: Option<Instant>,
    /// When the last byte was read from the peer (or the connection opened).
    last_read: Instant,
}

type Watch = Arc<Mutex<Liveness>>;

type Pending = Arc<Mutex<BTreeMap<u64, (Instant, oneshot::Sender<Result<Bytes, TransportError>>)>>>;

/// The client side of the connection to one peer.
pub struct PeerClient {
    target: NodeId,
    queue: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    next_id: AtomicU64,
    faults: Arc<Faults>,
    stats: Arc<Mutex<LinkStats>>,
    down_until: Arc<Mutex<Option<Instant>>>,
}

impl PeerClient {
    fn spawn(
        target: NodeId,
        addr: String,
        me: Hello,
        faults: Arc<Faults>,
        dialer: Arc<dyn Dialer>,
    ) -> Arc<PeerClient> {
        let (queue, rx) = mpsc::unbounded_channel();
        let client = Arc::new(PeerClient {
            target,
            queue,
            pending: Arc::default(),
            next_id: AtomicU64::new(1),
            faults,
            stats: Arc::default(),
            down_until: Arc::default(),
        });
        let conn = Connection {
            addr,
            me,
            dialer,
            pending: client.pending.clone(),
            stats: client.stats.clone(),
            down_until: client.down_until.clone(),
        };
        tokio::spawn(conn.run(rx));
        client
    }

    pub fn stats(&self) -> LinkStats {
        self.stats.lock().expect("link stats").clone()
    }

    /// Queues `req` now and returns the future of its answer.
    pub fn start(
        &self,
        req: &PeerRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<PeerResponse, TransportError>> + Send + 'static {
        let queued = self.enqueue(req);
        let pending = self.pending.clone();
        async move {
            let (id, rx) = queued?;
            let answer = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(TransportError::Unreachable("connection closed".into())),
                Err(_) => {
                    pending.lock().expect("pending").remove(&id);
                    Err(TransportError::Timeout)
                }
            }?;
            bincode::deserialize(&answer).map_err(|e| TransportError::Protocol(e.to_string()))
        }
    }

    pub async fn request(
        &self,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, TransportError> {
        self.start(req, timeout).await
    }

    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        req: &PeerRequest,
    ) -> Result<(u64, oneshot::Receiver<Result<Bytes, TransportError>>), TransportError> {
        if self.faults.is_blocked(self.target) {
            return Err(TransportError::NotSent(format!(
                "link to node {} is cut",
                self.target
            )));
        }
        if let Some(until) = *self.down_until.lock().expect("down_until") {
            if Instant::now() < until {
                return Err(TransportError::NotSent(format!(
                    "node {} is down",
                    self.target
                )));
            }
        }
        let payload =
            bincode::serialize(req).map_err(|e| TransportError::Protocol(e.to_string()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut buf = BytesMut::new();
        frame::encode(Kind::Request, id, &payload, &mut buf);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending")
            .insert(id, (Instant::now(), tx));
        if self.queue.send(buf.freeze()).is_err() {
            self.pending.lock().expect("pending").remove(&id);
            return Err(TransportError::NotSent("transport stopped".into()));
        }
        Ok((id, rx))
    }
}

struct Connection {
    addr: String,
    me: Hello,
    dialer: Arc<dyn Dialer>,
    pending: Pending,
    stats: Arc<Mutex<LinkStats>>,
    down_until: Arc<Mutex<Option<Instant>>>,
}

impl Connection {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Bytes>) {
        while let Some(first) = rx.recv().await {
            let stream =
                match tokio::time::timeout(CONNECT_TIMEOUT, self.dialer.dial(&self.addr)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        self.note_refusal(e.kind() == std::io::ErrorKind::ConnectionRefused);
                        self.dial_failed(&mut rx, &e.to_string());
                        continue;
                    }
                    Err(_) => {
                        self.note_refusal(false);
                        self.dial_failed(&mut rx, "connect timed out");
                        continue;
                    }
                };
            *self.down_until.lock().expect("down_until") = None;
            self.note_refusal(false);
            self.stats.lock().expect("stats").connected = true;
            let reason = self.pump(stream, first, &mut rx).await;
            tracing::debug!(peer = %self.addr, %reason, "peer connection closed");
            self.stats.lock().expect("stats").connected = false;
            fail_all(&self.pending, &mut rx, TransportError::Unreachable(reason));
        }
    }

    /// Keeps `refused_since` while every dial is refused; any other outcome clears it.
    fn note_refusal(&self, refused: bool) {
        let mut s = self.stats.lock().expect("stats");
        if refused {
            s.refused_since.get_or_insert_with(Instant::now);
        } else {
            s.refused_since = None;
        }
    }

    fn dial_failed(&self, rx: &mut mpsc::UnboundedReceiver<Bytes>, why: &str) {
        *self.down_until.lock().expect("down_until") = Some(Instant::now() + REDIAL_BACKOFF);
        fail_all(
            &self.pending,
            rx,
            TransportError::NotSent(format!("dial {}: {why}", self.addr)),
        );
    }

    /// Moves frames both ways until the connection breaks; returns why it did.
    async fn pump(
        &self,
        (mut rd, mut wr): (ReadHalf, WriteHalf),
        first: Bytes,
        rx: &mut mpsc::UnboundedReceiver<Bytes>,
    ) -> String {
        let mut out = BytesMut::new();
        let hello = bincode::serialize(&self.me).expect("hello serialises");
        frame::encode(Kind::Hello, 0, &hello, &mut out);
        out.extend_from_slice(&first);
        let (closed_tx, mut closed_rx) = oneshot::channel::<String>();
        let pending = self.pending.clone();
        let stats = self.stats.clone();
        let live: Watch = Arc::new(Mutex::new(Liveness {
            awaiting_since: None,
            last_read: Instant::now(),
        }));
        let reader_live = live.clone();
        let reader = tokio::spawn(async move {
            let why = read_responses(&mut rd, &pending, &stats, &reader_live).await;
            let _ = closed_tx.send(why);
        });
        let mut watchdog = tokio::time::interval(SILENT_LINK / 4);
        let why = loop {
            while out.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok(f) => out.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            if let Err(why) = write_watched(&mut wr, &out, &live, &mut watchdog).await {
                break why;
            }
            out.clear();
            tokio::select! {
                next = rx.recv() => match next {
                    Some(f) => out.extend_from_slice(&f),
                    None => break "transport stopped".to_string(),
                },
                why = &mut closed_rx => break why.unwrap_or_else(|_| "reader stopped".into()),
                _ = watchdog.tick() => {
                    if let Some(why) = silent(&live, None) {
                        break why;
                    }
                }
            }
        };
        reader.abort();
        why
    }
}

/// Writes `out`, giving up when the watchdog finds the link silent: a write that cannot
/// finish (the peer stopped reading, or its host is gone) must not hide the silence.
async fn write_watched(
    wr: &mut WriteHalf,
    out: &[u8],
    live: &Watch,
    watchdog: &mut tokio::time::Interval,
) -> Result<(), String> {
    let mut at = 0;
    let mut progress = Instant::now();
    while at < out.len() {
        tokio::select! {
            // `write` is cancel-safe: it either wrote `n` bytes or wrote none.
            r = wr.write(&out[at..]) => match r {
                Ok(0) => return Err("write: the connection is closed".into()),
                Ok(n) => {
                    at += n;
                    progress = Instant::now();
                }
                Err(e) => return Err(format!("write: {e}")),
            },
            _ = watchdog.tick() => {
                if let Some(why) = silent(live, Some(progress)) {
                    return Err(why);
                }
            }
        }
    }
    if !out.is_empty() {
        // The requests just written now await answers.
        live.lock()
            .expect("liveness")
            .awaiting_since
            .get_or_insert_with(Instant::now);
    }
    Ok(())
}

/// Why the link counts as dead, if it does (see [`SILENT_LINK`]): requests written in full
/// have had no byte back for that long, or a write in progress (last progress at
/// `writing`) has stalled that long with nothing read meanwhile.
fn silent(live: &Watch, writing: Option<Instant>) -> Option<String> {
    let l = *live.lock().expect("liveness");
    let now = Instant::now();
    if let Some(since) = l.awaiting_since.filter(|t| now - *t >= SILENT_LINK) {
        return Some(format!("no answer for {} ms", (now - since).as_millis()));
    }
    let stalled =
        writing.filter(|t| now - *t >= SILENT_LINK && now - l.last_read >= SILENT_LINK)?;
    Some(format!(
        "a write made no progress for {} ms and nothing was read",
        (now - stalled).as_millis()
    ))
}

async fn read_responses(
    rd: &mut ReadHalf,
    pending: &Pending,
    stats: &Arc<Mutex<LinkStats>>,
    live: &Watch,
) -> String {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            match frame::decode(&mut buf) {
                Ok(Some(f)) if f.kind == Kind::Response => {
                    let waiter = pending.lock().expect("pending").remove(&f.id);
                    if let Some((sent, tx)) = waiter {
                        record_ok(stats, sent.elapsed());
                        let _ = tx.send(Ok(f.payload));
                    }
                }
                Ok(Some(f)) => return format!("unexpected {:?} frame from server", f.kind),
                Ok(None) => break,
                Err(e) => return e.to_string(),
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return "peer closed the connection".into(),
            Ok(_) => {
                let mut l = live.lock().expect("liveness");
                l.awaiting_since = None;
                l.last_read = Instant::now();
            }
            Err(e) => return format!("read: {e}"),
        }
    }
}

fn record_ok(stats: &Arc<Mutex<LinkStats>>, rtt: Duration) {
    let mut s = stats.lock().expect("stats");
    s.last_ok = Some(Instant::now());
    let sample = rtt.as_micros() as u64;
    s.rtt_us = Some(match s.rtt_us {
        Some(prev) => (prev * 7 + sample) / 8,
        None => sample,
    });
}

/// Fails every pending request with `why`, and drops the frames still queued: they belong
/// to those requests, and sent on the next connection they would be served for callers
/// already told otherwise.
fn fail_all(pending: &Pending, queue: &mut mpsc::UnboundedReceiver<Bytes>, why: TransportError) {
    while queue.try_recv().is_ok() {}
    let drained = std::mem::take(&mut *pending.lock().expect("pending"));
    for (_, (_, tx)) in drained {
        let _ = tx.send(Err(why.clone()));
    }
}

/// This node's side of the mesh: clients to every peer, and the faults seam.
pub struct Transport {
    me: Hello,
    dialer: Arc<dyn Dialer>,
    peers: RwLock<BTreeMap<NodeId, Arc<PeerClient>>>,
    pub faults: Arc<Faults>,
    /// When a peer of another frame version was last reported at warn level.
    version_warned: Arc<Mutex<Option<Instant>>>,
}

/// Where a served connection comes from, for what is logged about it.
#[derive(Clone)]
struct Origin {
    remote: Option<std::net::SocketAddr>,
    version_warned: Arc<Mutex<Option<Instant>>>,
}

/// A peer of another frame version is reported at warn at most this often: an old node
/// dials again for every request it sends.
const VERSION_WARNING_EVERY: Duration = Duration::from_secs(60);

impl Transport {
    /// A transport that dials peers over TCP.
    pub fn new(me: Hello) -> Arc<Transport> {
        Transport::with_dialer(me, Arc::new(TcpDialer))
    }

    pub fn with_dialer(me: Hello, dialer: Arc<dyn Dialer>) -> Arc<Transport> {
        Arc::new(Transport {
            me,
            dialer,
            peers: RwLock::default(),
            faults: Arc::default(),
            version_warned: Arc::default(),
        })
    }

    pub fn me(&self) -> &Hello {
        &self.me
    }

    /// Adds (or keeps) the client for `peer` at `addr`.
    pub fn add_peer(&self, peer: NodeId, addr: &str) -> Arc<PeerClient> {
        let mut peers = self.peers.write().expect("peers");
        peers
            .entry(peer)
            .or_insert_with(|| {
                PeerClient::spawn(
                    peer,
                    addr.to_string(),
                    self.me.clone(),
                    self.faults.clone(),
                    self.dialer.clone(),
                )
            })
            .clone()
    }

    pub fn peer(&self, peer: NodeId) -> Option<Arc<PeerClient>> {
        self.peers.read().expect("peers").get(&peer).cloned()
    }

    /// Pings every known peer every `every` (each ping made by `ping` as it is sent), so
    /// link stats show who is reachable even when no other traffic flows. Each answer goes
    /// to `on_answer` with the peer and the moment its ping was sent.
    pub fn start_pinger(
        self: Arc<Self>,
        every: Duration,
        ping: Arc<dyn Fn() -> PeerRequest + Send + Sync>,
        on_answer: Arc<dyn Fn(NodeId, Instant, PeerResponse) + Send + Sync>,
    ) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let peers: Vec<(NodeId, Arc<PeerClient>)> = self
                    .peers
                    .read()
                    .expect("peers")
                    .iter()
                    .map(|(id, p)| (*id, p.clone()))
                    .collect();
                for (id, peer) in peers {
                    let sent = Instant::now();
                    let answer = peer.start(&ping(), every * 10);
                    let on_answer = on_answer.clone();
                    tokio::spawn(async move {
                        if let Ok(a) = answer.await {
                            on_answer(id, sent, a);
                        }
                    });
                }
            }
        });
    }

    /// Serves one accepted peer connection (what [`Transport::serve`] does for each TCP
    /// connection; the simulation calls it for its own streams).
    pub fn serve_stream(&self, rd: ReadHalf, wr: WriteHalf, handler: Arc<dyn Handler>) {
        self.serve_from(rd, wr, handler, None);
    }

    fn serve_from(
        &self,
        rd: ReadHalf,
        wr: WriteHalf,
        handler: Arc<dyn Handler>,
        remote: Option<std::net::SocketAddr>,
    ) {
        let origin = Origin {
            remote,
            version_warned: self.version_warned.clone(),
        };
        tokio::spawn(serve_conn(rd, wr, handler, self.faults.clone(), origin));
    }

    pub fn link_stats(&self, peer: NodeId) -> Option<LinkStats> {
        self.peer(peer).map(|p| p.stats())
    }

    /// Accepts peer connections until `shutdown` turns true. Peers are never capped here:
    /// the front ends' caps leave them a reserve of descriptors (`replikv/src/fds.rs`), so
    /// an `accept` that fails anyway (EMFILE: something else used them up) is retried after
    /// a pause, and reported at most every [`AcceptBackoff::WARN_EVERY`].
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        handler: Arc<dyn Handler>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = AcceptBackoff::default();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        backoff.succeeded();
                        let _ = stream.set_nodelay(true);
                        let (rd, wr) = stream.into_split();
                        self.serve_from(Box::new(rd), Box::new(wr), handler.clone(), Some(remote));
                    }
                    Err(e) => {
                        let (wait, warn) = backoff.failed(Instant::now().into_std());
                        if let Some(more) = warn {
                            tracing::warn!(error = %e, failures_since_last_warning = more,
                                retry_in_ms = wait.as_millis() as u64, "peer accept failed");
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
}

async fn serve_conn(
    mut rd: ReadHalf,
    mut wr: WriteHalf,
    handler: Arc<dyn Handler>,
    faults: Arc<Faults>,
    origin: Origin,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(async move {
        let mut out = BytesMut::new();
        while let Some(f) = rx.recv().await {
            out.extend_from_slice(&f);
            while let Ok(f) = rx.try_recv() {
                out.extend_from_slice(&f);
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    });
    let why = read_requests(&mut rd, &handler, &faults, &tx, &origin).await;
    tracing::debug!(reason = %why, "peer connection ended");
    drop(tx);
    let _ = writer.await;
}

async fn read_requests(
    rd: &mut ReadHalf,
    handler: &Arc<dyn Handler>,
    faults: &Arc<Faults>,
    tx: &mpsc::UnboundedSender<Bytes>,
    origin: &Origin,
) -> String {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut from: Option<NodeId> = None;
    loop {
        loop {
            let f = match frame::decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e @ frame::FrameError::Version(_)) => {
                    // Not a passing fault: it repeats on every reconnect until both nodes
                    // run one version, so the operator must see it (the hello, which
                    // would name the node, is the frame that failed).
                    let mut last = origin.version_warned.lock().expect("version_warned");
                    if last.is_none_or(|t| t.elapsed() >= VERSION_WARNING_EVERY) {
                        *last = Some(Instant::now());
                        tracing::warn!(
                            remote = ?origin.remote,
                            error = %e,
                            "a peer speaks another frame version: every node needs the same replikv"
                        );
                    }
                    return e.to_string();
                }
                Err(e) => return e.to_string(),
            };
            match (f.kind, from) {
                (Kind::Hello, None) => match bincode::deserialize::<Hello>(&f.payload) {
                    Ok(h) => {
                        from = Some(h.node_id);
                        handler.hello(&h);
                    }
                    Err(e) => return format!("bad hello: {e}"),
                },
                (Kind::Request, Some(peer)) => {
                    if faults.is_blocked(peer) {
                        continue;
                    }
                    let req = match bincode::deserialize::<PeerRequest>(&f.payload) {
                        Ok(r) => r,
                        Err(e) => return format!("undecodable request from node {peer}: {e}"),
                    };
                    let finish = handler.clone().accept(peer, req).await;
                    let tx = tx.clone();
                    let faults = faults.clone();
                    let id = f.id;
                    tokio::spawn(async move {
                        let resp = finish.await;
                        if faults.is_blocked(peer) {
                            return;
                        }
                        let payload = bincode::serialize(&resp).expect("responses serialise");
                        let mut out = BytesMut::new();
                        frame::encode(Kind::Response, id, &payload, &mut out);
                        let _ = tx.send(out.freeze());
                    });
                }
                (kind, _) => return format!("unexpected {kind:?} frame"),
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return "peer closed".into(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A listener on a free port that counts the connections it accepts and serves each with
    /// `serve`; returns its address and the count.
    async fn fake_peer<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        (addr, accepted)
    }

    /// Node 1's transport, with node 2 at `addr`.
    fn client_of(addr: &str) -> (Arc<Transport>, Arc<PeerClient>) {
        let transport = Transport::new(Hello {
            node_id: 1,
            resp_addr: String::new(),
            http_addr: String::new(),
        });
        let peer = transport.add_peer(2, addr);
        (transport, peer)
    }

    /// Answers pings; counts the hellos it was given.
    struct PingHandler(AtomicUsize);

    impl Handler for PingHandler {
        fn accept(
            self: Arc<Self>,
            _from: NodeId,
            _req: PeerRequest,
        ) -> BoxFuture<'static, BoxFuture<'static, PeerResponse>> {
            let pong: BoxFuture<'static, PeerResponse> = Box::pin(futures::future::ready(
                PeerResponse::Pong(Default::default()),
            ));
            Box::pin(futures::future::ready(pong))
        }
        fn hello(&self, _hello: &Hello) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A node of the previous frame version (before expiries were resolved at apply) is
    /// refused at its first frame, for its version: the connection closes and the mismatch
    /// is reported. A hello of this version on the same listener is taken.
    #[tokio::test]
    async fn a_peer_of_another_frame_version_is_refused() {
        let transport = Transport::new(Hello {
            node_id: 2,
            resp_addr: String::new(),
            http_addr: String::new(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(PingHandler(AtomicUsize::new(0)));
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(transport.clone().serve(listener, handler.clone(), stop_rx));
        let hello = bincode::serialize(&Hello {
            node_id: 1,
            resp_addr: String::new(),
            http_addr: String::new(),
        })
        .unwrap();
        let mut frame = BytesMut::new();
        frame::encode(Kind::Hello, 0, &hello, &mut frame);

        // The same hello, stamped with version 2 (the checksum covers the version byte).
        let mut old = frame.to_vec();
        old[8] = frame::FRAME_VERSION - 1;
        let crc = crc32c::crc32c(&old[8..]);
        old[4..8].copy_from_slice(&crc.to_le_bytes());
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&old).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an older peer's connection stayed open: {read:?}"
        );
        assert!(
            transport.version_warned.lock().unwrap().is_some(),
            "closed, but not for its version (nothing was reported)"
        );

        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&frame).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while handler.0.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "this version's hello was not taken"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A peer whose connections are accepted and read but never answered (a process that
    /// stopped reading, or a connection whose other end is gone without a reset) is dialled
    /// again once requests have waited [`SILENT_LINK`], instead of being kept for good.
    /// (Found by the simulation, `sim/README.md`: a peer restarted behind a cut left such a
    /// connection, and the leader's replication to it stalled until the end of the run.)
    #[tokio::test]
    async fn a_connection_that_never_answers_is_dialled_again() {
        // Swallow whatever arrives; answer nothing; keep the socket open.
        let (addr, accepted) = fake_peer(|mut s| async move {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        let (_transport, peer) = client_of(&addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while accepted.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "the silent connection was never dropped and dialled again"
            );
            let _ = peer
                .request(
                    &PeerRequest::Ping { wall_ms: 0 },
                    Duration::from_millis(100),
                )
                .await;
        }
        assert!(peer.stats().rtt_us.is_none(), "nothing was ever answered");
    }

    /// A peer that answers, however slowly, keeps its connection: only silence is cut.
    #[tokio::test]
    async fn a_slow_link_that_answers_is_kept() {
        let (addr, accepted) = fake_peer(|s| async move {
            let (mut rd, mut wr) = s.into_split();
            let mut buf = BytesMut::new();
            while matches!(rd.read_buf(&mut buf).await, Ok(n) if n > 0) {
                while let Ok(Some(f)) = frame::decode(&mut buf) {
                    if f.kind != Kind::Request {
                        continue;
                    }
                    // Each answer comes well after its request, but they keep coming.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let pong = bincode::serialize(&PeerResponse::Pong(Default::default())).unwrap();
                    let mut out = BytesMut::new();
                    frame::encode(Kind::Response, f.id, &pong, &mut out);
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
        })
        .await;
        let (_transport, peer) = client_of(&addr);
        let mut answered = 0;
        let until = Instant::now() + SILENT_LINK * 3;
        while Instant::now() < until {
            if peer
                .request(&PeerRequest::Ping { wall_ms: 0 }, Duration::from_secs(1))
                .await
                .is_ok()
            {
                answered += 1;
            }
        }
        assert!(answered > 0, "the slow peer's answers never arrived");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "a link that kept answering was dropped"
        );
    }
}
