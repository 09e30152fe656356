//! SQL sessions whose every step is bounded in time, including against a
//! postmaster that accepts TCP connections but never answers (SIGSTOP).

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use crate::config::{Credentials, Upstream};
use crate::error::{Result, SupervisorError};

/// One connection plus the task driving it; dropping it tears both down.
pub struct Session {
    client: Client,
    driver: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // A hung server would keep the driver task alive forever.
        self.driver.abort();
    }
}

/// Connects, bounding the whole handshake (TCP, startup, SCRAM) by
/// `connect_timeout`; `statement_timeout` is set server-side (`None` = 0).
pub async fn connect(
    upstream: &Upstream,
    user: &Credentials,
    connect_timeout: Duration,
    statement_timeout: Option<Duration>,
) -> Result<Session> {
    let mut cfg = tokio_postgres::Config::new();
    let st_ms = statement_timeout.map(|d| d.as_millis().max(1)).unwrap_or(0);
    cfg.host(&upstream.host)
        .port(upstream.port)
        .user(&user.name)
        .password(user.password.as_bytes())
        .dbname("postgres")
        .application_name("pgquorum-sidecar")
        .connect_timeout(connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(connect_timeout.max(Duration::from_secs(1)))
        .options(format!("-c statement_timeout={st_ms}"));
    let what = format!(
        "{}{}:{}",
        crate::error::CONNECT_CONTEXT,
        upstream.host,
        upstream.port
    );
    let (client, connection) = match tokio::time::timeout(connect_timeout, cfg.connect(NoTls)).await
    {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(SupervisorError::sql(what, &e)),
        Err(_) => {
            return Err(SupervisorError::Timeout {
                what,
                after: connect_timeout,
            })
        }
    };
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Session { client, driver })
}

impl Session {
    /// Runs a query bounded by `limit`; on timeout, asks the server to
    /// cancel it in the background (the cancel itself is bounded too).
    pub async fn query(
        &self,
        context: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        limit: Duration,
    ) -> Result<Vec<Row>> {
        match tokio::time::timeout(limit, self.client.query(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(SupervisorError::sql(context, &e)),
            Err(_) => {
                let token = self.client.cancel_token();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(limit, token.cancel_query(NoTls)).await;
                });
                Err(SupervisorError::Timeout {
                    what: context.to_string(),
                    after: limit,
                })
            }
        }
    }

    /// Runs statements without results (simple protocol), bounded by `limit`.
    pub async fn execute(&self, context: &str, sql: &str, limit: Duration) -> Result<()> {
        match tokio::time::timeout(limit, self.client.batch_execute(sql)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SupervisorError::sql(context, &e)),
            Err(_) => {
                let token = self.client.cancel_token();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(limit, token.cancel_query(NoTls)).await;
                });
                Err(SupervisorError::Timeout {
                    what: context.to_string(),
                    after: limit,
                })
            }
        }
    }
}
