//! `replikv cluster --nodes N`: a local cluster for trying replikv out. Starts N
//! `replikv server` child processes on loopback, prints their endpoints, and stops them all
//! on Ctrl-C or SIGTERM. A node that dies is reported with the command that restarts it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

pub fn run(
    nodes: u64,
    base_port: u16,
    data_dir: PathBuf,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    if nodes == 0 || nodes > 7 {
        bail!("--nodes must be between 1 and 7 (got {nodes})");
    }
    if base_port as u64 + 2000 + nodes > 65535 {
        bail!("--base-port {base_port} leaves no room for {nodes} nodes (peer and HTTP ports are base+1000 and base+2000)");
    }
    let port = |offset: u16, i: u64| base_port + offset + (i as u16 - 1);
    let peers = (1..=nodes)
        .map(|i| format!("{i}=127.0.0.1:{}", port(1000, i)))
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe().context("locating the replikv binary")?;
    let mut children: Vec<(u64, Child)> = Vec::new();
    let mut restart_args: Vec<Vec<String>> = Vec::new();
    for i in 1..=nodes {
        let dir = data_dir.join(format!("node{i}"));
        let mut cmd = Command::new(&exe);
        cmd.arg("server")
            .args(["--node-id", &i.to_string()])
            .args(["--peers", &peers])
            .args(["--resp-listen", &format!("127.0.0.1:{}", port(0, i))])
            .args(["--peer-listen", &format!("127.0.0.1:{}", port(1000, i))])
            .args(["--http-listen", &format!("127.0.0.1:{}", port(2000, i))])
            .arg("--data-dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stdin(Stdio::null());
        // Children stop with the launcher, even if it is killed.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        if let Some(c) = &config {
            cmd.arg("--config").arg(c);
        }
        restart_args.push(
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        );
        let child = cmd.spawn().with_context(|| format!("starting node {i}"))?;
        children.push((i, child));
    }
    println!("replikv: local cluster of {nodes} node(s) (Ctrl-C stops them all)");
    for i in 1..=nodes {
        println!(
            "  node {i}: redis-cli -p {}   http://127.0.0.1:{}   peer 127.0.0.1:{}   data {}",
            port(0, i),
            port(2000, i),
            port(1000, i),
            data_dir.join(format!("node{i}")).display()
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    // A node that dies (kill -9 to watch failover, say) is reported; the others keep running.
    let mut reported = std::collections::BTreeSet::new();
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        for (i, c) in children.iter_mut() {
            if let Some(status) = c.try_wait().ok().flatten() {
                if reported.insert(*i) {
                    eprintln!("replikv: node {i} exited ({status}); the others keep running. Restart it with:");
                    eprintln!(
                        "  {} {}",
                        exe.display(),
                        restart_args[(*i - 1) as usize].join(" ")
                    );
                }
            }
        }
        if reported.len() == children.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (_, c) in &mut children {
        // SIGTERM lets each node shut down cleanly.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
    }
    for (i, c) in &mut children {
        let _ = c.wait();
        println!("  node {i} stopped");
    }
    Ok(())
}
