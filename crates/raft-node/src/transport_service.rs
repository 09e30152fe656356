//! The server half of the Raft transport: decodes openraft requests from gRPC and hands them to
//! the local Raft.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::proto::raft_transport_server::RaftTransport;
use crate::proto::RaftMessage;
use crate::types::Raft;

/// gRPC service that feeds peers' Raft messages into the local node.
pub struct RaftTransportService {
    raft: Raft,
}

impl RaftTransportService {
    /// Serves `raft`.
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }
}

fn decode<T: DeserializeOwned>(req: Request<RaftMessage>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().payload)
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
        let rpc = decode(req)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(req)?;
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
        let ask: Ask = decode(req)?;
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
        let rpc = decode(req)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
