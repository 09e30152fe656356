//! `pgquorum local`: a cluster of real sidecar processes on loopback ports under one directory.
//!
//! Layout of `--dir`: `cluster.json` (endpoints and node directories), and per node `nN/`
//! holding `node.toml`, `data/`, `sidecar.log` and `sidecar.pid`. Members made by `local up`
//! also serve HTTP on loopback (`/primary`, `/replica`, `/health`, `/cluster`, `/metrics`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use raft_node::client::ApiClient;
use raft_node::proto;
use serde::{Deserialize, Serialize};

use crate::{output, Output};

#[derive(Subcommand)]
pub enum LocalCmd {
    /// Create (first time) or restart a local cluster and wait until it has a leader.
    Up {
        /// Number of members (3, 5 or 7 make sense).
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Directory that holds the cluster; created if missing.
        #[arg(long)]
        dir: PathBuf,
        /// Only the Raft group: the sidecars manage no Postgres.
        #[arg(long)]
        no_postgres: bool,
        /// A new cluster without TLS or authentication (debugging only): anyone who reaches
        /// the loopback ports can steer it. By default a CA, member and operator certificates
        /// and a token are made under DIR/tls.
        #[arg(long)]
        insecure: bool,
    },
    /// Show the members of the local cluster.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stop every process of the local cluster, Postgres too (SIGINT, then SIGKILL after 10 s).
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Layout {
    cluster_name: String,
    /// Postgres settings shared by every member; absent for a Raft-only cluster.
    #[serde(default)]
    postgres: Option<LocalPostgres>,
    pub(crate) nodes: Vec<LocalNode>,
    /// Extra network (CIDR) allowed to connect as the superuser, beside the members: the host
    /// side of members that run on their own addresses.
    #[serde(default)]
    pub(crate) client_cidr: String,
    /// The CA, the members' and the operator's certificates and the token; absent for an
    /// insecure cluster.
    #[serde(default)]
    pub(crate) tls_dir: Option<PathBuf>,
}

/// The operator certificate `local up` makes for the person who runs it.
const LOCAL_OPERATOR: &str = "local";

#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct LocalNode {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) api_addr: String,
    pub(crate) dir: PathBuf,
    #[serde(default)]
    pub(crate) pg_port: u16,
    /// The member's own address (Postgres' host); empty: 127.0.0.1.
    #[serde(default)]
    pub(crate) host: String,
    /// Runs the sidecar through this command, e.g. `ip netns exec NS`; empty: directly.
    #[serde(default)]
    pub(crate) exec_prefix: Vec<String>,
    /// The member's HTTP address (`http_addr`: health checks and metrics); empty: none (the
    /// benches' clusters, and clusters made before `local up` gave one).
    #[serde(default)]
    pub(crate) http_addr: String,
}

#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct LocalPostgres {
    superuser_password: String,
    replication_password: String,
}

impl Layout {
    /// A libpq URL over every member that only connects to the writable one.
    pub(crate) fn uri(&self) -> Option<String> {
        let pg = self.postgres.as_ref()?;
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}:{}", n.pg_host(), n.pg_port))
            .collect();
        Some(format!(
            "postgresql://postgres:{}@{}/postgres?target_session_attrs=read-write&connect_timeout=2",
            pg.superuser_password,
            hosts.join(",")
        ))
    }

    /// A libpq URL of one member's Postgres alone, whatever its role.
    pub(crate) fn member_uri(&self, node: &LocalNode) -> Option<String> {
        let pg = self.postgres.as_ref()?;
        Some(format!(
            "postgresql://postgres:{}@{}:{}/postgres?connect_timeout=1",
            pg.superuser_password,
            node.pg_host(),
            node.pg_port
        ))
    }
}

impl Layout {
    pub(crate) fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.api_addr.clone()).collect()
    }

    /// The environment that points the CLI at this cluster, with its CA and operator
    /// certificate.
    pub(crate) fn client_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("PGQUORUM_ENDPOINTS", self.endpoints().join(","))];
        match &self.tls_dir {
            Some(d) => {
                let file = |f: String| d.join(f).display().to_string();
                env.push(("PGQUORUM_CA_FILE", file("ca.crt".into())));
                env.push((
                    "PGQUORUM_CERT_FILE",
                    file(format!("operator-{LOCAL_OPERATOR}.crt")),
                ));
                env.push((
                    "PGQUORUM_KEY_FILE",
                    file(format!("operator-{LOCAL_OPERATOR}.key")),
                ));
            }
            None => env.push(("PGQUORUM_INSECURE", "1".into())),
        }
        env
    }

    /// The TLS an operator of this cluster speaks (none for an insecure one).
    pub(crate) fn tls(&self) -> Result<Option<raft_node::security::Tls>> {
        use raft_node::security::{Holder, Tls, TlsFiles};
        let Some(d) = &self.tls_dir else {
            return Ok(None);
        };
        Ok(Some(Tls::load(
            TlsFiles {
                ca: d.join("ca.crt"),
                identity: Some((
                    d.join(format!("operator-{LOCAL_OPERATOR}.crt")),
                    d.join(format!("operator-{LOCAL_OPERATOR}.key")),
                )),
            },
            Holder::Client,
        )?))
    }

    /// The CLI's security settings for this cluster's operator.
    pub(crate) fn client_security(&self) -> crate::ClientSecurity {
        match &self.tls_dir {
            Some(d) => crate::ClientSecurity {
                ca_file: Some(d.join("ca.crt")),
                cert_file: Some(d.join(format!("operator-{LOCAL_OPERATOR}.crt"))),
                key_file: Some(d.join(format!("operator-{LOCAL_OPERATOR}.key"))),
                token_file: None,
                insecure: false,
            },
            None => crate::ClientSecurity {
                insecure: true,
                ..Default::default()
            },
        }
    }

    /// A client of this cluster over `endpoints`, as its operator.
    pub(crate) fn client_for(&self, endpoints: Vec<String>) -> Result<ApiClient> {
        Ok(ApiClient::new(endpoints)?.with_tls(self.tls()?))
    }

    /// A client of every member, as its operator.
    pub(crate) fn client(&self) -> Result<ApiClient> {
        self.client_for(self.endpoints())
    }

    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("cluster.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no local cluster in {} (missing cluster.json); create one with \
                 `pgquorum local up --dir {}`",
                dir.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }
}

pub async fn run(cmd: LocalCmd) -> Result<()> {
    match cmd {
        LocalCmd::Up {
            nodes,
            dir,
            no_postgres,
            insecure,
        } => up(nodes, &dir, !no_postgres, !insecure).await,
        LocalCmd::Status { dir, output } => {
            let layout = Layout::load(&dir)?;
            let client = layout.client()?.with_patience(Duration::from_secs(3));
            crate::print_topology(&client, output).await
        }
        LocalCmd::Down { dir } => down(&dir),
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn node_config(layout: &Layout, node: &LocalNode) -> String {
    let mut s = format!(
        "# Written by `pgquorum local up`.\n\
         cluster_name = \"{}\"\n\
         node_id = {}\n\
         name = \"{}\"\n\
         data_dir = \"data\"\n\
         listen_addr = \"{}\"\n",
        layout.cluster_name, node.id, node.name, node.api_addr
    );
    if !node.http_addr.is_empty() {
        // No `metrics_token_file`: `/metrics` is open like the health checks, on loopback.
        s.push_str(&format!("http_addr = \"{}\"\n", node.http_addr));
    }
    s.push_str(&format!(
        "\n[postgres]\nhost = \"{}\"\nport = {}\n",
        node.pg_host(),
        node.pg_port
    ));
    if let Some(pg) = &layout.postgres {
        s.push_str(&format!(
            "data_dir = \"pgdata\"\nsocket_dir = \"socket\"\nsuperuser_password = \"{}\"\n\
             replication_password = \"{}\"\n",
            pg.superuser_password, pg.replication_password
        ));
        if !layout.client_cidr.is_empty() {
            s.push_str(&format!("allowed_cidrs = [\"{}\"]\n", layout.client_cidr));
        }
    }
    match &layout.tls_dir {
        Some(d) => s.push_str(&format!(
            "\n[security]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             token_file = \"{}\"\n",
            d.join("ca.crt").display(),
            d.join(format!("node-{}.crt", node.id)).display(),
            d.join(format!("node-{}.key", node.id)).display(),
            d.join("token").display(),
        )),
        None => s.push_str("\n[security]\ninsecure = true\n"),
    }
    for m in &layout.nodes {
        s.push_str(&format!(
            "\n[[initial_members]]\nid = {}\naddr = \"{}\"\n",
            m.id, m.api_addr
        ));
    }
    s
}

/// A random password for a cluster that only listens on loopback.
fn random_secret() -> Result<String> {
    let mut buf = [0u8; 12];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// When run as root, Postgres runs as an unprivileged user who must be able to reach `dir`.
fn check_reachable_by_postgres(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    for ancestor in dir.ancestors() {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            bail!(
                "{} is not searchable by other users, so the unprivileged `postgres` user (Postgres \
                 refuses to run as root) cannot reach {}; use a directory such as /tmp/pgquorum-demo, \
                 or `chmod o+x {}`",
                ancestor.display(),
                dir.display(),
                ancestor.display()
            );
        }
    }
    Ok(())
}

pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // Reap it if it is our own exited child (the bench starts sidecars itself); a zombie still
    // answers kill(pid, 0).
    // SAFETY: waitpid with WNOHANG on a pid; fails harmlessly if it is not our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    // SAFETY: kill with signal 0 only checks whether the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    state != Some("Z")
}

impl LocalNode {
    /// Where this member's Postgres listens.
    pub(crate) fn pg_host(&self) -> &str {
        if self.host.is_empty() {
            "127.0.0.1"
        } else {
            &self.host
        }
    }

    /// The pid of this member's running sidecar, if it runs.
    pub(crate) fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("sidecar.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|p| pid_alive(*p))
    }
}

fn start_node(node: &LocalNode) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot locate the pgquorum binary")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.dir.join("sidecar.log"))
        .with_context(|| format!("cannot open the log in {}", node.dir.display()))?;
    let mut cmd = match node.exec_prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let child = cmd
        .arg("node")
        .arg("--config")
        .arg(node.dir.join("node.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a Ctrl-C in the launching shell must not stop the cluster.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the sidecar of {}", node.name))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    std::fs::write(node.dir.join("sidecar.pid"), pid.to_string())?;
    Ok(pid)
}

/// Loads the layout in `dir`, or creates a new cluster of `count` members there (serving no
/// HTTP).
pub(crate) fn load_or_create(
    count: u32,
    dir: &Path,
    postgres: bool,
    secure: bool,
) -> Result<Layout> {
    create_with(count, dir, postgres, secure, None, false)
}

/// Where the members of a new cluster run: member `id` (from 1) on address `hosts[id - 1]`,
/// its sidecar started through `prefixes[id - 1]` (e.g. `ip netns exec NS`).
pub(crate) struct Placement {
    pub(crate) hosts: Vec<String>,
    pub(crate) prefixes: Vec<Vec<String>>,
    /// The network of the members and of the host that reaches them.
    pub(crate) cidr: String,
}

/// Like [`load_or_create`], with every member on its own address (fixed ports, as each address
/// is its own host) when `placement` says so, and with `http` an HTTP address for every member
/// of a new cluster.
pub(crate) fn create_with(
    count: u32,
    dir: &Path,
    postgres: bool,
    secure: bool,
    placement: Option<&Placement>,
    http: bool,
) -> Result<Layout> {
    if dir.join("cluster.json").exists() {
        return Layout::load(dir);
    }
    if !(1..=9).contains(&count) {
        bail!("--nodes must be between 1 and 9 (3, 5 or 7 tolerate failures)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    if postgres {
        check_reachable_by_postgres(&dir)?;
    }
    let mut nodes = Vec::new();
    for id in 1..=u64::from(count) {
        let (api_addr, pg_port, host, exec_prefix, http_addr) = match placement {
            Some(p) => {
                let i = (id - 1) as usize;
                let host = p.hosts.get(i).context("a host for every member")?.clone();
                let prefix = p.prefixes.get(i).cloned().unwrap_or_default();
                let http_addr = if http {
                    format!("{host}:8008")
                } else {
                    String::new()
                };
                (format!("{host}:7001"), 5432, host, prefix, http_addr)
            }
            None => (
                format!("127.0.0.1:{}", free_port()?),
                free_port()?,
                String::new(),
                Vec::new(),
                if http {
                    format!("127.0.0.1:{}", free_port()?)
                } else {
                    String::new()
                },
            ),
        };
        nodes.push(LocalNode {
            id,
            name: format!("n{id}"),
            api_addr,
            dir: dir.join(format!("n{id}")),
            pg_port,
            host,
            exec_prefix,
            http_addr,
        });
    }
    let layout = Layout {
        cluster_name: "local".into(),
        postgres: if postgres {
            Some(LocalPostgres {
                superuser_password: random_secret()?,
                replication_password: random_secret()?,
            })
        } else {
            None
        },
        nodes,
        client_cidr: placement.map(|p| p.cidr.clone()).unwrap_or_default(),
        tls_dir: secure.then(|| dir.join("tls")),
    };
    if let Some(tls) = &layout.tls_dir {
        use crate::cert::{self, Kind};
        cert::init(tls, &layout.cluster_name, 3650, false)?;
        for n in &layout.nodes {
            cert::issue(tls, Kind::Node, &n.id.to_string(), 825, false)?;
        }
        cert::issue(tls, Kind::Operator, LOCAL_OPERATOR, 825, false)?;
        cert::token(&tls.join("token"), false)?;
    }
    for n in &layout.nodes {
        std::fs::create_dir_all(&n.dir)?;
        std::fs::write(n.dir.join("node.toml"), node_config(&layout, n))?;
    }
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_string_pretty(&layout)?,
    )?;
    Ok(layout)
}

/// Starts every member whose process is not running; `quiet` suppresses the progress lines.
pub(crate) fn start_missing(layout: &Layout, quiet: bool) -> Result<()> {
    for n in &layout.nodes {
        match n.pid() {
            Some(pid) => {
                if !quiet {
                    println!("{} already running (pid {pid})", n.name)
                }
            }
            None => {
                let pid = start_node(n)?;
                if !quiet {
                    println!("started {} (pid {pid}), API {}", n.name, n.api_addr);
                }
            }
        }
    }
    Ok(())
}

/// One member runs as primary, every other as a replica.
fn postgres_ready(t: &proto::Topology) -> bool {
    let primaries = t
        .members
        .iter()
        .filter(|m| m.pg_role_name() == "primary")
        .count();
    let replicas = t
        .members
        .iter()
        .filter(|m| m.pg_role_name() == "replica")
        .count();
    primaries == 1 && primaries + replicas == t.members.len()
}

/// Waits until the cluster has a leader and every member registered (and, with Postgres, one
/// primary and only replicas besides it); returns the topology.
pub(crate) async fn wait_ready(layout: &Layout, timeout: Duration) -> Result<proto::Topology> {
    let client = layout.client()?.with_patience(Duration::from_secs(2));
    let deadline = Instant::now() + timeout;
    loop {
        match crate::fetch_topology(&client).await {
            // A restarted member briefly believes in its old term's leadership until a peer
            // answers: ready means one leader and every member in its term.
            Ok(t)
                if t.leader_id != 0
                    && t.members.iter().all(|m| {
                        m.registered && m.term == t.term && m.raft_role_name() != "unreachable"
                    })
                    && t.members
                        .iter()
                        .filter(|m| m.raft_role_name() == "leader")
                        .count()
                        == 1
                    && (layout.postgres.is_none() || postgres_ready(&t)) =>
            {
                return Ok(t)
            }
            _ if Instant::now() > deadline => bail!(
                "the cluster was not ready (leader elected, all members up) within {} s; see \
                 the sidecar.log of each member",
                timeout.as_secs()
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn up(count: u32, dir: &Path, postgres: bool, secure: bool) -> Result<()> {
    let layout = create_with(count, dir, postgres, secure, None, true)?;
    if layout.tls_dir.is_none() {
        eprintln!(
            "warning: this local cluster runs without TLS or authentication (--insecure): \
             anyone on this machine can steer it"
        );
    }
    start_missing(&layout, false)?;
    let topo = wait_ready(&layout, Duration::from_secs(90)).await?;
    print!("{}", output::topology(&topo, Output::Table));
    println!();
    for (k, v) in layout.client_env() {
        println!("export {k}={v}");
    }
    if let Some(uri) = layout.uri() {
        println!("psql '{uri}'");
    }
    // Health checks and metrics, as a load balancer or Prometheus reads them: /primary answers
    // 200 on the writable primary only (503 elsewhere), /replica on replicas; /metrics needs
    // no token here (no metrics_token_file).
    for n in layout.nodes.iter().filter(|n| !n.http_addr.is_empty()) {
        println!(
            "curl http://{}/primary   # {}: also /replica /health /cluster /metrics",
            n.http_addr, n.name
        );
    }
    println!("logs: {}/n*/sidecar.log", dir.display());
    Ok(())
}

pub(crate) fn down(dir: &Path) -> Result<()> {
    stop_all(dir, false)
}

/// Stops every member and its Postgres (SIGINT, then SIGKILL after 10 s); `quiet` suppresses
/// the report. SIGTERM would leave each Postgres running for a sidecar restart.
pub(crate) fn stop_all(dir: &Path, quiet: bool) -> Result<()> {
    let layout = Layout::load(dir)?;
    let mut running = Vec::new();
    for n in &layout.nodes {
        if let Some(pid) = n.pid() {
            // SAFETY: sending SIGINT to a pid this launcher started.
            unsafe { libc::kill(pid, libc::SIGINT) };
            running.push((n.name.clone(), pid));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while running.iter().any(|(_, p)| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, pid) in &running {
        if pid_alive(*pid) {
            // SAFETY: as above; the process ignored SIGINT for 10 s.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
            if !quiet {
                println!("{name}: killed (did not stop within 10 s)");
            }
        } else if !quiet {
            println!("{name}: stopped");
        }
    }
    for n in &layout.nodes {
        let _ = std::fs::remove_file(n.dir.join("sidecar.pid"));
    }
    Ok(())
}
