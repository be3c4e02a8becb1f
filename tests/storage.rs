//! Storage end to end: roll-ups and retention on data spanning months.

mod common;

use common::{temp_dir, Daemon};
use sensorgate::model::{format_time, now_micros};
use serde_json::Value;

const HOUR: i64 = 3_600_000_000;
/// These tests post hundreds of readings in a burst; rate limits have tests of their own.
const NO_RATE_LIMIT: &str = "[limits]\nwrites_per_second = 100000.0\nwrite_burst = 100000.0\n";
const DAY: i64 = 24 * HOUR;

async fn sensor(daemon: &Daemon) -> i64 {
    let (_, s) = daemon
        .post(
            "/api/v1/sensores/",
            r#"{"tipo": "temperatura", "modelo": "DHT22"}"#,
        )
        .await;
    s["id"].as_i64().unwrap()
}

async fn reading(daemon: &Daemon, sensor: i64, tipo: &str, at: i64, valor: f64) {
    let body = format!(
        r#"{{"sensor_id": {sensor}, "tipo": "{tipo}", "valor": {valor}, "timestamp": "{}"}}"#,
        format_time(at)
    );
    let (status, answer) = daemon.post("/api/v1/lecturas/", &body).await;
    assert_eq!(status, 201, "{answer}");
}

/// Readings every 6 hours over 90 days; hour and day buckets must equal what the raw
/// readings give.
#[tokio::test]
async fn rollups_match_the_raw_readings_over_months() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), NO_RATE_LIMIT).await;
    let id = sensor(&daemon).await;
    let start = (now_micros() / DAY - 100) * DAY;
    let mut expected_days: Vec<(i64, f64, f64, f64, i64)> = Vec::new();
    for day in 0..90 {
        let mut values = Vec::new();
        for slot in 0..4 {
            let valor = 10.0 + day as f64 * 0.1 + slot as f64;
            reading(
                &daemon,
                id,
                "temperatura",
                start + day * DAY + slot * 6 * HOUR + 1_000,
                valor,
            )
            .await;
            values.push(valor);
        }
        let sum: f64 = values.iter().sum();
        expected_days.push((start + day * DAY, values[0], values[3], sum / 4.0, 4));
    }
    reading(&daemon, id, "humedad", start, 50.0).await;

    let url = format!(
        "/api/v1/lecturas/agregadas?sensor_id={id}&tipo=temperatura&bucket=day&desde={}&hasta={}",
        format_time(start),
        format_time(start + 90 * DAY)
    );
    let (status, days) = daemon.get(&url).await;
    assert_eq!(status, 200, "{days}");
    let days = days.as_array().unwrap();
    assert_eq!(days.len(), 90);
    for (got, (inicio, min, max, avg, count)) in days.iter().zip(&expected_days) {
        assert_eq!(got["tipo"], "temperatura");
        assert_eq!(got["inicio"], format_time(*inicio));
        assert_eq!(got["min"].as_f64().unwrap(), *min);
        assert_eq!(got["max"].as_f64().unwrap(), *max);
        assert!((got["avg"].as_f64().unwrap() - avg).abs() < 1e-9);
        assert_eq!(got["count"], *count);
    }

    let url = format!(
        "/api/v1/readings/aggregated?sensor_id={id}&bucket=hour&desde={}&hasta={}",
        format_time(start),
        format_time(start + DAY)
    );
    let (_, hours) = daemon.get(&url).await;
    let hours = hours.as_array().unwrap();
    // Four temperature hours and one humidity hour on the first day, by tipo then time.
    let tipos: Vec<&str> = hours.iter().map(|h| h["tipo"].as_str().unwrap()).collect();
    assert_eq!(
        tipos,
        [
            "humedad",
            "temperatura",
            "temperatura",
            "temperatura",
            "temperatura"
        ]
    );
    assert_eq!(hours[2]["inicio"], format_time(start + 6 * HOUR));
    assert_eq!(hours[2]["count"], 1);

    for bad in [
        "/api/v1/lecturas/agregadas?bucket=hour",
        "/api/v1/lecturas/agregadas?sensor_id=1&bucket=week",
        "/api/v1/lecturas/agregadas?sensor_id=1&desde=yesterday",
    ] {
        let (status, body) = daemon.get(bad).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    daemon.stop().await;
}

/// Raw readings and minute buckets past their retention go; hour buckets, kept longer,
/// stay. Retention runs in the background on a short interval here.
#[tokio::test]
async fn retention_removes_old_readings_and_rollups_in_the_background() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(
        dir.path(),
        "[storage]\nreadings_retention_days = 30\nminute_rollup_retention_days = 7\nmaintenance_interval_s = 1\n",
    )
    .await;
    let id = sensor(&daemon).await;
    let now = now_micros();
    for (age_days, valor) in [(200, 1.0), (20, 2.0), (1, 3.0)] {
        reading(&daemon, id, "temperatura", now - age_days * DAY, valor).await;
    }

    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    let remaining = loop {
        // Each write gives the writer a chance to run its retention pass.
        reading(&daemon, id, "humedad", now_micros(), 40.0).await;
        let (_, rows) = daemon
            .get(&format!(
                "/api/v1/lecturas/?sensor_id={id}&tipo=temperatura&order=asc"
            ))
            .await;
        let values: Vec<f64> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["valor"].as_f64().unwrap())
            .collect();
        if values.len() == 2 || tokio::time::Instant::now() > deadline {
            break values;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(
        remaining,
        [2.0, 3.0],
        "the 200-day-old reading is past retention"
    );

    let aggregated = |bucket: &str| {
        format!(
            "/api/v1/lecturas/agregadas?sensor_id={id}&tipo=temperatura&bucket={bucket}&desde={}&hasta={}",
            format_time(now - 365 * DAY),
            format_time(now + DAY)
        )
    };
    let counts = |rows: Value| rows.as_array().unwrap().len();
    // Each table has its own slices in a pass: the minute buckets may go a pass later
    // than the raw readings.
    let minutes = loop {
        let minutes = counts(daemon.get(&aggregated("minute")).await.1);
        if minutes == 1 || tokio::time::Instant::now() > deadline {
            break minutes;
        }
        reading(&daemon, id, "humedad", now_micros(), 40.0).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(minutes, 1, "minute buckets older than 7 days go");
    assert_eq!(
        counts(daemon.get(&aggregated("hour")).await.1),
        3,
        "hour buckets stay"
    );
    daemon.stop().await;
}

fn fast_sensors(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "[[sensor]]\nname = \"s{i}\"\ntipo = \"temperatura\"\nmodelo = \"DHT22\"\ninterval_s = 0.05\nsource = {{ kind = \"sim\", seed = {i} }}\n"
            )
        })
        .collect()
}

/// A full card: the daemon keeps serving, says it is degraded, keeps the newest samples
/// in memory, and writes them once space is free again; the file stays sound.
#[tokio::test]
async fn a_full_database_degrades_and_recovers_without_corruption() {
    let dir = temp_dir();
    let config = format!("[storage]\nmax_database_mb = 1\n{}", fast_sensors(8));
    let daemon = Daemon::start_in(dir.path(), &config).await;
    let mut general = daemon
        .websocket("/api/v1/ws?channel=general")
        .await
        .greeted()
        .await;
    // Something else takes most of the space the database may use, so that the samples
    // fill the rest within moments.
    let db = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db.execute_batch(
        "CREATE TABLE ballast (b BLOB); INSERT INTO ballast VALUES (zeroblob(900 * 1024));",
    )
    .unwrap();

    let degraded = loop {
        let event = general.json().await;
        if event["event_type"] == "storage_degraded" {
            break event;
        }
    };
    assert_eq!(
        degraded["seq"], 0,
        "a notice that cannot be stored is not numbered"
    );
    assert!(
        degraded["data"]["error"].as_str().unwrap().contains("full"),
        "{degraded}"
    );
    // Near the limit a small commit fits now and then, so health is polled, not sampled once.
    assert!(
        health_becomes(&daemon, 503).await,
        "/healthz never said degraded"
    );
    assert_eq!(
        daemon.get("/api/v1/sensores/").await.0,
        200,
        "reads still work"
    );
    let (status, answer) = daemon
        .post("/api/v1/sensores/", r#"{"tipo": "t", "modelo": "m"}"#)
        .await;
    assert!(
        status == 201 || (status == 503 && answer["code"] == "unavailable"),
        "{status} {answer}"
    );
    // Near the limit a small commit still fits now and then, ending one outage and starting
    // the next. While this connection holds the write lock the daemon cannot commit at all,
    // so an outage seen under the lock is still going on when the space is freed.
    let (locked_at, outage_since, seq_under_lock) = hold_a_long_outage(&daemon, &db).await;
    db.execute_batch(
        "DROP TABLE ballast; DELETE FROM rollup_minute; DELETE FROM rollup_hour; DELETE FROM readings; \
         DELETE FROM events WHERE seq < (SELECT MAX(seq) - 100 FROM events); COMMIT;",
    )
    .unwrap();

    let recovered = loop {
        let event = general.json().await;
        if event["event_type"] == "storage_recovered"
            && event["seq"].as_u64() > Some(seq_under_lock)
        {
            break event;
        }
    };
    let lasted = recovered["data"]["outage_s"].as_f64().unwrap();
    assert!(lasted >= 1.0, "{recovered}");
    assert!(recovered["data"]["dropped_samples"].is_u64());
    assert!(
        health_becomes(&daemon, 200).await,
        "/healthz never said ok again"
    );
    // Every reading stored before the lock was deleted above, so readings taken during the
    // outage well before the lock are there only because they waited in memory.
    let (_, stored) = daemon.get("/api/v1/lecturas/?limit=10000&order=asc").await;
    let waited: std::collections::HashSet<i64> = stored
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            let at = sensorgate::model::parse_time(r["timestamp"].as_str().unwrap()).unwrap();
            at >= outage_since && at < locked_at - 500_000
        })
        .map(|r| r["sensor_id"].as_i64().unwrap())
        .collect();
    assert_eq!(waited.len(), 8, "sensors with buffered samples: {waited:?}");
    daemon.stop().await;

    let db = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let (min, max, count): (i64, i64, i64) = db
        .query_row("SELECT MIN(seq), MAX(seq), COUNT(*) FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(max - min + 1, count, "seq has no holes");
}

/// Takes the write lock on `db` at a moment the daemon's storage has been failing for at
/// least a second, and keeps it. Returns when the lock was taken, when the outage began, and
/// the last stored `seq`.
async fn hold_a_long_outage(daemon: &Daemon, db: &rusqlite::Connection) -> (i64, i64, u64) {
    let failing_since = |health: &Value| {
        health["storage"]["failing_since"]
            .as_str()
            .and_then(sensorgate::model::parse_time)
    };
    for _ in 0..200 {
        db.execute_batch("BEGIN IMMEDIATE").unwrap();
        let locked_at = now_micros();
        let (_, first) = daemon.get("/healthz").await;
        // A commit that ended just before the lock may not have updated the health yet.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (_, second) = daemon.get("/healthz").await;
        match (failing_since(&first), failing_since(&second)) {
            (Some(a), Some(b)) if a == b && a <= locked_at - 1_000_000 => {
                return (
                    locked_at,
                    a,
                    second["storage"]["last_seq"].as_u64().unwrap(),
                );
            }
            _ => db.execute_batch("ROLLBACK").unwrap(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("storage never stayed failing for a second");
}

/// Polls `/healthz` for up to 5 s until it answers `status`.
async fn health_becomes(daemon: &Daemon, status: u16) -> bool {
    for _ in 0..100 {
        if daemon.get("/healthz").await.0 == status {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// A backup taken while sensors are being sampled is a sound, complete copy.
#[tokio::test]
async fn backup_while_running_is_consistent() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), &fast_sensors(4)).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let target = dir.path().join("copy.db");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .arg("backup")
        .arg(&target)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .arg("backup")
        .arg(&target)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing file is never overwritten"
    );
    // Ingest went on.
    let before = daemon.last_seq().await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(daemon.last_seq().await > before);
    daemon.stop().await;

    let copy = rusqlite::Connection::open(&target).unwrap();
    let check: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let sensors: i64 = copy
        .query_row("SELECT COUNT(*) FROM sensors", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sensors, 4);
    let (min, max, count): (i64, i64, i64) = copy
        .query_row("SELECT MIN(seq), MAX(seq), COUNT(*) FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(max - min + 1, count);
    // Every reading event in the copy has its reading: one snapshot, not a torn copy.
    let orphans: i64 = copy
        .query_row(
            "SELECT COUNT(*) FROM events e WHERE e.channel = 'readings' AND NOT EXISTS \
             (SELECT 1 FROM readings r WHERE r.id = e.reading_id)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orphans, 0);
}

/// Export streams a range as CSV or JSON with exactly the stored readings.
#[tokio::test]
async fn export_streams_exactly_the_range() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), NO_RATE_LIMIT).await;
    let id = sensor(&daemon).await;
    let start = (now_micros() / DAY - 10) * DAY;
    for i in 0..2500 {
        reading(
            &daemon,
            id,
            "temperatura",
            start + i * 60_000_000,
            i as f64 / 10.0,
        )
        .await;
    }
    let range = format!(
        "sensor_id={id}&desde={}&hasta={}",
        format_time(start + 100 * 60_000_000),
        format_time(start + 2100 * 60_000_000)
    );
    let raw = common::raw_exchange(
        daemon.addr,
        format!(
            "GET /api/v1/lecturas/export?{range} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.to_lowercase().contains("content-type: text/csv"),
        "{}",
        &text[..200]
    );
    let body = dechunk(&raw);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(
        lines[0],
        "id,sensor_id,tipo,valor,unidad,timestamp,hora_dudosa"
    );
    assert_eq!(lines.len(), 1 + 2000);
    assert!(lines[1].contains(",temperatura,10,"), "{}", lines[1]);
    assert!(
        lines[2000].contains(",temperatura,209.9,"),
        "{}",
        lines[2000]
    );

    let raw = common::raw_exchange(
        daemon.addr,
        format!("GET /api/v1/readings/export?{range}&format=json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").into_bytes(),
    )
    .await
    .unwrap();
    let rows: Vec<Value> = serde_json::from_str(&dechunk(&raw)).unwrap();
    assert_eq!(rows.len(), 2000);
    assert_eq!(rows[0]["valor"], 10.0);
    assert_eq!(rows[1999]["valor"], 209.9);
    assert_eq!(
        daemon.get("/api/v1/lecturas/export?format=xml").await.0,
        422
    );
    daemon.stop().await;
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(raw: &[u8]) -> String {
    let start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = &raw[start..];
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            break;
        }
        let data = &rest[line_end + 2..line_end + 2 + size];
        body.extend_from_slice(data);
        rest = &rest[line_end + 2 + size + 2..];
    }
    String::from_utf8(body).unwrap()
}

/// Whether this machine's clock counts as synchronised: the kernel's NTP status, or
/// systemd-timesyncd's flag file. Observed here independently of the daemon.
fn clock_synchronized_here() -> bool {
    // SAFETY: with `modes` 0, adjtimex only fills in the zeroed struct it is given.
    let state = unsafe {
        let mut status: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut status)
    };
    (state != -1 && state != libc::TIME_ERROR)
        || std::path::Path::new("/run/systemd/timesync/synchronized").exists()
}

/// Samples, and readings posted without a time, taken while the clock is not trusted
/// are flagged `hora_dudosa` in the API, the export and the events; with
/// `trust_clock = "always"` nothing is. A reading posted with its own time never is.
#[tokio::test]
async fn readings_stamped_by_an_untrusted_clock_are_flagged() {
    let synchronized = clock_synchronized_here();
    for (trust, doubtful) in [("synchronized", !synchronized), ("always", false)] {
        let dir = temp_dir();
        let config = format!(
            "[sampling]\ntrust_clock = \"{trust}\"\n{NO_RATE_LIMIT}{}",
            fast_sensors(1)
        );
        let daemon = Daemon::start_in(dir.path(), &config).await;
        let mut readings = daemon
            .websocket("/api/v1/ws?channel=readings")
            .await
            .greeted()
            .await;
        let sampled = readings.json().await;
        let flag = |reading: &Value| match reading.get("hora_dudosa") {
            None => false,
            Some(Value::Bool(true)) => true,
            Some(other) => panic!("hora_dudosa is true or absent, not {other}"),
        };
        assert_eq!(flag(&sampled["data"]), doubtful, "{trust}: {sampled}");
        let sensor_id = sampled["data"]["sensor_id"].as_i64().unwrap();

        let (_, stamped_here) = daemon
            .post(
                "/api/v1/lecturas/",
                &format!(r#"{{"sensor_id": {sensor_id}, "tipo": "t", "valor": 1.0}}"#),
            )
            .await;
        assert_eq!(flag(&stamped_here), doubtful, "{trust}: {stamped_here}");
        let (_, stamped_by_client) = daemon
            .post(
                "/api/v1/lecturas/",
                &format!(
                    r#"{{"sensor_id": {sensor_id}, "tipo": "t", "valor": 2.0, "timestamp": "{}"}}"#,
                    format_time(now_micros())
                ),
            )
            .await;
        assert!(!flag(&stamped_by_client), "{trust}: {stamped_by_client}");

        let (_, listed) = daemon.get("/api/v1/lecturas/?tipo=t&order=asc").await;
        let flags: Vec<bool> = listed.as_array().unwrap().iter().map(flag).collect();
        assert_eq!(flags, [doubtful, false], "{trust}: {listed}");
        let raw = common::raw_exchange(
            daemon.addr,
            b"GET /api/v1/lecturas/export?tipo=t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                .to_vec(),
        )
        .await
        .unwrap();
        let csv = dechunk(&raw);
        let last_column: Vec<&str> = csv
            .lines()
            .skip(1)
            .map(|line| line.rsplit(',').next().unwrap())
            .collect();
        assert_eq!(
            last_column,
            [doubtful.to_string(), "false".to_string()],
            "{trust}: {csv}"
        );
        daemon.stop().await;
    }
}

/// With a commit window, samples wait for one another and are committed together; a REST
/// write does not wait for the window, and takes the waiting samples with it.
#[tokio::test]
async fn samples_wait_for_the_commit_window_and_writes_do_not() {
    let dir = temp_dir();
    let config = format!("[storage]\ncommit_window_ms = 30000\n{}", fast_sensors(1));
    let daemon = Daemon::start_in(dir.path(), &config).await;
    let mut readings = daemon
        .websocket("/api/v1/ws?channel=readings")
        .await
        .greeted()
        .await;
    // The watchdog's first ping, at start, ends a window early (the next comes 10 s later):
    // let what it committed arrive.
    let settled = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < settled
        && readings
            .next_within(std::time::Duration::from_millis(300))
            .await
            .is_some()
    {}
    let commits_before = daemon.commits().await;
    assert!(
        readings
            .next_within(std::time::Duration::from_secs(1))
            .await
            .is_none(),
        "a sample was committed before the window ended"
    );

    let (status, created) = daemon
        .post("/api/v1/sensores/", r#"{"tipo": "t", "modelo": "m"}"#)
        .await;
    assert_eq!(status, 201, "{created}");
    // A second of samples every 50 ms, two readings each, went out with the write.
    let mut held = Vec::new();
    while held.len() < 20 {
        held.push(readings.json().await);
    }
    let seqs: Vec<u64> = held.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let commits_after = daemon.commits().await;
    assert!(
        commits_after - commits_before <= 2,
        "{commits_before} -> {commits_after} commits"
    );
    daemon.stop().await;
}

/// SQLite keeps -0.0 as 0, so a reading of -0.0 is answered and announced as the 0.0 that
/// a later read or replay gives back.
#[tokio::test]
async fn negative_zero_is_answered_as_it_is_stored() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), NO_RATE_LIMIT).await;
    let id = sensor(&daemon).await;
    let mut readings = daemon
        .websocket("/api/v1/ws?channel=readings")
        .await
        .greeted()
        .await;
    let body = format!(r#"{{"sensor_id": {id}, "tipo": "t", "valor": -0.0}}"#);
    let (status, answer) = daemon
        .try_request("POST", "/api/v1/lecturas/", Some(&body))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status, 201, "{answer}");
    assert!(answer.contains(r#""valor":0.0"#), "{answer}");
    let (_, listed) = daemon
        .try_request("GET", "/api/v1/lecturas/?tipo=t", None)
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed).contains(r#""valor":0.0"#),
        "{}",
        String::from_utf8_lossy(&listed)
    );
    let live = readings.json().await;
    assert_eq!(live["data"]["valor"].to_string(), "0.0", "{live}");
    daemon.stop().await;
}

/// A value that is not a finite number never reaches the writer: SQLite would refuse the
/// row, and a sample that can never be stored would hold up every commit it is retried in.
#[test]
fn a_value_that_is_not_a_number_is_dropped_and_holds_nothing_up() {
    use sensorgate::sensors::Measurement;
    use sensorgate::store::{ReadingFilter, ReadingOrder, Sample, Store};

    let dir = temp_dir();
    let config = sensorgate::config::StorageConfig {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, writer) = Store::open(&config, sensorgate::events::Hub::new(64)).unwrap();
    let new = sensorgate::model::NewSensor::from_json(
        serde_json::json!({"tipo": "temperatura", "modelo": "DHT22"}),
    )
    .unwrap();
    let id = runtime.block_on(store.create_sensor(new)).unwrap().id;
    let sample = |at: i64, measurements: Vec<Measurement>| Sample {
        sensor_id: id,
        taken_at: at,
        hora_dudosa: false,
        measurements,
    };
    store
        .submit_samples(vec![
            sample(
                1,
                vec![
                    Measurement::new("temperatura", f64::NAN, "°C"),
                    Measurement::new("humedad", 40.0, "%"),
                ],
            ),
            sample(
                2,
                vec![Measurement::new("temperatura", f64::INFINITY, "°C")],
            ),
        ])
        .unwrap();
    store
        .submit_samples(vec![sample(
            3,
            vec![Measurement::new("temperatura", 21.0, "°C")],
        )])
        .unwrap();
    runtime.block_on(store.ping()).unwrap();

    assert!(
        store.health().failure().is_none(),
        "{:?}",
        store.health().failure()
    );
    let filter = ReadingFilter {
        sensor_id: Some(id),
        limit: 100,
        order: ReadingOrder::Asc,
        ..ReadingFilter::default()
    };
    let stored: Vec<(i64, f64)> = runtime
        .block_on(store.readings(filter))
        .unwrap()
        .iter()
        .map(|r| (r.timestamp, r.valor))
        .collect();
    assert_eq!(stored, [(1, 40.0), (3, 21.0)]);
    runtime.block_on(store.close());
    writer.join();
}

/// The newest reading of each sensor and `tipo` is written once per commit: the newest
/// by the time it was taken, not the last handed over, never older than the stored one,
/// and none for a sensor deleted in the same commit as its readings.
#[test]
fn the_latest_reading_of_a_commit_is_its_newest_and_leaves_with_its_sensor() {
    use sensorgate::sensors::Measurement;
    use sensorgate::store::{Sample, Store};

    let dir = temp_dir();
    // Samples wait for company; the delete ends the wait and shares their commit.
    let config = sensorgate::config::StorageConfig {
        data_dir: dir.path().to_owned(),
        commit_window_ms: 60_000,
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, writer) = Store::open(&config, sensorgate::events::Hub::new(64)).unwrap();
    let create = |tipo: &str| {
        let new = sensorgate::model::NewSensor::from_json(
            serde_json::json!({"tipo": tipo, "modelo": "DHT22"}),
        )
        .unwrap();
        runtime.block_on(store.create_sensor(new)).unwrap().id
    };
    let (kept, deleted) = (create("temperatura"), create("humedad"));
    let sample = |sensor_id: i64, at: i64, valor: f64| Sample {
        sensor_id,
        taken_at: at,
        hora_dudosa: false,
        measurements: vec![Measurement::new("temperatura", valor, "°C")],
    };
    store
        .submit_samples(vec![
            sample(kept, 10, 1.0),
            sample(kept, 30, 3.0),
            sample(kept, 20, 2.0),
            sample(deleted, 40, 4.0),
        ])
        .unwrap();
    runtime.block_on(store.delete_sensor(deleted)).unwrap();
    let latest = |store: &Store| -> Vec<(i64, i64, f64)> {
        runtime
            .block_on(store.snapshot())
            .unwrap()
            .latest
            .iter()
            .map(|r| (r.sensor_id, r.timestamp, r.valor))
            .collect()
    };
    assert_eq!(latest(&store), [(kept, 30, 3.0)]);
    store.submit_samples(vec![sample(kept, 25, 2.5)]).unwrap();
    runtime.block_on(store.ping()).unwrap();
    assert_eq!(
        latest(&store),
        [(kept, 30, 3.0)],
        "an older sample is not the latest"
    );
    assert!(store.health().failure().is_none());
    runtime.block_on(store.close());
    writer.join();
}
