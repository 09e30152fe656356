//! Start, stop, restart, reload and fence.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use super::Instance;
use crate::conf_files::{
    render_hba, render_node_conf, render_sync_conf, SyncSpec, REPLICATION_CONF, SYNC_CONF,
};
use crate::data_dir::DataDirContents;
use crate::error::{Result, SupervisorError};
use crate::fence::{fence_data_dir, FenceReport};
use crate::guard::{Guard, GuardArgs};
use crate::lease::Lease;
use crate::observation::PostmasterState;
use crate::os_process::{is_alive, signal};
use crate::pg_command::tail;
use crate::pid_file::PmStatus;

const POLL: Duration = Duration::from_millis(20);
/// The guard exits right after its postmaster; this is generous.
const GUARD_EXIT_WAIT: Duration = Duration::from_secs(2);

/// PostgreSQL's shutdown modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for clients to disconnect (SIGTERM).
    Smart,
    /// Roll back and disconnect clients, checkpoint (SIGINT).
    Fast,
    /// Quit without checkpoint; crash recovery at next start (SIGQUIT).
    Immediate,
}

impl StopMode {
    fn signal(self) -> libc::c_int {
        match self {
            StopMode::Smart => libc::SIGTERM,
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        }
    }
}

impl Instance {
    /// Starts PostgreSQL under a new guard holding `lease`, and waits until
    /// it accepts connections (`ready` or `standby` in `postmaster.pid`).
    /// Refuses a foreign cluster, a running postmaster, or a busy port, and
    /// [`Lease::NotRequired`] without `standby.signal`: that would be a
    /// writable primary without a lease deadline (use
    /// [`Instance::start_in_recovery`] for a replica).
    pub async fn start(&mut self, lease: Lease) -> Result<()> {
        self.check_startable()?;
        self.ensure_socket_dir()?;
        check_lease_for_role(lease, self.data.has_standby_signal())?;
        self.check_own_system_identifier().await?;
        self.check_port_free()?;
        self.write_node_files()?;
        self.guard = None;
        let log_file = self.cfg.log_file();
        let log_offset = std::fs::metadata(&log_file).map(|m| m.len()).unwrap_or(0);
        let args = GuardArgs {
            postgres: self.bins.path("postgres"),
            data_dir: self.cfg.data_dir.clone(),
            user: self.user.switch.then(|| self.user.name.clone()),
            log_file: log_file.clone(),
            fence_grace: self.cfg.timeouts.fence_grace,
            lease,
            control_socket: self.cfg.guard_socket.clone(),
        };
        tracing::info!(member = %self.cfg.member_name, lease = %lease.encode(), "starting PostgreSQL under a guard");
        let guard = Guard::launch(&self.cfg.guard, &args).await?;
        let pid = guard.postmaster_pid();
        self.guard = Some(guard);
        self.last_lease = Some(lease);
        let deadline = Instant::now() + self.cfg.timeouts.start;
        loop {
            if !is_alive(pid) {
                self.guard = None;
                return Err(SupervisorError::StartFailed(format!(
                    "postmaster exited during startup; log {}:\n{}",
                    log_file.display(),
                    log_tail(&log_file, log_offset)
                )));
            }
            if let Some(pf) = self.data.pid_file() {
                if pf.pid == pid && matches!(pf.status, Some(PmStatus::Ready | PmStatus::Standby)) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(SupervisorError::Timeout {
                    what: format!("startup of PostgreSQL (log {})", log_file.display()),
                    after: self.cfg.timeouts.start,
                });
            }
            self.fed(tokio::time::sleep(POLL)).await?;
        }
    }

    /// Takes over a Postgres left running by a sidecar that detached from its guard
    /// ([`Instance::detach_guard`]): connects to the guard's control socket and from then on
    /// feeds it. Returns the lease the guard enforces, or `None` when there is nothing to
    /// adopt (no postmaster runs, no guard answers). A guard whose postmaster is not the one of
    /// the data directory's lock file is refused, and fences when we let go of it.
    pub async fn adopt_running(&mut self) -> Result<Option<Lease>> {
        let Some(socket) = self.cfg.guard_socket.clone() else {
            return Ok(None);
        };
        if self.guard.is_some() {
            return Ok(None);
        }
        let PostmasterState::Running { pid, .. } = self.data.postmaster_state() else {
            return Ok(None);
        };
        let Some(guard) = Guard::adopt(&socket, self.cfg.timeouts.fence_grace).await? else {
            return Ok(None);
        };
        if guard.postmaster_pid() != pid {
            return Err(SupervisorError::Guard(format!(
                "the guard on {} watches postmaster {}, but {} names {pid}; not adopting it",
                socket.display(),
                guard.postmaster_pid(),
                self.cfg.data_dir.display()
            )));
        }
        let lease = guard.lease();
        tracing::info!(member = %self.cfg.member_name, postmaster = pid, lease = %lease.encode(), "adopted the running PostgreSQL and its guard");
        self.guard = Some(guard);
        self.last_lease = Some(lease);
        Ok(Some(lease))
    }

    /// Lets go of the guard without stopping Postgres, for a sidecar restart: the guard keeps
    /// Postgres running until the earlier of its lease's end and `window` from now, and a new
    /// sidecar may adopt it meanwhile. Returns false when no guard runs.
    pub async fn detach_guard(&mut self, window: Duration) -> Result<bool> {
        let Some(guard) = self.guard.take() else {
            return Ok(false);
        };
        guard.detach(window).await?;
        Ok(true)
    }

    /// Starts PostgreSQL as a replica: writes `standby.signal` (and an empty
    /// replication conf if there is none, so it only replays what it has
    /// until `follow`), then starts with [`Lease::NotRequired`], which is
    /// safe because a server in recovery cannot accept writes.
    pub async fn start_in_recovery(&mut self) -> Result<()> {
        // Checked before writing anything: standby.signal left next to a
        // running primary would turn its next restart into a replica.
        self.check_startable()?;
        if !self.data.path().join(REPLICATION_CONF).exists() {
            self.data.write_file(
                REPLICATION_CONF,
                &crate::conf_files::render_no_replication_conf(),
                &self.user,
            )?;
        }
        self.data.set_standby_signal(true, &self.user)?;
        self.start(Lease::NotRequired).await
    }

    /// An initialised data directory without a live postmaster.
    fn check_startable(&self) -> Result<()> {
        if self.data.contents()? != DataDirContents::Cluster {
            return Err(SupervisorError::NotInitialized(self.cfg.data_dir.clone()));
        }
        if let PostmasterState::Running { pid, .. } = self.data.postmaster_state() {
            return Err(SupervisorError::AlreadyRunning {
                path: self.cfg.data_dir.clone(),
                pid,
            });
        }
        Ok(())
    }

    /// Stops PostgreSQL with `mode`, waiting up to `timeout` for the
    /// postmaster to exit. On timeout it is left running: escalate with
    /// another mode or `fence()`.
    pub async fn stop(&mut self, mode: StopMode, timeout: Duration) -> Result<()> {
        let Some(pid) = self.live_postmaster() else {
            self.guard = None;
            return Ok(());
        };
        tracing::info!(member = %self.cfg.member_name, pid, ?mode, "stopping PostgreSQL");
        signal(pid, mode.signal());
        let deadline = Instant::now() + timeout;
        while is_alive(pid) {
            if Instant::now() >= deadline {
                return Err(SupervisorError::Timeout {
                    what: format!("{mode:?} shutdown of postmaster {pid}"),
                    after: timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
        self.release_guard().await;
        Ok(())
    }

    /// Fast stop, then start with the last lease; a replica without a
    /// known lease restarts with [`Lease::NotRequired`]. Refuses, before
    /// stopping anything, to restart a primary without a lease.
    pub async fn restart(&mut self) -> Result<()> {
        let lease = match self.last_lease {
            Some(l) => l,
            None if self.data.has_standby_signal() => Lease::NotRequired,
            None => {
                return Err(SupervisorError::WrongRole(
                    "restarting a primary needs a lease; use start(lease)".into(),
                ))
            }
        };
        // A server promoted behind our back (standby.signal gone) must not
        // come back writable under the lease-less guard of its replica days.
        check_lease_for_role(lease, self.data.has_standby_signal())?;
        self.stop(StopMode::Fast, self.cfg.timeouts.start).await?;
        self.start(lease).await
    }

    /// Creates the Unix socket directory for the OS user when it is missing (as the
    /// distribution's packages do at boot), so that Postgres can put its socket there.
    fn ensure_socket_dir(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(dir) = &self.cfg.socket_dir else {
            return Ok(());
        };
        if dir.is_dir() {
            return Ok(());
        }
        let fix = |e: std::io::Error| {
            SupervisorError::io(
                format!(
                    "create the Unix socket directory {} (set postgres.socket_dir to a \
                     directory the Postgres OS user may write, or to \"\" for TCP only)",
                    dir.display()
                ),
                e,
            )
        };
        std::fs::create_dir_all(dir).map_err(fix)?;
        self.user.chown(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2775)).map_err(fix)
    }

    /// Re-reads configuration files (SIGHUP).
    pub fn reload(&self) -> Result<()> {
        let pid = self
            .live_postmaster()
            .ok_or_else(|| SupervisorError::NotRunning(self.cfg.data_dir.clone()))?;
        if signal(pid, libc::SIGHUP) {
            Ok(())
        } else {
            Err(SupervisorError::NotRunning(self.cfg.data_dir.clone()))
        }
    }

    /// Stops PostgreSQL now: immediate shutdown, verified by `/proc`,
    /// escalating to SIGKILL of the postmaster and its backends after
    /// `timeouts.fence_grace`; then SIGKILL of every other process of the
    /// data directory, which catches backends orphaned by a postmaster that
    /// died first, also when no postmaster is found at all. `verified_gone`
    /// only once none is left. Reports how long it took.
    pub async fn fence(&mut self) -> Result<FenceReport> {
        let mut pids: Vec<i32> = self
            .guard
            .as_ref()
            .map(|g| g.postmaster_pid())
            .into_iter()
            .collect();
        if let PostmasterState::Running { pid, .. } = self.data.postmaster_state() {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        let grace = self.cfg.timeouts.fence_grace;
        let data_dir = self.cfg.data_dir.clone();
        let report = tokio::task::spawn_blocking(move || fence_data_dir(&data_dir, &pids, grace))
            .await
            .map_err(|e| SupervisorError::Guard(format!("fence task failed: {e}")))?;
        if report.verified_gone {
            tracing::warn!(member = %self.cfg.member_name, ?report, "fenced PostgreSQL");
        } else {
            tracing::error!(member = %self.cfg.member_name, ?report, "fence could not verify that every process of the data directory is gone");
        }
        self.release_guard().await;
        Ok(report)
    }

    /// The postmaster running on this data directory outside this instance's guard, if any: one
    /// an operator started by hand (`pg_ctl start`), or one left behind by a guard that exited.
    /// Nothing fences such a server when this sidecar dies (S4), and a promotion refuses it.
    pub fn unguarded_postmaster(&mut self) -> Option<i32> {
        let pid = self.data.postmaster_state().pid()?;
        let guarded = self
            .guard
            .as_mut()
            .is_some_and(|g| g.postmaster_pid() == pid && g.try_exit_status().is_none());
        (!guarded).then_some(pid)
    }

    /// Brings an unguarded Postgres under a guard: a fast shutdown, then a start under the
    /// guard, in recovery if it was, else under `lease`. A writable server without an unexpired
    /// lease is fenced instead: it may not write at all.
    pub async fn take_under_guard(&mut self, lease: Option<Lease>) -> Result<TakenUnderGuard> {
        let Some(pid) = self.unguarded_postmaster() else {
            return Ok(TakenUnderGuard::AlreadyGuarded);
        };
        let in_recovery = self.data.has_standby_signal();
        let lease = lease.filter(|l| matches!(l, Lease::Until(_)) && !l.is_expired());
        if !in_recovery && lease.is_none() {
            tracing::warn!(member = %self.cfg.member_name, pid, "a writable PostgreSQL runs outside the guard without a lease: fencing it");
            self.fence().await?;
            return Ok(TakenUnderGuard::Fenced);
        }
        tracing::warn!(member = %self.cfg.member_name, pid, in_recovery, "PostgreSQL runs outside the guard: restarting it under the guard");
        self.stop(StopMode::Fast, self.cfg.timeouts.start).await?;
        match lease {
            Some(l) if !in_recovery => self.start(l).await?,
            _ => self.start_in_recovery().await?,
        }
        Ok(TakenUnderGuard::Restarted)
    }

    /// The live postmaster pid, from the guard or the lock file.
    pub(crate) fn live_postmaster(&self) -> Option<i32> {
        if let Some(pid) = self.guard.as_ref().map(|g| g.postmaster_pid()) {
            if is_alive(pid) {
                return Some(pid);
            }
        }
        self.data.postmaster_state().pid()
    }

    /// Node settings and `pg_hba.conf`; clones and rewinds copy the
    /// source's, so these are rewritten before every start. The replication
    /// and synchronous-standby files are only created when missing: a
    /// restarted primary keeps its synchronous standbys.
    pub(crate) fn write_node_files_in(&self, dir: &crate::data_dir::DataDir) -> Result<()> {
        dir.write_file(
            crate::conf_files::NODE_CONF,
            &render_node_conf(&self.cfg),
            &self.user,
        )?;
        dir.write_file("pg_hba.conf", &render_hba(&self.cfg), &self.user)?;
        if !dir.path().join(REPLICATION_CONF).exists() {
            dir.write_file(
                REPLICATION_CONF,
                &crate::conf_files::render_no_replication_conf(),
                &self.user,
            )?;
        }
        if !dir.path().join(SYNC_CONF).exists() {
            dir.write_file(
                SYNC_CONF,
                &render_sync_conf(&SyncSpec::asynchronous()),
                &self.user,
            )?;
        }
        dir.ensure_includes(&self.user)
    }

    fn write_node_files(&self) -> Result<()> {
        self.write_node_files_in(&self.data)
    }

    fn check_port_free(&self) -> Result<()> {
        let target = self.local_target();
        match std::net::TcpListener::bind((target.host.as_str(), target.port)) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                Err(SupervisorError::PortInUse {
                    host: target.host,
                    port: target.port,
                })
            }
            // Other bind problems are PostgreSQL's to report, with detail.
            _ => Ok(()),
        }
    }

    /// Waits briefly for the guard to notice its postmaster is gone.
    async fn release_guard(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.wait_exit(GUARD_EXIT_WAIT).await;
        }
    }
}

/// What [`Instance::take_under_guard`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakenUnderGuard {
    /// Nothing ran outside the guard.
    AlreadyGuarded,
    /// Restarted under the guard.
    Restarted,
    /// Writable without a lease: fenced.
    Fenced,
}

/// S4: a server started without `standby.signal` is a writable primary,
/// and a writable primary runs only under a lease deadline.
fn check_lease_for_role(lease: Lease, standby_signal: bool) -> Result<()> {
    if lease == Lease::NotRequired && !standby_signal {
        return Err(SupervisorError::WrongRole(
            "starting without standby.signal makes a writable primary, which needs a lease \
             (Lease::Until); use start_in_recovery() for a replica"
                .into(),
        ));
    }
    Ok(())
}

/// Log text written since `offset`, last lines only.
fn log_tail(path: &std::path::Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_string(&mut text);
    }
    tail(&text, 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_replica_may_run_without_a_lease() {
        assert!(check_lease_for_role(Lease::NotRequired, true).is_ok());
        assert!(check_lease_for_role(Lease::Until(1), false).is_ok());
        assert!(check_lease_for_role(Lease::Until(1), true).is_ok());
        let err = check_lease_for_role(Lease::NotRequired, false).unwrap_err();
        assert!(matches!(err, SupervisorError::WrongRole(_)), "{err}");
    }
}
