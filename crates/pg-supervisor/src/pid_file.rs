//! `postmaster.pid`: the postmaster's lock file.

use serde::{Deserialize, Serialize};

/// The fields of `postmaster.pid` we use (see PostgreSQL's `pidfile.h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidFile {
    /// Postmaster pid.
    pub pid: i32,
    /// Postmaster start time, seconds since the epoch.
    pub start_time: i64,
    /// Port.
    pub port: Option<u16>,
    /// Readiness written by the postmaster (line 8), if present yet.
    pub status: Option<PmStatus>,
}

/// Postmaster readiness from line 8 of `postmaster.pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PmStatus {
    /// Still starting or in crash recovery.
    Starting,
    /// Shutting down.
    Stopping,
    /// Accepting connections as a primary.
    Ready,
    /// Accepting read-only connections as a hot standby.
    Standby,
}

/// Parses the file's text; `None` if the file is truncated or not ours.
pub fn parse_pid_file(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.lines().collect();
    let pid: i32 = lines.first()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let start_time: i64 = lines.get(2)?.trim().parse().ok()?;
    let port = lines.get(3).and_then(|l| l.trim().parse().ok());
    let status = lines.get(7).and_then(|l| match l.trim() {
        "starting" => Some(PmStatus::Starting),
        "stopping" => Some(PmStatus::Stopping),
        "ready" => Some(PmStatus::Ready),
        "standby" => Some(PmStatus::Standby),
        _ => None,
    });
    Some(PidFile {
        pid,
        start_time,
        port,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ready_pid_file() {
        let text = "4242\n/var/lib/pg\n1700000000\n5432\n\n127.0.0.1\n  5432001   3\nready   \n";
        let pf = parse_pid_file(text).unwrap();
        assert_eq!(pf.pid, 4242);
        assert_eq!(pf.start_time, 1_700_000_000);
        assert_eq!(pf.port, Some(5432));
        assert_eq!(pf.status, Some(PmStatus::Ready));
    }

    #[test]
    fn partial_file_has_no_status() {
        let pf = parse_pid_file("7\n/d\n1\n").unwrap();
        assert_eq!(pf.status, None);
        assert!(parse_pid_file("7\n").is_none());
        assert!(parse_pid_file("").is_none());
    }
}
