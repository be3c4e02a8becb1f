//! The HTTP surface's settings (`[server]`, `[realtime]`, `[limits]`), and everything a
//! server is started with.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::auth::AuthConfig;

/// What a server runs with, composed from the config file in `app`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerConfig,
    pub realtime: RealtimeConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    /// The data directory (`storage.data_dir`).
    pub data_dir: PathBuf,
    /// How far ahead of the clock a posted reading's time may be, in seconds
    /// (`storage.max_future_s`).
    pub max_future_s: u64,
}

/// HTTP server and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub dev: bool,
    pub max_connections: usize,
    pub max_body_bytes: usize,
    pub header_read_timeout_s: u64,
    /// Reverse proxies (addresses or `address/prefix` blocks) whose `X-Forwarded-For` or
    /// `Forwarded` header says which client a request is for; none by default.
    pub trusted_proxies: Vec<String>,
    /// Longest a request body may take to arrive, from the moment its handler starts
    /// reading it: a client trickling a body must not hold a connection for minutes.
    pub body_read_timeout_s: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            dev: false,
            max_connections: 256,
            max_body_bytes: 64 * 1024,
            header_read_timeout_s: 10,
            trusted_proxies: Vec::new(),
            body_read_timeout_s: 10,
        }
    }
}

/// WebSocket sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeConfig {
    pub client_queue: usize,
    pub ping_interval_s: u64,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        RealtimeConfig {
            client_queue: 1024,
            ping_interval_s: 30,
        }
    }
}

/// Hard limits and rates, each sized for a Pi on a shared LAN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections from one address at once.
    pub max_connections_per_address: usize,
    /// Longest request URI, in bytes (414 above).
    pub max_uri_bytes: usize,
    /// Most request headers (431 above).
    pub max_headers: usize,
    /// REST writes per second per token, or per client address without one, with this
    /// burst.
    pub writes_per_second: f64,
    pub write_burst: f64,
    /// Client WebSocket messages per second per token, or per client address without
    /// one, with this burst.
    pub socket_messages_per_second: f64,
    pub socket_message_burst: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections_per_address: 64,
            max_uri_bytes: 8 * 1024,
            max_headers: 64,
            writes_per_second: 50.0,
            write_burst: 100.0,
            socket_messages_per_second: 10.0,
            socket_message_burst: 20.0,
        }
    }
}
