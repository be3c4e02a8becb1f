//! Storage end to end: roll-ups and retention on data spanning months.

mod common;

use std::ffi::OsStr;
use std::time::Duration;

use common::{insert_reading_row, sensorgate_beside_the_daemon, temp_dir, Daemon, SENSOR};
use sensorgate::model::{format_time, now_micros};
use serde_json::Value;

const HOUR: i64 = 3_600_000_000;
/// These tests post hundreds of readings in a burst; rate limits have tests of their own.
const NO_RATE_LIMIT: &str = "[limits]\nwrites_per_second = 100000.0\nwrite_burst = 100000.0\n";
const DAY: i64 = 24 * HOUR;

async fn sensor(daemon: &Daemon) -> i64 {
    let s = daemon.create_sensor(SENSOR).await;
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
    let daemon = Daemon::with(NO_RATE_LIMIT).await;
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

/// How many readings the roll-up buckets in `buckets` count together.
fn counted(buckets: &Value) -> u64 {
    buckets
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum()
}

/// The `valor` of each reading a `GET` of readings at `path` answers.
async fn valores(daemon: &Daemon, path: &str) -> Vec<f64> {
    let (status, rows) = daemon.get(path).await;
    assert_eq!(status, 200, "{rows}");
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["valor"].as_f64().unwrap())
        .collect()
}

/// Raw readings and minute buckets past their retention go; hour buckets, kept longer,
/// stay. Retention runs in the background on a short interval here.
#[tokio::test]
async fn retention_removes_old_readings_and_rollups_in_the_background() {
    let daemon = Daemon::with("[storage]\nreadings_retention_days = 30\nminute_rollup_retention_days = 7\nmaintenance_interval_s = 1\n",
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
        let values = valores(
            &daemon,
            &format!("/api/v1/lecturas/?sensor_id={id}&tipo=temperatura&order=asc"),
        )
        .await;
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
            let source = format!("{{ kind = \"sim\", seed = {i} }}");
            common::sensor_table(&format!("s{i}"), "temperatura", "DHT22", 0.05, &source)
        })
        .collect()
}

/// A full card: the daemon keeps serving, says it is degraded, keeps the newest samples
/// in memory, and writes them once space is free again; the file stays sound.
#[tokio::test]
async fn a_full_database_degrades_and_recovers_without_corruption() {
    let config = format!("[storage]\nmax_database_mb = 1\n{}", fast_sensors(8));
    let daemon = Daemon::with(&config).await;
    let mut general = daemon.subscribe("/api/v1/ws?channel=general").await;
    // Something else takes most of the space the database may use, so that the samples
    // fill the rest within moments.
    let db = rusqlite::Connection::open(daemon.dir().join("sensorgate.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    // All but a few of the pages of the 1 MiB it may use.
    let (pages, page_size): (i64, i64) = db
        .query_row(
            "SELECT (SELECT page_count FROM pragma_page_count), \
             (SELECT page_size FROM pragma_page_size)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let ballast = (1024 * 1024 / page_size - pages - 8).max(1) * (page_size - 64);
    db.execute_batch(&format!(
        "CREATE TABLE ballast (b BLOB); INSERT INTO ballast VALUES (zeroblob({ballast}));"
    ))
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
        "DROP TABLE ballast; DELETE FROM rollup_minute; DELETE FROM rollup_hour; \
         UPDATE store_meta SET value = (SELECT MAX(seq) FROM event_log) + 1 WHERE key = 'log_floor'; \
         DELETE FROM reading_rows; \
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
    let dir = daemon.stop().await.unwrap();

    let db = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    // The log from its floor on, where the readings deleted above end it.
    let (min, max, count): (i64, i64, i64) = db
        .query_row(
            "SELECT MIN(seq), MAX(seq), COUNT(*) FROM event_log \
             WHERE seq >= (SELECT value FROM store_meta WHERE key = 'log_floor')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
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

/// A backup taken while sensors are being sampled (through the daemon, which holds the
/// database) is a sound, complete copy.
#[tokio::test]
async fn backup_while_running_is_consistent() {
    let daemon = Daemon::with(&fast_sensors(4)).await;
    daemon
        .wait_past(20, "readings stored before the backup")
        .await;
    let target = daemon.dir().join("copy.db");
    let backup = [
        OsStr::new("backup"),
        target.as_ref(),
        "--data-dir".as_ref(),
        daemon.dir().as_ref(),
    ];
    let out = sensorgate_beside_the_daemon(&backup).await;
    assert!(out.ok, "{}", out.stderr);
    let names: Vec<String> = std::fs::read_dir(daemon.dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|name| name.contains("partial")),
        "the copy took the target's name: {names:?}"
    );
    let again = sensorgate_beside_the_daemon(&backup).await;
    assert!(
        !again.ok && again.stderr.contains("exists already"),
        "an existing file is never overwritten: {}",
        again.stderr
    );
    let before = daemon.last_seq().await;
    daemon
        .wait_past(before, "ingest going on after the backup")
        .await;
    let _dir = daemon.stop().await;

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
        .query_row(
            "SELECT MIN(seq), MAX(seq), COUNT(*) FROM event_log",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(max - min + 1, count);
    // Every reading event in the copy has its reading: one snapshot, not a torn copy.
    let orphans: i64 = copy
        .query_row(
            "SELECT COUNT(*) FROM event_log e WHERE e.channel = 'readings' AND NOT EXISTS \
             (SELECT 1 FROM readings r WHERE r.id = e.reading_id)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orphans, 0);
}

/// With the default `storage.locking = "exclusive"` the daemon keeps no `-shm` file for
/// the card to write back and keeps other processes out of its database, while the token
/// and backup commands work through its control socket: a backup holds what the WAL
/// holds, tokens are created, listed and revoked. Without the socket the commands find the
/// database locked and say so; once the daemon has stopped, they use the file.
#[tokio::test]
async fn exclusive_locking_keeps_the_index_off_the_card_and_commands_go_through_the_daemon() {
    let daemon = Daemon::with(&fast_sensors(2)).await;
    let dir = daemon.dir().to_owned();
    daemon.wait_past(10, "samples stored").await;
    let mut replay = daemon
        .subscribe("/api/v1/ws?channel=readings&since=0")
        .await;
    let replayed = common::events::events_until(&mut replay, 10).await;
    assert!(
        !dir.join("sensorgate.db-shm").exists(),
        "the WAL index lives in the daemon's memory"
    );
    let data_dir = ["--data-dir".as_ref(), dir.as_os_str()];
    let command = |words: &[&str]| -> Vec<std::ffi::OsString> {
        words
            .iter()
            .map(OsStr::new)
            .chain(data_dir)
            .map(OsStr::to_os_string)
            .collect()
    };

    let target = dir.join("copy.db");
    let backup = [&[OsStr::new("backup"), target.as_ref()][..], &data_dir].concat();
    let before = daemon.last_seq().await;
    let wal = std::fs::metadata(dir.join("sensorgate.db-wal"))
        .unwrap()
        .len();
    assert!(wal > 0, "the events so far wait in the WAL");
    let copied = sensorgate_beside_the_daemon(&backup).await;
    assert!(copied.ok, "{}", copied.stderr);
    // What waited in the WAL is in the copy too.
    let copied_up_to: i64 = rusqlite::Connection::open(&target)
        .unwrap()
        .query_row("SELECT MAX(seq) FROM event_log", [], |r| r.get(0))
        .unwrap();
    assert!(
        copied_up_to as u64 >= before,
        "the copy ends at seq {copied_up_to}, the daemon was at {before} before it"
    );

    let created = sensorgate_beside_the_daemon(&command(&[
        "token", "create", "--name", "cli", "--scope", "read",
    ]))
    .await;
    assert!(created.ok, "{}", created.stderr);
    assert!(created.stdout.starts_with("sg_"), "{}", created.stdout);
    let listed = sensorgate_beside_the_daemon(&command(&["token", "list"])).await;
    assert!(
        listed.ok && listed.stdout.contains("cli "),
        "{}{}",
        listed.stdout,
        listed.stderr
    );
    let revoked = sensorgate_beside_the_daemon(&command(&["token", "revoke", "cli"])).await;
    assert!(revoked.ok, "{}", revoked.stderr);
    let listed = sensorgate_beside_the_daemon(&command(&["token", "list"])).await;
    assert!(
        listed.ok && !listed.stdout.contains("cli "),
        "{}",
        listed.stdout
    );
    let unknown = sensorgate_beside_the_daemon(&command(&["token", "revoke", "cli"])).await;
    assert!(
        !unknown.ok && unknown.stderr.contains("no token named"),
        "{}",
        unknown.stderr
    );

    // Without the socket the command opens the file, which the daemon holds.
    let socket = dir.join("control.sock");
    let aside = dir.join("control.sock.aside");
    std::fs::rename(&socket, &aside).unwrap();
    let locked = sensorgate_beside_the_daemon(&command(&["token", "list"])).await;
    std::fs::rename(&aside, &socket).unwrap();
    assert!(!locked.ok, "a token command past the daemon");
    assert!(
        locked.stderr.contains("locked by another process"),
        "{}",
        locked.stderr
    );
    assert!(
        daemon.last_seq().await > before,
        "sampling went on while the commands ran"
    );

    let _dir = daemon.stop().await;
    assert!(!socket.exists(), "a stopped daemon removes its socket");
    common::events::assert_exactly_stored(&dir, "readings", 0, &replayed);
    std::fs::remove_file(&target).unwrap();
    let offline = sensorgate_beside_the_daemon(&backup).await;
    assert!(offline.ok, "{}", offline.stderr);
    let listed = sensorgate_beside_the_daemon(&command(&["token", "list"])).await;
    assert!(
        listed.ok && listed.stdout.contains("admin"),
        "{}",
        listed.stderr
    );
}

/// The control socket answers what is not a request with an error, and refuses a user
/// other than the daemon's (and root) even when the socket's mode would let them in; it
/// goes on serving.
#[tokio::test]
async fn the_control_socket_refuses_what_is_not_a_request_and_other_users() {
    use std::io::{BufRead, BufReader, Write};
    let daemon = Daemon::with("").await;
    let socket = daemon.dir().join("control.sock");
    for (sent, refusal) in [
        ("hello\n".to_owned(), "not a request"),
        (
            "{\"command\": \"drop_tables\"}\n".to_owned(),
            "not a request: unknown variant `drop_tables`",
        ),
        (
            format!("{}\n", "x".repeat(10_000)),
            "a request is one line of at most 4096 bytes",
        ),
    ] {
        let answer = tokio::task::spawn_blocking({
            let socket = socket.clone();
            move || {
                let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                stream.write_all(sent.as_bytes()).unwrap();
                let mut answer = String::new();
                BufReader::new(stream).read_line(&mut answer).unwrap();
                answer
            }
        })
        .await
        .unwrap();
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert!(
            answer["error"].as_str().unwrap().starts_with(refusal),
            "{answer}"
        );
    }
    refuses_another_user(daemon.dir()).await;
    let listed = sensorgate_beside_the_daemon(&[
        "token".as_ref(),
        "list".as_ref(),
        "--data-dir".as_ref(),
        daemon.dir().as_os_str(),
    ])
    .await;
    assert!(listed.ok, "{}", listed.stderr);
    daemon.stop().await;
}

/// Opens the way to the socket for everyone, then runs `sensorgate token list` as
/// `nobody`: the daemon looks at who connects and refuses. Only root can run a command
/// as another user, so other runs say they left this out.
async fn refuses_another_user(dir: &std::path::Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if std::fs::metadata(dir).unwrap().uid() != 0 {
        eprintln!("not run as root: the refusal of another user was not tried");
        return;
    }
    let open = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(dir, 0o711);
    open(&dir.join("control.sock"), 0o666);
    let dir = dir.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(common::BIN)
            .args([
                "token".as_ref(),
                "list".as_ref(),
                "--data-dir".as_ref(),
                dir.as_os_str(),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "another user listed the tokens");
    assert!(
        stderr.contains("only the daemon's user and root may use its control socket"),
        "{stderr}"
    );
}

/// Export streams a range as CSV or JSON with exactly the stored readings.
#[tokio::test]
async fn export_streams_exactly_the_range() {
    let daemon = Daemon::with(NO_RATE_LIMIT).await;
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
    daemon
        .expect("GET", "/api/v1/lecturas/export?format=xml", None, 422)
        .await;
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
        let config = format!(
            "[sampling]\ntrust_clock = \"{trust}\"\n{NO_RATE_LIMIT}{}",
            fast_sensors(1)
        );
        let daemon = Daemon::with(&config).await;
        let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
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
    let config = format!("[storage]\ncommit_window_ms = 30000\n{}", fast_sensors(1));
    let daemon = Daemon::with(&config).await;
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
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
    let daemon = Daemon::with(NO_RATE_LIMIT).await;
    let id = sensor(&daemon).await;
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
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
    use sensorgate::model::{Measurement, Sample};
    use sensorgate::store::{ReadingFilter, ReadingOrder, Store};

    let dir = temp_dir();
    let config = sensorgate::store::StorageConfig {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, writer) = Store::open(&config, sensorgate::events::Hub::new(64)).unwrap();
    let new = sensorgate::model::NewSensor::from_json(
        serde_json::json!({"tipo": "temperatura", "modelo": "DHT22"}),
        sensorgate::sensors::check_source,
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
    use sensorgate::model::{Measurement, Sample};
    use sensorgate::store::Store;

    let dir = temp_dir();
    // Samples wait for company; the delete ends the wait and shares their commit.
    let config = sensorgate::store::StorageConfig {
        data_dir: dir.path().to_owned(),
        commit_window_ms: 60_000,
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, writer) = Store::open(&config, sensorgate::events::Hub::new(64)).unwrap();
    let create = |tipo: &str| {
        let new = sensorgate::model::NewSensor::from_json(
            serde_json::json!({"tipo": tipo, "modelo": "DHT22"}),
            sensorgate::sensors::check_source,
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

/// A database damaged in the middle (a card that lost pages): found at start, every
/// write refused with a clear error, exports that run into the damage fail as transfers,
/// and the operator told what to do.
#[tokio::test]
async fn a_damaged_database_refuses_writes_and_fails_exports_that_meet_the_damage() {
    let daemon = Daemon::with("").await;
    let id = sensor(&daemon).await;
    let dir = daemon.stop().await.unwrap();
    let path = dir.path().join("sensorgate.db");
    let start = now_micros() - 30 * DAY;
    {
        let mut db = rusqlite::Connection::open(&path).unwrap();
        let tx = db.transaction().unwrap();
        for i in 0..40_000i64 {
            insert_reading_row(
                &tx,
                id,
                start + i * 1_000_000,
                "temperatura",
                i as f64 / 100.0,
                "°C",
            );
        }
        tx.commit().unwrap();
        db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    // Garbage over a tenth of the pages, in the middle of the file.
    let size = std::fs::metadata(&path).unwrap().len();
    let pages = size / 4096;
    assert!(pages > 100, "{pages} pages");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(pages / 2 * 4096)).unwrap();
        file.write_all(&vec![0x5a; (pages / 10 * 4096) as usize])
            .unwrap();
        file.sync_all().unwrap();
    }

    let daemon = Daemon::start_answering(common::config(dir.path(), ""), &[200, 503]).await;
    let mut health = Value::Null;
    for _ in 0..200 {
        health = daemon.get("/healthz").await.1;
        if health["storage"]["damaged"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["storage"]["damaged"], true, "{health}");
    let advice = health["storage"]["last_error"].as_str().unwrap();
    for needed in [path.to_str().unwrap(), "sensorgate backup", ".recover"] {
        assert!(advice.contains(needed), "{advice}");
    }

    let body = format!(r#"{{"sensor_id": {id}, "tipo": "temperatura", "valor": 1}}"#);
    for (path, body) in [
        ("/api/v1/lecturas/", body.as_str()),
        ("/api/v1/sensores/", r#"{"tipo": "t", "modelo": "m"}"#),
    ] {
        let (status, answer) = daemon.post(path, body).await;
        assert_eq!(status, 503, "{path}: {answer}");
        assert_eq!(answer["code"], "database_damaged", "{answer}");
        assert!(answer["detail"].as_str().unwrap().contains("damaged"));
    }

    let range = format!(
        "sensor_id={id}&desde={}&hasta={}",
        format_time(start),
        format_time(start + 40_000 * 1_000_000)
    );
    for format in ["csv", "json"] {
        let target = format!("/api/v1/lecturas/export?{range}&format={format}");
        let raw = read_until_closed(
            daemon.addr,
            format!(
                "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                daemon.addr
            ),
        )
        .await;
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{format}: {}",
            &text[..100]
        );
        assert!(
            !text.ends_with("\r\n0\r\n\r\n"),
            "{format}: an export cut short by the damage ended as if complete"
        );
        let curl = format!("http://{}{target}", daemon.addr);
        let exit = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "-o", "/dev/null", &curl])
                .status()
        })
        .await
        .unwrap();
        if let Ok(exit) = exit {
            assert!(
                !exit.success(),
                "{format}: curl took the export for complete"
            );
        }
    }
    daemon.stop().await;
}

/// Sends `request` and reads until the server closes or resets the connection.
async fn read_until_closed(addr: std::net::SocketAddr, request: String) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(common::PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return raw,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the response neither ended nor failed"),
        }
    }
}

/// A small disk: the daemon runs with every file limited to 2 MiB (the file size limit,
/// a real `LimitFSIZE=`); samples commit far more WAL than that, and the WAL is copied
/// back and truncated before it runs out of room, so storage never fails.
#[test]
fn the_wal_stays_within_a_small_disk() {
    use std::os::unix::process::CommandExt;
    const LIMIT: u64 = 2 * 1024 * 1024;
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\ncommit_window_ms = 0\n{}",
            dir.path().join("data").display(),
            fast_sensors(8)
        ),
    )
    .unwrap();
    let log_path = dir.path().join("daemon.log");
    let mut command = std::process::Command::new(common::BIN);
    command
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log_path).unwrap());
    // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let stop = |child: &mut std::process::Child| {
        let _ = std::process::Command::new("kill")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
    };

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let addr = loop {
        let found = log().lines().find_map(|line| {
            let (_, rest) = line.split_once("listening on http://")?;
            Some(rest.trim().trim_end_matches('/').to_owned())
        });
        if let Some(addr) = found {
            break addr;
        }
        if std::time::Instant::now() > deadline {
            stop(&mut child);
            panic!("the daemon did not start:\n{}", log());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // Four times the commits whose WAL fills the limit (each sample its own commit, at
    // most about 4 KiB of WAL each).
    let wanted = 4 * LIMIT / (4 * 1024);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let (status, health) = http_get(&addr, "/healthz");
        if status != 200 {
            stop(&mut child);
            panic!("storage failed: {health}\n{}", log());
        }
        if health["storage"]["commits"].as_u64().unwrap() >= wanted {
            break;
        }
        if std::time::Instant::now() > deadline {
            stop(&mut child);
            panic!("too few commits: {health}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    stop(&mut child);
    let log = log();
    assert!(!log.contains("storage failing"), "{log}");
    assert!(
        log.contains("space for the database runs short"),
        "the WAL was never truncated for room:\n{log}"
    );
    let db = rusqlite::Connection::open(dir.path().join("data/sensorgate.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// Status and JSON body of a plain GET.
fn http_get(addr: &str, path: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let (status, body) = common::split_response(&raw);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The next `system_event` on `general`, also kept in `notices`.
async fn next_notice(general: &mut common::Client, notices: &mut Vec<Value>) -> Value {
    loop {
        let event = general.json().await;
        if event["type"] == "system_event" {
            notices.push(event.clone());
            return event;
        }
    }
}

/// A card that refuses writes, lets one commit through, and refuses again (another
/// process holding the database's write lock stands in for it): that is one outage,
/// announced once, and the recovery counts it from its first failure until commits work
/// for good.
#[tokio::test]
async fn a_flapping_outage_is_one_outage_from_first_failure_to_recovery() {
    let daemon = Daemon::with(&fast_sensors(2)).await;
    let mut general = daemon.subscribe("/api/v1/ws?channel=general").await;
    let db = rusqlite::Connection::open(daemon.dir().join("sensorgate.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
    let time_of = |event: &Value| {
        sensorgate::model::parse_time(event["timestamp"].as_str().unwrap()).unwrap()
    };
    let mut notices = Vec::new();

    // The writer waits 5 s for the lock, then its commit fails.
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let first = next_notice(&mut general, &mut notices).await;
    assert_eq!(first["event_type"], "storage_degraded", "{first}");
    let failed_at = time_of(&first);
    // One commit goes through, then the lock is taken again and held past the writer's
    // wait, so that its commits fail again.
    db.execute_batch("ROLLBACK").unwrap();
    let commits = daemon.commits().await;
    while daemon.commits().await == commits {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let locked_again = now_micros();
    while now_micros() - locked_again < 7_000_000 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let freed_at = now_micros();
    db.execute_batch("ROLLBACK").unwrap();
    let recovered = next_notice(&mut general, &mut notices).await;
    assert_eq!(
        notices.len(),
        2,
        "one outage, announced once and ended once: {notices:?}"
    );
    assert_eq!(recovered["event_type"], "storage_recovered", "{recovered}");
    let lasted = recovered["data"]["outage_s"].as_f64().unwrap();
    let at_least = (freed_at - failed_at) as f64 / 1e6;
    assert!(
        lasted >= at_least - 0.1,
        "outage of {lasted} s reported; it lasted at least {at_least} s"
    );
    assert!(health_becomes(&daemon, 200).await);
    daemon.stop().await;
}

/// A database left by the previous schema (readings with their text columns and two
/// indexes, every reading event a row of its own) with a million readings upgrades in
/// place at start: every reading keeps its id, time and value, the events kept go on
/// replaying, and the next reading is its own event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_previous_schema_upgrades_in_place_with_nothing_lost() {
    // An emulated build (the ARM run under qemu) takes a tenth: a million would keep the
    // daemon from answering within the harness's patience there.
    let readings: i64 = if std::env::var_os("SENSORGATE_TEST_UNDER_QEMU").is_some() {
        100_000
    } else {
        1_000_000
    };
    const KEPT_EVENTS: i64 = 1000;
    let dir = temp_dir();
    let path = dir.path().join("sensorgate.db");
    let start = now_micros() - readings * 1_000_000;
    let before = {
        let mut db = rusqlite::Connection::open(&path).unwrap();
        db.pragma_update(None, "journal_mode", "WAL").unwrap();
        sensorgate::store::migrate_up_to(&mut db, 7).unwrap();
        let tx = db.transaction().unwrap();
        tx.execute_batch(
            "INSERT INTO sensors (id, tipo, modelo, nombre, created_at, updated_at) VALUES \
             (1, 'temperatura', 'DHT22', 'a', 0, 0), (2, 'temperatura', 'DHT22', 'b', 0, 0);",
        )
        .unwrap();
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO readings (id, sensor_id, ts, tipo, valor, unidad, hora_dudosa) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .unwrap();
            for id in 1..=readings {
                let (tipo, unidad) = if id % 2 == 0 {
                    ("temperatura", "°C")
                } else {
                    ("humedad", "%")
                };
                insert
                    .execute(rusqlite::params![
                        id,
                        1 + id % 3 / 2,
                        start + id * 1_000_000,
                        tipo,
                        (id % 1000) as f64 / 10.0,
                        unidad,
                        id % 97 == 0
                    ])
                    .unwrap();
            }
        }
        // Two sensors created (seq 1 and 2), then a reading event per reading, of which
        // retention kept the newest.
        tx.execute(
            "INSERT INTO events (seq, ts, channel, event_type, sensor_id, tipo, frame, \
             reading_id, valor, unidad, taken_at, hora_dudosa) \
             SELECT id + 2, ts + 5, 'readings', 'created', sensor_id, tipo, '', id, valor, \
             unidad, ts, hora_dudosa FROM readings WHERE id > ?1",
            [readings - KEPT_EVENTS],
        )
        .unwrap();
        tx.execute_batch(
            "INSERT INTO latest_readings (sensor_id, tipo, reading_id, ts) \
             SELECT sensor_id, tipo, MAX(id), MAX(ts) FROM readings GROUP BY sensor_id, tipo; \
             INSERT INTO rollup_hour (sensor_id, tipo, inicio, min, max, sum, count) \
             SELECT sensor_id, tipo, ts - ts % 3600000000, MIN(valor), MAX(valor), SUM(valor), COUNT(*) \
             FROM readings GROUP BY sensor_id, tipo, ts - ts % 3600000000;",
        )
        .unwrap();
        tx.commit().unwrap();
        checksum(&db)
    };

    let began = std::time::Instant::now();
    let daemon = Daemon::start_in(dir.path(), "").await;
    eprintln!(
        "upgraded {readings} readings and started in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let last = readings + 2;
    let (_, health) = daemon.get("/healthz").await;
    assert_eq!(health["storage"]["last_seq"], last);
    assert_eq!(health["storage"]["oldest_seq"], last - KEPT_EVENTS + 1);
    let (_, newest) = daemon.get("/api/v1/lecturas/?sensor_id=1&limit=1").await;
    assert_eq!(newest[0]["id"], readings, "{newest}");
    let (_, old) = daemon.get("/api/v1/lecturas/194").await;
    assert_eq!(old["hora_dudosa"], true, "{old}");
    assert_eq!(old["valor"], 19.4);

    // The kept events replay as they were sent; a new reading continues the log.
    let mut client = daemon
        .subscribe(&format!("/api/v1/ws?channel=readings&since={}", last - 2))
        .await;
    for seq in [last - 1, last] {
        let event = client.json().await;
        assert_eq!(event["seq"], seq);
        assert_eq!(event["entity_id"], seq - 2);
    }
    let (status, created) = daemon
        .post(
            "/api/v1/lecturas/",
            r#"{"sensor_id": 2, "tipo": "temperatura", "valor": 7.5, "unidad": "°C"}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["id"], last + 1);
    let event = client.json().await;
    assert_eq!(
        (event["seq"].as_i64(), event["entity_id"].as_i64()),
        (Some(last + 1), Some(last + 1))
    );
    let (_, hours) = daemon
        .get(&format!(
            "/api/v1/lecturas/agregadas?sensor_id=1&bucket=hour&desde={}&hasta={}",
            sensorgate::model::format_time(start),
            sensorgate::model::format_time(now_micros() + 3_600_000_000)
        ))
        .await;
    let counted = counted(&hours) as i64;
    assert!(counted > 0, "{hours}");
    daemon.stop().await;

    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute("DELETE FROM reading_rows WHERE id = ?1", [last + 1])
        .unwrap();
    assert_eq!(checksum(&db), before, "every reading as it was");
    let version: u32 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, sensorgate::store::SCHEMA_VERSION);
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// Count and sums over every column of every reading.
fn checksum(db: &rusqlite::Connection) -> (i64, i64, i64, f64, i64, String) {
    db.query_row(
        "SELECT COUNT(*), SUM(id), SUM(ts % 1000000007), SUM(valor), SUM(hora_dudosa), \
         group_concat(DISTINCT sensor_id || tipo || unidad) FROM readings",
        [],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )
    .unwrap()
}

/// Below the free-space floor the oldest raw readings go, a slice per pass, while the
/// roll-ups keep counting them, sampling goes on, and an event and a metric say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_floor_the_oldest_readings_go_and_the_rollups_stay() {
    let dir = temp_dir();
    // A floor of 90 % of the file system (the smaller of 90 % and 100 TB): this one is
    // rarely that empty. If it is, there is nothing to see here.
    let (free, total) = sensorgate::store::file_system_space(dir.path()).unwrap();
    if free > total / 100 * 85 {
        eprintln!("skipped: the file system is more than 85 % free");
        return;
    }
    let config = format!(
        "[storage]\nmin_free_percent = 90\nmin_free_mb = 100000000\nmaintenance_interval_s = 1\n{}",
        fast_sensors(2)
    );
    let daemon = Daemon::start_in(dir.path(), &config).await;
    let mut general = daemon.subscribe("/api/v1/ws?channel=general").await;
    let pruned = loop {
        let event = general.json().await;
        if event["event_type"] == "storage_pruned" {
            break event;
        }
    };
    assert!(
        pruned["data"]["removed_readings"].as_u64() > Some(0),
        "{pruned}"
    );
    assert!(pruned["data"]["free_bytes"].as_u64() < pruned["data"]["floor_bytes"].as_u64());
    let pruned_total = daemon.metric("sensorgate_storage_pruned_readings_total");
    assert!(pruned_total.await > Some(0.0));
    let (_, health) = daemon.get("/healthz").await;
    assert_eq!(health["status"], "ok", "nothing else breaks: {health}");
    assert!(health["storage"]["pruned_readings"].as_u64() > Some(0));

    // The roll-ups still count what the raw readings no longer hold.
    let id = common::sensor_named(&daemon, "s0").await;
    let range = format!(
        "desde={}&hasta={}",
        sensorgate::model::format_time(now_micros() - 3_600_000_000),
        sensorgate::model::format_time(now_micros() + 3_600_000_000)
    );
    let (_, raw) = daemon
        .get(&format!(
            "/api/v1/lecturas/?sensor_id={id}&limit=10000&{range}"
        ))
        .await;
    let (_, minutes) = daemon
        .get(&format!(
            "/api/v1/lecturas/agregadas?sensor_id={id}&bucket=minute&{range}"
        ))
        .await;
    let counted = counted(&minutes);
    assert!(
        counted > raw.as_array().unwrap().len() as u64,
        "roll-ups count {counted}, raw readings left {}",
        raw.as_array().unwrap().len()
    );
    // Sampling goes on.
    let mut readings = daemon.subscribe("/api/v1/ws?channel=readings").await;
    assert_eq!(readings.json().await["event_type"], "created");
    daemon.stop().await;
}

/// A write budget far below what the gateway writes widens the commit window, up to its
/// bound, and `/metrics` and `/healthz` show the rate against the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_budget_widens_the_commit_window() {
    let config = format!(
        "[storage]\ncommit_window_ms = 200\nwrite_budget_mb_per_day = 1\nmax_commit_window_ms = 1000\n{}",
        fast_sensors(4)
    );
    let daemon = Daemon::with(&config).await;
    assert_eq!(
        daemon
            .metric("sensorgate_storage_commit_window_seconds")
            .await,
        Some(0.2)
    );
    assert_eq!(
        daemon
            .metric("sensorgate_storage_write_budget_bytes_per_day")
            .await,
        Some(1e6)
    );
    let widened = tokio::time::timeout(common::PATIENCE * 4, async {
        loop {
            if daemon
                .metric("sensorgate_storage_commit_window_seconds")
                .await
                == Some(1.0)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(widened.is_ok(), "the window never reached its bound");
    let budget_used = daemon.metric("sensorgate_storage_write_budget_used_ratio");
    assert!(budget_used.await > Some(1.0));
    let (_, health) = daemon.get("/healthz").await;
    assert!(
        health["storage"]["written_bytes_per_day"].as_u64() > Some(1_000_000),
        "{health}"
    );
    assert_eq!(health["storage"]["commit_window_ms"], 1000);
    daemon.stop().await;
}

/// A reading that arrives late (taken long before those stored around it) starts an id
/// range of its own in its second rather than widening one over everything stored since,
/// and queries by time find it and the others alike.
#[tokio::test]
async fn a_late_reading_is_found_by_time_without_widening_its_second() {
    let daemon = Daemon::with(NO_RATE_LIMIT).await;
    let id = sensor(&daemon).await;
    let now = now_micros();
    let old = now - 200 * DAY;
    reading(&daemon, id, "temperatura", old, 1.0).await;
    for i in 0..300 {
        reading(&daemon, id, "temperatura", now - i * 1000, 20.0).await;
    }
    // The second of the first reading again, 300 readings later.
    reading(&daemon, id, "temperatura", old + 1, 2.0).await;
    let found = format!(
        "/api/v1/lecturas/?sensor_id={id}&desde={}&hasta={}&order=asc",
        format_time(old),
        format_time(old + 1_000_000)
    );
    assert_eq!(valores(&daemon, &found).await, [1.0, 2.0]);
    let dir = daemon.stop().await.unwrap();
    let db = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    let widest: i64 = db
        .query_row(
            "SELECT MAX(last_id - first_id) FROM reading_seconds WHERE second = ?1",
            [old / 1_000_000],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(widest, 0, "each of the two readings has a range of its own");
}
