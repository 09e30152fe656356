//! A minimal supervising process for the integration tests: starts an
//! already initialised data directory through `Instance`, prints `READY
//! <postmaster pid>`, then renews a short lease forever. Killing or freezing
//! it must take PostgreSQL down within the lease plus the fence time.
//!
//! Usage: pgq-test-supervisor <data_dir> <port> <guard_program> <lease_ms>
//! (superuser `postgres`/`postgres`, replication `replicator`/`replicator`).

use std::path::PathBuf;
use std::time::Duration;

use pg_supervisor::{Credentials, GuardCommand, Instance, InstanceConfig, Lease, Timeouts};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("pgq-test-supervisor: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data_dir, port, guard, lease_ms] = args.as_slice() else {
        return Err("usage: pgq-test-supervisor <data_dir> <port> <guard> <lease_ms>".into());
    };
    let lease = Duration::from_millis(lease_ms.parse()?);
    let cfg = InstanceConfig {
        member_name: "supervised".into(),
        data_dir: PathBuf::from(data_dir),
        log_file: None,
        listen_host: "127.0.0.1".into(),
        port: port.parse()?,
        socket_dir: None,
        postgres_user: None,
        pg_bin_dir: None,
        superuser: Credentials {
            name: "postgres".into(),
            password: "postgres".into(),
        },
        replication: Credentials {
            name: "replicator".into(),
            password: "replicator".into(),
        },
        cluster_cidrs: vec!["127.0.0.1/32".into()],
        extra_settings: vec![],
        extra_hba: vec![],
        expected_system_identifier: None,
        guard_socket: None,
        guard: GuardCommand {
            program: PathBuf::from(guard),
            args: vec![],
        },
        timeouts: Timeouts::default(),
    };
    let mut instance = Instance::new(cfg)?;
    instance.start(Lease::expires_in(lease)).await?;
    let pid = instance.status().pid().unwrap_or(0);
    println!("READY {pid}");
    loop {
        tokio::time::sleep(lease / 4).await;
        instance.feed_lease(Lease::expires_in(lease)).await?;
    }
}
