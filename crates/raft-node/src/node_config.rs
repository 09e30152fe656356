//! The sidecar's TOML configuration (`node.toml`), parsed and validated before anything touches
//! the data dir or the network.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cluster_state::Tags;
use crate::types::NodeId;

/// The longest Raft heartbeat a member may run (and register).
pub const MAX_HEARTBEAT_MS: u64 = 60_000;
/// The longest upper election timeout a member may run (and register).
pub const MAX_ELECTION_MS: u64 = 600_000;

/// A sidecar's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of the cluster; recorded in the data dir at first start and checked at every start.
    pub cluster_name: String,
    /// This node's Raft id (positive, unique in the cluster, never reused).
    pub node_id: NodeId,
    /// Human name, unique in the cluster.
    pub name: String,
    /// Directory of this node's Raft state; relative paths are relative to the config file.
    pub data_dir: PathBuf,
    /// Address the gRPC server (Raft transport and cluster API) binds, `ip:port`.
    pub listen_addr: String,
    /// Address peers and clients use to reach this node; defaults to `listen_addr`.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// HTTP address for health checks and metrics, published in the topology.
    #[serde(default)]
    pub http_addr: String,
    /// The local Postgres as clients reach it.
    #[serde(default)]
    pub postgres: PostgresEndpoint,
    /// Failover tags.
    #[serde(default)]
    pub tags: Tags,
    /// Raft timings and log compaction.
    #[serde(default)]
    pub raft: RaftTimings,
    /// The members a brand-new cluster starts with. Empty for a node that will join a running
    /// cluster through `pgquorum member add`.
    #[serde(default)]
    pub initial_members: Vec<InitialMember>,
    /// Reach an address a peer advertises (`host:port`, its gRPC or its Postgres) through
    /// another `host:port`: a NAT, a port forward, or a test's fault proxy on one directed link.
    #[serde(default)]
    pub dial_via: BTreeMap<String, String>,
    /// Executables run when this member's Postgres starts, stops or changes role.
    #[serde(default)]
    pub callbacks: crate::callbacks::CallbackConfig,
    /// TLS between members and who may call the cluster API.
    #[serde(default)]
    pub security: SecurityConfig,
}

/// TLS and authentication. A sidecar runs with TLS unless `insecure = true` says otherwise.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Run without TLS or certificate checks: anyone who reaches the gRPC port can steer the
    /// cluster. For a debugging session only; the sidecar warns at start.
    pub insecure: bool,
    /// The cluster CA's certificate (`pgquorum cert init`): the only issuer of members and
    /// operators. Relative paths are relative to the config file, as for the two below.
    pub ca_file: Option<PathBuf>,
    /// This member's certificate (`pgquorum cert issue node ID`), naming its node id.
    pub cert_file: Option<PathBuf>,
    /// Its private key, readable by its owner only.
    pub key_file: Option<PathBuf>,
    /// A file whose first line is the operators' bearer token: callers that present it may use
    /// every verb, as an operator's client certificate may.
    pub token_file: Option<PathBuf>,
    /// Let any caller read the topology, the config and the events (writes still need an
    /// operator).
    pub open_reads: bool,
    /// A file holding a token that `GET /metrics` must present (`Authorization: Bearer ...`);
    /// unset, `/metrics` is open like the health endpoints.
    pub metrics_token_file: Option<PathBuf>,
}

impl SecurityConfig {
    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::security::TlsFiles> {
        match (&self.ca_file, &self.cert_file, &self.key_file) {
            (Some(ca), Some(cert), Some(key)) if !self.insecure => {
                Some(crate::security::TlsFiles {
                    ca: ca.clone(),
                    identity: Some((cert.clone(), key.clone())),
                })
            }
            _ => None,
        }
    }
}

/// This member's Postgres: where clients reach it and, when `data_dir` is set, how the sidecar
/// manages it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresEndpoint {
    /// Host name or address (also `listen_addresses`).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Postgres data directory. When set, the sidecar initialises, starts, stops, promotes,
    /// rewinds and fences this Postgres; when absent it only takes part in the Raft group.
    /// Relative paths are relative to the config file.
    pub data_dir: Option<PathBuf>,
    /// Directory of the Postgres executables (default: discovered).
    pub bin_dir: Option<PathBuf>,
    /// Unprivileged OS user that runs Postgres when the sidecar runs as root.
    pub os_user: Option<String>,
    /// Directory of Postgres' Unix-domain socket, created for `os_user` when missing, so that
    /// `sudo -u postgres psql -p PORT` works; `""`: TCP only.
    pub socket_dir: PathBuf,
    /// Superuser role created at initdb and used by the sidecar.
    pub superuser: String,
    /// Its password. Keep it out of the file with `superuser_password_file` (a file readable
    /// only by its owner, the password on its first line) or the environment variable
    /// `PGQUORUM_SUPERUSER_PASSWORD`; exactly one of the three.
    pub superuser_password: Secret,
    /// A file holding the superuser's password.
    pub superuser_password_file: Option<PathBuf>,
    /// Replication role.
    pub replication_user: String,
    /// Its password; or `replication_password_file`, or `PGQUORUM_REPLICATION_PASSWORD`.
    pub replication_password: Secret,
    /// A file holding the replication role's password.
    pub replication_password_file: Option<PathBuf>,
    /// Addresses (CIDR, or host names) allowed to connect for replication and as the
    /// superuser. Empty (the default): the members' own registered Postgres hosts, kept up to
    /// date as members join and leave, and 127.0.0.1.
    pub allowed_cidrs: Vec<String>,
    /// A warning is logged (and recorded in the events) when the data or WAL filesystem has
    /// fewer free bytes than this, before writes fail; `list` then shows the free space.
    pub free_space_warn_bytes: u64,
    /// How long Postgres keeps running under its guard after a clean sidecar stop (SIGTERM),
    /// so that a restarted or upgraded sidecar takes it over without a failover. A primary is
    /// fenced when its lease ends if no sidecar has renewed it by then, whichever comes first;
    /// 0: Postgres stops with the sidecar.
    pub restart_window_ms: u64,
    /// How long a promotion may take (`pg_promote` and the end of recovery) before the sidecar
    /// calls it failed. A promotion asked for goes on in Postgres regardless: the sidecar then
    /// counts this data directory as the new epoch's primary whatever the call returned.
    pub promote_timeout_ms: u64,
}

/// The shortest promotion timeout a member may set (`pg_promote` waits whole seconds).
pub const MIN_PROMOTE_TIMEOUT_MS: u64 = 1_000;
/// The longest promotion timeout a member may set.
pub const MAX_PROMOTE_TIMEOUT_MS: u64 = 600_000;

impl Default for PostgresEndpoint {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 5432,
            data_dir: None,
            bin_dir: None,
            os_user: None,
            socket_dir: PathBuf::from("/var/run/postgresql"),
            superuser: "postgres".into(),
            superuser_password: Secret::default(),
            superuser_password_file: None,
            replication_user: "replicator".into(),
            replication_password: Secret::default(),
            replication_password_file: None,
            allowed_cidrs: Vec::new(),
            free_space_warn_bytes: 1024 * 1024 * 1024,
            restart_window_ms: 30_000,
            promote_timeout_ms: 60_000,
        }
    }
}

/// Reads an environment variable.
pub type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// The environment variable that may hold the superuser's password.
pub const SUPERUSER_PASSWORD_ENV: &str = "PGQUORUM_SUPERUSER_PASSWORD";
/// The environment variable that may hold the replication role's password.
pub const REPLICATION_PASSWORD_ENV: &str = "PGQUORUM_REPLICATION_PASSWORD";

/// A password: never shown by `Debug`, so no log line or error prints it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The password itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no password was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "(none)"
        } else {
            "(hidden)"
        })
    }
}

/// The password on the first line of `path`; refuses a file others may read, as libpq refuses
/// such a `.pgpass`.
fn read_secret_file(path: &Path) -> Result<Secret, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{} may be read by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if first.is_empty() {
        return Err(format!(
            "{} holds no password on its first line",
            path.display()
        ));
    }
    Ok(Secret(first.to_string()))
}

/// One member of a new cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitialMember {
    /// Raft id.
    pub id: NodeId,
    /// gRPC address (`host:port`).
    pub addr: String,
}

/// Raft timings. openraft 0.9 bounds every AppendEntries call, follower fsync included, by the
/// heartbeat interval, so it must stay well above a disk flush. A follower that knew a committed
/// leader starts an election only after `election_timeout_max_ms` (openraft's leader lease) plus
/// its own randomized election timeout, so the defaults re-elect within about 1.3 to 1.6 s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTimings {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for followers that lag a little.
    pub logs_to_keep: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 150,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 600,
            snapshot_every: 1000,
            logs_to_keep: 200,
        }
    }
}

/// A configuration that cannot be used, with the fix.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax, a missing field, an unknown field or a wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// A value breaks a rule.
    #[error("config file {path}: {field}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// The rule and the fix.
        problem: String,
    },
}

impl NodeConfig {
    /// Reads, parses and validates the file at `path`; relative `data_dir` becomes relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, NodeConfigError> {
        Self::load_with_env(path, &|k| std::env::var(k).ok())
    }

    /// [`NodeConfig::load`] reading environment variables through `env`.
    pub fn load_with_env(path: &Path, env: &Env<'_>) -> Result<Self, NodeConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| NodeConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse_with_env(&text, path, env)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        if cfg.data_dir.is_relative() {
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        if let Some(pg) = cfg.postgres.data_dir.as_mut().filter(|d| d.is_relative()) {
            *pg = base.join(&*pg);
        }
        let pg = &mut cfg.postgres;
        if pg.socket_dir.is_relative() && !pg.socket_dir.as_os_str().is_empty() {
            pg.socket_dir = base.join(&pg.socket_dir);
        }
        for (role, secret, file, var) in [
            (
                "superuser",
                &mut pg.superuser_password,
                &mut pg.superuser_password_file,
                SUPERUSER_PASSWORD_ENV,
            ),
            (
                "replication",
                &mut pg.replication_password,
                &mut pg.replication_password_file,
                REPLICATION_PASSWORD_ENV,
            ),
        ] {
            let invalid = |problem: String| NodeConfigError::Invalid {
                path: path.to_path_buf(),
                field: format!("postgres.{role}_password_file"),
                problem,
            };
            if let Some(f) = file.as_mut() {
                if f.is_relative() {
                    *f = base.join(&*f);
                }
                *secret = read_secret_file(f).map_err(invalid)?;
            } else if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                *secret = Secret(v);
            }
        }
        let sec = &mut cfg.security;
        for p in [
            &mut sec.ca_file,
            &mut sec.cert_file,
            &mut sec.key_file,
            &mut sec.token_file,
            &mut sec.metrics_token_file,
        ]
        .into_iter()
        .flatten()
        .filter(|p| p.is_relative())
        {
            *p = base.join(&*p);
        }
        let cb = &mut cfg.callbacks;
        for p in [&mut cb.on_start, &mut cb.on_stop, &mut cb.on_role_change]
            .into_iter()
            .flatten()
            .filter(|p| p.is_relative())
        {
            *p = base.join(&*p);
        }
        cfg.callbacks
            .validate()
            .map_err(|e| NodeConfigError::Invalid {
                path: path.to_path_buf(),
                field: "callbacks".into(),
                problem: e.to_string(),
            })?;
        Ok(cfg)
    }

    /// Parses and validates TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, NodeConfigError> {
        Self::parse_with_env(text, path, &|k| std::env::var(k).ok())
    }

    /// [`NodeConfig::parse`] reading environment variables through `env`.
    pub fn parse_with_env(text: &str, path: &Path, env: &Env<'_>) -> Result<Self, NodeConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| NodeConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path, env)?;
        Ok(cfg)
    }

    /// The address peers and clients use for this node.
    pub fn advertised(&self) -> &str {
        self.advertise_addr.as_deref().unwrap_or(&self.listen_addr)
    }

    fn validate(&self, path: &Path, env: &Env<'_>) -> Result<(), NodeConfigError> {
        let invalid = |field: &str, problem: String| NodeConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        if self.cluster_name.is_empty()
            || !self
                .cluster_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "cluster_name",
                format!(
                    "'{}' must be non-empty and use only letters, digits, '-' and '_'",
                    self.cluster_name
                ),
            ));
        }
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be a positive integer".into()));
        }
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        // The guard's control socket lives in data_dir, and a Unix socket path has at most 107
        // bytes.
        let socket = self.data_dir.join("guard.sock");
        if self.postgres.data_dir.is_some() && socket.as_os_str().len() > 107 {
            return Err(invalid(
                "data_dir",
                format!(
                    "{} is too long for the guard's Unix socket {} (at most 107 bytes); \
                     use a shorter path",
                    self.data_dir.display(),
                    socket.display()
                ),
            ));
        }
        self.listen_addr.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen_addr",
                format!(
                    "'{}' is not an ip:port address (e.g. 127.0.0.1:7001)",
                    self.listen_addr
                ),
            )
        })?;
        check_host_port(self.advertised()).map_err(|p| invalid("advertise_addr", p))?;
        if !self.http_addr.is_empty() {
            check_host_port(&self.http_addr).map_err(|p| invalid("http_addr", p))?;
        }
        if self.postgres.port == 0 {
            return Err(invalid("postgres.port", "must not be 0".into()));
        }
        if !(MIN_PROMOTE_TIMEOUT_MS..=MAX_PROMOTE_TIMEOUT_MS)
            .contains(&self.postgres.promote_timeout_ms)
        {
            return Err(invalid(
                "postgres.promote_timeout_ms",
                format!(
                    "{} is out of range: set it between {MIN_PROMOTE_TIMEOUT_MS} and                      {MAX_PROMOTE_TIMEOUT_MS} (milliseconds; default 60000)",
                    self.postgres.promote_timeout_ms
                ),
            ));
        }
        if self.postgres.data_dir.is_some() {
            let pg = &self.postgres;
            for (role, value, file, var) in [
                (
                    "superuser",
                    &pg.superuser_password,
                    &pg.superuser_password_file,
                    SUPERUSER_PASSWORD_ENV,
                ),
                (
                    "replication",
                    &pg.replication_password,
                    &pg.replication_password_file,
                    REPLICATION_PASSWORD_ENV,
                ),
            ] {
                let from_env = env(var).is_some_and(|v| !v.is_empty());
                let sources = usize::from(!value.is_empty())
                    + usize::from(file.is_some())
                    + usize::from(from_env);
                let field = format!("postgres.{role}_password");
                if sources == 0 {
                    return Err(invalid(
                        &field,
                        format!(
                            "must be set when postgres.data_dir is (the sidecar creates the role \
                             with it): give {field}, {field}_file or the environment variable \
                             {var}"
                        ),
                    ));
                }
                if sources > 1 {
                    return Err(invalid(
                        &field,
                        format!("give only one of {field}, {field}_file and {var}"),
                    ));
                }
            }
            if self.postgres.data_dir.as_deref() == Some(self.data_dir.as_path()) {
                return Err(invalid(
                    "postgres.data_dir",
                    "must differ from data_dir (the Raft store)".into(),
                ));
            }
        }
        let r = &self.raft;
        if !(20..=MAX_HEARTBEAT_MS).contains(&r.heartbeat_ms) {
            return Err(invalid(
                "raft.heartbeat_ms",
                format!("must be between 20 and {MAX_HEARTBEAT_MS}"),
            ));
        }
        if r.election_timeout_max_ms > MAX_ELECTION_MS {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                format!("must be at most {MAX_ELECTION_MS}"),
            ));
        }
        if r.election_timeout_min_ms <= 2 * r.heartbeat_ms {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                format!(
                    "must exceed twice raft.heartbeat_ms ({}), or followers start elections \
                     while the leader is healthy",
                    2 * r.heartbeat_ms
                ),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must exceed raft.election_timeout_min_ms".into(),
            ));
        }
        if r.snapshot_every == 0 {
            return Err(invalid("raft.snapshot_every", "must be positive".into()));
        }
        let sec = &self.security;
        let tls = [&sec.ca_file, &sec.cert_file, &sec.key_file];
        let given = tls.iter().filter(|f| f.is_some()).count();
        if sec.insecure && given > 0 {
            return Err(invalid(
                "security.insecure",
                "is true but TLS files are given too; remove one or the other".into(),
            ));
        }
        if !sec.insecure && given < 3 {
            return Err(invalid(
                "security",
                "needs ca_file, cert_file and key_file: members talk over mutual TLS. Make \
                 them with `pgquorum cert init DIR` and `pgquorum cert issue node ID --dir DIR`, \
                 or set security.insecure = true to run without any authentication (anyone \
                 who reaches the port can then steer the cluster)"
                    .into(),
            ));
        }
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for m in &self.initial_members {
            if m.id == 0 {
                return Err(invalid("initial_members", "ids must be positive".into()));
            }
            if !ids.insert(m.id) {
                return Err(invalid(
                    "initial_members",
                    format!("id {} appears twice; every member needs its own id", m.id),
                ));
            }
            check_host_port(&m.addr).map_err(|p| invalid("initial_members", p))?;
            if !addrs.insert(m.addr.as_str()) {
                return Err(invalid(
                    "initial_members",
                    format!("address {} appears twice", m.addr),
                ));
            }
        }
        for (advertised, via) in &self.dial_via {
            check_host_port(advertised)
                .and_then(|()| check_host_port(via))
                .map_err(|p| {
                    invalid(
                        "dial_via",
                        format!("{p}; write entries as \"advertised host:port\" = \"host:port to dial\""),
                    )
                })?;
        }
        if !self.initial_members.is_empty() {
            match self.initial_members.iter().find(|m| m.id == self.node_id) {
                None => {
                    return Err(invalid(
                        "initial_members",
                        format!(
                            "does not list this node (node_id = {}); list it, or leave \
                             initial_members empty to join a running cluster",
                            self.node_id
                        ),
                    ))
                }
                Some(me) if me.addr != self.advertised() => {
                    return Err(invalid(
                        "initial_members",
                        format!(
                            "lists node {} at {}, but this node advertises {}",
                            self.node_id,
                            me.addr,
                            self.advertised()
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

fn check_host_port(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("'{addr}' is not a host:port address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
security = { insecure = true }
cluster_name = "demo"
node_id = 1
name = "n1"
data_dir = "d1"
listen_addr = "127.0.0.1:7001"

[[initial_members]]
id = 1
addr = "127.0.0.1:7001"

[[initial_members]]
id = 2
addr = "127.0.0.1:7002"
"#;

    fn parse(text: &str) -> Result<NodeConfig, NodeConfigError> {
        NodeConfig::parse(text, Path::new("node.toml"))
    }

    #[test]
    fn shipped_example_config_is_valid_and_names_every_key() {
        let text = include_str!("../../../deploy/node.example.toml");
        // The example reads its passwords from files; parse it as if they were in the
        // environment (the files do not exist here).
        let env = |k: &str| {
            (k == SUPERUSER_PASSWORD_ENV || k == REPLICATION_PASSWORD_ENV).then(|| "x".into())
        };
        let e = NodeConfig::parse_with_env(text, Path::new("node.toml"), &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("only one of"),
            "a file and the environment both: {e}"
        );
        let c = parse(text).unwrap();
        assert_eq!(c.initial_members.len(), 3);
        assert!(
            c.postgres.data_dir.is_some(),
            "the example manages a Postgres"
        );
        // Every key the config knows appears in the example, set or commented out.
        let keys = [
            "cluster_name",
            "node_id",
            "name",
            "data_dir",
            "listen_addr",
            "advertise_addr",
            "http_addr",
            "[postgres]",
            "host",
            "port",
            "bin_dir",
            "os_user",
            "superuser",
            "superuser_password",
            "superuser_password_file",
            "replication_user",
            "replication_password",
            "replication_password_file",
            "allowed_cidrs",
            "free_space_warn_bytes",
            "restart_window_ms",
            "promote_timeout_ms",
            "[tags]",
            "nofailover",
            "priority",
            "nosync",
            "[raft]",
            "heartbeat_ms",
            "election_timeout_min_ms",
            "election_timeout_max_ms",
            "snapshot_every",
            "logs_to_keep",
            "[dial_via]",
            "[callbacks]",
            "on_start",
            "on_stop",
            "on_role_change",
            "timeout_ms",
            "[security]",
            "ca_file",
            "cert_file",
            "key_file",
            "token_file",
            "open_reads",
            "metrics_token_file",
            "insecure",
            "[[initial_members]]",
            "id",
            "addr",
        ];
        for k in keys {
            let set = text.lines().any(|l| {
                let l = l.trim_start_matches('#').trim();
                l == k || l.starts_with(&format!("{k} ="))
            });
            assert!(set, "deploy/node.example.toml does not show `{k}`");
        }
    }

    #[test]
    fn passwords_come_from_one_source_and_never_show() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let managed =
            format!("{GOOD}\n[postgres]\ndata_dir = \"pg\"\nreplication_password = \"r-secret\"\n");
        let none = |_: &str| None;
        let path = dir.path().join("node.toml");
        // Neither the file nor the environment nor the TOML: named, with the three ways.
        std::fs::write(&path, &managed).unwrap();
        let e = NodeConfig::load_with_env(&path, &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("superuser_password_file"), "{e}");
        assert!(e.contains(SUPERUSER_PASSWORD_ENV), "{e}");
        // From the environment.
        let env = |k: &str| (k == SUPERUSER_PASSWORD_ENV).then(|| "from-env".to_string());
        let c = NodeConfig::load_with_env(&path, &env).unwrap();
        assert_eq!(c.postgres.superuser_password.expose(), "from-env");
        // From a file only its owner reads, relative to the config.
        let secret = dir.path().join("su.pw");
        std::fs::write(&secret, "from-file\nignored\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let with_file = managed.replace(
            "[postgres]\n",
            "[postgres]\nsuperuser_password_file = \"su.pw\"\n",
        );
        std::fs::write(&path, &with_file).unwrap();
        let e = NodeConfig::load_with_env(&path, &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = NodeConfig::load_with_env(&path, &none).unwrap();
        assert_eq!(c.postgres.superuser_password.expose(), "from-file");
        // Two sources are refused.
        let e = NodeConfig::load_with_env(&path, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only one of"), "{e}");
        // No Debug output shows a password.
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("from-file") && !shown.contains("r-secret"),
            "{shown}"
        );
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.raft.heartbeat_ms, 150);
        assert_eq!(c.postgres.port, 5432);
        assert_eq!(c.advertised(), "127.0.0.1:7001");
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn missing_field_is_named() {
        let e = err(&GOOD.replace("name = \"n1\"\n", ""));
        assert!(e.contains("missing field `name`"), "{e}");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err(&GOOD.replace("name = \"n1\"", "name = \"n1\"\nnmae = 2"));
        assert!(e.contains("nmae"), "{e}");
    }

    #[test]
    fn duplicate_ids_and_addresses() {
        let e = err(&GOOD.replace("id = 2", "id = 1"));
        assert!(e.contains("id 1 appears twice"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:7002", "127.0.0.1:7001"));
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn self_must_be_listed_with_its_address() {
        let e = err(&GOOD.replace("node_id = 1", "node_id = 3"));
        assert!(e.contains("does not list this node"), "{e}");
        let e = err(&GOOD.replace(
            "listen_addr = \"127.0.0.1:7001\"",
            "listen_addr = \"127.0.0.1:7009\"",
        ));
        assert!(e.contains("advertises"), "{e}");
    }

    #[test]
    fn bad_addresses_and_timings() {
        let e = err(&GOOD.replace(
            "listen_addr = \"127.0.0.1:7001\"",
            "listen_addr = \"nowhere\"",
        ));
        assert!(e.contains("listen_addr"), "{e}");
        let e = err(&format!("{GOOD}\n[raft]\nheartbeat_ms = 500\n"));
        assert!(e.contains("election_timeout_min_ms"), "{e}");
        let e = err(&GOOD.replace("cluster_name = \"demo\"", "cluster_name = \"a b\""));
        assert!(e.contains("cluster_name"), "{e}");
        let e = err(&GOOD.replace("node_id = 1", "node_id = 0"));
        assert!(e.contains("node_id"), "{e}");
    }

    #[test]
    fn dial_via_routes_and_rejects_what_is_not_an_address() {
        let c = parse(&format!(
            "{GOOD}\n[dial_via]\n\"127.0.0.1:7002\" = \"127.0.0.1:17002\"\n"
        ))
        .unwrap();
        let dialer = crate::network::Dialer::new(c.dial_via);
        assert_eq!(dialer.route("127.0.0.1:7002"), "127.0.0.1:17002");
        assert_eq!(dialer.route("127.0.0.1:7001"), "127.0.0.1:7001");
        let c = parse(&format!(
            "{GOOD}\n[dial_via]\n\"10.0.0.2:5432\" = \"127.0.0.1:15432\"\n"
        ))
        .unwrap();
        let dialer = crate::network::Dialer::new(c.dial_via);
        assert_eq!(
            dialer.postgres("10.0.0.2", 5432),
            ("127.0.0.1".into(), 15432)
        );
        assert_eq!(dialer.postgres("10.0.0.3", 5432), ("10.0.0.3".into(), 5432));
        let e = err(&format!(
            "{GOOD}\n[dial_via]\n\"127.0.0.1:7002\" = \"proxy\"\n"
        ));
        assert!(e.contains("dial_via") && e.contains("'proxy'"), "{e}");
        let e = err(&format!("{GOOD}\n[dial_via]\n\"n2\" = \"127.0.0.1:1\"\n"));
        assert!(e.contains("dial_via") && e.contains("'n2'"), "{e}");
    }
}
