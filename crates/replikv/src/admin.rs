//! `replikv admin`: status and promote through a node's HTTP API. Tables for people,
//! `--json` for scripts.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args)]
pub struct AdminArgs {
    /// Any node's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080", global = true)]
    addr: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// This node's partitions, leaders, offsets and replica lag.
    Status,
    /// Move leadership of a partition to a chosen replica.
    Promote {
        #[arg(long)]
        partition: u32,
        #[arg(long)]
        node: u64,
    },
    /// The cluster's members, as the meta group records them.
    Members {
        #[command(subcommand)]
        action: Option<MembersAction>,
    },
    /// Keyspaces, their numbers (`db`) and policies.
    Keyspaces {
        #[command(subcommand)]
        action: Option<KeyspacesAction>,
    },
}

#[derive(Subcommand, Clone, Copy)]
enum MembersAction {
    /// Every member: id, role, addresses, zone, region, its place in the meta group, and
    /// the replicas it holds (the default).
    List,
}

#[derive(Subcommand, Clone, Copy)]
enum KeyspacesAction {
    /// Every keyspace with its `db` number and policy (the default).
    List,
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

fn url(addr: &str, path: &str) -> String {
    if addr.starts_with("http") {
        format!("{addr}{path}")
    } else {
        format!("http://{addr}{path}")
    }
}

async fn run_async(args: AdminArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let (path, body) = match &args.command {
        AdminCommand::Status => ("/v1/_replication/state", None),
        AdminCommand::Promote { partition, node } => (
            "/v1/_replication/promote",
            Some(serde_json::json!({"partition": partition, "node": node})),
        ),
        AdminCommand::Members { .. } => ("/v1/cluster/members", None),
        AdminCommand::Keyspaces { .. } => ("/v1/keyspaces", None),
    };
    let req = match &body {
        Some(b) => client.post(url(&args.addr, path)).json(b),
        None => client.get(url(&args.addr, path)),
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("contacting {}", args.addr))?;
    let status = resp.status();
    let value: Value = resp.json().await.context("reading the answer")?;
    if !status.is_success() {
        bail!(
            "{}: {}",
            status,
            value["message"].as_str().unwrap_or(&value.to_string())
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match args.command {
        AdminCommand::Status => print_status(&value),
        AdminCommand::Promote { partition, node } => {
            println!("partition {partition}: leadership moved to node {node}")
        }
        AdminCommand::Members { .. } => print_members(&value),
        AdminCommand::Keyspaces { .. } => print_keyspaces(&value),
    }
    Ok(())
}

fn print_members(v: &Value) {
    println!("topology version {}", cell(&v["topology_version"]));
    println!(
        "{:>4}  {:<7} {:<21} {:<21} {:<21} {:<8} {:<8} {:<7} {:>8} {:>5}",
        "id", "role", "peer", "resp", "http", "zone", "region", "meta", "replicas", "leads"
    );
    let empty = Vec::new();
    for m in v["members"].as_array().unwrap_or(&empty) {
        println!(
            "{:>4}  {:<7} {:<21} {:<21} {:<21} {:<8} {:<8} {:<7} {:>8} {:>5}",
            cell(&m["id"]),
            cell(&m["role"]),
            cell(&m["peer"]),
            cell(&m["resp"]),
            cell(&m["http"]),
            cell(&m["zone"]),
            cell(&m["region"]),
            cell(&m["meta"]),
            cell(&m["replicas"]),
            cell(&m["leads"]),
        );
    }
}

fn print_keyspaces(v: &Value) {
    println!(
        "{:<16} {:>3} {:>10} {:>6} {:>6} {:<12} {:<10} {:>10}",
        "name", "db", "partitions", "factor", "placed", "consistency", "read", "max_lag_ms"
    );
    let empty = Vec::new();
    for k in v.as_array().unwrap_or(&empty) {
        println!(
            "{:<16} {:>3} {:>10} {:>6} {:>6} {:<12} {:<10} {:>10}",
            cell(&k["name"]),
            cell(&k["db"]),
            cell(&k["partitions"]),
            cell(&k["factor"]),
            cell(&k["placed_factor"]),
            cell(&k["consistency"]),
            cell(&k["read_preference"]),
            cell(&k["max_lag_ms"]),
        );
    }
}

/// A JSON value as table text (`serde_json::Value` ignores width and alignment).
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_status(v: &Value) {
    println!(
        "node {}  resp {}  http {}",
        v["node_id"],
        v["resp_addr"].as_str().unwrap_or(""),
        v["http_addr"].as_str().unwrap_or("")
    );
    let clock = &v["clock"];
    let peers: Vec<String> = clock["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| format!("node {} {} ms", cell(&p["node_id"]), cell(&p["offset_ms"])))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "clock {} (max offset {} ms; peers' offsets: {})",
        if clock["in_step"].as_bool() == Some(true) {
            "in step"
        } else {
            "NOT IN STEP: leads nothing, serves no follower reads"
        },
        cell(&clock["max_clock_offset_ms"]),
        if peers.is_empty() {
            "none".to_string()
        } else {
            peers.join(", ")
        }
    );
    println!(
        "{:>9}  {:<9} {:>6} {:>9} {:>5} {:>10} {:>10} {:>10}",
        "partition", "role", "leader", "preferred", "term", "last", "applied", "stale_ms"
    );
    let empty = vec![];
    for p in v["partitions"].as_array().unwrap_or(&empty) {
        println!(
            "{:>9}  {:<9} {:>6} {:>9} {:>5} {:>10} {:>10} {:>10}",
            p["partition"],
            p["role"].as_str().unwrap_or(""),
            p["leader"],
            p["preferred_leader"],
            p["term"],
            p["last_offset"],
            p["applied_offset"],
            p["staleness_ms"]
        );
        for r in p["replicas"].as_array().unwrap_or(&empty) {
            println!(
                "{:>9}    replica {:>3}: matched {:>10}  lag {:>6} ops {:>6} ms  {:<8} {:<9} heartbeat {} ms ago",
                "", cell(&r["node_id"]), cell(&r["matched_offset"]), cell(&r["lag_ops"]), cell(&r["lag_ms"]),
                cell(&r["state"]), cell(&r["health"]), cell(&r["last_heartbeat_ms_ago"])
            );
        }
    }
}
