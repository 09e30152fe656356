//! A primary that is up but cannot write: real sidecars and real PostgreSQL 15, each member's
//! data directory on a filesystem of its own (a small tmpfs, or an ext4 image on a loop device),
//! filled or turned read-only under a writer. Mounting needs root; without it each test prints
//! why it skipped.

#[path = "harness/mod.rs"]
mod harness;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::workload::{missing_on, topology, wait_sync_committed, Checker, Writer};
use harness::{skip, wait_for, TestCluster};
use raft_node::proto;

const START: Duration = Duration::from_secs(90);
const PATIENCE: Duration = Duration::from_secs(60);
/// Size of each member's data filesystem: room for a fresh cluster and its WAL, small enough
/// to fill in a moment.
const FS_MB: u64 = 384;
/// The members warn below this (their `free_space_warn_bytes`).
const WARN_BYTES: u64 = 96 * 1024 * 1024;

/// The data filesystems of a test cluster, unmounted when dropped (after the cluster, which
/// is declared first wherever both live).
struct Mounts {
    points: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Drop for Mounts {
    fn drop(&mut self) {
        // A frozen filesystem holds every process that writes to it: thaw first (a no-op on
        // one that is not frozen).
        for p in &self.points {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(p)
                .stderr(std::process::Stdio::null())
                .status();
        }
        for p in &self.points {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
    }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The uid and gid Postgres runs as.
fn postgres_ids() -> Result<(String, String), String> {
    Ok((
        run(Command::new("id").args(["-u", "postgres"]))?,
        run(Command::new("id").args(["-g", "postgres"]))?,
    ))
}

/// Why these tests cannot run here, if they cannot.
fn cannot_mount() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("mounting a filesystem per member needs root; run the tests as root".into());
    }
    postgres_ids()
        .err()
        .map(|e| format!("no `postgres` OS user: {e} (useradd --system postgres; .ci/run does)"))
}

/// A cluster of three members, each data directory on a tmpfs of [`FS_MB`]; `None` (with the
/// reason printed) when mounting cannot work here.
fn cluster_on_tmpfs(test: &str) -> Option<(TestCluster, Mounts)> {
    let (uid, gid) = match cannot_mount().map_or_else(postgres_ids, Err) {
        Ok(ids) => ids,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    let mut c = TestCluster::with_postgres(3);
    let mut m = Mounts {
        points: Vec::new(),
        loops: Vec::new(),
    };
    for id in c.nodes.keys().copied().collect::<Vec<_>>() {
        let dir = c.nodes[&id].dir.join("pgdata");
        std::fs::create_dir_all(&dir).expect("mount point");
        let opts = format!("size={FS_MB}m,mode=0700,uid={uid},gid={gid}");
        if let Err(e) = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(&dir))
        {
            skip(test, &format!("cannot mount a tmpfs: {e}"));
            return None;
        }
        m.points.push(dir);
        warn_below(&mut c, id, WARN_BYTES);
    }
    Some((c, m))
}

/// Sets member `id`'s `free_space_warn_bytes` (the `[postgres]` table starts with `host`).
fn warn_below(c: &mut TestCluster, id: u64, bytes: u64) {
    c.insert_config(id, "host = ", &format!("free_space_warn_bytes = {bytes}"));
}

/// Fills the filesystem of `dir` to the last byte with a file named `filler`; returns when it
/// started (writes may fail, and the sidecar sees the room shrink, from then on).
fn fill(dir: &Path) -> Instant {
    let started = Instant::now();
    let mut f = std::fs::File::create(dir.join("filler")).expect("create filler");
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    // Whatever room is left after the last whole chunk, to the byte.
    while f.write_all(&chunk[..4096]).is_ok() {}
    while f.write_all(&chunk[..1]).is_ok() {}
    started
}

/// Removes the filler of `fill`.
fn free(dir: &Path) {
    std::fs::remove_file(dir.join("filler")).expect("remove filler");
}

fn member(t: &proto::Topology, id: u64) -> proto::Member {
    t.members
        .iter()
        .find(|m| m.id == id)
        .cloned()
        .expect("member in topology")
}

/// Waits until member `id` runs as a replica of `primary` within 1 MiB of it.
async fn wait_replica_caught_up(c: &TestCluster, id: u64, primary: u64) -> proto::Topology {
    wait_for(
        "the member streams again and catches up",
        PATIENCE,
        || async {
            let t = topology(c).await;
            let m = member(&t, id);
            let p = t.primary.as_ref()?.node_id;
            (p == primary && m.pg_role_name() == "replica" && m.lag_bytes < 1 << 20).then_some(t)
        },
    )
    .await
}

/// Starts the cluster and a workload: a writer, a checker, writes flowing and a synchronous
/// standby committed. `per_host`: the writer bounds each member's whole connection setup.
/// Returns the primary.
async fn primary_under_writes(c: &mut TestCluster, per_host: bool) -> (u64, Writer, Checker) {
    c.start_all();
    let (primary, _) = c.wait_postgres(START).await;
    let writer = if per_host {
        Writer::start_per_host(c).await
    } else {
        Writer::start(c.pg_url()).await
    };
    let checker = Checker::start(c);
    wait_for("writes flow", PATIENCE, || async {
        (writer.acked.lock().unwrap().len() >= 10).then_some(())
    })
    .await;
    wait_sync_committed(c).await;
    (primary, writer, checker)
}

/// Waits for a committed primary other than `old`, then for a write acknowledged after it
/// (small rows still fit in pages a table has, so a full old primary may acknowledge some
/// writes after the fault). Returns the new primary.
async fn new_primary_taking_writes(c: &TestCluster, old: u64, writer: &Writer) -> u64 {
    let (new, promoted_at) = wait_for("a new primary", PATIENCE, || async {
        let t = topology(c).await;
        let p = t.primary.as_ref()?.node_id;
        (p != old).then(|| (p, Instant::now()))
    })
    .await;
    wait_for(
        "a write acknowledged on the new primary",
        PATIENCE,
        || async { writer.acked_after(promoted_at).then_some(()) },
    )
    .await;
    new
}

/// Stops the workload and checks it: never two writable members, and every acknowledged write
/// on `primary` (S1, S6). Returns the acknowledged writes.
async fn stop_and_check(
    c: &TestCluster,
    primary: u64,
    writer: Writer,
    checker: Checker,
) -> Vec<(i64, Instant)> {
    let acked = writer.stop().await;
    let (most, who) = checker.stop().await;
    assert_eq!(most, 1, "two writable members at once: {who:?}");
    let lost = missing_on(c, primary, &acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_the_primary_fails_over_to_a_member_with_room() {
    let Some((mut c, mounts)) =
        cluster_on_tmpfs("a_full_disk_on_the_primary_fails_over_to_a_member_with_room")
    else {
        return;
    };
    let (old, writer, checker) = primary_under_writes(&mut c, false).await;
    let old_dir = c.nodes[&old].dir.join("pgdata");
    let full_at = fill(&old_dir);
    // The promotion and its reason are in the committed history.
    let new = new_primary_taking_writes(&c, old, &writer).await;
    let t = topology(&c).await;
    let promotion = t.history.last().expect("a promotion in the history");
    assert_eq!(promotion.to_node, new);
    eprintln!("promotion: {}", promotion.reason);
    let acked = stop_and_check(&c, new, writer, checker).await;
    // The old primary stays down while its disk is full, and says why.
    let shown = wait_for(
        "the old primary's low space in the topology",
        PATIENCE,
        || async {
            let m = member(&topology(&c).await, old);
            (m.low_space && m.pg_role_name() != "primary").then_some(m)
        },
    )
    .await;
    assert!(shown.free_bytes < 1 << 20, "{shown:?}");
    free(&old_dir);
    let t = wait_replica_caught_up(&c, old, new).await;
    assert!(!member(&t, old).low_space);
    eprintln!(
        "FIGURE disk_full_on_primary write_outage_ms={} acked={} lost=0",
        longest_gap_after(&acked, full_at).as_millis(),
        acked.len()
    );
    drop(c);
    drop(mounts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_the_primary_without_a_member_with_room_moves_nothing() {
    let Some((mut c, mounts)) =
        cluster_on_tmpfs("a_full_disk_on_the_primary_without_a_member_with_room_moves_nothing")
    else {
        return;
    };
    c.start_all();
    let (primary, t) = c.wait_postgres(START).await;
    let epoch = t.primary.map(|p| p.epoch);
    // The replicas run low first: below failover_min_free_bytes (64 MiB by default), not full,
    // so that they stay running replicas.
    for id in c.nodes.keys().copied().filter(|id| *id != primary) {
        let dir = c.nodes[&id].dir.join("pgdata");
        fill(&dir);
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join("filler"))
            .expect("filler");
        let len = f.metadata().expect("filler size").len();
        f.set_len(len.saturating_sub(32 << 20))
            .expect("leave 32 MiB");
    }
    fill(&c.nodes[&primary].dir.join("pgdata"));
    let status = wait_for("the reason nobody is promoted", PATIENCE, || async {
        let t = topology(&c).await;
        let s = t.failover_status.clone();
        (s.contains("cannot write") && s.contains("no candidate")).then_some(s)
    })
    .await;
    eprintln!("failover status: {status}");
    assert!(status.contains("bytes free"), "{status}");
    // Several leases later, still the same primary in the same epoch.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let t = topology(&c).await;
        assert_eq!(
            t.primary.map(|p| (p.node_id, p.epoch)),
            Some((primary, epoch.expect("an epoch"))),
            "the primary moved with no member able to take its writes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let t = topology(&c).await;
    let m = member(&t, primary);
    assert!(m.cannot_write.starts_with("no space"), "{m:?}");
    drop(c);
    drop(mounts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_a_replica_shows_and_does_not_move_the_primary() {
    let Some((mut c, mounts)) =
        cluster_on_tmpfs("a_full_disk_on_a_replica_shows_and_does_not_move_the_primary")
    else {
        return;
    };
    c.start_all();
    let (primary, t) = c.wait_postgres(START).await;
    let epoch = t.primary.map(|p| p.epoch);
    let writer = Writer::start(c.pg_url()).await;
    wait_for("writes flow", PATIENCE, || async {
        (writer.acked.lock().unwrap().len() >= 10).then_some(())
    })
    .await;
    let replica = c.nodes.keys().copied().find(|id| *id != primary).unwrap();
    let dir = c.nodes[&replica].dir.join("pgdata");
    let full_at = fill(&dir);
    let shown = wait_for(
        "the replica's low space in the topology",
        PATIENCE,
        || async {
            let m = member(&topology(&c).await, replica);
            (m.low_space && m.free_bytes < 1 << 20).then_some(m)
        },
    )
    .await;
    assert!(shown.cannot_write.is_empty(), "{shown:?}");
    // Writes go on (the other replica acknowledges them) and the primary stays.
    wait_for(
        "writes acknowledged with the replica full",
        PATIENCE,
        || async {
            writer
                .acked_after(full_at + Duration::from_secs(5))
                .then_some(())
        },
    )
    .await;
    let t = topology(&c).await;
    assert_eq!(
        t.primary.map(|p| (p.node_id, p.epoch)),
        Some((primary, epoch.expect("an epoch")))
    );
    free(&dir);
    wait_replica_caught_up(&c, replica, primary).await;
    let acked = writer.stop().await;
    let lost = missing_on(&c, primary, &acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    drop(c);
    drop(mounts);
}

/// A cluster of three members, each data directory on an ext4 image of its own (mounted with
/// `errors=remount-ro`, as DBAs mount data disks).
fn cluster_on_ext4(test: &str) -> Option<(TestCluster, Mounts)> {
    let (uid, gid) = match cannot_mount().map_or_else(postgres_ids, Err) {
        Ok(ids) => ids,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    let c = TestCluster::with_postgres(3);
    let mut m = Mounts {
        points: Vec::new(),
        loops: Vec::new(),
    };
    for id in c.nodes.keys().copied().collect::<Vec<_>>() {
        let node_dir = c.nodes[&id].dir.clone();
        let image = node_dir.join("pgdata.img");
        let dir = node_dir.join("pgdata");
        std::fs::create_dir_all(&dir).expect("mount point");
        let setup = || -> Result<String, String> {
            run(Command::new("truncate")
                .args(["-s", &format!("{FS_MB}M")])
                .arg(&image))?;
            run(Command::new("mkfs.ext4")
                .args(["-q", "-m", "0"])
                .arg(&image))?;
            let dev = run(Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image))?;
            Ok(dev)
        };
        let dev = match setup() {
            Ok(d) => d,
            Err(e) => {
                skip(
                    test,
                    &format!(
                        "cannot make an ext4 loop device: {e} (needs root, e2fsprogs and \
                         util-linux; .ci/run installs them)"
                    ),
                );
                return None;
            }
        };
        m.loops.push(dev.clone());
        if let Err(e) = run(Command::new("mount")
            .args(["-o", "errors=remount-ro", &dev])
            .arg(&dir))
        {
            skip(test, &format!("cannot mount {dev}: {e}"));
            return None;
        }
        m.points.push(dir.clone());
        // initdb wants an empty directory owned by the postgres user.
        let _ = std::fs::remove_dir(dir.join("lost+found"));
        let owned = run(Command::new("chown").arg(format!("{uid}:{gid}")).arg(&dir))
            .and_then(|_| run(Command::new("chmod").arg("0700").arg(&dir)));
        if let Err(e) = owned {
            skip(
                test,
                &format!("cannot give {} to the postgres user: {e}", dir.display()),
            );
            return None;
        }
    }
    Some((c, m))
}

/// The ext4 name (`loopN`) of the filesystem mounted at `dir`.
fn ext4_name(dir: &Path) -> String {
    let dev = run(Command::new("findmnt")
        .args(["-n", "-o", "SOURCE"])
        .arg(dir))
    .expect("findmnt");
    dev.trim_start_matches("/dev/").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_storage_on_the_primary_fails_over() {
    let Some((mut c, mounts)) = cluster_on_ext4("read_only_storage_on_the_primary_fails_over")
    else {
        return;
    };
    let (old, writer, checker) = primary_under_writes(&mut c, false).await;
    // What ext4 does on an I/O error with errors=remount-ro: the filesystem refuses every
    // write from then on (EROFS), with files still open for writing.
    let name = ext4_name(&c.nodes[&old].dir.join("pgdata"));
    let trigger = format!("/sys/fs/ext4/{name}/trigger_fs_error");
    if let Err(e) = std::fs::write(&trigger, "pgquorum test: storage fails\n") {
        skip(
            "read_only_storage_on_the_primary_fails_over",
            &format!("cannot make ext4 fail through {trigger}: {e} (needs root and ext4)"),
        );
        return;
    }
    let ro_at = Instant::now();
    let new = new_primary_taking_writes(&c, old, &writer).await;
    let acked = stop_and_check(&c, new, writer, checker).await;
    // Postgres often stops on its own first (it cannot write WAL); either way the old
    // primary's member shows why, and stays down rather than rejoin on storage that refuses
    // writes.
    let shown = wait_for(
        "the old primary's read-only storage in the topology",
        PATIENCE,
        || async {
            let m = member(&topology(&c).await, old);
            m.read_only_storage.then_some(m)
        },
    )
    .await;
    assert_eq!(shown.free_bytes, 0, "{shown:?}");
    assert_ne!(shown.pg_role_name(), "replica", "{shown:?}");
    eprintln!(
        "FIGURE read_only_primary write_outage_ms={} acked={} lost=0",
        longest_gap_after(&acked, ro_at).as_millis(),
        acked.len()
    );
    drop(c);
    drop(mounts);
}

/// The longest time without an acknowledged write from `t` on: the write outage a fault at
/// `t` caused (from the last write the old primary took, or `t`, to the first on the new one).
fn longest_gap_after(acked: &[(i64, Instant)], t: Instant) -> Duration {
    let mut at: Vec<Instant> = acked.iter().map(|(_, a)| *a).filter(|a| *a > t).collect();
    at.sort();
    let mut prev = t;
    let mut worst = Duration::ZERO;
    for a in at {
        worst = worst.max(a - prev);
        prev = a;
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_io_on_the_primary_fails_over_and_it_rejoins_after_the_thaw() {
    let test = "stuck_io_on_the_primary_fails_over_and_it_rejoins_after_the_thaw";
    let Some((mut c, mounts)) = cluster_on_ext4(test) else {
        return;
    };
    // A frozen member accepts TCP and then hangs: connect to each member within a bound, as
    // libpq's per-host connect_timeout does.
    let (old, writer, checker) = primary_under_writes(&mut c, true).await;
    // A hung disk: every write to the filesystem blocks until it is thawed.
    let dir = c.nodes[&old].dir.join("pgdata");
    if let Err(e) = run(Command::new("fsfreeze").arg("-f").arg(&dir)) {
        skip(
            test,
            &format!(
                "cannot freeze {}: {e} (needs root and fsfreeze from util-linux)",
                dir.display()
            ),
        );
        return;
    }
    let frozen_at = Instant::now();
    let stuck = wait_for(
        "the primary's stuck write in the topology",
        PATIENCE,
        || async {
            let m = member(&topology(&c).await, old);
            m.cannot_write.starts_with("stuck I/O").then_some(m)
        },
    )
    .await;
    eprintln!("while frozen: {}", stuck.cannot_write);
    let new = new_primary_taking_writes(&c, old, &writer).await;
    run(Command::new("fsfreeze").arg("-u").arg(&dir)).expect("thaw");
    let thawed_at = Instant::now();
    let t = wait_replica_caught_up(&c, old, new).await;
    assert_eq!(t.primary.map(|p| p.node_id), Some(new));
    let acked = stop_and_check(&c, new, writer, checker).await;
    eprintln!(
        "FIGURE stuck_io_primary write_outage_ms={} rejoined_after_thaw_ms={} acked={} lost=0",
        longest_gap_after(&acked, frozen_at).as_millis(),
        thawed_at.elapsed().as_millis(),
        acked.len()
    );
    drop(c);
    drop(mounts);
}
