//! The HTTP side: accept loop, routing, REST handlers and WebSocket sessions.
//!
//! hyper 1.x has no server type, so this module owns the accept loop: it bounds the
//! number of connections, gives each a header deadline, and on shutdown stops accepting
//! and lets each connection finish the request in flight.

mod alerts;
mod error;
mod export;
mod limits;
mod linger;
pub mod metrics;
mod query;
pub(crate) mod realtime;
mod rest;
pub(crate) mod router;
pub mod settings;
mod tokens;

pub use error::ApiError;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use limits::{AddressSlots, RateLimiter, Slot};
use metrics::{Counters, Limit};

use crate::auth::host::{self, AllowedHosts};
use crate::auth::proxy::TrustedProxies;
use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::events::Hub;
use crate::sensors::HealthBoard;
use crate::shutdown::{DrainGuard, Shutdown};
use crate::store::Store;
use settings::{LimitsConfig, RealtimeConfig, ServerConfig, Settings};

/// Largest request head (request line and headers) a connection buffers; hyper answers
/// 431 above it.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Response bodies: whole buffers for REST, empty for upgrades, streams for exports and
/// event streams. A body that fails ends its response as a failed transfer (see
/// [`streamed`]).
pub type Body = UnsyncBoxBody<Bytes, StreamFailed>;

/// A body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A streamed body and the sender that feeds it, `capacity` chunks deep; the body ends
/// when the sender is dropped. The producer waits while the client is not reading, so a
/// stream costs constant memory however long it is. On an `Err` the connection is closed
/// without the final chunk, so the client sees a transfer cut short (curl exits
/// non-zero) rather than a document that only looks complete.
pub fn streamed(capacity: usize) -> (mpsc::Sender<Result<Bytes, StreamFailed>>, Body) {
    let (sender, receiver) = mpsc::channel(capacity);
    (sender, ChannelBody(receiver).boxed_unsync())
}

/// Why a streamed response was cut short.
#[derive(Debug)]
pub struct StreamFailed(pub String);

impl std::fmt::Display for StreamFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StreamFailed {}

struct ChannelBody(mpsc::Receiver<Result<Bytes, StreamFailed>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = StreamFailed;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailed>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|result| result.map(Frame::data)))
    }
}

/// A JSON response.
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("response shapes always serialise");
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// What every request handler may use.
pub struct State {
    pub store: Store,
    pub hub: Hub,
    /// Health of sampled sensors, shown with each sensor.
    pub health: Arc<HealthBoard>,
    /// Whether the time of a reading posted without one can be trusted.
    pub clock: Arc<Clock>,
    /// How far ahead of the clock a posted reading's time may be, in seconds, while the
    /// clock is trusted (`storage.max_future_s`).
    pub max_future_s: u64,
    pub server: ServerConfig,
    pub realtime: RealtimeConfig,
    pub limits: LimitsConfig,
    /// Browser origins allowed besides the gateway's own.
    pub allowed_origins: Vec<String>,
    /// What requests may name in `Host`.
    pub allowed_hosts: AllowedHosts,
    /// Proxies whose forwarding headers name the client.
    pub proxies: TrustedProxies,
    pub auth: Authenticator,
    /// The data directory, where a token's revocation is marked for other processes.
    pub data_dir: PathBuf,
    pub counters: Counters,
    pub write_limiter: RateLimiter,
    pub socket_limiter: RateLimiter,
    pub address_slots: Arc<AddressSlots>,
    pub started: Instant,
    /// Wall-clock start time, in storage units.
    pub started_at: crate::model::Micros,
    pub shutdown: Shutdown,
    /// Cloned into every WebSocket session, which hyper no longer tracks once upgraded.
    pub drain: DrainGuard,
    /// Writes live events to WebSocket clients that are idle (see [`realtime::fanout`]).
    pub fanout: Arc<realtime::fanout::Fanout>,
    /// The fleet uplink's counters, when it runs.
    pub uplink: Option<Arc<crate::uplink::Stats>>,
    /// The alert watcher, when it runs.
    pub alerts: Option<crate::alerts::Alerts>,
}

impl State {
    /// The state a server runs with, limits and policy taken from `settings`.
    pub fn new(
        settings: Settings,
        store: Store,
        hub: Hub,
        health: Arc<HealthBoard>,
        clock: Arc<Clock>,
        shutdown: Shutdown,
        drain: DrainGuard,
    ) -> State {
        let Settings {
            server,
            realtime,
            limits,
            auth,
            data_dir,
            max_future_s,
        } = settings;
        State {
            auth: Authenticator::new(store.clone(), auth.policy, &data_dir),
            data_dir: data_dir.clone(),
            store,
            hub,
            health,
            clock,
            max_future_s,
            allowed_hosts: AllowedHosts::new(
                server.listen.ip(),
                host::host_name().as_deref(),
                &auth.allowed_hosts,
            ),
            proxies: TrustedProxies::new(&server.trusted_proxies),
            allowed_origins: auth.allowed_origins,
            server,
            realtime,
            counters: Counters::default(),
            write_limiter: RateLimiter::new(limits.writes_per_second, limits.write_burst),
            socket_limiter: RateLimiter::new(
                limits.socket_messages_per_second,
                limits.socket_message_burst,
            ),
            limits,
            address_slots: Arc::default(),
            started: Instant::now(),
            started_at: crate::model::now_micros(),
            shutdown,
            drain,
            fanout: Arc::default(),
            uplink: None,
            alerts: None,
        }
    }

    /// Shows the uplink's counters in `/metrics`.
    pub fn with_uplink(mut self, stats: Option<Arc<crate::uplink::Stats>>) -> State {
        self.uplink = stats;
        self
    }

    /// The same state, answering alert requests with `alerts`.
    pub fn with_alerts(mut self, alerts: Option<crate::alerts::Alerts>) -> State {
        self.alerts = alerts;
        self
    }
}

/// Serves HTTP on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let permits = Arc::new(Semaphore::new(state.server.max_connections));
    let mut shutdown = state.shutdown.clone();
    {
        let state = state.clone();
        tokio::spawn(async move { state.auth.watch_tokens(state.shutdown.clone()).await });
    }
    tokio::spawn(
        state
            .fanout
            .clone()
            .run(state.hub.clone(), state.shutdown.clone()),
    );
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Refused connections are closed at once: a full gateway must not also hold
        // sockets for clients it will not serve.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            state.counters.hit(Limit::Connections);
            log::warn!(
                "connection from {peer} refused: {} connections open",
                state.server.max_connections
            );
            continue;
        };
        // A trusted proxy's connections carry many clients: each client's streams take
        // their places when they start (see the router), not the proxy's connection.
        let slot = if state.proxies.trusts(peer.ip()) {
            None
        } else {
            let Some(slot) = state
                .address_slots
                .take(peer.ip(), state.limits.max_connections_per_address)
            else {
                state.counters.hit(Limit::ConnectionsPerAddress);
                log::warn!(
                    "connection from {peer} refused: {} connections open from that address",
                    state.limits.max_connections_per_address
                );
                continue;
            };
            Some(slot)
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let admission = Arc::new(Admission {
            _permit: permit,
            _slot: slot,
            linger: AtomicBool::new(false),
        });
        tokio::spawn(serve_connection(stream, peer, state, admission));
    }
}

/// Who a request is from: the TCP peer and the client it is for (the same unless the
/// peer is a trusted proxy).
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub peer: SocketAddr,
    pub address: IpAddr,
}

/// What a stream holds for as long as it lives: its connection's places under the
/// limits, and the client's place when it came through a trusted proxy.
pub struct StreamAdmission {
    _connection: Arc<Admission>,
    _client: Option<Slot>,
}

/// A connection's places under the connection limits: held by the connection, and by
/// the WebSocket session it may become, which outlives it in hyper's eyes.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    _slot: Option<Slot>,
    linger: AtomicBool,
}

impl Admission {
    /// The connection was answered before its request was read to the end: when it
    /// closes, it drains what the client still sends first, so that the client reads
    /// the answer rather than a reset (see [`linger`]).
    pub fn linger_on_close(&self) {
        self.linger.store(true, Ordering::Relaxed);
    }

    fn lingers(&self) -> bool {
        self.linger.load(Ordering::Relaxed)
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    admission: Arc<Admission>,
) {
    let _drain = state.drain.clone();
    let mut shutdown = state.shutdown.clone();
    let service_state = state.clone();
    let local = stream
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or(state.server.listen.ip());
    let io = TokioIo::new(linger::LingeringStream::new(stream, admission.clone()));
    let connection_admission = admission.clone();
    let service = service_fn(move |req| {
        let state = service_state.clone();
        let admission = admission.clone();
        let connection = router::Connection { peer, local };
        async move { Ok::<_, Infallible>(router::route(req, state, connection, admission).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(state.server.header_read_timeout_s))
        .max_headers(state.limits.max_headers)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.recv() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            state.counters.hit(Limit::HeaderTimeout);
        } else if e.is_parse_too_large() {
            // hyper answered 431 or 414 while the client may still be sending.
            connection_admission.linger_on_close();
            state.counters.hit(Limit::HeaderSize);
        }
        log::debug!("connection from {peer}: {e}");
    }
}
