//! Stopping under load, in a test binary of its own: its hundred busy sources would slow
//! the timing-sensitive tests that run beside it in another binary.

mod common;

use std::time::Duration;

use common::Daemon;

/// Sources that keep the writer's queue full all stop together at shutdown. Told one at
/// a time, each waited for room in the queue behind all the others still running, and a
/// gateway with many busy sources outlasted the time it is given to stop
/// ([`common::PATIENCE`] here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_busy_sources_stop_together() {
    let sensors: String = (1..=100)
        .map(|i| {
            format!(
                "[[sensor]]\nname = \"busy-{i}\"\ntipo = \"temperatura\"\nmodelo = \"DHT22\"\n\
                 interval_s = 0.05\nsource = {{ kind = \"sim\", profile = \"dht22\", \
                 failure_rate = 0.0, samples_per_read = 100, seed = {i} }}\n\n"
            )
        })
        .collect();
    let daemon = Daemon::with(&sensors).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    daemon.stop().await;
}
