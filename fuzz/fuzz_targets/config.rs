//! The YAML configuration loader (`Config::from_yaml`, `Config::validate`) and the `--peers`
//! parser (`parse_peers`).
//!
//! Every input is used twice:
//! 1. As the text of a configuration file (and of a `--peers` value), lossily made UTF-8.
//! 2. As numbers: one byte per numeric field picks a small value (0-199) or an edge value
//!    (powers of two around 2^31, 2^32, 2^63, 2^64, the documented bounds), and those are
//!    written into a well-formed YAML file. Random text rarely gets past the first invalid
//!    field, so this is what drives `validate` through every check and its arithmetic.
//!
//! Properties, beyond "never panics": every error says something (the loader's after its
//! `config: ` prefix; validation's names a field, as docs/CONFIG.md promises); a
//! configuration that validates can build its node configuration and its advertised peer
//! address is an IP:port; `parse_peers` never returns an empty member list.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use replikv::config::{parse_peers, Config};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    load(&text);
    match parse_peers(&text) {
        Ok(peers) => assert!(!peers.is_empty()),
        Err(e) => assert!(!e.trim().is_empty()),
    }
    load(&numbers_as_yaml(data));
});

/// Values that sit on a boundary of some field's type or allowed range.
const EDGES: [u64; 18] = [
    1 << 14,
    (1 << 14) + 1,
    1 << 20,
    (1 << 20) + 1,
    32 << 20,
    (32 << 20) + 1,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 62) + 1,
    (1 << 63) - 1,
    1 << 63,
    (1 << 63) + 1,
    u64::MAX / 3,
    u64::MAX - 1,
    u64::MAX,
    1_000_000_000_000,
];

fn numbers_as_yaml(data: &[u8]) -> String {
    let mut bytes = data.iter().copied();
    let [node_id, third_peer, factor, partitions, at_least, heartbeat, election_min, election_max, write_timeout, snapshot_every, max_lag, replica_timeout, backlog, max_key, max_value, maxclients, max_http, max_clock_offset]: [u64; 18] =
        std::array::from_fn(|_| match bytes.next().unwrap_or(0) {
            b @ 0..=199 => u64::from(b),
            b => EDGES[usize::from(b - 200) % EDGES.len()],
        });
    format!(
        "node_id: {node_id}
peers: {{ 1: 127.0.0.1:7380, 2: 127.0.0.1:7381, {third_peer}: 127.0.0.1:7382 }}
replication: {{ factor: {factor}, partitions: {partitions}, consistency: \"at_least:{at_least}\",
  heartbeat_ms: {heartbeat}, election_timeout_min_ms: {election_min},
  election_timeout_max_ms: {election_max}, write_timeout_ms: {write_timeout},
  snapshot_every_entries: {snapshot_every}, max_lag_ms: {max_lag},
  replica_timeout_ms: {replica_timeout}, backlog_entries: {backlog},
  max_clock_offset_ms: {max_clock_offset} }}
limits: {{ max_key_bytes: {max_key}, max_value_bytes: {max_value}, maxclients: {maxclients},
  max_http_connections: {max_http} }}
"
    )
}

fn load(text: &str) {
    match Config::from_yaml(text) {
        Ok(cfg) => match cfg.validate() {
            Ok(()) => {
                let node = cfg.node_config();
                assert_eq!(node.node_id, cfg.node_id);
                let peer = cfg.advertised_peer();
                assert!(
                    peer.parse::<SocketAddr>().is_ok(),
                    "advertised peer {peer:?}"
                );
            }
            Err(e) => {
                let rest = e
                    .strip_prefix("config field `")
                    .unwrap_or_else(|| panic!("validation error names no field: {e:?}"));
                let (field, message) = rest
                    .split_once("`: ")
                    .unwrap_or_else(|| panic!("validation error has no message: {e:?}"));
                assert!(!field.trim().is_empty(), "empty field name: {e:?}");
                assert!(
                    !message.trim().is_empty(),
                    "empty validation message: {e:?}"
                );
            }
        },
        Err(e) => {
            let message = e
                .strip_prefix("config: ")
                .unwrap_or_else(|| panic!("loader error without its prefix: {e:?}"));
            assert!(!message.trim().is_empty(), "empty loader error: {e:?}");
        }
    }
}
