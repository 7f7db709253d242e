//! Dev-only helpers for replikv's tests: a cluster of real `replikv server` processes on
//! loopback, faults applied to them (kill -9, SIGSTOP/SIGCONT, cut peer links, restart
//! from disk), and waits on conditions.
//!
//! Ports: each node's three listeners get ports the kernel picked for a socket bound to port
//! 0, released just before the node starts (a peer must know every address up front, as
//! with etcd's `--initial-cluster`).
//!
//! Every wait polls a condition with a deadline; nothing sleeps for a fixed time to let
//! something happen.

pub mod netem;

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod netns;
pub use netns::{Netns, Rule};

/// Options of a test cluster; YAML-level settings every node gets.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u64,
    pub partitions: u32,
    /// Replicas per partition (capped at the cluster size by the server).
    pub factor: usize,
    pub fsync: &'static str,
    pub consistency: &'static str,
    pub snapshot_every_entries: u64,
    pub backlog_entries: u64,
    pub write_timeout_ms: u64,
    pub max_lag_ms: u64,
    pub rebalance_leaders: bool,
    /// `replication.lease_reads`: primary reads under a leader lease.
    pub lease_reads: bool,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// `limits.maxclients`; `None`: the server's default.
    pub maxclients: Option<u64>,
    /// `limits.max_http_connections`; `None`: the server's default.
    pub max_http_connections: Option<u64>,
    /// Node id → the RLIMIT_NOFILE (soft and hard) that node's process starts with, so a
    /// test can run a node short of file descriptors. Nodes not listed inherit the test's.
    pub nofile: BTreeMap<u64, u64>,
    /// `resp.redirect`: answer -MOVED instead of forwarding.
    pub redirect: bool,
    /// `debug.skip_read_index`: the injected stale-read bug.
    pub skip_read_index: bool,
    /// `debug.ack_before_commit`: the injected early-acknowledgement bug.
    pub ack_before_commit: bool,
    /// `debug.stamp_with_wall_clock`: the injected wall-clock stamps bug.
    pub stamp_with_wall_clock: bool,
    /// Each node in its own network namespace, so [`Cluster::cut`], [`Cluster::partition`]
    /// and [`Cluster::apply`] drop real packets (needs root). Otherwise every node is on
    /// loopback and `cut` goes through the transport's test-only fault seam.
    pub namespaces: bool,
    /// Node id → the rate of that node's clocks (monotonic and wall), through libfaketime
    /// (Debian's `faketime`): 0.95 runs 5% slow. Nodes not listed keep the real clock.
    pub clock_rates: BTreeMap<u64, f64>,
    /// Node id → the size in bytes of a tmpfs mounted on that node's data directory before
    /// it first starts (needs root), so that its disk can fill ([`Cluster::resize_tmpfs`]).
    pub tmpfs: BTreeMap<u64, u64>,
    /// `storage.min_free_bytes`, when set.
    pub min_free_bytes: Option<u64>,
    /// `replication.max_clock_offset_ms`. Clock rates move wall clocks apart (5% is 50 ms a
    /// second): tests of rates that run longer than a few seconds raise it.
    pub max_clock_offset_ms: u64,
    /// Node id → the offset (ms) of that node's wall clock from the real one, through
    /// libfaketime with a timestamp file, so that [`Cluster::set_clock_offset`] can move it
    /// (a jump) while the node runs. The monotonic clock is left alone, as a wall-clock jump
    /// leaves it on a real machine. Not with a clock rate on the same node.
    pub clock_offsets: BTreeMap<u64, i64>,
    /// Node id → a `.tar.gz` of a data directory, unpacked into that node's data directory
    /// before its first start: a fixture written by an older build, for upgrade tests.
    pub seed_data: BTreeMap<u64, PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            partitions: 4,
            factor: 3,
            fsync: "always",
            consistency: "quorum",
            snapshot_every_entries: 20_000,
            backlog_entries: 10_000,
            write_timeout_ms: 5_000,
            max_lag_ms: 10_000,
            rebalance_leaders: true,
            lease_reads: true,
            max_key_bytes: 64 * 1024,
            max_value_bytes: 16 << 20,
            maxclients: None,
            max_http_connections: None,
            nofile: BTreeMap::new(),
            redirect: false,
            skip_read_index: false,
            ack_before_commit: false,
            stamp_with_wall_clock: false,
            namespaces: false,
            clock_rates: BTreeMap::new(),
            tmpfs: BTreeMap::new(),
            min_free_bytes: None,
            max_clock_offset_ms: 500,
            clock_offsets: BTreeMap::new(),
            seed_data: BTreeMap::new(),
        }
    }
}

pub struct Node {
    pub id: u64,
    pub resp: SocketAddr,
    pub http: SocketAddr,
    pub peer: SocketAddr,
    pub data_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// See [`Options::clock_rates`]; takes effect at the next start.
    pub clock_rate: Option<f64>,
    /// See [`Options::nofile`].
    pub nofile: Option<u64>,
    /// The libfaketime timestamp file of a node started with a clock offset
    /// ([`Options::clock_offsets`]), and the offset it holds (ms).
    clock_file: Option<(PathBuf, i64)>,
    /// Started with `--data-dir` alone (no configuration file): see
    /// [`Cluster::restart_with_only_data_dir`].
    bare: bool,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.resp)
    }

    /// File descriptors the node's process has open now (`/proc/PID/fd`).
    pub fn open_fds(&self) -> Option<usize> {
        let pid = self.pid()?;
        fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count())
    }

    /// The node's log so far (stderr), for failure messages.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

pub struct Cluster {
    bin: PathBuf,
    pub opts: Options,
    _dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Node>,
    /// The namespaces, when `opts.namespaces`; dropped after the nodes are killed.
    net: Option<Netns>,
}

/// A free port below Linux's ephemeral range (32768 and up): ports the kernel hands out for
/// outgoing connections, which nodes open all the time, cannot take it before the node binds.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let spread = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(spread);
        let port = 20_000 + (n % 12_000) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().expect("local addr");
        }
    }
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn mount_tmpfs(dir: &Path, bytes: u64) -> std::io::Result<()> {
    run_mount(&[
        "-t",
        "tmpfs",
        "-o",
        &format!("size={bytes}"),
        "tmpfs",
        &dir.display().to_string(),
    ])
}

fn run_mount(args: &[&str]) -> std::io::Result<()> {
    run_mount_cmd("mount", args)
}

fn run_mount_cmd(cmd: &str, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// libfaketime's multi-threaded build, from Debian's `faketime` package.
fn faketime_library() -> PathBuf {
    let found = fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("clock rates need libfaketime: apt-get install faketime (libfaketimeMT.so.1)")
    })
}

/// Writes a libfaketime offset (`+3600.000`: seconds, relative to the real clock), whole at
/// once (a rename), so a node reading it never sees half a line.
fn write_offset(file: &Path, offset_ms: i64) {
    let tmp = file.with_extension("tmp");
    let sign = if offset_ms < 0 { '-' } else { '+' };
    let abs = offset_ms.unsigned_abs();
    fs::write(&tmp, format!("{sign}{}.{:03}\n", abs / 1000, abs % 1000)).expect("faketime file");
    fs::rename(&tmp, file).expect("faketime file");
}

/// Unpacks the `.tar.gz` `archive` into `into` (with `tar`, as a packer would).
fn unpack(archive: &Path, into: &Path) -> std::io::Result<()> {
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "tar -xzf {} failed: {status}",
            archive.display()
        )));
    }
    Ok(())
}

impl Cluster {
    /// Starts `opts.nodes` nodes and waits until every partition has a leader.
    pub fn start(bin: &Path, opts: Options) -> Cluster {
        Self::try_start(bin, opts).unwrap_or_else(|e| panic!("starting the cluster: {e}"))
    }

    /// As [`Cluster::start`], with an error instead of a panic when the namespaces cannot
    /// be built (for the chaos campaign, which reports it).
    pub fn try_start(bin: &Path, opts: Options) -> std::io::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let ids: Vec<u64> = (1..=opts.nodes).collect();
        let net = if opts.namespaces {
            Some(Netns::create(&ids)?)
        } else {
            None
        };
        // In a namespace each node has an address of its own, so fixed ports cannot clash.
        let addr = |id: u64, port: u16| match &net {
            Some(n) => SocketAddr::new(n.node_ip(id).into(), port),
            None => free_port(),
        };
        let mut nodes = BTreeMap::new();
        for id in ids {
            let data_dir = dir.path().join(format!("node{id}"));
            fs::create_dir_all(&data_dir)?;
            if let Some(bytes) = opts.tmpfs.get(&id) {
                mount_tmpfs(&data_dir, *bytes)?;
            }
            if let Some(archive) = opts.seed_data.get(&id) {
                unpack(archive, &data_dir)?;
            }
            nodes.insert(
                id,
                Node {
                    id,
                    resp: addr(id, netns::RESP_PORT),
                    http: addr(id, netns::HTTP_PORT),
                    peer: addr(id, netns::PEER_PORT),
                    config: dir.path().join(format!("node{id}.yaml")),
                    log: dir.path().join(format!("node{id}.log")),
                    data_dir,
                    child: None,
                    clock_rate: opts.clock_rates.get(&id).copied(),
                    bare: false,
                    nofile: opts.nofile.get(&id).copied(),
                    clock_file: opts
                        .clock_offsets
                        .get(&id)
                        .map(|ms| (dir.path().join(format!("node{id}.faketime")), *ms)),
                },
            );
        }
        let peers: String = nodes
            .values()
            .map(|n| format!("{}: {}", n.id, n.peer))
            .collect::<Vec<_>>()
            .join(", ");
        let mut connection_limits = String::new();
        if let Some(m) = opts.maxclients {
            connection_limits.push_str(&format!(", maxclients: {m}"));
        }
        if let Some(m) = opts.max_http_connections {
            connection_limits.push_str(&format!(", max_http_connections: {m}"));
        }
        for n in nodes.values() {
            let yaml = format!(
                "node_id: {id}\ndata_dir: {dir}\nlisten: {{ resp: {resp}, http: {http}, peer: {peer} }}\npeers: {{ {peers} }}\n\
                 replication: {{ partitions: {parts}, factor: {factor}, consistency: {cons}, snapshot_every_entries: {snap}, backlog_entries: {backlog},\n\
                 \x20 write_timeout_ms: {wt}, max_lag_ms: {lag}, rebalance_leaders: {rebal}, lease_reads: {lease},\n\
                 \x20 max_clock_offset_ms: {max_offset} }}\n\
                 storage: {{ fsync: {fsync}{min_free} }}\nlimits: {{ max_key_bytes: {maxk}, max_value_bytes: {maxv}{connection_limits} }}\n\
                 resp: {{ redirect: {redirect} }}\n\
                 debug: {{ fault_injection: true, skip_read_index: {skip}, ack_before_commit: {early},\n\
                 \x20 stamp_with_wall_clock: {wall} }}\n",
                id = n.id,
                lease = opts.lease_reads,
                max_offset = opts.max_clock_offset_ms,
                dir = n.data_dir.display(),
                resp = n.resp,
                http = n.http,
                peer = n.peer,
                parts = opts.partitions,
                factor = opts.factor,
                cons = opts.consistency,
                snap = opts.snapshot_every_entries,
                backlog = opts.backlog_entries,
                wt = opts.write_timeout_ms,
                lag = opts.max_lag_ms,
                rebal = opts.rebalance_leaders,
                fsync = opts.fsync,
                min_free = opts
                    .min_free_bytes
                    .map(|b| format!(", min_free_bytes: {b}"))
                    .unwrap_or_default(),
                maxk = opts.max_key_bytes,
                maxv = opts.max_value_bytes,
                redirect = opts.redirect,
                skip = opts.skip_read_index,
                early = opts.ack_before_commit,
                wall = opts.stamp_with_wall_clock,
            );
            fs::write(&n.config, yaml)?;
        }
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            opts,
            _dir: dir,
            nodes,
            net,
        };
        let ids: Vec<u64> = c.nodes.keys().copied().collect();
        for id in &ids {
            c.spawn(*id);
        }
        c.wait_ready(Duration::from_secs(30));
        Ok(c)
    }

    fn spawn(&mut self, id: u64) {
        if let Err(why) = self.try_spawn(id) {
            panic!("{why}");
        }
    }

    /// Starts node `id`; an error, with its log's last lines, if the process exits first.
    fn try_spawn(&mut self, id: u64) -> Result<(), String> {
        let bin = self.bin.clone();
        let n = self.nodes.get_mut(&id).expect("known node");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log file");
        let mut cmd = match &self.net {
            Some(net) => net.command(id, &bin),
            None => Command::new(bin),
        };
        cmd.arg("server");
        if n.bare {
            cmd.arg("--data-dir").arg(&n.data_dir);
        } else {
            cmd.arg("--config").arg(&n.config);
        }
        cmd.env(
            "REPLIKV_LOG",
            std::env::var("REPLIKV_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
        if let Some((file, offset)) = &n.clock_file {
            assert!(
                n.clock_rate.is_none(),
                "node {id}: a clock offset and a clock rate together are not supported"
            );
            write_offset(file, *offset);
            // The file is read at every wall-clock read, so a new offset is a jump at once;
            // the monotonic clock stays real (libfaketime 0.9.10 would also misread
            // monotonic sleep deadlines with an offset, which tokio does not use).
            cmd.env("LD_PRELOAD", faketime_library())
                .env("FAKETIME_TIMESTAMP_FILE", file)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        if let Some(rate) = n.clock_rate {
            // "+0 xR": no offset, time passes at R times the real rate, sleeps included.
            cmd.env("LD_PRELOAD", faketime_library())
                .env("FAKETIME", format!("+0 x{rate}"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "0");
        }
        let nofile = n.nofile;
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(limit) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        n.child = Some(cmd.spawn().expect("starting replikv server"));
        let http = n.http;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ureq::get(&format!("http://{http}/health"))
                .timeout(Duration::from_millis(500))
                .call()
                .is_ok()
            {
                return Ok(());
            }
            let exited = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                if exited.is_some() {
                    n.child = None;
                }
                return Err(format!(
                    "node {id} did not come up ({exited:?}); its log:\n{}",
                    n.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    pub fn live(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.is_running())
            .map(|n| n.id)
            .collect()
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).expect("known node");
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Moves node `id`'s wall clock to `offset_ms` from the real one, at once, while it runs
    /// (a jump); the node must have been started with an offset ([`Options::clock_offsets`]).
    pub fn set_clock_offset(&mut self, id: u64, offset_ms: i64) {
        let n = self.nodes.get_mut(&id).expect("known node");
        let (file, offset) = n
            .clock_file
            .as_mut()
            .unwrap_or_else(|| panic!("node {id} was not started with a clock offset"));
        *offset = offset_ms;
        write_offset(file, offset_ms);
    }

    /// Sets the clock rate node `id` gets from its next start (see [`Options::clock_rates`]).
    pub fn set_clock_rate(&mut self, id: u64, rate: Option<f64>) {
        self.nodes.get_mut(&id).expect("known node").clock_rate = rate;
    }

    /// Starts a killed node again from its data directory.
    pub fn restart(&mut self, id: u64) {
        assert!(!self.nodes[&id].is_running(), "node {id} is still running");
        self.spawn(id);
    }

    /// Starts a killed node again with nothing but `--data-dir`: no configuration file, so
    /// its identity, addresses and peers come from its data directory (`node.json`) and its
    /// other settings are the defaults.
    pub fn restart_with_only_data_dir(&mut self, id: u64) {
        assert!(!self.nodes[&id].is_running(), "node {id} is still running");
        self.nodes.get_mut(&id).expect("known node").bare = true;
        self.spawn(id);
    }

    /// Starts a killed node again; `Err` with its log's last lines when it refuses to start.
    pub fn try_restart(&mut self, id: u64) -> Result<(), String> {
        assert!(!self.nodes[&id].is_running(), "node {id} is still running");
        self.try_spawn(id)
    }

    /// The newest segment of stopped node `id`'s Raft log, and how far its records go (the
    /// zeros a segment grows by are not counted).
    pub fn newest_log_segment(&self, id: u64) -> (PathBuf, usize) {
        assert!(!self.nodes[&id].is_running(), "node {id} is running");
        let dir = self.nodes[&id].data_dir.join("log");
        let newest = fs::read_dir(&dir)
            .expect("log directory")
            .map(|e| e.expect("log entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .max()
            .expect("a log segment");
        let bytes = fs::read(&newest).expect("segment");
        let written = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        (newest, written)
    }

    /// Sets the size of the tmpfs under node `id`'s data directory (see [`Options::tmpfs`]),
    /// running or not: smaller fills its disk, larger gives room back.
    pub fn resize_tmpfs(&self, id: u64, bytes: u64) -> std::io::Result<()> {
        let dir = &self.nodes[&id].data_dir;
        run_mount(&[
            "-o",
            &format!("remount,size={bytes}"),
            &dir.display().to_string(),
        ])
    }

    /// Bytes in use on the tmpfs under node `id`'s data directory.
    pub fn tmpfs_used(&self, id: u64) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.nodes[&id].data_dir.as_os_str().as_bytes())
            .expect("path without NUL");
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid path and a writable statvfs.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs of node {id}'s data directory");
        (st.f_blocks - st.f_bfree) as u64 * st.f_frsize as u64
    }

    /// Damages stopped node `id`'s newest log segment as bit rot would: inverts `len` bytes
    /// at `fraction` of its written length. Returns the file and the offset damaged.
    pub fn damage_log(&self, id: u64, fraction: f64, len: usize) -> (PathBuf, usize) {
        let (path, written) = self.newest_log_segment(id);
        let mut bytes = fs::read(&path).expect("segment");
        let at = ((written as f64 * fraction) as usize).min(written.saturating_sub(len));
        for b in &mut bytes[at..at + len] {
            *b = !*b;
        }
        fs::write(&path, &bytes).expect("writing the damaged segment");
        (path, at)
    }

    fn signal(&self, id: u64, sig: i32) {
        let pid = self.nodes[&id].pid().expect("node is running");
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(rc, 0, "signal {sig} to node {id}");
    }

    /// SIGSTOP: the process freezes with its sockets open.
    pub fn pause(&self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }

    pub fn resume(&self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }

    pub fn redis(&self, id: u64) -> redis::Connection {
        let client = redis::Client::open(self.nodes[&id].redis_url()).expect("redis url");
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to node {id}: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("read timeout");
        conn
    }

    /// A RESP connection to node `id` whose reads use preference `read` (`REPLIKV.READ`).
    pub fn redis_reading(&self, id: u64, read: &str) -> redis::Connection {
        let mut conn = self.redis(id);
        let _: () = redis::cmd("REPLIKV.READ")
            .arg(read)
            .query(&mut conn)
            .unwrap_or_else(|e| panic!("REPLIKV.READ {read} on node {id}: {e}"));
        conn
    }

    pub fn http_get(&self, id: u64, path: &str) -> Result<Value, String> {
        let url = format!("http://{}{path}", self.nodes[&id].http);
        match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
            Ok(r) => r.into_json().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn http_post(&self, id: u64, path: &str, body: Value) -> Result<Value, String> {
        let url = format!("http://{}{path}", self.nodes[&id].http);
        match ureq::post(&url)
            .timeout(Duration::from_secs(30))
            .send_json(body)
        {
            Ok(r) => r.into_json().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// GETs a text resource (e.g. `/metrics`).
    pub fn http_text(&self, id: u64, path: &str) -> Result<String, String> {
        let url = format!("http://{}{path}", self.nodes[&id].http);
        match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
            Ok(r) => r.into_string().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends `body` with `method` and `content_type`; returns the HTTP status.
    pub fn http_status(
        &self,
        id: u64,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> u16 {
        let url = format!("http://{}{path}", self.nodes[&id].http);
        let req = ureq::request(method, &url)
            .timeout(Duration::from_secs(30))
            .set("content-type", content_type);
        match req.send_bytes(body) {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// The sum of a Prometheus metric's samples on node `id`.
    /// `/ready` of node `id`: `Ok` on 200, else the answer's body (it gives the reason).
    pub fn readiness(&self, id: u64) -> Result<(), String> {
        let url = format!("http://{}/ready", self.nodes[&id].http);
        match ureq::get(&url).timeout(Duration::from_secs(5)).call() {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => panic!("/ready of node {id}: {e}"),
        }
    }

    pub fn metric(&self, id: u64, name: &str) -> f64 {
        let text = self
            .http_text(id, "/metrics")
            .unwrap_or_else(|e| panic!("metrics of node {id}: {e}"));
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// PUTs raw bytes (a value) and returns the JSON answer.
    pub fn http_put(&self, id: u64, path: &str, body: &str) -> Result<Value, String> {
        let url = format!("http://{}{path}", self.nodes[&id].http);
        match ureq::put(&url)
            .timeout(Duration::from_secs(30))
            .send_string(body)
        {
            Ok(r) => r.into_json().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits until every running node reports a leader for each of its partitions, and its
    /// wall clock in step with a majority's (so that it serves `secondary` reads), except a
    /// node whose clock a test set off.
    pub fn wait_ready(&self, timeout: Duration) {
        for id in self.live() {
            let http = self.nodes[&id].http;
            wait_until(timeout, &format!("node {id} ready"), || {
                ureq::get(&format!("http://{http}/ready"))
                    .timeout(Duration::from_secs(1))
                    .call()
                    .is_ok()
            });
            if self.nodes[&id]
                .clock_file
                .as_ref()
                .is_some_and(|(_, o)| *o != 0)
            {
                continue; // a clock set off on purpose: it may never be in step
            }
            wait_until(timeout, &format!("node {id}'s clock in step"), || {
                self.clock_in_step(id)
            });
        }
    }

    /// Whether node `id` reports its wall clock in step with a majority of the cluster's.
    pub fn clock_in_step(&self, id: u64) -> bool {
        self.http_get(id, "/v1/_replication/state")
            .ok()
            .and_then(|s| s["clock"]["in_step"].as_bool())
            .unwrap_or(false)
    }

    /// The leader of `partition` as node `asking` sees it.
    pub fn leader_seen_by(&self, asking: u64, partition: u64) -> Option<u64> {
        let state = self.http_get(asking, "/v1/_replication/state").ok()?;
        state["partitions"]
            .as_array()?
            .iter()
            .find(|p| p["partition"].as_u64() == Some(partition))
            .and_then(|p| p["leader"].as_u64())
    }

    /// Partitions node `id` is recovering from a damaged log: `recovering_to` is set in its
    /// `/v1/_replication/state`.
    pub fn recovering(&self, id: u64) -> Result<Vec<u64>, String> {
        let state = self.http_get(id, "/v1/_replication/state")?;
        Ok(state["partitions"]
            .as_array()
            .ok_or("no partitions in the replication state")?
            .iter()
            .filter(|p| !p["recovering_to"].is_null())
            .filter_map(|p| p["partition"].as_u64())
            .collect())
    }

    /// Partitions node `id` leads right now.
    pub fn led_by(&self, id: u64) -> Vec<u64> {
        let Ok(state) = self.http_get(id, "/v1/_replication/state") else {
            return Vec::new();
        };
        state["partitions"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["role"] == "leader")
                    .filter_map(|p| p["partition"].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until a live node other than `not` leads `partition`, as every live node agrees.
    pub fn wait_new_leader(&self, partition: u64, not: u64, timeout: Duration) -> u64 {
        let live = self.live();
        let candidates: Vec<u64> = live.iter().copied().filter(|n| *n != not).collect();
        self.wait_agreed_leader(partition, &live, &candidates, timeout)
    }

    /// Waits until one of `among` leads `partition`, as every node in `among` agrees.
    pub fn wait_new_leader_among(&self, partition: u64, among: &[u64], timeout: Duration) -> u64 {
        self.wait_agreed_leader(partition, among, among, timeout)
    }

    /// Waits until every node of `asked` reports the same leader of `partition`, one of
    /// `candidates`.
    fn wait_agreed_leader(
        &self,
        partition: u64,
        asked: &[u64],
        candidates: &[u64],
        timeout: Duration,
    ) -> u64 {
        let mut found = 0;
        wait_until(
            timeout,
            &format!("a leader of partition {partition} among {candidates:?}"),
            || {
                let seen: Vec<Option<u64>> = asked
                    .iter()
                    .map(|id| self.leader_seen_by(*id, partition))
                    .collect();
                match seen.first().copied().flatten() {
                    Some(l) if candidates.contains(&l) && seen.iter().all(|s| *s == Some(l)) => {
                        found = l;
                        true
                    }
                    _ => false,
                }
            },
        );
        found
    }

    /// The namespaces of a cluster started with `namespaces: true`.
    pub fn net(&self) -> Option<&Netns> {
        self.net.as_ref()
    }

    fn net_or_panic(&self) -> &Netns {
        self.net
            .as_ref()
            .expect("real network faults need a cluster started with `namespaces: true`")
    }

    /// Cuts the links between `id` and every node in `others`, both directions: with
    /// namespaces, by dropping their packets; otherwise through the transport's fault seam.
    pub fn cut(&self, id: u64, others: &[u64]) {
        if let Some(net) = &self.net {
            for o in others {
                net.apply(&Rule::Cut(id, *o)).expect("cutting links");
            }
            return;
        }
        self.http_post(id, "/debug/faults", serde_json::json!({"blocked": others}))
            .expect("cutting links");
        for o in others {
            let mut blocked: Vec<u64> = self
                .http_get(*o, "/debug/faults")
                .ok()
                .and_then(|v| {
                    v["blocked"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).collect())
                })
                .unwrap_or_default();
            blocked.push(id);
            self.http_post(*o, "/debug/faults", serde_json::json!({"blocked": blocked}))
                .expect("cutting links");
        }
    }

    /// Splits the nodes into groups that cannot reach each other (namespaces only).
    pub fn partition(&self, groups: &[Vec<u64>]) -> std::io::Result<()> {
        self.net_or_panic().partition(groups)
    }

    /// Adds one packet-dropping rule (namespaces only).
    pub fn apply(&self, rule: &Rule) -> std::io::Result<()> {
        self.net_or_panic().apply(rule)
    }

    /// Restores every link.
    pub fn heal(&self) {
        if let Some(net) = &self.net {
            net.heal().expect("healing links");
            return;
        }
        for id in self.live() {
            self.http_post(id, "/debug/faults", serde_json::json!({"blocked": []}))
                .expect("healing links");
        }
    }

    /// Per partition: (keys, crc32c, applied offset) of node `id`'s replica.
    pub fn digests(&self, id: u64) -> BTreeMap<u64, (u64, u64, u64)> {
        let v = self
            .http_get(id, "/v1/_replication/digest")
            .unwrap_or_else(|e| panic!("digest of node {id}: {e}"));
        v["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .map(|p| {
                (
                    p["partition"].as_u64().expect("partition"),
                    (
                        p["keys"].as_u64().expect("keys"),
                        p["crc32c"].as_u64().expect("crc"),
                        p["applied_offset"].as_u64().expect("applied"),
                    ),
                )
            })
            .collect()
    }

    /// Waits until every live replica of every partition holds identical contents (nodes
    /// host different partitions when there are more nodes than the replication factor).
    pub fn wait_converged(&self, timeout: Duration) {
        wait_until(timeout, "replicas converge to identical contents", || {
            self.divergent_partitions().is_empty()
        });
    }

    /// Waits until every live node's replica of the meta group (the topology, issue 17) holds
    /// the same contents.
    pub fn wait_meta_converged(&self, timeout: Duration) {
        wait_until(timeout, "the meta group's replicas converge", || {
            let digests: Vec<Option<(Value, Value)>> = self
                .live()
                .iter()
                .map(|id| {
                    let v = self.http_get(*id, "/v1/_replication/digest").ok()?;
                    let m = &v["meta"];
                    m.is_object()
                        .then(|| (m["keys"].clone(), m["crc32c"].clone()))
                })
                .collect();
            digests.iter().all(|d| d.is_some() && *d == digests[0])
        });
    }

    /// Partitions whose live replicas disagree now: partition → (node, keys, crc32c) of each.
    pub fn divergent_partitions(&self) -> BTreeMap<u64, Vec<(u64, u64, u64)>> {
        let mut by_partition: BTreeMap<u64, Vec<(u64, u64, u64)>> = BTreeMap::new();
        for id in self.live() {
            for (p, (keys, crc, _)) in self.digests(id) {
                by_partition.entry(p).or_default().push((id, keys, crc));
            }
        }
        by_partition.retain(|_, replicas| {
            replicas
                .windows(2)
                .any(|w| (w[0].1, w[0].2) != (w[1].1, w[1].2))
        });
        by_partition
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in self.nodes.values() {
                eprintln!("---- node {} log (last lines) ----\n{}", n.id, n.log_tail());
            }
            if std::env::var_os("REPLIKV_TEST_KEEP").is_some() {
                let kept =
                    std::mem::replace(&mut self._dir, tempfile::tempdir().expect("temp dir"))
                        .keep();
                eprintln!("test cluster files kept in {}", kept.display());
            }
        }
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for id in self.opts.tmpfs.keys() {
            if let Some(n) = self.nodes.get(id) {
                let _ = run_mount_cmd("umount", &[&n.data_dir.display().to_string()]);
            }
        }
    }
}
