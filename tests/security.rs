//! Only the cluster's own members and its operators get in: mutual TLS between sidecars, member
//! identity on every Raft message, report and registration, operator credentials for every
//! verb, `pg_hba.conf` closed to strangers, and no secret in any log or output. Real sidecar
//! processes over real gRPC and TLS; the PostgreSQL cases run real Postgres.

mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{cli, cli_bare, pki, wait_for, TestCluster, DEFAULT_RAFT, PG_PASSWORD};
use raft_node::proto;
use raft_node::security::{Holder, Tls, TlsFiles};

const T: Duration = Duration::from_secs(30);

/// A second, unrelated CA in `dir` with certificates for members 2 and 4 and an operator.
fn foreign_pki(dir: &Path) -> PathBuf {
    let d = dir.join("foreign");
    let s = d.to_str().expect("utf-8");
    for args in [
        vec!["cert", "init", s, "--cluster", "stranger"],
        vec!["cert", "issue", "node", "2", "--dir", s],
        vec!["cert", "issue", "node", "4", "--dir", s],
        vec!["cert", "issue", "operator", "mallory", "--dir", s],
    ] {
        let (ok, _, err) = cli_bare(&args, &[]);
        assert!(ok, "pgquorum {args:?}: {err}");
    }
    d
}

fn tls_from(dir: &Path, stem: &str, holder: Holder) -> Tls {
    Tls::load(
        TlsFiles {
            ca: dir.join("ca.crt"),
            identity: Some((
                dir.join(format!("{stem}.crt")),
                dir.join(format!("{stem}.key")),
            )),
        },
        holder,
    )
    .expect("TLS material")
}

/// TLS that trusts the cluster CA and presents no certificate.
fn anonymous() -> Tls {
    Tls::load(
        TlsFiles {
            ca: pki().ca(),
            identity: None,
        },
        Holder::Client,
    )
    .expect("CA")
}

fn log_of(c: &TestCluster, id: u64) -> String {
    std::fs::read_to_string(c.nodes[&id].log_path()).unwrap_or_default()
}

/// A vote request (openraft's JSON) from `candidate` in `term`.
fn vote_json(candidate: u64, term: u64) -> Vec<u8> {
    serde_json::json!({
        "vote": { "leader_id": { "term": term, "node_id": candidate }, "committed": false },
        "last_log_id": null
    })
    .to_string()
    .into_bytes()
}

async fn send_vote(addr: &str, tls: &Tls, candidate: u64, term: u64) -> Result<(), tonic::Code> {
    let ch = harness::channel(addr, tls)
        .await
        .ok_or(tonic::Code::Unavailable)?;
    proto::raft_transport_client::RaftTransportClient::new(ch)
        .vote(proto::RaftMessage {
            payload: vote_json(candidate, term),
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_a_certificate_from_another_ca_cannot_join_or_vote() {
    let mut c = TestCluster::started(3, DEFAULT_RAFT).await;
    let leader = c.wait_leader(T).await;
    let term = c.status(leader).await.expect("status").term;
    let foreign = foreign_pki(c.root.path());
    // A vote from member 2's id, but signed by another CA: the TLS handshake already fails,
    // so Raft never sees it (a high term would otherwise depose the leader).
    let stranger = tls_from(&foreign, "node-2", Holder::Node(2));
    let addr = c.nodes[&leader].addr.clone();
    assert_eq!(
        send_vote(&addr, &stranger, 2, term + 100).await,
        Err(tonic::Code::Unavailable),
        "a member of another CA reached Raft"
    );
    wait_for("the refused handshake is logged", T, || async {
        log_of(&c, leader)
            .contains("refused a gRPC connection: TLS handshake failed")
            .then_some(())
    })
    .await;
    // The same with the cluster's own CA reaches Raft (and is turned down by Raft itself, as
    // its term is stale): the refusal above came from the certificate, not the message.
    let own = pki().node_tls(2);
    assert_eq!(send_vote(&addr, &own, 2, 0).await, Ok(()));

    // A whole sidecar with the other CA's certificate for id 4 cannot join: the leader cannot
    // verify it, so it never catches up and never becomes a voter.
    c.add_joiner(4);
    let cfg = c.nodes[&4].config_path();
    let text = std::fs::read_to_string(&cfg).expect("config");
    let (cert, key) = pki().node_cert(4);
    let text = text
        .replace(
            &pki().ca().display().to_string(),
            &foreign.join("ca.crt").display().to_string(),
        )
        .replace(
            &cert.display().to_string(),
            &foreign.join("node-4.crt").display().to_string(),
        )
        .replace(
            &key.display().to_string(),
            &foreign.join("node-4.key").display().to_string(),
        );
    std::fs::write(&cfg, text).expect("write config");
    c.start(4);
    let ep = c.endpoints().join(",");
    let (ok, _, err) = cli(
        &[
            "member",
            "add",
            "--id",
            "4",
            "--addr",
            &c.nodes[&4].addr.clone(),
        ],
        &[("PGQUORUM_ENDPOINTS", &ep)],
    );
    assert!(!ok, "a member of another CA was added");
    assert!(err.contains("did not catch up"), "{err}");
    let t = harness::workload::topology(&c).await;
    let voters: Vec<u64> = t
        .members
        .iter()
        .filter(|m| m.membership_name() == "voter")
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, vec![1, 2, 3]);
    assert_eq!(
        c.status(leader).await.map(|s| s.leader_id),
        Some(leader),
        "the leader changed"
    );
    let joiner_log = log_of(&c, 4);
    assert!(
        joiner_log.contains("TLS handshake failed"),
        "the stranger's log names the refused handshakes:\n{joiner_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_operator_may_change_anything_and_gets_a_clear_refusal_otherwise() {
    let mut c = TestCluster::new(3, DEFAULT_RAFT);
    let metrics_token = c.root.path().join("metrics.token");
    let (ok, _, err) = cli_bare(&["cert", "token", metrics_token.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let mut http = Vec::new();
    for id in 1..=3 {
        let addr = format!("127.0.0.1:{}", harness::free_port());
        c.insert_config(id, "listen_addr", &format!("http_addr = \"{addr}\""));
        c.insert_config(
            id,
            "token_file",
            &format!("metrics_token_file = \"{}\"", metrics_token.display()),
        );
        http.push(addr);
    }
    c.start_all();
    c.wait_leader(T).await;
    let ep = c.endpoints().join(",");
    let ca = pki().ca().display().to_string();
    let anonymous = [
        ("PGQUORUM_ENDPOINTS", ep.as_str()),
        ("PGQUORUM_CA_FILE", ca.as_str()),
    ];
    let verbs: Vec<Vec<&str>> = vec![
        vec!["switchover"],
        vec!["failover", "--to", "2"],
        vec!["pause"],
        vec!["resume"],
        vec!["config", "set", "maximum_lag_on_failover=1"],
        vec!["member", "add", "--id", "7", "--addr", "127.0.0.1:1"],
        vec!["member", "remove", "--id", "3"],
        vec!["restart", "1"],
        vec!["reinit", "2"],
        vec!["list"],
    ];
    for verb in &verbs {
        let (ok, out, err) = cli_bare(verb, &anonymous);
        assert!(!ok, "{verb:?} without credentials succeeded: {out}");
        assert!(
            err.contains("not authenticated") && err.contains("needs an operator"),
            "{verb:?}: {err}"
        );
    }
    // A wrong token is named as wrong, and never echoed.
    let wrong = c.root.path().join("wrong.token");
    std::fs::write(&wrong, "this-is-not-the-token-0123456789\n").unwrap();
    let wrong = wrong.display().to_string();
    let (ok, _, err) = cli_bare(
        &["pause"],
        &[
            anonymous[0],
            anonymous[1],
            ("PGQUORUM_TOKEN_FILE", wrong.as_str()),
        ],
    );
    assert!(!ok);
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("this-is-not-the-token"), "{err}");
    // A client certificate of another CA does not get a connection.
    let foreign = foreign_pki(c.root.path());
    let (fc, fk) = (
        foreign.join("operator-mallory.crt").display().to_string(),
        foreign.join("operator-mallory.key").display().to_string(),
    );
    let (ok, out, err) = cli_bare(
        &["pause"],
        &[
            anonymous[0],
            anonymous[1],
            ("PGQUORUM_CERT_FILE", fc.as_str()),
            ("PGQUORUM_KEY_FILE", fk.as_str()),
        ],
    );
    assert!(!ok, "an operator of another CA paused the cluster");
    // TLS 1.3 ends the client's handshake before the server judges its certificate: the
    // refusal shows as the server's alert on the first call, or at connect.
    assert!(
        err.contains("transport error") || err.contains("cannot connect"),
        "out: {out} err: {err}"
    );
    // Nothing above changed anything.
    let t = harness::workload::topology(&c).await;
    assert!(!t.paused);
    assert_eq!(t.members.len(), 3);
    // The token works, and so does an operator certificate.
    let token = pki().token_file().display().to_string();
    let (ok, out, err) = cli_bare(
        &["pause"],
        &[
            anonymous[0],
            anonymous[1],
            ("PGQUORUM_TOKEN_FILE", token.as_str()),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("paused"), "{out}");
    let (ok, _, err) = cli(
        &["config", "set", "maximum_lag_on_failover=2048"],
        &[("PGQUORUM_ENDPOINTS", &ep)],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["resume"], &[("PGQUORUM_ENDPOINTS", &ep)]);
    assert!(ok, "{err}");
    assert!(!harness::workload::topology(&c).await.paused);
    // A member's certificate speaks for operators only while it is a member: a sidecar
    // forwards their calls and gathers statuses with it, a removed one must not.
    let pause = |tls: Tls, addr: String| async move {
        let ch = harness::channel(&addr, &tls).await.expect("connect");
        proto::cluster_client::ClusterClient::new(ch)
            .set_paused(proto::SetPausedRequest { paused: true })
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    };
    let (ok, _, err) = cli(
        &["member", "remove", "--id", "3"],
        &[("PGQUORUM_ENDPOINTS", &ep)],
    );
    assert!(ok, "{err}");
    let leader = c.wait_leader(T).await;
    let leader_addr = c.nodes[&leader].addr.clone();
    assert_eq!(
        pause(pki().node_tls(3), leader_addr.clone()).await,
        Err(tonic::Code::Unauthenticated),
        "a removed member's certificate paused the cluster"
    );
    assert!(!harness::workload::topology(&c).await.paused);
    let member = if leader == 1 { 2 } else { 1 };
    assert_eq!(pause(pki().node_tls(member), leader_addr).await, Ok(()));
    assert!(harness::workload::topology(&c).await.paused);
    // Health endpoints stay open; /metrics wants its own token.
    let metrics_secret = std::fs::read_to_string(&metrics_token).unwrap();
    for addr in &http {
        assert_eq!(
            harness::http_get(addr, "/cluster", None).await.map(|r| r.0),
            Some(200)
        );
        assert_eq!(
            harness::http_get(addr, "/metrics", None).await.map(|r| r.0),
            Some(401)
        );
        let bearer = format!("Bearer {}", metrics_secret.trim());
        let (code, body) = harness::http_get(addr, "/metrics", Some(&bearer))
            .await
            .expect("/metrics answers");
        assert_eq!(code, 200);
        assert!(body.contains("pgquorum_"), "{body}");
    }
}

/// What the server answers a replication startup packet from `source` with: `'E'` and the
/// message for an error, `'R'` for an authentication request (the connection got past
/// `pg_hba.conf`).
async fn replication_startup_from(source: &str, port: u16, user: &str) -> (u8, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind the source address");
    let mut s = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .expect("connect to Postgres");
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for (k, v) in [
        ("user", user),
        ("database", "replication"),
        ("replication", "true"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    s.write_all(&packet).await.expect("send the startup packet");
    let mut reply = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut reply))
        .await
        .expect("an answer")
        .expect("read");
    assert!(n > 0, "Postgres closed the connection without an answer");
    (reply[0], String::from_utf8_lossy(&reply[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reports_registrations_and_votes_change_nothing_and_strangers_cannot_replicate() {
    let mut c = TestCluster::with_postgres(3);
    let mut http = Vec::new();
    for id in 1..=3 {
        let addr = format!("127.0.0.1:{}", harness::free_port());
        c.insert_config(id, "listen_addr", &format!("http_addr = \"{addr}\""));
        http.push(addr);
    }
    c.start_all();
    let (primary, before) = c.wait_postgres(Duration::from_secs(120)).await;
    let epoch = before.primary.as_ref().map(|p| p.epoch);
    let replica = (1..=3).find(|id| *id != primary).unwrap();
    // The leader hands Raft leadership away from the primary's node at first: wait for that,
    // so that the term below moves only if a forged message moves it.
    wait_for("Raft leadership apart from the primary", T, || async {
        let t = harness::workload::topology(&c).await;
        (t.leader_id != 0 && t.leader_id != primary).then_some(())
    })
    .await;
    let leader = harness::workload::wait_leader_settled(&c, Duration::from_secs(2)).await;
    let term = harness::workload::topology(&c).await.term;
    let as_replica = pki().node_tls(replica);

    // A report that says the primary fenced itself, from the replica's own certificate: had
    // the leader believed it, it would promote at once without waiting out the lease.
    let forged = proto::ReportRequest {
        report: Some(proto::MemberReport {
            node: primary,
            pg: proto::PgRole::Fenced as i32,
            epoch_seen: epoch.unwrap_or(0),
            ..Default::default()
        }),
    };
    for (tls, code) in [
        (as_replica.clone(), tonic::Code::PermissionDenied),
        (pki().operator_tls(), tonic::Code::PermissionDenied),
        (anonymous(), tonic::Code::Unauthenticated),
    ] {
        for id in 1..=3 {
            let ch = harness::channel(&c.nodes[&id].addr, &tls)
                .await
                .expect("connect");
            let e = proto::internal_client::InternalClient::new(ch)
                .report(forged.clone())
                .await
                .expect_err("a forged report was taken");
            assert_eq!(e.code(), code, "member {id}: {}", e.message());
        }
    }
    // Registering the primary's details from another member (replicas would follow the
    // forger's Postgres) is refused; so is a host that would open pg_hba.conf, even from the
    // member itself.
    let register = |id: u64, host: &str| proto::RegisterMemberRequest {
        id,
        name: format!("n{id}"),
        pg_host: host.to_string(),
        pg_port: 5432,
        ..Default::default()
    };
    let ch = harness::channel(&c.nodes[&leader].addr, &as_replica)
        .await
        .expect("connect");
    let e = proto::internal_client::InternalClient::new(ch)
        .register_member(register(primary, "127.0.0.9"))
        .await
        .expect_err("a forged registration was taken");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let ch = harness::channel(&c.nodes[&leader].addr, &pki().node_tls(primary))
        .await
        .expect("connect");
    for host in [
        "0.0.0.0/0",
        "all",
        "127.0.0.1 trust\nhost all all 0.0.0.0/0",
    ] {
        let e = proto::internal_client::InternalClient::new(ch.clone())
            .register_member(register(primary, host))
            .await
            .expect_err("a hostile host was registered");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{host:?}");
    }
    // A vote in the primary's name from the replica's certificate, with a term that would
    // depose the leader.
    assert_eq!(
        send_vote(&c.nodes[&leader].addr, &as_replica, primary, term + 100).await,
        Err(tonic::Code::PermissionDenied)
    );
    // Nothing changed: the same primary in the same epoch, the same leader and term, the
    // primary's registered address untouched, for longer than a lease.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let t = harness::workload::topology(&c).await;
        assert_eq!(
            t.primary.as_ref().map(|p| (p.node_id, p.epoch)),
            Some((primary, epoch.unwrap()))
        );
        assert_eq!(t.term, term, "the Raft term moved");
        let m = t.members.iter().find(|m| m.id == primary).unwrap();
        assert_eq!(m.pg_host, "127.0.0.1");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // pg_hba.conf admits replication from the members' addresses only. 127.0.0.2 is this
    // host's loopback too, but no member's.
    let port = c.nodes[&primary].pg_port;
    let (kind, text) = replication_startup_from("127.0.0.2", port, "replicator").await;
    assert_eq!(kind, b'E', "a stranger got past pg_hba.conf: {text}");
    assert!(text.contains("no pg_hba.conf entry"), "{text}");
    let (kind, text) = replication_startup_from("127.0.0.1", port, "replicator").await;
    assert_eq!(
        kind, b'R',
        "a member's address must reach authentication: {text}"
    );
    let hba = std::fs::read_to_string(c.nodes[&primary].dir.join("pgdata/pg_hba.conf")).unwrap();
    assert!(!hba.contains("trust"), "{hba}");
    assert!(hba.contains("scram-sha-256"), "{hba}");

    // No secret in any output or log: the passwords, the token, a private key.
    let ep = c.endpoints().join(",");
    let mut seen = String::new();
    for args in [
        vec!["config", "show"],
        vec!["list", "--output", "json"],
        vec!["events", "--output", "json"],
        vec!["uri"],
    ] {
        let (ok, out, err) = cli(&args, &[("PGQUORUM_ENDPOINTS", &ep)]);
        assert!(ok, "{args:?}: {err}");
        seen.push_str(&out);
        seen.push_str(&err);
    }
    for addr in &http {
        seen.push_str(
            &harness::http_get(addr, "/cluster", None)
                .await
                .expect("/cluster")
                .1,
        );
        seen.push_str(
            &harness::http_get(addr, "/metrics", None)
                .await
                .expect("/metrics")
                .1,
        );
    }
    for id in 1..=3 {
        seen.push_str(&log_of(&c, id));
    }
    let token = std::fs::read_to_string(pki().token_file()).unwrap();
    let key = std::fs::read_to_string(pki().node_cert(1).1).unwrap();
    let key_line = key.lines().nth(1).expect("a PEM body line").to_string();
    for (what, secret) in [
        ("the superuser password", PG_PASSWORD),
        ("the replication password", "test-replication-secret"),
        ("the token", token.trim()),
        ("a private key", key_line.as_str()),
    ] {
        assert!(
            !seen.contains(secret),
            "{what} appears in an output or a log"
        );
    }
    assert!(seen.len() > 10_000, "the outputs and logs were read");
}

/// A node config without its `[security]` table.
fn without_security(text: &str) -> String {
    let start = text.find("\n[security]").expect("a [security] table");
    let end = text[start + 1..]
        .find("\n[")
        .map_or(text.len(), |e| start + 1 + e);
    format!("{}{}", &text[..start], &text[end..])
}

/// Starts `pgquorum node` on `config` and expects it to refuse, with `expect` in its error.
fn refuses_to_start(config: &Path, expect: &str) {
    let (ok, _, err) = cli_bare(&["node", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok, "a sidecar started with {}", config.display());
    assert!(err.contains(expect), "expected '{expect}' in: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_usable_tls_refuses_to_start_and_says_why() {
    let mut c = TestCluster::new(2, DEFAULT_RAFT);
    let cfg = c.nodes[&2].config_path();
    let secure = std::fs::read_to_string(&cfg).unwrap();
    let data = c.nodes[&2].dir.join("data");
    // No [security] at all: TLS is the default, and the error names both ways out.
    std::fs::write(&cfg, without_security(&secure)).unwrap();
    refuses_to_start(&cfg, "pgquorum cert init");
    refuses_to_start(&cfg, "security.insecure = true");
    // Member 1's certificate on member 2.
    let (c1, k1) = pki().node_cert(1);
    let (c2, k2) = pki().node_cert(2);
    let swapped = secure
        .replace(&c2.display().to_string(), &c1.display().to_string())
        .replace(&k2.display().to_string(), &k1.display().to_string());
    std::fs::write(&cfg, swapped).unwrap();
    refuses_to_start(&cfg, "is not valid for node-2.pgquorum");
    // A key others may read.
    let key = c.root.path().join("open.key");
    std::fs::copy(&k2, &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(
        &cfg,
        secure.replace(&k2.display().to_string(), &key.display().to_string()),
    )
    .unwrap();
    refuses_to_start(&cfg, "chmod 600");
    assert!(!data.exists(), "a refused start touched the data dir");

    // open_reads lets anyone read, and still nobody else change anything.
    std::fs::write(&cfg, &secure).unwrap();
    for id in 1..=2 {
        c.insert_config(id, "token_file", "open_reads = true");
    }
    c.start_all();
    c.wait_leader(T).await;
    c.wait_registered(T).await;
    let ep = c.endpoints().join(",");
    let ca = pki().ca().display().to_string();
    let anonymous = [
        ("PGQUORUM_ENDPOINTS", ep.as_str()),
        ("PGQUORUM_CA_FILE", ca.as_str()),
    ];
    let (ok, out, err) = cli_bare(&["list"], &anonymous);
    assert!(ok, "{err}");
    assert!(out.contains("n1"), "{out}");
    let (ok, _, err) = cli_bare(&["pause"], &anonymous);
    assert!(!ok);
    assert!(err.contains("not authenticated"), "{err}");
}

/// Writes `text` to `path` through a rename, as a careful operator (or `pgquorum cert`) does.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Whether `tls` may commit a config change through `c`'s members within a few seconds.
async fn commits_as(c: &TestCluster, tls: &Tls, value: u64) -> bool {
    let client = raft_node::client::ApiClient::new(c.endpoints())
        .unwrap()
        .with_tls(Some(tls.clone()))
        .with_patience(Duration::from_secs(2));
    let changes = std::collections::HashMap::from([(
        "maximum_lag_on_failover".to_string(),
        value.to_string(),
    )]);
    client
        .call(|mut cl| {
            let changes = changes.clone();
            async move { cl.set_config(proto::SetConfigRequest { changes }).await }
        })
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_and_the_certificates_rotate_without_a_restart() {
    let mut c = TestCluster::new(3, DEFAULT_RAFT);
    let root = c.root.path().to_path_buf();
    // Each member reads its own copies, so this test can change them.
    let ca = root.join("ca.pem");
    std::fs::copy(pki().ca(), &ca).unwrap();
    for id in 1..=3 {
        let (cert, key) = pki().node_cert(id);
        let (mine_c, mine_k) = (
            root.join(format!("n{id}.crt")),
            root.join(format!("n{id}.key")),
        );
        std::fs::copy(&cert, &mine_c).unwrap();
        std::fs::copy(&key, &mine_k).unwrap();
        let cfg = c.nodes[&id].config_path();
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(&pki().ca().display().to_string(), &ca.display().to_string())
            .replace(&cert.display().to_string(), &mine_c.display().to_string())
            .replace(&key.display().to_string(), &mine_k.display().to_string());
        std::fs::write(&cfg, text).unwrap();
    }
    c.start_all();
    c.wait_leader(T).await;
    // The new CA, its member and operator certificates.
    let b = root.join("b");
    let bs = b.to_str().unwrap();
    for args in [
        vec!["cert", "init", bs, "--cluster", "test"],
        vec!["cert", "issue", "node", "1", "--dir", bs],
        vec!["cert", "issue", "node", "2", "--dir", bs],
        vec!["cert", "issue", "node", "3", "--dir", bs],
        vec!["cert", "issue", "operator", "new", "--dir", bs],
    ] {
        let (ok, _, err) = cli_bare(&args, &[]);
        assert!(ok, "{err}");
    }
    let a_ca = std::fs::read(pki().ca()).unwrap();
    let b_ca = std::fs::read(b.join("ca.crt")).unwrap();
    let bundle = root.join("bundle.pem");
    std::fs::write(&bundle, [a_ca.clone(), b_ca.clone()].concat()).unwrap();
    let operator = |ca: &Path, dir: &Path, stem: &str| {
        Tls::load(
            TlsFiles {
                ca: ca.to_path_buf(),
                identity: Some((
                    dir.join(format!("{stem}.crt")),
                    dir.join(format!("{stem}.key")),
                )),
            },
            Holder::Client,
        )
        .unwrap()
    };
    let new_operator = operator(&bundle, &b, "operator-new");
    let old_operator = operator(&bundle, &pki().dir, "operator-tester");
    assert!(
        !commits_as(&c, &new_operator, 1).await,
        "the new CA was trusted before the rotation"
    );
    // 1. Every member trusts both CAs: the new operator gets in, the old one still does.
    replace_file(&ca, &[a_ca.clone(), b_ca.clone()].concat());
    wait_for("the members trust the new CA too", T, || async {
        commits_as(&c, &new_operator, 2).await.then_some(())
    })
    .await;
    assert!(commits_as(&c, &old_operator, 3).await);
    // 2. Every member takes its certificate from the new CA.
    for id in 1..=3 {
        replace_file(
            &root.join(format!("n{id}.key")),
            &std::fs::read(b.join(format!("node-{id}.key"))).unwrap(),
        );
        replace_file(
            &root.join(format!("n{id}.crt")),
            &std::fs::read(b.join(format!("node-{id}.crt"))).unwrap(),
        );
    }
    let b_only = operator(&b.join("ca.crt"), &b, "operator-new");
    wait_for(
        "every member presents the new CA's certificate",
        T,
        || async {
            // A client that trusts only the new CA can verify each member.
            let mut all = true;
            for id in 1..=3 {
                let one = raft_node::client::ApiClient::new(vec![c.nodes[&id].addr.clone()])
                    .unwrap()
                    .with_tls(Some(b_only.clone()))
                    .with_patience(Duration::from_millis(300));
                all &= one
                    .call(|mut cl| async move {
                        cl.get_node_status(proto::GetNodeStatusRequest {}).await
                    })
                    .await
                    .is_ok();
            }
            all.then_some(())
        },
    )
    .await;
    // 3. The old CA is dropped: its operator is refused, the cluster goes on committing.
    replace_file(&ca, &b_ca);
    wait_for("the old CA's operator is refused", T, || async {
        (!commits_as(&c, &old_operator, 4).await).then_some(())
    })
    .await;
    assert!(commits_as(&c, &b_only, 5).await);
    let reloads = (1..=3)
        .filter(|id| log_of(&c, *id).contains("reloaded the TLS certificates"))
        .count();
    assert_eq!(reloads, 3, "every member logged its reloads");
    // Nobody restarted.
    for id in 1..=3 {
        assert!(c.nodes[&id].is_running());
        assert_eq!(log_of(&c, id).matches("sidecar started").count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_member_warns_and_takes_only_a_client_that_says_insecure() {
    let mut c = TestCluster::new(1, DEFAULT_RAFT);
    let cfg = c.nodes[&1].config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{}\n[security]\ninsecure = true\n", without_security(&text)),
    )
    .unwrap();
    c.start(1);
    wait_for("the insecure warning", T, || async {
        log_of(&c, 1)
            .contains("security.insecure = true: no TLS and no certificate checks")
            .then_some(())
    })
    .await;
    let ep = c.endpoints().join(",");
    // A client that expects TLS says how to talk to this member instead of failing obscurely.
    let (ok, _, err) = cli_bare(&["list"], &[("PGQUORUM_ENDPOINTS", &ep)]);
    assert!(!ok);
    assert!(err.contains("--insecure"), "{err}");
    // The member's registration is committed after its election: until it is applied, `list`
    // answers with the member `(unregistered)`.
    let (ok, out, err) = wait_for(
        "an insecure client sees the member registered",
        T,
        || async {
            let r = cli_bare(&["list", "--insecure"], &[("PGQUORUM_ENDPOINTS", &ep)]);
            (r.0 && !r.1.contains("(unregistered)")).then_some(r)
        },
    )
    .await;
    assert!(ok && out.contains("n1"), "{out}");
    assert!(err.contains("warning: --insecure"), "{err}");
}
