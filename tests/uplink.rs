//! The fleet uplink end to end: a daemon sampling simulated sensors publishes to an MQTT
//! broker (in process, or the one in `SENSORGATE_TEST_BROKER`), loses it, and catches up.

mod common;
mod mqtt;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{stored_frame, temp_dir, Daemon, EVENT_COLUMNS, SENSOR};
use mqtt::{Broker, Link, Message, Subscriber};
use serde_json::json;

/// How long a test waits for something that should come soon.
const PATIENCE: Duration = Duration::from_secs(15);

/// A gateway name no other test (nor an earlier run on a shared broker) uses.
fn gateway() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A daemon config with the uplink to `broker` as `gateway` and one simulated DHT22
/// (temperatura and humedad) sampled every 50 ms.
fn config(broker: std::net::SocketAddr, gateway: &str, extra: &str) -> String {
    format!(
        r#"
[uplink]
broker = "mqtt://{broker}"
gateway = "{gateway}"
{extra}

[[sensor]]
name = "invernadero"
tipo = "temperatura"
modelo = "DHT22"
ubicacion = "Invernadero norte"
interval_s = 0.05
source = {{ kind = "sim", profile = "dht22", seed = 7 }}
"#
    )
}

/// A stored reading event: its `seq` and the reading in its frame.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    seq: u64,
    sensor_id: i64,
    tipo: String,
    valor: f64,
    unidad: String,
    timestamp: String,
    /// Stamped by a clock that was not trusted yet.
    doubtful: bool,
}

/// Every reading event in the daemon's database, by `seq`.
fn stored_readings(data_dir: &Path) -> Vec<Stored> {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("sensorgate.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM event_log WHERE channel = 'readings' ORDER BY seq"
        ))
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, stored_frame(r)?)))
        .unwrap();
    rows.map(|row| {
        let (seq, frame) = row.unwrap();
        let data = &frame["data"];
        Stored {
            seq: seq as u64,
            sensor_id: data["sensor_id"].as_i64().unwrap(),
            tipo: data["tipo"].as_str().unwrap().to_owned(),
            valor: data["valor"].as_f64().unwrap(),
            unidad: data["unidad"].as_str().unwrap().to_owned(),
            timestamp: data["timestamp"].as_str().unwrap().to_owned(),
            doubtful: data["hora_dudosa"] == true,
        }
    })
    .collect()
}

/// A reading as published, checked against the documented layout and payload.
fn published_reading(gateway: &str, m: &Message) -> Stored {
    let payload = m.json();
    let keys: Vec<&str> = payload
        .as_object()
        .unwrap_or_else(|| panic!("{payload} is an object"))
        .keys()
        .map(String::as_str)
        .collect();
    let doubtful = payload["time_doubtful"] == true;
    let expected: &[&str] = if doubtful {
        &[
            "sensor_id",
            "seq",
            "time",
            "time_doubtful",
            "tipo",
            "unit",
            "value",
        ]
    } else {
        &["sensor_id", "seq", "time", "tipo", "unit", "value"]
    };
    assert_eq!(keys, expected, "{payload}");
    let reading = Stored {
        seq: payload["seq"].as_u64().unwrap(),
        sensor_id: payload["sensor_id"].as_i64().unwrap(),
        tipo: payload["tipo"].as_str().unwrap().to_owned(),
        valor: payload["value"].as_f64().unwrap(),
        unidad: payload["unit"].as_str().unwrap().to_owned(),
        timestamp: payload["time"].as_str().unwrap().to_owned(),
        doubtful,
    };
    assert_eq!(
        m.topic,
        format!(
            "sensorgate/{gateway}/{}/{}",
            reading.sensor_id, reading.tipo
        )
    );
    assert!(!m.retain, "readings are not retained: {}", m.topic);
    reading
}

fn is_reading(gateway: &str, m: &Message) -> bool {
    let prefix = format!("sensorgate/{gateway}/");
    m.topic.starts_with(&prefix)
        && m.topic[prefix.len()..]
            .split('/')
            .next()
            .is_some_and(|level| level.parse::<i64>().is_ok())
}

/// The readings among `messages`, in arrival order.
fn readings_in(gateway: &str, messages: &[Message]) -> Vec<Stored> {
    messages
        .iter()
        .filter(|m| is_reading(gateway, m))
        .map(|m| published_reading(gateway, m))
        .collect()
}

/// Every stored reading up to the newest one published arrived, exactly once, in order,
/// with the stored values.
fn assert_all_delivered_once_in_order(data_dir: &Path, received: &[Stored]) {
    let last = received.last().expect("readings were published").seq;
    let stored: Vec<Stored> = stored_readings(data_dir)
        .into_iter()
        .filter(|s| s.seq <= last)
        .collect();
    let seqs = |v: &[Stored]| v.iter().map(|s| s.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(received),
        seqs(&stored),
        "published seqs differ from stored ones"
    );
    assert_eq!(received, stored.as_slice());
}

fn status_is(gateway: &str, status: &str) -> impl Fn(&Message) -> bool {
    let topic = format!("sensorgate/{gateway}/status");
    let status = status.to_owned();
    move |m: &Message| m.topic == topic && m.text() == status
}

/// `/metrics`, parsed: every sample by name and labels. Panics on anything that is not
/// the Prometheus text format: a sample without its family's `# TYPE`, a bad name, label
/// or value, a family declared twice.
async fn metrics(daemon: &Daemon) -> BTreeMap<String, f64> {
    let (status, body) = daemon.try_request("GET", "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(name_ok(name), "{line}");
            assert!(
                ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family declared twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad name: {line}");
        // A summary's samples are its name with `_sum` or `_count`.
        let family = ["_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| types.get(*base).is_some_and(|kind| kind == "summary"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels: {line}"));
            for pair in inner.split("\",") {
                let (label, value) = pair.split_once("=\"").expect("label=\"value\"");
                assert!(name_ok(label), "bad label: {line}");
                assert!(!value.trim_end_matches('"').contains('"'), "{line}");
            }
        }
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "duplicate sample: {line}"
        );
    }
    samples
}

/// Waits until `check` holds for `/metrics`.
async fn metrics_until(
    daemon: &Daemon,
    check: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let m = metrics(daemon).await;
        if check(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never matched: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_sensor_events_arrive_under_the_documented_topics() {
    let broker = Broker::start().await;
    let gw = gateway();
    let mut sub = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/#")]).await;
    let daemon = Daemon::with(&config(broker.addr, &gw, "discovery = false")).await;

    let mut got = sub.until(PATIENCE, status_is(&gw, "online")).await;
    got.extend(
        sub.until(PATIENCE, |m| {
            is_reading(&gw, m)
                && m.json()["tipo"] == "humedad"
                && m.json()["seq"].as_u64() > Some(20)
        })
        .await,
    );
    let dir = daemon.stop().await.unwrap();
    got.extend(sub.until(PATIENCE, status_is(&gw, "offline")).await);
    got.extend(sub.drain(Duration::from_millis(300)).await);

    // The sensor's creation, as the envelope WebSocket clients get.
    let created: Vec<&Message> = got
        .iter()
        .filter(|m| m.topic.starts_with(&format!("sensorgate/{gw}/sensors/")))
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    let event = created[0].json();
    assert_eq!(event["type"], "entity_event");
    assert_eq!(event["entity_type"], "sensor");
    assert_eq!(event["event_type"], "created");
    assert_eq!(event["data"]["nombre"], "invernadero");
    let id = event["entity_id"].as_i64().unwrap();
    assert_eq!(created[0].topic, format!("sensorgate/{gw}/sensors/{id}"));

    let readings = readings_in(&gw, &got);
    assert!(readings.len() >= 20, "{}", readings.len());
    assert!(readings.iter().all(|r| r.sensor_id == id));
    assert!(readings
        .iter()
        .any(|r| r.tipo == "temperatura" && r.unidad == "°C"));
    assert!(readings
        .iter()
        .any(|r| r.tipo == "humedad" && r.unidad == "%"));
    assert!(event["seq"].as_u64().unwrap() < readings[0].seq);
    assert_all_delivered_once_in_order(dir.path(), &readings);

    // Status: online while connected, offline (retained) after a clean stop.
    let status: Vec<(String, bool)> = got
        .iter()
        .filter(|m| m.topic == format!("sensorgate/{gw}/status"))
        .map(|m| (m.text(), m.retain))
        .collect();
    assert_eq!(
        status,
        [("online".into(), false), ("offline".into(), false)]
    );
    let mut late = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/status")]).await;
    let retained = late.next_within(PATIENCE).await.expect("retained status");
    assert_eq!((retained.text(), retained.retain), ("offline".into(), true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_repeats_nothing() {
    let broker = Broker::start().await;
    let mut link = Link::start(broker.addr).await;
    let gw = gateway();
    let mut sub = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/#")]).await;
    let daemon = Daemon::with(&config(
        link.addr,
        &gw,
        "discovery = false\nreplay_per_second = 100",
    ))
    .await;
    let mut got = sub
        .until(PATIENCE, |m| {
            is_reading(&gw, m) && m.json()["seq"].as_u64() > Some(10)
        })
        .await;
    metrics_until(&daemon, |m| m["sensorgate_uplink_connected"] == 1.0).await;

    link.cut().await;
    // The broker noticed: it published the will.
    got.extend(sub.until(PATIENCE, status_is(&gw, "offline")).await);
    let cut_at = daemon.last_seq().await;
    let during = metrics_until(&daemon, |m| {
        m["sensorgate_uplink_connected"] == 0.0 && m["sensorgate_last_seq"] >= cut_at as f64 + 40.0
    })
    .await;
    let restored_at = daemon.last_seq().await;
    assert!(during["sensorgate_uplink_cursor"] <= cut_at as f64);
    assert!(
        during["sensorgate_uplink_backlog_events"] >= during["sensorgate_last_seq"] - cut_at as f64
    );
    got.extend(sub.drain(Duration::from_millis(200)).await);
    let before_restore = got.len();

    link.restore().await;
    got.extend(
        sub.until(PATIENCE, |m| {
            is_reading(&gw, m) && m.json()["seq"].as_u64() > Some(restored_at + 20)
        })
        .await,
    );
    let after = metrics_until(&daemon, |m| m["sensorgate_uplink_connected"] == 1.0).await;
    assert!(after["sensorgate_uplink_cursor"] > restored_at as f64);
    let dir = daemon.stop().await.unwrap();
    got.extend(sub.drain(Duration::from_millis(300)).await);

    let readings = readings_in(&gw, &got);
    assert_all_delivered_once_in_order(dir.path(), &readings);
    // Nothing was published while the link was down: what was stored meanwhile came
    // after it was back, and no faster than replay_per_second (100/s).
    let missed: Vec<&Message> = got[before_restore..]
        .iter()
        .filter(|m| is_reading(&gw, m))
        .filter(|m| {
            let seq = m.json()["seq"].as_u64().unwrap();
            seq > cut_at && seq <= restored_at
        })
        .collect();
    assert!(missed.len() >= 30, "{}", missed.len());
    let span = missed.last().unwrap().at - missed[0].at;
    let least = Duration::from_millis(10) * (missed.len() as u32 - 1);
    assert!(
        span >= least.mul_f64(0.9),
        "{} stored readings caught up in {span:?}, faster than 100/s",
        missed.len()
    );
    let statuses: Vec<String> = got
        .iter()
        .filter(|m| m.topic == format!("sensorgate/{gw}/status"))
        .map(Message::text)
        .collect();
    assert_eq!(statuses, ["online", "offline", "online", "offline"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_an_outage_loses_nothing_and_repeats_nothing() {
    let broker = Broker::start().await;
    let mut link = Link::start(broker.addr).await;
    let gw = gateway();
    let mut sub = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/#")]).await;
    let text = config(
        link.addr,
        &gw,
        "discovery = false\nreplay_per_second = 1000",
    );
    let daemon = Daemon::with(&text).await;
    let mut got = sub
        .until(PATIENCE, |m| {
            is_reading(&gw, m) && m.json()["seq"].as_u64() > Some(10)
        })
        .await;

    link.cut().await;
    got.extend(sub.until(PATIENCE, status_is(&gw, "offline")).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cursor = metrics(&daemon).await["sensorgate_uplink_cursor"];
    let dir = daemon.stop().await.unwrap();
    let stopped_at = stored_readings(dir.path()).last().unwrap().seq;

    // Still no broker: the new daemon samples on, and resumes from the saved cursor.
    let daemon = Daemon::in_dir(dir, &text).await;
    let m = metrics_until(&daemon, |m| {
        m["sensorgate_uplink_backlog_events"] >= (stopped_at as f64 - cursor) + 20.0
    })
    .await;
    assert_eq!(
        m["sensorgate_uplink_cursor"], cursor,
        "the cursor survived the restart"
    );
    assert_eq!(m["sensorgate_uplink_connected"], 0.0);
    let restored_at = daemon.last_seq().await;
    link.restore().await;
    got.extend(
        sub.until(PATIENCE, |m| {
            is_reading(&gw, m) && m.json()["seq"].as_u64() > Some(restored_at + 20)
        })
        .await,
    );
    let dir = daemon.stop().await.unwrap();
    got.extend(sub.drain(Duration::from_millis(300)).await);

    let readings = readings_in(&gw, &got);
    assert!(readings
        .iter()
        .any(|r| r.seq > cursor as u64 && r.seq <= stopped_at));
    assert!(readings
        .iter()
        .any(|r| r.seq > stopped_at && r.seq <= restored_at));
    assert_all_delivered_once_in_order(dir.path(), &readings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_removed_by_retention_during_an_outage_are_counted_and_skipped() {
    let broker = Broker::start().await;
    let mut link = Link::start(broker.addr).await;
    let gw = gateway();
    let mut sub = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/#")]).await;
    // Keep only the newest 40 events, pruned every second.
    let text = format!(
        "[storage]\nmax_events = 40\nmaintenance_interval_s = 1\n{}",
        config(link.addr, &gw, "discovery = false")
    );
    let daemon = Daemon::with(&text).await;
    sub.until(PATIENCE, |m| {
        is_reading(&gw, m) && m.json()["seq"].as_u64() > Some(10)
    })
    .await;
    link.cut().await;
    sub.until(PATIENCE, status_is(&gw, "offline")).await;
    let cursor = metrics(&daemon).await["sensorgate_uplink_cursor"] as u64;
    // Long enough for retention to remove events the uplink has not sent.
    let cut_at = daemon.last_seq().await;
    metrics_until(&daemon, |m| {
        m["sensorgate_last_seq"] >= (cut_at + 60) as f64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    link.restore().await;
    let restored_at = daemon.last_seq().await;
    let after = sub
        .until(PATIENCE, |m| {
            is_reading(&gw, m) && m.json()["seq"].as_u64() > Some(restored_at + 20)
        })
        .await;
    let m = metrics(&daemon).await;
    let dir = daemon.stop().await.unwrap();

    let readings = readings_in(&gw, &after);
    let first = readings[0].seq;
    assert!(
        first > cursor + 1,
        "the oldest unsent events were gone: {cursor} -> {first}"
    );
    let lost = m["sensorgate_uplink_lost_events_total"] as u64;
    assert!(
        lost >= 1 && lost < first - cursor,
        "{lost} lost between {cursor} and {first}"
    );
    // From the oldest event still stored on, nothing is missing or repeated.
    let stored: Vec<u64> = stored_readings(dir.path())
        .into_iter()
        .map(|r| r.seq)
        .filter(|seq| *seq >= first && *seq <= readings.last().unwrap().seq)
        .collect();
    let received: Vec<u64> = readings.iter().map(|r| r.seq).collect();
    assert_eq!(received[received.len() - stored.len()..], stored[..]);
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "in order, once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_is_retained_and_follows_the_sensors() {
    let broker = Broker::start().await;
    let gw = gateway();
    let configs = format!("homeassistant/sensor/{gw}_");
    let mut live = Subscriber::start(
        broker.addr,
        &[
            "homeassistant/sensor/+/config",
            &format!("sensorgate/{gw}/status"),
        ],
    )
    .await;
    let daemon = Daemon::with(&config(broker.addr, &gw, "")).await;
    let (_, sensors) = daemon.get("/api/v1/sensores/").await;
    let id = sensors[0]["id"].as_i64().unwrap();
    live.until(PATIENCE, |m| {
        m.topic == format!("{configs}{id}_humedad/config")
    })
    .await;

    // A subscriber that comes later gets both configs, retained.
    let mut late = Subscriber::start(broker.addr, &["homeassistant/sensor/+/config"]).await;
    let mut found = BTreeMap::new();
    while found.len() < 2 {
        let m = late.next_within(PATIENCE).await.expect("retained configs");
        if m.topic.starts_with(&configs) {
            assert!(m.retain, "{}", m.topic);
            found.insert(m.topic.clone(), m.json());
        }
    }
    let temperature = &found[&format!("{configs}{id}_temperatura/config")];
    assert_eq!(
        *temperature,
        json!({
            "name": "temperatura",
            "unique_id": format!("sensorgate_{gw}_{id}_temperatura"),
            "state_topic": format!("sensorgate/{gw}/{id}/temperatura"),
            "value_template": "{{ value_json.value }}",
            "device_class": "temperature",
            "unit_of_measurement": "°C",
            "state_class": "measurement",
            "availability_topic": format!("sensorgate/{gw}/status"),
            "payload_available": "online",
            "payload_not_available": "offline",
            "expire_after": 1,
            "device": {
                "identifiers": [format!("sensorgate_{gw}_{id}")],
                "name": "invernadero",
                "model": "DHT22",
                "manufacturer": "sensorgate",
                "suggested_area": "Invernadero norte"
            }
        })
    );
    let humidity = &found[&format!("{configs}{id}_humedad/config")];
    assert_eq!(humidity["device_class"], "humidity");
    assert_eq!(humidity["unit_of_measurement"], "%");
    assert_eq!(
        humidity["state_topic"],
        format!("sensorgate/{gw}/{id}/humedad")
    );

    // Created over REST: announced; updated: announced again; deleted: emptied.
    let (status, created) = daemon
        .post(
            "/api/v1/sensores/",
            r#"{"tipo": "presion", "modelo": "BME280", "intervalo": 10}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let new = created["id"].as_i64().unwrap();
    let topic = format!("{configs}{new}_presion/config");
    let announced = live
        .until(PATIENCE, |m| m.topic == topic)
        .await
        .pop()
        .unwrap()
        .json();
    assert_eq!(announced["device_class"], "pressure");
    assert_eq!(announced["unit_of_measurement"], "hPa");
    assert_eq!(announced["expire_after"], 50, "5 intervals of 10 s");
    assert_eq!(announced["device"]["name"], format!("BME280 {new}"));
    let (status, _) = daemon
        .put(
            &format!("/api/v1/sensores/{new}"),
            r#"{"nombre": "exterior"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let again = live
        .until(PATIENCE, |m| m.topic == topic)
        .await
        .pop()
        .unwrap()
        .json();
    assert_eq!(again["device"]["name"], "exterior");
    let (status, _) = daemon.delete(&format!("/api/v1/sensores/{new}")).await;
    assert_eq!(status, 200);
    let cleared = live
        .until(PATIENCE, |m| m.topic == topic)
        .await
        .pop()
        .unwrap();
    assert!(cleared.payload.is_empty());

    // Gone for newcomers too; the sampled sensor's configs stay.
    let mut latest = Subscriber::start(broker.addr, &["homeassistant/sensor/+/config"]).await;
    let now: Vec<String> = latest
        .drain(Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|m| m.retain && m.topic.starts_with(&configs))
        .map(|m| m.topic)
        .collect();
    let mut now = now;
    now.sort();
    assert_eq!(
        now,
        [
            format!("{configs}{id}_humedad/config"),
            format!("{configs}{id}_temperatura/config")
        ]
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_samples_arrive() {
    let broker = Broker::start().await;
    let gw = gateway();
    let mut sub = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/#")]).await;
    let daemon = Daemon::with(&config(broker.addr, &gw, "")).await;
    sub.until(PATIENCE, |m| {
        is_reading(&gw, m) && m.json()["tipo"] == "humedad"
    })
    .await;
    let (_, sensors) = daemon.get("/api/v1/sensores/").await;
    let id = sensors[0]["id"].as_i64().unwrap();
    let ok = format!("sensorgate_sensor_reads_total{{sensor_id=\"{id}\",outcome=\"ok\"}}");
    let temperature = format!("sensorgate_last_value{{sensor_id=\"{id}\",tipo=\"temperatura\"}}");
    let humidity = format!("sensorgate_last_value{{sensor_id=\"{id}\",tipo=\"humedad\"}}");

    let first = metrics_until(&daemon, |m| {
        m.contains_key(&humidity) && m["sensorgate_uplink_published_total"] > 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = metrics(&daemon).await;
    for moving in [
        ok.as_str(),
        "sensorgate_writer_commits_total",
        "sensorgate_writer_batch_commands_total",
        "sensorgate_writer_commit_seconds_sum",
        "sensorgate_writer_commit_seconds_count",
        "sensorgate_events_emitted_total{channel=\"readings\"}",
        "sensorgate_uplink_published_total",
        "sensorgate_uplink_cursor",
        "sensorgate_last_seq",
    ] {
        assert!(
            second[moving] > first[moving],
            "{moving}: {} then {}",
            first[moving],
            second[moving]
        );
    }
    assert!(
        second["sensorgate_writer_batch_commands_total"]
            >= second["sensorgate_writer_commit_seconds_count"]
    );
    assert_eq!(
        second["sensorgate_writer_commit_seconds_count"],
        second["sensorgate_writer_commits_total"]
    );
    assert_eq!(second["sensorgate_uplink_connected"], 1.0);
    assert!(
        second["sensorgate_uplink_backlog_events"] < 40.0,
        "{}",
        second["sensorgate_uplink_backlog_events"]
    );
    assert_eq!(second["sensorgate_uplink_lost_events_total"], 0.0);
    // Where the data directory is on a RAM disk the kernel counts no storage writes.
    assert!(
        second["sensorgate_process_write_bytes_total"]
            >= first["sensorgate_process_write_bytes_total"]
    );

    assert!(second.contains_key(&temperature));

    // The last value follows what is stored.
    let sensor = daemon
        .create_sensor(r#"{"tipo": "co2", "modelo": "SCD30"}"#)
        .await;
    let co2 = sensor["id"].as_i64().unwrap();
    let series = format!("sensorgate_last_value{{sensor_id=\"{co2}\",tipo=\"co2\"}}");
    assert!(!metrics(&daemon).await.contains_key(&series));
    for valor in [412.5, 398.25] {
        let body =
            format!(r#"{{"sensor_id": {co2}, "tipo": "co2", "valor": {valor}, "unidad": "ppm"}}"#);
        daemon
            .expect("POST", "/api/v1/lecturas/", Some(&body), 201)
            .await;
        assert_eq!(metrics(&daemon).await[&series], valor);
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_broker_is_checked_against_the_configured_ca() {
    let broker = Broker::start().await;
    let (link, ca) = Link::start_tls(broker.addr).await;
    let dir = temp_dir();
    let ca_file = dir.path().join("broker-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let (other_ca, _, _) = mqtt::certificates();
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca).unwrap();
    let (trusting, doubting) = (gateway(), gateway());
    let mut sub = Subscriber::start(
        broker.addr,
        &[
            &format!("sensorgate/{trusting}/#"),
            &format!("sensorgate/{doubting}/#"),
        ],
    )
    .await;
    let tls = |ca: &Path| format!("discovery = false\nca_file = \"{}\"", ca.display());
    let broker_url = |text: String| text.replace("mqtt://", "mqtts://");

    let good_dir = dir.path().join("good");
    let good = Daemon::start_in(
        &good_dir,
        &broker_url(config(link.addr, &trusting, &tls(&ca_file))),
    )
    .await;
    let bad_dir = dir.path().join("bad");
    let bad = Daemon::start_in(
        &bad_dir,
        &broker_url(config(link.addr, &doubting, &tls(&other_ca_file))),
    )
    .await;
    let got = sub
        .until(PATIENCE, |m| {
            is_reading(&trusting, m) && m.json()["seq"].as_u64() > Some(10)
        })
        .await;
    assert!(got
        .iter()
        .all(|m| m.topic.starts_with(&format!("sensorgate/{trusting}/"))));
    assert_eq!(metrics(&good).await["sensorgate_uplink_connected"], 1.0);
    // A certificate from a CA it was not told to trust: never connected, nothing sent.
    let m = metrics(&bad).await;
    assert_eq!(m["sensorgate_uplink_connected"], 0.0);
    assert_eq!(m["sensorgate_uplink_published_total"], 0.0);
    good.stop().await;
    bad.stop().await;
    let rest = sub.drain(Duration::from_millis(300)).await;
    assert!(rest
        .iter()
        .all(|m| !m.topic.starts_with(&format!("sensorgate/{doubting}/"))));
    drop(link);
}

#[tokio::test]
async fn without_a_broker_configured_there_is_no_uplink() {
    let daemon = Daemon::with("").await;
    let m = metrics(&daemon).await;
    assert!(
        m.keys().all(|k| !k.starts_with("sensorgate_uplink_")),
        "{m:?}"
    );
    assert!(m.contains_key("sensorgate_writer_commit_seconds_sum"));
    let dir = daemon.stop().await.unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM uplink_cursor", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_or_deleted_reading_reaches_the_broker_apart_from_readings() {
    let broker = Broker::start().await;
    let gw = gateway();
    let mut sub = Subscriber::start(broker.addr, &[&format!("sensorgate/{gw}/#")]).await;
    let uplink = format!(
        "[uplink]\nbroker = \"mqtt://{}\"\ngateway = \"{gw}\"\ndiscovery = false\n",
        broker.addr
    );
    let daemon = Daemon::with(&uplink).await;
    sub.until(PATIENCE, status_is(&gw, "online")).await;
    let sensor = daemon.create_sensor(SENSOR).await;
    let sensor_id = sensor["id"].as_i64().unwrap();
    let body =
        json!({"sensor_id": sensor_id, "tipo": "temperatura", "valor": 85.0, "unidad": "°C"});
    let (status, reading) = daemon.post("/api/v1/lecturas/", &body.to_string()).await;
    assert_eq!(status, 201, "{reading}");
    let id = reading["id"].as_i64().unwrap();
    let path = format!("/api/v1/lecturas/{id}");
    let (status, updated) = daemon.put(&path, r#"{"valor": 21.5}"#).await;
    assert_eq!(status, 200, "{updated}");
    let (status, deleted) = daemon.delete(&path).await;
    assert_eq!(status, 200, "{deleted}");

    let topic = format!("sensorgate/{gw}/readings/{id}");
    let mut got = sub
        .until(PATIENCE, |m| {
            m.topic == topic && m.json()["event_type"] == "deleted"
        })
        .await;
    got.extend(sub.drain(Duration::from_millis(300)).await);
    let dir = daemon.stop().await.unwrap();

    // On the readings' topic, only the reading as it was taken.
    let readings = readings_in(&gw, &got);
    assert_eq!(readings.len(), 1, "{readings:?}");
    assert_eq!(readings[0].valor, 85.0);

    // Its correction and its deletion: the envelopes WebSocket clients get, in order.
    let changes: Vec<serde_json::Value> = got
        .iter()
        .filter(|m| m.topic == topic)
        .inspect(|m| assert!(!m.retain, "changes are not retained"))
        .map(Message::json)
        .collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["entity_type"], "reading");
    assert_eq!(changes[0]["event_type"], "updated");
    assert_eq!(changes[0]["data"]["valor"], 21.5);
    assert_eq!(changes[0]["data"]["updated_fields"], json!(["valor"]));
    assert_eq!(changes[0]["metadata"]["action"], "update_reading");
    assert_eq!(changes[1]["event_type"], "deleted");
    assert_eq!(changes[1]["data"], updated);
    assert_eq!(changes[1]["metadata"]["action"], "delete_reading");
    assert_eq!(
        changes[1]["seq"].as_u64(),
        changes[0]["seq"].as_u64().map(|s| s + 1)
    );

    // The same frames as stored for replay.
    let conn = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    for change in &changes {
        let stored = conn
            .query_row(
                &format!("SELECT {EVENT_COLUMNS} FROM event_log WHERE seq = ?1"),
                [change["seq"].as_i64().unwrap()],
                stored_frame,
            )
            .unwrap();
        assert_eq!(&stored, change);
    }
}
