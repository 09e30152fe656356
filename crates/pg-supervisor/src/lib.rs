//! pg-supervisor: everything in pgquorum that touches PostgreSQL, and
//! nothing of Raft.
//!
//! * [`PgBinaries`] finds the executables; [`OsUser`] is who runs them
//!   (never root).
//! * [`Instance`] bootstraps (`init_primary`, `clone_from`), runs
//!   (`start`, `start_in_recovery`, `stop`, `restart`, `reload`, `fence`),
//!   changes roles (`promote`, `follow`, `rejoin_as_replica`), puts
//!   synchronous standbys in force (`apply_synchronous_standbys`) and
//!   observes ([`Observation`]) one member's PostgreSQL.
//! * The [`guard`] (safety rule S4) is a separate process that owns the
//!   postmaster and fences it when the sidecar stops renewing its [`Lease`].
//! * [`FailureCounter`] turns probe results into a health verdict without
//!   flapping.

#![warn(missing_docs)]

pub mod binaries;
pub mod conf_files;
pub mod config;
pub mod conninfo;
pub mod controldata;
pub mod data_dir;
pub mod error;
pub mod failure_counter;
pub mod fence;
pub mod guard;
pub mod instance;
pub mod lease;
pub mod observation;
pub mod os_process;
pub mod os_user;
pub mod pg_command;
pub mod pid_file;
pub mod probe;
pub mod session;
pub mod storage;

pub use binaries::PgBinaries;
pub use conf_files::SyncSpec;
pub use config::{Credentials, GuardCommand, InstanceConfig, Timeouts, Upstream};
pub use controldata::ControlData;
pub use error::{Result, SupervisorError};
pub use failure_counter::{FailureCounter, Health};
pub use fence::FenceReport;
pub use guard::{effective_deadline, run_guard, Guard, GuardArgs};
pub use instance::{
    AppliedSync, FollowReport, HandOverReport, Instance, PromoteReport, RejoinMethod, RejoinReport,
    StopMode, TakenUnderGuard,
};
pub use lease::Lease;
pub use observation::{Lsn, Observation, PostmasterState, Role, StandbyReplication, WalReceiver};
pub use os_user::OsUser;
