//! The data directory on disk: emptiness, managed files, lock file, swap.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::conf_files::includes_to_append;
use crate::error::{Result, SupervisorError};
use crate::observation::PostmasterState;
use crate::os_process::{is_frozen, matches_pid_file};
use crate::os_user::OsUser;
use crate::pid_file::{parse_pid_file, PidFile};

/// What a data directory path currently holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDirContents {
    /// Nothing at that path.
    Missing,
    /// An empty directory.
    Empty,
    /// A PostgreSQL cluster (`PG_VERSION` present).
    Cluster,
    /// Something else; never touched.
    Other(String),
}

/// A data directory path with the operations pgquorum performs on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// Wraps a path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DataDir { path: path.into() }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sibling path (same filesystem, so renames are atomic).
    pub fn sibling(&self, suffix: &str) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(suffix);
        PathBuf::from(s)
    }

    /// Inspects the path without changing anything.
    pub fn contents(&self) -> Result<DataDirContents> {
        let entries = match std::fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DataDirContents::Missing)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                return Ok(DataDirContents::Other("not a directory".into()))
            }
            Err(e) => {
                return Err(SupervisorError::io(
                    format!("read {}", self.path.display()),
                    e,
                ))
            }
        };
        let names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        Ok(if names.is_empty() {
            DataDirContents::Empty
        } else if names.iter().any(|n| n == "PG_VERSION") {
            DataDirContents::Cluster
        } else {
            DataDirContents::Other(format!("{} entries, no PG_VERSION", names.len()))
        })
    }

    /// Makes sure the path is an empty directory owned by `user`, mode 0700;
    /// refuses anything non-empty.
    pub fn prepare_empty(&self, user: &OsUser) -> Result<()> {
        match self.contents()? {
            DataDirContents::Missing => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&self.path)
                    .map_err(|e| {
                        SupervisorError::io(format!("create {}", self.path.display()), e)
                    })?;
            }
            DataDirContents::Empty => {}
            DataDirContents::Cluster => {
                return Err(SupervisorError::DataDirNotEmpty {
                    path: self.path.clone(),
                    detail: "it already holds a PostgreSQL cluster".into(),
                })
            }
            DataDirContents::Other(detail) => {
                return Err(SupervisorError::DataDirNotEmpty {
                    path: self.path.clone(),
                    detail,
                })
            }
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| SupervisorError::io(format!("chmod {}", self.path.display()), e))?;
        user.chown(&self.path)
    }

    /// Writes `name` atomically (temp file + rename), mode 0600, owned by
    /// `user`: a crash never leaves a half-written config.
    pub fn write_file(&self, name: &str, contents: &str, user: &OsUser) -> Result<()> {
        let target = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.pgq-tmp"));
        let ctx = |what: &str| format!("{what} {}", target.display());
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| SupervisorError::io(ctx("write"), e))?;
            f.write_all(contents.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| SupervisorError::io(ctx("write"), e))?;
        }
        user.chown(&tmp)?;
        std::fs::rename(&tmp, &target).map_err(|e| SupervisorError::io(ctx("rename into"), e))
    }

    /// Appends pgquorum's include lines to `postgresql.conf` once.
    pub fn ensure_includes(&self, user: &OsUser) -> Result<()> {
        let path = self.path.join("postgresql.conf");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SupervisorError::io(format!("read {}", path.display()), e))?;
        if let Some(add) = includes_to_append(&text) {
            self.write_file("postgresql.conf", &format!("{text}{add}"), user)?;
        }
        Ok(())
    }

    /// Creates or removes `standby.signal`.
    pub fn set_standby_signal(&self, on: bool, user: &OsUser) -> Result<()> {
        let path = self.path.join("standby.signal");
        if on {
            self.write_file("standby.signal", "", user)
        } else {
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(SupervisorError::io(format!("remove {}", path.display()), e)),
            }
        }
    }

    /// Major version from `PG_VERSION`.
    pub fn major_version(&self) -> Result<u32> {
        let path = self.path.join("PG_VERSION");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SupervisorError::io(format!("read {}", path.display()), e))?;
        let major = text.trim().split('.').next().unwrap_or("");
        major.parse().map_err(|_| SupervisorError::Parse {
            what: path.display().to_string(),
            detail: format!("unexpected content {:?}", text.trim()),
        })
    }

    /// True if `standby.signal` exists.
    pub fn has_standby_signal(&self) -> bool {
        self.path.join("standby.signal").exists()
    }

    /// Parsed `postmaster.pid`, if present and complete.
    pub fn pid_file(&self) -> Option<PidFile> {
        let text = std::fs::read_to_string(self.path.join("postmaster.pid")).ok()?;
        parse_pid_file(&text)
    }

    /// The postmaster as the lock file and `/proc` describe it.
    pub fn postmaster_state(&self) -> PostmasterState {
        match self.pid_file() {
            None => PostmasterState::NotRunning,
            Some(pf) if matches_pid_file(pf.pid, pf.start_time) => PostmasterState::Running {
                pid: pf.pid,
                frozen: is_frozen(pf.pid),
            },
            Some(pf) => PostmasterState::Dead { pid: pf.pid },
        }
    }

    /// Atomically exchanges this directory with `replacement` (Linux
    /// `renameat2(RENAME_EXCHANGE)`), so there is always a data directory at
    /// this path; afterwards `replacement` holds the old contents.
    pub fn exchange_with(&self, replacement: &Path) -> Result<()> {
        let a = cstring(&self.path)?;
        let b = cstring(replacement)?;
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them
        // relative to the cwd like rename(2).
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        Err(SupervisorError::io(
            format!(
                "exchange {} with {}",
                self.path.display(),
                replacement.display()
            ),
            err,
        ))
    }
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SupervisorError::Parse {
        what: "path".into(),
        detail: format!("{} contains NUL", p.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> OsUser {
        OsUser {
            name: "x".into(),
            uid: 0,
            gid: 0,
            home: "/".into(),
            switch: false,
        }
    }

    #[test]
    fn refuses_non_empty_dirs() {
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::new(t.path().join("data"));
        assert_eq!(d.contents().unwrap(), DataDirContents::Missing);
        d.prepare_empty(&me()).unwrap();
        assert_eq!(d.contents().unwrap(), DataDirContents::Empty);
        std::fs::write(d.path().join("keep.txt"), "x").unwrap();
        assert!(matches!(
            d.prepare_empty(&me()),
            Err(SupervisorError::DataDirNotEmpty { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(d.path().join("keep.txt")).unwrap(),
            "x"
        );
        std::fs::write(d.path().join("PG_VERSION"), "15").unwrap();
        assert_eq!(d.contents().unwrap(), DataDirContents::Cluster);
    }

    #[test]
    fn exchange_swaps_atomically() {
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::new(t.path().join("data"));
        let new = d.sibling(".new");
        std::fs::create_dir(d.path()).unwrap();
        std::fs::create_dir(&new).unwrap();
        std::fs::write(d.path().join("old"), "").unwrap();
        std::fs::write(new.join("fresh"), "").unwrap();
        d.exchange_with(&new).unwrap();
        assert!(d.path().join("fresh").exists());
        assert!(new.join("old").exists());
    }

    #[test]
    fn writes_files_and_includes_once() {
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::new(t.path());
        std::fs::write(t.path().join("postgresql.conf"), "port = 1\n").unwrap();
        d.ensure_includes(&me()).unwrap();
        d.ensure_includes(&me()).unwrap();
        let text = std::fs::read_to_string(t.path().join("postgresql.conf")).unwrap();
        assert_eq!(
            text.matches("include_if_exists = 'pgquorum.conf'").count(),
            1
        );
        assert!(d.postmaster_state() == PostmasterState::NotRunning);
        std::fs::write(t.path().join("PG_VERSION"), "15\n").unwrap();
        assert_eq!(d.major_version().unwrap(), 15);
        d.set_standby_signal(true, &me()).unwrap();
        assert!(d.has_standby_signal());
        d.set_standby_signal(false, &me()).unwrap();
        assert!(!d.has_standby_signal());
    }
}
