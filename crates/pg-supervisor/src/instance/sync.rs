//! Synchronous standbys: written, reloaded, and confirmed in force.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Instance;
use crate::conf_files::{render_sync_conf, SyncSpec, SYNC_CONF};
use crate::error::{Result, SupervisorError};
use crate::observation::Lsn;
use crate::session::connect;

const POLL: Duration = Duration::from_millis(20);

const SETTING_SQL: &str = "SELECT current_setting('synchronous_standby_names'), \
    pg_is_in_recovery()";

/// WAL senders that stream (a base backup's sender never reloads its
/// priority) and the priority each derived from its own copy of the setting.
const SENDERS_SQL: &str = "SELECT application_name, sync_priority FROM pg_stat_replication \
    WHERE state IN ('catchup', 'streaming')";

/// `pg_current_wal_lsn()` errors during recovery, hence the CASE.
const LSN_SQL: &str = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
    ELSE pg_current_wal_lsn() END";

/// What `apply_synchronous_standbys` put in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSync {
    /// The `synchronous_standby_names` value now in force (`""` when
    /// asynchronous).
    pub rendered: String,
    /// On a primary, `pg_current_wal_lsn()` read after the new value was
    /// confirmed: commits whose WAL ends after it were made under the new
    /// value. On a replica, where the setting has no effect until promotion,
    /// the replay LSN (`Lsn(0)` if nothing was replayed yet).
    pub switch_lsn: Lsn,
}

impl Instance {
    /// Puts `spec` in force: writes `pgquorum.sync.conf` (as the OS user,
    /// atomically), reloads (SIGHUP), then polls fresh sessions (a new
    /// backend starts with the postmaster's reloaded settings) until
    /// `current_setting('synchronous_standby_names')` equals
    /// [`SyncSpec::render`], and, on a primary, until every streaming WAL
    /// sender reports the `sync_priority` the new value gives it (each
    /// sender reloads on its own). Times out after `timeouts.connect +
    /// timeouts.statement`. Works on a replica too, so that a server about
    /// to be promoted never acknowledges a write without its synchronous
    /// standbys. Refuses a stopped server without writing anything.
    pub async fn apply_synchronous_standbys(&mut self, spec: &SyncSpec) -> Result<AppliedSync> {
        if self.live_postmaster().is_none() {
            return Err(SupervisorError::NotRunning(self.cfg.data_dir.clone()));
        }
        let rendered = spec.render();
        self.data
            .write_file(SYNC_CONF, &render_sync_conf(spec), &self.user)?;
        // A data directory from an older version may lack the include.
        self.data.ensure_includes(&self.user)?;
        self.reload()?;
        let t = self.cfg.timeouts.clone();
        let limit = t.connect + t.statement;
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.sync_in_force(spec, &rendered).await {
                Ok(Ok(switch_lsn)) => {
                    tracing::info!(member = %self.cfg.member_name, %rendered, %switch_lsn, "synchronous_standby_names in force");
                    return Ok(AppliedSync {
                        rendered,
                        switch_lsn,
                    });
                }
                Ok(Err(pending)) => pending,
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(SupervisorError::Timeout {
                    what: format!(
                        "synchronous_standby_names to become {rendered:?} (last: {last}; a value \
                         set with ALTER SYSTEM in postgresql.auto.conf overrides {SYNC_CONF})"
                    ),
                    after: limit,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// One look from a fresh session: the switch LSN once `rendered` is in
    /// force, else what is still pending.
    async fn sync_in_force(
        &self,
        spec: &SyncSpec,
        rendered: &str,
    ) -> Result<std::result::Result<Lsn, String>> {
        let t = &self.cfg.timeouts;
        let s = connect(
            &self.local_target(),
            &self.cfg.superuser,
            t.connect,
            Some(t.statement),
        )
        .await?;
        let rows = s
            .query(
                "read synchronous_standby_names",
                SETTING_SQL,
                &[],
                t.statement,
            )
            .await?;
        let row = rows.first().ok_or_else(|| SupervisorError::Parse {
            what: "synchronous_standby_names".into(),
            detail: "no row".into(),
        })?;
        let seen: String = row
            .try_get(0)
            .map_err(|e| SupervisorError::sql("read synchronous_standby_names", &e))?;
        let in_recovery: bool = row
            .try_get(1)
            .map_err(|e| SupervisorError::sql("read pg_is_in_recovery", &e))?;
        if seen != rendered {
            return Ok(Err(format!("{seen:?}")));
        }
        if !in_recovery {
            let rows = s
                .query("read WAL sender priorities", SENDERS_SQL, &[], t.statement)
                .await?;
            for r in &rows {
                let name: String = r.try_get(0).unwrap_or_default();
                let priority: i32 = r.try_get(1).unwrap_or(-1);
                let expected = expected_priority(spec, &name);
                if priority != expected {
                    return Ok(Err(format!(
                        "WAL sender {name:?} has sync_priority {priority}, expected {expected}"
                    )));
                }
            }
        }
        let rows = s
            .query("read switch LSN", LSN_SQL, &[], t.statement)
            .await?;
        let lsn: Option<tokio_postgres::types::PgLsn> =
            rows.first().and_then(|r| r.try_get(0).ok()).flatten();
        Ok(Ok(lsn.map(Lsn::from).unwrap_or(Lsn(0))))
    }
}

impl Instance {
    /// Proves that the checkpointer has taken the last reload, and returns the WAL position
    /// after which commits wait for the synchronous standbys.
    ///
    /// Backends read `synchronous_standby_names` themselves, but whether commits wait at all is
    /// a flag in shared memory (`sync_standbys_defined`) that only the checkpointer sets, when
    /// it processes the reload. A checkpointer stuck in an fsync leaves a switch from
    /// asynchronous to synchronous without effect while every session shows the new value.
    /// A `CHECKPOINT` requested after the reload completes only after the checkpointer went
    /// through its loop, which takes a pending reload first. Runs on its own connection and
    /// owns what it needs, so the caller can let it run beside its other work.
    pub fn checkpointer_took_reload(
        &self,
        limit: Duration,
    ) -> impl std::future::Future<Output = Result<Lsn>> + Send + 'static {
        let target = self.local_target();
        let user = self.cfg.superuser.clone();
        let connect_timeout = self.cfg.timeouts.connect;
        async move {
            let s = connect(&target, &user, connect_timeout, None).await?;
            s.query("CHECKPOINT after the reload", "CHECKPOINT", &[], limit)
                .await?;
            let rows = s.query("read switch LSN", LSN_SQL, &[], limit).await?;
            let lsn: Option<tokio_postgres::types::PgLsn> =
                rows.first().and_then(|r| r.try_get(0).ok()).flatten();
            Ok(lsn.map(Lsn::from).unwrap_or(Lsn(0)))
        }
    }
}

/// The `sync_priority` a WAL sender shows under `spec`: with `ANY`, 1 for
/// every listed name (PostgreSQL compares names ignoring ASCII case), 0 for
/// the others and for asynchronous replication.
fn expected_priority(spec: &SyncSpec, application_name: &str) -> i32 {
    if spec.render().is_empty() {
        return 0;
    }
    let listed = spec
        .names
        .iter()
        .any(|n| n.eq_ignore_ascii_case(application_name));
    i32::from(listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_priorities_follow_any_semantics() {
        let spec = SyncSpec {
            k: 1,
            names: vec!["Node-B".into(), "c".into()],
        };
        assert_eq!(expected_priority(&spec, "node-b"), 1);
        assert_eq!(expected_priority(&spec, "c"), 1);
        assert_eq!(expected_priority(&spec, "d"), 0);
        assert_eq!(expected_priority(&SyncSpec::asynchronous(), "c"), 0);
        let k0 = SyncSpec {
            k: 0,
            names: vec!["c".into()],
        };
        assert_eq!(expected_priority(&k0, "c"), 0);
    }
}
