//! Bootstrap, cloning, promotion, following and rejoining with real
//! PostgreSQL 15 processes.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use pg_supervisor::error::SupervisorError;
use pg_supervisor::{PostmasterState, RejoinMethod, Role, SyncSpec};

/// init primary, clone two replicas, replicate; promote one replica, the
/// other follows it; kill -9 the old primary and rejoin it with pg_rewind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_promote_follow_and_rewind() {
    let dir = test_dir();
    let mut a = started_primary(dir.path(), "a").await;
    let a_up = a.as_upstream();
    let mut b = started_replica(dir.path(), "b", &a_up).await;
    let mut c = started_replica(dir.path(), "c", &a_up).await;

    // Step 1: a row written on the primary reaches both replicas.
    sql(&a_up, "INSERT INTO t VALUES ('one')").await.unwrap();
    wait_for_row(&b.as_upstream(), "one").await;
    wait_for_row(&c.as_upstream(), "one").await;
    let obs = a.observe().await;
    assert_eq!(obs.role, Some(Role::Primary));
    let names: Vec<&str> = obs.standbys.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["b", "c"], "{obs:?}");
    assert!(obs.standbys.iter().all(|s| s.state == "streaming"));
    let obs_b = b.observe().await;
    assert_eq!(obs_b.role, Some(Role::Replica));
    assert_eq!(obs_b.system_identifier, obs.system_identifier);
    let recv = obs_b.wal_receiver.clone().unwrap();
    assert_eq!(recv.status, "streaming");
    assert_eq!(recv.sender_port, Some(a_up.port));
    let probe_started = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        assert!(b.observe().await.is_healthy());
    }
    eprintln!(
        "FIGURE probe_ms={:.1} (mean of {rounds} observe() calls on a replica)",
        probe_started.elapsed().as_secs_f64() * 1000.0 / rounds as f64
    );

    // Step 2: promote b; timeline increments and it accepts writes.
    let tl_before = obs_b.timeline.unwrap();
    b.feed_lease(long_lease()).await.unwrap();
    let promote_started = Instant::now();
    let report = b.promote().await.unwrap();
    let b_up = b.as_upstream();
    sql(&b_up, "INSERT INTO t VALUES ('two')").await.unwrap();
    let promote_ms = promote_started.elapsed().as_millis();
    eprintln!(
        "FIGURE promote_ms={promote_ms} (promote() call to first committed write; \
         pg_promote part {} ms)",
        report.elapsed_ms
    );
    assert_eq!(report.timeline, tl_before + 1, "{report:?}");
    assert_eq!(b.observe().await.role, Some(Role::Primary));

    // c follows b and receives new rows on the new timeline.
    let follow = c.follow(&b_up).await.unwrap();
    eprintln!("FIGURE follow_ms={}", follow.elapsed_ms);
    assert_eq!(follow.timeline, Some(report.timeline));
    sql(&b_up, "INSERT INTO t VALUES ('three')").await.unwrap();
    wait_for_row(&c.as_upstream(), "three").await;
    wait_for_row(&c.as_upstream(), "two").await;

    // Step 3: the old primary diverges, then dies by kill -9.
    sql(&a_up, "INSERT INTO t VALUES ('lost')").await.unwrap();
    let PostmasterState::Running { pid, .. } = a.status() else {
        panic!("a not running")
    };
    assert!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0);
    wait_until("old primary gone", Duration::from_secs(10), || async {
        matches!(a.status(), PostmasterState::Dead { .. })
    })
    .await;

    // pg_rewind copies the new primary's files, its synchronous standbys
    // included; the rejoined replica must not carry them.
    let on_b = b
        .apply_synchronous_standbys(&SyncSpec {
            k: 1,
            names: vec!["c".into()],
        })
        .await
        .unwrap();
    assert_eq!(on_b.rendered, r#"ANY 1 ("c")"#);

    // A member still in recovery is no upstream to rejoin: rewinding against it would find
    // no fork, and `a` would stay ahead of the timeline the member later forks.
    let refused = a.rejoin_as_replica(&c.as_upstream()).await.unwrap_err();
    assert!(
        matches!(refused, SupervisorError::UpstreamNotPrimary { .. }),
        "{refused}"
    );
    assert!(
        matches!(a.status(), PostmasterState::Dead { .. }),
        "a refused rejoin leaves the data directory alone"
    );

    let rejoin = a.rejoin_as_replica(&b_up).await.unwrap();
    let names = sql(&a_up, "SHOW synchronous_standby_names").await.unwrap();
    assert_eq!(names[0].get::<_, String>(0), "", "rewind kept b's names");
    eprintln!(
        "FIGURE rewind_ms={} (pg_rewind incl. its crash recovery; whole rejoin until streaming: {} ms)",
        rejoin.rewind_ms, rejoin.elapsed_ms
    );
    assert_eq!(rejoin.method, RejoinMethod::Rewound, "{rejoin:?}");
    sql(&b_up, "INSERT INTO t VALUES ('four')").await.unwrap();
    wait_for_row(&a_up, "four").await;
    let obs_a = a.observe().await;
    assert_eq!(obs_a.role, Some(Role::Replica));
    assert_eq!(obs_a.wal_receiver.unwrap().sender_port, Some(b_up.port));
    let lost = sql(&a_up, "SELECT count(*) FROM t WHERE v = 'lost'")
        .await
        .unwrap();
    assert_eq!(
        lost[0].get::<_, i64>(0),
        0,
        "diverged row must be rewound away"
    );
    assert!(
        a.replication_slots().await.unwrap().is_empty(),
        "stale slots kept"
    );

    for n in [&mut a, &mut b, &mut c] {
        assert!(n.fence().await.unwrap().verified_gone);
    }
}

/// When pg_rewind cannot work (the old primary lost its WAL), rejoin
/// re-clones into a fresh directory and swaps it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_reclones_when_rewind_is_impossible() {
    let dir = test_dir();
    let mut a = started_primary(dir.path(), "a").await;
    let a_up = a.as_upstream();
    let mut b = started_replica(dir.path(), "b", &a_up).await;
    sql(&a_up, "INSERT INTO t VALUES ('one')").await.unwrap();
    wait_for_row(&b.as_upstream(), "one").await;
    b.feed_lease(long_lease()).await.unwrap();
    b.promote().await.unwrap();
    let b_up = b.as_upstream();
    sql(&a_up, "INSERT INTO t VALUES ('lost')").await.unwrap();
    a.fence().await.unwrap();

    // Losing pg_wal makes both crash recovery and pg_rewind impossible.
    let wal = a.config().data_dir.join("pg_wal");
    for e in std::fs::read_dir(&wal).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::remove_file(p).unwrap();
        }
    }
    let sysid = b.observe().await.system_identifier.unwrap();

    let rejoin = a.rejoin_as_replica(&b_up).await.unwrap();
    eprintln!(
        "FIGURE reclone_ms={} (failed rewind {} ms, then pg_basebackup + start + streaming)",
        rejoin.elapsed_ms, rejoin.rewind_ms
    );
    assert_eq!(rejoin.method, RejoinMethod::Recloned, "{rejoin:?}");
    assert!(rejoin.rewind_error.is_some());
    assert!(!a.data_dir().sibling(".pgq-reclone").exists());
    assert_eq!(a.system_identifier().await.unwrap(), sysid);
    sql(&b_up, "INSERT INTO t VALUES ('two')").await.unwrap();
    wait_for_row(&a_up, "two").await;
    let lost = sql(&a_up, "SELECT count(*) FROM t WHERE v = 'lost'")
        .await
        .unwrap();
    assert_eq!(lost[0].get::<_, i64>(0), 0);

    for n in [&mut a, &mut b] {
        n.fence().await.unwrap();
    }
}

/// A replica's observation carries evidence that cannot go stale: the age
/// of the last message from its upstream, computed on the replica's own
/// clock when the probe runs, and what it has flushed. A primary reports
/// the synchronous_standby_names in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observation_carries_receipt_age_and_flushed_lsn() {
    let dir = test_dir();
    let mut a = started_primary(dir.path(), "a").await;
    let a_up = a.as_upstream();
    let mut b = started_replica(dir.path(), "b", &a_up).await;
    sql(&a_up, "INSERT INTO t VALUES ('one')").await.unwrap();
    let written = a.observe().await.current_lsn.unwrap();
    assert_eq!(
        a.observe().await.synchronous_standby_names.as_deref(),
        Some("")
    );
    wait_until(
        "replica flushed the write",
        Duration::from_secs(30),
        || async {
            let obs = b.observe().await;
            obs.synchronous_standby_names.is_none()
                && matches!(&obs.wal_receiver, Some(w)
                if w.flushed_lsn.is_some_and(|f| f >= written)
                    && w.last_msg_receipt_age_ms.is_some_and(|age| age < 4000))
        },
    )
    .await;

    // Silence the primary's WAL sender: the age keeps growing, probe
    // after probe, with no new message to refresh it.
    let rows = sql(
        &a_up,
        "SELECT pid FROM pg_stat_replication WHERE application_name = 'b'",
    )
    .await
    .unwrap();
    let walsender: i32 = rows[0].get(0);
    assert!(unsafe { libc::kill(walsender, libc::SIGSTOP) } == 0);
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut ages = Vec::new();
    loop {
        let age = b
            .observe()
            .await
            .wal_receiver
            .and_then(|w| w.last_msg_receipt_age_ms);
        ages.push(age);
        if age.is_some_and(|a| a >= 1500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "receipt age did not grow: {ages:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unsafe { libc::kill(walsender, libc::SIGCONT) } == 0);
    eprintln!("FIGURE receipt ages while the WAL sender was stopped: {ages:?}");

    for n in [&mut a, &mut b] {
        assert!(n.fence().await.unwrap().verified_gone);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probing_an_idle_primary_keeps_its_replicas_hearing_from_it() {
    // With nobody writing, a replica hears nothing from its primary for seconds (keepalives
    // only flow when the sender misses replies), so a silent cut and an idle primary would
    // look alike. The primary's probe writes a heartbeat, and the receipt age stays low.
    let dir = test_dir();
    let mut a = started_primary(dir.path(), "a").await;
    let a_up = a.as_upstream();
    let mut b = started_replica(dir.path(), "b", &a_up).await;
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut ages = Vec::new();
    let mut write_ms = Vec::new();
    while Instant::now() < deadline {
        let p = a.observe().await;
        write_ms.push(p.write_probe.as_ref().map_or(0, |w| w.ms));
        let write = p
            .write_probe
            .as_ref()
            .expect("a primary's observation has a write probe");
        assert!(write.check.is_ok(), "{write:?}");
        assert!(
            p.data_fs.is_some_and(|s| s.free_bytes > 0),
            "{:?}",
            p.data_fs
        );
        let age = b
            .observe()
            .await
            .wal_receiver
            .and_then(|w| w.last_msg_receipt_age_ms);
        ages.push(age);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The first seconds may predate the first heartbeat; the last ones may not.
    let recent = &ages[ages.len() - 4..];
    assert!(
        recent.iter().all(|a| a.is_some_and(|ms| ms < 1_000)),
        "receipt ages while the primary is probed: {ages:?}"
    );
    eprintln!("FIGURE receipt ages on an idle, probed primary: {ages:?}");
    write_ms.sort_unstable();
    eprintln!(
        "FIGURE write probe ms per tick (debug build, heartbeat flush + data file write): \
         median {} max {} of {write_ms:?}",
        write_ms[write_ms.len() / 2],
        write_ms[write_ms.len() - 1]
    );
    for n in [&mut a, &mut b] {
        assert!(n.fence().await.unwrap().verified_gone);
    }
}
