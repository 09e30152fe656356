//! Real PostgreSQL clusters in temp dirs on loopback ports, for the
//! integration tests. No mocks.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pg_supervisor::{
    Credentials, GuardCommand, Instance, InstanceConfig, Lease, OsUser, PgBinaries, Timeouts,
    Upstream,
};
use tempfile::TempDir;
use tokio_postgres::{NoTls, Row};

/// Superuser used by every test cluster (and by `pgq-test-supervisor`).
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres";
pub const REPLICATOR: &str = "replicator";

/// The one way a test skips: prints `SKIPPED <test>: <why>` and returns, so the caller can
/// return; under `CI=true` it panics with that message instead, so a green CI run means every
/// test ran. `why` names what is missing and the fix.
pub fn skip(test: &str, why: &str) {
    let said = format!("SKIPPED {test}: {why}");
    eprintln!("{said}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{said} (CI=true: a skip fails the run; give this machine what the test needs)");
    }
}

/// A lease long enough for any test: primaries need one to stay up.
pub fn long_lease() -> Lease {
    Lease::expires_in(Duration::from_secs(600))
}

/// Fails loudly (never skips) when PostgreSQL is not installed.
pub fn require_postgres() -> PgBinaries {
    match PgBinaries::discover(None) {
        Ok(b) => b,
        Err(e) => panic!("these tests need PostgreSQL 15 server binaries: {e}"),
    }
}

/// A temp dir the postgres OS user can use.
pub fn test_dir() -> TempDir {
    require_postgres();
    let mut dir = tempfile::Builder::new()
        .prefix("pgq-test-")
        .tempdir()
        .unwrap();
    // For post-mortems of server logs: PGQ_KEEP_TEST_DIRS=1.
    if std::env::var_os("PGQ_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    let user = OsUser::resolve(None).unwrap();
    user.chown(dir.path()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Path of the guard executable built with this crate.
pub fn guard_program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgq-guard"))
}

/// Config for member `name` under `dir`, small and fast.
pub fn config(dir: &Path, name: &str) -> InstanceConfig {
    InstanceConfig {
        member_name: name.into(),
        data_dir: dir.join(name),
        log_file: None,
        listen_host: "127.0.0.1".into(),
        port: free_port(),
        socket_dir: None,
        postgres_user: None,
        pg_bin_dir: None,
        superuser: Credentials {
            name: SUPERUSER.into(),
            password: SUPERUSER_PASSWORD.into(),
        },
        replication: Credentials {
            name: REPLICATOR.into(),
            password: "repl-secret".into(),
        },
        cluster_cidrs: vec!["127.0.0.1/32".into()],
        extra_settings: vec![
            ("fsync".into(), "off".into()),
            ("shared_buffers".into(), "16MB".into()),
            ("max_connections".into(), "30".into()),
            ("wal_retrieve_retry_interval".into(), "200ms".into()),
        ],
        extra_hba: vec![],
        expected_system_identifier: None,
        guard_socket: None,
        guard: GuardCommand {
            program: guard_program(),
            args: vec![],
        },
        timeouts: Timeouts {
            probe: Duration::from_secs(2),
            connect: Duration::from_secs(2),
            statement: Duration::from_secs(2),
            ..Timeouts::default()
        },
    }
}

/// Runs SQL as the superuser on a member.
pub async fn sql(target: &Upstream, query: &str) -> Result<Vec<Row>, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(&target.host)
        .port(target.port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2))
        .connect(NoTls)
        .await?;
    let driver = tokio::spawn(conn);
    let rows = client.query(query, &[]).await;
    drop(client);
    driver.abort();
    rows
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `value` is present in table `t` on `target`.
pub async fn wait_for_row(target: &Upstream, value: &str) {
    let q = format!("SELECT count(*) FROM t WHERE v = '{value}'");
    wait_until(
        &format!("row {value} on port {}", target.port),
        Duration::from_secs(30),
        || async {
            match sql(target, &q).await {
                Ok(rows) => rows[0].get::<_, i64>(0) == 1,
                Err(_) => false,
            }
        },
    )
    .await;
}

/// A started primary with table `t`.
pub async fn started_primary(dir: &Path, name: &str) -> Instance {
    let mut p = Instance::new(config(dir, name)).unwrap();
    p.init_primary().await.unwrap();
    p.start(long_lease()).await.unwrap();
    sql(&p.as_upstream(), "CREATE TABLE t (v text)")
        .await
        .unwrap();
    p
}

/// A started replica of `upstream`.
pub async fn started_replica(dir: &Path, name: &str, upstream: &Upstream) -> Instance {
    let mut r = Instance::new(config(dir, name)).unwrap();
    r.clone_from(upstream).await.unwrap();
    r.start(Lease::NotRequired).await.unwrap();
    r
}

/// True if a connection to `target` succeeds.
pub async fn connects(target: &Upstream) -> bool {
    sql(target, "SELECT 1").await.is_ok()
}
