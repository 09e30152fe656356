//! Physical replication slots: one per member, on whichever server it
//! streams from (slots are not replicated, so a new primary needs them made).

use std::time::Duration;

use super::Instance;
use crate::config::{Credentials, Upstream};
use crate::error::{Result, SupervisorError};
use crate::session::connect;

const SLOT_SQL_TIMEOUT: Duration = Duration::from_secs(10);

impl Instance {
    async fn slot_session(&self) -> Result<crate::session::Session> {
        connect(
            &self.local_target(),
            &self.cfg.superuser,
            self.cfg.timeouts.connect,
            Some(SLOT_SQL_TIMEOUT),
        )
        .await
    }

    /// Creates this member's own slot on `upstream`, the server it is about to stream from.
    pub(crate) async fn ensure_own_slot_on(&self, upstream: &Upstream) -> Result<()> {
        ensure_slot_at(
            upstream,
            &self.cfg.superuser,
            self.cfg.timeouts.connect,
            &crate::conninfo::slot_name_for(&self.cfg.member_name),
        )
        .await
    }

    /// Creates physical slot `name` on this (primary) server if missing.
    pub async fn ensure_replication_slot(&self, name: &str) -> Result<()> {
        ensure_slot_at(
            &self.local_target(),
            &self.cfg.superuser,
            self.cfg.timeouts.connect,
            name,
        )
        .await
    }

    /// Drops slot `name` on this server if it exists.
    pub async fn drop_replication_slot(&self, name: &str) -> Result<()> {
        let s = self.slot_session().await?;
        s.query(
            "drop replication slot",
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&name],
            SLOT_SQL_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// Drops every inactive slot on this server: on a replica they are
    /// leftovers from its time as primary.
    pub async fn drop_inactive_slots(&self) -> Result<()> {
        let s = self.slot_session().await?;
        s.query(
            "drop inactive replication slots",
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE NOT active",
            &[],
            SLOT_SQL_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// The inactive slots on this server that pgquorum made (`pgq_` names) and that are not in
    /// `keep`: slots of members that are gone. Only pgquorum's own are considered, so a DBA's
    /// slots (logical decoding, a backup tool) are never touched.
    pub async fn stale_slots(&self, keep: &[String]) -> Result<Vec<String>> {
        let s = self.slot_session().await?;
        let rows = s
            .query(
                "list inactive replication slots",
                "SELECT slot_name::text FROM pg_replication_slots \
                 WHERE NOT active AND slot_type = 'physical' AND slot_name LIKE 'pgq\\_%' \
                 ORDER BY 1",
                &[],
                SLOT_SQL_TIMEOUT,
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter(|n| !keep.contains(n))
            .collect())
    }

    /// Names of the replication slots on this server.
    pub async fn replication_slots(&self) -> Result<Vec<String>> {
        let s = self.slot_session().await?;
        let rows = s
            .query(
                "list replication slots",
                "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
                &[],
                SLOT_SQL_TIMEOUT,
            )
            .await?;
        Ok(rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
    }
}

/// Creates physical slot `name` on `upstream` if missing, reserving WAL now.
pub(crate) async fn ensure_slot_at(
    upstream: &Upstream,
    superuser: &Credentials,
    connect_timeout: Duration,
    name: &str,
) -> Result<()> {
    let s = connect(upstream, superuser, connect_timeout, Some(SLOT_SQL_TIMEOUT)).await?;
    let r = s
        .query(
            "create replication slot",
            "SELECT pg_create_physical_replication_slot($1, true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&name],
            SLOT_SQL_TIMEOUT,
        )
        .await;
    match r {
        Ok(_) => Ok(()),
        // Lost a race with another creator: the slot exists, which is the goal.
        Err(SupervisorError::Sql { message, .. }) if message.starts_with("42710") => Ok(()),
        Err(e) => Err(e),
    }
}
