//! The fleet uplink: every reading, reading change and sensor event, published to an MQTT broker, with
//! nothing lost while the broker is away.
//!
//! It is one more subscriber on the data path (store writer -> hub -> uplink), reading
//! through a `Feed` like a resuming WebSocket client: stored events after its cursor
//! first, then live ones. The cursor is the newest `seq` up to which the broker
//! acknowledged every event (PUBACK, QoS 1) or the event needed no publishing; it lives in
//! the database (saved through the writer every few seconds and on stop), so a lost
//! connection or a restart resumes exactly there. While catching up, stored events go out
//! at most `replay_per_second`; at most `WINDOW` publishes are in flight at once.
//!
//! Each connection is a fresh MQTT session (clean session, a new client): what was in
//! flight when a connection dropped is sent again from the cursor, in order, by the
//! uplink itself rather than by the client library's retransmission, so there is one
//! source of truth for what was delivered. QoS 1 is at least once: a connection lost
//! between the broker taking a publish and its PUBACK arriving sends that event again,
//! with the same `seq`, which consumers use to drop it.
//!
//! `configured` is the `[uplink]` table as the config file gives it; `settings`
//! resolves its broker, identity and TLS into what the client needs; `runner` owns the
//! connection loop and the cursor; `topics`, `discovery` and `tracker` are the pure parts
//! it uses.

mod configured;
mod discovery;
mod error;
mod runner;
mod settings;
mod topics;
mod tracker;

pub use configured::UplinkConfig;
pub use discovery::{Announcement, Discovery};
pub use error::UplinkError;
pub use runner::Stats;
pub use settings::BrokerAddress;
pub use topics::{is_topic_name, topic_level, Topics};

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::events::Hub;
use crate::shutdown::Trigger;
use crate::store::Store;
use runner::{Runner, CURSOR_NAME};
use settings::Settings;

/// The running uplink.
pub struct Uplink {
    task: JoinHandle<()>,
    stop: Trigger,
    stats: Arc<Stats>,
}

impl Uplink {
    /// Starts the uplink when `uplink.broker` is configured; `None` otherwise, and then
    /// nothing is opened. Reads the cursor, or on the very first start sets it to the
    /// newest event (history from before the uplink was configured is not sent) and saves
    /// it at once, so an outage right after the first start loses nothing either. A
    /// sensor is announced offline after `offline_after_intervals` quiet intervals.
    pub async fn start(
        config: &UplinkConfig,
        offline_after_intervals: u32,
        store: Store,
        hub: Hub,
    ) -> Result<Option<Uplink>, UplinkError> {
        let Some(settings) = Settings::from_config(config)? else {
            return Ok(None);
        };
        let newest = hub.published();
        let cursor = match store.uplink_cursor(CURSOR_NAME).await? {
            Some(cursor) if cursor <= newest => cursor,
            Some(cursor) => {
                log::warn!(
                    "uplink cursor {cursor} is ahead of the newest event {newest} (a replaced database?): continuing from {newest}"
                );
                store.save_uplink_cursor(CURSOR_NAME, newest).await?;
                newest
            }
            None => {
                store.save_uplink_cursor(CURSOR_NAME, newest).await?;
                log::info!("uplink starts after seq {newest}");
                newest
            }
        };
        log::info!(
            "uplink to {} as gateway \"{}\", {} events to send",
            settings.broker,
            settings.gateway,
            newest - cursor
        );
        let (stop, stopped) = Trigger::new();
        let discovery = settings.discovery.as_ref().map(|prefix| {
            Discovery::new(
                prefix,
                &settings.gateway,
                settings.topics.clone(),
                offline_after_intervals,
            )
        });
        let runner = Runner::new(settings, store, hub, discovery, cursor, stopped);
        let stats = runner.stats();
        let task = tokio::spawn(runner.run());
        Ok(Some(Uplink { task, stop, stats }))
    }

    /// The counters `/metrics` shows.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Stops: waits a moment for publishes in flight, publishes `offline`, disconnects
    /// and saves the cursor. Call before the store writer stops.
    pub async fn stop(self) {
        self.stop.fire();
        if self.task.await.is_err() {
            log::error!("uplink task panicked");
        }
    }
}
