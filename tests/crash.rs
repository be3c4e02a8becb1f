//! Power cuts, as near as a test gets: the daemon is killed with SIGKILL at random
//! moments during heavy ingest, again and again. After each kill the database must be
//! sound, `seq` must have no holes, and every event a connected client was sent must be
//! in the database, as it was sent.

mod common;

use std::collections::HashMap;
use std::path::Path;

use std::time::Duration;

use common::process::{write_config, Process};
use common::{stored_frame, EVENT_COLUMNS};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const ROUNDS: u64 = 6;

/// The config of one round; `synchronous` is `full` or `normal`, whose events wait for
/// the writer's own flush of the WAL.
fn config(dir: &Path, synchronous: &str) -> std::path::PathBuf {
    let mut text = format!("synchronous = \"{synchronous}\"\n");
    // One sensor hands over 100 samples a read, as a buffering device does: its
    // submissions are the writer's largest.
    for i in 0..20 {
        let per_read = if i == 0 { 100 } else { 1 };
        let source = format!("{{ kind = \"sim\", seed = {i}, samples_per_read = {per_read} }}");
        text.push_str(&common::sensor_table(
            &format!("s{i}"),
            "temperatura",
            "DHT22",
            0.05,
            &source,
        ));
    }
    write_config(dir, &text)
}

#[tokio::test]
async fn sigkill_during_ingest_loses_nothing_that_was_announced() {
    let dir = tempfile::tempdir().unwrap();
    let mut received: HashMap<u64, serde_json::Value> = HashMap::new();
    for round in 0..ROUNDS {
        let config = config(dir.path(), ["full", "normal"][round as usize % 2]);
        let log = dir.path().join(format!("daemon-{round}.log"));
        let mut child = Process::start(&config, &log, &[]);
        let Some(addr) = child.address() else {
            panic!("daemon did not start: {}", child.log());
        };
        let url = format!("ws://{addr}/api/v1/ws?channel=readings,sensors,general");
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        // Kill somewhere between 0.3 and 1.1 s into heavy ingest, a different moment each
        // round.
        let lifetime = Duration::from_millis(300 + (round * 157) % 800);
        let deadline = tokio::time::Instant::now() + lifetime;
        while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.next()).await {
            if let Message::Text(text) = message {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                if let Some(seq) = event["seq"].as_u64() {
                    received.insert(seq, event);
                }
            }
        }
        child.kill();
        drop(socket);

        let db = rusqlite::Connection::open(dir.path().join("data/sensorgate.db")).unwrap();
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "round {round}");
        let (min, max, count): (i64, i64, i64) = db
            .query_row(
                "SELECT MIN(seq), MAX(seq), COUNT(*) FROM event_log",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(max - min + 1, count, "round {round}: seq has holes");
        let mut stmt = db
            .prepare(&format!(
                "SELECT {EVENT_COLUMNS} FROM event_log WHERE seq = ?1"
            ))
            .unwrap();
        for (seq, frame) in &received {
            let stored = stmt
                .query_row([*seq as i64], stored_frame)
                .unwrap_or_else(|_| {
                    panic!("round {round}: event {seq} was sent but is not stored")
                });
            assert_eq!(&stored, frame, "round {round}: event {seq} differs");
        }
    }
    assert!(
        received.len() > 100,
        "too few events to mean anything: {}",
        received.len()
    );
}
