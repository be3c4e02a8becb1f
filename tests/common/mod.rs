//! The harness of the end-to-end tests: a real daemon on loopback that owns its data
//! directory, a real WebSocket client, the one HTTP client (shared with the load
//! benchmark), waits that poll for a condition, and the database read directly.

#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod events;
pub mod http;
pub mod process;
pub mod socket;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use daemon::{config, Daemon, OPEN, SENSOR};
pub use socket::{Client, Received};

/// How long a test waits for something that should arrive at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until `check` gives a value, looking again every few milliseconds; panics with
/// `what` after twice [`PATIENCE`].
pub async fn until<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {:?} in vain for {what}",
            PATIENCE * 2
        );
        tokio::time::sleep(daemon::POLL).await;
    }
}

/// The database in a daemon's data directory, opened beside the daemon.
pub fn database(data_dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(data_dir.join("sensorgate.db")).unwrap();
    conn.busy_timeout(PATIENCE).unwrap();
    conn
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
    until(what, || async {
        let salud = salud(daemon, id).await;
        done(&salud).then_some(salud)
    })
    .await
}

/// The last error a `salud` names; empty if none.
pub fn last_error(salud: &Value) -> &str {
    salud["ultimo_error"].as_str().unwrap_or_default()
}

/// How many read outcomes of `kind` a `salud` counted.
pub fn count(salud: &Value, kind: &str) -> u64 {
    salud["conteo"][kind].as_u64().unwrap_or(0)
}

/// The daemon's binary, as cargo built it for the tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_sensorgate");

/// What a run of the `sensorgate` binary gave.
pub struct Run {
    /// Whether it exited 0.
    pub ok: bool,
    /// Its exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `sensorgate` with `args`, as an operator would, and waits for it.
pub fn sensorgate<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> Run {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `sensorgate` with `args` as [`sensorgate`] does, on a blocking thread, so that a
/// daemon of the test, which the command may ask through its control socket, goes on
/// meanwhile.
pub async fn sensorgate_beside_the_daemon<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> Run {
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    tokio::task::spawn_blocking(move || sensorgate(args))
        .await
        .unwrap()
}

/// Writes `text` to the file `name` in `dir` and runs `sensorgate check-config` on it.
pub fn check_config(dir: &Path, name: &str, text: &str) -> Run {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    sensorgate(["check-config".as_ref(), file.as_os_str()])
}

/// A `[[sensor]]` table: `name`, of `tipo` and `modelo`, sampled every `interval_s` from
/// `source` (an inline TOML table).
pub fn sensor_table(name: &str, tipo: &str, modelo: &str, interval_s: f64, source: &str) -> String {
    format!(
        "[[sensor]]\nname = \"{name}\"\ntipo = \"{tipo}\"\nmodelo = \"{modelo}\"\n\
         interval_s = {interval_s:?}\nsource = {source}\n"
    )
}
