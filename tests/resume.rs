//! Resuming with `since`: the events a client missed, exactly, also across a restart,
//! past retention, with a small client queue and with many clients at once.

mod common;

use std::collections::BTreeSet;

use common::events::*;
use common::{database, Client, Daemon, Received, OPEN};
use serde_json::json;

/// A client dropped mid-stream while samples keep flowing reconnects with `since` and
/// receives exactly the events it missed, in order, none twice, then live ones, while
/// more are produced during the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_replays_exactly_the_missed_events() {
    let (daemon, mut http) = Daemon::open(&fast_sim("sim", 1)).await.with_http();
    let posted_to = http.create_sensor("temperatura").await;

    let mut first = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(first.json().await);
    }
    // Live delivery is itself gapless.
    let start = seq(&seen[0]) - 1;
    assert_exactly_stored(daemon.dir(), "readings", start, &seen);
    let since = seq(seen.last().unwrap());
    drop(first);

    // Missed while away: samples, and readings posted over REST.
    let mut posted = BTreeSet::new();
    for i in 0..50 {
        let reading = http.reading(posted_to, "temperatura", f64::from(i)).await;
        posted.insert(reading["id"].as_i64().unwrap());
    }
    // More arrive while the client replays.
    let producer = post_in_background(daemon.addr, vec![posted_to], 200);
    let mut second = daemon
        .subscribe(&format!("/api/v1/ws?channel=readings&since={since}"))
        .await;
    posted.extend(producer.await.unwrap());
    let marker = daemon.last_seq().await;
    let received = events_until(&mut second, marker).await;

    assert!(seq(&received[0]) > since);
    assert_exactly_stored(daemon.dir(), "readings", since, &received);
    let got = reading_ids(&received);
    assert!(
        posted.is_subset(&got),
        "posted readings missing: {:?}",
        posted.difference(&got).collect::<Vec<_>>()
    );
    // Nothing older than `since` came again.
    assert!(reading_ids(&seen).is_disjoint(&got));
    daemon.stop().await;
}

/// The same across a daemon restart: events from before the stop and after the start,
/// exactly once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_across_a_restart() {
    let config = fast_sim("sim", 2);
    let daemon = Daemon::open(&config).await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=readings").await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(client.json().await);
    }
    let sensor = seen[0]["data"]["sensor_id"].as_i64().unwrap();
    let since = seq(seen.last().unwrap());
    drop(client);

    let before_stop = daemon.http().reading(sensor, "humedad", 11.5).await;
    let posted = daemon.last_seq().await;
    daemon
        .wait_past(posted, "samples after the posted reading")
        .await;
    let dir = daemon.stop().await.unwrap();
    let last_before_restart = stored_last_seq(dir.path());

    let daemon = Daemon::in_dir(dir, &format!("{OPEN}{config}")).await;
    let after_start = daemon.http().reading(sensor, "humedad", 12.5).await;
    let marker = daemon.last_seq().await;
    assert!(marker > last_before_restart);
    let mut client = daemon
        .subscribe(&format!("/api/v1/ws?channel=readings&since={since}"))
        .await;
    let received = events_until(&mut client, marker).await;

    assert_exactly_stored(daemon.dir(), "readings", since, &received);
    assert!(received.iter().any(|e| seq(e) <= last_before_restart));
    assert!(received.iter().any(|e| seq(e) > last_before_restart));
    let got = reading_ids(&received);
    assert!(got.contains(&before_stop["id"].as_i64().unwrap()));
    assert!(got.contains(&after_start["id"].as_i64().unwrap()));
    daemon.stop().await;
}

/// A `since` ahead of the daemon's numbering is answered with a `resync` message
/// (`unknown_seq`), then the events from the oldest stored one on, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_ahead_of_numbering_is_told_unknown_seq() {
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let sensor = sensor_with_readings(&mut http, 3).await;
    // One sensor event, then three readings.
    assert_eq!(daemon.last_seq().await, 4);

    let mut client = daemon
        .subscribe("/api/v1/ws?channel=readings&since=104")
        .await;
    let resync = untimed(&mut client).await;
    assert_eq!(
        resync,
        json!({"type": "resync", "reason": "unknown_seq", "since": 104, "oldest_seq": 1, "last_seq": 4})
    );
    // The stored readings follow, then live ones.
    let replayed = events_until(&mut client, 4).await;
    assert_eq!(seqs(&replayed), [2, 3, 4]);
    assert_exactly_stored(daemon.dir(), "readings", 0, &replayed);
    http.reading(sensor, "temperatura", 9.0).await;
    assert_eq!(seq(&client.json().await), 5);
    client
        .assert_quiet(&daemon, "readings", "nothing but the live reading")
        .await;
    daemon.stop().await;
}

/// A `since` older than what is kept is answered with a `resync` message
/// (`since_too_old`) naming the oldest kept seq, then the replay from it; a `since` just
/// before the oldest kept event is honoured without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_older_than_retention_is_told_since_too_old() {
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let sensor = sensor_with_readings(&mut http, 10).await;
    assert_eq!(daemon.last_seq().await, 11);
    // Retention removed everything up to seq 6 and moved the log's floor past it (done
    // by hand: the daemon's own retention only runs once a minute).
    let db = database(daemon.dir());
    let removed = db.execute("DELETE FROM events WHERE seq <= 6", []).unwrap()
        + db.execute("DELETE FROM reading_rows WHERE id <= 6", [])
            .unwrap();
    db.execute(
        "UPDATE store_meta SET value = 7 WHERE key = 'log_floor'",
        [],
    )
    .unwrap();
    assert_eq!(removed, 6);
    let (_, health) = daemon.get("/healthz").await;
    assert_eq!(health["storage"]["oldest_seq"], 7);
    assert_eq!(health["storage"]["last_seq"], 11);

    let mut client = daemon
        .subscribe("/api/v1/ws?channel=readings&since=3")
        .await;
    let resync = untimed(&mut client).await;
    assert_eq!(
        resync,
        json!({"type": "resync", "reason": "since_too_old", "since": 3, "oldest_seq": 7, "last_seq": 11})
    );
    let replayed = events_until(&mut client, 11).await;
    assert_eq!(seqs(&replayed), [7, 8, 9, 10, 11]);
    assert_exactly_stored(daemon.dir(), "readings", 6, &replayed);

    // since = oldest - 1 misses nothing that was removed: no resync.
    let mut exact = daemon
        .subscribe("/api/v1/ws?channel=readings&since=6")
        .await;
    let replayed = events_until(&mut exact, 11).await;
    assert_eq!(seqs(&replayed), [7, 8, 9, 10, 11]);

    http.reading(sensor, "temperatura", 99.0).await;
    assert_eq!(seq(&client.json().await), 12);
    assert_eq!(seq(&exact.json().await), 12);
    let marker = daemon.marker("readings").await;
    let why = "nothing but the live reading";
    client.assert_next_is_marker(marker, why).await;
    exact.assert_next_is_marker(marker, why).await;
    daemon.stop().await;
}

/// Retention that removes events a resuming client has not been sent yet (it reads more
/// slowly than they are removed) is told mid-stream: a `resync` (`since_too_old`) naming
/// where the log starts now, then the events from there; never a silent jump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_removed_during_a_replay_are_told_with_a_resync() {
    let burst = Burst::start(150_000).await;
    // A small receive buffer, so that what the socket holds stays far below the burst.
    let mut client =
        Client::with_small_buffer(burst.daemon.addr, "/api/v1/ws?channel=readings&since=0")
            .await
            .greeted()
            .await;
    // Once the replay has begun, while the client is not reading.
    let mut before = vec![seq(&client.json().await)];
    let floor = burst.keep_newest(1000);

    let resync = loop {
        let message = client.json().await;
        if message["type"] == "resync" {
            break message;
        }
        before.push(seq(&message));
    };
    let after = seqs(&events_until(&mut client, burst.last()).await);
    burst.assert_told(&before, &resync, &after, floor);
    burst.daemon.stop().await;
}

/// A client that unsubscribes from every channel while it resumes gives its turn to
/// replay up, as one that stops reading does: more such clients than there are turns
/// must not keep the ones resuming after them waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_drop_every_channel_while_resuming_do_not_hold_up_the_others() {
    let burst = Burst::start(20_000).await;
    let path = "/api/v1/ws?channel=readings&since=0";
    let mut quiet = Vec::new();
    for id in 0..10 {
        let mut client = burst.daemon.subscribe(path).await;
        // Its replay has begun: it holds a turn.
        seq(&client.json().await);
        client
            .send_text(&format!(
                r#"{{"type": "unsubscribe", "id": {id}, "channels": ["readings"]}}"#
            ))
            .await;
        quiet.push(client);
    }
    let mut reader = burst.daemon.subscribe(path).await;
    let received = events_until(&mut reader, burst.last()).await;
    assert_eq!(seqs(&received), burst.readings);
    drop(quiet);
    burst.daemon.stop().await;
}

/// With the smallest allowed client queue, a client that reads promptly still gets every
/// missed event on resume: replaying is not "falling behind".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_a_small_client_queue_replays_every_missed_event() {
    let (daemon, mut http) = Daemon::open("[realtime]\nclient_queue = 16\n")
        .await
        .with_http();
    let sensors = http.create_sensors(50).await;
    let since = daemon.last_seq().await;
    for i in 0..100 {
        http.reading(sensors[i % sensors.len()], "temperatura", i as f64)
            .await;
    }
    let marker = daemon.last_seq().await;
    assert_eq!(marker, since + 100);

    let mut client = daemon
        .subscribe(&format!("/api/v1/ws?channel=readings&since={since}"))
        .await;
    let received = events_until(&mut client, marker).await;
    assert_eq!(received.len(), 100);
    assert_exactly_stored(daemon.dir(), "readings", since, &received);
    daemon.stop().await;
}

/// Many clients resuming from the start at once (a room of dashboards after an outage)
/// read shared pages of the event log; each still gets every stored event exactly once,
/// in order, and then the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_resuming_at_once_each_get_every_event_once_in_order() {
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let sensors = vec![http.create_sensor("temperatura").await];
    assert_eq!(
        post_in_background(daemon.addr, sensors, 700)
            .await
            .unwrap()
            .len(),
        700
    );
    let stored = daemon.last_seq().await;

    let path = "/api/v1/ws?channel=sensors,readings,general&since=0";
    let connected = futures_util::future::join_all((0..40).map(|_| daemon.websocket(path))).await;
    let clients: Vec<_> = connected
        .into_iter()
        .map(|client| async move {
            let mut client = client.greeted().await;
            let mut seqs = Vec::new();
            while seqs.last() != Some(&(stored + 1)) {
                match client.next().await {
                    Received::Json(event) => seqs.push(seq(&event)),
                    closed => panic!("closed after {} events: {closed:?}", seqs.len()),
                }
            }
            seqs
        })
        .map(tokio::spawn)
        .collect();
    // One live event while they replay.
    http.create_sensor("humedad").await;
    for client in clients {
        assert_eq!(client.await.unwrap(), (1..=stored + 1).collect::<Vec<_>>());
    }
    daemon.stop().await;
}

/// Only a few clients replay at a time; one that stops reading while it resumes gives
/// its turn up once its queue is full, so those resuming behind it still catch up,
/// long before the stuck ones are closed for not reading.
///
/// The stored events are sensor updates with 48 KB frames, 6 MB in all, more than a
/// loopback socket takes before the daemon's writes block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_while_resuming_do_not_hold_up_the_others() {
    let (daemon, mut http) = Daemon::open("[realtime]\nclient_queue = 16\n")
        .await
        .with_http();
    let sensor = http.create_sensor("temperatura").await;
    let filler = "x".repeat(48 * 1024);
    for i in 0..120 {
        let body = big_update(i, &filler);
        http.put(&format!("/api/v1/sensores/{sensor}"), &body).await;
    }
    let stored = daemon.last_seq().await;

    // More stuck clients than there are turns, each with a socket that fills at once.
    let path = "/api/v1/ws?channel=sensors&since=0";
    let mut stuck = Vec::new();
    for _ in 0..10 {
        stuck.push(Client::with_small_buffer(daemon.addr, path).await);
    }
    let mut reader = daemon.subscribe(path).await;
    let received = events_until(&mut reader, stored).await;
    assert_eq!(seqs(&received), (1..=stored).collect::<Vec<_>>());
    let stats = ws_stats(&daemon).await;
    assert_eq!(
        stats["channels"]["sensors"]["slow_disconnects"], 0,
        "{stats}"
    );
    assert_eq!(stats["total_connections"], 11, "{stats}");
    drop(stuck);
    daemon.stop().await;
}
