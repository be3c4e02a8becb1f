//! The fleet uplink: every reading, reading change and sensor event, published to an MQTT broker, with
//! nothing lost while the broker is away.
//!
//! It is one more subscriber on the data path (store writer -> hub -> uplink), reading
//! through a [`Feed`] like a resuming WebSocket client: stored events after its cursor
//! first, then live ones. The cursor is the newest `seq` up to which the broker
//! acknowledged every event (PUBACK, QoS 1) or the event needed no publishing; it lives in
//! the database (saved through the writer every few seconds and on stop), so a lost
//! connection or a restart resumes exactly there. While catching up, stored events go out
//! at most `replay_per_second`; at most [`WINDOW`] publishes are in flight at once.
//!
//! Each connection is a fresh MQTT session (clean session, a new client): what was in
//! flight when a connection dropped is sent again from the cursor, in order, by the
//! uplink itself rather than by the client library's retransmission, so there is one
//! source of truth for what was delivered. QoS 1 is at least once: a connection lost
//! between the broker taking a publish and its PUBACK arriving sends that event again,
//! with the same `seq`, which consumers use to drop it.

mod configured;
mod discovery;
mod topics;
mod tracker;

pub use configured::UplinkConfig;
pub use discovery::{Announcement, Discovery};
pub use topics::{is_topic_name, topic_level, Topics};

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use crate::events::{Body, Channel, Event, Hub};
use crate::shutdown::{Shutdown, Trigger};
use crate::store::{Feed, Store, StoreError};
use topics::reading_payload;
use tracker::Tracker;

/// Name of the uplink's row in the cursor table.
const CURSOR_NAME: &str = "mqtt";

/// Publishes in flight (sent, not yet acknowledged) at most. Below the client's own
/// limit, so that its packet ids never collide with one still in flight.
const WINDOW: usize = 64;

/// The client's in-flight limit and packet id range.
const CLIENT_INFLIGHT: u16 = 100;

/// Events read from the database or the hub in one go.
const PAGE: usize = 128;

/// Largest MQTT packet, either way; a sensor event with a long source spec fits.
const MAX_PACKET: usize = 256 * 1024;

/// How long a connection attempt (TCP, TLS, CONNECT and CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits between connection attempts: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_LAST: Duration = Duration::from_secs(30);

/// How often a moved cursor is saved. A crash re-sends at most this much.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// On stop, how long publishes in flight and the `offline` status get to be acknowledged.
const STOP_DEADLINE: Duration = Duration::from_secs(2);

/// The broker to connect to, from `uplink.broker` and `uplink.tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    /// Reads `mqtt://host[:port]`, `mqtts://host[:port]` (TLS) or `host[:port]`; the port
    /// defaults to 1883, or 8883 with TLS.
    pub fn parse(text: &str, tls: bool) -> Result<BrokerAddress, String> {
        let (tls, rest) = match text.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (tls, rest),
            Some(("mqtts" | "ssl" | "tls", rest)) => (true, rest),
            Some((scheme, _)) => {
                return Err(format!("has scheme \"{scheme}\"; use mqtt:// or mqtts://"))
            }
            None => (tls, text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address in brackets has colons of its own.
            Some((host, port)) if !port.contains(']') => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("has an invalid port \"{port}\""))?;
                (host, port)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("\"{text}\" is not mqtt://host:port"));
        }
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

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

/// Why the uplink could not start.
#[derive(Debug)]
pub enum UplinkError {
    /// The cursor could not be read or saved.
    Store(StoreError),
    /// A setting is unusable (validated configs never have one).
    Config(String),
    /// The TLS settings could not be applied.
    Tls(String),
}

impl fmt::Display for UplinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkError::Store(e) => write!(f, "uplink cursor: {e}"),
            UplinkError::Config(e) => write!(f, "uplink settings: {e}"),
            UplinkError::Tls(e) => write!(f, "uplink TLS: {e}"),
        }
    }
}

impl std::error::Error for UplinkError {}

impl From<StoreError> for UplinkError {
    fn from(e: StoreError) -> Self {
        UplinkError::Store(e)
    }
}

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
        let stats = Arc::new(Stats::default());
        stats.cursor.store(cursor, Ordering::Relaxed);
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
        let runner = Runner {
            settings,
            store,
            hub,
            stats: stats.clone(),
            discovery,
            cursor,
            saved: cursor,
            last_seen: cursor,
            stopped,
        };
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

/// The host name, as a topic level: the default gateway name.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name = topic_level(name.trim());
    if name.is_empty() {
        "sensorgate".into()
    } else {
        name
    }
}

/// The uplink's settings, resolved from the config.
struct Settings {
    broker: BrokerAddress,
    gateway: String,
    topics: Topics,
    options: MqttOptions,
    /// The discovery prefix, when discovery is on.
    discovery: Option<String>,
    /// Time between two stored events sent while catching up.
    replay_interval: Duration,
}

impl Settings {
    fn from_config(uplink: &UplinkConfig) -> Result<Option<Settings>, UplinkError> {
        let Some(broker) = &uplink.broker else {
            return Ok(None);
        };
        // Validated with the config already.
        let broker = BrokerAddress::parse(broker, uplink.tls).map_err(UplinkError::Config)?;
        let gateway = uplink.gateway.clone().unwrap_or_else(host_name);
        let topics = Topics::new(&uplink.topic_prefix, &gateway);
        let client_id = uplink
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sensorgate-{gateway}"));
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options
            .set_keep_alive(Duration::from_secs(uplink.keep_alive_s))
            .set_clean_session(true)
            .set_inflight(CLIENT_INFLIGHT)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_last_will(LastWill::new(
                topics.status(),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(username) = &uplink.username {
            options.set_credentials(
                username.clone(),
                uplink.password.clone().unwrap_or_default(),
            );
        }
        if broker.tls {
            options.set_transport(Transport::tls_with_config(tls_config(
                uplink.ca_file.as_deref(),
            )?));
        }
        Ok(Some(Settings {
            broker,
            gateway,
            topics,
            options,
            discovery: uplink.discovery.then(|| uplink.discovery_prefix.clone()),
            replay_interval: Duration::from_secs(1) / uplink.replay_per_second.max(1),
        }))
    }
}

/// TLS through rustls (ring): the CA of `ca_file`, or the system's trusted roots.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<TlsConfiguration, UplinkError> {
    if let Some(path) = ca_file {
        let ca = std::fs::read(path)
            .map_err(|e| UplinkError::Tls(format!("{}: {e}", path.display())))?;
        return Ok(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        });
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(UplinkError::Tls(
            "no trusted CA certificates found on this system; set uplink.ca_file".into(),
        ));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
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

struct Runner {
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
    async fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        // Failed attempts are logged once per outage, then only at debug level.
        let mut warned = false;
        loop {
            match self.connection().await {
                Ended::Stopped => break,
                Ended::Lost { connected, why } => {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    if connected {
                        log::warn!("uplink connection to {} lost: {why}", self.settings.broker);
                        backoff = BACKOFF_FIRST;
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
            let wait = backoff + jitter(backoff / 4);
            backoff = (backoff * 2).min(BACKOFF_LAST);
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
                        Ok(page) => {
                            let replayed = feed.is_replaying();
                            for event in page {
                                self.take(s, &event, replayed, snapshot_seq);
                            }
                        }
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
    fn broker_addresses() {
        let parse = |t: &str, tls| BrokerAddress::parse(t, tls);
        assert_eq!(
            parse("mqtt://broker.lan", false).unwrap(),
            BrokerAddress {
                host: "broker.lan".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(parse("mqtts://broker.lan", false).unwrap().port, 8883);
        assert!(parse("mqtts://broker.lan", false).unwrap().tls);
        assert_eq!(parse("broker.lan:1884", false).unwrap().port, 1884);
        assert_eq!(parse("broker.lan", true).unwrap().port, 8883);
        assert_eq!(
            parse("mqtt://10.0.0.5:1883/", false).unwrap().host,
            "10.0.0.5"
        );
        assert_eq!(parse("mqtt://[::1]:1884", false).unwrap().host, "::1");
        assert_eq!(parse("mqtt://[::1]", false).unwrap().port, 1883);
        assert!(parse("http://broker.lan", false).is_err());
        assert!(parse("mqtt://broker.lan:0", false).is_err());
        assert!(parse("mqtt://broker.lan:x", false).is_err());
        assert!(parse("mqtt://", false).is_err());
        assert_eq!(
            parse("mqtts://b:8884", false).unwrap().to_string(),
            "mqtts://b:8884"
        );
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        assert!(jitter(Duration::from_millis(100)) < Duration::from_millis(100));
    }
}
