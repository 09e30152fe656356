//! A client of the cluster API for the CLI and for programs: tries each endpoint in turn,
//! follows the leader hint of a follower that could not forward, and retries while an election
//! is under way.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::service::interceptor::InterceptedService;
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
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        _ => "error",
    };
    // A connection the server dropped (a refused client certificate, say) surfaces as a bare
    // "transport error"; its innermost cause names the reason.
    let mut cause = std::error::Error::source(s);
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c.to_string());
        cause = c.source();
    }
    let text = match innermost {
        Some(c) if !s.message().contains(&c) => format!("{kind}: {}: {c}", s.message()),
        _ => format!("{kind}: {}", s.message()),
    };
    if s.message() == "transport error" {
        // TLS 1.3 finishes the client's side of the handshake before the server has judged
        // the client's certificate, so a refusal arrives as a dropped connection.
        format!(
            "{text} (a sidecar drops the connection when it refuses the client certificate: \
             is it issued by this cluster's CA?)"
        )
    } else {
        text
    }
}

/// Adds a caller's bearer token to every request.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: Option<crate::security::Token>,
}

impl Credentials {
    /// Sends `token` with every call.
    pub fn token(token: Option<crate::security::Token>) -> Self {
        Self { token }
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(t) = &self.token {
            let value = t
                .header()
                .parse()
                .map_err(|_| Status::invalid_argument("the token is not valid header text"))?;
            req.metadata_mut()
                .insert(crate::security::AUTHORIZATION, value);
        }
        Ok(req)
    }
}

/// A channel that carries the caller's credentials.
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// Calls the cluster API through a list of endpoints.
#[derive(Debug, Clone)]
pub struct ApiClient {
    endpoints: Vec<String>,
    patience: Duration,
    request_timeout: Duration,
    tls: Option<crate::security::Tls>,
    credentials: Credentials,
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
            tls: None,
            credentials: Credentials::default(),
        })
    }

    /// The same client (TLS, credentials, timeouts) over other endpoints.
    pub fn reach(&self, endpoints: Vec<String>) -> Result<Self, ClientError> {
        Ok(Self {
            endpoints: Self::new(endpoints)?.endpoints,
            ..self.clone()
        })
    }

    /// Speak TLS with `tls`: the cluster CA, and a client certificate if it holds one.
    pub fn with_tls(mut self, tls: Option<crate::security::Tls>) -> Self {
        self.tls = tls;
        self
    }

    /// Send `credentials` (a bearer token) with every call.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
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

    async fn connect(&self, addr: &str) -> Result<AuthChannel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_millis(1000))
            .timeout(self.request_timeout)
            // A member that froze keeps the connection open and answers nothing: the pings
            // end a watch stream on it (the router's) instead of leaving it silent for ever.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        let channel = crate::security::connect(endpoint, self.tls.as_ref())
            .await
            .map_err(|e| format!("cannot connect: {}", connect_error(&e)))?;
        Ok(InterceptedService::new(channel, self.credentials.clone()))
    }

    /// Runs `call` against the cluster: a transient failure (unreachable member, no leader yet)
    /// moves on to the next endpoint or the leader's address, and the whole list is retried
    /// until the patience runs out; any other error is returned as it is.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(ClusterClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_on(ClusterClient::new, call).await
    }

    /// Like [`ApiClient::call`], for the sidecars' own service.
    pub async fn call_internal<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(InternalClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_on(InternalClient::new, call).await
    }

    async fn call_on<C, T, F, Fut>(
        &self,
        make: fn(AuthChannel) -> C,
        call: F,
    ) -> Result<T, ClientError>
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

/// The innermost cause of a connect failure: tonic's own message is only "transport error",
/// while a refused TLS handshake names its reason (an unknown CA, a wrong name) further in.
fn connect_error(e: &tonic::transport::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = s.to_string();
        source = s.source();
    }
    msg
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
