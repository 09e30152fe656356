//! A client of the cluster API for the CLI and for programs: tries each endpoint in turn,
//! follows the leader hint of a follower that could not forward, and retries while an election
//! is under way.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use crate::api_service::LEADER_METADATA;
use crate::proto::cluster_client::ClusterClient;
use crate::proto::internal_client::InternalClient;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoints were given.
    #[error("no endpoints given; pass --endpoints host:port,... or set PGQUORUM_ENDPOINTS")]
    NoEndpoints,
    /// An endpoint is not `host:port`.
    #[error("endpoint '{0}' is not host:port (e.g. 127.0.0.1:7001)")]
    BadEndpoint(String),
    /// The cluster answered with an error that retrying elsewhere cannot fix.
    #[error("{}", describe(.0))]
    Refused(Status),
    /// No endpoint gave a usable answer before the deadline.
    #[error("no member answered within {waited_ms} ms; tried: {}", .attempts.join("; "))]
    Unreachable {
        /// How long the client kept trying.
        waited_ms: u128,
        /// The last error per endpoint.
        attempts: Vec<String>,
    },
}

impl ClientError {
    /// The gRPC status of a refusal, if that is what this is.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Refused(s) => Some(s),
            _ => None,
        }
    }
}

fn describe(s: &Status) -> String {
    let kind = match s.code() {
        Code::InvalidArgument => "invalid request",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "refused",
        Code::DeadlineExceeded => "timed out",
        _ => "error",
    };
    format!("{kind}: {}", s.message())
}

/// Calls the cluster API through a list of endpoints.
#[derive(Debug, Clone)]
pub struct ApiClient {
    endpoints: Vec<String>,
    patience: Duration,
    request_timeout: Duration,
}

impl ApiClient {
    /// A client over `endpoints` (each `host:port`).
    pub fn new(endpoints: Vec<String>) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints
            .into_iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        for e in &endpoints {
            let ok = matches!(e.rsplit_once(':'),
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(ClientError::BadEndpoint(e.clone()));
            }
        }
        Ok(Self {
            endpoints,
            patience: Duration::from_secs(10),
            request_timeout: Duration::from_secs(40),
        })
    }

    /// How long to keep retrying while no member can answer (default 10 s).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// How long one attempt at one member may take before the next member is tried (default
    /// 40 s, which a membership change's catch-up needs). A frozen member accepts the
    /// connection and never answers: read-only pollers set a few seconds here.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The endpoints in the order they are tried.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn connect(&self, addr: &str) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_millis(1000))
            .timeout(self.request_timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        Ok(channel)
    }

    /// Runs `call` against the cluster: a transient failure (unreachable member, no leader yet)
    /// moves on to the next endpoint or the leader's address, and the whole list is retried
    /// until the patience runs out; any other error is returned as it is.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_on(ClusterClient::new, call).await
    }

    /// Like [`ApiClient::call`], for the sidecars' own service.
    pub async fn call_internal<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(InternalClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_on(InternalClient::new, call).await
    }

    async fn call_on<C, T, F, Fut>(&self, make: fn(Channel) -> C, call: F) -> Result<T, ClientError>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let start = Instant::now();
        loop {
            let mut attempts = Vec::new();
            let mut queue: Vec<String> = self.endpoints.clone();
            let mut hops = 0;
            while let Some(addr) = (!queue.is_empty()).then(|| queue.remove(0)) {
                let client = match self.connect(&addr).await {
                    Ok(c) => make(c),
                    Err(e) => {
                        attempts.push(format!("{addr}: {e}"));
                        continue;
                    }
                };
                match call(client).await {
                    Ok(resp) => return Ok(resp.into_inner()),
                    Err(status) => {
                        let leader = status
                            .metadata()
                            .get(LEADER_METADATA)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        match (status.code(), leader) {
                            (Code::FailedPrecondition, Some(leader)) if hops < 3 => {
                                hops += 1;
                                attempts.push(format!("{addr}: not the leader"));
                                queue.insert(0, leader);
                            }
                            // A member that accepts the connection and never answers (frozen,
                            // or cut off after the handshake) is as good as unreachable.
                            (Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded, _) => {
                                attempts.push(format!("{addr}: {}", status.message()));
                            }
                            _ => return Err(ClientError::Refused(status)),
                        }
                    }
                }
            }
            if start.elapsed() >= self.patience {
                return Err(ClientError::Unreachable {
                    waited_ms: start.elapsed().as_millis(),
                    attempts,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(matches!(
            ApiClient::new(vec![]),
            Err(ClientError::NoEndpoints)
        ));
        assert!(matches!(
            ApiClient::new(vec![" ".into()]),
            Err(ClientError::NoEndpoints)
        ));
        assert!(matches!(
            ApiClient::new(vec!["localhost".into()]),
            Err(ClientError::BadEndpoint(_))
        ));
        assert!(matches!(
            ApiClient::new(vec!["h:0".into()]),
            Err(ClientError::BadEndpoint(_))
        ));
        let c = ApiClient::new(vec!["a:1".into(), " b:2 ".into()]).unwrap();
        assert_eq!(c.endpoints(), ["a:1", "b:2"]);
    }
}
