//! `Instance`: one member's PostgreSQL, driven and observed.

mod bootstrap;
mod lifecycle;
mod roles;
mod slots;
mod sync;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::binaries::PgBinaries;
use crate::config::{InstanceConfig, Upstream};
use crate::controldata::{parse_controldata, ControlData};
use crate::data_dir::DataDir;
use crate::error::Result;
use crate::guard::Guard;
use crate::lease::Lease;
use crate::observation::Observation;
use crate::os_user::OsUser;
use crate::pg_command::PgTool;
use crate::probe::probe_sql;

pub use lifecycle::StopMode;
pub use roles::{FollowReport, PromoteReport, RejoinMethod, RejoinReport};
pub use sync::AppliedSync;

/// One member's PostgreSQL. The sidecar owns it and serialises operations
/// on it (methods that change state take `&mut self`).
///
/// Dropping an `Instance` whose server runs under its guard fences the
/// server (the guard sees its stdin close): PostgreSQL never outlives the
/// handle that supervises it.
#[derive(Debug)]
pub struct Instance {
    cfg: InstanceConfig,
    bins: PgBinaries,
    user: OsUser,
    data: DataDir,
    guard: Option<Guard>,
    /// Lease given at the last start or feed; reused by `restart`.
    last_lease: Option<Lease>,
}

impl Instance {
    /// Finds the binaries and the OS user; touches nothing on disk.
    pub fn new(cfg: InstanceConfig) -> Result<Self> {
        let bins = PgBinaries::discover(cfg.pg_bin_dir.as_deref())?;
        let user = OsUser::resolve(cfg.postgres_user.as_deref())?;
        let data = DataDir::new(cfg.data_dir.clone());
        Ok(Instance {
            cfg,
            bins,
            user,
            data,
            guard: None,
            last_lease: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &InstanceConfig {
        &self.cfg
    }

    /// The executables in use.
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// The OS user PostgreSQL runs as.
    pub fn os_user(&self) -> &OsUser {
        &self.user
    }

    /// The data directory.
    pub fn data_dir(&self) -> &DataDir {
        &self.data
    }

    /// The guard, while PostgreSQL runs under it.
    pub fn guard(&self) -> Option<&Guard> {
        self.guard.as_ref()
    }

    /// This member as a replica's upstream.
    pub fn as_upstream(&self) -> Upstream {
        self.cfg.as_upstream()
    }

    /// The postmaster from `postmaster.pid` checked against `/proc` (pid
    /// alive and started when the file says): running, frozen, or dead with a
    /// stale lock file.
    pub fn status(&self) -> crate::observation::PostmasterState {
        self.data.postmaster_state()
    }

    /// `pg_controldata` facts of the data directory.
    pub async fn control_data(&self) -> Result<ControlData> {
        let out = PgTool::new(&self.bins, &self.user, "pg_controldata")
            .arg(self.data.path())
            .run()
            .await?;
        parse_controldata(&out.stdout)
    }

    /// The database system identifier, from `pg_controldata`.
    pub async fn system_identifier(&self) -> Result<u64> {
        Ok(self.control_data().await?.system_identifier)
    }

    /// Renews or changes the guard's lease.
    pub async fn feed_lease(&mut self, lease: Lease) -> Result<()> {
        let guard = self.guard.as_mut().ok_or_else(|| {
            crate::error::SupervisorError::Guard("PostgreSQL is not running under a guard".into())
        })?;
        guard.feed(lease).await?;
        self.last_lease = Some(lease);
        Ok(())
    }

    /// One bounded look at the server; never takes longer than
    /// `timeouts.probe` (plus `/proc` reads), even against a frozen server.
    pub async fn observe(&self) -> Observation {
        let started = Instant::now();
        let postmaster = self.data.postmaster_state();
        let mut obs = Observation {
            observed_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            postmaster,
            accepts_connections: false,
            probe_error: None,
            probe_ms: 0,
            role: None,
            timeline: None,
            current_lsn: None,
            received_lsn: None,
            replayed_lsn: None,
            wal_receiver: None,
            replication_lag_bytes: None,
            standbys: Vec::new(),
            system_identifier: None,
            synchronous_standby_names: None,
            heartbeat_error: None,
        };
        if !postmaster.is_running() {
            obs.probe_error = Some("postmaster is not running".into());
            return obs;
        }
        let t = &self.cfg.timeouts;
        let target = self.local_target();
        let probe = probe_sql(
            &target,
            &self.cfg.superuser,
            t.connect.min(t.probe),
            t.statement.min(t.probe),
        );
        match tokio::time::timeout(t.probe, probe).await {
            Ok(Ok(f)) => {
                obs.accepts_connections = true;
                obs.role = Some(f.role);
                obs.timeline = f.timeline;
                obs.current_lsn = f.current_lsn;
                obs.received_lsn = f.received_lsn;
                obs.replayed_lsn = f.replayed_lsn;
                obs.replication_lag_bytes = match (f.received_lsn, f.replayed_lsn) {
                    (Some(r), Some(p)) => Some(r.0.saturating_sub(p.0)),
                    _ => None,
                };
                obs.wal_receiver = f.wal_receiver;
                obs.standbys = f.standbys;
                obs.system_identifier = Some(f.system_identifier);
                obs.synchronous_standby_names = f.synchronous_standby_names;
                obs.heartbeat_error = f.heartbeat_error;
            }
            Ok(Err(e)) => obs.probe_error = Some(e.to_string()),
            Err(_) => obs.probe_error = Some(format!("probe timed out after {:?}", t.probe)),
        }
        obs.probe_ms = started.elapsed().as_millis() as u64;
        obs
    }

    /// Where the sidecar reaches its own server: wildcard listen addresses
    /// are not connectable.
    pub(crate) fn local_target(&self) -> Upstream {
        let first = self.cfg.listen_host.split(',').next().unwrap_or("").trim();
        let host = match first {
            "" | "*" | "0.0.0.0" => "127.0.0.1",
            "::" => "::1",
            h => h,
        };
        Upstream {
            host: host.to_string(),
            port: self.cfg.port,
        }
    }
}
