//! What the sidecar tells this crate about one PostgreSQL member.

use std::path::PathBuf;
use std::time::Duration;

/// A role name with its password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Role name.
    pub name: String,
    /// Password (SCRAM-authenticated).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Passwords end up in logs far too easily.
        f.debug_struct("Credentials")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where another member's PostgreSQL listens; credentials are cluster-wide
/// and come from [`InstanceConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// How to start the guard process (S4); see [`crate::guard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardCommand {
    /// Executable, e.g. the pgquorum binary itself.
    pub program: PathBuf,
    /// Leading arguments selecting the guard entry point, e.g. `["guard"]`.
    pub args: Vec<String>,
}

/// Time limits for operations that talk to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Whole connection setup (TCP + startup + auth).
    pub connect: Duration,
    /// Server-side `statement_timeout` for probe sessions.
    pub statement: Duration,
    /// Upper bound of one `observe()`.
    pub probe: Duration,
    /// Waiting for the postmaster to accept connections after start.
    pub start: Duration,
    /// Waiting for `pg_promote` and the end of recovery.
    pub promote: Duration,
    /// Waiting for the WAL receiver to stream from a new upstream.
    pub follow: Duration,
    /// How long an immediate shutdown may take before SIGKILL.
    pub fence_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            statement: Duration::from_secs(2),
            probe: Duration::from_secs(3),
            start: Duration::from_secs(60),
            promote: Duration::from_secs(60),
            follow: Duration::from_secs(60),
            fence_grace: Duration::from_millis(500),
        }
    }
}

/// Everything needed to manage one member's PostgreSQL.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// Member name; becomes `application_name` and the slot name.
    pub member_name: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Server log; defaults to `<data_dir>.log` so that clones and rewinds
    /// never copy it.
    pub log_file: Option<PathBuf>,
    /// `listen_addresses`.
    pub listen_host: String,
    /// `port`.
    pub port: u16,
    /// Directory of the Unix-domain socket (`unix_socket_directories`), created for the OS
    /// user when missing; `None`: no socket, TCP only.
    pub socket_dir: Option<PathBuf>,
    /// Unprivileged OS user when the sidecar is root (default `postgres`).
    pub postgres_user: Option<String>,
    /// Directory of the PostgreSQL executables, else discovered.
    pub pg_bin_dir: Option<PathBuf>,
    /// The bootstrap/application superuser.
    pub superuser: Credentials,
    /// The replication role.
    pub replication: Credentials,
    /// Addresses (CIDR) of cluster members, allowed in `pg_hba.conf`.
    pub cluster_cidrs: Vec<String>,
    /// Additional `name = value` settings, rendered after ours (so they win).
    pub extra_settings: Vec<(String, String)>,
    /// Additional `pg_hba.conf` lines, rendered after ours.
    pub extra_hba: Vec<String>,
    /// If set, refuse to start or rejoin a data dir of another cluster.
    pub expected_system_identifier: Option<u64>,
    /// How to launch the guard.
    pub guard: GuardCommand,
    /// The guard's control socket, on which a restarted sidecar adopts a running Postgres;
    /// `None`: a guard cannot be adopted, so Postgres never outlives its sidecar.
    pub guard_socket: Option<PathBuf>,
    /// Time limits.
    pub timeouts: Timeouts,
}

impl InstanceConfig {
    /// Effective server log path.
    pub fn log_file(&self) -> PathBuf {
        match &self.log_file {
            Some(p) => p.clone(),
            None => {
                let mut s = self.data_dir.clone().into_os_string();
                s.push(".log");
                PathBuf::from(s)
            }
        }
    }

    /// This member as others reach it.
    pub fn as_upstream(&self) -> Upstream {
        Upstream {
            host: self.listen_host.clone(),
            port: self.port,
        }
    }
}
