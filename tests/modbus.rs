//! The modbus source against a Modbus implementation written elsewhere: pymodbus's TCP
//! server on a loopback port and its RTU server on a pseudo-terminal line
//! (`tests/modbus/devices.py`), with an XY-MD02 as unit 1, an SDM120 as unit 2 and a soil
//! probe as unit 3.
//!
//! pymodbus runs from the virtualenv `.ci/modbus` installs (`target/modbus-venv`, or the
//! Python named by `SENSORGATE_TEST_PYMODBUS`). Without it these tests say why and pass,
//! so that `cargo test` alone works on a fresh machine; with
//! `SENSORGATE_TEST_MODBUS_REQUIRED=1` (as `.ci/modbus` sets) a missing server fails them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::{
    count, last_error, salud, salud_until, sensor_named, temp_dir, Client, Daemon, Received,
};
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long to wait for something the daemon does at its own pace.
const SETTLE: Duration = Duration::from_secs(10);

/// The pymodbus devices, stopped (by their pid) when dropped.
struct Devices {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    tcp: String,
    serial: String,
    _dir: tempfile::TempDir,
}

impl Devices {
    /// Starts the devices, or `None` (with the reason printed) when pymodbus is not
    /// installed and not required.
    fn start() -> Option<Devices> {
        let python = std::env::var_os("SENSORGATE_TEST_PYMODBUS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/modbus-venv/bin/python")
            });
        let required = std::env::var_os("SENSORGATE_TEST_MODBUS_REQUIRED").is_some();
        if !python.exists() {
            assert!(
                !required,
                "SENSORGATE_TEST_MODBUS_REQUIRED is set but {} does not exist",
                python.display()
            );
            eprintln!(
                "skipped: no pymodbus at {} (run .ci/modbus to install it and run these tests)",
                python.display()
            );
            return None;
        }
        let dir = temp_dir();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/modbus/devices.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("devices did not start ({e}): {line:?}"));
        Some(Devices {
            tcp: ready["tcp"].as_str().unwrap().to_owned(),
            serial: ready["serial"].as_str().unwrap().to_owned(),
            child,
            stdin,
            stdout,
            _dir: dir,
        })
    }

    /// Sends a command (`mute 1`, `unplug`, ...) and waits until it is done.
    fn command(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        assert_eq!(answer.trim(), "ok", "{text}");
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `[[sensor]]` with a modbus source.
fn sensor(name: &str, source: &str) -> String {
    let source = format!("{{ kind = \"modbus\", {source} }}");
    common::sensor_table(name, "modbus", "test", 0.2, &source)
}

/// The newest stored value of each `tipo` of a sensor, once every one of `tipos` has
/// one stored after `after` (a reading id).
async fn values_after(daemon: &Daemon, id: i64, tipos: &[&str], after: i64) -> Vec<(f64, String)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, readings) = daemon
            .get(&format!(
                "/api/v1/lecturas/?sensor_id={id}&order=desc&limit=200"
            ))
            .await;
        assert_eq!(status, 200, "{readings}");
        let found: Vec<Option<(f64, String)>> = tipos
            .iter()
            .map(|tipo| {
                readings.as_array().unwrap().iter().find_map(|r| {
                    (r["tipo"] == *tipo && r["id"].as_i64().unwrap() > after).then(|| {
                        (
                            r["valor"].as_f64().unwrap(),
                            r["unidad"].as_str().unwrap().to_owned(),
                        )
                    })
                })
            })
            .collect();
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "sensor {id}: no new {tipos:?} readings: {readings}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of the newest reading of any sensor (0 if none).
async fn newest_reading(daemon: &Daemon) -> i64 {
    let (_, readings) = daemon.get("/api/v1/lecturas/?limit=1").await;
    readings[0]["id"].as_i64().unwrap_or(0)
}

fn close(actual: &[(f64, String)], expected: &[(f64, &str)]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?}");
    for ((value, unit), (want, want_unit)) in actual.iter().zip(expected) {
        assert!((value - want).abs() < 1e-4, "{actual:?} vs {expected:?}");
        assert_eq!(unit, want_unit);
    }
}

/// Waits for a system event of `event_type` about `sensor_id`, skipping others.
async fn system_event(client: &mut Client, sensor_id: i64, event_type: &str) -> Value {
    system_events(client, &[sensor_id], event_type)
        .await
        .remove(0)
}

/// Waits for a system event of `event_type` about each of `sensor_ids`, in any order,
/// skipping others; returns them in the order of `sensor_ids`.
async fn system_events(client: &mut Client, sensor_ids: &[i64], event_type: &str) -> Vec<Value> {
    let deadline = Instant::now() + SETTLE;
    let mut seen: Vec<Option<Value>> = vec![None; sensor_ids.len()];
    while seen.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_within(left).await {
            Some(Received::Json(event)) if event["event_type"] == event_type => {
                let id = event["data"]["sensor_id"].as_i64();
                if let Some(i) = sensor_ids.iter().position(|s| Some(*s) == id) {
                    assert!(seen[i].is_none(), "{event_type} twice: {event}");
                    seen[i] = Some(event);
                }
            }
            Some(_) => {}
            None => panic!("no {event_type} for all of {sensor_ids:?} within {SETTLE:?}: {seen:?}"),
        }
    }
    seen.into_iter().flatten().collect()
}

/// A modbus series in `metrics` (the text of `/metrics`): `name` with the labels `bus`
/// (`tcp://HOST:PORT` or the serial port) and `more`.
fn bus_metric(metrics: &str, name: &str, bus: &str, more: &str) -> f64 {
    let series = format!("sensorgate_modbus_{name}{{bus=\"{bus}\"{more}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series}in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn three_devices_share_one_rtu_bus() {
    let Some(devices) = Devices::start() else {
        return;
    };
    let port = format!("port = '{}', timeout_ms = 300", devices.serial);
    let config = [
        sensor("aire", &format!("{port}, unit = 1, preset = \"xy-md02\"")),
        sensor(
            "bomba",
            &format!("{port}, unit = 2, preset = \"sdm120\", merge_gap = 60"),
        ),
        sensor("suelo", &format!("{port}, unit = 3, preset = \"soil-th\"")),
    ]
    .concat();
    let daemon = Daemon::with(&config).await;
    let aire = sensor_named(&daemon, "aire").await;
    let bomba = sensor_named(&daemon, "bomba").await;
    let suelo = sensor_named(&daemon, "suelo").await;
    close(
        &values_after(&daemon, aire, &["temperatura", "humedad"], 0).await,
        &[(21.5, "°C"), (45.2, "%")],
    );
    close(
        &values_after(
            &daemon,
            bomba,
            &["voltaje", "corriente", "potencia", "frecuencia", "energia"],
            0,
        )
        .await,
        &[
            (230.1, "V"),
            (1.5, "A"),
            (345.25, "W"),
            (50.0, "Hz"),
            (1234.5, "kWh"),
        ],
    );
    close(
        &values_after(&daemon, suelo, &["humedad_suelo", "temperatura"], 0).await,
        &[(31.2, "%"), (-2.5, "°C")],
    );
    // Several rounds on one line, with no failure: the requests never overlapped.
    let after = newest_reading(&daemon).await;
    for (id, tipo) in [
        (aire, "temperatura"),
        (bomba, "voltaje"),
        (suelo, "temperatura"),
    ] {
        values_after(&daemon, id, &[tipo], after).await;
        let health = salud(&daemon, id).await;
        assert_eq!(
            health["conteo"].as_object().unwrap().len(),
            1,
            "only ok: {health}"
        );
        assert_eq!(health["conectado"], true, "{health}");
    }
    let text = daemon.metrics().await;
    let bus = &devices.serial;
    assert!(bus_metric(&text, "requests_total", bus, "") >= 6.0);
    assert_eq!(bus_metric(&text, "connected", bus, ""), 1.0);
    // (Other tests' buses live in the same process, hence the label.)
    assert!(
        !text.contains(&format!(
            "sensorgate_modbus_errors_total{{bus=\"{}\"",
            devices.serial
        )),
        "{text}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn tcp_devices_exceptions_and_sensors_added_over_rest() {
    let Some(devices) = Devices::start() else {
        return;
    };
    let tcp = format!("tcp = \"{}\", timeout_ms = 500", devices.tcp);
    let config = [
        sensor("medidor", &format!("{tcp}, unit = 2, preset = \"sdm120\"")),
        sensor(
            "fuera",
            &format!(
                "{tcp}, unit = 1, registers = [{{ tipo = \"nada\", unidad = \"u\", function = \"input\", address = 1000 }}]"
            ),
        ),
    ]
    .concat();
    let daemon = Daemon::with(&config).await;
    let medidor = sensor_named(&daemon, "medidor").await;
    let fuera = sensor_named(&daemon, "fuera").await;
    close(
        &values_after(&daemon, medidor, &["voltaje", "energia"], 0).await,
        &[(230.1, "V"), (1234.5, "kWh")],
    );
    let health = salud_until(&daemon, fuera, "illegal address counted", |s| {
        count(s, "illegal_address") >= 2
    })
    .await;
    let error = last_error(&health);
    assert!(
        error.contains("exception 0x02 (illegal address)") && error.contains("1000"),
        "{health}"
    );
    assert_eq!(count(&health, "ok"), 0, "{health}");
    assert_eq!(
        health["conectado"], true,
        "an exception is an answer: {health}"
    );

    // A sensor created over REST is sampled at once.
    let (status, created) = daemon
        .post(
            "/api/v1/sensores/",
            &json!({
                "tipo": "temperatura",
                "modelo": "XY-MD02",
                "nombre": "nuevo",
                "intervalo": 0.2,
                "fuente": {"kind": "modbus", "tcp": devices.tcp, "unit": 1, "preset": "xy-md02"},
            })
            .to_string(),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let nuevo = created["id"].as_i64().unwrap();
    close(
        &values_after(&daemon, nuevo, &["temperatura", "humedad"], 0).await,
        &[(21.5, "°C"), (45.2, "%")],
    );
    // A bad map is refused with the reason, and nothing is created.
    let (status, refused) = daemon
        .post(
            "/api/v1/sensores/",
            &json!({
                "tipo": "x",
                "modelo": "x",
                "fuente": {"kind": "modbus", "tcp": devices.tcp, "preset": "sdm630"},
            })
            .to_string(),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused.to_string().contains("unknown preset"), "{refused}");

    let bus = format!("tcp://{}", devices.tcp);
    let text = daemon.metrics().await;
    assert!(bus_metric(&text, "errors_total", &bus, ",kind=\"illegal_address\"") >= 2.0);
    daemon.stop().await;
}

#[tokio::test]
async fn a_silent_device_goes_offline_without_stalling_the_bus() {
    let Some(mut devices) = Devices::start() else {
        return;
    };
    let port = format!("port = '{}', timeout_ms = 200, retries = 1", devices.serial);
    let config = format!(
        "[sampling]\noffline_after_intervals = 3\n{}{}",
        sensor("aire", &format!("{port}, unit = 1, preset = \"xy-md02\"")),
        sensor("suelo", &format!("{port}, unit = 3, preset = \"soil-th\"")),
    );
    let daemon = Daemon::with(&config).await;
    let aire = sensor_named(&daemon, "aire").await;
    let suelo = sensor_named(&daemon, "suelo").await;
    let mut general = daemon
        .subscribe(&format!("/api/v1/ws?channel=general&sensor_id={aire}"))
        .await;
    values_after(&daemon, aire, &["temperatura"], 0).await;

    devices.command("mute 1");
    let offline = system_event(&mut general, aire, "sensor_offline").await;
    assert_eq!(offline["data"]["salud"]["estado"], "offline", "{offline}");
    assert!(
        count(&offline["data"]["salud"], "timeout") >= 1,
        "{offline}"
    );
    assert_eq!(count(&offline["data"]["salud"], "checksum"), 0, "{offline}");
    // The other device on the line goes on being read meanwhile.
    let after = newest_reading(&daemon).await;
    close(
        &values_after(&daemon, suelo, &["humedad_suelo"], after).await,
        &[(31.2, "%")],
    );
    assert_eq!(salud(&daemon, suelo).await["estado"], "online");

    devices.command("unmute 1");
    let online = system_event(&mut general, aire, "sensor_online").await;
    assert_eq!(online["data"]["salud"]["estado"], "online", "{online}");
    let after = newest_reading(&daemon).await;
    close(
        &values_after(&daemon, aire, &["temperatura"], after).await,
        &[(21.5, "°C")],
    );
    let text = daemon.metrics().await;
    assert!(bus_metric(&text, "errors_total", &devices.serial, ",kind=\"timeout\"") >= 2.0);
    daemon.stop().await;
}

#[tokio::test]
async fn a_wrong_crc_is_counted_as_a_checksum_failure() {
    let Some(mut devices) = Devices::start() else {
        return;
    };
    let port = format!("port = '{}', timeout_ms = 300, retries = 0", devices.serial);
    let config = sensor("aire", &format!("{port}, unit = 1, preset = \"xy-md02\""));
    let daemon = Daemon::with(&config).await;
    let aire = sensor_named(&daemon, "aire").await;
    values_after(&daemon, aire, &["temperatura"], 0).await;

    devices.command("corrupt 1");
    let health = salud_until(&daemon, aire, "checksum failures", |s| {
        count(s, "checksum") >= 2
    })
    .await;
    assert!(last_error(&health).contains("checksum"), "{health}");
    assert_eq!(health["conectado"], true, "{health}");
    devices.command("uncorrupt 1");
    let after = newest_reading(&daemon).await;
    close(
        &values_after(&daemon, aire, &["temperatura", "humedad"], after).await,
        &[(21.5, "°C"), (45.2, "%")],
    );
    daemon.stop().await;
}

#[tokio::test]
async fn the_adapter_unplugged_and_plugged_back() {
    let Some(mut devices) = Devices::start() else {
        return;
    };
    let port = format!("port = '{}', timeout_ms = 300", devices.serial);
    let config = [
        sensor("aire", &format!("{port}, unit = 1, preset = \"xy-md02\"")),
        sensor("bomba", &format!("{port}, unit = 2, preset = \"sdm120\"")),
    ]
    .concat();
    let daemon = Daemon::with(&config).await;
    let aire = sensor_named(&daemon, "aire").await;
    let bomba = sensor_named(&daemon, "bomba").await;
    let mut general = daemon.subscribe("/api/v1/ws?channel=general").await;
    values_after(&daemon, aire, &["temperatura"], 0).await;
    values_after(&daemon, bomba, &["voltaje"], 0).await;

    devices.command("unplug");
    for lost in system_events(&mut general, &[aire, bomba], "port_lost").await {
        assert_eq!(lost["data"]["salud"]["conectado"], false, "{lost}");
    }
    let text = daemon.metrics().await;
    assert_eq!(bus_metric(&text, "connected", &devices.serial, ""), 0.0);

    assert_eq!(
        bus_metric(
            &text,
            "errors_total",
            &devices.serial,
            ",kind=\"port_lost\""
        ),
        1.0,
        "one loss, however many sensors and jobs met it"
    );

    devices.command("plug");
    for found in system_events(&mut general, &[aire, bomba], "port_found").await {
        assert_eq!(found["data"]["salud"]["conectado"], true, "{found}");
        assert_eq!(
            count(&found["data"]["salud"], "port_lost"),
            1,
            "the retries while away are not new losses: {found}"
        );
    }
    let after = newest_reading(&daemon).await;
    close(
        &values_after(&daemon, aire, &["temperatura"], after).await,
        &[(21.5, "°C")],
    );
    close(
        &values_after(&daemon, bomba, &["voltaje"], after).await,
        &[(230.1, "V")],
    );
    daemon.stop().await;
}

/// Runs `sensorgate modbus scan` with `args`; its exit code and standard output.
async fn scan(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .args(["modbus", "scan"])
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[tokio::test]
async fn a_scan_finds_the_units_on_a_line_and_a_gateway() {
    let Some(mut devices) = Devices::start() else {
        return;
    };
    let expected = |settings: &str| {
        format!(
            "unit   1 at {settings}: answers (holding register 0 = 0)\n\
             unit   2 at {settings}: answers (holding register 0 = 0)\n\
             unit   3 at {settings}: answers (holding register 0 = 312)\n"
        )
    };
    let serial = devices.serial.clone();
    let (code, out) = scan(&[&serial, "--units", "1-6", "--timeout-ms", "150"]).await;
    assert_eq!((code, out), (0, expected("9600 baud, 8N1")));
    let tcp = devices.tcp.clone();
    let (code, out) = scan(&[&tcp, "--units", "0-5", "--timeout-ms", "150"]).await;
    assert_eq!((code, out), (0, expected("tcp")));

    devices.command("corrupt 1");
    let (code, out) = scan(&[&serial, "--units", "1", "--timeout-ms", "150"]).await;
    assert_eq!(
        (code, out.as_str()),
        (
            1,
            "unit   1 at 9600 baud, 8N1: sends frames that do not decode: try other settings\n"
        )
    );
    let (code, out) = scan(&[&serial, "--units", "7-9", "--timeout-ms", "50"]).await;
    assert_eq!((code, out.as_str()), (1, ""));
}
