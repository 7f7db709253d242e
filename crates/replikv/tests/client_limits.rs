//! Clients never starve peers of file descriptors (issue 16: 19,990 idle clients took every
//! descriptor of a node; its RESP and HTTP stopped answering and a restarted peer could not
//! reach it). Each test runs a real 3-node cluster in which node 1 starts with a low
//! RLIMIT_NOFILE, and floods it with more connections than it has descriptors: clients beyond
//! `maxclients` are told Redis's `-ERR max number of clients reached`, HTTP connections beyond
//! `limits.max_http_connections` a `503`, and the peers keep the reserve: writes to the
//! partitions node 1 leads go on, and a restarted peer reconnects.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

/// Node 1's RLIMIT_NOFILE (soft and hard): the reserve (about 120 descriptors for two peers,
/// the storage, listeners and runtime) leaves about 100 to clients and 30 to HTTP.
const NOFILE: u64 = 256;

/// A cluster whose node 1 is short of descriptors.
fn short_cluster() -> Cluster {
    Cluster::start(
        bin(),
        Options {
            nofile: [(1, NOFILE)].into_iter().collect(),
            ..Options::default()
        },
    )
}

/// The limit node `id` applies, as `CONFIG GET maxclients` reports it.
fn maxclients(conn: &mut redis::Connection) -> usize {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxclients")
        .query(conn)
        .unwrap();
    assert_eq!(pair[0], "maxclients", "{pair:?}");
    pair[1].parse().unwrap()
}

/// One field of `INFO section`.
fn info_field(conn: &mut redis::Connection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}: {info}"))
        .trim()
        .parse()
        .unwrap()
}

/// A new client of node `id` through the `redis` crate: its handshake, or the error it got.
fn try_client(c: &Cluster, id: u64) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(c.node(id).redis_url()).unwrap();
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    redis::cmd("PING").query::<String>(&mut conn)?;
    Ok(conn)
}

/// What a client beyond the cap is told, as the `redis` crate's parser reads the bytes the
/// node sends an idle connection before closing it (the crate's own clients cannot show it:
/// their handshake takes it for the answer to an ignored `CLIENT SETINFO`, then reports the
/// end of the stream, against Redis 7.0 with `--maxclients 2` exactly as here).
fn refusal(addr: std::net::SocketAddr) -> String {
    use std::io::Read;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes)
        .expect("the node closes a refused connection");
    match redis::parse_redis_value(&bytes) {
        Ok(redis::Value::ServerError(e)) => format!("{} {}", e.code(), e.details().unwrap_or("")),
        other => panic!("a refused client read {other:?} ({bytes:?})"),
    }
}

/// Fills node 1's client table: returns its connections (the first one included).
fn fill_clients(c: &Cluster) -> (usize, Vec<redis::Connection>) {
    let mut first = c.redis(1);
    let max = maxclients(&mut first);
    let mut held = vec![first];
    while held.len() < max {
        let n = held.len() + 1;
        held.push(try_client(c, 1).unwrap_or_else(|e| panic!("client {n} of {max} refused: {e}")));
    }
    assert_eq!(
        info_field(&mut held[0], "clients", "connected_clients"),
        max as u64
    );
    (max, held)
}

/// Keys of the partitions node 1 leads, waiting until it leads one (leadership settles on
/// the preferred leaders after start-up).
fn keys_led_by_node_1(c: &Cluster) -> Vec<String> {
    let mut led = Vec::new();
    wait_until(Duration::from_secs(30), "node 1 leads a partition", || {
        led = c.led_by(1);
        !led.is_empty()
    });
    let parts = c.opts.partitions;
    (0..10_000)
        .map(|i| format!("key{i}"))
        .filter(|k| {
            let p =
                replikv_placement::slot_partition(replikv_placement::key_slot(k.as_bytes()), parts);
            led.contains(&u64::from(p))
        })
        .take(20)
        .collect()
}

/// Writes every key through node `via` at level `all` (so every replica, node 1 included,
/// must hold it), and reads it back through the other live node.
fn write_through(c: &Cluster, via: u64, keys: &[String], value: &str) {
    let mut conn = c.redis(via);
    let _: () = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("all")
        .query(&mut conn)
        .unwrap();
    for k in keys {
        conn.set::<_, _, ()>(k, value)
            .unwrap_or_else(|e| panic!("SET {k} through node {via}: {e}"));
    }
    let other = if via == 2 { 3 } else { 2 };
    let mut reader = c.redis(other);
    for k in keys {
        let v: String = reader.get(k).unwrap();
        assert_eq!(v, value, "{k} read through node {other}");
    }
}

/// Kills and restarts node `id`, then waits until every node sees a leader of every
/// partition and `id` reaches node 1 again (a write at level `all` through it to a
/// partition node 1 leads needs both links: forwarded to node 1, replicated back).
fn restart_peer(c: &mut Cluster, id: u64, keys: &[String], value: &str, node1_http: bool) {
    c.kill(id);
    c.restart(id);
    if node1_http {
        c.wait_ready(Duration::from_secs(30));
    } else {
        // Node 1's HTTP is full: ask the others.
        wait_until(
            Duration::from_secs(30),
            "nodes 2 and 3 agree on every leader",
            || {
                (0..u64::from(c.opts.partitions)).all(|p| {
                    let seen = c.leader_seen_by(2, p);
                    seen.is_some() && seen == c.leader_seen_by(3, p)
                })
            },
        );
    }
    write_through(c, id, keys, value);
}

fn node1_fds(c: &Cluster) -> usize {
    c.node(1).open_fds().expect("node 1's /proc/PID/fd")
}

#[test]
fn clients_beyond_maxclients_are_refused_and_the_peers_keep_their_reserve() {
    let mut c = short_cluster();
    let keys = keys_led_by_node_1(&c);
    assert!(!keys.is_empty());

    // Phase 1: start-up lowered maxclients to fit the descriptors, and said so at warn, in
    // the words Redis uses.
    let (max, mut held) = fill_clients(&c);
    assert!(
        max < NOFILE as usize,
        "maxclients {max} of {NOFILE} descriptors"
    );
    let log = c.node(1).log_text();
    assert!(
        log.contains(&format!(
            "maxclients has been reduced to {max} to compensate for low ulimit"
        )),
        "no reduction warning in node 1's log:\n{}",
        c.node(1).log_tail()
    );

    // Phase 2: more clients than the node has descriptors: each is told Redis's error
    // and closed.
    for i in 0..NOFILE {
        assert!(
            try_client(&c, 1).is_err(),
            "client {i} beyond maxclients {max} was served"
        );
    }
    assert_eq!(refusal(c.node(1).resp), "ERR max number of clients reached");
    if let Some(out) = redis_cli(&c, 1, &["PING"]) {
        assert_eq!(out.trim(), "ERR max number of clients reached", "redis-cli");
    }
    // And idle ones that never speak, held open: refused and closed by the node at once.
    let rejected = info_field(&mut held[0], "stats", "rejected_connections");
    assert!(rejected > NOFILE, "{rejected} refusals counted");
    let idle: Vec<TcpStream> = (0..NOFILE)
        .map(|_| TcpStream::connect(c.node(1).resp).unwrap())
        .collect();
    wait_until(
        Duration::from_secs(10),
        "every idle connection refused",
        || info_field(&mut held[0], "stats", "rejected_connections") >= rejected + NOFILE,
    );
    assert_eq!(
        info_field(&mut held[0], "clients", "connected_clients"),
        max as u64
    );
    let fds = node1_fds(&c);
    eprintln!("node 1: maxclients {max}, {fds} descriptors open of {NOFILE} with every client place taken");
    assert!(
        fds < NOFILE as usize,
        "node 1 holds {fds} descriptors of {NOFILE}"
    );

    // Phase 3: health and readiness still answer, and writes to what node 1 leads go on.
    c.http_get(1, "/health")
        .expect("/health with clients at maxclients");
    c.http_get(1, "/ready")
        .expect("/ready with clients at maxclients");
    write_through(&c, 2, &keys, "v1");
    write_through(&c, 3, &keys, "v2");

    // Phase 4: a peer restarted meanwhile reconnects both ways.
    restart_peer(&mut c, 2, &keys, "v3", true);
    assert!(node1_fds(&c) < NOFILE as usize);

    // Phase 5: once the clients leave, a new one is served.
    drop(idle);
    drop(held);
    wait_until(Duration::from_secs(10), "a client served again", || {
        try_client(&c, 1).is_ok()
    });
    let mut conn = c.redis(1);
    let v: String = conn.get(&keys[0]).unwrap();
    assert_eq!(v, "v3");
}

/// An HTTP flood is refused cleanly (a `503`, then the close) rather than queued: with both
/// the HTTP and the client tables full, node 1 still has descriptors for its peers, and a
/// restarted peer reconnects; `/health` answers again once the flood ends.
#[test]
fn an_http_flood_is_refused_with_503_and_spares_the_peers() {
    let mut c = short_cluster();
    let keys = keys_led_by_node_1(&c);
    let metrics = c.http_text(1, "/metrics").unwrap();
    let http_max = metrics
        .lines()
        .find(|l| l.starts_with("replikv_max_connections{") && l.contains("listener=\"http\""))
        .and_then(|l| l.rsplit(' ').next())
        .expect("the HTTP cap in /metrics")
        .parse::<usize>()
        .unwrap();
    let (_max, mut held) = fill_clients(&c);

    // Fill the HTTP table with clients that keep their connections open (keep-alive).
    let url = format!("http://{}/health", c.node(1).http);
    let agents: Vec<ureq::Agent> = (0..http_max)
        .map(|i| {
            let agent = ureq::AgentBuilder::new().build();
            let r = agent
                .get(&url)
                .timeout(Duration::from_secs(10))
                .call()
                .unwrap_or_else(|e| panic!("HTTP connection {i} of {http_max}: {e}"));
            r.into_string().unwrap();
            agent
        })
        .collect();
    // Beyond the cap: a whole 503 that says why and when to retry, then the close.
    for _ in 0..20 {
        match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
            Err(ureq::Error::Status(503, r)) => {
                assert_eq!(r.header("retry-after"), Some("1"));
                let body: serde_json::Value = r.into_json().unwrap();
                assert_eq!(body["error"], "TOO_MANY_CONNECTIONS");
            }
            other => panic!("an HTTP connection beyond the cap got {other:?}"),
        }
    }
    // And a flood of connections held open without a word, more than node 1's descriptors.
    let idle: Vec<TcpStream> = (0..NOFILE)
        .map(|_| TcpStream::connect(c.node(1).http).unwrap())
        .collect();
    let fds = node1_fds(&c);
    eprintln!(
        "node 1: {} clients, {http_max} HTTP connections, {fds} descriptors open of {NOFILE}",
        held.len()
    );
    assert!(
        fds < NOFILE as usize,
        "node 1 holds {fds} descriptors of {NOFILE}"
    );

    // The peers still work both ways, and a restarted one reconnects.
    write_through(&c, 2, &keys, "w1");
    restart_peer(&mut c, 3, &keys, "w2", false);
    let fds = node1_fds(&c);
    assert!(
        fds < NOFILE as usize,
        "node 1 holds {fds} descriptors of {NOFILE}"
    );
    assert_eq!(
        info_field(&mut held[0], "clients", "connected_clients") as usize,
        held.len()
    );

    // Once the flood ends, /health and /ready answer on new connections.
    drop(idle);
    drop(agents);
    wait_until(Duration::from_secs(10), "/health answers again", || {
        c.http_get(1, "/health").is_ok()
    });
    c.http_get(1, "/ready").expect("/ready after the flood");
    drop(held);
}

/// `redis-cli -p PORT args...`'s output, or `None` when redis-cli is not installed.
fn redis_cli(c: &Cluster, id: u64, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &c.node(id).resp.port().to_string()])
        .args(args)
        .output();
    match out {
        Ok(out) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Err(_) => {
            assert!(
                std::env::var("CI").is_err(),
                "redis-cli must be installed in CI (.ci/run installs redis-tools)"
            );
            None
        }
    }
}

/// A single-node server on free ports, with extra arguments and environment; killed on drop.
/// Its stdout stays open (a closed pipe would fail its next print).
struct Lone(
    Child,
    #[allow(dead_code)] std::io::BufReader<std::process::ChildStdout>,
);

impl Drop for Lone {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lone_command(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("server")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--resp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--peer-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("REPLIKV_MAXCLIENTS")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    cmd
}

/// Starts a lone node and returns it with its RESP address, read from its "ready" line.
fn lone(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Lone, String) {
    use std::io::BufRead;
    let mut child = lone_command(dir, args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let read = stdout.read_line(&mut line);
    let node = Lone(child, stdout);
    read.unwrap();
    let resp = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("resp="))
        .unwrap_or_else(|| panic!("no ready line: {line:?}"))
        .to_string();
    (node, resp)
}

/// `maxclients` comes from YAML, `REPLIKV_MAXCLIENTS` or `--maxclients` (a flag wins over the
/// environment), is validated with the field named, and a limit too low to keep the reserve
/// refuses to start with the figure to raise it to.
#[test]
fn maxclients_is_set_by_flag_or_environment_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let open = |resp: &str| {
        redis::Client::open(format!("redis://{resp}/"))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
    };
    {
        let (_node, resp) = lone(&dir.path().join("a"), &[], &[("REPLIKV_MAXCLIENTS", "3")]);
        let mut first = open(&resp).unwrap();
        assert_eq!(maxclients(&mut first), 3, "from the environment");
        // CONFIG GET as Redis 7.0 answers it: patterns, a name without wildcards echoed.
        let get = |conn: &mut redis::Connection, args: &[&str]| {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(args)
                .query::<Vec<String>>(conn)
        };
        assert_eq!(
            get(&mut first, &["MAXclients"]).unwrap(),
            ["MAXclients", "3"]
        );
        assert_eq!(
            get(&mut first, &["maxc*", "nosuch"]).unwrap(),
            ["maxclients", "3"]
        );
        assert!(get(&mut first, &["nosuch"]).unwrap().is_empty());
        let err = get(&mut first, &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("wrong number of arguments for 'config|get'"),
            "{err}"
        );
        // Three clients are served, the fourth refused.
        let _more = [open(&resp).unwrap(), open(&resp).unwrap()];
        assert!(open(&resp).is_err(), "a fourth client is refused");
        let addr = resp.parse().unwrap();
        assert_eq!(refusal(addr), "ERR max number of clients reached");
    }
    {
        let (_node, resp) = lone(
            &dir.path().join("b"),
            &["--maxclients", "2"],
            &[("REPLIKV_MAXCLIENTS", "3")],
        );
        let mut first = open(&resp).unwrap();
        assert_eq!(
            maxclients(&mut first),
            2,
            "the flag wins over the environment"
        );
    }
    let yaml = dir.path().join("c.yaml");
    for (config, args, env, want) in [
        (
            "",
            vec!["--maxclients", "0"],
            vec![],
            "config field `limits.maxclients`: 0 is out of range; allowed: 1 to 4294967295",
        ),
        (
            "",
            vec![],
            vec![("REPLIKV_MAXCLIENTS", "0")],
            "limits.maxclients",
        ),
        (
            "limits: { maxclients: 0 }\n",
            vec![],
            vec![],
            "limits.maxclients",
        ),
        (
            "limits: { max_http_connections: 0 }\n",
            vec![],
            vec![],
            "limits.max_http_connections",
        ),
        ("", vec!["--maxclients", "many"], vec![], "--maxclients"),
    ] {
        let mut args: Vec<&str> = args;
        if !config.is_empty() {
            std::fs::write(&yaml, config).unwrap();
            args.extend(["--config", yaml.to_str().unwrap()]);
        }
        let out = lone_command(&dir.path().join("d"), &args, &env)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} {env:?} started");
        assert!(
            stderr.contains(want),
            "{args:?} {env:?}: expected {want:?} in {stderr}"
        );
    }
    // Too few descriptors for the reserve: refused at start with what to raise the limit to.
    let mut cmd = lone_command(&dir.path().join("e"), &[], &[]);
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'ulimit -n') of 64 is not enough to start") && stderr.contains("at least"),
        "{stderr}"
    );
}
