//! The sidecar's end of the guard: launches it and feeds it leases.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use super::process::GuardArgs;
use crate::config::GuardCommand;
use crate::error::{Result, SupervisorError};
use crate::lease::Lease;

/// How long the guard may take to spawn the postmaster and say so.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A healthy guard drains its pipe within microseconds.
const FEED_TIMEOUT: Duration = Duration::from_secs(1);

/// A running guard. Dropping it closes the guard's stdin, which makes the
/// guard fence PostgreSQL: there is no way to leave Postgres unguarded.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
    postmaster_pid: i32,
    lease: Lease,
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
        let stdin = child.stdin.take();
        Ok(Guard {
            child,
            stdin,
            postmaster_pid,
            lease: args.lease,
        })
    }

    /// Renews (or changes) the lease. Sending a deadline in the past makes
    /// the guard fence at once.
    pub async fn feed(&mut self, lease: Lease) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| SupervisorError::Guard("guard stdin closed".into()))?;
        let line = format!("{}\n", lease.encode());
        let write = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        };
        match tokio::time::timeout(FEED_TIMEOUT, write).await {
            Ok(Ok(())) => {
                self.lease = lease;
                Ok(())
            }
            Ok(Err(e)) => Err(SupervisorError::Guard(format!(
                "cannot feed the guard (exited?): {e}"
            ))),
            Err(_) => Err(SupervisorError::Guard(
                "guard does not read its lease pipe".into(),
            )),
        }
    }

    /// The lease last fed.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// The guard's own pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The postmaster the guard started.
    pub fn postmaster_pid(&self) -> i32 {
        self.postmaster_pid
    }

    /// The guard's exit status, if it has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the guard to exit (after the postmaster stopped).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(|r| r.ok())
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
