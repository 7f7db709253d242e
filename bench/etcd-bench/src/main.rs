//! `etcd-bench`: the etcd side of `bench/compare.py`. A closed loop like `replikv bench` and
//! `redis-benchmark`: each client sends one request, waits for the answer, sends the next.
//! Clients share `--conns` gRPC connections (as etcd's own `benchmark` tool does). Latencies
//! after the warm-up go into one histogram; the result is one JSON line on stdout.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use etcd_client::{Client, GetOptions, KvClient};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Op {
    /// Put a value of --value-size bytes.
    Put,
    /// Linearizable range read of one key (etcd's default).
    GetLin,
    /// Serializable range read of one key: the member answers from its own state.
    GetSerial,
}

#[derive(Parser, Debug)]
struct Args {
    /// Comma-separated client URLs, e.g. http://127.0.0.1:2379.
    #[arg(long)]
    endpoints: String,
    #[arg(long, value_enum, default_value = "put")]
    op: Op,
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// gRPC connections the clients share (default: one per client, at most 100).
    #[arg(long)]
    conns: Option<usize>,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Requests in this first part of the run are not counted.
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Put every key once before a read run, so reads find values.
    #[arg(long)]
    preload: bool,
}

struct ClientResult {
    hist: Histogram<u64>,
    /// Completion times (ms since the start) of successful requests.
    done_ms: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        args.duration_secs > args.warmup_secs,
        "--duration-secs must exceed --warmup-secs"
    );
    let endpoints: Vec<String> = args.endpoints.split(',').map(str::to_string).collect();
    let conns = args.conns.unwrap_or(args.clients.min(100)).max(1);
    let mut kvs = Vec::with_capacity(conns);
    for _ in 0..conns {
        let c = Client::connect(endpoints.clone(), None)
            .await
            .with_context(|| format!("connecting to {}", args.endpoints))?;
        kvs.push(c.kv_client());
    }
    let value = vec![b'x'; args.value_size];
    if args.preload {
        preload(&kvs, args.keys, &value).await?;
    }

    let start = Instant::now();
    let warm = start + Duration::from_secs_f64(args.warmup_secs);
    let end = start + Duration::from_secs_f64(args.duration_secs);
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let kv = kvs[i % conns].clone();
        let value = value.clone();
        let (op, keys, seed) = (args.op, args.keys, args.seed);
        tasks.push(tokio::spawn(async move {
            run_client(kv, op, keys, value, seed ^ (i as u64 + 1), warm, end).await
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut errors, mut first_error) = (0, None);
    let mut done_ms = Vec::new();
    for t in tasks {
        let r = t.await?;
        hist.add(&r.hist)?;
        done_ms.extend(r.done_ms);
        errors += r.errors;
        first_error = first_error.or(r.first_error);
    }
    let secs = args.duration_secs - args.warmup_secs;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    // The longest time without a successful completion (a failover shows here).
    done_ms.sort_unstable();
    let longest_gap_ms = done_ms.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let out = serde_json::json!({
        "op": format!("{:?}", args.op).to_lowercase(),
        "clients": args.clients,
        "conns": conns,
        "ops": hist.len(),
        "secs": secs,
        "rps": hist.len() as f64 / secs,
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "max_ms": hist.max() as f64 / 1000.0,
        "longest_gap_ms": longest_gap_ms,
        "errors": errors,
        "first_error": first_error,
    });
    println!("{out}");
    Ok(())
}

async fn preload(kvs: &[KvClient], keys: u64, value: &[u8]) -> anyhow::Result<()> {
    let per = keys.div_ceil(kvs.len() as u64);
    let mut tasks = Vec::new();
    for (i, kv) in kvs.iter().enumerate() {
        let mut kv = kv.clone();
        let value = value.to_vec();
        let range = (i as u64 * per)..((i as u64 + 1) * per).min(keys);
        tasks.push(tokio::spawn(async move {
            for k in range {
                kv.put(format!("key:{k}"), value.clone(), None).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn run_client(
    mut kv: KvClient,
    op: Op,
    keys: u64,
    value: Vec<u8>,
    seed: u64,
    warm: Instant,
    end: Instant,
) -> ClientResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = warm;
    let mut r = ClientResult {
        hist: Histogram::new(3).expect("3 significant digits is valid"),
        done_ms: Vec::new(),
        errors: 0,
        first_error: None,
    };
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            return r;
        }
        let key = format!("key:{}", rng.gen_range(0..keys));
        let res = match op {
            Op::Put => kv.put(key, value.clone(), None).await.map(|_| ()),
            Op::GetLin => kv.get(key, None).await.map(|_| ()),
            Op::GetSerial => kv
                .get(key, Some(GetOptions::new().with_serializable()))
                .await
                .map(|_| ()),
        };
        if t0 < warm {
            continue;
        }
        match res {
            Ok(()) => {
                let us = t0.elapsed().as_micros() as u64;
                let _ = r.hist.record(us.max(1));
                r.done_ms.push(start.elapsed().as_millis() as u32);
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
}
