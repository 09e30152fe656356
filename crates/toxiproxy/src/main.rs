//! `pgquorum-toxiproxy`: a Toxiproxy-compatible server, invoked like `toxiproxy-server`.

use clap::Parser;

/// A Toxiproxy-compatible fault-injection TCP proxy.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Host for the HTTP API to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port for the HTTP API to listen on.
    #[arg(long, default_value_t = 8474)]
    port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // toxiproxy-server spells its flags with one dash (-host, -port); accept both.
    let argv = std::env::args().map(|a| match a.as_str() {
        "-host" | "-port" => format!("-{a}"),
        _ => a,
    });
    let args = Args::parse_from(argv);
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    tracing::info!(address = %listener.local_addr()?, "starting Toxiproxy-compatible HTTP server");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    pgquorum_toxiproxy::serve(listener, shutdown).await?;
    Ok(())
}
