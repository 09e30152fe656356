//! The JSON objects of the Toxiproxy API, shared by the server and the client.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A proxy as the API reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proxy {
    /// Unique name.
    pub name: String,
    /// The address it listens on; the actual bound address, so a requested port 0 is resolved.
    pub listen: String,
    /// The address each accepted connection is forwarded to.
    pub upstream: String,
    /// Whether it accepts and forwards connections.
    pub enabled: bool,
    /// Its toxics, in the order they apply.
    #[serde(default)]
    pub toxics: Vec<Toxic>,
}

/// The direction of a connection a toxic applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Bytes from the client towards the upstream server.
    Upstream,
    /// Bytes from the upstream server back to the client.
    Downstream,
}

impl Stream {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        }
    }

    fn parse(s: &str) -> Option<Stream> {
        match s.to_ascii_lowercase().as_str() {
            "upstream" => Some(Stream::Upstream),
            "downstream" => Some(Stream::Downstream),
            _ => None,
        }
    }
}

/// A toxic's type and attributes. Times are milliseconds unless noted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToxicKind {
    /// Delay each chunk by `latency` ± `jitter`.
    Latency {
        /// Delay.
        latency: u64,
        /// Random variation either side of the delay.
        jitter: u64,
    },
    /// Drop all data; close the connection after `timeout` unless it is 0.
    Timeout {
        /// Time until the connection is closed; 0 keeps it open.
        timeout: u64,
    },
    /// Limit throughput to `rate` KB/s (0 means unlimited).
    Bandwidth {
        /// Kilobytes (1000 bytes) per second.
        rate: u64,
    },
    /// Delay the close of the connection by `delay`.
    SlowClose {
        /// Delay.
        delay: u64,
    },
    /// Close the connection once `bytes` have passed.
    LimitData {
        /// Bytes allowed through.
        bytes: u64,
    },
    /// Split data into pieces of about `average_size` ± `size_variation` bytes.
    Slicer {
        /// Mean piece size in bytes.
        average_size: u64,
        /// Random variation of the piece size in bytes.
        size_variation: u64,
        /// Pause between pieces in microseconds.
        delay: u64,
    },
    /// Drop data and reset the connection (TCP RST) `timeout` after data arrives.
    ResetPeer {
        /// Time until the reset.
        timeout: u64,
    },
}

/// Why a toxic object from the wire was rejected.
#[derive(Debug)]
pub(crate) enum WireError {
    InvalidStream,
    InvalidType,
    BadAttributes(String),
}

impl ToxicKind {
    /// The API's `type` of this toxic.
    pub fn type_name(&self) -> &'static str {
        match self {
            ToxicKind::Latency { .. } => "latency",
            ToxicKind::Timeout { .. } => "timeout",
            ToxicKind::Bandwidth { .. } => "bandwidth",
            ToxicKind::SlowClose { .. } => "slow_close",
            ToxicKind::LimitData { .. } => "limit_data",
            ToxicKind::Slicer { .. } => "slicer",
            ToxicKind::ResetPeer { .. } => "reset_peer",
        }
    }

    /// The API's `attributes` object of this toxic.
    pub fn attributes(&self) -> Map<String, Value> {
        let pairs: &[(&str, u64)] = match *self {
            ToxicKind::Latency { latency, jitter } => &[("latency", latency), ("jitter", jitter)],
            ToxicKind::Timeout { timeout } | ToxicKind::ResetPeer { timeout } => {
                &[("timeout", timeout)]
            }
            ToxicKind::Bandwidth { rate } => &[("rate", rate)],
            ToxicKind::SlowClose { delay } => &[("delay", delay)],
            ToxicKind::LimitData { bytes } => &[("bytes", bytes)],
            ToxicKind::Slicer {
                average_size,
                size_variation,
                delay,
            } => &[
                ("average_size", average_size),
                ("size_variation", size_variation),
                ("delay", delay),
            ],
        };
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    /// Builds a kind from the API's `type` and `attributes`; absent attributes are 0 as in Go.
    pub(crate) fn from_wire(
        kind: &str,
        attrs: &Map<String, Value>,
    ) -> Result<ToxicKind, WireError> {
        let get = |key: &str| -> Result<u64, WireError> {
            match attrs.get(key) {
                None | Some(Value::Null) => Ok(0),
                Some(v) => v
                    .as_u64()
                    // Go accepts negative numbers; every toxic treats them like 0.
                    .or_else(|| v.as_i64().map(|_| 0))
                    .ok_or_else(|| {
                        WireError::BadAttributes(format!("attribute {key} must be an integer"))
                    }),
            }
        };
        Ok(match kind {
            "latency" => ToxicKind::Latency {
                latency: get("latency")?,
                jitter: get("jitter")?,
            },
            "timeout" => ToxicKind::Timeout {
                timeout: get("timeout")?,
            },
            "bandwidth" => ToxicKind::Bandwidth { rate: get("rate")? },
            "slow_close" => ToxicKind::SlowClose {
                delay: get("delay")?,
            },
            "limit_data" => ToxicKind::LimitData {
                bytes: get("bytes")?,
            },
            "slicer" => ToxicKind::Slicer {
                average_size: get("average_size")?,
                size_variation: get("size_variation")?,
                delay: get("delay")?,
            },
            "reset_peer" => ToxicKind::ResetPeer {
                timeout: get("timeout")?,
            },
            _ => return Err(WireError::InvalidType),
        })
    }
}

/// A toxic attached to one stream of a proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "ToxicWire", try_from = "ToxicWire")]
pub struct Toxic {
    /// Unique name within its proxy.
    pub name: String,
    /// The direction it applies to.
    pub stream: Stream,
    /// Probability (0..=1) that it applies to a given connection.
    pub toxicity: f32,
    /// Type and attributes.
    pub kind: ToxicKind,
}

impl Toxic {
    /// A toxic that applies to every connection (toxicity 1.0).
    pub fn new(name: impl Into<String>, stream: Stream, kind: ToxicKind) -> Toxic {
        Toxic {
            name: name.into(),
            stream,
            toxicity: 1.0,
            kind,
        }
    }

    /// Reads a toxic with the server's defaults: stream downstream, toxicity 1, name `<type>_<stream>`.
    pub(crate) fn from_wire(wire: ToxicWire) -> Result<Toxic, WireError> {
        let stream = match wire.stream.as_deref() {
            None | Some("") => Stream::Downstream,
            Some(s) => Stream::parse(s).ok_or(WireError::InvalidStream)?,
        };
        let kind = ToxicKind::from_wire(&wire.kind, &wire.attributes.unwrap_or_default())?;
        let name = match wire.name {
            Some(n) if !n.is_empty() => n,
            _ => format!("{}_{}", wire.kind, stream.as_str()),
        };
        Ok(Toxic {
            name,
            stream,
            toxicity: wire.toxicity.unwrap_or(1.0),
            kind,
        })
    }
}

/// A toxic exactly as it appears on the wire, with every field optional.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct ToxicWire {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default)]
    pub toxicity: Option<f32>,
    #[serde(default)]
    pub attributes: Option<Map<String, Value>>,
}

impl From<Toxic> for ToxicWire {
    fn from(t: Toxic) -> ToxicWire {
        ToxicWire {
            name: Some(t.name),
            kind: t.kind.type_name().to_string(),
            stream: Some(t.stream.as_str().to_string()),
            toxicity: Some(t.toxicity),
            attributes: Some(t.kind.attributes()),
        }
    }
}

impl TryFrom<ToxicWire> for Toxic {
    type Error = String;
    fn try_from(wire: ToxicWire) -> Result<Toxic, String> {
        let kind = wire.kind.clone();
        Toxic::from_wire(wire).map_err(|e| match e {
            WireError::InvalidStream => "invalid stream".to_string(),
            WireError::InvalidType => format!("unknown toxic type {kind:?}"),
            WireError::BadAttributes(m) => m,
        })
    }
}
