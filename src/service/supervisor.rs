//! The watchdog and the status line.
//!
//! `WATCHDOG=1` is sent only when the daemon demonstrably works: the store writer
//! answered a ping that queued behind real writes, the scheduler is running, and every
//! sampling thread attempted a read recently. A wedged writer or a stuck sampling thread
//! therefore gets the service restarted by systemd, instead of a thread that pets the
//! watchdog forever while nothing is stored.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;

use crate::events::Hub;
use crate::sensors::health::Estado;
use crate::sensors::HealthBoard;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// How often the status line is refreshed when systemd runs no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Checks the daemon's progress and reports it to the service manager.
pub struct Supervisor {
    store: Store,
    hub: Hub,
    health: Arc<HealthBoard>,
    /// Half the watchdog period when systemd runs one.
    watchdog: Option<Duration>,
}

impl Supervisor {
    pub fn new(store: Store, hub: Hub, health: Arc<HealthBoard>) -> Supervisor {
        Supervisor {
            store,
            hub,
            health,
            watchdog: sd_notify::watchdog_enabled().map(|period| period / 2),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, mut shutdown: Shutdown) {
        if let Some(every) = self.watchdog {
            log::info!("systemd watchdog: checking progress every {every:?}");
        }
        let mut tick = tokio::time::interval(self.watchdog.unwrap_or(STATUS_EVERY));
        let mut was_healthy = true;
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tick.tick() => {}
            }
            let problems = self.problems().await;
            let healthy = problems.is_empty();
            if healthy {
                if self.watchdog.is_some() {
                    super::notify(&[NotifyState::Watchdog]);
                }
                if !was_healthy {
                    log::info!("watchdog: progress again");
                }
            } else if was_healthy || self.watchdog.is_none() {
                log::error!("watchdog withheld: {}", problems.join("; "));
            }
            was_healthy = healthy;
            super::notify(&[NotifyState::Status(&self.status_line(&problems))]);
        }
    }

    /// What keeps the daemon from working, empty when nothing does.
    async fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let deadline = self.watchdog.unwrap_or(STATUS_EVERY);
        match tokio::time::timeout(deadline, self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("storage writer: {e}")),
            Err(_) => problems.push(format!("storage writer has not answered for {deadline:?}")),
        }
        if !self.health.scheduler_running() {
            problems.push("sensor scheduler is not running".into());
        }
        let stalled = self.health.stalled(Instant::now());
        if !stalled.is_empty() {
            problems.push(format!("sampling stuck for sensors {stalled:?}"));
        }
        problems
    }

    /// What `systemctl status` shows.
    fn status_line(&self, problems: &[String]) -> String {
        let online = self.health.count(Estado::Online);
        let offline = self.health.count(Estado::Offline);
        let clients = self.hub.stats().total_connections;
        let seq = self.hub.published();
        let mut line = format!(
            "{online} sensors online, {offline} offline; {clients} clients connected; last event {seq}"
        );
        if let Some(first) = problems.first() {
            line.push_str(&format!("; PROBLEM: {first}"));
        }
        line
    }
}
