//! The sidecar's judgement of its own Postgres, tick by tick: from what a probe saw to the state
//! it reports and plans with. Pure; the sidecar and the simulation run this same code.
//!
//! The judgement carries memory across ticks: whether Postgres was seen running (a later stop
//! is a crash or a fence, not a fresh start), whether it was fenced, how many probes failed in a
//! row, and the fence cutoff: once fenced, no grant for a report sent before the fence may count,
//! so a late grant can never restart a fenced primary.

use serde::{Deserialize, Serialize};

use super::lease::{HeldLease, Millis};
use super::report::PgState;

/// What one probe saw, before any judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seen {
    /// No data directory yet.
    NoData,
    /// Data directory present, no postmaster.
    Down,
    /// Answering as a primary.
    Primary,
    /// Answering as a replica.
    Replica,
    /// A postmaster that does not answer within the probe's bound.
    Unresponsive,
}

/// The judgement of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    /// The state to report and plan with.
    pub pg: PgState,
    /// Consecutive failed probes.
    pub failures: u32,
    /// The postmaster died while this sidecar was watching it.
    pub crashed: bool,
}

/// What the sidecar remembers between ticks (lost when the sidecar process restarts, which is
/// the point: a new process starts fenced and learns again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Assessor {
    saw_running: bool,
    fenced: bool,
    failures: u32,
    fence_cutoff: Option<Millis>,
    write_failures: u32,
}

impl Assessor {
    /// Judges what the probe `seen` at `now` (sidecar clock). `was_primary`: this data directory
    /// served as primary and has not rejoined as a replica since; `lease`: the lease held.
    pub fn assess(
        &mut self,
        seen: Seen,
        was_primary: bool,
        lease: Option<HeldLease>,
        now: Millis,
    ) -> Assessment {
        let holds_lease = lease.is_some_and(|l| l.valid_at(now));
        let mut pg = match seen {
            Seen::NoData => PgState::NoData,
            Seen::Down if self.fenced => PgState::Fenced,
            Seen::Down => PgState::Stopped,
            Seen::Primary => PgState::Primary,
            Seen::Replica => PgState::Replica,
            Seen::Unresponsive => PgState::Unresponsive,
        };
        if matches!(pg, PgState::Primary | PgState::Replica) {
            self.saw_running = true;
            self.fenced = false;
        }
        // The guard fenced a primary whose lease ran out: that is a fence, not a crash.
        if pg == PgState::Stopped && was_primary && self.saw_running && !holds_lease {
            self.fenced = true;
            pg = PgState::Fenced;
        }
        let crashed = pg == PgState::Stopped && self.saw_running;
        // A primary fenced after a crash keeps counting, so the leader can say why.
        let fenced_after_failures = pg == PgState::Fenced && self.failures > 0;
        self.failures = if crashed || pg == PgState::Unresponsive || fenced_after_failures {
            self.failures + 1
        } else {
            0
        };
        // "Fenced" promises the leader that nothing here can write: Postgres is down and no
        // lease is held. Down while holding a lease is merely stopped.
        if pg == PgState::Fenced && holds_lease {
            pg = PgState::Stopped;
        }
        if pg == PgState::Fenced {
            self.fence_cutoff = Some(now);
        }
        Assessment {
            pg,
            failures: self.failures,
            crashed,
        }
    }

    /// Counts consecutive failed write probes of a running primary (`wrote`: what this tick's
    /// probe found, `None` when it ran none). Anything but a primary that failed to write
    /// resets the count: a replica, a stopped server, or one that wrote.
    pub fn judge_write(&mut self, pg: PgState, wrote: Option<bool>) -> u32 {
        self.write_failures = match (pg, wrote) {
            (PgState::Primary, Some(false)) => self.write_failures + 1,
            _ => 0,
        };
        self.write_failures
    }

    /// The sidecar fenced (or cleanly stopped) its Postgres at `now`. No grant counts for a
    /// report sent at `now` or before: such a report went out while Postgres still ran, possibly
    /// in this same round (found by the simulation: a grant for the report sent just before a
    /// switchover's shutdown restarted the primary it had stopped).
    pub fn fenced_at(&mut self, now: Millis) {
        self.fenced = true;
        self.fence_cutoff = Some(now + 1);
    }

    /// The sidecar started Postgres (as primary or replica) or rejoined it.
    pub fn started(&mut self) {
        self.fenced = false;
    }

    /// Whether a grant for a report sent at `sent_at` may still count.
    pub fn accepts_grant_for(&self, sent_at: Millis) -> bool {
        self.fence_cutoff.is_none_or(|c| sent_at >= c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_failures_count_only_for_a_running_primary() {
        let mut a = Assessor::default();
        assert_eq!(a.judge_write(PgState::Primary, Some(false)), 1);
        assert_eq!(a.judge_write(PgState::Primary, Some(false)), 2);
        assert_eq!(a.judge_write(PgState::Primary, Some(true)), 0);
        assert_eq!(a.judge_write(PgState::Primary, Some(false)), 1);
        // Fenced, stopped or demoted: the count starts again from nothing.
        assert_eq!(a.judge_write(PgState::Fenced, None), 0);
        assert_eq!(a.judge_write(PgState::Primary, Some(false)), 1);
        assert_eq!(a.judge_write(PgState::Replica, Some(false)), 0);
    }

    fn lease(until: Millis) -> Option<HeldLease> {
        Some(HeldLease {
            epoch: 1,
            expires_at: until,
        })
    }

    #[test]
    fn a_primary_stopped_without_a_lease_was_fenced_and_refuses_older_grants() {
        let mut a = Assessor::default();
        assert_eq!(
            a.assess(Seen::Primary, true, lease(1_000), 10).pg,
            PgState::Primary
        );
        let j = a.assess(Seen::Down, true, lease(1_000), 2_000);
        assert_eq!(j.pg, PgState::Fenced);
        assert!(!a.accepts_grant_for(1_999));
        assert!(a.accepts_grant_for(2_000));
    }

    #[test]
    fn a_crash_under_a_lease_counts_failures_and_reports_stopped() {
        let mut a = Assessor::default();
        a.assess(Seen::Primary, true, lease(5_000), 10);
        let j = a.assess(Seen::Down, true, lease(5_000), 100);
        assert_eq!((j.pg, j.failures, j.crashed), (PgState::Stopped, 1, true));
        let j = a.assess(Seen::Down, true, lease(5_000), 200);
        assert_eq!(j.failures, 2);
        // Fenced after the crash: still counting, so the leader can say why. A grant for the
        // report sent in the round of the fence does not count.
        a.fenced_at(300);
        assert!(!a.accepts_grant_for(300));
        assert!(a.accepts_grant_for(301));
        let j = a.assess(Seen::Down, true, None, 400);
        assert_eq!((j.pg, j.failures), (PgState::Fenced, 3));
    }

    #[test]
    fn a_new_sidecar_finds_postgres_stopped_not_crashed() {
        let mut a = Assessor::default();
        let j = a.assess(Seen::Down, true, None, 10);
        assert_eq!((j.pg, j.crashed, j.failures), (PgState::Stopped, false, 0));
    }
}
