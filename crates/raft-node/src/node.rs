//! The sidecar's Raft side: binds the gRPC listener, opens the data dir, starts openraft,
//! bootstraps a new cluster once, publishes this member's details, and shuts down cleanly.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api_service::ClusterService;
use crate::client::ApiClient;
use crate::cluster_state::MemberInfo;
use crate::events::EventLog;
use crate::failover::leader::FailoverLeader;
use crate::failover::sidecar::Sidecar;
use crate::network::{Dialer, GrpcNetwork};
use crate::node_config::NodeConfig;
use crate::proto::cluster_server::ClusterServer;
use crate::proto::raft_transport_server::RaftTransportServer;
use crate::proto::{self};
use crate::security::{self, Access, Holder, Tls, Token};
use crate::store::identity::{self, DataDirIdentity, IdentityError};
use crate::store::log_store::LogStore;
use crate::store::open_db;
use crate::store::state_machine::{AppliedState, StateMachineStore};
use crate::transport_service::RaftTransportService;
use crate::types::{NodeId, Raft};

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The gRPC address cannot be bound.
    #[error(
        "cannot listen on {addr}: {source}; choose a free port on an address of this host \
         (listen_addr)"
    )]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data dir cannot be created.
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// sled refused to open the database.
    #[error(
        "cannot open the Raft store in {path}: {source}; if another pgquorum node uses this \
         data_dir, stop it or give this node its own data_dir"
    )]
    Store {
        /// The directory.
        path: String,
        /// The sled error.
        source: sled::Error,
    },
    /// The data dir belongs to another cluster or node.
    #[error("data dir {path}: {source}")]
    Identity {
        /// The directory.
        path: String,
        /// What does not match.
        source: IdentityError,
    },
    /// openraft refused the configuration or failed to start.
    #[error("Raft failed: {0}")]
    Raft(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The Postgres section cannot be used.
    #[error("postgres: {0}")]
    Postgres(#[from] pg_supervisor::SupervisorError),
    /// The sidecar's failover memory can neither be read nor rebuilt.
    #[error("{0}")]
    Memory(#[from] crate::failover::sidecar::MemoryError),
    /// The TLS files or a token cannot be used.
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
}

/// The TLS configuration, the operators' token and the `/metrics` token of a sidecar, loaded
/// from its config.
struct Secured {
    tls: Option<Tls>,
    token: Option<Token>,
    metrics_token: Option<Token>,
}

fn load_security(cfg: &NodeConfig) -> Result<Secured, NodeError> {
    let sec = &cfg.security;
    let tls = match sec.tls_files() {
        Some(files) => Some(Tls::load(files, Holder::Node(cfg.node_id))?),
        None => {
            tracing::warn!(
                node = cfg.node_id,
                "security.insecure = true: no TLS and no certificate checks; anyone who reaches \
                 this member's gRPC port can change the cluster, and members cannot tell each \
                 other apart. Use it for debugging only"
            );
            None
        }
    };
    let token = sec.token_file.as_deref().map(Token::load).transpose()?;
    let metrics_token = sec
        .metrics_token_file
        .as_deref()
        .map(Token::load)
        .transpose()?;
    Ok(Secured {
        tls,
        token,
        metrics_token,
    })
}

/// Re-reads the certificates and tokens when their files change, so a rotation takes effect
/// without a restart; a broken new file keeps the old material and is logged.
async fn reload_security(secured: Secured, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(SECURITY_RELOAD_EVERY) => {}
        }
        if let Some(tls) = &secured.tls {
            match tls.reload_if_changed() {
                Ok(true) => tracing::info!(files = ?tls.files(), "reloaded the TLS certificates"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload the TLS certificates; keeping the ones in use")
                }
            }
        }
        for (what, token) in [
            ("operator", &secured.token),
            ("metrics", &secured.metrics_token),
        ] {
            if let Some(t) = token {
                match t.reload_if_changed() {
                    Ok(true) => tracing::info!(token = what, "reloaded a token file"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(token = what, error = %e, "cannot reload a token file; keeping the one in use")
                    }
                }
            }
        }
    }
}

/// How often certificate and token files are checked for a change.
const SECURITY_RELOAD_EVERY: Duration = Duration::from_secs(2);
/// The largest Raft message taken (a snapshot chunk with its JSON overhead).
const MAX_RAFT_MESSAGE: usize = 64 * 1024 * 1024;
/// The largest cluster API or internal message taken.
const MAX_API_MESSAGE: usize = 1024 * 1024;

/// A started node: its Raft handle and a view of the applied state.
pub struct NodeHandle {
    /// This node's id.
    pub id: NodeId,
    /// The Raft handle.
    pub raft: Raft,
    /// Applied state, updated after every apply.
    pub state: watch::Receiver<Arc<AppliedState>>,
}

fn raft_config(cfg: &NodeConfig) -> Result<Arc<Config>, NodeError> {
    let r = &cfg.raft;
    let config = Config {
        cluster_name: cfg.cluster_name.clone(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        // Snapshot chunks are installed and flushed by the follower within this bound.
        install_snapshot_timeout: 2_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_every),
        max_in_snapshot_log_to_keep: r.logs_to_keep,
        ..Default::default()
    };
    Ok(Arc::new(
        config
            .validate()
            .map_err(|e| NodeError::Raft(e.to_string()))?,
    ))
}

/// How the node was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// A sidecar restart (SIGTERM): Postgres keeps running under its guard for
    /// `postgres.restart_window_ms`, for the next sidecar to adopt.
    KeepPostgres,
    /// Postgres stops with the sidecar (SIGINT).
    StopPostgres,
}

/// Runs the node until `shutdown` completes, then stops Raft and the server and flushes the
/// store. `started` receives the handle once Raft runs (tests and the CLI use it).
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl Future<Output = Shutdown> + Send + 'static,
    started: Option<tokio::sync::oneshot::Sender<NodeHandle>>,
) -> Result<(), NodeError> {
    // Bind first: a wrong address must fail before the data dir is touched.
    let listener = TcpListener::bind(&cfg.listen_addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr: cfg.listen_addr.clone(),
            source,
        })?;
    let http_listener = if cfg.http_addr.is_empty() {
        None
    } else {
        Some(
            TcpListener::bind(&cfg.http_addr)
                .await
                .map_err(|source| NodeError::Bind {
                    addr: cfg.http_addr.clone(),
                    source,
                })?,
        )
    };
    // Bad TLS files fail before the data dir is touched, too.
    let secured = load_security(&cfg)?;
    let metrics_token = secured.metrics_token.clone();
    let access = Access::new(
        secured.tls.is_some(),
        secured.token.clone(),
        cfg.security.open_reads,
    );
    let data_path = cfg.data_dir.display().to_string();
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| NodeError::DataDir {
        path: data_path.clone(),
        source,
    })?;
    identity::check_or_record(
        &cfg.data_dir,
        &DataDirIdentity {
            cluster_name: cfg.cluster_name.clone(),
            node_id: cfg.node_id,
        },
    )
    .map_err(|source| NodeError::Identity {
        path: data_path.clone(),
        source,
    })?;
    let db = open_db(&cfg.data_dir.join("raft")).map_err(|source| NodeError::Store {
        path: data_path.clone(),
        source,
    })?;

    let log_store = LogStore::new(db.clone()).map_err(|source| NodeError::Store {
        path: data_path.clone(),
        source,
    })?;
    let sm = StateMachineStore::new(db.clone()).map_err(|e| NodeError::Raft(e.to_string()))?;
    let state = sm.subscribe();
    let dialer = Dialer::new(cfg.dial_via.clone()).with_tls(secured.tls.clone());
    let network = GrpcNetwork::new(dialer.clone());
    let raft = Raft::new(cfg.node_id, raft_config(&cfg)?, network, log_store, sm)
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;

    // Leases are granted only while the leader confirmed its quorum within three heartbeats;
    // it confirms every heartbeat. The same bound lengthens a new leader's wait (S2).
    let events = db
        .open_tree("events")
        .and_then(|tree| EventLog::open(cfg.node_id, tree))
        .map_err(|source| NodeError::Store {
            path: data_path.clone(),
            source,
        })?;
    let failover = FailoverLeader::new(
        cfg.node_id,
        raft.clone(),
        state.clone(),
        cfg.raft.heartbeat_ms,
        events.clone(),
        dialer.clone(),
    );
    let (request_tx, request_rx) = tokio::sync::mpsc::channel(4);
    let mut api = ClusterService::new(
        cfg.node_id,
        cfg.cluster_name.clone(),
        raft.clone(),
        state.clone(),
        failover.clone(),
        events.clone(),
        dialer.clone(),
    );
    api = api.with_access(access.clone());
    if cfg.postgres.data_dir.is_some() {
        api = api.with_requests(request_tx);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // The gRPC server and the failover leader stop only after the sidecar loop: a leader whose
    // own sidecar is shutting down keeps renewing the primary's lease (elsewhere) meanwhile,
    // instead of leaving it unrenewed while Raft, still up, holds off the next election.
    let (late_stop_tx, late_stop_rx) = watch::channel(false);
    let (mode_tx, mode_rx) = watch::channel(Shutdown::StopPostgres);
    let mut server_stop = late_stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .add_service(
            RaftTransportServer::new(RaftTransportService::new(raft.clone(), access))
                .max_decoding_message_size(MAX_RAFT_MESSAGE),
        )
        .add_service(
            crate::proto::internal_server::InternalServer::new(api.clone())
                .max_decoding_message_size(MAX_API_MESSAGE),
        )
        .add_service(ClusterServer::new(api).max_decoding_message_size(MAX_API_MESSAGE))
        .serve_with_incoming_shutdown(
            security::incoming(listener, secured.tls.clone()),
            async move {
                let _ = server_stop.wait_for(|s| *s).await;
            },
        );
    let server = tokio::spawn(server);
    tracing::info!(
        node = cfg.node_id,
        name = %cfg.name,
        addr = %cfg.advertised(),
        cluster = %cfg.cluster_name,
        "sidecar started"
    );

    bootstrap_if_new(&cfg, &raft).await?;
    tokio::spawn(log_role_changes(
        raft.clone(),
        stop_rx.clone(),
        events.clone(),
    ));
    tokio::spawn(failover.clone().run(
        Duration::from_millis(cfg.raft.heartbeat_ms),
        late_stop_rx.clone(),
    ));
    let (health_tx, health_rx) = watch::channel(crate::http::LocalHealth::default());
    let metrics = crate::metrics::Metrics::new();
    if let Some(l) = http_listener {
        let sources = crate::http::Sources {
            me: cfg.node_id,
            health: health_rx,
            state: state.clone(),
            metrics: metrics.clone(),
            raft: raft.clone(),
            metrics_token: metrics_token.clone(),
        };
        let stop = stop_rx.clone();
        let addr = cfg.http_addr.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(l, sources, stop).await {
                tracing::warn!(%addr, error = %e, "HTTP health endpoints stopped");
            }
        });
    }
    let sidecar = match postgres_instance(&cfg)? {
        Some(instance) => {
            let memory = cfg.data_dir.join("failover.json");
            let loop_ = Sidecar::new(
                cfg.node_id,
                raft.clone(),
                state.clone(),
                failover.clone(),
                instance,
                memory,
                events.clone(),
                dialer.clone(),
            )
            .await?
            .warn_below(cfg.postgres.free_space_warn_bytes)
            .publish_health(health_tx)
            .count_in(metrics)
            .with_callbacks(crate::callbacks::Callbacks::new(
                cfg.callbacks.clone(),
                cfg.cluster_name.clone(),
            ))
            .take_requests(request_rx)
            .keep_postgres_on_restart(
                mode_rx,
                Duration::from_millis(cfg.postgres.restart_window_ms),
            )
            .allow_members_only(cfg.postgres.allowed_cidrs.is_empty());
            Some(tokio::spawn(loop_.run(stop_rx.clone())))
        }
        None => None,
    };
    tokio::spawn(publish_own_details(
        cfg.clone(),
        secured.tls.clone(),
        state.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(reload_security(secured, late_stop_rx.clone()));
    if let Some(tx) = started {
        let _ = tx.send(NodeHandle {
            id: cfg.node_id,
            raft: raft.clone(),
            state: state.clone(),
        });
    }

    let mode = shutdown.await;
    tracing::info!(node = cfg.node_id, ?mode, "shutting down");
    let _ = mode_tx.send(mode);
    let _ = stop_tx.send(true);
    if let Some(task) = sidecar {
        // Postgres is fenced before Raft stops, so nothing writes without a lease.
        let _ = task.await;
    }
    let _ = late_stop_tx.send(true);
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "Raft did not shut down cleanly");
    }
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(NodeError::Serve(e)),
        Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
    }
    db.flush_async().await.map_err(|source| NodeError::Store {
        path: data_path,
        source,
    })?;
    tracing::info!(node = cfg.node_id, "stopped");
    Ok(())
}

/// The managed Postgres of this member, when `postgres.data_dir` is configured.
fn postgres_instance(cfg: &NodeConfig) -> Result<Option<pg_supervisor::Instance>, NodeError> {
    let pg = &cfg.postgres;
    let Some(data_dir) = pg.data_dir.clone() else {
        return Ok(None);
    };
    let program = std::env::current_exe().map_err(|e| {
        NodeError::Raft(format!(
            "cannot locate the pgquorum binary for the guard: {e}"
        ))
    })?;
    let icfg = pg_supervisor::InstanceConfig {
        member_name: cfg.name.clone(),
        data_dir,
        log_file: None,
        listen_host: pg.host.clone(),
        port: pg.port,
        socket_dir: (!pg.socket_dir.as_os_str().is_empty()).then(|| pg.socket_dir.clone()),
        postgres_user: pg.os_user.clone(),
        pg_bin_dir: pg.bin_dir.clone(),
        superuser: pg_supervisor::Credentials {
            name: pg.superuser.clone(),
            password: pg.superuser_password.expose().to_string(),
        },
        replication: pg_supervisor::Credentials {
            name: pg.replication_user.clone(),
            password: pg.replication_password.expose().to_string(),
        },
        cluster_cidrs: if pg.allowed_cidrs.is_empty() {
            crate::failover::sidecar::member_addresses([pg.host.as_str()])
        } else {
            pg.allowed_cidrs.clone()
        },
        extra_settings: Vec::new(),
        extra_hba: Vec::new(),
        expected_system_identifier: None,
        guard_socket: Some(cfg.data_dir.join("guard.sock")),
        guard: pg_supervisor::GuardCommand {
            program,
            args: vec!["guard".into()],
        },
        timeouts: pg_supervisor::Timeouts {
            connect: Duration::from_secs(1),
            statement: Duration::from_secs(1),
            probe: Duration::from_millis(1500),
            follow: Duration::from_secs(20),
            promote: Duration::from_millis(pg.promote_timeout_ms),
            ..Default::default()
        },
    };
    Ok(Some(pg_supervisor::Instance::new(icfg)?))
}

/// A brand-new cluster is initialised by exactly one node, the lowest id of `initial_members`,
/// and only when its store is empty, so a restart never re-initialises.
async fn bootstrap_if_new(cfg: &NodeConfig, raft: &Raft) -> Result<(), NodeError> {
    let Some(first) = cfg.initial_members.iter().map(|m| m.id).min() else {
        tracing::info!("no initial_members: waiting to be added to a running cluster");
        return Ok(());
    };
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if initialized {
        tracing::info!("Raft state found in the data dir; resuming");
        return Ok(());
    }
    if first != cfg.node_id {
        tracing::info!(
            bootstrapper = first,
            "new cluster: waiting for node {first} to bootstrap it"
        );
        return Ok(());
    }
    let members: BTreeMap<NodeId, BasicNode> = cfg
        .initial_members
        .iter()
        .map(|m| (m.id, BasicNode::new(&m.addr)))
        .collect();
    tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "bootstrapping a new cluster");
    match raft.initialize(members).await {
        Ok(()) => Ok(()),
        // Another start already initialised it between the check and now.
        Err(openraft::error::RaftError::APIError(
            openraft::error::InitializeError::NotAllowed(_),
        )) => Ok(()),
        Err(e) => Err(NodeError::Raft(e.to_string())),
    }
}

fn own_details(cfg: &NodeConfig) -> MemberInfo {
    MemberInfo {
        id: cfg.node_id,
        name: cfg.name.clone(),
        http_addr: cfg.http_addr.clone(),
        pg_host: cfg.postgres.host.clone(),
        pg_port: cfg.postgres.port,
        tags: cfg.tags.clone(),
        raft_heartbeat_ms: cfg.raft.heartbeat_ms,
        raft_election_max_ms: cfg.raft.election_timeout_max_ms,
    }
}

/// Keeps this member's committed details equal to its config: registers them once the node is
/// a member, and again if they differ (a config change, or a re-added member).
async fn publish_own_details(
    cfg: NodeConfig,
    tls: Option<Tls>,
    mut state: watch::Receiver<Arc<AppliedState>>,
    mut stop: watch::Receiver<bool>,
) {
    let mine = own_details(&cfg);
    let Ok(client) = ApiClient::new(vec![cfg.advertised().to_string()]) else {
        return;
    };
    let client = client.with_patience(Duration::from_secs(2)).with_tls(tls);
    loop {
        let needed = {
            let s = state.borrow_and_update();
            s.member_ids().contains(&cfg.node_id)
                && s.cluster.members.get(&cfg.node_id) != Some(&mine)
        };
        if needed {
            let req = proto::RegisterMemberRequest {
                id: mine.id,
                name: mine.name.clone(),
                http_addr: mine.http_addr.clone(),
                pg_host: mine.pg_host.clone(),
                pg_port: u32::from(mine.pg_port),
                tags: Some(proto::Tags {
                    nofailover: mine.tags.nofailover,
                    priority: mine.tags.priority,
                    nosync: mine.tags.nosync,
                }),
                raft_heartbeat_ms: mine.raft_heartbeat_ms,
                raft_election_max_ms: mine.raft_election_max_ms,
            };
            match client
                .call_internal(|mut c| {
                    let req = req.clone();
                    async move { c.register_member(req).await }
                })
                .await
            {
                Ok(r) => {
                    tracing::info!(log_index = r.log_index, name = %mine.name, "registered member details")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register member details yet; retrying")
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = state.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Logs every change of Raft role or leader at INFO.
async fn log_role_changes(raft: Raft, mut stop: watch::Receiver<bool>, events: EventLog) {
    let mut metrics = raft.metrics();
    let mut last = (None, None, 0);
    loop {
        let now = {
            let m = metrics.borrow_and_update();
            (Some(m.state), m.current_leader, m.current_term)
        };
        if now != last {
            let role = now.0.unwrap_or(openraft::ServerState::Learner);
            tracing::info!(role = ?role, leader = ?now.1, term = now.2, "raft role");
            events.record(
                "raft",
                format!("Raft role {role:?}, leader {:?}, term {}", now.1, now.2),
                0,
                0,
            );
            last = now;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = metrics.changed() => if r.is_err() { return },
        }
    }
}
