//! What every listener of a node shares: a cap on the connections it keeps open
//! ([`ConnLimit`], one per front end: RESP's `maxclients`, HTTP's `max_http_connections`),
//! the pause after a failed `accept` ([`AcceptBackoff`]), and warnings at most once a period
//! ([`WarnEvery`]).
//!
//! Why caps: every connection holds a file descriptor, and a node has a fixed number of them
//! (RLIMIT_NOFILE). Clients that took them all would starve the peer transport and the
//! storage (issue 16: 19,990 idle clients left a node unreachable by its peers). The binary
//! sizes the caps so that the descriptors left over are the peers' reserve
//! (`replikv/src/fds.rs`); the front ends enforce them here. Time is passed in, so the peer
//! transport can hand it the simulation's clock. The one piece of I/O in this crate is
//! [`refuse`], on a plain std socket: both front ends answer a connection beyond their cap
//! the same way.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most `max` connections open at once; counts those accepted and those refused.
#[derive(Debug)]
pub struct ConnLimit {
    max: usize,
    open: AtomicUsize,
    accepted: AtomicU64,
    rejected: AtomicU64,
}

/// One open connection's place under a [`ConnLimit`]; dropping it frees the place.
#[derive(Debug)]
pub struct ConnSlot(Arc<ConnLimit>);

impl ConnLimit {
    pub fn new(max: usize) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            max,
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// Takes a place for a connection just accepted, or `None` (counted as a rejection)
    /// when `max` are open: the caller answers it with its refusal and closes it.
    pub fn try_open(self: &Arc<Self>) -> Option<ConnSlot> {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(ConnSlot(self.clone())),
            Err(_) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections accepted since start, refused ones included (Redis's
    /// `total_connections_received`).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused because `max` were open (Redis's `rejected_connections`).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Says when a repeated warning is due: the first time, then at most once per `period`,
/// with how many occurrences went unreported in between.
#[derive(Debug)]
pub struct WarnEvery {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnEvery {
    pub fn new(period: Duration) -> WarnEvery {
        WarnEvery {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// One more occurrence at `now`: `Some(occurrences not reported since the last
    /// warning)` if this one should be, else `None`.
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.period)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The pause after a failed `accept`. A listener whose `accept` fails (EMFILE, ENFILE,
/// ENOBUFS) stays readable, so retrying at once spins a core while the connection waits in
/// the backlog; the pause doubles from [`AcceptBackoff::FIRST`] to [`AcceptBackoff::MAX`]
/// while failures continue and starts over after a success. Warnings are due at most once
/// per [`AcceptBackoff::WARN_EVERY`].
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
    warn: WarnEvery,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            next: Self::FIRST,
            warn: WarnEvery::new(Self::WARN_EVERY),
        }
    }
}

impl AcceptBackoff {
    pub const FIRST: Duration = Duration::from_millis(5);
    pub const MAX: Duration = Duration::from_millis(500);
    pub const WARN_EVERY: Duration = Duration::from_secs(10);

    /// An `accept` failed at `now`: how long to wait before the next, and whether to warn
    /// (with the failures not reported since the last warning).
    pub fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        (wait, self.warn.due(now))
    }

    /// An `accept` succeeded: the next failure waits [`AcceptBackoff::FIRST`] again.
    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Writes `answer` without waiting (a fresh socket's send buffer takes it whole) and closes
/// the connection, as Redis does for a client beyond `maxclients`. It never waits, so the
/// accept loop that calls it holds the refused connection's descriptor only for these few
/// system calls: a flood of refused connections cannot reach into descriptors kept for
/// others. What the client already sent (up to 64 KiB) is read and dropped first, so the
/// close is a FIN rather than a reset unless the client writes more meanwhile; either way
/// its kernel keeps the answer for it to read.
pub fn refuse(mut stream: std::net::TcpStream, answer: &[u8]) {
    use std::io::{Read, Write};
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = stream.write(answer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal reaches a client that already sent a request, then the connection ends.
    #[test]
    fn a_refused_client_reads_the_answer_then_the_end() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(b"PING\r\n").unwrap();
        let (server, _) = listener.accept().unwrap();
        refuse(server, b"-ERR max number of clients reached\r\n");
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"-ERR max number of clients reached\r\n");
    }

    #[test]
    fn a_limit_admits_max_connections_and_frees_a_place_on_close() {
        let limit = ConnLimit::new(2);
        let a = limit.try_open().expect("first");
        let _b = limit.try_open().expect("second");
        assert!(limit.try_open().is_none(), "a third beyond max 2");
        assert_eq!(
            (limit.open(), limit.accepted(), limit.rejected()),
            (2, 3, 1)
        );
        drop(a);
        assert_eq!(limit.open(), 1);
        assert!(limit.try_open().is_some(), "a place freed by a close");
        assert_eq!((limit.accepted(), limit.rejected()), (4, 1));
    }

    #[test]
    fn a_warning_is_due_once_per_period_with_the_count_in_between() {
        let t0 = Instant::now();
        let mut w = WarnEvery::new(Duration::from_secs(10));
        assert_eq!(w.due(t0), Some(0));
        assert_eq!(w.due(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.due(t0 + Duration::from_secs(9)), None);
        assert_eq!(w.due(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(w.due(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_starts_over_after_a_success() {
        let now = Instant::now();
        let mut b = AcceptBackoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.failed(now).0).collect();
        assert_eq!(waits[0], AcceptBackoff::FIRST);
        assert_eq!(waits[1], AcceptBackoff::FIRST * 2);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), AcceptBackoff::MAX);
        b.succeeded();
        assert_eq!(b.failed(now).0, AcceptBackoff::FIRST);
    }

    #[test]
    fn accept_failures_warn_once_per_period() {
        let t0 = Instant::now();
        let mut b = AcceptBackoff::default();
        assert_eq!(b.failed(t0).1, Some(0));
        for i in 1..100 {
            assert_eq!(b.failed(t0 + Duration::from_millis(i)).1, None);
        }
        assert_eq!(b.failed(t0 + AcceptBackoff::WARN_EVERY).1, Some(99));
    }
}
