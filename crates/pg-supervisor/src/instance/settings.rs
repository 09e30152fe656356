//! Settings the cluster commits for every member (Postgres parameters and extra `pg_hba.conf`
//! lines), which settings wait for a restart, and the operator's member verbs: reload,
//! restart, re-clone.

use super::Instance;
use crate::config::Upstream;
use crate::data_dir::DataDirContents;
use crate::error::{Result, SupervisorError};
use crate::lease::Lease;
use crate::session::connect;

impl Instance {
    /// Makes `settings` (rendered after pgquorum's own, so they win) and `hba` (appended to
    /// pgquorum's lines) this member's, rewriting the files and reloading a running server.
    /// Returns whether anything changed. Without a data directory yet, the files are written at
    /// the first start.
    pub fn set_cluster_settings(
        &mut self,
        settings: Vec<(String, String)>,
        hba: Vec<String>,
    ) -> Result<bool> {
        if self.cfg.extra_settings == settings && self.cfg.extra_hba == hba {
            return Ok(false);
        }
        self.cfg.extra_settings = settings;
        self.cfg.extra_hba = hba;
        if self.data.contents()? == DataDirContents::Cluster {
            self.write_node_files_in(&self.data.clone())?;
            if self.live_postmaster().is_some() {
                self.reload()?;
            }
        }
        Ok(true)
    }

    /// Makes `cidrs` the addresses allowed in `pg_hba.conf` for replication and the
    /// superuser, rewriting it and reloading a running server when they changed.
    pub fn set_cluster_cidrs(&mut self, cidrs: Vec<String>) -> Result<bool> {
        if self.cfg.cluster_cidrs == cidrs {
            return Ok(false);
        }
        self.cfg.cluster_cidrs = cidrs;
        if self.data.contents()? == DataDirContents::Cluster {
            self.write_node_files_in(&self.data.clone())?;
            if self.live_postmaster().is_some() {
                self.reload()?;
            }
        }
        Ok(true)
    }

    /// Names of the settings whose new value waits for a restart (`pg_settings.pending_restart`).
    pub async fn pending_restart(&self) -> Result<Vec<String>> {
        let t = &self.cfg.timeouts;
        let s = connect(&self.local_target(), &self.cfg.superuser, t.connect, None).await?;
        let rows = s
            .query(
                "read pending_restart",
                "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name",
                &[],
                t.statement,
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    /// Re-clones this replica from `upstream` (`pgquorum reinit`): stops it, takes a fresh
    /// base backup beside the data directory, swaps it in, and waits until it streams. Refuses a
    /// server that is not in recovery: a primary is switched over first.
    pub async fn reinit_from(&mut self, upstream: &Upstream) -> Result<()> {
        if self.data.contents()? == DataDirContents::Cluster && !self.data.has_standby_signal() {
            return Err(SupervisorError::WrongRole(
                "reinit re-clones a replica, and this data directory is a primary's; switch \
                 over first (`pgquorum switchover`)"
                    .into(),
            ));
        }
        self.stop_or_fence().await?;
        self.reclone(upstream).await?;
        self.start(Lease::NotRequired).await?;
        self.wait_streaming_from(upstream).await?;
        Ok(())
    }
}
