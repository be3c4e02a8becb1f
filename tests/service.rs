//! The binary under a service manager: readiness, status, a watchdog that stops when the
//! daemon stops making progress, STOPPING on SIGTERM, and reload on SIGHUP.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{write_config, Process};
use common::Client;

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

    /// Waits for READY=1 from `daemon`; fails with its log.
    fn wait_ready(&self, daemon: &Process) {
        let ready = self.wait_for("READY=1", Duration::from_secs(10));
        assert_eq!(ready.as_deref(), Some("READY=1"), "{}", daemon.log());
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

/// Starts the daemon on `config` as a service manager would, with the notification socket
/// in `dir` and a watchdog of `watchdog_usec` if given; its log in `dir/daemon.log`.
fn start(dir: &Path, config: &Path, watchdog_usec: Option<u64>) -> Process {
    let socket = dir.join("notify.sock");
    let watchdog = watchdog_usec.map(|usec| usec.to_string());
    let mut env = vec![("NOTIFY_SOCKET", socket.as_os_str())];
    if let Some(usec) = &watchdog {
        env.push(("WATCHDOG_USEC", usec.as_ref()));
    }
    Process::start(config, &dir.join("daemon.log"), &env)
}

/// A daemon with `sensors` under a fake service manager, ready.
struct Service {
    dir: tempfile::TempDir,
    manager: Manager,
    daemon: Process,
}

impl Service {
    fn start(sensors: &str, watchdog_usec: Option<u64>) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let manager = Manager::bind(dir.path());
        let config = write_config(dir.path(), sensors);
        let daemon = start(dir.path(), &config, watchdog_usec);
        manager.wait_ready(&daemon);
        Service {
            dir,
            manager,
            daemon,
        }
    }
}

fn sim_sensor(name: &str, extra: &str) -> String {
    let source = format!("{{ kind = \"sim\", seed = 1{extra} }}");
    common::sensor_table(name, "temperatura", "DHT22", 0.1, &source)
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
    let mut service = Service::start(&sim_sensor("a", ""), Some(1_000_000));
    let notes = service.manager.collect(Duration::from_millis(2600));
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

    service.daemon.signal("TERM");
    assert_eq!(
        service
            .manager
            .wait_for("STOPPING=1", Duration::from_secs(5))
            .as_deref(),
        Some("STOPPING=1")
    );
    assert!(service.daemon.wait_exit().success());
}

/// Lets this test hold the database's lock from outside while the daemon runs, which
/// stands in for a stuck card; the default exclusive locking keeps other processes out.
const SHARED_LOCKING: &str = "locking = \"shared\"\n";

/// Holding the database's write lock from outside wedges the writer, as a stuck card
/// would: the watchdog stops until the lock goes.
#[test]
fn watchdog_stops_while_the_writer_is_wedged() {
    let sensors = format!("{SHARED_LOCKING}{}", sim_sensor("a", ""));
    let mut service = Service::start(&sensors, Some(1_000_000));
    assert!(service
        .manager
        .wait_for("WATCHDOG=1", Duration::from_secs(3))
        .is_some());

    let db = rusqlite::Connection::open(service.dir.path().join("data/sensorgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let locked = Instant::now();
    let during = service.manager.collect(Duration::from_millis(3500));
    db.execute_batch("COMMIT").unwrap();
    let after = service.manager.collect(Duration::from_millis(3000));

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
        service
            .daemon
            .log()
            .contains("watchdog withheld: storage writer"),
        "{}",
        service.daemon.log()
    );
    service.daemon.signal("TERM");
    assert!(service.daemon.wait_exit().success());
}

/// A stop asked for while the daemon is still starting (here: waiting to write a new
/// configured sensor behind a lock held from outside) is a clean stop, not a death by
/// the signal with the queued work unwritten.
#[test]
fn sigterm_during_start_up_stops_cleanly() {
    let mut service = Service::start(&sim_sensor("a", ""), None);
    service.daemon.signal("TERM");
    assert!(service.daemon.wait_exit().success());

    let sensors = format!(
        "{SHARED_LOCKING}{}{}",
        sim_sensor("a", ""),
        sim_sensor("b", "")
    );
    let config = write_config(service.dir.path(), &sensors);
    let db = rusqlite::Connection::open(service.dir.path().join("data/sensorgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut child = start(service.dir.path(), &config, None);
    assert!(child.wait_for_log("storage open at"), "{}", child.log());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !child.log().contains("ready:"),
        "started before the lock was released: {}",
        child.log()
    );
    child.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    db.execute_batch("COMMIT").unwrap();
    let status = child.wait_exit();
    assert!(status.success(), "{status}: {}", child.log());
    assert!(
        child.log().contains("storage writer stopped"),
        "{}",
        child.log()
    );
}

/// A sampling thread stuck in a read (a hung driver) stops the watchdog.
#[test]
fn watchdog_stops_when_sampling_hangs() {
    let mut service = Service::start(&sim_sensor("a", ", hang_after_reads = 3"), Some(1_000_000));
    // The thread hangs after 0.3 s; it counts as stuck after twice its pace (at least
    // 1 s each) plus 5 s for a slow read.
    let notes = service.manager.collect(Duration::from_secs(9));
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
        service
            .daemon
            .log()
            .contains("sampling stuck for sensors [1]"),
        "{}",
        service.daemon.log()
    );
    service.daemon.signal("KILL");
    let _ = service.daemon.wait_exit();
}

#[tokio::test]
async fn sighup_adds_and_removes_sources_without_dropping_clients() {
    let mut service = Service::start(&sim_sensor("a", ""), None);
    let addr = service
        .daemon
        .address()
        .expect("the daemon logs its address");
    let mut client = Client::connect(addr.parse().unwrap(), "/api/v1/ws?channel=sensors")
        .await
        .greeted()
        .await;

    write_config(service.dir.path(), &sim_sensor("b", ""));
    service.daemon.signal("HUP");
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

    std::fs::write(service.dir.path().join("config.toml"), "[server\nbroken").unwrap();
    service.daemon.signal("HUP");
    assert!(
        service.daemon.wait_for_log("configuration not reloaded"),
        "{}",
        service.daemon.log()
    );
    // Still serving, the same client still connected and hearing events, none of them
    // from the invalid file: the answer to a ping is the next thing it hears.
    client.send_text(r#"{"type": "ping", "id": 1}"#).await;
    assert_eq!(
        client.json().await["type"],
        "pong",
        "an invalid file changes nothing"
    );
    service.daemon.signal("TERM");
    assert!(service.daemon.wait_exit().success());
}
