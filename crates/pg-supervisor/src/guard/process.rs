//! The guard's own process: `run_guard` is its whole life.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{
    EXIT_FENCED_LEASE_EXPIRED, EXIT_FENCED_SIDECAR_GONE, EXIT_POSTMASTER_EXITED, EXIT_START_FAILED,
};
use crate::fence::fence_data_dir;
use crate::lease::Lease;
use crate::os_user::OsUser;

/// Upper bound on how late the guard notices an expired lease or a dead
/// postmaster.
const TICK: Duration = Duration::from_millis(20);

/// Command line of the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardArgs {
    /// The `postgres` executable.
    pub postgres: PathBuf,
    /// Data directory.
    pub data_dir: PathBuf,
    /// OS user to run as when the guard is root.
    pub user: Option<String>,
    /// Server log (postmaster stdout/stderr, guard messages).
    pub log_file: PathBuf,
    /// Immediate-shutdown grace before SIGKILL.
    pub fence_grace: Duration,
    /// Lease in force at start.
    pub lease: Lease,
}

impl GuardArgs {
    /// Renders the arguments for the guard's command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--postgres".into(),
            self.postgres.display().to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--log-file".into(),
            self.log_file.display().to_string(),
            "--fence-grace-ms".into(),
            self.fence_grace.as_millis().to_string(),
            "--lease".into(),
            self.lease.encode(),
        ];
        if let Some(u) = &self.user {
            v.push("--user".into());
            v.push(u.clone());
        }
        v
    }

    /// Parses [`GuardArgs::to_args`] output.
    pub fn parse(args: &[String]) -> Result<GuardArgs, String> {
        let mut postgres = None;
        let mut data_dir = None;
        let mut user = None;
        let mut log_file = None;
        let mut fence_grace = Duration::from_millis(500);
        let mut lease = None;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("missing value for {flag}"))?;
            match flag.as_str() {
                "--postgres" => postgres = Some(PathBuf::from(value)),
                "--data-dir" => data_dir = Some(PathBuf::from(value)),
                "--user" => user = Some(value.clone()),
                "--log-file" => log_file = Some(PathBuf::from(value)),
                "--fence-grace-ms" => {
                    let ms = value
                        .parse()
                        .map_err(|_| format!("bad --fence-grace-ms {value}"))?;
                    fence_grace = Duration::from_millis(ms);
                }
                "--lease" => {
                    lease =
                        Some(Lease::decode(value).ok_or_else(|| format!("bad --lease {value}"))?)
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(GuardArgs {
            postgres: postgres.ok_or("--postgres is required")?,
            data_dir: data_dir.ok_or("--data-dir is required")?,
            user,
            log_file: log_file.ok_or("--log-file is required")?,
            fence_grace,
            lease: lease.ok_or("--lease is required")?,
        })
    }
}

/// Runs the guard until the postmaster is gone; returns the exit code.
/// Protocol: one lease per line on stdin ([`Lease::encode`]); the guard
/// prints `postmaster <pid>` on stdout once PostgreSQL is spawned.
pub fn run_guard(args: &[String]) -> i32 {
    let args = match GuardArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pgq-guard: {e}");
            return EXIT_START_FAILED;
        }
    };
    let mut log = match open_log(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pgq-guard: {e}");
            return EXIT_START_FAILED;
        }
    };
    if args.lease.is_expired() {
        say(&mut log, "lease already expired; not starting PostgreSQL");
        return EXIT_FENCED_LEASE_EXPIRED;
    }
    let pid = match spawn_postmaster(&args, &log) {
        Ok(pid) => pid,
        Err(e) => {
            say(&mut log, &format!("cannot start postgres: {e}"));
            eprintln!("pgq-guard: cannot start postgres: {e}");
            return EXIT_START_FAILED;
        }
    };
    say(&mut log, &format!("started postmaster {pid}"));
    let mut stdout = std::io::stdout();
    // The sidecar may already be gone; the lease loop handles that.
    let _ = writeln!(stdout, "postmaster {pid}").and_then(|_| stdout.flush());
    watch(pid, &args.data_dir, args.lease, args.fence_grace, &mut log)
}

fn open_log(args: &GuardArgs) -> Result<File, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&args.log_file)
        .map_err(|e| format!("cannot open log {}: {e}", args.log_file.display()))?;
    Ok(file)
}

fn say(log: &mut File, msg: &str) {
    let _ = writeln!(log, "pgq-guard[{}]: {msg}", std::process::id());
}

fn spawn_postmaster(args: &GuardArgs, log: &File) -> Result<i32, String> {
    let mut cmd = Command::new(&args.postgres);
    cmd.arg("-D")
        .arg(&args.data_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log.try_clone().map_err(|e| e.to_string())?)
        .current_dir("/")
        .env("LC_ALL", "C");
    let user = OsUser::resolve(args.user.as_deref()).map_err(|e| e.to_string())?;
    if user.switch {
        std::os::unix::fs::chown(&args.log_file, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("chown {}: {e}", args.log_file.display()))?;
        cmd.uid(user.uid).gid(user.gid).env("HOME", &user.home);
    }
    let guard_pid = std::process::id() as libc::pid_t;
    // SAFETY: the closure only calls async-signal-safe functions (prctl,
    // getppid). std runs pre_exec closures after setuid/setgid, which matters
    // because changing credentials clears the parent-death signal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The guard may have died before prctl took effect.
            if libc::getppid() != guard_pid {
                // No allocation between fork and exec.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    Ok(child.id() as i32)
}

enum Wake {
    Continue,
    SidecarGone,
}

fn watch(pid: i32, data_dir: &Path, mut lease: Lease, grace: Duration, log: &mut File) -> i32 {
    let fd = std::io::stdin().as_raw_fd();
    let mut pending = String::new();
    loop {
        if let Some(code) = reap(pid) {
            say(
                log,
                &format!("postmaster {pid} exited ({code}); guard exits"),
            );
            return EXIT_POSTMASTER_EXITED;
        }
        if lease.is_expired() {
            say(log, "lease expired without renewal; fencing PostgreSQL");
            fence_and_reap(pid, data_dir, grace, log);
            return EXIT_FENCED_LEASE_EXPIRED;
        }
        let wait = match lease.remaining() {
            Some(r) => r.min(TICK),
            None => TICK,
        };
        match read_leases(fd, wait, &mut pending, &mut lease) {
            Wake::Continue => {}
            Wake::SidecarGone => {
                say(log, "sidecar gone (stdin closed); fencing PostgreSQL");
                fence_and_reap(pid, data_dir, grace, log);
                return EXIT_FENCED_SIDECAR_GONE;
            }
        }
    }
}

/// Waits up to `wait` for stdin and applies complete lines.
fn read_leases(fd: i32, wait: Duration, pending: &mut String, lease: &mut Lease) -> Wake {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: pfd is a valid pollfd array of length 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n <= 0 {
        return Wake::Continue;
    }
    if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) == 0 {
        return Wake::Continue;
    }
    // A raw read: std's buffered stdin could hold lines back from poll().
    let mut buf = [0u8; 4096];
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let got = match n {
        0 => return Wake::SidecarGone,
        n if n > 0 => n as usize,
        _ => {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => Wake::Continue,
                _ => Wake::SidecarGone,
            };
        }
    };
    pending.push_str(&String::from_utf8_lossy(&buf[..got]));
    while let Some(pos) = pending.find('\n') {
        let line: String = pending.drain(..=pos).collect();
        if let Some(l) = Lease::decode(&line) {
            *lease = l;
        }
    }
    Wake::Continue
}

fn reap(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid || r < 0 {
        Some(status)
    } else {
        None
    }
}

fn fence_and_reap(pid: i32, data_dir: &Path, grace: Duration, log: &mut File) {
    let report = fence_data_dir(data_dir, &[pid], grace);
    let mut status = 0;
    // SAFETY: status is a valid out-pointer; the postmaster is dead or dying.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    say(
        log,
        &format!(
            "fenced postmaster {pid} in {} ms (sigkill: {}, leftovers killed: {:?}, \
             verified gone: {}, survivors: {:?})",
            report.elapsed_ms,
            report.escalated_to_sigkill,
            report.leftover_pids,
            report.verified_gone,
            report.survivor_pids
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = GuardArgs {
            postgres: "/usr/bin/postgres".into(),
            data_dir: "/d".into(),
            user: Some("postgres".into()),
            log_file: "/d.log".into(),
            fence_grace: Duration::from_millis(250),
            lease: Lease::Until(99),
        };
        assert_eq!(GuardArgs::parse(&a.to_args()).unwrap(), a);
        assert!(GuardArgs::parse(&["--bogus".into(), "1".into()]).is_err());
        assert!(GuardArgs::parse(&[]).is_err());
    }
}
