//! openraft's network over tonic gRPC: one kept, lazily connected channel per peer, every call
//! bounded by openraft's own time-to-live, so a dead or frozen peer only slows its own calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::proto::raft_transport_client::RaftTransportClient;
use crate::proto::RaftMessage;
use crate::security::Tls;
use crate::types::{NodeId, TypeConfig};

/// How long establishing a TCP + HTTP/2 connection to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How often a kept channel pings its peer over HTTP/2, and how long it waits for the answer
/// before it drops the connection. A silent cut leaves a TCP connection open; without the ping a
/// kept channel would queue every later call on it until the kernel gave up, minutes later.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(1_000);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Builds a lazily connecting channel meant to be kept and shared: it pings its peer, so a
/// connection that went silent is closed and the next call dials afresh.
fn kept_channel(addr: &str, tls: Option<&Tls>) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(crate::security::connect_lazy(endpoint, tls))
}

/// Where this node dials an address a peer advertised: that address itself, or the one the node
/// config's `[dial_via]` table names for it (a NAT, a port forward, or a test's fault proxy
/// that stands on one directed link between two members). Every outgoing connection to a peer,
/// gRPC and Postgres alike, goes through [`Dialer::route`].
///
/// Clones share one set of kept channels ([`Dialer::kept`]), one per routed address.
#[derive(Clone, Debug, Default)]
pub struct Dialer {
    via: Arc<BTreeMap<String, String>>,
    kept: Arc<Mutex<HashMap<String, Channel>>>,
    tls: Option<Tls>,
}

impl Dialer {
    /// A dialer that reaches each `host:port` key through its value.
    pub fn new(via: BTreeMap<String, String>) -> Self {
        Self {
            via: Arc::new(via),
            kept: Arc::default(),
            tls: None,
        }
    }

    /// Dial every peer over mutual TLS with `tls` (the member's own certificate).
    pub fn with_tls(mut self, tls: Option<Tls>) -> Self {
        self.tls = tls;
        self
    }

    /// The TLS this dialer speaks, if any.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The address to connect to for the advertised `addr`.
    pub fn route<'a>(&'a self, addr: &'a str) -> &'a str {
        self.via.get(addr).map(String::as_str).unwrap_or(addr)
    }

    /// The channel kept for the advertised `addr`, made on first use: calls share its one
    /// connection, so a call costs one round trip, not the TCP and HTTP/2 handshakes first
    /// (lease renewals under latency depend on it). After a call that failed or timed out,
    /// [`Dialer::forget`] it so the next call dials afresh.
    pub fn kept(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let route = self.route(addr).to_string();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = kept.get(&route) {
            return Ok(c.clone());
        }
        let c = kept_channel(&route, self.tls.as_ref())?;
        kept.insert(route, c.clone());
        Ok(c)
    }

    /// Drops the kept channel for the advertised `addr` (its connection closes once no clone
    /// is in use).
    pub fn forget(&self, addr: &str) {
        let route = self.route(addr);
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(route);
    }

    /// How many channels are kept (for tests).
    pub fn kept_count(&self) -> usize {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The host and port to connect to for a Postgres a peer advertised at `host`:`port`.
    pub fn postgres(&self, host: &str, port: u16) -> (String, u16) {
        let advertised = format!("{host}:{port}");
        match self.via.get(&advertised).and_then(|v| v.rsplit_once(':')) {
            Some((h, p)) => match p.parse() {
                Ok(p) => (h.to_string(), p),
                Err(_) => (host.to_string(), port),
            },
            None => (host.to_string(), port),
        }
    }
}

/// Creates one [`PeerClient`] per replication target.
#[derive(Clone, Default)]
pub struct GrpcNetwork {
    dialer: Dialer,
}

impl GrpcNetwork {
    /// Reaches peers through `dialer`.
    pub fn new(dialer: Dialer) -> Self {
        Self { dialer }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = PeerClient;

    /// openraft asks for a client per replication stream and, to confirm leadership, per voter
    /// for every confirmation. A channel of its own each time would cost the TCP and HTTP/2
    /// handshakes on every confirmation, within a heartbeat's time-to-live: on a loaded host
    /// confirmations then failed, the leader's quorum contact aged past what lease grants
    /// allow, and a healthy primary lost its lease (found by the partition suite). Every
    /// client shares the peer's kept channel instead; its keepalive closes a silenced
    /// connection and tonic dials again on the next call.
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            client: self
                .dialer
                .kept(&node.addr)
                .ok()
                .map(RaftTransportClient::new),
        }
    }
}

/// The Raft client for one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    /// `None` when the address does not parse; every call then reports the peer unreachable.
    client: Option<RaftTransportClient<Channel>>,
}

#[derive(Debug, thiserror::Error)]
#[error("peer {target} at {addr}: {what}")]
struct TransportFailure {
    target: NodeId,
    addr: String,
    what: String,
}

enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerClient {
    /// Sends one JSON-encoded request and decodes the peer's `Result<Resp, RaftError<E>>`.
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let failure = |what: String| TransportFailure {
            target: self.target,
            addr: self.addr.clone(),
            what,
        };
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&failure(
                "address is not a valid host:port".into(),
            ))));
        };
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let msg = RaftMessage { payload };
        let fut = async {
            match rpc {
                Rpc::Append => client.append_entries(msg).await,
                Rpc::Vote => client.vote(msg).await,
                Rpc::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::new(&failure(format!(
                    "no answer within {} ms",
                    ttl.as_millis()
                )))))
            }
            Ok(Err(status)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&failure(format!(
                    "{}: {}",
                    status.code(),
                    status.message()
                )))))
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        let decoded: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }

    fn backoff(&self) -> Backoff {
        // Short enough that a restarted peer rejoins replication promptly.
        Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kept_channels_are_one_per_route_until_forgotten() {
        let via = BTreeMap::from([("10.0.0.2:7001".to_string(), "127.0.0.1:17001".to_string())]);
        let dialer = Dialer::new(via);
        let clone = dialer.clone();
        dialer.kept("10.0.0.2:7001").unwrap();
        clone.kept("127.0.0.1:17001").unwrap();
        assert_eq!(dialer.kept_count(), 1, "one channel per routed address");
        dialer.kept("127.0.0.1:7003").unwrap();
        assert_eq!(clone.kept_count(), 2, "clones share the kept channels");
        clone.forget("10.0.0.2:7001");
        assert_eq!(dialer.kept_count(), 1);
        assert!(dialer.kept("no port here").is_err());
        assert_eq!(dialer.kept_count(), 1, "a bad address keeps nothing");
    }
}
