//! Key commands: DEL/UNLINK, EXISTS, TYPE, the EXPIRE family, TTL family, SCAN, KEYS, DBSIZE.
//!
//! SCAN's cursor walks partitions in order. Cursor `0` starts; a cursor below 2^32 names the
//! partition to start at; a larger one is a token for a position inside a partition, kept in
//! a bounded table on this node (a client may use it from any connection to this node).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::BoxFuture;
use replikv_types::{GroupId, KvOp, PartitionId};

use crate::cmd_strings::{absolute_expiry, expire_cond, relative_expiry, Combine, Unit};
use crate::codec::Frame;
use crate::conn::{err, syntax_error, Args, ConnState};
use crate::service::Service;

/// Parses DEL/UNLINK and the EXPIRE family into per-partition ops.
pub(crate) fn build_write<S: Service>(
    service: &S,
    args: &Args,
) -> Result<(Vec<KvOp>, Combine), Frame> {
    let a = &args.args;
    if args.name == "DEL" || args.name == "UNLINK" {
        let mut by_partition: BTreeMap<GroupId, Vec<Bytes>> = BTreeMap::new();
        for k in &a[1..] {
            by_partition
                .entry(service.group_of(k))
                .or_default()
                .push(k.clone());
        }
        let ops = by_partition
            .into_values()
            .map(|keys| KvOp::Del { keys })
            .collect();
        return Ok((ops, Combine::Sum));
    }
    let key = a[1].clone();
    if args.name == "PERSIST" {
        return Ok((
            vec![KvOp::Expire {
                key,
                expiry: None,
                cond: replikv_types::ExpireCond::Always,
            }],
            Combine::One,
        ));
    }
    // Redis reads the options before the time.
    let cond = expire_cond(args, 3)?;
    let n = args.int(2)?;
    // Resolved at apply with the entry's time stamp; a time in the past deletes the key
    // then, as in Redis.
    let expiry = match args.name.as_str() {
        "EXPIRE" => relative_expiry(n, Unit::Seconds, &args.name)?,
        "PEXPIRE" => relative_expiry(n, Unit::Millis, &args.name)?,
        "EXPIREAT" => absolute_expiry(n, Unit::Seconds, &args.name)?,
        _ => absolute_expiry(n, Unit::Millis, &args.name)?,
    };
    Ok((
        vec![KvOp::Expire {
            key,
            expiry: Some(expiry),
            cond,
        }],
        Combine::One,
    ))
}

/// EXISTS, TYPE and the TTL family, started now (see `start_read`).
pub(crate) fn key_read<S: Service>(
    service: &S,
    state: &ConnState,
    args: &Args,
) -> BoxFuture<'static, Frame> {
    let keys = if args.name == "EXISTS" {
        &args.args[1..]
    } else {
        &args.args[1..2]
    };
    crate::cmd_strings::start_read(service, state, args, keys, |name, values| {
        let first = values.first().cloned().flatten();
        match name {
            "EXISTS" => Frame::Integer(values.iter().filter(|v| v.is_some()).count() as i64),
            "TYPE" => Frame::Simple(if first.is_some() { "string" } else { "none" }.into()),
            // The time left is what the replica that served the read counted with its own
            // clock: this node reads no clock (time comes from the log and the replicas).
            name => Frame::Integer(match first {
                None => -2,
                Some(v) => match v.expire_at_ms {
                    None => -1,
                    Some(at) => {
                        let ttl = v.ttl_ms.unwrap_or(0).min(i64::MAX as u64) as i64;
                        match name {
                            "TTL" => ttl.saturating_add(500) / 1000,
                            "PTTL" => ttl,
                            "EXPIRETIME" => (at / 1000) as i64,
                            _ => at.min(i64::MAX as u64) as i64,
                        }
                    }
                },
            }),
        }
    })
}

/// SCAN, KEYS, DBSIZE.
pub(crate) async fn listing_command<S: Service>(service: &S, args: &Args) -> Frame {
    match args.name.as_str() {
        "SCAN" => scan(service, args).await,
        "KEYS" => match all_keys(service, Some(args.args[1].clone())).await {
            Ok(keys) => Frame::Array(keys.into_iter().map(Frame::Bulk).collect()),
            Err(f) => f,
        },
        "DBSIZE" => match all_keys(service, None).await {
            Ok(keys) => Frame::Integer(keys.len() as i64),
            Err(f) => f,
        },
        _ => syntax_error(),
    }
}

/// Every live key of every partition (KEYS, DBSIZE), read at each partition's leader.
async fn all_keys<S: Service>(service: &S, pattern: Option<Bytes>) -> Result<Vec<Bytes>, Frame> {
    let mut out = Vec::new();
    for p in 0..service.partition_count() {
        let mut start = Bytes::new();
        loop {
            let (keys, next) = service
                .scan_partition(GroupId::default_keyspace(p), start, 10_000, pattern.clone())
                .await
                .map_err(|e| err(&e))?;
            out.extend(keys);
            match next {
                Some(n) => start = n,
                None => break,
            }
        }
    }
    Ok(out)
}

const TOKEN_BASE: u64 = 1 << 32;
const MAX_TOKENS: usize = 100_000;

/// Resume positions of SCAN cursors inside a partition.
struct Cursors {
    next: u64,
    by_token: HashMap<u64, (PartitionId, Bytes)>,
    order: VecDeque<u64>,
}

static CURSORS: Mutex<Option<Cursors>> = Mutex::new(None);

fn remember(p: PartitionId, key: Bytes) -> u64 {
    let mut guard = CURSORS.lock().expect("cursors");
    let c = guard.get_or_insert_with(|| Cursors {
        next: TOKEN_BASE,
        by_token: HashMap::new(),
        order: VecDeque::new(),
    });
    let token = c.next;
    c.next += 1;
    c.by_token.insert(token, (p, key));
    c.order.push_back(token);
    while c.order.len() > MAX_TOKENS {
        if let Some(old) = c.order.pop_front() {
            c.by_token.remove(&old);
        }
    }
    token
}

fn recall(token: u64) -> Option<(PartitionId, Bytes)> {
    CURSORS
        .lock()
        .expect("cursors")
        .as_ref()
        .and_then(|c| c.by_token.get(&token).cloned())
}

async fn scan<S: Service>(service: &S, args: &Args) -> Frame {
    let Ok(cursor) = std::str::from_utf8(&args.args[1])
        .unwrap_or("")
        .parse::<u64>()
    else {
        return Frame::Error("ERR invalid cursor".into());
    };
    let (mut count, mut pattern) = (10usize, None);
    let mut i = 2;
    while i < args.len() {
        match args.upper(i).as_str() {
            "COUNT" if i + 1 < args.len() => match args.int(i + 1) {
                Ok(n) if n > 0 => count = n as usize,
                Ok(_) => return syntax_error(),
                Err(e) => return e,
            },
            "MATCH" if i + 1 < args.len() => pattern = Some(args.args[i + 1].clone()),
            "TYPE" if i + 1 < args.len() => {
                if args.upper(i + 1) != "STRING" {
                    return Frame::Array(vec![
                        Frame::Bulk(Bytes::from_static(b"0")),
                        Frame::Array(Vec::new()),
                    ]);
                }
            }
            _ => return syntax_error(),
        }
        i += 2;
    }
    let (p, start) = if cursor >= TOKEN_BASE {
        match recall(cursor) {
            Some(pos) => pos,
            None => {
                return Frame::Error("ERR invalid cursor (expired or from another node)".into())
            }
        }
    } else {
        (cursor as PartitionId, Bytes::new())
    };
    if p >= service.partition_count() {
        return Frame::Error("ERR invalid cursor".into());
    }
    let (keys, next) = match service
        .scan_partition(GroupId::default_keyspace(p), start, count, pattern)
        .await
    {
        Ok(r) => r,
        Err(e) => return err(&e),
    };
    let next_cursor = match next {
        Some(k) => remember(p, k),
        None if p + 1 < service.partition_count() => (p + 1) as u64,
        None => 0,
    };
    Frame::Array(vec![
        Frame::Bulk(Bytes::from(next_cursor.to_string())),
        Frame::Array(keys.into_iter().map(Frame::Bulk).collect()),
    ])
}
