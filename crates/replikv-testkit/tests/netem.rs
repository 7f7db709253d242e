//! `PacketDelay` for real: two network namespaces joined by a veth pair (10.213.250.1 and
//! .2; traffic never leaves them), a TCP echo server in one and a client in the other.
//! Needs root, `ip` and `iptables`, and a kernel with NFQUEUE.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use replikv_testkit::netem::{DelaySpec, PacketDelay};

const CLIENT_IP: &str = "10.213.250.1";
const SERVER_IP: &str = "10.213.250.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair; deleted on drop, panic or not.
struct Namespaces {
    client: String,
    server: String,
}

impl Namespaces {
    fn create() -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces {
            client: format!("rkv-netem-c{pid}"),
            server: format!("rkv-netem-s{pid}"),
        };
        ip(&["netns", "add", &ns.client]);
        ip(&["netns", "add", &ns.server]);
        let (c, s) = (ns.client.as_str(), ns.server.as_str());
        ip(&[
            "-n", c, "link", "add", "veth-c", "type", "veth", "peer", "name", "veth-s", "netns", s,
        ]);
        for (ns, dev, addr) in [(c, "veth-c", CLIENT_IP), (s, "veth-s", SERVER_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread moved into namespace `ns`: a socket it creates belongs to `ns`,
/// whichever thread uses it afterwards.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path)?;
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// Median round trip of `n` small messages through the echo server.
fn median_rtt(stream: &mut TcpStream, n: usize) -> Duration {
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n {
        let msg = format!("ping {i:>26}");
        let mut reply = vec![0u8; msg.len()];
        let start = Instant::now();
        stream
            .write_all(msg.as_bytes())
            .expect("writing to echo server");
        stream.read_exact(&mut reply).expect("reading the echo");
        rtts.push(start.elapsed());
        assert_eq!(reply, msg.as_bytes());
    }
    rtts.sort();
    rtts[n / 2]
}

fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// Packet and byte counters of the first rule of `chain` in `table`.
fn first_rule_packets(ns: &str, table: &str, chain: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "iptables", "-t", table, "-L", chain, "-v", "-x", "-n",
        ])
        .output()
        .expect("listing iptables rules");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .nth(2)
        .unwrap_or_else(|| panic!("no rule in {chain}: {text}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn delay_jitter_and_reordering_between_namespaces() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let err = PacketDelay::start(
        &format!("rkv-netem-missing{}", std::process::id()),
        1,
        &[],
        DelaySpec {
            delay: Duration::from_millis(1),
            jitter: Duration::ZERO,
            seed: 0,
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");

    let net = Namespaces::create();
    // A bad matcher is an error naming iptables; the queue it had bound is free again.
    let spec = DelaySpec {
        delay: Duration::from_millis(1),
        jitter: Duration::ZERO,
        seed: 0,
    };
    let err = PacketDelay::start(&net.client, 7, &["--no-such-option"], spec).unwrap_err();
    assert!(err.to_string().contains("iptables"), "{err}");
    let server_addr: SocketAddr = format!("{SERVER_IP}:0").parse().unwrap();

    // The echo server: one connection, echoed until the client closes it.
    let listener = in_netns(&net.server, move || TcpListener::bind(server_addr)).unwrap();
    let echo_addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accepting the client");
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut client = in_netns(&net.client, move || {
        TcpStream::connect_timeout(&echo_addr, Duration::from_secs(5))
    })
    .expect("connecting to the echo server");
    client.set_nodelay(true).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let base = median_rtt(&mut client, 20);

    // A constant 50 ms on the client's TCP packets.
    let tcp = ["-p", "tcp", "-d", SERVER_IP];
    let delay = PacketDelay::start(
        &net.client,
        7,
        &tcp,
        DelaySpec {
            delay: Duration::from_millis(50),
            jitter: Duration::ZERO,
            seed: 1,
        },
    )
    .expect("starting the delay");
    let delayed = median_rtt(&mut client, 10);
    let (held, reordered) = delay.stats();
    assert!(
        delayed >= base + Duration::from_millis(45),
        "RTT {delayed:?} with 50 ms delay, {base:?} without"
    );
    assert!(held >= 10, "held {held} packets");
    assert_eq!(reordered, 0, "a constant delay keeps the order");
    // Filter rules still see delayed packets (they are queued from mangle, before filter).
    let (c, port) = (net.client.clone(), echo_addr.port().to_string());
    ip(&[
        "netns", "exec", &c, "iptables", "-I", "OUTPUT", "-p", "tcp", "-d", SERVER_IP, "--dport",
        &port, "-j", "ACCEPT",
    ]);
    let before = first_rule_packets(&c, "filter", "OUTPUT");
    median_rtt(&mut client, 3);
    assert!(first_rule_packets(&c, "filter", "OUTPUT") >= before + 3);
    ip(&["netns", "exec", &c, "iptables", "-D", "OUTPUT", "1"]);
    drop(delay);

    // Dropping releases held packets at once: a message held for 10 s comes back long before.
    let long = PacketDelay::start(
        &net.client,
        7,
        &tcp,
        DelaySpec {
            delay: Duration::from_secs(10),
            jitter: Duration::ZERO,
            seed: 2,
        },
    )
    .expect("starting the long delay");
    let start = Instant::now();
    client.write_all(b"held").unwrap();
    wait_until(Duration::from_secs(5), "the message to be held", || {
        long.stats().0 >= 1
    });
    drop(long);
    let mut reply = [0u8; 4];
    client
        .read_exact(&mut reply)
        .expect("the held message's echo");
    let held_for = start.elapsed();
    assert_eq!(&reply, b"held");
    assert!(held_for < Duration::from_secs(5), "echo after {held_for:?}");

    // 20 ms ± 20 ms on UDP datagrams sent 0.2 ms apart: they arrive out of order.
    let receiver = in_netns(&net.server, move || UdpSocket::bind(server_addr)).unwrap();
    let udp_addr = receiver.local_addr().unwrap();
    let sender = in_netns(&net.client, || {
        UdpSocket::bind(format!("{CLIENT_IP}:0").parse::<SocketAddr>().unwrap())
    })
    .unwrap();
    const DATAGRAMS: u64 = 200;
    let reader = thread::spawn(move || {
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seqs = Vec::new();
        let mut buf = [0u8; 64];
        while (seqs.len() as u64) < DATAGRAMS && Instant::now() < deadline {
            if let Ok(n) = receiver.recv(&mut buf) {
                assert_eq!(n, 8);
                seqs.push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
            }
        }
        seqs
    });
    let jitter = PacketDelay::start(
        &net.client,
        8,
        &["-p", "udp", "-d", SERVER_IP],
        DelaySpec {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(20),
            seed: 42,
        },
    )
    .expect("starting the jitter");
    for seq in 0..DATAGRAMS {
        sender.send_to(&seq.to_be_bytes(), udp_addr).unwrap();
        thread::sleep(Duration::from_micros(200));
    }
    let seqs = reader.join().unwrap();
    let (held, released_out_of_order) = jitter.stats();
    drop(jitter);
    let mut max = None;
    let arrived_out_of_order = seqs
        .iter()
        .filter(|&&s| {
            let late = max.is_some_and(|m| s < m);
            max = max.max(Some(s));
            late
        })
        .count();
    assert_eq!(seqs.len() as u64, DATAGRAMS, "every datagram arrives");
    assert!(held >= DATAGRAMS, "held {held} datagrams");
    assert!(released_out_of_order > 0, "stats report no reordering");
    assert!(arrived_out_of_order > 0, "no datagram arrived out of order");

    // Back to normal once every delay is dropped.
    let after = median_rtt(&mut client, 20);
    assert!(
        after < base + Duration::from_millis(20),
        "RTT {after:?} after the delay, {base:?} before"
    );
    println!(
        "RTT median: {base:?} before, {delayed:?} with 50 ms delay, {after:?} after; \
         10 s hold released after {held_for:?} on drop; \
         jitter 20±20 ms: {held} datagrams held, {released_out_of_order} released and \
         {arrived_out_of_order} of {DATAGRAMS} arrived out of order"
    );
    drop(client);
    server.join().unwrap();
}
