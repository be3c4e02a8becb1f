//! Live events written to idle WebSocket clients by one task: the fan-out.
//!
//! A session whose client is live and has everything (nothing queued or unwritten, no
//! throttle, nothing left in its feed) parks: it hands the fan-out a handle on its
//! socket, its position and its subscription, and then waits only for the client's next
//! message, a ping to send, its token to change or the daemon to stop. The fan-out
//! follows the hub itself, frames each event once, and writes what a parked client
//! subscribed to with one non-blocking write per client and batch. A commit then reaches
//! a thousand idle dashboards with one wake-up, not a thousand task switches each
//! followed by one small write.
//!
//! The fan-out only writes into a socket that takes everything at once. Whenever it
//! cannot deliver exactly, it hands the client back to its session, which delivers
//! through its own feed and outbox as when it is not parked:
//! - the socket took part of a batch or nothing (the rest goes back with it, and the
//!   session writes it before anything else);
//! - the client parked while the fan-out was already past its position, or the fan-out
//!   fell behind the hub's ring: it cannot prove that nothing is missing between them
//!   (positions are compared along one ring: clients whose feeds follow the ring with
//!   readings and those that follow the one without are written by separate lanes);
//! - a live-only notice (`seq` 0), which has no position to tell a duplicate by.
//!
//! So every event still reaches every client once and in order, and coalescing, slow
//! clients and their close stay the session's.

use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::Notify;

use super::subscription::Subscription;
use crate::events::{Channel, Event, Hub};
use crate::shutdown::Shutdown;

/// Most events the fan-out takes from the hub before writing them out.
const BATCH: usize = 256;

/// The parked clients, shared by the sessions that park and the task that writes.
#[derive(Default)]
pub struct Fanout {
    /// While the fan-out runs: sessions park only then.
    running: AtomicBool,
    /// Clients whose feeds follow the hub's ring with readings.
    with_readings: Lane,
    /// Clients whose feeds follow the ring without readings.
    without_readings: Lane,
}

/// The clients parked along one of the hub's rings.
#[derive(Default)]
struct Lane {
    parked: Mutex<Vec<Arc<Parking>>>,
    /// Wakes a lane without clients when one parks.
    arrived: Notify,
}

/// One parked client, as its session and the fan-out share it.
pub struct Parking {
    state: Mutex<Parked>,
    /// Wakes the session when the fan-out hands its client back.
    handed_back: Notify,
}

struct Parked {
    /// The client's socket while the fan-out writes to it.
    socket: Option<Arc<TcpStream>>,
    subscription: Subscription,
    /// The newest `seq` the client has been sent or was not subscribed to.
    position: u64,
    /// The newest `seq` the client is known to have: its position when it parked (its
    /// session had written and flushed everything), then each batch the socket took
    /// whole.
    delivered: u64,
    /// What the socket did not take, for the session to write first.
    unwritten: Option<Unwritten>,
}

/// Frames the fan-out wrote only part of: the bytes left and the newest `seq` among them.
pub struct Unwritten {
    pub bytes: Bytes,
    pub newest: u64,
}

/// Where a parked client stands when its session takes it back.
pub struct Unparked {
    pub position: u64,
    pub delivered: u64,
    pub unwritten: Option<Unwritten>,
}

impl Fanout {
    /// Hands a client to the fan-out, which writes every event after `position` that
    /// `subscription` wants to `socket` until the session or the fan-out ends it;
    /// `with_readings` says which ring the client's position is on.
    pub fn park(
        &self,
        with_readings: bool,
        socket: Arc<TcpStream>,
        subscription: Subscription,
        position: u64,
    ) -> Arc<Parking> {
        let lane = if with_readings {
            &self.with_readings
        } else {
            &self.without_readings
        };
        lane.park(socket, subscription, position)
    }

    /// Whether the fan-out runs: a client parked otherwise would wait for nothing.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Follows the hub and writes its events to the parked clients, until `shutdown`.
    pub async fn run(self: Arc<Self>, hub: Hub, shutdown: Shutdown) {
        self.running.store(true, Ordering::Release);
        // However the fan-out ends (a panic included), no client is left waiting in it.
        let _stopped = Stopped(&self);
        let with_readings = || (hub.subscribe(), hub.published());
        let without_readings = || {
            let live = hub.subscribe_without_readings();
            (live, hub.published_without_readings())
        };
        tokio::join!(
            self.with_readings
                .run(with_readings, &hub, shutdown.clone()),
            self.without_readings.run(without_readings, &hub, shutdown),
        );
    }
}

/// Marks the fan-out stopped and hands its clients back, when it ends.
struct Stopped<'a>(&'a Fanout);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0.with_readings.hand_back_all();
        self.0.without_readings.hand_back_all();
    }
}

impl Lane {
    fn park(
        &self,
        socket: Arc<TcpStream>,
        subscription: Subscription,
        position: u64,
    ) -> Arc<Parking> {
        let parking = Arc::new(Parking {
            state: Mutex::new(Parked {
                socket: Some(socket),
                subscription,
                position,
                delivered: position,
                unwritten: None,
            }),
            handed_back: Notify::new(),
        });
        let mut parked = lock(&self.parked);
        // Sessions come back often and the list is pruned only when events flow: prune it
        // here too before it grows, so a quiet gateway's list stays within about twice
        // its clients.
        if parked.len() == parked.capacity() {
            parked.retain(|p| p.is_parked());
        }
        parked.push(parking.clone());
        drop(parked);
        self.arrived.notify_one();
        parking
    }

    /// Follows `live`, one of the hub's rings, and writes its events to the clients
    /// parked in this lane, until `shutdown`.
    ///
    /// A lane without clients leaves the ring: following it costs a wake-up per commit,
    /// and the ring with readings carries hundreds of thousands a second at full ingest.
    async fn run(
        &self,
        subscribe: impl Fn() -> (broadcast::Receiver<Arc<Event>>, u64),
        hub: &Hub,
        mut shutdown: Shutdown,
    ) {
        let mut live = None;
        // The `seq` of the last event written out (or missed before joining the ring),
        // `None` after falling behind it.
        let mut last: Option<u64> = None;
        let mut batch: Vec<Arc<Event>> = Vec::with_capacity(BATCH);
        loop {
            if lock(&self.parked).is_empty() {
                live = None;
                tokio::select! {
                    _ = shutdown.recv() => break,
                    _ = self.arrived.notified() => continue,
                }
            }
            let live = match &mut live {
                Some(live) => live,
                None => {
                    // Events sent before the subscription passed the lane by (the
                    // newest of them numbered `missed`): clients parked meanwhile that
                    // may be waiting for one go back.
                    let (subscribed, missed) = subscribe();
                    self.hand_back_behind(missed);
                    last = Some(missed);
                    live.insert(subscribed)
                }
            };
            let first = tokio::select! {
                _ = shutdown.recv() => break,
                first = live.recv() => first,
            };
            let mut lagged = false;
            match first {
                Ok(event) => batch.push(event),
                Err(RecvError::Lagged(_)) => lagged = true,
                Err(RecvError::Closed) => break,
            }
            while !lagged && batch.len() < BATCH {
                match live.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(TryRecvError::Lagged(_)) => lagged = true,
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write_out(&batch, last, hub);
                last = batch
                    .iter()
                    .rev()
                    .map(|e| e.seq)
                    .find(|&seq| seq > 0)
                    .or(last);
                batch.clear();
            }
            if lagged {
                log::debug!(
                    "the fan-out fell behind the hub; its clients go back to their sessions"
                );
                self.hand_back_all();
                last = None;
            }
        }
        self.hand_back_all();
    }

    /// Writes `batch` to every parked client it is for; `last` is the `seq` of the event
    /// before it in the ring, if known.
    fn write_out(&self, batch: &[Arc<Event>], last: Option<u64>, hub: &Hub) {
        let mut parked = mem::take(&mut *lock(&self.parked));
        if parked.is_empty() {
            return;
        }
        if batch.iter().any(|e| e.seq == 0) {
            parked.iter().for_each(|p| p.hand_back());
            return;
        }
        // Seqs rise along the ring: a client at or past the event before the batch has
        // had everything up to it, whether the fan-out wrote it or its session did.
        let before = last.unwrap_or(batch[0].seq - 1);
        let framed = Framed::new(batch);
        let mut sent = [0u64; 3];
        parked.retain(|parking| parking.write(&framed, before, &mut sent));
        for channel in Channel::ALL {
            if sent[channel.index()] > 0 {
                hub.count_sent(channel, sent[channel.index()]);
            }
        }
        let mut list = lock(&self.parked);
        // Clients parked while this batch was written come after the ones kept.
        parked.append(&mut list);
        *list = parked;
    }

    /// Hands back the clients whose position is before `seq`.
    fn hand_back_behind(&self, seq: u64) {
        let mut parked = lock(&self.parked);
        parked.retain(|parking| {
            let behind = lock(&parking.state).position < seq;
            if behind {
                parking.hand_back();
            }
            !behind
        });
    }

    fn hand_back_all(&self) {
        let parked = mem::take(&mut *lock(&self.parked));
        parked.iter().for_each(|p| p.hand_back());
    }
}

impl Parking {
    fn is_parked(&self) -> bool {
        lock(&self.state).socket.is_some()
    }

    /// Until the fan-out hands the client back.
    pub async fn handed_back(&self) {
        self.handed_back.notified().await
    }

    /// Takes the client back from the fan-out: it writes nothing more to the socket.
    pub fn unpark(&self) -> Unparked {
        let mut state = lock(&self.state);
        state.socket = None;
        Unparked {
            position: state.position,
            delivered: state.delivered,
            unwritten: state.unwritten.take(),
        }
    }

    fn hand_back(&self) {
        if lock(&self.state).socket.take().is_some() {
            self.handed_back.notify_one();
        }
    }

    /// Writes what of `framed` the client wants; false once it is no longer parked.
    fn write(&self, framed: &Framed, before: u64, sent: &mut [u64; 3]) -> bool {
        let mut state = lock(&self.state);
        let Some(socket) = &state.socket else {
            return false;
        };
        let newest = framed.newest();
        if state.position < before {
            drop(state);
            self.hand_back();
            return false;
        }
        let Some(bytes) = framed.for_client(&state.subscription, state.position, sent) else {
            state.position = state.position.max(newest);
            return true;
        };
        // A socket that is full or broken took nothing: the session writes the rest, or
        // finds it broken.
        let written = socket.try_write(&bytes).unwrap_or(0);
        state.position = newest;
        if written == bytes.len() {
            state.delivered = newest;
            return true;
        }
        state.unwritten = Some(Unwritten {
            bytes: bytes.slice(written..),
            newest,
        });
        drop(state);
        self.hand_back();
        false
    }
}

/// A batch of events framed once as WebSocket text frames (server to client, unmasked),
/// one after the other.
struct Framed<'a> {
    events: &'a [Arc<Event>],
    bytes: Bytes,
    /// Where each event's frame starts in `bytes`; the last entry is the end.
    starts: Vec<usize>,
}

impl<'a> Framed<'a> {
    fn new(events: &'a [Arc<Event>]) -> Framed<'a> {
        let size: usize = events.iter().map(|e| e.frame.as_bytes().len() + 10).sum();
        let mut bytes = BytesMut::with_capacity(size);
        let mut starts = Vec::with_capacity(events.len() + 1);
        for event in events {
            starts.push(bytes.len());
            put_text_frame(&mut bytes, event.frame.as_bytes());
        }
        starts.push(bytes.len());
        Framed {
            events,
            bytes: bytes.freeze(),
            starts,
        }
    }

    fn newest(&self) -> u64 {
        self.events.last().map_or(0, |e| e.seq)
    }

    /// The frames of the events after `position` that `subscription` wants, counted in
    /// `sent` by channel; `None` if there are none.
    fn for_client(
        &self,
        subscription: &Subscription,
        position: u64,
        sent: &mut [u64; 3],
    ) -> Option<Bytes> {
        let from = self.events.iter().position(|e| e.seq > position)?;
        let mut wanted =
            (from..self.events.len()).filter(|&i| subscription.matches(&self.events[i]));
        let first = wanted.next()?;
        let (mut last, mut count) = (first, 1);
        sent[self.events[first].channel.index()] += 1;
        for i in wanted {
            sent[self.events[i].channel.index()] += 1;
            (last, count) = (i, count + 1);
        }
        if last - first + 1 == count {
            // One run of frames: a slice of the shared bytes, nothing copied.
            return Some(self.bytes.slice(self.starts[first]..self.starts[last + 1]));
        }
        let mut bytes = BytesMut::new();
        for i in (first..=last).filter(|&i| subscription.matches(&self.events[i])) {
            bytes.extend_from_slice(&self.bytes[self.starts[i]..self.starts[i + 1]]);
        }
        Some(bytes.freeze())
    }
}

/// A final text frame as a server sends it (RFC 6455 §5.2): no mask, the length in 7,
/// 16 or 64 bits.
fn put_text_frame(out: &mut BytesMut, payload: &[u8]) {
    out.put_u8(0x81);
    match payload.len() {
        n @ 0..=125 => out.put_u8(n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::query::Query;
    use crate::api::realtime::subscription::Request;
    use crate::events::Body;
    use std::time::Duration;

    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    fn reading(seq: u64, sensor_id: i64, size: usize) -> Arc<Event> {
        let frame = format!("{{\"seq\":{seq},\"pad\":\"{}\"}}", "x".repeat(size));
        Arc::new(Event {
            seq,
            channel: Channel::Readings,
            event_type: "created".into(),
            sensor_id: Some(sensor_id),
            tipo: Some("temperature".into()),
            body: Body::Data(serde_json::Value::Null),
            frame: frame.into(),
        })
    }

    fn notice() -> Arc<Event> {
        Arc::new(Event {
            seq: 0,
            ..(*reading(1, 1, 0)).clone()
        })
    }

    fn subscription(query: &str) -> Subscription {
        Request::from_query(&Query::parse(Some(query)))
            .unwrap()
            .subscription
    }

    /// A connected pair: the server's end (to park) and the client's.
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Arc::new(server), client)
    }

    async fn handed_back_soon(parking: &Parking) {
        tokio::time::timeout(Duration::from_secs(1), parking.handed_back())
            .await
            .expect("handed back within 1 s");
    }

    async fn texts(client: TcpStream, count: usize) -> Vec<String> {
        let mut socket = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let mut texts = Vec::new();
        while texts.len() < count {
            let next = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
            match next.expect("frames within 5 s").unwrap().unwrap() {
                Message::Text(text) => texts.push(text.to_string()),
                other => panic!("not a text frame: {other:?}"),
            }
        }
        texts
    }

    #[tokio::test]
    async fn parked_clients_get_whole_frames_of_what_they_subscribed_to() {
        let hub = Hub::new(64);
        let fanout = Fanout::default();
        let (every_socket, every_client) = pair().await;
        let (two_socket, two_client) = pair().await;
        let (one_socket, one_client) = pair().await;
        let every = fanout
            .with_readings
            .park(every_socket, subscription("channel=readings"), 0);
        let two =
            fanout
                .with_readings
                .park(two_socket, subscription("channel=readings&sensor_id=2"), 0);
        let one =
            fanout
                .with_readings
                .park(one_socket, subscription("channel=readings&sensor_id=1"), 0);
        // Lengths that take each of the three length encodings; sensor 2's events follow
        // each other in the batch, sensor 1's do not.
        let batch = [
            reading(1, 1, 10),
            reading(2, 2, 300),
            reading(3, 2, 70_000),
            reading(4, 1, 20),
        ];
        fanout.with_readings.write_out(&batch, Some(0), &hub);

        let frames: Vec<&str> = batch.iter().map(|e| e.frame.as_str()).collect();
        assert_eq!(texts(every_client, 4).await, frames);
        assert_eq!(texts(two_client, 2).await, &frames[1..3]);
        assert_eq!(texts(one_client, 2).await, [frames[0], frames[3]]);
        for parking in [every, two, one] {
            let back = parking.unpark();
            assert_eq!((back.position, back.delivered), (4, 4));
            assert!(back.unwritten.is_none());
        }
        assert_eq!(hub.stats().total_messages_sent, 8);
    }

    #[tokio::test]
    async fn a_client_past_which_the_fanout_went_or_a_notice_goes_back_to_its_session() {
        let hub = Hub::new(64);
        let fanout = Fanout::default();
        let (behind_socket, _behind_client) = pair().await;
        let (ahead_socket, ahead_client) = pair().await;
        let behind = fanout
            .with_readings
            .park(behind_socket, subscription("channel=readings"), 1);
        let ahead = fanout
            .with_readings
            .park(ahead_socket, subscription("channel=readings"), 4);
        // The fan-out stood at 3: events 2 and 3 may not have reached `behind`.
        fanout
            .with_readings
            .write_out(&[reading(4, 1, 5), reading(5, 1, 5)], Some(3), &hub);
        handed_back_soon(&behind).await;
        let back = behind.unpark();
        assert_eq!((back.position, back.delivered), (1, 1));
        // `ahead` had 4 already: only 5 is written.
        let texts_ahead = texts(ahead_client, 1).await;
        assert!(texts_ahead[0].starts_with("{\"seq\":5,"), "{texts_ahead:?}");

        fanout.with_readings.write_out(&[notice()], Some(5), &hub);
        handed_back_soon(&ahead).await;
        assert_eq!(ahead.unpark().position, 5);
        assert!(lock(&fanout.with_readings.parked).is_empty());
    }

    #[tokio::test]
    async fn a_lane_joining_the_ring_hands_back_the_clients_behind_what_it_missed() {
        let fanout = Fanout::default();
        let (behind_socket, _behind_client) = pair().await;
        let (level_socket, level_client) = pair().await;
        let lane = &fanout.with_readings;
        let behind = lane.park(behind_socket, subscription("channel=readings"), 4);
        let level = lane.park(level_socket, subscription("channel=readings"), 5);
        // Event 5 was sent before the lane subscribed.
        lane.hand_back_behind(5);
        handed_back_soon(&behind).await;
        assert_eq!(behind.unpark().position, 4);
        lane.write_out(&[reading(6, 1, 5)], Some(5), &Hub::new(8));
        assert!(texts(level_client, 1).await[0].starts_with("{\"seq\":6,"));
        assert_eq!(level.unpark().position, 6);
    }

    #[tokio::test]
    async fn what_a_full_socket_did_not_take_goes_back_with_the_client() {
        let hub = Hub::new(64);
        let fanout = Fanout::default();
        // The session's own handle keeps the socket open once the fan-out lets it go.
        let (socket, mut client) = pair().await;
        let parking =
            fanout
                .with_readings
                .park(socket.clone(), subscription("channel=readings"), 0);
        let event = reading(1, 1, 32 * 1024 * 1024);
        fanout
            .with_readings
            .write_out(std::slice::from_ref(&event), Some(0), &hub);
        handed_back_soon(&parking).await;
        let back = parking.unpark();
        assert_eq!((back.position, back.delivered), (1, 0));
        let unwritten = back
            .unwritten
            .expect("the socket cannot take 32 MiB at once");
        assert_eq!(unwritten.newest, 1);

        // What the socket took and what is left make the frame, once.
        let mut framed = BytesMut::new();
        put_text_frame(&mut framed, event.frame.as_bytes());
        let taken = framed.len() - unwritten.bytes.len();
        assert!(taken > 0 && unwritten.bytes[..] == framed[taken..]);
        let mut received = vec![0; taken];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(received[..], framed[..taken]);
        // Nothing more is written once the client is back with its session.
        fanout
            .with_readings
            .write_out(&[reading(2, 1, 5)], Some(1), &hub);
        let mut more = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(200), client.read(&mut more)).await;
        assert!(
            read.is_err(),
            "the fan-out wrote after handing the client back"
        );
    }
}
