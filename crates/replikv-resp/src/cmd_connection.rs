//! Dispatch, the command table, and connection / server commands: PING, ECHO, HELLO, AUTH,
//! SELECT, CLIENT, COMMAND, CONFIG, QUIT, INFO, ROLE, WAIT, READONLY, READWRITE and
//! replikv's own `REPLIKV.*`.

use bytes::Bytes;
use futures::FutureExt;

use crate::codec::{Frame, Protocol};
use crate::conn::{ok, settle, settle_all, settle_reads, syntax_error, Answer, Args, ConnState};
use crate::service::Service;
use replikv_types::{Consistency, ReadPreference};

/// Name, arity (Redis's convention: n exact, -n at least n, counting the name), is a write.
pub(crate) const COMMANDS: &[(&str, i64, bool)] = &[
    ("GET", 2, false),
    ("SET", -3, true),
    ("SETNX", 3, true),
    ("SETEX", 4, true),
    ("PSETEX", 4, true),
    ("GETSET", 3, true),
    ("MGET", -2, false),
    ("MSET", -3, true),
    ("MSETNX", -3, true),
    ("INCR", 2, true),
    ("DECR", 2, true),
    ("INCRBY", 3, true),
    ("DECRBY", 3, true),
    ("INCRBYFLOAT", 3, true),
    ("APPEND", 3, true),
    ("STRLEN", 2, false),
    ("GETDEL", 2, true),
    ("DEL", -2, true),
    ("UNLINK", -2, true),
    ("EXISTS", -2, false),
    ("TYPE", 2, false),
    ("EXPIRE", -3, true),
    ("PEXPIRE", -3, true),
    ("EXPIREAT", -3, true),
    ("PEXPIREAT", -3, true),
    ("PERSIST", 2, true),
    ("TTL", 2, false),
    ("PTTL", 2, false),
    ("EXPIRETIME", 2, false),
    ("PEXPIRETIME", 2, false),
    ("SCAN", -2, false),
    ("KEYS", 2, false),
    ("DBSIZE", 1, false),
    ("PING", -1, false),
    ("ECHO", 2, false),
    ("HELLO", -1, false),
    ("AUTH", -2, false),
    ("SELECT", 2, false),
    ("CLIENT", -2, false),
    ("COMMAND", -1, false),
    ("CONFIG", -2, false),
    ("QUIT", -1, false),
    ("INFO", -1, false),
    ("ROLE", 1, false),
    ("WAIT", 3, false),
    ("READONLY", 1, false),
    ("READWRITE", 1, false),
    ("CLUSTER", -2, false),
    ("REPLIKV.CONSISTENCY", -1, false),
    ("REPLIKV.READ", -1, false),
    ("REPLIKV.STATUS", 1, false),
];

pub(crate) async fn dispatch<S: Service>(
    service: &S,
    state: &mut ConnState,
    answers: &mut [Answer],
    raw: Vec<Bytes>,
) -> Answer {
    let name = String::from_utf8_lossy(&raw[0]).to_ascii_uppercase();
    let args = Args { name, args: raw };
    let Some(&(_, arity, is_write)) = COMMANDS.iter().find(|(n, _, _)| *n == args.name) else {
        return Answer::Now(unknown_command(&args));
    };
    let n = args.len() as i64;
    if (arity > 0 && n != arity) || (arity < 0 && n < -arity) {
        return Answer::Now(args.arity_error());
    }
    if is_write {
        settle_reads(state, answers).await;
        return crate::cmd_strings::write_command(service, state, &args).await;
    }
    let name = args.name.as_str();
    if let "GET" | "MGET" | "STRLEN" | "EXISTS" | "TYPE" | "TTL" | "PTTL" | "EXPIRETIME"
    | "PEXPIRETIME" = name
    {
        // A read observes the connection's earlier writes, and runs beside its earlier reads.
        settle(state, answers).await;
        let mut read = match name {
            "GET" | "MGET" | "STRLEN" => crate::cmd_strings::read_command(service, state, &args),
            _ => crate::cmd_keys::key_read(service, state, &args),
        };
        // A read served here at once (under the leader's lease) needs no slot of its own.
        return match (&mut read).now_or_never() {
            Some(frame) => Answer::Now(frame),
            None => Answer::Read(read),
        };
    }
    // Anything else first waits for everything this connection has under way.
    settle_all(state, answers).await;
    let frame = match args.name.as_str() {
        "SCAN" | "KEYS" | "DBSIZE" => crate::cmd_keys::listing_command(service, &args).await,
        "CLUSTER" => crate::cmd_cluster::cluster(service, &args),
        _ => connection_command(service, state, &args).await,
    };
    Answer::Now(frame)
}

fn unknown_command(args: &Args) -> Frame {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with:",
        args.text(0)
    );
    for a in args.args.iter().skip(1).take(8) {
        msg.push_str(&format!(" '{}'", String::from_utf8_lossy(a)));
    }
    Frame::Error(msg)
}

async fn connection_command<S: Service>(service: &S, state: &mut ConnState, args: &Args) -> Frame {
    match args.name.as_str() {
        "PING" => match args.len() {
            1 => Frame::Simple("PONG".into()),
            2 => Frame::Bulk(args.args[1].clone()),
            _ => args.arity_error(),
        },
        "ECHO" => Frame::Bulk(args.args[1].clone()),
        "QUIT" => {
            state.quit = true;
            ok()
        }
        "SELECT" => match args.int(1) {
            Ok(0) => ok(),
            Ok(_) => Frame::Error("ERR DB index is out of range".into()),
            Err(e) => e,
        },
        "AUTH" => Frame::Error(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?"
                .into(),
        ),
        "HELLO" => hello(service, state, args),
        "CLIENT" => client(state, args),
        "COMMAND" => command(args),
        "CONFIG" => config(state, args),
        "READONLY" => {
            state.read = Some(ReadPreference::Any);
            ok()
        }
        "READWRITE" => {
            state.read = None;
            ok()
        }
        "WAIT" => wait(service, state, args).await,
        "INFO" => crate::cmd_cluster::info(service, state, args),
        "ROLE" => crate::cmd_cluster::role(service),
        "REPLIKV.CONSISTENCY" => consistency(service, state, args),
        "REPLIKV.READ" => read_preference(service, state, args),
        "REPLIKV.STATUS" => crate::cmd_cluster::status(service),
        _ => unknown_command(args),
    }
}

fn hello<S: Service>(service: &S, state: &mut ConnState, args: &Args) -> Frame {
    let mut i = 1;
    if args.len() > 1 {
        match args.int(1) {
            Ok(2) => state.proto = Protocol::Resp2,
            Ok(3) => state.proto = Protocol::Resp3,
            _ => return Frame::Error("NOPROTO unsupported protocol version".into()),
        }
        i = 2;
    }
    while i < args.len() {
        match args.upper(i).as_str() {
            "SETNAME" if i + 1 < args.len() => {
                state.name = Some(args.args[i + 1].clone());
                i += 2;
            }
            "AUTH" => {
                return Frame::Error(
                    "WRONGPASS invalid username-password pair or user is disabled.".into(),
                )
            }
            _ => return syntax_error(),
        }
    }
    let facts = service.facts();
    let field = |k: &str, v: Frame| (Frame::Bulk(Bytes::copy_from_slice(k.as_bytes())), v);
    Frame::Map(vec![
        field("server", Frame::Bulk(Bytes::from_static(b"replikv"))),
        field(
            "version",
            Frame::Bulk(Bytes::from_static(env!("CARGO_PKG_VERSION").as_bytes())),
        ),
        field(
            "proto",
            Frame::Integer(if state.proto == Protocol::Resp3 { 3 } else { 2 }),
        ),
        field("id", Frame::Integer(state.id as i64)),
        field("mode", Frame::Bulk(Bytes::from_static(b"cluster"))),
        field(
            "role",
            Frame::Bulk(Bytes::from_static(if facts.partitions_led > 0 {
                b"master"
            } else {
                b"replica"
            })),
        ),
        field("modules", Frame::Array(Vec::new())),
    ])
}

/// `CONFIG GET pattern...` with Redis 7's answer (name, value pairs; a map in RESP3) over
/// the one parameter a client can use here, `maxclients` (the limit in force, which start-up
/// may have lowered to fit the descriptor limit). A name without wildcards comes back as
/// given, as Redis 7.0 answers it. Everything else is configured through replikv's YAML,
/// flags and environment.
fn config(state: &ConnState, args: &Args) -> Frame {
    match args.upper(1).as_str() {
        "GET" if args.len() < 3 => Frame::Error(
            "ERR wrong number of arguments for 'config|get' command".into(),
        ),
        "GET" => {
            let params = [("maxclients", state.clients.max().to_string())];
            let mut found = Vec::new();
            for (name, value) in params {
                let asked = args.args[2..].iter().find(|p| {
                    replikv_types::glob_match(&p.to_ascii_lowercase(), name.as_bytes())
                });
                if let Some(asked) = asked {
                    let wildcard = asked.iter().any(|b| b"*?[\\".contains(b));
                    let key = if wildcard {
                        Bytes::from_static(name.as_bytes())
                    } else {
                        asked.clone()
                    };
                    found.push((Frame::Bulk(key), Frame::Bulk(Bytes::from(value))));
                }
            }
            // Encoded as a flat array under RESP2.
            Frame::Map(found)
        }
        "SET" | "RESETSTAT" | "REWRITE" => Frame::Error(
            "ERR replikv is configured through its YAML file, flags and environment, not CONFIG SET".into(),
        ),
        _ => Frame::Error(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            args.text(1)
        )),
    }
}

fn client(state: &mut ConnState, args: &Args) -> Frame {
    match args.upper(1).as_str() {
        "SETNAME" if args.len() == 3 => {
            if args.args[2].iter().any(|b| *b == b' ' || *b == b'\n') {
                return Frame::Error(
                    "ERR Client names cannot contain spaces, newlines or special characters."
                        .into(),
                );
            }
            state.name = Some(args.args[2].clone());
            ok()
        }
        "GETNAME" => state.name.clone().map(Frame::Bulk).unwrap_or(Frame::Null),
        "ID" => Frame::Integer(state.id as i64),
        "SETINFO" => ok(),
        "INFO" | "LIST" => {
            let name = state
                .name
                .as_ref()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default();
            Frame::Bulk(Bytes::from(format!(
                "id={} name={} db=0 resp={}\n",
                state.id,
                name,
                if state.proto == Protocol::Resp3 { 3 } else { 2 }
            )))
        }
        _ => Frame::Error(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            args.text(1)
        )),
    }
}

fn command(args: &Args) -> Frame {
    let info = |(name, arity, write): &(&str, i64, bool)| {
        let flag = if *write { "write" } else { "readonly" };
        Frame::Array(vec![
            Frame::Bulk(Bytes::from(name.to_ascii_lowercase())),
            Frame::Integer(*arity),
            Frame::Set(vec![Frame::Simple(flag.into())]),
            Frame::Integer(0),
            Frame::Integer(0),
            Frame::Integer(0),
        ])
    };
    if args.len() == 1 {
        return Frame::Array(COMMANDS.iter().map(info).collect());
    }
    match args.upper(1).as_str() {
        "COUNT" => Frame::Integer(COMMANDS.len() as i64),
        "DOCS" => Frame::Map(Vec::new()),
        "INFO" => Frame::Array(
            args.args[2..]
                .iter()
                .map(|n| {
                    let n = String::from_utf8_lossy(n).to_ascii_uppercase();
                    COMMANDS
                        .iter()
                        .find(|c| c.0 == n)
                        .map(info)
                        .unwrap_or(Frame::Null)
                })
                .collect(),
        ),
        _ => Frame::Error(format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            args.text(1)
        )),
    }
}

async fn wait<S: Service>(service: &S, state: &mut ConnState, args: &Args) -> Frame {
    let (wanted, timeout) = match (args.int(1), args.int(2)) {
        (Ok(w), Ok(t)) if w >= 0 && t >= 0 => (w as usize, t as u64),
        (Ok(_), Ok(_)) => return Frame::Error("ERR timeout is negative".into()),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    if state.session.is_empty() {
        // Nothing written on this connection: every connected replica trivially holds it.
        return Frame::Integer(service.facts().connected_peers as i64);
    }
    let mut least: Option<u64> = None;
    for (p, offset) in state.session.clone() {
        match service.wait_replicas(p, offset, wanted, timeout).await {
            Ok(n) => least = Some(least.map_or(n, |l: u64| l.min(n))),
            Err(e) => return crate::conn::err(&e),
        }
    }
    Frame::Integer(least.unwrap_or(0) as i64)
}

fn consistency<S: Service>(service: &S, state: &mut ConnState, args: &Args) -> Frame {
    match args.len() {
        1 => {
            let level = state.consistency.unwrap_or(service.config().consistency);
            Frame::Bulk(Bytes::from(level.to_string()))
        }
        2 => match args.text(1).parse::<Consistency>() {
            Ok(level) => {
                state.consistency = Some(level);
                ok()
            }
            Err(e) => Frame::Error(format!("ERR {e}")),
        },
        _ => args.arity_error(),
    }
}

fn read_preference<S: Service>(service: &S, state: &mut ConnState, args: &Args) -> Frame {
    match args.len() {
        1 => {
            let read = state.read.unwrap_or(service.config().read_preference);
            Frame::Bulk(Bytes::from(read.to_string()))
        }
        2 => match args.text(1).parse::<ReadPreference>() {
            Ok(read) => {
                state.read = Some(read);
                ok()
            }
            Err(e) => Frame::Error(format!("ERR {e}")),
        },
        _ => args.arity_error(),
    }
}
