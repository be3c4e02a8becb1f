//! A real daemon on loopback for end-to-end tests, with a minimal HTTP/1.1 client and a
//! real WebSocket client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sensorgate::config::Config;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should arrive at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A daemon started by a test; stops on [`Daemon::stop`].
pub struct Daemon {
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
    /// Hands the daemon a new config, as SIGHUP does.
    pub reload: tokio::sync::mpsc::Sender<Config>,
    /// The admin token the daemon created on first start, sent with every request made
    /// through [`Daemon::request`]; `None` under the `none` policy.
    pub token: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A test daemon's config: `text` (TOML), with data in `data_dir`.
/// Samples are committed as they come (the tests time their waits by the sample
/// interval), unless the test is about the commit window and sets it.
pub fn config(data_dir: &Path, text: &str) -> Config {
    let mut config = Config::parse(text, Path::new("test.toml")).expect("test config is valid");
    config.storage.data_dir = data_dir.to_owned();
    if !text.contains("commit_window_ms") {
        config.storage.commit_window_ms = 0;
    }
    config
}

impl Daemon {
    /// Starts a daemon on `127.0.0.1:0` with the given config.
    pub async fn start(config: Config) -> Daemon {
        Daemon::start_answering(config, &[200]).await
    }

    /// Starts a daemon, ready once `/healthz` answers one of `ready` (503 for a daemon
    /// whose storage fails from the start).
    pub async fn start_answering(config: Config, ready: &[u16]) -> Daemon {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data_dir = config.storage.data_dir.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            sensorgate::app::run(config, listener, stopped, reloads)
                .await
                .expect("daemon runs");
        });
        let mut daemon = Daemon {
            addr,
            data_dir,
            reload,
            token: None,
            stop: Some(stop),
            task: Some(task),
        };
        // Ready when it answers.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok((status, _)) = daemon.try_request("GET", "/healthz", None).await {
                if ready.contains(&status) {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon.token = std::fs::read_to_string(daemon.data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_owned());
        daemon
    }

    /// Starts a daemon with default settings in `dir` and `extra` config.
    pub async fn start_in(dir: &Path, extra: &str) -> Daemon {
        Daemon::start(config(dir, extra)).await
    }

    /// Stops the daemon the way SIGTERM does and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("daemon stops in time")
                .expect("daemon task ends cleanly");
        }
    }

    /// One HTTP request; returns status and the body parsed as JSON (Null if empty or not JSON).
    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, body) = self.try_request(method, path, body).await.expect("request");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.request("POST", path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &str) -> (u16, Value) {
        self.request("PUT", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request("DELETE", path, None).await
    }

    /// A raw request with `Connection: close`; returns status and raw body bytes.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let body = body.unwrap_or("");
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let raw = raw_exchange(self.addr, [head.as_bytes(), body.as_bytes()].concat()).await?;
        Ok(split_response(&raw))
    }

    /// Opens a WebSocket at `path_and_query` (e.g. `/api/v1/ws?channel=sensors`).
    pub async fn websocket(&self, path_and_query: &str) -> Client {
        let url = format!("ws://{}{}", self.addr, path_and_query);
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Client { socket }
    }

    /// The value of one sample (`name{labels}`) in `/metrics`, if it is there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (status, body) = self
            .try_request("GET", "/metrics", None)
            .await
            .expect("metrics");
        assert_eq!(status, 200);
        let wanted = format!("{series} ");
        String::from_utf8_lossy(&body).lines().find_map(|line| {
            let value = line.strip_prefix(&wanted)?;
            Some(
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("{line}: not a number")),
            )
        })
    }

    /// The store's last `seq`, from `/healthz`.
    pub async fn last_seq(&self) -> u64 {
        self.storage_figure("last_seq").await
    }

    /// Transactions the writer has committed, from `/healthz`.
    pub async fn commits(&self) -> u64 {
        self.storage_figure("commits").await
    }

    async fn storage_figure(&self, name: &str) -> u64 {
        self.get("/healthz").await.1["storage"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no storage.{name} in /healthz"))
    }
}

/// Sends raw bytes, reads until the server closes.
pub async fn raw_exchange(
    addr: std::net::SocketAddr,
    request: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&request).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    Ok(raw)
}

/// Status code and body of a raw HTTP/1.1 response (not chunked).
pub fn split_response(raw: &[u8]) -> (u16, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body_start = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(raw.len());
    (status, raw[body_start..].to_vec())
}

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

    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::text(text.to_owned()))
            .await
            .unwrap();
    }
}

/// A fresh temporary data directory.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Sends raw bytes and returns what arrives before the server pauses; for responses
/// that keep the connection open.
pub async fn raw_exchange_first(addr: std::net::SocketAddr, request: Vec<u8>) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    raw
}

/// Stores a reading behind the daemon's back (as an older build, or a hand edit, may
/// have left it) with an id above every other; returns the id. The latest values stay
/// as they were: the daemon takes the reading as already looked at for them.
pub fn insert_reading_row(
    conn: &rusqlite::Connection,
    sensor_id: i64,
    ts: i64,
    tipo: &str,
    valor: f64,
    unidad: &str,
) -> i64 {
    conn.execute(
        "INSERT OR IGNORE INTO series (sensor_id, tipo, unidad, hora_dudosa) VALUES (?1, ?2, ?3, 0)",
        rusqlite::params![sensor_id, tipo, unidad],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO reading_rows (id, series, ts, valor) VALUES ( \
         (SELECT MAX(COALESCE((SELECT MAX(id) FROM reading_rows), 0), \
                     COALESCE((SELECT MAX(seq) FROM events), 0)) + 1), \
         (SELECT id FROM series WHERE sensor_id = ?1 AND tipo = ?2 AND unidad = ?3 AND hora_dudosa = 0), \
         ?4, ?5)",
        rusqlite::params![sensor_id, tipo, unidad, ts, valor],
    )
    .unwrap();
    let id = conn.last_insert_rowid();
    conn.execute(
        "INSERT INTO reading_seconds (second, first_id, last_id) VALUES (?1 / 1000000, ?2, ?2)",
        [ts, id],
    )
    .unwrap();
    conn.execute(
        "UPDATE store_meta SET value = ?1 WHERE key = 'latest_through'",
        [id],
    )
    .unwrap();
    id
}

/// The columns of the `event_log` view that [`stored_frame`] reads, in its order.
pub const EVENT_COLUMNS: &str =
    "seq, frame, ts, sensor_id, tipo, reading_id, valor, unidad, taken_at, hora_dudosa";

/// The frame clients were sent for one stored event, from a row of [`EVENT_COLUMNS`]:
/// the stored frame, or for a reading event, stored as the reading's fields, the wire
/// format of API.md written out here independently of the daemon's code.
pub fn stored_frame(row: &rusqlite::Row) -> rusqlite::Result<Value> {
    let frame: String = row.get(1)?;
    if !frame.is_empty() {
        return Ok(serde_json::from_str(&frame).expect("stored frames are JSON"));
    }
    let time = |i| row.get(i).map(sensorgate::model::format_time);
    let id: i64 = row.get(5)?;
    let mut frame = serde_json::json!({
        "type": "entity_event",
        "entity_type": "reading",
        "event_type": "created",
        "entity_id": id,
        "data": {
            "id": id,
            "sensor_id": row.get::<_, i64>(3)?,
            "tipo": row.get::<_, String>(4)?,
            "valor": row.get::<_, f64>(6)?,
            "unidad": row.get::<_, String>(7)?,
            "timestamp": time(8)?,
        },
        "timestamp": time(2)?,
        "metadata": {"action": "create_reading"},
        "seq": row.get::<_, i64>(0)?,
    });
    if row.get::<_, bool>(9)? {
        frame["data"]["hora_dudosa"] = Value::Bool(true);
    }
    Ok(frame)
}

/// The id of the sensor record of a configured sensor.
pub async fn sensor_named(daemon: &Daemon, name: &str) -> i64 {
    let (status, sensors) = daemon.get("/api/v1/sensores/").await;
    assert_eq!(status, 200);
    sensors
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nombre"] == name)
        .unwrap_or_else(|| panic!("no sensor named {name}: {sensors}"))["id"]
        .as_i64()
        .unwrap()
}

/// A sensor's `salud` as `GET /api/v1/sensores/{id}` shows it.
pub async fn salud(daemon: &Daemon, id: i64) -> Value {
    let (status, sensor) = daemon.get(&format!("/api/v1/sensores/{id}")).await;
    assert_eq!(status, 200, "{sensor}");
    sensor["salud"].clone()
}

/// Polls a sensor's `salud` until `done` holds; health is updated by the sampling thread
/// right after it hands a sample over, so it may trail the pushed event by a moment.
pub async fn salud_until(
    daemon: &Daemon,
    id: i64,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let salud = salud(daemon, id).await;
        if done(&salud) {
            return salud;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: salud is {salud}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How many read outcomes of `kind` a `salud` counted.
pub fn count(salud: &Value, kind: &str) -> u64 {
    salud["conteo"][kind].as_u64().unwrap_or(0)
}
