//! Rendering of the configuration files pgquorum manages. Pure text; the
//! data directory module writes them.

use serde::{Deserialize, Serialize};

use crate::config::{InstanceConfig, Upstream};
use crate::conninfo::{primary_conninfo, slot_name_for};

/// Node settings (port, HA parameters); rewritten on every start, clone and
/// rewind because `pg_basebackup` and `pg_rewind` copy the source's files.
pub const NODE_CONF: &str = "pgquorum.conf";
/// Default `max_slot_wal_keep_size`: WAL a member's slot may hold back on the primary.
pub const MAX_SLOT_WAL_KEEP_SIZE: &str = "8GB";
/// Replication source; rewritten by `follow`, emptied by `promote`.
pub const REPLICATION_CONF: &str = "pgquorum.replication.conf";
/// `synchronous_standby_names`; written by `apply_synchronous_standbys`,
/// reset to asynchronous by every clone and rewind (which copy the
/// source's), kept across restarts. Included last, so it wins.
pub const SYNC_CONF: &str = "pgquorum.sync.conf";

const INCLUDE_MARKER: &str = "# pgquorum includes";

/// Which standbys must confirm a commit: any `k` of `names` (quorum
/// commit). `k == 0` or no names means asynchronous replication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSpec {
    /// How many of `names` must confirm each commit.
    pub k: u32,
    /// Standby `application_name`s, i.e. member names.
    pub names: Vec<String>,
}

impl SyncSpec {
    /// The asynchronous spec (empty `synchronous_standby_names`).
    pub fn asynchronous() -> SyncSpec {
        SyncSpec::default()
    }

    /// The `synchronous_standby_names` value: `ANY k ("a", "b")`, names
    /// double-quoted (member names may hold characters the unquoted syntax
    /// rejects), sorted and deduplicated so that equal sets render equally;
    /// `""` when asynchronous.
    pub fn render(&self) -> String {
        if self.k == 0 || self.names.is_empty() {
            return String::new();
        }
        let mut names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        let quoted: Vec<String> = names
            .iter()
            .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
            .collect();
        format!("ANY {} ({})", self.k, quoted.join(", "))
    }
}

/// The contents of [`SYNC_CONF`] for `spec`.
pub fn render_sync_conf(spec: &SyncSpec) -> String {
    format!(
        "# Managed by pgquorum; the synchronous standbys the sidecar committed.\n\
         synchronous_standby_names = {}\n",
        quote_setting(&spec.render())
    )
}

/// Quotes a value for `postgresql.conf`.
pub fn quote_setting(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The include lines appended to `postgresql.conf`, or `None` if present.
/// A data directory from before [`SYNC_CONF`] existed gets just that line,
/// which still lands after the other two.
pub fn includes_to_append(postgresql_conf: &str) -> Option<String> {
    let sync_include = format!("include_if_exists = '{SYNC_CONF}'");
    if postgresql_conf.contains(INCLUDE_MARKER) {
        if postgresql_conf.lines().any(|l| l.trim() == sync_include) {
            return None;
        }
        let sep = if postgresql_conf.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        return Some(format!("{sep}{sync_include}\n"));
    }
    Some(format!(
        "\n{INCLUDE_MARKER} (managed by the sidecar; later lines win)\n\
         include_if_exists = '{NODE_CONF}'\n\
         include_if_exists = '{REPLICATION_CONF}'\n\
         {sync_include}\n"
    ))
}

/// Node settings: what makes a cluster fit for streaming, promotion and
/// `pg_rewind`, then the operator's extras.
pub fn render_node_conf(cfg: &InstanceConfig) -> String {
    let mut settings: Vec<(String, String)> = vec![
        ("listen_addresses".into(), cfg.listen_host.clone()),
        ("port".into(), cfg.port.to_string()),
        // The socket lets a DBA run `sudo -u postgres psql -p PORT`; pgquorum itself uses
        // TCP only. Instances on one host share the directory: the file names carry the port.
        (
            "unix_socket_directories".into(),
            cfg.socket_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        ),
        ("wal_level".into(), "replica".into()),
        ("hot_standby".into(), "on".into()),
        ("max_wal_senders".into(), "10".into()),
        ("max_replication_slots".into(), "10".into()),
        ("wal_log_hints".into(), "on".into()),
        ("full_page_writes".into(), "on".into()),
        ("recovery_target_timeline".into(), "latest".into()),
        ("wal_retrieve_retry_interval".into(), "1s".into()),
        // A slot of a member that is down pins WAL on the primary; past this much the slot is
        // invalidated (that member re-clones) instead of filling the primary's disk. The
        // cluster setting postgresql.parameters.max_slot_wal_keep_size overrides it.
        (
            "max_slot_wal_keep_size".into(),
            MAX_SLOT_WAL_KEEP_SIZE.into(),
        ),
        // A silent network cut (no RST, no FIN) is noticed within seconds
        // on both ends of a replication connection: by the replication
        // protocol's own timeouts, and by TCP keepalives and
        // tcp_user_timeout (ms: unacknowledged data) for a peer that is gone.
        ("wal_sender_timeout".into(), "5s".into()),
        ("wal_receiver_timeout".into(), "5s".into()),
        // Feedback well within the sender's timeout, so a slow but healthy
        // standby is never dropped.
        ("wal_receiver_status_interval".into(), "1s".into()),
        ("tcp_keepalives_idle".into(), "2".into()),
        ("tcp_keepalives_interval".into(), "1".into()),
        ("tcp_keepalives_count".into(), "3".into()),
        ("tcp_user_timeout".into(), "3000".into()),
        ("password_encryption".into(), "scram-sha-256".into()),
        ("logging_collector".into(), "off".into()),
    ];
    settings.extend(cfg.extra_settings.iter().cloned());
    let mut out = String::from("# Managed by pgquorum; rewritten by the sidecar.\n");
    for (k, v) in settings {
        out.push_str(&format!("{k} = {}\n", quote_setting(&v)));
    }
    out
}

/// Replication settings pointing at `upstream`.
pub fn render_replication_conf(cfg: &InstanceConfig, upstream: &Upstream) -> String {
    let ci = primary_conninfo(upstream, &cfg.replication, &cfg.member_name);
    format!(
        "# Managed by pgquorum; the upstream this member follows.\n\
         primary_conninfo = {}\nprimary_slot_name = {}\n",
        quote_setting(&ci),
        quote_setting(&slot_name_for(&cfg.member_name))
    )
}

/// Replication settings of a primary: none.
pub fn render_no_replication_conf() -> String {
    "# Managed by pgquorum; this member is a primary.\n".to_string()
}

/// `pg_hba.conf`: password (SCRAM) access for the superuser and the
/// replication role, only from the cluster's addresses.
pub fn render_hba(cfg: &InstanceConfig) -> String {
    let mut out = String::from(
        "# Managed by pgquorum.\n# TYPE  DATABASE  USER  ADDRESS  METHOD\nlocal all all peer\n",
    );
    for cidr in &cfg.cluster_cidrs {
        out.push_str(&format!(
            "host replication {} {cidr} scram-sha-256\n",
            hba_ident(&cfg.replication.name)
        ));
        out.push_str(&format!(
            "host all {} {cidr} scram-sha-256\n",
            hba_ident(&cfg.superuser.name)
        ));
    }
    for line in &cfg.extra_hba {
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn hba_ident(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// SQL run in single-user mode right after `initdb`, before any network
/// access is possible.
pub fn render_bootstrap_sql(cfg: &InstanceConfig) -> String {
    format!(
        "CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD {};\n",
        sql_ident(&cfg.replication.name),
        sql_literal(&cfg.replication.password)
    )
}

/// Quotes an SQL identifier.
pub fn sql_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on).
pub fn sql_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Credentials, GuardCommand, Timeouts};

    fn cfg() -> InstanceConfig {
        InstanceConfig {
            member_name: "a".into(),
            data_dir: "/d".into(),
            log_file: None,
            listen_host: "127.0.0.1".into(),
            port: 5433,
            socket_dir: None,
            postgres_user: None,
            pg_bin_dir: None,
            superuser: Credentials {
                name: "admin".into(),
                password: "s".into(),
            },
            replication: Credentials {
                name: "Repl".into(),
                password: "it's".into(),
            },
            cluster_cidrs: vec!["127.0.0.1/32".into()],
            extra_settings: vec![("fsync".into(), "off".into())],
            extra_hba: vec![],
            expected_system_identifier: None,
            guard_socket: None,
            guard: GuardCommand {
                program: "/bin/false".into(),
                args: vec![],
            },
            timeouts: Timeouts::default(),
        }
    }

    #[test]
    fn node_conf_has_ha_settings_and_extras_last() {
        let text = render_node_conf(&cfg());
        assert!(text.contains("port = '5433'"));
        assert!(text.contains("wal_level = 'replica'"));
        assert!(text.trim_end().ends_with("fsync = 'off'"));
    }

    #[test]
    fn node_conf_notices_a_silent_network_cut_within_seconds() {
        let text = render_node_conf(&cfg());
        for line in [
            "wal_receiver_timeout = '5s'",
            "wal_sender_timeout = '5s'",
            "wal_receiver_status_interval = '1s'",
            "tcp_keepalives_idle = '2'",
            "tcp_keepalives_interval = '1'",
            "tcp_keepalives_count = '3'",
            "tcp_user_timeout = '3000'",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn includes_are_appended_once() {
        let add = includes_to_append("port = 1\n").unwrap();
        assert!(add.contains("include_if_exists = 'pgquorum.conf'"));
        assert!(includes_to_append(&format!("x\n{add}")).is_none());
        let node = add.find(NODE_CONF).unwrap();
        let repl = add.find(REPLICATION_CONF).unwrap();
        let sync = add.find(SYNC_CONF).unwrap();
        assert!(node < repl && repl < sync, "{add}");
    }

    #[test]
    fn older_data_dirs_get_only_the_sync_include() {
        let old = format!(
            "port = 1\n\n{INCLUDE_MARKER} (managed by the sidecar; later lines win)\n\
             include_if_exists = '{NODE_CONF}'\n\
             include_if_exists = '{REPLICATION_CONF}'"
        );
        let add = includes_to_append(&old).unwrap();
        assert_eq!(add, format!("\ninclude_if_exists = '{SYNC_CONF}'\n"));
        let upgraded = format!("{old}{add}");
        assert!(includes_to_append(&upgraded).is_none());
        assert!(upgraded.trim_end().ends_with(&format!("'{SYNC_CONF}'")));
    }

    #[test]
    fn sync_spec_renders_any_k_sorted_and_quoted() {
        let spec = SyncSpec {
            k: 2,
            names: vec!["c".into(), "a\"b".into(), "B".into(), "c".into()],
        };
        assert_eq!(spec.render(), r#"ANY 2 ("B", "a""b", "c")"#);
        let one = SyncSpec {
            k: 1,
            names: vec!["node-b".into()],
        };
        assert_eq!(one.render(), r#"ANY 1 ("node-b")"#);
        assert_eq!(SyncSpec::asynchronous().render(), "");
        let no_names = SyncSpec {
            k: 1,
            names: vec![],
        };
        assert_eq!(no_names.render(), "");
        let k0 = SyncSpec {
            k: 0,
            names: vec!["a".into()],
        };
        assert_eq!(k0.render(), "");
    }

    #[test]
    fn sync_conf_quotes_the_value() {
        let spec = SyncSpec {
            k: 1,
            names: vec!["o'neil".into()],
        };
        assert!(
            render_sync_conf(&spec).contains(r#"synchronous_standby_names = 'ANY 1 ("o''neil")'"#)
        );
        assert!(render_sync_conf(&SyncSpec::asynchronous())
            .contains("synchronous_standby_names = ''\n"));
    }

    #[test]
    fn hba_limits_replication_to_cluster_addresses() {
        let text = render_hba(&cfg());
        assert!(text.contains("host replication \"Repl\" 127.0.0.1/32 scram-sha-256"));
        assert!(text.contains("host all admin 127.0.0.1/32 scram-sha-256"));
        assert!(!text.contains("trust"));
    }

    #[test]
    fn bootstrap_sql_quotes_password() {
        assert_eq!(
            render_bootstrap_sql(&cfg()),
            "CREATE ROLE \"Repl\" WITH REPLICATION LOGIN PASSWORD 'it''s';\n"
        );
    }

    #[test]
    fn replication_conf_quotes_conninfo() {
        let text = render_replication_conf(
            &cfg(),
            &Upstream {
                host: "h".into(),
                port: 1,
            },
        );
        assert!(text.contains("primary_conninfo = 'host=''h'' port=''1''"));
        assert!(text.contains("password=''it\\\\''s''"));
        assert!(text.contains("primary_slot_name = 'pgq_a'"));
    }
}
