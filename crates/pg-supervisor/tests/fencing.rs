//! Fencing, the guard (S4) and bounded probes, against real PostgreSQL.

mod harness;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use pg_supervisor::os_process::{is_alive, is_frozen, processes_in_dir};
use pg_supervisor::{Instance, PostmasterState};

/// A fenced primary refuses every connection; the fence is timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_stops_a_running_primary() {
    let dir = test_dir();
    let mut p = started_primary(dir.path(), "a").await;
    let up = p.as_upstream();
    // A busy session must not survive the fence either.
    let busy = tokio::spawn({
        let up = up.clone();
        async move { sql(&up, "SELECT pg_sleep(60)").await }
    });
    wait_until("busy backend", Duration::from_secs(5), || async {
        sql(
            &up,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'",
        )
        .await
        .map(|r| r[0].get::<_, i64>(0) >= 1)
        .unwrap_or(false)
    })
    .await;
    let pid = p.status().pid().unwrap();
    let report = p.fence().await.unwrap();
    eprintln!(
        "FIGURE fence_ms={} (sigkill escalation: {})",
        report.elapsed_ms, report.escalated_to_sigkill
    );
    assert!(report.was_running && report.verified_gone, "{report:?}");
    assert!(!is_alive(pid));
    assert!(!connects(&up).await);
    assert!(busy.await.unwrap().is_err());
    assert!(!p.status().is_running());
    // Fencing twice is harmless.
    assert!(!p.fence().await.unwrap().was_running);
}

/// Starts `SELECT pg_sleep(60)` on `up` and returns the task and the pid
/// of the backend running it.
async fn sleeping_backend(
    up: &pg_supervisor::Upstream,
) -> (
    tokio::task::JoinHandle<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
    i32,
) {
    let busy = tokio::spawn({
        let up = up.clone();
        async move { sql(&up, "SELECT pg_sleep(60)").await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let backend = loop {
        let rows = sql(
            up,
            "SELECT pid FROM pg_stat_activity \
             WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        )
        .await;
        if let Ok([row]) = rows.as_deref() {
            break row.get::<_, i32>(0);
        }
        assert!(Instant::now() < deadline, "no sleeping backend: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    (busy, backend)
}

/// The postmaster is SIGKILLed while a backend is SIGSTOPped (so it cannot
/// notice postmaster death): that orphan still maps shared memory and could
/// finish a commit. Returns the backend's pid, once the postmaster is gone.
async fn orphan_a_backend(
    p: &Instance,
) -> (
    tokio::task::JoinHandle<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
    i32,
) {
    let up = p.as_upstream();
    let (busy, backend) = sleeping_backend(&up).await;
    assert!(unsafe { libc::kill(backend, libc::SIGSTOP) } == 0);
    wait_until("backend stopped", Duration::from_secs(5), || async {
        is_frozen(backend)
    })
    .await;
    let postmaster = p.status().pid().unwrap();
    assert!(unsafe { libc::kill(postmaster, libc::SIGKILL) } == 0);
    wait_until("postmaster gone", Duration::from_secs(5), || async {
        !is_alive(postmaster)
    })
    .await;
    assert!(is_alive(backend), "the orphan must outlive its postmaster");
    (busy, backend)
}

/// Kills `pid` if a test left it behind, so that a failing assertion does
/// not leave a stopped backend on the machine.
fn kill_leftover(pid: i32) {
    if is_alive(pid) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Postmaster already dead, one backend orphaned and frozen: fence()
/// kills the backend and only then reports the data directory fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_kills_backends_orphaned_by_a_dead_postmaster() {
    let dir = test_dir();
    let mut p = started_primary(dir.path(), "a").await;
    let (busy, backend) = orphan_a_backend(&p).await;
    let report = p.fence().await.unwrap();
    let backend_alive = is_alive(backend);
    kill_leftover(backend);
    assert!(
        !backend_alive,
        "orphaned backend {backend} survived the fence: {report:?}"
    );
    assert!(report.verified_gone, "{report:?}");
    assert!(report.was_running, "{report:?}");
    assert!(report.leftover_pids.contains(&backend), "{report:?}");
    assert!(processes_in_dir(&p.config().data_dir).is_empty());
    let answer = tokio::time::timeout(Duration::from_secs(10), busy).await;
    assert!(matches!(answer, Ok(Ok(Err(_)))), "{answer:?}");
}

/// Same, from a handle that never saw the postmaster (a restarted sidecar):
/// no postmaster is found at all, and the orphan must still die.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_without_any_postmaster_kills_orphans() {
    let dir = test_dir();
    let p = started_primary(dir.path(), "a").await;
    let (_busy, backend) = orphan_a_backend(&p).await;
    let mut fresh = Instance::new(p.config().clone()).unwrap();
    assert!(matches!(fresh.status(), PostmasterState::Dead { .. }));
    let report = fresh.fence().await.unwrap();
    let backend_alive = is_alive(backend);
    kill_leftover(backend);
    assert!(
        !backend_alive,
        "orphaned backend {backend} survived the fence: {report:?}"
    );
    assert!(report.verified_gone && report.was_running, "{report:?}");
    drop(p);
}

/// Fencing a data directory where nothing runs is a verified no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_with_nothing_running_is_verified() {
    let dir = test_dir();
    let mut p = Instance::new(config(dir.path(), "a")).unwrap();
    p.init_primary().await.unwrap();
    let report = p.fence().await.unwrap();
    assert!(!report.was_running, "{report:?}");
    assert!(report.verified_gone, "{report:?}");
}

/// A SIGSTOPped postmaster accepts TCP but never answers: the probe still
/// returns "unhealthy" within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_a_frozen_postmaster_is_bounded() {
    let dir = test_dir();
    let mut p = started_primary(dir.path(), "a").await;
    assert!(p.observe().await.is_healthy());
    let pid = p.status().pid().unwrap();
    assert!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0);
    // kill() returns before the target is actually stopped.
    wait_until("postmaster stopped", Duration::from_secs(5), || async {
        is_frozen(pid)
    })
    .await;
    let started = Instant::now();
    let obs = p.observe().await;
    let took = started.elapsed();
    eprintln!("FIGURE frozen_probe_ms={}", took.as_millis());
    assert!(!obs.is_healthy(), "{obs:?}");
    assert_eq!(
        obs.postmaster,
        PostmasterState::Running { pid, frozen: true }
    );
    assert!(obs.probe_error.is_some());
    let limit = p.config().timeouts.probe;
    assert!(
        took < limit + Duration::from_millis(500),
        "probe took {took:?}"
    );
    // fence() kills a frozen postmaster outright.
    let report = p.fence().await.unwrap();
    assert!(
        report.verified_gone && report.escalated_to_sigkill,
        "{report:?}"
    );
}

/// Initialises a cluster whose credentials match `pgq-test-supervisor`.
async fn cluster_for_supervisor(dir: &std::path::Path) -> Instance {
    let mut cfg = config(dir, "s");
    cfg.replication.password = "replicator".into();
    let inst = Instance::new(cfg).unwrap();
    inst.init_primary().await.unwrap();
    inst
}

/// Starts `pgq-test-supervisor` on `inst` with `lease_ms`; returns it and
/// the postmaster pid.
fn spawn_supervisor(inst: &Instance, lease_ms: u64) -> (std::process::Child, i32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgq-test-supervisor"))
        .arg(&inst.config().data_dir)
        .arg(inst.config().port.to_string())
        .arg(guard_program())
        .arg(lease_ms.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line
        .trim()
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("supervisor said {line:?}"))
        .parse()
        .unwrap();
    (child, pid)
}

/// Waits until the postmaster is gone and returns how long that took.
async fn wait_gone(pid: i32, up: &pg_supervisor::Upstream, bound: Duration) -> Duration {
    let started = Instant::now();
    wait_until("postmaster gone", bound, || async { !is_alive(pid) }).await;
    let took = started.elapsed();
    assert!(!connects(up).await);
    took
}

/// SIGKILL of the supervising process: its guard sees stdin EOF and
/// fences PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dies_with_a_killed_supervisor() {
    let dir = test_dir();
    let inst = cluster_for_supervisor(dir.path()).await;
    let up = inst.as_upstream();
    let (mut sup, pid) = spawn_supervisor(&inst, 1000);
    assert!(connects(&up).await);
    // Outlive several lease periods: renewal works.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(is_alive(pid));
    sup.kill().unwrap();
    sup.wait().unwrap();
    let took = wait_gone(pid, &up, Duration::from_secs(3)).await;
    eprintln!(
        "FIGURE supervisor_sigkill_to_postgres_gone_ms={}",
        took.as_millis()
    );
}

/// SIGSTOP of the supervising process (it stays stopped): the lease
/// expires and the guard fences PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dies_with_a_frozen_supervisor() {
    let dir = test_dir();
    let inst = cluster_for_supervisor(dir.path()).await;
    let up = inst.as_upstream();
    let lease_ms = 1000;
    let (mut sup, pid) = spawn_supervisor(&inst, lease_ms);
    assert!(connects(&up).await);
    assert!(unsafe { libc::kill(sup.id() as i32, libc::SIGSTOP) } == 0);
    let took = wait_gone(pid, &up, Duration::from_millis(lease_ms + 2000)).await;
    eprintln!(
        "FIGURE supervisor_sigstop_to_postgres_gone_ms={} (lease {lease_ms} ms)",
        took.as_millis()
    );
    assert!(is_alive(sup.id() as i32), "supervisor stays stopped");
    sup.kill().unwrap();
    sup.wait().unwrap();
}

/// A sidecar restart: the old sidecar detaches, Postgres keeps running and accepting writes under
/// its guard, and a new sidecar adopts the guard and feeds it. Only one sidecar feeds a guard at a
/// time. Without a successor the guard fences at the earlier of the lease's end and the restart
/// window; a successor that goes away without detaching is fenced like any dead sidecar (S4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_guard_waits_for_a_successor_and_fences_when_none_comes() {
    let dir = test_dir();
    let mut cfg = config(dir.path(), "a");
    cfg.guard_socket = Some(dir.path().join("guard.sock"));
    let mut p = Instance::new(cfg.clone()).unwrap();
    p.init_primary().await.unwrap();
    let lease = pg_supervisor::Lease::expires_in(Duration::from_secs(60));
    p.start(lease).await.unwrap();
    let up = p.as_upstream();
    sql(&up, "CREATE TABLE t (v text)").await.unwrap();
    let pid = p.status().pid().unwrap();

    // Detached and dropped: nothing is fenced, writes go on.
    assert!(p.detach_guard(Duration::from_secs(60)).await.unwrap());
    drop(p);
    sql(&up, "INSERT INTO t VALUES ('while no sidecar runs')")
        .await
        .expect("Postgres writes on between two sidecars");
    assert!(is_alive(pid));

    // The successor adopts the guard and learns the lease it enforces; a third is turned away.
    let mut next = Instance::new(cfg.clone()).unwrap();
    assert_eq!(next.adopt_running().await.unwrap(), Some(lease));
    let mut third = Instance::new(cfg.clone()).unwrap();
    let busy = third.adopt_running().await.unwrap_err().to_string();
    assert!(busy.contains("another sidecar"), "{busy}");
    drop(third);
    next.feed_lease(pg_supervisor::Lease::expires_in(Duration::from_secs(60)))
        .await
        .expect("the adopted guard takes leases");
    sql(&up, "INSERT INTO t VALUES ('adopted')").await.unwrap();

    // No successor: the window (shorter than the lease here) closes and the guard fences.
    let detached = Instant::now();
    assert!(next.detach_guard(Duration::from_millis(800)).await.unwrap());
    drop(next);
    assert!(is_alive(pid), "fenced before the window closed");
    wait_until(
        "the guard fences at the window's end",
        Duration::from_secs(10),
        || async { !is_alive(pid) },
    )
    .await;
    assert!(
        detached.elapsed() >= Duration::from_millis(700),
        "fenced after {:?}, before the window closed",
        detached.elapsed()
    );
    assert!(!connects(&up).await);
    // The guard removes its socket as it exits, just after the postmaster is gone.
    let socket = cfg.guard_socket.clone().unwrap();
    wait_until(
        "the guard removes its socket",
        Duration::from_secs(5),
        || async { !socket.exists() },
    )
    .await;

    // A lease shorter than the window: the lease's end fences.
    let pid = started_then_detached(&cfg, Duration::from_millis(1500)).await;
    wait_until(
        "the guard fences at the lease's end",
        Duration::from_secs(10),
        || async { !is_alive(pid) },
    )
    .await;

    // An adopter that dies (no detach) is a dead sidecar: the guard fences at once.
    let pid = started_then_detached(&cfg, Duration::from_secs(60)).await;
    let mut adopter = Instance::new(cfg.clone()).unwrap();
    assert!(adopter.adopt_running().await.unwrap().is_some());
    let died = Instant::now();
    drop(adopter);
    wait_until(
        "the guard fences when its adopter dies",
        Duration::from_secs(5),
        || async { !is_alive(pid) },
    )
    .await;
    eprintln!(
        "FIGURE adopter_gone_to_fenced_ms={}",
        died.elapsed().as_millis()
    );
}

/// Starts the primary of `cfg` under a guard with a lease of `lease`, detaches from the guard
/// for a minute and lets go of the instance, as a sidecar stopping for a restart does; returns
/// the postmaster's pid.
async fn started_then_detached(cfg: &pg_supervisor::InstanceConfig, lease: Duration) -> i32 {
    let mut p = Instance::new(cfg.clone()).unwrap();
    p.start(pg_supervisor::Lease::expires_in(lease))
        .await
        .unwrap();
    let pid = p.status().pid().unwrap();
    assert!(p.detach_guard(Duration::from_secs(60)).await.unwrap());
    pid
}

/// A guard whose log cannot be written still fences at the lease's end (review finding 2: it
/// wrote "lease expired; fencing" to its log before fencing, so a hung log filesystem held the
/// fence back indefinitely). The log here is a FIFO whose buffer the test fills and nobody
/// drains: every write to it blocks, the guard's and Postgres' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_whose_log_blocks_still_fences_at_the_lease_end() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = test_dir();
    let mut cfg = config(dir.path(), "blocked");
    let fifo = dir.path().join("server.log.fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o666) }, 0, "mkfifo");
    cfg.log_file = Some(fifo.clone());
    let mut p = Instance::new(cfg).unwrap();
    p.init_primary().await.unwrap();
    // A reader keeps the FIFO open; it drains while Postgres starts, then stops.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let drainer = std::thread::spawn({
        let draining = draining.clone();
        let mut reader = reader.try_clone().unwrap();
        move || {
            use std::io::Read;
            let mut buf = [0u8; 65536];
            while draining.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = reader.read(&mut buf);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    p.start(pg_supervisor::Lease::expires_in(Duration::from_secs(60)))
        .await
        .unwrap();
    let up = p.as_upstream();
    assert!(connects(&up).await);
    let pid = p.status().pid().unwrap();
    draining.store(false, std::sync::atomic::Ordering::SeqCst);
    drainer.join().unwrap();
    // Fill the pipe: from now on every write to the log blocks.
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let chunk = [b'x'; 4096];
    loop {
        use std::io::Write;
        match filler.write(&chunk) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the log pipe: {e}"),
        }
    }
    let lease = Duration::from_millis(1500);
    p.feed_lease(pg_supervisor::Lease::expires_in(lease))
        .await
        .unwrap();
    let fed = Instant::now();
    wait_until(
        "the postmaster fenced despite the blocked log",
        lease + Duration::from_secs(3),
        || async { !is_alive(pid) },
    )
    .await;
    eprintln!(
        "FIGURE blocked_log_lease_to_fenced_ms={} (lease {} ms)",
        fed.elapsed().as_millis(),
        lease.as_millis()
    );
    assert!(
        fed.elapsed() >= lease,
        "fenced before the lease ended: {:?}",
        fed.elapsed()
    );
    // Let whatever still writes to the log finish, so the guard can exit.
    let drain = std::thread::spawn(move || {
        use std::io::Read;
        let mut reader = reader;
        let mut buf = [0u8; 65536];
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            let _ = reader.read(&mut buf);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    drop(p);
    drain.join().unwrap();
}
