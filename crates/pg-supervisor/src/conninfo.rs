//! libpq connection strings and replication slot names.

use crate::config::{Credentials, Upstream};

/// Renders `key='value'` pairs with libpq quoting.
pub fn render_conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", quote_conninfo_value(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote_conninfo_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The `primary_conninfo` of a replica streaming from `upstream`; keepalives
/// (idle 2 s, then 3 probes 1 s apart) and `tcp_user_timeout` (3 s of
/// unacknowledged data) make a vanished primary noticed in about 5 s.
pub fn primary_conninfo(upstream: &Upstream, replication: &Credentials, member: &str) -> String {
    let port = upstream.port.to_string();
    render_conninfo(&[
        ("host", &upstream.host),
        ("port", &port),
        ("user", &replication.name),
        ("password", &replication.password),
        ("application_name", member),
        ("connect_timeout", "2"),
        ("keepalives", "1"),
        ("keepalives_idle", "2"),
        ("keepalives_interval", "1"),
        ("keepalives_count", "3"),
        ("tcp_user_timeout", "3000"),
    ])
}

/// A superuser conninfo for tools like `pg_rewind`; the password travels in
/// `PGPASSWORD`, not on the command line where `ps` shows it.
pub fn superuser_conninfo(upstream: &Upstream, superuser: &Credentials) -> String {
    let port = upstream.port.to_string();
    render_conninfo(&[
        ("host", &upstream.host),
        ("port", &port),
        ("user", &superuser.name),
        ("dbname", "postgres"),
        ("connect_timeout", "10"),
    ])
}

/// The physical replication slot a member streams through: slot names
/// allow only `[a-z0-9_]` and 63 bytes.
pub fn slot_name_for(member: &str) -> String {
    let mut name = String::from("pgq_");
    for c in member.chars() {
        let c = c.to_ascii_lowercase();
        name.push(if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '_'
        });
    }
    name.truncate(63);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_values() {
        assert_eq!(
            render_conninfo(&[("host", "h"), ("password", "a'b\\c d")]),
            r"host='h' password='a\'b\\c d'"
        );
    }

    #[test]
    fn primary_conninfo_names_the_member() {
        let ci = primary_conninfo(
            &Upstream {
                host: "10.0.0.1".into(),
                port: 5433,
            },
            &Credentials {
                name: "repl".into(),
                password: "pw".into(),
            },
            "node-b",
        );
        assert!(ci.starts_with("host='10.0.0.1' port='5433' user='repl' password='pw'"));
        assert!(ci.contains("application_name='node-b'"));
    }

    #[test]
    fn primary_conninfo_notices_a_silent_network_cut_within_seconds() {
        let ci = primary_conninfo(
            &Upstream {
                host: "h".into(),
                port: 1,
            },
            &Credentials {
                name: "r".into(),
                password: "p".into(),
            },
            "m",
        );
        let pairs: Vec<&str> = ci.split(' ').collect();
        for pair in [
            "connect_timeout='2'",
            "keepalives='1'",
            "keepalives_idle='2'",
            "keepalives_interval='1'",
            "keepalives_count='3'",
            "tcp_user_timeout='3000'",
        ] {
            assert!(pairs.contains(&pair), "missing {pair}: {ci}");
        }
    }

    #[test]
    fn slot_names_are_valid() {
        assert_eq!(slot_name_for("Node-B.1"), "pgq_node_b_1");
        assert_eq!(slot_name_for(&"x".repeat(100)).len(), 63);
    }
}
