//! Fencing: making sure a postmaster and every process of its data
//! directory are gone, fast. [`fence_data_dir`] is shared by
//! `Instance::fence()` and the guard, so both behave the same.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::os_process::{
    children_of, is_alive, is_frozen, is_same_alive, processes_in_dir, signal,
};

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
    /// True once the postmaster and the backends we saw are verified gone;
    /// for [`fence_data_dir`], once no process of the data directory is left.
    pub verified_gone: bool,
    /// From the call to verified gone.
    pub elapsed_ms: u64,
    /// Processes of the data directory still there after the postmaster
    /// step (orphaned backends), killed with SIGKILL.
    #[serde(default)]
    pub leftover_pids: Vec<i32>,
    /// Processes of the data directory still alive when the fence gave up
    /// (uninterruptible sleep); empty when `verified_gone`.
    #[serde(default)]
    pub survivor_pids: Vec<i32>,
}

/// Fences everything running on `data_dir`: the immediate-shutdown then
/// SIGKILL escalation of [`fence_postmaster`] on each live pid of
/// `postmasters`, then SIGKILL of every remaining process whose working
/// directory is the data directory, e.g. backends orphaned by a postmaster
/// that died first (they still map shared memory and could finish a
/// commit). `verified_gone` only once no such process remains, waiting at
/// most a bounded time for SIGKILLed processes to vanish. Blocking; polls
/// `/proc`.
pub fn fence_data_dir(data_dir: &Path, postmasters: &[i32], grace: Duration) -> FenceReport {
    let started = Instant::now();
    let mut report = FenceReport {
        postmaster_pid: None,
        was_running: false,
        escalated_to_sigkill: false,
        verified_gone: true,
        elapsed_ms: 0,
        leftover_pids: Vec::new(),
        survivor_pids: Vec::new(),
    };
    for &pid in postmasters {
        let r = fence_postmaster(pid, grace);
        if r.was_running {
            report.postmaster_pid = Some(pid);
            report.was_running = true;
        }
        report.escalated_to_sigkill |= r.escalated_to_sigkill;
    }
    let deadline = Instant::now() + SIGKILL_WAIT;
    // A killed process drops its cwd while exiting, before it is gone from
    // /proc; once seen, it is followed by pid and start time until it is.
    let mut seen: Vec<(i32, u64)> = Vec::new();
    loop {
        for p in processes_in_dir(data_dir) {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        let left: Vec<(i32, u64)> = seen
            .iter()
            .filter(|(pid, ticks)| is_same_alive(*pid, *ticks))
            .copied()
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            report.leftover_pids = seen.iter().map(|(p, _)| *p).collect();
            report.was_running |= !seen.is_empty();
            report.survivor_pids = left.iter().map(|(p, _)| *p).collect();
            report.verified_gone = left.is_empty() && postmasters.iter().all(|p| !is_alive(*p));
            report.elapsed_ms = elapsed_ms(started);
            return report;
        }
        for (pid, _) in left {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(POLL);
    }
}

/// Immediate shutdown (SIGQUIT), then SIGKILL of the postmaster and its
/// children after `grace`. Does nothing when `pid` is dead: use
/// [`fence_data_dir`], which also finds the orphans. Blocking; polls `/proc`.
pub fn fence_postmaster(pid: i32, grace: Duration) -> FenceReport {
    let started = Instant::now();
    if !is_alive(pid) {
        return FenceReport {
            postmaster_pid: Some(pid),
            was_running: false,
            escalated_to_sigkill: false,
            verified_gone: true,
            elapsed_ms: elapsed_ms(started),
            leftover_pids: Vec::new(),
            survivor_pids: Vec::new(),
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
            .filter(|(p, ticks)| is_same_alive(*p, *ticks))
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
                leftover_pids: Vec::new(),
                survivor_pids: left,
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
    fn fences_every_process_of_a_directory() {
        // Stands in for backends orphaned by a dead postmaster.
        let dir = tempfile::tempdir().unwrap();
        let mut orphans: Vec<_> = (0..2)
            .map(|_| {
                Command::new("sleep")
                    .arg("30")
                    .current_dir(dir.path())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let pids: Vec<i32> = orphans.iter().map(|c| c.id() as i32).collect();
        let report = fence_data_dir(dir.path(), &[i32::MAX - 1], Duration::from_millis(10));
        for c in &mut orphans {
            c.wait().unwrap();
        }
        assert!(report.was_running && report.verified_gone, "{report:?}");
        let mut killed = report.leftover_pids.clone();
        killed.sort();
        let mut expected = pids.clone();
        expected.sort();
        assert_eq!(killed, expected);
        assert!(report.survivor_pids.is_empty());
        assert!(pids.iter().all(|p| !is_alive(*p)));
    }

    #[test]
    fn nothing_running_is_reported() {
        let report = fence_postmaster(i32::MAX - 1, Duration::from_millis(10));
        assert!(!report.was_running);
        assert!(report.verified_gone);
        let dir = tempfile::tempdir().unwrap();
        let report = fence_data_dir(dir.path(), &[], Duration::from_millis(10));
        assert!(!report.was_running && report.verified_gone, "{report:?}");
    }
}
