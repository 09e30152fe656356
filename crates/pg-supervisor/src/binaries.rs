//! Finding the PostgreSQL executables.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Result, SupervisorError};

/// Executables this crate runs; all must live in one directory so that
/// versions cannot be mixed.
pub const REQUIRED_EXECUTABLES: &[&str] = &[
    "initdb",
    "postgres",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
];

const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The directory holding one PostgreSQL installation's executables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    bin_dir: PathBuf,
}

impl PgBinaries {
    /// Uses `configured` if given, else `pg_config --bindir`, else the
    /// newest `/usr/lib/postgresql/<major>/bin`.
    pub fn discover(configured: Option<&Path>) -> Result<Self> {
        let mut searched = Vec::new();
        let candidates: Vec<PathBuf> = match configured {
            Some(dir) => vec![dir.to_path_buf()],
            None => {
                let mut c = Vec::new();
                if let Some(dir) = pg_config_bindir() {
                    c.push(dir);
                }
                if let Some(dir) = newest_debian_bindir(Path::new(DEBIAN_ROOT)) {
                    c.push(dir);
                }
                c
            }
        };
        let mut best_missing: Option<Vec<String>> = None;
        for dir in candidates {
            searched.push(dir.display().to_string());
            let missing = missing_in(&dir);
            if missing.is_empty() {
                return Ok(PgBinaries { bin_dir: dir });
            }
            let fewer = match &best_missing {
                Some(m) => missing.len() < m.len(),
                None => true,
            };
            if fewer {
                best_missing = Some(missing);
            }
        }
        if searched.is_empty() {
            searched.push(format!("pg_config --bindir, {DEBIAN_ROOT}/<major>/bin"));
        }
        Err(SupervisorError::BinariesMissing {
            missing: best_missing
                .unwrap_or_else(|| REQUIRED_EXECUTABLES.iter().map(|s| s.to_string()).collect()),
            searched: searched.join(", "),
        })
    }

    /// The directory of the executables.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Full path of one executable.
    pub fn path(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

fn missing_in(dir: &Path) -> Vec<String> {
    REQUIRED_EXECUTABLES
        .iter()
        .filter(|name| !is_executable(&dir.join(name)))
        .map(|s| s.to_string())
        .collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let dir = text.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Picks the highest numeric major version directory under `root`.
fn newest_debian_bindir(root: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    let names = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok());
    newest_major(names).map(|major| root.join(major).join("bin"))
}

fn newest_major(names: impl Iterator<Item = String>) -> Option<String> {
    names
        .filter_map(|n| {
            let v: f64 = n.parse().ok()?;
            Some((v, n))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_major_prefers_highest_number() {
        let names = ["9.6", "15", "13", "common", "16"].map(String::from);
        assert_eq!(newest_major(names.into_iter()), Some("16".to_string()));
    }

    #[test]
    fn configured_dir_without_binaries_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = PgBinaries::discover(Some(dir.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("initdb"), "{text}");
        assert!(text.contains("apt-get install"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }
}
