//! pgquorum's Raft group: the openraft type configuration, sled storage, the gRPC transport and
//! cluster API, the replicated cluster state machine and the sidecar's Raft runtime.

#![warn(missing_docs)]

pub mod api_service;
pub mod callbacks;
pub mod client;
pub mod cluster_state;
pub mod dynamic_config;
pub mod events;
pub mod failover;
pub mod http;
pub mod metrics;
pub mod network;
pub mod node;
pub mod node_config;
pub mod pg_settings;
pub mod security;
pub mod store;
pub mod transport_service;
pub mod types;
pub mod wire;

/// Generated gRPC code for `proto/pgquorum.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("pgquorum.v1");
}
