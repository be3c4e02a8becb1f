//! End-to-end tests of sensor acquisition: real pseudo-terminals for serial devices,
//! sysfs trees laid out as the kernel does for IIO and 1-Wire sensors, and the daemon's
//! REST, WebSocket and health answers about them.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    count, salud, salud_until, sensor_named, temp_dir, until, Client, Daemon, Received, SENSOR,
};
use sensorgate::demo::{w1_slave, Sysfs};
use serde_json::{json, Value};
use serialport::{SerialPort, TTYPort};
use tokio::time::Instant;

/// Sensors go offline after two intervals without a good sample.
const OFFLINE_AFTER_TWO: &str = "[sampling]\noffline_after_intervals = 2\n";

/// How long to wait for something the daemon does on its own pace (a sample, a
/// reconnection after back-off).
const SETTLE: Duration = Duration::from_secs(5);
/// How long silence must last to count as "nothing more comes".
const QUIET: Duration = Duration::from_millis(600);

/// What a reading measured, without its id and time.
fn measured(reading: &Value) -> Value {
    json!({
        "tipo": reading["tipo"],
        "valor": reading["valor"],
        "unidad": reading["unidad"],
    })
}

fn m(tipo: &str, valor: f64, unidad: &str) -> Value {
    json!({"tipo": tipo, "valor": valor, "unidad": unidad})
}

/// The next JSON message, or `None` after `wait`; a closed socket fails the test.
async fn next_json_within(client: &mut Client, wait: Duration) -> Option<Value> {
    match client.next_within(wait).await? {
        Received::Json(value) => Some(value),
        other => panic!("expected JSON, got {other:?}"),
    }
}

/// The next JSON message; fails the test if none arrives within `wait`.
async fn next_json(client: &mut Client, wait: Duration, what: &str) -> Value {
    next_json_within(client, wait)
        .await
        .unwrap_or_else(|| panic!("no {what} within {wait:?}"))
}

/// The `data` of the next reading event, checking the envelope.
async fn next_reading(client: &mut Client) -> Value {
    let event = next_json(client, SETTLE, "reading").await;
    assert_eq!(event["type"], "entity_event", "{event}");
    assert_eq!(event["entity_type"], "reading", "{event}");
    assert_eq!(event["event_type"], "created", "{event}");
    assert_eq!(event["entity_id"], event["data"]["id"], "{event}");
    event["data"].clone()
}

/// The next system event, checking that it is about `sensor_id`.
async fn next_system(client: &mut Client, sensor_id: i64, what: &str) -> Value {
    let event = next_json(client, SETTLE, what).await;
    assert_eq!(event["type"], "system_event", "{event}");
    assert_eq!(event["data"]["sensor_id"], sensor_id, "{event}");
    event
}

/// The stored readings of a sensor, oldest first.
async fn stored_readings(daemon: &Daemon, id: i64) -> Vec<Value> {
    let (status, readings) = daemon
        .get(&format!(
            "/api/v1/lecturas/?sensor_id={id}&order=asc&limit=10000"
        ))
        .await;
    assert_eq!(status, 200, "{readings}");
    readings.as_array().unwrap().clone()
}

/// Milliseconds between two RFC 3339 times.
fn millis_between(from: &Value, to: &Value) -> i64 {
    let parse = |t: &Value| chrono::DateTime::parse_from_rfc3339(t.as_str().unwrap()).unwrap();
    (parse(to) - parse(from)).num_milliseconds()
}

/// A config with one `[[sensor]]`; `extra` goes first (e.g. a `[sampling]` table).
fn one_sensor(extra: &str, name: &str, interval_s: f64, source: &str) -> String {
    let table = common::sensor_table(name, "temperatura", "test", interval_s, source);
    format!("{extra}\n{table}")
}

/// A TOML literal string holding `path`.
fn toml_path(path: &Path) -> String {
    let text = path.to_str().unwrap();
    assert!(!text.contains('\''), "{text}");
    format!("'{text}'")
}

// ---------------------------------------------------------------------------------------
// Serial

/// A pseudo-terminal pair: the master is the test's end of the cable, the slave's path is
/// what the daemon opens.
fn pty() -> (TTYPort, TTYPort, String) {
    let (master, slave) = TTYPort::pair().expect("pseudo-terminal pair");
    let path = slave.name().expect("the slave pty has a path");
    (master, slave, path)
}

fn send(master: &mut TTYPort, bytes: &[u8]) {
    master.write_all(bytes).unwrap();
    master.flush().unwrap();
}

fn serial_source(path: &str) -> String {
    format!("{{ kind = \"serial\", path = '{path}', baud = 9600 }}")
}

/// Probe lines that came back as readings.
struct Synced {
    probes: Vec<Value>,
}

impl Synced {
    fn last_timestamp(&self) -> &Value {
        &self.probes.last().unwrap()["timestamp"]
    }
}

/// Writes probe lines (`P=<n>`, a pressure) until one comes back as a reading: the port
/// is then open and past the resynchronisation that drops bytes up to the first newline
/// after opening (a probe written before the port was open is flushed, one written while
/// it resynchronises is dropped whole; neither is counted). Then waits for the line to
/// stay quiet, so that a late probe cannot be mistaken for what the test sends next.
async fn sync_serial(master: &mut TTYPort, readings: &mut Client) -> Synced {
    let deadline = Instant::now() + SETTLE;
    let mut probe = 900;
    let mut probes = Vec::new();
    while probes.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no probe line came back as a reading: the daemon never opened the port"
        );
        probe += 1;
        send(master, format!("P={probe}\n").as_bytes());
        if let Some(event) = next_json_within(readings, Duration::from_millis(700)).await {
            probes.push(event["data"].clone());
        }
    }
    while let Some(event) = next_json_within(readings, QUIET).await {
        probes.push(event["data"].clone());
    }
    for reading in &probes {
        assert_eq!(reading["tipo"], "presion", "not a probe: {reading}");
        assert_eq!(reading["unidad"], "hPa", "{reading}");
    }
    Synced { probes }
}

#[tokio::test]
async fn serial_lines_become_readings_and_garbage_is_counted() {
    let (mut master, _slave, path) = pty();
    let daemon = Daemon::with(&one_sensor("", "arduino", 1.0, &serial_source(&path))).await;
    let id = sensor_named(&daemon, "arduino").await;
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let synced = sync_serial(&mut master, &mut readings).await;
    let before = salud(&daemon, id).await;
    assert_eq!(count(&before, "malformed"), 0, "{before}");

    send(&mut master, b"T=21.4 H=40.2\n");
    let t = next_reading(&mut readings).await;
    let h = next_reading(&mut readings).await;
    assert_eq!(measured(&t), m("temperatura", 21.4, "°C"));
    assert_eq!(measured(&h), m("humedad", 40.2, "%"));
    assert_eq!(t["sensor_id"], id);
    assert_eq!(h["sensor_id"], id);
    assert_eq!(t["timestamp"], h["timestamp"], "one line is one sample");

    // Garbage between good lines: skipped, and the next good line still arrives.
    send(&mut master, b"@@@\n{\"t\": 22.0}\n");
    let json_line = next_reading(&mut readings).await;
    assert_eq!(measured(&json_line), m("temperatura", 22.0, "°C"));

    send(&mut master, b"\xff\xfe\x80 T=1\n");
    send(&mut master, &[b'x'; 300]);
    send(&mut master, b"\nT=23.5 H=41\n");
    let t2 = next_reading(&mut readings).await;
    let h2 = next_reading(&mut readings).await;
    assert_eq!(measured(&t2), m("temperatura", 23.5, "°C"));
    assert_eq!(measured(&h2), m("humedad", 41.0, "%"));
    assert_eq!(
        next_json_within(&mut readings, QUIET).await,
        None,
        "garbage produced a reading"
    );

    let good_lines = synced.probes.len() as u64 + 3;
    let health = salud_until(&daemon, id, "three malformed lines counted", |s| {
        count(s, "malformed") == 3 && count(s, "ok") == good_lines
    })
    .await;
    assert_eq!(
        health["conteo"],
        json!({"ok": good_lines, "malformed": 3}),
        "{health}"
    );
    assert_eq!(health["estado"], "online");
    assert_eq!(health["conectado"], true);
    assert_eq!(
        health["ultimo_error"],
        "malformed input: line longer than 256 bytes"
    );
    assert_eq!(health["ultima_muestra"], t2["timestamp"]);

    // What was pushed is what is stored, in order, and nothing else.
    let stored: Vec<Value> = stored_readings(&daemon, id)
        .await
        .into_iter()
        .filter(|r| r["tipo"] != "presion")
        .collect();
    assert_eq!(stored, vec![t, h, json_line, t2, h2]);
    daemon.stop().await;
}

#[tokio::test]
async fn serial_device_unplugged_and_plugged_back() {
    let dir = temp_dir();
    let by_id = dir.path().join("usb-Arduino_Uno_8573531-if00");
    let (mut master, slave, path) = pty();
    std::os::unix::fs::symlink(&path, &by_id).unwrap();
    let data = temp_dir();
    let daemon = Daemon::start_in(
        data.path(),
        &one_sensor("", "by-id", 10.0, &serial_source(by_id.to_str().unwrap())),
    )
    .await;
    let id = sensor_named(&daemon, "by-id").await;
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let mut general = daemon
        .subscribe(&format!("/api/v1/ws?channel=general&sensor_id={id}"))
        .await;
    sync_serial(&mut master, &mut readings).await;
    assert_eq!(salud(&daemon, id).await["conectado"], true);

    // Unplug: the tty hangs up and udev removes the by-id link.
    drop(master);
    drop(slave);
    fs::remove_file(&by_id).unwrap();
    let lost = next_system(&mut general, id, "port_lost").await;
    assert_eq!(lost["event_type"], "port_lost", "{lost}");
    assert_eq!(lost["data"]["salud"]["conectado"], false, "{lost}");
    assert_eq!(lost["data"]["salud"]["conteo"]["port_lost"], 1, "{lost}");
    assert!(
        lost["data"]["salud"]["ultimo_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("device lost: ")),
        "{lost}"
    );
    let health = salud(&daemon, id).await;
    assert_eq!(health["conectado"], false, "{health}");
    assert_eq!(count(&health, "port_lost"), 1, "{health}");

    // Plug back in: another tty, and the same by-id link pointing at it.
    let (mut master, _slave, path) = pty();
    std::os::unix::fs::symlink(&path, &by_id).unwrap();
    let found = next_system(&mut general, id, "port_found").await;
    assert_eq!(found["event_type"], "port_found", "{found}");
    assert_eq!(found["data"]["salud"]["conectado"], true, "{found}");
    assert_eq!(
        found["data"]["salud"]["conteo"]["port_lost"], 1,
        "the retries while away are not new losses: {found}"
    );
    // The link came back at once: the first retry, half a second after the loss, finds it.
    let away_ms = millis_between(&lost["timestamp"], &found["timestamp"]);
    assert!(
        (450..1500).contains(&away_ms),
        "port found {away_ms} ms after the loss; the first retry is due after 500 ms"
    );
    assert_eq!(salud(&daemon, id).await["conectado"], true);

    send(&mut master, b"H=41.5\n");
    let reading = next_reading(&mut readings).await;
    assert_eq!(measured(&reading), m("humedad", 41.5, "%"));
    assert_eq!(reading["sensor_id"], id);
    assert_eq!(
        next_json_within(&mut general, Duration::from_millis(300)).await,
        None,
        "a single unplug is a single loss and a single return"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn silent_serial_sensor_goes_offline_and_comes_back() {
    let (mut master, _slave, path) = pty();
    let config = one_sensor(OFFLINE_AFTER_TWO, "quiet", 0.2, &serial_source(&path));
    let (daemon, id, mut general) = watched(&config, "quiet", "general", None).await;
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
    // The probes are the last lines for a while: the line then stays silent.
    let synced = sync_serial(&mut master, &mut readings).await;
    let last_good = synced.last_timestamp().clone();

    // Before the probes got through the sensor may have gone offline and back already;
    // the offline that counts is the one after the last good sample.
    let offline = loop {
        let event = next_system(&mut general, id, "sensor_offline").await;
        let kind = event["event_type"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "sensor_offline" if event["data"]["salud"]["ultima_muestra"] == last_good => {
                break event
            }
            "sensor_offline" | "sensor_online" => continue,
            _ => panic!("unexpected {event}"),
        }
    };
    assert_eq!(offline["data"]["salud"]["estado"], "offline", "{offline}");
    assert_eq!(offline["data"]["salud"]["conectado"], true, "{offline}");
    let silent_ms = millis_between(&last_good, &offline["timestamp"]);
    assert!(
        (395..1500).contains(&silent_ms),
        "offline after {silent_ms} ms of silence, 2 intervals of 0.2 s allowed"
    );
    assert_eq!(salud(&daemon, id).await["estado"], "offline");

    send(&mut master, b"T=20.5\n");
    let reading = next_reading(&mut readings).await;
    assert_eq!(measured(&reading), m("temperatura", 20.5, "°C"));
    let online = next_system(&mut general, id, "sensor_online").await;
    assert_eq!(online["event_type"], "sensor_online", "{online}");
    assert_eq!(online["data"]["salud"]["estado"], "online", "{online}");
    assert_eq!(
        online["data"]["salud"]["ultima_muestra"], reading["timestamp"],
        "{online}"
    );
    assert_eq!(salud(&daemon, id).await["estado"], "online");
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// sysfs

/// An empty sysfs tree in a temporary directory, which must outlive it.
fn fake_sysfs() -> (tempfile::TempDir, Sysfs) {
    let root = temp_dir();
    let sysfs = Sysfs::at(root.path());
    (root, sysfs)
}

/// Lays out an IIO device in `sysfs` with its attribute `files`; returns its directory.
fn iio_device(sysfs: &Sysfs, n: u32, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let device = sysfs.iio_device(n, name).unwrap();
    for (file, text) in files {
        Sysfs::set(&device, file, text).unwrap();
    }
    device
}

/// A daemon sampling the sensor `name` every `interval_s` from `source` (TOML keys) on
/// `sysfs`, and a socket on that sensor's readings.
async fn sample_sysfs(
    sysfs: &Sysfs,
    name: &str,
    interval_s: f64,
    source: &str,
) -> (Daemon, i64, Client) {
    let source = format!("{{ {source}, sysfs_root = {} }}", toml_path(sysfs.root()));
    watched(
        &one_sensor("", name, interval_s, &source),
        name,
        "readings",
        None,
    )
    .await
}

/// A daemon started with `config`, the id of its sensor `name`, and a socket on `channel`
/// for events about that sensor only, from after `since` if given (else from now).
async fn watched(
    config: &str,
    name: &str,
    channel: &str,
    since: Option<u64>,
) -> (Daemon, i64, Client) {
    let daemon = Daemon::with(config).await;
    let id = sensor_named(&daemon, name).await;
    let since = since.map(|seq| format!("&since={seq}")).unwrap_or_default();
    let socket = daemon
        .subscribe(&format!(
            "/api/v1/ws?channel={channel}&sensor_id={id}{since}"
        ))
        .await;
    (daemon, id, socket)
}

#[tokio::test]
async fn dht22_through_the_kernel_iio_driver() {
    let (_root, sysfs) = fake_sysfs();
    let device = iio_device(
        &sysfs,
        0,
        "dht11",
        &[
            ("in_temp_input", "21500\n"),
            ("in_humidityrelative_input", "45200\n"),
        ],
    );
    let (daemon, id, mut readings) =
        sample_sysfs(&sysfs, "dht", 2.0, "kind = \"iio_dht\", model = \"dht22\"").await;

    // The first sample is taken at start, and a new client did not see it: find it
    // among the stored readings, or take the second one.
    let first = until("a first sample stored", || async {
        let stored = stored_readings(&daemon, id).await;
        (stored.len() >= 2).then_some(stored)
    })
    .await;
    assert_eq!(measured(&first[0]), m("temperatura", 21.5, "°C"));
    assert_eq!(measured(&first[1]), m("humedad", 45.2, "%"));
    assert_eq!(first[0]["timestamp"], first[1]["timestamp"]);

    // A DHT22 glitch: the temperature doubled, with a valid checksum, one sample later.
    Sysfs::set(&device, "in_temp_input", "43000\n").unwrap();
    let health = salud_until(&daemon, id, "the doubled value rejected", |s| {
        count(s, "implausible") == 1
    })
    .await;
    assert!(
        health["ultimo_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("implausible value: temperatura jumped from 21.5 to 43")),
        "{health}"
    );
    // Back to a plausible new value before the next sample (2 s later).
    Sysfs::set(&device, "in_temp_input", "22000\n").unwrap();
    Sysfs::set(&device, "in_humidityrelative_input", "46000\n").unwrap();

    let mut pushed = Vec::new();
    while pushed.len() < 2 {
        let reading = next_reading(&mut readings).await;
        if reading["timestamp"] != first[0]["timestamp"] {
            pushed.push(reading);
        }
    }
    assert_eq!(measured(&pushed[0]), m("temperatura", 22.0, "°C"));
    assert_eq!(measured(&pushed[1]), m("humedad", 46.0, "%"));
    let between = millis_between(&first[0]["timestamp"], &pushed[0]["timestamp"]);
    assert!(
        (3800..5000).contains(&between),
        "the new value came {between} ms after the first sample, two 2 s intervals expected"
    );

    let health = salud_until(&daemon, id, "two good samples", |s| count(s, "ok") == 2).await;
    assert_eq!(health["conteo"], json!({"ok": 2, "implausible": 1}));
    assert_eq!(health["estado"], "online");
    let stored: Vec<Value> = stored_readings(&daemon, id)
        .await
        .iter()
        .map(measured)
        .collect();
    assert_eq!(
        stored,
        vec![
            m("temperatura", 21.5, "°C"),
            m("humedad", 45.2, "%"),
            m("temperatura", 22.0, "°C"),
            m("humedad", 46.0, "%"),
        ],
        "the doubled value must not be stored"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn bme280_through_the_generic_iio_source() {
    let (_root, sysfs) = fake_sysfs();
    // Another IIO device probed first: the source finds its own by name.
    iio_device(
        &sysfs,
        0,
        "dht11",
        &[
            ("in_temp_input", "30000\n"),
            ("in_humidityrelative_input", "60000\n"),
        ],
    );
    iio_device(
        &sysfs,
        1,
        "bme280",
        &[
            ("in_temp_input", "23450\n"),
            ("in_humidityrelative_input", "41500\n"),
            ("in_pressure_input", "100.156250000\n"),
            ("in_temp_oversampling_ratio", "2\n"),
            ("in_pressure_oversampling_ratio", "16\n"),
        ],
    );
    let source = "kind = \"iio\", device_name = \"bme280\"";
    let (daemon, id, mut readings) = sample_sysfs(&sysfs, "bme", 1.0, source).await;
    let pushed = [
        next_reading(&mut readings).await,
        next_reading(&mut readings).await,
        next_reading(&mut readings).await,
    ];
    let measurements: Vec<Value> = pushed.iter().map(measured).collect();
    assert_eq!(
        measurements,
        vec![
            m("temperatura", 23.45, "°C"),
            m("humedad", 41.5, "%"),
            m("presion", 1001.5625, "hPa"),
        ]
    );
    assert!(pushed
        .iter()
        .all(|r| r["timestamp"] == pushed[0]["timestamp"]));
    assert!(pushed.iter().all(|r| r["sensor_id"] == id));
    let stored = stored_readings(&daemon, id).await;
    for reading in &pushed {
        assert!(stored.contains(reading), "{reading} not stored");
    }
    let health = salud(&daemon, id).await;
    assert_eq!(health["estado"], "online", "{health}");
    assert_eq!(health["conectado"], true, "{health}");
    assert_eq!(
        health["conteo"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["ok"],
        "{health}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn ds18b20_on_the_one_wire_bus() {
    let (_root, sysfs) = fake_sysfs();
    let device = sysfs.w1_device("28-000005e2fdc3").unwrap();
    Sysfs::set(&device, "w1_slave", &w1_slave("YES", 23125)).unwrap();
    let source = "kind = \"w1\", sensor_id = \"28-000005e2fdc3\"";
    let (daemon, id, mut readings) = sample_sysfs(&sysfs, "ds", 1.0, source).await;

    let first = salud_until(&daemon, id, "a first good sample", |s| count(s, "ok") >= 1).await;
    // Health counts a sample as it goes to storage; its event says it is stored.
    next_reading(&mut readings).await;
    let stored = stored_readings(&daemon, id).await;
    assert_eq!(measured(&stored[0]), m("temperatura", 23.125, "°C"));
    assert_eq!(stored[0]["timestamp"], first["ultima_muestra"]);

    // The driver's CRC check failed: no value, counted as a checksum error.
    Sysfs::set(&device, "w1_slave", &w1_slave("NO", 23125)).unwrap();
    let health = salud_until(&daemon, id, "the bad CRC counted", |s| {
        count(s, "checksum") == 1
    })
    .await;
    assert_eq!(health["ultimo_error"], "checksum mismatch");

    // The power-on value with a good CRC: never a temperature.
    Sysfs::set(&device, "w1_slave", &w1_slave("YES", 85000)).unwrap();
    let health = salud_until(&daemon, id, "85 °C rejected", |s| {
        count(s, "implausible") == 1
    })
    .await;
    assert_eq!(
        health["ultimo_error"],
        "implausible value: 85 °C is the DS18B20 power-on value"
    );

    Sysfs::set(&device, "w1_slave", &w1_slave("YES", 23250)).unwrap();
    let mut pushed = next_reading(&mut readings).await;
    while pushed["valor"] == 23.125 {
        // Samples of the first value taken before the test's first change.
        pushed = next_reading(&mut readings).await;
    }
    assert_eq!(measured(&pushed), m("temperatura", 23.25, "°C"));

    let health = salud_until(&daemon, id, "the last sample counted", |s| {
        s["ultima_muestra"] == pushed["timestamp"]
    })
    .await;
    let ok = count(&health, "ok");
    assert_eq!(
        health["conteo"],
        json!({"ok": ok, "checksum": 1, "implausible": 1})
    );
    let values: Vec<f64> = stored_readings(&daemon, id)
        .await
        .iter()
        .map(|r| r["valor"].as_f64().unwrap())
        .collect();
    assert_eq!(values.len() as u64, ok, "{values:?}");
    assert_eq!(values.last(), Some(&23.25));
    assert!(
        values.iter().all(|v| *v == 23.125 || *v == 23.25),
        "a rejected value was stored: {values:?}"
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Sensors created and changed over REST

/// Whether `event` is a reading of sensor `id`.
fn is_reading_of(event: &Value, id: i64) -> bool {
    event["entity_type"] == "reading" && event["data"]["sensor_id"] == id
}

/// The next event about a sensor, past readings.
async fn next_sensor_event(client: &mut Client, what: &str) -> Value {
    loop {
        let event = next_json(client, SETTLE, what).await;
        if event["entity_type"] == "sensor" {
            return event;
        }
    }
}

#[tokio::test]
async fn rest_sensors_with_a_source_are_sampled_until_deactivated_or_deleted() {
    let daemon = Daemon::with("").await;
    let mut events = daemon
        .subscribe("/api/v1/ws?channel=sensors&channel=readings")
        .await;

    let body = |seed: u64| {
        json!({
            "tipo": "temperatura",
            "modelo": "DHT22",
            "nombre": format!("sim-{seed}"),
            "fuente": {"kind": "sim", "seed": seed},
            "intervalo": 0.05,
        })
        .to_string()
    };
    let (status, a) = daemon.post("/api/v1/sensores/", &body(1)).await;
    assert_eq!(status, 201, "{a}");
    assert_eq!(a["fuente"], json!({"kind": "sim", "seed": 1}));
    assert_eq!(a["intervalo"], 0.05);
    let (status, b) = daemon.post("/api/v1/sensores/", &body(2)).await;
    assert_eq!(status, 201, "{b}");
    let (a, b) = (a["id"].as_i64().unwrap(), b["id"].as_i64().unwrap());

    // Both are sampled without a restart.
    let (mut from_a, mut from_b) = (0, 0);
    let deadline = Instant::now() + SETTLE;
    while from_a < 3 || from_b < 3 {
        let wait = deadline.saturating_duration_since(Instant::now());
        let event = next_json(&mut events, wait, "readings of both sensors").await;
        from_a += is_reading_of(&event, a) as u32;
        from_b += is_reading_of(&event, b) as u32;
    }
    let health = salud(&daemon, a).await;
    assert_eq!(health["estado"], "online", "{health}");
    assert!(count(&health, "ok") >= 2, "{health}");

    // Deactivated: its sampling stops.
    let (status, updated) = daemon
        .put(&format!("/api/v1/sensores/{a}"), r#"{"activo": false}"#)
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["activo"], false);
    let update = next_sensor_event(&mut events, "the update event").await;
    assert_eq!(update["event_type"], "updated", "{update}");
    assert_eq!(update["entity_id"], a, "{update}");
    let updated_at = Instant::now();
    // Stopped sampling leaves no health behind.
    let deadline = updated_at + Duration::from_millis(500);
    while salud(&daemon, a).await != Value::Null {
        assert!(
            Instant::now() < deadline,
            "sensor {a} still sampled 500 ms after it was deactivated"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Samples handed over before the thread stopped are queued ahead of this marker;
    // nothing of A may come after it.
    let (status, marker) = daemon
        .post("/api/v1/ws/test-event", r#"{"channel": "general"}"#)
        .await;
    assert_eq!(status, 200);
    let marker = marker["seq"].as_u64().unwrap();
    let stored_a = stored_readings(&daemon, a).await.len();
    let (mut late_a, mut after_marker_a, mut still_b) = (0, 0, 0);
    let window = Instant::now() + Duration::from_millis(500);
    while let Some(event) = next_json_within(
        &mut events,
        window.saturating_duration_since(Instant::now()),
    )
    .await
    {
        if is_reading_of(&event, a) {
            late_a += 1;
            if event["seq"].as_u64().unwrap() > marker {
                after_marker_a += 1;
            }
        }
        still_b += is_reading_of(&event, b) as u32;
    }
    assert_eq!(
        after_marker_a, 0,
        "sensor {a} kept sampling after it was deactivated ({late_a} readings after the update)"
    );
    assert!(still_b >= 3, "sensor {b} stopped too: {still_b}");
    assert_eq!(stored_readings(&daemon, a).await.len(), stored_a);

    // Deleted: its sampling stops likewise, and nothing of it is stored afterwards.
    let (status, _) = daemon.delete(&format!("/api/v1/sensores/{b}")).await;
    assert_eq!(status, 200);
    let deleted = next_sensor_event(&mut events, "the delete event").await;
    assert_eq!(deleted["event_type"], "deleted", "{deleted}");
    assert_eq!(deleted["entity_id"], b, "{deleted}");
    let deleted_seq = deleted["seq"].as_u64().unwrap();
    // Its past readings stay (ids are never reused); no new one is added.
    let stored_b = stored_readings(&daemon, b).await;
    assert!(!stored_b.is_empty());
    while let Some(event) = next_json_within(&mut events, QUIET).await {
        assert!(
            !is_reading_of(&event, b) || event["seq"].as_u64().unwrap() < deleted_seq,
            "reading of deleted sensor {b}: {event}"
        );
        assert!(!is_reading_of(&event, a), "{event}");
    }
    assert_eq!(stored_readings(&daemon, b).await, stored_b);
    daemon
        .expect("GET", &format!("/api/v1/sensores/{b}"), None, 404)
        .await;

    // Active again: sampled again, still without a restart.
    let (status, _) = daemon
        .put(&format!("/api/v1/sensores/{a}"), r#"{"activo": true}"#)
        .await;
    assert_eq!(status, 200);
    let resumed = loop {
        let event = next_json(&mut events, SETTLE, "a reading after reactivation").await;
        if event["entity_type"] == "reading" {
            break event;
        }
    };
    assert_eq!(resumed["data"]["sensor_id"], a, "{resumed}");

    // A source the daemon does not know is refused, naming the field.
    for bad in [
        json!({"kind": "laser"}),
        json!({"kind": "sim", "colour": 1}),
        json!("sim"),
    ] {
        let body = json!({"tipo": "temperatura", "modelo": "X", "fuente": bad}).to_string();
        let (status, answer) = daemon.post("/api/v1/sensores/", &body).await;
        assert_eq!(status, 422, "{bad}: {answer}");
        assert_eq!(answer["code"], "invalid", "{answer}");
        assert_eq!(answer["errors"][0]["field"], "fuente", "{answer}");
    }
    let (status, answer) = daemon
        .put(
            &format!("/api/v1/sensores/{a}"),
            r#"{"fuente": {"kind": "laser"}}"#,
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["errors"][0]["field"], "fuente", "{answer}");
    let (_, sensor) = daemon.get(&format!("/api/v1/sensores/{a}")).await;
    assert_eq!(sensor["fuente"], json!({"kind": "sim", "seed": 1}));
    daemon.stop().await;
}

/// A test event on `sensors` is not a sensor record, whatever its data looks like: it
/// starts no sampling.
#[tokio::test]
async fn a_test_event_shaped_like_a_sensor_starts_no_sampling() {
    let daemon = Daemon::with("").await;
    let (status, sensor) = daemon.post("/api/v1/sensores/", SENSOR).await;
    assert_eq!(status, 201, "{sensor}");
    let id = sensor["id"].as_i64().unwrap();
    let forged = json!({
        "channel": "sensors",
        "data": {
            "id": id,
            "tipo": "temperatura",
            "modelo": "DHT22",
            "activo": true,
            "fuente": {"kind": "sim"},
            "intervalo": 0.05,
        },
    });
    let (status, sent) = daemon
        .post("/api/v1/ws/test-event", &forged.to_string())
        .await;
    assert_eq!(status, 200, "{sent}");
    tokio::time::sleep(QUIET).await;
    assert_eq!(salud(&daemon, id).await, Value::Null);
    assert!(stored_readings(&daemon, id).await.is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn injected_checksum_failures_are_counted_and_take_the_sensor_offline() {
    let daemon = Daemon::with(OFFLINE_AFTER_TWO).await;
    let mut general = daemon.subscribe("/api/v1/ws?channel=general").await;
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let body = json!({
        "tipo": "temperatura",
        "modelo": "DHT22",
        "fuente": {"kind": "sim", "seed": 3, "failure_rate": 1.0, "failures": ["checksum"]},
        "intervalo": 0.05,
    })
    .to_string();
    let (status, sensor) = daemon.post("/api/v1/sensores/", &body).await;
    assert_eq!(status, 201, "{sensor}");
    let id = sensor["id"].as_i64().unwrap();

    let offline = next_system(&mut general, id, "sensor_offline").await;
    assert_eq!(offline["event_type"], "sensor_offline", "{offline}");
    let at_offline = &offline["data"]["salud"];
    assert_eq!(at_offline["estado"], "offline", "{offline}");
    assert_eq!(at_offline["ultima_muestra"], Value::Null, "{offline}");
    assert_eq!(at_offline["ultimo_error"], "checksum mismatch", "{offline}");
    let failed = count(at_offline, "checksum");
    assert!(
        failed >= 2,
        "offline after {failed} failed reads: {offline}"
    );
    assert_eq!(
        at_offline["conteo"],
        json!({ "checksum": failed }),
        "{offline}"
    );

    let health = salud_until(&daemon, id, "failures keep being counted", |s| {
        count(s, "checksum") > failed
    })
    .await;
    assert_eq!(health["estado"], "offline", "{health}");
    assert_eq!(
        health["conteo"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["checksum"],
        "{health}"
    );
    assert_eq!(
        next_json_within(&mut general, Duration::from_millis(400)).await,
        None,
        "offline is reported once"
    );
    assert_eq!(next_json_within(&mut readings, QUIET).await, None);
    assert_eq!(stored_readings(&daemon, id).await, Vec::<Value>::new());
    daemon.stop().await;
}

/// The next `sensor_online` or `sensor_offline` of `sensor_id` on `general`, skipping
/// other system events; `None` if none comes within `wait`.
async fn next_availability(client: &mut Client, sensor_id: i64, wait: Duration) -> Option<Value> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = next_json_within(client, left).await?;
        if event["data"]["sensor_id"] == sensor_id
            && matches!(
                event["event_type"].as_str(),
                Some("sensor_online" | "sensor_offline")
            )
        {
            return Some(event);
        }
    }
}

/// Good samples `when` make the sensor announced online, once: no other announcement
/// follows for a while.
async fn announced_online_once(general: &mut Client, id: i64, when: &str) {
    let online = next_availability(general, id, SETTLE)
        .await
        .unwrap_or_else(|| panic!("good samples {when}, but no sensor_online"));
    assert_eq!(online["event_type"], "sensor_online", "{online}");
    let again = next_availability(general, id, QUIET).await;
    assert_eq!(again, None, "announced once {when}, and staying online");
}

/// A simulated source whose every read fails.
const FAILING_SIM: &str = r#"{ kind = "sim", failure_rate = 1.0, failures = ["timeout"] }"#;

/// A daemon with one sensor `name` whose every read fails, its id, and a socket on
/// `general` for that sensor's events from the first on: on a slow machine the sensor is
/// told offline before the socket is open.
async fn failing_and_watched(name: &str) -> (Daemon, i64, Client) {
    let config = one_sensor(OFFLINE_AFTER_TWO, name, 0.05, FAILING_SIM);
    watched(&config, name, "general", Some(0)).await
}

#[tokio::test]
async fn a_sensor_brought_back_by_a_change_of_its_source_is_announced_online() {
    let (daemon, id, mut general) = failing_and_watched("shed").await;
    let failing_json = json!({"kind": "sim", "failure_rate": 1.0, "failures": ["timeout"]});

    // Each way back to good samples, from offline: a new source over REST; switched off,
    // given a good source and switched on again; a reload with a good source.
    let paths: [&[Value]; 2] = [
        &[json!({"fuente": {"kind": "sim", "seed": 1}})],
        &[
            json!({"activo": false, "fuente": {"kind": "sim", "seed": 2}}),
            json!({"activo": true}),
        ],
    ];
    for (n, puts) in paths.iter().enumerate() {
        let offline = next_availability(&mut general, id, SETTLE)
            .await
            .unwrap_or_else(|| panic!("path {n}: the failing sensor never went offline"));
        assert_eq!(
            offline["event_type"], "sensor_offline",
            "path {n}: {offline}"
        );
        for put in *puts {
            let (status, body) = daemon
                .put(&format!("/api/v1/sensores/{id}"), &put.to_string())
                .await;
            assert_eq!(status, 200, "path {n}: {body}");
        }
        let online = next_availability(&mut general, id, SETTLE)
            .await
            .unwrap_or_else(|| panic!("path {n}: good samples again, but no sensor_online"));
        assert_eq!(online["event_type"], "sensor_online", "path {n}: {online}");
        assert_eq!(online["data"]["salud"]["estado"], "online", "{online}");
        assert_eq!(salud(&daemon, id).await["estado"], "online");
        // Failing again, for the next path.
        let (status, body) = daemon
            .put(
                &format!("/api/v1/sensores/{id}"),
                &json!({"fuente": failing_json}).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    let offline = next_availability(&mut general, id, SETTLE)
        .await
        .expect("offline before the reload");
    assert_eq!(offline["event_type"], "sensor_offline", "{offline}");
    let good = one_sensor(
        OFFLINE_AFTER_TWO,
        "shed",
        0.05,
        r#"{ kind = "sim", seed = 3 }"#,
    );
    daemon
        .reload
        .send(common::config(daemon.dir(), &good))
        .await
        .unwrap();
    announced_online_once(&mut general, id, "after a reload").await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_sensor_announced_offline_before_a_restart_is_announced_online_after_it() {
    let (daemon, id, mut general) = failing_and_watched("cellar").await;
    let offline = next_availability(&mut general, id, SETTLE)
        .await
        .expect("the failing sensor goes offline");
    assert_eq!(offline["event_type"], "sensor_offline", "{offline}");
    let seen = offline["seq"].as_u64().unwrap();

    // The same gateway, its sensor working again: a client resuming where it was sees
    // the sensor come back.
    let good = one_sensor(
        OFFLINE_AFTER_TWO,
        "cellar",
        0.05,
        r#"{ kind = "sim", seed = 4 }"#,
    );
    let daemon = daemon.restart_with(&good).await;
    let mut general = daemon
        .subscribe(&format!(
            "/api/v1/ws?channel=general&sensor_id={id}&since={seen}"
        ))
        .await;
    announced_online_once(&mut general, id, "after the restart").await;

    // A sensor never announced offline starts without a sensor_online.
    let fresh = daemon
        .post(
            "/api/v1/sensores/",
            &json!({"tipo": "temperatura", "modelo": "sim", "fuente": {"kind": "sim"}, "intervalo": 0.05})
                .to_string(),
        )
        .await
        .1["id"]
        .as_i64()
        .unwrap();
    let mut fresh_general = daemon
        .subscribe(&format!("/api/v1/ws?channel=general&sensor_id={fresh}"))
        .await;
    salud_until(&daemon, fresh, "samples", |s| s["estado"] == "online").await;
    assert_eq!(
        next_availability(&mut fresh_general, fresh, QUIET).await,
        None
    );
    daemon.stop().await;
}
