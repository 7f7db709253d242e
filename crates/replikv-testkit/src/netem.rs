//! Network delay, jitter and reordering between namespaces, done in userspace: a stand-in
//! for `tc qdisc add ... netem delay D J` on kernels built without `sch_netem`.
//!
//! An iptables rule in the namespace's `mangle` `OUTPUT` chain sends the matching packets to
//! an NFQUEUE. A thread whose netlink queue socket was opened inside that namespace holds
//! each packet for `delay ± uniform jitter` and then gives it an ACCEPT verdict. Verdicts may
//! be given in any order, so a jitter larger than the spacing of packets reorders them.
//!
//! Why `mangle` and not `filter`: an ACCEPT verdict from the queue resumes the packet at the
//! next netfilter hook, skipping the rest of the chain that queued it. Queued from `mangle`
//! (priority -150), a delayed packet still passes every rule of `filter OUTPUT` (such as the
//! fault chain of [`crate::netns`]) after its delay.
//!
//! Safety nets, so that traffic never stays stuck:
//! - the rule has `--queue-bypass`: with no program bound to the queue, packets pass
//!   undelayed;
//! - the queue is fail-open: when the kernel's queue is full, new packets pass undelayed;
//! - on drop, the rule is removed first, then every held packet is accepted at once; should
//!   the thread die, the kernel drops what it held (TCP retransmits) and later packets bypass.
//!
//! Needs root (`setns`, iptables), `ip` (iproute2), `iptables` and a kernel with
//! `CONFIG_NETFILTER_NETLINK_QUEUE`.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};

/// How long the queue thread sleeps when it has nothing to receive and nothing is due: the
/// `nfq` crate exposes no socket to wait on, so the thread polls a non-blocking socket. It is
/// also the granularity of the delays (a packet may be held up to this much longer).
const POLL: Duration = Duration::from_millis(1);
/// Packets the kernel keeps queued for us before fail-open lets further ones pass undelayed.
const QUEUE_MAX_LEN: u32 = 8192;
/// On drop, after the rule is gone: the thread keeps accepting stragglers until none came for
/// this long.
const DRAIN_QUIET: Duration = Duration::from_millis(20);

/// How long each packet is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelaySpec {
    /// Mean time a packet is held.
    pub delay: Duration,
    /// Each packet is held `delay` plus a uniform offset in `[-jitter, +jitter]` (never less
    /// than zero). A jitter larger than the spacing of packets reorders them.
    pub jitter: Duration,
    /// Seed of the jitter's pseudo-random numbers.
    pub seed: u64,
}

/// Delay applied to matching packets leaving a network namespace, until dropped.
#[derive(Debug)]
pub struct PacketDelay {
    netns: String,
    ip: PathBuf,
    iptables: PathBuf,
    /// `iptables -t mangle` arguments after `-I`/`-D`: the chain, the matcher and the target.
    rule: Vec<String>,
    /// Whether the rule is in (and is to be deleted on drop).
    rule_in: bool,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Stats {
    held: AtomicU64,
    reordered: AtomicU64,
}

impl PacketDelay {
    /// Inside network namespace `netns` (as created by `ip netns add`), holds every packet
    /// that matches `matcher` (iptables match arguments, e.g. `["-p", "tcp", "-d",
    /// "10.213.7.12"]`) as it leaves through `OUTPUT` for `spec.delay ± spec.jitter` before
    /// letting it go, so that packets can leave out of order.
    ///
    /// `queue_num` must not be in use by another program or `PacketDelay` in the same
    /// namespace (queue numbers are per namespace). If two rules match one packet, only the
    /// one added last delays it.
    pub fn start(
        netns: &str,
        queue_num: u16,
        matcher: &[&str],
        spec: DelaySpec,
    ) -> io::Result<PacketDelay> {
        let ns_path = netns_path(netns)?;
        let ip = find_program("ip", "iproute2")?;
        let iptables = find_program("iptables", "iptables")?;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (netns, stop, stats) = (netns.to_string(), stop.clone(), stats.clone());
            thread::Builder::new()
                .name(format!("netem-{queue_num}"))
                .spawn(move || {
                    // A panic (the crate asserts on malformed netlink messages) ends the
                    // thread; its socket closes, so later packets bypass the queue.
                    let _ = panic::catch_unwind(AssertUnwindSafe(|| {
                        let queue = match open_queue(&ns_path, &netns, queue_num) {
                            Ok(queue) => {
                                let _ = ready_tx.send(Ok(()));
                                queue
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                        Holder::new(queue, spec, stats).run(&stop);
                    }));
                })?
        };
        let queue = queue_num.to_string();
        let mut rule = vec!["OUTPUT".to_string()];
        rule.extend(matcher.iter().map(|s| s.to_string()));
        rule.extend(["-j", "NFQUEUE", "--queue-num", &queue, "--queue-bypass"].map(String::from));
        let mut delay = PacketDelay {
            netns: netns.to_string(),
            ip,
            iptables,
            rule,
            rule_in: false,
            stop,
            stats,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::other(
                    "netem: the queue thread died while starting",
                ))
            }
        }

        // On error, dropping `delay` stops the thread (and deletes no rule).
        delay.iptables("-I")?;
        delay.rule_in = true;
        Ok(delay)
    }

    /// Packets held so far, and packets released after one that arrived later than them.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.held.load(Ordering::Relaxed),
            self.stats.reordered.load(Ordering::Relaxed),
        )
    }

    /// Runs `ip netns exec NETNS iptables -w -t mangle <op> <rule>`.
    fn iptables(&self, op: &str) -> io::Result<()> {
        let iptables = self.iptables.display().to_string();
        let mut args = vec![
            "netns",
            "exec",
            &self.netns,
            &iptables,
            "-w",
            "-t",
            "mangle",
            op,
        ];
        args.extend(self.rule.iter().map(String::as_str));
        let line = format!("ip {}", args.join(" "));
        let out = Command::new(&self.ip)
            .args(&args)
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("netem: running `{line}`: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "netem: `{line}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

impl Drop for PacketDelay {
    fn drop(&mut self) {
        // First no new packet is queued, then the thread accepts everything it holds. Should
        // the delete fail (the namespace is gone, say), the rule's --queue-bypass lets
        // packets pass once the thread's socket is closed.
        if self.rule_in {
            self.rule_in = false;
            let _ = self.iptables("-D");
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn netns_path(netns: &str) -> io::Result<PathBuf> {
    if netns.is_empty() || netns.contains('/') || netns == "." || netns == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("netem: `{netns}` is not a network namespace name"),
        ));
    }
    let path = Path::new("/var/run/netns").join(netns);
    if !path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "netem: network namespace `{netns}` not found ({} does not exist; create it with `ip netns add {netns}`)",
                path.display()
            ),
        ));
    }
    Ok(path)
}

/// `name` in `PATH`, else in the sbin folders root's `PATH` usually has.
fn find_program(name: &str, package: &str) -> io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("netem: `{name}` not found in PATH or /usr/sbin, /sbin (install {package})"),
    ))
}

/// Moves the calling thread into namespace `netns`, then binds queue `queue_num` there.
fn open_queue(ns_path: &Path, netns: &str, queue_num: u16) -> io::Result<Queue> {
    let ns = File::open(ns_path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("netem: opening {}: {e}", ns_path.display()),
        )
    })?;
    // Only this thread changes namespace; the socket it opens next belongs to `netns`.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("netem: entering network namespace `{netns}` (setns needs root): {e}"),
        ));
    }
    drop(ns);
    let context = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| {
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) => " (needs root)",
                Some(libc::EBUSY) => " (another program or PacketDelay is bound to it in this namespace: use another queue number)",
                Some(libc::EPROTONOSUPPORT) | Some(libc::ENOENT) => {
                    " (kernel without CONFIG_NETFILTER_NETLINK_QUEUE?)"
                }
                _ => "",
            };
            io::Error::new(
                e.kind(),
                format!("netem: {what} NFQUEUE {queue_num} in namespace `{netns}`: {e}{hint}"),
            )
        }
    };
    let mut queue = Queue::open().map_err(context("opening a netlink socket for"))?;
    queue.bind(queue_num).map_err(context("binding"))?;
    // Only the packet ids are needed: copy metadata, no payload.
    queue
        .set_copy_range(queue_num, 0)
        .map_err(context("setting the copy range of"))?;
    queue
        .set_queue_max_len(queue_num, QUEUE_MAX_LEN)
        .map_err(context("setting the length of"))?;
    queue
        .set_fail_open(queue_num, true)
        .map_err(context("making fail-open"))?;
    queue.set_nonblocking(true);
    Ok(queue)
}

/// A packet waiting for its verdict.
struct Held {
    due: Instant,
    /// Arrival order.
    seq: u64,
    msg: Message,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    /// Reversed, so that `BinaryHeap` pops the earliest due (then earliest arrived) first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

struct Holder {
    queue: Queue,
    spec: DelaySpec,
    rng: SplitMix64,
    heap: BinaryHeap<Held>,
    next_seq: u64,
    /// Highest arrival number released so far.
    max_released: Option<u64>,
    stats: Arc<Stats>,
}

impl Holder {
    fn new(queue: Queue, spec: DelaySpec, stats: Arc<Stats>) -> Holder {
        Holder {
            queue,
            spec,
            rng: SplitMix64(spec.seed),
            heap: BinaryHeap::new(),
            next_seq: 0,
            max_released: None,
            stats,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            self.receive(false);
            let now = Instant::now();
            while self.heap.peek().is_some_and(|h| h.due <= now) {
                self.release_next();
            }
            let wait = match self.heap.peek() {
                Some(h) => h.due.saturating_duration_since(Instant::now()).min(POLL),
                None => POLL,
            };
            if !wait.is_zero() {
                thread::sleep(wait);
            }
        }
        // The rule is gone: let everything go now, and whatever was still on its way in.
        while !self.heap.is_empty() {
            self.release_next();
        }
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < DRAIN_QUIET {
            if self.receive(true) > 0 {
                quiet_since = Instant::now();
            } else {
                thread::sleep(POLL);
            }
        }
    }

    /// Takes every packet the kernel has queued; holds them, or accepts them at once if
    /// `accept_now`. Returns how many it took.
    fn receive(&mut self, accept_now: bool) -> usize {
        let mut taken = 0;
        loop {
            match self.queue.recv() {
                Ok(msg) => {
                    taken += 1;
                    self.stats.held.fetch_add(1, Ordering::Relaxed);
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let held = Held {
                        due: Instant::now() + hold_time(&self.spec, &mut self.rng),
                        seq,
                        msg,
                    };
                    if accept_now {
                        self.release(held);
                    } else {
                        self.heap.push(held);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: nothing more for now. Anything else is a netlink error report
                // (e.g. about an earlier verdict): nothing to do but go on.
                Err(_) => return taken,
            }
        }
    }

    fn release_next(&mut self) {
        if let Some(held) = self.heap.pop() {
            self.release(held);
        }
    }

    fn release(&mut self, mut held: Held) {
        match self.max_released {
            Some(max) if held.seq < max => {
                self.stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.max_released = Some(held.seq),
        }
        held.msg.set_verdict(Verdict::Accept);
        // A failed verdict leaves the packet with the kernel until the socket closes, which
        // then drops it; there is nothing better to do here.
        let _ = self.queue.verdict(held.msg);
    }
}

/// `delay` plus a uniform offset in `[-jitter, +jitter]`, at least zero.
fn hold_time(spec: &DelaySpec, rng: &mut SplitMix64) -> Duration {
    if spec.jitter.is_zero() {
        return spec.delay;
    }
    let j = spec.jitter.as_nanos().min(u64::MAX as u128 / 4) as u64;
    let offset = rng.next() % (2 * j + 1);
    let nanos = spec.delay.as_nanos() as i128 + offset as i128 - j as i128;
    Duration::from_nanos(nanos.clamp(0, u64::MAX as i128) as u64)
}

/// A small seeded pseudo-random generator (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let spec = DelaySpec {
            delay: Duration::from_millis(1),
            jitter: Duration::ZERO,
            seed: 0,
        };
        let err = PacketDelay::start("replikv-no-such-netns", 1, &[], spec).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("replikv-no-such-netns"), "{err}");
        let err = PacketDelay::start("../etc", 1, &[], spec).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn jitter_stays_within_bounds_and_is_seeded() {
        let spec = DelaySpec {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(20),
            seed: 7,
        };
        let draw = |seed| {
            let mut rng = SplitMix64(seed);
            (0..1000)
                .map(|_| hold_time(&spec, &mut rng).as_nanos())
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        assert!(a.iter().all(|&n| (0..=40_000_000).contains(&n)));
        assert!(a.iter().any(|&n| n < 5_000_000) && a.iter().any(|&n| n > 35_000_000));
    }
}
