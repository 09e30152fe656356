//! Facts about OS processes from `/proc` (Linux), and signals.

use std::path::Path;

/// One line of `/proc/<pid>/stat`, reduced to what we need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// State letter: R, S, D, T (stopped), Z (zombie), ...
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// Start time in clock ticks since boot; with the pid, identifies a process.
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`; the command name may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... starttime(22), 1-based in proc(5).
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        start_ticks,
    })
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat(&text)
}

/// True if `pid` exists and has not exited (zombies count as gone: they
/// hold no resources and cannot write).
pub fn is_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some(s) if s.state != 'Z' && s.state != 'X')
}

/// True if the process is stopped (SIGSTOP) or traced.
pub fn is_frozen(pid: i32) -> bool {
    matches!(proc_stat(pid), Some(s) if s.state == 'T' || s.state == 't')
}

/// Start time of a process in seconds since the epoch.
pub fn start_time_epoch(pid: i32) -> Option<i64> {
    let stat = proc_stat(pid)?;
    let btime = boot_time()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    Some(btime + (stat.start_ticks / hz as u64) as i64)
}

fn boot_time() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_btime(&text)
}

/// Extracts `btime` from `/proc/stat`.
pub fn parse_btime(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Every process in `/proc` that has not exited, with its stat line.
fn live_processes() -> impl Iterator<Item = (i32, ProcStat)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let s = proc_stat(pid)?;
            (s.state != 'Z' && s.state != 'X').then_some((pid, s))
        })
}

/// Live children of `parent`, with their start ticks so a later kill can
/// skip a recycled pid.
pub fn children_of(parent: i32) -> Vec<(i32, u64)> {
    live_processes()
        .filter(|(_, s)| s.ppid == parent)
        .map(|(pid, s)| (pid, s.start_ticks))
        .collect()
}

/// Live processes whose working directory is `dir`, with their start
/// ticks; never the calling process.
///
/// The postmaster and every process it forks `chdir` into the data
/// directory, so this finds backends whose postmaster is gone: orphans
/// that `children_of` can no longer see. The kernel reports cwd with
/// symlinks resolved, hence the canonical comparison. Any other process
/// sitting in the data directory (a shell, say) is listed too.
pub fn processes_in_dir(dir: &Path) -> Vec<(i32, u64)> {
    let target = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let me = std::process::id() as i32;
    live_processes()
        .filter(|(pid, _)| *pid != me)
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == target)
        })
        .map(|(pid, s)| (pid, s.start_ticks))
        .collect()
}

/// True if `pid` is still the live process that had `start_ticks`.
pub fn is_same_alive(pid: i32, start_ticks: u64) -> bool {
    matches!(proc_stat(pid), Some(s) if s.start_ticks == start_ticks && s.state != 'Z' && s.state != 'X')
}

/// Sends `sig`; false if the process does not exist.
pub fn signal(pid: i32, sig: libc::c_int) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill has no memory-safety preconditions; pid > 0 targets one process.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// The postmaster named in `postmaster.pid` is this process: alive, and
/// started when the pid file says (pids get recycled after a crash).
pub fn matches_pid_file(pid: i32, pid_file_start: i64) -> bool {
    if !is_alive(pid) {
        return false;
    }
    match start_time_epoch(pid) {
        Some(t) => (t - pid_file_start).abs() <= 2,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let text = "1234 (post gres (x)) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        let s = parse_proc_stat(text).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.start_ticks, 987_654);
    }

    #[test]
    fn parses_btime() {
        assert_eq!(
            parse_btime("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn own_process_is_alive_and_matches_its_start_time() {
        let me = std::process::id() as i32;
        assert!(is_alive(me));
        assert!(!is_frozen(me));
        let t = start_time_epoch(me).unwrap();
        assert!(matches_pid_file(me, t));
        assert!(!matches_pid_file(me, t - 100));
    }

    #[test]
    fn finds_processes_by_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // A symlinked path names the same directory.
        let link = dir.path().with_extension("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let found: Vec<i32> = processes_in_dir(&link).iter().map(|p| p.0).collect();
        let _ = std::fs::remove_file(&link);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, [pid]);
        assert!(processes_in_dir(dir.path()).is_empty());
    }
}
