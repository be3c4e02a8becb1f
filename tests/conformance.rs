//! Protocol conformance of the server side, with raw frames and raw HTTP: the WebSocket
//! close handshake both ways (RFC 6455 §5.5.1, §7), the frame-level rules a client can
//! break, connection slots under quick connect/close cycles, and early HTTP answers that
//! a client writing its whole request before reading still receives.

mod common;

use std::time::Duration;

use common::{Daemon, PATIENCE, SENSOR};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const FIN: u8 = 0x80;

/// A WebSocket client that writes frames byte by byte, so that it can break every rule.
struct RawSocket {
    stream: TcpStream,
    /// Bytes read past the last frame taken.
    buffered: Vec<u8>,
}

/// A frame as the server sent it.
#[derive(Debug)]
struct ServerFrame {
    first_byte: u8,
    payload: Vec<u8>,
}

impl ServerFrame {
    fn opcode(&self) -> u8 {
        self.first_byte & 0x0F
    }

    /// The code of a Close frame; `None` for an empty one.
    fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode(), CLOSE, "expected a Close frame, got {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    fn json(&self) -> serde_json::Value {
        assert_eq!(self.opcode(), TEXT, "expected a text frame, got {self:?}");
        serde_json::from_slice(&self.payload).expect("JSON text")
    }
}

impl RawSocket {
    async fn connect(daemon: &Daemon, path_and_query: &str) -> RawSocket {
        let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
        let head = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            daemon.addr
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut socket = RawSocket {
            stream,
            buffered: Vec::new(),
        };
        let end = loop {
            if let Some(end) = socket.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(socket.fill().await > 0, "closed during the handshake");
        };
        let head = String::from_utf8_lossy(&socket.buffered[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        socket.buffered.drain(..end);
        socket
    }

    /// Connects and reads the connection and stats greeting.
    async fn greeted(daemon: &Daemon, path_and_query: &str) -> RawSocket {
        let mut socket = RawSocket::connect(daemon, path_and_query).await;
        assert_eq!(socket.frame().await.json()["type"], "connection");
        assert_eq!(socket.frame().await.json()["type"], "stats");
        socket
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .unwrap_or(0);
        self.buffered.extend_from_slice(&chunk[..n]);
        n
    }

    /// Sends one frame: `first_byte` holds FIN, the reserved bits and the opcode.
    async fn send(&mut self, first_byte: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![first_byte];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= 0xFFFF => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn send_close(&mut self, code: Option<u16>) {
        let payload = code.map(u16::to_be_bytes).unwrap_or_default();
        let payload = if code.is_some() { &payload[..] } else { &[] };
        self.send(FIN | CLOSE, payload, true).await;
    }

    /// The next frame the server sent; panics if the connection ends first.
    async fn frame(&mut self) -> ServerFrame {
        self.try_frame().await.expect("a frame before the end")
    }

    /// The next frame, or `None` if the server closed the connection first.
    async fn try_frame(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buffered) {
                self.buffered.drain(..used);
                return Some(frame);
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// The next frame other than a ping.
    async fn frame_skipping_pings(&mut self) -> ServerFrame {
        loop {
            let frame = self.frame().await;
            if frame.opcode() != PING {
                return frame;
            }
        }
    }

    /// Whether the server closed the TCP connection (after anything still buffered).
    async fn closed_by_server(&mut self) -> bool {
        while self.try_frame().await.is_some() {}
        true
    }
}

/// One unmasked server frame from the front of `bytes`, and how many bytes it took.
fn parse_frame(bytes: &[u8]) -> Option<(ServerFrame, usize)> {
    if bytes.len() < 2 {
        return None;
    }
    assert_eq!(bytes[1] & 0x80, 0, "server frames are never masked");
    let (length, start) = match bytes[1] & 0x7F {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = bytes.get(start..start + length)?.to_vec();
    Some((
        ServerFrame {
            first_byte: bytes[0],
            payload,
        },
        start + length,
    ))
}

/// The value of the sample `series` (name and labels) in `/metrics`.
async fn metric(daemon: &Daemon, series: &str) -> u64 {
    daemon
        .metric(series)
        .await
        .unwrap_or_else(|| panic!("no {series} in /metrics")) as u64
}

/// Counted closes with `code` from `/metrics`.
async fn closes_counted(daemon: &Daemon, code: u16, initiator: &str) -> u64 {
    let series =
        format!("sensorgate_websocket_closes_total{{code=\"{code}\",initiator=\"{initiator}\"}}");
    metric(daemon, &series).await
}

#[tokio::test]
async fn a_client_close_is_answered_with_its_code_and_the_connection_ends() {
    let daemon = Daemon::with("").await;

    let mut socket = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;
    socket.send_close(Some(1000)).await;
    assert_eq!(socket.frame_skipping_pings().await.close_code(), Some(1000));
    assert!(socket.closed_by_server().await);

    // An application code is echoed as sent.
    let mut socket = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;
    socket.send_close(Some(4321)).await;
    assert_eq!(socket.frame_skipping_pings().await.close_code(), Some(4321));
    assert!(socket.closed_by_server().await);

    // A Close without a code is answered with 1000, not with an empty Close.
    let mut socket = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;
    socket.send_close(None).await;
    assert_eq!(socket.frame_skipping_pings().await.close_code(), Some(1000));
    assert!(socket.closed_by_server().await);

    assert_eq!(closes_counted(&daemon, 1000, "client").await, 2);
    daemon.stop().await;
}

#[tokio::test]
async fn a_tungstenite_client_closing_first_sees_its_code_back() {
    let daemon = Daemon::with("").await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=readings").await;
    client
        .socket
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    // The answer comes back and the stream ends, long before any timeout of either side.
    let answer = tokio::time::timeout(PATIENCE, async {
        let mut answer = None;
        while let Some(Ok(message)) = client.socket.next().await {
            if let Message::Close(frame) = message {
                answer = frame.map(|f| u16::from(f.code));
            }
        }
        answer
    })
    .await
    .expect("the stream ends");
    assert_eq!(answer, Some(1000));
    daemon.stop().await;
}

#[tokio::test]
async fn pings_are_answered_with_their_payload_and_fragments_are_reassembled() {
    let daemon = Daemon::with("").await;
    let mut socket = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;

    socket.send(FIN | PING, b"are you there", true).await;
    let pong = socket.frame_skipping_pings().await;
    assert_eq!(pong.opcode(), PONG);
    assert_eq!(pong.payload, b"are you there");

    // One text message in three fragments, a ping between them.
    socket.send(TEXT, br#"{"type": "pi"#, true).await;
    socket.send(CONTINUATION, br#"ng", "id""#, true).await;
    socket.send(FIN | PING, b"between", true).await;
    socket.send(FIN | CONTINUATION, br#": 7}"#, true).await;
    let pong = socket.frame_skipping_pings().await;
    assert_eq!(pong.opcode(), PONG);
    assert_eq!(pong.payload, b"between");
    let answer = socket.frame_skipping_pings().await.json();
    assert_eq!(answer["type"], "pong");
    assert_eq!(answer["id"], 7);

    socket.send_close(Some(1000)).await;
    assert_eq!(socket.frame_skipping_pings().await.close_code(), Some(1000));
    daemon.stop().await;
}

/// A message of exactly the largest size a client may send is read whole and answered;
/// one byte more closes with 1009 (below).
#[tokio::test]
async fn a_message_of_the_largest_size_allowed_is_read_whole_and_answered() {
    let daemon = Daemon::with("").await;
    let mut socket = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;

    let envelope = r#"{"type": "ping", "id": ""}"#.len();
    let id = "x".repeat(16 * 1024 - envelope);
    let message = format!(r#"{{"type": "ping", "id": "{id}"}}"#);
    assert_eq!(message.len(), 16 * 1024);
    socket.send(FIN | TEXT, message.as_bytes(), true).await;
    let answer = socket.frame_skipping_pings().await.json();
    assert_eq!(answer["type"], "pong");
    assert_eq!(answer["id"], id.as_str());

    socket.send_close(Some(1000)).await;
    assert_eq!(socket.frame_skipping_pings().await.close_code(), Some(1000));
    daemon.stop().await;
}

/// Each way to break the protocol, and the code the server closes with.
#[tokio::test]
async fn protocol_violations_close_with_their_code_and_leave_other_sessions_alone() {
    let daemon = Daemon::with("").await;
    let mut bystander = daemon.subscribe("/api/v1/ws?channel=sensors").await;

    let oversized = vec![b'x'; 16 * 1024 + 1];
    let violations: [(&str, u8, &[u8], bool, u16); 8] = [
        (
            "invalid UTF-8",
            FIN | TEXT,
            &[0x7B, 0xFF, 0xFE, 0x7D],
            true,
            1007,
        ),
        ("a reserved bit", FIN | 0x40 | TEXT, b"{}", true, 1002),
        ("an unknown data opcode", FIN | 0x3, b"{}", true, 1002),
        ("an unknown control opcode", FIN | 0xB, b"", true, 1002),
        ("an unmasked frame", FIN | TEXT, b"{}", false, 1002),
        (
            "a continuation with nothing to continue",
            FIN | CONTINUATION,
            b"{}",
            true,
            1002,
        ),
        (
            "a message over the limit",
            FIN | TEXT,
            &oversized,
            true,
            1009,
        ),
        (
            "a Close with a reserved code",
            FIN | CLOSE,
            &1005u16.to_be_bytes(),
            true,
            1002,
        ),
    ];
    for (what, first_byte, payload, masked, code) in violations {
        let mut socket = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;
        socket.send(first_byte, payload, masked).await;
        let close = socket.frame_skipping_pings().await;
        assert_eq!(close.close_code(), Some(code), "after {what}");
        assert!(socket.closed_by_server().await, "after {what}");
    }

    // The other session was not disturbed and still gets events.
    daemon.post("/api/v1/sensores/", SENSOR).await;
    let event = bystander.json().await;
    assert_eq!(event["event_type"], "created");
    assert_eq!(closes_counted(&daemon, 1002, "server").await, 5);
    assert_eq!(closes_counted(&daemon, 1007, "server").await, 1);
    assert_eq!(closes_counted(&daemon, 1009, "server").await, 1);
    assert_eq!(closes_counted(&daemon, 1002, "client").await, 1);
    daemon.stop().await;
}

#[tokio::test]
async fn a_server_close_waits_for_the_client_then_ends_the_connection() {
    let daemon = Daemon::with("").await;
    let mut answering = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;
    let mut silent = RawSocket::greeted(&daemon, "/api/v1/ws?channel=general").await;
    let stopped = tokio::spawn(daemon.stop());

    assert_eq!(
        answering.frame_skipping_pings().await.close_code(),
        Some(1001)
    );
    answering.send_close(Some(1001)).await;
    assert!(answering.closed_by_server().await);
    // A client that never answers is let go after the server's bounded wait.
    assert_eq!(silent.frame_skipping_pings().await.close_code(), Some(1001));
    assert!(silent.closed_by_server().await);
    stopped.await.unwrap();
}

/// Many quick connect/close cycles from one address never run out of slots, and the
/// client count returns to zero once the last one closed.
#[tokio::test]
async fn quick_connect_close_cycles_from_one_address_are_never_refused() {
    let daemon = Daemon::with("").await;
    for cycle in 0..2000 {
        let mut socket = RawSocket::greeted(&daemon, "/api/v1/ws?channel=sensors").await;
        socket.send_close(Some(1000)).await;
        let close = socket.frame_skipping_pings().await;
        assert_eq!(close.close_code(), Some(1000), "cycle {cycle}");
        assert!(socket.closed_by_server().await);
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let clients = metric(&daemon, "sensorgate_clients").await;
        if clients == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{clients} clients still counted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(closes_counted(&daemon, 1000, "client").await, 2000);
    daemon.stop().await;
}

/// Writes a `POST /api/v1/sensores/` that announces `length` bytes of body and sends
/// `body`, all at once, then reads the answer to the end: the whole request must go out
/// (the server reads what it does not use) and the answer come in time.
async fn post_sensor(daemon: &Daemon, length: usize, token: Option<&str>, body: &[u8]) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut request = format!(
        "POST /api/v1/sensores/ HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
        daemon.addr
    )
    .into_bytes();
    request.extend_from_slice(body);
    let answer = common::raw_exchange(daemon.addr, request)
        .await
        .expect("the whole request written and the answer read to its end, in time");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether a raw answer says that the server closes the connection.
fn says_it_closes(answer: &str) -> bool {
    answer.to_ascii_lowercase().contains("connection: close")
}

#[tokio::test]
async fn a_client_sending_a_large_body_in_one_write_reads_the_early_answer() {
    let daemon = Daemon::with("").await;
    let body = vec![b' '; 2 * 1024 * 1024];
    let token = daemon.token.clone();

    // Over the body limit: 413, with its JSON, and the connection ends.
    let answer = post_sensor(&daemon, body.len(), token.as_deref(), &body).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:.200}");
    assert!(says_it_closes(&answer), "{answer:.400}");
    assert!(answer.contains(r#""code":"too_large""#), "{answer:.400}");

    // A write without a token is refused before its body is read.
    let answer = post_sensor(&daemon, body.len(), None, &body).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:.200}");
    assert!(answer.contains(r#""code":"unauthorized""#), "{answer:.400}");

    // Nothing was stored.
    assert_eq!(
        daemon.get("/api/v1/sensores/").await.1,
        serde_json::json!([])
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_408_and_the_connection_ends() {
    let daemon = Daemon::with("[server]\nbody_read_timeout_s = 1\n").await;
    let answer = post_sensor(&daemon, 100, daemon.token.as_deref(), br#"{"tipo": "#).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(says_it_closes(&answer), "{answer}");
    assert!(answer.contains(r#""code":"timeout""#), "{answer}");
    daemon.stop().await;
}

#[tokio::test]
async fn an_early_answer_on_a_keep_alive_connection_says_it_closes() {
    let daemon = Daemon::with("").await;
    // A write without a token on a keep-alive connection, its body not read.
    let answer = post_sensor(&daemon, 20, None, br#"{"tipo": "humedad"} "#).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(says_it_closes(&answer), "{answer}");

    // A request read to the end keeps the connection.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\nGET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        daemon.addr, daemon.addr
    );
    let answer = common::raw_exchange(daemon.addr, request.into_bytes())
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer)
            .matches("HTTP/1.1 200")
            .count(),
        2
    );
    daemon.stop().await;
}
