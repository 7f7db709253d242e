//! `replikv server`: load configuration, raise the open files limit, open storage, bind
//! listeners, share the descriptors out (`fds.rs`), start the partition groups, serve RESP,
//! HTTP and peers until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use replikv_cluster::messages::Hello;
use replikv_cluster::transport::Transport;
use replikv_cluster::Node;
use replikv_storage::{DiskSpace, FsyncPolicy};
use replikv_types::{ConnLimit, Consistency, ReadPreference};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{parse_peers, Config};

#[derive(Args, Debug, Default)]
pub struct ServerArgs {
    /// YAML configuration file.
    #[arg(long, env = "REPLIKV_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "REPLIKV_NODE_ID")]
    pub node_id: Option<u64>,
    #[arg(long, env = "REPLIKV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "REPLIKV_RESP_LISTEN")]
    pub resp_listen: Option<String>,
    #[arg(long, env = "REPLIKV_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    #[arg(long, env = "REPLIKV_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Initial members: ID=ADDR,... by peer address (every initial node gets the same list).
    #[arg(long, env = "REPLIKV_PEERS")]
    pub peers: Option<String>,
    /// Add this node to a running cluster through any member.
    #[arg(long, env = "REPLIKV_JOIN")]
    pub join: Option<String>,
    /// voter (default) or replica (a learner that serves reads only).
    #[arg(long, env = "REPLIKV_ROLE")]
    pub role: Option<String>,
    #[arg(long, env = "REPLIKV_PARTITIONS")]
    pub partitions: Option<u32>,
    #[arg(long, env = "REPLIKV_FACTOR")]
    pub factor: Option<usize>,
    /// Default write level: eventual, at_least:N, quorum, all.
    #[arg(long, env = "REPLIKV_CONSISTENCY")]
    pub consistency: Option<String>,
    /// Default read preference: primary, secondary, nearest, any.
    #[arg(long, env = "REPLIKV_READ_PREFERENCE")]
    pub read_preference: Option<String>,
    #[arg(long, env = "REPLIKV_MAX_LAG_MS")]
    pub max_lag_ms: Option<u64>,
    #[arg(long, env = "REPLIKV_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// always, everysec or never.
    #[arg(long, env = "REPLIKV_FSYNC")]
    pub fsync: Option<String>,
    /// RESP clients served at once (Redis's maxclients; default 10000); lowered at start-up
    /// when the open files limit cannot hold it beside the peers' reserve.
    #[arg(long, env = "REPLIKV_MAXCLIENTS")]
    pub maxclients: Option<u64>,
}

/// File, then environment and flags (clap resolves those two: a flag wins).
pub fn load(args: &ServerArgs) -> anyhow::Result<Config> {
    let (mut cfg, in_file) = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            (
                Config::from_yaml(&text).map_err(anyhow::Error::msg)?,
                crate::config::given_keys(&text),
            )
        }
        None => (Config::default(), Default::default()),
    };
    if let Some(v) = args.node_id {
        cfg.node_id = v;
    }
    if let Some(v) = &args.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = &args.resp_listen {
        cfg.listen.resp = v.clone();
    }
    if let Some(v) = &args.http_listen {
        cfg.listen.http = v.clone();
    }
    if let Some(v) = &args.peer_listen {
        cfg.listen.peer = Some(v.clone());
    }
    // What the data directory says of this node (`identity.rs`), where the start does not.
    let identity = crate::identity::load(&cfg.data_dir).map_err(anyhow::Error::msg)?;
    if let Some(id) = &identity {
        if (args.node_id.is_some() || in_file.node_id) && cfg.node_id != id.node_id {
            bail!(
                "the data directory {} belongs to node {} (its {}), not node {}: start it with \
                 --node-id {} or no --node-id, or give node {} an empty data directory",
                cfg.data_dir.display(),
                id.node_id,
                crate::identity::FILE,
                cfg.node_id,
                id.node_id,
                cfg.node_id
            );
        }
        cfg.node_id = id.node_id;
        if args.resp_listen.is_none() && !in_file.resp_listen {
            cfg.listen.resp = id.resp.clone();
        }
        if args.http_listen.is_none() && !in_file.http_listen {
            cfg.listen.http = id.http.clone();
        }
        if args.peer_listen.is_none() && !in_file.peer_listen {
            cfg.listen.peer = Some(id.peer.clone());
        }
    }
    if let Some(v) = &args.peers {
        cfg.peers = parse_peers(v).map_err(anyhow::Error::msg)?;
    } else if let Some(id) = identity.as_ref().filter(|_| !in_file.peers) {
        cfg.peers = id.peers.clone();
    } else if args.config.is_none() && cfg.node_id != 1 {
        // A lone node that is not node 1 still needs a peer entry for itself.
        let addr = cfg
            .listen
            .peer
            .clone()
            .unwrap_or_else(|| "127.0.0.1:7380".into());
        cfg.peers = [(cfg.node_id, addr)].into_iter().collect();
    }
    if let Some(v) = args.partitions {
        cfg.replication.partitions = v;
    }
    if let Some(v) = args.factor {
        cfg.replication.factor = v;
    }
    if let Some(v) = &args.consistency {
        cfg.replication.consistency = v
            .parse::<Consistency>()
            .map_err(|e| anyhow::anyhow!("--consistency: {e}"))?;
    }
    if let Some(v) = &args.read_preference {
        cfg.replication.read_preference = v
            .parse::<ReadPreference>()
            .map_err(|e| anyhow::anyhow!("--read-preference: {e}"))?;
    }
    if let Some(v) = args.max_lag_ms {
        cfg.replication.max_lag_ms = v;
    }
    if let Some(v) = args.write_timeout_ms {
        cfg.replication.write_timeout_ms = v;
    }
    if let Some(v) = args.maxclients {
        cfg.limits.maxclients = v;
    }
    if let Some(v) = &args.fsync {
        cfg.storage.fsync = v
            .parse::<FsyncPolicy>()
            .map_err(|e| anyhow::anyhow!("--fsync: {e}"))?;
    }
    if args.join.is_some() || args.role.as_deref().is_some_and(|r| r != "voter") {
        bail!("--join and --role replica (adding nodes and read replicas to a running cluster) are not available in this version: the members are the cluster's own data now (replikv admin members list), but changing them while it serves is still being built; start every node of a new cluster with the same --peers");
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    if cfg.debug.skip_read_index {
        tracing::warn!("debug.skip_read_index is set: primary reads are NOT linearizable (test-only bug injection)");
    }
    if cfg.debug.ack_before_commit {
        tracing::warn!("debug.ack_before_commit is set: quorum writes may be acknowledged and then lost (test-only bug injection)");
    }
    if cfg.debug.stamp_with_wall_clock {
        tracing::warn!("debug.stamp_with_wall_clock is set: a leader whose wall clock jumps sets wrong expiries (test-only bug injection)");
    }
    Ok(cfg)
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_logging();
    let cfg = load(&args)?;
    // Before anything is opened. A raise the kernel refuses is logged and leaves the limit
    // as it was; the budget below then works with that.
    let nofile = crate::fds::raise_nofile().context("reading the open files limit")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(cfg, nofile))
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPLIKV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(cfg: Config, nofile: crate::fds::Nofile) -> anyhow::Result<()> {
    // 1. Storage.
    let members = cfg.peers.keys().copied().collect();
    let hosted = replikv_cluster::hosted_groups(cfg.node_id, &cfg.peers, &cfg.replication)
        .map_err(anyhow::Error::msg)?;
    let stores = replikv_raft::open_stores(
        &cfg.data_dir,
        cfg.storage.fsync,
        cfg.node_id,
        &members,
        &hosted,
    )
    .map_err(|e| anyhow::anyhow!("opening {}: {e}", cfg.data_dir.display()))?;
    let total = DiskSpace::new(&cfg.data_dir, 0).total_bytes();
    let space = Arc::new(DiskSpace::new(
        &cfg.data_dir,
        cfg.storage.min_free_bytes(total),
    ));
    tracing::info!(
        free_bytes = space.free_bytes(),
        min_free_bytes = space.min_free_bytes(),
        "disk space of the data directory"
    );
    stores.log.watch_space(space);
    // 2. Listeners (port 0 is allowed; the bound addresses are printed).
    let peer_bind = cfg
        .listen
        .peer
        .clone()
        .unwrap_or_else(|| cfg.advertised_peer());
    let peer = TcpListener::bind(&peer_bind)
        .await
        .with_context(|| format!("binding peer listener {peer_bind}"))?;
    let resp = TcpListener::bind(&cfg.listen.resp)
        .await
        .with_context(|| format!("binding RESP listener {}", cfg.listen.resp))?;
    let http = TcpListener::bind(&cfg.listen.http)
        .await
        .with_context(|| format!("binding HTTP listener {}", cfg.listen.http))?;
    let (resp_addr, http_addr, peer_addr) =
        (resp.local_addr()?, http.local_addr()?, peer.local_addr()?);
    // 3. File descriptors: what is open now (runtime, storage, listeners) is counted into
    // the peers' reserve, and clients and HTTP connections are capped to fit beside it.
    let budget = crate::fds::Budget::fit(
        nofile.soft,
        cfg.limits.maxclients,
        cfg.limits.max_http_connections,
        cfg.peers.len(),
        crate::fds::open_now(),
    )
    .map_err(anyhow::Error::msg)?;
    crate::fds::report(
        &nofile,
        cfg.limits.maxclients,
        cfg.limits.max_http_connections,
        &budget,
    );
    let clients = ConnLimit::new(budget.maxclients);
    let http_connections = ConnLimit::new(budget.max_http_connections);
    // 4. Partition groups.
    let transport = Transport::new(Hello {
        node_id: cfg.node_id,
        resp_addr: resp_addr.to_string(),
        http_addr: http_addr.to_string(),
    });
    let mut node_cfg = cfg.node_config();
    let identity = crate::identity::load(&cfg.data_dir).map_err(anyhow::Error::msg)?;
    let (dir, bound) = (
        cfg.data_dir.clone(),
        (
            resp_addr.to_string(),
            http_addr.to_string(),
            peer_addr.to_string(),
        ),
    );
    let me = cfg.node_id;
    node_cfg.known_placement = identity.and_then(|id| id.placement);
    node_cfg.on_topology = replikv_cluster::TopologyHook::new(move |t| {
        let id = crate::identity::Identity::new(
            me,
            bound.0.clone(),
            bound.1.clone(),
            bound.2.clone(),
            t.peers(),
            t.default_placement().cloned(),
        );
        if let Err(e) = crate::identity::save(&dir, &id) {
            tracing::error!(error = %e, "could not record this node's identity");
        }
    });
    let node = Node::start(node_cfg, stores, transport.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    // 5. Serve.
    let (stop_tx, stop_rx) = watch::channel(false);
    let handler: Arc<dyn replikv_cluster::transport::Handler> = node.clone();
    let peers = tokio::spawn(transport.serve(peer, handler, stop_rx.clone()));
    let service = Arc::new(crate::service::NodeService::new(node.clone(), &cfg));
    let resp_task = tokio::spawn(replikv_resp::serve(
        resp,
        service,
        clients.clone(),
        stop_rx.clone(),
    ));
    let http_cfg = replikv_http::HttpConfig {
        max_key_bytes: cfg.limits.max_key_bytes,
        max_value_bytes: cfg.limits.max_value_bytes,
        fault_injection: cfg.debug.fault_injection,
        connections: http_connections.clone(),
        listeners: vec![("resp", clients), ("http", http_connections)],
    };
    let http_task = tokio::spawn(replikv_http::serve(http, node.clone(), http_cfg, stop_rx));
    // The line tests and `replikv cluster` read to learn the bound addresses.
    println!(
        "replikv node {} ready: resp={resp_addr} http={http_addr} peer={peer_addr} data={}",
        cfg.node_id,
        cfg.data_dir.display()
    );
    tracing::info!(node = cfg.node_id, %resp_addr, %http_addr, %peer_addr, partitions = cfg.replication.partitions, "serving");
    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    node.shutdown().await;
    let _ = tokio::join!(peers, resp_task, http_task);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_for(dir: &std::path::Path) -> ServerArgs {
        ServerArgs {
            data_dir: Some(dir.to_path_buf()),
            ..ServerArgs::default()
        }
    }

    /// A data directory's `node.json` gives what the start does not, and a start as another
    /// node is refused.
    #[test]
    fn the_data_directory_names_the_node_and_its_peers() {
        let dir = tempfile::tempdir().unwrap();
        let peers: std::collections::BTreeMap<u64, String> = [
            (1, "127.0.0.1:7001".to_string()),
            (2, "127.0.0.1:7002".to_string()),
            (3, "127.0.0.1:7003".to_string()),
        ]
        .into();
        let id = crate::identity::Identity::new(
            2,
            "127.0.0.1:6002".into(),
            "127.0.0.1:8002".into(),
            "127.0.0.1:7002".into(),
            peers.clone(),
            None,
        );
        crate::identity::save(dir.path(), &id).unwrap();
        let cfg = load(&args_for(dir.path())).unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.peers, peers);
        assert_eq!(cfg.listen.resp, "127.0.0.1:6002");
        assert_eq!(cfg.listen.peer.as_deref(), Some("127.0.0.1:7002"));

        let other = ServerArgs {
            node_id: Some(3),
            ..args_for(dir.path())
        };
        let e = load(&other).unwrap_err().to_string();
        assert!(e.contains("belongs to node 2"), "{e}");

        let flags = ServerArgs {
            node_id: Some(2),
            resp_listen: Some("127.0.0.1:6999".into()),
            ..args_for(dir.path())
        };
        assert_eq!(load(&flags).unwrap().listen.resp, "127.0.0.1:6999");
    }
}
