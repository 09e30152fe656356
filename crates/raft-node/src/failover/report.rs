//! What a sidecar tells the Raft leader about its Postgres every tick. Reports are soft state in
//! the leader's memory, never log entries: the log only records decisions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::lease::Millis;
use crate::cluster_state::{Epoch, SyncSet};
use crate::types::NodeId;

/// The local Postgres as its sidecar last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PgState {
    /// No data directory yet (a new member before initdb or clone).
    NoData,
    /// Data directory present, postmaster not running (stopped on purpose, or crashed).
    Stopped,
    /// Postmaster verified gone after a fence, the sidecar holds no valid lease, and it accepts
    /// no grant for a report sent before this one: nothing on this node can write until the
    /// leader grants a newer report. (Down while holding a lease is `Stopped`.)
    Fenced,
    /// Running and answering as a primary.
    Primary,
    /// Running and answering as a replica.
    Replica,
    /// Postmaster present but not answering probes.
    Unresponsive,
}

/// One sidecar's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    /// The reporting member.
    pub node: NodeId,
    /// Postgres as observed.
    pub pg: PgState,
    /// Consecutive failed probes (0 when the last probe succeeded).
    pub consecutive_failures: u32,
    /// Timeline of the local data (0 when unknown).
    pub timeline: u32,
    /// Primary: current WAL insert position; replica: highest WAL received or replayed.
    pub lsn: u64,
    /// A replica's WAL receiver says `streaming`. After a silent network cut the word stays
    /// until a timeout ends the connection: judge it with [`MemberReport::receives_wal_now`].
    pub streaming: bool,
    /// Age of the last message the WAL receiver got from its upstream, on this member's clock.
    #[serde(default)]
    pub wal_receipt_age_ms: Option<u64>,
    /// The member a replica streams from, when known.
    #[serde(default)]
    pub upstream: Option<NodeId>,
    /// On a primary: the synchronous standbys in force, and whether they are confirmed.
    #[serde(default)]
    pub sync_applied: Option<SyncApplied>,
    /// The latest stamp this member got back from a leader before sending this report: proof
    /// that the report was sent after that leader's instant.
    #[serde(default)]
    pub leader_stamp: Option<LeaderStamp>,
    /// Highest committed epoch the sidecar has acted on.
    pub epoch_seen: u64,
    /// Sender's clock when the report left: the start of the lease it asks for. A sidecar whose
    /// Postgres is fenced accepts no grant for a report sent before its latest fenced report,
    /// so the leader can order a fence after a grant by these times.
    pub sent_at: Millis,
    /// Whether the member's Postgres can write, and the room it has.
    #[serde(default)]
    pub storage: StorageReport,
    /// A replica's replay position: the end of the last WAL record it applied.
    #[serde(default)]
    pub replayed_lsn: Option<u64>,
    /// A primary that shut down cleanly for a planned switchover, and where its WAL ends.
    #[serde(default)]
    pub handed_over: Option<HandedOver>,
    /// Settings whose committed value waits for a restart of this member's Postgres.
    #[serde(default)]
    pub pending_restart: Vec<String>,
    /// The system identifier of this member's data directory, when known.
    #[serde(default)]
    pub system_identifier: Option<u64>,
    /// Postgres runs outside the sidecar's guard (started by hand): `list` says so.
    #[serde(default)]
    pub unguarded: bool,
    /// A replica whose reported position may be behind the WAL it holds: restarted, its WAL
    /// receiver not running yet, and still replaying the WAL on its disk. A failover waits for
    /// its replay to settle before comparing it with the others.
    #[serde(default)]
    pub lsn_incomplete: bool,
}

/// A primary stopped by a clean shutdown for a switchover plan: nothing on it writes any more
/// (its report is `Fenced`), and every standby connected at the time received its WAL up to
/// `final_lsn`, the start of its shutdown checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedOver {
    /// The plan it stopped for.
    pub plan: u64,
    /// Start of its last WAL record (the shutdown checkpoint).
    pub final_lsn: u64,
}

/// A member's storage: room on its filesystems and, on a primary, the write probe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageReport {
    /// Free bytes on the data directory's or the WAL directory's filesystem, whichever has
    /// fewer; `None` when unknown.
    #[serde(default)]
    pub free_bytes: Option<u64>,
    /// Free space is below the member's warning threshold.
    #[serde(default)]
    pub low_space: bool,
    /// On a primary whose latest write probe failed: why it cannot write, in an operator's
    /// words (`no space: ...`, `read-only storage: ...`, `stuck I/O: ...`).
    #[serde(default)]
    pub cannot_write: Option<String>,
    /// Consecutive failed write probes of a running primary (0 when the last one wrote).
    #[serde(default)]
    pub write_failures: u32,
    /// The data or WAL filesystem refuses writes (mounted or fallen read-only); `free_bytes`
    /// is then 0, so the member is no failover candidate and does not rejoin.
    #[serde(default)]
    pub read_only: bool,
    /// On a primary: how long its latest write probe took (or has been running, when stuck).
    #[serde(default)]
    pub write_probe_ms: Option<u64>,
}

impl MemberReport {
    /// This report sent again at `now`, while a long action (a promotion, a start as primary)
    /// keeps the sidecar from observing anew. It says what was last seen and echoes the same
    /// leader stamp, so nothing in it claims to be newer than it is; it renews the lease all
    /// the same.
    pub fn resent(&self, now: Millis) -> MemberReport {
        MemberReport {
            sent_at: now,
            ..self.clone()
        }
    }
}

/// A leader's term and clock reading, returned with every report reply and echoed in the
/// member's next report. A report echoing a stamp taken at or after some instant of the leader
/// was sent after that instant, whatever the network did: what it says (the member's WAL
/// position above all) is at least as new as that instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStamp {
    /// The leader's Raft term.
    pub term: u64,
    /// The leader's clock when it answered.
    pub at: Millis,
}

/// The synchronous standbys a primary runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncApplied {
    /// The epoch the primary applied them in.
    pub epoch: Epoch,
    /// The set in `synchronous_standby_names`.
    pub set: SyncSet,
    /// At least `k` members of the set have flushed past the WAL position at which the set
    /// took effect, so every earlier acknowledged commit is on `k` of them too.
    pub confirmed: bool,
    /// The revision of the committed synchronous state the primary applied this set for.
    #[serde(default)]
    pub revision: u64,
}

impl MemberReport {
    /// Whether this member runs as primary but failed its last `threshold` write probes.
    pub fn cannot_write_for(&self, threshold: u32) -> bool {
        self.pg == PgState::Primary && self.storage.write_failures >= threshold
    }

    /// Whether this member could serve as primary right now.
    pub fn healthy_replica(&self) -> bool {
        self.pg == PgState::Replica && self.consecutive_failures == 0
    }

    /// Evidence that cannot go stale: the WAL receiver says `streaming` *and* heard from its
    /// upstream within `bound_ms` (the primary writes a heartbeat every tick, so a live link
    /// delivers something well within it).
    pub fn receives_wal_now(&self, bound_ms: u64) -> bool {
        self.streaming && self.wal_receipt_age_ms.is_some_and(|age| age <= bound_ms)
    }
}

/// A report as the leader holds it: with the receipt time on the leader's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Leader's clock when the report arrived.
    pub at: Millis,
    /// The report.
    pub report: MemberReport,
    /// For a run of `Fenced` reports all sent after the last grant to this member: when the
    /// first of them arrived. The member has written nothing since (it accepts no grant for a
    /// report sent before a fenced one, and none was issued for a later one).
    pub fenced_since: Option<Millis>,
    /// For a run of reports of a replica that does not receive WAL now (see
    /// [`MemberReport::receives_wal_now`]): when the first of them arrived.
    pub wal_lost_since: Option<Millis>,
    /// For a run of reports of a running primary in the same epoch: when the first arrived.
    pub primary_since: Option<Millis>,
}

/// The latest report of each member, as the leader knows them.
pub type ReportBook = BTreeMap<NodeId, Received>;

/// Files `report`, received at `at`, in `book`. `granted_sent_at`: the send time of the report
/// behind the last lease granted to this member, if any; `wal_fresh_ms`: how recent a
/// replica's last message from its upstream must be to count as receiving WAL.
pub fn record(
    book: &mut ReportBook,
    report: MemberReport,
    at: Millis,
    granted_sent_at: Option<Millis>,
    wal_fresh_ms: u64,
) {
    let prev = book.get(&report.node);
    let wal_lost_since = (report.pg == PgState::Replica && !report.receives_wal_now(wal_fresh_ms))
        .then(|| prev.and_then(|p| p.wal_lost_since).unwrap_or(at));
    let primary_since = (report.pg == PgState::Primary).then(|| {
        prev.filter(|p| p.report.pg == PgState::Primary && p.report.epoch_seen == report.epoch_seen)
            .and_then(|p| p.primary_since)
            .unwrap_or(at)
    });
    let after_grant = |r: &MemberReport| granted_sent_at.is_none_or(|g| r.sent_at > g);
    let fenced_since = (report.pg == PgState::Fenced && after_grant(&report)).then(|| {
        prev.filter(|prev| prev.report.pg == PgState::Fenced && after_grant(&prev.report))
            .and_then(|prev| prev.fenced_since)
            .unwrap_or(at)
    });
    book.insert(
        report.node,
        Received {
            at,
            report,
            fenced_since,
            wal_lost_since,
            primary_since,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(age: Option<u64>, sent_at: Millis) -> MemberReport {
        MemberReport {
            node: 2,
            pg: PgState::Replica,
            consecutive_failures: 0,
            timeline: 1,
            lsn: 100,
            streaming: age.is_some(),
            wal_receipt_age_ms: age,
            upstream: Some(1),
            sync_applied: None,
            leader_stamp: None,
            epoch_seen: 1,
            sent_at,
            storage: Default::default(),
            replayed_lsn: None,
            handed_over: None,
            pending_restart: Vec::new(),
            system_identifier: None,
            unguarded: false,
            lsn_incomplete: false,
        }
    }

    #[test]
    fn a_resent_report_changes_only_its_send_time() {
        let mut r = replica(Some(10), 1_000);
        r.leader_stamp = Some(LeaderStamp { term: 2, at: 900 });
        let again = r.resent(1_400);
        assert_eq!(again.sent_at, 1_400);
        assert_eq!(
            MemberReport {
                sent_at: 1_000,
                ..again
            },
            r
        );
    }

    #[test]
    fn the_book_remembers_since_when_a_replica_receives_no_wal() {
        let mut book = ReportBook::new();
        record(&mut book, replica(Some(100), 1), 1_000, None, 1_250);
        assert_eq!(book[&2].wal_lost_since, None);
        // Still `streaming` by the status word, but nothing arrived for too long.
        record(&mut book, replica(Some(2_000), 2), 2_000, None, 1_250);
        assert_eq!(book[&2].wal_lost_since, Some(2_000));
        record(&mut book, replica(None, 3), 3_000, None, 1_250);
        assert_eq!(book[&2].wal_lost_since, Some(2_000), "the run goes on");
        record(&mut book, replica(Some(10), 4), 4_000, None, 1_250);
        assert_eq!(book[&2].wal_lost_since, None, "receiving again");
    }

    #[test]
    fn the_book_remembers_since_when_a_primary_runs_in_its_epoch() {
        let mut book = ReportBook::new();
        let mut r = replica(None, 1);
        r.pg = PgState::Primary;
        record(&mut book, r.clone(), 1_000, None, 1_250);
        record(&mut book, r.clone(), 2_000, None, 1_250);
        assert_eq!(book[&2].primary_since, Some(1_000));
        r.epoch_seen = 2;
        record(&mut book, r, 3_000, None, 1_250);
        assert_eq!(
            book[&2].primary_since,
            Some(3_000),
            "a new epoch starts anew"
        );
    }
}
