//! Test harness: real `pgquorum node` processes on loopback ports, each with its own config and
//! data dir under one temp dir, driven and observed over the real gRPC API.

#![allow(dead_code)]

pub mod workload;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use raft_node::client::ApiClient;
use raft_node::proto::{self, cluster_client::ClusterClient};

/// The binary under test, built fresh by cargo for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_pgquorum");

/// Default Raft section of test configs: the product defaults.
pub const DEFAULT_RAFT: &str = "";

/// Whether this run is CI's (`CI=true`), where a test that cannot run fails instead of
/// skipping, so a green CI run means every test ran.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The one way a test (or a check inside one) skips: prints `SKIPPED <test>: <why>` and
/// returns, so the caller can return; under `CI=true` it panics with that message instead.
/// `why` names what is missing and the fix (e.g. "needs root", "apt-get install haproxy").
pub fn skip(test: &str, why: &str) {
    let said = format!("SKIPPED {test}: {why}");
    eprintln!("{said}");
    if in_ci() {
        panic!("{said} (CI=true: a skip fails the run; give this machine what the test needs)");
    }
}

/// A free loopback port for a listener that binds it later (a sidecar, a Postgres).
///
/// Taken below the kernel's ephemeral range: a port from that range, released until the node
/// binds it, can meanwhile become the source port of any outgoing connection (the partition
/// suite's proxies open thousands), and the node then finds it in use. Each test process walks
/// its own stretch of the range, starting from its pid, and skips ports that are taken.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .clamp(LOW + 2_000, 65_535);
    let span = high - LOW;
    let start = (std::process::id() * 997) % span;
    for _ in 0..span {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port below the ephemeral range ({LOW}..{high})")
}

/// Where one member lives on the network, and how its sidecar is started.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Address of the gRPC listener and of Postgres (`listen_addr` host, `postgres.host`).
    pub host: String,
    /// gRPC port.
    pub port: u16,
    /// Postgres port.
    pub pg_port: u16,
    /// Program and arguments the sidecar command is appended to (e.g. `ip netns exec NS`);
    /// empty to run it directly.
    pub command_prefix: Vec<String>,
}

impl Placement {
    /// On loopback with free ports, run directly: how every test ran before namespaces.
    pub fn loopback() -> Self {
        Placement {
            host: "127.0.0.1".into(),
            port: free_port(),
            pg_port: free_port(),
            command_prefix: Vec::new(),
        }
    }
}

/// One sidecar process of a test cluster.
pub struct TestNode {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    /// Postgres address of this member (`postgres.host`).
    pub pg_host: String,
    /// Postgres port of this member.
    pub pg_port: u16,
    /// Prepended to the sidecar's command line (see [`Placement::command_prefix`]).
    pub command_prefix: Vec<String>,
    /// Stopped with SIGSTOP by the test.
    pub frozen: bool,
    child: Option<Child>,
}

impl TestNode {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("node.toml")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("sidecar.log")
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of sidecar processes under one temp dir.
pub struct TestCluster {
    pub root: tempfile::TempDir,
    pub cluster_name: String,
    pub nodes: BTreeMap<u64, TestNode>,
    raft_toml: String,
    /// The sidecars manage real Postgres instances.
    pub postgres: bool,
    /// `postgres.allowed_cidrs` of every member; empty for the product default (loopback).
    pub allowed_cidrs: Vec<String>,
}

/// The test process's cluster CA, a certificate for members 1..=9, an operator certificate
/// and a token, made once with `pgquorum cert` (every test cluster runs with TLS, as the product
/// does by default).
pub struct Pki {
    pub dir: PathBuf,
}

/// The highest member id the test PKI has a certificate for.
pub const PKI_NODES: u64 = 9;

/// The test process's PKI, made on first use.
pub fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("pki dir").keep();
        let run = |args: &[&str]| {
            let out = Command::new(BIN)
                .args(args)
                .output()
                .expect("run pgquorum cert");
            assert!(
                out.status.success(),
                "pgquorum {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let d = dir.to_str().expect("utf-8 temp dir");
        run(&["cert", "init", d, "--cluster", "test"]);
        for id in 1..=PKI_NODES {
            run(&["cert", "issue", "node", &id.to_string(), "--dir", d]);
        }
        run(&["cert", "issue", "operator", "tester", "--dir", d]);
        run(&["cert", "token", &format!("{d}/token")]);
        Pki { dir }
    })
}

impl Pki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn node_cert(&self, id: u64) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("node-{id}.crt")),
            self.dir.join(format!("node-{id}.key")),
        )
    }
    pub fn operator_cert(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("operator-tester.crt"),
            self.dir.join("operator-tester.key"),
        )
    }
    pub fn token_file(&self) -> PathBuf {
        self.dir.join("token")
    }
    /// The `[security]` table of member `id`.
    pub fn security_toml(&self, id: u64) -> String {
        assert!(
            id <= PKI_NODES,
            "the test PKI has certificates for members 1..={PKI_NODES}"
        );
        let (cert, key) = self.node_cert(id);
        format!(
            "\n[security]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             token_file = \"{}\"\n",
            self.ca().display(),
            cert.display(),
            key.display(),
            self.token_file().display()
        )
    }
    /// TLS as the test's operator.
    pub fn operator_tls(&self) -> raft_node::security::Tls {
        raft_node::security::Tls::load(
            raft_node::security::TlsFiles {
                ca: self.ca(),
                identity: Some(self.operator_cert()),
            },
            raft_node::security::Holder::Client,
        )
        .expect("operator TLS")
    }
    /// TLS as member `id` (to speak for it, as its sidecar does).
    pub fn node_tls(&self, id: u64) -> raft_node::security::Tls {
        raft_node::security::Tls::load(
            raft_node::security::TlsFiles {
                ca: self.ca(),
                identity: Some(self.node_cert(id)),
            },
            raft_node::security::Holder::Node(id),
        )
        .expect("node TLS")
    }
    /// The CLI's environment for the test's operator.
    pub fn operator_env(&self) -> Vec<(String, String)> {
        let (cert, key) = self.operator_cert();
        vec![
            ("PGQUORUM_CA_FILE".into(), self.ca().display().to_string()),
            ("PGQUORUM_CERT_FILE".into(), cert.display().to_string()),
            ("PGQUORUM_KEY_FILE".into(), key.display().to_string()),
        ]
    }
}

/// A gRPC channel to `addr` over TLS with `tls` (no retries, short timeouts).
pub async fn channel(
    addr: &str,
    tls: &raft_node::security::Tls,
) -> Option<tonic::transport::Channel> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2));
    tls.connect(ep).await.ok()
}

/// `GET path` on `addr` with an optional `Authorization` header: the status code and the
/// body, or `None` when nothing answers within two seconds.
pub async fn http_get(
    addr: &str,
    path: &str,
    authorization: Option<&str>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let auth = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes())
            .await
            .ok()?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.ok()?;
        let text = String::from_utf8_lossy(&all).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split(' ').nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// Superuser password of test clusters (they listen on loopback, or inside network namespaces
/// of their own test, only).
pub const PG_PASSWORD: &str = "test-superuser-secret";

impl TestCluster {
    /// Writes configs for members `1..=n` of a new cluster; starts nothing.
    pub fn new(n: u64, raft_toml: &str) -> Self {
        Self::build(n, raft_toml, false)
    }

    /// Like [`TestCluster::new`], with every sidecar managing its own Postgres.
    pub fn with_postgres(n: u64) -> Self {
        Self::build(n, DEFAULT_RAFT, true)
    }

    /// A cluster of members managing Postgres, member `id` placed at `placements[&id]` (e.g.
    /// in a network namespace), their Postgres admitting clients from `allowed_cidrs`. Writes
    /// configs; starts nothing.
    pub fn with_postgres_placed(
        placements: BTreeMap<u64, Placement>,
        allowed_cidrs: Vec<String>,
    ) -> Self {
        Self::build_placed(placements, DEFAULT_RAFT, true, allowed_cidrs)
    }

    fn build(n: u64, raft_toml: &str, postgres: bool) -> Self {
        let placements = (1..=n).map(|id| (id, Placement::loopback())).collect();
        Self::build_placed(placements, raft_toml, postgres, Vec::new())
    }

    fn build_placed(
        placements: BTreeMap<u64, Placement>,
        raft_toml: &str,
        postgres: bool,
        allowed_cidrs: Vec<String>,
    ) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        // Postgres runs as the unprivileged `postgres` user when tests run as root.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod temp dir");
        let mut c = TestCluster {
            root,
            cluster_name: "test".into(),
            nodes: BTreeMap::new(),
            raft_toml: raft_toml.to_string(),
            postgres,
            allowed_cidrs,
        };
        let ids: Vec<u64> = placements.keys().copied().collect();
        for (id, p) in placements {
            let node = c.node_at(id, p);
            c.nodes.insert(id, node);
        }
        let initial: Vec<(u64, String)> =
            c.nodes.values().map(|n| (n.id, n.addr.clone())).collect();
        for id in ids {
            c.write_config(id, &initial);
        }
        c
    }

    /// Starts an `n`-node cluster with product defaults and waits for its leader and for every
    /// member's registration (its name, addresses and timings) to be committed.
    pub async fn started(n: u64, raft_toml: &str) -> Self {
        let mut c = Self::new(n, raft_toml);
        c.start_all();
        c.wait_leader(Duration::from_secs(20)).await;
        c.wait_registered(Duration::from_secs(20)).await;
        c
    }

    fn node_at(&self, id: u64, p: Placement) -> TestNode {
        TestNode {
            id,
            addr: format!("{}:{}", p.host, p.port),
            dir: self.root.path().join(format!("n{id}")),
            pg_host: p.host,
            pg_port: p.pg_port,
            command_prefix: p.command_prefix,
            frozen: false,
            child: None,
        }
    }

    fn write_config(&self, id: u64, initial: &[(u64, String)]) {
        let node = &self.nodes[&id];
        std::fs::create_dir_all(&node.dir).expect("node dir");
        std::fs::set_permissions(
            &node.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod node dir");
        let mut s = format!(
            "cluster_name = \"{}\"\nnode_id = {id}\nname = \"n{id}\"\ndata_dir = \"data\"\n\
             listen_addr = \"{}\"\n\n[postgres]\nhost = \"{}\"\nport = {}\n",
            self.cluster_name, node.addr, node.pg_host, node.pg_port
        );
        if !self.allowed_cidrs.is_empty() {
            let quoted: Vec<String> = self
                .allowed_cidrs
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect();
            s.push_str(&format!("allowed_cidrs = [{}]\n", quoted.join(", ")));
        }
        if self.postgres {
            s.push_str(&format!(
                "data_dir = \"pgdata\"\nsuperuser_password = \"{PG_PASSWORD}\"\n\
                 replication_password = \"test-replication-secret\"\n"
            ));
            // Members in network namespaces share this host's filesystem and may share a
            // port: the socket file names would collide in one directory.
            if !node.command_prefix.is_empty() {
                s.push_str("socket_dir = \"socket\"\n");
            }
        }
        if !self.raft_toml.is_empty() {
            s.push_str(&format!("\n[raft]\n{}\n", self.raft_toml));
        }
        s.push_str(&pki().security_toml(id));
        for (mid, addr) in initial {
            s.push_str(&format!(
                "\n[[initial_members]]\nid = {mid}\naddr = \"{addr}\"\n"
            ));
        }
        std::fs::write(node.config_path(), s).expect("write config");
    }

    /// Puts `line` into node `id`'s config just before the first `before` (e.g. a top-level key
    /// before `listen_addr`, or a `[postgres]` key after `[postgres]\n` by inserting before
    /// what follows it), before it starts.
    #[allow(dead_code)]
    pub fn insert_config(&mut self, id: u64, before: &str, line: &str) {
        let path = self.nodes[&id].config_path();
        let text = std::fs::read_to_string(&path).expect("read config");
        assert!(
            text.contains(before),
            "no '{before}' in the config of node {id}"
        );
        let text = text.replacen(before, &format!("{line}\n{before}"), 1);
        std::fs::write(path, text).expect("write config");
    }

    /// Appends TOML (e.g. a `[tags]` table) to node `id`'s config before it starts.
    pub fn append_config(&mut self, id: u64, toml: &str) {
        let path = self.nodes[&id].config_path();
        let mut text = std::fs::read_to_string(&path).expect("read config");
        text.push_str(toml);
        std::fs::write(path, text).expect("write config");
    }

    /// Adds the config of a node that will join the running cluster (empty initial_members).
    pub fn add_joiner(&mut self, id: u64) {
        let node = self.node_at(id, Placement::loopback());
        self.nodes.insert(id, node);
        self.write_config(id, &[]);
    }

    pub fn start_all(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.start(id);
        }
    }

    /// Starts (or restarts) node `id`.
    pub fn start(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())
            .expect("log file");
        // `ip netns exec` execs the program in place, so the child's pid stays the sidecar's
        // and kill9, stop and signal_sidecar reach it directly.
        let mut cmd = match node.command_prefix.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["node", "--config"])
            .arg(node.config_path())
            .env(
                "PGQUORUM_LOG",
                std::env::var("PGQUORUM_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn pgquorum node");
        node.child = Some(child);
    }

    /// SIGKILL: no shutdown code runs, unflushed writes are lost as in a crash.
    pub fn kill9(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, a sidecar restart's stop, and wait for a clean exit; returns the exit status.
    /// Postgres keeps running under its guard for the restart window, for the next sidecar.
    pub fn stop(&mut self, id: u64) -> ExitStatus {
        self.signal_and_wait(id, libc::SIGTERM)
    }

    /// SIGINT: the sidecar stops and takes its Postgres down with it; returns the exit status.
    pub fn stop_with_postgres(&mut self, id: u64) -> ExitStatus {
        self.signal_and_wait(id, libc::SIGINT)
    }

    fn signal_and_wait(&mut self, id: u64, sig: libc::c_int) -> ExitStatus {
        let node = self.nodes.get_mut(&id).expect("known node");
        let mut child = node.child.take().expect("node is running");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node {id} did not exit within 15 s of signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.is_running() && !n.frozen)
            .map(|n| n.addr.clone())
            .collect()
    }

    /// A client over every running member.
    pub fn client(&self) -> ApiClient {
        ApiClient::new(self.endpoints())
            .expect("endpoints")
            .with_tls(Some(pki().operator_tls()))
            .with_patience(Duration::from_secs(15))
    }

    /// A raw gRPC client to exactly one member (no forwarding by the client).
    pub async fn raw(&self, id: u64) -> Option<ClusterClient<tonic::transport::Channel>> {
        channel(&self.nodes[&id].addr, &pki().operator_tls())
            .await
            .map(ClusterClient::new)
    }

    /// Node `id`'s own Raft status, if it answers.
    pub async fn status(&self, id: u64) -> Option<proto::NodeStatus> {
        let mut c = self.raw(id).await?;
        c.get_node_status(proto::GetNodeStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Node `id`'s applied view of the cluster (its local, possibly stale, state).
    pub async fn local_topology(&self, id: u64) -> Option<proto::Topology> {
        let mut c = self.raw(id).await?;
        c.get_topology(proto::GetTopologyRequest { local: true })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// The cluster's topology as the Raft leader serves it (with what its members' reports
    /// say of each Postgres, which only the leader knows), or None when no leader answers.
    pub async fn cluster_topology(&self) -> Option<proto::Topology> {
        self.client()
            .call(|mut c| async move {
                c.get_topology(proto::GetTopologyRequest { local: false })
                    .await
            })
            .await
            .ok()
    }

    /// Node `id`'s applied configuration.
    pub async fn local_config(&self, id: u64) -> Option<proto::ClusterConfig> {
        let mut c = self.raw(id).await?;
        c.get_config(proto::GetConfigRequest { local: true })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits until every running member reports the same leader in the same term, and that
    /// leader reports itself leader; returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        wait_for("one agreed leader", timeout, || async {
            let mut seen = Vec::new();
            for n in self.nodes.values().filter(|n| n.is_running() && !n.frozen) {
                let s = self.status(n.id).await?;
                seen.push(s);
            }
            let first = seen.first()?;
            let leader = first.leader_id;
            let agreed = leader != 0
                && seen
                    .iter()
                    .all(|s| s.leader_id == leader && s.term == first.term);
            let leaders = seen
                .iter()
                .filter(|s| s.raft_role_name() == "leader")
                .count();
            let leader_says = seen
                .iter()
                .any(|s| s.id == leader && s.raft_role_name() == "leader");
            (agreed && leaders == 1 && leader_says).then_some(leader)
        })
        .await
    }

    /// Waits until the committed topology shows every running member registered (an elected
    /// leader does not mean the sidecars' registrations are applied yet: until then `list`
    /// shows `(unregistered)` and no name); returns that topology.
    pub async fn wait_registered(&self, timeout: Duration) -> proto::Topology {
        let client = self.client();
        wait_for("every running member registered", timeout, || async {
            let t = client
                .call(|mut c| async move {
                    c.get_topology(proto::GetTopologyRequest { local: false })
                        .await
                })
                .await
                .ok()?;
            let all = self
                .nodes
                .values()
                .filter(|n| n.is_running() && !n.frozen)
                .all(|n| t.members.iter().any(|m| m.id == n.id && m.registered));
            all.then_some(t)
        })
        .await
    }

    /// Commits `lease_ms = value` (any valid SetConfig) through the cluster; returns the log index.
    pub async fn set_config(
        &self,
        key: &str,
        value: &str,
    ) -> Result<u64, raft_node::client::ClientError> {
        let changes = std::collections::HashMap::from([(key.to_string(), value.to_string())]);
        self.client()
            .call(|mut c| {
                let changes = changes.clone();
                async move { c.set_config(proto::SetConfigRequest { changes }).await }
            })
            .await
            .map(|r| r.log_index)
    }

    /// The last lines of every node's log, for failure reports.
    pub fn log_tails(&self) -> String {
        let mut s = String::new();
        for n in self.nodes.values() {
            let text = std::fs::read_to_string(n.log_path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let lines: Vec<&str> = lines
                .into_iter()
                .filter(|l| !l.contains("openraft") && !l.contains("raft role"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            s.push_str(&format!(
                "---- n{} ({}) ----\n{}\n",
                n.id,
                n.addr,
                tail.join("\n")
            ));
        }
        s
    }

    /// Copies every node's whole log, and its Postgres log, to `failed-logs/<temp dir name>/` in the test build's
    /// scratch directory, for a failure to be read after the temp dirs are gone.
    pub fn keep_logs(&self) {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("failed-logs")
            .join(
                self.root
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| std::process::id().to_string()),
            );
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        for n in self.nodes.values() {
            let _ = std::fs::copy(n.log_path(), dir.join(format!("n{}.log", n.id)));
            // Postgres logs beside its data directory (`pgdata.log`).
            for entry in std::fs::read_dir(&n.dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") && entry.path() != n.log_path() {
                    let _ = std::fs::copy(entry.path(), dir.join(format!("n{}-{name}", n.id)));
                }
            }
        }
        eprintln!("whole logs kept in {}", dir.display());
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.nodes[&id].dir.join("data")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
            self.keep_logs();
        }
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl TestCluster {
    /// Waits until one member runs as primary and every other as its replica (by the leader's
    /// reports); returns the primary's id and the topology.
    pub async fn wait_postgres(&self, timeout: Duration) -> (u64, proto::Topology) {
        let client = self.client();
        wait_for("one primary and replicas", timeout, || async {
            let t = client
                .call(|mut c| async move {
                    c.get_topology(proto::GetTopologyRequest { local: false })
                        .await
                })
                .await
                .ok()?;
            let running: Vec<u64> = self
                .nodes
                .values()
                .filter(|n| n.is_running() && !n.frozen)
                .map(|n| n.id)
                .collect();
            let primary = t.primary.as_ref()?.node_id;
            let ok = t
                .members
                .iter()
                .filter(|m| running.contains(&m.id))
                .all(|m| {
                    if m.id == primary {
                        m.pg_role_name() == "primary"
                    } else {
                        m.pg_role_name() == "replica"
                    }
                });
            (ok && running.contains(&primary)).then_some((primary, t))
        })
        .await
    }

    /// A multi-host libpq URL that only connects to the writable member.
    pub fn pg_url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .values()
            .map(|n| format!("{}:{}", n.pg_host, n.pg_port))
            .collect();
        format!(
            "postgresql://postgres:{PG_PASSWORD}@{}/postgres?target_session_attrs=read-write&connect_timeout=1",
            hosts.join(",")
        )
    }

    /// Whether member `id`'s Postgres answers and is not in recovery (None: no answer).
    pub async fn writable(&self, id: u64) -> Option<bool> {
        let n = &self.nodes[&id];
        host_writable(&n.pg_host, n.pg_port).await
    }

    /// A libpq URL of member `id`'s Postgres alone, as the superuser.
    pub fn pg_url_of(&self, id: u64) -> String {
        let n = &self.nodes[&id];
        pg_url_at(&n.pg_host, n.pg_port)
    }

    /// The pid of member `id`'s postmaster, from its `postmaster.pid`.
    pub fn postmaster_pid(&self, id: u64) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.nodes[&id].dir.join("pgdata/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// A host crash of member `id`: its sidecar, guard, postmaster and every backend die at
    /// once (the guard runs Postgres in its own process group). Returns when it happened: the
    /// instant the SIGKILLs had been sent, so the postmaster can accept no connection begun
    /// later. Nothing is waited on in between: reaping the sidecar first would leave its
    /// Postgres serving new connections for as long as that takes.
    pub fn crash_host(&mut self, id: u64) -> std::time::Instant {
        let postmaster = self.postmaster_pid(id).expect("postmaster pid");
        // SAFETY: getpgid has no preconditions.
        let group = unsafe { libc::getpgid(postmaster) };
        assert!(group > 1, "postmaster has a process group");
        let sidecar = self.nodes[&id].pid().expect("sidecar running") as i32;
        // SAFETY: killing the test's own Postgres process group and sidecar process.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
            libc::kill(sidecar, libc::SIGKILL);
        }
        let at = std::time::Instant::now();
        self.kill9(id);
        at
    }

    /// Sends `signal` to member `id`'s sidecar process (SIGSTOP marks it frozen, SIGCONT
    /// thawed).
    pub fn signal_sidecar(&mut self, id: u64, signal: i32) {
        let node = self.nodes.get_mut(&id).expect("known node");
        let pid = node.pid().expect("sidecar running") as i32;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, signal) };
        match signal {
            libc::SIGSTOP => node.frozen = true,
            libc::SIGCONT => node.frozen = false,
            _ => {}
        }
    }
}

/// Whether the Postgres on loopback `port` answers and is not in recovery (None: no answer).
pub async fn port_writable(port: u16) -> Option<bool> {
    host_writable("127.0.0.1", port).await
}

/// A libpq URL of the Postgres at `host:port`, as the superuser.
pub fn pg_url_at(host: &str, port: u16) -> String {
    format!("postgresql://postgres:{PG_PASSWORD}@{host}:{port}/postgres?connect_timeout=1")
}

/// Whether the Postgres at `host:port` answers and is not in recovery (None: no answer).
pub async fn host_writable(host: &str, port: u16) -> Option<bool> {
    let url = pg_url_at(host, port);
    let fut = async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .ok()?;
        Some(!row.get::<_, bool>(0))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// Polls `probe` every 50 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the CLI with `args`; returns (exit success, stdout, stderr).
pub fn cli(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let creds = pki().operator_env();
    let mut all: Vec<(&str, &str)> = creds
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    all.extend_from_slice(envs);
    cli_bare(args, &all)
}

/// Runs the CLI with `envs` only: no operator credentials unless `envs` gives them.
pub fn cli_bare(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("PGQUORUM_ENDPOINTS")
        .env_remove("PGQUORUM_CA_FILE")
        .env_remove("PGQUORUM_CERT_FILE")
        .env_remove("PGQUORUM_KEY_FILE")
        .env_remove("PGQUORUM_TOKEN_FILE")
        .env_remove("PGQUORUM_INSECURE")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run pgquorum");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file under `dir` with its content, to prove a refused start wrote nothing.
pub fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}
