//! The sidecar's own fence timer, beside the guard: armed with every deadline fed to the guard,
//! it fences the postmaster from a thread of its own when that deadline passes unrenewed.
//!
//! The guard is the fence S4 relies on, but a guard can stall (frozen, or blocked on I/O) while
//! its sidecar runs on. The sidecar's reconcile table would then fence only at its next tick,
//! after a probe and a report that may each take a fraction of the lease, while the leader
//! promotes another member `drift_margin_ms` after the lease's end. This timer needs no tick,
//! no tokio worker and no I/O but signals and `/proc`, so it fires on time whatever the rest of
//! the sidecar is waiting on.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::fence::fence_postmaster;
use crate::lease::{clock_now_ns, Lease};
use crate::os_process::{is_same_alive, proc_stat};

/// A wait is cut into pieces at most this long, so a suspended host (whose monotonic clock
/// stops while the lease clock runs on) is noticed soon after it resumes.
const LONGEST_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct State {
    /// Boot-clock nanoseconds after which the postmaster must not run; `None`: no deadline.
    deadline: Option<u64>,
    stop: bool,
}

/// The timer of one guarded postmaster; it stops (without fencing) when dropped.
#[derive(Debug)]
pub(crate) struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Watchdog {
    /// Starts the timer for `postmaster` under `lease`; at the deadline it stops the postmaster
    /// as the guard would (immediate shutdown, SIGKILL after `grace`). Only that very process
    /// (by pid and start time): the guard finds whatever else is left in the data directory.
    pub(crate) fn start(postmaster: i32, grace: Duration, lease: Lease) -> Self {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let dog = Watchdog {
            shared: shared.clone(),
        };
        dog.arm(lease);
        let spawned = std::thread::Builder::new()
            .name("pgq-fence-timer".into())
            .spawn(move || run(&shared, postmaster, grace));
        if let Err(e) = spawned {
            // The guard still fences; this timer is the second line.
            tracing::warn!(error = %e, "cannot start the fence timer; the guard alone fences");
        }
        dog
    }

    /// Sets the deadline to `lease`'s (the one just fed to the guard).
    pub(crate) fn arm(&self, lease: Lease) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut s) = lock.lock() {
            s.deadline = match lease {
                Lease::Until(ns) => Some(ns),
                Lease::NotRequired => None,
            };
            cv.notify_all();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut s) = lock.lock() {
            s.stop = true;
            cv.notify_all();
        }
    }
}

fn run(shared: &(Mutex<State>, Condvar), postmaster: i32, grace: Duration) {
    let Some(started) = proc_stat(postmaster).map(|p| p.start_ticks) else {
        return;
    };
    let (lock, cv) = shared;
    let Ok(mut s) = lock.lock() else { return };
    loop {
        if s.stop {
            return;
        }
        let wait = match s.deadline {
            None => LONGEST_WAIT,
            Some(d) => {
                let now = clock_now_ns();
                if now >= d {
                    break;
                }
                Duration::from_nanos(d - now).min(LONGEST_WAIT)
            }
        };
        s = match cv.wait_timeout(s, wait) {
            Ok((s, _)) => s,
            Err(_) => return,
        };
    }
    drop(s);
    if !is_same_alive(postmaster, started) {
        // The guard fenced it on time, or it exited.
        return;
    }
    // Fence first; say so afterwards (a log write may block).
    let report = fence_postmaster(postmaster, grace);
    tracing::warn!(
        postmaster,
        elapsed_ms = report.elapsed_ms,
        verified_gone = report.verified_gone,
        "the lease ended unrenewed and the guard had not fenced: the sidecar's fence timer fenced PostgreSQL"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap()
    }

    #[test]
    fn fires_at_the_deadline_and_not_before_and_a_renewal_moves_it() {
        let mut child = sleeper();
        let pid = child.id() as i32;
        let soon = || Lease::Until(clock_now_ns() + 300_000_000);
        let dog = Watchdog::start(pid, Duration::from_millis(100), soon());
        std::thread::sleep(Duration::from_millis(200));
        dog.arm(soon());
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            child.try_wait().unwrap().is_none(),
            "fenced before the renewed deadline"
        );
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(started.elapsed() < Duration::from_secs(3), "never fenced");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success());
        drop(dog);
    }

    #[test]
    fn no_deadline_or_a_stopped_timer_fences_nothing() {
        let mut child = sleeper();
        let pid = child.id() as i32;
        let dog = Watchdog::start(pid, Duration::from_millis(100), Lease::NotRequired);
        std::thread::sleep(Duration::from_millis(100));
        dog.arm(Lease::Until(clock_now_ns() + 200_000_000));
        drop(dog);
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            child.try_wait().unwrap().is_none(),
            "a dropped timer fenced"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
