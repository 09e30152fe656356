//! The SQL half of an observation: one session, three short queries.

use std::time::{Duration, Instant};

use tokio_postgres::types::PgLsn;

use crate::config::{Credentials, Upstream};
use crate::error::Result;
use crate::observation::{Lsn, Role, StandbyReplication, WalReceiver};
use crate::session::connect;
use crate::storage::{InFlight, WriteEnd};

/// `pg_current_wal_lsn()` errors on a standby and the insert timeline is
/// only defined on a primary, hence the CASEs.
const STATE_SQL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END, \
    pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), \
    CASE WHEN pg_is_in_recovery() THEN NULL \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    (SELECT timeline_id FROM pg_control_checkpoint()), \
    (SELECT system_identifier FROM pg_control_system()), \
    CASE WHEN pg_is_in_recovery() THEN NULL \
         ELSE current_setting('synchronous_standby_names') END";

/// The receipt age is computed here, on the server's clock, so that it
/// never depends on ours; a clock stepped back yields 0, not a negative age.
const RECEIVER_SQL: &str = "SELECT status, sender_host, sender_port, slot_name, received_tli, \
    GREATEST(0, (EXTRACT(EPOCH FROM (clock_timestamp() - last_msg_receipt_time)) * 1000))::bigint, \
    flushed_lsn \
    FROM pg_stat_wal_receiver";

/// The primary's heartbeat and write probe. The heartbeat is a tiny transactional WAL record
/// committed with a local flush only (it never waits for synchronous standbys): replicas
/// receive WAL every tick even when clients write nothing, so the age of their last message is
/// evidence that cannot go stale, and its flush proves the WAL filesystem takes writes. The
/// `COPY` then writes a small file in the data directory (in `pg_stat_tmp`, which base backups
/// and rewinds skip), proving that filesystem takes writes too. It runs after the `COMMIT`, in
/// its own transaction, so that a failed file write never takes the heartbeat with it.
fn write_probe_sql(file: &str) -> String {
    format!(
        "BEGIN; SET LOCAL synchronous_commit = local; \
         SELECT pg_logical_emit_message(true, 'pgquorum', 'heartbeat'); COMMIT; \
         COPY (SELECT 'pgquorum write probe') TO '{}'",
        file.replace('\'', "''")
    )
}

/// Client-side bound of one write probe. A write stuck in the kernel outlives any bound;
/// this one only stops a session that Postgres itself never ends.
const WRITE_LIMIT: Duration = Duration::from_secs(60);

/// How the primary's write probe runs.
#[derive(Debug, Clone)]
pub struct WriteArgs {
    /// Absolute path of the file the probe writes in the data directory.
    pub file: String,
    /// The probe waits for the write until then; a write still running is reported stuck.
    pub deadline: Instant,
    /// A write still running from an earlier tick.
    pub in_flight: InFlight,
}

const STANDBYS_SQL: &str = "SELECT application_name, client_addr::text, state, sync_state, \
    sent_lsn, write_lsn, flush_lsn, replay_lsn, \
    CASE WHEN pg_is_in_recovery() OR replay_lsn IS NULL THEN NULL \
         ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint END \
    FROM pg_stat_replication ORDER BY application_name";

/// Everything SQL tells us about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlFacts {
    /// Primary or replica.
    pub role: Role,
    /// Current timeline.
    pub timeline: Option<u32>,
    /// Primary's insert LSN.
    pub current_lsn: Option<Lsn>,
    /// Replica's last received LSN.
    pub received_lsn: Option<Lsn>,
    /// Replica's last replayed LSN.
    pub replayed_lsn: Option<Lsn>,
    /// WAL receiver, if any.
    pub wal_receiver: Option<WalReceiver>,
    /// `pg_stat_replication` rows.
    pub standbys: Vec<StandbyReplication>,
    /// System identifier.
    pub system_identifier: u64,
    /// `synchronous_standby_names` in force, on a primary.
    pub synchronous_standby_names: Option<String>,
    /// On a primary: how the write probe ended, and how long this probe waited for it.
    pub write: Option<(WriteEnd, Duration)>,
}

/// Runs the probe queries, and on a primary the write probe when `write` says how (only the
/// sidecar's own server: never a server it merely looks at); the caller bounds the whole call
/// in time.
pub async fn probe_sql(
    target: &Upstream,
    superuser: &Credentials,
    connect_timeout: Duration,
    statement_timeout: Duration,
    write: Option<WriteArgs>,
) -> Result<SqlFacts> {
    let s = connect(target, superuser, connect_timeout, Some(statement_timeout)).await?;
    let limit = statement_timeout;
    let rows = s.query("probe state", STATE_SQL, &[], limit).await?;
    let mut facts = SqlFacts {
        role: Role::Primary,
        timeline: None,
        current_lsn: None,
        received_lsn: None,
        replayed_lsn: None,
        wal_receiver: None,
        standbys: Vec::new(),
        system_identifier: 0,
        synchronous_standby_names: None,
        write: None,
    };
    if let Some(r) = rows.first() {
        let in_recovery: bool = r.try_get(0).unwrap_or(false);
        facts.role = if in_recovery {
            Role::Replica
        } else {
            Role::Primary
        };
        facts.current_lsn = lsn(r.try_get(1).ok().flatten());
        facts.received_lsn = lsn(r.try_get(2).ok().flatten());
        facts.replayed_lsn = lsn(r.try_get(3).ok().flatten());
        let insert_tli: Option<i32> = r.try_get(4).ok().flatten();
        let checkpoint_tli: Option<i32> = r.try_get(5).ok().flatten();
        facts.timeline = insert_tli.or(checkpoint_tli).map(|t| t as u32);
        let sysid: Option<i64> = r.try_get(6).ok().flatten();
        facts.system_identifier = sysid.unwrap_or(0) as u64;
        facts.synchronous_standby_names = r.try_get(7).ok().flatten();
    }
    if facts.role == Role::Replica {
        let rows = s
            .query("probe wal receiver", RECEIVER_SQL, &[], limit)
            .await?;
        facts.wal_receiver = rows.first().map(|r| WalReceiver {
            status: r.try_get(0).unwrap_or_default(),
            sender_host: r.try_get(1).ok().flatten(),
            sender_port: r
                .try_get::<_, Option<i32>>(2)
                .ok()
                .flatten()
                .map(|p| p as u16),
            slot_name: r.try_get(3).ok().flatten(),
            received_tli: r
                .try_get::<_, Option<i32>>(4)
                .ok()
                .flatten()
                .map(|t| t as u32),
            last_msg_receipt_age_ms: r
                .try_get::<_, Option<i64>>(5)
                .ok()
                .flatten()
                .map(|ms| ms.max(0) as u64),
            flushed_lsn: lsn(r.try_get(6).ok().flatten()),
        });
        // The checkpoint timeline lags a timeline switch; the receiver's
        // does not.
        if let Some(tli) = facts.wal_receiver.as_ref().and_then(|w| w.received_tli) {
            facts.timeline = Some(tli.max(facts.timeline.unwrap_or(0)));
        }
    }
    let rows = s.query("probe standbys", STANDBYS_SQL, &[], limit).await?;
    facts.standbys = rows
        .iter()
        .map(|r| StandbyReplication {
            name: r.try_get(0).unwrap_or_default(),
            client_addr: r.try_get(1).ok().flatten(),
            state: r.try_get(2).unwrap_or_default(),
            sync_state: r.try_get(3).unwrap_or_default(),
            sent_lsn: lsn(r.try_get(4).ok().flatten()),
            write_lsn: lsn(r.try_get(5).ok().flatten()),
            flush_lsn: lsn(r.try_get(6).ok().flatten()),
            replay_lsn: lsn(r.try_get(7).ok().flatten()),
            lag_bytes: r
                .try_get::<_, Option<i64>>(8)
                .ok()
                .flatten()
                .map(|b| b.max(0) as u64),
        })
        .collect();
    if let Some(args) = write.filter(|_| facts.role == Role::Primary) {
        facts.write = probe_write(s, args).await;
    }
    Ok(facts)
}

/// Runs the write probe on `s`, waiting for it until `args.deadline`; a write still running
/// then goes on in the background, and no other starts until it ends. `None`: no verdict yet,
/// because the write has run for less than [`STUCK_AFTER`] (the probe's reads used up its
/// time, as on a loaded host); the next probe judges the same write by how long it has run.
async fn probe_write(s: crate::session::Session, args: WriteArgs) -> Option<(WriteEnd, Duration)> {
    if let Some(since) = args.in_flight.since() {
        return still_running(since.elapsed()).map(|end| (end, Duration::ZERO));
    }
    args.in_flight.start();
    let started = Instant::now();
    let sql = write_probe_sql(&args.file);
    let flag = args.in_flight.clone();
    let task = tokio::spawn(async move {
        let r = s.execute("probe write", &sql, WRITE_LIMIT).await;
        flag.end();
        r
    });
    let end = match tokio::time::timeout_at(args.deadline.into(), task).await {
        Ok(Ok(Ok(()))) => WriteEnd::Done,
        Ok(Ok(Err(e))) => WriteEnd::Error(e.to_string()),
        Ok(Err(e)) => WriteEnd::Error(format!("write probe task: {e}")),
        Err(_) => still_running(started.elapsed())?,
    };
    Some((end, started.elapsed()))
}

/// A write is called stuck only once it has run this long: a probe whose deadline left it no
/// time says nothing about the storage (seen under load: "stuck after 0 ms", three in a row,
/// cost a healthy primary its lease).
pub const STUCK_AFTER: Duration = Duration::from_millis(200);

/// The verdict on a write still running after `running`: stuck, or none yet.
fn still_running(running: Duration) -> Option<WriteEnd> {
    (running >= STUCK_AFTER).then_some(WriteEnd::Running(running))
}

fn lsn(v: Option<PgLsn>) -> Option<Lsn> {
    v.map(Lsn::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_given_no_time_is_not_called_stuck() {
        assert_eq!(still_running(Duration::ZERO), None);
        assert_eq!(still_running(Duration::from_millis(199)), None);
        assert_eq!(
            still_running(Duration::from_millis(700)),
            Some(WriteEnd::Running(Duration::from_millis(700)))
        );
    }
}
