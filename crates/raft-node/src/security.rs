//! Who may talk to a sidecar: mutual TLS between members, client certificates or a bearer token
//! for operators, and the checks every RPC makes before it touches the cluster.
//!
//! Identities live in a certificate's DNS names, signed by the cluster's own CA:
//! - a member carries [`NODE_NAME`] and `node-<id>.pgquorum` ([`node_name`]); the second is the
//!   only thing that lets it speak for member `<id>` (Raft messages, reports, registration);
//! - an operator carries [`OPERATOR_NAME`].
//!
//! Certificates and the token are re-read when their files change ([`Tls::reload_if_changed`]),
//! so a rotation needs no restart: new connections use the new files, open ones keep theirs.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

use crate::types::NodeId;

/// The DNS name every member's certificate carries; clients verify a sidecar against it.
pub const NODE_NAME: &str = "node.pgquorum";
/// The DNS name an operator's client certificate carries.
pub const OPERATOR_NAME: &str = "operator.pgquorum";
/// The gRPC metadata key of a bearer token (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";
/// How long a TLS handshake on the server may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The DNS name that makes a certificate speak for member `id`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.pgquorum")
}

/// Why security material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file it is meant to be.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A file holds no usable PEM material.
    #[error("{what} {path} holds no {expected} (PEM); make one with `pgquorum cert init` / `pgquorum cert issue`")]
    Pem {
        /// Which file it is meant to be.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was expected in it.
        expected: &'static str,
    },
    /// rustls refused the material.
    #[error("TLS material in {path} is unusable: {message}")]
    Tls {
        /// The certificate file.
        path: PathBuf,
        /// rustls' reason.
        message: String,
    },
    /// The certificate does not name the identity this process must have.
    #[error(
        "certificate {path} is not valid for {name} (issue it with `pgquorum cert issue {hint}`)"
    )]
    WrongIdentity {
        /// The certificate file.
        path: PathBuf,
        /// The name it should carry.
        name: String,
        /// How to issue the right one.
        hint: String,
    },
    /// The private key may be read by others.
    #[error("key file {path} may be read by others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file is empty or not one line of printable text.
    #[error("token file {0} must hold one line of at least 16 printable characters")]
    BadToken(PathBuf),
}

/// The TLS files of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate: the only issuer trusted for peers.
    pub ca: PathBuf,
    /// This process's certificate and key, if it has one (a sidecar always does; a CLI only
    /// when it authenticates by certificate).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Whose certificate this process must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Member `id`'s sidecar.
    Node(NodeId),
    /// A client: an operator's certificate, or none.
    Client,
}

struct Loaded {
    server: Option<Arc<ServerConfig>>,
    client: Arc<ClientConfig>,
    stamp: Vec<Option<SystemTime>>,
}

/// The TLS configuration of one process, shared by its server and its clients, re-read when the
/// files change.
#[derive(Clone)]
pub struct Tls {
    files: Arc<TlsFiles>,
    holder: Holder,
    current: Arc<RwLock<Arc<Loaded>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("holder", &self.holder)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let bytes = std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(SecurityError::Pem {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, SecurityError> {
    use std::os::unix::fs::PermissionsExt;
    // As Postgres asks of its ssl_key_file: the owner reads it, the group at most reads it.
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o037 != 0 {
            return Err(SecurityError::KeyMode {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let bytes = std::fs::read(path).map_err(|source| SecurityError::Read {
        what: "key file",
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| SecurityError::Pem {
        what: "key file",
        path: path.to_path_buf(),
        expected: "private key",
    })
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Whether the end-entity certificate `cert` is valid for the DNS name `name`. The chain was
/// verified by the handshake; this only reads the names.
pub fn cert_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    cert_names_any(cert, [name.to_string()])
}

/// Whether `cert` is valid for any of `names`, parsing it once (a check runs on every RPC).
fn cert_names_any(cert: &CertificateDer<'_>, names: impl IntoIterator<Item = String>) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    names.into_iter().any(|name| {
        ServerName::try_from(name.as_str())
            .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
    })
}

impl Tls {
    /// Loads `files` for `holder`, checking that the certificate names that holder.
    pub fn load(files: TlsFiles, holder: Holder) -> Result<Self, SecurityError> {
        let loaded = Self::build(&files, holder)?;
        Ok(Self {
            files: Arc::new(files),
            holder,
            current: Arc::new(RwLock::new(Arc::new(loaded))),
        })
    }

    fn stamp(files: &TlsFiles) -> Vec<Option<SystemTime>> {
        let mut s = vec![mtime(&files.ca)];
        if let Some((c, k)) = &files.identity {
            s.push(mtime(c));
            s.push(mtime(k));
        }
        s
    }

    fn build(files: &TlsFiles, holder: Holder) -> Result<Loaded, SecurityError> {
        let stamp = Self::stamp(files);
        let tls_err = |path: &Path, e: &dyn std::fmt::Display| SecurityError::Tls {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut roots = RootCertStore::empty();
        for c in read_certs("CA file", &files.ca)? {
            roots.add(c).map_err(|e| tls_err(&files.ca, &e))?;
        }
        let roots = Arc::new(roots);
        let identity = match &files.identity {
            Some((cert, key)) => {
                let chain = read_certs("certificate file", cert)?;
                let (name, hint) = match holder {
                    Holder::Node(id) => (node_name(id), format!("node {id}")),
                    Holder::Client => (OPERATOR_NAME.to_string(), "operator NAME".to_string()),
                };
                if !cert_names(&chain[0], &name) {
                    return Err(SecurityError::WrongIdentity {
                        path: cert.clone(),
                        name,
                        hint,
                    });
                }
                Some((cert.clone(), chain, read_key(key)?))
            }
            None => None,
        };
        let client_builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(&files.ca, &e))?
            .with_root_certificates(roots.clone());
        let mut client = match &identity {
            Some((path, chain, key)) => client_builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| tls_err(path, &e))?,
            None => client_builder.with_no_client_auth(),
        };
        client.alpn_protocols = vec![b"h2".to_vec()];
        let server = match (&identity, holder) {
            (Some((path, chain, key)), Holder::Node(_)) => {
                // A client certificate is asked for, not required: operators may come with a
                // token instead. Every RPC then checks who the caller is ([`Access`]).
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| tls_err(&files.ca, &e))?;
                let mut server = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls_err(path, &e))?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain.clone(), key.clone_key())
                    .map_err(|e| tls_err(path, &e))?;
                server.alpn_protocols = vec![b"h2".to_vec()];
                Some(Arc::new(server))
            }
            _ => None,
        };
        Ok(Loaded {
            server,
            client: Arc::new(client),
            stamp,
        })
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files if any changed since the last load. A broken new set keeps the old
    /// one in force and returns the error, so a half-copied rotation never takes a member off
    /// the network.
    pub fn reload_if_changed(&self) -> Result<bool, SecurityError> {
        if Self::stamp(&self.files) == self.loaded().stamp {
            return Ok(false);
        }
        let fresh = Self::build(&self.files, self.holder)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(true)
    }

    /// The files in use.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Builds a channel to `endpoint` that speaks TLS, dials when first used and redials on a
    /// lost connection, each time with the configuration then in force.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(TlsConnector { tls: self.clone() })
    }

    /// Like [`Tls::connect_lazy`], connecting now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint
            .connect_with_connector(TlsConnector { tls: self.clone() })
            .await
    }
}

/// Connects a channel to `endpoint`, over TLS when `tls` is given.
pub async fn connect(
    endpoint: Endpoint,
    tls: Option<&Tls>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(t) => t.connect(endpoint).await,
        None => endpoint.connect().await,
    }
}

/// A lazily connecting channel to `endpoint`, over TLS when `tls` is given.
pub fn connect_lazy(endpoint: Endpoint, tls: Option<&Tls>) -> Channel {
    match tls {
        Some(t) => t.connect_lazy(endpoint),
        None => endpoint.connect_lazy(),
    }
}

/// Dials a sidecar and verifies it against the cluster CA as a member ([`NODE_NAME`]).
#[derive(Clone)]
struct TlsConnector {
    tls: Tls,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.loaded().client.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect(format!("{host}:{port}")).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(NODE_NAME)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// What the server knows about the other end of a connection.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The remote address.
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, verified against the cluster CA, if it sent one.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// One accepted connection, plain or TLS.
pub enum Conn {
    /// No TLS (an `insecure` member).
    Plain(TcpStream),
    /// A finished TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(s) => PeerInfo {
                remote: s.peer_addr().ok(),
                certs: None,
            },
            Conn::Tls(s) => {
                let (tcp, session) = s.get_ref();
                PeerInfo {
                    remote: tcp.peer_addr().ok(),
                    certs: session
                        .peer_certificates()
                        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, after their TLS handshake when `tls` is given. Each
/// handshake runs in its own task under [`HANDSHAKE_TIMEOUT`], so a slow or hostile client holds
/// up nobody else; a refused handshake (another CA, no TLS) is logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Tls>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a gRPC connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.as_ref() else {
                if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let Some(config) = tls.loaded().server.clone() else {
                return;
            };
            if tx.is_closed() {
                return;
            }
            let tx = tx.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(s)))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "refused a gRPC connection: TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "refused a gRPC connection: no TLS handshake within 5 s")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A bearer token, read from a file and re-read when it changes.
#[derive(Clone)]
pub struct Token {
    path: Arc<PathBuf>,
    current: Arc<RwLock<(String, Option<SystemTime>)>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Token").field("path", &self.path).finish()
    }
}

/// Reads one token line from `path`.
pub fn read_token(path: &Path) -> Result<String, SecurityError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecurityError::Read {
        what: "token file",
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.len() < 16 || token.contains(char::is_whitespace) || !token.is_ascii() {
        return Err(SecurityError::BadToken(path.to_path_buf()));
    }
    Ok(token.to_string())
}

impl Token {
    /// Loads the token in `path`.
    pub fn load(path: &Path) -> Result<Self, SecurityError> {
        let value = read_token(path)?;
        Ok(Self {
            path: Arc::new(path.to_path_buf()),
            current: Arc::new(RwLock::new((value, mtime(path)))),
        })
    }

    /// Re-reads the file if it changed; a broken new file keeps the old token.
    pub fn reload_if_changed(&self) -> Result<bool, SecurityError> {
        let now = mtime(&self.path);
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == now {
            return Ok(false);
        }
        let value = read_token(&self.path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (value, now);
        Ok(true)
    }

    /// Whether `offered` is the token, compared in constant time.
    pub fn matches(&self, offered: &str) -> bool {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        let (a, b) = (guard.0.as_bytes(), offered.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The `authorization` header value for this token.
    pub fn header(&self) -> String {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        format!("Bearer {}", guard.0)
    }
}

/// The bearer token a request carries, if any.
pub fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Whether `host` is an IP address or a DNS host name: it lands in `pg_hba.conf` and in the
/// replicas' `primary_conninfo`, where a space, a slash or a newline would change their meaning.
pub fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    // pg_hba.conf reads these words in the address column as "any address" or "this
    // network", not as host names.
    if ["all", "samehost", "samenet"]
        .iter()
        .any(|k| host.eq_ignore_ascii_case(k))
    {
        return false;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// What a call needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Read the topology, the config, the events.
    Read,
    /// Change anything: switchover, failover, pause, config, membership, member verbs.
    Operate,
}

/// Who may call what on one sidecar.
#[derive(Clone, Debug, Default)]
pub struct Access {
    tls: bool,
    token: Option<Token>,
    open_reads: bool,
}

impl Access {
    /// Checks for a sidecar: `tls` says whether peers come with verified certificates; `token`
    /// is the operators' bearer token; `open_reads` lets anyone read.
    pub fn new(tls: bool, token: Option<Token>, open_reads: bool) -> Self {
        Self {
            tls,
            token,
            open_reads,
        }
    }

    fn leaf<T>(req: &Request<T>) -> Option<&CertificateDer<'static>> {
        req.extensions().get::<PeerInfo>()?.certs.as_ref()?.first()
    }

    /// Lets the call through only if it comes from member `id` itself. Without TLS nobody can
    /// be told apart, so everyone passes (the member warned at start).
    #[allow(clippy::result_large_err)]
    pub fn require_node<T>(&self, req: &Request<T>, id: NodeId, what: &str) -> Result<(), Status> {
        if !self.tls {
            return Ok(());
        }
        match Self::leaf(req) {
            Some(cert) if cert_names(cert, &node_name(id)) => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "{what} for member {id} must come from member {id}'s own certificate"
            ))),
            None => Err(Status::unauthenticated(format!(
                "{what} needs a member's client certificate"
            ))),
        }
    }

    /// Lets the call through if its caller may do `need`: one of the current `members` (its
    /// sidecar forwards and gathers on operators' behalf), an operator certificate or the
    /// bearer token; reads also pass when they are open. A removed member's certificate no
    /// longer counts.
    #[allow(clippy::result_large_err)]
    pub fn require<T>(
        &self,
        req: &Request<T>,
        need: Need,
        what: &str,
        members: &std::collections::BTreeSet<NodeId>,
    ) -> Result<(), Status> {
        if need == Need::Read && self.open_reads {
            return Ok(());
        }
        if let Some(cert) = Self::leaf(req) {
            let names = std::iter::once(OPERATOR_NAME.to_string())
                .chain(members.iter().map(|id| node_name(*id)));
            if cert_names_any(cert, names) {
                return Ok(());
            }
        }
        match (&self.token, bearer(req)) {
            (Some(t), Some(offered)) if t.matches(offered) => return Ok(()),
            (Some(_), Some(_)) => {
                return Err(Status::permission_denied(format!(
                    "{what}: the bearer token is wrong"
                )))
            }
            _ => {}
        }
        if !self.tls && self.token.is_none() {
            return Ok(());
        }
        Err(Status::unauthenticated(format!(
            "{what} needs an operator: a client certificate from the cluster CA \
             (pgquorum --cert-file/--key-file) or the cluster's token (--token-file)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_compared_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "0123456789abcdef-token\n").unwrap();
        let t = Token::load(&path).unwrap();
        assert!(t.matches("0123456789abcdef-token"));
        assert!(!t.matches("0123456789abcdef-toke"));
        assert!(!t.matches("0123456789abcdef-tokeN"));
        assert!(!t.matches(""));
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn a_changed_token_file_takes_over_and_a_broken_one_keeps_the_old_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let write = |text: &str, secs: u64| {
            std::fs::write(&path, text).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        };
        write("first-token-0123456789", 1_000);
        let t = Token::load(&path).unwrap();
        assert!(!t.reload_if_changed().unwrap());
        write("second-token-0123456789", 2_000);
        assert!(t.reload_if_changed().unwrap());
        assert!(t.matches("second-token-0123456789"));
        assert!(!t.matches("first-token-0123456789"));
        write("short", 3_000);
        assert!(t.reload_if_changed().is_err());
        assert!(t.matches("second-token-0123456789"));
    }

    #[test]
    fn a_short_or_spaced_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "short").unwrap();
        assert!(matches!(
            Token::load(&path),
            Err(SecurityError::BadToken(_))
        ));
        std::fs::write(&path, "a token with spaces in it").unwrap();
        assert!(matches!(
            Token::load(&path),
            Err(SecurityError::BadToken(_))
        ));
    }

    #[test]
    fn without_tls_or_token_everything_passes_and_with_a_token_only_it_does() {
        let none = std::collections::BTreeSet::new();
        let req = Request::new(());
        let open = Access::new(false, None, false);
        assert!(open.require(&req, Need::Operate, "x", &none).is_ok());
        assert!(open.require_node(&req, 1, "x").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "0123456789abcdef-token").unwrap();
        let guarded = Access::new(false, Some(Token::load(&path).unwrap()), false);
        let e = guarded
            .require(&req, Need::Operate, "switchover", &none)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut with = Request::new(());
        with.metadata_mut().insert(
            AUTHORIZATION,
            "Bearer 0123456789abcdef-token".parse().unwrap(),
        );
        assert!(guarded.require(&with, Need::Operate, "x", &none).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(AUTHORIZATION, "Bearer nope-nope-nope-nope".parse().unwrap());
        let e = guarded
            .require(&wrong, Need::Operate, "x", &none)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(!e.message().contains("nope"));
        let tls = Access::new(true, None, true);
        assert!(tls.require(&req, Need::Read, "x", &none).is_ok());
        assert_eq!(
            tls.require(&req, Need::Operate, "x", &none)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            tls.require_node(&req, 1, "report").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
