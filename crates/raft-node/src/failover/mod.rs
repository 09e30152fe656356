//! Failover. Pure decisions, unit tested and simulated with a fake clock: lease arithmetic
//! ([`lease`]), members' reports ([`report`]), the leader's policy ([`policy`]) and the member's
//! transition table ([`reconcile`]). Their I/O edges: the leader's duty ([`leader`]) and the
//! member's loop ([`sidecar`]).

pub mod assess;
pub mod duty;
pub mod leader;
pub mod lease;
pub mod plan;
pub mod policy;
pub mod reconcile;
pub mod report;
pub mod sidecar;
pub mod sync;
