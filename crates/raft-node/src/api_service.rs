//! The public cluster API (v1). Writes and linearizable reads run on the Raft leader; a follower
//! forwards them once, and a request that cannot be forwarded fails with the leader's address in
//! the `pgquorum-leader` metadata so the client can go there itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::security::{valid_host, Access, Need, AUTHORIZATION};

use crate::cluster_state::{Command, CommandOutcome, MemberInfo, PlanKind, PrimaryPlan, Tags};
use crate::events::EventLog;
use crate::failover::leader::{FailoverLeader, MemberHealth};
use crate::failover::report::MemberReport;
use crate::failover::sidecar::{MemberAction, MemberRequest};
use crate::network::Dialer;
use crate::proto::cluster_client::ClusterClient;
use crate::proto::cluster_server::Cluster;
use crate::proto::internal_client::InternalClient;
use crate::proto::internal_server::Internal;
use crate::proto::{self, NodeStatus};
use crate::store::state_machine::AppliedState;
use crate::types::{NodeId, Raft};

/// Metadata key carrying the leader's address when a request must be sent there.
pub const LEADER_METADATA: &str = "pgquorum-leader";
/// Metadata key marking a request a follower already forwarded, so it is never forwarded twice.
const FORWARDED_METADATA: &str = "pgquorum-forwarded";

/// How long the leader waits for each member's status when building a topology.
const STATUS_TIMEOUT: Duration = Duration::from_millis(400);
/// How long a new member may take to catch up as a learner before it is made a voter.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster API of one sidecar.
#[derive(Clone)]
pub struct ClusterService {
    /// Where operator requests for this member's Postgres go (none without a Postgres).
    requests: Option<tokio::sync::mpsc::Sender<MemberRequest>>,
    node_id: NodeId,
    cluster_name: String,
    raft: Raft,
    state: watch::Receiver<Arc<AppliedState>>,
    failover: Arc<FailoverLeader>,
    events: EventLog,
    dialer: Dialer,
    access: Access,
}

type TopologyStream = Pin<Box<dyn Stream<Item = Result<proto::Topology, Status>> + Send>>;

impl ClusterService {
    /// Serves the API of `raft`, reading committed state from `state`.
    pub fn new(
        node_id: NodeId,
        cluster_name: String,
        raft: Raft,
        state: watch::Receiver<Arc<AppliedState>>,
        failover: Arc<FailoverLeader>,
        events: EventLog,
        dialer: Dialer,
    ) -> Self {
        Self {
            requests: None,
            node_id,
            cluster_name,
            raft,
            state,
            failover,
            events,
            dialer,
            access: Access::default(),
        }
    }

    /// Check every call against `access` (who the caller is, what it may do).
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Lets `req` through if its caller may do `need` (see [`Access::require`]).
    #[allow(clippy::result_large_err)]
    fn allow<T>(&self, req: &Request<T>, need: Need, what: &str) -> Result<(), Status> {
        let members = self.state.borrow().member_ids();
        self.access.require(req, need, what, &members)
    }

    /// Send operator requests for this member's Postgres to `tx` (the sidecar loop).
    pub fn with_requests(mut self, tx: tokio::sync::mpsc::Sender<MemberRequest>) -> Self {
        self.requests = Some(tx);
        self
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        self.dialer
            .kept(addr)
            .map_err(|e| Status::internal(format!("bad peer address {addr}: {e}")))
    }

    /// `None` when this node leads; otherwise a client for the leader, or the error to return.
    fn leader_client<T>(&self, req: &Request<T>) -> Result<Option<ClusterClient<Channel>>, Status> {
        Ok(self.leader_channel(req)?.map(ClusterClient::new))
    }

    /// `None` when this node leads; otherwise a channel to the leader, or the error to return.
    fn leader_channel<T>(&self, req: &Request<T>) -> Result<Option<Channel>, Status> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader == Some(self.node_id) && metrics.state == ServerState::Leader {
            return Ok(None);
        }
        let leader = metrics.current_leader.and_then(|id| {
            metrics
                .membership_config
                .membership()
                .get_node(&id)
                .map(|n| (id, n.addr.clone()))
        });
        match leader {
            Some((_, addr)) if req.metadata().get(FORWARDED_METADATA).is_none() => {
                Ok(Some(self.channel(&addr)?))
            }
            Some((id, addr)) => Err(not_leader(self.node_id, Some((id, addr)))),
            None => Err(not_leader(self.node_id, None)),
        }
    }

    fn status_from_metrics(&self, m: &RaftMetrics<NodeId, BasicNode>) -> NodeStatus {
        NodeStatus {
            id: self.node_id,
            raft_role: raft_role(m.state).into(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            leader_id: m.current_leader.unwrap_or(0),
            cluster_name: self.cluster_name.clone(),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        }
    }

    /// Asks every other member for its status, concurrently and with a short deadline.
    async fn collect_statuses(&self, state: &AppliedState) -> HashMap<NodeId, NodeStatus> {
        let mut out = HashMap::new();
        let metrics = self.raft.metrics().borrow().clone();
        out.insert(self.node_id, self.status_from_metrics(&metrics));
        let mut tasks = Vec::new();
        for (id, node) in state.membership.membership().nodes() {
            if *id == self.node_id {
                continue;
            }
            let Ok(channel) = self.channel(&node.addr) else {
                continue;
            };
            let id = *id;
            tasks.push(tokio::spawn(async move {
                let mut client = ClusterClient::new(channel);
                let r = tokio::time::timeout(
                    STATUS_TIMEOUT,
                    client.get_node_status(proto::GetNodeStatusRequest {}),
                )
                .await;
                match r {
                    Ok(Ok(resp)) => Some((id, resp.into_inner())),
                    _ => None,
                }
            }));
        }
        for t in tasks {
            if let Ok(Some((id, s))) = t.await {
                out.insert(id, s);
            }
        }
        out
    }

    fn topology(
        &self,
        state: &AppliedState,
        statuses: Option<&HashMap<NodeId, NodeStatus>>,
    ) -> proto::Topology {
        let metrics = self.raft.metrics().borrow().clone();
        let mut topo = build_topology(&self.cluster_name, state, &metrics, statuses);
        let (health, verdict) = self.failover.health();
        add_health(&mut topo, &health);
        topo.failover_status = verdict;
        topo
    }

    async fn write(&self, cmd: Command) -> Result<u64, Status> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => match resp.data {
                CommandOutcome::Applied => Ok(resp.log_id.index),
                CommandOutcome::Rejected { reason } => Err(Status::invalid_argument(reason)),
            },
            Err(e) => Err(write_error(self.node_id, e)),
        }
    }

    /// Checks a plan against the leader's reports and commits it.
    async fn plan(
        &self,
        kind: PlanKind,
        to: Option<NodeId>,
        not_before_unix_ms: u64,
    ) -> Result<Response<proto::PlanReply>, Status> {
        let cmd = self
            .failover
            .check_plan(kind, to, not_before_unix_ms)
            .map_err(Status::failed_precondition)?;
        let log_index = self.write(cmd).await?;
        let plan = self.state.borrow().cluster.plan.as_ref().map(plan_to_proto);
        tracing::info!(?kind, ?plan, log_index, "plan committed");
        Ok(Response::new(proto::PlanReply { plan, log_index }))
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, BasicNode>,
    ) -> Result<proto::MembershipReply, Status> {
        let resp = self
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| write_error(self.node_id, e))?;
        let (voters, learners) = match &resp.membership {
            Some(m) => (m.voter_ids().collect(), m.learner_ids().collect()),
            None => (Vec::new(), Vec::new()),
        };
        Ok(proto::MembershipReply {
            voters,
            learners,
            log_index: resp.log_id.index,
        })
    }
}

fn raft_role(s: ServerState) -> proto::RaftRole {
    match s {
        ServerState::Leader => proto::RaftRole::Leader,
        ServerState::Follower => proto::RaftRole::Follower,
        ServerState::Candidate => proto::RaftRole::Candidate,
        ServerState::Learner => proto::RaftRole::Learner,
        ServerState::Shutdown => proto::RaftRole::Shutdown,
    }
}

fn not_leader(me: NodeId, leader: Option<(NodeId, String)>) -> Status {
    match leader {
        Some((id, addr)) => {
            let mut s = Status::failed_precondition(format!(
                "node {me} is not the Raft leader; send the request to the leader, node {id} at {addr}"
            ));
            if let Ok(v) = MetadataValue::try_from(addr.as_str()) {
                s.metadata_mut().insert(LEADER_METADATA, v);
            }
            s
        }
        None => Status::unavailable(format!(
            "node {me} knows no Raft leader (an election is under way or a quorum is missing); \
             retry in a moment"
        )),
    }
}

fn write_error(me: NodeId, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            not_leader(me, f.leader_id.zip(f.leader_node.map(|n| n.addr)))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(format!("membership change refused: {c}"))
        }
        RaftError::Fatal(f) => Status::unavailable(format!("this node's Raft stopped: {f}")),
    }
}

/// Builds the public topology from committed state and live Raft metrics; `statuses` holds the
/// members' own Raft status when known (a member missing from it did not answer).
pub fn build_topology(
    cluster_name: &str,
    state: &AppliedState,
    metrics: &RaftMetrics<NodeId, BasicNode>,
    statuses: Option<&HashMap<NodeId, NodeStatus>>,
) -> proto::Topology {
    let membership = state.membership.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| {
            let info = state.cluster.members.get(id);
            let status = statuses.and_then(|s| s.get(id));
            let raft_role = match (statuses, status) {
                (_, Some(s)) => s.raft_role,
                (Some(_), None) => proto::RaftRole::Unreachable.into(),
                (None, None) => proto::RaftRole::Unspecified.into(),
            };
            proto::Member {
                id: *id,
                name: info.map(|i| i.name.clone()).unwrap_or_default(),
                raft_addr: node.addr.clone(),
                http_addr: info.map(|i| i.http_addr.clone()).unwrap_or_default(),
                pg_host: info.map(|i| i.pg_host.clone()).unwrap_or_default(),
                pg_port: info.map(|i| u32::from(i.pg_port)).unwrap_or(0),
                tags: info.map(|i| tags_to_proto(&i.tags)),
                membership: if voters.contains(id) {
                    proto::Membership::Voter
                } else {
                    proto::Membership::Learner
                }
                .into(),
                raft_role,
                term: status.map(|s| s.term).unwrap_or(0),
                last_applied: status.map(|s| s.last_applied).unwrap_or(0),
                registered: info.is_some(),
                ..Default::default()
            }
        })
        .collect();
    proto::Topology {
        cluster_name: cluster_name.to_string(),
        leader_id: metrics.current_leader.unwrap_or(0),
        term: metrics.current_term,
        last_applied: state.last_applied.map(|l| l.index).unwrap_or(0),
        members,
        primary: state.cluster.primary.map(|p| proto::PrimaryAssignment {
            node_id: p.node,
            epoch: p.epoch,
        }),
        paused: state.cluster.paused,
        history: state
            .cluster
            .history
            .iter()
            .map(|h| proto::RoleChange {
                epoch: h.epoch,
                from_node: h.from.unwrap_or(0),
                to_node: h.to,
                reason: h.reason.clone(),
                at_unix_ms: h.at_unix_ms,
                lsn: h.lsn.unwrap_or(0),
            })
            .collect(),
        failover_status: String::new(),
        plan: state.cluster.plan.as_ref().map(plan_to_proto),
        system_identifier: state.cluster.system_identifier.unwrap_or(0),
        last_plan: state
            .cluster
            .last_plan
            .as_ref()
            .map(|o| proto::PlanOutcome {
                plan: Some(plan_to_proto(&o.plan)),
                done: o.done,
                outcome: o.outcome.clone(),
            }),
        sync: Some(proto::SyncStandbys {
            mode: state.cluster.config.synchronous_mode.to_string(),
            members: state
                .cluster
                .sync
                .committed
                .members
                .iter()
                .copied()
                .collect(),
            k: state.cluster.sync.committed.k,
            target: state
                .cluster
                .sync
                .target
                .as_ref()
                .map(|t| t.members.iter().copied().collect())
                .unwrap_or_default(),
            target_k: state.cluster.sync.target.as_ref().map_or(0, |t| t.k),
        }),
    }
}

/// Adds what the leader's reports say about each member's Postgres.
fn add_health(
    topo: &mut proto::Topology,
    health: &std::collections::BTreeMap<NodeId, MemberHealth>,
) {
    let best = health
        .values()
        .filter(|h| h.fresh)
        .map(|h| h.lsn)
        .max()
        .unwrap_or(0);
    for m in &mut topo.members {
        let Some(h) = health.get(&m.id).filter(|h| h.fresh) else {
            m.pg_role = proto::PgRole::Unspecified.into();
            continue;
        };
        m.pg_role = crate::wire::pg_role(h.pg).into();
        m.timeline = h.timeline;
        m.lsn = h.lsn;
        m.lag_bytes = best.saturating_sub(h.lsn);
        m.free_bytes = h.storage.free_bytes.unwrap_or(0);
        m.low_space = h.storage.low_space;
        m.cannot_write = h.storage.cannot_write.clone().unwrap_or_default();
        m.read_only_storage = h.storage.read_only;
        m.write_probe_ms = h.storage.write_probe_ms.unwrap_or(0);
        m.pending_restart = h.pending_restart.clone();
        m.unguarded = h.unguarded;
    }
}

fn plan_to_proto(p: &PrimaryPlan) -> proto::Plan {
    proto::Plan {
        id: p.id,
        kind: match p.kind {
            PlanKind::Switchover => proto::PlanKind::Switchover,
            PlanKind::Failover => proto::PlanKind::Failover,
        }
        .into(),
        epoch: p.epoch,
        from_node: p.from,
        to_node: p.to,
        not_before_unix_ms: p.not_before_unix_ms,
        requested_at_unix_ms: p.requested_at_unix_ms,
        started: p.started,
    }
}

fn tags_to_proto(t: &Tags) -> proto::Tags {
    proto::Tags {
        nofailover: t.nofailover,
        priority: t.priority,
        nosync: t.nosync,
    }
}

/// The request to send the leader: marked as forwarded, with the caller's bearer token (the
/// leader checks it again; a member's own certificate also passes there).
fn forwarded<T>(req: Request<T>) -> Request<T> {
    let token = req.metadata().get(AUTHORIZATION).cloned();
    let mut out = Request::new(req.into_inner());
    out.metadata_mut()
        .insert(FORWARDED_METADATA, MetadataValue::from_static("1"));
    if let Some(t) = token {
        out.metadata_mut().insert(AUTHORIZATION, t);
    }
    out
}

/// The longest member name a registration may carry.
const MAX_NAME: usize = 63;
use crate::node_config::{MAX_ELECTION_MS, MAX_HEARTBEAT_MS};

/// Refuses a registration whose fields could not be written safely into other members' files.
#[allow(clippy::result_large_err)]
fn check_registration(r: &proto::RegisterMemberRequest) -> Result<(), Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if r.id == 0 {
        return bad("member id must be a positive integer".into());
    }
    if r.name.is_empty()
        || r.name.len() > MAX_NAME
        || !r
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return bad(format!(
            "member name must be 1 to {MAX_NAME} letters, digits, '-', '_' or '.'"
        ));
    }
    if r.raft_heartbeat_ms > MAX_HEARTBEAT_MS || r.raft_election_max_ms > MAX_ELECTION_MS {
        return bad(format!(
            "Raft timings heartbeat {} ms / election {} ms are beyond {MAX_HEARTBEAT_MS} / \
             {MAX_ELECTION_MS} ms",
            r.raft_heartbeat_ms, r.raft_election_max_ms
        ));
    }
    if !valid_host(&r.pg_host) {
        return bad(format!(
            "pg_host '{}' is not an IP address or a host name",
            r.pg_host.escape_debug()
        ));
    }
    if !r.http_addr.is_empty() {
        let ok = r.http_addr.rsplit_once(':').is_some_and(|(h, p)| {
            valid_host(h.trim_matches(['[', ']'])) && p.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return bad(format!(
                "http_addr '{}' is not host:port",
                r.http_addr.escape_debug()
            ));
        }
    }
    Ok(())
}

fn config_reply(state: &AppliedState, log_index: u64) -> proto::ClusterConfig {
    let mut values = state.cluster.config.to_map();
    values.extend(state.cluster.pg.to_map());
    proto::ClusterConfig {
        values: values.into_iter().collect(),
        log_index,
        paused: state.cluster.paused,
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn get_topology(
        &self,
        req: Request<proto::GetTopologyRequest>,
    ) -> Result<Response<proto::Topology>, Status> {
        self.allow(&req, Need::Read, "reading the topology")?;
        if req.get_ref().local {
            let state = self.state.borrow().clone();
            let metrics = self.raft.metrics().borrow().clone();
            let own = self.status_from_metrics(&metrics);
            let mut topo = self.topology(&state, None);
            // Only this member's own Raft status is known without asking the others.
            for m in topo.members.iter_mut().filter(|m| m.id == self.node_id) {
                m.raft_role = own.raft_role;
                m.term = own.term;
                m.last_applied = own.last_applied;
            }
            return Ok(Response::new(topo));
        }
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.get_topology(forwarded(req)).await;
        }
        self.raft.ensure_linearizable().await.map_err(|e| match e {
            RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => {
                not_leader(self.node_id, f.leader_id.zip(f.leader_node.map(|n| n.addr)))
            }
            other => Status::unavailable(format!("cannot confirm leadership: {other}")),
        })?;
        let state = self.state.borrow().clone();
        let statuses = self.collect_statuses(&state).await;
        Ok(Response::new(self.topology(&state, Some(&statuses))))
    }

    type WatchTopologyStream = TopologyStream;

    async fn watch_topology(
        &self,
        req: Request<proto::WatchTopologyRequest>,
    ) -> Result<Response<Self::WatchTopologyStream>, Status> {
        self.allow(&req, Need::Read, "watching the topology")?;
        // Applied state is committed state, so any member can serve the watch locally.
        let this = self.clone();
        let stream =
            WatchStream::new(self.state.clone()).map(move |state| Ok(this.topology(&state, None)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn add_member(
        &self,
        req: Request<proto::AddMemberRequest>,
    ) -> Result<Response<proto::MembershipReply>, Status> {
        self.allow(&req, Need::Operate, "adding a member")?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.add_member(forwarded(req)).await;
        }
        let r = req.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument(
                "member id must be a positive integer",
            ));
        }
        match r.raft_addr.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "'{}' is not a host:port address of the new member's gRPC listener",
                    r.raft_addr
                )))
            }
        }
        let state = self.state.borrow().clone();
        let membership = state.membership.membership();
        if let Some(node) = membership.get_node(&r.id) {
            if membership.voter_ids().any(|v| v == r.id) {
                return Err(Status::already_exists(format!(
                    "node {} is already a voting member at {}; to move it, remove it first",
                    r.id, node.addr
                )));
            }
            if node.addr != r.raft_addr {
                return Err(Status::already_exists(format!(
                    "node {} is already a learner at {}; remove it before adding it at {}",
                    r.id, node.addr, r.raft_addr
                )));
            }
        }
        if let Some((id, _)) = membership
            .nodes()
            .find(|(id, n)| **id != r.id && n.addr == r.raft_addr)
        {
            return Err(Status::already_exists(format!(
                "address {} already belongs to node {id}",
                r.raft_addr
            )));
        }
        let learner = self
            .raft
            .add_learner(r.id, BasicNode::new(&r.raft_addr), true);
        let not_caught_up = || {
            Status::deadline_exceeded(format!(
                "node {} at {} did not catch up within {} s; is its sidecar running with an \
                 empty initial_members, and does its certificate come from this cluster's CA? \
                 It stays a learner: retry, or remove it",
                r.id,
                r.raft_addr,
                CATCH_UP_TIMEOUT.as_secs()
            ))
        };
        let added = match tokio::time::timeout(CATCH_UP_TIMEOUT, learner).await {
            Err(_) => return Err(not_caught_up()),
            Ok(Err(e)) => return Err(write_error(self.node_id, e)),
            Ok(Ok(added)) => added.log_id.index,
        };
        // openraft's blocking add_learner counts a learner within its lag threshold (thousands of
        // entries) as caught up, even one that was never reached. A voter must hold the log up
        // to its own admission: otherwise a member nobody can talk to (another CA, a wrong
        // address) would count towards every quorum.
        let id = r.id;
        self.raft
            .wait(Some(CATCH_UP_TIMEOUT))
            .metrics(
                move |m| {
                    m.replication
                        .as_ref()
                        .and_then(|rep| rep.get(&id))
                        .and_then(|matched| matched.as_ref())
                        .is_some_and(|l| l.index >= added)
                },
                "the new member holds the log up to its admission",
            )
            .await
            .map_err(|_| not_caught_up())?;
        let reply = self
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])))
            .await?;
        tracing::info!(node = r.id, addr = %r.raft_addr, "member added as voter");
        Ok(Response::new(reply))
    }

    async fn remove_member(
        &self,
        req: Request<proto::RemoveMemberRequest>,
    ) -> Result<Response<proto::MembershipReply>, Status> {
        self.allow(&req, Need::Operate, "removing a member")?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.remove_member(forwarded(req)).await;
        }
        let id = req.into_inner().id;
        let state = self.state.borrow().clone();
        let membership = state.membership.membership();
        if membership.get_node(&id).is_none() {
            return Err(Status::not_found(format!(
                "node {id} is not a member; `pgquorum list` shows the members"
            )));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the last voter; a cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let reply = self.change_membership(change).await?;
        tracing::info!(node = id, "member removed");
        Ok(Response::new(reply))
    }

    async fn get_config(
        &self,
        req: Request<proto::GetConfigRequest>,
    ) -> Result<Response<proto::ClusterConfig>, Status> {
        self.allow(&req, Need::Read, "reading the config")?;
        if req.get_ref().local {
            let state = self.state.borrow().clone();
            let index = state.last_applied.map(|l| l.index).unwrap_or(0);
            return Ok(Response::new(config_reply(&state, index)));
        }
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.get_config(forwarded(req)).await;
        }
        self.raft
            .ensure_linearizable()
            .await
            .map_err(|e| Status::unavailable(format!("cannot confirm leadership: {e}")))?;
        let state = self.state.borrow().clone();
        let index = state.last_applied.map(|l| l.index).unwrap_or(0);
        Ok(Response::new(config_reply(&state, index)))
    }

    async fn set_config(
        &self,
        req: Request<proto::SetConfigRequest>,
    ) -> Result<Response<proto::ClusterConfig>, Status> {
        self.allow(&req, Need::Operate, "changing the config")?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.set_config(forwarded(req)).await;
        }
        let changes: BTreeMap<String, String> = req.into_inner().changes.into_iter().collect();
        // Refuse early with the same rule the state machine applies, so a bad value never
        // reaches the log.
        self.state
            .borrow()
            .cluster
            .split_changes(&changes)
            .map_err(Status::invalid_argument)?;
        let index = self.write(Command::SetConfig { changes }).await?;
        let state = self.state.borrow().clone();
        Ok(Response::new(config_reply(&state, index)))
    }

    async fn set_paused(
        &self,
        req: Request<proto::SetPausedRequest>,
    ) -> Result<Response<proto::SetPausedReply>, Status> {
        self.allow(&req, Need::Operate, "pausing or resuming failover")?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.set_paused(forwarded(req)).await;
        }
        let paused = req.into_inner().paused;
        let log_index = self.write(Command::SetPaused { paused }).await?;
        tracing::info!(
            paused,
            log_index,
            "automatic failover {}",
            if paused { "paused" } else { "resumed" }
        );
        Ok(Response::new(proto::SetPausedReply { paused, log_index }))
    }

    async fn switchover(
        &self,
        req: Request<proto::SwitchoverRequest>,
    ) -> Result<Response<proto::PlanReply>, Status> {
        self.allow(&req, Need::Operate, "a switchover")?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.switchover(forwarded(req)).await;
        }
        let r = req.into_inner();
        let to = (r.to != 0).then_some(r.to);
        self.plan(PlanKind::Switchover, to, r.at_unix_ms).await
    }

    async fn failover(
        &self,
        req: Request<proto::FailoverRequest>,
    ) -> Result<Response<proto::PlanReply>, Status> {
        self.allow(&req, Need::Operate, "a manual failover")?;
        if let Some(mut leader) = self.leader_client(&req)? {
            return leader.failover(forwarded(req)).await;
        }
        let to = req.into_inner().to;
        if to == 0 {
            return Err(Status::invalid_argument(
                "a manual failover needs the member to promote (--to NODE)",
            ));
        }
        self.plan(PlanKind::Failover, Some(to), 0).await
    }

    async fn manage_member(
        &self,
        req: Request<proto::ManageMemberRequest>,
    ) -> Result<Response<proto::ManageMemberReply>, Status> {
        self.allow(
            &req,
            Need::Operate,
            "a member verb (restart, reload, reinit)",
        )?;
        let r = req.into_inner();
        let action = match r.action.as_str() {
            "restart" => MemberAction::Restart {
                only_if_pending: r.only_if_pending,
            },
            "reload" => MemberAction::Reload,
            "reinit" => MemberAction::Reinit,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown member action '{other}'; use restart, reload or reinit"
                )))
            }
        };
        let Some(tx) = &self.requests else {
            return Err(Status::failed_precondition(format!(
                "node {} manages no Postgres (no postgres.data_dir in its config)",
                self.node_id
            )));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(MemberRequest { action, reply })
            .await
            .map_err(|_| Status::unavailable("this member's sidecar loop has stopped"))?;
        match answer.await {
            Ok(Ok(outcome)) => Ok(Response::new(proto::ManageMemberReply { outcome })),
            Ok(Err(why)) => Err(Status::failed_precondition(why)),
            Err(_) => Err(Status::unavailable(
                "this member's sidecar loop stopped before it answered",
            )),
        }
    }

    async fn get_events(
        &self,
        req: Request<proto::GetEventsRequest>,
    ) -> Result<Response<proto::EventList>, Status> {
        self.allow(&req, Need::Read, "reading the events")?;
        Ok(Response::new(proto::EventList {
            events: self.events.snapshot(),
        }))
    }

    async fn get_node_status(
        &self,
        req: Request<proto::GetNodeStatusRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        self.allow(&req, Need::Read, "reading a member's status")?;
        let metrics = self.raft.metrics().borrow().clone();
        Ok(Response::new(self.status_from_metrics(&metrics)))
    }
}

#[tonic::async_trait]
impl Internal for ClusterService {
    async fn register_member(
        &self,
        req: Request<proto::RegisterMemberRequest>,
    ) -> Result<Response<proto::RegisterMemberReply>, Status> {
        // Only a member publishes its own details: they say where the others replicate from.
        self.access
            .require_node(&req, req.get_ref().id, "registering member details")?;
        check_registration(req.get_ref())?;
        if let Some(channel) = self.leader_channel(&req)? {
            return InternalClient::new(channel)
                .register_member(forwarded(req))
                .await;
        }
        let r = req.into_inner();
        let pg_port = u16::try_from(r.pg_port).map_err(|_| {
            Status::invalid_argument(format!("pg_port {} is not a port", r.pg_port))
        })?;
        let tags = r.tags.unwrap_or_default();
        let info = MemberInfo {
            id: r.id,
            name: r.name,
            http_addr: r.http_addr,
            pg_host: r.pg_host,
            pg_port,
            tags: Tags {
                nofailover: tags.nofailover,
                priority: tags.priority,
                nosync: tags.nosync,
            },
            raft_heartbeat_ms: r.raft_heartbeat_ms,
            raft_election_max_ms: r.raft_election_max_ms,
        };
        let log_index = self.write(Command::RegisterMember(info)).await?;
        Ok(Response::new(proto::RegisterMemberReply { log_index }))
    }

    async fn report(
        &self,
        req: Request<proto::ReportRequest>,
    ) -> Result<Response<proto::ReportReply>, Status> {
        let node = req.get_ref().report.as_ref().map(|r| r.node);
        let Some(node) = node else {
            return Err(Status::invalid_argument("malformed report: no report"));
        };
        // A report can end a lease early (a fenced primary) or name a promotion candidate: only
        // the member it describes may send it.
        self.access.require_node(&req, node, "a report")?;
        let report = req
            .into_inner()
            .report
            .ok_or_else(|| Status::invalid_argument("malformed report: no report"))?;
        let report = MemberReport::try_from(report)
            .map_err(|e| Status::invalid_argument(format!("malformed report: {e}")))?;
        // Never forwarded: a lease is only worth what its grantor's own clock and quorum say.
        let Some(answer) = self.failover.on_report(report) else {
            return Err(not_leader(self.node_id, None));
        };
        let grant = answer.grant;
        Ok(Response::new(proto::ReportReply {
            granted: grant.is_some(),
            epoch: grant.map_or(0, |g| g.epoch),
            lease_ms: grant.map_or(0, |g| g.lease_ms),
            leader_term: answer.stamp.term,
            leader_at_ms: answer.stamp.at,
            report_again: answer.report_again,
        }))
    }
}
