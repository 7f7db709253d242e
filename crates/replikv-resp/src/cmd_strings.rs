//! String commands, and the path every write takes: parse into [`KvOp`]s (one per partition
//! the keys fall in), queue each toward its leader, and combine the acknowledgements.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use replikv_types::{Error, ExpireCond, Expiry, GroupId, KvOp, Reply, SetCond, ValueWithTtl};

use crate::codec::Frame;
use crate::conn::{err, reply_frame, syntax_error, Answer, Args, ConnState};
use crate::service::Service;

/// The latest Unix time (ms) a leader's clock is taken to read: 1 January 10000. Redis
/// refuses a relative expiry that overflows a signed 64-bit time once added to its clock;
/// this front end has no clock (the leader resolves relative expiries at apply), so it
/// refuses those that would overflow at this time. The two differ only for lifetimes of
/// about 292 million years.
const LATEST_NOW_MS: i64 = 253_402_300_800_000;

/// The unit of an expiry argument.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Unit {
    Seconds,
    Millis,
}

/// Redis's error for an expiry it cannot represent, naming the command.
pub(crate) fn invalid_expire(command: &str) -> Frame {
    Frame::Error(format!(
        "ERR invalid expire time in '{}' command",
        command.to_ascii_lowercase()
    ))
}

/// `n` of `unit` in milliseconds, or `None` where Redis overflows (its unit conversion).
fn millis(n: i64, unit: Unit) -> Option<i64> {
    match unit {
        Unit::Seconds => n.checked_mul(1000),
        Unit::Millis => Some(n),
    }
}

/// A relative expiry of `n` `unit`s (`EXPIRE`, `PEXPIRE`; `SET EX`/`PX` after their own
/// positivity check): a non-positive time deletes the key at apply, as in Redis, and
/// travels as `After(0)`.
pub(crate) fn relative_expiry(n: i64, unit: Unit, command: &str) -> Result<Expiry, Frame> {
    match millis(n, unit) {
        Some(ms) if ms <= i64::MAX - LATEST_NOW_MS => Ok(Expiry::After(ms.max(0) as u64)),
        _ => Err(invalid_expire(command)),
    }
}

/// An absolute expiry at Unix time `n` in `unit`s (`EXPIREAT`, `PEXPIREAT`; `SET
/// EXAT`/`PXAT`): one at or before the apply's time deletes the key, as does a negative one.
pub(crate) fn absolute_expiry(n: i64, unit: Unit, command: &str) -> Result<Expiry, Frame> {
    match millis(n, unit) {
        Some(ms) => Ok(Expiry::At(ms.max(0) as u64)),
        None => Err(invalid_expire(command)),
    }
}

/// How the replies of a write split over partitions combine into one.
pub(crate) enum Combine {
    One,
    /// `MSET`: OK when every part is OK.
    AllOk,
    /// `DEL`: the sum of the parts' counts.
    Sum,
    /// `SETNX`: OK → 1, nil → 0.
    OkAsOne,
}

pub(crate) async fn write_command<S: Service>(
    service: &S,
    state: &mut ConnState,
    args: &Args,
) -> Answer {
    let (ops, combine) = match build(service, args) {
        Ok(plan) => plan,
        Err(frame) => return Answer::Now(frame),
    };
    if service.config().redirect {
        if let Some(e) = ops
            .first()
            .and_then(|op| service.redirect_for(op.keys()[0]))
        {
            return Answer::Now(err(&e));
        }
    }
    let level = state.consistency.unwrap_or(service.config().consistency);
    let mut pending = Vec::with_capacity(ops.len());
    for op in ops {
        pending.push(service.submit_write(op, level).await);
    }
    Answer::Later(
        async move {
            let mut replies = Vec::with_capacity(pending.len());
            let mut tokens = Vec::new();
            let mut failure: Option<Error> = None;
            for fut in pending {
                match fut.await {
                    Ok(w) => {
                        tokens.push((w.group, w.offset));
                        replies.push(w.reply);
                    }
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            if let Some(e) = failure {
                return (err(&e), tokens);
            }
            (combine_replies(combine, replies), tokens)
        }
        .boxed(),
    )
}

fn combine_replies(combine: Combine, replies: Vec<Reply>) -> Frame {
    if let Some(e) = replies.iter().find(|r| matches!(r, Reply::Error(_))) {
        return reply_frame(e.clone());
    }
    match combine {
        Combine::One => reply_frame(replies.into_iter().next().unwrap_or(Reply::Nil)),
        Combine::AllOk => Frame::Simple("OK".into()),
        Combine::Sum => Frame::Integer(
            replies
                .iter()
                .map(|r| if let Reply::Int(n) = r { *n } else { 0 })
                .sum(),
        ),
        Combine::OkAsOne => Frame::Integer(matches!(replies.first(), Some(Reply::Ok)) as i64),
    }
}

fn check_key<S: Service>(service: &S, key: &[u8]) -> Result<(), Frame> {
    let max = service.config().max_key_bytes;
    if key.len() > max {
        return Err(Frame::Error(format!(
            "ERR key of {} bytes exceeds the limit of {max} bytes",
            key.len()
        )));
    }
    Ok(())
}

fn check_value<S: Service>(service: &S, value: &[u8]) -> Result<(), Frame> {
    let max = service.config().max_value_bytes;
    if value.len() > max {
        return Err(Frame::Error(format!(
            "ERR string exceeds maximum allowed size (value of {} bytes, limit {max} bytes)",
            value.len()
        )));
    }
    Ok(())
}

fn set_op(key: &Bytes, value: &Bytes, expire: Option<Expiry>, cond: SetCond, get: bool) -> KvOp {
    KvOp::Set {
        key: key.clone(),
        value: value.clone(),
        expire,
        keep_ttl: false,
        cond,
        get,
    }
}

/// Parses a write command into per-partition ops.
fn build<S: Service>(service: &S, args: &Args) -> Result<(Vec<KvOp>, Combine), Frame> {
    let a = &args.args;
    match args.name.as_str() {
        "DEL" | "UNLINK" | "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" | "PERSIST" => {
            return crate::cmd_keys::build_write(service, args)
        }
        "MSET" | "MSETNX" => return build_mset(service, args),
        _ => {}
    }
    check_key(service, &a[1])?;
    let key = &a[1];
    let op = match args.name.as_str() {
        "SET" => {
            check_value(service, &a[2])?;
            parse_set(args)?
        }
        "SETNX" => {
            check_value(service, &a[2])?;
            return Ok((
                vec![set_op(key, &a[2], None, SetCond::IfAbsent, false)],
                Combine::OkAsOne,
            ));
        }
        "SETEX" | "PSETEX" => {
            check_value(service, &a[3])?;
            let n = args.int(2)?;
            if n <= 0 {
                return Err(invalid_expire(&args.name));
            }
            let unit = if args.name == "SETEX" {
                Unit::Seconds
            } else {
                Unit::Millis
            };
            let expire = relative_expiry(n, unit, &args.name)?;
            set_op(key, &a[3], Some(expire), SetCond::Always, false)
        }
        "GETSET" => {
            check_value(service, &a[2])?;
            set_op(key, &a[2], None, SetCond::Always, true)
        }
        "INCR" => KvOp::IncrBy {
            key: key.clone(),
            delta: 1,
        },
        "DECR" => KvOp::IncrBy {
            key: key.clone(),
            delta: -1,
        },
        "INCRBY" => KvOp::IncrBy {
            key: key.clone(),
            delta: args.int(2)?,
        },
        "DECRBY" => {
            let d = args.int(2)?;
            let delta = d
                .checked_neg()
                .ok_or_else(|| Frame::Error("ERR decrement would overflow".into()))?;
            KvOp::IncrBy {
                key: key.clone(),
                delta,
            }
        }
        "INCRBYFLOAT" => {
            let delta = args.float(2)?;
            if !delta.is_finite() {
                return Err(Frame::Error(
                    "ERR increment would produce NaN or Infinity".into(),
                ));
            }
            KvOp::IncrByFloat {
                key: key.clone(),
                delta,
            }
        }
        "APPEND" => {
            check_value(service, &a[2])?;
            KvOp::Append {
                key: key.clone(),
                value: a[2].clone(),
            }
        }
        "GETDEL" => KvOp::GetDel { key: key.clone() },
        other => return Err(Frame::Error(format!("ERR '{other}' is not a write"))),
    };
    Ok((vec![op], Combine::One))
}

fn parse_set(args: &Args) -> Result<KvOp, Frame> {
    let (mut cond, mut get, mut keep_ttl, mut expire) = (SetCond::Always, false, false, None);
    let mut i = 3;
    while i < args.len() {
        let opt = args.upper(i);
        match opt.as_str() {
            "NX" | "XX" if cond == SetCond::Always => {
                cond = if opt == "NX" {
                    SetCond::IfAbsent
                } else {
                    SetCond::IfPresent
                };
            }
            "GET" => get = true,
            "KEEPTTL" if expire.is_none() => keep_ttl = true,
            "EX" | "PX" | "EXAT" | "PXAT"
                if expire.is_none() && !keep_ttl && i + 1 < args.len() =>
            {
                let n = args.int(i + 1)?;
                if n <= 0 {
                    return Err(invalid_expire("set"));
                }
                expire = Some(match opt.as_str() {
                    "EX" => relative_expiry(n, Unit::Seconds, "set")?,
                    "PX" => relative_expiry(n, Unit::Millis, "set")?,
                    "EXAT" => absolute_expiry(n, Unit::Seconds, "set")?,
                    _ => absolute_expiry(n, Unit::Millis, "set")?,
                });
                i += 1;
            }
            _ => return Err(syntax_error()),
        }
        i += 1;
    }
    Ok(KvOp::Set {
        key: args.args[1].clone(),
        value: args.args[2].clone(),
        expire,
        keep_ttl,
        cond,
        get,
    })
}

fn build_mset<S: Service>(service: &S, args: &Args) -> Result<(Vec<KvOp>, Combine), Frame> {
    if args.len() % 2 != 1 {
        return Err(args.arity_error());
    }
    let nx = args.name == "MSETNX";
    let mut by_partition: BTreeMap<GroupId, Vec<(Bytes, Bytes)>> = BTreeMap::new();
    for pair in args.args[1..].chunks(2) {
        check_key(service, &pair[0])?;
        check_value(service, &pair[1])?;
        by_partition
            .entry(service.group_of(&pair[0]))
            .or_default()
            .push((pair[0].clone(), pair[1].clone()));
    }
    if nx && by_partition.len() > 1 {
        return Err(Frame::Error("CROSSSLOT Keys in request don't hash to the same partition (MSETNX is atomic only within one; use {hash tags})".into()));
    }
    let ops = by_partition
        .into_values()
        .map(|pairs| KvOp::MSet {
            pairs,
            if_none_exist: nx,
        })
        .collect();
    Ok((ops, if nx { Combine::One } else { Combine::AllOk }))
}

pub(crate) fn expire_cond(args: &Args, from: usize) -> Result<ExpireCond, Frame> {
    let mut cond = ExpireCond::Always;
    for i in from..args.len() {
        let next = match args.upper(i).as_str() {
            "NX" => ExpireCond::IfNoTtl,
            "XX" => ExpireCond::IfTtl,
            "GT" => ExpireCond::IfGreater,
            "LT" => ExpireCond::IfLess,
            other => return Err(Frame::Error(format!("ERR Unsupported option {other}"))),
        };
        if cond != ExpireCond::Always {
            return Err(Frame::Error(
                "ERR NX and XX, GT or LT options at the same time are not compatible".into(),
            ));
        }
        cond = next;
    }
    Ok(cond)
}

/// Starts reading `keys` with the connection's read preference and session token as they
/// are now; the returned future owns everything it needs.
pub(crate) fn start_reads<S: Service>(
    service: &S,
    state: &ConnState,
    keys: &[Bytes],
) -> BoxFuture<'static, Result<Vec<Option<ValueWithTtl>>, Frame>> {
    let read = state.read.unwrap_or(service.config().read_preference);
    let reads: Vec<_> = keys
        .iter()
        .map(|k| {
            let min = state.session.get(&service.group_of(k)).copied();
            service.get(k.clone(), read, min)
        })
        .collect();
    async move {
        futures::future::join_all(reads)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| err(&e)))
            .collect()
    }
    .boxed()
}

/// A read command started now and answered when the returned future resolves, so that a
/// pipeline's reads are served together rather than one round trip after another:
/// `render` turns the values of `keys` into the reply to the command `args` names.
pub(crate) fn start_read<S: Service>(
    service: &S,
    state: &ConnState,
    args: &Args,
    keys: &[Bytes],
    render: fn(&str, Vec<Option<ValueWithTtl>>) -> Frame,
) -> BoxFuture<'static, Frame> {
    let values = start_reads(service, state, keys);
    let name = args.name.clone();
    async move {
        match values.await {
            Ok(v) => render(&name, v),
            Err(f) => f,
        }
    }
    .boxed()
}

/// GET, MGET, STRLEN.
pub(crate) fn read_command<S: Service>(
    service: &S,
    state: &ConnState,
    args: &Args,
) -> BoxFuture<'static, Frame> {
    let keys = if args.name == "MGET" {
        &args.args[1..]
    } else {
        &args.args[1..2]
    };
    start_read(service, state, args, keys, |name, values| match name {
        "MGET" => Frame::Array(
            values
                .into_iter()
                .map(|v| v.map(|v| Frame::Bulk(v.data)).unwrap_or(Frame::Null))
                .collect(),
        ),
        "STRLEN" => Frame::Integer(values[0].as_ref().map(|v| v.data.len() as i64).unwrap_or(0)),
        _ => values
            .into_iter()
            .next()
            .flatten()
            .map(|v| Frame::Bulk(v.data))
            .unwrap_or(Frame::Null),
    })
}
