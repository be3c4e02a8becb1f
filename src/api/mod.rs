//! The HTTP side: accept loop, routing, REST handlers and WebSocket sessions.
//!
//! hyper 1.x has no server type, so this module owns the accept loop: it bounds the
//! number of connections, gives each a header deadline, and on shutdown stops accepting
//! and lets each connection finish the request in flight.

mod error;
mod query;
mod realtime;
mod rest;
mod router;

pub use error::ApiError;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::{RealtimeConfig, ServerConfig};
use crate::events::Hub;
use crate::sensors::HealthBoard;
use crate::shutdown::{DrainGuard, Shutdown};
use crate::store::Store;

/// Response bodies: whole buffers for REST, empty for upgrades.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
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
    pub server: ServerConfig,
    pub realtime: RealtimeConfig,
    pub started: Instant,
    /// Wall-clock start time, in storage units.
    pub started_at: crate::model::Micros,
    pub shutdown: Shutdown,
    /// Cloned into every WebSocket session, which hyper no longer tracks once upgraded.
    pub drain: DrainGuard,
}

/// Serves HTTP on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let permits = Arc::new(Semaphore::new(state.server.max_connections));
    let mut shutdown = state.shutdown.clone();
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            log::warn!(
                "connection from {peer} refused: {} connections open",
                state.server.max_connections
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, state).await;
            drop(permit);
        });
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, state: Arc<State>) {
    let _drain = state.drain.clone();
    let mut shutdown = state.shutdown.clone();
    let service_state = state.clone();
    let service = service_fn(move |req| {
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(router::route(req, state, peer).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(state.server.header_read_timeout_s))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service)
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
        log::debug!("connection from {peer}: {e}");
    }
}
