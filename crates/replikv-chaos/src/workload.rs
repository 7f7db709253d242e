//! The clients of a run. Each is a thread with its own RESP connection (to a node chosen in
//! turn, so every node serves clients) that records what it asked and what it saw:
//!
//! | client | does | recorded as |
//! |---|---|---|
//! | register | GET / SET / SET NX on a few keys that change every few seconds | one [`History`] for the linearizability checker |
//! | unique | SET of a never-reused key at one consistency level | one [`History`] per level, for the lost-write checker |
//! | session | SET then GET of its own key with `REPLIKV.READ secondary` | read-your-writes violations |
//! | clock + readers | a writer bumps `chaos:clock`; one reader per node reads it with `secondary` | staleness of each follower read |
//! | expiring keys | SET of a never-reused key with `PX t`; two readers GET and PTTL recent ones, at `primary` and at `secondary` | [`ExpiryWrite`]s and [`ExpiryRead`]s for [`check_expiry`] |
//!
//! Every acknowledged `quorum` write also marks the time it completed, for the
//! unavailability windows. A reply that never came (timeout, dropped connection) is
//! [`Outcome::Unknown`] and the client reconnects, so a late reply is never taken for the
//! answer to a later request.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replikv_checker::{History, Op, OpKind, Outcome};
use serde::{Deserialize, Serialize};

/// The write levels the unique-value clients cover, as `REPLIKV.CONSISTENCY` takes them.
pub const LEVELS: [&str; 4] = ["eventual", "at_least:2", "quorum", "all"];
/// Register keys live this long before the clients move to fresh ones, which keeps each
/// key's history short enough for the checker.
const KEY_EPOCH: Duration = Duration::from_secs(4);
const REGISTER_KEYS: u64 = 6;
/// How long a client waits for a reply before calling the outcome unknown. Longer than the
/// servers' write timeout, so most failures are definite.
const REPLY_TIMEOUT: Duration = Duration::from_secs(4);

/// What the clients saw, shared while they run.
pub struct Recorded {
    origin: Instant,
    pub registers: Mutex<Vec<Op>>,
    pub unique: Mutex<BTreeMap<&'static str, Vec<Op>>>,
    /// Completion times (ns) of acknowledged `quorum` writes.
    pub quorum_acks: Mutex<Vec<u64>>,
    /// `chaos:clock` values and when their write completed.
    pub clock_acks: Mutex<BTreeMap<u64, u64>>,
    /// `chaos:clock` values whose write got no definite answer: they may land at any later
    /// time (a forwarded write can reach the leader seconds after the client gave up), so a
    /// read of one says nothing about staleness.
    pub clock_unknown: Mutex<std::collections::BTreeSet<u64>>,
    /// (node, invoke ns, value read) of follower reads of `chaos:clock`.
    pub clock_reads: Mutex<Vec<(u64, u64, u64)>>,
    pub session_reads: AtomicU64,
    /// Reads that did not return the session's own last acknowledged write.
    pub ryw_violations: Mutex<Vec<String>>,
    /// Writes of expiring keys, one key each.
    pub expiry_writes: Mutex<Vec<ExpiryWrite>>,
    pub expiry_reads: Mutex<Vec<ExpiryRead>>,
    /// Acknowledged expiring keys the readers still read: (key, read until ns).
    expiry_recent: Mutex<VecDeque<(String, u64)>>,
}

/// Lifetimes (ms) of the expiring keys: they expire during the run, most of them while
/// reads look at them.
const EXPIRY_TTL_MS: std::ops::Range<u64> = 800..EXPIRY_TTL_MAX_MS;
pub const EXPIRY_TTL_MAX_MS: u64 = 3_000;
/// How far the expiry checker lets a key's life be from the test's own clock: two nodes
/// in step may differ by twice `max_clock_offset_ms` (500 ms by default).
pub const EXPIRY_MARGIN_MS: u64 = 1_000;
/// Readers keep reading a key this long after it should be gone.
const EXPIRY_READ_PAST_MS: u64 = EXPIRY_MARGIN_MS + 1_500;

/// `SET key v PX ttl_ms`: invoked and completed (ns since the run's origin).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpiryWrite {
    pub key: String,
    pub ttl_ms: u64,
    pub invoke_ns: u64,
    pub outcome: Outcome,
    pub complete_ns: Option<u64>,
}

/// What a read of an expiring key saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Seen {
    Absent,
    /// Present; with the PTTL the reply gave, for a PTTL.
    Present(Option<i64>),
}

/// A GET or PTTL of an expiring key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpiryRead {
    pub key: String,
    pub node: String,
    pub secondary: bool,
    pub invoke_ns: u64,
    pub complete_ns: u64,
    pub seen: Seen,
}

/// What the expiry check found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExpiryCheck {
    pub acknowledged: usize,
    pub reads_checked: usize,
    pub violations: Vec<String>,
}

/// Checks every read of an acknowledged expiring key against the key's expected life: a
/// key acknowledged with `PX t` must be readable until `invoke + t - margin` (a read that
/// began after the write was acknowledged, or, at `secondary`, `max_lag_ms` after, must
/// see it until then: no acknowledged write vanishes early), must be gone from
/// `complete + t + margin` on, and a PTTL must name an expiry inside that window too. Keys
/// of writes with no definite answer are left out (they may land at any time).
pub fn check_expiry(
    writes: &[ExpiryWrite],
    reads: &[ExpiryRead],
    margin_ms: u64,
    max_lag_ms: u64,
) -> ExpiryCheck {
    let ms = |ns: u64| ns as f64 / 1e6;
    let acked: BTreeMap<&str, &ExpiryWrite> = writes
        .iter()
        .filter(|w| w.outcome == Outcome::Written)
        .map(|w| (w.key.as_str(), w))
        .collect();
    let mut check = ExpiryCheck {
        acknowledged: acked.len(),
        ..ExpiryCheck::default()
    };
    for r in reads {
        let Some(w) = acked.get(r.key.as_str()) else {
            continue;
        };
        let done = w.complete_ns.expect("an acknowledged write completed");
        check.reads_checked += 1;
        let (margin, ttl) = (margin_ms as f64, w.ttl_ms as f64);
        // The window the key's expiry must fall in, by the test's clock (ms).
        let lo = ms(w.invoke_ns) + ttl - margin;
        let hi = ms(done) + ttl + margin;
        let (ri, rc) = (ms(r.invoke_ns), ms(r.complete_ns));
        let read = format!(
            "{} of {} at {:.3}..{:.3} s via {}{}",
            if matches!(r.seen, Seen::Present(Some(_))) {
                "PTTL"
            } else {
                "read"
            },
            r.key,
            ri / 1e3,
            rc / 1e3,
            r.node,
            if r.secondary { " (secondary)" } else { "" }
        );
        let life = format!(
            "written with PX {} at {:.3}..{:.3} s",
            w.ttl_ms,
            ms(w.invoke_ns) / 1e3,
            ms(done) / 1e3
        );
        let must_see_from = ms(done) + if r.secondary { max_lag_ms as f64 } else { 0.0 };
        match &r.seen {
            Seen::Absent if ri >= must_see_from && rc < lo => {
                check.violations.push(format!(
                    "{read} found it gone, {:.0} ms early; {life}",
                    lo - rc
                ));
            }
            Seen::Present(_) if ri > hi => {
                check.violations.push(format!(
                    "{read} found it live, {:.0} ms late; {life}",
                    ri - hi
                ));
            }
            Seen::Present(Some(pttl)) => {
                let p = *pttl as f64;
                // Served at some moment in [ri, rc]: its expiry is that moment plus p.
                if ri + p > hi || rc + p < lo {
                    check.violations.push(format!(
                        "{read} gave {pttl} ms left: an expiry at {:.3}..{:.3} s, outside {:.3}..{:.3} s; {life}",
                        (ri + p) / 1e3,
                        (rc + p) / 1e3,
                        lo / 1e3,
                        hi / 1e3
                    ));
                }
            }
            _ => {}
        }
    }
    check
}

impl Recorded {
    pub fn new(origin: Instant) -> Arc<Recorded> {
        Arc::new(Recorded {
            origin,
            registers: Mutex::default(),
            unique: Mutex::new(LEVELS.iter().map(|l| (*l, Vec::new())).collect()),
            quorum_acks: Mutex::default(),
            clock_acks: Mutex::default(),
            clock_unknown: Mutex::default(),
            clock_reads: Mutex::default(),
            session_reads: AtomicU64::new(0),
            ryw_violations: Mutex::default(),
            expiry_writes: Mutex::default(),
            expiry_reads: Mutex::default(),
            expiry_recent: Mutex::default(),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Operations recorded so far, of every kind.
    pub fn ops(&self) -> usize {
        self.registers.lock().unwrap().len()
            + self
                .unique
                .lock()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum::<usize>()
    }

    pub fn register_history(&self) -> History {
        History {
            ops: self.registers.lock().unwrap().clone(),
        }
    }

    pub fn unique_history(&self, level: &str) -> History {
        History {
            ops: self.unique.lock().unwrap()[level].clone(),
        }
    }

    fn ack_quorum(&self, at: u64) {
        self.quorum_acks.lock().unwrap().push(at);
    }
}

/// What a client learns from an error reply. Only errors that say the write was not
/// proposed, or not committed, are definite failures; everything else may have taken effect.
pub fn classify(e: &redis::RedisError) -> Outcome {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        return Outcome::Unknown;
    }
    let text = e.to_string();
    if text.contains("(not committed)")
        || text.contains("CLUSTERDOWN")
        || text.contains("TRYAGAIN")
        || text.contains("READONLY")
        || text.contains("MISCONF")
    {
        Outcome::Failed
    } else {
        Outcome::Unknown
    }
}

/// Runs one register op (GET, SET, or SET NX for a compare-and-set from absent) and says
/// what the client learned.
pub fn register_op(c: &mut redis::Connection, key: &str, kind: &OpKind) -> Outcome {
    match kind {
        OpKind::Read => match redis::cmd("GET").arg(key).query::<Option<String>>(c) {
            Ok(v) => Outcome::Read(v),
            Err(e) => classify(&e),
        },
        OpKind::Write(v) => match redis::cmd("SET").arg(key).arg(v).query::<()>(c) {
            Ok(()) => Outcome::Written,
            Err(e) => classify(&e),
        },
        OpKind::Cas { new, .. } => match redis::cmd("SET")
            .arg(key)
            .arg(new)
            .arg("NX")
            .query::<Option<String>>(c)
        {
            Ok(r) => Outcome::CasResult(r.is_some()),
            Err(e) => classify(&e),
        },
    }
}

/// One client's connection, re-made after any error that may leave a reply in flight.
struct Conn {
    urls: Vec<String>,
    next: usize,
    conn: Option<redis::Connection>,
    /// Commands sent on every new connection (`REPLIKV.CONSISTENCY quorum`, ...).
    setup: Vec<(&'static str, String)>,
}

impl Conn {
    fn new(urls: Vec<String>, first: usize, setup: Vec<(&'static str, String)>) -> Conn {
        Conn {
            urls,
            next: first,
            conn: None,
            setup,
        }
    }

    /// The connection, or `None` (after a short pause) if no node could be reached.
    fn get(&mut self) -> Option<&mut redis::Connection> {
        if self.conn.is_none() {
            let url = &self.urls[self.next % self.urls.len()];
            self.next += 1;
            let made = redis::Client::open(url.as_str())
                .ok()
                .and_then(|c| {
                    c.get_connection_with_timeout(Duration::from_millis(500))
                        .ok()
                })
                .and_then(|mut c| {
                    c.set_read_timeout(Some(REPLY_TIMEOUT)).ok()?;
                    c.set_write_timeout(Some(REPLY_TIMEOUT)).ok()?;
                    for (cmd, arg) in &self.setup {
                        redis::cmd(cmd).arg(arg).query::<()>(&mut c).ok()?;
                    }
                    Some(c)
                });
            if made.is_none() {
                thread::sleep(Duration::from_millis(50));
            }
            self.conn = made;
        }
        self.conn.as_mut()
    }

    /// The node the connection is on.
    fn current_url(&self) -> &str {
        &self.urls[(self.next + self.urls.len() - 1) % self.urls.len()]
    }

    fn drop_if(&mut self, outcome: &Outcome) {
        if matches!(outcome, Outcome::Unknown) {
            self.conn = None;
        }
    }
}

/// The running clients; [`Clients::stop`] joins them.
pub struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// Sizes of the workload.
#[derive(Clone, Debug)]
pub struct Mix {
    pub register_clients: u64,
    /// Unique-value clients per level.
    pub unique_clients: u64,
    /// Writers of expiring keys (each with its own keys).
    pub expiry_writers: u64,
}

impl Clients {
    /// Starts every client. `urls[i]` is node `i + 1`'s RESP address.
    pub fn start(urls: &[String], rec: &Arc<Recorded>, mix: &Mix, seed: u64) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut spawn = |f: Box<dyn FnOnce() + Send>| threads.push(thread::spawn(f));
        let mut client_id = 0u64;
        for _ in 0..mix.register_clients {
            client_id += 1;
            let (urls, rec, stop) = (urls.to_vec(), rec.clone(), stop.clone());
            let id = client_id;
            spawn(Box::new(move || register_client(id, urls, rec, stop, seed)));
        }
        for level in LEVELS {
            for _ in 0..mix.unique_clients {
                client_id += 1;
                let (urls, rec, stop) = (urls.to_vec(), rec.clone(), stop.clone());
                let id = client_id;
                spawn(Box::new(move || unique_client(id, level, urls, rec, stop)));
            }
        }
        client_id += 1;
        let (u, r, s) = (urls.to_vec(), rec.clone(), stop.clone());
        let id = client_id;
        spawn(Box::new(move || session_client(id, u, r, s)));
        let (u, r, s) = (urls.to_vec(), rec.clone(), stop.clone());
        spawn(Box::new(move || clock_writer(u, r, s)));
        for w in 0..mix.expiry_writers {
            let (u, r, s) = (urls.to_vec(), rec.clone(), stop.clone());
            spawn(Box::new(move || expiry_writer(w, u, r, s, seed)));
        }
        for secondary in [false, true] {
            let (u, r, s) = (urls.to_vec(), rec.clone(), stop.clone());
            spawn(Box::new(move || expiry_reader(u, r, s, secondary, seed)));
        }
        for (i, url) in urls.iter().enumerate() {
            let (u, r, s) = (vec![url.clone()], rec.clone(), stop.clone());
            spawn(Box::new(move || clock_reader(i as u64 + 1, u, r, s)));
        }
        Clients { stop, threads }
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Clients {
    /// A run that fails half-way still stops its clients.
    fn drop(&mut self) {
        self.halt();
    }
}

fn register_client(
    id: u64,
    urls: Vec<String>,
    rec: Arc<Recorded>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut conn = Conn::new(urls, id as usize, Vec::new());
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.get() else { continue };
        let epoch = rec.origin.elapsed().as_secs() / KEY_EPOCH.as_secs();
        let key = format!("reg:{epoch}:{}", rng.random_range(0..REGISTER_KEYS));
        seq += 1;
        let value = format!("c{id}-{seq}");
        let roll = rng.random_range(0..100);
        let kind = if roll < 50 {
            OpKind::Read
        } else if roll < 85 {
            OpKind::Write(value)
        } else {
            OpKind::Cas {
                expected: None,
                new: value,
            }
        };
        let invoke_ns = rec.now_ns();
        let outcome = register_op(c, &key, &kind);
        let done = rec.now_ns();
        if matches!(outcome, Outcome::Written | Outcome::CasResult(_)) {
            rec.ack_quorum(done);
        }
        conn.drop_if(&outcome);
        let complete_ns = (!matches!(outcome, Outcome::Unknown)).then_some(done);
        rec.registers.lock().unwrap().push(Op {
            client: id,
            key,
            kind,
            invoke_ns,
            complete_ns,
            outcome,
        });
    }
}

fn unique_client(
    id: u64,
    level: &'static str,
    urls: Vec<String>,
    rec: Arc<Recorded>,
    stop: Arc<AtomicBool>,
) {
    let setup = vec![("REPLIKV.CONSISTENCY", level.to_string())];
    let mut conn = Conn::new(urls, id as usize, setup);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.get() else { continue };
        seq += 1;
        let key = format!("u:{level}:{id}:{seq}");
        let value = seq.to_string();
        let invoke_ns = rec.now_ns();
        let outcome = match redis::cmd("SET").arg(&key).arg(&value).query::<()>(c) {
            Ok(()) => Outcome::Written,
            Err(e) => classify(&e),
        };
        let done = rec.now_ns();
        if level == "quorum" && outcome == Outcome::Written {
            rec.ack_quorum(done);
        }
        conn.drop_if(&outcome);
        let complete_ns = (!matches!(outcome, Outcome::Unknown)).then_some(done);
        rec.unique.lock().unwrap().get_mut(level).unwrap().push(Op {
            client: id,
            key,
            kind: OpKind::Write(value),
            invoke_ns,
            complete_ns,
            outcome,
        });
    }
}

/// Read-your-writes with follower reads: the session token of the connection must make any
/// replica that serves the read hold the write first.
fn session_client(id: u64, urls: Vec<String>, rec: Arc<Recorded>, stop: Arc<AtomicBool>) {
    let setup = vec![("REPLIKV.READ", "secondary".to_string())];
    let mut conn = Conn::new(urls, id as usize, setup);
    let key = format!("session:{id}");
    let mut seq = 0u64;
    // This session's writes that got no definite answer: they may still land, later than
    // writes acknowledged after them, and reading one back is then no violation.
    let mut unknown = std::collections::BTreeSet::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.get() else { continue };
        seq += 1;
        if let Err(e) = redis::cmd("SET").arg(&key).arg(seq).query::<()>(c) {
            if classify(&e) == Outcome::Unknown {
                unknown.insert(seq);
            }
            conn.conn = None;
            continue;
        }
        let acked = rec.now_ns();
        match redis::cmd("GET").arg(&key).query::<Option<u64>>(c) {
            Ok(got) => {
                rec.session_reads.fetch_add(1, Ordering::Relaxed);
                if got != Some(seq) && !got.is_some_and(|v| unknown.contains(&v)) {
                    rec.ryw_violations.lock().unwrap().push(format!(
                        "session {id} on {} wrote {seq} to {key} (acknowledged at {:.3} s) and then read {got:?} at {:.3} s",
                        conn.current_url(),
                        acked as f64 / 1e9,
                        rec.now_ns() as f64 / 1e9
                    ));
                }
            }
            Err(_) => conn.conn = None,
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn clock_writer(urls: Vec<String>, rec: Arc<Recorded>, stop: Arc<AtomicBool>) {
    let mut conn = Conn::new(urls, 0, Vec::new());
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.get() else { continue };
        n += 1;
        match redis::cmd("SET").arg("chaos:clock").arg(n).query::<()>(c) {
            Ok(()) => {
                let done = rec.now_ns();
                rec.clock_acks.lock().unwrap().insert(n, done);
                rec.ack_quorum(done);
            }
            Err(e) => {
                if classify(&e) == Outcome::Unknown {
                    rec.clock_unknown.lock().unwrap().insert(n);
                }
                conn.conn = None;
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Writes never-reused keys with a random `PX` lifetime, at the default level (`quorum`),
/// through each node in turn.
fn expiry_writer(id: u64, urls: Vec<String>, rec: Arc<Recorded>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0e49_17e5 ^ id);
    let mut conn = Conn::new(urls, id as usize, Vec::new());
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.get() else { continue };
        seq += 1;
        let key = format!("ttl:{id}:{seq}");
        let ttl_ms = rng.random_range(EXPIRY_TTL_MS);
        let invoke_ns = rec.now_ns();
        let outcome = match redis::cmd("SET")
            .arg(&key)
            .arg("v")
            .arg("PX")
            .arg(ttl_ms)
            .query::<()>(c)
        {
            Ok(()) => Outcome::Written,
            Err(e) => classify(&e),
        };
        let done = rec.now_ns();
        conn.drop_if(&outcome);
        if outcome == Outcome::Written {
            rec.ack_quorum(done);
            let until = done + (ttl_ms + EXPIRY_READ_PAST_MS) * 1_000_000;
            rec.expiry_recent
                .lock()
                .unwrap()
                .push_back((key.clone(), until));
        }
        // Round-robin over the nodes, one write each.
        conn.conn = None;
        rec.expiry_writes.lock().unwrap().push(ExpiryWrite {
            key,
            ttl_ms,
            invoke_ns,
            complete_ns: (!matches!(outcome, Outcome::Unknown)).then_some(done),
            outcome,
        });
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads acknowledged expiring keys (GET or PTTL, at random) until they should be gone,
/// through each node in turn, at `primary` or at `secondary`.
fn expiry_reader(
    urls: Vec<String>,
    rec: Arc<Recorded>,
    stop: Arc<AtomicBool>,
    secondary: bool,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7ead ^ secondary as u64);
    let setup = if secondary {
        vec![("REPLIKV.READ", "secondary".to_string())]
    } else {
        Vec::new()
    };
    let mut conn = Conn::new(urls, secondary as usize, setup);
    let mut reads = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = {
            let mut recent = rec.expiry_recent.lock().unwrap();
            let now = rec.now_ns();
            while recent.front().is_some_and(|(_, until)| *until < now) {
                recent.pop_front();
            }
            (!recent.is_empty()).then(|| recent[rng.random_range(0..recent.len())].0.clone())
        };
        let Some(key) = key else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        let Some(c) = conn.get() else { continue };
        let pttl = rng.random_bool(0.5);
        let invoke_ns = rec.now_ns();
        let seen = if pttl {
            redis::cmd("PTTL").arg(&key).query::<i64>(c).map(|p| {
                if p < 0 {
                    Seen::Absent
                } else {
                    Seen::Present(Some(p))
                }
            })
        } else {
            redis::cmd("GET")
                .arg(&key)
                .query::<Option<String>>(c)
                .map(|v| {
                    if v.is_some() {
                        Seen::Present(None)
                    } else {
                        Seen::Absent
                    }
                })
        };
        let complete_ns = rec.now_ns();
        let node = conn.current_url().to_string();
        match seen {
            Ok(seen) => rec.expiry_reads.lock().unwrap().push(ExpiryRead {
                key,
                node,
                secondary,
                invoke_ns,
                complete_ns,
                seen,
            }),
            Err(_) => conn.conn = None,
        }
        reads += 1;
        if reads.is_multiple_of(20) {
            // Move to the next node now and then, so that every node serves these reads.
            conn.conn = None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn clock_reader(node: u64, urls: Vec<String>, rec: Arc<Recorded>, stop: Arc<AtomicBool>) {
    let setup = vec![("REPLIKV.READ", "secondary".to_string())];
    let mut conn = Conn::new(urls, 0, setup);
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.get() else { continue };
        let invoke = rec.now_ns();
        match redis::cmd("GET").arg("chaos:clock").query::<Option<u64>>(c) {
            Ok(v) => rec
                .clock_reads
                .lock()
                .unwrap()
                .push((node, invoke, v.unwrap_or(0))),
            Err(_) => conn.conn = None,
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The staleness (ms) each follower read shows for certain: a read at time `t` that returned
/// `v` although write `v + k` had completed at `c < t` lagged at least `t - c`. Reads of a
/// value whose write got no definite answer are left out: it may have landed late, after
/// later values, and be current.
pub fn staleness_ms(rec: &Recorded) -> Vec<(u64, u64, u64, f64)> {
    let acks = rec.clock_acks.lock().unwrap();
    let unknown = rec.clock_unknown.lock().unwrap();
    let reads = rec.clock_reads.lock().unwrap();
    // For each value, the earliest completion of any later write.
    let mut earliest_after: BTreeMap<u64, u64> = BTreeMap::new();
    let mut min_so_far = u64::MAX;
    for (v, at) in acks.iter().rev() {
        earliest_after.insert(*v, min_so_far);
        min_so_far = min_so_far.min(*at);
    }
    let first_ack = min_so_far;
    reads
        .iter()
        .filter(|(_, _, v)| !unknown.contains(v))
        .map(|(node, t, v)| {
            let superseded = if *v == 0 {
                first_ack
            } else {
                // A value with no recorded ack (its reply was lost) is judged by the next
                // acknowledged one.
                earliest_after
                    .range(*v..)
                    .next()
                    .map(|(_, at)| *at)
                    .unwrap_or(u64::MAX)
            };
            let lag = if superseded < *t {
                (*t - superseded) as f64 / 1e6
            } else {
                0.0
            };
            (*node, *t, *v, lag)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn write(ttl_ms: u64, at_ms: u64, done_ms: u64) -> ExpiryWrite {
        ExpiryWrite {
            key: "k".into(),
            ttl_ms,
            invoke_ns: at_ms * MS,
            outcome: Outcome::Written,
            complete_ns: Some(done_ms * MS),
        }
    }

    fn read(from_ms: u64, to_ms: u64, secondary: bool, seen: Seen) -> ExpiryRead {
        ExpiryRead {
            key: "k".into(),
            node: "n1".into(),
            secondary,
            invoke_ns: from_ms * MS,
            complete_ns: to_ms * MS,
            seen,
        }
    }

    fn violations(reads: &[ExpiryRead]) -> usize {
        check_expiry(&[write(2_000, 1_000, 1_010)], reads, 500, 1_000)
            .violations
            .len()
    }

    #[test]
    fn a_key_may_be_gone_only_after_its_lifetime_less_the_margin() {
        // Lifetime window by the test's clock: 2,500..3,510 ms.
        assert_eq!(violations(&[read(1_020, 1_030, false, Seen::Absent)]), 1);
        assert_eq!(violations(&[read(2_600, 2_610, false, Seen::Absent)]), 0);
        // Begun before the acknowledgement: it may not have seen the write yet.
        assert_eq!(violations(&[read(1_000, 1_030, false, Seen::Absent)]), 0);
        // A follower may lag by max_lag_ms.
        assert_eq!(violations(&[read(1_500, 1_510, true, Seen::Absent)]), 0);
        assert_eq!(violations(&[read(2_100, 2_110, true, Seen::Absent)]), 1);
    }

    #[test]
    fn a_key_must_be_gone_after_its_lifetime_plus_the_margin_and_ttls_must_agree() {
        assert_eq!(
            violations(&[read(3_600, 3_610, false, Seen::Present(None))]),
            1
        );
        assert_eq!(
            violations(&[read(3_400, 3_410, true, Seen::Present(None))]),
            0
        );
        assert_eq!(
            violations(&[read(1_100, 1_110, false, Seen::Present(Some(1_950)))]),
            0
        );
        // The TTL read through a node an hour ahead: far outside.
        assert_eq!(
            violations(&[read(1_100, 1_110, false, Seen::Present(Some(3_700_000)))]),
            1
        );
        assert_eq!(
            violations(&[read(1_100, 1_110, false, Seen::Present(Some(100)))]),
            1
        );
        // Writes with no definite answer constrain nothing.
        let unknown = ExpiryWrite {
            outcome: Outcome::Unknown,
            complete_ns: None,
            ..write(2_000, 1_000, 1_010)
        };
        let c = check_expiry(
            &[unknown],
            &[read(9_000, 9_010, false, Seen::Present(None))],
            500,
            1_000,
        );
        assert_eq!((c.acknowledged, c.violations.len()), (0, 0));
    }
}
