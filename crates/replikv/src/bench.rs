//! `replikv bench`: a RESP load generator. Each client sends `--pipeline` commands, waits
//! for their replies, and records the batch's latency for each command in it. Keys are
//! `key:<n>` with n uniform (or zipfian with `--zipf`) over `--keys`, from a fixed seed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::Args;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use replikv_resp::codec::{encode, parse_frame, Frame, Limits, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value = "127.0.0.1:6380")]
    addr: String,
    #[arg(long, default_value_t = 50)]
    clients: usize,
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// set, get, or a read percentage for a mixed workload (ycsb-a = 50, ycsb-b = 95, ycsb-c = 100).
    #[arg(long, default_value = "set")]
    workload: String,
    /// Write level sent with REPLIKV.CONSISTENCY (omit for the server default).
    #[arg(long)]
    consistency: Option<String>,
    /// Read preference sent with REPLIKV.READ.
    #[arg(long)]
    read: Option<String>,
    /// Zipfian key choice with this exponent (YCSB uses 0.99).
    #[arg(long)]
    zipf: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many seconds even if --requests are not all sent.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Follow every SET with `WAIT N 0` in the same round trip, timed as one operation
    /// (Redis's way to wait for N replicas).
    #[arg(long)]
    wait: Option<u32>,
    /// Keys in order (0, 1, 2, ... over all clients) instead of random: loads every key once.
    #[arg(long)]
    sequential: bool,
    /// Operations that complete in this first part of the run are not counted.
    #[arg(long, default_value_t = 0.0)]
    warmup_secs: f64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let read_pct: u32 = match args.workload.as_str() {
        "set" => 0,
        "get" => 100,
        "ycsb-a" => 50,
        "ycsb-b" => 95,
        "ycsb-c" => 100,
        other => other.parse().ok().filter(|p| *p <= 100).with_context(|| {
            format!("--workload {other:?}: use set, get, ycsb-a|b|c or a read percentage 0-100")
        })?,
    };
    if args.clients == 0 || args.pipeline == 0 {
        bail!("--clients and --pipeline must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(drive(args, read_pct))
}

struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Zipf {
        let n = n.min(1_000_000) as usize;
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for i in 1..=n {
            sum += 1.0 / (i as f64).powf(s);
            cdf.push(sum);
        }
        cdf.iter_mut().for_each(|c| *c /= sum);
        Zipf { cdf }
    }
    fn sample(&self, r: f64) -> u64 {
        self.cdf.partition_point(|c| *c < r) as u64
    }
}

async fn drive(args: BenchArgs, read_pct: u32) -> anyhow::Result<()> {
    let zipf = args.zipf.map(|s| Arc::new(Zipf::new(args.keys, s)));
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(ErrorWindow::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (args, zipf, issued, errors) =
            (args.clone(), zipf.clone(), issued.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            client(c as u64, args, read_pct, zipf, issued, errors, started).await
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut completions = Vec::new();
    for t in tasks {
        let (h, done_ms) = t.await??;
        hist.add(h).expect("same bounds");
        completions.extend(done_ms);
    }
    let secs = (started.elapsed().as_secs_f64() - args.warmup_secs).max(1e-9);
    let longest_gap = longest_gap_ms(&mut completions);
    let done = hist.len();
    let ops = done as f64 / secs;
    let max = hist.max();
    let (p50, p99, p999) = (
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
    );
    let errs = errors.count.load(Ordering::Relaxed);
    let (first_err, last_err) = errors.window_ms();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"workload": args.workload, "clients": args.clients, "pipeline": args.pipeline,
                "value_size": args.value_size, "consistency": args.consistency, "read": args.read,
                "requests": done, "errors": errs, "seconds": secs, "ops_per_sec": ops,
                "first_error_ms": first_err, "last_error_ms": last_err, "longest_gap_ms": longest_gap,
                "p50_us": p50, "p99_us": p99, "p999_us": p999, "max_us": max})
        );
    } else {
        println!(
            "{}: {done} requests ({errs} errors) in {secs:.2} s = {ops:.0} ops/s; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
            args.workload, p50 as f64 / 1000.0, p99 as f64 / 1000.0, p999 as f64 / 1000.0
        );
        if let (Some(a), Some(b)) = (first_err, last_err) {
            println!(
                "errors between {a} ms and {b} ms after the start (window {} ms)",
                b - a
            );
        }
    }
    Ok(())
}

/// The longest time (ms) without a successful completion, between the first and last.
fn longest_gap_ms(done_ms: &mut [u32]) -> u32 {
    done_ms.sort_unstable();
    done_ms.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

/// When errors happened, in ms since the run started.
#[derive(Default)]
struct ErrorWindow {
    count: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
}

impl ErrorWindow {
    fn record(&self, at: Duration) {
        let ms = at.as_millis() as u64 + 1;
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .first
            .compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
        self.first.fetch_min(ms, Ordering::Relaxed);
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn window_ms(&self) -> (Option<u64>, Option<u64>) {
        let (a, b) = (
            self.first.load(Ordering::Relaxed),
            self.last.load(Ordering::Relaxed),
        );
        if a == 0 {
            (None, None)
        } else {
            (Some(a - 1), Some(b - 1))
        }
    }
}

fn command(parts: &[&[u8]], out: &mut BytesMut) {
    let frame = Frame::Array(
        parts
            .iter()
            .map(|p| Frame::Bulk(bytes::Bytes::copy_from_slice(p)))
            .collect(),
    );
    encode(&frame, Protocol::Resp2, out);
}

async fn client(
    id: u64,
    args: BenchArgs,
    read_pct: u32,
    zipf: Option<Arc<Zipf>>,
    issued: Arc<AtomicU64>,
    errors: Arc<ErrorWindow>,
    started: Instant,
) -> anyhow::Result<(Histogram<u64>, Vec<u32>)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    // Completion times (ms since the start) of successful batches, for the longest gap.
    let mut done_ms = Vec::new();
    let warmup = Duration::from_secs_f64(args.warmup_secs.max(0.0));
    let mut stream = TcpStream::connect(&args.addr)
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    stream.set_nodelay(true)?;
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(id));
    let value = vec![b'x'; args.value_size];
    let wait = args.wait.map(|n| n.to_string());
    let mut out = BytesMut::new();
    let mut input = BytesMut::with_capacity(64 * 1024);
    let limits = Limits::default();
    let mut setup = 0;
    if let Some(c) = &args.consistency {
        command(&[b"REPLIKV.CONSISTENCY", c.as_bytes()], &mut out);
        setup += 1;
    }
    if let Some(r) = &args.read {
        command(&[b"REPLIKV.READ", r.as_bytes()], &mut out);
        setup += 1;
    }
    if setup > 0 {
        stream.write_all(&out).await?;
        out.clear();
        for _ in 0..setup {
            if let Frame::Error(e) = read_frame(&mut stream, &mut input, &limits).await? {
                bail!("setup refused: {e}");
            }
        }
    }
    loop {
        let claimed = issued.fetch_add(args.pipeline as u64, Ordering::Relaxed);
        let out_of_time = args
            .duration_secs
            .is_some_and(|d| started.elapsed().as_secs_f64() >= d);
        if claimed >= args.requests || out_of_time {
            return Ok((hist, done_ms));
        }
        let batch = (args.requests - claimed).min(args.pipeline as u64) as usize;
        let mut replies = 0;
        for i in 0..batch {
            let k = if args.sequential {
                (claimed + i as u64) % args.keys.max(1)
            } else {
                match &zipf {
                    Some(z) => z.sample(rng.random::<f64>()),
                    None => rng.random_range(0..args.keys),
                }
            };
            let key = format!("key:{k:012}");
            if rng.random_range(0..100) < read_pct {
                command(&[b"GET", key.as_bytes()], &mut out);
            } else {
                command(&[b"SET", key.as_bytes(), &value], &mut out);
                if let Some(n) = &wait {
                    command(&[b"WAIT", n.as_bytes(), b"0"], &mut out);
                    replies += 1;
                }
            }
            replies += 1;
        }
        let t = Instant::now();
        stream.write_all(&out).await?;
        out.clear();
        let mut failed = false;
        for _ in 0..replies {
            if let Frame::Error(_) = read_frame(&mut stream, &mut input, &limits).await? {
                failed = true;
                errors.record(started.elapsed());
            }
        }
        let elapsed = started.elapsed();
        if elapsed < warmup {
            continue;
        }
        if !failed {
            done_ms.push(elapsed.as_millis() as u32);
        }
        let us = t.elapsed().as_micros().max(1) as u64;
        for _ in 0..batch {
            hist.record(us.min(60_000_000)).expect("in bounds");
        }
    }
}

async fn read_frame(
    stream: &mut TcpStream,
    input: &mut BytesMut,
    limits: &Limits,
) -> anyhow::Result<Frame> {
    loop {
        if let Some(f) = parse_frame(input, limits).map_err(|e| anyhow::anyhow!("{e}"))? {
            return Ok(f);
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read_buf(input))
            .await
            .context("reply timed out")??;
        if n == 0 {
            bail!("server closed the connection");
        }
    }
}
