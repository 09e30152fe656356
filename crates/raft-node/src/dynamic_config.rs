//! The cluster's dynamic configuration: timings and modes that every sidecar follows and that an
//! operator changes at run time through a committed `SetConfig` entry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Settings replicated through the Raft log. Every field has a default, so a cluster runs
/// without any `SetConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DynamicConfig {
    /// How often each sidecar probes its Postgres and reports to the leader.
    pub tick_ms: u64,
    /// Length of the primary's lease; the primary fences itself when it runs out. It must
    /// outlast a Raft election (about 1.0-1.2 s with the default Raft timings) plus a quorum
    /// confirmation and a report, or a leader change alone would fence a healthy primary.
    pub lease_ms: u64,
    /// Allowance for clock rate differences between holder and grantor of a lease.
    pub drift_margin_ms: u64,
    /// Consecutive failed probes of the primary before the leader fails over.
    pub failure_threshold: u32,
    /// A replica further behind than this many bytes of WAL is not a failover candidate.
    pub maximum_lag_on_failover: u64,
    /// Synchronous replication (design rule S6): which acknowledgements a commit on the primary
    /// waits for, and so which members a failover may promote.
    pub synchronous_mode: SyncMode,
    /// How many synchronous standbys acknowledge each commit (`ANY k` in Postgres' terms).
    pub synchronous_node_count: u32,
    /// Restart a crashed primary in place once before failing over.
    pub restart_before_failover: bool,
    /// A Raft leader on the primary's node hands leadership to another member, so that a crash
    /// of that host costs one lease and not an election plus a new leader's wait on top.
    pub leader_handoff: bool,
    /// A primary that runs but cannot write (a full disk, read-only storage, stuck I/O) for
    /// `failure_threshold` probes is failed over like a crashed one. Off, it stays primary and
    /// the cluster waits for an operator: no failover ever moves a primary whose disk merely
    /// filled, but nothing writes until someone frees space.
    pub failover_on_write_failure: bool,
    /// A replica with fewer free bytes on its data or WAL filesystem is not a failover
    /// candidate, and a member rejoins or clones only once it has this much room.
    pub failover_min_free_bytes: u64,
    /// How long a switchover or a manual failover may take, from when the leader started it,
    /// before it is cancelled: past it, a switchover whose target never caught up lets the
    /// usual failover rules choose among the members instead.
    pub switchover_timeout_ms: u64,
    /// The primary drops the replication slot of a member that is no longer in the cluster
    /// (removed, or renamed) once the slot has been unused and unknown this long.
    pub stale_slot_grace_ms: u64,
}

impl Default for DynamicConfig {
    fn default() -> Self {
        Self {
            tick_ms: 250,
            lease_ms: 2_500,
            drift_margin_ms: 200,
            failure_threshold: 3,
            maximum_lag_on_failover: 1024 * 1024,
            synchronous_mode: SyncMode::On,
            synchronous_node_count: 1,
            restart_before_failover: false,
            leader_handoff: true,
            failover_on_write_failure: true,
            failover_min_free_bytes: 64 * 1024 * 1024,
            switchover_timeout_ms: 10_000,
            stale_slot_grace_ms: 300_000,
        }
    }
}

/// Synchronous replication modes, as Patroni's users know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Asynchronous: a primary cut off by the network acknowledges writes until its lease ends,
    /// and a failover loses them.
    Off,
    /// Each commit waits for `synchronous_node_count` standbys; when no standby qualifies the
    /// cluster commits a fall-back to asynchronous replication rather than block writes.
    On,
    /// Like `on`, but never falls back: with too few standbys, writes block.
    Strict,
    /// Each commit waits for any `synchronous_node_count` of all eligible standbys
    /// (`ANY k (...)`); a failover promotes the most advanced of enough of them to overlap every
    /// possible set of acknowledgers. Never falls back to asynchronous.
    Quorum,
}

impl SyncMode {
    fn parse(key: &str, value: &str) -> Result<Self, ConfigError> {
        Ok(match value.to_ascii_lowercase().as_str() {
            "off" | "false" => SyncMode::Off,
            "on" | "true" => SyncMode::On,
            "strict" => SyncMode::Strict,
            "quorum" => SyncMode::Quorum,
            _ => {
                return Err(ConfigError::BadValue {
                    key: key.to_string(),
                    value: value.to_string(),
                    expected: "one of off, on, strict, quorum",
                })
            }
        })
    }

    /// Whether commits wait for standbys at all.
    pub fn is_synchronous(self) -> bool {
        self != SyncMode::Off
    }

    /// Whether the cluster may commit a fall-back to asynchronous replication.
    pub fn may_fall_back(self) -> bool {
        self == SyncMode::On
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Off => "off",
            SyncMode::On => "on",
            SyncMode::Strict => "strict",
            SyncMode::Quorum => "quorum",
        })
    }
}

// Stored states written before the modes existed hold a bool: `false` stays off.
impl<'de> Deserialize<'de> for SyncMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(b) => Ok(if b { SyncMode::On } else { SyncMode::Off }),
            Raw::Text(t) => SyncMode::parse("synchronous_mode", &t)
                .map_err(|e| serde::de::Error::custom(e.to_string())),
        }
    }
}

/// Why a configuration change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The key names no setting.
    #[error("unknown setting '{key}'; known settings: {known}")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// Comma-separated list of valid keys.
        known: String,
    },
    /// The value does not parse as the setting's type.
    #[error("setting '{key}': '{value}' is not {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What was expected, e.g. "a whole number of milliseconds".
        expected: &'static str,
    },
    /// The value parses but is outside what the cluster can run with.
    #[error("setting '{key}' = {value}: {why}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// The rule it breaks.
        why: String,
    },
    /// An empty change set.
    #[error("no settings given; pass at least one key=value")]
    Empty,
}

/// Names of all settings, in display order.
pub const KEYS: &[&str] = &[
    "tick_ms",
    "lease_ms",
    "drift_margin_ms",
    "failure_threshold",
    "maximum_lag_on_failover",
    "synchronous_mode",
    "synchronous_node_count",
    "restart_before_failover",
    "leader_handoff",
    "failover_on_write_failure",
    "failover_min_free_bytes",
    "switchover_timeout_ms",
    "stale_slot_grace_ms",
];

impl DynamicConfig {
    /// Every setting rendered as text, keyed by name.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        KEYS.iter()
            .map(|k| (k.to_string(), self.get(k).unwrap_or_default()))
            .collect()
    }

    /// One setting rendered as text.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "tick_ms" => self.tick_ms.to_string(),
            "lease_ms" => self.lease_ms.to_string(),
            "drift_margin_ms" => self.drift_margin_ms.to_string(),
            "failure_threshold" => self.failure_threshold.to_string(),
            "maximum_lag_on_failover" => self.maximum_lag_on_failover.to_string(),
            "synchronous_mode" => self.synchronous_mode.to_string(),
            "synchronous_node_count" => self.synchronous_node_count.to_string(),
            "restart_before_failover" => self.restart_before_failover.to_string(),
            "leader_handoff" => self.leader_handoff.to_string(),
            "failover_on_write_failure" => self.failover_on_write_failure.to_string(),
            "failover_min_free_bytes" => self.failover_min_free_bytes.to_string(),
            "switchover_timeout_ms" => self.switchover_timeout_ms.to_string(),
            "stale_slot_grace_ms" => self.stale_slot_grace_ms.to_string(),
            _ => return None,
        })
    }

    /// Returns a copy with `changes` applied, or the first problem found. `self` is never
    /// modified, so a refused change set leaves no trace.
    pub fn with_changes(&self, changes: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        if changes.is_empty() {
            return Err(ConfigError::Empty);
        }
        let mut next = self.clone();
        for (key, value) in changes {
            let value = value.trim();
            match key.as_str() {
                "tick_ms" => next.tick_ms = parse_u64(key, value)?,
                "lease_ms" => next.lease_ms = parse_u64(key, value)?,
                "drift_margin_ms" => next.drift_margin_ms = parse_u64(key, value)?,
                "failure_threshold" => {
                    next.failure_threshold =
                        u32::try_from(parse_u64(key, value)?).map_err(|_| bad(key, value))?
                }
                "maximum_lag_on_failover" => next.maximum_lag_on_failover = parse_u64(key, value)?,
                "synchronous_mode" => next.synchronous_mode = SyncMode::parse(key, value)?,
                "synchronous_node_count" => {
                    next.synchronous_node_count =
                        u32::try_from(parse_u64(key, value)?).map_err(|_| bad(key, value))?
                }
                "restart_before_failover" => next.restart_before_failover = parse_bool(key, value)?,
                "leader_handoff" => next.leader_handoff = parse_bool(key, value)?,
                "failover_on_write_failure" => {
                    next.failover_on_write_failure = parse_bool(key, value)?
                }
                "failover_min_free_bytes" => next.failover_min_free_bytes = parse_u64(key, value)?,
                "switchover_timeout_ms" => next.switchover_timeout_ms = parse_u64(key, value)?,
                "stale_slot_grace_ms" => next.stale_slot_grace_ms = parse_u64(key, value)?,
                _ => {
                    return Err(ConfigError::UnknownKey {
                        key: key.clone(),
                        known: KEYS.join(", "),
                    })
                }
            }
        }
        next.validate()?;
        Ok(next)
    }

    /// Checks the rules that keep the lease arithmetic sound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |key: &str, value: u64, why: String| ConfigError::OutOfRange {
            key: key.to_string(),
            value: value.to_string(),
            why,
        };
        if !(50..=10_000).contains(&self.tick_ms) {
            return Err(range(
                "tick_ms",
                self.tick_ms,
                "must be between 50 and 10000".into(),
            ));
        }
        // A lease must survive a few lost reports, or one late packet fences a healthy primary.
        if self.lease_ms < 4 * self.tick_ms || self.lease_ms > 600_000 {
            return Err(range(
                "lease_ms",
                self.lease_ms,
                format!(
                    "must be at least 4 x tick_ms ({}) and at most 600000",
                    4 * self.tick_ms
                ),
            ));
        }
        if self.drift_margin_ms >= self.lease_ms {
            return Err(range(
                "drift_margin_ms",
                self.drift_margin_ms,
                format!("must be below lease_ms ({})", self.lease_ms),
            ));
        }
        if !(1..=6).contains(&self.synchronous_node_count) {
            return Err(range(
                "synchronous_node_count",
                u64::from(self.synchronous_node_count),
                "must be between 1 and 6 (a cluster has at most 7 members)".into(),
            ));
        }
        // A clean shutdown writes a checkpoint and waits for the standbys to flush it.
        if !(1_000..=600_000).contains(&self.switchover_timeout_ms) {
            return Err(range(
                "switchover_timeout_ms",
                self.switchover_timeout_ms,
                "must be between 1000 and 600000".into(),
            ));
        }
        if !(1..=100).contains(&self.failure_threshold) {
            return Err(range(
                "failure_threshold",
                u64::from(self.failure_threshold),
                "must be between 1 and 100".into(),
            ));
        }
        Ok(())
    }
}

fn bad(key: &str, value: &str) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        expected: "a whole number",
    }
}

fn parse_u64(key: &str, value: &str) -> Result<u64, ConfigError> {
    value.parse().map_err(|_| bad(key, value))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(ConfigError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            expected: "true or false",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        DynamicConfig::default().validate().unwrap();
    }

    #[test]
    fn applies_known_settings() {
        let c = DynamicConfig::default()
            .with_changes(&changes(&[
                ("lease_ms", "3000"),
                ("synchronous_mode", "on"),
            ]))
            .unwrap();
        assert_eq!(c.lease_ms, 3000);
        assert_eq!(c.synchronous_mode, SyncMode::On);
        let q = c
            .with_changes(&changes(&[
                ("synchronous_mode", "quorum"),
                ("synchronous_node_count", "2"),
            ]))
            .unwrap();
        assert_eq!(
            (q.synchronous_mode, q.synchronous_node_count),
            (SyncMode::Quorum, 2)
        );
        assert_eq!(q.to_map()["synchronous_mode"], "quorum");
        assert_eq!(c.to_map()["lease_ms"], "3000");
    }

    #[test]
    fn storage_settings_round_trip() {
        let c = DynamicConfig::default()
            .with_changes(&changes(&[
                ("failover_on_write_failure", "off"),
                ("failover_min_free_bytes", "1048576"),
            ]))
            .unwrap();
        assert!(!c.failover_on_write_failure);
        assert_eq!(c.failover_min_free_bytes, 1 << 20);
        assert_eq!(c.to_map()["failover_on_write_failure"], "false");
        assert!(DynamicConfig::default().failover_on_write_failure);
        assert!(matches!(
            c.with_changes(&changes(&[("failover_min_free_bytes", "lots")])),
            Err(ConfigError::BadValue { .. })
        ));
    }

    #[test]
    fn refuses_unknown_key_bad_value_and_range() {
        let base = DynamicConfig::default();
        assert!(matches!(
            base.with_changes(&changes(&[("lease", "1")])),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            base.with_changes(&changes(&[("lease_ms", "soon")])),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            base.with_changes(&changes(&[("lease_ms", "100")])),
            Err(ConfigError::OutOfRange { .. })
        ));
        assert!(matches!(
            base.with_changes(&changes(&[("synchronous_mode", "maybe")])),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            base.with_changes(&changes(&[("synchronous_node_count", "0")])),
            Err(ConfigError::OutOfRange { .. })
        ));
        assert_eq!(base.with_changes(&BTreeMap::new()), Err(ConfigError::Empty));
    }

    #[test]
    fn new_clusters_are_synchronous_and_old_stored_bools_still_load() {
        assert_eq!(DynamicConfig::default().synchronous_mode, SyncMode::On);
        let old: DynamicConfig = serde_json::from_str(r#"{"synchronous_mode": false}"#).unwrap();
        assert_eq!(old.synchronous_mode, SyncMode::Off);
        let new: DynamicConfig = serde_json::from_str(r#"{"synchronous_mode": "strict"}"#).unwrap();
        assert_eq!(new.synchronous_mode, SyncMode::Strict);
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<DynamicConfig>(&json).unwrap(), new);
    }

    #[test]
    fn refused_change_set_changes_nothing() {
        // The second key is bad: the first must not take effect either.
        let base = DynamicConfig::default();
        let r = base.with_changes(&changes(&[("lease_ms", "5000"), ("tick_ms", "1")]));
        assert!(r.is_err());
        assert_eq!(base, DynamicConfig::default());
    }
}
