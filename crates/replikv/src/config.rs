//! Configuration: YAML file, then `REPLIKV_*` environment, then flags (each wins over the one
//! before). Every field is documented in `docs/CONFIG.md`; validation names the field and
//! the allowed values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use replikv_storage::FsyncPolicy;
use replikv_types::Consistency;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub listen: Listen,
    /// Initial members by peer address (as etcd's `--initial-cluster`).
    pub peers: BTreeMap<u64, String>,
    pub replication: Replication,
    pub storage: Storage,
    pub limits: Limits,
    pub resp: Resp,
    pub debug: Debug,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub resp: String,
    pub http: String,
    /// Defaults to this node's address in `peers`.
    pub peer: Option<String>,
}

pub use replikv_cluster::Replication;

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub fsync: FsyncPolicy,
    /// Free space kept in reserve: below it the node takes no new data. Unset: 128 MiB, or a
    /// quarter of the filesystem when that is smaller (docs/CONFIG.md).
    pub min_free_bytes: Option<u64>,
}

/// The reserve when `storage.min_free_bytes` is unset: room for every partition's pending
/// state-file checkpoints (at most two layers of 4 MiB each, eight partitions) twice over.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 128 << 20;

impl Storage {
    /// The reserve for a filesystem of `total_bytes`.
    pub fn min_free_bytes(&self, total_bytes: u64) -> u64 {
        self.min_free_bytes
            .unwrap_or_else(|| DEFAULT_MIN_FREE_BYTES.min(total_bytes / 4))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// RESP clients open at once, with Redis's name, default and range. Start-up lowers it
    /// when the descriptor limit cannot hold it beside the peers' reserve (`fds.rs`).
    pub maxclients: u64,
    /// HTTP connections open at once; lowered the same way.
    pub max_http_connections: u64,
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Resp {
    /// Answer `-MOVED` (Redis Cluster style) instead of forwarding to the leader.
    pub redirect: bool,
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Debug {
    /// Expose `/debug/faults`, which cuts peer links. For tests only.
    pub fault_injection: bool,
    /// Serve `primary` reads without a read index: a known bug, injected so tests can show
    /// that the history checker catches it. Never set it elsewhere.
    pub skip_read_index: bool,
    /// Acknowledge blind `quorum` writes before they commit: a known bug, injected so tests
    /// can show that the chaos campaign catches lost writes. Never set it elsewhere.
    pub ack_before_commit: bool,
    /// Stamp log entries with the wall clock instead of the anchored one: a known bug,
    /// injected so tests can show that the chaos campaign catches a leader's jumped clock
    /// reaching expiries. Never set it elsewhere.
    pub stamp_with_wall_clock: bool,
}

/// Largest value accepted: must fit a peer frame with room to spare.
pub const MAX_VALUE_BYTES_CAP: usize = 32 << 20;
/// Redis's default `maxclients`.
pub const DEFAULT_MAXCLIENTS: u64 = 10_000;
pub const DEFAULT_MAX_HTTP_CONNECTIONS: u64 = 1024;
/// Redis's bound for `maxclients` (an unsigned 32-bit count); also HTTP's.
pub const MAX_CONNECTIONS_CAP: u64 = u32::MAX as u64;
/// Largest `replication.max_clock_offset_ms`: an hour. Past it the clock check would let a
/// leader's clock set expiries off by more than most TTLs.
pub const MAX_CLOCK_OFFSET_CAP_MS: u64 = 3_600_000;

/// Which of the settings a start may take from the data directory's `node.json` the YAML
/// file gives itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct GivenKeys {
    pub node_id: bool,
    pub peers: bool,
    pub resp_listen: bool,
    pub http_listen: bool,
    pub peer_listen: bool,
}

/// The keys of [`GivenKeys`] present in a YAML configuration (one that does not parse gives
/// none: `Config::from_yaml` reports it).
pub fn given_keys(text: &str) -> GivenKeys {
    let Ok(serde_yaml::Value::Mapping(top)) = serde_yaml::from_str::<serde_yaml::Value>(text)
    else {
        return GivenKeys::default();
    };
    let has = |m: &serde_yaml::Mapping, k: &str| m.contains_key(serde_yaml::Value::from(k));
    let listen = match top.get(serde_yaml::Value::from("listen")) {
        Some(serde_yaml::Value::Mapping(l)) => Some(l.clone()),
        _ => None,
    };
    let in_listen = |k: &str| listen.as_ref().is_some_and(|l| has(l, k));
    GivenKeys {
        node_id: has(&top, "node_id"),
        peers: has(&top, "peers"),
        resp_listen: in_listen("resp"),
        http_listen: in_listen("http"),
        peer_listen: in_listen("peer"),
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut peers = BTreeMap::new();
        peers.insert(1, "127.0.0.1:7380".to_string());
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            listen: Listen::default(),
            peers,
            replication: Replication::default(),
            storage: Storage::default(),
            limits: Limits::default(),
            resp: Resp::default(),
            debug: Debug::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            resp: "127.0.0.1:6380".into(),
            http: "127.0.0.1:8080".into(),
            peer: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 64 * 1024,
            max_value_bytes: 16 << 20,
            maxclients: DEFAULT_MAXCLIENTS,
            max_http_connections: DEFAULT_MAX_HTTP_CONNECTIONS,
        }
    }
}

impl Config {
    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| format!("config: {e}"))
    }

    /// Checks every field; the error names the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.replication;
        let fail = |field: &str, msg: String| Err(format!("config field `{field}`: {msg}"));
        if self.node_id == 0 {
            return fail("node_id", "must be a positive integer".into());
        }
        if !self.peers.contains_key(&self.node_id) {
            return fail(
                "peers",
                format!(
                    "must include this node ({}); got ids {:?}",
                    self.node_id,
                    self.peers.keys().collect::<Vec<_>>()
                ),
            );
        }
        for (id, addr) in &self.peers {
            if addr.parse::<SocketAddr>().is_err() {
                return fail(
                    &format!("peers.{id}"),
                    format!("{addr:?} is not an IP:port address"),
                );
            }
        }
        for (field, addr) in [
            ("listen.resp", &self.listen.resp),
            ("listen.http", &self.listen.http),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                return fail(field, format!("{addr:?} is not an IP:port address"));
            }
        }
        if let Some(p) = &self.listen.peer {
            if p.parse::<SocketAddr>().is_err() {
                return fail("listen.peer", format!("{p:?} is not an IP:port address"));
            }
        }
        if r.factor == 0 {
            return fail("replication.factor", "must be at least 1".into());
        }
        if r.partitions == 0 || r.partitions > replikv_placement::SLOT_COUNT as u32 {
            return fail(
                "replication.partitions",
                format!("{} is out of range; allowed: 1 to 16384", r.partitions),
            );
        }
        if let Consistency::AtLeast(n) = r.consistency {
            let f = r.factor.min(self.peers.len());
            if n as usize > f {
                return fail(
                    "replication.consistency",
                    format!("at_least:{n} exceeds the replication factor {f}"),
                );
            }
        }
        // Saturating: a huge heartbeat_ms must be refused, not wrap around to a small one.
        if r.heartbeat_ms == 0 || r.heartbeat_ms.saturating_mul(2) > r.election_timeout_min_ms {
            return fail(
                "replication.heartbeat_ms",
                format!(
                    "{} must be positive and at most half of election_timeout_min_ms ({})",
                    r.heartbeat_ms, r.election_timeout_min_ms
                ),
            );
        }
        if r.election_timeout_min_ms >= r.election_timeout_max_ms {
            return fail(
                "replication.election_timeout_min_ms",
                "must be less than election_timeout_max_ms".into(),
            );
        }
        if r.lease_margin_ms == 0 || r.lease_margin_ms >= r.election_timeout_max_ms {
            return fail(
                "replication.lease_margin_ms",
                format!(
                    "{} must be positive and less than election_timeout_max_ms ({})",
                    r.lease_margin_ms, r.election_timeout_max_ms
                ),
            );
        }
        if r.max_clock_offset_ms == 0 || r.max_clock_offset_ms > MAX_CLOCK_OFFSET_CAP_MS {
            return fail(
                "replication.max_clock_offset_ms",
                format!(
                    "{} is out of range; allowed: 1 to {MAX_CLOCK_OFFSET_CAP_MS}",
                    r.max_clock_offset_ms
                ),
            );
        }
        if r.write_timeout_ms == 0 {
            return fail("replication.write_timeout_ms", "must be positive".into());
        }
        if r.snapshot_every_entries == 0 {
            return fail(
                "replication.snapshot_every_entries",
                "must be positive".into(),
            );
        }
        if self.limits.max_value_bytes == 0 || self.limits.max_value_bytes > MAX_VALUE_BYTES_CAP {
            return fail(
                "limits.max_value_bytes",
                format!(
                    "{} is out of range; allowed: 1 to {MAX_VALUE_BYTES_CAP}",
                    self.limits.max_value_bytes
                ),
            );
        }
        for (field, n) in [
            ("limits.maxclients", self.limits.maxclients),
            (
                "limits.max_http_connections",
                self.limits.max_http_connections,
            ),
        ] {
            if n == 0 || n > MAX_CONNECTIONS_CAP {
                return fail(
                    field,
                    format!("{n} is out of range; allowed: 1 to {MAX_CONNECTIONS_CAP}"),
                );
            }
        }
        if self.limits.max_key_bytes == 0 || self.limits.max_key_bytes > 1 << 20 {
            return fail(
                "limits.max_key_bytes",
                format!(
                    "{} is out of range; allowed: 1 to 1048576",
                    self.limits.max_key_bytes
                ),
            );
        }
        Ok(())
    }

    /// The address peers reach this node at.
    pub fn advertised_peer(&self) -> String {
        self.peers[&self.node_id].clone()
    }

    pub fn node_config(&self) -> replikv_cluster::NodeConfig {
        replikv_cluster::NodeConfig {
            node_id: self.node_id,
            peers: self.peers.clone(),
            replication: self.replication.clone(),
            skip_read_index: self.debug.skip_read_index,
            ack_before_commit: self.debug.ack_before_commit,
            stamp_with_wall_clock: self.debug.stamp_with_wall_clock,
            ..replikv_cluster::NodeConfig::new(self.node_id, BTreeMap::new())
        }
    }
}

/// Parses `1=127.0.0.1:7380,2=...` (the `--peers` form).
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("--peers: {part:?} is not ID=ADDR"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("--peers: {id:?} is not a node id"))?;
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("--peers: node {id} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("--peers: no members given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_valid_single_node() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.replication.consistency, Consistency::Quorum);
        assert_eq!(c.storage.fsync, FsyncPolicy::Always);
        assert!(c.listen.resp.starts_with("127.0.0.1"));
        assert_eq!(c.limits.maxclients, 10_000, "Redis's default");
    }

    #[test]
    fn the_documented_yaml_parses() {
        let yaml = r#"
node_id: 1
data_dir: ./data
listen: { resp: 127.0.0.1:6380, http: 127.0.0.1:8080, peer: 127.0.0.1:7380 }
peers: { 1: 127.0.0.1:7380, 2: 127.0.0.1:7381, 3: 127.0.0.1:7382 }
replication: { factor: 3, consistency: quorum, read_preference: primary,
               max_lag_ms: 10000, write_timeout_ms: 5000 }
storage: { fsync: always }
"#;
        let c = Config::from_yaml(yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.peers.len(), 3);
    }

    #[test]
    fn errors_name_the_field_and_allowed_values() {
        let e = Config::from_yaml("storage: { fsync: sometimes }").unwrap_err();
        assert!(e.contains("always") && e.contains("everysec"), "{e}");
        let e = Config::from_yaml("replication: { consistency: fast }").unwrap_err();
        assert!(e.contains("allowed: eventual"), "{e}");
        let e = Config::from_yaml("replicaton: {}").unwrap_err();
        assert!(e.contains("unknown field `replicaton`"), "{e}");
        let mut c = Config::default();
        c.replication.partitions = 0;
        assert!(c.validate().unwrap_err().contains("replication.partitions"));
        let mut c = Config::default();
        c.replication.consistency = Consistency::AtLeast(2);
        assert!(c
            .validate()
            .unwrap_err()
            .contains("replication.consistency"));
        for margin in [0, 600, 601] {
            let yaml = format!("replication: {{ lease_margin_ms: {margin} }}");
            let e = Config::from_yaml(&yaml).unwrap().validate().unwrap_err();
            assert!(e.contains("replication.lease_margin_ms"), "{e}");
        }
        let c = Config::from_yaml("replication: { lease_reads: false, lease_margin_ms: 50 }");
        c.unwrap().validate().unwrap();
        for (yaml, field) in [
            ("limits: { maxclients: 0 }", "limits.maxclients"),
            ("limits: { maxclients: 4294967296 }", "limits.maxclients"),
            (
                "limits: { max_http_connections: 0 }",
                "limits.max_http_connections",
            ),
        ] {
            let e = Config::from_yaml(yaml).unwrap().validate().unwrap_err();
            assert!(
                e.contains(field) && e.contains("allowed: 1 to 4294967295"),
                "{e}"
            );
        }
        let e = Config::from_yaml("limits: { maxclients: many }").unwrap_err();
        assert!(e.contains("maxclients"), "{e}");
        for offset in [0, 3_600_001] {
            let yaml = format!("replication: {{ max_clock_offset_ms: {offset} }}");
            let e = Config::from_yaml(&yaml).unwrap().validate().unwrap_err();
            assert!(e.contains("replication.max_clock_offset_ms"), "{e}");
        }
        let c = Config::from_yaml("replication: { max_clock_offset_ms: 50 }").unwrap();
        c.validate().unwrap();
        assert_eq!(c.node_config().replication.max_clock_offset_ms, 50);
        assert!(parse_peers("1=a,1=b").is_err());
        assert!(parse_peers("x").is_err());
    }

    /// Found by the `config` fuzz target: `heartbeat_ms * 2` overflowed, which panicked in a
    /// debug build and in a release build wrapped around, accepting a heartbeat of ~292
    /// million years against an election timeout of 300 ms.
    #[test]
    fn a_heartbeat_too_large_to_double_is_refused() {
        for heartbeat in [1u64 << 63, (1 << 63) + 1, u64::MAX] {
            let yaml = format!("replication: {{ heartbeat_ms: {heartbeat} }}");
            let e = Config::from_yaml(&yaml).unwrap().validate().unwrap_err();
            assert!(e.contains("replication.heartbeat_ms"), "{e}");
        }
    }
}
