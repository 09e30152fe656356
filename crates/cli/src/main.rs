//! `pgquorum`: runs a sidecar (`pgquorum node`) and gives operators their verbs.

mod bench;
mod bench_router;
mod cert;
mod local;
mod netns;
mod output;
mod router;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use raft_node::client::ApiClient;
use raft_node::node_config::NodeConfig;
use raft_node::proto;

/// Automatic failover for PostgreSQL with no external coordination service.
#[derive(Parser)]
#[command(name = "pgquorum", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar beside one PostgreSQL instance.
    Node {
        /// The node's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the members of the cluster.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        read: Read,
        /// Redraw whenever the cluster state changes (driven by the watch stream), until
        /// interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// The committed history of primaries (epoch, from, to, reason, LSN).
    History {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        read: Read,
    },
    /// Recent events of every member: transitions, fences, promotions, failover verdicts.
    Events {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Pause automatic failover (maintenance): no member is promoted and no Postgres is
    /// started, stopped or rebuilt by pgquorum, except that a primary whose lease runs out still
    /// fences itself.
    Pause {
        #[command(flatten)]
        conn: Conn,
    },
    /// Resume automatic failover after `pause`.
    Resume {
        #[command(flatten)]
        conn: Conn,
    },
    /// Planned switchover: the primary shuts down cleanly, the target takes over once it has
    /// replayed the primary's last WAL record, and the old primary follows it without a rewind.
    /// Refused, with the reason, when the target is unhealthy, lagging or tagged nofailover.
    Switchover {
        #[command(flatten)]
        conn: Conn,
        /// The member to promote (id or name); default: the most advanced healthy replica.
        #[arg(long)]
        to: Option<String>,
        /// When to switch over: an RFC 3339 time (2026-12-01T22:00:00Z) or `+N[s|m|h]`
        /// from now; default: at once. The target is checked again at that time.
        #[arg(long)]
        at: Option<String>,
        /// Return once the plan is committed instead of waiting for its outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Manual failover: choose who replaces a primary that is down. Every safety wait of an
    /// automatic failover still applies; refused while the primary is healthy (use
    /// `switchover`).
    Failover {
        #[command(flatten)]
        conn: Conn,
        /// The member to promote (id or name).
        #[arg(long)]
        to: String,
        /// Return once the plan is committed instead of waiting for its outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart one member's Postgres (a primary restarts under its lease: a short write
    /// outage, no failover).
    Restart {
        #[command(flatten)]
        conn: Conn,
        /// The member (id or name).
        member: String,
        /// Only when a committed setting waits for a restart (`list` shows them).
        #[arg(long)]
        pending: bool,
    },
    /// Make one member's Postgres re-read its configuration files.
    Reload {
        #[command(flatten)]
        conn: Conn,
        /// The member (id or name).
        member: String,
    },
    /// Re-clone a broken replica from the primary (a fresh base backup replaces its data
    /// directory once complete).
    Reinit {
        #[command(flatten)]
        conn: Conn,
        /// The member (id or name).
        member: String,
    },
    /// Print a libpq multi-host connection URL for every member's Postgres.
    Uri {
        #[command(flatten)]
        conn: Conn,
        /// Prefer a replica (`target_session_attrs=prefer-standby`) instead of requiring the
        /// writable primary.
        #[arg(long)]
        read_only: bool,
        /// Role to connect as.
        #[arg(long, default_value = "postgres")]
        user: String,
        /// Database to connect to.
        #[arg(long, default_value = "postgres")]
        dbname: String,
        #[command(flatten)]
        read: Read,
    },
    /// Add or remove members.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Show or change the cluster's dynamic configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Run a cluster of sidecars on this machine, for trying pgquorum and for tests.
    #[command(subcommand)]
    Local(local::LocalCmd),
    /// Measure this machine: print figures, change nothing outside a temp dir.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Route applications' connections: a read-write port to the committed primary (new
    /// connections wait out a failover), a read-only port over the replicas.
    Router {
        /// The router's TOML configuration (`deploy/router.example.toml`).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make a cluster CA, member and operator certificates, and tokens.
    #[command(subcommand)]
    Cert(cert::CertCmd),
    /// The guard process that owns a postmaster and fences it when its lease runs out (S4);
    /// started by the sidecar, not by people.
    #[command(hide = true)]
    Guard {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// How to reach the cluster.
#[derive(Args, Clone)]
pub struct Conn {
    /// Sidecar gRPC endpoints, host:port, comma-separated; tried in order.
    #[arg(
        long,
        env = "PGQUORUM_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    endpoints: Vec<String>,
    #[command(flatten)]
    security: ClientSecurity,
}

impl Conn {
    fn client(&self) -> Result<ApiClient> {
        self.security.apply(ApiClient::new(self.endpoints.clone())?)
    }
}

/// How the CLI (or the router) proves who it is and checks whom it talks to.
#[derive(Args, Clone, Default, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSecurity {
    /// The cluster CA's certificate (ca.crt): sidecars are verified against it.
    #[arg(long, env = "PGQUORUM_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// An operator's client certificate (`pgquorum cert issue operator NAME`).
    #[arg(long, env = "PGQUORUM_CERT_FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "PGQUORUM_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// A file holding the cluster's bearer token (security.token_file of the sidecars).
    #[arg(long, env = "PGQUORUM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Talk to sidecars that run with `security.insecure = true`: no TLS.
    #[arg(long, env = "PGQUORUM_INSECURE")]
    insecure: bool,
}

impl ClientSecurity {
    /// Gives `client` this TLS and these credentials.
    fn apply(&self, client: ApiClient) -> Result<ApiClient> {
        use raft_node::security::{Holder, Tls, TlsFiles, Token};
        let token = self.token_file.as_deref().map(Token::load).transpose()?;
        let client = client.with_credentials(raft_node::client::Credentials::token(token));
        if self.insecure {
            if self.ca_file.is_some() || self.cert_file.is_some() {
                bail!("--insecure turns TLS off; drop --ca-file/--cert-file, or --insecure");
            }
            eprintln!(
                "warning: --insecure: no TLS; whatever this command sends (a token too) crosses \
                 the network in clear text"
            );
            return Ok(client);
        }
        let Some(ca) = self.ca_file.clone() else {
            bail!(
                "no CA to verify the sidecars with: pass --ca-file (the cluster's ca.crt) or set \
                 PGQUORUM_CA_FILE (`pgquorum local up` prints it); --insecure talks to a cluster \
                 that runs without TLS"
            );
        };
        let identity = self.cert_file.clone().zip(self.key_file.clone());
        let tls = Tls::load(TlsFiles { ca, identity }, Holder::Client)?;
        Ok(client.with_tls(Some(tls)))
    }
}

/// How read verbs read.
#[derive(Args, Clone, Copy)]
pub struct Read {
    /// Answer from the first reachable member's own applied state, without the Raft leader
    /// or a quorum: available during an outage, but possibly stale.
    #[arg(long)]
    local: bool,
}

/// Output format of read verbs.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// A table for people.
    Table,
    /// JSON for programs.
    Json,
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Add a started sidecar (with empty initial_members) to the cluster.
    Add {
        #[command(flatten)]
        conn: Conn,
        /// The new member's node_id.
        #[arg(long)]
        id: u64,
        /// The new member's gRPC address, host:port.
        #[arg(long)]
        addr: String,
    },
    /// Remove a member from the cluster.
    Remove {
        #[command(flatten)]
        conn: Conn,
        /// The member's node_id.
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print every setting.
    Show {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        read: Read,
    },
    /// Change settings: `pgquorum config set lease_ms=3000 tick_ms=250`.
    Set {
        #[command(flatten)]
        conn: Conn,
        /// key=value pairs.
        #[arg(required = true)]
        settings: Vec<String>,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGQUORUM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Node { .. } | Command::Guard { .. }) {
        // Operator verbs end quietly when the reader of their output goes away (`pgquorum list
        // | head`), with the status a Unix tool killed by SIGPIPE has. SIGPIPE itself stays
        // ignored: hyper writes to sockets with writev, which raises it when a sidecar drops
        // the connection (as it does on a refused client certificate), and the default
        // disposition then killed the CLI without a word.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
                std::process::exit(141);
            }
            default_hook(info)
        }));
    }
    if let Command::Guard { args } = &cli.command {
        // No async runtime: the guard stays a small, plain process.
        return ExitCode::from(u8::try_from(pg_supervisor::run_guard(args)).unwrap_or(1));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Node { config } => {
            init_logging("info,openraft=warn");
            let cfg = NodeConfig::load(&config)?;
            raft_node::node::run(cfg, shutdown_signal(), None).await?;
            Ok(())
        }
        Command::List {
            conn,
            output,
            read,
            watch,
        } => {
            init_logging("warn");
            if watch {
                return watch_topology(&conn.client()?, output, read).await;
            }
            let topo = read_topology(&conn.client()?, read).await?;
            print!("{}", output::topology(&topo, output));
            Ok(())
        }
        Command::History { conn, output, read } => {
            init_logging("warn");
            let topo = read_topology(&conn.client()?, read).await?;
            print!("{}", output::history(&topo, output));
            note_paused(topo.paused, output);
            Ok(())
        }
        Command::Events { conn, output } => {
            init_logging("warn");
            let (events, paused) = collect_events(&conn.client()?).await?;
            print!("{}", output::events(&events, output));
            note_paused(paused, output);
            Ok(())
        }
        Command::Pause { conn } => {
            init_logging("warn");
            set_paused(&conn, true).await
        }
        Command::Resume { conn } => {
            init_logging("warn");
            set_paused(&conn, false).await
        }
        Command::Switchover {
            conn,
            to,
            at,
            no_wait,
        } => {
            init_logging("warn");
            let at_unix_ms = at
                .as_deref()
                .map(|a| parse_at(a, chrono::Utc::now()))
                .transpose()?
                .unwrap_or(0);
            plan_primary(
                &conn,
                PlanVerb::Switchover { at_unix_ms },
                to.as_deref(),
                no_wait,
            )
            .await
        }
        Command::Failover { conn, to, no_wait } => {
            init_logging("warn");
            plan_primary(&conn, PlanVerb::Failover, Some(&to), no_wait).await
        }
        Command::Restart {
            conn,
            member,
            pending,
        } => {
            init_logging("warn");
            manage(&conn, &member, "restart", pending).await
        }
        Command::Reload { conn, member } => {
            init_logging("warn");
            manage(&conn, &member, "reload", false).await
        }
        Command::Reinit { conn, member } => {
            init_logging("warn");
            manage(&conn, &member, "reinit", false).await
        }
        Command::Uri {
            conn,
            read_only,
            user,
            dbname,
            read,
        } => {
            init_logging("warn");
            let topo = read_topology(&conn.client()?, read).await?;
            println!("{}", output::libpq_uri(&topo, read_only, &user, &dbname)?);
            Ok(())
        }
        Command::Member(cmd) => {
            init_logging("warn");
            member(cmd).await
        }
        Command::Config(cmd) => {
            init_logging("warn");
            config(cmd).await
        }
        Command::Local(cmd) => {
            init_logging("warn");
            local::run(cmd).await
        }
        Command::Bench(cmd) => {
            init_logging("warn");
            bench::run(cmd).await
        }
        Command::Cert(cmd) => cert::run(cmd),
        Command::Router { config } => {
            init_logging("info");
            let cfg = router::RouterConfig::load(&config)?;
            router::run(cfg, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
        }
        Command::Guard { .. } => bail!("the guard runs before the async runtime starts"),
    }
}

async fn member(cmd: MemberCmd) -> Result<()> {
    match cmd {
        MemberCmd::Add { conn, id, addr } => {
            let req = proto::AddMemberRequest {
                id,
                raft_addr: addr.clone(),
            };
            let r = conn
                .client()?
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.add_member(req).await }
                })
                .await?;
            println!(
                "node {id} ({addr}) added; voters {:?}, learners {:?} (log index {})",
                r.voters, r.learners, r.log_index
            );
        }
        MemberCmd::Remove { conn, id } => {
            let r = conn
                .client()?
                .call(
                    |mut c| async move { c.remove_member(proto::RemoveMemberRequest { id }).await },
                )
                .await?;
            println!(
                "node {id} removed; voters {:?}, learners {:?} (log index {})",
                r.voters, r.learners, r.log_index
            );
        }
    }
    Ok(())
}

/// The linearizable topology, from the leader.
pub(crate) async fn fetch_topology(
    client: &ApiClient,
) -> Result<proto::Topology, raft_node::client::ClientError> {
    client
        .call(|mut c| async move {
            c.get_topology(proto::GetTopologyRequest { local: false })
                .await
        })
        .await
}

/// Prints the linearizable topology as a table or JSON.
pub(crate) async fn print_topology(client: &ApiClient, out: Output) -> Result<()> {
    let topo = fetch_topology(client).await?;
    print!("{}", output::topology(&topo, out));
    Ok(())
}

/// The topology as `read` asks: linearizable from the leader, or the first reachable member's
/// own view (said so on standard error).
async fn read_topology(client: &ApiClient, read: Read) -> Result<proto::Topology> {
    if !read.local {
        return Ok(fetch_topology(client).await?);
    }
    let topo = client
        .call(|mut c| async move {
            c.get_topology(proto::GetTopologyRequest { local: true })
                .await
        })
        .await?;
    eprintln!(
        "note: answered by one member from its own applied state (log index {}), without the \
         leader: it may be stale",
        topo.last_applied
    );
    Ok(topo)
}

/// `list --watch`: redraws on every committed change the watch stream reports, with the
/// leader's view of the members (or the watched member's own, with `--local`); reconnects
/// when the member serving the stream goes away.
async fn watch_topology(client: &ApiClient, out: Output, read: Read) -> Result<()> {
    let clear = out == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let mut stream = client
            .call(|mut c| async move { c.watch_topology(proto::WatchTopologyRequest {}).await })
            .await?;
        while let Ok(Some(watched)) = stream.message().await {
            let topo = if read.local {
                watched
            } else {
                // The stream carries committed state; the leader adds what members report.
                fetch_topology(client).await.unwrap_or(watched)
            };
            if clear {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", output::topology(&topo, out));
            if out == Output::Table {
                println!();
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        eprintln!("note: the watch stream ended; reconnecting");
    }
}

/// Commits a pause or a resume of automatic failover.
async fn set_paused(conn: &Conn, paused: bool) -> Result<()> {
    let r = conn
        .client()?
        .call(|mut c| async move { c.set_paused(proto::SetPausedRequest { paused }).await })
        .await
        .context(if paused {
            "automatic failover not paused"
        } else {
            "automatic failover not resumed"
        })?;
    if r.paused {
        println!(
            "automatic failover paused (log index {}): no member is promoted and no Postgres is \
             started, stopped or rebuilt until `pgquorum resume`; a primary whose lease runs out \
             still fences itself",
            r.log_index
        );
    } else {
        println!("automatic failover resumed (log index {})", r.log_index);
    }
    Ok(())
}

/// Asks member `who`'s own sidecar to restart, reload or re-clone its Postgres, and waits for
/// the outcome.
async fn manage(conn: &Conn, who: &str, action: &str, only_if_pending: bool) -> Result<()> {
    let topo = fetch_topology(&conn.client()?).await?;
    let id = member_id(&topo, who)?;
    let addr = topo
        .members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.raft_addr.clone())
        .context("the member has no API address")?;
    // A re-clone copies the whole data directory.
    let one = conn
        .client()?
        .reach(vec![addr])?
        .with_request_timeout(std::time::Duration::from_secs(3600));
    let req = proto::ManageMemberRequest {
        action: action.to_string(),
        only_if_pending,
    };
    let r = one
        .call(|mut c| {
            let req = req.clone();
            async move { c.manage_member(req).await }
        })
        .await
        .with_context(|| format!("{action} of {} refused", output::member_name(&topo, id)))?;
    println!("{}: {}", output::member_name(&topo, id), r.outcome);
    note_paused(topo.paused, Output::Table);
    Ok(())
}

/// Which plan an operator asks for.
enum PlanVerb {
    Switchover { at_unix_ms: u64 },
    Failover,
}

/// Parses `--at`: an RFC 3339 time, or `+N` with a unit `s`, `m` or `h` from `now`.
fn parse_at(at: &str, now: chrono::DateTime<chrono::Utc>) -> Result<u64> {
    let at = at.trim();
    let when = if let Some(rel) = at.strip_prefix('+') {
        let (n, unit) = rel.split_at(rel.find(|c: char| !c.is_ascii_digit()).unwrap_or(rel.len()));
        let n: i64 = n
            .parse()
            .with_context(|| format!("--at '{at}': expected +N followed by s, m or h"))?;
        let secs = match unit {
            "" | "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            _ => bail!("--at '{at}': unit '{unit}' is not s, m or h"),
        };
        now + chrono::Duration::seconds(secs)
    } else {
        chrono::DateTime::parse_from_rfc3339(at)
            .with_context(|| {
                format!(
                    "--at '{at}' is neither an RFC 3339 time (2026-12-01T22:00:00Z) nor +N[s|m|h]"
                )
            })?
            .with_timezone(&chrono::Utc)
    };
    if when < now - chrono::Duration::seconds(1) {
        bail!("--at '{at}' is in the past ({when}); leave --at out to switch over now");
    }
    u64::try_from(when.timestamp_millis()).context("--at is before 1970")
}

/// The member id for `who` (an id or a name), from the topology.
fn member_id(topo: &proto::Topology, who: &str) -> Result<u64> {
    let found = topo
        .members
        .iter()
        .find(|m| m.name == who || who.parse::<u64>().is_ok_and(|id| id == m.id));
    match found {
        Some(m) => Ok(m.id),
        None => bail!(
            "no member is called or numbered '{who}'; members: {}",
            topo.members
                .iter()
                .map(|m| format!("{} ({})", m.id, m.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Commits a switchover or a manual failover and, unless `no_wait`, follows it to its end.
async fn plan_primary(conn: &Conn, verb: PlanVerb, to: Option<&str>, no_wait: bool) -> Result<()> {
    let client = conn.client()?;
    let topo = fetch_topology(&client).await?;
    let to = to.map(|t| member_id(&topo, t)).transpose()?;
    let started = std::time::Instant::now();
    let reply = match verb {
        PlanVerb::Switchover { at_unix_ms } => {
            let req = proto::SwitchoverRequest {
                to: to.unwrap_or(0),
                at_unix_ms,
            };
            client
                .call(|mut c| async move { c.switchover(req).await })
                .await
                .context("switchover refused")?
        }
        PlanVerb::Failover => {
            let req = proto::FailoverRequest {
                to: to.unwrap_or(0),
            };
            client
                .call(|mut c| async move { c.failover(req).await })
                .await
                .context("failover refused")?
        }
    };
    let plan = reply.plan.context("the leader committed no plan")?;
    let name = |id: u64| output::member_name(&topo, id);
    let when = if plan.not_before_unix_ms == 0 {
        "now".to_string()
    } else {
        chrono::DateTime::from_timestamp_millis(plan.not_before_unix_ms as i64)
            .map_or_else(|| plan.not_before_unix_ms.to_string(), |t| t.to_rfc3339())
    };
    println!(
        "{} planned (plan {}, log index {}): from {} to {}, {when}",
        plan.kind_name(),
        plan.id,
        reply.log_index,
        name(plan.from_node),
        name(plan.to_node)
    );
    if no_wait {
        return Ok(());
    }
    let outcome = wait_for_plan(&client, plan.id).await?;
    let secs = started.elapsed().as_secs_f64();
    if outcome.done {
        println!("done in {secs:.2} s: {}", outcome.outcome);
        Ok(())
    } else {
        bail!(
            "{} did not complete ({secs:.2} s): {}",
            plan.kind_name(),
            outcome.outcome
        )
    }
}

/// Follows the watch stream until plan `id` has ended; reconnects when a member goes away.
async fn wait_for_plan(client: &ApiClient, id: u64) -> Result<proto::PlanOutcome> {
    let mut last_status = String::new();
    loop {
        let mut stream = client
            .call(|mut c| async move { c.watch_topology(proto::WatchTopologyRequest {}).await })
            .await?;
        while let Ok(Some(topo)) = stream.message().await {
            if let Some(o) = topo
                .last_plan
                .filter(|o| o.plan.as_ref().is_some_and(|p| p.id == id))
            {
                return Ok(o);
            }
            if !topo.failover_status.is_empty() && topo.failover_status != last_status {
                eprintln!("  {}", topo.failover_status);
                last_status = topo.failover_status;
            }
        }
    }
}

/// Tells people, on standard error so that JSON stays clean, that failover is paused.
fn note_paused(paused: bool, out: Output) {
    if paused && out == Output::Table {
        eprintln!("note: automatic failover is PAUSED (`pgquorum resume` ends the pause)");
    }
}

/// Every member's recent events, merged in time order (members that do not answer are skipped),
/// and whether failover is paused.
async fn collect_events(client: &ApiClient) -> Result<(Vec<proto::Event>, bool)> {
    let topo = fetch_topology(client).await?;
    let mut all = Vec::new();
    for m in &topo.members {
        let one = client
            .reach(vec![m.raft_addr.clone()])?
            .with_patience(std::time::Duration::from_millis(500))
            .with_request_timeout(std::time::Duration::from_secs(2));
        if let Ok(list) = one
            .call(|mut c| async move { c.get_events(proto::GetEventsRequest {}).await })
            .await
        {
            all.extend(list.events);
        }
    }
    all.sort_by_key(|e| (e.at_unix_ms, e.node_id));
    Ok((all, topo.paused))
}

/// Parses `key=value` arguments; refuses empty keys and repeated keys.
fn parse_settings(args: &[String]) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for arg in args {
        let Some((k, v)) = arg.split_once('=') else {
            bail!("'{arg}' is not key=value (e.g. lease_ms=3000)");
        };
        let k = k.trim();
        if k.is_empty() {
            bail!("'{arg}' has an empty key");
        }
        if out.insert(k.to_string(), v.trim().to_string()).is_some() {
            bail!("setting '{k}' is given twice");
        }
    }
    Ok(out)
}

async fn config(cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Show { conn, output, read } => {
            let local = read.local;
            let cfg = conn
                .client()?
                .call(|mut c| async move { c.get_config(proto::GetConfigRequest { local }).await })
                .await?;
            if local {
                eprintln!(
                    "note: answered by one member from its own applied state (log index {}): it \
                     may be stale",
                    cfg.log_index
                );
            }
            print!("{}", output::config(&cfg, output));
            note_paused(cfg.paused, output);
        }
        ConfigCmd::Set { conn, settings } => {
            let changes = parse_settings(&settings)?;
            let cfg = conn
                .client()?
                .call(|mut c| {
                    let changes = changes.clone();
                    async move { c.set_config(proto::SetConfigRequest { changes }).await }
                })
                .await
                .context("configuration not changed")?;
            println!("committed at log index {}", cfg.log_index);
            print!("{}", output::config(&cfg, Output::Table));
            note_paused(cfg.paused, Output::Table);
        }
    }
    Ok(())
}

/// Completes on SIGTERM (a sidecar restart: Postgres stays up for its successor) or SIGINT
/// (Postgres stops too).
async fn shutdown_signal() -> raft_node::node::Shutdown {
    use raft_node::node::Shutdown;
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => Shutdown::KeepPostgres,
                _ = int.recv() => Shutdown::StopPostgres,
            }
        }
        _ => {
            // Without signal handlers the node can still be stopped by SIGKILL; never exit early.
            std::future::pending().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_refuse_bad_input() {
        let s = parse_settings(&["lease_ms=3000".into(), " tick_ms = 250".into()]).unwrap();
        assert_eq!(s["lease_ms"], "3000");
        assert_eq!(s["tick_ms"], "250");
        assert!(parse_settings(&["lease_ms".into()]).is_err());
        assert!(parse_settings(&["=1".into()]).is_err());
        assert!(parse_settings(&["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn switchover_times_parse_as_rfc3339_or_relative_and_never_in_the_past() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let base = now.timestamp_millis() as u64;
        assert_eq!(parse_at("+90s", now).unwrap(), base + 90_000);
        assert_eq!(parse_at("+5m", now).unwrap(), base + 300_000);
        assert_eq!(parse_at("+2h", now).unwrap(), base + 7_200_000);
        assert_eq!(
            parse_at("2026-12-01T13:00:00+01:00", now).unwrap(),
            base,
            "offsets count"
        );
        assert_eq!(
            parse_at("2026-12-01T22:00:00Z", now).unwrap(),
            base + 36_000_000
        );
        for bad in ["tomorrow", "+5d", "+", "2026-11-30T12:00:00Z", "+x"] {
            let e = parse_at(bad, now).unwrap_err().to_string();
            assert!(e.contains("--at"), "{bad}: {e}");
        }
    }
}
