//! Real network partitions for the process tests and `bench failover --faults partition`: one
//! network namespace per cluster member, joined by a private Linux bridge, with nftables drop
//! rules between members' addresses.
//!
//! Layout for slot `k` (1..=250, unique among the test processes on this machine):
//! - bridge `pgqbr<k>` in the host namespace, with the host's address `10.213.<k>.254/24`, so
//!   the test process (the client) reaches every member directly: a client that still sees an
//!   isolated primary is the worst case for split brain;
//! - per member `id`: namespace `pgq<k>-<id>`, veth `pgq<k>-<id>h` on the bridge, its peer
//!   `eth0` inside the namespace with `10.213.<k>.<id>/24`, and `lo` up;
//! - nftables table `bridge pgq<k>` with a `forward` chain: the only place cuts are made.
//!   Frames between two members are bridged (forward hook); frames between the host and a
//!   member are not (they use the bridge's input/output hooks), so the host always stays
//!   connected to everyone;
//! - an `ACCEPT` rule for the bridge in iptables' `DOCKER-USER` chain (or `FORWARD` without
//!   Docker): with br_netfilter on, bridged frames traverse iptables' FORWARD chain, whose
//!   policy Docker sets to DROP.
//!
//! Everything is removed on drop, also while a test panics. A process killed before its drop
//! leaves its slot behind; the bridge's alias names the owning pid, and the next setup reclaims
//! slots whose owner is dead (killing the processes left in their namespaces).

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Prefix of the bridge alias that marks a slot as ours and names its owner.
const OWNER_MARK: &str = "pgquorum-test-pid=";
/// Number of slots: the third octet of the 10.213.0.0/16 addresses.
const SLOTS: usize = 250;
/// The host's address on each bridge (last octet).
const HOST_OCTET: u8 = 254;

/// Setups started by this process, so parallel tests of one process start at different slots.
static SETUPS: AtomicUsize = AtomicUsize::new(0);

/// One test's private network: a bridge, one namespace per member and a firewall table.
pub struct Netns {
    slot: usize,
    ids: Vec<u64>,
    /// iptables chain holding our accept rule, once inserted.
    accept_chain: Option<String>,
}

impl Netns {
    /// Sets up a network for members `1..=n`, or prints `SKIPPED <test>: <reason>` to stderr
    /// and returns `None` when this machine cannot (not root, a command missing or failing).
    /// Under `CI=true` it panics with that message instead: the tests' skip rule (their
    /// harness's `skip`), so a green CI run means every partition test ran.
    pub fn setup_or_skip(n: u64) -> Option<Netns> {
        match Self::new(n) {
            Ok(net) => Some(net),
            Err(reason) => {
                // libtest names each test's thread after the test.
                let test = std::thread::current()
                    .name()
                    .unwrap_or("a network-namespace test")
                    .to_string();
                let said = format!(
                    "SKIPPED {test}: {reason}; run as root with iproute2, nftables and iptables \
                     installed (.ci/run installs them)"
                );
                eprintln!("{said}");
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{said} (CI=true: a skip fails the run)");
                }
                None
            }
        }
    }

    /// Sets up a network for members `1..=n`.
    pub fn new(n: u64) -> Result<Netns, String> {
        if n == 0 || n >= u64::from(HOST_OCTET) {
            return Err(format!(
                "cannot place {n} members on one /24 next to the host"
            ));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        for (cmd, arg) in [
            ("ip", "-V"),
            ("nft", "--version"),
            ("iptables", "--version"),
        ] {
            run(cmd, &[arg])?;
        }
        // Slot choice and creation are serialised between processes by a lock file, so two
        // setups never take or reclaim the same slot at once.
        let _lock = SetupLock::take()?;
        reclaim_stale();
        let first = std::process::id() as usize + 37 * SETUPS.fetch_add(1, Ordering::Relaxed);
        let mut chosen = None;
        for i in 0..SLOTS {
            let slot = (first + i) % SLOTS + 1;
            if try_claim(slot)? {
                chosen = Some(slot);
                break;
            }
        }
        let slot = chosen.ok_or("no free 10.213.<k>.0/24 slot: all 250 are in use")?;
        // From here on, drop tears down whatever part was built.
        let mut net = Netns {
            slot,
            ids: (1..=n).collect(),
            accept_chain: None,
        };
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<(), String> {
        let k = self.slot;
        let bridge = self.bridge();
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.host_addr()),
                "dev",
                &bridge,
            ],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for id in self.ids.clone() {
            let ns = self.namespace(id);
            let host_end = format!("pgq{k}-{id}h");
            run("ip", &["netns", "add", &ns])?;
            run(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &host_end, "master", &bridge, "up"])?;
            let addr = format!("{}/24", self.addr(id));
            for args in [
                vec!["addr", "add", addr.as_str(), "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
                vec!["link", "set", "lo", "up"],
            ] {
                let mut full = vec!["-n", ns.as_str()];
                full.extend(args);
                run("ip", &full)?;
            }
        }
        // An empty forward chain with policy accept: cuts are drop rules added to it.
        run_stdin(
            "nft",
            &["-f", "-"],
            &format!(
                "table bridge pgq{k} {{\n  chain forward {{\n    \
                 type filter hook forward priority 0; policy accept;\n  }}\n}}\n"
            ),
        )?;
        let chain = if run("iptables", &["-n", "-L", "DOCKER-USER"]).is_ok() {
            "DOCKER-USER"
        } else {
            "FORWARD"
        };
        run("iptables", &accept_rule("-I", chain, &bridge))?;
        self.accept_chain = Some(chain.to_string());
        self.check_connected()
    }

    /// Proves every path a test relies on before any member starts: the host reaches each
    /// member, and each member reaches every other.
    fn check_connected(&self) -> Result<(), String> {
        let wait = Duration::from_secs(2);
        for to in &self.ids {
            if !self.reaches(None, *to, wait)? {
                return Err(format!("the host cannot reach member {to} over the bridge"));
            }
            for from in self.ids.iter().filter(|from| *from != to) {
                if !self.reaches(Some(*from), *to, wait)? {
                    return Err(format!(
                        "member {from} cannot reach member {to} over the bridge"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether a TCP connection attempt from member `from` (`None`: the host) to member `to`
    /// gets an answer within `wait`. Nothing listens on port 9, so a reachable member answers
    /// at once with a reset ("connection refused"); a cut path leaves the SYN, or the reset,
    /// unanswered.
    pub fn reaches(&self, from: Option<u64>, to: u64, wait: Duration) -> Result<bool, String> {
        let Some(from) = from else {
            let addr: SocketAddr = format!("{}:9", self.addr(to))
                .parse()
                .map_err(|e| format!("bad address: {e}"))?;
            return match TcpStream::connect_timeout(&addr, wait) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(false),
                Err(e) => Err(format!("probe from the host to {addr}: {e}")),
            };
        };
        // bash's /dev/tcp reports the reset as "Connection refused"; `timeout` bounds a
        // dropped SYN (exit status 124).
        let probe = format!("exec 3<>/dev/tcp/{}/9", self.addr(to));
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespace(from), "timeout"])
            .arg(format!("{}", wait.as_secs_f64()))
            .args(["bash", "-c", &probe])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run `ip netns exec ... timeout ... bash`: {e}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || err.contains("refused") {
            Ok(true)
        } else if out.status.code() == Some(124) {
            Ok(false)
        } else {
            Err(format!(
                "probe from member {from} to member {to} ({}): {}",
                out.status,
                err.trim()
            ))
        }
    }

    /// The slot number `k`.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        format!("pgqbr{}", self.slot)
    }

    /// Member `id`'s namespace.
    pub fn namespace(&self, id: u64) -> String {
        format!("pgq{}-{id}", self.slot)
    }

    /// Member `id`'s address (no prefix length).
    pub fn addr(&self, id: u64) -> String {
        format!("10.213.{}.{id}", self.slot)
    }

    /// The host's address on the bridge.
    pub fn host_addr(&self) -> String {
        format!("10.213.{}.{HOST_OCTET}", self.slot)
    }

    /// The network of the members and the host, for `postgres.allowed_cidrs`.
    pub fn cidr(&self) -> String {
        format!("10.213.{}.0/24", self.slot)
    }

    /// The command that runs a program inside member `id`'s namespace.
    pub fn exec_prefix(&self, id: u64) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.namespace(id),
        ]
    }

    /// Drops every packet between members `a` and `b`, both ways.
    pub fn cut(&self, a: u64, b: u64) -> Result<(), String> {
        self.cut_one_way(a, b)?;
        self.cut_one_way(b, a)
    }

    /// Drops every packet from member `from` to member `to`; the other direction still flows.
    pub fn cut_one_way(&self, from: u64, to: u64) -> Result<(), String> {
        self.drop_rule(from, to, &[])
    }

    /// Drops the packets from member `from` to member `to` of TCP connections on `port` (every
    /// member listens on the same ports): those `from` sends to `to`'s port, and those its own
    /// port answers `to` with. Other connections between them still flow.
    pub fn cut_port_one_way(&self, from: u64, to: u64, port: u16) -> Result<(), String> {
        let port = port.to_string();
        self.drop_rule(from, to, &["tcp", "dport", &port])?;
        self.drop_rule(from, to, &["tcp", "sport", &port])
    }

    fn drop_rule(&self, from: u64, to: u64, matches: &[&str]) -> Result<(), String> {
        let (table, saddr, daddr) = (format!("pgq{}", self.slot), self.addr(from), self.addr(to));
        let mut args = vec![
            "add", "rule", "bridge", &table, "forward", "ip", "saddr", &saddr, "ip", "daddr",
            &daddr,
        ];
        args.extend_from_slice(matches);
        // Counted, so `rules()` shows that the cut really dropped traffic.
        args.extend_from_slice(&["counter", "drop"]);
        run("nft", &args).map(|_| ())
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<(), String> {
        run(
            "nft",
            &[
                "flush",
                "chain",
                "bridge",
                &format!("pgq{}", self.slot),
                "forward",
            ],
        )
        .map(|_| ())
    }

    /// The active cuts, as nftables prints them (for failure reports).
    pub fn rules(&self) -> String {
        run(
            "nft",
            &[
                "list",
                "chain",
                "bridge",
                &format!("pgq{}", self.slot),
                "forward",
            ],
        )
        .unwrap_or_else(|e| e)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let problems = teardown(self.slot, Owner::Us(self.accept_chain.as_deref()));
        for p in problems {
            eprintln!("netns teardown of slot {}: {p}", self.slot);
        }
    }
}

/// The iptables arguments that insert (`-I`) or delete (`-D`) the bridge's accept rule.
fn accept_rule<'a>(op: &'a str, chain: &'a str, bridge: &'a str) -> [&'a str; 8] {
    [op, chain, "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
}

/// Tears down every slot left behind by a test process that died before its drop: a bridge
/// whose alias names a pid that no longer exists.
fn reclaim_stale() {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(k) = name
            .strip_prefix("pgqbr")
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        let alias = std::fs::read_to_string(e.path().join("ifalias")).unwrap_or_default();
        let owner = alias
            .trim()
            .strip_prefix(OWNER_MARK)
            .and_then(|p| p.parse::<i32>().ok());
        // Not ours (no mark), or its owner lives: leave it alone.
        if let Some(pid) = owner.filter(|pid| !alive(*pid)) {
            for p in teardown(k, Owner::Dead) {
                eprintln!("reclaiming slot {k} of dead test process {pid}: {p}");
            }
        }
    }
}

/// Creates slot `k`'s bridge if the slot is free; false if it is taken (by a live test process
/// or anyone else) or its addresses are in use.
fn try_claim(k: usize) -> Result<bool, String> {
    let bridge = format!("pgqbr{k}");
    if link_exists(&bridge) {
        return Ok(false);
    }
    // Someone else's use of the subnet (a route through another device) rules the slot out.
    let routes = run("ip", &["-4", "route", "show", &format!("10.213.{k}.0/24")])?;
    if !routes.trim().is_empty() {
        return Ok(false);
    }
    let namespaces = run("ip", &["netns", "list"])?;
    let prefix = format!("pgq{k}-");
    if namespaces.lines().any(|l| l.starts_with(&prefix)) {
        return Ok(false);
    }
    run("ip", &["link", "add", &bridge, "type", "bridge"])?;
    let owner = format!("{OWNER_MARK}{}", std::process::id());
    if let Err(e) = run("ip", &["link", "set", &bridge, "alias", &owner]) {
        // Without the mark nobody could ever reclaim the bridge: remove it now.
        let _ = run("ip", &["link", "del", &bridge]);
        return Err(e);
    }
    Ok(true)
}

/// Whose slot a teardown removes.
enum Owner<'a> {
    /// This process's, with the chain its accept rule went into (none if not inserted yet).
    Us(Option<&'a str>),
    /// A test process that died before tearing its slot down.
    Dead,
}

/// Removes everything of slot `k`; returns what could not be removed.
fn teardown(k: usize, owner: Owner) -> Vec<String> {
    let bridge = format!("pgqbr{k}");
    let mut problems = Vec::new();
    match owner {
        Owner::Us(None) => {}
        Owner::Us(Some(chain)) => {
            if let Err(e) = run("iptables", &accept_rule("-D", chain, &bridge)) {
                problems.push(e);
            }
        }
        Owner::Dead => {
            // A dead owner may have inserted the rule in either chain; delete every copy.
            for chain in ["DOCKER-USER", "FORWARD"] {
                for _ in 0..10 {
                    if run("iptables", &accept_rule("-D", chain, &bridge)).is_err() {
                        break;
                    }
                }
            }
        }
    }
    let table = format!("pgq{k}");
    if run("nft", &["list", "table", "bridge", &table]).is_ok() {
        if let Err(e) = run("nft", &["delete", "table", "bridge", &table]) {
            problems.push(e);
        }
    }
    // Deleting the host end of a veth pair deletes its peer in the namespace as well, even
    // while processes still hold the namespace open.
    let prefix = format!("pgq{k}-");
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                if let Err(e) = run("ip", &["link", "del", &name]) {
                    problems.push(e);
                }
            }
        }
    }
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&prefix) {
                if matches!(owner, Owner::Dead) {
                    // A dead test's sidecars and Postgres outlive it, holding its namespaces;
                    // they are exactly the processes inside them.
                    kill_inside(ns);
                }
                if let Err(e) = run("ip", &["netns", "del", ns]) {
                    problems.push(e);
                }
            }
        }
    }
    if link_exists(&bridge) {
        if let Err(e) = run("ip", &["link", "del", &bridge]) {
            problems.push(e);
        }
    }
    problems
}

/// SIGKILLs every process in namespace `ns` (those of a dead test process only).
fn kill_inside(ns: &str) {
    let Ok(pids) = run("ip", &["netns", "pids", ns]) else {
        return;
    };
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: plain kill(2) on a pid just listed as a member of the namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Runs `cmd args`; its stdout, or an error naming the command and what it said.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    run_stdin(cmd, args, "")
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<String, String> {
    let shown = format!("`{cmd} {}`", args.join(" "));
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("command `{cmd}` not found"),
            _ => format!("cannot run {shown}: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{shown}: cannot write its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// An exclusive lock on a well-known file, released on drop (closing the file).
struct SetupLock(File);

impl SetupLock {
    fn take() -> Result<SetupLock, String> {
        let path = std::env::temp_dir().join("pgquorum-netns.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own; it blocks until the lock is free.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(SetupLock(file))
    }
}
