//! Start, stop in every mode, restart, reload, and the guard's pairing with
//! its postmaster.

mod harness;

use std::time::Duration;

use harness::*;
use pg_supervisor::os_process::is_alive;
use pg_supervisor::{Lease, PostmasterState, StopMode, SupervisorError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_stop_restart_reload() {
    let dir = test_dir();
    let mut p = started_primary(dir.path(), "a").await;
    let up = p.as_upstream();
    for mode in [StopMode::Smart, StopMode::Fast, StopMode::Immediate] {
        let pid = p.status().pid().unwrap();
        let guard_pid = p.guard().unwrap().pid().unwrap() as i32;
        p.stop(mode, Duration::from_secs(30)).await.unwrap();
        assert!(!is_alive(pid), "{mode:?}");
        // The guard never outlives its postmaster.
        assert!(!is_alive(guard_pid), "{mode:?}");
        assert!(!connects(&up).await);
        assert!(!p.status().is_running());
        p.start(long_lease()).await.unwrap();
        assert!(connects(&up).await, "{mode:?}");
    }
    let pid = p.status().pid().unwrap();
    p.restart().await.unwrap();
    let new_pid = p.status().pid().unwrap();
    assert_ne!(pid, new_pid);
    assert!(connects(&up).await);

    sql(&up, "ALTER SYSTEM SET work_mem = '7MB'").await.unwrap();
    p.reload().unwrap();
    wait_until("reloaded setting", Duration::from_secs(10), || async {
        sql(&up, "SHOW work_mem")
            .await
            .map(|r| r[0].get::<_, String>(0) == "7MB")
            .unwrap_or(false)
    })
    .await;

    // A smart stop waits for clients: with one connected it times out and
    // leaves the server running for the caller to escalate.
    let (client, conn) = tokio_postgres::Config::new()
        .host(&up.host)
        .port(up.port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let err = p
        .stop(StopMode::Smart, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("did not finish"), "{err}");
    assert!(p.status().is_running());
    p.stop(StopMode::Fast, Duration::from_secs(30))
        .await
        .unwrap();
    drop(client);
    driver.abort();
}

/// Killing the guard takes the postmaster with it (PR_SET_PDEATHSIG), and
/// status() then reports the stale lock file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_dies_with_its_guard() {
    let dir = test_dir();
    let p = started_primary(dir.path(), "a").await;
    let pid = p.status().pid().unwrap();
    let guard_pid = p.guard().unwrap().pid().unwrap() as i32;
    assert!(unsafe { libc::kill(guard_pid, libc::SIGKILL) } == 0);
    wait_until("postmaster gone", Duration::from_secs(5), || async {
        !is_alive(pid)
    })
    .await;
    assert_eq!(p.status(), PostmasterState::Dead { pid });
    assert!(!p.observe().await.is_healthy());
}

/// A lease that runs out fences the server; a replica needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_fences_and_replicas_need_none() {
    let dir = test_dir();
    let mut p = started_primary(dir.path(), "a").await;
    let mut r = started_replica(dir.path(), "b", &p.as_upstream()).await;
    let pid = p.status().pid().unwrap();
    p.feed_lease(Lease::expires_in(Duration::from_millis(200)))
        .await
        .unwrap();
    wait_until("fenced primary", Duration::from_secs(3), || async {
        !is_alive(pid)
    })
    .await;
    assert!(r.observe().await.is_healthy());
    // promote() refuses to make a writable server without a lease.
    let err = r.promote().await.unwrap_err();
    assert!(err.to_string().contains("lease"), "{err}");
    r.fence().await.unwrap();
}

/// Without standby.signal PostgreSQL starts as a writable primary, which
/// must never run without a lease deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_start_needs_a_lease() {
    let dir = test_dir();
    let mut p = started_primary(dir.path(), "a").await;
    let up = p.as_upstream();
    p.stop(StopMode::Fast, Duration::from_secs(30))
        .await
        .unwrap();
    let err = p.start(Lease::NotRequired).await.unwrap_err();
    assert!(
        matches!(&err, SupervisorError::WrongRole(m)
            if m.contains("standby.signal") && m.contains("Lease::Until")),
        "{err}"
    );
    assert_eq!(p.status(), PostmasterState::NotRunning);
    assert!(p.guard().is_none());
    assert!(!connects(&up).await);

    p.start_in_recovery().await.unwrap();
    let rows = sql(&up, "SELECT pg_is_in_recovery()").await.unwrap();
    assert!(rows[0].get::<_, bool>(0), "not in recovery");
    assert!(p.data_dir().has_standby_signal());
    // Restarting keeps it a replica, under the same lease-less guard.
    p.restart().await.unwrap();
    let rows = sql(&up, "SELECT pg_is_in_recovery()").await.unwrap();
    assert!(rows[0].get::<_, bool>(0), "not in recovery after restart");
    let err = p.start_in_recovery().await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::AlreadyRunning { .. }),
        "{err}"
    );
    assert!(p.fence().await.unwrap().verified_gone);
}
