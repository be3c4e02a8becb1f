//! The `sensorgate` binary as a user runs it: the demo, the config commands, signals.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{check_config, http, sensorgate, Run, BIN};
use serde_json::Value;

/// `GET path` from a daemon this test started as a child, as JSON.
fn http_get(addr: &str, path: &str) -> Option<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = http::Client::new(addr.parse().ok()?);
    let response = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), client.get(path)).await });
    serde_json::from_slice(&response.ok()?.ok()?.body).ok()
}

#[test]
fn demo_samples_every_kind_of_source_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    // Read stdout to its end on a thread, so the daemon never writes into a closed pipe.
    let (found, address) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(url) = line.trim().strip_prefix("dashboard:") {
                let addr = url
                    .trim()
                    .trim_start_matches("http://")
                    .trim_end_matches('/');
                let _ = found.send(addr.to_owned());
            }
        }
    });
    let addr = address
        .recv_timeout(Duration::from_secs(30))
        .expect("the demo prints its URLs");

    let kinds = ["sim", "serial", "iio_dht", "iio", "w1"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sampled: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        if let Some(Value::Array(sensors)) = http_get(&addr, "/api/v1/sensores/") {
            sampled = sensors
                .iter()
                .filter(|s| s["salud"]["conteo"]["ok"].as_u64().unwrap_or(0) > 0)
                .map(|s| s["fuente"]["kind"].as_str().unwrap_or("").to_owned())
                .collect();
            if kinds.iter().all(|k| sampled.iter().any(|s| s == k)) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    for kind in kinds {
        assert!(
            sampled.iter().any(|s| s == kind),
            "no good sample from a {kind} source: {sampled:?}\n{}",
            log()
        );
    }
    let readings = http_get(&addr, "/api/v1/lecturas/?limit=50").unwrap();
    assert!(readings.as_array().unwrap().len() >= 5);

    let status = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    assert!(dir.path().join("sensorgate.db").exists());
}

#[test]
fn help_version_and_default_config() {
    let help = sensorgate(["--help"]);
    assert!(help.ok);
    assert!(help.stdout.contains("--demo"));
    let version = sensorgate(["--version"]);
    assert_eq!(
        version.stdout.trim(),
        format!("sensorgate {}", env!("CARGO_PKG_VERSION"))
    );
    let default = sensorgate(["print-default-config"]);
    assert!(default.ok);
    assert_eq!(default.stdout, sensorgate::config::DEFAULT_CONFIG);
    let unknown = sensorgate(["--frobnicate"]);
    assert_eq!(unknown.code, Some(2));
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let ok = check_config(dir.path(), "good.toml", sensorgate::config::DEFAULT_CONFIG);
    assert!(ok.ok, "{}", ok.stderr);

    let out = check_config(
        dir.path(),
        "bad.toml",
        "[server]\nlisten = \"127.0.0.1:8000\"\nmax_conections = 5\n",
    );
    assert_eq!(out.code, Some(1));
    let message = out.stderr;
    assert!(message.contains("bad.toml"), "{message}");
    assert!(message.contains("line 3"), "{message}");
    assert!(message.contains("max_conections"), "{message}");

    let out = check_config(dir.path(), "invalid.toml", "[[sensor]]\nname = \"a\"\ntipo = \"t\"\nmodelo = \"m\"\ninterval_s = 0\nsource = { kind = \"sim\" }\n");
    let message = out.stderr;
    assert!(!out.ok);
    assert!(message.contains("interval_s"), "{message}");
    assert!(message.contains("line 5"), "{message}");
}

#[test]
fn token_and_backup_commands_refuse_a_data_directory_without_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("sensorgat");
    let database = typo.join("sensorgate.db");
    let backup = dir.path().join("copy.db");
    for args in [
        vec!["token", "create", "--name", "kitchen", "--scope", "write"],
        vec!["token", "list"],
        vec!["token", "revoke", "kitchen"],
        vec!["backup", backup.to_str().unwrap()],
    ] {
        let mut full: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        full.extend(["--data-dir".as_ref(), typo.as_os_str()]);
        let Run {
            ok, stdout, stderr, ..
        } = sensorgate(&full);
        assert!(!ok, "{args:?} must fail: {stdout}");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        assert!(
            stderr.contains(&format!("no database at {}", database.display())),
            "{args:?}: {stderr}"
        );
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
        assert!(!backup.exists());
    }
}

#[test]
fn messages_name_what_they_are_about() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(
        sensorgate::store::open_database(&sensorgate::store::StorageConfig {
            data_dir: data.clone(),
            ..Default::default()
        })
        .unwrap(),
    );
    let data_dir = data.as_os_str();

    // Token list: every column starts where its heading does, whatever the name's length.
    for (name, scope) in [
        ("a-token-for-the-greenhouse-controller", "admin"),
        ("b", "read"),
    ] {
        let Run { ok, stderr, .. } = sensorgate([
            "token".as_ref(),
            "create".as_ref(),
            "--name".as_ref(),
            name.as_ref(),
            "--scope".as_ref(),
            scope.as_ref(),
            "--data-dir".as_ref(),
            data_dir,
        ]);
        assert!(ok, "{stderr}");
    }
    let Run {
        ok,
        stdout: list,
        stderr,
        ..
    } = sensorgate([
        "token".as_ref(),
        "list".as_ref(),
        "--data-dir".as_ref(),
        data_dir,
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    for heading in ["SCOPE", "CREATED", "LAST USED"] {
        let column = lines[0].find(heading).unwrap();
        for line in &lines[1..] {
            assert!(
                column > 0
                    && line.as_bytes()[column - 1] == b' '
                    && line.as_bytes()[column] != b' ',
                "{heading} not aligned:\n{list}"
            );
        }
    }

    // A backup onto an existing file talks about the backup file.
    let existing = dir.path().join("existing.db");
    std::fs::write(&existing, "keep me").unwrap();
    let Run { ok, stderr, .. } = sensorgate([
        "backup".as_ref(),
        existing.as_os_str(),
        "--data-dir".as_ref(),
        data_dir,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "backup file {} exists already",
            existing.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("data directory"), "{stderr}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");

    // One sensor is one sensor.
    let Run {
        ok, stdout, stderr, ..
    } = check_config(
        dir.path(),
        "one.toml",
        "[[sensor]]\nname = \"a\"\ntipo = \"temperatura\"\nmodelo = \"m\"\ninterval_s = 5\nsource = { kind = \"sim\" }\n",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (1 sensor)"), "{stdout}");

    // A data directory the daemon cannot create or write is named.
    let blocked = existing.join("data");
    let out = sensorgate([
        OsStr::new("--listen"),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        blocked.as_ref(),
    ]);
    let stderr = out.stderr;
    assert!(!out.ok);
    assert!(
        stderr.contains(&blocked.join("sensorgate.db").display().to_string()),
        "{stderr}"
    );
}

#[test]
fn check_config_reports_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.toml");
    let sensor = |name: &str, interval: &str| {
        format!(
            "[[sensor]]\nname = \"{name}\"\ntipo = \"temperatura\"\nmodelo = \"m\"\ninterval_s = {interval}\nsource = {{ kind = \"sim\" }}\n"
        )
    };
    let text = format!(
        "[server]\nmax_connections = 0\n[storage]\nmax_events = 0\n{}{}{}",
        sensor("a", "5"),
        sensor("b", "0"),
        sensor("a", "5"),
    );
    std::fs::write(&path, &text).unwrap();
    let Run { ok, stderr, .. } = sensorgate(["check-config".as_ref(), path.as_os_str()]);
    assert!(!ok);
    let lines: Vec<&str> = stderr.lines().collect();
    let expected = [
        ("line 2", "server.max_connections"),
        ("line 4", "storage.max_events"),
        ("line 15", "sensor \"b\": interval_s"),
        // The second definition of "a", not the first.
        ("line 18", "sensor \"a\": name is used twice"),
    ];
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, (at, about)) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(&format!("{}: {at}: ", path.display())) && line.contains(about),
            "expected {at} about {about}, got: {line}\n{stderr}"
        );
    }
}

#[test]
fn check_config_names_the_line_of_a_bad_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calibration.toml");
    let text = "[[sensor]]\nname = \"aula\"\ntipo = \"temperatura\"\nmodelo = \"DHT22\"\n\
                source = { kind = \"sim\" }\nderive = [\"vpd\"]\n\
                calibration = { temperatura = { scale = 0 }, co2 = { offset = 1 } }\n";
    std::fs::write(&path, text).unwrap();
    let Run { ok, stderr, .. } = sensorgate(["check-config".as_ref(), path.as_os_str()]);
    assert!(!ok);
    let lines: Vec<&str> = stderr.lines().collect();
    let expected = [
        "line 7: sensor \"aula\": calibration.co2 unknown tipo",
        "line 7: sensor \"aula\": calibration.temperatura.scale must not be 0",
    ];
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, about) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(&format!("{}: {about}", path.display())),
            "expected {about}, got: {line}\n{stderr}"
        );
    }
}
