//! Operator callbacks: executables run when this member's Postgres starts, stops or changes
//! role, the way Patroni runs `on_start`, `on_stop` and `on_role_change`. Each gets three
//! arguments, `ACTION ROLE CLUSTER` (for example `on_role_change primary main`), runs in the
//! background with a timeout, and has its failure logged. A callback never delays or blocks a
//! fence or a promotion: the sidecar fires it after the action and does not wait for it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The `[callbacks]` section of the node config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// Run after the sidecar started Postgres (as primary or replica).
    pub on_start: Option<PathBuf>,
    /// Run after the sidecar stopped Postgres (a fence, or a switchover's clean shutdown).
    pub on_stop: Option<PathBuf>,
    /// Run after this member's Postgres was promoted, or rejoined as a replica after serving
    /// as primary.
    pub on_role_change: Option<PathBuf>,
    /// A callback still running after this long is killed (default 10 s).
    pub timeout_ms: Option<u64>,
}

/// Why a callback is not usable.
#[derive(Debug, thiserror::Error)]
#[error("callbacks.{key} = {path}: {why}")]
pub struct CallbackError {
    key: &'static str,
    path: String,
    why: String,
}

impl CallbackConfig {
    /// Checks that every configured callback is an executable file.
    pub fn validate(&self) -> Result<(), CallbackError> {
        use std::os::unix::fs::PermissionsExt;
        for (key, path) in self.entries() {
            let err = |why: String| CallbackError {
                key,
                path: path.display().to_string(),
                why,
            };
            let meta = std::fs::metadata(path)
                .map_err(|e| err(format!("{e}; give the path of an executable file")))?;
            if !meta.is_file() {
                return Err(err("is not a file".into()));
            }
            if meta.permissions().mode() & 0o111 == 0 {
                return Err(err(format!(
                    "is not executable; run `chmod +x {}`",
                    path.display()
                )));
            }
        }
        if self.timeout_ms == Some(0) {
            return Err(CallbackError {
                key: "timeout_ms",
                path: "0".into(),
                why: "must be positive".into(),
            });
        }
        Ok(())
    }

    fn entries(&self) -> impl Iterator<Item = (&'static str, &PathBuf)> {
        [
            ("on_start", &self.on_start),
            ("on_stop", &self.on_stop),
            ("on_role_change", &self.on_role_change),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.as_ref().map(|p| (k, p)))
    }
}

/// What happened, for the callback's first argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackAction {
    /// Postgres was started.
    Start,
    /// Postgres was stopped.
    Stop,
    /// Postgres changed role.
    RoleChange,
}

impl CallbackAction {
    fn name(self) -> &'static str {
        match self {
            CallbackAction::Start => "on_start",
            CallbackAction::Stop => "on_stop",
            CallbackAction::RoleChange => "on_role_change",
        }
    }
}

/// The callbacks of one sidecar.
#[derive(Debug, Clone, Default)]
pub struct Callbacks {
    cfg: CallbackConfig,
    cluster: String,
}

impl Callbacks {
    /// Callbacks from `cfg` for cluster `cluster`.
    pub fn new(cfg: CallbackConfig, cluster: String) -> Self {
        Self { cfg, cluster }
    }

    /// Runs the callback for `action` in the background with `role` (primary, replica,
    /// stopped); returns at once.
    pub fn fire(&self, action: CallbackAction, role: &str) {
        let path = match action {
            CallbackAction::Start => &self.cfg.on_start,
            CallbackAction::Stop => &self.cfg.on_stop,
            CallbackAction::RoleChange => &self.cfg.on_role_change,
        };
        let Some(path) = path.clone() else {
            return;
        };
        let limit = Duration::from_millis(self.cfg.timeout_ms.unwrap_or(10_000));
        let args = [
            action.name().to_string(),
            role.to_string(),
            self.cluster.clone(),
        ];
        tokio::spawn(async move {
            let child = tokio::process::Command::new(&path)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(callback = %path.display(), ?args, error = %e, "callback could not start");
                    return;
                }
            };
            match tokio::time::timeout(limit, child.wait()).await {
                Ok(Ok(status)) if status.success() => {
                    tracing::info!(callback = %path.display(), ?args, "callback done");
                }
                Ok(Ok(status)) => {
                    tracing::warn!(callback = %path.display(), ?args, %status, "callback failed");
                }
                Ok(Err(e)) => {
                    tracing::warn!(callback = %path.display(), ?args, error = %e, "callback failed");
                }
                Err(_) => {
                    let _ = child.kill().await;
                    tracing::warn!(callback = %path.display(), ?args, timeout_ms = limit.as_millis() as u64, "callback timed out; killed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_executable_files_are_accepted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("cb.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let cfg = CallbackConfig {
            on_start: Some(script.clone()),
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("chmod +x"), "{e}");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(cfg.validate().is_ok());
        let missing = CallbackConfig {
            on_stop: Some(dir.path().join("nope")),
            ..Default::default()
        };
        let e = missing.validate().unwrap_err().to_string();
        assert!(e.contains("callbacks.on_stop"), "{e}");
        let zero = CallbackConfig {
            timeout_ms: Some(0),
            ..Default::default()
        };
        assert!(zero.validate().is_err());
    }

    #[tokio::test]
    async fn a_callback_gets_its_arguments_and_a_slow_one_is_killed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = dir.path().join("cb.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\n[ \"$2\" = slow ] && sleep 30\nexit 0\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cb = Callbacks::new(
            CallbackConfig {
                on_role_change: Some(script.clone()),
                on_stop: Some(script),
                timeout_ms: Some(300),
                ..Default::default()
            },
            "main".into(),
        );
        let started = std::time::Instant::now();
        cb.fire(CallbackAction::RoleChange, "primary");
        cb.fire(CallbackAction::Stop, "slow");
        cb.fire(CallbackAction::Start, "replica");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "fire waited"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.contains("on_role_change primary main") && text.contains("on_stop slow main") {
                assert!(
                    !text.contains("on_start"),
                    "no on_start was configured: {text}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "callbacks did not run: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
