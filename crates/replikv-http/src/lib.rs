//! The HTTP API: documents under `/v1/kv`, cluster and replication state and control,
//! health, readiness and Prometheus metrics (DESIGN.md section 4).
//!
//! | path | what |
//! |---|---|
//! | `GET/PUT/DELETE /v1/kv/{keyspace}/{key}` | a value; `?consistency=`, `?read=`, session header |
//! | `GET /v1/cluster`, `GET /v1/keyspaces` | members, placement, keyspace policies |
//! | `GET /v1/_replication/state` | this node's partitions and replicas |
//! | `GET /v1/_replication/digest` | per local replica: key count and CRC32C of its contents |
//! | `POST /v1/_replication/promote`, `POST /api/replication/promote` | move a partition's leadership |
//! | `GET /api/replication/stats` | per replica: offset, lag (ops, ms), state, health, heartbeat |
//! | `GET /health`, `GET /ready`, `GET /metrics` | liveness, readiness, Prometheus text |
//! | `GET/POST /debug/faults` | only with `debug.fault_injection`: cut peer links (tests) |
//!
//! Session tokens: a write answers `X-Replikv-Session: <partition>:<offset>`; a read that
//! sends it back is served by a replica only once that replica has applied the offset.
//!
//! Connections: at most `limits.max_http_connections` are open at once (`Limited`, the
//! listener axum serves from). One beyond that is answered `503 Service Unavailable` with
//! `Connection: close` and closed at once, so a flood of HTTP connections cannot use the
//! descriptors kept for peers. The cap is the HTTP API's own: RESP clients at `maxclients`
//! do not touch it, so `/health` and `/ready` still answer then.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use replikv_cluster::Node;
use replikv_types::{
    refuse, AcceptBackoff, ConnLimit, ConnSlot, Consistency, Error, GroupId, KvOp, ReadPreference,
    SetCond, WarnEvery, DEFAULT_KEYSPACE,
};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const SESSION_HEADER: &str = "x-replikv-session";

#[derive(Clone)]
pub struct HttpConfig {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub fault_injection: bool,
    /// The HTTP API's connections (`limits.max_http_connections`, after start-up fitted it
    /// to the descriptor limit).
    pub connections: Arc<ConnLimit>,
    /// Every listener's connections, by name (`resp`, `http`), for `/metrics`.
    pub listeners: Vec<(&'static str, Arc<ConnLimit>)>,
}

#[derive(Clone)]
struct AppState {
    node: Arc<Node>,
    cfg: HttpConfig,
}

pub fn router(node: Arc<Node>, cfg: HttpConfig) -> Router {
    let faults = cfg.fault_injection;
    let body_limit = cfg.max_value_bytes + 1;
    let mut r = Router::new()
        .route(
            "/v1/kv/{keyspace}/{*key}",
            get(kv_get).put(kv_put).delete(kv_delete),
        )
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/members", get(members))
        .route("/v1/keyspaces", get(keyspaces))
        .route("/v1/_replication/state", get(replication_state))
        .route("/v1/_replication/promote", post(promote))
        .route("/v1/_replication/digest", get(digest))
        .route("/api/replication/promote", post(promote))
        .route("/api/replication/stats", get(replication_stats))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    if faults {
        r = r.route("/debug/faults", get(faults_get).post(faults_set));
    }
    r.layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(AppState { node, cfg })
}

/// Serves the API on `listener` until `shutdown` turns true, at most
/// `cfg.connections.max()` connections at once.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    cfg: HttpConfig,
    shutdown: watch::Receiver<bool>,
) {
    let limited = Limited::new(listener, cfg.connections.clone());
    serve_app(limited, router(node, cfg), shutdown).await;
}

async fn serve_app(listener: Limited, app: Router, mut shutdown: watch::Receiver<bool>) {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// What a connection beyond the cap reads before it is closed.
static TOO_MANY_CONNECTIONS: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = json!({
        "error": "TOO_MANY_CONNECTIONS",
        "message": "max number of HTTP connections reached; retry later",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// How often a full HTTP connection table is reported while connections keep being refused.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The listener axum serves from: it accepts, keeps a place under the cap for each
/// connection it hands over (released when hyper drops it), refuses those beyond the cap
/// itself, and paces failed accepts (axum's own waits a second and logs every failure).
struct Limited {
    listener: TcpListener,
    limit: Arc<ConnLimit>,
    backoff: AcceptBackoff,
    full: WarnEvery,
}

impl Limited {
    fn new(listener: TcpListener, limit: Arc<ConnLimit>) -> Limited {
        Limited {
            listener,
            limit,
            backoff: AcceptBackoff::default(),
            full: WarnEvery::new(FULL_WARNING_EVERY),
        }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (stream, remote) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    let (wait, warn) = self.backoff.failed(Instant::now());
                    if let Some(more) = warn {
                        tracing::warn!(error = %e, failures_since_last_warning = more,
                            retry_in_ms = wait.as_millis() as u64, "HTTP accept failed");
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            self.backoff.succeeded();
            match self.limit.try_open() {
                Some(slot) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        Counted {
                            stream,
                            _slot: slot,
                        },
                        remote,
                    );
                }
                None => {
                    if let Some(more) = self.full.due(Instant::now()) {
                        tracing::warn!(max_http_connections = self.limit.max(),
                            refused_since_last_warning = more, %remote,
                            "HTTP connections at their limit: refusing new ones with 503");
                    }
                    if let Ok(stream) = stream.into_std() {
                        refuse(stream, &TOO_MANY_CONNECTIONS);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection and its place under the cap.
struct Counted {
    stream: TcpStream,
    _slot: ConnSlot,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The one conversion from replikv's error to an HTTP answer.
struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({
            "error": self.0.to_resp().split_whitespace().next().unwrap_or("ERR"),
            "message": self.0.to_string(),
            "committed": format!("{}", self.0.committed()),
        });
        (status, Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(Error::InvalidArgument(msg.into()))
}

#[derive(Deserialize, Default)]
struct KvQuery {
    consistency: Option<String>,
    read: Option<String>,
    session: Option<String>,
}

fn check_keyspace(ks: &str) -> Result<(), ApiError> {
    if ks == DEFAULT_KEYSPACE {
        Ok(())
    } else {
        Err(ApiError(Error::UnknownKeyspace(ks.to_string())))
    }
}

fn check_key(state: &AppState, key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(bad("the key is empty"));
    }
    if key.len() > state.cfg.max_key_bytes {
        return Err(ApiError(Error::TooLarge(format!(
            "key of {} bytes exceeds the limit of {} bytes",
            key.len(),
            state.cfg.max_key_bytes
        ))));
    }
    Ok(())
}

/// Parses `partition:offset` from the query or the session header.
fn session(q: &KvQuery, headers: &HeaderMap) -> Result<Option<(u32, u64)>, ApiError> {
    let raw = q.session.clone().or_else(|| {
        headers
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let Some(raw) = raw else { return Ok(None) };
    let parsed = raw
        .split_once(':')
        .and_then(|(p, o)| Some((p.trim().parse().ok()?, o.trim().parse().ok()?)));
    parsed.map(Some).ok_or_else(|| {
        bad(format!(
            "session token {raw:?} is not of the form <partition>:<offset>"
        ))
    })
}

async fn kv_get(
    State(state): State<AppState>,
    Path((ks, key)): Path<(String, String)>,
    Query(q): Query<KvQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_keyspace(&ks)?;
    check_key(&state, &key)?;
    let read = match &q.read {
        Some(r) => r.parse::<ReadPreference>().map_err(bad)?,
        None => state.node.cfg.replication.read_preference,
    };
    let p = state.node.group_of(key.as_bytes());
    let min = session(&q, &headers)?
        .filter(|(sp, _)| *sp == p.partition)
        .map(|(_, o)| o);
    let value = state.node.get(Bytes::from(key.clone()), read, min).await?;
    match value {
        None => Ok((
            StatusCode::NOT_FOUND,
            Json(json!({"error": "NOT_FOUND", "key": key})),
        )
            .into_response()),
        Some(v) => {
            let ct = if serde_json::from_slice::<serde_json::Value>(&v.data).is_ok() {
                "application/json"
            } else {
                "application/octet-stream"
            };
            Ok(([(header::CONTENT_TYPE, ct)], v.data).into_response())
        }
    }
}

async fn kv_put(
    State(state): State<AppState>,
    Path((ks, key)): Path<(String, String)>,
    Query(q): Query<KvQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_keyspace(&ks)?;
    check_key(&state, &key)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
            return Err(bad(format!("the body is not valid JSON: {e}")));
        }
    }
    let op = KvOp::Set {
        key: Bytes::from(key),
        value: body,
        expire: None,
        keep_ttl: false,
        cond: SetCond::Always,
        get: false,
    };
    write(&state, op, &q).await
}

async fn kv_delete(
    State(state): State<AppState>,
    Path((ks, key)): Path<(String, String)>,
    Query(q): Query<KvQuery>,
) -> Result<Response, ApiError> {
    check_keyspace(&ks)?;
    check_key(&state, &key)?;
    write(
        &state,
        KvOp::Del {
            keys: vec![Bytes::from(key)],
        },
        &q,
    )
    .await
}

async fn write(state: &AppState, op: KvOp, q: &KvQuery) -> Result<Response, ApiError> {
    let level = match &q.consistency {
        Some(c) => c.parse::<Consistency>().map_err(bad)?,
        None => state.node.cfg.replication.consistency,
    };
    let pending = state.node.submit_write(op, level).await;
    let w = pending.await?;
    let token = format!("{}:{}", w.group.partition, w.offset);
    let body = json!({"ok": true, "partition": w.group.partition, "offset": w.offset, "consistency": level.to_string(),
                      "result": format!("{:?}", w.reply)});
    Ok(([(SESSION_HEADER, token)], Json(body)).into_response())
}

async fn cluster(State(state): State<AppState>) -> Json<serde_json::Value> {
    let node = &state.node;
    let members: Vec<_> = match node.member_views() {
        Some((_, views)) => views
            .iter()
            .map(|m| json!({"id": m.id, "peer": m.peer, "resp": m.resp, "http": m.http}))
            .collect(),
        None => node
            .cfg
            .peers
            .iter()
            .map(|(id, peer)| {
                let (resp, http) = node.endpoints(*id).unwrap_or_default();
                json!({"id": id, "peer": peer, "resp": resp, "http": http})
            })
            .collect(),
    };
    Json(json!({
        "node_id": node.id(),
        "topology_version": node.topology().map(|t| t.version),
        "members": members,
        "placement": *node.placement(),
        "leaders": node.placement().partitions.iter().map(|p| json!({"partition": p.partition, "leader": node.leader_of(GroupId::default_keyspace(p.partition))})).collect::<Vec<_>>(),
    }))
}

/// The answer while this node knows no topology yet (a new node before the meta group's
/// first commit): 503, with the reason.
fn no_topology() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "NO_TOPOLOGY", "message": "this node knows no topology yet: the meta group has not committed one"})),
    )
        .into_response()
}

/// `GET /v1/keyspaces`: every keyspace with its number (`db`) and policy.
async fn keyspaces(State(state): State<AppState>) -> Response {
    let Some((version, views)) = state.node.keyspace_views() else {
        return no_topology();
    };
    let timeout = state.node.cfg.replication.write_timeout_ms;
    let list: Vec<_> = views
        .iter()
        .map(|k| {
            json!({
                "name": k.name,
                "db": k.db,
                "partitions": k.partitions,
                "factor": k.factor,
                "placed_factor": k.placed_factor,
                "consistency": k.consistency,
                "read_preference": k.read_preference,
                "max_lag_ms": k.max_lag_ms,
                "write_timeout_ms": timeout,
            })
        })
        .collect();
    (
        [("x-replikv-topology-version", version.to_string())],
        Json(json!(list)),
    )
        .into_response()
}

/// `GET /v1/cluster/members`: the members as the meta group records them.
async fn members(State(state): State<AppState>) -> Response {
    let Some((version, views)) = state.node.member_views() else {
        return no_topology();
    };
    Json(json!({"topology_version": version, "members": views})).into_response()
}

async fn replication_state(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::to_value(state.node.status()).unwrap_or_default())
}

/// Contents digest of every local replica, to check that replicas converged.
async fn digest(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let (mut out, mut meta) = (Vec::new(), None);
    for g in state.node.groups() {
        let (keys, crc) = g.view.digest().map_err(Error::Internal)?;
        let d = json!({"keyspace": g.id.keyspace, "partition": g.id.partition, "keys": keys, "crc32c": crc, "applied_offset": g.applied()});
        if g.id.is_meta() {
            meta = Some(d);
        } else {
            out.push(d);
        }
    }
    Ok(Json(
        json!({"node_id": state.node.id(), "partitions": out, "meta": meta}),
    ))
}

async fn replication_stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let status = state.node.status();
    let mut replicas = Vec::new();
    for p in &status.partitions {
        for r in &p.replicas {
            replicas.push(json!({
                "keyspace": p.keyspace, "partition": p.partition, "node_id": r.node_id, "role": r.role,
                "offset": r.matched_offset, "lag_ops": r.lag_ops, "lag_ms": r.lag_ms,
                "state": r.state, "health": r.health, "last_heartbeat_ms_ago": r.last_heartbeat_ms_ago,
            }));
        }
    }
    let followers = status
        .partitions
        .iter()
        .filter(|p| p.role != "leader")
        .map(|p| json!({"partition": p.partition, "role": p.role, "leader": p.leader, "applied_offset": p.applied_offset,
                        "staleness_ms": p.staleness_ms, "behind_ops": p.behind_ops}))
        .collect::<Vec<_>>();
    Json(json!({"node_id": status.node_id, "replicas": replicas, "following": followers}))
}

#[derive(Deserialize)]
struct PromoteBody {
    partition: u32,
    node: u64,
}

async fn promote(
    State(state): State<AppState>,
    body: Result<Json<PromoteBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(|e| {
        bad(format!(
            "expected {{\"partition\": P, \"node\": N}}: {}",
            e.body_text()
        ))
    })?;
    let partitions = state.node.placement().partition_count();
    if b.partition >= partitions {
        return Err(bad(format!(
            "no partition {} (there are {partitions})",
            b.partition
        )));
    }
    state
        .node
        .promote(GroupId::default_keyspace(b.partition), b.node)
        .await?;
    Ok(Json(json!({"ok": true, "partition": b.partition, "leader": b.node})).into_response())
}

async fn ready(State(state): State<AppState>) -> Response {
    let why = match state.node.readiness() {
        Ok(()) => return (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Err(why) => why,
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"ready": false, "reason": why})),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    for (name, limit) in &state.cfg.listeners {
        let m = &state.node.metrics;
        m.listener(name, limit.open(), limit.max(), limit.rejected());
    }
    let text = state.node.metrics.render(&state.node.status());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Deserialize)]
struct FaultsBody {
    blocked: Vec<u64>,
}

async fn faults_get(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({"blocked": state.node.transport.faults.blocked()}))
}

async fn faults_set(
    State(state): State<AppState>,
    body: Result<Json<FaultsBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(|e| {
        bad(format!(
            "expected {{\"blocked\": [node ids]}}: {}",
            e.body_text()
        ))
    })?;
    tracing::warn!(blocked = ?b.blocked, "fault injection: peer links cut");
    state.node.transport.faults.set_blocked(b.blocked.clone());
    Ok(Json(json!({"blocked": b.blocked})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP listener capped at 4 connections, serving `/health`.
    fn capped_server(
        rt: &tokio::runtime::Runtime,
    ) -> (String, Arc<ConnLimit>, watch::Sender<bool>) {
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let limit = ConnLimit::new(4);
        let (stop, stop_rx) = watch::channel(false);
        let app = Router::new().route("/health", get(|| async { Json(json!({"status": "ok"})) }));
        rt.spawn(serve_app(
            Limited::new(listener, limit.clone()),
            app,
            stop_rx,
        ));
        (url, limit, stop)
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Connections beyond the cap are refused cleanly: each reads a whole `503` with
    /// `Retry-After` and `Connection: close` (the decision documented in docs/CONFIG.md:
    /// refused, not queued, so a flood never holds more descriptors than the cap), those
    /// within it keep being served, and a place freed by a close is taken again.
    #[test]
    fn connections_beyond_the_cap_get_a_503_and_a_freed_place_serves_again() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, limit, _stop) = capped_server(&rt);
        // Four clients, each keeping its connection open between requests (keep-alive).
        let held: Vec<ureq::Agent> = (0..4)
            .map(|_| {
                let agent = ureq::AgentBuilder::new().build();
                let r = agent.get(&url).call().expect("a connection within the cap");
                r.into_string().unwrap();
                agent
            })
            .collect();
        wait_for("four connections held", || limit.open() == 4);
        for _ in 0..50 {
            match ureq::get(&url).call() {
                Err(ureq::Error::Status(503, r)) => {
                    assert_eq!(r.header("retry-after"), Some("1"));
                    assert_eq!(r.header("connection"), Some("close"));
                    let body: serde_json::Value = r.into_json().unwrap();
                    assert_eq!(body["error"], "TOO_MANY_CONNECTIONS");
                }
                other => panic!("a connection beyond the cap got {other:?}"),
            }
        }
        assert_eq!(limit.rejected(), 50);
        assert_eq!(limit.open(), 4, "refused connections never took a place");
        for agent in &held {
            let r = agent
                .get(&url)
                .call()
                .expect("a held connection is still served");
            assert_eq!(r.status(), 200);
            r.into_string().unwrap();
        }
        drop(held);
        wait_for("the held connections to close", || limit.open() == 0);
        let r = ureq::get(&url)
            .call()
            .expect("served again once places are free");
        assert_eq!(r.status(), 200);
    }
}
