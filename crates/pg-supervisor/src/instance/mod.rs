//! `Instance`: one member's PostgreSQL, driven and observed.

mod bootstrap;
mod lifecycle;
mod roles;
mod settings;
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
use crate::probe::{probe_sql, WriteArgs};
use crate::storage::{classify, fs_space, FsSpace, InFlight, WriteProbe};

pub use lifecycle::{StopMode, TakenUnderGuard};
pub use roles::{FollowReport, HandOverReport, PromoteReport, RejoinMethod, RejoinReport};
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
    /// A write probe still running from an earlier observation.
    write_in_flight: InFlight,
    /// Leases the sidecar renews while a promotion or a start holds this instance.
    renewals: Option<tokio::sync::watch::Receiver<Lease>>,
    /// The last `promote` asked Postgres to promote (`pg_promote` was sent).
    promotion_requested: bool,
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
            write_in_flight: InFlight::default(),
            renewals: None,
            promotion_requested: false,
        })
    }

    /// Whether the last [`Instance::promote`] sent `pg_promote`. Once sent, the promotion goes
    /// on in Postgres whatever the call returned (a timeout, a failed confirmation, a failed
    /// write of the replication settings afterwards): the caller must count this data directory
    /// as a primary's from then on.
    pub fn promotion_requested(&self) -> bool {
        self.promotion_requested
    }

    /// Refuse from now on to start or rejoin a data directory, or to clone from a server, of
    /// another cluster than `sysid` (the cluster's committed system identifier).
    pub fn expect_system_identifier(&mut self, sysid: Option<u64>) {
        self.cfg.expected_system_identifier = sysid;
    }

    /// Refuses a data directory of another cluster than the expected one, if one is expected.
    pub(crate) async fn check_own_system_identifier(&self) -> Result<()> {
        let Some(expected) = self.cfg.expected_system_identifier else {
            return Ok(());
        };
        let found = self.system_identifier().await?;
        if found != expected {
            return Err(crate::error::SupervisorError::SystemIdentifierMismatch {
                path: self.cfg.data_dir.clone(),
                expected,
                found,
            });
        }
        Ok(())
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

    /// While set, a promotion or a start feeds the guard every lease sent on `leases` as it
    /// comes. Either can outlast a lease (a slow end of recovery, a long crash recovery), and
    /// the sidecar, busy waiting on it, renews the lease meanwhile: without this the guard would
    /// stop Postgres half-way through.
    pub fn renew_from(&mut self, leases: Option<tokio::sync::watch::Receiver<Lease>>) {
        self.renewals = leases;
    }

    /// Runs `work` (which must not touch the guard) while feeding the guard each renewed lease.
    pub(crate) async fn fed<T>(&mut self, work: impl std::future::Future<Output = T>) -> Result<T> {
        let (guard, last, renewals) = (&mut self.guard, &mut self.last_lease, &mut self.renewals);
        let Some(leases) = renewals.as_mut() else {
            return Ok(work.await);
        };
        tokio::pin!(work);
        loop {
            let renewed = async {
                match leases.changed().await {
                    Ok(()) => *leases.borrow_and_update(),
                    // The sidecar is done renewing: nothing more will come.
                    Err(_) => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut work => return Ok(out),
                lease = renewed => {
                    if let Some(g) = guard.as_mut() {
                        g.feed(lease).await?;
                        *last = Some(lease);
                    }
                }
            }
        }
    }

    /// One bounded look at the server; never takes longer than
    /// `timeouts.probe` (plus `/proc` reads), even against a frozen server.
    pub async fn observe(&self) -> Observation {
        self.observe_within(self.cfg.timeouts.probe).await
    }

    /// Room on the data directory's and the WAL directory's filesystems. `statvfs` never
    /// writes, but a dead network filesystem can hang it: it runs off the async workers, and a
    /// hung one reports nothing.
    pub async fn storage_space(&self) -> (Option<FsSpace>, Option<FsSpace>) {
        let data = self.data.path().to_path_buf();
        let look = tokio::task::spawn_blocking(move || {
            // The data directory of a new member may not exist yet: its parent holds it.
            let at = if data.exists() {
                data.clone()
            } else {
                data.parent()
                    .map(|p| p.to_path_buf())
                    .unwrap_or(data.clone())
            };
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let wal = data.join("pg_wal");
            let wal_space = if wal.exists() {
                fs_space(&wal, &mounts)
            } else {
                None
            };
            (fs_space(&at, &mounts), wal_space)
        });
        match tokio::time::timeout(std::time::Duration::from_millis(500), look).await {
            Ok(Ok(spaces)) => spaces,
            _ => (None, None),
        }
    }

    /// Like [`Instance::observe`], within `bound` when it is shorter than `timeouts.probe`.
    /// The primary's write probe is waited for until three quarters of it have passed; a write
    /// still running then is reported stuck.
    pub async fn observe_within(&self, bound: std::time::Duration) -> Observation {
        let started = Instant::now();
        let (data_fs, wal_fs) = self.storage_space().await;
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
            write_probe: None,
            data_fs,
            wal_fs,
        };
        if !postmaster.is_running() {
            obs.probe_error = Some("postmaster is not running".into());
            return obs;
        }
        let t = &self.cfg.timeouts;
        let bound = bound.min(t.probe);
        let target = self.local_target();
        let data_dir = std::fs::canonicalize(self.data.path())
            .unwrap_or_else(|_| self.data.path().to_path_buf());
        let write = WriteArgs {
            file: data_dir
                .join("pg_stat_tmp/pgquorum_write_probe")
                .to_string_lossy()
                .into_owned(),
            deadline: started + bound * 3 / 4,
            in_flight: self.write_in_flight.clone(),
        };
        let probe = probe_sql(
            &target,
            &self.cfg.superuser,
            t.connect.min(bound),
            t.statement.min(bound),
            Some(write),
        );
        match tokio::time::timeout(bound, probe).await {
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
                obs.write_probe = f.write.map(|(end, waited)| WriteProbe {
                    check: classify(&end, obs.data_fs, obs.wal_fs),
                    ms: waited.as_millis() as u64,
                });
            }
            Ok(Err(e)) => obs.probe_error = Some(e.to_string()),
            Err(_) => obs.probe_error = Some(format!("probe timed out after {bound:?}")),
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
