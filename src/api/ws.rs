//! WebSocket sessions: the upgrade, then one task per client that forwards the hub's
//! events on the client's channels and answers the client's messages.
//!
//! Close codes: 1001 when the daemon shuts down, 4008 when the client fell too far behind
//! (it should reconnect and resume), 4000 when it stopped answering pings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::tungstenite::handshake::server::create_response_with_body;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::query::Query;
use super::{full, ApiError, Body, State};
use crate::events::{self, Channel, Event};
use crate::model::{format_time, now_micros};

/// Socket buffers sized for many small JSON frames: tungstenite's 128 KiB defaults cost
/// memory per client and zero-fill time on every read.
const SOCKET_BUFFER: usize = 4 * 1024;
/// Largest message a client may send; client messages are small JSON commands.
const MAX_CLIENT_MESSAGE: usize = 16 * 1024;
/// A client whose socket accepts nothing for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most queued events written before one flush.
const MAX_FRAMES_PER_FLUSH: usize = 256;

const CLOSE_SLOW: u16 = 4008;
const CLOSE_PING_TIMEOUT: u16 = 4000;

fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

/// Validates the request, answers 101, and starts the session once hyper hands over the
/// connection.
pub fn upgrade(
    mut req: Request<Incoming>,
    state: Arc<State>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(req.uri().query());
    let channels = parse_channels(&query)?;
    let response = create_response_with_body(&req, || full(""))
        .map_err(|e| ApiError::malformed(format!("Not a valid WebSocket upgrade: {e}")))?;
    let upgrading = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrading.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(socket_config()),
                )
                .await;
                Session::new(state, channels, peer).run(socket).await;
            }
            Err(e) => log::debug!("upgrade from {peer} failed: {e}"),
        }
    });
    let (parts, body) = response.into_parts();
    debug_assert_eq!(parts.status, StatusCode::SWITCHING_PROTOCOLS);
    Ok(Response::from_parts(parts, body))
}

/// `channel` may repeat or hold a comma-separated list; without it a client gets
/// `general`, as with the original service.
fn parse_channels(query: &Query) -> Result<Vec<Channel>, ApiError> {
    let names = query.all("channel");
    if names.is_empty() {
        return Ok(vec![Channel::General]);
    }
    let mut channels = Vec::new();
    for name in names {
        let channel: Channel = name.parse().map_err(|_| ApiError::unknown_channel(name))?;
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    Ok(channels)
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Unique within a run and, with the start time in it, across restarts.
fn client_id(state: &State) -> String {
    let n = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{n}", state.started_at / 1_000_000)
}

struct Session {
    state: Arc<State>,
    channels: Vec<Channel>,
    peer: SocketAddr,
    client_id: String,
}

/// Why a session ended, decided inside the loop and acted on once.
enum End {
    /// The client closed or the connection broke: nothing more to send.
    Gone,
    /// Close the socket with this code and reason.
    Close(u16, String),
}

impl Session {
    fn new(state: Arc<State>, channels: Vec<Channel>, peer: SocketAddr) -> Session {
        let client_id = client_id(&state);
        Session {
            state,
            channels,
            peer,
            client_id,
        }
    }

    fn wants(&self, event: &Event) -> bool {
        self.channels.contains(&event.channel)
    }

    async fn run(self, socket: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) {
        let _drain = self.state.drain.clone();
        let _registration = self.state.hub.register(&self.channels);
        // Subscribe before greeting, so that nothing emitted after the greeting is missed.
        let mut events = self.state.hub.subscribe();
        let mut shutdown = self.state.shutdown.clone();
        let (mut sink, mut stream) = socket.split();
        let now = now_micros();
        let channel_names: Vec<&str> = self.channels.iter().map(|c| c.as_str()).collect();
        let greeting = [
            events::connection_message(&channel_names.join(","), &self.client_id, now),
            events::stats_message(&self.state.hub.stats(), now),
        ];
        for text in greeting {
            if sink.feed(Message::text(text)).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
        log::debug!(
            "client {} ({}) connected to {}",
            self.client_id,
            self.peer,
            channel_names.join(",")
        );

        let ping_every = Duration::from_secs(self.state.realtime.ping_interval_s);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let mut answered_ping = true;
        let mut last_seq = 0;

        let end = loop {
            tokio::select! {
                _ = shutdown.recv() => break End::Close(1001, "server shutting down".into()),
                received = events.recv() => {
                    let mut batch = Vec::new();
                    match received {
                        Ok(event) => batch.push(event),
                        Err(RecvError::Lagged(_)) => break self.too_slow(last_seq),
                        Err(RecvError::Closed) => break End::Close(1001, "server shutting down".into()),
                    }
                    let mut lagged = false;
                    while batch.len() < MAX_FRAMES_PER_FLUSH {
                        match events.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                                lagged = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if lagged {
                        break self.too_slow(last_seq);
                    }
                    let mut sent = [0u64; 3];
                    for event in batch.iter().filter(|e| self.wants(e)) {
                        if sink.feed(Message::Text(event.frame.clone())).await.is_err() {
                            break;
                        }
                        sent[event.channel.index()] += 1;
                    }
                    if let Some(event) = batch.last() {
                        last_seq = event.seq;
                    }
                    match tokio::time::timeout(WRITE_TIMEOUT, sink.flush()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break End::Gone,
                        Err(_) => break self.too_slow(last_seq),
                    }
                    for channel in Channel::ALL {
                        if sent[channel.index()] > 0 {
                            self.state.hub.count_sent(channel, sent[channel.index()]);
                        }
                    }
                }
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        answered_ping = true;
                        let reply = self.answer(&text);
                        if sink.send(Message::text(reply)).await.is_err() {
                            break End::Gone;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let reply = events::error_message(None, "unsupported", "Binary messages are not supported; send JSON text", now_micros());
                        if sink.send(Message::text(reply)).await.is_err() {
                            break End::Gone;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break End::Gone,
                    Some(Ok(_)) => answered_ping = true,
                    Some(Err(e)) => {
                        log::debug!("client {}: {e}", self.client_id);
                        break End::Close(1009, "message too large or malformed".into());
                    }
                },
                _ = ping.tick() => {
                    if !answered_ping {
                        break End::Close(CLOSE_PING_TIMEOUT, "no answer to ping".into());
                    }
                    answered_ping = false;
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break End::Gone;
                    }
                }
            }
        };
        if let End::Close(code, reason) = end {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: Utf8Bytes::from(reason),
            };
            let _ =
                tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
        }
        log::debug!("client {} disconnected", self.client_id);
    }

    fn too_slow(&self, last_seq: u64) -> End {
        for &channel in &self.channels {
            self.state.hub.count_slow_disconnect(channel);
        }
        log::info!(
            "client {} ({}) disconnected: too slow",
            self.client_id,
            self.peer
        );
        End::Close(
            CLOSE_SLOW,
            format!("too slow; reconnect with since={last_seq}"),
        )
    }

    /// Answers one client message. Every message gets an answer: a result or an error.
    fn answer(&self, text: &str) -> String {
        let now = now_micros();
        let message: Value = match serde_json::from_str(text) {
            Ok(value @ Value::Object(_)) => value,
            _ => {
                return events::error_message(
                    None,
                    "malformed",
                    "Messages must be JSON objects",
                    now,
                )
            }
        };
        let id = message.get("id");
        match message.get("type").and_then(Value::as_str) {
            Some("ping") => {
                json!({"type": "pong", "id": id, "timestamp": format_time(now)}).to_string()
            }
            Some(other) => events::error_message(
                id,
                "unknown_action",
                &format!("Unknown message type '{other}'"),
                now,
            ),
            None => events::error_message(id, "malformed", "Messages need a \"type\"", now),
        }
    }
}
