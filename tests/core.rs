//! End-to-end tests of the core daemon: REST, storage, live events, bad input, restart.

mod common;

use std::time::Duration;

use common::{sensor_table, Daemon, Received, SENSOR};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(300);

fn assert_time(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    assert!(
        text.ends_with('Z') && text.len() == 27,
        "not RFC 3339 micros UTC: {text}"
    );
    chrono::DateTime::parse_from_rfc3339(text).unwrap();
}

/// A sensor as `GET` shows it, less the live `salud` that records and events do not carry.
fn without_health(sensor: &Value) -> Value {
    let mut record = sensor.clone();
    record.as_object_mut().unwrap().remove("salud");
    record
}

#[tokio::test]
async fn sensor_lifecycle_emits_created_updated_deleted() {
    let daemon = Daemon::with("").await;
    let mut client = daemon.websocket("/api/v1/ws?channel=sensors").await;

    let connection = client.json().await;
    assert_eq!(connection["type"], "connection");
    assert_eq!(connection["status"], "connected");
    assert_eq!(connection["channel"], "sensors");
    assert!(connection["client_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert_time(&connection["timestamp"]);
    let stats = client.json().await;
    assert_eq!(stats["type"], "stats");
    assert_eq!(stats["data"]["total_connections"], 1);
    assert_eq!(stats["data"]["channels"]["sensors"]["connections"], 1);
    assert_time(&stats["timestamp"]);

    let (status, created) = daemon.post("/api/v1/sensores/", SENSOR).await;
    assert_eq!(status, 201);
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["tipo"], "temperatura");
    assert_eq!(created["modelo"], "DHT22");
    assert_eq!(created["activo"], true);
    assert_time(&created["created_at"]);
    assert_eq!(created["created_at"], created["updated_at"]);

    let event = client.json().await;
    assert_eq!(event["type"], "entity_event");
    assert_eq!(event["entity_type"], "sensor");
    assert_eq!(event["event_type"], "created");
    assert_eq!(event["entity_id"], id);
    assert_eq!(event["data"], created);
    assert_eq!(event["metadata"], json!({"action": "create_sensor"}));
    assert_time(&event["timestamp"]);
    let first_seq = event["seq"].as_u64().unwrap();

    let (status, updated) = daemon
        .put(
            &format!("/api/v1/sensores/{id}"),
            r#"{"modelo": "DHT11", "tipo": "temperatura", "ubicacion": "Nave 2"}"#,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(updated["modelo"], "DHT11");
    assert_eq!(updated["ubicacion"], "Nave 2");
    let event = client.json().await;
    assert_eq!(event["event_type"], "updated");
    assert_eq!(event["entity_id"], id);
    assert_eq!(event["data"]["modelo"], "DHT11");
    assert_eq!(
        event["data"]["updated_fields"],
        json!(["modelo", "ubicacion"])
    );
    assert_eq!(event["metadata"]["action"], "update_sensor");
    assert_eq!(
        event["metadata"]["fields_updated"],
        json!(["modelo", "ubicacion"])
    );
    assert_eq!(event["seq"], first_seq + 1);

    // Writing the values it already has is not a change: no event, no new updated_at.
    let (status, same) = daemon
        .put(&format!("/api/v1/sensores/{id}"), r#"{"modelo": "DHT11"}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(same["updated_at"], updated["updated_at"]);

    let (status, deleted) = daemon.delete(&format!("/api/v1/sensores/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(deleted, updated);
    let event = client.json().await;
    assert_eq!(
        event["event_type"], "deleted",
        "the no-op PUT must not have emitted"
    );
    assert_eq!(event["data"], updated);
    assert_eq!(event["metadata"]["action"], "delete_sensor");
    assert_eq!(event["seq"], first_seq + 2);

    daemon
        .expect("GET", &format!("/api/v1/sensores/{id}"), None, 404)
        .await;
    daemon.stop().await;
}

#[tokio::test]
async fn simulated_samples_are_stored_and_pushed() {
    let sim = r#"{ kind = "sim", seed = 5 }"#;
    let daemon = Daemon::with(&sensor_table("sim", "temperatura", "DHT22", 0.05, sim)).await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let event = client.json().await;
        assert_eq!(event["type"], "entity_event");
        assert_eq!(event["entity_type"], "reading");
        assert_eq!(event["event_type"], "created");
        assert_eq!(event["metadata"]["action"], "create_reading");
        assert_eq!(event["entity_id"], event["data"]["id"]);
        assert_time(&event["data"]["timestamp"]);
        seen.push(event["data"].clone());
    }
    let tipos: Vec<&str> = seen.iter().map(|r| r["tipo"].as_str().unwrap()).collect();
    assert!(
        tipos.contains(&"temperatura") && tipos.contains(&"humedad"),
        "{tipos:?}"
    );

    let stored = daemon
        .expect("GET", "/api/v1/lecturas/?order=asc&limit=10000", None, 200)
        .await;
    let stored = stored.as_array().unwrap();
    for reading in &seen {
        assert!(
            stored.contains(reading),
            "pushed reading {reading} is not stored"
        );
    }
    let (_, sensors) = daemon.get("/api/v1/sensores/").await;
    assert_eq!(sensors[0]["nombre"], "sim");
    assert_eq!(sensors[0]["fuente"]["kind"], "sim");
    daemon.stop().await;
}

/// A source that buffers between reads hands over several samples at once: each is
/// stored at the time it was taken, spread evenly over the interval, and pushed in order.
#[tokio::test]
async fn a_batched_read_stores_each_sample_at_its_own_time() {
    let buffering = r#"{ kind = "sim", profile = "ds18b20", samples_per_read = 5, seed = 2 }"#;
    let config = sensor_table("buffered", "temperatura", "DS18B20", 0.5, buffering);
    let daemon = Daemon::with(&config).await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let mut times = Vec::new();
    let mut seqs = Vec::new();
    while times.len() < 15 {
        let event = client.json().await;
        assert_time(&event["data"]["timestamp"]);
        let text = event["data"]["timestamp"].as_str().unwrap();
        let time = chrono::DateTime::parse_from_rfc3339(text).unwrap();
        times.push(time.timestamp_micros());
        seqs.push(event["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let steps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(steps.iter().all(|&step| step > 0), "{steps:?}");
    // Each read spreads its five samples over the time since the read before, about
    // the 0.5 s interval: samples about a fifth of it apart, not all at one moment.
    let mut sorted = steps.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    assert!((80_000..=150_000).contains(&median), "{steps:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn posted_readings_are_stored_pushed_and_filtered() {
    let daemon = Daemon::with("").await;
    let a = daemon.create_sensor(SENSOR).await;
    let (_, b) = daemon
        .post(
            "/api/v1/sensors/",
            r#"{"tipo": "humedad", "modelo": "SHT31"}"#,
        )
        .await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=readings").await;

    let body = format!(
        r#"{{"sensor_id": {}, "tipo": "temperatura", "valor": 21.4, "unidad": "°C", "timestamp": "2026-01-02T03:04:05.5+01:00"}}"#,
        a["id"]
    );
    let (status, reading) = daemon.post("/api/v1/lecturas/", &body).await;
    assert_eq!(status, 201);
    assert_eq!(reading["valor"], 21.4);
    assert_eq!(reading["unidad"], "°C");
    assert_eq!(reading["timestamp"], "2026-01-02T02:04:05.500000Z");
    let event = client.json().await;
    assert_eq!(event["data"], reading);

    let body = format!(
        r#"{{"sensor_id": {}, "tipo": "humedad", "valor": 40, "unidad": "%"}}"#,
        b["id"]
    );
    daemon
        .expect("POST", "/api/v1/readings/", Some(&body), 201)
        .await;

    let (_, only_a) = daemon
        .get(&format!("/api/v1/lecturas/?sensor_id={}", a["id"]))
        .await;
    assert_eq!(only_a.as_array().unwrap().len(), 1);
    assert_eq!(only_a[0], reading);
    let (_, humedad) = daemon.get("/api/v1/lecturas/?tipo=humedad").await;
    assert_eq!(humedad.as_array().unwrap().len(), 1);
    let (_, in_range) = daemon
        .get("/api/v1/lecturas/?desde=2026-01-01T00:00:00Z&hasta=2026-01-03T00:00:00Z")
        .await;
    assert_eq!(in_range.as_array().unwrap().len(), 1);
    let (_, newest_first) = daemon.get("/api/v1/lecturas/?limit=1").await;
    assert_eq!(newest_first[0]["tipo"], "humedad");
    daemon.stop().await;
}

#[tokio::test]
async fn bad_input_is_rejected_and_changes_nothing() {
    let daemon = Daemon::with("[server]\nmax_body_bytes = 2048\n").await;
    let id = daemon.create_sensor(SENSOR).await["id"].as_i64().unwrap();
    let mut sensors_client = daemon.subscribe("/api/v1/ws?channel=sensors").await;
    let mut readings_client = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let seq_before = daemon.last_seq().await;
    let (_, sensors_before) = daemon.get("/api/v1/sensores/").await;

    let huge = format!(
        r#"{{"tipo": "temperatura", "modelo": "{}"}}"#,
        "x".repeat(4096)
    );
    let bad_valor = format!(r#"{{"sensor_id": {id}, "tipo": "t", "valor": "hot"}}"#);
    let no_valor = format!(r#"{{"sensor_id": {id}, "tipo": "t"}}"#);
    // Year 10000 in UTC: the wire format could not show it back.
    let past_9999 = format!(
        r#"{{"sensor_id": {id}, "tipo": "t", "valor": 1, "timestamp": "9999-12-31T23:59:59-23:59"}}"#
    );
    let cases: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "POST",
            "/api/v1/sensores/".into(),
            r#"{"tipo": "#,
            400,
            "malformed",
        ),
        ("POST", "/api/v1/sensores/".into(), "[1, 2]", 422, "invalid"),
        (
            "POST",
            "/api/v1/sensores/".into(),
            r#"{"modelo": "DHT22"}"#,
            422,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/sensores/".into(),
            r#"{"tipo": 7, "modelo": "DHT22"}"#,
            422,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/sensores/".into(),
            r#"{"tipo": "t", "modelo": "m", "colour": 1}"#,
            422,
            "invalid",
        ),
        ("POST", "/api/v1/sensores/".into(), &huge, 413, "too_large"),
        (
            "PUT",
            format!("/api/v1/sensores/{id}"),
            r#"{"activo": "yes"}"#,
            422,
            "invalid",
        ),
        (
            "PUT",
            format!("/api/v1/sensores/{id}"),
            r#"{"tipo": null}"#,
            422,
            "invalid",
        ),
        (
            "PUT",
            "/api/v1/sensores/99999".into(),
            r#"{"modelo": "X"}"#,
            404,
            "not_found",
        ),
        (
            "PUT",
            "/api/v1/sensores/abc".into(),
            r#"{"modelo": "X"}"#,
            422,
            "invalid",
        ),
        (
            "DELETE",
            "/api/v1/sensores/99999".into(),
            "",
            404,
            "not_found",
        ),
        ("GET", "/api/v1/sensores/99999".into(), "", 404, "not_found"),
        (
            "POST",
            "/api/v1/lecturas/".into(),
            r#"{"sensor_id": 99999, "tipo": "t", "valor": 1}"#,
            404,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/lecturas/".into(),
            &bad_valor,
            422,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/lecturas/".into(),
            &no_valor,
            422,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/lecturas/".into(),
            &past_9999,
            422,
            "invalid",
        ),
        (
            "GET",
            "/api/v1/lecturas/?limit=lots".into(),
            "",
            422,
            "invalid",
        ),
        (
            "GET",
            "/api/v1/sensores/?activo=maybe".into(),
            "",
            422,
            "invalid",
        ),
        (
            "PATCH",
            "/api/v1/sensores/".into(),
            "",
            405,
            "method_not_allowed",
        ),
        (
            "DELETE",
            "/assets/app.js".into(),
            "",
            405,
            "method_not_allowed",
        ),
        ("GET", "/api/v1/nothing-here".into(), "", 404, "not_found"),
        ("GET", "/api/v1/test-sensors/".into(), "", 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let body = (!body.is_empty()).then_some(body);
        let (got, answer) = daemon.request(method, &path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(answer["code"], code, "{method} {path}: {answer}");
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{answer}"
        );
        if status == 422 {
            assert!(answer["errors"][0]["field"].is_string(), "{answer}");
        }
    }
    // A 405 names the methods the path does answer.
    for (method, path, allow) in [
        ("PATCH", "/api/v1/sensores/", "GET, HEAD, POST"),
        ("POST", "/api/v1/sensors/3", "GET, HEAD, PUT, DELETE"),
        ("DELETE", "/assets/app.js", "GET, HEAD"),
        ("PUT", "/api/v1/lecturas/", "GET, HEAD, POST"),
        ("GET", "/api/v1/ws/test-event", "POST"),
        ("POST", "/api/v1/tokens/kitchen", "DELETE"),
    ] {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        let raw = common::raw_exchange(daemon.addr, request.into_bytes())
            .await
            .unwrap();
        let head = String::from_utf8_lossy(&raw).to_lowercase();
        assert!(head.starts_with("http/1.1 405"), "{method} {path}: {head}");
        assert!(
            head.contains(&format!("\r\nallow: {}\r\n", allow.to_lowercase())),
            "{method} {path}: {head}"
        );
    }
    // The 422 names the field.
    let (_, answer) = daemon
        .post("/api/v1/sensores/", r#"{"modelo": "DHT22"}"#)
        .await;
    assert_eq!(
        answer["errors"],
        json!([{"field": "tipo", "message": "field required"}])
    );

    assert_eq!(
        daemon.last_seq().await,
        seq_before,
        "an error emitted an event"
    );
    assert_eq!(daemon.get("/api/v1/sensores/").await.1, sensors_before);
    assert_eq!(daemon.get("/api/v1/lecturas/").await.1, json!([]));
    sensors_client
        .assert_quiet(&daemon, "sensors", "a refused request emitted")
        .await;
    readings_client
        .assert_quiet(&daemon, "readings", "a refused request emitted")
        .await;
    daemon.stop().await;
}

#[tokio::test]
async fn unknown_channel_is_refused_with_json() {
    let daemon = Daemon::with("").await;
    let request = format!(
        "GET /api/v1/ws?channel=weather HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        daemon.addr
    );
    let raw = common::raw_exchange_first(daemon.addr, request.into_bytes()).await;
    let (status, body) = common::split_response(&raw);
    assert_eq!(status, 400);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "unknown_channel");
    assert!(body["detail"].as_str().unwrap().contains("weather"));
    daemon.stop().await;
}

#[tokio::test]
async fn channels_are_isolated() {
    let daemon = Daemon::with("").await;
    let mut general = daemon.subscribe("/api/v1/ws?channel=general").await;
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let mut sensors = daemon.subscribe("/api/v1/ws?channel=sensors").await;

    daemon.post("/api/v1/sensores/", SENSOR).await;
    let (status, sent) = daemon
        .post(
            "/api/v1/ws/test-event",
            r#"{"channel": "general", "data": {"hello": 1}}"#,
        )
        .await;
    assert_eq!(status, 200);

    assert_eq!(sensors.json().await["event_type"], "created");
    let test = general.json().await;
    assert_eq!(test["type"], "test_event");
    assert_eq!(test["data"], json!({"hello": 1}));
    assert_eq!(test["seq"], sent["seq"]);
    // Neither client saw the other's event, and the readings client saw nothing at all.
    assert_eq!(sensors.next_within(QUIET).await, None);
    assert_eq!(general.next_within(QUIET).await, None);
    assert_eq!(readings.next_within(QUIET).await, None);

    let (_, stats) = daemon.get("/api/v1/ws/stats").await;
    assert_eq!(stats["total_connections"], 3);
    assert_eq!(stats["channels"]["sensors"]["messages_sent"], 1);
    assert_eq!(stats["channels"]["general"]["events_emitted"], 1);
    let one = daemon
        .expect("GET", "/api/v1/ws/stats/readings", None, 200)
        .await;
    assert_eq!(one["channel"], "readings");
    assert_eq!(one["connections"], 1);
    let unknown_channel = "/api/v1/ws/stats/weather";
    daemon.expect("GET", unknown_channel, None, 404).await;
    daemon.stop().await;
}

#[tokio::test]
async fn restart_keeps_data_and_continues_seq() {
    let daemon = Daemon::with("").await;
    let first = daemon.create_sensor(SENSOR).await;
    let sensor = first["id"].as_i64().unwrap();
    daemon.reading(sensor, "temperatura", 20.5).await;
    let seq = daemon.last_seq().await;
    let daemon = daemon.restart_with("").await;
    assert_eq!(daemon.last_seq().await, seq);
    let mut client = daemon.subscribe("/api/v1/ws?channel=sensors").await;
    let second = daemon
        .create_sensor(r#"{"tipo": "humedad", "modelo": "DHT22"}"#)
        .await;
    assert!(second["id"].as_i64() > first["id"].as_i64());
    assert_eq!(client.json().await["seq"], seq + 1);
    let (_, sensors) = daemon.get("/api/v1/sensores/").await;
    assert_eq!(without_health(&sensors[0]), first);
    assert_eq!(daemon.get("/api/v1/lecturas/").await.1[0]["valor"], 20.5);
    daemon.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let daemon = Daemon::with("").await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=general").await;
    daemon.stop().await;
    match client.next().await {
        Received::Closed(code, _) => assert_eq!(code, Some(1001)),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn development_routes_exist_only_in_dev_mode() {
    let daemon = Daemon::with("[server]\ndev = true\n").await;
    let (status, created) = daemon.post("/api/v1/test-sensors/", SENSOR).await;
    assert_eq!(status, 201);
    let (status, same) = daemon
        .get(&format!("/api/v1/test-sensors/{}", created["id"]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        same["salud"],
        Value::Null,
        "a sensor without a source has no health"
    );
    assert_eq!(without_health(&same), created);
    daemon.stop().await;
}

#[tokio::test]
async fn client_messages_are_answered() {
    let daemon = Daemon::with("").await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=general").await;
    client.send_text(r#"{"type": "ping", "id": 7}"#).await;
    let pong = client.json().await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], 7);
    client.send_text("not json").await;
    assert_eq!(client.json().await["code"], "malformed");
    client.send_text(r#"{"type": "dance", "id": "a"}"#).await;
    let answer = client.json().await;
    assert_eq!(answer["code"], "unknown_action");
    assert_eq!(answer["id"], "a");
    daemon.stop().await;
}

#[tokio::test]
async fn health_reports_storage() {
    let daemon = Daemon::with("").await;
    let health = daemon.expect("GET", "/healthz", None, 200).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["storage"]["ok"], true);
    assert_eq!(
        health["storage"]["schema_version"],
        sensorgate::store::SCHEMA_VERSION
    );
    assert!(daemon.dir().join("sensorgate.db").exists());
    daemon.stop().await;
}

/// The dashboard and every file it loads come from the binary, with their content
/// types; nothing else is served under `/assets/`.
#[tokio::test]
async fn dashboard_files_are_served_from_the_binary() {
    let daemon = Daemon::with("").await;
    let get = |path: &str| {
        let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        common::raw_exchange(daemon.addr, head.into_bytes())
    };
    let page = String::from_utf8(get("/").await.unwrap()).unwrap();
    assert!(page.contains("/assets/app.js") && page.contains("/assets/app.css"));
    for (name, content_type) in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("uPlot.iife.min.js", "text/javascript"),
        ("uPlot.min.css", "text/css"),
        ("uPlot.LICENSE", "text/plain"),
    ] {
        let raw = String::from_utf8(get(&format!("/assets/{name}")).await.unwrap()).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{name}: {head}");
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "{name}: {head}"
        );
        assert!(head.contains("cache-control: no-cache"), "{name}: {head}");
        assert!(!body.is_empty(), "{name}");
    }
    for path in [
        "/assets/index.html",
        "/assets/vendor/uPlot.min.css",
        "/assets/../Cargo.toml",
        "/assets/",
    ] {
        let (status, body) = daemon.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["code"], "not_found", "{path}");
    }
    daemon.stop().await;
}

/// Every operation in the OpenAPI document exists, and answers with a status the
/// document lists for it.
#[tokio::test]
async fn openapi_document_matches_the_server() {
    let daemon = Daemon::with("[server]\ndev = true\n").await;
    let doc = daemon
        .expect("GET", "/api/v1/openapi.json", None, 200)
        .await;
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12);
    let mut checked = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let sensor = daemon.create_sensor(SENSOR).await;
            let concrete = path
                .replace("{id}", &sensor["id"].to_string())
                .replace("{channel}", "general");
            let body = match method.as_str() {
                "post" | "put" => Some("{}"),
                _ => None,
            };
            let status = if operation["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some()
            {
                // A stream never ends: read what arrives first.
                let head = format!("GET {concrete} HTTP/1.1\r\nHost: localhost\r\n\r\n");
                let raw = common::raw_exchange_first(daemon.addr, head.into_bytes()).await;
                common::split_response(&raw).0
            } else {
                daemon
                    .request(&method.to_uppercase(), &concrete, body)
                    .await
                    .0
            };
            let listed = operation["responses"].as_object().unwrap();
            assert!(
                listed.contains_key(&status.to_string()),
                "{method} {path} answered {status}, which the document does not list"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_reading_without_unidad_gets_the_known_unit_of_its_tipo() {
    let daemon = Daemon::with("").await;
    let sensor = daemon
        .create_sensor(r#"{"tipo": "temperatura", "modelo": "BME280"}"#)
        .await;
    let id = &sensor["id"];
    for (tipo, unidad, extra) in [
        ("temperatura", "°C", ""),
        ("humedad", "%", r#", "unidad": null"#),
        ("presion", "hPa", ""),
        ("co2", "", ""),
        ("temperatura", "K", r#", "unidad": "K""#),
    ] {
        let body = format!(r#"{{"sensor_id": {id}, "tipo": "{tipo}", "valor": 1{extra}}}"#);
        let (status, reading) = daemon.post("/api/v1/lecturas/", &body).await;
        assert_eq!(status, 201, "{reading}");
        assert_eq!(reading["unidad"], unidad, "{body}");
        let (_, stored) = daemon
            .get(&format!("/api/v1/lecturas/?sensor_id={id}&limit=1"))
            .await;
        assert_eq!(stored[0]["unidad"], unidad, "{body}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn metrics_follow_the_prometheus_naming_rules() {
    let daemon = Daemon::with("").await;
    let sensor = daemon.sensor("temperatura").await;
    daemon.reading(sensor, "temperatura", 20.0).await;
    let text = daemon.metrics().await;
    daemon.stop().await;

    // The rules `promtool check metrics` applies to names and types.
    let mut families = 0;
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        families += 1;
        let (name, kind) = line.split_once(' ').unwrap();
        match kind {
            "counter" => assert!(name.ends_with("_total"), "counter {name} lacks _total"),
            "summary" | "histogram" => {
                for part in ["_sum", "_count"] {
                    assert!(
                        text.lines()
                            .any(|l| l.starts_with(&format!("{name}{part}"))),
                        "{kind} {name} has no {part}"
                    );
                }
            }
            _ => {}
        }
        if kind != "summary" && kind != "histogram" {
            for suffix in ["_count", "_sum", "_bucket"] {
                assert!(
                    !name.ends_with(suffix),
                    "{kind} {name} is named like a summary"
                );
            }
        }
    }
    assert!(families > 10, "{text}");

    // And promtool itself, where it is installed (.ci/promtool installs it).
    let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool is not installed; checked the naming rules only");
        return;
    };
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics: {complaints}"
    );
}

#[tokio::test]
async fn dashboard_files_are_compressed_and_revalidated() {
    let daemon = Daemon::with("").await;
    let addr = daemon.addr;
    let get = async |path: &str, extra: &str| {
        let head =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n");
        let raw = common::raw_exchange(addr, head.into_bytes()).await.unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_owned)
        };
        let status: u16 = head[9..12].parse().unwrap();
        (
            status,
            header("content-encoding"),
            header("etag"),
            header("vary"),
            header("cache-control"),
            raw[split + 4..].to_vec(),
        )
    };
    let (mut plain_total, mut gzip_total) = (0, 0);
    for path in [
        "/",
        "/assets/app.js",
        "/assets/app.css",
        "/assets/uPlot.iife.min.js",
        "/assets/uPlot.min.css",
        "/sensorgate.js",
    ] {
        let (status, encoding, etag, _, cache, plain) = get(path, "").await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(encoding, None, "{path}: not asked for gzip");
        assert_eq!(cache.as_deref(), Some("no-cache"), "{path}");
        let etag = etag.unwrap_or_else(|| panic!("{path}: no ETag"));

        let (status, encoding, gzip_etag, vary, _, gzip) =
            get(path, "Accept-Encoding: br;q=1.0, gzip;q=0.8\r\n").await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(encoding.as_deref(), Some("gzip"), "{path}");
        assert_eq!(vary.as_deref(), Some("accept-encoding"), "{path}");
        let gzip_etag = gzip_etag.unwrap();
        assert_ne!(gzip_etag, etag, "{path}: one tag per form");
        let mut unpacked = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzip[..]), &mut unpacked)
            .unwrap();
        assert_eq!(unpacked, plain, "{path}");
        plain_total += plain.len();
        gzip_total += gzip.len();

        // Refused gzip, current copies.
        let (_, encoding, ..) = get(path, "Accept-Encoding: gzip;q=0\r\n").await;
        assert_eq!(encoding, None, "{path}");
        for (tag, extra) in [(&etag, ""), (&gzip_etag, "Accept-Encoding: gzip\r\n")] {
            let (status, _, answered, _, _, body) =
                get(path, &format!("{extra}If-None-Match: {tag}\r\n")).await;
            assert_eq!(status, 304, "{path} {tag}");
            assert_eq!(answered.as_ref(), Some(tag), "{path}");
            assert!(body.is_empty(), "{path}");
        }
        let (status, ..) = get(path, "If-None-Match: \"something-else\"\r\n").await;
        assert_eq!(status, 200, "{path}");
    }
    assert!(
        gzip_total * 2 < plain_total,
        "{gzip_total} bytes compressed of {plain_total}"
    );
    daemon.stop().await;
}
