//! Real network faults: each node in its own Linux network namespace, so a cut link, a lost
//! packet or a one-way partition is the kernel dropping packets, not a flag the product reads.
//!
//! ```text
//!   test process (root namespace) 10.213.S.1 ── veth ──┐
//!                                                       │  bridge, in namespace rkvS-hub
//!   node i (namespace rkvS-nI)  10.213.S.(10+i) ── veth ─┘
//! ```
//! `S` is a slot from 1 to 239, taken by creating the hub namespace (creation is atomic, so
//! concurrent test processes never share a slot); a slot whose owner process has died is
//! reclaimed. Faults are iptables rules in a chain `RKV` of each node's namespace, hooked into
//! INPUT and OUTPUT, and touch only node-to-node traffic: clients in the root namespace keep
//! reaching every node, as in Jepsen. The root namespace's own firewall is never changed.
//!
//! Needs root, `ip` (iproute2) and `iptables`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// Ports every node listens on inside its namespace (each node has an address of its own).
pub const RESP_PORT: u16 = 6379;
pub const HTTP_PORT: u16 = 8080;
pub const PEER_PORT: u16 = 7000;

const FIRST_SLOT: u32 = 1;
const LAST_SLOT: u32 = 239;
const OWNERS: &str = "/run/replikv-netns";

/// Runs a command; an error names it and carries its stderr.
fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running {program} {}: {e}", args.join(" ")),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

/// A private network of namespaces for one test cluster; removed on drop.
pub struct Netns {
    slot: u32,
    nodes: Vec<u64>,
}

/// Which node-to-node packets a fault drops.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// Every packet between `a` and `b`, both directions.
    Cut(u64, u64),
    /// Packets from `from` to `to` only; replies and the other direction still flow.
    OneWay { from: u64, to: u64 },
    /// A random share (0.0–1.0) of the packets `from` sends to `to`.
    Loss {
        from: u64,
        to: u64,
        probability: f64,
    },
}

impl Netns {
    /// Creates the hub, the root-side link and one namespace per node.
    pub fn create(nodes: &[u64]) -> io::Result<Netns> {
        if unsafe { libc::geteuid() } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "network namespaces need root (ip netns, iptables)",
            ));
        }
        fs::create_dir_all(OWNERS)?;
        for slot in FIRST_SLOT..=LAST_SLOT {
            if ip(&["netns", "add", &hub_name(slot)]).is_err() {
                if owner_alive(slot) {
                    continue;
                }
                remove_slot(slot);
                if ip(&["netns", "add", &hub_name(slot)]).is_err() {
                    continue;
                }
            }
            fs::write(owner_file(slot), std::process::id().to_string())?;
            let net = Netns {
                slot,
                nodes: nodes.to_vec(),
            };
            // On error, dropping `net` removes what was built so far.
            net.build()?;
            return Ok(net);
        }
        Err(io::Error::other(
            "no free network slot (10.213.1-239.0/24 all in use)",
        ))
    }

    fn build(&self) -> io::Result<()> {
        let s = self.slot;
        let hub = hub_name(s);
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        // The test process's end of the network.
        let (root, root_peer) = (format!("rkv{s}r"), format!("rkv{s}rh"));
        ip(&[
            "link", "add", &root, "type", "veth", "peer", "name", &root_peer,
        ])?;
        ip(&["link", "set", &root_peer, "netns", &hub])?;
        ip(&["-n", &hub, "link", "set", &root_peer, "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.root_ip()),
            "dev",
            &root,
        ])?;
        ip(&["link", "set", &root, "up"])?;
        for id in &self.nodes {
            let ns = self.node_ns(*id);
            ip(&["netns", "add", &ns])?;
            let (inner, outer) = (format!("rkv{s}n{id}"), format!("rkv{s}n{id}h"));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            ip(&["link", "set", &outer, "netns", &hub])?;
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.node_ip(*id)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.iptables(*id, &["-N", "RKV"])?;
            self.iptables(*id, &["-I", "INPUT", "-j", "RKV"])?;
            self.iptables(*id, &["-I", "OUTPUT", "-j", "RKV"])?;
        }
        Ok(())
    }

    /// The address the test process uses on this network.
    pub fn root_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.slot as u8, 1)
    }

    /// Node `id`'s address; every listener of the node binds it.
    pub fn node_ip(&self, id: u64) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.slot as u8, 10 + id as u8)
    }

    /// The name of node `id`'s namespace (`ip netns exec NAME ...`).
    pub fn node_ns(&self, id: u64) -> String {
        format!("rkv{}-n{id}", self.slot)
    }

    /// A command that runs `program` inside node `id`'s namespace. `ip netns exec` execs the
    /// program in place, so the child's pid is the program's.
    pub fn command(&self, id: u64, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns(id)]).arg(program);
        cmd
    }

    fn iptables(&self, id: u64, args: &[&str]) -> io::Result<()> {
        let ns = self.node_ns(id);
        let mut full = vec!["netns", "exec", &ns, "iptables", "-w"];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Adds a fault. Rules add up until [`Netns::heal`].
    pub fn apply(&self, rule: &Rule) -> io::Result<()> {
        match rule {
            Rule::Cut(a, b) => {
                self.drop_between(*a, *b, &[])?;
                self.drop_between(*b, *a, &[])
            }
            Rule::OneWay { from, to } => self.drop_between(*from, *to, &[]),
            Rule::Loss {
                from,
                to,
                probability,
            } => {
                let p = format!("{probability:.4}");
                self.drop_between(
                    *from,
                    *to,
                    &["-m", "statistic", "--mode", "random", "--probability", &p],
                )
            }
        }
    }

    /// Drops packets from `from` to `to`: on `from`'s way out and on `to`'s way in, so the
    /// rule holds whichever side a later change touches.
    fn drop_between(&self, from: u64, to: u64, extra: &[&str]) -> io::Result<()> {
        let (src, dst) = (self.node_ip(from).to_string(), self.node_ip(to).to_string());
        let mut out = vec!["-A", "RKV", "-s", &src, "-d", &dst];
        out.extend_from_slice(extra);
        out.extend_from_slice(&["-j", "DROP"]);
        self.iptables(from, &out)?;
        if extra.is_empty() {
            // A loss rule on both sides would square the loss rate; cuts are idempotent.
            self.iptables(to, &out)?;
        }
        Ok(())
    }

    /// Splits the nodes into groups that cannot talk across (a node in no group is cut from
    /// everyone).
    pub fn partition(&self, groups: &[Vec<u64>]) -> io::Result<()> {
        let group_of: BTreeMap<u64, usize> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, ns)| ns.iter().map(move |n| (*n, g)))
            .collect();
        for (i, a) in self.nodes.iter().enumerate() {
            for b in &self.nodes[i + 1..] {
                match (group_of.get(a), group_of.get(b)) {
                    (Some(x), Some(y)) if x == y => {}
                    _ => self.apply(&Rule::Cut(*a, *b))?,
                }
            }
        }
        Ok(())
    }

    /// Removes every fault rule.
    pub fn heal(&self) -> io::Result<()> {
        for id in &self.nodes {
            self.iptables(*id, &["-F", "RKV"])?;
        }
        Ok(())
    }

    /// The rules in force on node `id`, as `iptables -S RKV` prints them (for reports).
    pub fn rules(&self, id: u64) -> io::Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node_ns(id),
                "iptables",
                "-w",
                "-S",
                "RKV",
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn hub_name(slot: u32) -> String {
    format!("rkv{slot}-hub")
}

fn owner_file(slot: u32) -> PathBuf {
    PathBuf::from(OWNERS).join(format!("{slot}.pid"))
}

/// True if the process that took `slot` is still running (or the slot is being set up).
fn owner_alive(slot: u32) -> bool {
    let Ok(text) = fs::read_to_string(owner_file(slot)) else {
        // Taken a moment ago and not yet recorded, or left by a crash before recording:
        // treat as taken unless the hub is old.
        let age = fs::metadata(format!("/var/run/netns/{}", hub_name(slot)))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        return age.is_none_or(|a| a.as_secs() < 60);
    };
    match text.trim().parse::<i32>() {
        Ok(pid) => unsafe { libc::kill(pid, 0) == 0 },
        Err(_) => false,
    }
}

/// Deletes everything a slot's owner built: node namespaces, the hub and the root link.
fn remove_slot(slot: u32) {
    if let Ok(entries) = fs::read_dir("/var/run/netns") {
        let prefix = format!("rkv{slot}-");
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    let _ = ip(&["link", "del", &format!("rkv{slot}r")]);
    let _ = fs::remove_file(owner_file(slot));
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_slot(self.slot);
    }
}
