//! The server half of the Raft transport: decodes openraft requests from gRPC and hands them to
//! the local Raft.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::proto::raft_transport_server::RaftTransport;
use crate::proto::RaftMessage;
use crate::security::Access;
use crate::types::{NodeId, Raft, TypeConfig};

/// gRPC service that feeds peers' Raft messages into the local node.
pub struct RaftTransportService {
    raft: Raft,
    access: Access,
}

impl RaftTransportService {
    /// Serves `raft`, taking each message only from the member it says it comes from.
    pub fn new(raft: Raft, access: Access) -> Self {
        Self { raft, access }
    }

    /// Decodes a message and checks that the peer's certificate names the member that `from`
    /// reads out of it (the candidate of a vote, the leader of an append or a snapshot): a
    /// member cannot vote or lead under another member's id.
    #[allow(clippy::result_large_err)]
    fn accept<T: DeserializeOwned>(
        &self,
        req: Request<RaftMessage>,
        what: &str,
        from: impl Fn(&T) -> Option<NodeId>,
    ) -> Result<T, Status> {
        let rpc: T = decode(req.get_ref())?;
        let id = from(&rpc).ok_or_else(|| {
            Status::invalid_argument(format!("{what} that names no sending member"))
        })?;
        self.access.require_node(&req, id, what)?;
        Ok(rpc)
    }
}

#[allow(clippy::result_large_err)]
fn decode<T: DeserializeOwned>(req: &RaftMessage) -> Result<T, Status> {
    serde_json::from_slice(&req.payload)
        .map_err(|e| Status::invalid_argument(format!("malformed Raft message: {e}")))
}

fn encode<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = serde_json::to_vec(result)
        .map_err(|e| Status::internal(format!("cannot encode Raft reply: {e}")))?;
    Ok(Response::new(RaftMessage { payload }))
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = self.accept(
            req,
            "an AppendEntries",
            |r: &AppendEntriesRequest<TypeConfig>| r.vote.leader_id().voted_for(),
        )?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = self.accept(req, "a vote request", |r: &VoteRequest<NodeId>| {
            r.vote.leader_id().voted_for()
        })?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn take_leadership(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        #[derive(serde::Deserialize)]
        struct Ask {
            from: crate::types::NodeId,
            term: u64,
        }
        let ask: Ask = self.accept(req, "a leadership hand-over", |a: &Ask| Some(a.from))?;
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(ask.from) || m.current_term != ask.term {
            return Err(Status::failed_precondition(format!(
                "member {} is not the leader of term {} here (leader {:?}, term {})",
                ask.from, ask.term, m.current_leader, m.current_term
            )));
        }
        tracing::info!(
            from = ask.from,
            term = ask.term,
            "the leader runs the primary's node: standing for election"
        );
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::internal(format!("cannot start an election: {e}")))?;
        encode(&())
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = self.accept(
            req,
            "a snapshot",
            |r: &InstallSnapshotRequest<TypeConfig>| r.vote.leader_id().voted_for(),
        )?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
