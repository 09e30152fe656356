//! What one look at PostgreSQL reveals; sent to peers as JSON.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::storage::{FsSpace, WriteProbe};

/// A WAL position; serialised in PostgreSQL's `X/X` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("bad LSN {s}"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("bad LSN {s}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("bad LSN {s}"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("bad LSN {s}"));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<tokio_postgres::types::PgLsn> for Lsn {
    fn from(l: tokio_postgres::types::PgLsn) -> Self {
        Lsn(u64::from(l))
    }
}

/// Whether the server accepts writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not in recovery: accepts writes.
    Primary,
    /// In recovery (hot standby).
    Replica,
}

/// The postmaster process as seen from the OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum PostmasterState {
    /// No `postmaster.pid`.
    NotRunning,
    /// `postmaster.pid` names a process that is gone (crash, kill -9).
    Dead {
        /// The stale pid.
        pid: i32,
    },
    /// The postmaster process exists.
    Running {
        /// Its pid.
        pid: i32,
        /// Stopped by SIGSTOP (or a debugger): it cannot answer.
        frozen: bool,
    },
}

impl PostmasterState {
    /// True if a postmaster process exists (even frozen).
    pub fn is_running(&self) -> bool {
        matches!(self, PostmasterState::Running { .. })
    }

    /// Pid of a live postmaster.
    pub fn pid(&self) -> Option<i32> {
        match self {
            PostmasterState::Running { pid, .. } => Some(*pid),
            _ => None,
        }
    }
}

/// The WAL receiver of a replica (`pg_stat_wal_receiver`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalReceiver {
    /// `streaming`, `starting`, `waiting`, ...
    pub status: String,
    /// Host it streams from.
    pub sender_host: Option<String>,
    /// Port it streams from.
    pub sender_port: Option<u16>,
    /// Slot it uses.
    pub slot_name: Option<String>,
    /// Timeline being received.
    pub received_tli: Option<u32>,
    /// Milliseconds since the last message from the upstream arrived,
    /// computed by the server on its own clock when the probe ran: unlike
    /// a timestamp it needs no clock comparison, and a copy of the
    /// observation cannot make an old message look recent.
    #[serde(default)]
    pub last_msg_receipt_age_ms: Option<u64>,
    /// Last WAL position flushed to disk by the receiver.
    #[serde(default)]
    pub flushed_lsn: Option<Lsn>,
}

/// One row of `pg_stat_replication` on a primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyReplication {
    /// `application_name`: the member name.
    pub name: String,
    /// Client address.
    pub client_addr: Option<String>,
    /// `streaming`, `catchup`, ...
    pub state: String,
    /// `async`, `sync`, `potential`, `quorum`.
    pub sync_state: String,
    /// Last WAL sent.
    pub sent_lsn: Option<Lsn>,
    /// Last WAL written by the standby.
    pub write_lsn: Option<Lsn>,
    /// Last WAL flushed by the standby.
    pub flush_lsn: Option<Lsn>,
    /// Last WAL replayed by the standby.
    pub replay_lsn: Option<Lsn>,
    /// Primary's current LSN minus `replay_lsn`.
    pub lag_bytes: Option<u64>,
}

/// One look at a member's PostgreSQL. SQL-derived fields are `None` when
/// the server did not answer; see `probe_error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// Wall-clock time of the observation, ms since the epoch.
    pub observed_at_unix_ms: u64,
    /// The postmaster process.
    pub postmaster: PostmasterState,
    /// Connect + `SELECT 1` worked within the timeouts.
    pub accepts_connections: bool,
    /// Why the SQL probe failed, if it did.
    pub probe_error: Option<String>,
    /// How long the probe took.
    pub probe_ms: u64,
    /// Primary or replica.
    pub role: Option<Role>,
    /// Current timeline (insert timeline on a primary, received/checkpoint
    /// timeline on a replica).
    pub timeline: Option<u32>,
    /// `pg_current_wal_lsn()` on a primary.
    pub current_lsn: Option<Lsn>,
    /// `pg_last_wal_receive_lsn()` on a replica.
    pub received_lsn: Option<Lsn>,
    /// `pg_last_wal_replay_lsn()` on a replica.
    pub replayed_lsn: Option<Lsn>,
    /// The WAL receiver, on a replica that has one.
    pub wal_receiver: Option<WalReceiver>,
    /// On a replica: received minus replayed bytes.
    pub replication_lag_bytes: Option<u64>,
    /// On a primary: its standbys.
    pub standbys: Vec<StandbyReplication>,
    /// Database system identifier.
    pub system_identifier: Option<u64>,
    /// On a primary: `synchronous_standby_names` in force (`""` when
    /// asynchronous). `None` on a replica, where it has no effect.
    #[serde(default)]
    pub synchronous_standby_names: Option<String>,
    /// On a primary: what the write probe found (heartbeat flush and a file write in the data
    /// directory).
    #[serde(default)]
    pub write_probe: Option<WriteProbe>,
    /// Room on the data directory's filesystem.
    #[serde(default)]
    pub data_fs: Option<FsSpace>,
    /// Room on the WAL directory's filesystem (the same as `data_fs` unless `pg_wal` is a link
    /// to another one).
    #[serde(default)]
    pub wal_fs: Option<FsSpace>,
}

impl Observation {
    /// A healthy answer: running and accepting connections.
    pub fn is_healthy(&self) -> bool {
        self.postmaster.is_running() && self.accepts_connections
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trip() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("zz".parse::<Lsn>().is_err());
        assert_eq!(serde_json::to_string(&l).unwrap(), "\"16/B374D848\"");
    }

    #[test]
    fn observation_json_round_trip() {
        let o = Observation {
            observed_at_unix_ms: 1,
            postmaster: PostmasterState::Running {
                pid: 10,
                frozen: false,
            },
            accepts_connections: true,
            probe_error: None,
            probe_ms: 3,
            role: Some(Role::Primary),
            timeline: Some(2),
            current_lsn: Some(Lsn(5)),
            received_lsn: None,
            replayed_lsn: None,
            wal_receiver: None,
            replication_lag_bytes: None,
            standbys: vec![],
            system_identifier: Some(u64::MAX),
            synchronous_standby_names: Some("ANY 1 (\"b\")".into()),
            write_probe: Some(WriteProbe {
                check: crate::storage::WriteCheck::NoSpace {
                    detail: "full".into(),
                },
                ms: 4,
            }),
            data_fs: Some(FsSpace {
                free_bytes: 1,
                total_bytes: 2,
                read_only: false,
            }),
            wal_fs: None,
        };
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<Observation>(&json).unwrap(), o);
        assert!(o.is_healthy());
    }

    #[test]
    fn wal_receiver_json_round_trip() {
        let w = WalReceiver {
            status: "streaming".into(),
            sender_host: Some("10.0.0.1".into()),
            sender_port: Some(5432),
            slot_name: Some("pgq_b".into()),
            received_tli: Some(3),
            last_msg_receipt_age_ms: Some(250),
            flushed_lsn: Some(Lsn(0x16_B374_D848)),
        };
        let json = serde_json::to_string(&w).unwrap();
        assert!(json.contains("\"flushed_lsn\":\"16/B374D848\""), "{json}");
        assert_eq!(serde_json::from_str::<WalReceiver>(&json).unwrap(), w);
    }

    #[test]
    fn json_of_older_peers_still_parses() {
        // Written before the receipt age, flushed LSN and sync names existed.
        let json = r#"{"observed_at_unix_ms":1,"postmaster":{"state":"not_running"},
            "accepts_connections":false,"probe_error":null,"probe_ms":0,"role":"replica",
            "timeline":1,"current_lsn":null,"received_lsn":"0/10","replayed_lsn":"0/10",
            "wal_receiver":{"status":"streaming","sender_host":"h","sender_port":1,
            "slot_name":null,"received_tli":1},"replication_lag_bytes":0,"standbys":[],
            "system_identifier":7}"#;
        let o: Observation = serde_json::from_str(json).unwrap();
        assert_eq!(o.synchronous_standby_names, None);
        let w = o.wal_receiver.unwrap();
        assert_eq!((w.last_msg_receipt_age_ms, w.flushed_lsn), (None, None));
    }
}
