//! Failover decisions, kept pure so they can be unit tested and simulated with a fake clock:
//! lease arithmetic ([`lease`]), members' reports ([`report`]) and the leader's policy
//! ([`policy`]).

pub mod leader;
pub mod lease;
pub mod policy;
pub mod reconcile;
pub mod report;
pub mod sidecar;
