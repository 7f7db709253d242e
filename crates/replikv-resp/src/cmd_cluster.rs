//! INFO, ROLE, REPLIKV.STATUS and CLUSTER SLOTS/SHARDS/NODES/INFO/KEYSLOT/MYID.
//!
//! Each node leads some partitions and follows in others; to Redis tools it presents itself
//! as `master` when it leads at least one partition, and reports per-partition detail in
//! replikv's own fields.

use bytes::Bytes;

use crate::codec::Frame;
use crate::conn::{Args, ConnState};
use crate::service::Service;

pub(crate) fn info<S: Service>(service: &S, state: &ConnState, args: &Args) -> Frame {
    let f = service.facts();
    let section = if args.len() > 1 {
        args.text(1).to_ascii_lowercase()
    } else {
        "default".into()
    };
    let all = matches!(section.as_str(), "default" | "all" | "everything");
    let mut out = String::new();
    if all || section == "server" {
        out.push_str(&format!(
            "# Server\r\nredis_version:7.2.0\r\nreplikv_version:{}\r\nredis_mode:cluster\r\nos:{}\r\nprocess_id:{}\r\nrun_id:{:040x}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            f.node_id
        ));
    }
    let clients = &state.clients;
    if all || section == "clients" {
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\n\r\n",
            clients.open(),
            clients.max()
        ));
    }
    if all || section == "stats" {
        out.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\nrejected_connections:{}\r\n\r\n",
            clients.accepted(),
            clients.rejected()
        ));
    }
    if all || section == "replication" {
        out.push_str("# Replication\r\n");
        let role = if f.partitions_led > 0 {
            "master"
        } else {
            "slave"
        };
        out.push_str(&format!("role:{role}\r\n"));
        let replicas = f.replica_offsets();
        out.push_str(&format!("connected_slaves:{}\r\n", replicas.len()));
        for (i, (node, (offset, lag))) in replicas.iter().enumerate() {
            out.push_str(&format!(
                "slave{i}:node={node},state=online,offset={offset},lag_ops={lag}\r\n"
            ));
        }
        let offset = f.led_offset();
        out.push_str(&format!(
            "master_replid:{:040x}\r\nmaster_repl_offset:{offset}\r\n",
            f.node_id
        ));
        out.push_str(&format!(
            "replikv_partitions_hosted:{}\r\nreplikv_partitions_led:{}\r\nreplikv_connected_peers:{}\r\n",
            f.partitions_hosted, f.partitions_led, f.connected_peers
        ));
        for fact in &f.partitions {
            out.push_str(&format!(
                "partition{}:{}\r\n",
                fact.partition,
                fact.describe(',')
            ));
        }
        out.push_str("\r\n");
    }
    if all || section == "keyspace" {
        out.push_str("# Keyspace\r\n");
        out.push_str("\r\n");
    }
    Frame::Bulk(Bytes::from(out))
}

pub(crate) fn role<S: Service>(service: &S) -> Frame {
    let f = service.facts();
    let offset = f.led_offset();
    if f.partitions_led > 0 {
        let replicas = f.replica_offsets();
        let slots = service.slots();
        let addr_of = |id: u64| {
            slots
                .iter()
                .flat_map(|s| s.nodes.iter())
                .find(|n| n.0 == id)
                .map(|n| (n.1.clone(), n.2))
        };
        Frame::Array(vec![
            Frame::Bulk(Bytes::from_static(b"master")),
            Frame::Integer(offset as i64),
            Frame::Array(
                replicas
                    .into_iter()
                    .map(|(id, (off, _))| {
                        let (host, port) = addr_of(id).unwrap_or_default();
                        Frame::Array(vec![
                            Frame::Bulk(Bytes::from(host)),
                            Frame::Bulk(Bytes::from(port.to_string())),
                            Frame::Bulk(Bytes::from(off.to_string())),
                        ])
                    })
                    .collect(),
            ),
        ])
    } else {
        Frame::Array(vec![
            Frame::Bulk(Bytes::from_static(b"slave")),
            Frame::Bulk(Bytes::new()),
            Frame::Integer(0),
            Frame::Bulk(Bytes::from_static(b"connected")),
            Frame::Integer(f.partitions.iter().map(|p| p.applied_offset).sum::<u64>() as i64),
        ])
    }
}

pub(crate) fn status<S: Service>(service: &S) -> Frame {
    let f = service.facts();
    Frame::Array(
        f.partitions
            .iter()
            .map(|fact| {
                Frame::Bulk(Bytes::from(format!(
                    "partition={} {}",
                    fact.partition,
                    fact.describe(' ')
                )))
            })
            .collect(),
    )
}

pub(crate) fn cluster<S: Service>(service: &S, args: &Args) -> Frame {
    let node_name = |id: u64| format!("{id:040x}");
    match args.upper(1).as_str() {
        "KEYSLOT" if args.len() == 3 => {
            Frame::Integer(replikv_placement_slot(&args.args[2]) as i64)
        }
        "MYID" => Frame::Bulk(Bytes::from(node_name(service.facts().node_id))),
        "INFO" => {
            let slots = service.slots();
            let ok = slots.iter().all(|s| !s.nodes.is_empty());
            let nodes: std::collections::BTreeSet<u64> = slots
                .iter()
                .flat_map(|s| s.nodes.iter().map(|n| n.0))
                .collect();
            Frame::Bulk(Bytes::from(format!(
                "cluster_enabled:1\r\ncluster_state:{}\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:{}\r\ncluster_known_nodes:{}\r\ncluster_size:{}\r\n",
                if ok { "ok" } else { "fail" },
                if ok { 16384 } else { 0 },
                nodes.len(),
                nodes.len()
            )))
        }
        "SLOTS" => Frame::Array(
            service
                .slots()
                .into_iter()
                .map(|s| {
                    let mut v = vec![Frame::Integer(s.start as i64), Frame::Integer(s.end as i64)];
                    for (id, host, port) in s.nodes {
                        v.push(Frame::Array(vec![
                            Frame::Bulk(Bytes::from(host)),
                            Frame::Integer(port as i64),
                            Frame::Bulk(Bytes::from(node_name(id))),
                        ]));
                    }
                    Frame::Array(v)
                })
                .collect(),
        ),
        "SHARDS" => Frame::Array(
            service
                .slots()
                .into_iter()
                .map(|s| {
                    let nodes = s
                        .nodes
                        .iter()
                        .enumerate()
                        .map(|(i, (id, host, port))| {
                            let kv = |k: &str, v: Frame| {
                                [Frame::Bulk(Bytes::copy_from_slice(k.as_bytes())), v]
                            };
                            let mut m = Vec::new();
                            m.extend(kv("id", Frame::Bulk(Bytes::from(node_name(*id)))));
                            m.extend(kv("port", Frame::Integer(*port as i64)));
                            m.extend(kv("ip", Frame::Bulk(Bytes::from(host.clone()))));
                            m.extend(kv(
                                "role",
                                Frame::Bulk(Bytes::from_static(if i == 0 {
                                    b"master"
                                } else {
                                    b"replica"
                                })),
                            ));
                            m.extend(kv("health", Frame::Bulk(Bytes::from_static(b"online"))));
                            Frame::Array(m)
                        })
                        .collect();
                    Frame::Array(vec![
                        Frame::Bulk(Bytes::from_static(b"slots")),
                        Frame::Array(vec![
                            Frame::Integer(s.start as i64),
                            Frame::Integer(s.end as i64),
                        ]),
                        Frame::Bulk(Bytes::from_static(b"nodes")),
                        Frame::Array(nodes),
                    ])
                })
                .collect(),
        ),
        "NODES" => {
            let me = service.facts().node_id;
            let mut lines = std::collections::BTreeMap::<u64, (String, u16, Vec<String>)>::new();
            for s in service.slots() {
                for (i, (id, host, port)) in s.nodes.iter().enumerate() {
                    let e = lines
                        .entry(*id)
                        .or_insert((host.clone(), *port, Vec::new()));
                    if i == 0 {
                        e.2.push(format!("{}-{}", s.start, s.end));
                    }
                }
            }
            let mut out = String::new();
            for (id, (host, port, slots)) in lines {
                let flags = if id == me { "myself,master" } else { "master" };
                out.push_str(&format!(
                    "{} {host}:{port}@0 {flags} - 0 0 0 connected {}\n",
                    node_name(id),
                    slots.join(" ")
                ));
            }
            Frame::Bulk(Bytes::from(out))
        }
        _ => Frame::Error(format!(
            "ERR unknown subcommand '{}'. Try CLUSTER HELP.",
            args.text(1)
        )),
    }
}

/// Redis Cluster's hash slot of `key` (CRC16/XMODEM, `{hash tags}` honoured).
fn replikv_placement_slot(key: &[u8]) -> u16 {
    replikv_placement::key_slot(key)
}
