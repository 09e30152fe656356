//! Bad inputs give clear errors and overwrite nothing.

mod harness;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;

use harness::*;
use pg_supervisor::{Instance, PostmasterState, SupervisorError};

/// Every regular file's bytes under `dir`, to prove nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn missing_binaries_are_named_with_a_fix() {
    let dir = test_dir();
    let mut cfg = config(dir.path(), "a");
    cfg.pg_bin_dir = Some(dir.path().to_path_buf());
    let err = Instance::new(cfg).unwrap_err();
    assert!(matches!(err, SupervisorError::BinariesMissing { .. }));
    let text = err.to_string();
    for needle in ["initdb", "pg_rewind", "apt-get install", "pg_bin_dir"] {
        assert!(text.contains(needle), "{text}");
    }
}

#[test]
fn root_is_refused_as_postgres_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            "root_is_refused_as_postgres_user",
            "needs root (it asks to run Postgres as root); run the tests as root",
        );
        return;
    }
    let dir = test_dir();
    let mut cfg = config(dir.path(), "a");
    cfg.postgres_user = Some("root".into());
    let text = Instance::new(cfg).unwrap_err().to_string();
    assert!(text.contains("cannot run PostgreSQL as root"), "{text}");
}

/// A data dir of another cluster: start, init, clone and rejoin all refuse
/// and leave every file as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_of_another_cluster_is_refused() {
    let dir = test_dir();
    let mut a = started_primary(dir.path(), "a").await;
    let sysid_a = a.system_identifier().await.unwrap();

    let other = Instance::new(config(dir.path(), "b")).unwrap();
    let sysid_b = other.init_primary().await.unwrap();
    assert_ne!(sysid_a, sysid_b);
    let b_dir = other.config().data_dir.clone();
    let before = snapshot(&b_dir);

    // Configured as a member of cluster A, the node finds B's data dir.
    let mut cfg = other.config().clone();
    cfg.expected_system_identifier = Some(sysid_a);
    let mut b = Instance::new(cfg).unwrap();
    let err = b.start(long_lease()).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::SystemIdentifierMismatch { expected, found, .. }
            if expected == sysid_a && found == sysid_b),
        "{err}"
    );
    assert!(
        err.to_string().contains("belongs to another cluster"),
        "{err}"
    );
    assert_eq!(b.status(), PostmasterState::NotRunning);

    let err = b.init_primary().await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::DataDirNotEmpty { .. }),
        "{err}"
    );
    let err = b.clone_from(&a.as_upstream()).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::DataDirNotEmpty { .. }),
        "{err}"
    );

    // Rejoining cluster A must not rewind or re-clone over cluster B.
    let mut unguarded = Instance::new(other.config().clone()).unwrap();
    let err = unguarded
        .rejoin_as_replica(&a.as_upstream())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SupervisorError::SystemIdentifierMismatch { .. }),
        "{err}"
    );
    assert_eq!(snapshot(&b_dir), before, "files of cluster B changed");
    assert_eq!(b.system_identifier().await.unwrap(), sysid_b);
    a.fence().await.unwrap();
}

/// A port in use is reported as such, before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_is_reported() {
    let dir = test_dir();
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(dir.path(), "a");
    cfg.port = squatter.local_addr().unwrap().port();
    let mut a = Instance::new(cfg).unwrap();
    a.init_primary().await.unwrap();
    let err = a.start(long_lease()).await.unwrap_err();
    assert!(matches!(err, SupervisorError::PortInUse { .. }), "{err}");
    assert!(err.to_string().contains("already in use"), "{err}");
    assert_eq!(a.status(), PostmasterState::NotRunning);
    assert!(a.guard().is_none());
}

/// An uninitialised data dir cannot be started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_dir_is_not_started() {
    let dir = test_dir();
    let mut a = Instance::new(config(dir.path(), "a")).unwrap();
    let err = a.start(long_lease()).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NotInitialized(_)), "{err}");
}
