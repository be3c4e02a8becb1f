//! The binary under a service manager: readiness, status, a watchdog that stops when the
//! daemon stops making progress, STOPPING on SIGTERM, and reload on SIGHUP.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sensorgate");

/// A fake service manager: the datagram socket systemd would give as NOTIFY_SOCKET.
struct Manager {
    socket: UnixDatagram,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let socket = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Manager { socket }
    }

    /// Every notification received within `wait`, with its arrival time.
    fn collect(&self, wait: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                for line in text.lines() {
                    got.push((Instant::now(), line.to_owned()));
                }
            }
        }
        got
    }

    /// Waits for READY=1 from the daemon whose log is in `dir`; fails with the log.
    fn wait_ready(&self, dir: &Path) {
        let ready = self.wait_for("READY=1", Duration::from_secs(10));
        assert_eq!(ready.as_deref(), Some("READY=1"), "{}", log(dir));
    }

    /// Waits for a notification starting with `prefix`.
    fn wait_for(&self, prefix: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
                    return Some(line.to_owned());
                }
            }
        }
        None
    }
}

fn write_config(dir: &Path, sensors: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = {:?}\n{sensors}",
        dir.join("data").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn sim_sensor(name: &str, extra: &str) -> String {
    format!(
        "[[sensor]]\nname = \"{name}\"\ntipo = \"temperatura\"\nmodelo = \"DHT22\"\ninterval_s = 0.1\nsource = {{ kind = \"sim\", seed = 1{extra} }}\n"
    )
}

fn start(dir: &Path, config: &Path, watchdog_usec: Option<u64>) -> Child {
    let mut command = Command::new(BIN);
    command
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
    if let Some(usec) = watchdog_usec {
        command.env("WATCHDOG_USEC", usec.to_string());
    }
    command.spawn().unwrap()
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

fn watchdogs(notes: &[(Instant, String)]) -> Vec<Instant> {
    notes
        .iter()
        .filter(|(_, n)| n == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let config = write_config(dir.path(), &sim_sensor("a", ""));
    let mut child = start(dir.path(), &config, Some(1_000_000));

    manager.wait_ready(dir.path());
    let notes = manager.collect(Duration::from_millis(2600));
    let beats = watchdogs(&notes);
    assert!(
        beats.len() >= 3,
        "expected a WATCHDOG=1 every 0.5 s: {notes:?}"
    );
    // The newest: under load the first may come before the sensor's first sample.
    let status = notes
        .iter()
        .map(|(_, n)| n)
        .rfind(|n| n.starts_with("STATUS="))
        .expect("a status line");
    assert!(status.contains("1 sensors online"), "{status}");
    assert!(status.contains("clients connected"), "{status}");

    signal(&child, "TERM");
    assert_eq!(
        manager
            .wait_for("STOPPING=1", Duration::from_secs(5))
            .as_deref(),
        Some("STOPPING=1")
    );
    assert!(wait_exit(&mut child).success());
}

/// Holding the database's write lock from outside wedges the writer, as a stuck card
/// would: the watchdog stops until the lock goes.
#[test]
fn watchdog_stops_while_the_writer_is_wedged() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let config = write_config(dir.path(), &sim_sensor("a", ""));
    let mut child = start(dir.path(), &config, Some(1_000_000));
    manager.wait_ready(dir.path());
    assert!(manager
        .wait_for("WATCHDOG=1", Duration::from_secs(3))
        .is_some());

    let db = rusqlite::Connection::open(dir.path().join("data/sensorgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let locked = Instant::now();
    let during = manager.collect(Duration::from_millis(3500));
    db.execute_batch("COMMIT").unwrap();
    let after = manager.collect(Duration::from_millis(3000));

    let petted: Vec<_> = watchdogs(&during)
        .into_iter()
        .filter(|t| t.duration_since(locked) > Duration::from_millis(1200))
        .collect();
    assert!(
        petted.is_empty(),
        "WATCHDOG=1 while the writer was wedged: {during:?}"
    );
    assert!(
        !watchdogs(&after).is_empty(),
        "no WATCHDOG=1 after the writer recovered"
    );
    assert!(
        log(dir.path()).contains("watchdog withheld: storage writer"),
        "{}",
        log(dir.path())
    );
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success());
}

/// A stop asked for while the daemon is still starting (here: waiting to write a new
/// configured sensor behind a lock held from outside) is a clean stop, not a death by
/// the signal with the queued work unwritten.
#[test]
fn sigterm_during_start_up_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let config = write_config(dir.path(), &sim_sensor("a", ""));
    let mut child = start(dir.path(), &config, None);
    manager.wait_ready(dir.path());
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success());

    let sensors = format!("{}{}", sim_sensor("a", ""), sim_sensor("b", ""));
    let config = write_config(dir.path(), &sensors);
    let db = rusqlite::Connection::open(dir.path().join("data/sensorgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut child = start(dir.path(), &config, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log(dir.path()).contains("storage open at") {
        assert!(Instant::now() < deadline, "{}", log(dir.path()));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !log(dir.path()).contains("ready:"),
        "started before the lock was released: {}",
        log(dir.path())
    );
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(300));
    db.execute_batch("COMMIT").unwrap();
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status}: {}", log(dir.path()));
    assert!(
        log(dir.path()).contains("storage writer stopped"),
        "{}",
        log(dir.path())
    );
}

/// A sampling thread stuck in a read (a hung driver) stops the watchdog.
#[test]
fn watchdog_stops_when_sampling_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let config = write_config(dir.path(), &sim_sensor("a", ", hang_after_reads = 3"));
    let mut child = start(dir.path(), &config, Some(1_000_000));
    manager.wait_ready(dir.path());
    // The thread hangs after 0.3 s; it counts as stuck after twice its pace (at least
    // 1 s each) plus 5 s for a slow read.
    let notes = manager.collect(Duration::from_secs(9));
    let last = watchdogs(&notes)
        .into_iter()
        .last()
        .expect("watchdog before the hang");
    let quiet_since = notes.last().unwrap().0.duration_since(last);
    assert!(
        quiet_since > Duration::from_secs(1),
        "watchdog still petted: {notes:?}"
    );
    assert!(
        log(dir.path()).contains("sampling stuck for sensors [1]"),
        "{}",
        log(dir.path())
    );
    signal(&child, "KILL");
    let _ = wait_exit(&mut child);
}

#[tokio::test]
async fn sighup_adds_and_removes_sources_without_dropping_clients() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let config = write_config(dir.path(), &sim_sensor("a", ""));
    let mut child = start(dir.path(), &config, None);
    manager.wait_ready(dir.path());
    let log_text = log(dir.path());
    let addr = log_text
        .lines()
        .find_map(|l| l.split("listening on http://").nth(1))
        .map(|a| a.trim_end_matches('/').to_owned())
        .expect("the daemon logs its address");

    let url = format!("ws://{addr}/api/v1/ws?channel=sensors");
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut client = common::Client { socket }.greeted().await;

    write_config(dir.path(), &sim_sensor("b", ""));
    signal(&child, "HUP");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = client.json().await;
        seen.push((
            event["event_type"].as_str().unwrap().to_owned(),
            event["data"]["nombre"].as_str().unwrap().to_owned(),
            event["data"]["activo"].as_bool().unwrap(),
        ));
    }
    assert!(
        seen.contains(&("created".into(), "b".into(), true)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("updated".into(), "a".into(), false)),
        "{seen:?}"
    );

    std::fs::write(&config, "[server\nbroken").unwrap();
    signal(&child, "HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        log(dir.path()).contains("configuration not reloaded"),
        "{}",
        log(dir.path())
    );
    // Still serving, the same client still connected and hearing events.
    assert_eq!(
        client.next_within(Duration::from_millis(300)).await,
        None,
        "an invalid file changes nothing"
    );
    client.send_text(r#"{"type": "ping", "id": 1}"#).await;
    assert_eq!(client.json().await["type"], "pong");
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success());
}
