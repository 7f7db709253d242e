//! The topology as data (issue 17): the meta group records the members, the keyspaces and
//! the placement; every node starts the groups it gives it, and the records survive
//! restarts. Real processes on loopback; every wait is on a condition.

use std::process::Command;
use std::time::Duration;

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};
use serde_json::Value;

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

fn members(c: &Cluster, via: u64) -> Value {
    c.http_get(via, "/v1/cluster/members").unwrap()
}

/// Whether every member's record holds the RESP and HTTP addresses it listens on.
fn addresses_recorded(c: &Cluster, via: u64) -> bool {
    let m = members(c, via);
    m["members"].as_array().is_some_and(|list| {
        list.len() == c.live().len()
            && list.iter().all(|m| {
                let id = m["id"].as_u64().unwrap();
                let n = c.node(id);
                m["resp"] == n.resp.to_string() && m["http"] == n.http.to_string()
            })
    })
}

#[test]
fn the_meta_group_records_members_keyspaces_and_placement_and_keeps_them_across_restarts() {
    let mut c = Cluster::start(
        bin(),
        Options {
            partitions: 4,
            ..Options::default()
        },
    );
    wait_until(
        Duration::from_secs(20),
        "every member's addresses recorded",
        || addresses_recorded(&c, 2),
    );
    let m = members(&c, 3);
    let version = m["topology_version"].as_u64().unwrap();
    assert!(version >= 1, "{m}");
    for member in m["members"].as_array().unwrap() {
        assert_eq!(member["role"], "voter", "{member}");
        assert_eq!(member["meta"], "voter", "{member}");
        assert_eq!(
            member["replicas"], 4,
            "every node holds each of 4 partitions: {member}"
        );
    }
    let ks = c.http_get(1, "/v1/keyspaces").unwrap();
    assert_eq!(ks[0]["name"], "default", "{ks}");
    assert_eq!(ks[0]["db"], 0);
    assert_eq!(ks[0]["partitions"], 4);
    assert_eq!(ks[0]["placed_factor"], 3);

    // Every node serves what it placed; the meta group is not a keyspace's partition.
    let _: () = c.redis(1).set("k", "v").unwrap();
    let got: Option<String> = c.redis(3).get("k").unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    let state = c.http_get(2, "/v1/_replication/state").unwrap();
    assert_eq!(state["partitions"].as_array().unwrap().len(), 4, "{state}");
    assert_eq!(state["meta"]["keyspace"], "meta");

    // The admin command reads the same records.
    let out = Command::new(bin())
        .args([
            "admin",
            "--addr",
            &c.node(1).http.to_string(),
            "members",
            "list",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in 1..=3 {
        assert!(text.contains(&c.node(id).resp.to_string()), "{text}");
    }
    let out = Command::new(bin())
        .args([
            "admin",
            "--addr",
            &c.node(2).http.to_string(),
            "--json",
            "keyspaces",
        ])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, ks);

    // A kill -9 of every node: the topology comes back from the disks, not rebuilt.
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.restart(id);
    }
    c.wait_ready(Duration::from_secs(30));
    c.wait_meta_converged(Duration::from_secs(30));
    let after = members(&c, 1);
    assert!(
        after["topology_version"].as_u64().unwrap() >= version,
        "{after} after {m}"
    );
    let got: Option<String> = c.redis(2).get("k").unwrap();
    assert_eq!(got.as_deref(), Some("v"));
}

/// Beyond five members the meta group keeps five voters; the others follow it as learners
/// and still learn the topology.
#[test]
fn a_seven_node_cluster_has_five_meta_voters_and_two_learners() {
    let c = Cluster::start(
        bin(),
        Options {
            nodes: 7,
            partitions: 2,
            ..Options::default()
        },
    );
    wait_until(
        Duration::from_secs(30),
        "two meta learners, and the topology on every node",
        || {
            let m = members(&c, 1);
            let meta: Vec<String> = m["members"]
                .as_array()
                .map(|l| l.iter().map(|m| m["meta"].to_string()).collect())
                .unwrap_or_default();
            meta.iter().filter(|r| *r == "\"voter\"").count() == 5
                && meta.iter().filter(|r| *r == "\"learner\"").count() == 2
                && (1..=7).all(|id| {
                    c.http_get(id, "/v1/cluster/members")
                        .is_ok_and(|v| v["members"].as_array().is_some_and(|l| l.len() == 7))
                })
        },
    );
    let _: () = c.redis(7).set("seven", 7).unwrap();
    let got: i64 = c.redis(6).get("seven").unwrap();
    assert_eq!(got, 7);
}

/// A node started with a `--peers` list that names a running cluster's members and itself
/// is not a member: it finds the meta group running on them and does not start one of its
/// own (a second initialization with another membership would be a second cluster).
#[test]
fn a_stranger_started_with_a_longer_peers_list_does_not_initialize_a_meta_group() {
    let c = Cluster::start(
        bin(),
        Options {
            partitions: 2,
            ..Options::default()
        },
    );
    wait_until(Duration::from_secs(20), "the topology written", || {
        c.http_get(1, "/v1/cluster/members").is_ok()
    });
    let dir = tempfile::tempdir().unwrap();
    let (resp, http, peer) = (
        replikv_testkit::free_port(),
        replikv_testkit::free_port(),
        replikv_testkit::free_port(),
    );
    let mut peers: Vec<String> = (1..=3)
        .map(|id| format!("{id}={}", c.node(id).peer))
        .collect();
    peers.push(format!("4={peer}"));
    let log = dir.path().join("node-4.log");
    let mut stranger = Command::new(bin())
        .args(["server", "--node-id", "4", "--peers", &peers.join(",")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--resp-listen", &resp.to_string()])
        .args(["--http-listen", &http.to_string()])
        .args(["--peer-listen", &peer.to_string()])
        .env("REPLIKV_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the stranger sees the meta group running and stays out",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("the meta group already runs on a peer")
        },
    );
    let ready = ureq::get(&format!("http://{http}/ready")).call();
    assert!(
        matches!(ready, Err(ureq::Error::Status(503, _))),
        "the stranger must not be ready: {ready:?}"
    );
    stranger.kill().unwrap();
    let _ = stranger.wait();
    let m = members(&c, 2);
    assert_eq!(m["members"].as_array().unwrap().len(), 3, "{m}");
    for id in 1..=3 {
        let st = c.http_get(id, "/v1/_replication/state").unwrap();
        assert!(
            st["meta"]["leader"].as_u64().is_some_and(|l| l <= 3),
            "{st}"
        );
    }
}
