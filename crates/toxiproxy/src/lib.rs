//! A Toxiproxy-compatible fault-injection TCP proxy and a client for its HTTP API.
//!
//! The server speaks the HTTP API of Shopify's Toxiproxy 2.x, so tests written against
//! [`client::Client`] run unchanged against a real `toxiproxy-server`. [`launch`] picks
//! which server a test uses.

#![warn(missing_docs)]

pub mod client;
mod engine;
pub mod launch;
pub mod server;
mod types;

pub use client::Client;
pub use launch::{connect_or_start, Backend};
pub use server::{serve, ServerHandle};
pub use types::{Proxy, Stream, Toxic, ToxicKind};

/// The version string the server reports on `GET /version`.
pub const VERSION: &str = concat!("pgquorum-toxiproxy ", env!("CARGO_PKG_VERSION"));

/// Errors of the client, the in-process server and the launcher.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with a non-success HTTP status.
    #[error("toxiproxy API returned HTTP {status}: {message}")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The server's error message (its `error` field, or the raw body).
        message: String,
    },
    /// The base URL could not be used.
    #[error("invalid toxiproxy URL {0:?}")]
    Url(String),
    /// The HTTP exchange itself failed (connection refused, broken response, ...).
    #[error("HTTP request to {url} failed: {message}")]
    Http {
        /// The request URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The server did not answer in time.
    #[error("HTTP request to {0} timed out")]
    Timeout(String),
    /// A response body was not the JSON expected.
    #[error("unexpected JSON from toxiproxy: {0}")]
    Json(#[from] serde_json::Error),
    /// Binding, spawning or another I/O operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// No server could be reached or started.
    #[error("{0}")]
    Launch(String),
}

impl Error {
    /// The HTTP status when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}
