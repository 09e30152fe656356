//! The sidecar's end of the guard: launches it and feeds it leases.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdin, Command};

use super::process::{parse_adoption_greeting, GuardArgs};
use super::watchdog::Watchdog;
use crate::config::GuardCommand;
use crate::error::{Result, SupervisorError};
use crate::lease::{clock_now_ns, Lease};
use crate::os_process::is_alive;

/// How long the guard may take to spawn the postmaster and say so.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A healthy guard drains its pipe within microseconds.
const FEED_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an adopted guard may take to greet.
const GREETING_TIMEOUT: Duration = Duration::from_secs(2);

/// A running guard. Dropping it closes the guard's feed, which makes the
/// guard fence PostgreSQL: there is no way to leave Postgres unguarded, but
/// [`Guard::detach`], which hands it to a successor for a bounded time.
#[derive(Debug)]
pub struct Guard {
    /// Our child, when this sidecar launched the guard; `None` for an adopted one.
    child: Option<Child>,
    feed: Option<FeedPipe>,
    guard_pid: u32,
    postmaster_pid: i32,
    lease: Lease,
    /// Fences on time if the guard stalls.
    watchdog: Watchdog,
}

#[derive(Debug)]
enum FeedPipe {
    Stdin(ChildStdin),
    Socket(UnixStream),
}

impl Guard {
    /// Starts the guard, which starts the postmaster.
    pub(crate) async fn launch(command: &GuardCommand, args: &GuardArgs) -> Result<Guard> {
        let mut cmd = Command::new(&command.program);
        cmd.args(&command.args)
            .args(args.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a Ctrl-C aimed at the sidecar must not reach
            // the postmaster; the guard fences on its own when we are gone.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            SupervisorError::Guard(format!(
                "cannot start guard {}: {e}",
                command.program.display()
            ))
        })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| SupervisorError::Guard("guard stdout not captured".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(LAUNCH_TIMEOUT, lines.next_line()).await;
        let pid = match first {
            Ok(Ok(Some(line))) => parse_announcement(&line),
            _ => None,
        };
        let Some(postmaster_pid) = pid else {
            let _ = child.start_kill();
            let stderr = match child.stderr.take() {
                Some(mut e) => {
                    let mut s = String::new();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        tokio::io::AsyncReadExt::read_to_string(&mut e, &mut s),
                    )
                    .await;
                    s
                }
                None => String::new(),
            };
            let _ = child.wait().await;
            return Err(SupervisorError::StartFailed(format!(
                "guard did not start the postmaster: {}",
                stderr.trim()
            )));
        };
        let feed = child.stdin.take().map(FeedPipe::Stdin);
        Ok(Guard {
            guard_pid: child.id().unwrap_or(0),
            child: Some(child),
            feed,
            postmaster_pid,
            lease: args.lease,
            watchdog: Watchdog::start(postmaster_pid, args.fence_grace, args.lease),
        })
    }

    /// Adopts the guard serving `socket`, left running by a sidecar that detached. `None` when
    /// no guard listens there (none left, or it fenced already). `fence_grace` is the
    /// immediate-shutdown grace of this sidecar's own fence timer.
    pub async fn adopt(socket: &Path, fence_grace: Duration) -> Result<Option<Guard>> {
        let mut stream = match UnixStream::connect(socket).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(SupervisorError::Guard(format!(
                    "cannot reach the guard's control socket {}: {e}",
                    socket.display()
                )))
            }
        };
        // The greeting is the only thing the guard ever writes, so byte-wise reading cannot
        // swallow anything meant for later.
        let read_line = async {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while stream.read(&mut b).await? == 1 {
                if b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
                if line.len() > 256 {
                    break;
                }
            }
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&line).into_owned())
        };
        let line = match tokio::time::timeout(GREETING_TIMEOUT, read_line).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(SupervisorError::Guard(format!("guard greeting: {e}"))),
            Err(_) => {
                return Err(SupervisorError::Guard(
                    "the guard did not greet within 2 s".into(),
                ))
            }
        };
        if line.trim() == "busy" {
            return Err(SupervisorError::Guard(format!(
                "the guard on {} is fed by another sidecar; is one still running?",
                socket.display()
            )));
        }
        let (postmaster_pid, guard_pid, lease) = parse_adoption_greeting(&line)
            .ok_or_else(|| SupervisorError::Guard(format!("unexpected guard greeting {line:?}")))?;
        Ok(Some(Guard {
            child: None,
            feed: Some(FeedPipe::Socket(stream)),
            guard_pid,
            postmaster_pid,
            lease,
            watchdog: Watchdog::start(postmaster_pid, fence_grace, lease),
        }))
    }

    /// Leaves the guard running for a successor: Postgres keeps running until the earlier of
    /// its lease's end and `window` from now, unless a new sidecar adopts it first.
    pub async fn detach(mut self, window: Duration) -> Result<()> {
        let until = clock_now_ns().saturating_add(window.as_nanos() as u64);
        self.write_line(&format!("detach {until}\n")).await
    }

    async fn write_line(&mut self, line: &str) -> Result<()> {
        let write = async {
            match self.feed.as_mut() {
                Some(FeedPipe::Stdin(p)) => {
                    p.write_all(line.as_bytes()).await?;
                    p.flush().await
                }
                Some(FeedPipe::Socket(s)) => {
                    s.write_all(line.as_bytes()).await?;
                    s.flush().await
                }
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "guard feed closed",
                )),
            }
        };
        match tokio::time::timeout(FEED_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SupervisorError::Guard(format!(
                "cannot feed the guard (exited?): {e}"
            ))),
            Err(_) => Err(SupervisorError::Guard(
                "guard does not read its lease pipe".into(),
            )),
        }
    }

    /// Renews (or changes) the lease. Sending a deadline in the past makes
    /// the guard fence at once.
    pub async fn feed(&mut self, lease: Lease) -> Result<()> {
        self.write_line(&format!("{}\n", lease.encode())).await?;
        self.lease = lease;
        // The timer follows what the guard holds: a feed the guard did not take moves nothing.
        self.watchdog.arm(lease);
        Ok(())
    }

    /// The lease last fed.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// The guard's own pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        match &self.child {
            Some(c) => c.id(),
            None => is_alive(self.guard_pid as i32).then_some(self.guard_pid),
        }
    }

    /// Whether this sidecar adopted the guard from a predecessor.
    pub fn adopted(&self) -> bool {
        self.child.is_none()
    }

    /// The postmaster the guard started.
    pub fn postmaster_pid(&self) -> i32 {
        self.postmaster_pid
    }

    /// The guard's exit status, if it has exited.
    /// An adopted guard is not our child: its status is unknown, so it reads as 0 once gone.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten(),
            None => (!is_alive(self.guard_pid as i32)).then(|| ExitStatus::from_raw(0)),
        }
    }

    /// Waits for the guard to exit (after the postmaster stopped).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Some(c) = self.child.as_mut() {
            return tokio::time::timeout(limit, c.wait())
                .await
                .ok()
                .and_then(|r| r.ok());
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exit_status() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

fn parse_announcement(line: &str) -> Option<i32> {
    line.trim().strip_prefix("postmaster ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_announcement() {
        assert_eq!(parse_announcement("postmaster 123\n"), Some(123));
        assert_eq!(parse_announcement("hello"), None);
    }
}
