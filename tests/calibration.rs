//! Calibration and derived values end to end: a microcontroller on a pseudo-terminal
//! prints known values, and what the daemon stores, sends and keeps in the calibration
//! history is checked against them.

mod common;
mod mqtt;

use std::io::Write;
use std::time::Duration;

use common::{sensor_named, Client, Daemon, Received, PATIENCE};
use mqtt::{Broker, Subscriber};
use serde_json::{json, Value};
use serialport::{SerialPort, TTYPort};

/// How long a quiet socket is watched to conclude that nothing more comes.
const QUIET: Duration = Duration::from_millis(400);

/// A pseudo-terminal pair: the test writes on the master, the daemon opens the slave.
fn pty() -> (TTYPort, TTYPort, String) {
    let (master, slave) = TTYPort::pair().expect("pseudo-terminal pair");
    let path = slave.name().expect("the slave pty has a path");
    (master, slave, path)
}

/// A config with one serial sensor named `aula`, plus `extra` keys in its table.
fn serial_sensor(path: &str, extra: &str) -> String {
    format!(
        "[[sensor]]\nname = \"aula\"\ntipo = \"temperatura\"\nmodelo = \"Arduino + SHT31\"\n\
         interval_s = 1.0\nsource = {{ kind = \"serial\", path = '{path}', baud = 9600 }}\n{extra}"
    )
}

/// The readings of one sample, by `tipo`: `(valor, unidad, timestamp)`.
type SampleReadings = std::collections::BTreeMap<String, (f64, String, String)>;

/// Writes `line` until a sample of it comes back whole on `readings` (the port opens a
/// moment after the daemon starts, and the first line after opening may be dropped), and
/// returns that sample's readings: every reading with the timestamp of the first one.
async fn sample_of(master: &mut TTYPort, readings: &mut Client, line: &str) -> SampleReadings {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reading came back for {line:?}"
        );
        master.write_all(format!("{line}\n").as_bytes()).unwrap();
        master.flush().unwrap();
        let Some(Received::Json(first)) = readings.next_within(Duration::from_millis(700)).await
        else {
            continue;
        };
        let mut sample = SampleReadings::new();
        let mut add = |event: &Value| {
            let data = &event["data"];
            sample.insert(
                data["tipo"].as_str().unwrap().to_owned(),
                (
                    data["valor"].as_f64().unwrap(),
                    data["unidad"].as_str().unwrap().to_owned(),
                    data["timestamp"].as_str().unwrap().to_owned(),
                ),
            );
        };
        add(&first);
        let stamp = first["data"]["timestamp"].clone();
        // The rest of the sample follows at once; a later sample (a line sent twice
        // while the port opened) has another timestamp and is drained.
        while let Some(Received::Json(next)) = readings.next_within(QUIET).await {
            if next["data"]["timestamp"] == stamp {
                add(&next);
            }
        }
        return sample;
    }
}

fn assert_close(sample: &SampleReadings, tipo: &str, expected: f64, unit: &str, tolerance: f64) {
    let (valor, unidad, _) = sample
        .get(tipo)
        .unwrap_or_else(|| panic!("no {tipo} in {sample:?}"));
    assert!(
        (valor - expected).abs() <= tolerance,
        "{tipo} is {valor}, expected {expected}: {sample:?}"
    );
    assert_eq!(unidad, unit, "{tipo}");
}

async fn readings_socket(daemon: &Daemon, id: i64) -> Client {
    daemon
        .subscribe(&format!("/api/v1/ws?channel=readings&sensor_id={id}"))
        .await
}

#[tokio::test]
async fn a_calibration_in_the_config_corrects_readings_and_derived_values_follow_them() {
    let (mut master, _slave, path) = pty();
    let daemon = Daemon::with(&serial_sensor(
            &path,
            "calibration = { temperatura = { offset = -0.8 }, humedad = { points = [[40, 41], [90, 91]] } }\n\
             derive = [\"punto_rocio\", \"vpd\", \"humedad_absoluta\"]\n",
        ),
    )
    .await;
    let id = sensor_named(&daemon, "aula").await;
    let (_, sensor) = daemon.get(&format!("/api/v1/sensores/{id}")).await;
    assert_eq!(
        sensor["calibracion"],
        json!({"humedad": {"offset": 1.0, "scale": 1.0},
               "temperatura": {"offset": -0.8, "scale": 1.0}})
    );
    assert_eq!(
        sensor["derivados"],
        json!(["punto_rocio", "vpd", "humedad_absoluta"])
    );
    let mut readings = readings_socket(&daemon, id).await;

    // The sensor reads 0.8 °C high and 1 %RH low: stored as 20 °C and 50 %, and the
    // derived values are those of 20 °C and 50 % (published: dew point 9.26 °C, VPD
    // 1.17 kPa, absolute humidity 8.65 g/m³).
    let sample = sample_of(&mut master, &mut readings, "T=20.8 H=49").await;
    assert_eq!(sample.len(), 5, "{sample:?}");
    assert_close(&sample, "temperatura", 20.0, "°C", 1e-9);
    assert_close(&sample, "humedad", 50.0, "%", 1e-9);
    assert_close(&sample, "punto_rocio", 9.26, "°C", 0.01);
    assert_close(&sample, "vpd", 1.17, "kPa", 0.005);
    assert_close(&sample, "humedad_absoluta", 8.65, "g/m³", 0.02);

    // Stored like any reading: listed, filtered by tipo, rolled up.
    let (status, listed) = daemon
        .get(&format!(
            "/api/v1/lecturas/?sensor_id={id}&tipo=punto_rocio"
        ))
        .await;
    assert_eq!(status, 200);
    let listed = listed.as_array().unwrap();
    assert!(!listed.is_empty());
    assert!(listed
        .iter()
        .all(|r| r["tipo"] == "punto_rocio" && r["unidad"] == "°C"));
    let (status, buckets) = daemon
        .get(&format!(
            "/api/v1/lecturas/agregadas?sensor_id={id}&tipo=vpd&bucket=minute"
        ))
        .await;
    assert_eq!(status, 200, "{buckets}");
    assert!(buckets[0]["count"].as_u64().unwrap() >= 1, "{buckets}");
    let raw = common::raw_exchange(
        daemon.addr,
        format!(
            "GET /api/v1/lecturas/export?sensor_id={id}&tipo=humedad_absoluta HTTP/1.1\r\n\
             Host: localhost\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    )
    .await
    .unwrap();
    let exported = String::from_utf8_lossy(&raw);
    assert!(
        exported.contains(&format!(",{id},humedad_absoluta,8.6")) && exported.contains(",g/m³,"),
        "{exported}"
    );

    // Out of the formulas' range (a sensor in a 60 °C oven): the measured values are
    // stored, no derived value is.
    let sample = sample_of(&mut master, &mut readings, "T=60.8 H=19").await;
    let tipos: Vec<&str> = sample.keys().map(String::as_str).collect();
    assert_eq!(tipos, ["humedad", "temperatura"], "{sample:?}");

    // The history holds the calibration the config set, from when it was stored.
    let (status, history) = daemon
        .get(&format!("/api/v1/sensores/{id}/calibracion"))
        .await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["calibracion"], sensor["calibracion"]);
    assert_eq!(
        history["historial"].as_array().unwrap().len(),
        1,
        "{history}"
    );
    assert_eq!(
        history["historial"][0]["calibracion"],
        sensor["calibracion"]
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_calibration_changed_over_rest_is_an_update_in_the_history_and_used_from_then_on() {
    let (mut master, _slave, path) = pty();
    let daemon = Daemon::with(&serial_sensor(&path, "")).await;
    let id = sensor_named(&daemon, "aula").await;
    let mut readings = readings_socket(&daemon, id).await;
    let mut sensors = daemon.subscribe("/api/v1/ws?channel=sensors").await;

    let before = sample_of(&mut master, &mut readings, "T=20.0 H=50").await;
    assert_close(&before, "temperatura", 20.0, "°C", 0.0);
    assert_eq!(before.len(), 2, "nothing derived unless asked: {before:?}");
    let (_, history) = daemon
        .get(&format!("/api/v1/sensores/{id}/calibracion"))
        .await;
    assert_eq!(history["calibracion"], json!({}));
    assert_eq!(history["historial"], json!([]));

    // Bad calibrations: 422 naming the exact field, no event, nothing stored.
    for (body, field) in [
        (
            json!({"calibracion": {"temperatura": {"scale": 0}}}),
            "calibracion.temperatura.scale",
        ),
        (
            json!({"calibracion": {"temperatura": {"offset": "mucho"}}}),
            "calibracion.temperatura.offset",
        ),
        (
            json!({"calibracion": {"co2": {"offset": -20}}}),
            "calibracion.co2",
        ),
        (json!({"derivados": ["rocio"]}), "derivados"),
    ] {
        let (status, error) = daemon
            .put(&format!("/api/v1/sensores/{id}"), &body.to_string())
            .await;
        assert_eq!(status, 422, "{body}: {error}");
        assert_eq!(error["code"], "invalid");
        assert_eq!(error["errors"][0]["field"], field, "{error}");
    }
    assert!(
        sensors.next_within(QUIET).await.is_none(),
        "a refused change emits nothing"
    );
    let (_, history) = daemon
        .get(&format!("/api/v1/sensores/{id}/calibracion"))
        .await;
    assert_eq!(history["historial"], json!([]));

    // A good one: an `updated` event naming it, a history entry, and corrected samples.
    let body = json!({"calibracion": {"temperatura": {"points": [[20, 19], [30, 31.5]]}},
                      "derivados": ["punto_rocio"]});
    let (status, updated) = daemon
        .put(&format!("/api/v1/sensores/{id}"), &body.to_string())
        .await;
    assert_eq!(status, 200, "{updated}");
    let expected = json!({"temperatura": {"offset": -6.0, "scale": 1.25}});
    assert_eq!(updated["calibracion"], expected);
    let event = sensors.json().await;
    assert_eq!(event["event_type"], "updated");
    assert_eq!(
        event["data"]["updated_fields"],
        json!(["calibracion", "derivados"])
    );
    assert_eq!(event["data"]["calibracion"], expected);
    let (_, history) = daemon
        .get(&format!("/api/v1/sensores/{id}/calibracion"))
        .await;
    let entries = history["historial"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{history}");
    assert_eq!(entries[0]["calibracion"], expected);
    assert_eq!(entries[0]["desde"], updated["updated_at"]);

    // The running source takes it up: 25 °C read is 25.25 °C stored, with its dew point.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let after = loop {
        let sample = sample_of(&mut master, &mut readings, "T=25.0 H=50").await;
        if sample.contains_key("punto_rocio") {
            break sample;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new calibration was never applied: {sample:?}"
        );
    };
    assert_close(&after, "temperatura", 25.25, "°C", 1e-9);
    assert_close(&after, "punto_rocio", 14.09, "°C", 0.01);
    assert!(after["temperatura"].2.as_str() >= entries[0]["desde"].as_str().unwrap());

    // Removing it is a change too, recorded as an empty calibration.
    let (status, cleared) = daemon
        .put(
            &format!("/api/v1/sensores/{id}"),
            r#"{"calibracion": null}"#,
        )
        .await;
    assert_eq!(status, 200, "{cleared}");
    assert_eq!(cleared["calibracion"], json!({}));
    let event = sensors.json().await;
    assert_eq!(event["data"]["updated_fields"], json!(["calibracion"]));
    let (_, history) = daemon
        .get(&format!("/api/v1/sensores/{id}/calibracion"))
        .await;
    assert_eq!(
        history["historial"].as_array().unwrap().len(),
        2,
        "{history}"
    );
    assert_eq!(history["historial"][1]["calibracion"], json!({}));
    let _ = daemon
        .expect("GET", "/api/v1/sensores/999/calibracion", None, 404)
        .await;
    daemon.stop().await;
}

/// Derived values leave by the uplink like any reading, and Home Assistant is told what
/// they are: a dew point is a temperature, a VPD a pressure in kPa, and absolute humidity
/// a number in g/m³ without a class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_values_reach_the_broker_and_home_assistant_with_their_classes() {
    let broker = Broker::start().await;
    let gw = format!("derived-{}", std::process::id());
    let mut configs = Subscriber::start(broker.addr, &["homeassistant/sensor/+/config"]).await;
    let mut values = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/+/vpd")]).await;
    let daemon = Daemon::with(&format!(
        "[uplink]\nbroker = \"mqtt://{}\"\ngateway = \"{gw}\"\n\n\
             [[sensor]]\nname = \"sala\"\ntipo = \"temperatura\"\nmodelo = \"DHT22\"\n\
             interval_s = 0.2\nsource = {{ kind = \"sim\", profile = \"dht22\", seed = 3 }}\n\
             derive = [\"punto_rocio\", \"vpd\", \"humedad_absoluta\"]\n",
        broker.addr
    ))
    .await;
    let id = sensor_named(&daemon, "sala").await;

    let vpd = values.until(PATIENCE, |_| true).await.remove(0).json();
    assert_eq!(vpd["tipo"], "vpd");
    assert_eq!(vpd["unit"], "kPa");
    assert_eq!(vpd["sensor_id"], id);
    let value = vpd["value"].as_f64().unwrap();
    assert!(value > 0.0 && value < 5.0, "{vpd}");

    let mut found = std::collections::BTreeMap::new();
    let prefix = format!("homeassistant/sensor/{gw}_{id}_");
    configs
        .until(PATIENCE, |m| {
            if let Some(tipo) = m.topic.strip_prefix(&prefix) {
                found.insert(tipo.trim_end_matches("/config").to_owned(), m.json());
            }
            ["punto_rocio", "vpd", "humedad_absoluta"]
                .iter()
                .all(|t| found.contains_key(*t))
        })
        .await;
    assert_eq!(found["punto_rocio"]["device_class"], "temperature");
    assert_eq!(found["punto_rocio"]["unit_of_measurement"], "°C");
    assert_eq!(found["vpd"]["device_class"], "pressure");
    assert_eq!(found["vpd"]["unit_of_measurement"], "kPa");
    assert!(found["humedad_absoluta"].get("device_class").is_none());
    assert_eq!(found["humedad_absoluta"]["unit_of_measurement"], "g/m³");
    assert_eq!(
        found["vpd"]["state_topic"],
        format!("sensorgate/{gw}/{id}/vpd")
    );
    daemon.stop().await;
}
