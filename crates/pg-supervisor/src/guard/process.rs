//! The guard's own process: `run_guard` is its whole life.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{
    EXIT_FENCED_LEASE_EXPIRED, EXIT_FENCED_NOT_ADOPTED, EXIT_FENCED_SIDECAR_GONE,
    EXIT_POSTMASTER_EXITED, EXIT_START_FAILED,
};
use crate::fence::fence_data_dir;
use crate::lease::{clock_now_ns, Lease};
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
    /// Unix socket on which a new sidecar adopts this guard after the old one detached.
    pub control_socket: Option<PathBuf>,
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
        if let Some(p) = &self.control_socket {
            v.push("--control-socket".into());
            v.push(p.display().to_string());
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
        let mut control_socket = None;
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
                "--control-socket" => control_socket = Some(PathBuf::from(value)),
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
            control_socket,
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
    let file = match open_log(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pgq-guard: {e}");
            return EXIT_START_FAILED;
        }
    };
    let log = GuardLog::start(&file);
    let code = guard_until_exit(&args, &file, &log);
    // Give the writer a moment to put the last lines down; a hung log never holds the exit.
    log.close(Duration::from_secs(1));
    code
}

/// The guard's life once its log is open; returns the exit code.
fn guard_until_exit(args: &GuardArgs, file: &File, log: &GuardLog) -> i32 {
    if args.lease.is_expired() {
        log.say("lease already expired; not starting PostgreSQL");
        // The launching sidecar reads stderr into its error message.
        eprintln!(
            "pgq-guard: the lease expired before PostgreSQL could start (the work before the \
             start took longer than the lease); not starting it"
        );
        return EXIT_FENCED_LEASE_EXPIRED;
    }
    let listener = match args.control_socket.as_deref().map(bind_control_socket) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            log.say(&e);
            eprintln!("pgq-guard: {e}");
            return EXIT_START_FAILED;
        }
    };
    let _socket_file = args.control_socket.clone().map(RemoveOnDrop);
    let pid = match spawn_postmaster(args, file) {
        Ok(pid) => pid,
        Err(e) => {
            log.say(&format!("cannot start postgres: {e}"));
            eprintln!("pgq-guard: cannot start postgres: {e}");
            return EXIT_START_FAILED;
        }
    };
    log.say(&format!("started postmaster {pid}"));
    let mut stdout = std::io::stdout();
    // The sidecar may already be gone; the lease loop handles that.
    let _ = writeln!(stdout, "postmaster {pid}").and_then(|_| stdout.flush());
    let watched = Watched {
        pid,
        data_dir: &args.data_dir,
        grace: args.fence_grace,
        listener: listener.as_ref(),
    };
    watch(&watched, args.lease, log)
}

/// Removes the control socket when the guard exits, so a stale file never looks like a guard.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the control socket, owner-only: only the sidecar's user may adopt the guard. A file
/// left by a guard that is gone is replaced; a socket some live guard answers on is not.
fn bind_control_socket(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another guard already serves {}; stop it (or its sidecar) first",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind the control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 600 {}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    Ok(listener)
}

/// The deadline the guard enforces: the lease's, shortened by the restart window once the
/// sidecar detached. A detached replica (no lease) is stopped at the window's end, so a sidecar
/// that never comes back does not leave an unsupervised server behind.
pub fn effective_deadline(lease: Lease, detached_until: Option<u64>) -> Option<u64> {
    match (lease, detached_until) {
        (Lease::Until(l), Some(d)) => Some(l.min(d)),
        (Lease::Until(l), None) => Some(l),
        (Lease::NotRequired, d) => d,
    }
}

/// The line a guard greets an adopting sidecar with.
pub fn adoption_greeting(postmaster: i32, guard: u32, lease: Lease) -> String {
    format!(
        "adopt postmaster={postmaster} guard={guard} lease={}\n",
        lease.encode()
    )
}

/// Parses [`adoption_greeting`]: (postmaster, guard, lease).
pub fn parse_adoption_greeting(line: &str) -> Option<(i32, u32, Lease)> {
    let rest = line.trim().strip_prefix("adopt ")?;
    let mut postmaster = None;
    let mut guard = None;
    let mut lease = None;
    for part in rest.split_whitespace() {
        let (k, v) = part.split_once('=')?;
        match k {
            "postmaster" => postmaster = v.parse().ok(),
            "guard" => guard = v.parse().ok(),
            "lease" => lease = Lease::decode(v),
            _ => return None,
        }
    }
    Some((postmaster?, guard?, lease?))
}

/// What the guard watches over.
struct Watched<'a> {
    pid: i32,
    data_dir: &'a Path,
    grace: Duration,
    listener: Option<&'a UnixListener>,
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

/// The guard's log lines, written by a thread of their own: the guard's loop never waits on
/// the log file. A hung filesystem (or a full pipe) under the log must not delay a fence by a
/// single millisecond; lines are dropped when the writer falls that far behind.
struct GuardLog {
    lines: Option<std::sync::mpsc::SyncSender<String>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl GuardLog {
    /// Lines queued beyond this are dropped while the writer is stuck.
    const BACKLOG: usize = 256;

    fn start(file: &File) -> GuardLog {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(Self::BACKLOG);
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut file = file.try_clone();
        std::thread::spawn(move || {
            for line in rx {
                if let Ok(f) = file.as_mut() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            let _ = done_tx.send(());
        });
        GuardLog {
            lines: Some(tx),
            done,
        }
    }

    /// Queues a line; never blocks.
    fn say(&self, msg: &str) {
        if let Some(tx) = &self.lines {
            let _ = tx.try_send(format!("pgq-guard[{}]: {msg}\n", std::process::id()));
        }
    }

    /// Stops taking lines and waits up to `limit` for the queued ones to be written.
    fn close(mut self, limit: Duration) {
        self.lines = None;
        let _ = self.done.recv_timeout(limit);
    }
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

/// Where leases come from: the launching sidecar's pipe (stdin), or the connection of a sidecar
/// that adopted the guard.
enum Feed {
    Stdin,
    Adopted(UnixStream),
}

impl Feed {
    fn fd(&self) -> i32 {
        match self {
            Feed::Stdin => std::io::stdin().as_raw_fd(),
            Feed::Adopted(s) => s.as_raw_fd(),
        }
    }
}

enum Wake {
    Continue,
    /// The feed reached EOF (or failed).
    Closed,
}

fn watch(w: &Watched<'_>, mut lease: Lease, log: &GuardLog) -> i32 {
    let mut feed = Some(Feed::Stdin);
    let mut pending = String::new();
    // Set by a `detach` line: the sidecar is leaving on purpose and a successor may adopt us.
    let mut detached_until: Option<u64> = None;
    loop {
        if let Some(code) = reap(w.pid) {
            log.say(&format!(
                "postmaster {} exited ({code}); guard exits",
                w.pid
            ));
            return EXIT_POSTMASTER_EXITED;
        }
        let deadline = effective_deadline(lease, detached_until);
        let now = clock_now_ns();
        if deadline.is_some_and(|d| now >= d) {
            // Fence first, then say why: nothing may stand between the deadline and the fence.
            fence_and_reap(w.pid, w.data_dir, w.grace, log);
            if feed.is_none() {
                log.say("no sidecar adopted PostgreSQL within its lease or the restart window");
                return EXIT_FENCED_NOT_ADOPTED;
            }
            log.say("the lease expired without renewal");
            return EXIT_FENCED_LEASE_EXPIRED;
        }
        let wait = match deadline {
            Some(d) => Duration::from_nanos(d - now).min(TICK),
            None => TICK,
        };
        let (feed_ready, adopter) = poll_feed(feed.as_ref(), w.listener, wait);
        if let Some(mut conn) = adopter {
            if feed.is_some() {
                // Only one sidecar feeds the guard; a second one is turned away.
                let _ = conn.write_all(b"busy\n");
            } else {
                let greeting = adoption_greeting(w.pid, std::process::id(), lease);
                if conn.write_all(greeting.as_bytes()).is_ok() {
                    log.say("adopted by a new sidecar");
                    feed = Some(Feed::Adopted(conn));
                    detached_until = None;
                    pending.clear();
                }
            }
        }
        if !feed_ready {
            continue;
        }
        let Some(f) = feed.as_mut() else { continue };
        match read_leases(f, &mut pending, &mut lease, &mut detached_until) {
            Wake::Continue => {}
            Wake::Closed if detached_until.is_some() => {
                log.say(
                    "sidecar detached cleanly; PostgreSQL keeps running until a new sidecar \
                     adopts it, its lease ends or the restart window closes",
                );
                feed = None;
                pending.clear();
            }
            Wake::Closed => {
                fence_and_reap(w.pid, w.data_dir, w.grace, log);
                log.say("the sidecar is gone (its feed closed)");
                return EXIT_FENCED_SIDECAR_GONE;
            }
        }
    }
}

/// Waits up to `wait` for the feed to be readable or a sidecar to connect.
fn poll_feed(
    feed: Option<&Feed>,
    listener: Option<&UnixListener>,
    wait: Duration,
) -> (bool, Option<UnixStream>) {
    let mut fds = Vec::with_capacity(2);
    if let Some(f) = feed {
        fds.push(libc::pollfd {
            fd: f.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    if let Some(l) = listener {
        fds.push(libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: fds is a valid pollfd array of fds.len() entries.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return (false, None);
    }
    let ready = |p: &libc::pollfd| {
        p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    };
    let feed_ready = feed.is_some() && ready(&fds[0]);
    let adopter = listener.and_then(|l| {
        if !ready(&fds[fds.len() - 1]) {
            return None;
        }
        let (conn, _) = l.accept().ok()?;
        // Lease lines are read after poll() says so; a blocking read never stalls the guard.
        conn.set_nonblocking(true).ok()?;
        Some(conn)
    });
    (feed_ready, adopter)
}

/// Reads what the feed has and applies complete lines: a lease, or `detach <deadline>`.
fn read_leases(
    feed: &mut Feed,
    pending: &mut String,
    lease: &mut Lease,
    detached_until: &mut Option<u64>,
) -> Wake {
    let mut buf = [0u8; 4096];
    let n = match feed {
        // A raw read: std's buffered stdin could hold lines back from poll().
        // SAFETY: buf is valid for writes of buf.len() bytes.
        Feed::Stdin => unsafe { libc::read(Feed::Stdin.fd(), buf.as_mut_ptr().cast(), buf.len()) },
        Feed::Adopted(s) => match s.read(&mut buf) {
            Ok(n) => n as isize,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Wake::Continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Wake::Continue,
            Err(_) => -1,
        },
    };
    let got = match n {
        0 => return Wake::Closed,
        n if n > 0 => n as usize,
        _ => {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => Wake::Continue,
                _ => Wake::Closed,
            };
        }
    };
    pending.push_str(&String::from_utf8_lossy(&buf[..got]));
    while let Some(pos) = pending.find('\n') {
        let line: String = pending.drain(..=pos).collect();
        apply_line(line.trim(), lease, detached_until);
    }
    Wake::Continue
}

/// One line of the feed protocol.
fn apply_line(line: &str, lease: &mut Lease, detached_until: &mut Option<u64>) {
    if let Some(until) = line.strip_prefix("detach ") {
        if let Ok(ns) = until.trim().parse() {
            *detached_until = Some(ns);
        }
    } else if let Some(l) = Lease::decode(line) {
        *lease = l;
    }
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

fn fence_and_reap(pid: i32, data_dir: &Path, grace: Duration, log: &GuardLog) {
    let report = fence_data_dir(data_dir, &[pid], grace);
    let mut status = 0;
    // SAFETY: status is a valid out-pointer; the postmaster is dead or dying.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    log.say(&format!(
        "fenced postmaster {pid} in {} ms (sigkill: {}, leftovers killed: {:?}, \
             verified gone: {}, survivors: {:?})",
        report.elapsed_ms,
        report.escalated_to_sigkill,
        report.leftover_pids,
        report.verified_gone,
        report.survivor_pids
    ));
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
            control_socket: Some("/run/g.sock".into()),
        };
        assert_eq!(GuardArgs::parse(&a.to_args()).unwrap(), a);
        assert!(GuardArgs::parse(&["--bogus".into(), "1".into()]).is_err());
        assert!(GuardArgs::parse(&[]).is_err());
    }

    #[test]
    fn a_detached_guard_keeps_the_earlier_of_lease_and_window() {
        assert_eq!(effective_deadline(Lease::Until(10), None), Some(10));
        assert_eq!(effective_deadline(Lease::Until(10), Some(50)), Some(10));
        assert_eq!(effective_deadline(Lease::Until(90), Some(50)), Some(50));
        assert_eq!(effective_deadline(Lease::NotRequired, None), None);
        assert_eq!(effective_deadline(Lease::NotRequired, Some(50)), Some(50));
    }

    #[test]
    fn feed_lines_set_the_lease_or_the_detach_deadline() {
        let mut lease = Lease::NotRequired;
        let mut detached = None;
        apply_line("until:77", &mut lease, &mut detached);
        assert_eq!((lease, detached), (Lease::Until(77), None));
        apply_line("detach 123", &mut lease, &mut detached);
        assert_eq!((lease, detached), (Lease::Until(77), Some(123)));
        apply_line("detach soon", &mut lease, &mut detached);
        apply_line("garbage", &mut lease, &mut detached);
        assert_eq!((lease, detached), (Lease::Until(77), Some(123)));
    }

    #[test]
    fn greeting_round_trips() {
        let g = adoption_greeting(12, 34, Lease::Until(56));
        assert_eq!(
            parse_adoption_greeting(&g),
            Some((12, 34, Lease::Until(56)))
        );
        assert_eq!(
            parse_adoption_greeting(&adoption_greeting(1, 2, Lease::NotRequired)),
            Some((1, 2, Lease::NotRequired))
        );
        assert_eq!(parse_adoption_greeting("busy"), None);
        assert_eq!(parse_adoption_greeting("adopt postmaster=1 guard=2"), None);
    }
}
