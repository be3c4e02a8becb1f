//! A WebSocket client's bounded queue of outgoing frames.
//!
//! The session pushes, and takes everything queued whenever the socket has room (see
//! [`super::socket`]). When the queue is full, readings already superseded by a newer
//! reading of the same sensor and `tipo` are dropped (a dashboard only shows the
//! latest); if it is still full the client cannot keep up and is disconnected. Memory
//! per client is bounded by the capacity, and the frames themselves are shared with
//! every other client.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::events::{Channel, Event, QueueCounters};

/// One outgoing frame.
#[derive(Debug, Clone)]
pub enum Frame {
    Event(Arc<Event>),
    /// Greeting, answers, snapshots: never coalesced.
    Text(Utf8Bytes),
    Ping,
}

/// Frames a replaying client may have queued and still take another page.
pub const REPLAY_AHEAD: usize = 64;

/// The queue was full even after coalescing.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

/// Frames waiting for a client's socket.
pub struct Outbox {
    capacity: usize,
    counters: Arc<QueueCounters>,
    /// Only the session's task touches it; the lock is never contended.
    frames: Mutex<VecDeque<Frame>>,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.counters.dequeued(self.lock().len());
    }
}

impl Outbox {
    pub fn new(capacity: usize, counters: Arc<QueueCounters>) -> Outbox {
        Outbox {
            capacity,
            counters,
            frames: Mutex::new(VecDeque::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Frame>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues frames, coalescing readings if the queue is full.
    pub fn push(&self, frames: impl IntoIterator<Item = Frame>) -> Result<(), Overflow> {
        let mut queued = self.lock();
        let mut added = 0;
        let mut result = Ok(());
        for frame in frames {
            if queued.len() >= self.capacity {
                // What coalescing drops may have come in with this push: count it first.
                self.counters.queued(std::mem::take(&mut added));
                let dropped = coalesce(&mut queued);
                self.counters.coalesced(dropped);
                self.counters.dequeued(dropped);
                if queued.len() >= self.capacity {
                    result = Err(Overflow);
                    break;
                }
            }
            queued.push_back(frame);
            added += 1;
        }
        // The counters are shared by every client: one update per push, not per frame.
        if added > 0 {
            self.counters.queued(added);
        }
        result
    }

    /// Whether a replaying session may add another page: only while the queue holds less
    /// than [`REPLAY_AHEAD`] frames (or half its capacity, if smaller). Clients resuming
    /// together soon stand at different places in the log, so each holds stored events
    /// of its own; a storm of hundreds of them, each with a full queue, took hundreds of
    /// megabytes. The session takes the whole queue when the socket has room, so a page
    /// still waits while the one before it is written.
    pub fn has_room(&self) -> bool {
        self.lock().len() < REPLAY_AHEAD.min(self.capacity / 2)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Takes everything queued, to be written.
    pub fn take(&self) -> VecDeque<Frame> {
        let frames = std::mem::take(&mut *self.lock());
        if !frames.is_empty() {
            self.counters.dequeued(frames.len());
        }
        frames
    }
}

/// Drops every reading event for which a newer one of the same sensor and `tipo` is
/// queued behind it; returns how many were dropped.
fn coalesce(frames: &mut VecDeque<Frame>) -> usize {
    let mut newest = HashSet::new();
    let before = frames.len();
    let mut kept: VecDeque<Frame> = VecDeque::with_capacity(before);
    for frame in frames.drain(..).rev() {
        if let Frame::Event(event) = &frame {
            // Only new readings supersede each other: a change or deletion of a stored
            // reading is news a dashboard cannot learn from a later sample.
            if event.channel == Channel::Readings
                && event.event_type == "created"
                && !newest.insert((event.sensor_id, event.tipo.clone()))
            {
                continue;
            }
        }
        kept.push_front(frame);
    }
    let dropped = before - kept.len();
    *frames = kept;
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn reading(seq: u64, sensor: i64, tipo: &str) -> Frame {
        Frame::Event(Arc::new(Event {
            seq,
            channel: Channel::Readings,
            event_type: "created".into(),
            sensor_id: Some(sensor),
            tipo: Some(tipo.into()),
            body: crate::events::Body::Data(serde_json::Value::Null),
            frame: "{}".into(),
        }))
    }

    fn seqs(outbox: &Outbox) -> Vec<u64> {
        outbox
            .take()
            .iter()
            .filter_map(|f| match f {
                Frame::Event(e) => Some(e.seq),
                _ => None,
            })
            .collect()
    }

    fn outbox(capacity: usize) -> (Outbox, Arc<QueueCounters>) {
        let counters = Arc::new(QueueCounters::default());
        (Outbox::new(capacity, counters.clone()), counters)
    }

    #[test]
    fn full_queue_keeps_latest_reading_per_sensor_and_tipo() {
        let (outbox, counters) = outbox(4);
        outbox
            .push([
                reading(1, 1, "t"),
                reading(2, 1, "h"),
                reading(3, 1, "t"),
                reading(4, 2, "t"),
            ])
            .unwrap();
        outbox.push([reading(5, 1, "t")]).unwrap();
        // Only reading 1 was superseded when the queue filled; 3 went stale after.
        assert_eq!(counters.coalesced.load(Relaxed), 1);
        assert_eq!(counters.queued.load(Relaxed), 4);
        assert_eq!(seqs(&outbox), [2, 3, 4, 5]);
        assert_eq!(counters.queued.load(Relaxed), 0);
    }

    #[test]
    fn changes_of_stored_readings_are_never_coalesced() {
        let (outbox, _) = outbox(3);
        let deleted = |seq| {
            let Frame::Event(event) = reading(seq, 1, "t") else {
                unreachable!()
            };
            Frame::Event(Arc::new(Event {
                event_type: "deleted".into(),
                ..(*event).clone()
            }))
        };
        outbox
            .push([deleted(1), reading(2, 1, "t"), reading(3, 1, "t")])
            .unwrap();
        outbox.push([reading(4, 1, "t")]).unwrap();
        assert_eq!(seqs(&outbox), [1, 3, 4]);
    }

    #[test]
    fn overflows_when_nothing_can_be_coalesced() {
        let (outbox, _) = outbox(3);
        outbox
            .push([
                reading(1, 1, "t"),
                Frame::Text("a".into()),
                reading(2, 2, "t"),
            ])
            .unwrap();
        assert_eq!(outbox.push([reading(3, 3, "t")]), Err(Overflow));
    }

    #[test]
    fn room_is_half_a_small_capacity() {
        let (outbox, _) = outbox(4);
        outbox.push([Frame::Ping]).unwrap();
        assert!(outbox.has_room());
        outbox.push([Frame::Ping]).unwrap();
        assert!(!outbox.has_room());
        outbox.take();
        assert!(outbox.has_room());
    }

    #[test]
    fn room_ends_at_the_replay_ahead_in_a_large_queue() {
        let (outbox, _) = outbox(1024);
        outbox.push((1..REPLAY_AHEAD).map(|_| Frame::Ping)).unwrap();
        assert!(outbox.has_room());
        outbox.push([Frame::Ping]).unwrap();
        assert!(!outbox.has_room());
        outbox.take();
        assert!(outbox.has_room());
    }
}
