//! Prometheus metrics of one sidecar, served on `GET /metrics` in the text format. Counters and
//! the report round-trip histogram are fed by the sidecar as things happen; gauges are read at
//! scrape time from the member's own view (its last observation, the applied cluster state and
//! its Raft metrics), so a scrape never waits for the Raft group.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cluster_state::ClusterState;
use crate::failover::lease::Millis;
use crate::failover::report::PgState;
use crate::http::LocalHealth;

/// The `role` label of `pgquorum_postgres_role`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    /// primary, replica, stopped, fenced, no_data, unresponsive or unknown.
    pub role: String,
}

/// Every role `pgquorum_postgres_role` reports, so that each has a series (0 or 1).
const ROLES: [&str; 7] = [
    "primary",
    "replica",
    "stopped",
    "fenced",
    "no_data",
    "unresponsive",
    "unknown",
];

/// The name of a Postgres state in metrics and JSON.
pub fn role_name(pg: Option<PgState>) -> &'static str {
    match pg {
        Some(PgState::Primary) => "primary",
        Some(PgState::Replica) => "replica",
        Some(PgState::Stopped) => "stopped",
        Some(PgState::Fenced) => "fenced",
        Some(PgState::NoData) => "no_data",
        Some(PgState::Unresponsive) => "unresponsive",
        None => "unknown",
    }
}

struct Gauges {
    role: Family<RoleLabel, Gauge>,
    assigned_primary: Gauge,
    epoch: Gauge,
    timeline: Gauge,
    lsn: Gauge,
    lag_bytes: Gauge,
    lease_remaining: Gauge<f64, AtomicU64>,
    paused: Gauge,
    synchronous_degraded: Gauge,
    raft_term: Gauge,
    raft_leader: Gauge,
    raft_is_leader: Gauge,
    raft_last_log_index: Gauge,
    raft_applied_index: Gauge,
    free_bytes: Gauge,
}

/// One sidecar's metrics. Cheap to clone: clones share the series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    gauges: Arc<Gauges>,
    /// Fences of this member's Postgres (by the sidecar or its guard).
    pub fences: Counter,
    /// Promotions of this member's Postgres.
    pub promotions: Counter,
    /// Changes of the committed primary this member saw.
    pub failovers: Counter,
    /// Former primaries rejoined (rewound or re-cloned) and followed after a switchover.
    pub rejoins: Counter,
    /// Reports to the Raft leader that got no answer.
    pub report_failures: Counter,
    /// Round trip of reports to the Raft leader, seconds.
    pub report_rtt: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of series.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("pgquorum");
        let g = Gauges {
            role: Family::default(),
            assigned_primary: Gauge::default(),
            epoch: Gauge::default(),
            timeline: Gauge::default(),
            lsn: Gauge::default(),
            lag_bytes: Gauge::default(),
            lease_remaining: Gauge::default(),
            paused: Gauge::default(),
            synchronous_degraded: Gauge::default(),
            raft_term: Gauge::default(),
            raft_leader: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            free_bytes: Gauge::default(),
        };
        r.register(
            "postgres_role",
            "This member's Postgres as last observed (1 for its current role)",
            g.role.clone(),
        );
        r.register(
            "assigned_primary",
            "1 when the committed state names this member primary",
            g.assigned_primary.clone(),
        );
        r.register("epoch", "The committed primary's epoch", g.epoch.clone());
        r.register(
            "timeline",
            "Timeline of this member's Postgres",
            g.timeline.clone(),
        );
        r.register(
            "wal_position_bytes",
            "WAL position of this member's Postgres (insert position on a primary, received or \
             replayed on a replica)",
            g.lsn.clone(),
        );
        r.register(
            "lag_bytes",
            "Bytes this member is behind the primary's last committed position",
            g.lag_bytes.clone(),
        );
        r.register(
            "lease_remaining_seconds",
            "Time left on the primary lease this member holds (0 without one)",
            g.lease_remaining.clone(),
        );
        r.register(
            "paused",
            "1 while automatic failover is paused",
            g.paused.clone(),
        );
        r.register(
            "synchronous_degraded",
            "1 while synchronous replication is asked for but has fallen back to asynchronous: \
             a crash of the primary now loses acknowledged writes",
            g.synchronous_degraded.clone(),
        );
        r.register("raft_term", "Current Raft term", g.raft_term.clone());
        r.register(
            "raft_leader_id",
            "Node id of the Raft leader this member knows (0: none)",
            g.raft_leader.clone(),
        );
        r.register(
            "raft_is_leader",
            "1 while this member leads the Raft group",
            g.raft_is_leader.clone(),
        );
        r.register(
            "raft_last_log_index",
            "Index of the last entry in this member's Raft log",
            g.raft_last_log_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "Index of the last committed entry this member applied",
            g.raft_applied_index.clone(),
        );
        r.register(
            "free_bytes",
            "Free bytes on the data or WAL filesystem, whichever has fewer",
            g.free_bytes.clone(),
        );
        let fences = Counter::default();
        let promotions = Counter::default();
        let failovers = Counter::default();
        let rejoins = Counter::default();
        let report_failures = Counter::default();
        let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
        let report_rtt = Histogram::new(buckets);
        r.register("fences", "Fences of this member's Postgres", fences.clone());
        r.register(
            "promotions",
            "Promotions of this member's Postgres",
            promotions.clone(),
        );
        r.register(
            "failovers",
            "Changes of the committed primary this member saw",
            failovers.clone(),
        );
        r.register(
            "rejoins",
            "Times this member's Postgres rejoined as a replica after serving as primary",
            rejoins.clone(),
        );
        r.register(
            "report_failures",
            "Reports to the Raft leader that got no answer",
            report_failures.clone(),
        );
        r.register(
            "report_round_trip_seconds",
            "Round trip of this member's reports to the Raft leader",
            report_rtt.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(r)),
            gauges: Arc::new(g),
            fences,
            promotions,
            failovers,
            rejoins,
            report_failures,
            report_rtt,
        }
    }

    /// Sets the gauges from this member's view and renders every series as Prometheus text.
    pub fn render(&self, view: &View<'_>) -> String {
        let g = &self.gauges;
        let current = role_name(view.health.pg);
        for role in ROLES {
            g.role
                .get_or_create(&RoleLabel {
                    role: role.to_string(),
                })
                .set(i64::from(role == current));
        }
        let c = view.cluster;
        let assigned = c.primary.filter(|p| p.node == view.me);
        g.assigned_primary.set(i64::from(assigned.is_some()));
        g.epoch.set(clamp(c.primary.map_or(0, |p| p.epoch)));
        g.timeline.set(i64::from(view.health.timeline));
        g.lsn.set(clamp(view.health.lsn));
        let lag = c
            .primary_lsn
            .filter(|r| c.primary.is_some_and(|p| p.epoch == r.epoch))
            .map_or(0, |r| r.lsn.saturating_sub(view.health.lsn));
        g.lag_bytes.set(clamp(lag));
        let left = view
            .health
            .lease
            .filter(|(e, _)| assigned.is_some_and(|a| a.epoch == *e))
            .map_or(0, |(_, until)| until.saturating_sub(view.now));
        g.lease_remaining.set(left as f64 / 1000.0);
        g.paused.set(i64::from(c.paused));
        g.synchronous_degraded
            .set(i64::from(c.synchronous_degraded()));
        g.raft_term.set(clamp(view.raft.term));
        g.raft_leader.set(clamp(view.raft.leader.unwrap_or(0)));
        g.raft_is_leader
            .set(i64::from(view.raft.leader == Some(view.me)));
        g.raft_last_log_index.set(clamp(view.raft.last_log_index));
        g.raft_applied_index.set(clamp(view.raft.applied_index));
        g.free_bytes.set(clamp(view.health.free_bytes.unwrap_or(0)));
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
                out.clear();
            }
        }
        out
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What a scrape reads besides the counters.
pub struct View<'a> {
    /// This member.
    pub me: crate::types::NodeId,
    /// Its sidecar's last observation.
    pub health: &'a LocalHealth,
    /// The applied cluster state.
    pub cluster: &'a ClusterState,
    /// Its Raft status.
    pub raft: RaftView,
    /// Boot clock now.
    pub now: Millis,
}

/// The Raft figures of a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftView {
    /// Current term.
    pub term: u64,
    /// The leader this member knows.
    pub leader: Option<u64>,
    /// Last log index.
    pub last_log_index: u64,
    /// Last applied index.
    pub applied_index: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_state::PrimaryAssignment;

    #[test]
    fn renders_prometheus_text_with_every_series() {
        let m = Metrics::new();
        m.fences.inc();
        m.report_rtt.observe(0.003);
        let cluster = ClusterState {
            primary: Some(PrimaryAssignment { node: 1, epoch: 4 }),
            ..Default::default()
        };
        let health = LocalHealth {
            pg: Some(PgState::Primary),
            lease: Some((4, 12_500)),
            timeline: 3,
            lsn: 1234,
            at: 10_000,
            ..Default::default()
        };
        let text = m.render(&View {
            me: 1,
            health: &health,
            cluster: &cluster,
            raft: RaftView {
                term: 7,
                leader: Some(2),
                last_log_index: 40,
                applied_index: 39,
            },
            now: 10_000,
        });
        for line in [
            "pgquorum_postgres_role{role=\"primary\"} 1",
            "pgquorum_postgres_role{role=\"replica\"} 0",
            "pgquorum_assigned_primary 1",
            "pgquorum_epoch 4",
            "pgquorum_timeline 3",
            "pgquorum_lease_remaining_seconds 2.5",
            "pgquorum_raft_term 7",
            "pgquorum_raft_leader_id 2",
            "pgquorum_raft_is_leader 0",
            "pgquorum_raft_applied_index 39",
            "pgquorum_fences_total 1",
            "pgquorum_report_round_trip_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
