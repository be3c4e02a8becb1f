//! A real WebSocket client of the daemon.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Daemon, PATIENCE};

/// A test's WebSocket client.
pub struct Client {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a client received, other than JSON text.
#[derive(Debug, PartialEq)]
pub enum Received {
    Json(Value),
    Closed(Option<u16>, String),
}

impl Client {
    /// Opens a WebSocket to `addr` at `path_and_query`.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> Client {
        let url = format!("ws://{addr}{path_and_query}");
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Client { socket }
    }

    /// A client over a socket with a small receive buffer, so that a client that does not
    /// read pushes back on the server quickly.
    pub async fn with_small_buffer(addr: SocketAddr, path_and_query: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (socket, _) = tokio_tungstenite::client_async(
            format!("ws://{addr}{path_and_query}"),
            MaybeTlsStream::Plain(stream),
        )
        .await
        .expect("websocket connects");
        Client { socket }
    }

    /// The next message, skipping pings; panics after [`PATIENCE`].
    pub async fn next(&mut self) -> Received {
        self.next_within(PATIENCE).await.expect("a message in time")
    }

    /// The next message, or `None` if nothing arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Received> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(Received::Json(
                        serde_json::from_str(&text).expect("JSON text"),
                    ))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Received::Closed(
                        frame.as_ref().map(|f| u16::from(f.code)),
                        frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(Received::Closed(None, e.to_string())),
                None => return Some(Received::Closed(None, "stream ended".into())),
            }
        }
    }

    /// The next JSON message; panics on anything else.
    pub async fn json(&mut self) -> Value {
        match self.next().await {
            Received::Json(v) => v,
            other => panic!("expected JSON, got {other:?}"),
        }
    }

    /// Skips the connection and stats greeting, checking its shape.
    pub async fn greeted(mut self) -> Client {
        let connection = self.json().await;
        assert_eq!(connection["type"], "connection");
        let stats = self.json().await;
        assert_eq!(stats["type"], "stats");
        self
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::text(text.to_owned()))
            .await
            .unwrap();
    }
}

impl Client {
    /// Checks that nothing reached this client before a marker event that `daemon` sends
    /// now on `channel` (which this client must receive): events go out in `seq` order, so
    /// whatever was due before the marker would come first.
    pub async fn assert_quiet(&mut self, daemon: &Daemon, channel: &str, why: &str) {
        let marker = daemon.marker(channel).await;
        self.assert_next_is_marker(marker, why).await;
    }

    /// Checks that the next thing this client receives is the marker event `seq` (see
    /// [`Daemon::marker`]), so that nothing else was due to it before.
    pub async fn assert_next_is_marker(&mut self, seq: u64, why: &str) {
        match self.next().await {
            Received::Json(event) if event["type"] == "test_event" && event["seq"] == seq => {}
            other => panic!("{why}: expected nothing before the marker {seq}, got {other:?}"),
        }
    }
}
