//! Test harness: real `pgquorum node` processes on loopback ports, each with its own config and
//! data dir under one temp dir, driven and observed over the real gRPC API.

#![allow(dead_code)]

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

/// A free loopback port (the kernel's choice; released before the node binds it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// One sidecar process of a test cluster.
pub struct TestNode {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
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
}

impl TestCluster {
    /// Writes configs for members `1..=n` of a new cluster; starts nothing.
    pub fn new(n: u64, raft_toml: &str) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let mut c = TestCluster {
            root,
            cluster_name: "test".into(),
            nodes: BTreeMap::new(),
            raft_toml: raft_toml.to_string(),
        };
        let ids: Vec<u64> = (1..=n).collect();
        for id in &ids {
            c.nodes.insert(
                *id,
                TestNode {
                    id: *id,
                    addr: format!("127.0.0.1:{}", free_port()),
                    dir: c.root.path().join(format!("n{id}")),
                    child: None,
                },
            );
        }
        let initial: Vec<(u64, String)> =
            c.nodes.values().map(|n| (n.id, n.addr.clone())).collect();
        for id in ids {
            c.write_config(id, &initial);
        }
        c
    }

    /// Starts a 3-node cluster with product defaults and waits for its leader.
    pub async fn started(n: u64, raft_toml: &str) -> Self {
        let mut c = Self::new(n, raft_toml);
        c.start_all();
        c.wait_leader(Duration::from_secs(20)).await;
        c
    }

    fn write_config(&self, id: u64, initial: &[(u64, String)]) {
        let node = &self.nodes[&id];
        std::fs::create_dir_all(&node.dir).expect("node dir");
        let mut s = format!(
            "cluster_name = \"{}\"\nnode_id = {id}\nname = \"n{id}\"\ndata_dir = \"data\"\n\
             listen_addr = \"{}\"\n\n[postgres]\nhost = \"127.0.0.1\"\nport = {}\n",
            self.cluster_name,
            node.addr,
            5400 + id
        );
        if !self.raft_toml.is_empty() {
            s.push_str(&format!("\n[raft]\n{}\n", self.raft_toml));
        }
        for (mid, addr) in initial {
            s.push_str(&format!(
                "\n[[initial_members]]\nid = {mid}\naddr = \"{addr}\"\n"
            ));
        }
        std::fs::write(node.config_path(), s).expect("write config");
    }

    /// Adds the config of a node that will join the running cluster (empty initial_members).
    pub fn add_joiner(&mut self, id: u64) {
        self.nodes.insert(
            id,
            TestNode {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                dir: self.root.path().join(format!("n{id}")),
                child: None,
            },
        );
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
        let child = Command::new(BIN)
            .args(["node", "--config"])
            .arg(node.config_path())
            .env("PGQUORUM_LOG", "info,openraft=warn")
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

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self, id: u64) -> ExitStatus {
        let node = self.nodes.get_mut(&id).expect("known node");
        let mut child = node.child.take().expect("node is running");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node {id} did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.is_running())
            .map(|n| n.addr.clone())
            .collect()
    }

    /// A client over every running member.
    pub fn client(&self) -> ApiClient {
        ApiClient::new(self.endpoints())
            .expect("endpoints")
            .with_patience(Duration::from_secs(15))
    }

    /// A raw gRPC client to exactly one member (no forwarding by the client).
    pub async fn raw(&self, id: u64) -> Option<ClusterClient<tonic::transport::Channel>> {
        let addr = &self.nodes[&id].addr;
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2));
        ep.connect().await.ok().map(ClusterClient::new)
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
            for n in self.nodes.values().filter(|n| n.is_running()) {
                let s = self.status(n.id).await?;
                seen.push(s);
            }
            let first = seen.first()?;
            let leader = first.leader_id;
            let agreed = leader != 0
                && seen
                    .iter()
                    .all(|s| s.leader_id == leader && s.term == first.term);
            let leaders = seen.iter().filter(|s| s.raft_role == "leader").count();
            let leader_says = seen
                .iter()
                .any(|s| s.id == leader && s.raft_role == "leader");
            (agreed && leaders == 1 && leader_says).then_some(leader)
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
            let tail = &lines[lines.len().saturating_sub(30)..];
            s.push_str(&format!(
                "---- n{} ({}) ----\n{}\n",
                n.id,
                n.addr,
                tail.join("\n")
            ));
        }
        s
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.nodes[&id].dir.join("data")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
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
    let out = Command::new(BIN)
        .args(args)
        .env_remove("PGQUORUM_ENDPOINTS")
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
