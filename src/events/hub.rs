//! The event hub: fans every committed event out to every live session.
//!
//! A `tokio::sync::broadcast` ring holds the last `capacity` events once, shared by all
//! subscribers; a subscriber that falls more than `capacity` events behind learns so on
//! its next receive (`Lagged`) and is disconnected, so one slow client costs neither the
//! others nor the writer anything, and memory stays bounded.
//!
//! A second ring carries every event but readings. Readings are nine in ten events; a
//! subscriber that wants none (a client on `sensors`, the sampling scheduler) follows
//! that ring and is not woken for each of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use super::{Channel, Event};

/// Counters of one channel.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    messages_sent: AtomicU64,
    events_emitted: AtomicU64,
    slow_disconnects: AtomicU64,
}

/// Cheap to clone; every clone publishes to the same subscribers.
#[derive(Clone)]
pub struct Hub {
    sender: broadcast::Sender<Arc<Event>>,
    /// The same events without those on `readings`.
    without_readings: broadcast::Sender<Arc<Event>>,
    /// `seq` of the newest published event.
    published: Arc<AtomicU64>,
    /// `seq` of the newest published event not on `readings`.
    published_without_readings: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    channels: Arc<[Counters; 3]>,
    queues: Arc<QueueCounters>,
}

/// Frames waiting in clients' queues, and readings coalesced away, over all clients.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub(crate) queued: AtomicU64,
    pub(crate) coalesced: AtomicU64,
}

impl QueueCounters {
    pub fn queued(&self, frames: usize) {
        self.queued.fetch_add(frames as u64, Ordering::Relaxed);
    }

    pub fn dequeued(&self, frames: usize) {
        self.queued.fetch_sub(frames as u64, Ordering::Relaxed);
    }

    pub fn coalesced(&self, frames: usize) {
        self.coalesced.fetch_add(frames as u64, Ordering::Relaxed);
    }
}

/// A snapshot of the hub's counters, as served by `/api/v1/ws/stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HubStats {
    pub total_connections: u64,
    pub total_messages_sent: u64,
    /// Frames waiting in client queues right now.
    pub queued_frames: u64,
    /// Readings dropped from slow clients' queues because a newer one superseded them.
    pub coalesced_readings: u64,
    pub channels: BTreeMap<&'static str, ChannelStats>,
}

/// Counters of one channel, as served by `/api/v1/ws/stats/{channel}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelStats {
    pub connections: u64,
    pub messages_sent: u64,
    pub events_emitted: u64,
    pub slow_disconnects: u64,
}

impl Hub {
    /// `capacity` is how many events a subscriber may fall behind before it is dropped.
    pub fn new(capacity: usize) -> Hub {
        let (sender, _) = broadcast::channel(capacity);
        let (without_readings, _) = broadcast::channel(capacity);
        Hub {
            sender,
            without_readings,
            published: Arc::new(AtomicU64::new(0)),
            published_without_readings: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
            channels: Arc::new(Default::default()),
            queues: Arc::default(),
        }
    }

    /// Sends an event to every current subscriber. Called by the store writer only, after
    /// the commit that made the event true, in `seq` order.
    pub fn publish(&self, event: Arc<Event>) {
        if event.seq > 0 {
            self.published.store(event.seq, Ordering::Release);
            if event.channel != Channel::Readings {
                self.published_without_readings
                    .store(event.seq, Ordering::Release);
            }
        }
        self.channels[event.channel.index()]
            .events_emitted
            .fetch_add(1, Ordering::Relaxed);
        // No subscriber is not an error: the event is stored and can be replayed.
        if event.channel != Channel::Readings {
            let _ = self.without_readings.send(event.clone());
        }
        let _ = self.sender.send(event);
    }

    /// `seq` of the newest published event. Every event up to it is stored.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// `seq` of the newest published event not on `readings` (or where numbering stood
    /// at start): what a subscriber of the ring without readings has missed if it
    /// subscribes now.
    pub fn published_without_readings(&self) -> u64 {
        self.published_without_readings.load(Ordering::Acquire)
    }

    /// Sets where numbering stands when the daemon starts on an existing database.
    pub fn start_at(&self, seq: u64) {
        self.published.store(seq, Ordering::Release);
        self.published_without_readings
            .store(seq, Ordering::Release);
    }

    /// A new subscription that sees every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }

    /// A new subscription that sees every event published from now on except those on
    /// `readings`.
    pub fn subscribe_without_readings(&self) -> broadcast::Receiver<Arc<Event>> {
        self.without_readings.subscribe()
    }

    /// Counts a session for as long as the returned guard lives.
    pub fn register(&self, channels: &[Channel]) -> Registration {
        self.connections.fetch_add(1, Ordering::Relaxed);
        for channel in channels {
            self.channels[channel.index()]
                .connections
                .fetch_add(1, Ordering::Relaxed);
        }
        Registration {
            hub: self.clone(),
            channels: channels.to_vec(),
        }
    }

    /// Counters shared by every client queue.
    pub fn queue_counters(&self) -> Arc<QueueCounters> {
        self.queues.clone()
    }

    /// Records messages delivered to a client on a channel.
    pub fn count_sent(&self, channel: Channel, messages: u64) {
        self.channels[channel.index()]
            .messages_sent
            .fetch_add(messages, Ordering::Relaxed);
    }

    /// Records a client disconnected for not keeping up.
    pub fn count_slow_disconnect(&self, channel: Channel) {
        self.channels[channel.index()]
            .slow_disconnects
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counters of one channel.
    pub fn channel_stats(&self, channel: Channel) -> ChannelStats {
        let c = &self.channels[channel.index()];
        ChannelStats {
            connections: c.connections.load(Ordering::Relaxed),
            messages_sent: c.messages_sent.load(Ordering::Relaxed),
            events_emitted: c.events_emitted.load(Ordering::Relaxed),
            slow_disconnects: c.slow_disconnects.load(Ordering::Relaxed),
        }
    }

    /// All counters.
    pub fn stats(&self) -> HubStats {
        let channels: BTreeMap<_, _> = Channel::ALL
            .iter()
            .map(|&c| (c.as_str(), self.channel_stats(c)))
            .collect();
        HubStats {
            total_connections: self.connections.load(Ordering::Relaxed),
            total_messages_sent: channels.values().map(|c| c.messages_sent).sum(),
            queued_frames: self.queues.queued.load(Ordering::Relaxed),
            coalesced_readings: self.queues.coalesced.load(Ordering::Relaxed),
            channels,
        }
    }
}

/// Keeps a session counted in the hub's stats; dropping it uncounts the session.
pub struct Registration {
    hub: Hub,
    channels: Vec<Channel>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.connections.fetch_sub(1, Ordering::Relaxed);
        for channel in &self.channels {
            self.hub.channels[channel.index()]
                .connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Arc<Event> {
        on(Channel::General, seq)
    }

    fn on(channel: Channel, seq: u64) -> Arc<Event> {
        Arc::new(Event {
            seq,
            channel,
            event_type: "test".into(),
            sensor_id: None,
            tipo: None,
            body: crate::events::Body::Data(serde_json::Value::Null),
            frame: "{}".into(),
        })
    }

    #[tokio::test]
    async fn registration_counts_and_uncounts() {
        let hub = Hub::new(16);
        let guard = hub.register(&[Channel::Sensors, Channel::General]);
        let stats = hub.stats();
        assert_eq!(stats.total_connections, 1);
        assert_eq!(stats.channels["sensors"].connections, 1);
        assert_eq!(stats.channels["readings"].connections, 0);
        drop(guard);
        assert_eq!(hub.stats().total_connections, 0);
        assert_eq!(hub.stats().channels["general"].connections, 0);
    }

    #[tokio::test]
    async fn lagging_subscriber_is_told() {
        let hub = Hub::new(4);
        let mut rx = hub.subscribe();
        for seq in 1..=6 {
            hub.publish(event(seq));
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(2))
        ));
        assert_eq!(rx.recv().await.unwrap().seq, 3);
        assert_eq!(hub.channel_stats(Channel::General).events_emitted, 6);
    }

    #[tokio::test]
    async fn the_second_ring_leaves_readings_out() {
        let hub = Hub::new(16);
        let mut every = hub.subscribe();
        let mut quiet = hub.subscribe_without_readings();
        let channels = [
            Channel::Readings,
            Channel::Sensors,
            Channel::Readings,
            Channel::General,
        ];
        for (seq, channel) in (1..).zip(channels) {
            hub.publish(on(channel, seq));
        }
        for seq in 1..=4 {
            assert_eq!(every.recv().await.unwrap().seq, seq);
        }
        assert_eq!(quiet.recv().await.unwrap().seq, 2);
        assert_eq!(quiet.recv().await.unwrap().seq, 4);
        assert!(quiet.try_recv().is_err());
        assert_eq!(hub.published(), 4);
        assert_eq!(hub.published_without_readings(), 4);
        hub.publish(on(Channel::Readings, 5));
        assert_eq!(hub.published_without_readings(), 4);
    }
}
