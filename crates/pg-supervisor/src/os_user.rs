//! The unprivileged OS user that PostgreSQL processes run as.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use crate::error::{Result, SupervisorError};

/// Default name of the OS user owning PostgreSQL when the sidecar is root.
pub const DEFAULT_POSTGRES_USER: &str = "postgres";

/// Who PostgreSQL commands run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory, given to child processes as `HOME`.
    pub home: PathBuf,
    /// True when we must switch to this user (the sidecar runs as root).
    pub switch: bool,
}

impl OsUser {
    /// Resolves the user PostgreSQL must run as: `configured` (default
    /// `postgres`) when we are root, else the current user, since only root
    /// can switch users.
    pub fn resolve(configured: Option<&str>) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid == 0 {
            let name = configured.unwrap_or(DEFAULT_POSTGRES_USER);
            let user = lookup_by_name(name)?.ok_or_else(|| {
                SupervisorError::RootUser(format!("OS user '{name}' does not exist"))
            })?;
            if user.uid == 0 {
                return Err(SupervisorError::RootUser(format!(
                    "postgres_user '{name}' is root"
                )));
            }
            Ok(OsUser {
                switch: true,
                ..user
            })
        } else {
            let user = lookup_by_uid(euid)?
                .ok_or_else(|| SupervisorError::UnknownUser(format!("uid {euid}")))?;
            Ok(OsUser {
                switch: false,
                ..user
            })
        }
    }

    /// Gives `path` to this user when we are root; a no-op otherwise.
    pub fn chown(&self, path: &Path) -> Result<()> {
        if !self.switch {
            return Ok(());
        }
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(|e| SupervisorError::io(format!("chown {}", path.display()), e))
    }

    /// Gives a whole tree to this user; used after tools run as root.
    pub fn chown_tree(&self, path: &Path) -> Result<()> {
        if !self.switch {
            return Ok(());
        }
        self.chown(path)?;
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| SupervisorError::io(format!("stat {}", path.display()), e))?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| SupervisorError::io(format!("read {}", path.display()), e))?;
            for entry in entries {
                let entry = entry
                    .map_err(|e| SupervisorError::io(format!("read {}", path.display()), e))?;
                self.chown_tree(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn lookup_by_name(name: &str) -> Result<Option<OsUser>> {
    let cname = CString::new(name).map_err(|_| SupervisorError::UnknownUser(name.to_string()))?;
    lookup(&|pwd, buf, len, result| {
        // SAFETY: all pointers are valid for the duration of the call.
        unsafe { libc::getpwnam_r(cname.as_ptr(), pwd, buf, len, result) }
    })
}

fn lookup_by_uid(uid: u32) -> Result<Option<OsUser>> {
    lookup(&|pwd, buf, len, result| {
        // SAFETY: all pointers are valid for the duration of the call.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
    })
}

type PwLookup<'a> = dyn Fn(*mut libc::passwd, *mut libc::c_char, libc::size_t, *mut *mut libc::passwd) -> libc::c_int
    + 'a;

fn lookup(call: &PwLookup<'_>) -> Result<Option<OsUser>> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; zeroed is a valid initial state.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
    if rc != 0 {
        return Err(SupervisorError::io(
            "looking up OS user",
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    if result.is_null() {
        return Ok(None);
    }
    // SAFETY: getpw*_r succeeded, so the strings point into `buf`, NUL-terminated.
    let (name, home) = unsafe {
        (
            CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned(),
            CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned(),
        )
    };
    Ok(Some(OsUser {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: PathBuf::from(home),
        switch: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_a_non_root_user_when_root() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let me = OsUser::resolve(None).unwrap();
            assert!(!me.switch);
            return;
        }
        let user = OsUser::resolve(None).unwrap();
        assert_eq!(user.name, "postgres");
        assert_ne!(user.uid, 0);
        assert!(user.switch);
    }

    #[test]
    fn refuses_root_and_unknown_users() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let err = OsUser::resolve(Some("root")).unwrap_err().to_string();
        assert!(err.contains("cannot run PostgreSQL as root"), "{err}");
        let err = OsUser::resolve(Some("no-such-user-pgq"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
