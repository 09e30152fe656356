//! openraft's network over tonic gRPC: one lazily connected channel per peer, every call bounded
//! by openraft's own time-to-live, so a dead or frozen peer only slows its own replication stream.

use std::collections::BTreeMap;
use std::sync::Arc;
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
use crate::types::{NodeId, TypeConfig};

/// How long establishing a TCP + HTTP/2 connection to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds a lazily connecting gRPC channel to `addr` (host:port).
pub fn lazy_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Where this node dials an address a peer advertised: that address itself, or the one the node
/// config's `[dial_via]` table names for it (a NAT, a port forward, or a test's fault proxy
/// that stands on one directed link between two members). Every outgoing connection to a peer,
/// gRPC and Postgres alike, goes through [`Dialer::route`].
#[derive(Clone, Debug, Default)]
pub struct Dialer {
    via: Arc<BTreeMap<String, String>>,
}

impl Dialer {
    /// A dialer that reaches each `host:port` key through its value.
    pub fn new(via: BTreeMap<String, String>) -> Self {
        Self { via: Arc::new(via) }
    }

    /// The address to connect to for the advertised `addr`.
    pub fn route<'a>(&'a self, addr: &'a str) -> &'a str {
        self.via.get(addr).map(String::as_str).unwrap_or(addr)
    }

    /// A lazily connecting channel to the advertised `addr`.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        lazy_channel(self.route(addr))
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

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            client: self
                .dialer
                .channel(&node.addr)
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
