//! Slow, vanishing and silent clients: closed or dropped without holding up the
//! others, the sampling or the writer; unanswered pings close the socket.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::events::*;
use common::{http, Client, Daemon, Received, PATIENCE};
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Every test holds this shared, except the one that measures the process's memory,
/// which holds it alone: every test's daemon runs in this one process.
static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn resident_memory_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The `seq` of an event frame without parsing all of it (`seq` is its last field);
/// for clients that read megabytes of frames.
fn frame_seq(text: &str) -> u64 {
    let at = text.rfind("\"seq\":").expect("an event frame") + 6;
    text[at..]
        .trim_end_matches('}')
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no seq at the end of {}", &text[at..]))
}

/// A client that never reads is closed (4008, with the `since` to resume from) while ten
/// others keep receiving every event, and memory stays bounded.
///
/// Loopback socket buffers absorb a MB or more before the daemon's writes block, and a
/// reading's frame is a few hundred bytes, so the slow client's socket is first filled
/// with sensor updates whose frames carry a 48 KB `fuente` (every client follows
/// `sensors` and `readings`), then 400 readings spread over 50 sensors, too many for
/// coalescing to save it, overflow its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_and_others_get_every_event() {
    let _gate = GATE.write().await;
    let (daemon, mut http) = Daemon::open("[realtime]\nclient_queue = 16\n")
        .await
        .with_http();
    let sensors = http.create_sensors(50).await;
    let memory_before = resident_memory_kib();
    let start = daemon.last_seq().await;
    let path = "/api/v1/ws?channel=sensors,readings";

    // The slow client reads nothing until the daemon has given up on it, then reads
    // what is left: what was in flight, and the Close frame.
    let mut slow = Client::with_small_buffer(daemon.addr, path).await;
    let addr = daemon.addr;
    let slow_client = tokio::spawn(async move {
        let mut http = http::Client::new(addr);
        // Generous: a loaded machine takes its time to fill the socket and the queue.
        let deadline = Instant::now() + PATIENCE * 4;
        let mut peak_queued = 0;
        while Instant::now() < deadline {
            let (_, stats) = http.call("GET", "/api/v1/ws/stats", None).await;
            peak_queued = peak_queued.max(stats["queued_frames"].as_u64().unwrap());
            if stats["channels"]["readings"]["slow_disconnects"].as_u64() >= Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut seqs = Vec::new();
        loop {
            match slow.next().await {
                Received::Json(event) if event["type"] == "entity_event" => seqs.push(seq(&event)),
                Received::Json(greeting) => assert!(
                    greeting["type"] == "connection" || greeting["type"] == "stats",
                    "{greeting}"
                ),
                Received::Closed(code, reason) => return (seqs, code, reason, peak_queued),
            }
        }
    });

    let target = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut client = daemon.subscribe(path).await;
        let target = target.clone();
        readers.push(tokio::spawn(async move {
            let deadline = Instant::now() + PATIENCE * 5;
            let mut got = Vec::new();
            while got
                .last()
                .is_none_or(|&s| s < target.load(Ordering::Relaxed))
            {
                assert!(Instant::now() < deadline, "reader timed out");
                match tokio::time::timeout(Duration::from_millis(100), client.socket.next()).await {
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Text(text)))) => got.push(frame_seq(&text)),
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                    Ok(other) => return (got, Some(format!("{other:?}")), client),
                }
            }
            (got, None, client)
        }));
    }
    assert_eq!(ws_stats(&daemon).await["total_connections"], 11);

    // First the updates, which stop the slow client's socket, then the readings, which
    // overflow its queue for good.
    let filler = "x".repeat(48 * 1024);
    for i in 0..100 {
        let body = big_update(i, &filler);
        http.put(
            &format!("/api/v1/sensores/{}", sensors[i % sensors.len()]),
            &body,
        )
        .await;
    }
    let readings: Vec<_> = (0..2)
        .map(|p| {
            let mine: Vec<i64> = sensors.iter().skip(p).step_by(2).copied().collect();
            post_in_background(daemon.addr, mine, 200)
        })
        .collect();
    for poster in readings {
        assert_eq!(poster.await.unwrap().len(), 200);
    }
    let end = daemon.last_seq().await;
    assert_eq!(end, start + 500);
    target.store(end, Ordering::Relaxed);
    let mut expected = stored_seqs(daemon.dir(), "readings", start, end);
    expected.extend(stored_seqs(daemon.dir(), "sensors", start, end));
    expected.sort_unstable();
    assert_eq!(expected, (start + 1..=end).collect::<Vec<_>>());
    let mut normal = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let (got, closed, client) = reader.await.unwrap();
        normal.push(client);
        assert_eq!(
            closed,
            None,
            "normal client {i} ended after {} events",
            got.len()
        );
        assert!(
            got == expected,
            "normal client {i} missed or repeated events: got {} of {}",
            got.len(),
            expected.len()
        );
    }

    let (slow_seqs, code, reason, peak_queued) = slow_client.await.unwrap();
    assert_eq!(code, Some(4008), "{reason}");
    let resume_from: u64 = reason
        .split("since=")
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no since= in {reason:?}"));
    assert!(
        slow_seqs.len() < expected.len(),
        "the slow client got everything"
    );
    assert!(slow_seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(
        resume_from == 0 || slow_seqs.contains(&resume_from),
        "resume point {resume_from} was never delivered"
    );
    let counted = wait_for_stats(&daemon, "back to ten connections", |s| {
        s["total_connections"] == 10
    })
    .await;
    assert_eq!(counted["channels"]["readings"]["slow_disconnects"], 1);
    assert_eq!(counted["channels"]["sensors"]["slow_disconnects"], 1);
    assert_eq!(counted["channels"]["readings"]["connections"], 10);

    // Memory: at most `client_queue` frames wait per client while the slow one is
    // stuck, and the process as a whole stays small.
    assert!(
        peak_queued <= 11 * 16,
        "{peak_queued} frames queued for 11 clients"
    );
    let grown_mib = resident_memory_kib().saturating_sub(memory_before) / 1024;
    assert!(grown_mib < 100, "memory grew by {grown_mib} MiB");
    drop(normal);
    daemon.stop().await;
}

/// Live clients that have everything are written to by one task, past their sessions,
/// until one stops reading and its socket fills: then its session takes over, with
/// what the socket did not take, and hands it back once the client has caught up. A
/// client that pauses while large frames arrive, one that wants a single sensor's
/// readings and one that wants no readings (they follow the hub's other ring) each get
/// exactly their events, once and in order, and nobody is dropped.
#[tokio::test]
async fn clients_that_pause_or_filter_while_live_get_their_events_once_in_order() {
    let _gate = GATE.read().await;
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let sensors = http.create_sensors(10).await;
    let start = daemon.last_seq().await;
    let mut paused = Client::with_small_buffer(daemon.addr, "/api/v1/ws?channel=sensors,readings")
        .await
        .greeted()
        .await;
    let one_sensor = format!("/api/v1/ws?channel=readings&sensor_id={}", sensors[0]);
    let mut filtered = daemon.subscribe(&one_sensor).await;
    let mut quiet = daemon.subscribe("/api/v1/ws?channel=sensors").await;

    // Rounds of large updates (several MB in all, more than loopback buffers hold for a
    // client with a small receive buffer) and readings, while `paused` reads nothing.
    let filler = "x".repeat(48 * 1024);
    for round in 0..4 {
        for i in 0..15 {
            let body = big_update(round * 15 + i, &filler);
            http.put(
                &format!("/api/v1/sensores/{}", sensors[i % sensors.len()]),
                &body,
            )
            .await;
        }
        let posted = post_in_background(daemon.addr, sensors.clone(), 50)
            .await
            .unwrap();
        assert_eq!(posted.len(), 50);
    }
    let end = daemon.last_seq().await;
    let readings = stored(daemon.dir(), "readings", start, end);
    let updates = stored_seqs(daemon.dir(), "sensors", start, end);
    let mut every = updates.clone();
    every.extend(readings.iter().map(|r| r.seq));
    every.sort_unstable();
    assert_eq!(every, (start + 1..=end).collect::<Vec<_>>());
    let of_one_sensor: Vec<u64> = readings
        .iter()
        .filter(|r| r.frame["data"]["sensor_id"] == sensors[0])
        .map(|r| r.seq)
        .collect();
    assert_eq!(of_one_sensor.len(), 20);

    async fn seqs_until(client: &mut Client, last: u64, who: &str) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.last().is_none_or(|&s| s < last) {
            match client.next().await {
                Received::Json(event) if event["type"] == "entity_event" => {
                    seqs.push(event["seq"].as_u64().unwrap())
                }
                Received::Json(_) => {}
                Received::Closed(code, reason) => panic!("{who} closed: {code:?} {reason}"),
            }
        }
        seqs
    }
    assert_eq!(seqs_until(&mut paused, end, "paused").await, every);
    assert_eq!(
        seqs_until(&mut filtered, *of_one_sensor.last().unwrap(), "filtered").await,
        of_one_sensor
    );
    assert_eq!(
        seqs_until(&mut quiet, *updates.last().unwrap(), "quiet").await,
        updates
    );

    // Caught up, `paused` is written to as the others are: the next event reaches all
    // three, and nothing more.
    let next = http.reading(sensors[0], "temperatura", 1.0).await;
    let seq = daemon.last_seq().await;
    assert_eq!(seqs_until(&mut paused, seq, "paused").await, [seq]);
    assert_eq!(seqs_until(&mut filtered, seq, "filtered").await, [seq]);
    assert!(next["id"].is_i64());
    quiet.assert_quiet(&daemon, "sensors", "a reading").await;
    let stats = ws_stats(&daemon).await;
    assert_eq!(stats["channels"]["sensors"]["slow_disconnects"], 0);
    assert_eq!(stats["channels"]["readings"]["slow_disconnects"], 0);
    daemon.stop().await;
}

/// Panics outside test code on threads named `threads`, recorded from the moment this is
/// first called. The daemon runs in-process, so a panic in one of its tasks (which tokio
/// catches, and which aborts the release build) shows up here, on the worker threads of
/// the runtime the test runs it on.
fn daemon_panics(threads: &str) -> Vec<String> {
    static PANICS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"));
            if !in_tests {
                let thread = std::thread::current().name().unwrap_or("").to_owned();
                PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((thread, info.to_string()));
            }
            previous(info);
        }));
    });
    PANICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(thread, _)| thread == threads)
        .map(|(_, panic)| panic.clone())
        .collect()
}

/// Runs a test on a runtime of its own whose worker threads are named `name`, so that
/// [`daemon_panics`] can tell its daemon's panics from other tests', holding [`GATE`] shared.
fn run_on_named_runtime(name: &str, test: impl std::future::Future<Output = ()>) {
    daemon_panics(name);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let _gate = GATE.read().await;
            test.await
        })
}

fn assert_no_daemon_panics(threads: &str) {
    let panics = daemon_panics(threads);
    assert!(panics.is_empty(), "daemon tasks panicked: {panics:#?}");
}

/// Clients that vanish (connection reset) while events stream to them end their sessions
/// cleanly: no task of the daemon panics, the connections are uncounted, and everyone
/// else carries on. Whether the daemon notices a reset first on the read or the write
/// side is up to timing, so many clients vanish, each while events keep flowing.
#[test]
fn clients_vanishing_mid_stream_end_their_sessions_cleanly() {
    run_on_named_runtime("vanishing-clients", async {
        let (daemon, mut http) = Daemon::open("").await.with_http();
        let sensor = http.create_sensor("temperatura").await;
        let mut steady = daemon.subscribe("/api/v1/ws?channel=readings").await;

        let start = daemon.last_seq().await;
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (stop, addr) = (stop.clone(), daemon.addr);
            tokio::spawn(async move {
                let mut http = http::Client::new(addr);
                let mut posted = 0;
                while !stop.load(Ordering::Relaxed) {
                    http.reading(sensor, "temperatura", 1.0).await;
                    posted += 1;
                }
                posted
            })
        };
        for _ in 0..60 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            let stream = socket.connect(daemon.addr).await.unwrap();
            stream.set_zero_linger().unwrap();
            let (socket, _) = tokio_tungstenite::client_async(
                format!("ws://{}/api/v1/ws?channel=readings", daemon.addr),
                tokio_tungstenite::MaybeTlsStream::Plain(stream),
            )
            .await
            .expect("websocket connects");
            let mut client = Client { socket };
            // Take a few events, then vanish without a close handshake.
            for _ in 0..5 {
                client.next().await;
            }
            drop(client);
        }
        stop.store(true, Ordering::Relaxed);
        let posted = producer.await.unwrap();
        let end = daemon.last_seq().await;
        let got = events_until(&mut steady, end).await;
        assert_eq!(got.len(), posted);
        assert_exactly_stored(daemon.dir(), "readings", start, &got);
        wait_for_stats(&daemon, "uncounted the vanished clients", |s| {
            s["total_connections"] == 1
        })
        .await;
        let (status, health) = daemon.get("/healthz").await;
        assert_eq!(status, 200, "{health}");
        assert_no_daemon_panics("vanishing-clients");
        daemon.stop().await;
    });
}

/// A client whose socket accepts nothing for the write timeout (10 s), without ever
/// overflowing its queue, is disconnected and counted as slow, and its session ends
/// without a panic.
#[test]
fn a_socket_that_accepts_nothing_for_the_write_timeout_is_dropped() {
    run_on_named_runtime("stuck-socket", async {
        let (daemon, mut http) = Daemon::open("").await.with_http();
        let sensor = http.create_sensor("temperatura").await;
        let mut stuck = Client::with_small_buffer(daemon.addr, "/api/v1/ws?channel=sensors").await;

        // 5 MB of sensor updates: far more than the socket buffers take, far fewer frames
        // than the default queue of 1024.
        let filler = "x".repeat(48 * 1024);
        let began = Instant::now();
        for i in 0..100 {
            let body = big_update(i, &filler);
            http.put(&format!("/api/v1/sensores/{sensor}"), &body).await;
        }
        let deadline = Instant::now() + Duration::from_secs(13);
        let stats = loop {
            let stats = ws_stats(&daemon).await;
            if stats["channels"]["sensors"]["slow_disconnects"] == 1 {
                break stats;
            }
            assert!(Instant::now() < deadline, "never dropped: {stats}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Not before its socket has accepted nothing for the whole timeout.
        assert!(
            began.elapsed() >= Duration::from_secs(10),
            "dropped after {:?}",
            began.elapsed()
        );
        assert_eq!(stats["channels"]["sensors"]["slow_disconnects"], 1);
        // What the buffers held, then the end of the connection.
        let mut events = 0;
        let end = loop {
            match stuck.next().await {
                Received::Json(event) if event["type"] == "entity_event" => events += 1,
                Received::Json(_) => {}
                closed => break closed,
            }
        };
        assert!(events < 100, "the stuck client got all {events} updates");
        assert!(matches!(end, Received::Closed(..)), "{end:?}");
        wait_for_stats(&daemon, "uncounted the stuck client", |s| {
            s["total_connections"] == 0
        })
        .await;
        assert_no_daemon_panics("stuck-socket");
        daemon.stop().await;
    });
}

/// With `ping_interval_s = 1`, a client that never answers pings is closed with 4000
/// after two intervals; a client that reads (and so answers) stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_pings_close_the_socket_with_4000() {
    let _gate = GATE.read().await;
    let daemon = Daemon::open("[realtime]\nping_interval_s = 1\n").await;
    let mut silent = daemon.subscribe("/api/v1/ws?channel=general").await;
    let connected = Instant::now();
    let mut alive = daemon.subscribe("/api/v1/ws?channel=general").await;

    // The live client reads (tungstenite answers each ping as it reads it) for 3.5 s,
    // while the silent one is left alone; stats tell when the silent one was dropped.
    let reading = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_millis(3500);
        let mut pings = 0;
        while let Ok(message) = tokio::time::timeout_at(end, alive.socket.next()).await {
            match message {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("the answering client got {other:?}"),
            }
        }
        (alive, pings)
    });
    let stats = wait_for_stats(&daemon, "dropped the silent client", |s| {
        s["total_connections"] == 1
    })
    .await;
    let dropped_after = connected.elapsed();
    assert_eq!(stats["channels"]["general"]["connections"], 1);
    assert!(
        dropped_after >= Duration::from_millis(1500)
            && dropped_after <= Duration::from_millis(3500),
        "silent client dropped after {dropped_after:?}"
    );

    let (mut alive, pings) = reading.await.unwrap();
    assert!(pings >= 2, "only {pings} pings in 3.5 s");
    alive.send_text(r#"{"type": "ping", "id": 1}"#).await;
    assert_eq!(alive.json().await["type"], "pong");
    assert_eq!(ws_stats(&daemon).await["total_connections"], 1);

    match silent.next().await {
        Received::Closed(code, reason) => {
            assert_eq!(code, Some(4000), "{reason}");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a close, got {other:?}"),
    }
    daemon.stop().await;
}
