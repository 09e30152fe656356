//! Renders API replies as tables for people or JSON for programs.

use raft_node::proto;
use serde_json::json;

use crate::Output;

/// The topology as a table (one row per member, `*` marks the Raft leader) or JSON.
pub fn topology(t: &proto::Topology, out: Output) -> String {
    match out {
        Output::Json => {
            let members: Vec<_> = t
                .members
                .iter()
                .map(|m| {
                    let tags = m.tags.unwrap_or_default();
                    let assigned = t.primary.as_ref().is_some_and(|p| p.node_id == m.id);
                    json!({
                        "id": m.id,
                        "name": m.name,
                        "role": m.pg_role_name(),
                        "assigned_primary": assigned,
                        "epoch": t.primary.as_ref().map(|p| p.epoch),
                        "timeline": m.timeline,
                        "lsn": m.lsn,
                        "lag_bytes": m.lag_bytes,
                        "free_bytes": (m.free_bytes > 0).then_some(m.free_bytes),
                        "low_space": m.low_space,
                        "cannot_write": (!m.cannot_write.is_empty()).then_some(&m.cannot_write),
                        "read_only_storage": m.read_only_storage,
                        "write_probe_ms": (m.pg_role_name() == "primary").then_some(m.write_probe_ms),
                        "pending_restart": m.pending_restart,
                        "unguarded": m.unguarded,
                        "registered": m.registered,
                        "membership": m.membership_name(),
                        "raft_role": m.raft_role_name(),
                        "leader": m.id == t.leader_id,
                        "term": m.term,
                        "last_applied": m.last_applied,
                        "api_endpoint": m.raft_addr,
                        "http_endpoint": m.http_addr,
                        "pg_host": m.pg_host,
                        "pg_port": m.pg_port,
                        "tags": {
                            "nofailover": tags.nofailover,
                            "priority": tags.priority,
                            "nosync": tags.nosync,
                        },
                    })
                })
                .collect();
            let v = json!({
                "cluster": t.cluster_name,
                "leader_id": (t.leader_id != 0).then_some(t.leader_id),
                "term": t.term,
                "last_applied": t.last_applied,
                "paused": t.paused,
                "primary": t.primary.as_ref().map(|p| json!({"node_id": p.node_id, "epoch": p.epoch})),
                "failover_status": t.failover_status,
                "sync": t.sync.as_ref().map(|y| json!({
                    "mode": y.mode,
                    "standbys": y.members,
                    "k": y.k,
                    "target": y.target,
                    "target_k": y.target_k,
                })),
                "history": history_json(t),
                "plan": t.plan.as_ref().map(|p| json!({
                    "id": p.id,
                    "kind": p.kind_name(),
                    "from": p.from_node,
                    "to": p.to_node,
                    "epoch": p.epoch,
                    "not_before_unix_ms": (p.not_before_unix_ms > 0).then_some(p.not_before_unix_ms),
                    "started": p.started,
                })),
                "last_plan": t.last_plan.as_ref().map(|o| json!({
                    "id": o.plan.as_ref().map(|p| p.id),
                    "kind": o.plan.as_ref().map(|p| p.kind_name().to_string()),
                    "done": o.done,
                    "outcome": o.outcome,
                })),
                "members": members,
            });
            format!("{v:#}\n")
        }
        Output::Table => {
            let mut rows = vec![[
                "MEMBER".to_string(),
                "ID".into(),
                "API".into(),
                "POSTGRES".into(),
                "ROLE".into(),
                "TL".into(),
                "LAG".into(),
                "MEMBERSHIP".into(),
                "RAFT ROLE".into(),
                "TERM".into(),
                "APPLIED".into(),
                "LEADER".into(),
            ]];
            for m in &t.members {
                rows.push([
                    if m.name.is_empty() {
                        "(unregistered)".into()
                    } else {
                        m.name.clone()
                    },
                    m.id.to_string(),
                    m.raft_addr.clone(),
                    if m.pg_port == 0 {
                        "-".into()
                    } else {
                        format!("{}:{}", m.pg_host, m.pg_port)
                    },
                    role_cell(t, m),
                    if m.timeline == 0 {
                        "-".into()
                    } else {
                        m.timeline.to_string()
                    },
                    if m.pg_role_name() == "unknown" {
                        "-".into()
                    } else {
                        m.lag_bytes.to_string()
                    },
                    m.membership_name().to_string(),
                    m.raft_role_name().to_string(),
                    m.term.to_string(),
                    m.last_applied.to_string(),
                    if m.id == t.leader_id { "*" } else { "" }.into(),
                ]);
            }
            let epoch = t
                .primary
                .as_ref()
                .map(|p| format!(" · primary n{} epoch {}", p.node_id, p.epoch))
                .unwrap_or_default();
            let mut s = format!(
                "cluster {} · term {} · last applied {}{epoch}{}\n",
                t.cluster_name,
                t.term,
                t.last_applied,
                if t.paused { " · PAUSED" } else { "" }
            );
            s.push_str(&table(&rows));
            let primary = t.primary.as_ref().map(|p| p.node_id);
            if let Some(line) = t.sync.as_ref().map(|y| sync_line(y, primary)) {
                s.push_str(&line);
            }
            for line in storage_lines(t) {
                s.push_str(&line);
            }
            if let Some(line) = plan_line(t) {
                s.push_str(&line);
            }
            let pending: Vec<String> = t
                .members
                .iter()
                .filter(|m| !m.pending_restart.is_empty())
                .map(|m| {
                    format!(
                        "{} ({})",
                        member_name(t, m.id),
                        m.pending_restart.join(", ")
                    )
                })
                .collect();
            if !pending.is_empty() {
                s.push_str(&format!(
                    "pending restart: {} (`pgquorum restart MEMBER --pending`)\n",
                    pending.join("; ")
                ));
            }
            for m in t.members.iter().filter(|m| m.unguarded) {
                s.push_str(&format!(
                    "unguarded: {}'s Postgres runs outside pgquorum's guard (started by hand?); \
                     its sidecar restarts it under the guard\n",
                    member_name(t, m.id)
                ));
            }
            if !t.failover_status.is_empty() {
                s.push_str(&format!("failover: {}\n", t.failover_status));
            }
            s
        }
    }
}

/// `n2 (b)`: a member's id and name as the tables show them.
pub fn member_name(t: &proto::Topology, id: u64) -> String {
    match t.members.iter().find(|m| m.id == id) {
        Some(m) if !m.name.is_empty() => format!("n{id} ({})", m.name),
        _ => format!("n{id}"),
    }
}

/// A line on a switchover or manual failover under way, if one is.
fn plan_line(t: &proto::Topology) -> Option<String> {
    let p = t.plan.as_ref()?;
    let state = match (p.kind_name(), p.started) {
        ("switchover", false) if p.not_before_unix_ms > 0 => {
            format!("scheduled for {} UTC", clock(p.not_before_unix_ms))
        }
        ("switchover", false) => "being checked".to_string(),
        ("switchover", true) => "under way: the primary shuts down cleanly".to_string(),
        _ => "under way".to_string(),
    };
    Some(format!(
        "{} {} -> {}: {state} (plan {})\n",
        p.kind_name(),
        member_name(t, p.from_node),
        member_name(t, p.to_node),
        p.id
    ))
}

/// One line on synchronous replication: which standbys acknowledge commits. Right after a
/// failover the committed set still names the new primary (it holds every write acknowledged so
/// far) until its own standbys have caught up.
fn sync_line(y: &proto::SyncStandbys, primary: Option<u64>) -> String {
    let names = |ids: &[u64]| {
        ids.iter()
            .map(|i| format!("n{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let now = if y.k == 0 && y.mode != "off" {
        "DEGRADED, asynchronous: no synchronous standby is fit, commits wait for none, and a \
         crash of the primary now loses up to maximum_lag_on_failover of acknowledged writes"
            .to_string()
    } else if y.k == 0 {
        "asynchronous".to_string()
    } else if primary.is_some_and(|p| y.members.contains(&p)) {
        format!(
            "{} of [{}] hold every acknowledged write (carried over the last failover)",
            y.k,
            names(&y.members)
        )
    } else {
        format!("{} of [{}] acknowledge each commit", y.k, names(&y.members))
    };
    let target = if y.target.is_empty() {
        String::new()
    } else {
        format!(" · applying {} of [{}]", y.target_k, names(&y.target))
    };
    format!("synchronous_mode {}: {now}{target}\n", y.mode)
}

/// The configuration as `key  value` lines or a JSON object.
pub fn config(c: &proto::ClusterConfig, out: Output) -> String {
    let mut keys: Vec<_> = c.values.iter().collect();
    keys.sort();
    match out {
        Output::Json => {
            let map: serde_json::Map<String, serde_json::Value> = keys
                .into_iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            format!("{:#}\n", serde_json::Value::Object(map))
        }
        Output::Table => {
            let mut rows = vec![["SETTING".to_string(), "VALUE".to_string()]];
            rows.extend(keys.into_iter().map(|(k, v)| [k.clone(), v.clone()]));
            table(&rows)
        }
    }
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        unix_ms % 1000
    )
}

/// The committed history of primaries as a JSON array.
fn history_json(t: &proto::Topology) -> serde_json::Value {
    t.history
        .iter()
        .map(|h| {
            json!({
                "epoch": h.epoch,
                "from": (h.from_node != 0).then_some(h.from_node),
                "to": h.to_node,
                "reason": h.reason,
                "at_unix_ms": h.at_unix_ms,
                "lsn": h.lsn,
            })
        })
        .collect()
}

/// The committed history of primaries.
pub fn history(t: &proto::Topology, out: Output) -> String {
    match out {
        Output::Json => format!("{:#}\n", history_json(t)),
        Output::Table => {
            let mut rows = vec![[
                "EPOCH".to_string(),
                "TIME (UTC)".into(),
                "FROM".into(),
                "TO".into(),
                "LSN".into(),
                "REASON".into(),
            ]];
            for h in &t.history {
                rows.push([
                    h.epoch.to_string(),
                    clock(h.at_unix_ms),
                    if h.from_node == 0 {
                        "-".into()
                    } else {
                        h.from_node.to_string()
                    },
                    h.to_node.to_string(),
                    format!("{:X}/{:X}", h.lsn >> 32, h.lsn & 0xffff_ffff),
                    h.reason.clone(),
                ]);
            }
            table(&rows)
        }
    }
}

/// Members' events in time order.
pub fn events(events: &[proto::Event], out: Output) -> String {
    match out {
        Output::Json => {
            let v: Vec<_> = events
                .iter()
                .map(|e| {
                    json!({
                        "at_unix_ms": e.at_unix_ms,
                        "node_id": e.node_id,
                        "kind": e.kind,
                        "message": e.message,
                        "epoch": e.epoch,
                        "lsn": e.lsn,
                    })
                })
                .collect();
            format!("{:#}\n", serde_json::Value::Array(v))
        }
        Output::Table => {
            let mut rows = vec![[
                "TIME (UTC)".to_string(),
                "NODE".into(),
                "KIND".into(),
                "EPOCH".into(),
                "MESSAGE".into(),
            ]];
            for e in events {
                rows.push([
                    clock(e.at_unix_ms),
                    e.node_id.to_string(),
                    e.kind.clone(),
                    e.epoch.to_string(),
                    e.message.clone(),
                ]);
            }
            table(&rows)
        }
    }
}

/// A libpq multi-host URL for every registered member's Postgres (no password: libpq takes it
/// from `~/.pgpass` or `PGPASSWORD`). Read-write URLs list the committed primary first and
/// require a writable server; read-only ones list replicas first and prefer a standby.
pub fn libpq_uri(
    t: &proto::Topology,
    read_only: bool,
    user: &str,
    dbname: &str,
) -> anyhow::Result<String> {
    let primary = t.primary.as_ref().map(|p| p.node_id);
    let mut members: Vec<&proto::Member> = t.members.iter().filter(|m| m.pg_port != 0).collect();
    if members.is_empty() {
        anyhow::bail!("no member has registered its Postgres address yet; try again once `pgquorum list` shows them");
    }
    // Primary first for writes, last for reads; otherwise by id.
    members.sort_by_key(|m| ((Some(m.id) == primary) == read_only, m.id));
    let hosts: Vec<String> = members
        .iter()
        .map(|m| {
            let host = if m.pg_host.contains(':') {
                format!("[{}]", m.pg_host)
            } else {
                m.pg_host.clone()
            };
            format!("{host}:{}", m.pg_port)
        })
        .collect();
    let attrs = if read_only {
        "prefer-standby"
    } else {
        "read-write"
    };
    Ok(format!(
        "postgresql://{}@{}/{}?target_session_attrs={attrs}&connect_timeout=2",
        percent_encode(user),
        hosts.join(","),
        percent_encode(dbname)
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The ROLE column: what the member's latest report says, reconciled with the committed
/// assignment so that the table never contradicts the history (right after a failover the new
/// primary still reports itself a replica until its promotion ends).
fn role_cell(t: &proto::Topology, m: &proto::Member) -> String {
    let assigned = t.primary.as_ref().is_some_and(|p| p.node_id == m.id);
    match (assigned, m.pg_role_name()) {
        (_, "unknown") => "-".into(),
        (true, "primary") => "primary".into(),
        (true, "replica") => "primary (promoting)".into(),
        (true, other) => format!("primary ({other})"),
        (false, "primary") => "primary (demoted: fencing)".into(),
        (false, other) => other.to_string(),
    }
}

/// A line for each member whose Postgres cannot write or whose disk runs low on space.
fn storage_lines(t: &proto::Topology) -> Vec<String> {
    t.members
        .iter()
        .filter_map(|m| {
            let mut parts = Vec::new();
            if !m.cannot_write.is_empty() {
                parts.push(format!("cannot write: {}", m.cannot_write));
            }
            if m.read_only_storage {
                parts.push("read-only storage".to_string());
            }
            if m.low_space {
                parts.push(format!(
                    "low free space: {} free",
                    human_bytes(m.free_bytes)
                ));
            }
            let name = if m.name.is_empty() {
                format!("n{}", m.id)
            } else {
                m.name.clone()
            };
            (!parts.is_empty()).then(|| format!("storage: {name}: {}\n", parts.join("; ")))
        })
        .collect()
}

/// Bytes in binary units, as `df -h` shows them.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_lists_the_primary_first_for_writes_and_last_for_reads() {
        let m = |id: u64, host: &str, port: u32| proto::Member {
            id,
            pg_host: host.into(),
            pg_port: port,
            ..Default::default()
        };
        let t = proto::Topology {
            primary: Some(proto::PrimaryAssignment {
                node_id: 2,
                epoch: 3,
            }),
            members: vec![
                m(1, "10.0.0.1", 5432),
                m(2, "10.0.0.2", 5433),
                m(3, "::1", 5434),
            ],
            ..Default::default()
        };
        assert_eq!(
            libpq_uri(&t, false, "app", "shop").unwrap(),
            "postgresql://app@10.0.0.2:5433,10.0.0.1:5432,[::1]:5434/shop?\
             target_session_attrs=read-write&connect_timeout=2"
        );
        assert_eq!(
            libpq_uri(&t, true, "a@b", "db").unwrap(),
            "postgresql://a%40b@10.0.0.1:5432,[::1]:5434,10.0.0.2:5433/db?\
             target_session_attrs=prefer-standby&connect_timeout=2"
        );
        let none = proto::Topology {
            members: vec![m(1, "", 0)],
            ..Default::default()
        };
        assert!(libpq_uri(&none, false, "u", "d").is_err());
    }

    #[test]
    fn the_role_column_agrees_with_the_committed_primary() {
        let t = proto::Topology {
            primary: Some(proto::PrimaryAssignment {
                node_id: 2,
                epoch: 2,
            }),
            ..Default::default()
        };
        let m = |id: u64, role: proto::PgRole| proto::Member {
            id,
            pg_role: role.into(),
            ..Default::default()
        };
        use proto::PgRole::{Fenced, Primary, Replica, Stopped, Unspecified};
        assert_eq!(role_cell(&t, &m(2, Replica)), "primary (promoting)");
        assert_eq!(role_cell(&t, &m(2, Primary)), "primary");
        assert_eq!(role_cell(&t, &m(2, Stopped)), "primary (stopped)");
        assert_eq!(role_cell(&t, &m(1, Primary)), "primary (demoted: fencing)");
        assert_eq!(role_cell(&t, &m(1, Fenced)), "fenced");
        assert_eq!(role_cell(&t, &m(3, Replica)), "replica");
        assert_eq!(role_cell(&t, &m(3, Unspecified)), "-");
    }

    #[test]
    fn a_member_that_cannot_write_or_runs_low_gets_a_storage_line() {
        let t = proto::Topology {
            members: vec![
                proto::Member {
                    id: 1,
                    name: "a".into(),
                    cannot_write: "no space: only 4096 bytes free".into(),
                    low_space: true,
                    free_bytes: 4096,
                    ..Default::default()
                },
                proto::Member {
                    id: 2,
                    name: "b".into(),
                    free_bytes: 5 << 30,
                    ..Default::default()
                },
                proto::Member {
                    id: 3,
                    read_only_storage: true,
                    low_space: true,
                    free_bytes: 3 * 1024 * 1024 + 512 * 1024,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let lines = storage_lines(&t);
        assert_eq!(
            lines,
            vec![
                "storage: a: cannot write: no space: only 4096 bytes free; low free space: \
                 4.0 KiB free\n"
                    .to_string(),
                "storage: n3: read-only storage; low free space: 3.5 MiB free\n".to_string(),
            ]
        );
        assert!(topology(&t, Output::Table).contains("storage: n3"));
    }
}
