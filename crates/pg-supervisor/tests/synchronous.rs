//! Synchronous standbys applied, confirmed and reset, with real PostgreSQL.

mod harness;

use std::time::Duration;

use harness::*;
use pg_supervisor::{Lsn, StopMode, SyncSpec, Upstream};

/// `synchronous_standby_names` as a fresh session on `target` sees it.
async fn sync_names(target: &Upstream) -> String {
    sql(target, "SHOW synchronous_standby_names").await.unwrap()[0].get(0)
}

/// Quorum commit on one standby: writes commit while it streams, block
/// while it is down, and go through once the spec is emptied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_standbys_block_writes_until_released() {
    let dir = test_dir();
    let mut a = started_primary(dir.path(), "a").await;
    let a_up = a.as_upstream();
    let mut b = started_replica(dir.path(), "b", &a_up).await;

    let spec = SyncSpec {
        k: 1,
        names: vec!["b".into()],
    };
    let applied = a.apply_synchronous_standbys(&spec).await.unwrap();
    assert_eq!(applied.rendered, r#"ANY 1 ("b")"#);
    assert!(applied.switch_lsn > Lsn(0), "{applied:?}");
    assert_eq!(sync_names(&a_up).await, applied.rendered);
    tokio::time::timeout(
        Duration::from_secs(10),
        sql(&a_up, "INSERT INTO t VALUES ('synced')"),
    )
    .await
    .expect("a synchronous write with its standby up must commit")
    .unwrap();
    let obs = a.observe().await;
    assert_eq!(
        obs.synchronous_standby_names.as_deref(),
        Some(applied.rendered.as_str())
    );
    let standby = obs.standbys.iter().find(|s| s.name == "b");
    assert_eq!(
        standby.map(|s| s.sync_state.as_str()),
        Some("quorum"),
        "{obs:?}"
    );
    assert!(obs.current_lsn.unwrap() > applied.switch_lsn);

    // Without its standby the primary cannot acknowledge a commit.
    b.stop(StopMode::Fast, Duration::from_secs(30))
        .await
        .unwrap();
    let mut blocked = tokio::spawn({
        let up = a_up.clone();
        async move { sql(&up, "INSERT INTO t VALUES ('blocked')").await }
    });
    let early = tokio::time::timeout(Duration::from_secs(2), &mut blocked).await;
    assert!(
        early.is_err(),
        "write returned without its standby: {early:?}"
    );
    wait_until(
        "commit waiting for SyncRep",
        Duration::from_secs(5),
        || async {
            sql(
                &a_up,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
            )
            .await
            .map(|r| r[0].get::<_, i64>(0) == 1)
            .unwrap_or(false)
        },
    )
    .await;

    // Emptying the spec releases the waiting commit and later ones.
    let applied = a
        .apply_synchronous_standbys(&SyncSpec::asynchronous())
        .await
        .unwrap();
    assert_eq!(applied.rendered, "");
    let released = tokio::time::timeout(Duration::from_secs(10), blocked).await;
    assert!(matches!(released, Ok(Ok(Ok(_)))), "{released:?}");
    tokio::time::timeout(
        Duration::from_secs(10),
        sql(&a_up, "INSERT INTO t VALUES ('async')"),
    )
    .await
    .expect("an asynchronous write must commit")
    .unwrap();
    let rows = sql(&a_up, "SELECT count(*) FROM t").await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 3);
    assert_eq!(
        a.observe().await.synchronous_standby_names.as_deref(),
        Some("")
    );

    for n in [&mut a, &mut b] {
        assert!(n.fence().await.unwrap().verified_gone);
    }
}

/// A clone copies the primary's files, synchronous standbys included; the
/// replica must start asynchronous, and a spec applied to it (before a
/// promotion) is confirmed although it has no effect yet. A primary keeps
/// its spec across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_start_asynchronous_and_replicas_take_a_spec() {
    let dir = test_dir();
    let mut a = started_primary(dir.path(), "a").await;
    let a_up = a.as_upstream();
    let spec = SyncSpec {
        k: 1,
        names: vec!["b".into(), "c".into()],
    };
    let on_a = a.apply_synchronous_standbys(&spec).await.unwrap();
    a.restart().await.unwrap();
    assert_eq!(sync_names(&a_up).await, on_a.rendered);

    let mut c = started_replica(dir.path(), "c", &a_up).await;
    let c_up = c.as_upstream();
    assert_eq!(
        sync_names(&c_up).await,
        "",
        "clone kept the primary's names"
    );

    let before_promotion = SyncSpec {
        k: 1,
        names: vec!["a".into()],
    };
    let on_c = c
        .apply_synchronous_standbys(&before_promotion)
        .await
        .unwrap();
    assert_eq!(on_c.rendered, r#"ANY 1 ("a")"#);
    assert_eq!(sync_names(&c_up).await, on_c.rendered);
    assert_eq!(c.observe().await.synchronous_standby_names, None);

    for n in [&mut a, &mut c] {
        assert!(n.fence().await.unwrap().verified_gone);
    }
}
