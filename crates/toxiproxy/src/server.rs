//! The Toxiproxy HTTP API and the in-process server.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Mutex};

use crate::engine::{Running, ToxicList};
use crate::types::{Proxy, Toxic, ToxicKind, ToxicWire, WireError};
use crate::Error;

/// One proxy's configuration and, while enabled, its listener.
struct Entry {
    listen: String,
    upstream: String,
    toxics: watch::Sender<ToxicList>,
    running: Option<Running>,
}

impl Entry {
    fn new(listen: String, upstream: String) -> Entry {
        Entry {
            listen,
            upstream,
            toxics: watch::Sender::new(Arc::new(Vec::new())),
            running: None,
        }
    }

    fn view(&self, name: &str) -> Proxy {
        Proxy {
            name: name.to_string(),
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            enabled: self.running.is_some(),
            toxics: self.toxics.borrow().to_vec(),
        }
    }

    async fn start(&mut self, name: &str) -> Result<(), ApiError> {
        if self.running.is_some() {
            return Ok(());
        }
        let addr = resolve(&self.listen).await?;
        let (running, bound) = Running::start(addr, &self.upstream, self.toxics.subscribe())
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        // Reporting the bound address makes a requested port 0 usable and keeps it on re-enable.
        self.listen = bound.to_string();
        self.running = Some(running);
        tracing::info!(proxy = name, listen = %self.listen, upstream = %self.upstream, "started proxy");
        Ok(())
    }

    async fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.take() {
            running.stop().await;
            tracing::info!(proxy = name, "stopped proxy");
        }
    }

    fn set_toxics(&self, f: impl FnOnce(&mut Vec<Toxic>)) {
        let mut list = self.toxics.borrow().to_vec();
        f(&mut list);
        self.toxics.send_replace(Arc::new(list));
    }
}

/// The API's shared state; one lock serialises API calls, which are rare and may await.
type Shared = Arc<Mutex<BTreeMap<String, Entry>>>;

/// An API error, rendered like Toxiproxy's: `{"error": "...", "status": 404}`.
#[derive(Debug, Serialize)]
struct ApiError {
    #[serde(rename = "error")]
    message: String,
    status: u16,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            message: message.into(),
            status: status.as_u16(),
        }
    }
    fn bad_body(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, format!("bad request body: {e}"))
    }
    fn missing(field: &str) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("missing required field: {field}"),
        )
    }
    fn proxy_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "proxy not found")
    }
    fn toxic_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "toxic not found")
    }
    fn wire(e: WireError) -> ApiError {
        match e {
            WireError::InvalidStream => ApiError::new(
                StatusCode::BAD_REQUEST,
                "stream was invalid, can be either upstream or downstream",
            ),
            WireError::InvalidType => ApiError::new(StatusCode::BAD_REQUEST, "invalid toxic type"),
            WireError::BadAttributes(m) => ApiError::bad_body(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json(status, &self)
    }
}

type ApiResult = Result<Response, ApiError>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::bad_body)
}

async fn resolve(listen: &str) -> Result<SocketAddr, ApiError> {
    let listen = if listen.is_empty() {
        "127.0.0.1:0"
    } else {
        listen
    };
    let bad = |e: String| ApiError::bad_body(format!("invalid listen address {listen:?}: {e}"));
    tokio::net::lookup_host(listen)
        .await
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("no address".into()))
}

/// Fields of a proxy in create, update and populate requests.
#[derive(Deserialize)]
struct ProxyInput {
    #[serde(default)]
    name: String,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// The API router over fresh, empty state.
pub fn router() -> Router {
    let state: Shared = Arc::default();
    Router::new()
        .route("/version", get(version))
        .route("/reset", post(reset))
        .route("/populate", post(populate))
        .route("/proxies", get(list_proxies).post(create_proxy))
        .route(
            "/proxies/{proxy}",
            get(show_proxy)
                .post(update_proxy)
                .patch(update_proxy)
                .delete(delete_proxy),
        )
        .route(
            "/proxies/{proxy}/toxics",
            get(list_toxics).post(create_toxic),
        )
        .route(
            "/proxies/{proxy}/toxics/{toxic}",
            get(show_toxic)
                .post(update_toxic)
                .patch(update_toxic)
                .delete(delete_toxic),
        )
        .with_state(state)
}

async fn version() -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({ "version": crate::VERSION }),
    )
}

async fn reset(State(s): State<Shared>) -> ApiResult {
    let mut proxies = s.lock().await;
    for (name, entry) in proxies.iter_mut() {
        entry.start(name).await?;
        entry.set_toxics(Vec::clear);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_proxies(State(s): State<Shared>) -> ApiResult {
    let proxies = s.lock().await;
    let all: BTreeMap<&String, Proxy> = proxies.iter().map(|(n, e)| (n, e.view(n))).collect();
    Ok(json(StatusCode::OK, &all))
}

async fn create_proxy(State(s): State<Shared>, body: Bytes) -> ApiResult {
    let input: ProxyInput = parse(&body)?;
    let mut proxies = s.lock().await;
    let (name, entry) = new_entry(input, &proxies, None).await?;
    let view = entry.view(&name);
    proxies.insert(name, entry);
    Ok(json(StatusCode::CREATED, &view))
}

/// Validates and starts a new proxy; `index` numbers it in populate's error messages.
async fn new_entry(
    input: ProxyInput,
    proxies: &BTreeMap<String, Entry>,
    index: Option<usize>,
) -> Result<(String, Entry), ApiError> {
    let at = index
        .map(|i| format!(" at proxy {}", i + 1))
        .unwrap_or_default();
    if input.name.is_empty() {
        return Err(ApiError::missing(&format!("name{at}")));
    }
    let upstream = match input.upstream {
        Some(u) if !u.is_empty() => u,
        _ => return Err(ApiError::missing(&format!("upstream{at}"))),
    };
    if proxies.contains_key(&input.name) {
        return Err(ApiError::new(StatusCode::CONFLICT, "proxy already exists"));
    }
    let listen = input.listen.unwrap_or_default();
    resolve(&listen).await?;
    let mut entry = Entry::new(listen, upstream);
    if input.enabled.unwrap_or(true) {
        entry.start(&input.name).await?;
    }
    Ok((input.name, entry))
}

/// Whether `input` names a different listen address or upstream than `entry` has.
async fn differs(entry: &Entry, input: &ProxyInput) -> Result<bool, ApiError> {
    let listen = match &input.listen {
        Some(l) => resolve(l).await?.to_string() != entry.listen,
        None => false,
    };
    Ok(listen
        || input
            .upstream
            .as_ref()
            .is_some_and(|u| *u != entry.upstream))
}

async fn populate(State(s): State<Shared>, body: Bytes) -> ApiResult {
    let inputs: Vec<ProxyInput> = parse(&body)?;
    for (i, input) in inputs.iter().enumerate() {
        if input.name.is_empty() {
            return Err(ApiError::missing(&format!("name at proxy {}", i + 1)));
        }
        if input.upstream.as_deref().unwrap_or("").is_empty() {
            return Err(ApiError::missing(&format!("upstream at proxy {}", i + 1)));
        }
    }
    let mut proxies = s.lock().await;
    let mut done = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        // Like Toxiproxy, an unchanged proxy is kept as is and a changed one is replaced.
        if let Some(entry) = proxies.get_mut(&input.name) {
            match differs(entry, &input).await {
                Ok(false) => {
                    done.push(entry.view(&input.name));
                    continue;
                }
                Ok(true) => {
                    entry.stop(&input.name).await;
                    proxies.remove(&input.name);
                }
                Err(e) => return Ok(populate_error(e, done)),
            }
        }
        match new_entry(input, &proxies, Some(i)).await {
            Ok((name, entry)) => {
                done.push(entry.view(&name));
                proxies.insert(name, entry);
            }
            Err(e) => return Ok(populate_error(e, done)),
        }
    }
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({ "proxies": done }),
    ))
}

fn populate_error(e: ApiError, done: Vec<Proxy>) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({ "error": e.message, "status": e.status, "proxies": done });
    json(status, &body)
}

async fn show_proxy(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let proxies = s.lock().await;
    let entry = proxies.get(&name).ok_or_else(ApiError::proxy_not_found)?;
    Ok(json(StatusCode::OK, &entry.view(&name)))
}

async fn update_proxy(State(s): State<Shared>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let mut proxies = s.lock().await;
    let entry = proxies
        .get_mut(&name)
        .ok_or_else(ApiError::proxy_not_found)?;
    let input: ProxyInput = parse(&body)?;
    let enable = input.enabled.unwrap_or(entry.running.is_some());
    if differs(entry, &input).await? {
        entry.stop(&name).await;
        if let Some(listen) = input.listen {
            entry.listen = listen;
        }
        if let Some(upstream) = input.upstream {
            entry.upstream = upstream;
        }
    }
    if enable {
        entry.start(&name).await?;
    } else {
        entry.stop(&name).await;
    }
    Ok(json(StatusCode::OK, &entry.view(&name)))
}

async fn delete_proxy(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let mut proxies = s.lock().await;
    let mut entry = proxies
        .remove(&name)
        .ok_or_else(ApiError::proxy_not_found)?;
    entry.stop(&name).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_toxics(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let proxies = s.lock().await;
    let entry = proxies.get(&name).ok_or_else(ApiError::proxy_not_found)?;
    let toxics = entry.toxics.borrow().to_vec();
    Ok(json(StatusCode::OK, &toxics))
}

async fn create_toxic(State(s): State<Shared>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let proxies = s.lock().await;
    let entry = proxies.get(&name).ok_or_else(ApiError::proxy_not_found)?;
    let wire: ToxicWire = parse(&body)?;
    let toxic = Toxic::from_wire(wire).map_err(ApiError::wire)?;
    if entry.toxics.borrow().iter().any(|t| t.name == toxic.name) {
        return Err(ApiError::new(StatusCode::CONFLICT, "toxic already exists"));
    }
    entry.set_toxics(|list| list.push(toxic.clone()));
    Ok(json(StatusCode::OK, &toxic))
}

async fn show_toxic(
    State(s): State<Shared>,
    Path((name, toxic)): Path<(String, String)>,
) -> ApiResult {
    let proxies = s.lock().await;
    let entry = proxies.get(&name).ok_or_else(ApiError::proxy_not_found)?;
    let list = entry.toxics.borrow().clone();
    let found = list.iter().find(|t| t.name == toxic);
    Ok(json(
        StatusCode::OK,
        found.ok_or_else(ApiError::toxic_not_found)?,
    ))
}

/// Fields a toxic update may change; attributes merge into the existing ones.
#[derive(Deserialize)]
struct ToxicUpdate {
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    toxicity: Option<f32>,
}

async fn update_toxic(
    State(s): State<Shared>,
    Path((name, toxic)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let proxies = s.lock().await;
    let entry = proxies.get(&name).ok_or_else(ApiError::proxy_not_found)?;
    let mut updated = entry
        .toxics
        .borrow()
        .iter()
        .find(|t| t.name == toxic)
        .cloned()
        .ok_or_else(ApiError::toxic_not_found)?;
    let input: ToxicUpdate = parse(&body)?;
    let mut attrs = updated.kind.attributes();
    attrs.extend(input.attributes.unwrap_or_default());
    updated.kind =
        ToxicKind::from_wire(updated.kind.type_name(), &attrs).map_err(ApiError::wire)?;
    updated.toxicity = input.toxicity.unwrap_or(updated.toxicity);
    entry.set_toxics(|list| {
        if let Some(t) = list.iter_mut().find(|t| t.name == toxic) {
            *t = updated.clone();
        }
    });
    Ok(json(StatusCode::OK, &updated))
}

async fn delete_toxic(
    State(s): State<Shared>,
    Path((name, toxic)): Path<(String, String)>,
) -> ApiResult {
    let proxies = s.lock().await;
    let entry = proxies.get(&name).ok_or_else(ApiError::proxy_not_found)?;
    if !entry.toxics.borrow().iter().any(|t| t.name == toxic) {
        return Err(ApiError::toxic_not_found());
    }
    entry.set_toxics(|list| list.retain(|t| t.name != toxic));
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Serves the API on `listener` until `shutdown` completes. Proxies run as tasks on the
/// calling runtime and close when it drops them.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // Not a graceful shutdown: an idle keep-alive API connection must not delay it.
    tokio::select! {
        result = axum::serve(listener, router()).into_future() => result?,
        () = shutdown => {}
    }
    Ok(())
}

/// A server running on its own thread and runtime, so a busy or blocked test runtime cannot
/// stall the proxies. Dropping it stops the server and closes every proxy.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Starts a server with its API on `addr` (e.g. `"127.0.0.1:0"`).
    pub fn start(addr: &str) -> Result<ServerHandle, Error> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("toxiproxy")
            .enable_all()
            .build()?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("toxiproxy-server".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve(listener, async move {
                        let _ = stopped.await;
                    })
                    .await
                });
                if let Err(e) = result {
                    tracing::error!(error = %e, "toxiproxy server failed");
                }
                // Dropping the runtime aborts every proxy task, closing their sockets.
                runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            })?;
        Ok(ServerHandle {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The API's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's base URL, e.g. `http://127.0.0.1:8474`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerHandle({})", self.url())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
