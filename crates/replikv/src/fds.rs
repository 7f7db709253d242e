//! File descriptors: the process's limit, and how it is shared out.
//!
//! Every client connection, peer connection, log segment, database file and listener is a
//! descriptor, and RLIMIT_NOFILE caps them all together. Issue 16 found a node whose 19,990
//! idle clients took every one: its RESP and HTTP stopped answering and a restarted peer
//! could not reach it. So, at start-up:
//! 1. [`raise_nofile`] raises the soft limit to the hard one, as Redis does (the soft limit
//!    is often 1024 while the hard one is far higher).
//! 2. [`Budget::fit`] keeps a reserve for everything that is not a client, and gives RESP
//!    clients (`maxclients`) and HTTP connections (`max_http_connections`) at most what is
//!    left. The front ends refuse connections beyond their caps, so however many clients
//!    come, the reserve stays free for peers and storage.
//!
//! The reserve is counted, not guessed, where it can be: the descriptors open just before the
//! node starts (stdio, the runtime, the storage files, the three listeners, from
//! `/proc/self/fd`), plus [`PER_PEER`] for each other member (an outgoing and an incoming
//! connection, each of which can briefly be doubled while a restarted peer's old connection
//! is replaced), [`STORAGE_GROWTH`] for log segments opened as the log grows, and [`SPARE`]
//! (as Redis's 32) for what else the process opens now and then.

/// Descriptors kept per other member of the cluster.
pub const PER_PEER: usize = 4;
/// Log segments (64 MiB each) the log may open beyond those open at start: 4 GiB of log.
pub const STORAGE_GROWTH: usize = 64;
/// Descriptors kept for the rest: a refused connection's moment, directory handles opened to
/// sync, tokio's signal pipe, `/proc` reads (Redis keeps 32, `CONFIG_MIN_RESERVED_FDS`).
pub const SPARE: usize = 32;
/// Used when `/proc/self/fd` cannot be read: about what a node has open at start-up with a
/// few log segments.
const OPEN_AT_START_GUESS: usize = 64;

/// The soft RLIMIT_NOFILE in force after [`raise_nofile`], and what it was before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nofile {
    pub soft: u64,
    pub hard: u64,
    pub was: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (or to `fs.nr_open` when the hard limit
/// is unlimited: the kernel refuses more), and logs the outcome.
pub fn raise_nofile() -> std::io::Result<Nofile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // rlim_t is u64 on Linux, the one platform replikv runs on.
    let (was, hard): (u64, u64) = (lim.rlim_cur, lim.rlim_max);
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    let mut soft = was;
    if was < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the soft value does not exceed the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            soft = target;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::warn!(soft = was, hard, error = %e, "could not raise the open files limit (RLIMIT_NOFILE) to its hard limit");
        }
    }
    tracing::info!(
        soft,
        hard,
        raised_from = was,
        "open files limit (RLIMIT_NOFILE)"
    );
    Ok(Nofile { soft, hard, was })
}

/// Descriptors this process has open now, when `/proc/self/fd` says.
pub fn open_now() -> Option<usize> {
    // The directory handle read_dir holds is among those listed: one more than before the
    // call, which errs on the safe side.
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count())
}

/// How the descriptors are shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// RESP clients open at once (the `maxclients` in force).
    pub maxclients: usize,
    /// HTTP connections open at once.
    pub max_http_connections: usize,
    /// Kept for everything else (peers, storage, listeners, runtime, spare): never given to
    /// a client or an HTTP connection.
    pub reserve: usize,
}

impl Budget {
    /// Fits the asked caps under `nofile`, keeping the reserve for `members` cluster members
    /// (this node included) and `open_at_start` descriptors already open (`None`: unknown).
    /// When descriptors are short, HTTP gets at most a quarter of what the reserve leaves
    /// (at least one) and clients the rest. An error when not even one of each fits.
    pub fn fit(
        nofile: u64,
        maxclients: u64,
        max_http_connections: u64,
        members: usize,
        open_at_start: Option<usize>,
    ) -> Result<Budget, String> {
        let reserve = open_at_start.unwrap_or(OPEN_AT_START_GUESS)
            + PER_PEER * members.saturating_sub(1)
            + STORAGE_GROWTH
            + SPARE;
        let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
        let available = nofile.saturating_sub(reserve);
        if available < 2 {
            return Err(format!(
                "the open files limit (RLIMIT_NOFILE, 'ulimit -n') of {nofile} is not enough to \
                 start: this node keeps {reserve} descriptors for its {} peers, storage, \
                 listeners and runtime, and needs one more for an HTTP connection and one for \
                 a client; raise the limit to at least {}",
                members.saturating_sub(1),
                reserve + 2
            ));
        }
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let max_http_connections = to_usize(max_http_connections).min((available / 4).max(1));
        let maxclients = to_usize(maxclients).min(available - max_http_connections);
        Ok(Budget {
            maxclients,
            max_http_connections,
            reserve,
        })
    }
}

/// Logs the budget, and at warn each cap lowered below what was asked, in Redis's words for
/// `maxclients` so that an operator who knows Redis recognises it.
pub fn report(nofile: &Nofile, asked_clients: u64, asked_http: u64, b: &Budget) {
    tracing::info!(
        maxclients = b.maxclients,
        max_http_connections = b.max_http_connections,
        reserve = b.reserve,
        nofile = nofile.soft,
        "file descriptors shared out: the reserve is for peers, storage, listeners and the runtime"
    );
    if (b.maxclients as u64) < asked_clients {
        tracing::warn!(
            "You requested maxclients of {asked_clients} requiring at least {} max file \
             descriptors. Current maximum open files is {} (hard limit {}). maxclients has been \
             reduced to {} to compensate for low ulimit: {} descriptors are kept for peers, \
             storage, listeners and the runtime, and {} for HTTP connections. If you need \
             higher maxclients increase 'ulimit -n'.",
            asked_clients.saturating_add((b.reserve + b.max_http_connections) as u64),
            nofile.soft,
            nofile.hard,
            b.maxclients,
            b.reserve,
            b.max_http_connections,
        );
    }
    if (b.max_http_connections as u64) < asked_http {
        tracing::warn!(
            "max_http_connections of {asked_http} has been reduced to {} to compensate for low \
             ulimit (maximum open files {}). If you need more increase 'ulimit -n'.",
            b.max_http_connections,
            nofile.soft,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_descriptors_to_spare_the_caps_are_as_asked() {
        let b = Budget::fit(1 << 20, 10_000, 1024, 3, Some(20)).unwrap();
        assert_eq!(b.maxclients, 10_000);
        assert_eq!(b.max_http_connections, 1024);
        assert_eq!(b.reserve, 20 + 2 * PER_PEER + STORAGE_GROWTH + SPARE);
    }

    /// The reserve is never handed out: clients and HTTP together fit in what it leaves.
    #[test]
    fn a_low_limit_lowers_the_caps_and_keeps_the_reserve() {
        for nofile in [126u64, 200, 256, 1024, 4096, 11_000] {
            let b = Budget::fit(nofile, 10_000, 1024, 3, Some(20)).unwrap();
            assert!(
                b.reserve + b.maxclients + b.max_http_connections <= nofile as usize,
                "{nofile}: {b:?}"
            );
            assert!(b.maxclients >= 1 && b.max_http_connections >= 1, "{b:?}");
        }
        let b = Budget::fit(1024, 10_000, 1024, 3, Some(20)).unwrap();
        assert_eq!(b.max_http_connections, (1024 - b.reserve) / 4);
        assert_eq!(b.maxclients, 1024 - b.reserve - b.max_http_connections);
    }

    #[test]
    fn more_peers_keep_more_descriptors() {
        let three = Budget::fit(4096, 10_000, 1024, 3, Some(20)).unwrap();
        let five = Budget::fit(4096, 10_000, 1024, 5, Some(20)).unwrap();
        assert_eq!(five.reserve - three.reserve, 2 * PER_PEER);
        assert!(five.maxclients < three.maxclients);
    }

    #[test]
    fn a_limit_below_the_reserve_refuses_to_start() {
        let e = Budget::fit(100, 10_000, 1024, 3, Some(20)).unwrap_err();
        assert!(
            e.contains("'ulimit -n'") && e.contains("at least 126"),
            "{e}"
        );
        assert!(Budget::fit(126, 10_000, 1024, 3, Some(20)).is_ok());
    }

    #[test]
    fn small_caps_are_kept_as_asked() {
        let b = Budget::fit(4096, 5, 2, 3, None).unwrap();
        assert_eq!((b.maxclients, b.max_http_connections), (5, 2));
    }

    #[test]
    fn this_process_has_descriptors_open() {
        assert!(open_now().is_some_and(|n| n >= 3));
    }
}
