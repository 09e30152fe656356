//! The guard (safety rule S4): a small process, separate from the sidecar,
//! that owns the postmaster and fences it when the sidecar stops renewing
//! its lease.
//!
//! * The guard starts `postgres` itself, as its child, with
//!   `PR_SET_PDEATHSIG = SIGKILL` set after the switch to the unprivileged
//!   user: if the guard dies, the postmaster dies. When the postmaster
//!   exits, the guard exits. Neither can outlive the other.
//! * The sidecar writes leases ([`crate::Lease`]) to the guard's stdin.
//!   When a deadline passes (sidecar frozen, runtime stuck) or stdin reaches
//!   EOF (sidecar killed; the kernel closes the pipe), the guard fences:
//!   immediate shutdown, then SIGKILL of the postmaster and of every
//!   process left in its data directory ([`crate::fence::fence_data_dir`]).
//! * A replica runs with [`crate::Lease::NotRequired`]; EOF still fences.
//! * A sidecar that stops cleanly writes `detach <deadline>` before it closes the pipe. Then
//!   EOF does not fence: Postgres keeps running until the earlier of the lease's end and that
//!   deadline (the restart window), and a new sidecar may adopt the guard on its control socket
//!   (owner-only) and feed it from there. A sidecar killed or frozen never says `detach`, so
//!   the fence on a dead or frozen sidecar stays exactly as it was.

mod handle;
mod process;
mod watchdog;

pub use handle::Guard;
pub use process::{effective_deadline, run_guard, GuardArgs};

/// Exit code: the postmaster exited on its own.
pub const EXIT_POSTMASTER_EXITED: i32 = 0;
/// Exit code: bad arguments or the postmaster could not be started.
pub const EXIT_START_FAILED: i32 = 2;
/// Exit code: the lease expired and PostgreSQL was fenced.
pub const EXIT_FENCED_LEASE_EXPIRED: i32 = 3;
/// Exit code: the sidecar went away and PostgreSQL was fenced.
pub const EXIT_FENCED_SIDECAR_GONE: i32 = 4;
/// Exit code: the sidecar detached and no successor adopted PostgreSQL in time; fenced.
pub const EXIT_FENCED_NOT_ADOPTED: i32 = 5;
