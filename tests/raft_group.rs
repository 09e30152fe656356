//! The Raft group end to end: real `pgquorum node` processes on loopback, real gRPC, real sled.

#[path = "harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{cli, snapshot_tree, wait_for, TestCluster, DEFAULT_RAFT};
use raft_node::proto;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_one_leader_and_all_see_a_committed_config() {
    let c = TestCluster::started(3, DEFAULT_RAFT).await;
    let index = c
        .set_config("lease_ms", "3456")
        .await
        .expect("SetConfig commits");
    for id in 1..=3 {
        let cfg = wait_for("config applied on every node", T, || async {
            let cfg = c.local_config(id).await?;
            (cfg.log_index >= index).then_some(cfg)
        })
        .await;
        assert_eq!(cfg.values["lease_ms"], "3456", "node {id}");
    }
    // Every member registered its own details.
    let topo = c
        .client()
        .call(|mut cl| async move {
            cl.get_topology(proto::GetTopologyRequest { local: false })
                .await
        })
        .await
        .unwrap();
    assert_eq!(topo.members.len(), 3);
    for m in &topo.members {
        assert!(m.registered, "member {} registered", m.id);
        assert_eq!(m.name, format!("n{}", m.id));
        assert_eq!(m.membership_name(), "voter");
    }
    assert_eq!(
        topo.members
            .iter()
            .filter(|m| m.raft_role_name() == "leader")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_writes_resume() {
    let mut c = TestCluster::started(3, DEFAULT_RAFT).await;
    let old = c.wait_leader(T).await;
    c.set_config("tick_ms", "300").await.expect("write before");
    let killed_at = Instant::now();
    c.kill9(old);
    let new = c.wait_leader(T).await;
    let elected = killed_at.elapsed();
    assert_ne!(new, old);
    let index = c.set_config("tick_ms", "350").await.expect("write after");
    let writable = killed_at.elapsed();
    eprintln!(
        "FIGURE leader_kill9 new_leader_ms={} first_write_ms={}",
        elected.as_millis(),
        writable.as_millis()
    );
    // The old leader comes back as a follower and catches up.
    c.start(old);
    let s = wait_for("old leader catches up", T, || async {
        let s = c.status(old).await?;
        (s.last_applied >= index).then_some(s)
    })
    .await;
    assert_eq!(s.leader_id, new);
    assert_eq!(s.raft_role_name(), "follower");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_through_a_snapshot() {
    // A snapshot every 300 entries, 50 kept behind it: 1000 commits purge well past node 3.
    let mut c = TestCluster::started(3, "snapshot_every = 300\nlogs_to_keep = 50").await;
    c.set_config("tick_ms", "200").await.unwrap();
    let laggard = 3;
    let before = c.status(laggard).await.unwrap();
    assert_eq!(c.stop(laggard).code(), Some(0), "clean SIGTERM exit");
    let mut last = 0;
    for i in 0..1000u64 {
        last = c
            .set_config("maximum_lag_on_failover", &(1_000_000 + i).to_string())
            .await
            .expect("commit with one node down");
    }
    let leader = c.wait_leader(T).await;
    let ls = wait_for("leader purged its log past the laggard", T, || async {
        let s = c.status(leader).await?;
        (s.purged_index > before.last_log_index).then_some(s)
    })
    .await;
    assert!(ls.snapshot_index > 0);
    c.start(laggard);
    let s = wait_for("laggard caught up", Duration::from_secs(30), || async {
        let s = c.status(laggard).await?;
        (s.last_applied >= last).then_some(s)
    })
    .await;
    // Its log was purged on the leader, so only an installed snapshot can explain this.
    assert!(
        s.snapshot_index > before.last_log_index,
        "laggard holds a snapshot past its old log: {s:?}"
    );
    let cfg = c.local_config(laggard).await.unwrap();
    assert_eq!(cfg.values["maximum_lag_on_failover"], "1000999");
    let a = c.local_topology(leader).await.unwrap();
    let b = c.local_topology(laggard).await.unwrap();
    assert_eq!(strip_live(a), strip_live(b));
}

/// The committed parts of a topology (members' details, primary, history), without the live
/// Raft and Postgres status that differs between observers.
fn strip_live(mut t: proto::Topology) -> proto::Topology {
    t.leader_id = 0;
    t.term = 0;
    t.last_applied = 0;
    t.failover_status.clear();
    for m in &mut t.members {
        m.raft_role = 0;
        m.term = 0;
        m.last_applied = 0;
        m.pg_role = 0;
        m.timeline = 0;
        m.lsn = 0;
        m.lag_bytes = 0;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_state_members_and_vote_without_rebootstrap() {
    let mut c = TestCluster::started(3, DEFAULT_RAFT).await;
    let index = c.set_config("failure_threshold", "7").await.unwrap();
    let leader = c.wait_leader(T).await;
    wait_for("all applied", T, || async {
        for id in 1..=3 {
            if c.status(id).await?.last_applied < index {
                return None;
            }
        }
        Some(())
    })
    .await;
    let term_before = c.status(leader).await.unwrap().term;
    let topo_before = strip_live(c.local_topology(leader).await.unwrap());
    for id in 1..=3 {
        assert_eq!(c.stop(id).code(), Some(0));
    }
    c.start_all();
    c.wait_leader(T).await;
    for id in 1..=3 {
        let s = c.status(id).await.unwrap();
        assert!(s.term >= term_before, "vote/term survived on node {id}");
        assert!(s.last_log_index >= index, "log survived on node {id}");
        let cfg = wait_for("state re-applied", T, || async {
            let cfg = c.local_config(id).await?;
            (cfg.log_index >= index).then_some(cfg)
        })
        .await;
        assert_eq!(cfg.values["failure_threshold"], "7");
    }
    let after = strip_live(c.local_topology(c.wait_leader(T).await).await.unwrap());
    assert_eq!(after, topo_before);
    let log1 = std::fs::read_to_string(c.nodes[&1].log_path()).unwrap();
    assert_eq!(
        log1.matches("bootstrapping a new cluster").count(),
        1,
        "bootstrapped exactly once"
    );
    assert!(log1.contains("resuming"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_a_burst_loses_no_acknowledged_entry() {
    let mut c = TestCluster::started(3, DEFAULT_RAFT).await;
    let victim = c.wait_leader(T).await;
    let endpoints = c.endpoints();
    // A writer commits increasing values one after another; only acknowledged ones count.
    let writer = tokio::spawn(async move {
        let client = raft_node::client::ApiClient::new(endpoints)
            .unwrap()
            .with_tls(Some(harness::pki().operator_tls()))
            .with_patience(Duration::from_secs(10));
        let mut acked: Vec<(u64, u64)> = Vec::new();
        for v in 1_000_000u64..1_000_400 {
            let changes = std::collections::HashMap::from([(
                "maximum_lag_on_failover".to_string(),
                v.to_string(),
            )]);
            let r = client
                .call(|mut cl| {
                    let changes = changes.clone();
                    async move { cl.set_config(proto::SetConfigRequest { changes }).await }
                })
                .await;
            if let Ok(r) = r {
                acked.push((v, r.log_index));
            }
        }
        acked
    });
    // Kill the leader once the burst is well under way.
    wait_for("burst under way", T, || async {
        let s = c.status(victim).await?;
        (s.last_applied > 60).then_some(())
    })
    .await;
    c.kill9(victim);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() > 300,
        "most writes acknowledged: {}",
        acked.len()
    );
    c.start(victim);
    let (max_v, max_index) = *acked.last().unwrap();
    let leader = c.wait_leader(T).await;
    let final_index = c.status(leader).await.unwrap().last_applied;
    assert!(final_index >= max_index);
    for id in 1..=3 {
        let cfg = wait_for("every node applied everything", T, || async {
            let cfg = c.local_config(id).await?;
            (cfg.log_index >= final_index).then_some(cfg)
        })
        .await;
        let v: u64 = cfg.values["maximum_lag_on_failover"].parse().unwrap();
        // Values only grow, so a lost acknowledged write would leave an older value behind.
        assert!(v >= max_v, "node {id}: {v} < last acknowledged {max_v}");
    }
    let views: Vec<_> = futures_join(&c).await;
    assert!(
        views.windows(2).all(|w| w[0] == w[1]),
        "identical state everywhere"
    );
}

async fn futures_join(c: &TestCluster) -> Vec<proto::Topology> {
    let mut out = Vec::new();
    for id in c.nodes.keys() {
        out.push(strip_live(c.local_topology(*id).await.unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_then_leaves() {
    let mut c = TestCluster::started(3, DEFAULT_RAFT).await;
    c.add_joiner(4);
    c.start(4);
    let addr = c.nodes[&4].addr.clone();
    let endpoints = c.endpoints().join(",");
    let (ok, out, err) = cli(
        &["member", "add", "--id", "4", "--addr", &addr],
        &[("PGQUORUM_ENDPOINTS", &endpoints)],
    );
    assert!(ok, "member add: {out}{err}");
    for id in 1..=4 {
        wait_for("4 voters, node 4 registered, everywhere", T, || async {
            let t = c.local_topology(id).await?;
            let voters = t
                .members
                .iter()
                .filter(|m| m.membership_name() == "voter")
                .count();
            let four = t.members.iter().find(|m| m.id == 4)?;
            (voters == 4 && four.registered && four.name == "n4").then_some(())
        })
        .await;
    }
    // Adding it twice is refused with a clear reason.
    let (ok, _, err) = cli(
        &["member", "add", "--id", "4", "--addr", &addr],
        &[("PGQUORUM_ENDPOINTS", &endpoints)],
    );
    assert!(!ok);
    assert!(err.contains("already a voting member"), "{err}");

    let (ok, out, err) = cli(
        &["member", "remove", "--id", "4"],
        &[("PGQUORUM_ENDPOINTS", &endpoints)],
    );
    assert!(ok, "member remove: {out}{err}");
    for id in 1..=3 {
        wait_for("3 voters and no node 4", T, || async {
            let t = c.local_topology(id).await?;
            let ids: Vec<u64> = t.members.iter().map(|m| m.id).collect();
            (ids == vec![1, 2, 3] && t.members.iter().all(|m| m.membership_name() == "voter"))
                .then_some(())
        })
        .await;
    }
    let (ok, _, err) = cli(
        &["member", "remove", "--id", "4"],
        &[("PGQUORUM_ENDPOINTS", &endpoints)],
    );
    assert!(!ok);
    assert!(err.contains("not a member"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_files_fail_clearly_without_touching_data() {
    let dir = tempfile::tempdir().unwrap();
    let port = harness::free_port();
    let good = format!(
        "security = {{ insecure = true }}\ncluster_name = \"a\"\nnode_id = 1\nname = \"n1\"\ndata_dir = \"data\"\n\
         listen_addr = \"127.0.0.1:{port}\"\n\n[[initial_members]]\nid = 1\n\
         addr = \"127.0.0.1:{port}\"\n"
    );
    let path = dir.path().join("node.toml");
    let run = |text: &str| {
        std::fs::write(&path, text).unwrap();
        cli(&["node", "--config", path.to_str().unwrap()], &[])
    };
    let cases: Vec<(String, &str)> = vec![
        (good.replace("name = \"n1\"\n", ""), "missing field `name`"),
        (good.replace("node_id = 1", "node_id = \"one\""), "node_id"),
        (
            format!("{good}\n[[initial_members]]\nid = 1\naddr = \"127.0.0.1:1\"\n"),
            "id 1 appears twice",
        ),
        (
            good.replace(
                &format!("listen_addr = \"127.0.0.1:{port}\""),
                "listen_addr = \"10.255.255.1:7001\"",
            ),
            "advertises",
        ),
        ("cluster_name = ".to_string(), "config file"),
    ];
    for (text, expect) in cases {
        let (ok, _, err) = run(&text);
        assert!(!ok, "must fail: {text}");
        assert!(err.contains(expect), "expected '{expect}' in: {err}");
        assert!(!dir.path().join("data").exists(), "data dir untouched");
    }
    // A bind address that is not on this host fails before the data dir is created.
    let unbindable = good.replace(&format!("127.0.0.1:{port}"), "192.0.2.1:7001");
    let (ok, _, err) = run(&unbindable);
    assert!(!ok);
    assert!(err.contains("cannot listen on 192.0.2.1:7001"), "{err}");
    assert!(!dir.path().join("data").exists());
    // Port in use.
    let busy = std::net::TcpListener::bind(format!("127.0.0.1:{port}")).unwrap();
    let (ok, _, err) = run(&good);
    assert!(!ok);
    assert!(err.contains("cannot listen on"), "{err}");
    drop(busy);
    let (ok, _, _) = cli(&["node", "--config", "/nonexistent/node.toml"], &[]);
    assert!(!ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_cluster_is_refused_and_left_intact() {
    let mut c = TestCluster::started(1, DEFAULT_RAFT).await;
    c.set_config("tick_ms", "300").await.unwrap();
    c.stop(1);
    let data = c.data_dir(1);
    let before = snapshot_tree(&data);
    let cfg = std::fs::read_to_string(c.nodes[&1].config_path()).unwrap();
    let other = cfg.replace("cluster_name = \"test\"", "cluster_name = \"other\"");
    let path = c.root.path().join("other.toml");
    std::fs::write(
        &path,
        other.replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", data.display()),
        ),
    )
    .unwrap();
    let (ok, _, err) = cli(&["node", "--config", path.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("belongs to cluster 'test'"), "{err}");
    // Member 2's own certificate: the data dir, not TLS, must be what refuses it.
    let other_node = cfg
        .replace("node_id = 1", "node_id = 2")
        .replace("id = 1\n", "id = 2\n")
        .replace("node-1.", "node-2.");
    std::fs::write(
        &path,
        other_node.replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", data.display()),
        ),
    )
    .unwrap();
    let (ok, _, err) = cli(&["node", "--config", path.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("belongs to node 1"), "{err}");
    assert_eq!(snapshot_tree(&data), before, "refused starts wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cli_input_fails_clearly() {
    let c = TestCluster::started(1, DEFAULT_RAFT).await;
    let ep = c.endpoints().join(",");
    let env = [("PGQUORUM_ENDPOINTS", ep.as_str())];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["config", "set", "lease_ms"], "not key=value"),
        (
            vec!["config", "set", "lease_ms=abc"],
            "is not a whole number",
        ),
        (vec!["config", "set", "nope=1"], "unknown setting 'nope'"),
        (vec!["config", "set", "lease_ms=100"], "must be at least"),
        (
            vec!["config", "set", "lease_ms=1200"],
            "outlast a Raft election",
        ),
        (vec!["switchover"], "no primary has been chosen"),
        (vec!["failover", "--to", "1"], "no primary"),
        (vec!["switchover", "--at", "+3d"], "not s, m or h"),
        (
            vec!["member", "add", "--id", "0", "--addr", "127.0.0.1:1"],
            "positive",
        ),
        (
            vec!["member", "add", "--id", "5", "--addr", "nowhere"],
            "not a host:port",
        ),
        (vec!["member", "remove", "--id", "9"], "not a member"),
        (vec!["member", "remove", "--id", "1"], "last voter"),
        (vec!["list", "--output", "yaml"], "invalid value 'yaml'"),
    ];
    for (args, expect) in cases {
        let (ok, out, err) = cli(&args, &env);
        assert!(!ok, "{args:?} must fail: {out}");
        assert!(
            err.contains(expect),
            "{args:?}: expected '{expect}' in: {err}"
        );
    }
    let (ok, _, err) = cli(&["list", "--endpoints", "localhost"], &[]);
    assert!(!ok);
    assert!(err.contains("not host:port"), "{err}");
    let (ok, _, err) = cli(&["list"], &[]);
    assert!(!ok);
    assert!(err.contains("--endpoints"), "{err}");
    // The config is unchanged by all of the above.
    let cfg = c.local_config(1).await.unwrap();
    let default = raft_node::dynamic_config::DynamicConfig::default();
    assert_eq!(cfg.values["lease_ms"], default.lease_ms.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_redraws_on_a_commit_and_local_reads_need_no_quorum() {
    use std::io::{BufRead, BufReader};
    let mut c = TestCluster::started(3, DEFAULT_RAFT).await;
    c.wait_leader(T).await;
    let ep = c.endpoints().join(",");
    // `list --watch` prints the current state at once, then again on a commit.
    let mut child = std::process::Command::new(harness::BIN)
        .args(["list", "--watch", "--output", "json", "--endpoints", &ep])
        .envs(harness::pki().operator_env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn list --watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let saw = |rx: &std::sync::mpsc::Receiver<String>, what: &str| {
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if line.contains(what) {
                    return true;
                }
            }
        }
        false
    };
    assert!(saw(&rx, "\"paused\": false"), "no first drawing");
    let env = [("PGQUORUM_ENDPOINTS", ep.as_str())];
    let (ok, out, err) = cli(&["pause"], &env);
    assert!(ok, "{out}{err}");
    assert!(saw(&rx, "\"paused\": true"), "no redraw after the pause");
    let _ = child.kill();
    let _ = child.wait();
    // Without a quorum, --local still answers.
    let alone = 3;
    c.kill9(1);
    c.kill9(2);
    let one = c.nodes[&alone].addr.clone();
    let env = [("PGQUORUM_ENDPOINTS", one.as_str())];
    let (ok, out, err) = cli(&["list", "--local", "--output", "json"], &env);
    assert!(ok, "list --local without a quorum: {out}{err}");
    assert!(out.contains("\"paused\": true"), "{out}");
    assert!(err.contains("may be stale"), "{err}");
    let (ok, out, err) = cli(&["config", "show", "--local"], &env);
    assert!(ok && out.contains("lease_ms"), "{out}{err}");
    let (ok, _, _) = cli(&["history", "--local"], &env);
    assert!(ok);
}
