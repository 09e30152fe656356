//! The SQL half of an observation: one session, three short queries.

use std::time::Duration;

use tokio_postgres::types::PgLsn;

use crate::config::{Credentials, Upstream};
use crate::error::Result;
use crate::observation::{Lsn, Role, StandbyReplication, WalReceiver};
use crate::session::connect;

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

/// The primary's heartbeat: a tiny transactional WAL record committed with a local flush only
/// (it never waits for synchronous standbys). Replicas receive WAL every tick even when
/// clients write nothing, so the age of their last message is evidence that cannot go stale;
/// and a primary that cannot write shows it here.
const HEARTBEAT_SQL: &str = "BEGIN; SET LOCAL synchronous_commit = local; \
    SELECT pg_logical_emit_message(true, 'pgquorum', 'heartbeat'); COMMIT";

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
    /// On a primary: why the heartbeat write failed, if it did.
    pub heartbeat_error: Option<String>,
}

/// Runs the probe queries; the caller bounds the whole call in time.
pub async fn probe_sql(
    target: &Upstream,
    superuser: &Credentials,
    connect_timeout: Duration,
    statement_timeout: Duration,
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
        heartbeat_error: None,
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
    if facts.role == Role::Primary {
        if let Err(e) = s.execute("probe heartbeat", HEARTBEAT_SQL, limit).await {
            facts.heartbeat_error = Some(e.to_string());
        }
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
    Ok(facts)
}

fn lsn(v: Option<PgLsn>) -> Option<Lsn> {
    v.map(Lsn::from)
}
