//! `replikv`: the server, a local cluster launcher, admin commands and the benchmark driver.
//! `main` parses the command line and hands off; each subcommand lives in its own file.

mod admin;
mod bench;
mod fds;
mod identity;
mod local_cluster;
mod server;
mod service;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use replikv::config;

#[derive(Parser)]
#[command(
    name = "replikv",
    version,
    about = "A replicated, sharded key-value store that speaks the Redis protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node. With no flags: a single-node cluster with data in ./data.
    Server(server::ServerArgs),
    /// Start a local N-node cluster as child processes; Ctrl-C stops them all.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// RESP ports are base, base+1, ...; peer ports base+1000...; HTTP ports base+2000...
        #[arg(long, default_value_t = 6380)]
        base_port: u16,
        /// Each node keeps its data in DIR/node<N>.
        #[arg(long, default_value = "./data/cluster")]
        data_dir: PathBuf,
        /// Extra YAML configuration applied to every node.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Inspect and operate a running cluster through a node's HTTP API.
    Admin(admin::AdminArgs),
    /// Load generator: SET/GET throughput and latency over RESP (see docs/BENCHMARKS.md).
    Bench(bench::BenchArgs),
}

// mimalloc rather than glibc malloc: the write path allocates per request (frames, futures,
// log records), and glibc's allocator took about a fifth of the server's CPU under load
// (docs/BENCHMARKS.md, profiles).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server::run(args),
        Command::Cluster {
            nodes,
            base_port,
            data_dir,
            config,
        } => local_cluster::run(nodes, base_port, data_dir, config),
        Command::Admin(args) => admin::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("replikv: {e:#}");
        std::process::exit(2);
    }
}
