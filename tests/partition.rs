//! The partition suite: named scenarios of network cuts, latency, bandwidth limits, crashes and
//! freezes, each on a fresh cluster with real PostgreSQL, real sidecars and a client workload,
//! judged by the checkers `single_writer`, `no_lost_writes` and `converges` (see `chaos/mod.rs`).
//!
//! Every scenario that a plain cut can express runs on both backends (`<scenario>::netns`:
//! network namespaces and nftables, root only, skipped with a printed reason otherwise, and
//! failing instead under `CI=true`;
//! `<scenario>::toxiproxy`: one Toxiproxy proxy per directed link on loopback, anywhere).
//! Latency, bandwidth and refused connections need the proxies and run on Toxiproxy only.
//!
//! Each scenario prints a `REPORT` line (failovers, write outage, writes acknowledged and lost,
//! moments with two writers) and appends it to `partition-report.txt` in the test build's
//! scratch directory. A failing scenario prints its timeline and seed;
//! `PGQUORUM_PARTITION_SEED` replays the random choices. The randomized soak run is
//! `soak::random_nemesis` (ignored by default; see its doc).
//!
//! The clusters run the product defaults: `synchronous_mode = on`, a 2.5 s lease, 250 ms ticks.

#[path = "chaos/mod.rs"]
mod chaos;
#[path = "harness/mod.rs"]
mod harness;
// The bench's partition fault uses the same namespaces; one copy serves both.
#[path = "../crates/cli/src/netns.rs"]
mod netns;

use std::time::{Duration, Instant};

use chaos::net::Link;
use chaos::{Backend, Expect, Sut, FAILOVER};
use harness::wait_for;
use harness::workload::topology;
use netns::Netns;
use raft_node::proto;
use rand::Rng;

/// Generates `<scenario>::<backend>` tests that run `async fn <scenario>(Backend)`: those in the
/// first list form the default set (CI), those in the second the extended set, ignored by
/// default so that CI stays within its time (`--include-ignored` runs them; see
/// docs/partition-suite.md).
macro_rules! scenario {
    ($name:ident, [$($backend:ident),*], [$($extended:ident),*]) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    super::$name(super::backend(stringify!($backend))).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "extended partition set: run with --include-ignored"]
                async fn $extended() {
                    super::$name(super::backend(stringify!($extended))).await;
                }
            )*
        }
    };
}

fn backend(name: &str) -> Backend {
    match name {
        "netns" => Backend::Netns,
        _ => Backend::Toxiproxy,
    }
}

/// How long a cut is held: long enough for a failover, a write acknowledged by the new primary,
/// and for the checker to watch the old primary, still reachable by clients, stay unwritable.
const HOLD: Duration = Duration::from_secs(12);

/// Sleeps until `at`. Not a synchronisation: a fault is held for a set time while the
/// checkers watch.
async fn hold_until(at: Instant) {
    tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
}

/// The Raft leader of the majority side `via`, as each of those members sees it.
async fn leader_among(s: &Sut, via: &[u64]) -> Option<u64> {
    let mut views = Vec::new();
    for id in via {
        views.push(s.c.status(*id).await?.leader_id);
    }
    (via.contains(&views[0]) && views.iter().all(|l| *l == views[0])).then_some(views[0])
}

/// Waits until the side `via` names a primary other than `old`; returns it.
async fn promoted_among(s: &Sut, via: &[u64], old: u64) -> u64 {
    wait_for("a new primary on the majority side", FAILOVER, || async {
        let t = s.topology_via(via).await?;
        t.primary.map(|p| p.node_id).filter(|id| *id != old)
    })
    .await
}

/// Makes member `target` the Raft leader: with `leader_handoff` off, asks it to stand for
/// election on the current leader's behalf (the hand-off RPC) until it leads.
async fn make_leader(s: &Sut, target: u64) {
    s.c.set_config("leader_handoff", "false")
        .await
        .expect("leader_handoff = false");
    wait_for("the primary's node leads Raft", FAILOVER, || async {
        let leader = s.c.wait_leader(FAILOVER).await;
        if leader == target {
            return Some(());
        }
        let term = s.c.status(leader).await?.term;
        let addr = &s.c.nodes[&target].addr;
        // The hand-off is the leader's own message: sent with the leader's certificate.
        let ch = harness::channel(addr, &harness::pki().node_tls(leader)).await?;
        let mut client = proto::raft_transport_client::RaftTransportClient::new(ch);
        let ask = serde_json::json!({ "from": leader, "term": term }).to_string();
        let _ = client
            .take_leadership(proto::RaftMessage {
                payload: ask.into_bytes(),
            })
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        None
    })
    .await;
}

/// Waits until `leader_handoff` (on by default) has moved Raft leadership off the primary's
/// node; returns the leader.
async fn leader_apart_from(s: &Sut, primary: u64) -> u64 {
    wait_for("a Raft leader apart from the primary", FAILOVER, || async {
        let l = s.c.wait_leader(FAILOVER).await;
        (l != primary).then_some(l)
    })
    .await
}

/// How the primary is cut from each other member.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Nothing passes either way.
    BothWays,
    /// The primary's packets are dropped; the others' still reach it.
    FromPrimary,
    /// Packets to the primary are dropped; its own still leave.
    ToPrimary,
}

/// The primary is cut from both other members for [`HOLD`], then the network heals. The
/// majority side promotes a member holding every acknowledged write; the old primary, still
/// reachable by clients, never writes meanwhile and comes back as a replica.
async fn isolate_the_primary(backend: Backend, label: &str, cut: Cut, leading: bool) {
    let Some(mut s) = Sut::new(backend, 3, label).await else {
        return;
    };
    let run = s.start().await;
    let old = run.primary;
    let leader = if leading {
        make_leader(&s, old).await;
        old
    } else {
        leader_apart_from(&s, old).await
    };
    let majority = s.others(old);
    let at = s.fault(format!(
        "cut {cut:?} between primary {old} and {majority:?} (Raft leader {leader})"
    ));
    for other in &majority {
        match cut {
            Cut::BothWays => s.net.cut(old, *other, Link::All).await,
            Cut::FromPrimary => s.net.cut_one_way(old, *other, Link::All).await,
            Cut::ToPrimary => s.net.cut_one_way(*other, old, Link::All).await,
        }
    }
    let new = promoted_among(&s, &majority, old).await;
    s.timeline.note(format!(
        "promoted {new} {} ms after the cut",
        at.elapsed().as_millis()
    ));
    let promoted_at = Instant::now();
    wait_for(
        "a write acknowledged by the new primary",
        FAILOVER,
        || async { run.writer.acked_after(promoted_at).then_some(()) },
    )
    .await;
    hold_until(at + HOLD).await;
    let r = s.finish(run, Expect::new(1..=1, at)).await;
    assert!(r.outage_ms > 0);
}

async fn primary_isolated_while_leading_raft(b: Backend) {
    isolate_the_primary(
        b,
        "primary_isolated_while_leading_raft",
        Cut::BothWays,
        true,
    )
    .await;
}
scenario!(primary_isolated_while_leading_raft, [netns, toxiproxy], []);

async fn primary_isolated_not_leading_raft(b: Backend) {
    isolate_the_primary(b, "primary_isolated_not_leading_raft", Cut::BothWays, false).await;
}
scenario!(primary_isolated_not_leading_raft, [netns, toxiproxy], []);

async fn one_way_cut_from_the_primary(b: Backend) {
    isolate_the_primary(b, "one_way_cut_from_the_primary", Cut::FromPrimary, false).await;
}
scenario!(one_way_cut_from_the_primary, [netns, toxiproxy], []);

async fn one_way_cut_to_the_primary(b: Backend) {
    isolate_the_primary(b, "one_way_cut_to_the_primary", Cut::ToPrimary, false).await;
}
scenario!(one_way_cut_to_the_primary, [netns, toxiproxy], []);

/// The Raft leader, not the primary's node, is cut off for 10 s: the other side elects a leader
/// of its own, keeps the same primary in the same epoch, and writes go on.
async fn raft_leader_isolated_keeps_the_primary(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "raft_leader_isolated_keeps_the_primary").await else {
        return;
    };
    let run = s.start().await;
    let primary = run.primary;
    let leader = leader_apart_from(&s, primary).await;
    let epoch = topology(&s.c).await.primary.map(|p| p.epoch);
    let majority = s.others(leader);
    let at = s.fault(format!("cut Raft leader {leader} from {majority:?}"));
    for other in &majority {
        s.net.cut(leader, *other, Link::All).await;
    }
    let heal_at = at + Duration::from_secs(10);
    let mut answers = 0;
    let mut new_leader = None;
    while Instant::now() < heal_at {
        if let Some(t) = s.topology_via(&majority).await {
            assert_eq!(
                t.primary.as_ref().map(|p| (p.node_id, p.epoch)),
                Some((primary, epoch.expect("an epoch"))),
                "the primary moved while only the Raft leader was cut off"
            );
            answers += 1;
        }
        if new_leader.is_none() {
            new_leader = leader_among(&s, &majority).await;
            if let Some(l) = new_leader {
                s.timeline.note(format!(
                    "leader {l} elected on the majority side {} ms after the cut",
                    at.elapsed().as_millis()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        answers > 0,
        "the majority side never answered during the cut"
    );
    assert!(
        new_leader.is_some(),
        "the majority side elected no leader of its own during the cut"
    );
    let resumed = run.writer.acked_after(at + Duration::from_secs(5));
    assert!(
        resumed,
        "no write acknowledged in the second half of the cut"
    );
    s.finish(run, Expect::new(0..=0, at)).await;
}
scenario!(
    raft_leader_isolated_keeps_the_primary,
    [netns, toxiproxy],
    []
);

/// Five members split 2/3 with the primary and an asynchronous replica on the small side: the
/// three promote their synchronous standby; the two cannot write.
async fn five_members_split_two_three(b: Backend) {
    let Some(mut s) = Sut::new(b, 5, "five_members_split_two_three").await else {
        return;
    };
    let run = s.start().await;
    let old = run.primary;
    let sync = topology(&s.c)
        .await
        .sync
        .map(|y| y.members)
        .unwrap_or_default();
    let partner = s
        .others(old)
        .into_iter()
        .find(|id| !sync.contains(id))
        .expect("an asynchronous replica");
    let minority = [old, partner];
    let majority: Vec<u64> = s
        .others(old)
        .into_iter()
        .filter(|id| *id != partner)
        .collect();
    let at = s.fault(format!(
        "split {minority:?} | {majority:?} (synchronous set {sync:?})"
    ));
    s.net.split(&[&minority, &majority]).await;
    let new = promoted_among(&s, &majority, old).await;
    s.timeline.note(format!("promoted {new}"));
    let promoted_at = Instant::now();
    wait_for(
        "a write acknowledged by the new primary",
        FAILOVER,
        || async { run.writer.acked_after(promoted_at).then_some(()) },
    )
    .await;
    hold_until(at + HOLD).await;
    s.finish(run, Expect::new(1..=1, at)).await;
}
scenario!(five_members_split_two_three, [], [netns, toxiproxy]);

/// Five members split 2/2/1: no side has a majority, so nobody may be promoted and the primary
/// must stop writing once its lease lapses. After the heal one primary serves again.
async fn five_members_split_two_two_one(b: Backend) {
    let Some(mut s) = Sut::new(b, 5, "five_members_split_two_two_one").await else {
        return;
    };
    let run = s.start().await;
    let old = run.primary;
    let rest = s.others(old);
    let groups: [&[u64]; 3] = [&[old, rest[0]], &[rest[1], rest[2]], &[rest[3]]];
    let at = s.fault(format!("split {groups:?}"));
    s.net.split(&groups).await;
    // Once the lease has lapsed (2.5 s and the margins), nothing may be acknowledged.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet_from = Instant::now();
    hold_until(at + HOLD).await;
    assert!(
        !run.writer.acked_after(quiet_from),
        "a write was acknowledged while no side had a majority"
    );
    s.finish(run, Expect::new(0..=1, at)).await;
}
scenario!(five_members_split_two_two_one, [], [netns, toxiproxy]);

/// The primary's links go down and up every 150–600 ms (seeded) for 30 s.
async fn flapping_primary_links(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "flapping_primary_links").await else {
        return;
    };
    let run = s.start().await;
    let old = run.primary;
    let at = s.fault(format!("primary {old}'s links flap for 30 s"));
    let end = at + Duration::from_secs(30);
    let mut flaps = 0;
    while Instant::now() < end {
        // Whoever is primary now is the one whose links flap.
        let p = topology(&s.c)
            .await
            .primary
            .map(|p| p.node_id)
            .unwrap_or(old);
        for other in s.others(p) {
            s.net.cut(p, other, Link::All).await;
        }
        let down = s.rng.gen_range(150..600);
        tokio::time::sleep(Duration::from_millis(down)).await;
        s.net.heal().await;
        let up = s.rng.gen_range(150..600);
        tokio::time::sleep(Duration::from_millis(up)).await;
        flaps += 1;
    }
    s.timeline.note(format!("{flaps} flaps"));
    // Any number of failovers is allowed; the checkers judge them. The report counts them.
    s.finish(run, Expect::new(0..=usize::MAX, at)).await;
}
scenario!(flapping_primary_links, [netns, toxiproxy], []);

/// The replication links from the primary are cut both ways for 15 s while every sidecar still
/// reaches every other: no failover (the primary is healthy and holds its lease); with
/// `synchronous_mode = on` the leader commits asynchronous replication, and writes resume.
async fn replication_links_cut(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "replication_links_cut").await else {
        return;
    };
    let run = s.start().await;
    let primary = run.primary;
    let at = s.fault(format!(
        "cut Postgres links of primary {primary}, Raft links up"
    ));
    for other in s.others(primary) {
        s.net.cut(primary, other, Link::Postgres).await;
    }
    let end = at + Duration::from_secs(15);
    hold_until(end).await;
    assert!(
        run.writer.acked_after(end - Duration::from_secs(5)),
        "no write acknowledged in the last 5 s of the replication cut"
    );
    s.finish(run, Expect::new(0..=0, at)).await;
}
scenario!(replication_links_cut, [netns, toxiproxy], []);

/// The primary's sidecar freezes (SIGSTOP) for 8 s while one replica is cut from everyone: no
/// side has two live members, so nobody is promoted and the guard fences the primary. After the
/// thaw and the heal one primary serves.
async fn sidecar_frozen_while_a_replica_is_cut(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "sidecar_frozen_while_a_replica_is_cut").await else {
        return;
    };
    let run = s.start().await;
    let primary = run.primary;
    let others = s.others(primary);
    let cut = others[0];
    let at = s.fault(format!(
        "cut replica {cut} from everyone, then SIGSTOP primary {primary}'s sidecar for 8 s"
    ));
    for other in s.others(cut) {
        s.net.cut(cut, other, Link::All).await;
    }
    s.c.signal_sidecar(primary, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(8)).await;
    s.c.signal_sidecar(primary, libc::SIGCONT);
    s.fault(format!("SIGCONT primary {primary}'s sidecar"));
    hold_until(at + HOLD).await;
    s.finish(run, Expect::new(0..=1, at)).await;
}
scenario!(
    sidecar_frozen_while_a_replica_is_cut,
    [netns, toxiproxy],
    []
);

/// The Raft leader (not the primary's node) is cut off, then the primary's postmaster is
/// killed (-9): the majority side's new leader, or the sidecar's restart, brings back one
/// primary; nothing acknowledged is lost.
async fn postmaster_killed_while_the_leader_is_cut(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "postmaster_killed_while_the_leader_is_cut").await else {
        return;
    };
    let run = s.start().await;
    let primary = run.primary;
    let leader = leader_apart_from(&s, primary).await;
    let at = s.fault(format!(
        "cut Raft leader {leader} from everyone, then kill -9 primary {primary}'s postmaster"
    ));
    for other in s.others(leader) {
        s.net.cut(leader, other, Link::All).await;
    }
    let pid = s.c.postmaster_pid(primary).expect("postmaster pid");
    // SAFETY: killing the test's own Postgres.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("a write acknowledged after the kill", FAILOVER, || async {
        run.writer
            .acked_after(at + Duration::from_secs(1))
            .then_some(())
    })
    .await;
    hold_until(at + HOLD).await;
    s.finish(run, Expect::new(0..=1, at)).await;
}
scenario!(
    postmaster_killed_while_the_leader_is_cut,
    [netns, toxiproxy],
    []
);

/// Every member's sidecar is restarted in turn (SIGTERM, start), replicas first, under load:
/// at most the primary's restart moves the primary; nothing acknowledged is lost.
async fn rolling_restart(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "rolling_restart").await else {
        return;
    };
    let run = s.start().await;
    let primary = run.primary;
    let mut order = s.others(primary);
    order.push(primary);
    let at = s.fault(format!("rolling restart, in order {order:?}"));
    for id in order {
        s.fault(format!("restart member {id}"));
        s.c.stop(id);
        s.c.start(id);
        chaos::converges(&s.c).await;
    }
    s.finish(run, Expect::new(0..=1, at)).await;
}
scenario!(rolling_restart, [netns, toxiproxy], []);

/// Latency on every link of the primary, each way, far below what a lease renewal can absorb:
/// writes slow down, nothing fails over.
async fn latency_below_the_lease(b: Backend) {
    latency_on_the_primary(b, "latency_below_the_lease", 50, 0..=0).await;
}
scenario!(latency_below_the_lease, [toxiproxy], []);

/// Latency on every link of the primary, each way, above the lease (a round trip takes longer
/// than the lease lasts): the primary cannot renew and is replaced, once.
async fn latency_above_the_lease(b: Backend) {
    latency_on_the_primary(b, "latency_above_the_lease", 1_500, 1..=1).await;
}
scenario!(latency_above_the_lease, [toxiproxy], []);

async fn latency_on_the_primary(
    b: Backend,
    label: &str,
    ms: u64,
    failovers: std::ops::RangeInclusive<usize>,
) {
    let Some(mut s) = Sut::new(b, 3, label).await else {
        return;
    };
    let run = s.start().await;
    let primary = run.primary;
    leader_apart_from(&s, primary).await;
    let at = s.fault(format!(
        "{ms} ms latency each way on every link of primary {primary}"
    ));
    let toxi = s.net.toxi().expect("proxies");
    for other in s.others(primary) {
        toxi.latency_one_way(primary, other, ms).await;
        toxi.latency_one_way(other, primary, ms).await;
    }
    hold_until(at + Duration::from_secs(15)).await;
    s.finish(run, Expect::new(failovers, at)).await;
}

/// Every proxy into and out of the primary is disabled: its peers get refused and closed
/// connections (as when a host's services die) instead of silence. One failover.
async fn primary_links_refused(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "primary_links_refused").await else {
        return;
    };
    let run = s.start().await;
    let old = run.primary;
    leader_apart_from(&s, old).await;
    let at = s.fault(format!("disable every proxy of primary {old}"));
    s.net.toxi().expect("proxies").disable_member(old).await;
    let majority = s.others(old);
    let new = promoted_among(&s, &majority, old).await;
    s.timeline.note(format!("promoted {new}"));
    hold_until(at + HOLD).await;
    s.finish(run, Expect::new(1..=1, at)).await;
}
scenario!(primary_links_refused, [toxiproxy], []);

/// The WAL stream to both replicas is limited to 64 KB/s while a second writer pushes ~1 KB
/// rows as fast as commits return; then the primary's host crashes. Synchronous mode holds:
/// the promoted member has every acknowledged write.
async fn bandwidth_limited_wal_then_primary_crash(b: Backend) {
    let Some(mut s) = Sut::new(b, 3, "bandwidth_limited_wal_then_primary_crash").await else {
        return;
    };
    let run = s.start().await;
    let old = run.primary;
    leader_apart_from(&s, old).await;
    let at = s.fault(format!(
        "WAL from primary {old} limited to 64 KB/s per replica"
    ));
    let toxi = s.net.toxi().expect("proxies");
    for other in s.others(old) {
        toxi.bandwidth_one_way(old, other, 64).await;
    }
    let bulk = BulkWriter::start(s.client_url("read-write")).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let lag = topology(&s.c).await;
    s.timeline.note(format!(
        "lag before the crash: {:?}",
        lag.members
            .iter()
            .map(|m| (m.id, m.lag_bytes))
            .collect::<Vec<_>>()
    ));
    s.c.crash_host(old);
    s.fault(format!("crash primary {old}'s host"));
    let new = promoted_among(&s, &s.others(old), old).await;
    s.timeline.note(format!("promoted {new}"));
    let bulk_acked = bulk.stop().await;
    s.c.start(old);
    let r = s.finish(run, Expect::new(1..=1, at)).await;
    let missing = harness::workload::missing_on(&s.c, new, &bulk_acked).await;
    // Bulk rows are numbered from 1_000_000 so they never collide with the writer's.
    assert!(
        missing.is_empty(),
        "no_lost_writes: bulk rows lost: {} of {}",
        missing.len(),
        bulk_acked.len()
    );
    eprintln!(
        "bulk rows acknowledged: {}; report: {} lost",
        bulk_acked.len(),
        r.lost
    );
}
scenario!(bandwidth_limited_wal_then_primary_crash, [toxiproxy], []);

/// Like the scenario above with `synchronous_mode = off` and `maximum_lag_on_failover` at
/// 64 KB: both replicas lag further than that when the primary crashes, so nobody is promoted
/// until the old primary is back; with `off` that is the only way to lose nothing.
async fn bandwidth_limited_wal_async_respects_maximum_lag(b: Backend) {
    let label = "bandwidth_limited_wal_async_respects_maximum_lag";
    let Some(mut s) = Sut::new(b, 3, label).await else {
        return;
    };
    let run = s.start().await;
    let old = run.primary;
    leader_apart_from(&s, old).await;
    s.c.set_config("synchronous_mode", "off")
        .await
        .expect("off");
    s.c.set_config("maximum_lag_on_failover", "65536")
        .await
        .expect("maximum_lag_on_failover");
    let at = s.fault(format!(
        "WAL from primary {old} limited to 16 KB/s per replica"
    ));
    let toxi = s.net.toxi().expect("proxies");
    for other in s.others(old) {
        toxi.bandwidth_one_way(old, other, 16).await;
    }
    let bulk = BulkWriter::start(s.client_url("read-write")).await;
    wait_for("both replicas lag more than 64 KB", FAILOVER, || async {
        let t = topology(&s.c).await;
        let lagging = t
            .members
            .iter()
            .filter(|m| m.id != old && m.lag_bytes > 2 * 65_536)
            .count();
        (lagging == 2).then_some(())
    })
    .await;
    s.c.crash_host(old);
    s.fault(format!("crash primary {old}'s host"));
    let bulk_acked = bulk.stop().await;
    // Twice the time a failover takes: nobody may be promoted.
    let quiet_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < quiet_until {
        if let Some(t) = s.topology_via(&s.others(old)).await {
            assert_eq!(
                t.primary.map(|p| p.node_id),
                Some(old),
                "a replica lagging past maximum_lag_on_failover was promoted"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    s.c.start(old);
    s.finish(run, Expect::new(0..=0, at)).await;
    let missing = harness::workload::missing_on(&s.c, old, &bulk_acked).await;
    assert!(missing.is_empty(), "bulk rows lost: {}", missing.len());
}
scenario!(
    bandwidth_limited_wal_async_respects_maximum_lag,
    [toxiproxy],
    []
);

/// The soak run: random faults (cuts of every shape, splits, replication cuts, frozen
/// sidecars, killed postmasters, host crashes, and with Toxiproxy latency and refused links),
/// each held 2–15 s, then healed until the cluster converges, for a set time; the checkers
/// judge the whole run. Ignored by default:
///
/// ```sh
/// PGQUORUM_NEMESIS=random PGQUORUM_DURATION=10m PGQUORUM_BACKEND=toxiproxy \
///   cargo test -p pgquorum-cli --test partition soak -- --ignored --nocapture
/// ```
///
/// `PGQUORUM_MEMBERS` (3 or 5, default 3) sizes the cluster, `PGQUORUM_PARTITION_SEED` replays.
async fn random_nemesis() {
    let nemesis = std::env::var("PGQUORUM_NEMESIS").unwrap_or_else(|_| "random".into());
    assert_eq!(nemesis, "random", "PGQUORUM_NEMESIS: only `random` exists");
    let duration = std::env::var("PGQUORUM_DURATION")
        .ok()
        .map(|d| {
            parse_duration(&d)
                .unwrap_or_else(|| panic!("PGQUORUM_DURATION: '{d}' is not like 90s, 10m or 1h"))
        })
        .unwrap_or(Duration::from_secs(120));
    let b = backend(&std::env::var("PGQUORUM_BACKEND").unwrap_or_else(|_| "toxiproxy".into()));
    let n = std::env::var("PGQUORUM_MEMBERS")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3u64);
    let Some(mut s) = Sut::new(b, n, "soak_random_nemesis").await else {
        return;
    };
    let run = s.start().await;
    let at = s.fault(format!("random nemesis for {duration:?}"));
    let mut rounds = 0;
    while at.elapsed() < duration {
        rounds += 1;
        let ids: Vec<u64> = s.c.nodes.keys().copied().collect();
        let primary = topology(&s.c)
            .await
            .primary
            .map(|p| p.node_id)
            .unwrap_or(ids[0]);
        let a = ids[s.rng.gen_range(0..ids.len())];
        let b2 = loop {
            let b2 = ids[s.rng.gen_range(0..ids.len())];
            if b2 != a {
                break b2;
            }
        };
        let toxi = s.net.toxi().is_some();
        let mut restart = None;
        let mut thaw = None;
        match s.rng.gen_range(0..if toxi { 10 } else { 8 }) {
            0 => {
                s.fault(format!("isolate member {a}"));
                for o in s.others(a) {
                    s.net.cut(a, o, Link::All).await;
                }
            }
            1 => {
                s.fault(format!("one-way cut {a} -> {b2}"));
                s.net.cut_one_way(a, b2, Link::All).await;
            }
            2 => {
                let mut shuffled = ids.clone();
                for i in (1..shuffled.len()).rev() {
                    let j = s.rng.gen_range(0..=i);
                    shuffled.swap(i, j);
                }
                let k = s.rng.gen_range(1..shuffled.len());
                let (x, y) = shuffled.split_at(k);
                s.fault(format!("split {x:?} | {y:?}"));
                s.net.split(&[x, y]).await;
            }
            3 => {
                s.fault(format!("cut the Postgres links of primary {primary}"));
                for o in s.others(primary) {
                    s.net.cut(primary, o, Link::Postgres).await;
                }
            }
            4 => {
                s.fault(format!("cut the Raft links of member {a}"));
                for o in s.others(a) {
                    s.net.cut(a, o, Link::Raft).await;
                }
            }
            5 => {
                s.fault(format!("SIGSTOP member {a}'s sidecar"));
                s.c.signal_sidecar(a, libc::SIGSTOP);
                thaw = Some(a);
            }
            6 => {
                if let Some(pid) = s.c.postmaster_pid(primary) {
                    s.fault(format!("kill -9 primary {primary}'s postmaster"));
                    // SAFETY: killing the test's own Postgres.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            7 => {
                if s.c.postmaster_pid(a).is_some() {
                    s.fault(format!("crash member {a}'s host"));
                    s.c.crash_host(a);
                    restart = Some(a);
                }
            }
            8 => {
                let ms = s.rng.gen_range(20..2_000);
                s.fault(format!("{ms} ms latency each way between {a} and {b2}"));
                let t = s.net.toxi().expect("proxies");
                t.latency_one_way(a, b2, ms).await;
                t.latency_one_way(b2, a, ms).await;
            }
            _ => {
                s.fault(format!("refuse every link of member {a}"));
                s.net.toxi().expect("proxies").disable_member(a).await;
            }
        }
        let hold = Duration::from_millis(s.rng.gen_range(2_000..15_000));
        tokio::time::sleep(hold).await;
        if let Some(id) = thaw {
            s.c.signal_sidecar(id, libc::SIGCONT);
        }
        if let Some(id) = restart {
            s.c.start(id);
        }
        s.net.heal().await;
        s.fault("heal");
        chaos::converges(&s.c).await;
    }
    s.timeline.note(format!("{rounds} rounds"));
    s.finish(run, Expect::new(0..=usize::MAX, at)).await;
}

mod soak {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "soak run: PGQUORUM_NEMESIS=random PGQUORUM_DURATION=10m, with --ignored"]
    async fn random_nemesis() {
        super::random_nemesis().await;
    }
}

/// `90s`, `10m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// Writes ~1 KB rows into `w` (ids from 1_000_000 up) back to back until stopped.
struct BulkWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(i64, Instant)>>,
}

impl BulkWriter {
    async fn start(url: String) -> BulkWriter {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut client: Option<tokio_postgres::Client> = None;
            let mut id = 1_000_000i64;
            while !s.load(Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = harness::workload::connect_within(&url, Duration::from_secs(2)).await;
                    match &client {
                        Some(c) => {
                            let _ = c
                                .batch_execute("ALTER TABLE w ADD COLUMN IF NOT EXISTS pad text")
                                .await;
                        }
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                let Some(c) = &client else { continue };
                id += 1;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = c.execute(
                    "INSERT INTO w (id, pad) VALUES ($1, repeat('x', 1000))",
                    &params,
                );
                match tokio::time::timeout(Duration::from_secs(2), insert).await {
                    Ok(Ok(_)) => acked.push((id, Instant::now())),
                    _ => client = None,
                }
            }
            acked
        });
        BulkWriter { stop, task }
    }

    async fn stop(self) -> Vec<(i64, Instant)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// The netns backend itself, without a cluster: cuts drop exactly the paths they name, the
/// host stays connected to everyone, and a heal restores every path.
#[test]
fn the_netns_backend_cuts_what_it_names_and_heals() {
    let Some(net) = Netns::setup_or_skip(3) else {
        return;
    };
    // A reset comes back within milliseconds; a second is ample for "reachable".
    let wait = Duration::from_secs(1);
    let reaches = |from: Option<u64>, to: u64| net.reaches(from, to, wait).expect("probe");
    net.cut(1, 2).expect("cut");
    assert!(!reaches(Some(1), 2), "1 -> 2 after cut(1, 2)");
    assert!(!reaches(Some(2), 1), "2 -> 1 after cut(1, 2)");
    assert!(
        reaches(Some(1), 3) && reaches(Some(3), 2),
        "uncut paths still flow"
    );
    for id in 1..=3 {
        assert!(reaches(None, id), "the host reaches member {id}");
    }
    // One way: 3's packets to 1 are dropped, so 3 gets no answer from 1. A probe cannot show
    // the direction (1's SYN reaches 3, but 3's reset back is dropped, and TCP needs both), so
    // the rules show it: 3 -> 1 is cut, 1 -> 3 is not.
    net.cut_one_way(3, 1).expect("cut one way");
    assert!(!reaches(Some(3), 1), "3 -> 1 after cut_one_way(3, 1)");
    let rules = net.rules();
    assert!(
        rules.contains(&format!(
            "ip saddr {} ip daddr {}",
            net.addr(3),
            net.addr(1)
        )) && !rules.contains(&format!(
            "ip saddr {} ip daddr {}",
            net.addr(1),
            net.addr(3)
        )),
        "{rules}"
    );
    net.heal().expect("heal");
    for from in 1..=3 {
        for to in (1..=3).filter(|to| *to != from) {
            assert!(reaches(Some(from), to), "{from} -> {to} after heal");
        }
    }
    // A port cut drops what 2 sends on connections to or from that port: 2's SYN to 3:9, and
    // 2's reset answering 3's SYN to 2:9. 1 still reaches 3.
    net.cut_port_one_way(2, 3, 9).expect("port cut");
    assert!(
        !reaches(Some(2), 3),
        "2 -> 3:9 after cut_port_one_way(2, 3, 9)"
    );
    assert!(
        !reaches(Some(3), 2),
        "2's answer from port 9 to 3 is dropped"
    );
    assert!(reaches(Some(1), 3), "1 -> 3 still flows");
    net.heal().expect("heal");
}
