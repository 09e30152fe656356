//! Postgres settings as cluster configuration: parameters (`postgresql.parameters.<name>`) and
//! extra `pg_hba.conf` lines (`postgresql.pg_hba`), committed through Raft with the rest of the
//! configuration and applied by every member (a reload, or a restart where Postgres says so).
//! Pure: validation and the change of the committed set.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Prefix of a parameter's key in `config set`.
pub const PARAMETER_PREFIX: &str = "postgresql.parameters.";
/// Key of the extra `pg_hba.conf` lines in `config set` (one line per text line).
pub const HBA_KEY: &str = "postgresql.pg_hba";

/// Parameters pgquorum sets itself: replication, failover and the fence depend on them.
const MANAGED: &[&str] = &[
    "listen_addresses",
    "port",
    "wal_level",
    "hot_standby",
    "wal_log_hints",
    "full_page_writes",
    "recovery_target_timeline",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
    "wal_sender_timeout",
    "wal_receiver_timeout",
    "password_encryption",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "include",
    "include_dir",
    "include_if_exists",
];

/// The committed Postgres settings of every member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgSettings {
    /// Parameter name to value, as `postgresql.conf` takes it.
    pub parameters: BTreeMap<String, String>,
    /// Lines appended to pgquorum's own `pg_hba.conf` lines.
    pub hba: Vec<String>,
}

/// Whether `key` belongs to the Postgres settings rather than to pgquorum's own.
pub fn is_pg_key(key: &str) -> bool {
    key.starts_with(PARAMETER_PREFIX) || key == HBA_KEY
}

impl PgSettings {
    /// A copy with `changes` (only Postgres keys) applied, or the first problem, naming the
    /// fix. An empty value removes a parameter; `postgresql.pg_hba` replaces every extra line.
    pub fn with_changes(&self, changes: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut next = self.clone();
        for (key, value) in changes {
            if key == HBA_KEY {
                next.hba = value
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
                for line in &next.hba {
                    check_hba_line(line)?;
                }
                continue;
            }
            let Some(name) = key.strip_prefix(PARAMETER_PREFIX) else {
                return Err(format!("'{key}' is not a Postgres setting"));
            };
            check_parameter(name, value)?;
            if value.trim().is_empty() {
                next.parameters.remove(name);
            } else {
                next.parameters
                    .insert(name.to_string(), value.trim().to_string());
            }
        }
        Ok(next)
    }

    /// The settings as `config show` lists them.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self
            .parameters
            .iter()
            .map(|(k, v)| (format!("{PARAMETER_PREFIX}{k}"), v.clone()))
            .collect();
        if !self.hba.is_empty() {
            out.insert(HBA_KEY.to_string(), self.hba.join("\n"));
        }
        out
    }

    /// The parameters as `(name, value)` pairs for the instance.
    pub fn parameter_pairs(&self) -> Vec<(String, String)> {
        self.parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn check_parameter(name: &str, value: &str) -> Result<(), String> {
    let key = format!("{PARAMETER_PREFIX}{name}");
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    if !valid {
        return Err(format!(
            "'{key}': '{name}' is not a Postgres parameter name (lower-case letters, digits, '_' \
             and '.')"
        ));
    }
    if MANAGED.contains(&name) {
        return Err(format!(
            "'{key}': pgquorum manages {name} itself (replication, failover and fencing depend \
             on it); it cannot be set here"
        ));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(format!("'{key}': the value must be one line"));
    }
    Ok(())
}

fn check_hba_line(line: &str) -> Result<(), String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let kinds = [
        "local",
        "host",
        "hostssl",
        "hostnossl",
        "hostgssenc",
        "hostnogssenc",
    ];
    let Some(kind) = fields.first() else {
        return Ok(());
    };
    if kind.starts_with('#') {
        return Ok(());
    }
    if !kinds.contains(kind) {
        return Err(format!(
            "'{HBA_KEY}': '{line}' does not start with a connection type ({})",
            kinds.join(", ")
        ));
    }
    let min = if *kind == "local" { 4 } else { 5 };
    if fields.len() < min {
        return Err(format!(
            "'{HBA_KEY}': '{line}' needs TYPE DATABASE USER {}METHOD",
            if *kind == "local" { "" } else { "ADDRESS " }
        ));
    }
    // Password-less network access defeats the point of a fenced, single writer.
    if *kind != "local" && fields[min - 1] == "trust" {
        return Err(format!(
            "'{HBA_KEY}': '{line}' uses trust over the network; use scram-sha-256"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(k: &str, v: &str) -> BTreeMap<String, String> {
        [(k.to_string(), v.to_string())].into()
    }

    #[test]
    fn parameters_are_set_removed_and_refused_with_a_reason() {
        let s = PgSettings::default();
        let s = s
            .with_changes(&change("postgresql.parameters.work_mem", "64MB"))
            .unwrap();
        assert_eq!(s.parameters["work_mem"], "64MB");
        assert_eq!(s.to_map()["postgresql.parameters.work_mem"], "64MB");
        let gone = s
            .with_changes(&change("postgresql.parameters.work_mem", ""))
            .unwrap();
        assert!(gone.parameters.is_empty());
        for (k, v, why) in [
            ("postgresql.parameters.port", "5433", "manages port"),
            (
                "postgresql.parameters.Work-Mem",
                "1",
                "not a Postgres parameter",
            ),
            ("postgresql.parameters.work_mem", "1\n2", "one line"),
        ] {
            let e = s.with_changes(&change(k, v)).unwrap_err();
            assert!(e.contains(why), "{k}: {e}");
        }
    }

    #[test]
    fn hba_lines_replace_the_extras_and_trust_over_the_network_is_refused() {
        let s = PgSettings::default()
            .with_changes(&change(
                HBA_KEY,
                "host all app 10.0.0.0/8 scram-sha-256\n\nlocal all all peer",
            ))
            .unwrap();
        assert_eq!(s.hba.len(), 2);
        for (line, why) in [
            ("host all all 0.0.0.0/0 trust", "trust"),
            ("hots all all 1.2.3.4/32 md5", "connection type"),
            ("host all all", "needs TYPE"),
        ] {
            let e = s.with_changes(&change(HBA_KEY, line)).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
        let cleared = s.with_changes(&change(HBA_KEY, "")).unwrap();
        assert!(cleared.hba.is_empty());
    }
}
