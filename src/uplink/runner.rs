//! The connection loop: connects, publishes from the cursor on, moves the cursor as the
//! broker acknowledges, reconnects with a back-off when the connection is lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, Instant};

use super::discovery::{Announcement, Discovery};
use super::settings::Settings;
use super::topics::reading_payload;
use super::tracker::Tracker;
use crate::backoff::Backoff;
use crate::events::{Body, Channel, Event, Hub};
use crate::shutdown::Shutdown;
use crate::store::{Feed, Pulled, Store};

/// Name of the uplink's row in the cursor table.
pub(super) const CURSOR_NAME: &str = "mqtt";

/// Publishes in flight (sent, not yet acknowledged) at most. Below the client's own
/// limit, so that its packet ids never collide with one still in flight.
const WINDOW: usize = 64;

/// Events read from the database or the hub in one go.
const PAGE: usize = 128;

/// How long a connection attempt (TCP, TLS, CONNECT and CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits between connection attempts: doubling from half a second to 30 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// How often a moved cursor is saved. A crash re-sends at most this much.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// On stop, how long publishes in flight and the `offline` status get to be acknowledged.
const STOP_DEADLINE: Duration = Duration::from_secs(2);

/// The uplink's state, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    connected: AtomicBool,
    cursor: AtomicU64,
    published: AtomicU64,
    lost: AtomicU64,
}

impl Stats {
    /// Whether a connection to the broker is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Everything up to this `seq` was delivered.
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Relaxed)
    }

    /// Events the broker acknowledged since start.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Events removed by retention before they could be sent, since start.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// One message waiting to be published, or an event that needs no publishing, in `seq`
/// order.
enum Item {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        /// The event it carries; `None` for status and discovery.
        seq: Option<u64>,
        /// Sent no faster than `replay_per_second` (a stored event being caught up on).
        paced: bool,
    },
    Skip(u64),
}

/// How a connection ended.
enum Ended {
    /// The uplink was told to stop.
    Stopped,
    /// The connection failed or was lost; `connected` says whether it was ever up.
    Lost { connected: bool, why: String },
}

pub(super) struct Runner {
    settings: Settings,
    store: Store,
    hub: Hub,
    stats: Arc<Stats>,
    discovery: Option<Discovery>,
    /// Everything up to it was delivered or needs no delivery.
    cursor: u64,
    /// The cursor as last saved.
    saved: u64,
    /// The newest `seq` taken from the feed in this connection, to notice events removed
    /// by retention before they were sent (`seq` has no holes otherwise).
    last_seen: u64,
    stopped: Shutdown,
}

impl Runner {
    /// A runner that starts after `cursor`; it runs once [`Runner::run`] is spawned.
    pub(super) fn new(
        settings: Settings,
        store: Store,
        hub: Hub,
        discovery: Option<Discovery>,
        cursor: u64,
        stopped: Shutdown,
    ) -> Runner {
        let stats = Arc::new(Stats::default());
        stats.cursor.store(cursor, Ordering::Relaxed);
        Runner {
            settings,
            store,
            hub,
            stats,
            discovery,
            cursor,
            saved: cursor,
            last_seen: cursor,
            stopped,
        }
    }

    /// The counters the runner keeps up to date.
    pub(super) fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Connects and reconnects until told to stop, then saves the cursor.
    pub(super) async fn run(mut self) {
        let mut backoff = RECONNECT;
        // Failed attempts are logged once per outage, then only at debug level.
        let mut warned = false;
        loop {
            match self.connection().await {
                Ended::Stopped => break,
                Ended::Lost { connected, why } => {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    if connected {
                        log::warn!("uplink connection to {} lost: {why}", self.settings.broker);
                        backoff.reset();
                        warned = true;
                    } else if !warned {
                        log::warn!(
                            "uplink cannot reach {}: {why}; events are kept and sent once it is back",
                            self.settings.broker
                        );
                        warned = true;
                    } else {
                        log::debug!("uplink cannot reach {}: {why}", self.settings.broker);
                    }
                }
            }
            self.save().await;
            let delay = backoff.next_delay();
            let wait = delay + jitter(delay / 4);
            tokio::select! {
                _ = sleep(wait) => {}
                _ = self.stopped.recv() => break,
            }
        }
        self.stats.connected.store(false, Ordering::Relaxed);
        self.save().await;
        log::info!("uplink stopped at seq {}", self.cursor);
    }

    /// Saves the cursor if it moved.
    async fn save(&mut self) {
        if self.cursor == self.saved {
            return;
        }
        match self
            .store
            .save_uplink_cursor(CURSOR_NAME, self.cursor)
            .await
        {
            Ok(()) => self.saved = self.cursor,
            // Storage failing: the events are not being stored either; try again later.
            Err(e) => log::debug!("uplink cursor not saved: {e}"),
        }
    }

    fn set_cursor(&mut self, cursor: u64) {
        if cursor > self.cursor {
            self.cursor = cursor;
            self.stats.cursor.store(cursor, Ordering::Relaxed);
        }
    }

    /// One connection, from connecting until it is lost or the uplink stops.
    async fn connection(&mut self) -> Ended {
        let mut stopped = self.stopped.clone();
        let (client, mut eventloop) = AsyncClient::new(self.settings.options.clone(), WINDOW + 8);
        eventloop
            .network_options
            .set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        let connected = tokio::select! {
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connack(&mut eventloop)) => connected,
            _ = stopped.recv() => return Ended::Stopped,
        };
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Ended::Lost {
                    connected: false,
                    why: e.to_string(),
                }
            }
            Err(_) => {
                return Ended::Lost {
                    connected: false,
                    why: "no answer to CONNECT".into(),
                }
            }
        }
        // The client library is polled on a task of its own, so that nothing here ever
        // cancels it halfway through a packet.
        let (events_tx, events) = mpsc::channel(WINDOW * 2);
        let poller = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if events_tx.send(event).await.is_err() || failed {
                    break;
                }
            }
        });
        self.stats.connected.store(true, Ordering::Relaxed);
        let backlog = self.hub.published().saturating_sub(self.cursor);
        log::info!(
            "uplink connected to {}; {backlog} events to catch up on",
            self.settings.broker
        );
        let mut session = Session {
            client,
            events,
            tracker: Tracker::new(self.cursor),
            outbox: VecDeque::new(),
            paced_at: Instant::now(),
        };
        let ended = self.session(&mut session, &mut stopped).await;
        poller.abort();
        ended
    }

    async fn session(&mut self, s: &mut Session, stopped: &mut Shutdown) -> Ended {
        let lost = |why: String| Ended::Lost {
            connected: true,
            why,
        };
        s.outbox.push_back(Item::Publish {
            topic: self.settings.topics.status(),
            payload: b"online".to_vec(),
            retain: true,
            seq: None,
            paced: false,
        });
        // Announcements describe the sensors as of this snapshot; sensor events up to its
        // `seq` that are still to be sent do not announce again (only deletions act).
        let snapshot_seq = match &mut self.discovery {
            Some(discovery) => match self.store.snapshot().await {
                Ok(snapshot) => {
                    s.outbox
                        .extend(discovery.load(&snapshot).into_iter().map(retained));
                    snapshot.seq
                }
                Err(e) => return lost(format!("snapshot for discovery: {e}")),
            },
            None => 0,
        };
        self.last_seen = self.cursor;
        let mut feed = Feed::new(&self.hub, self.store.clone(), Some(self.cursor));
        let mut save_tick = tokio::time::interval(SAVE_EVERY);
        save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Events that need no publishing are done once everything before them is.
            while let Some(Item::Skip(seq)) = s.outbox.front() {
                s.tracker.skip(*seq);
                s.outbox.pop_front();
            }
            self.set_cursor(s.tracker.cursor());
            let room = s.tracker.in_flight() < WINDOW;
            let send_at = match s.outbox.front() {
                Some(Item::Publish { paced: true, .. }) => s.paced_at,
                _ => Instant::now(),
            };
            tokio::select! {
                biased;
                _ = stopped.recv() => {
                    self.finish(s).await;
                    return Ended::Stopped;
                }
                event = s.events.recv() => {
                    if let Err(why) = self.handle(s, event) {
                        return lost(why);
                    }
                }
                _ = sleep_until(send_at), if room && !s.outbox.is_empty() => {
                    if let Err(why) = self.send_front(s) {
                        return lost(why);
                    }
                }
                page = feed.next(&Channel::ALL, PAGE), if s.outbox.is_empty() => {
                    match page {
                        Ok(Pulled::Events(page)) => {
                            let replayed = feed.is_replaying();
                            for event in page {
                                self.take(s, &event, replayed, snapshot_seq);
                            }
                        }
                        // The uplink takes every channel: the next event's `seq` shows
                        // the gap, and taking it counts and logs what was lost.
                        Ok(Pulled::Removed { .. }) => {}
                        Err(e) => return lost(format!("reading events: {e}")),
                    }
                }
                _ = save_tick.tick() => self.save().await,
            }
        }
    }

    /// What the client library reports: packet ids of sent publishes, acknowledgements,
    /// a lost connection.
    fn handle(
        &mut self,
        s: &mut Session,
        event: Option<Result<MqttEvent, ConnectionError>>,
    ) -> Result<(), String> {
        match event {
            Some(Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid)))) => {
                s.tracker.sent(pkid).map_err(|m| m.0)
            }
            Some(Ok(MqttEvent::Incoming(Packet::PubAck(ack)))) => {
                if s.tracker.acked(ack.pkid).map_err(|m| m.0)?.is_some() {
                    self.stats.published.fetch_add(1, Ordering::Relaxed);
                }
                self.set_cursor(s.tracker.cursor());
                Ok(())
            }
            Some(Ok(MqttEvent::Outgoing(Outgoing::AwaitAck(pkid)))) => {
                Err(format!("packet id {pkid} still in flight"))
            }
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("client stopped".into()),
        }
    }

    /// Hands the oldest waiting message to the client.
    fn send_front(&mut self, s: &mut Session) -> Result<(), String> {
        let Some(Item::Publish {
            topic,
            payload,
            retain,
            seq,
            paced,
        }) = s.outbox.pop_front()
        else {
            return Ok(());
        };
        s.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|e| e.to_string())?;
        s.tracker.submit(seq);
        if paced {
            s.paced_at = s.paced_at.max(Instant::now()) + self.settings.replay_interval;
        }
        Ok(())
    }

    /// Turns an event from the feed into what to publish.
    fn take(&mut self, s: &mut Session, event: &Event, replayed: bool, snapshot_seq: u64) {
        if event.seq == 0 || event.seq <= self.last_seen {
            // A live-only notice, never stored; or one already taken.
            return;
        }
        if event.seq > self.last_seen + 1 {
            let lost = event.seq - self.last_seen - 1;
            self.stats.lost.fetch_add(lost, Ordering::Relaxed);
            log::warn!(
                "uplink: {lost} events (seq {} to {}) were removed by retention before they were sent; continuing from {}",
                self.last_seen + 1,
                event.seq - 1,
                event.seq
            );
        }
        self.last_seen = event.seq;
        let topics = &self.settings.topics;
        let (topic, payload) = match event.channel {
            Channel::Readings if event.event_type != "created" => {
                // A stored reading updated or deleted: the envelope, as for sensors.
                let Body::Reading(reading) = &event.body else {
                    log::warn!("uplink: reading event {} is unreadable; skipped", event.seq);
                    s.outbox.push_back(Item::Skip(event.seq));
                    return;
                };
                (
                    topics.reading_change(reading.id),
                    event.frame.as_bytes().to_vec(),
                )
            }
            Channel::Readings => match &event.body {
                Body::Reading(reading) => {
                    if let Some(discovery) = &mut self.discovery {
                        let found =
                            discovery.reading(reading.sensor_id, &reading.tipo, &reading.unidad);
                        s.outbox.extend(found.into_iter().map(retained));
                    }
                    (
                        topics.reading(reading.sensor_id, &reading.tipo),
                        reading_payload(reading, event.seq),
                    )
                }
                _ => {
                    log::warn!("uplink: reading event {} is unreadable; skipped", event.seq);
                    s.outbox.push_back(Item::Skip(event.seq));
                    return;
                }
            },
            Channel::Sensors => {
                if let (Some(discovery), Body::Sensor(sensor)) = (&mut self.discovery, &event.body)
                {
                    let found =
                        discovery.sensor_event(&event.event_type, sensor, event.seq > snapshot_seq);
                    s.outbox.extend(found.into_iter().map(retained));
                }
                let Some(sensor_id) = event.sensor_id else {
                    s.outbox.push_back(Item::Skip(event.seq));
                    return;
                };
                (topics.sensor(sensor_id), event.frame.as_bytes().to_vec())
            }
            Channel::General => match alert_rule_of(event) {
                // The latest word on each rule's alert stays on its topic, retained, so a
                // consumer that subscribes later learns whether it fires.
                Some(rule_id) => {
                    s.outbox.push_back(Item::Publish {
                        topic: topics.alert(rule_id),
                        payload: event.frame.as_bytes().to_vec(),
                        retain: true,
                        seq: Some(event.seq),
                        paced: replayed,
                    });
                    return;
                }
                None => {
                    s.outbox.push_back(Item::Skip(event.seq));
                    return;
                }
            },
        };
        s.outbox.push_back(Item::Publish {
            topic,
            payload,
            retain: false,
            seq: Some(event.seq),
            paced: replayed,
        });
    }

    /// A clean stop while connected: publishes in flight get a moment to be acknowledged,
    /// then `offline` is published and the session closed with DISCONNECT (so the broker
    /// does not send the will as well).
    async fn finish(&mut self, s: &mut Session) {
        let deadline = Instant::now() + STOP_DEADLINE;
        s.outbox.clear();
        let offline = s.client.try_publish(
            self.settings.topics.status(),
            QoS::AtLeastOnce,
            true,
            "offline",
        );
        if offline.is_ok() {
            s.tracker.submit(None);
        }
        while s.tracker.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, s.events.recv()).await {
                Ok(event) => {
                    if self.handle(s, event).is_err() {
                        break;
                    }
                }
                Err(_) => {
                    log::warn!(
                        "uplink: {} publishes unacknowledged at stop; sent again on the next start",
                        s.tracker.in_flight()
                    );
                    break;
                }
            }
        }
        self.set_cursor(s.tracker.cursor());
        if s.client.try_disconnect().is_ok() {
            // Give the client a moment to write DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Some(Ok(_)) = s.events.recv().await {}
            })
            .await;
        }
        self.stats.connected.store(false, Ordering::Relaxed);
    }
}

/// One connection's moving parts.
struct Session {
    client: AsyncClient,
    events: mpsc::Receiver<Result<MqttEvent, ConnectionError>>,
    tracker: Tracker,
    outbox: VecDeque<Item>,
    /// When the next paced message may go.
    paced_at: Instant,
}

/// The rule an alert event is about (`alert_firing`, `alert_resolved`,
/// `alert_acknowledged`), if it is one.
fn alert_rule_of(event: &Event) -> Option<i64> {
    if !event.event_type.starts_with("alert_") {
        return None;
    }
    match &event.body {
        Body::Data(data) => data["rule_id"].as_i64(),
        _ => None,
    }
}

fn retained(a: Announcement) -> Item {
    Item::Publish {
        topic: a.topic,
        payload: a.payload,
        retain: true,
        seq: None,
        paced: false,
    }
}

/// Polls until the broker accepted the connection.
async fn connack(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let MqttEvent::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            // A refused CONNECT is an error from `poll` itself.
            return Ok(());
        }
    }
}

/// Up to `max`, so that a fleet of gateways that lost the same broker does not come back
/// all in the same instant.
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    max.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_below_its_bound() {
        assert!(jitter(Duration::from_millis(100)) < Duration::from_millis(100));
    }
}
