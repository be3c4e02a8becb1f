//! End-to-end tests of live delivery with real clients against a running daemon: resume
//! with `since` (also across a restart and past retention), snapshots, filters and
//! subscribe messages, per-subscription rate, slow clients, Server-Sent Events and
//! keepalive pings.
//!
//! Expected events are never guessed: they are read from the daemon's own `events` table,
//! which holds every emitted event with its `seq` and the exact frame that was sent.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{stored_frame, temp_dir, Client, Daemon, Received, EVENT_COLUMNS, PATIENCE};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Every test holds this shared, except the one that measures the process's memory,
/// which holds it alone: every test's daemon runs in this one process.
static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// How long a client waits to be sure nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

/// A simulated DHT22 sampled every 50 ms (the fastest allowed): about 40 readings a
/// second, temperature and humidity.
fn fast_sim(name: &str, seed: u64) -> String {
    format!(
        r#"
[[sensor]]
name = "{name}"
tipo = "temperatura"
modelo = "DHT22"
interval_s = 0.05
source = {{ kind = "sim", seed = {seed} }}
"#
    )
}

/// A sensor update whose frame is large: an inactive serial source with a long key
/// table (the source spec is the one free-form part of a sensor).
fn big_update(n: usize, filler: &str) -> String {
    format!(
        r#"{{"activo": false, "fuente": {{"kind": "serial", "path": "/dev/ttyUSB{n}", "keys": {{"k": {{"tipo": "{filler}", "unidad": "u"}}}}}}}}"#
    )
}

/// A daemon for protocol tests: development mode, the `none` auth policy and rate limits
/// out of the way, so tests post as fast as they like. Tokens and limits have tests of
/// their own.
async fn start_open(dir: &std::path::Path, config: &str) -> Daemon {
    let open = "[server]\ndev = true\n[auth]\npolicy = \"none\"\n\
                [limits]\nwrites_per_second = 1000000.0\nwrite_burst = 1000000.0\n";
    Daemon::start_in(dir, &format!("{open}{config}")).await
}

// ---------------------------------------------------------------------------------------
// A keep-alive HTTP/1.1 client, to post many readings quickly.

struct Http {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Http {
            reader: BufReader::new(stream),
            host: addr.to_string(),
        }
    }

    async fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        tokio::time::timeout(PATIENCE, self.exchange(method, path, body.unwrap_or("")))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer in time"))
    }

    async fn exchange(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.reader.get_mut();
        stream
            .write_all(&[head.as_bytes(), body.as_bytes()].concat())
            .await
            .unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).await.unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line).await.unwrap();
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>().unwrap());
                }
            }
        }
        let mut raw = vec![0; length.expect("REST answers carry Content-Length")];
        self.reader.read_exact(&mut raw).await.unwrap();
        (status, serde_json::from_slice(&raw).unwrap_or(Value::Null))
    }

    async fn create_sensor(&mut self, tipo: &str) -> i64 {
        let body = format!(r#"{{"tipo": "{tipo}", "modelo": "DHT22"}}"#);
        let (status, sensor) = self.request("POST", "/api/v1/sensores/", Some(&body)).await;
        assert_eq!(status, 201, "{sensor}");
        sensor["id"].as_i64().unwrap()
    }

    /// Posts a reading; returns the stored reading.
    async fn reading(&mut self, sensor_id: i64, tipo: &str, valor: f64) -> Value {
        let body = format!(
            r#"{{"sensor_id": {sensor_id}, "tipo": "{tipo}", "valor": {valor}, "unidad": "u"}}"#
        );
        let (status, reading) = self.request("POST", "/api/v1/lecturas/", Some(&body)).await;
        assert_eq!(status, 201, "{reading}");
        reading
    }

    async fn put(&mut self, path: &str, body: &str) -> Value {
        let (status, answer) = self.request("PUT", path, Some(body)).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }
}

/// Posts `count` readings spread over `sensors` (`tipo` temperatura) from a task of its
/// own; returns the ids of the stored readings.
fn post_in_background(
    addr: SocketAddr,
    sensors: Vec<i64>,
    count: usize,
) -> tokio::task::JoinHandle<Vec<i64>> {
    tokio::spawn(async move {
        let mut http = Http::connect(addr).await;
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            let sensor = sensors[i % sensors.len()];
            let reading = http.reading(sensor, "temperatura", i as f64).await;
            ids.push(reading["id"].as_i64().unwrap());
        }
        ids
    })
}

// ---------------------------------------------------------------------------------------
// The daemon's database, read directly.

fn database(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("sensorgate.db")).unwrap();
    conn.busy_timeout(PATIENCE).unwrap();
    conn
}

/// One stored event: its `seq` and the frame every client was sent, parsed.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    seq: u64,
    frame: Value,
}

/// Stored events on `channel` with `after < seq <= upto`, by seq.
fn stored(dir: &Path, channel: &str, after: u64, upto: u64) -> Vec<Stored> {
    let conn = database(dir);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM event_log WHERE channel = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq"
        ))
        .unwrap();
    stmt.query_map(
        rusqlite::params![channel, after as i64, upto as i64],
        |row| {
            Ok(Stored {
                seq: row.get::<_, i64>(0)? as u64,
                frame: stored_frame(row)?,
            })
        },
    )
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn stored_seqs(dir: &Path, channel: &str, after: u64, upto: u64) -> Vec<u64> {
    stored(dir, channel, after, upto)
        .iter()
        .map(|e| e.seq)
        .collect()
}

/// The newest stored `seq`.
fn stored_last_seq(dir: &Path) -> u64 {
    database(dir)
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM event_log", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
}

// ---------------------------------------------------------------------------------------
// Events as clients see them.

fn seq(event: &Value) -> u64 {
    event["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in {event}"))
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(seq).collect()
}

/// Events from `client` until one with `seq >= until`; panics on anything that is not an
/// event or if the socket ends first.
async fn events_until(client: &mut Client, until: u64) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        match client.next().await {
            Received::Json(event) => {
                assert!(
                    event["seq"].is_u64(),
                    "expected an event after {} events, got {event}",
                    events.len()
                );
                let s = seq(&event);
                events.push(event);
                if s >= until {
                    return events;
                }
            }
            other => panic!(
                "socket ended after {} events (last seq {:?}) before seq {until}: {other:?}",
                events.len(),
                events.last().map(seq)
            ),
        }
    }
}

/// Asserts that `received` is exactly the stored events of `channel` after `after` up to
/// the last one received: same seqs, in order, none missing, none twice, same frames.
fn assert_exactly_stored(dir: &Path, channel: &str, after: u64, received: &[Value]) {
    let upto = received.last().map(seq).unwrap_or(after);
    let expected = stored(dir, channel, after, upto);
    let expected_seqs: Vec<u64> = expected.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs(received),
        expected_seqs,
        "received seqs differ from the stored {channel} events in ({after}, {upto}]"
    );
    for (got, want) in received.iter().zip(&expected) {
        assert_eq!(got, &want.frame, "frame of seq {} differs", want.seq);
    }
}

fn reading_ids(events: &[Value]) -> BTreeSet<i64> {
    events
        .iter()
        .filter(|e| e["entity_type"] == "reading")
        .map(|e| e["data"]["id"].as_i64().unwrap())
        .collect()
}

async fn ws_stats(daemon: &Daemon) -> Value {
    let (status, stats) = daemon.get("/api/v1/ws/stats").await;
    assert_eq!(status, 200);
    stats
}

/// Waits (bounded) until `check` holds for `/api/v1/ws/stats`; returns the stats then.
async fn wait_for_stats(daemon: &Daemon, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = ws_stats(daemon).await;
        if check(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "never {what}: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Resume.

/// A client dropped mid-stream while samples keep flowing reconnects with `since` and
/// receives exactly the events it missed, in order, none twice, then live ones, while
/// more are produced during the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_replays_exactly_the_missed_events() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), &fast_sim("sim", 1)).await;
    let mut http = Http::connect(daemon.addr).await;
    let posted_to = http.create_sensor("temperatura").await;

    let mut first = daemon
        .websocket("/api/v1/ws?channel=readings")
        .await
        .greeted()
        .await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(first.json().await);
    }
    // Live delivery is itself gapless.
    let start = seq(&seen[0]) - 1;
    assert_exactly_stored(dir.path(), "readings", start, &seen);
    let since = seq(seen.last().unwrap());
    drop(first);

    // Missed while away: samples, and readings posted over REST.
    let mut posted = BTreeSet::new();
    for i in 0..50 {
        let reading = http.reading(posted_to, "temperatura", f64::from(i)).await;
        posted.insert(reading["id"].as_i64().unwrap());
    }
    // More arrive while the client replays.
    let producer = post_in_background(daemon.addr, vec![posted_to], 200);
    let mut second = daemon
        .websocket(&format!("/api/v1/ws?channel=readings&since={since}"))
        .await
        .greeted()
        .await;
    posted.extend(producer.await.unwrap());
    let marker = daemon.last_seq().await;
    let received = events_until(&mut second, marker).await;

    assert!(seq(&received[0]) > since);
    assert_exactly_stored(dir.path(), "readings", since, &received);
    let got = reading_ids(&received);
    assert!(
        posted.is_subset(&got),
        "posted readings missing: {:?}",
        posted.difference(&got).collect::<Vec<_>>()
    );
    // Nothing older than `since` came again.
    assert!(reading_ids(&seen).is_disjoint(&got));
    daemon.stop().await;
}

/// The same across a daemon restart: events from before the stop and after the start,
/// exactly once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_across_a_restart() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let config = fast_sim("sim", 2);
    let daemon = start_open(dir.path(), &config).await;
    let mut client = daemon
        .websocket("/api/v1/ws?channel=readings")
        .await
        .greeted()
        .await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(client.json().await);
    }
    let sensor = seen[0]["data"]["sensor_id"].as_i64().unwrap();
    let since = seq(seen.last().unwrap());
    drop(client);

    let before_stop = Http::connect(daemon.addr)
        .await
        .reading(sensor, "humedad", 11.5)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    daemon.stop().await;
    let last_before_restart = stored_last_seq(dir.path());

    let daemon = start_open(dir.path(), &config).await;
    let after_start = Http::connect(daemon.addr)
        .await
        .reading(sensor, "humedad", 12.5)
        .await;
    let marker = daemon.last_seq().await;
    assert!(marker > last_before_restart);
    let mut client = daemon
        .websocket(&format!("/api/v1/ws?channel=readings&since={since}"))
        .await
        .greeted()
        .await;
    let received = events_until(&mut client, marker).await;

    assert_exactly_stored(dir.path(), "readings", since, &received);
    assert!(received.iter().any(|e| seq(e) <= last_before_restart));
    assert!(received.iter().any(|e| seq(e) > last_before_restart));
    let got = reading_ids(&received);
    assert!(got.contains(&before_stop["id"].as_i64().unwrap()));
    assert!(got.contains(&after_start["id"].as_i64().unwrap()));
    daemon.stop().await;
}

/// A `since` ahead of the daemon's numbering is answered with a `resync` message
/// (`unknown_seq`), then the events from the oldest stored one on, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_ahead_of_numbering_is_told_unknown_seq() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "").await;
    let mut http = Http::connect(daemon.addr).await;
    let sensor = http.create_sensor("temperatura").await;
    for i in 0..3 {
        http.reading(sensor, "temperatura", f64::from(i)).await;
    }
    // One sensor event, then three readings.
    assert_eq!(daemon.last_seq().await, 4);

    let mut client = daemon
        .websocket("/api/v1/ws?channel=readings&since=104")
        .await
        .greeted()
        .await;
    let mut resync = client.json().await;
    assert!(resync["timestamp"].is_string(), "{resync}");
    resync.as_object_mut().unwrap().remove("timestamp");
    assert_eq!(
        resync,
        json!({"type": "resync", "reason": "unknown_seq", "since": 104, "oldest_seq": 1, "last_seq": 4})
    );
    // The stored readings follow, then live ones.
    let replayed = events_until(&mut client, 4).await;
    assert_eq!(seqs(&replayed), [2, 3, 4]);
    assert_exactly_stored(dir.path(), "readings", 0, &replayed);
    http.reading(sensor, "temperatura", 9.0).await;
    assert_eq!(seq(&client.json().await), 5);
    assert_eq!(client.next_within(QUIET).await, None);
    daemon.stop().await;
}

/// A `since` older than what is kept is answered with a `resync` message
/// (`since_too_old`) naming the oldest kept seq, then the replay from it; a `since` just
/// before the oldest kept event is honoured without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_older_than_retention_is_told_since_too_old() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "").await;
    let mut http = Http::connect(daemon.addr).await;
    let sensor = http.create_sensor("temperatura").await;
    for i in 0..10 {
        http.reading(sensor, "temperatura", f64::from(i)).await;
    }
    assert_eq!(daemon.last_seq().await, 11);
    // Retention removed everything up to seq 6 and moved the log's floor past it (done
    // by hand: the daemon's own retention only runs once a minute).
    let db = database(dir.path());
    let removed = db.execute("DELETE FROM events WHERE seq <= 6", []).unwrap()
        + db.execute("DELETE FROM reading_rows WHERE id <= 6", [])
            .unwrap();
    db.execute(
        "UPDATE store_meta SET value = 7 WHERE key = 'log_floor'",
        [],
    )
    .unwrap();
    assert_eq!(removed, 6);
    let (_, health) = daemon.get("/healthz").await;
    assert_eq!(health["storage"]["oldest_seq"], 7);
    assert_eq!(health["storage"]["last_seq"], 11);

    let mut client = daemon
        .websocket("/api/v1/ws?channel=readings&since=3")
        .await
        .greeted()
        .await;
    let mut resync = client.json().await;
    resync.as_object_mut().unwrap().remove("timestamp");
    assert_eq!(
        resync,
        json!({"type": "resync", "reason": "since_too_old", "since": 3, "oldest_seq": 7, "last_seq": 11})
    );
    let replayed = events_until(&mut client, 11).await;
    assert_eq!(seqs(&replayed), [7, 8, 9, 10, 11]);
    assert_exactly_stored(dir.path(), "readings", 6, &replayed);

    // since = oldest - 1 misses nothing that was removed: no resync.
    let mut exact = daemon
        .websocket("/api/v1/ws?channel=readings&since=6")
        .await
        .greeted()
        .await;
    let replayed = events_until(&mut exact, 11).await;
    assert_eq!(seqs(&replayed), [7, 8, 9, 10, 11]);

    http.reading(sensor, "temperatura", 99.0).await;
    assert_eq!(seq(&client.json().await), 12);
    assert_eq!(seq(&exact.json().await), 12);
    assert_eq!(client.next_within(QUIET).await, None);
    assert_eq!(exact.next_within(QUIET).await, None);
    daemon.stop().await;
}

/// With the smallest allowed client queue, a client that reads promptly still gets every
/// missed event on resume: replaying is not "falling behind".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_a_small_client_queue_replays_every_missed_event() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "[realtime]\nclient_queue = 16\n").await;
    let mut http = Http::connect(daemon.addr).await;
    let mut sensors = Vec::new();
    for _ in 0..50 {
        sensors.push(http.create_sensor("temperatura").await);
    }
    let since = daemon.last_seq().await;
    for i in 0..100 {
        http.reading(sensors[i % sensors.len()], "temperatura", i as f64)
            .await;
    }
    let marker = daemon.last_seq().await;
    assert_eq!(marker, since + 100);

    let mut client = daemon
        .websocket(&format!("/api/v1/ws?channel=readings&since={since}"))
        .await
        .greeted()
        .await;
    let received = events_until(&mut client, marker).await;
    assert_eq!(received.len(), 100);
    assert_exactly_stored(dir.path(), "readings", since, &received);
    daemon.stop().await;
}

/// Many clients resuming from the start at once (a room of dashboards after an outage)
/// read shared pages of the event log; each still gets every stored event exactly once,
/// in order, and then the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_resuming_at_once_each_get_every_event_once_in_order() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "").await;
    let mut http = Http::connect(daemon.addr).await;
    let sensors = vec![http.create_sensor("temperatura").await];
    assert_eq!(
        post_in_background(daemon.addr, sensors, 700)
            .await
            .unwrap()
            .len(),
        700
    );
    let stored = daemon.last_seq().await;

    let path = "/api/v1/ws?channel=sensors,readings,general&since=0";
    let connected = futures_util::future::join_all((0..40).map(|_| daemon.websocket(path))).await;
    let clients: Vec<_> = connected
        .into_iter()
        .map(|client| async move {
            let mut client = client.greeted().await;
            let mut seqs = Vec::new();
            while seqs.last() != Some(&(stored + 1)) {
                match client.next().await {
                    Received::Json(event) => seqs.push(seq(&event)),
                    closed => panic!("closed after {} events: {closed:?}", seqs.len()),
                }
            }
            seqs
        })
        .map(tokio::spawn)
        .collect();
    // One live event while they replay.
    http.create_sensor("humedad").await;
    for client in clients {
        assert_eq!(client.await.unwrap(), (1..=stored + 1).collect::<Vec<_>>());
    }
    daemon.stop().await;
}

/// Only a few clients replay at a time; one that stops reading while it resumes gives
/// its turn up once its queue is full, so those resuming behind it still catch up,
/// long before the stuck ones are closed for not reading.
///
/// The stored events are sensor updates with 48 KB frames, 6 MB in all, more than a
/// loopback socket takes before the daemon's writes block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_while_resuming_do_not_hold_up_the_others() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "[realtime]\nclient_queue = 16\n").await;
    let mut http = Http::connect(daemon.addr).await;
    let sensor = http.create_sensor("temperatura").await;
    let filler = "x".repeat(48 * 1024);
    for i in 0..120 {
        let body = big_update(i, &filler);
        http.put(&format!("/api/v1/sensores/{sensor}"), &body).await;
    }
    let stored = daemon.last_seq().await;

    // More stuck clients than there are turns, each with a socket that fills at once.
    let path = "/api/v1/ws?channel=sensors&since=0";
    let mut stuck = Vec::new();
    for _ in 0..10 {
        stuck.push(small_buffer_websocket(daemon.addr, path).await);
    }
    let mut reader = daemon.websocket(path).await.greeted().await;
    let received = events_until(&mut reader, stored).await;
    assert_eq!(seqs(&received), (1..=stored).collect::<Vec<_>>());
    let stats = ws_stats(&daemon).await;
    assert_eq!(
        stats["channels"]["sensors"]["slow_disconnects"], 0,
        "{stats}"
    );
    assert_eq!(stats["total_connections"], 11, "{stats}");
    drop(stuck);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Snapshot.

/// The latest reading of each sensor and `tipo` among stored reading events up to `seq`,
/// ordered by sensor and `tipo`: what a snapshot consistent with `seq` must list.
fn latest_readings_up_to(dir: &Path, seq: u64) -> Vec<Value> {
    let mut latest: BTreeMap<(i64, String), Value> = BTreeMap::new();
    for event in stored(dir, "readings", 0, seq) {
        let reading = event.frame["data"].clone();
        let key = (
            reading["sensor_id"].as_i64().unwrap(),
            reading["tipo"].as_str().unwrap().to_owned(),
        );
        let newer = |old: &Value| {
            // Same fixed-width RFC 3339 format: text order is time order.
            let at = |r: &Value| {
                (
                    r["timestamp"].as_str().unwrap().to_owned(),
                    r["id"].as_i64(),
                )
            };
            at(&reading) >= at(old)
        };
        if latest.get(&key).is_none_or(newer) {
            latest.insert(key, reading);
        }
    }
    latest.into_values().collect()
}

/// `snapshot=true`: after the greeting, the sensors and the latest reading per sensor and
/// `tipo` as of `seq` S, then every event after S and none at or before it; narrowed by
/// the filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_consistent_with_its_seq_and_followed_by_later_events() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), &fast_sim("sim", 3)).await;
    let mut http = Http::connect(daemon.addr).await;
    let x = http.create_sensor("temperatura").await;
    let y = http.create_sensor("humedad").await;
    for i in 0..3 {
        http.reading(x, "temperatura", f64::from(i)).await;
        http.reading(x, "humedad", 50.0 + f64::from(i)).await;
        http.reading(y, "humedad", 60.0 + f64::from(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut client = daemon
        .websocket("/api/v1/ws?channel=readings&snapshot=true")
        .await
        .greeted()
        .await;
    let snapshot = client.json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert!(snapshot["timestamp"].is_string());
    let s = seq(&snapshot);
    let (_, mut sensors) = daemon.get("/api/v1/sensores/").await;
    // The snapshot carries sensor records; GET adds their live health.
    for sensor in sensors.as_array_mut().unwrap() {
        sensor.as_object_mut().unwrap().remove("salud");
    }
    assert_eq!(snapshot["sensors"], sensors);
    let expected = latest_readings_up_to(dir.path(), s);
    // The sim sensor's two tipos and x's two, y's one.
    assert_eq!(expected.len(), 5, "{expected:?}");
    assert_eq!(snapshot["readings"], Value::Array(expected));

    let received = events_until(&mut client, s + 20).await;
    assert_exactly_stored(dir.path(), "readings", s, &received);

    // Narrowed to one sensor and tipo.
    let mut narrow = daemon
        .websocket(&format!(
            "/api/v1/ws?channel=readings&snapshot=true&sensor_id={x}&tipo=humedad"
        ))
        .await
        .greeted()
        .await;
    let snapshot = narrow.json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let s = seq(&snapshot);
    let (_, mut sensor_x) = daemon.get(&format!("/api/v1/sensores/{x}")).await;
    sensor_x.as_object_mut().unwrap().remove("salud");
    assert_eq!(snapshot["sensors"], json!([sensor_x]));
    let expected: Vec<Value> = latest_readings_up_to(dir.path(), s)
        .into_iter()
        .filter(|r| r["sensor_id"] == x && r["tipo"] == "humedad")
        .collect();
    assert_eq!(expected.len(), 1);
    assert_eq!(snapshot["readings"], Value::Array(expected));
    http.reading(x, "temperatura", 1.0).await;
    http.reading(y, "humedad", 1.0).await;
    let wanted = http.reading(x, "humedad", 77.0).await;
    let event = narrow.json().await;
    assert_eq!(event["data"], wanted);
    assert!(seq(&event) > s);
    assert_eq!(narrow.next_within(QUIET).await, None);
    daemon.stop().await;
}

/// Under a steady stream of writes, every snapshot is followed by exactly the events
/// after its seq: none lost between reading the snapshot and going live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_load_is_followed_by_every_later_event() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "").await;
    let mut http = Http::connect(daemon.addr).await;
    let mut sensors = Vec::new();
    for _ in 0..100 {
        sensors.push(http.create_sensor("temperatura").await);
    }
    for (i, &sensor) in sensors.iter().enumerate() {
        http.reading(sensor, "temperatura", i as f64).await;
        http.reading(sensor, "humedad", i as f64).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..2 {
        let (stop, sensors, addr) = (stop.clone(), sensors.clone(), daemon.addr);
        producers.push(tokio::spawn(async move {
            let mut http = Http::connect(addr).await;
            let mut i = p;
            while !stop.load(Ordering::Relaxed) {
                http.reading(sensors[i % sensors.len()], "temperatura", 1.0)
                    .await;
                i += 2;
            }
        }));
    }
    // Let the stream get going.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut problems = Vec::new();
    for attempt in 0..8 {
        let mut client = daemon
            .websocket("/api/v1/ws?channel=readings&snapshot=true")
            .await
            .greeted()
            .await;
        let snapshot = client.json().await;
        assert_eq!(snapshot["type"], "snapshot");
        let s = seq(&snapshot);
        let received = events_until(&mut client, s + 30).await;
        let expected = stored_seqs(dir.path(), "readings", s, seq(received.last().unwrap()));
        if seqs(&received) != expected {
            let missing: Vec<u64> = expected
                .iter()
                .filter(|e| !seqs(&received).contains(e))
                .copied()
                .collect();
            problems.push(format!(
                "attempt {attempt}: snapshot seq {s}, first event {}, missing {missing:?}",
                seq(&received[0])
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.await.unwrap();
    }
    assert!(problems.is_empty(), "{problems:#?}");
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Filters and subscribe messages.

/// Query filters deliver exactly the matching events, on one channel or several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_deliver_exactly_the_matching_events() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "").await;
    let mut http = Http::connect(daemon.addr).await;
    let a = http.create_sensor("temperatura").await;
    let b = http.create_sensor("humedad").await;

    let queries = [
        format!("channel=readings&sensor_id={a}"),
        "channel=readings&tipo=humedad".to_owned(),
        format!("channel=readings&sensor_id={a}&sensor_id={b}&tipo=temperatura"),
        "channel=sensors&event_type=updated".to_owned(),
        "channel=sensors&event_type=created,deleted".to_owned(),
        "channel=sensors&channel=readings".to_owned(),
        format!("channel=sensors,readings&sensor_id={b}"),
        "channel=general,readings&event_type=test".to_owned(),
        "channel=sensors,readings&tipo=humedad".to_owned(),
    ];
    let mut clients = Vec::new();
    for query in &queries {
        let mut client = daemon.websocket(&format!("/api/v1/ws?{query}")).await;
        let connection = client.json().await;
        assert_eq!(connection["type"], "connection");
        let named: BTreeSet<&str> = connection["channel"].as_str().unwrap().split(',').collect();
        let asked: BTreeSet<&str> = query
            .split('&')
            .filter_map(|p| p.strip_prefix("channel="))
            .flat_map(|v| v.split(','))
            .collect();
        assert_eq!(named, asked, "{query}");
        assert_eq!(client.json().await["type"], "stats");
        clients.push(client);
    }
    let stats = ws_stats(&daemon).await;
    assert_eq!(stats["total_connections"], 9);
    assert_eq!(stats["channels"]["readings"]["connections"], 7);
    assert_eq!(stats["channels"]["sensors"]["connections"], 5);
    assert_eq!(stats["channels"]["general"]["connections"], 1);

    // One event per action, numbered in order.
    let base = daemon.last_seq().await;
    http.reading(a, "temperatura", 1.0).await; // +1
    http.reading(a, "humedad", 2.0).await; // +2
    http.reading(b, "temperatura", 3.0).await; // +3
    http.reading(b, "humedad", 4.0).await; // +4
    http.put(&format!("/api/v1/sensores/{a}"), r#"{"modelo": "DHT11"}"#)
        .await; // +5
    http.put(
        &format!("/api/v1/sensores/{b}"),
        r#"{"ubicacion": "Nave 2"}"#,
    )
    .await; // +6
    let c = http.create_sensor("temperatura").await; // +7
    http.reading(c, "temperatura", 5.0).await; // +8
    let (status, _) = http
        .request("DELETE", &format!("/api/v1/sensores/{c}"), None)
        .await; // +9
    assert_eq!(status, 200);
    let (status, _) = http
        .request(
            "POST",
            "/api/v1/ws/test-event",
            Some(r#"{"channel": "general", "data": {"n": 1}}"#),
        )
        .await; // +10
    assert_eq!(status, 200);
    assert_eq!(daemon.last_seq().await, base + 10);

    let expected: [&[u64]; 9] = [
        &[1, 2],
        &[2, 4],
        &[1, 3],
        &[5, 6],
        &[7, 9],
        &[1, 2, 3, 4, 5, 6, 7, 8, 9],
        &[3, 4, 6],
        &[10],
        &[2, 4, 6],
    ];
    for ((client, query), want) in clients.iter_mut().zip(&queries).zip(expected) {
        let want: Vec<u64> = want.iter().map(|n| base + n).collect();
        let got = events_until(client, *want.last().unwrap()).await;
        assert_eq!(seqs(&got), want, "{query}");
        assert_eq!(client.next_within(QUIET).await, None, "{query}");
    }
    daemon.stop().await;
}

/// `subscribe` and `unsubscribe` messages change what a socket receives and are answered
/// with the resulting subscription; bad messages are answered with an error and the
/// socket stays open with its subscription unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_messages_change_the_subscription_and_errors_keep_the_socket() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "").await;
    let mut http = Http::connect(daemon.addr).await;
    let a = http.create_sensor("temperatura").await;
    let b = http.create_sensor("humedad").await;
    let mut client = daemon
        .websocket("/api/v1/ws?channel=sensors")
        .await
        .greeted()
        .await;

    client
        .send_text(&format!(
            r#"{{"type": "subscribe", "id": 1, "channels": ["readings"], "sensor_id": [{a}]}}"#
        ))
        .await;
    let mut result = client.json().await;
    assert!(result["timestamp"].is_string(), "{result}");
    result.as_object_mut().unwrap().remove("timestamp");
    assert_eq!(
        result,
        json!({"type": "result", "id": 1, "action": "subscribe", "ok": true,
               "subscription": {"channels": ["readings", "sensors"], "sensor_id": [a]}})
    );
    let stats = ws_stats(&daemon).await;
    assert_eq!(stats["total_connections"], 1);
    assert_eq!(stats["channels"]["readings"]["connections"], 1);
    assert_eq!(stats["channels"]["sensors"]["connections"], 1);

    let base = daemon.last_seq().await;
    http.reading(b, "humedad", 1.0).await; // +1, other sensor
    http.reading(a, "temperatura", 2.0).await; // +2
    http.put(&format!("/api/v1/sensores/{b}"), r#"{"modelo": "X"}"#)
        .await; // +3, other sensor
    http.put(&format!("/api/v1/sensores/{a}"), r#"{"modelo": "Y"}"#)
        .await; // +4
    let got = events_until(&mut client, base + 4).await;
    assert_eq!(seqs(&got), [base + 2, base + 4]);
    assert_eq!(got[0]["entity_type"], "reading");
    assert_eq!(got[1]["entity_type"], "sensor");

    client
        .send_text(r#"{"type": "unsubscribe", "id": 2, "channels": ["sensors"]}"#)
        .await;
    let result = client.json().await;
    assert_eq!(result["type"], "result", "{result}");
    assert_eq!(result["id"], 2);
    assert_eq!(result["action"], "unsubscribe");
    assert_eq!(result["ok"], true);
    assert_eq!(
        result["subscription"],
        json!({"channels": ["readings"], "sensor_id": [a]})
    );
    let stats = ws_stats(&daemon).await;
    assert_eq!(stats["channels"]["sensors"]["connections"], 0);
    assert_eq!(stats["channels"]["readings"]["connections"], 1);

    // Errors, each answered with the message's id, none closing the socket.
    let bad: [(&str, Value, &str); 6] = [
        (r#"{"type": "dance", "id": 3}"#, json!(3), "unknown_action"),
        ("not json", Value::Null, "malformed"),
        ("[1, 2]", Value::Null, "malformed"),
        (r#"{"id": 4}"#, json!(4), "malformed"),
        (
            r#"{"type": "subscribe", "id": 5, "channels": ["weather"]}"#,
            json!(5),
            "unknown_channel",
        ),
        (
            r#"{"type": "subscribe", "id": 6, "sensor_id": ["x"]}"#,
            json!(6),
            "invalid",
        ),
    ];
    for (text, id, code) in bad {
        client.send_text(text).await;
        let answer = client.json().await;
        assert_eq!(answer["type"], "error", "{text}: {answer}");
        assert_eq!(answer["code"], code, "{text}: {answer}");
        assert_eq!(
            answer.get("id").cloned().unwrap_or(Value::Null),
            id,
            "{text}"
        );
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{answer}"
        );
    }

    // Still open, subscription unchanged: sensors left, readings of `a` only.
    let base = daemon.last_seq().await;
    http.put(&format!("/api/v1/sensores/{a}"), r#"{"modelo": "Z"}"#)
        .await; // +1
    http.reading(b, "humedad", 3.0).await; // +2
    let wanted = http.reading(a, "humedad", 4.0).await; // +3
    let event = client.json().await;
    assert_eq!(seq(&event), base + 3);
    assert_eq!(event["data"], wanted);
    client.send_text(r#"{"type": "ping", "id": 7}"#).await;
    let pong = client.json().await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], 7);
    assert_eq!(client.next_within(QUIET).await, None);
    daemon.stop().await;
}

/// Messages from `client`, appended to `events` (the entity events among them), until
/// `done` holds for one; returns that one.
async fn collect_until(
    client: &mut Client,
    events: &mut Vec<Value>,
    done: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let message = client.json().await;
        if message["entity_type"].is_string() {
            events.push(message.clone());
        }
        if done(&message) {
            return message;
        }
    }
}

/// A client that wants no readings follows the hub's ring without them (readings are
/// most events); asking for readings and dropping them again moves it between the rings.
/// Across the moves, with a sensor sampled every 50 ms, it gets every sensor event once,
/// and readings only while it wants them: none from before it asked, none missing, and
/// when it asked with a snapshot, every reading after the snapshot's `seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_readings_on_and_off_loses_and_repeats_nothing() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), &fast_sim("fast", 3)).await;
    let mut http = Http::connect(daemon.addr).await;
    let updated = http.create_sensor("humedad").await;
    let base = daemon.last_seq().await;
    let mut client = daemon
        .websocket("/api/v1/ws?channel=sensors")
        .await
        .greeted()
        .await;
    let mut events = Vec::new();
    // (last seq stored before asking, index of the period's first and past-last event)
    let mut periods = Vec::new();
    let path = format!("/api/v1/sensores/{updated}");
    let is_update = |modelo: String| {
        move |m: &Value| m["entity_type"] == "sensor" && m["data"]["modelo"] == modelo.as_str()
    };
    let is_result = |id: u64| move |m: &Value| m["type"] == "result" && m["id"] == id;
    for round in 0..3u64 {
        // A sensor change just before each switch, to cross it in either ring; then
        // readings the client must not get.
        http.put(&path, &format!(r#"{{"modelo": "before-{round}"}}"#))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut asked_at = daemon.last_seq().await;
        let with_snapshot = round == 1;
        client
            .send_text(&format!(
                r#"{{"type": "subscribe", "id": {}, "channels": ["readings"], "snapshot": {with_snapshot}}}"#,
                2 * round
            ))
            .await;
        collect_until(&mut client, &mut events, is_result(2 * round)).await;
        if with_snapshot {
            let snapshot =
                collect_until(&mut client, &mut events, |m| m["type"] == "snapshot").await;
            asked_at = seq(&snapshot);
        }
        let start = events.len();
        let readings = std::cell::Cell::new(0);
        collect_until(&mut client, &mut events, |m| {
            if m["entity_type"] == "reading" {
                readings.set(readings.get() + 1);
            }
            readings.get() == 5
        })
        .await;
        http.put(&path, &format!(r#"{{"modelo": "during-{round}"}}"#))
            .await;
        collect_until(
            &mut client,
            &mut events,
            is_update(format!("during-{round}")),
        )
        .await;
        client
            .send_text(&format!(
                r#"{{"type": "unsubscribe", "id": {}, "channels": ["readings"]}}"#,
                2 * round + 1
            ))
            .await;
        collect_until(&mut client, &mut events, is_result(2 * round + 1)).await;
        periods.push((asked_at, with_snapshot, start, events.len()));
    }
    http.put(&path, r#"{"modelo": "last"}"#).await;
    collect_until(&mut client, &mut events, is_update("last".into())).await;

    let received = seqs(&events);
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "out of order or twice: {received:?}"
    );
    let sensor_events: Vec<Value> = events
        .iter()
        .filter(|e| e["entity_type"] == "sensor")
        .cloned()
        .collect();
    assert_exactly_stored(dir.path(), "sensors", base, &sensor_events);
    let mut readings_in_periods = 0;
    for (asked_at, with_snapshot, start, end) in periods {
        let readings: Vec<u64> = events[start..end]
            .iter()
            .filter(|e| e["entity_type"] == "reading")
            .map(seq)
            .collect();
        let (first, last) = (readings[0], readings[readings.len() - 1]);
        assert!(
            first > asked_at,
            "a reading from before readings were asked for"
        );
        let from = if with_snapshot { asked_at } else { first - 1 };
        assert_eq!(
            readings,
            stored_seqs(dir.path(), "readings", from, last),
            "readings missing while they were wanted"
        );
        readings_in_periods += readings.len();
    }
    let readings_received = events
        .iter()
        .filter(|e| e["entity_type"] == "reading")
        .count();
    assert_eq!(
        readings_received, readings_in_periods,
        "readings while none were wanted"
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Per-subscription rate.

/// `rate_ms=500` with a sensor sampled every 50 ms: about one reading per sensor and
/// `tipo` every half second, not every sample; an unthrottled client on the same daemon
/// gets every sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_ms_limits_readings_per_sensor_and_tipo() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), &fast_sim("sim", 4)).await;
    let calm = daemon
        .websocket("/api/v1/ws?channel=readings&rate_ms=500")
        .await
        .greeted()
        .await;
    let full = daemon
        .websocket("/api/v1/ws?channel=readings")
        .await
        .greeted()
        .await;

    let window = Duration::from_millis(2000);
    let count = |mut client: Client| async move {
        let end = Instant::now() + window;
        let mut per_tipo: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match client.next_within(left).await {
                None => break,
                Some(Received::Json(event)) => per_tipo
                    .entry(event["data"]["tipo"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(seq(&event)),
                Some(other) => panic!("socket ended: {other:?}"),
            }
        }
        per_tipo
    };
    let (calm, full) = tokio::join!(count(calm), count(full));

    for tipo in ["temperatura", "humedad"] {
        let all = full.get(tipo).map_or(0, Vec::len);
        assert!(all >= 20, "unthrottled client got {all} {tipo} readings");
        let some = calm.get(tipo).cloned().unwrap_or_default();
        assert!(
            (2..=6).contains(&some.len()),
            "rate_ms=500 over 2 s let {} {tipo} readings through: {some:?}",
            some.len()
        );
        // The newest wins: never an older reading after a newer one.
        assert!(some.windows(2).all(|w| w[0] < w[1]), "{some:?}");
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Slow clients.

/// A WebSocket client over a socket with a small receive buffer, so that a client that
/// does not read pushes back on the server quickly.
async fn small_buffer_websocket(addr: SocketAddr, path: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}{path}"),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("websocket connects");
    Client { socket }
}

fn resident_memory_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The `seq` of an event frame without parsing all of it (`seq` is its last field);
/// for clients that read megabytes of frames.
fn frame_seq(text: &str) -> u64 {
    let at = text.rfind("\"seq\":").expect("an event frame") + 6;
    text[at..]
        .trim_end_matches('}')
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no seq at the end of {}", &text[at..]))
}

/// A client that never reads is closed (4008, with the `since` to resume from) while ten
/// others keep receiving every event, and memory stays bounded.
///
/// Loopback socket buffers absorb a MB or more before the daemon's writes block, and a
/// reading's frame is a few hundred bytes, so the slow client's socket is first filled
/// with sensor updates whose frames carry a 48 KB `fuente` (every client follows
/// `sensors` and `readings`), then 400 readings spread over 50 sensors, too many for
/// coalescing to save it, overflow its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_and_others_get_every_event() {
    let _gate = GATE.write().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "[realtime]\nclient_queue = 16\n").await;
    let mut http = Http::connect(daemon.addr).await;
    let mut sensors = Vec::new();
    for _ in 0..50 {
        sensors.push(http.create_sensor("temperatura").await);
    }
    let memory_before = resident_memory_kib();
    let start = daemon.last_seq().await;
    let path = "/api/v1/ws?channel=sensors,readings";

    // The slow client reads nothing until the daemon has given up on it, then reads
    // what is left: what was in flight, and the Close frame.
    let mut slow = small_buffer_websocket(daemon.addr, path).await;
    let addr = daemon.addr;
    let slow_client = tokio::spawn(async move {
        let mut http = Http::connect(addr).await;
        let deadline = Instant::now() + Duration::from_secs(12);
        let mut peak_queued = 0;
        while Instant::now() < deadline {
            let (_, stats) = http.request("GET", "/api/v1/ws/stats", None).await;
            peak_queued = peak_queued.max(stats["queued_frames"].as_u64().unwrap());
            if stats["channels"]["readings"]["slow_disconnects"].as_u64() >= Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut seqs = Vec::new();
        loop {
            match slow.next().await {
                Received::Json(event) if event["type"] == "entity_event" => seqs.push(seq(&event)),
                Received::Json(greeting) => assert!(
                    greeting["type"] == "connection" || greeting["type"] == "stats",
                    "{greeting}"
                ),
                Received::Closed(code, reason) => return (seqs, code, reason, peak_queued),
            }
        }
    });

    let target = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut client = daemon.websocket(path).await.greeted().await;
        let target = target.clone();
        readers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut got = Vec::new();
            while got
                .last()
                .is_none_or(|&s| s < target.load(Ordering::Relaxed))
            {
                assert!(Instant::now() < deadline, "reader timed out");
                match tokio::time::timeout(Duration::from_millis(100), client.socket.next()).await {
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Text(text)))) => got.push(frame_seq(&text)),
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                    Ok(other) => return (got, Some(format!("{other:?}")), client),
                }
            }
            (got, None, client)
        }));
    }
    assert_eq!(ws_stats(&daemon).await["total_connections"], 11);

    // First the updates, which stop the slow client's socket, then the readings, which
    // overflow its queue for good.
    let filler = "x".repeat(48 * 1024);
    for i in 0..100 {
        let body = big_update(i, &filler);
        http.put(
            &format!("/api/v1/sensores/{}", sensors[i % sensors.len()]),
            &body,
        )
        .await;
    }
    let readings: Vec<_> = (0..2)
        .map(|p| {
            let mine: Vec<i64> = sensors.iter().skip(p).step_by(2).copied().collect();
            post_in_background(daemon.addr, mine, 200)
        })
        .collect();
    for poster in readings {
        assert_eq!(poster.await.unwrap().len(), 200);
    }
    let end = daemon.last_seq().await;
    assert_eq!(end, start + 500);
    target.store(end, Ordering::Relaxed);
    let mut expected = stored_seqs(dir.path(), "readings", start, end);
    expected.extend(stored_seqs(dir.path(), "sensors", start, end));
    expected.sort_unstable();
    assert_eq!(expected, (start + 1..=end).collect::<Vec<_>>());
    let mut normal = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let (got, closed, client) = reader.await.unwrap();
        normal.push(client);
        assert_eq!(
            closed,
            None,
            "normal client {i} ended after {} events",
            got.len()
        );
        assert!(
            got == expected,
            "normal client {i} missed or repeated events: got {} of {}",
            got.len(),
            expected.len()
        );
    }

    let (slow_seqs, code, reason, peak_queued) = slow_client.await.unwrap();
    assert_eq!(code, Some(4008), "{reason}");
    let resume_from: u64 = reason
        .split("since=")
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no since= in {reason:?}"));
    assert!(
        slow_seqs.len() < expected.len(),
        "the slow client got everything"
    );
    assert!(slow_seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(
        resume_from == 0 || slow_seqs.contains(&resume_from),
        "resume point {resume_from} was never delivered"
    );
    let counted = wait_for_stats(&daemon, "back to ten connections", |s| {
        s["total_connections"] == 10
    })
    .await;
    assert_eq!(counted["channels"]["readings"]["slow_disconnects"], 1);
    assert_eq!(counted["channels"]["sensors"]["slow_disconnects"], 1);
    assert_eq!(counted["channels"]["readings"]["connections"], 10);

    // Memory: at most `client_queue` frames wait per client while the slow one is
    // stuck, and the process as a whole stays small.
    assert!(
        peak_queued <= 11 * 16,
        "{peak_queued} frames queued for 11 clients"
    );
    let grown_mib = resident_memory_kib().saturating_sub(memory_before) / 1024;
    assert!(grown_mib < 100, "memory grew by {grown_mib} MiB");
    drop(normal);
    daemon.stop().await;
}

/// Panics outside test code on threads named `threads`, recorded from the moment this is
/// first called. The daemon runs in-process, so a panic in one of its tasks (which tokio
/// catches, and which aborts the release build) shows up here, on the worker threads of
/// the runtime the test runs it on.
fn daemon_panics(threads: &str) -> Vec<String> {
    static PANICS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"));
            if !in_tests {
                let thread = std::thread::current().name().unwrap_or("").to_owned();
                PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((thread, info.to_string()));
            }
            previous(info);
        }));
    });
    PANICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(thread, _)| thread == threads)
        .map(|(_, panic)| panic.clone())
        .collect()
}

/// Runs a test on a runtime of its own whose worker threads are named `name`, so that
/// [`daemon_panics`] can tell its daemon's panics from other tests'.
fn run_on_named_runtime(name: &str, test: impl std::future::Future<Output = ()>) {
    daemon_panics(name);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test)
}

fn assert_no_daemon_panics(threads: &str) {
    let panics = daemon_panics(threads);
    assert!(panics.is_empty(), "daemon tasks panicked: {panics:#?}");
}

/// Clients that vanish (connection reset) while events stream to them end their sessions
/// cleanly: no task of the daemon panics, the connections are uncounted, and everyone
/// else carries on. Whether the daemon notices a reset first on the read or the write
/// side is up to timing, so many clients vanish, each while events keep flowing.
#[test]
fn clients_vanishing_mid_stream_end_their_sessions_cleanly() {
    run_on_named_runtime("vanishing-clients", async {
        let _gate = GATE.read().await;
        let dir = temp_dir();
        let daemon = start_open(dir.path(), "").await;
        let mut http = Http::connect(daemon.addr).await;
        let sensor = http.create_sensor("temperatura").await;
        let mut steady = daemon
            .websocket("/api/v1/ws?channel=readings")
            .await
            .greeted()
            .await;

        let start = daemon.last_seq().await;
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (stop, addr) = (stop.clone(), daemon.addr);
            tokio::spawn(async move {
                let mut http = Http::connect(addr).await;
                let mut posted = 0;
                while !stop.load(Ordering::Relaxed) {
                    http.reading(sensor, "temperatura", 1.0).await;
                    posted += 1;
                }
                posted
            })
        };
        for _ in 0..60 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            let stream = socket.connect(daemon.addr).await.unwrap();
            stream.set_zero_linger().unwrap();
            let (socket, _) = tokio_tungstenite::client_async(
                format!("ws://{}/api/v1/ws?channel=readings", daemon.addr),
                tokio_tungstenite::MaybeTlsStream::Plain(stream),
            )
            .await
            .expect("websocket connects");
            let mut client = Client { socket };
            // Take a few events, then vanish without a close handshake.
            for _ in 0..5 {
                client.next().await;
            }
            drop(client);
        }
        stop.store(true, Ordering::Relaxed);
        let posted = producer.await.unwrap();
        let end = daemon.last_seq().await;
        let got = events_until(&mut steady, end).await;
        assert_eq!(got.len(), posted);
        assert_exactly_stored(dir.path(), "readings", start, &got);
        wait_for_stats(&daemon, "uncounted the vanished clients", |s| {
            s["total_connections"] == 1
        })
        .await;
        let (status, health) = daemon.get("/healthz").await;
        assert_eq!(status, 200, "{health}");
        assert_no_daemon_panics("vanishing-clients");
        daemon.stop().await;
    });
}

/// A client whose socket accepts nothing for the write timeout (10 s), without ever
/// overflowing its queue, is disconnected and counted as slow, and its session ends
/// without a panic.
#[test]
fn a_socket_that_accepts_nothing_for_the_write_timeout_is_dropped() {
    run_on_named_runtime("stuck-socket", async {
        let _gate = GATE.read().await;
        let dir = temp_dir();
        let daemon = start_open(dir.path(), "").await;
        let mut http = Http::connect(daemon.addr).await;
        let sensor = http.create_sensor("temperatura").await;
        let mut stuck = small_buffer_websocket(daemon.addr, "/api/v1/ws?channel=sensors").await;

        // 5 MB of sensor updates: far more than the socket buffers take, far fewer frames
        // than the default queue of 1024.
        let filler = "x".repeat(48 * 1024);
        let began = Instant::now();
        for i in 0..100 {
            let body = big_update(i, &filler);
            http.put(&format!("/api/v1/sensores/{sensor}"), &body).await;
        }
        let deadline = Instant::now() + Duration::from_secs(13);
        let stats = loop {
            let stats = ws_stats(&daemon).await;
            if stats["channels"]["sensors"]["slow_disconnects"] == 1 {
                break stats;
            }
            assert!(Instant::now() < deadline, "never dropped: {stats}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Not before its socket has accepted nothing for the whole timeout.
        assert!(
            began.elapsed() >= Duration::from_secs(10),
            "dropped after {:?}",
            began.elapsed()
        );
        assert_eq!(stats["channels"]["sensors"]["slow_disconnects"], 1);
        // What the buffers held, then the end of the connection.
        let mut events = 0;
        let end = loop {
            match stuck.next().await {
                Received::Json(event) if event["type"] == "entity_event" => events += 1,
                Received::Json(_) => {}
                closed => break closed,
            }
        };
        assert!(events < 100, "the stuck client got all {events} updates");
        assert!(matches!(end, Received::Closed(..)), "{end:?}");
        wait_for_stats(&daemon, "uncounted the stuck client", |s| {
            s["total_connections"] == 0
        })
        .await;
        assert_no_daemon_panics("stuck-socket");
        daemon.stop().await;
    });
}

// ---------------------------------------------------------------------------------------
// Server-Sent Events.

/// A raw Server-Sent Events client: decodes the chunked body as it arrives.
struct EventStream {
    stream: TcpStream,
    raw: Vec<u8>,
    text: String,
    ended: bool,
}

/// One event of the stream.
#[derive(Debug)]
struct SseEvent {
    id: Option<u64>,
    retry: Option<u64>,
    data: Option<Value>,
}

impl EventStream {
    /// Opens a stream; asserts the response is a chunked `text/event-stream`.
    async fn open(addr: SocketAddr, path: &str, headers: &str) -> EventStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
                .await
                .expect("response head in time")
                .unwrap();
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(head.contains("cache-control: no-cache"), "{head}");
        EventStream {
            stream,
            raw: raw[head_end..].to_vec(),
            text: String::new(),
            ended: false,
        }
    }

    /// Moves complete chunks from `raw` to `text`.
    fn dechunk(&mut self) {
        while let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let chunk = self.raw[start..start + size].to_vec();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next block of lines up to a blank line, or `None` if nothing complete arrives
    /// within `wait` or the stream ended.
    async fn next_block(&mut self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 8192];
        loop {
            self.dechunk();
            if let Some(end) = self.text.find("\n\n") {
                let block = self.text[..end].to_owned();
                self.text.drain(..end + 2);
                return Some(block);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.ended = true;
                    return None;
                }
                Ok(Ok(n)) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The next event (comment-only blocks skipped).
    async fn next_within(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let block = self.next_block(left).await?;
            let mut event = SseEvent {
                id: None,
                retry: None,
                data: None,
            };
            let mut any = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                any = true;
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => event.id = Some(value.parse().unwrap()),
                    "retry" => event.retry = Some(value.parse().unwrap()),
                    "data" => event.data = Some(serde_json::from_str(value).unwrap()),
                    other => panic!("unexpected field {other:?} in {block:?}"),
                }
            }
            if any {
                return Some(event);
            }
        }
    }

    async fn next(&mut self) -> SseEvent {
        self.next_within(PATIENCE)
            .await
            .expect("an event on the stream in time")
    }

    /// Data events until one with `id >= until`; checks that each id is its data's seq.
    async fn events_until(&mut self, until: u64) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let data = event.data.expect("an event with data");
            assert_eq!(event.id, Some(seq(&data)), "id is not the seq: {data}");
            events.push(data);
            if event.id >= Some(until) {
                return events;
            }
        }
    }
}

/// `GET /api/v1/events`: the same events as the socket, as `id: SEQ` / `data: ENVELOPE`;
/// `Last-Event-ID` and `?since` resume with exactly the events after it; filters and
/// snapshots apply; bad requests get JSON errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_delivers_and_resumes_exactly() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "").await;
    let mut http = Http::connect(daemon.addr).await;
    let x = http.create_sensor("temperatura").await;
    let y = http.create_sensor("humedad").await;
    for i in 0..5 {
        http.reading(x, "temperatura", f64::from(i)).await;
    }
    assert_eq!(daemon.last_seq().await, 7);

    // Live.
    let mut live = EventStream::open(daemon.addr, "/api/v1/events?channel=readings", "").await;
    let first = live.next().await;
    assert_eq!(first.retry, Some(2000));
    assert!(first.data.is_none());
    let mut posted = Vec::new();
    for i in 0..3 {
        posted.push(http.reading(y, "humedad", f64::from(i)).await);
    }
    let got = live.events_until(10).await;
    assert_eq!(seqs(&got), [8, 9, 10]);
    assert_exactly_stored(dir.path(), "readings", 7, &got);
    for (event, reading) in got.iter().zip(&posted) {
        assert_eq!(&event["data"], reading);
    }

    // Resume with Last-Event-ID while more readings are being posted.
    let producer = post_in_background(daemon.addr, vec![x, y], 100);
    let mut resumed = EventStream::open(
        daemon.addr,
        "/api/v1/events?channel=readings",
        "Last-Event-ID: 4\r\n",
    )
    .await;
    assert_eq!(resumed.next().await.retry, Some(2000));
    producer.await.unwrap();
    let marker = daemon.last_seq().await;
    let got = resumed.events_until(marker).await;
    assert_exactly_stored(dir.path(), "readings", 4, &got);
    assert_eq!(seq(&got[0]), 5);
    assert!(resumed.next_within(QUIET).await.is_none());
    // The live stream got the same events.
    let more = live.events_until(marker).await;
    assert_exactly_stored(dir.path(), "readings", 10, &more);

    // Resume with ?since, filtered to one sensor.
    let mut since = EventStream::open(
        daemon.addr,
        &format!("/api/v1/events?channel=readings&since=6&sensor_id={y}"),
        "",
    )
    .await;
    assert_eq!(since.next().await.retry, Some(2000));
    let expected: Vec<Stored> = stored(dir.path(), "readings", 6, marker)
        .into_iter()
        .filter(|e| e.frame["data"]["sensor_id"] == y)
        .collect();
    let got = since.events_until(expected.last().unwrap().seq).await;
    assert_eq!(
        got,
        expected.into_iter().map(|e| e.frame).collect::<Vec<_>>()
    );
    assert!(since.next_within(QUIET).await.is_none());

    // A browser reconnecting to a URL with `since` and `snapshot` sends what it saw
    // last: it resumes from there, with no second snapshot and nothing seen again.
    let mut reconnected = EventStream::open(
        daemon.addr,
        "/api/v1/events?channel=readings&since=6&snapshot=true",
        &format!("Last-Event-ID: {}\r\n", marker - 2),
    )
    .await;
    assert_eq!(reconnected.next().await.retry, Some(2000));
    let got = reconnected.events_until(marker).await;
    assert_eq!(seqs(&got), [marker - 1, marker]);
    assert!(reconnected.next_within(QUIET).await.is_none());

    // A snapshot carries its seq as id.
    let mut snap = EventStream::open(
        daemon.addr,
        &format!("/api/v1/events?channel=readings&snapshot=true&sensor_id={x}"),
        "",
    )
    .await;
    assert_eq!(snap.next().await.retry, Some(2000));
    let snapshot = snap.next().await;
    let data = snapshot.data.unwrap();
    assert_eq!(data["type"], "snapshot");
    assert_eq!(snapshot.id, Some(marker));
    assert_eq!(data["seq"], marker);
    assert_eq!(data["readings"].as_array().unwrap().len(), 1);
    assert_eq!(data["readings"][0]["sensor_id"], x);
    let wanted = http.reading(x, "temperatura", 42.0).await;
    http.reading(y, "humedad", 42.0).await;
    let got = snap.events_until(marker + 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["data"], wanted);
    assert!(snap.next_within(QUIET).await.is_none());

    // Bad requests.
    let (status, body) = daemon.get("/api/v1/events?channel=weather").await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "unknown_channel");
    assert!(body["detail"].as_str().unwrap().contains("weather"));
    let request = format!(
        "GET /api/v1/events?channel=readings HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nLast-Event-ID: abc\r\n\r\n",
        daemon.addr
    );
    let (status, body) = common::split_response(
        &common::raw_exchange(daemon.addr, request.into_bytes())
            .await
            .unwrap(),
    );
    assert_eq!(status, 422);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "invalid");
    assert_eq!(body["errors"][0]["field"], "Last-Event-ID");
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Keepalive.

/// With `ping_interval_s = 1`, a client that never answers pings is closed with 4000
/// after two intervals; a client that reads (and so answers) stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_pings_close_the_socket_with_4000() {
    let _gate = GATE.read().await;
    let dir = temp_dir();
    let daemon = start_open(dir.path(), "[realtime]\nping_interval_s = 1\n").await;
    let mut silent = daemon
        .websocket("/api/v1/ws?channel=general")
        .await
        .greeted()
        .await;
    let connected = Instant::now();
    let mut alive = daemon
        .websocket("/api/v1/ws?channel=general")
        .await
        .greeted()
        .await;

    // The live client reads (tungstenite answers each ping as it reads it) for 3.5 s,
    // while the silent one is left alone; stats tell when the silent one was dropped.
    let reading = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_millis(3500);
        let mut pings = 0;
        while let Ok(message) = tokio::time::timeout_at(end, alive.socket.next()).await {
            match message {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("the answering client got {other:?}"),
            }
        }
        (alive, pings)
    });
    let stats = wait_for_stats(&daemon, "dropped the silent client", |s| {
        s["total_connections"] == 1
    })
    .await;
    let dropped_after = connected.elapsed();
    assert_eq!(stats["channels"]["general"]["connections"], 1);
    assert!(
        dropped_after >= Duration::from_millis(1500)
            && dropped_after <= Duration::from_millis(3500),
        "silent client dropped after {dropped_after:?}"
    );

    let (mut alive, pings) = reading.await.unwrap();
    assert!(pings >= 2, "only {pings} pings in 3.5 s");
    alive.send_text(r#"{"type": "ping", "id": 1}"#).await;
    assert_eq!(alive.json().await["type"], "pong");
    assert_eq!(ws_stats(&daemon).await["total_connections"], 1);

    match silent.next().await {
        Received::Closed(code, reason) => {
            assert_eq!(code, Some(4000), "{reason}");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a close, got {other:?}"),
    }
    daemon.stop().await;
}
