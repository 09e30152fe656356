//! Running PostgreSQL tools as the unprivileged user, with captured output.

use std::ffi::OsString;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::binaries::PgBinaries;
use crate::error::{Result, SupervisorError};
use crate::os_user::OsUser;

/// What a successful tool printed.
#[derive(Debug, Clone, Default)]
pub struct ToolOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// One tool invocation.
pub struct PgTool<'a> {
    bins: &'a PgBinaries,
    user: &'a OsUser,
    name: &'static str,
    args: Vec<OsString>,
    env: Vec<(&'static str, String)>,
    stdin: Option<String>,
}

impl<'a> PgTool<'a> {
    /// Prepares `name` from `bins`, to run as `user`.
    pub fn new(bins: &'a PgBinaries, user: &'a OsUser, name: &'static str) -> Self {
        PgTool {
            bins,
            user,
            name,
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds an environment variable (e.g. `PGPASSWORD`).
    pub fn env(mut self, k: &'static str, v: impl Into<String>) -> Self {
        self.env.push((k, v.into()));
        self
    }

    /// Feeds text on stdin.
    pub fn stdin(mut self, text: impl Into<String>) -> Self {
        self.stdin = Some(text.into());
        self
    }

    /// Runs to completion; returns its output, or an error with stderr's
    /// tail. Dropping the future kills the tool.
    pub async fn run(self) -> Result<ToolOutput> {
        let mut cmd = Command::new(self.bins.path(self.name));
        cmd.args(&self.args)
            // Tool output is parsed in English.
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .env("HOME", &self.user.home)
            // The sidecar's cwd may be unreadable for the postgres user.
            .current_dir("/")
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if self.user.switch {
            cmd.uid(self.user.uid).gid(self.user.gid);
        }
        let mut child = cmd.spawn().map_err(|e| {
            SupervisorError::io(format!("run {}", self.bins.path(self.name).display()), e)
        })?;
        if let (Some(text), Some(mut pipe)) = (self.stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .await
                .map_err(|e| SupervisorError::io(format!("write stdin of {}", self.name), e))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| SupervisorError::io(format!("wait for {}", self.name), e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok(ToolOutput { stdout, stderr })
        } else {
            Err(SupervisorError::CommandFailed {
                program: self.name.to_string(),
                status: out.status.to_string(),
                stderr: tail(&format!("{stderr}{stdout}"), 15),
            })
        }
    }
}

/// The last `n` non-empty lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }
}
