//! `pgquorum router`: one address for applications. The read-write port forwards each new
//! connection to the committed primary, learned from the cluster's watch stream; the read-only
//! port spreads connections over healthy streaming replicas. While no primary can be reached, new
//! read-write connections wait (up to `write_timeout_ms`) instead of failing, and a connection to
//! a primary that lost its office is closed, so no client keeps talking to a stale writer.
//!
//! The router works at the TCP level once a connection is placed: it reads only the protocol's
//! first message (an SSLRequest or GSSENCRequest is passed through, so TLS runs end to end
//! between client and Postgres; a CancelRequest is delivered to the members' Postgres, where only
//! the backend whose key it carries acts on it).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use raft_node::client::ApiClient;
use raft_node::proto;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::ClientSecurity;

/// The protocol's request codes of a first message without a startup packet.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// The longest first message taken (a startup packet with its parameters).
const MAX_STARTUP: usize = 10_000;
/// How long a backend connect may take before the next candidate is tried.
const BACKEND_CONNECT: Duration = Duration::from_secs(1);
/// How often a held connection retries the committed primary when no change arrives (a primary
/// that is committed but still starting answers within this).
const RETRY_HELD: Duration = Duration::from_millis(100);
/// How often the replicas' health is read (the primary itself comes by push).
const REPLICA_POLL: Duration = Duration::from_secs(1);

/// `router.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Sidecar gRPC endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// The read-write port, `ip:port`.
    pub listen_rw: String,
    /// The read-only port, `ip:port`; none by default.
    #[serde(default)]
    pub listen_ro: Option<String>,
    /// HTTP address of `/health` and `/metrics`; none by default.
    #[serde(default)]
    pub http_addr: Option<String>,
    /// How long a new read-write connection waits for a reachable primary.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// Replicas further behind than this many bytes take no reads; unset: any streaming replica.
    #[serde(default)]
    pub max_lag_bytes: Option<u64>,
    /// Send reads to the primary when no replica qualifies (default true); false refuses them.
    #[serde(default = "yes")]
    pub read_fallback_to_primary: bool,
    /// How the router reaches the cluster API (the same settings as the CLI's flags).
    #[serde(default)]
    pub security: ClientSecurity,
}

fn default_write_timeout() -> u64 {
    30_000
}

fn yes() -> bool {
    true
}

impl RouterConfig {
    /// Reads and validates `path`; relative file paths are relative to it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the router config {}", path.display()))?;
        let mut cfg: RouterConfig = toml::from_str(&text)
            .with_context(|| format!("router config {} is not valid", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let sec = &mut cfg.security;
        for p in [
            &mut sec.ca_file,
            &mut sec.cert_file,
            &mut sec.key_file,
            &mut sec.token_file,
        ]
        .into_iter()
        .flatten()
        .filter(|p| p.is_relative())
        {
            *p = base.join(&*p);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, problem: String| {
            anyhow::anyhow!("router config {}: {field} {problem}", path.display())
        };
        if self.endpoints.is_empty() {
            return Err(bad("endpoints", "must list at least one sidecar".into()));
        }
        for (field, addr) in [
            ("listen_rw", Some(&self.listen_rw)),
            ("listen_ro", self.listen_ro.as_ref()),
            ("http_addr", self.http_addr.as_ref()),
        ] {
            if let Some(a) = addr {
                a.parse::<std::net::SocketAddr>()
                    .map_err(|_| bad(field, format!("'{a}' is not ip:port")))?;
            }
        }
        if self.write_timeout_ms == 0 || self.write_timeout_ms > 600_000 {
            return Err(bad(
                "write_timeout_ms",
                "must be between 1 and 600000".into(),
            ));
        }
        Ok(())
    }
}

/// A member's Postgres as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The member.
    pub node: u64,
    /// `host:port` of its Postgres.
    pub addr: String,
    /// Its sidecar's HTTP address, if it serves one: `GET /primary` answers 200 only once the
    /// member's Postgres is a writable primary under its lease.
    pub http: Option<String>,
}

/// Where connections go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The committed primary and its epoch.
    pub primary: Option<(Backend, u64)>,
    /// A switchover or failover is under way: new read-write connections wait for its end
    /// instead of landing on a primary that is about to stop.
    pub hold: bool,
    /// Healthy streaming replicas, in id order.
    pub replicas: Vec<Backend>,
    /// Every member's Postgres (cancel requests go to all).
    pub members: Vec<Backend>,
    /// The log index of the newest topology taken in: an older one (from a member that lags,
    /// or a frozen one's stream) never overrides it.
    pub applied: u64,
}

impl View {
    /// Takes in the committed part of `t` (primary, plan, members) unless it is older than
    /// what the view already holds; says whether anything changed.
    pub fn absorb(&mut self, t: &proto::Topology) -> bool {
        if t.last_applied < self.applied {
            return false;
        }
        let primary = committed_primary(t);
        // From the moment a plan is due, not only once it started: the primary stops right
        // after the start commits, and a connection still authenticating then would fail.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let hold = t
            .plan
            .as_ref()
            .is_some_and(|p| p.started || p.not_before_unix_ms <= now_ms);
        let members: Vec<Backend> = t
            .members
            .iter()
            .filter(|m| m.pg_port != 0)
            .map(backend)
            .collect();
        let changed = self.primary != primary || self.hold != hold || self.members != members;
        if self.primary != primary || self.hold != hold {
            tracing::info!(primary = ?primary.as_ref().map(|(b, e)| (b.node, *e)), hold, "committed primary");
        }
        self.primary = primary;
        self.hold = hold;
        self.members = members;
        self.applied = t.last_applied;
        changed
    }
}

fn backend(m: &proto::Member) -> Backend {
    Backend {
        node: m.id,
        addr: format!("{}:{}", m.pg_host, m.pg_port),
        http: (!m.http_addr.is_empty()).then(|| m.http_addr.clone()),
    }
}

/// Whether the sidecar at `http` says its Postgres is the writable primary (`GET /primary`).
async fn says_primary(http: &str) -> bool {
    let ask = async {
        let mut s = TcpStream::connect(http).await.ok()?;
        s.write_all(format!("GET /primary HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut head = [0u8; 16];
        let n = s.read(&mut head).await.ok()?;
        Some(head[..n].starts_with(b"HTTP/1.0 200") || head[..n].starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(BACKEND_CONNECT, ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The committed primary of `t`, with its epoch, if its member is known.
pub fn committed_primary(t: &proto::Topology) -> Option<(Backend, u64)> {
    let p = t.primary.as_ref()?;
    let m = t
        .members
        .iter()
        .find(|m| m.id == p.node_id && m.pg_port != 0)?;
    Some((backend(m), p.epoch))
}

/// The replicas of `t` that may take reads: streaming replicas (not the primary) within
/// `max_lag` bytes.
pub fn readable_replicas(t: &proto::Topology, max_lag: Option<u64>) -> Vec<Backend> {
    let primary = t.primary.as_ref().map(|p| p.node_id);
    t.members
        .iter()
        .filter(|m| Some(m.id) != primary && m.pg_role_name() == "replica" && m.pg_port != 0)
        .filter(|m| max_lag.is_none_or(|max| m.lag_bytes <= max))
        .map(backend)
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabel {
    port: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabel {
    port: String,
}

/// The router's counters, served on `/metrics`.
#[derive(Clone)]
struct Metrics {
    registry: Arc<Registry>,
    connections: Family<PortLabel, Gauge>,
    placed: Family<PortLabel, Counter>,
    rejects: Family<RejectLabel, Counter>,
    held: Counter,
    held_ms: Counter,
    holding: Gauge,
    cancels: Counter,
    closed_stale: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let connections = Family::<PortLabel, Gauge>::default();
        let placed = Family::<PortLabel, Counter>::default();
        let rejects = Family::<RejectLabel, Counter>::default();
        let held = Counter::default();
        let held_ms = Counter::default();
        let holding = Gauge::default();
        let cancels = Counter::default();
        let closed_stale = Counter::default();
        r.register(
            "pgquorum_router_connections",
            "Open client connections per port and backend member",
            connections.clone(),
        );
        r.register(
            "pgquorum_router_placed",
            "Client connections placed on a backend, per port and member",
            placed.clone(),
        );
        r.register(
            "pgquorum_router_rejects",
            "Client connections refused (no backend within the wait), per port",
            rejects.clone(),
        );
        r.register(
            "pgquorum_router_held",
            "Read-write connections that waited for a reachable primary",
            held.clone(),
        );
        r.register(
            "pgquorum_router_held_milliseconds",
            "Time read-write connections spent waiting for a primary",
            held_ms.clone(),
        );
        r.register(
            "pgquorum_router_holding",
            "Read-write connections waiting for a reachable primary now",
            holding.clone(),
        );
        r.register(
            "pgquorum_router_cancel_requests",
            "Cancel requests delivered to the members",
            cancels.clone(),
        );
        r.register(
            "pgquorum_router_closed_stale",
            "Connections closed because their primary lost its office",
            closed_stale.clone(),
        );
        Self {
            registry: Arc::new(r),
            connections,
            placed,
            rejects,
            held,
            held_ms,
            holding,
            cancels,
            closed_stale,
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Follows the committed primary through the watch stream (pushed, no polling), reconnecting
/// to another member when a stream ends.
async fn follow_primary(client: ApiClient, view: watch::Sender<View>) {
    loop {
        let stream = client
            .call(|mut c| async move { c.watch_topology(proto::WatchTopologyRequest {}).await })
            .await;
        match stream {
            Ok(mut s) => {
                tracing::info!("following the cluster's committed state");
                loop {
                    match s.message().await {
                        Ok(Some(t)) => {
                            view.send_if_modified(|v| v.absorb(&t));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "the watch stream ended; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the cluster; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the replicas' health once a second (reports live on the Raft leader, not in the
/// committed state the watch stream carries).
async fn follow_replicas(client: ApiClient, view: watch::Sender<View>, max_lag: Option<u64>) {
    loop {
        if let Ok(t) = crate::fetch_topology(&client).await {
            let replicas = readable_replicas(&t, max_lag);
            // The leader's own view also backs the stream up: a stream from a member that
            // froze sends nothing until its keepalive gives up.
            view.send_if_modified(|v| {
                let changed = v.replicas != replicas;
                v.replicas = replicas;
                v.absorb(&t) || changed
            });
        }
        tokio::time::sleep(REPLICA_POLL).await;
    }
}

/// The protocol's first message from a client.
enum First {
    /// An SSLRequest or a GSSENCRequest (8 bytes), passed through to the backend.
    Negotiate(Vec<u8>),
    /// A CancelRequest (16 bytes).
    Cancel(Vec<u8>),
    /// A startup packet.
    Startup(Vec<u8>),
}

async fn read_first(client: &mut TcpStream) -> Result<First> {
    let mut head = [0u8; 8];
    client.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if !(8..=MAX_STARTUP).contains(&len) {
        bail!("first message of {len} bytes");
    }
    let mut all = head.to_vec();
    all.resize(len, 0);
    client.read_exact(&mut all[8..]).await?;
    Ok(match code {
        SSL_REQUEST | GSSENC_REQUEST if len == 8 => First::Negotiate(all),
        CANCEL_REQUEST if len == 16 => First::Cancel(all),
        _ => First::Startup(all),
    })
}

/// A Postgres ErrorResponse the client shows as it would a server's.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, text) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(tag);
        body.extend_from_slice(text.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Tells a client that no backend took it, and counts the refusal: after a negotiation request
/// the client expects a one-byte answer first ('N': no encryption), then it sends its startup
/// packet.
async fn refuse(shared: &Shared, port: Port, client: &mut TcpStream, first: &First, message: &str) {
    shared
        .metrics
        .rejects
        .get_or_create(&RejectLabel {
            port: port.name().into(),
        })
        .inc();
    if matches!(first, First::Negotiate(_)) {
        if client.write_all(b"N").await.is_err() {
            return;
        }
        if read_first(client).await.is_err() {
            return;
        }
    }
    let _ = client.write_all(&error_response("57P03", message)).await;
}

async fn connect_backend(addr: &str) -> Option<TcpStream> {
    let s = tokio::time::timeout(BACKEND_CONNECT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let _ = s.set_nodelay(true);
    Some(s)
}

/// Which port a connection came in on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Port {
    ReadWrite,
    ReadOnly,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::ReadWrite => "rw",
            Port::ReadOnly => "ro",
        }
    }
}

struct Shared {
    view: watch::Receiver<View>,
    metrics: Metrics,
    write_timeout: Duration,
    read_fallback: bool,
    next_replica: AtomicUsize,
    /// The primary (member, epoch) its sidecar last said is writable.
    ready: std::sync::Mutex<Option<(u64, u64)>>,
}

/// The committed primary once it accepts a connection, waiting up to the write timeout: woken
/// by every committed change, retrying the same primary meanwhile every [`RETRY_HELD`].
async fn place_on_primary(shared: &Shared) -> Option<(Backend, u64, TcpStream, Duration)> {
    let start = Instant::now();
    let deadline = start + shared.write_timeout;
    let mut view = shared.view.clone();
    loop {
        let primary = {
            let v = view.borrow_and_update();
            v.primary.clone().filter(|_| !v.hold)
        };
        if let Some((b, epoch)) = primary {
            // A member committed as primary is writable only once it has promoted (about a
            // second): until its sidecar says so, a client would meet a read-only server.
            let ready = shared
                .ready
                .lock()
                .ok()
                .is_some_and(|r| *r == Some((b.node, epoch)));
            let ready = ready
                || match &b.http {
                    Some(h) if says_primary(h).await => {
                        if let Ok(mut r) = shared.ready.lock() {
                            *r = Some((b.node, epoch));
                        }
                        true
                    }
                    Some(_) => false,
                    None => true,
                };
            if ready {
                if let Some(s) = connect_backend(&b.addr).await {
                    return Some((b, epoch, s, start.elapsed()));
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let wait = RETRY_HELD.min(deadline - now);
        let _ = tokio::time::timeout(wait, view.changed()).await;
    }
}

/// A replica in turn, or the primary when none takes the connection and falling back is on.
async fn place_on_replica(shared: &Shared) -> Option<(Backend, TcpStream)> {
    let (replicas, primary) = {
        let v = shared.view.borrow();
        (v.replicas.clone(), v.primary.clone())
    };
    let n = replicas.len();
    let first = shared.next_replica.fetch_add(1, Ordering::Relaxed);
    for i in 0..n {
        let b = &replicas[(first + i) % n];
        if let Some(s) = connect_backend(&b.addr).await {
            return Some((b.clone(), s));
        }
    }
    if shared.read_fallback {
        let (b, _) = primary?;
        let s = connect_backend(&b.addr).await?;
        return Some((b, s));
    }
    None
}

/// Sends the startup packet to `server` and reads its first message. A server that closes
/// before it answers (it died), or refuses for shutdown or start-up (SQLSTATE 57P01, 57P03),
/// gets no further: the packet goes to the next candidate of `port` instead, as the client has
/// seen nothing yet. Anything else is the session's start, returned for the client.
async fn place_startup(
    shared: &Shared,
    port: Port,
    mut backend: Backend,
    mut server: TcpStream,
    startup: &[u8],
) -> Option<(Backend, TcpStream, Vec<u8>)> {
    let deadline = Instant::now() + shared.write_timeout;
    loop {
        if server.write_all(startup).await.is_ok() {
            if let Some(first) = read_message(&mut server).await {
                if !refused_for_now(&first) {
                    return Some((backend, server, first));
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(RETRY_HELD).await;
        (backend, server) = match port {
            Port::ReadWrite => place_on_primary(shared).await.map(|(b, _, s, _)| (b, s))?,
            Port::ReadOnly => place_on_replica(shared).await?,
        };
    }
}

/// One whole protocol message from a backend (type byte, length, body), at most 64 KiB.
async fn read_message(server: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 5];
    tokio::time::timeout(BACKEND_CONNECT * 5, server.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=65_536).contains(&len) {
        return None;
    }
    let mut msg = head.to_vec();
    msg.resize(len + 1, 0);
    server.read_exact(&mut msg[5..]).await.ok()?;
    Some(msg)
}

/// Whether `msg` is an ErrorResponse saying the server is shutting down or starting up.
fn refused_for_now(msg: &[u8]) -> bool {
    if msg.first() != Some(&b'E') {
        return false;
    }
    msg[5..]
        .split(|b| *b == 0)
        .filter_map(|f| f.split_first())
        .any(|(tag, v)| *tag == b'C' && (v == b"57P03" || v == b"57P01"))
}

/// Delivers a CancelRequest to every member's Postgres: the secret key in it matches only the
/// backend that owns the session (the router cannot read the key of a TLS session, and a cancel
/// with a key that matches nothing is ignored).
async fn deliver_cancel(shared: &Shared, request: &[u8]) {
    let members = shared.view.borrow().members.clone();
    for m in members {
        if let Some(mut s) = connect_backend(&m.addr).await {
            let _ = s.write_all(request).await;
            let _ = s.shutdown().await;
        }
    }
    shared.metrics.cancels.inc();
}

/// Resolves when the committed primary is no longer (`node`, `epoch`).
async fn demoted(mut view: watch::Receiver<View>, node: u64, epoch: u64) {
    loop {
        let still = view
            .borrow_and_update()
            .primary
            .as_ref()
            .is_some_and(|(b, e)| b.node == node && *e == epoch);
        if !still {
            return;
        }
        if view.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn serve(mut client: TcpStream, port: Port, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let Ok(first) = read_first(&mut client).await else {
        return;
    };
    let bytes = match &first {
        First::Cancel(req) => {
            deliver_cancel(&shared, req).await;
            return;
        }
        First::Negotiate(b) | First::Startup(b) => b.clone(),
    };
    let placed = match port {
        Port::ReadWrite => {
            shared.metrics.holding.inc();
            let p = place_on_primary(&shared).await;
            shared.metrics.holding.dec();
            p.map(|(b, epoch, s, waited)| {
                if waited > RETRY_HELD {
                    shared.metrics.held.inc();
                    shared.metrics.held_ms.inc_by(waited.as_millis() as u64);
                }
                (b, Some(epoch), s)
            })
        }
        Port::ReadOnly => place_on_replica(&shared).await.map(|(b, s)| (b, None, s)),
    };
    let Some((backend, epoch, mut server)) = placed else {
        let why = match port {
            Port::ReadWrite => format!(
                "pgquorum router: no primary accepted a connection within {} ms",
                shared.write_timeout.as_millis()
            ),
            Port::ReadOnly => {
                "pgquorum router: no replica (or primary) accepted a connection".into()
            }
        };
        refuse(&shared, port, &mut client, &first, &why).await;
        return;
    };
    // A server that is shutting down or not yet up answers a startup packet with an error
    // before anything else: the client has seen nothing yet, so it can go elsewhere.
    let (backend, mut server, greeting) = match (&first, port) {
        (First::Startup(_), _) => {
            match place_startup(&shared, port, backend, server, &bytes).await {
                Some(p) => p,
                None => {
                    refuse(
                        &shared,
                        port,
                        &mut client,
                        &first,
                        "pgquorum router: no primary took the session",
                    )
                    .await;
                    return;
                }
            }
        }
        _ => {
            if server.write_all(&bytes).await.is_err() {
                return;
            }
            (backend, server, Vec::new())
        }
    };
    let epoch = match port {
        Port::ReadWrite => shared
            .view
            .borrow()
            .primary
            .as_ref()
            .filter(|(b, _)| b.node == backend.node)
            .map(|(_, e)| *e)
            .or(epoch),
        Port::ReadOnly => None,
    };
    if client.write_all(&greeting).await.is_err() {
        return;
    }
    let label = PortLabel {
        port: port.name().into(),
        node: backend.node.to_string(),
    };
    shared.metrics.placed.get_or_create(&label).inc();
    let gauge = shared.metrics.connections.get_or_create(&label).clone();
    gauge.inc();
    {
        let pipe = tokio::io::copy_bidirectional(&mut client, &mut server);
        match epoch {
            Some(epoch) => {
                tokio::select! {
                    _ = pipe => {}
                    _ = demoted(shared.view.clone(), backend.node, epoch) => {
                        // The primary lost its office: whatever it still answers must not
                        // reach a client as if it were the primary's.
                        shared.metrics.closed_stale.inc();
                        tracing::info!(node = backend.node, epoch, "closing a connection to a former primary");
                    }
                }
            }
            None => {
                let _ = pipe.await;
            }
        }
    }
    gauge.dec();
}

async fn listen(addr: &str, port: Port, shared: Arc<Shared>) -> Result<()> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({} port)", port.name()))?;
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve(s, port, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a client connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn serve_http(addr: &str, shared: Arc<Shared>) -> Result<()> {
    use axum::routing::get;
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (http_addr)"))?;
    let health = {
        let shared = shared.clone();
        move || {
            let known = shared.view.borrow().primary.is_some();
            async move {
                if known {
                    (axum::http::StatusCode::OK, "primary known\n")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no primary\n")
                }
            }
        }
    };
    let metrics = move || {
        let text = shared.metrics.render();
        async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                text,
            )
        }
    };
    let app = axum::Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            tracing::warn!(error = %e, "router HTTP endpoints stopped");
        }
    });
    Ok(())
}

/// Runs a router until `stop` resolves.
pub async fn run(cfg: RouterConfig, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    let client = cfg
        .security
        .apply(ApiClient::new(cfg.endpoints.clone())?)?
        .with_patience(Duration::from_secs(5))
        .with_request_timeout(Duration::from_secs(3));
    let (tx, rx) = watch::channel(View::default());
    let shared = Arc::new(Shared {
        view: rx,
        metrics: Metrics::new(),
        write_timeout: Duration::from_millis(cfg.write_timeout_ms),
        read_fallback: cfg.read_fallback_to_primary,
        next_replica: AtomicUsize::new(0),
        ready: std::sync::Mutex::new(None),
    });
    listen(&cfg.listen_rw, Port::ReadWrite, shared.clone()).await?;
    if let Some(ro) = &cfg.listen_ro {
        listen(ro, Port::ReadOnly, shared.clone()).await?;
    }
    if let Some(h) = &cfg.http_addr {
        serve_http(h, shared.clone()).await?;
    }
    // The stream's own watch would hold this client's connection; the health poll uses a
    // second one.
    tokio::spawn(follow_primary(client.clone(), tx.clone()));
    tokio::spawn(follow_replicas(client, tx, cfg.max_lag_bytes));
    tracing::info!(rw = %cfg.listen_rw, ro = ?cfg.listen_ro, http = ?cfg.http_addr, "router started");
    stop.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, role: i32, lag: u64) -> proto::Member {
        proto::Member {
            id,
            pg_host: "127.0.0.1".into(),
            pg_port: 5000 + id as u32,
            pg_role: role,
            lag_bytes: lag,
            ..Default::default()
        }
    }

    #[test]
    fn the_committed_primary_and_the_streaming_replicas_within_the_lag_take_connections() {
        let t = proto::Topology {
            primary: Some(proto::PrimaryAssignment {
                node_id: 1,
                epoch: 7,
            }),
            members: vec![
                member(1, proto::PgRole::Primary as i32, 0),
                member(2, proto::PgRole::Replica as i32, 10),
                member(3, proto::PgRole::Replica as i32, 5_000),
                member(4, proto::PgRole::Fenced as i32, 0),
            ],
            ..Default::default()
        };
        let (p, epoch) = committed_primary(&t).unwrap();
        assert_eq!((p.node, p.addr.as_str(), epoch), (1, "127.0.0.1:5001", 7));
        let all: Vec<u64> = readable_replicas(&t, None).iter().map(|b| b.node).collect();
        assert_eq!(all, vec![2, 3]);
        let close: Vec<u64> = readable_replicas(&t, Some(100))
            .iter()
            .map(|b| b.node)
            .collect();
        assert_eq!(close, vec![2]);
        let none = proto::Topology {
            primary: None,
            ..t.clone()
        };
        assert!(committed_primary(&none).is_none());
    }

    #[test]
    fn the_shipped_example_config_is_valid_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        let example = include_str!("../../../deploy/router.example.toml");
        std::fs::write(&path, example).unwrap();
        let cfg = RouterConfig::load(&path).unwrap();
        assert_eq!(cfg.endpoints.len(), 3);
        assert_eq!(cfg.write_timeout_ms, 30_000);
        assert!(cfg.read_fallback_to_primary);
        std::fs::write(&path, example.replace("127.0.0.1:6432", "nowhere")).unwrap();
        let e = format!("{:#}", RouterConfig::load(&path).unwrap_err());
        assert!(e.contains("listen_rw") && e.contains("nowhere"), "{e}");
        std::fs::write(
            &path,
            example.replace("write_timeout_ms = 30000", "write_timeout_ms = 0"),
        )
        .unwrap();
        let e = format!("{:#}", RouterConfig::load(&path).unwrap_err());
        assert!(e.contains("write_timeout_ms"), "{e}");
    }

    #[test]
    fn a_refusal_for_shutdown_is_told_from_other_errors() {
        assert!(refused_for_now(&error_response("57P03", "shutting down")));
        assert!(refused_for_now(&error_response("57P01", "terminating")));
        assert!(!refused_for_now(&error_response(
            "28P01",
            "password authentication failed"
        )));
        assert!(!refused_for_now(b"R\0\0\0\x08\0\0\0\0"));
    }

    #[test]
    fn an_error_response_is_a_well_formed_protocol_message() {
        let m = error_response("57P03", "no primary");
        assert_eq!(m[0], b'E');
        let len = u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
        assert_eq!(len + 1, m.len());
        assert!(m.ends_with(b"no primary\0\0"));
    }
}
