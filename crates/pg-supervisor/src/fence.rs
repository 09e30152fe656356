//! Fencing: making sure a postmaster and all its backends are gone, fast.
//! Shared by `Instance::fence()` and the guard, so both behave the same.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::os_process::{children_of, is_alive, is_frozen, proc_stat, signal};

/// Upper bound for processes to vanish after SIGKILL; only uninterruptible
/// sleep (stuck I/O) can delay it.
const SIGKILL_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(2);

/// What a fence did and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReport {
    /// The postmaster fenced, if one was found.
    pub postmaster_pid: Option<i32>,
    /// False if nothing was running.
    pub was_running: bool,
    /// True if the immediate shutdown did not finish within the grace
    /// period (or the postmaster was frozen) and SIGKILL was used.
    pub escalated_to_sigkill: bool,
    /// True once the postmaster and the backends we saw are verified gone.
    pub verified_gone: bool,
    /// From the call to verified gone.
    pub elapsed_ms: u64,
}

/// Immediate shutdown (SIGQUIT), then SIGKILL of the postmaster and its
/// children after `grace`. Blocking; polls `/proc`.
pub fn fence_postmaster(pid: i32, grace: Duration) -> FenceReport {
    let started = Instant::now();
    if !is_alive(pid) {
        return FenceReport {
            postmaster_pid: Some(pid),
            was_running: false,
            escalated_to_sigkill: false,
            verified_gone: true,
            elapsed_ms: elapsed_ms(started),
        };
    }
    let mut backends = children_of(pid);
    let mut escalated = false;
    // A stopped postmaster would only act on SIGQUIT once resumed; killing it
    // outright is faster and never lets it run again.
    if is_frozen(pid) || !signal(pid, libc::SIGQUIT) || !wait_gone(pid, grace) {
        escalated = true;
        // Freeze it first so it cannot fork a backend we would miss.
        signal(pid, libc::SIGSTOP);
        backends.extend(children_of(pid));
        for (child, _) in &backends {
            signal(*child, libc::SIGKILL);
        }
        signal(pid, libc::SIGKILL);
        wait_gone(pid, SIGKILL_WAIT);
    }
    // Orphaned backends (postmaster gone first) still hold shared memory
    // and could finish a commit; kill what is left of them.
    let deadline = Instant::now() + SIGKILL_WAIT;
    loop {
        let left: Vec<i32> = backends
            .iter()
            .filter(|(p, ticks)| matches!(proc_stat(*p), Some(s) if s.start_ticks == *ticks && s.state != 'Z'))
            .map(|(p, _)| *p)
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            let verified_gone = left.is_empty() && !is_alive(pid);
            return FenceReport {
                postmaster_pid: Some(pid),
                was_running: true,
                escalated_to_sigkill: escalated,
                verified_gone,
                elapsed_ms: elapsed_ms(started),
            };
        }
        for p in left {
            signal(p, libc::SIGKILL);
        }
        std::thread::sleep(POLL);
    }
}

fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn fences_a_process_that_ignores_sigquit() {
        // `sh` ignoring SIGQUIT stands in for a hung postmaster.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' QUIT; sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while children_of(pid).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let sleeper = children_of(pid)[0].0;
        let report = fence_postmaster(pid, Duration::from_millis(100));
        child.wait().unwrap();
        assert!(report.escalated_to_sigkill);
        assert!(report.verified_gone, "{report:?}");
        assert!(!is_alive(sleeper));
        assert!(report.elapsed_ms < 2000, "{report:?}");
    }

    #[test]
    fn nothing_running_is_reported() {
        let report = fence_postmaster(i32::MAX - 1, Duration::from_millis(10));
        assert!(!report.was_running);
        assert!(report.verified_gone);
    }
}
