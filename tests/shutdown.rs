//! Stopping under load, in a test binary of its own: its hundred busy sources would slow
//! the timing-sensitive tests that run beside it in another binary.

mod common;

use common::Daemon;

/// Sources that keep the writer's queue full all stop together at shutdown. Told one at
/// a time, each waited for room in the queue behind all the others still running, and a
/// gateway with many busy sources outlasted the time it is given to stop
/// ([`common::PATIENCE`] here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_busy_sources_stop_together() {
    let sensors: String = (1..=100)
        .map(|i| {
            let source = format!(
                "{{ kind = \"sim\", profile = \"dht22\", failure_rate = 0.0, \
                 samples_per_read = 100, seed = {i} }}"
            );
            common::sensor_table(&format!("busy-{i}"), "temperatura", "DHT22", 0.05, &source)
        })
        .collect();
    let daemon = Daemon::with(&sensors).await;
    daemon.wait_past(1000, "the sources busy").await;
    daemon.stop().await;
}
