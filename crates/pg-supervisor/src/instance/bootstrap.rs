//! Creating a data directory: `initdb` for the first primary,
//! `pg_basebackup` for replicas.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use super::Instance;
use crate::conf_files::{
    render_bootstrap_sql, render_replication_conf, render_sync_conf, SyncSpec, REPLICATION_CONF,
    SYNC_CONF,
};
use crate::config::Upstream;
use crate::conninfo::slot_name_for;
use crate::data_dir::DataDir;
use crate::error::{Result, SupervisorError};
use crate::pg_command::{tail, PgTool};

impl Instance {
    /// Creates a new cluster: `initdb` with data checksums (for
    /// `pg_rewind`) and SCRAM auth, HA settings, `pg_hba.conf`, and the
    /// replication role (created in single-user mode, before any network
    /// access). Refuses a non-empty data directory. Returns the system
    /// identifier. Does not start the server.
    pub async fn init_primary(&self) -> Result<u64> {
        self.data.prepare_empty(&self.user)?;
        let pwfile = self.data.sibling(".pgq-pwfile");
        self.write_secret(&pwfile, &self.cfg.superuser.password)?;
        let initdb = PgTool::new(&self.bins, &self.user, "initdb")
            .arg("-D")
            .arg(self.data.path())
            .arg("-U")
            .arg(&self.cfg.superuser.name)
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("--data-checksums")
            .arg("--auth-local=peer")
            .arg("--auth-host=scram-sha-256")
            .arg("--encoding=UTF8")
            .arg("--locale=C")
            .run()
            .await;
        let _ = std::fs::remove_file(&pwfile);
        initdb?;
        self.write_node_files_in(&self.data)?;
        let out = PgTool::new(&self.bins, &self.user, "postgres")
            .arg("--single")
            .arg("-D")
            .arg(self.data.path())
            .arg("postgres")
            .stdin(render_bootstrap_sql(&self.cfg))
            .run()
            .await?;
        // Single-user mode exits 0 even when a statement fails.
        let all = format!("{}{}", out.stdout, out.stderr);
        if all.contains("ERROR:") {
            return Err(SupervisorError::CommandFailed {
                program: "postgres --single".into(),
                status: "SQL error".into(),
                stderr: tail(&all, 10),
            });
        }
        self.system_identifier().await
    }

    /// Creates a replica from `upstream` with `pg_basebackup`, streaming
    /// WAL through this member's physical slot (created on the upstream if
    /// missing), with `standby.signal` and `primary_conninfo`. Refuses a
    /// non-empty data directory. Does not start the server.
    pub async fn clone_from(&self, upstream: &Upstream) -> Result<()> {
        if let Some(expected) = self.cfg.expected_system_identifier {
            let found = self.upstream_system_identifier(upstream).await?;
            if found != expected {
                return Err(SupervisorError::SystemIdentifierMismatch {
                    path: self.cfg.data_dir.clone(),
                    expected,
                    found,
                });
            }
        }
        self.data.prepare_empty(&self.user)?;
        self.basebackup_into(&self.data, upstream).await
    }

    /// `pg_basebackup` into `dir` (empty, owned by the OS user), then the
    /// files that make it this member's replica.
    pub(crate) async fn basebackup_into(&self, dir: &DataDir, upstream: &Upstream) -> Result<()> {
        self.ensure_own_slot_on(upstream).await?;
        let slot = slot_name_for(&self.cfg.member_name);
        PgTool::new(&self.bins, &self.user, "pg_basebackup")
            .arg("-D")
            .arg(dir.path())
            .arg("-h")
            .arg(&upstream.host)
            .arg("-p")
            .arg(upstream.port.to_string())
            .arg("-U")
            .arg(&self.cfg.replication.name)
            .arg("--no-password")
            .arg("--wal-method=stream")
            .arg(format!("--slot={slot}"))
            .arg("--checkpoint=fast")
            .env("PGPASSWORD", self.cfg.replication.password.clone())
            .env("PGAPPNAME", self.cfg.member_name.clone())
            .run()
            .await?;
        self.make_replica_files(dir, upstream)
    }

    /// Node files, `primary_conninfo` towards `upstream`, asynchronous
    /// `synchronous_standby_names`, `standby.signal`.
    pub(crate) fn make_replica_files(&self, dir: &DataDir, upstream: &Upstream) -> Result<()> {
        dir.write_file(
            REPLICATION_CONF,
            &render_replication_conf(&self.cfg, upstream),
            &self.user,
        )?;
        // pg_basebackup and pg_rewind copy the source's file: a new replica
        // must not carry the old primary's synchronous standbys into a later
        // promotion. The sidecar applies the committed set before promoting.
        dir.write_file(
            SYNC_CONF,
            &render_sync_conf(&SyncSpec::asynchronous()),
            &self.user,
        )?;
        self.write_node_files_in(dir)?;
        dir.set_standby_signal(true, &self.user)
    }

    /// A file only the OS user can read, for secrets handed to tools.
    fn write_secret(&self, path: &std::path::Path, secret: &str) -> Result<()> {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| SupervisorError::io(format!("create {}", path.display()), e))?;
        f.write_all(secret.as_bytes())
            .map_err(|e| SupervisorError::io(format!("write {}", path.display()), e))?;
        self.user.chown(path)
    }
}
