//! Subscriptions: query filters, subscribe and unsubscribe messages, and the rate
//! limit per subscription.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::events::*;
use common::{Client, Daemon, Received};
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long a client waits to be sure nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

/// Query filters deliver exactly the matching events, on one channel or several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_deliver_exactly_the_matching_events() {
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let a = http.create_sensor("temperatura").await;
    let b = http.create_sensor("humedad").await;

    let queries = [
        format!("channel=readings&sensor_id={a}"),
        "channel=readings&tipo=humedad".to_owned(),
        format!("channel=readings&sensor_id={a}&sensor_id={b}&tipo=temperatura"),
        "channel=sensors&event_type=updated".to_owned(),
        "channel=sensors&event_type=created,deleted".to_owned(),
        "channel=sensors&channel=readings".to_owned(),
        format!("channel=sensors,readings&sensor_id={b}"),
        "channel=general,readings&event_type=test".to_owned(),
        "channel=sensors,readings&tipo=humedad".to_owned(),
    ];
    let mut clients = Vec::new();
    for query in &queries {
        let mut client = daemon.websocket(&format!("/api/v1/ws?{query}")).await;
        let connection = client.json().await;
        assert_eq!(connection["type"], "connection");
        let named: BTreeSet<&str> = connection["channel"].as_str().unwrap().split(',').collect();
        let asked: BTreeSet<&str> = query
            .split('&')
            .filter_map(|p| p.strip_prefix("channel="))
            .flat_map(|v| v.split(','))
            .collect();
        assert_eq!(named, asked, "{query}");
        assert_eq!(client.json().await["type"], "stats");
        clients.push(client);
    }
    let stats = ws_stats(&daemon).await;
    assert_eq!(stats["total_connections"], 9);
    assert_eq!(stats["channels"]["readings"]["connections"], 7);
    assert_eq!(stats["channels"]["sensors"]["connections"], 5);
    assert_eq!(stats["channels"]["general"]["connections"], 1);

    // One event per action, numbered in order.
    let base = daemon.last_seq().await;
    http.reading(a, "temperatura", 1.0).await; // +1
    http.reading(a, "humedad", 2.0).await; // +2
    http.reading(b, "temperatura", 3.0).await; // +3
    http.reading(b, "humedad", 4.0).await; // +4
    http.put(&format!("/api/v1/sensores/{a}"), r#"{"modelo": "DHT11"}"#)
        .await; // +5
    http.put(
        &format!("/api/v1/sensores/{b}"),
        r#"{"ubicacion": "Nave 2"}"#,
    )
    .await; // +6
    let c = http.create_sensor("temperatura").await; // +7
    http.reading(c, "temperatura", 5.0).await; // +8
    let (status, _) = http
        .call("DELETE", &format!("/api/v1/sensores/{c}"), None)
        .await; // +9
    assert_eq!(status, 200);
    let (status, _) = http
        .call(
            "POST",
            "/api/v1/ws/test-event",
            Some(r#"{"channel": "general", "data": {"n": 1}}"#),
        )
        .await; // +10
    assert_eq!(status, 200);
    assert_eq!(daemon.last_seq().await, base + 10);

    let expected: [&[u64]; 9] = [
        &[1, 2],
        &[2, 4],
        &[1, 3],
        &[5, 6],
        &[7, 9],
        &[1, 2, 3, 4, 5, 6, 7, 8, 9],
        &[3, 4, 6],
        &[10],
        &[2, 4, 6],
    ];
    for ((client, query), want) in clients.iter_mut().zip(&queries).zip(expected) {
        let want: Vec<u64> = want.iter().map(|n| base + n).collect();
        let got = events_until(client, *want.last().unwrap()).await;
        assert_eq!(seqs(&got), want, "{query}");
        assert_eq!(client.next_within(QUIET).await, None, "{query}");
    }
    daemon.stop().await;
}

/// `subscribe` and `unsubscribe` messages change what a socket receives and are answered
/// with the resulting subscription; bad messages are answered with an error and the
/// socket stays open with its subscription unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_messages_change_the_subscription_and_errors_keep_the_socket() {
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let a = http.create_sensor("temperatura").await;
    let b = http.create_sensor("humedad").await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=sensors").await;

    client
        .send_text(&format!(
            r#"{{"type": "subscribe", "id": 1, "channels": ["readings"], "sensor_id": [{a}]}}"#
        ))
        .await;
    let result = untimed(&mut client).await;
    assert_eq!(
        result,
        json!({"type": "result", "id": 1, "action": "subscribe", "ok": true,
               "subscription": {"channels": ["readings", "sensors"], "sensor_id": [a]}})
    );
    let stats = ws_stats(&daemon).await;
    assert_eq!(stats["total_connections"], 1);
    assert_eq!(stats["channels"]["readings"]["connections"], 1);
    assert_eq!(stats["channels"]["sensors"]["connections"], 1);

    let base = daemon.last_seq().await;
    http.reading(b, "humedad", 1.0).await; // +1, other sensor
    http.reading(a, "temperatura", 2.0).await; // +2
    http.put(&format!("/api/v1/sensores/{b}"), r#"{"modelo": "X"}"#)
        .await; // +3, other sensor
    http.put(&format!("/api/v1/sensores/{a}"), r#"{"modelo": "Y"}"#)
        .await; // +4
    let got = events_until(&mut client, base + 4).await;
    assert_eq!(seqs(&got), [base + 2, base + 4]);
    assert_eq!(got[0]["entity_type"], "reading");
    assert_eq!(got[1]["entity_type"], "sensor");

    client
        .send_text(r#"{"type": "unsubscribe", "id": 2, "channels": ["sensors"]}"#)
        .await;
    let result = client.json().await;
    assert_eq!(result["type"], "result", "{result}");
    assert_eq!(result["id"], 2);
    assert_eq!(result["action"], "unsubscribe");
    assert_eq!(result["ok"], true);
    assert_eq!(
        result["subscription"],
        json!({"channels": ["readings"], "sensor_id": [a]})
    );
    let stats = ws_stats(&daemon).await;
    assert_eq!(stats["channels"]["sensors"]["connections"], 0);
    assert_eq!(stats["channels"]["readings"]["connections"], 1);

    // Errors, each answered with the message's id, none closing the socket.
    let bad: [(&str, Value, &str); 6] = [
        (r#"{"type": "dance", "id": 3}"#, json!(3), "unknown_action"),
        ("not json", Value::Null, "malformed"),
        ("[1, 2]", Value::Null, "malformed"),
        (r#"{"id": 4}"#, json!(4), "malformed"),
        (
            r#"{"type": "subscribe", "id": 5, "channels": ["weather"]}"#,
            json!(5),
            "unknown_channel",
        ),
        (
            r#"{"type": "subscribe", "id": 6, "sensor_id": ["x"]}"#,
            json!(6),
            "invalid",
        ),
    ];
    for (text, id, code) in bad {
        client.send_text(text).await;
        let answer = client.json().await;
        assert_eq!(answer["type"], "error", "{text}: {answer}");
        assert_eq!(answer["code"], code, "{text}: {answer}");
        assert_eq!(
            answer.get("id").cloned().unwrap_or(Value::Null),
            id,
            "{text}"
        );
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{answer}"
        );
    }

    // Still open, subscription unchanged: sensors left, readings of `a` only.
    let base = daemon.last_seq().await;
    http.put(&format!("/api/v1/sensores/{a}"), r#"{"modelo": "Z"}"#)
        .await; // +1
    http.reading(b, "humedad", 3.0).await; // +2
    let wanted = http.reading(a, "humedad", 4.0).await; // +3
    let event = client.json().await;
    assert_eq!(seq(&event), base + 3);
    assert_eq!(event["data"], wanted);
    client.send_text(r#"{"type": "ping", "id": 7}"#).await;
    let pong = client.json().await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], 7);
    assert_eq!(client.next_within(QUIET).await, None);
    daemon.stop().await;
}

/// Messages from `client`, appended to `events` (the entity events among them), until
/// `done` holds for one; returns that one.
async fn collect_until(
    client: &mut Client,
    events: &mut Vec<Value>,
    done: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let message = client.json().await;
        if message["entity_type"].is_string() {
            events.push(message.clone());
        }
        if done(&message) {
            return message;
        }
    }
}

/// A client that wants no readings follows the hub's ring without them (readings are
/// most events); asking for readings and dropping them again moves it between the rings.
/// Across the moves, with a sensor sampled every 50 ms, it gets every sensor event once,
/// and readings only while it wants them: none from before it asked, none missing, and
/// when it asked with a snapshot, every reading after the snapshot's `seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_readings_on_and_off_loses_and_repeats_nothing() {
    let (daemon, mut http) = Daemon::open(&fast_sim("fast", 3)).await.with_http();
    let updated = http.create_sensor("humedad").await;
    let base = daemon.last_seq().await;
    let mut client = daemon.subscribe("/api/v1/ws?channel=sensors").await;
    let mut events = Vec::new();
    // (last seq stored before asking, index of the period's first and past-last event)
    let mut periods = Vec::new();
    let path = format!("/api/v1/sensores/{updated}");
    let is_update = |modelo: String| {
        move |m: &Value| m["entity_type"] == "sensor" && m["data"]["modelo"] == modelo.as_str()
    };
    let is_result = |id: u64| move |m: &Value| m["type"] == "result" && m["id"] == id;
    for round in 0..3u64 {
        // A sensor change just before each switch, to cross it in either ring; then
        // readings the client must not get.
        http.put(&path, &format!(r#"{{"modelo": "before-{round}"}}"#))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut asked_at = daemon.last_seq().await;
        let with_snapshot = round == 1;
        client
            .send_text(&format!(
                r#"{{"type": "subscribe", "id": {}, "channels": ["readings"], "snapshot": {with_snapshot}}}"#,
                2 * round
            ))
            .await;
        collect_until(&mut client, &mut events, is_result(2 * round)).await;
        if with_snapshot {
            let snapshot =
                collect_until(&mut client, &mut events, |m| m["type"] == "snapshot").await;
            asked_at = seq(&snapshot);
        }
        let start = events.len();
        let readings = std::cell::Cell::new(0);
        collect_until(&mut client, &mut events, |m| {
            if m["entity_type"] == "reading" {
                readings.set(readings.get() + 1);
            }
            readings.get() == 5
        })
        .await;
        http.put(&path, &format!(r#"{{"modelo": "during-{round}"}}"#))
            .await;
        collect_until(
            &mut client,
            &mut events,
            is_update(format!("during-{round}")),
        )
        .await;
        client
            .send_text(&format!(
                r#"{{"type": "unsubscribe", "id": {}, "channels": ["readings"]}}"#,
                2 * round + 1
            ))
            .await;
        collect_until(&mut client, &mut events, is_result(2 * round + 1)).await;
        periods.push((asked_at, with_snapshot, start, events.len()));
    }
    http.put(&path, r#"{"modelo": "last"}"#).await;
    collect_until(&mut client, &mut events, is_update("last".into())).await;

    let received = seqs(&events);
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "out of order or twice: {received:?}"
    );
    let sensor_events: Vec<Value> = events
        .iter()
        .filter(|e| e["entity_type"] == "sensor")
        .cloned()
        .collect();
    assert_exactly_stored(daemon.dir(), "sensors", base, &sensor_events);
    let mut readings_in_periods = 0;
    for (asked_at, with_snapshot, start, end) in periods {
        let readings: Vec<u64> = events[start..end]
            .iter()
            .filter(|e| e["entity_type"] == "reading")
            .map(seq)
            .collect();
        let (first, last) = (readings[0], readings[readings.len() - 1]);
        assert!(
            first > asked_at,
            "a reading from before readings were asked for"
        );
        let from = if with_snapshot { asked_at } else { first - 1 };
        assert_eq!(
            readings,
            stored_seqs(daemon.dir(), "readings", from, last),
            "readings missing while they were wanted"
        );
        readings_in_periods += readings.len();
    }
    let readings_received = events
        .iter()
        .filter(|e| e["entity_type"] == "reading")
        .count();
    assert_eq!(
        readings_received, readings_in_periods,
        "readings while none were wanted"
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------
// Per-subscription rate.

/// `rate_ms=500` with a sensor sampled every 50 ms: about one reading per sensor and
/// `tipo` every half second, not every sample; an unthrottled client on the same daemon
/// gets every sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_ms_limits_readings_per_sensor_and_tipo() {
    let daemon = Daemon::open(&fast_sim("sim", 4)).await;
    let calm = daemon
        .subscribe("/api/v1/ws?channel=readings&rate_ms=500")
        .await;
    let full = daemon.subscribe("/api/v1/ws?channel=readings").await;

    let window = Duration::from_millis(2000);
    let count = |mut client: Client| async move {
        let end = Instant::now() + window;
        let mut per_tipo: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match client.next_within(left).await {
                None => break,
                Some(Received::Json(event)) => per_tipo
                    .entry(event["data"]["tipo"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(seq(&event)),
                Some(other) => panic!("socket ended: {other:?}"),
            }
        }
        per_tipo
    };
    let (calm, full) = tokio::join!(count(calm), count(full));

    for tipo in ["temperatura", "humedad"] {
        let all = full.get(tipo).map_or(0, Vec::len);
        assert!(all >= 20, "unthrottled client got {all} {tipo} readings");
        let some = calm.get(tipo).cloned().unwrap_or_default();
        assert!(
            (2..=6).contains(&some.len()),
            "rate_ms=500 over 2 s let {} {tipo} readings through: {some:?}",
            some.len()
        );
        // The newest wins: never an older reading after a newer one.
        assert!(some.windows(2).all(|w| w[0] < w[1]), "{some:?}");
    }
    daemon.stop().await;
}
