//! Readings as entities: one reading read, changed and deleted over REST, with the same
//! events, roll-ups, latest values and replay as every other change.

mod common;

use std::time::Duration;

use common::{insert_reading_row, Daemon, Received};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(300);

async fn sensor(daemon: &Daemon, tipo: &str) -> i64 {
    let body = json!({"tipo": tipo, "modelo": "DHT22"}).to_string();
    let (status, sensor) = daemon.post("/api/v1/sensores/", &body).await;
    assert_eq!(status, 201, "{sensor}");
    sensor["id"].as_i64().unwrap()
}

async fn post_reading(daemon: &Daemon, body: Value) -> Value {
    let (status, reading) = daemon.post("/api/v1/lecturas/", &body.to_string()).await;
    assert_eq!(status, 201, "{reading}");
    reading
}

/// Nothing more arrives on the socket for a moment.
async fn assert_silent(client: &mut common::Client, why: &str) {
    match client.next_within(QUIET).await {
        None => {}
        Some(other) => panic!("{why}: got {other:?}"),
    }
}

#[tokio::test]
async fn a_reading_is_read_updated_and_deleted_with_events_like_a_sensor() {
    let daemon = Daemon::with("").await;
    let id = sensor(&daemon, "temperatura").await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let posted = post_reading(
        &daemon,
        json!({"sensor_id": id, "tipo": "temperatura", "valor": 21.4, "unidad": "°C",
               "timestamp": "2026-11-28T10:15:02.5Z"}),
    )
    .await;
    let created = client.json().await;
    assert_eq!(created["event_type"], "created");
    let first_seq = created["seq"].as_u64().unwrap();
    let rid = posted["id"].as_i64().unwrap();

    let got = daemon
        .expect("GET", &format!("/api/v1/lecturas/{rid}"), None, 200)
        .await;
    assert_eq!(got, posted);
    assert_eq!(
        daemon.get(&format!("/api/v1/readings/{rid}")).await.1,
        posted
    );

    // Fields given with their current value are not changes.
    let (status, updated) = daemon
        .put(
            &format!("/api/v1/lecturas/{rid}"),
            r#"{"unidad": "°C", "valor": 12.4, "timestamp": "2026-11-28T11:15:02.5+01:00"}"#,
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    let mut expected = posted.clone();
    expected["valor"] = json!(12.4);
    assert_eq!(updated, expected);
    let event = client.json().await;
    assert_eq!(event["type"], "entity_event");
    assert_eq!(event["entity_type"], "reading");
    assert_eq!(event["event_type"], "updated");
    assert_eq!(event["entity_id"], rid);
    let mut data = updated.clone();
    data["updated_fields"] = json!(["valor"]);
    assert_eq!(event["data"], data);
    assert_eq!(
        event["metadata"],
        json!({"action": "update_reading", "fields_updated": ["valor"]})
    );
    assert_eq!(event["seq"], first_seq + 1);

    // Several fields: listed in schema order, whatever the order of the body.
    let (status, moved) = daemon
        .put(
            &format!("/api/v1/readings/{rid}"),
            r#"{"timestamp": "2026-11-28T10:16:00Z", "unidad": "K", "tipo": "temperatura_aire"}"#,
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["timestamp"], "2026-11-28T10:16:00.000000Z");
    let event = client.json().await;
    assert_eq!(
        event["data"]["updated_fields"],
        json!(["tipo", "unidad", "timestamp"])
    );
    assert_eq!(
        event["metadata"]["fields_updated"],
        json!(["tipo", "unidad", "timestamp"])
    );

    // The same values again: answered, nothing emitted.
    let (status, same) = daemon
        .put(
            &format!("/api/v1/lecturas/{rid}"),
            r#"{"tipo": "temperatura_aire", "valor": 12.4}"#,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(same, moved);
    assert_silent(&mut client, "a PUT that changes nothing emits nothing").await;

    let (status, deleted) = daemon.delete(&format!("/api/v1/lecturas/{rid}")).await;
    assert_eq!(status, 200);
    assert_eq!(deleted, moved, "the reading as it was");
    let event = client.json().await;
    assert_eq!(event["event_type"], "deleted");
    assert_eq!(event["entity_type"], "reading");
    assert_eq!(event["entity_id"], rid);
    assert_eq!(event["data"], moved);
    assert_eq!(event["metadata"], json!({"action": "delete_reading"}));
    assert_eq!(event["seq"], first_seq + 3);
    let last_live = event;

    for path in [
        format!("/api/v1/lecturas/{rid}"),
        format!("/api/v1/readings/{rid}"),
    ] {
        let (status, answer) = daemon.get(&path).await;
        assert_eq!(status, 404, "{answer}");
        assert_eq!(answer["code"], "not_found");
        assert_eq!(answer["detail"], format!("Reading {rid} not found"));
        daemon
            .expect("PUT", &path, Some(r#"{"valor": 1}"#), 404)
            .await;
        daemon.expect("DELETE", &path, None, 404).await;
    }
    let (_, listed) = daemon
        .get(&format!("/api/v1/lecturas/?sensor_id={id}"))
        .await;
    assert_eq!(listed, json!([]));

    // A client resuming from before the post gets the same four frames, in order.
    let mut resumed = daemon
        .subscribe(&format!(
            "/api/v1/ws?channel=readings&since={}",
            first_seq - 1
        ))
        .await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(resumed.json().await);
    }
    assert_eq!(
        got.iter()
            .map(|e| e["event_type"].clone())
            .collect::<Vec<_>>(),
        ["created", "updated", "updated", "deleted"]
    );
    assert_eq!(got[0], created);
    assert_eq!(got[3], last_live);
    assert_silent(&mut resumed, "nothing after the deletion").await;
    daemon.stop().await;
}

#[tokio::test]
async fn bad_changes_of_a_reading_are_refused_and_change_nothing() {
    let daemon = Daemon::with("").await;
    let id = sensor(&daemon, "temperatura").await;
    let reading = post_reading(
        &daemon,
        json!({"sensor_id": id, "tipo": "temperatura", "valor": 20.0, "unidad": "°C"}),
    )
    .await;
    let rid = reading["id"].as_i64().unwrap();
    let path = format!("/api/v1/lecturas/{rid}");
    let seq = daemon.last_seq().await;

    let cases: [(&str, &[&str]); 9] = [
        (r#"{"valor": "hot"}"#, &["valor"]),
        (r#"{"valor": null}"#, &["valor"]),
        (r#"{"tipo": ""}"#, &["tipo"]),
        (r#"{"tipo": null}"#, &["tipo"]),
        (r#"{"unidad": "much too long a unit"}"#, &["unidad"]),
        (r#"{"timestamp": "yesterday"}"#, &["timestamp"]),
        (
            r#"{"sensor_id": 2, "colour": "red"}"#,
            &["colour", "sensor_id"],
        ),
        (r#"{"hora_dudosa": false, "id": 3}"#, &["hora_dudosa", "id"]),
        (r#"[1]"#, &["body"]),
    ];
    for (body, fields) in cases {
        let (status, answer) = daemon.put(&path, body).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["code"], "invalid", "{body}: {answer}");
        let mut named: Vec<&str> = answer["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        named.sort_unstable();
        assert_eq!(named, fields, "{body}: {answer}");
    }
    daemon.expect("PUT", &path, Some("{not json"), 400).await;
    for bad_id in ["0", "-1", "abc"] {
        let (status, answer) = daemon
            .put(&format!("/api/v1/lecturas/{bad_id}"), "{}")
            .await;
        assert_eq!(status, 422, "{bad_id}: {answer}");
        assert_eq!(answer["errors"][0]["field"], "id");
        daemon
            .expect("DELETE", &format!("/api/v1/lecturas/{bad_id}"), None, 422)
            .await;
    }
    assert_eq!(
        daemon
            .request("PATCH", &path, Some(r#"{"valor": 1}"#))
            .await
            .0,
        405
    );
    // The other routes under the collection are not reading ids.
    daemon
        .expect("DELETE", "/api/v1/lecturas/export", None, 405)
        .await;
    daemon
        .expect("PUT", "/api/v1/readings/aggregated", Some("{}"), 405)
        .await;

    // Changing and deleting need a write token, as posting does; reading one does not.
    let (status, made) = daemon
        .post("/api/v1/tokens", r#"{"name": "tablet", "scope": "read"}"#)
        .await;
    assert_eq!(status, 201, "{made}");
    let read_only = made["token"].as_str().unwrap();
    for (method, token, expected) in [
        ("GET", None, 200),
        ("PUT", None, 401),
        ("DELETE", None, 401),
        ("PUT", Some(read_only), 403),
        ("DELETE", Some(read_only), 403),
    ] {
        let (status, _) = daemon
            .as_token(token)
            .request(method, &path, Some(r#"{"valor": 1}"#))
            .await;
        assert_eq!(status, expected, "{method} with {token:?}");
    }

    assert_eq!(
        daemon.get(&path).await.1,
        reading,
        "the reading is unchanged"
    );
    assert_eq!(daemon.last_seq().await, seq, "no event was emitted");
    daemon.stop().await;
}

/// The roll-up buckets of a sensor, without what names the sensor.
async fn buckets(daemon: &Daemon, sensor_id: i64, bucket: &str) -> Value {
    let (status, rows) = daemon
        .get(&format!(
            "/api/v1/lecturas/agregadas?sensor_id={sensor_id}&bucket={bucket}\
             &desde=2026-11-27T00:00:00Z&hasta=2026-11-30T00:00:00Z"
        ))
        .await;
    assert_eq!(status, 200, "{rows}");
    rows
}

/// `sensorgate_last_value` of a sensor and `tipo`, if `/metrics` has one.
async fn last_value(daemon: &Daemon, sensor_id: i64, tipo: &str) -> Option<f64> {
    daemon
        .metric(&format!(
            "sensorgate_last_value{{sensor_id=\"{sensor_id}\",tipo=\"{tipo}\"}}"
        ))
        .await
}

/// The latest readings a snapshot gives for `sensor_id`, by `tipo`.
async fn snapshot_latest(daemon: &Daemon, sensor_id: i64) -> Vec<(String, f64)> {
    let mut client = daemon
        .subscribe("/api/v1/ws?channel=readings&snapshot=true")
        .await;
    let snapshot = loop {
        match client.next().await {
            Received::Json(m) if m["type"] == "snapshot" => break m,
            Received::Json(_) => continue,
            other => panic!("{other:?}"),
        }
    };
    snapshot["readings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["sensor_id"] == sensor_id)
        .map(|r| {
            (
                r["tipo"].as_str().unwrap().to_owned(),
                r["valor"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn roll_ups_and_latest_values_follow_changes_as_if_stored_that_way() {
    let daemon = Daemon::with("").await;
    let edited = sensor(&daemon, "temperatura").await;
    let direct = sensor(&daemon, "temperatura").await;
    let at = |t: &str| format!("2026-11-28T{t}Z");
    // (time, valor, tipo) as first posted to `edited`.
    let first: [(&str, f64, &str); 6] = [
        ("10:15:01", 10.0, "temperatura"),
        ("10:15:02", 20.0, "temperatura"),
        ("10:15:03", 30.0, "temperatura"),
        ("10:16:00", 5.0, "temperatura"),
        ("11:00:00", 50.0, "temperatura"),
        ("10:15:04", 60.0, "humedad"),
    ];
    let mut ids = Vec::new();
    for (t, valor, tipo) in first {
        let r = post_reading(
            &daemon,
            json!({"sensor_id": edited, "tipo": tipo, "valor": valor, "unidad": "u",
                   "timestamp": at(t)}),
        )
        .await;
        ids.push(r["id"].as_i64().unwrap());
    }
    assert_eq!(last_value(&daemon, edited, "temperatura").await, Some(50.0));
    let minute = buckets(&daemon, edited, "minute").await;
    assert_eq!(minute[1]["count"], 3, "{minute}");
    assert_eq!(minute[1]["max"], 30.0, "{minute}");

    let put = |i: usize, body: Value| {
        let path = format!("/api/v1/lecturas/{}", ids[i]);
        let daemon = &daemon;
        async move {
            let (status, answer) = daemon.put(&path, &body.to_string()).await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    // The maximum of a bucket lowered; the minimum of another deleted; a reading moved
    // to another hour; the newest reading deleted; a reading moved to another tipo.
    put(2, json!({"valor": 15.0})).await;
    daemon
        .expect("DELETE", &format!("/api/v1/lecturas/{}", ids[3]), None, 200)
        .await;
    put(0, json!({"timestamp": at("12:30:00")})).await;
    daemon
        .expect("DELETE", &format!("/api/v1/lecturas/{}", ids[4]), None, 200)
        .await;
    put(5, json!({"tipo": "temperatura", "valor": 25.0})).await;

    // What the edited sensor holds now, posted as it is to the other sensor.
    let now: [(&str, f64); 4] = [
        ("10:15:02", 20.0),
        ("10:15:03", 15.0),
        ("10:15:04", 25.0),
        ("12:30:00", 10.0),
    ];
    for (t, valor) in now {
        post_reading(
            &daemon,
            json!({"sensor_id": direct, "tipo": "temperatura", "valor": valor, "unidad": "u",
                   "timestamp": at(t)}),
        )
        .await;
    }
    for bucket in ["minute", "hour", "day"] {
        let got = buckets(&daemon, edited, bucket).await;
        let want = buckets(&daemon, direct, bucket).await;
        assert_eq!(got, want, "{bucket} buckets");
        assert!(!got.as_array().unwrap().is_empty());
    }
    let minute = buckets(&daemon, edited, "minute").await;
    assert_eq!(
        minute,
        json!([
            {"tipo": "temperatura", "inicio": "2026-11-28T10:15:00.000000Z",
             "min": 15.0, "max": 25.0, "avg": 20.0, "count": 3},
            {"tipo": "temperatura", "inicio": "2026-11-28T12:30:00.000000Z",
             "min": 10.0, "max": 10.0, "avg": 10.0, "count": 1},
        ])
    );

    // Latest values: the newest remaining reading of each tipo; none of a tipo left.
    assert_eq!(last_value(&daemon, edited, "temperatura").await, Some(10.0));
    assert_eq!(last_value(&daemon, edited, "humedad").await, None);
    assert_eq!(
        snapshot_latest(&daemon, edited).await,
        [("temperatura".to_owned(), 10.0)]
    );
    daemon
        .expect("DELETE", &format!("/api/v1/lecturas/{}", ids[0]), None, 200)
        .await;
    assert_eq!(last_value(&daemon, edited, "temperatura").await, Some(25.0));
    assert_eq!(
        snapshot_latest(&daemon, edited).await,
        [("temperatura".to_owned(), 25.0)]
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_deleted_latest_value_falls_back_past_a_reading_from_the_far_future() {
    let config = "[sampling]\ntrust_clock = \"always\"\n";
    let daemon = Daemon::with(config).await;
    let id = sensor(&daemon, "temperatura").await;
    let at = |ago_s: i64| {
        sensorgate::model::format_time(sensorgate::model::now_micros() - ago_s * 1_000_000)
    };
    let mut ids = Vec::new();
    for (valor, ago_s) in [(20.0, 10), (21.0, 0)] {
        let r = post_reading(
            &daemon,
            json!({"sensor_id": id, "tipo": "temperatura", "valor": valor, "timestamp": at(ago_s)}),
        )
        .await;
        ids.push(r["id"].as_i64().unwrap());
    }
    let dir = daemon.stop().await.unwrap();
    // A reading of year 9999, from before the bound on sample times existed.
    let conn = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    let far = insert_reading_row(&conn, id, 253402300799000000, "temperatura", 99.0, "");
    drop(conn);

    let daemon = Daemon::in_dir(dir, config).await;
    assert_eq!(last_value(&daemon, id, "temperatura").await, Some(21.0));
    for (deleted, latest, why) in [
        (
            ids[1],
            20.0,
            "the reading of year 9999 does not become the latest",
        ),
        (ids[0], 99.0, "with nothing else left, it is"),
    ] {
        let path = format!("/api/v1/lecturas/{deleted}");
        daemon.expect("DELETE", &path, None, 200).await;
        let now = last_value(&daemon, id, "temperatura").await;
        assert_eq!(now, Some(latest), "{why}");
    }
    // Correcting its time brings it back among the others.
    let corrected = json!({"timestamp": at(5)}).to_string();
    let path = format!("/api/v1/lecturas/{far}");
    daemon.expect("PUT", &path, Some(&corrected), 200).await;
    let far_future = r#"{"timestamp": "9999-12-31T23:59:59Z"}"#;
    let answer = daemon.expect("PUT", &path, Some(far_future), 422).await;
    assert_eq!(answer["errors"][0]["field"], "timestamp");
    daemon.stop().await;
}

#[tokio::test]
async fn the_id_of_a_deleted_reading_is_never_handed_out_again() {
    let daemon = Daemon::with("").await;
    let id = sensor(&daemon, "temperatura").await;
    let post = |valor: f64| {
        let daemon = &daemon;
        async move {
            post_reading(
                daemon,
                json!({"sensor_id": id, "tipo": "temperatura", "valor": valor}),
            )
            .await["id"]
                .as_i64()
                .unwrap()
        }
    };
    post(1.0).await;
    let newest = post(2.0).await;
    daemon
        .expect("DELETE", &format!("/api/v1/lecturas/{newest}"), None, 200)
        .await;
    let next = post(3.0).await;
    assert!(next > newest, "{next} after {newest} was deleted");
    daemon
        .expect("GET", &format!("/api/v1/lecturas/{newest}"), None, 404)
        .await;

    // Across a restart too.
    daemon
        .expect("DELETE", &format!("/api/v1/lecturas/{next}"), None, 200)
        .await;
    let daemon = daemon.restart_with("").await;
    let (_, after) = daemon
        .post(
            "/api/v1/lecturas/",
            &json!({"sensor_id": id, "tipo": "temperatura", "valor": 4.0}).to_string(),
        )
        .await;
    let after = after["id"].as_i64().unwrap();
    assert!(
        after > next,
        "{after} after {next} was deleted before the restart"
    );
    daemon.stop().await;
}
