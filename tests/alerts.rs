//! Alerts end to end: a real daemon, readings posted over REST or sampled from a
//! simulated sensor, a real WebSocket client on `general`, a webhook receiver on a
//! loopback socket, the MQTT broker of the uplink tests, and the database file itself.

mod common;
mod mqtt;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{check_config, temp_dir, until, Client, Daemon, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Every alert and silence event type, as a socket filter.
const ALERT_EVENTS: &str =
    "alert_firing,alert_resolved,alert_acknowledged,silence_created,silence_ended";

async fn create_sensor(daemon: &Daemon, name: &str) -> i64 {
    let body = json!({"tipo": "temperatura", "modelo": "PT100", "nombre": name}).to_string();
    let (status, sensor) = daemon.post("/api/v1/sensores/", &body).await;
    assert_eq!(status, 201, "{sensor}");
    sensor["id"].as_i64().unwrap()
}

async fn post_reading(daemon: &Daemon, sensor_id: i64, valor: f64) {
    let body = json!({"sensor_id": sensor_id, "tipo": "temperatura", "valor": valor}).to_string();
    let (status, reading) = daemon.post("/api/v1/lecturas/", &body).await;
    assert_eq!(status, 201, "{reading}");
}

/// A daemon with a sensor `name` and an alert rule on it, made by `rule` from the
/// sensor's id; returns the daemon and the ids of the sensor and the rule.
async fn alerting(name: &str, rule: impl FnOnce(i64) -> Value) -> (Daemon, i64, i64) {
    let daemon = Daemon::with("").await;
    let sensor = create_sensor(&daemon, name).await;
    let rule = create_rule(&daemon, rule(sensor)).await;
    (daemon, sensor, rule)
}

async fn create_rule(daemon: &Daemon, rule: Value) -> i64 {
    let (status, created) = daemon.post("/api/v1/alertas", &rule.to_string()).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_i64().unwrap()
}

async fn phase(daemon: &Daemon, rule_id: i64) -> String {
    let (status, rule) = daemon.get(&format!("/api/v1/alertas/{rule_id}")).await;
    assert_eq!(status, 200, "{rule}");
    rule["state"]["phase"].as_str().unwrap().to_owned()
}

/// A socket on `general` that hears only alert and silence events.
async fn alert_socket(daemon: &Daemon, since: Option<u64>) -> Client {
    let since = since.map(|s| format!("&since={s}")).unwrap_or_default();
    daemon
        .subscribe(&format!(
            "/api/v1/ws?channel=general&event_type={ALERT_EVENTS}{since}"
        ))
        .await
}

/// The next system event on `socket`.
async fn next_event(socket: &mut Client) -> Value {
    loop {
        let message = socket.json().await;
        if message["type"] == "system_event" {
            return message;
        }
    }
}

/// Alert and silence events stored in the database, oldest first: `(seq, type, data)`.
fn stored_events(data_dir: &Path) -> Vec<(u64, String, Value)> {
    let conn = rusqlite::Connection::open(data_dir.join("sensorgate.db")).unwrap();
    let mut statement = conn
        .prepare(
            "SELECT seq, event_type, frame FROM events \
             WHERE event_type LIKE 'alert_%' OR event_type LIKE 'silence_%' ORDER BY seq",
        )
        .unwrap();
    statement
        .query_map([], |row| {
            let frame: String = row.get(2)?;
            let frame: Value = serde_json::from_str(&frame).unwrap();
            Ok((
                row.get::<_, i64>(0)? as u64,
                row.get(1)?,
                frame["data"].clone(),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn outbox_rows(data_dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(data_dir.join("sensorgate.db")).unwrap();
    conn.query_row("SELECT count(*) FROM alert_outbox", [], |r| r.get(0))
        .unwrap()
}

fn micros(time: &Value) -> i64 {
    sensorgate::model::parse_time(time.as_str().expect("a time")).expect("RFC 3339")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_crossing_its_threshold_fires_after_its_hold_and_resolves_past_the_hysteresis() {
    let (daemon, sensor, rule) = alerting("freezer", |_| {
        json!({"name": "freezer warm", "sensor": "freezer", "tipo": "temperatura",
               "condition": "above", "threshold": 10, "for_s": 2, "hysteresis": 1})
    })
    .await;
    let before = daemon.last_seq().await;
    let mut socket = alert_socket(&daemon, None).await;

    post_reading(&daemon, sensor, 5.0).await;
    post_reading(&daemon, sensor, 12.0).await;
    let firing = next_event(&mut socket).await;
    assert_eq!(firing["event_type"], "alert_firing", "{firing}");
    let data = &firing["data"];
    assert_eq!(data["rule_id"], rule);
    assert_eq!(data["rule"], "freezer warm");
    assert_eq!(data["sensor_id"], sensor);
    assert_eq!(data["tipo"], "temperatura");
    assert_eq!(data["value"], 12.0);
    assert!(
        micros(&data["fired_at"]) - micros(&data["started_at"]) >= 2_000_000,
        "fired before the 2 s hold ran out: {data}"
    );
    assert_eq!(phase(&daemon, rule).await, "firing");
    assert_eq!(daemon.metric("sensorgate_alerts_firing").await, Some(1.0));

    // Below the threshold, but within the hysteresis: still firing. Then past it.
    post_reading(&daemon, sensor, 9.5).await;
    post_reading(&daemon, sensor, 8.5).await;
    let resolved = next_event(&mut socket).await;
    assert_eq!(resolved["event_type"], "alert_resolved", "{resolved}");
    assert_eq!(
        resolved["data"]["value"], 8.5,
        "9.5 is within the hysteresis"
    );
    assert_eq!(resolved["data"]["started_at"], data["started_at"]);
    assert_eq!(phase(&daemon, rule).await, "resolved");
    assert_eq!(daemon.metric("sensorgate_alerts_firing").await, Some(0.0));

    // Exactly these two, stored; a client resuming from before hears the same.
    let stored: Vec<_> = stored_events(daemon.dir())
        .into_iter()
        .map(|(seq, kind, _)| (seq, kind))
        .collect();
    assert_eq!(
        stored,
        [
            (firing["seq"].as_u64().unwrap(), "alert_firing".to_owned()),
            (
                resolved["seq"].as_u64().unwrap(),
                "alert_resolved".to_owned()
            ),
        ]
    );
    let mut resumed = alert_socket(&daemon, Some(before)).await;
    assert_eq!(next_event(&mut resumed).await, firing);
    assert_eq!(next_event(&mut resumed).await, resolved);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_stays_firing_across_a_restart_without_firing_again() {
    let (daemon, sensor, rule) = alerting("camara", |id| {
        json!({"name": "camara cold", "sensor_id": id, "tipo": "temperatura",
               "condition": "below", "threshold": 2})
    })
    .await;
    let mut socket = alert_socket(&daemon, None).await;
    post_reading(&daemon, sensor, 1.0).await;
    let firing = next_event(&mut socket).await;
    assert_eq!(firing["event_type"], "alert_firing");
    let daemon = daemon.restart_with("").await;
    assert_eq!(phase(&daemon, rule).await, "firing");
    let mut socket = alert_socket(&daemon, None).await;
    post_reading(&daemon, sensor, 0.5).await;
    post_reading(&daemon, sensor, 3.0).await;
    let resolved = next_event(&mut socket).await;
    assert_eq!(resolved["event_type"], "alert_resolved", "{resolved}");
    assert_eq!(resolved["data"]["started_at"], firing["data"]["started_at"]);
    let kinds: Vec<String> = stored_events(daemon.dir())
        .into_iter()
        .map(|(_, kind, _)| kind)
        .collect();
    assert_eq!(
        kinds,
        ["alert_firing", "alert_resolved"],
        "no second firing"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_that_goes_quiet_fires_no_reading_and_resolves_at_its_next_reading() {
    let (daemon, sensor, rule) = alerting("bodega", |_| {
        json!({"name": "bodega quiet", "sensor": "bodega", "tipo": "temperatura",
               "condition": "no_reading", "seconds": 1})
    })
    .await;
    let mut socket = alert_socket(&daemon, None).await;
    post_reading(&daemon, sensor, 20.0).await;
    let firing = next_event(&mut socket).await;
    assert_eq!(firing["event_type"], "alert_firing");
    assert_eq!(firing["data"]["rule_id"], rule);
    assert_eq!(firing["data"]["condition"], "no_reading");
    assert!(firing["data"]["value"].as_f64().unwrap() > 1.0);
    post_reading(&daemon, sensor, 20.0).await;
    let resolved = next_event(&mut socket).await;
    assert_eq!(resolved["event_type"], "alert_resolved");
    daemon.stop().await;
}

/// A webhook receiver on loopback: answers 500 to the first `failures` requests, then
/// 200, and keeps every request's status and JSON body.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(u16, Value)>>>,
}

impl Receiver {
    async fn start(failures: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<(u16, Value)>>> = Arc::default();
        let record = got.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        break None;
                    };
                    if n == 0 {
                        break None;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if raw.len() >= end + 4 + length {
                        break Some(raw[end + 4..end + 4 + length].to_vec());
                    }
                };
                let Some(body) = body else { continue };
                let status = {
                    let mut got = record.lock().unwrap();
                    let status = if got.len() < failures { 500 } else { 200 };
                    got.push((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                    status
                };
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        Receiver { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn requests(&self) -> Vec<(u16, Value)> {
        self.got.lock().unwrap().clone()
    }

    /// The bodies answered 200, in the order they arrived.
    fn delivered(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_notifications_are_retried_in_order_and_survive_a_restart() {
    let receiver = Receiver::start(3).await;
    let (daemon, sensor, rule) = alerting("horno", |_| {
        json!({"name": "horno hot", "sensor": "horno", "tipo": "temperatura",
               "condition": "outside", "min": 0, "max": 100, "webhook": receiver.url(),
               "webhook_per_minute": 600})
    })
    .await;
    post_reading(&daemon, sensor, 150.0).await;
    until("the receiver refused a first attempt", || async {
        (!receiver.requests().is_empty()).then_some(())
    })
    .await;
    // Stopped with the notification undelivered: it waits in the database.
    let dir = daemon.stop().await.unwrap();
    assert_eq!(outbox_rows(dir.path()), 1);

    let daemon = Daemon::in_dir(dir, "").await;
    post_reading(&daemon, sensor, 50.0).await;
    post_reading(&daemon, sensor, -5.0).await;
    let delivered = until("three notifications delivered", || async {
        let delivered = receiver.delivered();
        (delivered.len() >= 3).then_some(delivered)
    })
    .await;
    let seen: Vec<(String, f64)> = delivered
        .iter()
        .map(|b| {
            (
                b["status"].as_str().unwrap().to_owned(),
                b["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("firing".to_owned(), 150.0),
            ("resolved".to_owned(), 50.0),
            ("firing".to_owned(), -5.0)
        ]
    );
    assert!(delivered.iter().all(|b| b["rule_id"] == rule));
    let refused = receiver
        .requests()
        .iter()
        .filter(|(s, _)| *s == 500)
        .count();
    assert_eq!(refused, 3);
    // Counted once the delivery is marked in the database, a moment after the receiver
    // answered.
    until("three deliveries counted", || async {
        let delivered = daemon
            .metric("sensorgate_alert_notifications_delivered_total")
            .await;
        (delivered == Some(3.0)).then_some(())
    })
    .await;
    let failed = daemon
        .metric("sensorgate_alert_notification_failures_total")
        .await;
    assert!(
        failed.is_some_and(|n| (1.0..=3.0).contains(&n)),
        "{failed:?}"
    );
    until("the outbox empties", || async {
        (outbox_rows(daemon.dir()) == 0).then_some(())
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_holds_notifications_back_until_it_ends_and_acks_are_events() {
    let receiver = Receiver::start(0).await;
    let (daemon, sensor, rule) = alerting("vacunas", |id| {
        json!({"name": "vacunas warm", "sensor_id": id, "tipo": "temperatura",
               "condition": "above", "threshold": 8, "webhook": receiver.url()})
    })
    .await;
    let mut socket = alert_socket(&daemon, None).await;
    let (status, silence) = daemon
        .post(
            "/api/v1/silencios",
            &json!({"sensor_id": sensor, "duration_s": 4, "created_by": "ana",
                    "comment": "defrosting"})
            .to_string(),
        )
        .await;
    assert_eq!(status, 201, "{silence}");
    let created = next_event(&mut socket).await;
    assert_eq!(created["event_type"], "silence_created");
    assert_eq!(created["data"]["created_by"], "ana");
    assert_eq!(created["data"]["comment"], "defrosting");

    post_reading(&daemon, sensor, 9.0).await;
    let firing = next_event(&mut socket).await;
    assert_eq!(firing["event_type"], "alert_firing");
    assert_eq!(firing["data"]["silenced"], true);
    let ended = next_event(&mut socket).await;
    assert_eq!(ended["event_type"], "silence_ended");
    assert_eq!(ended["data"]["reason"], "expired");
    assert_eq!(ended["data"]["id"], silence["id"]);

    // Held back while silenced, sent once the silence ended.
    let delivered = until("the firing notification after the silence", || async {
        let delivered = receiver.delivered();
        (!delivered.is_empty()).then_some(delivered)
    })
    .await;
    assert_eq!(delivered[0]["status"], "firing");
    assert!(micros(&delivered[0]["sent_at"]) >= micros(&silence["ends_at"]));

    let (status, acked) = daemon
        .post(
            &format!("/api/v1/alertas/{rule}/ack"),
            &json!({"by": "luis", "comment": "door fixed"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["state"]["acknowledged"]["by"], "luis");
    let ack = next_event(&mut socket).await;
    assert_eq!(ack["event_type"], "alert_acknowledged");
    assert_eq!(ack["data"]["comment"], "door fixed");
    // Acknowledgements and silences survive a restart: the ack is in the rule's state.
    let daemon = daemon.restart_with("").await;
    let (_, rule_now) = daemon.get(&format!("/api/v1/alertas/{rule}")).await;
    assert_eq!(
        rule_now["state"]["acknowledged"]["by"], "luis",
        "{rule_now}"
    );
    let (status, _) = daemon
        .post(
            &format!("/api/v1/alertas/{rule}/ack"),
            &json!({"by": ""}).to_string(),
        )
        .await;
    assert_eq!(status, 422);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_is_refused_naming_its_field_and_changes_nothing() {
    let daemon = Daemon::with("").await;
    let before = daemon.last_seq().await;
    let (status, error) = daemon
        .post(
            "/api/v1/alertas",
            &json!({"name": "x", "sensor": "s", "tipo": "temperatura",
                    "condition": "above", "threshold": "high"})
            .to_string(),
        )
        .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["code"], "invalid");
    assert_eq!(error["errors"][0]["field"], "threshold", "{error}");
    let (status, error) = daemon
        .post(
            "/api/v1/alertas",
            &json!({"name": "x", "sensor": "s", "tipo": "temperatura",
                    "condition": "outside", "min": 5, "max": 1})
            .to_string(),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(error["errors"][0]["field"], "max", "{error}");
    let (_, rules) = daemon.get("/api/v1/alertas").await;
    assert_eq!(rules, json!([]));
    assert_eq!(daemon.last_seq().await, before);

    // Writing rules takes an admin token.
    let head = format!(
        "POST /api/v1/alertas HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}",
        daemon.addr
    );
    let raw = common::raw_exchange(daemon.addr, head.into_bytes())
        .await
        .unwrap();
    assert_eq!(common::split_response(&raw).0, 401);
    daemon.stop().await;
}

const BAD_RULE_CONFIG: &str = r#"
[[sensor]]
name = "invernadero"
tipo = "temperatura"
modelo = "DHT22"
interval_s = 0.05
source = { kind = "sim", profile = "dht22", seed = 7 }

[[alert]]
name = "good"
sensor = "invernadero"
tipo = "temperatura"
condition = "no_reading"
seconds = 30

[[alert]]
name = "bad"
sensor = "invernadero"
tipo = "temperatura"
condition = "below"
threshold = 5
hysteresis = -1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_in_the_config_is_named_by_line_and_sampling_goes_on() {
    let dir = temp_dir();
    let out = check_config(dir.path(), "bad-alert.toml", BAD_RULE_CONFIG);
    assert_eq!(out.code, Some(1));
    let message = out.stderr;
    assert!(
        message.contains("bad-alert.toml: line 22: alert 2: hysteresis must be 0 or more"),
        "{message}"
    );
    let without_bad = &BAD_RULE_CONFIG[..BAD_RULE_CONFIG.rfind("[[alert]]").unwrap()];
    let out = check_config(dir.path(), "good-alert.toml", without_bad);
    let said = out.stdout;
    assert!(out.ok, "{said}");
    assert!(said.contains("ok (1 sensor, 1 alert rule)"), "{said}");

    let data = dir.path().join("data");
    let config = sensorgate::config::Config::parse(BAD_RULE_CONFIG, Path::new("test.toml"))
        .expect("a bad alert rule does not refuse the file");
    let mut config = config;
    config.storage.data_dir = data.clone();
    let daemon = Daemon::start(config).await;
    let sensor = common::sensor_named(&daemon, "invernadero").await;
    until("the simulated sensor is sampled", || async {
        let (_, readings) = daemon
            .get(&format!("/api/v1/lecturas/?sensor_id={sensor}&limit=1"))
            .await;
        (readings.as_array().is_some_and(|r| !r.is_empty())).then_some(())
    })
    .await;
    let (_, rules) = daemon.get("/api/v1/alertas").await;
    let names: Vec<&str> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["good"]);
    assert_eq!(rules[0]["origin"], "config");
    let (status, _) = daemon
        .delete(&format!("/api/v1/alertas/{}", rules[0]["id"]))
        .await;
    assert_eq!(status, 409, "a rule of the config file is changed there");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_has_a_retained_topic_with_its_latest_alert_event() {
    let broker = mqtt::Broker::start().await;
    let gateway = format!("alerts{}", std::process::id());
    let daemon = Daemon::with(&format!(
        "[uplink]\nbroker = \"mqtt://{}\"\ngateway = \"{gateway}\"\n",
        broker.addr
    ))
    .await;
    let sensor = create_sensor(&daemon, "silo").await;
    let rule = create_rule(
        &daemon,
        json!({"name": "silo hot", "sensor": "silo", "tipo": "temperatura",
               "condition": "above", "threshold": 30}),
    )
    .await;
    let topic = format!("sensorgate/{gateway}/alerts/{rule}");
    let mut socket = alert_socket(&daemon, None).await;
    post_reading(&daemon, sensor, 35.0).await;
    let firing = next_event(&mut socket).await;
    assert_eq!(firing["event_type"], "alert_firing");

    // A subscriber that comes later is handed the retained state at once.
    let retained = |event_type: &'static str| {
        let topic = topic.clone();
        let addr = broker.addr;
        async move {
            let mut late = mqtt::Subscriber::start(addr, &[&topic]).await;
            let message = late
                .until(PATIENCE, |m| m.topic == topic)
                .await
                .pop()
                .unwrap();
            let event = message.json();
            (message.retain && event["event_type"] == event_type).then_some(event)
        }
    };
    let published = until("the firing alert on its retained topic", || {
        retained("alert_firing")
    })
    .await;
    assert_eq!(published, firing);
    post_reading(&daemon, sensor, 20.0).await;
    let resolved = next_event(&mut socket).await;
    let published = until("the resolved alert on its retained topic", || {
        retained("alert_resolved")
    })
    .await;
    assert_eq!(published, resolved);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_is_notified_again_until_acknowledged() {
    let receiver = Receiver::start(0).await;
    let (daemon, sensor, rule) = alerting("incubadora", |id| {
        json!({"name": "incubadora hot", "sensor_id": id, "tipo": "temperatura",
               "condition": "above", "threshold": 38, "repeat_s": 1,
               "webhook": receiver.url(), "webhook_per_minute": 600})
    })
    .await;
    let other = create_rule(
        &daemon,
        json!({"name": "incubadora hot too", "sensor_id": sensor, "tipo": "temperatura",
               "condition": "above", "threshold": 38, "repeat_s": 1,
               "webhook": receiver.url(), "webhook_per_minute": 600}),
    )
    .await;
    post_reading(&daemon, sensor, 39.0).await;
    until("a repeated notification", || async {
        receiver
            .delivered()
            .iter()
            .any(|b| b["rule_id"] == rule && b["repeat"] == true)
            .then_some(())
    })
    .await;
    let ack = format!("/api/v1/alertas/{rule}/ack");
    let acked = daemon
        .expect("POST", &ack, Some(r#"{"by": "eva"}"#), 200)
        .await;
    let acked_at = micros(&acked["state"]["acknowledged"]["at"]);
    // A second rule, never acknowledged, shows the clock going on: once it has been
    // notified again well after the acknowledgement, the first one was due as often.
    until(
        "the other rule repeated after the acknowledgement",
        || async {
            receiver
                .delivered()
                .iter()
                .any(|b| b["rule_id"] == other && micros(&b["sent_at"]) > acked_at + 2_500_000)
                .then_some(())
        },
    )
    .await;
    post_reading(&daemon, sensor, 30.0).await;
    let delivered = until("the resolution", || async {
        let delivered: Vec<Value> = receiver
            .delivered()
            .into_iter()
            .filter(|b| b["rule_id"] == rule)
            .collect();
        delivered
            .last()
            .is_some_and(|b| b["status"] == "resolved")
            .then_some(delivered)
    })
    .await;
    assert_eq!(delivered[0]["status"], "firing");
    assert_eq!(delivered[0]["repeat"], false);
    for body in &delivered[1..delivered.len() - 1] {
        assert_eq!(body["repeat"], true, "{body}");
        assert!(
            micros(&body["sent_at"]) <= acked_at,
            "repeated after the acknowledgement: {body}"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_gone_offline_does_not_fire_a_value_rule_with_its_stale_value() {
    let daemon = Daemon::with("").await;
    let source = |failure_rate: f64| {
        json!({"kind": "sim", "profile": "ds18b20", "base_temperature": 30.0, "seed": 3,
               "failure_rate": failure_rate})
    };
    let body = json!({"tipo": "temperatura", "modelo": "DS18B20", "nombre": "estufa",
                      "intervalo": 0.1, "fuente": source(0.0)});
    let (status, sensor) = daemon.post("/api/v1/sensores/", &body.to_string()).await;
    assert_eq!(status, 201, "{sensor}");
    let sensor = sensor["id"].as_i64().unwrap();
    let rule = create_rule(
        &daemon,
        json!({"name": "estufa hot", "sensor_id": sensor, "tipo": "temperatura",
               "condition": "above", "threshold": 20, "for_s": 3600}),
    )
    .await;
    until("the alert is pending on the sampled values", || async {
        (phase(&daemon, rule).await == "pending").then_some(())
    })
    .await;
    let mut socket = daemon
        .subscribe("/api/v1/ws?channel=general&event_type=sensor_offline")
        .await;
    // Every read fails from now on: the sensor goes offline.
    let failing = json!({"fuente": source(1.0)}).to_string();
    let path = format!("/api/v1/sensores/{sensor}");
    daemon.expect("PUT", &path, Some(&failing), 200).await;
    let offline = next_event(&mut socket).await;
    assert_eq!(offline["event_type"], "sensor_offline");
    // Dropped once the sensor is offline, rather than left to fire an hour later on a
    // value nobody confirmed.
    until("the pending alert drops back", || async {
        (phase(&daemon, rule).await == "inactive").then_some(())
    })
    .await;
    assert!(stored_events(daemon.dir()).is_empty());
    daemon.stop().await;
}
