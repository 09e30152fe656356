//! HTTP health endpoints on `http_addr`, for load balancers and monitoring: `/primary`,
//! `/replica`, `/health`, `/cluster` and `/metrics` (Prometheus). They answer from this member's own view (no quorum
//! needed), so a load balancer's check never waits for the Raft group. Unauthenticated and
//! read-only.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::sync::watch;

use crate::cluster_state::{ClusterState, Epoch};
use crate::failover::lease::Millis;
use crate::failover::report::PgState;
use crate::metrics::{Metrics, RaftView, View};
use crate::store::state_machine::AppliedState;
use crate::types::NodeId;

/// What this member's sidecar last saw of its own Postgres, published every tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LocalHealth {
    /// Postgres as judged this tick; `None` before the first tick.
    pub pg: Option<PgState>,
    /// Until when (boot clock) this member holds a lease as primary, and for which epoch.
    pub lease: Option<(Epoch, Millis)>,
    /// A replica's WAL receiver streams and heard from its upstream recently.
    pub receives_wal: bool,
    /// WAL position (insert position on a primary, received or replayed on a replica).
    pub lsn: u64,
    /// Timeline.
    pub timeline: u32,
    /// When (boot clock) the sidecar published this.
    pub at: Millis,
    /// Free bytes on the data or WAL filesystem, whichever has fewer.
    pub free_bytes: Option<u64>,
}

/// Which check a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The writable primary holding a lease for the committed epoch.
    Primary,
    /// A streaming replica, within `lag` bytes of the primary's last committed position.
    Replica {
        /// Largest acceptable lag, bytes.
        lag: Option<u64>,
    },
    /// Postgres runs (as primary or replica) and the sidecar is alive.
    Health,
}

/// The verdict for `check`: 200 or 503, and a JSON body that says why. Pure.
pub fn judge(
    check: Check,
    me: NodeId,
    health: &LocalHealth,
    cluster: &ClusterState,
    now: Millis,
) -> (StatusCode, serde_json::Value) {
    // A sidecar that stopped ticking knows nothing current.
    let stale_after = 2 * cluster.config.lease_ms.max(cluster.config.tick_ms);
    let fresh = health.pg.is_some() && now.saturating_sub(health.at) <= stale_after;
    let assigned = cluster.primary.filter(|p| p.node == me);
    let role = crate::metrics::role_name(health.pg);
    let lag = cluster
        .primary_lsn
        .filter(|r| cluster.primary.is_some_and(|p| p.epoch == r.epoch))
        .map(|r| r.lsn.saturating_sub(health.lsn));
    let (ok, why) = match check {
        Check::Primary => {
            let leased = health.lease.is_some_and(|(epoch, until)| {
                assigned.is_some_and(|a| a.epoch == epoch) && now < until
            });
            match (fresh, health.pg, assigned, leased) {
                (false, _, _, _) => (false, "no current observation"),
                (_, Some(PgState::Primary), Some(_), true) => {
                    (true, "writable primary with a lease")
                }
                (_, Some(PgState::Primary), Some(_), false) => {
                    (false, "primary without a valid lease")
                }
                (_, Some(PgState::Primary), None, _) => (false, "not the committed primary"),
                _ => (false, "not running as primary"),
            }
        }
        Check::Replica { lag: bound } => {
            let within = match (bound, lag) {
                (None, _) => true,
                (Some(b), Some(l)) => l <= b,
                // Asked for a bound that cannot be checked: say no rather than guess.
                (Some(_), None) => false,
            };
            match (fresh, health.pg, health.receives_wal, within) {
                (false, _, _, _) => (false, "no current observation"),
                (_, Some(PgState::Replica), true, true) => (true, "streaming replica"),
                (_, Some(PgState::Replica), true, false) => (false, "replica lags past the bound"),
                (_, Some(PgState::Replica), false, _) => (false, "replica not streaming"),
                _ => (false, "not running as replica"),
            }
        }
        Check::Health => match (fresh, health.pg) {
            (true, Some(PgState::Primary | PgState::Replica)) => (true, "running"),
            (false, _) => (false, "no current observation"),
            _ => (false, "Postgres is not running"),
        },
    };
    let body = serde_json::json!({
        "node_id": me,
        "role": role,
        "assigned_primary": assigned.is_some(),
        "epoch": cluster.primary.map(|p| p.epoch),
        "timeline": health.timeline,
        "lsn": health.lsn,
        "lag_bytes": lag,
        "paused": cluster.paused,
        "ok": ok,
        "reason": why,
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

#[derive(Clone)]
struct Shared {
    me: NodeId,
    health: watch::Receiver<LocalHealth>,
    state: watch::Receiver<Arc<AppliedState>>,
    metrics: Metrics,
    raft: crate::types::Raft,
    metrics_token: Option<crate::security::Token>,
}

async fn answer(s: &Shared, check: Check) -> Response {
    let health = *s.health.borrow();
    let cluster = s.state.borrow().cluster.clone();
    let now = crate::failover::leader::boot_clock_ms();
    let (code, body) = judge(check, s.me, &health, &cluster, now);
    (code, axum::Json(body)).into_response()
}

async fn primary(State(s): State<Shared>) -> Response {
    answer(&s, Check::Primary).await
}

async fn replica(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let lag = match q.get("lag").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                "lag must be a whole number of bytes, e.g. /replica?lag=1048576\n",
            )
                .into_response()
        }
    };
    answer(&s, Check::Replica { lag }).await
}

async fn health(State(s): State<Shared>) -> Response {
    answer(&s, Check::Health).await
}

/// This member's applied view of the cluster (not linearizable: use the gRPC API for that).
async fn cluster(State(s): State<Shared>) -> Response {
    let state = s.state.borrow().clone();
    let c = &state.cluster;
    let body = serde_json::json!({
        "node_id": s.me,
        "primary": c.primary.map(|p| serde_json::json!({"node_id": p.node, "epoch": p.epoch})),
        "paused": c.paused,
        "members": c.members.values().map(|m| serde_json::json!({
            "id": m.id,
            "name": m.name,
            "pg_host": m.pg_host,
            "pg_port": m.pg_port,
            "http_addr": m.http_addr,
        })).collect::<Vec<_>>(),
        "history": c.history.iter().map(|h| serde_json::json!({
            "epoch": h.epoch,
            "from": h.from,
            "to": h.to,
            "reason": h.reason,
        })).collect::<Vec<_>>(),
    });
    axum::Json(body).into_response()
}

/// `GET /metrics`: Prometheus text (OpenMetrics flavour, which Prometheus reads).
async fn metrics(State(s): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    if let Some(token) = &s.metrics_token {
        let offered = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !offered.is_some_and(|o| token.matches(o)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                "GET /metrics needs `Authorization: Bearer <token>` with the token of \
                 security.metrics_token_file\n",
            )
                .into_response();
        }
    }
    let health = *s.health.borrow();
    let state = s.state.borrow().clone();
    let m = s.raft.metrics().borrow().clone();
    let text = s.metrics.render(&View {
        me: s.me,
        health: &health,
        cluster: &state.cluster,
        raft: RaftView {
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
        },
        now: crate::failover::leader::boot_clock_ms(),
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// What the endpoints read.
pub struct Sources {
    /// This member.
    pub me: NodeId,
    /// The sidecar's published observation.
    pub health: watch::Receiver<LocalHealth>,
    /// The applied state.
    pub state: watch::Receiver<Arc<AppliedState>>,
    /// The sidecar's counters.
    pub metrics: Metrics,
    /// Raft, for its metrics.
    pub raft: crate::types::Raft,
    /// The token `/metrics` needs, if any.
    pub metrics_token: Option<crate::security::Token>,
}

/// Serves the endpoints on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Sources,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/primary", get(primary))
        .route("/replica", get(replica))
        .route("/health", get(health))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .with_state(Shared {
            me: sources.me,
            health: sources.health,
            state: sources.state,
            metrics: sources.metrics,
            raft: sources.raft,
            metrics_token: sources.metrics_token,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_state::{PrimaryAssignment, RecordedLsn};

    fn cluster() -> ClusterState {
        ClusterState {
            primary: Some(PrimaryAssignment { node: 1, epoch: 2 }),
            primary_lsn: Some(RecordedLsn {
                epoch: 2,
                lsn: 10_000,
            }),
            ..Default::default()
        }
    }

    fn seen(pg: PgState) -> LocalHealth {
        LocalHealth {
            pg: Some(pg),
            lease: None,
            receives_wal: false,
            lsn: 9_000,
            timeline: 2,
            at: 100_000,
            free_bytes: None,
        }
    }

    #[test]
    fn primary_needs_the_role_the_assignment_and_a_lease() {
        let c = cluster();
        let mut h = seen(PgState::Primary);
        assert_eq!(
            judge(Check::Primary, 1, &h, &c, 100_100).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.lease = Some((2, 102_000));
        assert_eq!(judge(Check::Primary, 1, &h, &c, 100_100).0, StatusCode::OK);
        // The lease ran out, or was for an older epoch.
        assert_eq!(
            judge(Check::Primary, 1, &h, &c, 102_000).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.lease = Some((1, 102_000));
        assert_eq!(
            judge(Check::Primary, 1, &h, &c, 100_100).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Running as primary but not the committed one (about to fence).
        h.lease = Some((2, 102_000));
        let (code, body) = judge(Check::Primary, 3, &h, &c, 100_100);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reason"], "not the committed primary");
        // A sidecar that stopped publishing.
        assert_eq!(
            judge(Check::Primary, 1, &h, &c, 200_000).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn replica_needs_streaming_and_honours_the_lag_bound() {
        let c = cluster();
        let mut h = seen(PgState::Replica);
        assert_eq!(
            judge(Check::Replica { lag: None }, 2, &h, &c, 100_100).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.receives_wal = true;
        assert_eq!(
            judge(Check::Replica { lag: None }, 2, &h, &c, 100_100).0,
            StatusCode::OK
        );
        let (code, body) = judge(Check::Replica { lag: Some(1_000) }, 2, &h, &c, 100_100);
        assert_eq!(
            (code, body["lag_bytes"].as_u64()),
            (StatusCode::OK, Some(1_000))
        );
        assert_eq!(
            judge(Check::Replica { lag: Some(999) }, 2, &h, &c, 100_100).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            judge(
                Check::Replica { lag: None },
                2,
                &seen(PgState::Primary),
                &c,
                100_100
            )
            .0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn health_means_postgres_runs() {
        let c = cluster();
        assert_eq!(
            judge(Check::Health, 2, &seen(PgState::Replica), &c, 100_100).0,
            StatusCode::OK
        );
        assert_eq!(
            judge(Check::Health, 2, &seen(PgState::Fenced), &c, 100_100).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            judge(Check::Health, 2, &LocalHealth::default(), &c, 100_100).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
