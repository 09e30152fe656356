//! Whether the primary can write, and how much room its filesystems have. A server can be up,
//! answer `SELECT 1` and still refuse every write: its disk is full, its storage went read-only,
//! or its I/O hangs. The probe proves a write each tick and this module names what it found.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Below this many free bytes on the data or the WAL filesystem, Postgres fails the next write
/// that needs a new page (8 KiB) or a new WAL segment, and a busy server needs several at once:
/// the probe reports the primary as out of space even when its own small write got through.
pub const NO_SPACE_BYTES: u64 = 1024 * 1024;

/// Room on one filesystem, from `statvfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsSpace {
    /// Bytes an unprivileged user (Postgres) may still allocate.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Mounted read-only.
    pub read_only: bool,
}

/// `statvfs` of `path`, read-only by it or by `mountinfo` (the text of
/// `/proc/self/mountinfo`, read once by the caller for all its paths); `None` when it fails (no
/// such path). It never writes, so it answers on a full or frozen filesystem too.
pub fn fs_space(path: &Path, mountinfo: &str) -> Option<FsSpace> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` writes only into the struct we pass, and `c` is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return None;
    }
    let unit = s.f_frsize as u64;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Some(FsSpace {
        free_bytes: (s.f_bavail as u64).saturating_mul(unit),
        total_bytes: (s.f_blocks as u64).saturating_mul(unit),
        read_only: s.f_flag & libc::ST_RDONLY != 0 || mounted_read_only(mountinfo, &canonical),
    })
}

/// Whether the mount holding `path` (canonical) is read-only by `/proc/self/mountinfo`: its
/// mount options or its filesystem's say `ro`, or the filesystem fell read-only after an error
/// (ext4's `emergency_ro`, which `statvfs` does not report).
pub fn mounted_read_only(mountinfo: &str, path: &Path) -> bool {
    let best = mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fields: Vec<&str> = mount.split(' ').collect();
            let point = fields.get(4)?.replace("\\040", " ");
            let opts = fields.get(5).copied().unwrap_or("");
            let super_opts = fs.split(' ').nth(2).unwrap_or("");
            path.starts_with(&point)
                .then_some((point.len(), opts, super_opts))
        })
        .max_by_key(|(len, _, _)| *len);
    best.is_some_and(|(_, opts, super_opts)| {
        opts.split(',').any(|o| o == "ro")
            || super_opts
                .split(',')
                .any(|o| o == "ro" || o == "emergency_ro")
    })
}

/// What the primary's write probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum WriteCheck {
    /// The write committed and flushed within the bound, with room to spare.
    Ok,
    /// Cannot write: a filesystem is (about to be) full.
    NoSpace {
        /// What said so.
        detail: String,
    },
    /// Cannot write: storage refuses writes (mounted or fallen read-only).
    ReadOnly {
        /// What said so.
        detail: String,
    },
    /// The write did not finish within the bound (stuck I/O); it is still running.
    Stuck {
        /// How long it has been running.
        running_ms: u64,
    },
    /// The write failed for another reason.
    Failed {
        /// The error.
        detail: String,
    },
}

impl WriteCheck {
    /// Whether the primary can write.
    pub fn is_ok(&self) -> bool {
        *self == WriteCheck::Ok
    }

    /// A short name for displays and reports: `ok`, `no_space`, `read_only`, `stuck`, `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            WriteCheck::Ok => "ok",
            WriteCheck::NoSpace { .. } => "no_space",
            WriteCheck::ReadOnly { .. } => "read_only",
            WriteCheck::Stuck { .. } => "stuck",
            WriteCheck::Failed { .. } => "failed",
        }
    }
}

/// The write probe's result and its cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteProbe {
    /// What it found.
    pub check: WriteCheck,
    /// How long this tick's probe waited for it.
    pub ms: u64,
}

/// How the write itself ended, before classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteEnd {
    /// Committed.
    Done,
    /// Failed with this error text.
    Error(String),
    /// Still running after this long.
    Running(Duration),
}

/// Names what a write probe found, from how the write ended and the room on the data and WAL
/// filesystems. Pure.
pub fn classify(end: &WriteEnd, data: Option<FsSpace>, wal: Option<FsSpace>) -> WriteCheck {
    let spaces = [("data directory", data), ("WAL directory", wal)];
    if let Some((what, _)) = spaces.iter().find(|(_, s)| s.is_some_and(|s| s.read_only)) {
        return WriteCheck::ReadOnly {
            detail: format!("the {what}'s filesystem is mounted read-only"),
        };
    }
    match end {
        WriteEnd::Error(e) if is_no_space(e) => {
            return WriteCheck::NoSpace { detail: e.clone() };
        }
        WriteEnd::Error(e) if e.contains("Read-only file system") => {
            return WriteCheck::ReadOnly { detail: e.clone() };
        }
        _ => {}
    }
    if let Some((what, Some(s))) = spaces
        .iter()
        .find(|(_, s)| s.is_some_and(|s| s.free_bytes < NO_SPACE_BYTES))
    {
        return WriteCheck::NoSpace {
            detail: format!(
                "only {} bytes free on the {what}'s filesystem (below {NO_SPACE_BYTES})",
                s.free_bytes
            ),
        };
    }
    match end {
        WriteEnd::Done => WriteCheck::Ok,
        WriteEnd::Error(e) => WriteCheck::Failed { detail: e.clone() },
        WriteEnd::Running(d) => WriteCheck::Stuck {
            running_ms: d.as_millis() as u64,
        },
    }
}

fn is_no_space(e: &str) -> bool {
    e.contains("No space left on device") || e.contains("53100") || e.contains("Disk quota")
}

/// A write probe still running from an earlier tick: a backend stuck in the kernel cannot be
/// cancelled, so a new probe each tick would pile up one stuck backend per tick until the
/// connection slots run out. While one runs, no other starts.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Mutex<Option<Instant>>>);

impl InFlight {
    /// When the running write started, if one runs.
    pub fn since(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a write as started now; false when one already runs.
    pub fn start(&self) -> bool {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return false;
        }
        *g = Some(Instant::now());
        true
    }

    /// Marks the running write as ended.
    pub fn end(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(free: u64) -> Option<FsSpace> {
        Some(FsSpace {
            free_bytes: free,
            total_bytes: 100 << 20,
            read_only: false,
        })
    }

    #[test]
    fn a_committed_write_with_room_is_ok() {
        assert_eq!(
            classify(&WriteEnd::Done, room(50 << 20), room(50 << 20)),
            WriteCheck::Ok
        );
        // Nothing known about the filesystems: the write itself decides.
        assert_eq!(classify(&WriteEnd::Done, None, None), WriteCheck::Ok);
    }

    #[test]
    fn enospc_and_a_nearly_full_filesystem_are_no_space() {
        let e = WriteEnd::Error(
            "could not extend file \"base/5/16384\": No space left on device".into(),
        );
        assert_eq!(classify(&e, room(50 << 20), None).kind(), "no_space");
        // The WAL-only heartbeat still commits on a full data filesystem.
        let c = classify(&WriteEnd::Done, room(4096), room(50 << 20));
        assert_eq!(c.kind(), "no_space", "{c:?}");
        assert!(format!("{c:?}").contains("data directory"), "{c:?}");
        let c = classify(&WriteEnd::Done, room(50 << 20), room(0));
        assert!(format!("{c:?}").contains("WAL directory"), "{c:?}");
    }

    #[test]
    fn read_only_storage_is_named_as_such() {
        let e = WriteEnd::Error(
            "could not open file \"pg_stat_tmp/pgquorum_write_probe\" for writing: Read-only \
             file system"
                .into(),
        );
        assert_eq!(classify(&e, room(50 << 20), None).kind(), "read_only");
        let ro = Some(FsSpace {
            read_only: true,
            ..room(50 << 20).unwrap()
        });
        assert_eq!(classify(&WriteEnd::Done, ro, None).kind(), "read_only");
    }

    #[test]
    fn a_write_still_running_is_stuck_and_other_errors_are_failures() {
        let c = classify(
            &WriteEnd::Running(Duration::from_millis(700)),
            room(50 << 20),
            None,
        );
        assert_eq!(c, WriteCheck::Stuck { running_ms: 700 });
        let c = classify(&WriteEnd::Error("permission denied".into()), None, None);
        assert_eq!(c.kind(), "failed");
        assert!(!c.is_ok());
    }

    #[test]
    fn one_write_in_flight_at_a_time() {
        let f = InFlight::default();
        assert!(f.start());
        assert!(!f.start());
        assert!(f.since().is_some());
        f.end();
        assert!(f.since().is_none());
        assert!(f.start());
    }

    #[test]
    fn read_only_mounts_from_mountinfo() {
        let info = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
                    44 22 7:0 / /srv/pg rw,relatime - ext4 /dev/loop0 rw,errors=remount-ro,emergency_ro\n\
                    45 22 7:1 / /srv/ro ro,relatime - ext4 /dev/loop1 ro\n\
                    46 22 7:2 / /srv/pg\\040two rw - tmpfs tmpfs rw\n";
        assert!(mounted_read_only(info, Path::new("/srv/pg/data")));
        assert!(mounted_read_only(info, Path::new("/srv/ro")));
        assert!(!mounted_read_only(info, Path::new("/var/lib/postgresql")));
        assert!(!mounted_read_only(info, Path::new("/srv/pg two/data")));
        assert!(!mounted_read_only("", Path::new("/srv/pg")));
    }

    #[test]
    fn statvfs_of_a_real_directory() {
        let dir = std::env::temp_dir();
        let s = fs_space(&dir, "").expect("statvfs of the temp dir");
        assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes, "{s:?}");
        assert!(fs_space(Path::new("/no/such/path/pgquorum"), "").is_none());
    }
}
