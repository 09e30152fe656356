//! The one error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while driving or observing PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Some PostgreSQL executables could not be found.
    #[error(
        "PostgreSQL binaries not found: missing {missing:?} (looked in {searched}); install the \
         PostgreSQL server package (e.g. `apt-get install postgresql-15`) or set pg_bin_dir"
    )]
    BinariesMissing {
        /// Executable names that were not found.
        missing: Vec<String>,
        /// Where we looked, for the operator.
        searched: String,
    },

    /// The sidecar runs as root and no unprivileged user is available.
    #[error(
        "cannot run PostgreSQL as root; set postgres_user to an unprivileged OS user \
         (default 'postgres'): {0}"
    )]
    RootUser(String),

    /// An OS user name could not be resolved.
    #[error("OS user '{0}' does not exist; create it or set postgres_user")]
    UnknownUser(String),

    /// A data directory holds something we refuse to overwrite.
    #[error("data directory {path} is not empty ({detail}); refusing to overwrite it")]
    DataDirNotEmpty {
        /// The data directory.
        path: PathBuf,
        /// What was found there.
        detail: String,
    },

    /// The data directory is not an initialised cluster.
    #[error("data directory {0} does not contain a PostgreSQL cluster (no PG_VERSION)")]
    NotInitialized(PathBuf),

    /// The data directory belongs to another cluster.
    #[error(
        "system identifier mismatch for {path}: expected {expected}, found {found}; this data \
         directory belongs to another cluster, nothing was changed"
    )]
    SystemIdentifierMismatch {
        /// The data directory.
        path: PathBuf,
        /// The identifier we were told or the upstream reports.
        expected: u64,
        /// The identifier on disk.
        found: u64,
    },

    /// The member to rejoin as a replica of is not a primary yet.
    #[error(
        "{host}:{port} is still in recovery, not a primary yet: rejoining waits until it has          been promoted (nothing was changed)"
    )]
    UpstreamNotPrimary {
        /// Upstream host.
        host: String,
        /// Upstream port.
        port: u16,
    },

    /// The TCP port is already taken by another process.
    #[error("port {port} on {host} is already in use by another process")]
    PortInUse {
        /// Listen host.
        host: String,
        /// Listen port.
        port: u16,
    },

    /// A postmaster is already running on this data directory.
    #[error("a postmaster (pid {pid}) is already running on {path}")]
    AlreadyRunning {
        /// The data directory.
        path: PathBuf,
        /// Its pid.
        pid: i32,
    },

    /// The operation needs a running postmaster.
    #[error("PostgreSQL is not running on {0}")]
    NotRunning(PathBuf),

    /// An external command failed.
    #[error("{program} failed ({status}): {stderr}")]
    CommandFailed {
        /// Program name.
        program: String,
        /// Exit status as text.
        status: String,
        /// Last lines of its standard error.
        stderr: String,
    },

    /// An operation did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },

    /// PostgreSQL failed to start.
    #[error("PostgreSQL failed to start: {0}")]
    StartFailed(String),

    /// A SQL error, with the server's own message.
    #[error("SQL error during {context}: {message}")]
    Sql {
        /// What we were doing.
        context: String,
        /// The server's message (not just "db error").
        message: String,
    },

    /// The instance is not in the role the operation requires.
    #[error("wrong role: {0}")]
    WrongRole(String),

    /// Promotion ran but did not produce a writable primary.
    #[error("promotion failed: {0}")]
    PromoteFailed(String),

    /// The guard process misbehaved.
    #[error("guard: {0}")]
    Guard(String),

    /// Output of a PostgreSQL tool could not be understood.
    #[error("could not parse {what}: {detail}")]
    Parse {
        /// What was parsed.
        what: String,
        /// Why it failed.
        detail: String,
    },

    /// An I/O error with the path or action that caused it.
    #[error("{context}: {source}")]
    Io {
        /// Path or action.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl SupervisorError {
    /// Whether this is a failure to reach a server at all (refused, unreachable, or no answer
    /// within the connect timeout), as opposed to an error once connected.
    pub fn is_connect_failure(&self) -> bool {
        match self {
            SupervisorError::Sql { context, .. }
            | SupervisorError::Timeout { what: context, .. } => {
                context.starts_with(CONNECT_CONTEXT)
            }
            _ => false,
        }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SupervisorError::Io {
            context: context.into(),
            source,
        }
    }

    /// Converts a tokio-postgres error, keeping the server's message.
    pub fn sql(context: impl Into<String>, err: &tokio_postgres::Error) -> Self {
        let message = match err.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => err.to_string(),
        };
        SupervisorError::Sql {
            context: context.into(),
            message,
        }
    }
}

/// How a connection attempt names itself in errors (`connect to HOST:PORT`).
pub(crate) const CONNECT_CONTEXT: &str = "connect to ";

/// Result alias of this crate.
pub type Result<T, E = SupervisorError> = std::result::Result<T, E>;

#[cfg(test)]
mod connect_failure_tests {
    use super::*;

    #[test]
    fn only_failures_to_reach_a_server_are_connect_failures() {
        let refused = SupervisorError::Sql {
            context: format!("{CONNECT_CONTEXT}10.0.0.1:5432"),
            message: "error connecting to server".into(),
        };
        let silent = SupervisorError::Timeout {
            what: format!("{CONNECT_CONTEXT}10.0.0.1:5432"),
            after: std::time::Duration::from_secs(1),
        };
        let never_streamed = SupervisorError::Timeout {
            what: "streaming from 10.0.0.1:5432".into(),
            after: std::time::Duration::from_secs(20),
        };
        let query = SupervisorError::Sql {
            context: "read the timeline".into(),
            message: "57P03: the database system is starting up".into(),
        };
        assert!(refused.is_connect_failure());
        assert!(silent.is_connect_failure());
        assert!(!never_streamed.is_connect_failure());
        assert!(!query.is_connect_failure());
    }
}
