//! `pgquorum bench router`: what the router costs a select-only load (pgbench's `-S` shape:
//! one indexed lookup per query on a connection of its own per client), directly against the
//! primary and through the router's read-write port, alternated to even out drift.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::local;
use crate::router::RouterConfig;

const ACCOUNTS: i32 = 100_000;

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| "cannot connect to Postgres".to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

/// Queries per second of `clients` connections to `url` for `seconds`.
async fn select_only(url: &str, clients: u32, seconds: u64) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..clients {
        let client = connect(url).await?;
        let stmt = client
            .prepare("SELECT abalance FROM bench_accounts WHERE aid = $1")
            .await?;
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            // A small LCG is enough to spread the lookups over the table.
            let mut x = 0x9E37_79B9u32.wrapping_mul(n + 1);
            while !stop.load(Ordering::Relaxed) {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let aid = (x % ACCOUNTS as u32) as i32 + 1;
                if client.query_one(&stmt, &[&aid]).await.is_err() {
                    return Err(anyhow::anyhow!("a query failed"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Runs the router bench on a fresh local cluster in `dir`. With `router_cpus`, the router's
/// process runs on those CPUs alone and everything else (the cluster, the clients) on the rest.
pub async fn run(
    clients: u32,
    seconds: u64,
    rounds: u32,
    router_cpus: &[usize],
    dir: &Path,
) -> Result<()> {
    if clients == 0 || seconds == 0 || rounds == 0 {
        bail!("--clients, --seconds and --rounds must be positive");
    }
    if !router_cpus.is_empty() {
        let allowed = allowed_cpus()?;
        if let Some(c) = router_cpus.iter().find(|c| !allowed.contains(c)) {
            bail!(
                "--router-cpus: CPU {c} is not one this process may run on (allowed: {allowed:?})"
            );
        }
        let rest: Vec<usize> = allowed
            .into_iter()
            .filter(|c| !router_cpus.contains(c))
            .collect();
        if rest.is_empty() {
            bail!("--router-cpus leaves no CPU for the cluster and the clients; name fewer");
        }
        // Before the cluster starts: its sidecars, guards and servers inherit the set.
        pin_this_process(&rest)?;
        println!("router on CPUs {router_cpus:?}; the cluster and the clients on CPUs {rest:?}");
    }
    let layout = local::create_with(3, dir, true, true, None, false)?;
    local::start_missing(&layout, true)?;
    let result = measure(&layout, clients, seconds, rounds, router_cpus, dir).await;
    let _ = local::stop_all(dir, true);
    result
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and the size passed is its own.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        set
    };
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set within its bounds.
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect())
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET ignores ids past CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(*c, &mut set);
        }
        set
    }
}

/// Pins every thread of this process (and so whatever it starts from now on) to `cpus`.
fn pin_this_process(cpus: &[usize]) -> Result<()> {
    let set = cpu_set(cpus);
    for task in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the set is valid and sized as passed.
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) }
            != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot pin thread {tid} to CPUs {cpus:?}"));
        }
    }
    Ok(())
}

/// A relay's own process (the router, or HAProxy as an anchor), stopped when dropped.
struct Relay(std::process::Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Relay {
    /// `program args`, on `cpus` when given; its output goes to `log`.
    fn spawn(
        program: &Path,
        args: &[&std::ffi::OsStr],
        cpus: &[usize],
        log: &Path,
    ) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if !cpus.is_empty() {
            let set = cpu_set(cpus);
            // SAFETY: sched_setaffinity is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Self(child))
    }

    /// CPU time the relay has used so far (user and system, every thread).
    fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let user: u64 = fields.get(11)?.parse().ok()?;
        let system: u64 = fields.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| Duration::from_secs_f64((user + system) as f64 / hz as f64))
    }
}

/// One path the load is measured on.
struct Measured {
    name: &'static str,
    url: String,
    relay: Option<Relay>,
    rates: Vec<f64>,
    cpu: Duration,
}

/// HAProxy in plain TCP mode in front of `backend`, listening on `listen`.
fn haproxy_cfg(listen: &str, backend: &str) -> String {
    format!(
        "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
         timeout client 1h\n  timeout server 1h\nlisten pg\n  bind {listen}\n  \
         server primary {backend}\n"
    )
}

/// `program`'s path when it is on PATH.
fn on_path(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

async fn wait_connectable(url: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while connect(url).await.is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not take connections within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The router's configuration for this cluster: the read-write port only.
fn router_toml(layout: &local::Layout, listen_rw: &str) -> Result<String> {
    use toml::Value;
    let sec = layout.client_security();
    let mut security = toml::Table::new();
    for (key, p) in [
        ("ca_file", &sec.ca_file),
        ("cert_file", &sec.cert_file),
        ("key_file", &sec.key_file),
        ("token_file", &sec.token_file),
    ] {
        if let Some(p) = p {
            security.insert(key.into(), Value::String(p.display().to_string()));
        }
    }
    if sec.insecure {
        security.insert("insecure".into(), Value::Boolean(true));
    }
    let mut t = toml::Table::new();
    t.insert(
        "endpoints".into(),
        Value::Array(layout.endpoints().into_iter().map(Value::String).collect()),
    );
    t.insert("listen_rw".into(), Value::String(listen_rw.into()));
    t.insert("security".into(), Value::Table(security));
    Ok(toml::to_string(&t)?)
}

async fn measure(
    layout: &local::Layout,
    clients: u32,
    seconds: u64,
    rounds: u32,
    router_cpus: &[usize],
    dir: &Path,
) -> Result<()> {
    let topo = local::wait_ready(layout, Duration::from_secs(90)).await?;
    let primary = topo.primary.as_ref().context("no primary")?.node_id;
    let node = layout
        .nodes
        .iter()
        .find(|n| n.id == primary)
        .context("the primary's member")?;
    let direct = layout.member_uri(node).context("a Postgres cluster")?;
    let backend = format!("{}:{}", node.pg_host(), node.pg_port);
    let rw = free_addr()?;
    let config = dir.join("router.toml");
    std::fs::write(&config, router_toml(layout, &rw)?)
        .with_context(|| format!("cannot write {}", config.display()))?;
    // Validated as `pgquorum router` will read it.
    RouterConfig::load(&config)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let router = Relay::spawn(
        &exe,
        &["router".as_ref(), "--config".as_ref(), config.as_os_str()],
        router_cpus,
        &dir.join("router.log"),
    )?;
    let mut paths = vec![
        Measured {
            name: "direct",
            url: direct.clone(),
            relay: None,
            rates: Vec::new(),
            cpu: Duration::ZERO,
        },
        Measured {
            name: "pgquorum router",
            url: direct.replace(&backend, &rw),
            relay: Some(router),
            rates: Vec::new(),
            cpu: Duration::ZERO,
        },
    ];
    // The anchor: the usual TCP proxy in front of Postgres, on the same CPUs as the router.
    match on_path("haproxy") {
        Some(haproxy) => {
            let listen = free_addr()?;
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_cfg(&listen, &backend))
                .with_context(|| format!("cannot write {}", cfg.display()))?;
            let relay = Relay::spawn(
                &haproxy,
                &["-f".as_ref(), cfg.as_os_str(), "-db".as_ref()],
                router_cpus,
                &dir.join("haproxy.log"),
            )?;
            paths.push(Measured {
                name: "haproxy (tcp mode)",
                url: direct.replace(&backend, &listen),
                relay: Some(relay),
                rates: Vec::new(),
                cpu: Duration::ZERO,
            });
        }
        None => println!("haproxy is not on PATH: no anchor measured"),
    }
    for p in &paths {
        wait_connectable(&p.url, p.name).await?;
    }
    let setup = connect(&direct).await?;
    setup
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_accounts; \
             CREATE TABLE bench_accounts (aid int PRIMARY KEY, abalance int NOT NULL); \
             INSERT INTO bench_accounts SELECT g, 0 FROM generate_series(1, {ACCOUNTS}) g; \
             ANALYZE bench_accounts"
        ))
        .await?;
    // Warm the caches on every path before anything counts.
    for p in &paths {
        select_only(&p.url, clients, 1).await?;
    }
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        for p in paths.iter_mut() {
            let before = p.relay.as_ref().and_then(Relay::cpu_time);
            let rate = select_only(&p.url, clients, seconds).await?;
            let after = p.relay.as_ref().and_then(Relay::cpu_time);
            if let (Some(x), Some(y)) = (before, after) {
                p.cpu += y.saturating_sub(x);
            }
            p.rates.push(rate);
            line.push_str(&format!(" {} {rate:.0} queries/s;", p.name));
        }
        println!("{}", line.trim_end_matches(';'));
    }
    let placement = if router_cpus.is_empty() {
        "relay, cluster and clients sharing every CPU".to_string()
    } else {
        format!("relay alone on CPUs {router_cpus:?}")
    };
    let mean = |p: &Measured| p.rates.iter().sum::<f64>() / p.rates.len().max(1) as f64;
    let base = mean(&paths[0]);
    println!("select-only, {clients} clients, {rounds} x {seconds} s each, {placement}:");
    println!("  direct: {base:.0} queries/s");
    for p in &paths[1..] {
        let rate = mean(p);
        let queries = rate * (seconds * u64::from(rounds)) as f64;
        println!(
            "  {}: {rate:.0} queries/s, costs {:.1} % of the throughput, {:.1} us of its own CPU \
             per query",
            p.name,
            (1.0 - rate / base) * 100.0,
            p.cpu.as_secs_f64() * 1e6 / queries.max(1.0)
        );
    }
    Ok(())
}
