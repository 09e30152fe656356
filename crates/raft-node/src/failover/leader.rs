//! The Raft leader's failover duty, at the I/O edge of the pure policy: it keeps the members'
//! reports (soft state, reset when leadership changes), answers reports with lease renewals,
//! confirms its quorum every heartbeat, and commits the policy's promotions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::ServerState;
use tokio::sync::watch;

use super::lease::Millis;
use super::policy::{decide, may_grant_lease, GrantRecord, PolicyInput, Verdict};
use super::report::{MemberReport, PgState, Received, ReportBook};
use crate::cluster_state::{Command, CommandOutcome};
use crate::events::EventLog;
use crate::store::state_machine::AppliedState;
use crate::types::{NodeId, Raft};

/// A renewal granted to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Epoch of the lease.
    pub epoch: u64,
    /// Length, counted by the holder from when it sent the report.
    pub lease_ms: u64,
}

/// What the leader currently knows of one member, for the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHealth {
    /// Postgres as last reported.
    pub pg: PgState,
    /// Timeline.
    pub timeline: u32,
    /// WAL position.
    pub lsn: u64,
    /// Whether the report is recent (within one lease).
    pub fresh: bool,
}

#[derive(Default)]
struct Book {
    term: u64,
    since: Millis,
    reports: ReportBook,
    last_grant: Option<GrantRecord>,
    quorum_confirmed_at: Option<Millis>,
    verdict: String,
}

/// The leader-side failover state of one sidecar (inactive while it is not the leader).
pub struct FailoverLeader {
    node_id: NodeId,
    raft: Raft,
    state: watch::Receiver<Arc<AppliedState>>,
    base: Instant,
    quorum_ack_max_ms: u64,
    raft_leader_lease_ms: u64,
    book: Mutex<Book>,
    events: EventLog,
}

impl FailoverLeader {
    /// The duty of node `node_id`; leases are granted only while the last quorum confirmation
    /// is at most `quorum_ack_max_ms` old; followers refuse votes for `raft_leader_lease_ms`
    /// after hearing from their leader.
    pub fn new(
        node_id: NodeId,
        raft: Raft,
        state: watch::Receiver<Arc<AppliedState>>,
        quorum_ack_max_ms: u64,
        raft_leader_lease_ms: u64,
        events: EventLog,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            raft,
            state,
            base: Instant::now(),
            quorum_ack_max_ms,
            raft_leader_lease_ms,
            book: Mutex::new(Book::default()),
            events,
        })
    }

    fn now(&self) -> Millis {
        self.base.elapsed().as_millis() as Millis
    }

    /// This node's term if it leads now.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.state == ServerState::Leader && m.current_leader == Some(self.node_id))
            .then_some(m.current_term)
    }

    /// Runs `f` on the book of the current term, resetting it when the term changed: reports
    /// and grants of an earlier leadership say nothing about this one.
    fn with_book<T>(&self, term: u64, f: impl FnOnce(&mut Book) -> T) -> Option<T> {
        let mut book = self.book.lock().ok()?;
        if book.term != term {
            *book = Book {
                term,
                since: self.now(),
                ..Book::default()
            };
            tracing::info!(term, "took office as Raft leader: failover duty starts");
        }
        Some(f(&mut book))
    }

    fn policy_input<'a>(
        &self,
        book: &'a Book,
        now: Millis,
        state: &'a AppliedState,
        members: &'a std::collections::BTreeSet<NodeId>,
    ) -> PolicyInput<'a> {
        PolicyInput {
            now,
            leader_since: book.since,
            quorum_ack_max_ms: self.quorum_ack_max_ms,
            raft_leader_lease_ms: self.raft_leader_lease_ms,
            cluster: &state.cluster,
            members,
            reports: &book.reports,
            last_grant: book.last_grant,
        }
    }

    /// Handles a member's report; `None` when this node does not lead.
    pub fn on_report(&self, report: MemberReport) -> Option<Option<Grant>> {
        let term = self.leading_term()?;
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        self.with_book(term, |book| {
            book.reports.insert(
                report.node,
                Received {
                    at: now,
                    report: report.clone(),
                },
            );
            let ack_age = book.quorum_confirmed_at.map(|t| now.saturating_sub(t));
            let input = self.policy_input(book, now, &state, &members);
            let epoch = may_grant_lease(&input, &report, ack_age)?;
            book.last_grant = Some(GrantRecord {
                node: report.node,
                epoch,
                received_at: now,
                report_sent_at: report.sent_at,
            });
            Some(Grant {
                epoch,
                lease_ms: state.cluster.config.lease_ms,
            })
        })
    }

    /// The members as the leader's reports show them, and the latest non-steady verdict.
    pub fn health(&self) -> (BTreeMap<NodeId, MemberHealth>, String) {
        let now = self.now();
        let lease = self.state.borrow().cluster.config.lease_ms;
        let Ok(book) = self.book.lock() else {
            return (BTreeMap::new(), String::new());
        };
        if self.leading_term() != Some(book.term) {
            return (BTreeMap::new(), String::new());
        }
        let map = book
            .reports
            .iter()
            .map(|(id, r)| {
                (
                    *id,
                    MemberHealth {
                        pg: r.report.pg,
                        timeline: r.report.timeline,
                        lsn: r.report.lsn,
                        fresh: now.saturating_sub(r.at) <= lease,
                    },
                )
            })
            .collect();
        (map, book.verdict.clone())
    }

    /// Every tick while leading: run the policy and commit its promotion. A second task
    /// confirms the quorum every `confirm_every` (which bounds lease grants), so a slow commit
    /// never starves the renewals of a healthy primary.
    pub async fn run(self: Arc<Self>, confirm_every: Duration, stop: watch::Receiver<bool>) {
        tokio::spawn(self.clone().confirm_quorum(confirm_every, stop.clone()));
        let mut stop = stop;
        loop {
            let tick = Duration::from_millis(self.state.borrow().cluster.config.tick_ms);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let Some(term) = self.leading_term() else {
                continue;
            };
            let verdict = self.decide(term);
            if let Some(Verdict::Promote {
                node,
                epoch,
                reason,
                lsn,
            }) = verdict
            {
                self.promote(node, epoch, reason, lsn).await;
            }
        }
    }

    async fn confirm_quorum(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(every) => {}
            }
            let Some(term) = self.leading_term() else {
                continue;
            };
            // Only a committed primary needs leases; a Raft-only group skips the heartbeats.
            if self.state.borrow().cluster.primary.is_none() {
                continue;
            }
            let asked = self.now();
            let limit = Duration::from_millis(self.quorum_ack_max_ms);
            let confirm = tokio::time::timeout(limit, self.raft.get_read_log_id()).await;
            if matches!(confirm, Ok(Ok(_))) {
                // Counted from before the heartbeats left: never younger than the real contact.
                self.with_book(term, |b| b.quorum_confirmed_at = Some(asked));
            }
        }
    }

    fn decide(&self, term: u64) -> Option<Verdict> {
        let now = self.now();
        let state = self.state.borrow().clone();
        let members = state.member_ids();
        self.with_book(term, |book| {
            let verdict = decide(&self.policy_input(book, now, &state, &members));
            let text = match &verdict {
                Verdict::Steady => String::new(),
                Verdict::Promote { reason, node, .. } => format!("promoting {node}: {reason}"),
                Verdict::Wait { reason } | Verdict::NoCandidate { reason } => reason.clone(),
            };
            if text != book.verdict && !text.is_empty() {
                let epoch = state.cluster.primary.map(|p| p.epoch).unwrap_or(0);
                tracing::info!(epoch, "failover: {text}");
                // Countdowns change every tick; record the first of a kind, not every one.
                let kind_changed = book.verdict.split(';').next() != text.split(';').next();
                if kind_changed {
                    self.events.record("failover", text.clone(), epoch, 0);
                }
            }
            book.verdict = text;
            verdict
        })
    }

    async fn promote(&self, node: NodeId, epoch: u64, reason: String, lsn: u64) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cmd = Command::Promote {
            node,
            epoch,
            reason: reason.clone(),
            at_unix_ms,
            lsn: Some(lsn),
        };
        match self.raft.client_write(cmd).await {
            Ok(r) if r.data == CommandOutcome::Applied => {
                tracing::info!(node, epoch, lsn, %reason, "committed new primary");
                self.events.record(
                    "failover",
                    format!("committed member {node} as primary: {reason}"),
                    epoch,
                    lsn,
                );
            }
            Ok(r) => tracing::warn!(node, epoch, outcome = ?r.data, "promotion refused"),
            Err(e) => tracing::warn!(node, epoch, error = %e, "promotion not committed"),
        }
    }
}
