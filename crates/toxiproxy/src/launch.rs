//! Chooses the Toxiproxy server a test talks to: one named by `TOXIPROXY_URL`, a
//! `toxiproxy-server` found on `PATH`, or this crate's own server in-process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::client::Client;
use crate::server::ServerHandle;
use crate::Error;

/// How long a spawned `toxiproxy-server` may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The server in use; it keeps a spawned or in-process server alive until dropped.
#[derive(Debug)]
pub enum Backend {
    /// A server named by `TOXIPROXY_URL`, managed by someone else.
    External {
        /// Its base URL.
        url: String,
    },
    /// A `toxiproxy-server` child process, killed on drop.
    Spawned {
        /// Its base URL.
        url: String,
        /// The executable that was run.
        program: PathBuf,
        /// The process.
        child: Child,
    },
    /// This crate's server, on its own thread.
    InProcess(ServerHandle),
}

impl Backend {
    /// The server's base URL.
    pub fn url(&self) -> String {
        match self {
            Backend::External { url } | Backend::Spawned { url, .. } => url.clone(),
            Backend::InProcess(h) => h.url(),
        }
    }

    /// A one-line description for test output.
    pub fn describe(&self) -> String {
        match self {
            Backend::External { url } => format!("external Toxiproxy at {url} (TOXIPROXY_URL)"),
            Backend::Spawned { url, program, .. } => {
                format!("spawned {} at {url}", program.display())
            }
            Backend::InProcess(h) => format!("own server (pgquorum-toxiproxy) at {}", h.url()),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Spawned { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connects to `TOXIPROXY_URL` if set, else spawns `toxiproxy-server` from `PATH`, else
/// starts the in-process server. Fails if `TOXIPROXY_URL` is set but does not answer, rather
/// than silently testing against something else.
pub async fn connect_or_start() -> Result<(Client, Backend), Error> {
    if let Some(url) = std::env::var("TOXIPROXY_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        let client = Client::new(&url)?;
        client
            .version()
            .await
            .map_err(|e| Error::Launch(format!("TOXIPROXY_URL={url} does not answer: {e}")))?;
        return Ok((client, Backend::External { url }));
    }
    if let Some(program) = find_on_path("toxiproxy-server") {
        return spawn(program).await;
    }
    let handle = ServerHandle::start("127.0.0.1:0")?;
    let client = Client::new(&handle.url())?;
    Ok((client, Backend::InProcess(handle)))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

async fn spawn(program: PathBuf) -> Result<(Client, Backend), Error> {
    // The port may be taken between probing and binding; the deadline below reports that.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&program)
        .args(["-host", "127.0.0.1", "-port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    // From here on, dropping the backend kills the child on every error path.
    let mut backend = Backend::Spawned {
        url: url.clone(),
        program,
        child,
    };
    let client = Client::new(&url)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if client.version().await.is_ok() {
            return Ok((client, backend));
        }
        if let Backend::Spawned { child, .. } = &mut backend {
            if let Some(status) = child.try_wait()? {
                return Err(Error::Launch(format!(
                    "toxiproxy-server exited early: {status}"
                )));
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Launch(format!(
                "toxiproxy-server did not answer at {url}"
            )));
        }
        // Polling interval, not synchronisation: readiness is the /version answer above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
