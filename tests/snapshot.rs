//! Snapshots: the sensors and latest readings a client starts from, consistent with
//! their `seq`, and every later event after them.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::events::*;
use common::{http, Daemon};
use serde_json::{json, Value};

/// How long a client waits to be sure nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

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
    let (daemon, mut http) = Daemon::open(&fast_sim("sim", 3)).await.with_http();
    let x = http.create_sensor("temperatura").await;
    let y = http.create_sensor("humedad").await;
    for i in 0..3 {
        http.reading(x, "temperatura", f64::from(i)).await;
        http.reading(x, "humedad", 50.0 + f64::from(i)).await;
        http.reading(y, "humedad", 60.0 + f64::from(i)).await;
    }
    let posted = daemon.last_seq().await;
    daemon
        .wait_past(posted, "samples after the posted readings")
        .await;

    let mut client = daemon
        .subscribe("/api/v1/ws?channel=readings&snapshot=true")
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
    let expected = latest_readings_up_to(daemon.dir(), s);
    // The sim sensor's two tipos and x's two, y's one.
    assert_eq!(expected.len(), 5, "{expected:?}");
    assert_eq!(snapshot["readings"], Value::Array(expected));

    let received = events_until(&mut client, s + 20).await;
    assert_exactly_stored(daemon.dir(), "readings", s, &received);

    // Narrowed to one sensor and tipo.
    let mut narrow = daemon
        .subscribe(&format!(
            "/api/v1/ws?channel=readings&snapshot=true&sensor_id={x}&tipo=humedad"
        ))
        .await;
    let snapshot = narrow.json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let s = seq(&snapshot);
    let (_, mut sensor_x) = daemon.get(&format!("/api/v1/sensores/{x}")).await;
    sensor_x.as_object_mut().unwrap().remove("salud");
    assert_eq!(snapshot["sensors"], json!([sensor_x]));
    let expected: Vec<Value> = latest_readings_up_to(daemon.dir(), s)
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
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let sensors = http.create_sensors(100).await;
    for (i, &sensor) in sensors.iter().enumerate() {
        http.reading(sensor, "temperatura", i as f64).await;
        http.reading(sensor, "humedad", i as f64).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..2 {
        let (stop, sensors, addr) = (stop.clone(), sensors.clone(), daemon.addr);
        producers.push(tokio::spawn(async move {
            let mut http = http::Client::new(addr);
            let mut i = p;
            while !stop.load(Ordering::Relaxed) {
                http.reading(sensors[i % sensors.len()], "temperatura", 1.0)
                    .await;
                i += 2;
            }
        }));
    }
    // Let the stream get going.
    let going = daemon.last_seq().await;
    daemon.wait_past(going + 20, "the stream going").await;
    let mut problems = Vec::new();
    for attempt in 0..8 {
        let mut client = daemon
            .subscribe("/api/v1/ws?channel=readings&snapshot=true")
            .await;
        let snapshot = client.json().await;
        assert_eq!(snapshot["type"], "snapshot");
        let s = seq(&snapshot);
        let received = events_until(&mut client, s + 30).await;
        let expected = stored_seqs(daemon.dir(), "readings", s, seq(received.last().unwrap()));
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
