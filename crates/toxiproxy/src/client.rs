//! An async client for the Toxiproxy HTTP API (plain http only).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{Proxy, Toxic};
use crate::Error;

/// Generous, since real Toxiproxy can take a while to interrupt busy toxics.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one Toxiproxy server.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// A client for the server at `base_url` (`http://host:port`; a bare `host:port` works too).
    pub fn new(base_url: &str) -> Result<Client, Error> {
        let trimmed = base_url.trim().trim_end_matches('/');
        let base = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        let uri: http::Uri = base.parse().map_err(|_| Error::Url(base_url.to_string()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(Error::Url(base_url.to_string()));
        }
        // No pooling: a reused connection to a server that restarted would fail spuriously.
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(HttpConnector::new());
        Ok(Client { base, http })
    }

    /// The base URL requests go to.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The server's version; Toxiproxy 2.5+ answers JSON, older versions plain text.
    pub async fn version(&self) -> Result<String, Error> {
        let body = self.send(Method::GET, "/version", None).await?;
        let text = String::from_utf8_lossy(&body);
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => match v.get("version").and_then(|v| v.as_str()) {
                Some(version) => Ok(version.to_string()),
                None => Ok(text.trim().to_string()),
            },
            Err(_) => Ok(text.trim().to_string()),
        }
    }

    /// Removes every toxic and re-enables every proxy.
    pub async fn reset(&self) -> Result<(), Error> {
        self.send(Method::POST, "/reset", None).await.map(drop)
    }

    /// All proxies by name.
    pub async fn proxies(&self) -> Result<BTreeMap<String, Proxy>, Error> {
        self.get_json("/proxies").await
    }

    /// Creates an enabled proxy; `listen` may use port 0, and the result reports the port.
    pub async fn create_proxy(
        &self,
        name: &str,
        listen: &str,
        upstream: &str,
    ) -> Result<Proxy, Error> {
        let body = serde_json::json!({
            "name": name, "listen": listen, "upstream": upstream, "enabled": true,
        });
        self.send_json(Method::POST, "/proxies", &body).await
    }

    /// One proxy.
    pub async fn proxy(&self, name: &str) -> Result<Proxy, Error> {
        self.get_json(&format!("/proxies/{}", segment(name))).await
    }

    /// Enables or disables a proxy; disabling closes its listener and its connections.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<Proxy, Error> {
        // POST rather than PATCH: every Toxiproxy 2.x accepts it.
        let path = format!("/proxies/{}", segment(name));
        self.send_json(
            Method::POST,
            &path,
            &serde_json::json!({ "enabled": enabled }),
        )
        .await
    }

    /// Deletes a proxy, closing its connections.
    pub async fn delete_proxy(&self, name: &str) -> Result<(), Error> {
        let path = format!("/proxies/{}", segment(name));
        self.send(Method::DELETE, &path, None).await.map(drop)
    }

    /// Adds a toxic to a proxy; it applies to existing connections too.
    pub async fn add_toxic(&self, proxy: &str, toxic: &Toxic) -> Result<Toxic, Error> {
        let path = format!("/proxies/{}/toxics", segment(proxy));
        self.send_json(Method::POST, &path, toxic).await
    }

    /// Replaces the attributes and toxicity of the toxic named `toxic.name`.
    pub async fn update_toxic(&self, proxy: &str, toxic: &Toxic) -> Result<Toxic, Error> {
        let path = format!(
            "/proxies/{}/toxics/{}",
            segment(proxy),
            segment(&toxic.name)
        );
        self.send_json(Method::POST, &path, toxic).await
    }

    /// Removes a toxic.
    pub async fn remove_toxic(&self, proxy: &str, name: &str) -> Result<(), Error> {
        let path = format!("/proxies/{}/toxics/{}", segment(proxy), segment(name));
        self.send(Method::DELETE, &path, None).await.map(drop)
    }

    /// A proxy's toxics in the order they apply.
    pub async fn toxics(&self, proxy: &str) -> Result<Vec<Toxic>, Error> {
        self.get_json(&format!("/proxies/{}/toxics", segment(proxy)))
            .await
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let body = self.send(Method::GET, path, None).await?;
        Ok(serde_json::from_slice(&body)?)
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, Error> {
        let body = self
            .send(method, path, Some(serde_json::to_vec(body)?))
            .await?;
        Ok(serde_json::from_slice(&body)?)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, Error> {
        let url = format!("{}{}", self.base, path);
        let http_err = |message: String| Error::Http {
            url: url.clone(),
            message,
        };
        let request = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "pgquorum-toxiproxy-client")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http_err(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| http_err(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| http_err(e.to_string()))?
                .to_bytes();
            Ok::<_, Error>((status, body))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::Timeout(url.clone()))??;
        if status.is_success() {
            Ok(body)
        } else {
            Err(api_error(status, &body))
        }
    }
}

/// Toxiproxy's errors are `{"error": "...", "status": N}`; anything else is reported raw.
fn api_error(status: StatusCode, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(body);
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    Error::Api {
        status: status.as_u16(),
        message,
    }
}

/// Percent-encodes a path segment, since proxy names are free text.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
