//! Role changes: promote, follow a new primary, rejoin as a replica.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Instance, StopMode};
use crate::conf_files::{render_no_replication_conf, render_replication_conf, REPLICATION_CONF};
use crate::config::Upstream;
use crate::conninfo::superuser_conninfo;
use crate::data_dir::DataDirContents;
use crate::error::{Result, SupervisorError};
use crate::lease::Lease;
use crate::observation::Role;
use crate::pg_command::PgTool;
use crate::probe::probe_sql;
use crate::session::connect;

const POLL: Duration = Duration::from_millis(20);
const REJOIN_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Result of a promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteReport {
    /// Timeline before promotion.
    pub previous_timeline: Option<u32>,
    /// The new timeline.
    pub timeline: u32,
    /// From the call until `pg_is_in_recovery()` returned false.
    pub elapsed_ms: u64,
}

/// Result of following a new upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowReport {
    /// Timeline received from the new upstream.
    pub timeline: Option<u32>,
    /// From the call until the WAL receiver streamed from the upstream.
    pub elapsed_ms: u64,
}

/// How a former primary became a replica again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejoinMethod {
    /// `pg_rewind` succeeded.
    Rewound,
    /// Rewind failed; the data directory was replaced by a fresh clone.
    Recloned,
}

/// Result of `rejoin_as_replica`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinReport {
    /// Rewound or re-cloned.
    pub method: RejoinMethod,
    /// Why rewinding did not work, when re-cloned.
    pub rewind_error: Option<String>,
    /// Time spent in `pg_rewind` itself, including the crash recovery it
    /// runs on an uncleanly stopped target (successful or not).
    pub rewind_ms: u64,
    /// Whole operation, until streaming from the upstream.
    pub elapsed_ms: u64,
}

/// Result of a clean shutdown for a planned switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOverReport {
    /// Start of the shutdown checkpoint: the last record this primary wrote. A standby that
    /// replayed past it holds every write this primary ever made.
    pub final_lsn: u64,
    /// From the call until the postmaster was gone and the control file read.
    pub elapsed_ms: u64,
}

impl Instance {
    /// Stops this primary cleanly for a switchover: a fast shutdown rolls back open
    /// transactions, writes the shutdown checkpoint and waits (up to `wal_sender_timeout`) until
    /// every connected standby has flushed the WAL up to it, so the standbys hold everything.
    /// Fails, leaving the server as it is, if the postmaster is still there after `timeout`:
    /// the caller then fences.
    pub async fn hand_over(&mut self, timeout: Duration) -> Result<HandOverReport> {
        let started = Instant::now();
        if self.data.has_standby_signal() {
            return Err(SupervisorError::WrongRole(
                "hand_over() stops a primary; this data directory is a replica".into(),
            ));
        }
        self.stop(StopMode::Fast, timeout).await?;
        let control = self.control_data().await?;
        if control.cluster_state != "shut down" {
            return Err(SupervisorError::WrongRole(format!(
                "after the fast shutdown the control file says '{}', not 'shut down'",
                control.cluster_state
            )));
        }
        let final_lsn = control
            .checkpoint_lsn
            .ok_or_else(|| SupervisorError::Parse {
                what: "pg_controldata output".into(),
                detail: "no latest checkpoint location".into(),
            })?;
        Ok(HandOverReport {
            final_lsn,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Starts a primary that [`Instance::hand_over`] stopped cleanly as a replica of
    /// `upstream`, without a rewind: its WAL ends with the shutdown checkpoint, and the new
    /// primary's timeline forks after it. Refuses a data directory that was not shut down
    /// cleanly. When streaming never starts (the upstream forked earlier after all), the error
    /// is a timeout and only a rewind helps.
    pub async fn follow_after_hand_over(&mut self, upstream: &Upstream) -> Result<FollowReport> {
        let started = Instant::now();
        if let Some(pid) = self.live_postmaster() {
            return Err(SupervisorError::AlreadyRunning {
                path: self.cfg.data_dir.clone(),
                pid,
            });
        }
        let control = self.control_data().await?;
        if control.cluster_state != "shut down" {
            return Err(SupervisorError::WrongRole(format!(
                "the control file says '{}': only a cleanly shut down primary follows without \
                 a rewind",
                control.cluster_state
            )));
        }
        let timeline = self.follow_from_stopped(upstream).await?;
        Ok(FollowReport {
            timeline,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Makes the stopped data directory a replica of `upstream`, starts it and waits until it
    /// streams; then drops the slots it kept from its time as primary.
    async fn follow_from_stopped(&mut self, upstream: &Upstream) -> Result<Option<u32>> {
        self.ensure_own_slot_on(upstream).await?;
        self.make_replica_files(&self.data.clone(), upstream)?;
        self.start(Lease::NotRequired).await?;
        let timeline = self.wait_streaming_from(upstream).await?;
        // A former primary keeps its own pg_replslot: slots from its time as primary would
        // pin WAL on this replica forever.
        if let Err(e) = self.drop_inactive_slots().await {
            tracing::warn!(error = %e, "could not drop stale replication slots");
        }
        Ok(timeline)
    }

    /// Promotes this replica: `pg_promote(wait => true)`, then confirms
    /// `pg_is_in_recovery() = false` and reports the new timeline. Refuses
    /// unless the guard holds a bounded lease (S4: no writable server
    /// without a lease).
    pub async fn promote(&mut self) -> Result<PromoteReport> {
        let started = Instant::now();
        self.promotion_requested = false;
        match self.guard.as_ref().map(|g| g.lease()) {
            Some(Lease::Until(_)) if !self.guard_lease_expired() => {}
            _ => {
                return Err(SupervisorError::WrongRole(
                    "promote needs PostgreSQL running under a guard with an unexpired lease; \
                     feed_lease(Lease::Until(..)) first"
                        .into(),
                ))
            }
        }
        let t = self.cfg.timeouts.clone();
        let before = probe_sql(
            &self.local_target(),
            &self.cfg.superuser,
            t.connect,
            t.statement,
            None,
        )
        .await?;
        if before.role != Role::Replica {
            return Err(SupervisorError::WrongRole("already a primary".into()));
        }
        // pg_promote needs statement_timeout = 0 on its session.
        let s = connect(&self.local_target(), &self.cfg.superuser, t.connect, None).await?;
        let wait_secs = t.promote.as_secs().clamp(1, i32::MAX as u64) as i32;
        tracing::info!(member = %self.cfg.member_name, "promoting");
        // From here on the promotion may happen whatever this call returns.
        self.promotion_requested = true;
        let rows = self
            .fed(s.query(
                "pg_promote",
                "SELECT pg_promote(true, $1)",
                &[&wait_secs],
                t.promote + Duration::from_secs(5),
            ))
            .await??;
        let promoted: bool = rows
            .first()
            .and_then(|r| r.try_get(0).ok())
            .unwrap_or(false);
        if !promoted {
            return Err(SupervisorError::PromoteFailed(format!(
                "pg_promote did not finish within {wait_secs}s"
            )));
        }
        let deadline = Instant::now() + t.promote;
        let after = loop {
            let f = probe_sql(
                &self.local_target(),
                &self.cfg.superuser,
                t.connect,
                t.statement,
                None,
            )
            .await?;
            if f.role == Role::Primary {
                break f;
            }
            if Instant::now() >= deadline {
                return Err(SupervisorError::PromoteFailed(
                    "still in recovery after pg_promote".into(),
                ));
            }
            self.fed(tokio::time::sleep(POLL)).await?;
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        // A later restart must not try to stream from the old primary.
        self.data
            .write_file(REPLICATION_CONF, &render_no_replication_conf(), &self.user)?;
        Ok(PromoteReport {
            previous_timeline: before.timeline,
            timeline: after.timeline.unwrap_or(0),
            elapsed_ms,
        })
    }

    /// Re-points this replica at `upstream` (PostgreSQL 13+ applies a new
    /// `primary_conninfo` on reload) and waits until the WAL receiver
    /// streams from it. Starts the server as a replica if it is stopped.
    pub async fn follow(&mut self, upstream: &Upstream) -> Result<FollowReport> {
        let started = Instant::now();
        if !self.data.has_standby_signal() {
            return Err(SupervisorError::WrongRole(
                "follow() needs a replica (standby.signal); use rejoin_as_replica for a former \
                 primary"
                    .into(),
            ));
        }
        // Before anything is written into the data directory.
        self.check_own_system_identifier().await?;
        self.ensure_own_slot_on(upstream).await?;
        self.data.write_file(
            REPLICATION_CONF,
            &render_replication_conf(&self.cfg, upstream),
            &self.user,
        )?;
        if self.live_postmaster().is_some() {
            if self.data.major_version()? >= 13 {
                self.reload()?;
            } else {
                // Before PostgreSQL 13 primary_conninfo needs a restart.
                self.restart().await?;
            }
        } else {
            self.start(Lease::NotRequired).await?;
        }
        let timeline = self.wait_streaming_from(upstream).await?;
        Ok(FollowReport {
            timeline,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Turns a former primary into a replica of `upstream`: stop it,
    /// `pg_rewind` against the upstream, then follow. If rewinding fails,
    /// re-clone into a sibling directory and swap it in atomically once
    /// complete, so the node always has a data directory. Refuses (touching
    /// nothing) if the data directory belongs to another cluster.
    pub async fn rejoin_as_replica(&mut self, upstream: &Upstream) -> Result<RejoinReport> {
        let started = Instant::now();
        let upstream_sysid = self.upstream_system_identifier(upstream).await?;
        if let Some(expected) = self.cfg.expected_system_identifier {
            if expected != upstream_sysid {
                return Err(SupervisorError::SystemIdentifierMismatch {
                    path: self.cfg.data_dir.clone(),
                    expected,
                    found: upstream_sysid,
                });
            }
        }
        // Rewinding against a member still in recovery finds no fork (it is on our own
        // timeline) and rewinds nothing; once it promotes, this data directory may hold WAL past
        // the new timeline's fork point and can never follow it (found by the partition suite:
        // a former primary rejoined a member that was committed but not yet promoted).
        let t = &self.cfg.timeouts;
        if probe_sql(upstream, &self.cfg.superuser, t.connect, t.statement, None)
            .await?
            .role
            != Role::Primary
        {
            return Err(SupervisorError::UpstreamNotPrimary {
                host: upstream.host.clone(),
                port: upstream.port,
            });
        }
        let has_cluster = self.data.contents()? == DataDirContents::Cluster;
        if has_cluster {
            // A damaged control file is a case for re-cloning; a readable one
            // of another cluster is an operator mistake we must not erase.
            if let Ok(local) = self.system_identifier().await {
                if local != upstream_sysid {
                    return Err(SupervisorError::SystemIdentifierMismatch {
                        path: self.cfg.data_dir.clone(),
                        expected: upstream_sysid,
                        found: local,
                    });
                }
            }
        }
        self.stop_or_fence().await?;
        let mut rewind_error = None;
        let mut rewind_ms = 0;
        if has_cluster {
            let outcome = self.rewind_and_follow(upstream, &mut rewind_ms).await;
            match outcome {
                Ok(()) => {
                    return Ok(RejoinReport {
                        method: RejoinMethod::Rewound,
                        rewind_error: None,
                        rewind_ms,
                        elapsed_ms: started.elapsed().as_millis() as u64,
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rewind failed; re-cloning from {}:{}", upstream.host, upstream.port);
                    rewind_error = Some(e.to_string());
                    self.stop_or_fence().await?;
                }
            }
        }
        tracing::info!(member = %self.cfg.member_name, "re-cloning from {}:{}", upstream.host, upstream.port);
        self.reclone(upstream).await?;
        self.start(Lease::NotRequired).await?;
        self.wait_streaming_from(upstream).await?;
        Ok(RejoinReport {
            method: RejoinMethod::Recloned,
            rewind_error,
            rewind_ms,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn rewind_and_follow(&mut self, upstream: &Upstream, rewind_ms: &mut u64) -> Result<()> {
        self.ensure_checkpointed_timeline(upstream).await?;
        let t = Instant::now();
        let rewound = PgTool::new(&self.bins, &self.user, "pg_rewind")
            .arg(format!("--target-pgdata={}", self.data.path().display()))
            .arg(format!(
                "--source-server={}",
                superuser_conninfo(upstream, &self.cfg.superuser)
            ))
            .env("PGPASSWORD", self.cfg.superuser.password.clone())
            .run()
            .await;
        *rewind_ms = t.elapsed().as_millis() as u64;
        rewound?;
        self.follow_from_stopped(upstream).await?;
        Ok(())
    }

    /// Fresh clone next to the data directory, exchanged in atomically.
    pub(crate) async fn reclone(&mut self, upstream: &Upstream) -> Result<()> {
        let staging = crate::data_dir::DataDir::new(self.data.sibling(".pgq-reclone"));
        if staging.path().exists() {
            // Only ever our own leftover from an interrupted re-clone.
            std::fs::remove_dir_all(staging.path()).map_err(|e| {
                SupervisorError::io(format!("remove {}", staging.path().display()), e)
            })?;
        }
        staging.prepare_empty(&self.user)?;
        if let Err(e) = self.basebackup_into(&staging, upstream).await {
            let _ = std::fs::remove_dir_all(staging.path());
            return Err(e);
        }
        if self.data.contents()? == DataDirContents::Missing {
            std::fs::rename(staging.path(), self.data.path()).map_err(|e| {
                SupervisorError::io(format!("rename into {}", self.data.path().display()), e)
            })?;
            return Ok(());
        }
        self.data.exchange_with(staging.path())?;
        // `staging` now holds the old, diverged data directory.
        std::fs::remove_dir_all(staging.path())
            .map_err(|e| SupervisorError::io(format!("remove {}", staging.path().display()), e))
    }

    pub(crate) async fn stop_or_fence(&mut self) -> Result<()> {
        if self.live_postmaster().is_none() {
            self.guard = None;
            return Ok(());
        }
        if self
            .stop(StopMode::Fast, REJOIN_STOP_TIMEOUT)
            .await
            .is_err()
        {
            let r = self.fence().await?;
            if !r.verified_gone {
                return Err(SupervisorError::Timeout {
                    what: "fencing before rejoin".into(),
                    after: REJOIN_STOP_TIMEOUT,
                });
            }
        }
        Ok(())
    }

    /// pg_rewind reads the source's timeline from its control file, which a
    /// fresh promotion updates only at the next checkpoint; until then it
    /// wrongly concludes "no rewind required". Checkpoint if that is so.
    async fn ensure_checkpointed_timeline(&self, upstream: &Upstream) -> Result<()> {
        let t = &self.cfg.timeouts;
        let s = connect(upstream, &self.cfg.superuser, t.connect, None).await?;
        let rows = s
            .query(
                "check upstream checkpoint timeline",
                "SELECT CASE WHEN pg_is_in_recovery() THEN false ELSE \
                   (SELECT timeline_id FROM pg_control_checkpoint()) < \
                   ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int \
                 END",
                &[],
                t.statement,
            )
            .await?;
        let stale: bool = rows
            .first()
            .and_then(|r| r.try_get(0).ok())
            .unwrap_or(false);
        if stale {
            tracing::info!("checkpointing the new primary so pg_rewind sees its timeline");
            s.execute("CHECKPOINT on upstream", "CHECKPOINT", t.promote)
                .await?;
        }
        Ok(())
    }

    pub(crate) async fn upstream_system_identifier(&self, upstream: &Upstream) -> Result<u64> {
        let t = &self.cfg.timeouts;
        let f = probe_sql(upstream, &self.cfg.superuser, t.connect, t.statement, None).await?;
        Ok(f.system_identifier)
    }

    /// Waits until the WAL receiver streams from `upstream`; returns the
    /// received timeline.
    /// Streaming on an older timeline than the upstream's is not following
    /// it: a server past the fork point streams the old timeline up to the
    /// fork, then fails, over and over.
    pub(crate) async fn wait_streaming_from(&self, upstream: &Upstream) -> Result<Option<u32>> {
        let t = self.cfg.timeouts.clone();
        let upstream_tli = probe_sql(upstream, &self.cfg.superuser, t.connect, t.statement, None)
            .await?
            .timeline
            .unwrap_or(0);
        let deadline = Instant::now() + t.follow;
        loop {
            let last;
            match probe_sql(
                &self.local_target(),
                &self.cfg.superuser,
                t.connect,
                t.statement,
                None,
            )
            .await
            {
                Ok(f) => {
                    if let Some(w) = &f.wal_receiver {
                        if w.status == "streaming"
                            && w.sender_host.as_deref() == Some(upstream.host.as_str())
                            && w.sender_port == Some(upstream.port)
                            && w.received_tli.unwrap_or(0) >= upstream_tli
                        {
                            return Ok(w.received_tli.or(f.timeline));
                        }
                        last = format!(
                            "WAL receiver {} from {:?}:{:?} on timeline {:?} (upstream on {})",
                            w.status, w.sender_host, w.sender_port, w.received_tli, upstream_tli
                        );
                    } else {
                        last = format!("{:?} without WAL receiver", f.role);
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(SupervisorError::Timeout {
                    what: format!(
                        "streaming from {}:{} (last: {last})",
                        upstream.host, upstream.port
                    ),
                    after: t.follow,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn guard_lease_expired(&self) -> bool {
        match &self.guard {
            Some(g) => g.lease().is_expired(),
            None => true,
        }
    }
}
