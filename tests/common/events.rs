//! Events as the daemon stored them and as clients received them: what the tests of live
//! delivery compare. Expected events are never guessed: they are read from the daemon's
//! own event log, which holds every emitted event with its `seq` and the exact frame that
//! was sent.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{database, http, stored_frame, until, Client, Daemon, Received, EVENT_COLUMNS};

/// A daemon whose one sensor stored a burst of readings and then hung (see
/// [`Burst::start`]), for the tests of events removed while a client replays them.
pub struct Burst {
    pub daemon: Daemon,
    /// The ids (`seq`s) of the readings, in order.
    pub readings: Vec<u64>,
}

impl Burst {
    /// At least `count` readings (a multiple of 2,000: a thousand samples a read, two
    /// readings each), far more than a socket's buffers hold, so that a replay of them
    /// waits for its client long before its end.
    pub async fn start(count: u64) -> Burst {
        let source = format!(
            "{{ kind = \"sim\", profile = \"dht22\", failure_rate = 0.0, \
             samples_per_read = 1000, hang_after_reads = {}, seed = 1 }}",
            count / 2000
        );
        let daemon = Daemon::open(&super::sensor_table(
            "burst",
            "temperatura",
            "DHT22",
            0.05,
            &source,
        ))
        .await;
        let db = daemon.database();
        until("the burst stored", || async {
            let stored: i64 = db
                .query_row("SELECT COUNT(*) FROM reading_rows", [], |r| r.get(0))
                .unwrap();
            (stored as u64 >= count).then_some(())
        })
        .await;
        let readings = db
            .prepare("SELECT id FROM reading_rows ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get::<_, i64>(0).map(|id| id as u64))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        Burst { daemon, readings }
    }

    /// The newest reading's `seq`.
    pub fn last(&self) -> u64 {
        *self.readings.last().unwrap()
    }

    /// Removes every event but the newest `keep` readings, as retention does: in one
    /// transaction, with the log's floor. Returns the floor.
    pub fn keep_newest(&self, keep: u64) -> u64 {
        let floor = self.last() + 1 - keep;
        self.daemon
            .database()
            .execute_batch(&format!(
                "BEGIN IMMEDIATE; \
                 DELETE FROM events WHERE seq < {floor}; \
                 DELETE FROM reading_rows WHERE id < {floor}; \
                 UPDATE store_meta SET value = {floor} WHERE key = 'log_floor'; \
                 COMMIT;"
            ))
            .unwrap();
        floor
    }

    /// Checks what a client received around a removal with [`Burst::keep_newest`]: the
    /// readings from the first on without a gap (`before`), a `resync` naming the last of
    /// them and the floor, then every reading kept, once each, in order (`after`).
    pub fn assert_told(&self, before: &[u64], resync: &Value, after: &[u64], floor: u64) {
        assert!(
            !before.is_empty() && before.len() < self.readings.len() / 2,
            "{} sent before the removal",
            before.len()
        );
        assert_eq!(before[..], self.readings[..before.len()]);
        assert_eq!(resync["type"], "resync");
        assert_eq!(resync["reason"], "since_too_old");
        assert_eq!(resync["since"], *before.last().unwrap());
        assert_eq!(resync["oldest_seq"], floor);
        assert!(
            resync["last_seq"].as_u64().unwrap() >= self.last(),
            "{resync}"
        );
        let kept: Vec<u64> = self
            .readings
            .iter()
            .copied()
            .filter(|&id| id >= floor)
            .collect();
        assert_eq!(after[..], kept[..]);
    }
}

/// A simulated DHT22 sampled every 50 ms (the fastest allowed): about 40 readings a
/// second, temperature and humidity.
pub fn fast_sim(name: &str, seed: u64) -> String {
    let source = format!("{{ kind = \"sim\", seed = {seed} }}");
    super::sensor_table(name, "temperatura", "DHT22", 0.05, &source)
}

/// A sensor update whose frame is large: an inactive serial source with a long key
/// table (the source spec is the one free-form part of a sensor).
pub fn big_update(n: usize, filler: &str) -> String {
    format!(
        r#"{{"activo": false, "fuente": {{"kind": "serial", "path": "/dev/ttyUSB{n}", "keys": {{"k": {{"tipo": "{filler}", "unidad": "u"}}}}}}}}"#
    )
}

/// Posts `count` readings spread over `sensors` (`tipo` temperatura) from a task of its
/// own; returns the ids of the stored readings.
pub fn post_in_background(
    addr: SocketAddr,
    sensors: Vec<i64>,
    count: usize,
) -> tokio::task::JoinHandle<Vec<i64>> {
    tokio::spawn(async move {
        let mut http = http::Client::new(addr);
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            let sensor = sensors[i % sensors.len()];
            let reading = http.reading(sensor, "temperatura", i as f64).await;
            ids.push(reading["id"].as_i64().unwrap());
        }
        ids
    })
}

/// One stored event: its `seq` and the frame every client was sent, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: u64,
    pub frame: Value,
}

/// Stored events on `channel` with `after < seq <= upto`, by seq.
pub fn stored(dir: &Path, channel: &str, after: u64, upto: u64) -> Vec<Stored> {
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

/// The `seq`s of [`stored`] events.
pub fn stored_seqs(dir: &Path, channel: &str, after: u64, upto: u64) -> Vec<u64> {
    stored(dir, channel, after, upto)
        .iter()
        .map(|e| e.seq)
        .collect()
}

/// The newest stored `seq`.
pub fn stored_last_seq(dir: &Path) -> u64 {
    database(dir)
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM event_log", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
}

/// Creates a sensor of `temperatura` and posts `count` readings of it, valued 0, 1, ...;
/// returns its id.
pub async fn sensor_with_readings(http: &mut http::Client, count: u32) -> i64 {
    let sensor = http.create_sensor("temperatura").await;
    for i in 0..count {
        http.reading(sensor, "temperatura", f64::from(i)).await;
    }
    sensor
}

/// The next message of `client` without its `timestamp`, which must be there.
pub async fn untimed(client: &mut Client) -> Value {
    let mut message = client.json().await;
    assert!(message["timestamp"].is_string(), "{message}");
    message.as_object_mut().unwrap().remove("timestamp");
    message
}

/// The `seq` of an event; panics on anything else.
pub fn seq(event: &Value) -> u64 {
    event["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in {event}"))
}

/// The `seq` of each event.
pub fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(seq).collect()
}

/// Events from `client` until one with `seq >= until`; panics on anything that is not an
/// event or if the socket ends first.
pub async fn events_until(client: &mut Client, until: u64) -> Vec<Value> {
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
pub fn assert_exactly_stored(dir: &Path, channel: &str, after: u64, received: &[Value]) {
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

/// The ids of the readings among `events`.
pub fn reading_ids(events: &[Value]) -> BTreeSet<i64> {
    events
        .iter()
        .filter(|e| e["entity_type"] == "reading")
        .map(|e| e["data"]["id"].as_i64().unwrap())
        .collect()
}

/// `/api/v1/ws/stats`.
pub async fn ws_stats(daemon: &Daemon) -> Value {
    let (status, stats) = daemon.get("/api/v1/ws/stats").await;
    assert_eq!(status, 200);
    stats
}

/// Waits (bounded) until `check` holds for `/api/v1/ws/stats`; returns the stats then.
pub async fn wait_for_stats(daemon: &Daemon, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    until(what, || async {
        let stats = ws_stats(daemon).await;
        check(&stats).then_some(stats)
    })
    .await
}
