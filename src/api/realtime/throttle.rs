//! Per-subscription reading rate: at most one reading per sensor and `tipo` every
//! interval, the latest one winning. For a phone on Wi-Fi that wants a calm screen, not
//! every sample.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::events::{Channel, Event};

type Key = (Option<i64>, Option<String>);

/// The events [`Throttle::admit`] lets through, in order: at most two.
pub type Admitted =
    std::iter::Chain<std::option::IntoIter<Arc<Event>>, std::option::IntoIter<Arc<Event>>>;

/// Holds back readings that come too soon after the last one sent.
pub struct Throttle {
    every: Duration,
    last_sent: HashMap<Key, Instant>,
    held: HashMap<Key, Arc<Event>>,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last_sent: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// What may go now, in order: nothing (the event is held, replacing an older held
    /// one of the same sensor and `tipo`), the event, or a held reading and then the
    /// event. Only new readings are throttled: a change or deletion of a stored reading
    /// always goes through, after the reading of its sensor and `tipo` held back, which
    /// may be the very reading it changes.
    pub fn admit(&mut self, event: Arc<Event>, now: Instant) -> Admitted {
        let key = (event.sensor_id, event.tipo.clone());
        if event.channel != Channel::Readings {
            return None.into_iter().chain(Some(event));
        }
        if event.event_type != "created" {
            let held = self.held.remove(&key);
            if held.is_some() {
                self.last_sent.insert(key, now);
            }
            return held.into_iter().chain(Some(event));
        }
        match self.last_sent.get(&key) {
            Some(at) if now.duration_since(*at) < self.every => {
                self.held.insert(key, event);
                None.into_iter().chain(None)
            }
            _ => {
                self.last_sent.insert(key, now);
                None.into_iter().chain(Some(event))
            }
        }
    }

    /// When the next held reading may go.
    pub fn next_due(&self) -> Option<Instant> {
        self.held
            .keys()
            .filter_map(|key| self.last_sent.get(key))
            .min()
            .map(|at| *at + self.every)
    }

    /// Forgets the held readings: they came before a `resync`, after which the client
    /// reloads its state.
    pub fn drop_held(&mut self) {
        self.held.clear();
    }

    /// Held readings whose interval has passed, in `seq` order.
    pub fn release(&mut self, now: Instant) -> Vec<Arc<Event>> {
        let due: Vec<Key> = self
            .held
            .keys()
            .filter(|key| {
                self.last_sent
                    .get(*key)
                    .is_none_or(|at| now.duration_since(*at) >= self.every)
            })
            .cloned()
            .collect();
        let mut released: Vec<Arc<Event>> = due
            .into_iter()
            .filter_map(|key| {
                self.last_sent.insert(key.clone(), now);
                self.held.remove(&key)
            })
            .collect();
        released.sort_by_key(|e| e.seq);
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64, sensor: i64) -> Arc<Event> {
        Arc::new(Event {
            seq,
            channel: Channel::Readings,
            event_type: "created".into(),
            sensor_id: Some(sensor),
            tipo: Some("t".into()),
            body: crate::events::Body::Data(serde_json::Value::Null),
            frame: "{}".into(),
        })
    }

    #[test]
    fn latest_reading_wins_within_the_interval() {
        let mut throttle = Throttle::new(Duration::from_millis(1000));
        let t0 = Instant::now();
        assert_eq!(seqs(throttle.admit(reading(1, 1), t0)), [1]);
        assert!(seqs(throttle.admit(reading(2, 1), t0 + Duration::from_millis(100))).is_empty());
        assert!(seqs(throttle.admit(reading(3, 1), t0 + Duration::from_millis(200))).is_empty());
        assert_eq!(
            seqs(throttle.admit(reading(4, 2), t0 + Duration::from_millis(200))),
            [4]
        );
        assert_eq!(throttle.next_due(), Some(t0 + Duration::from_millis(1000)));
        assert!(throttle.release(t0 + Duration::from_millis(999)).is_empty());
        let released = throttle.release(t0 + Duration::from_millis(1000));
        assert_eq!(released.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(throttle.next_due(), None);
    }

    #[test]
    fn held_readings_are_dropped_at_a_resync() {
        let mut throttle = Throttle::new(Duration::from_millis(1000));
        let t0 = Instant::now();
        assert_eq!(seqs(throttle.admit(reading(1, 1), t0)), [1]);
        assert!(seqs(throttle.admit(reading(2, 1), t0 + Duration::from_millis(100))).is_empty());
        throttle.drop_held();
        assert_eq!(throttle.next_due(), None);
        assert!(throttle
            .release(t0 + Duration::from_millis(1000))
            .is_empty());
    }

    fn seqs(admitted: Admitted) -> Vec<u64> {
        admitted.map(|e| e.seq).collect()
    }

    #[test]
    fn changes_of_stored_readings_pass_after_the_reading_held_back() {
        let mut throttle = Throttle::new(Duration::from_secs(1));
        let now = Instant::now();
        let change = |seq, kind: &str| {
            Arc::new(Event {
                event_type: kind.into(),
                ..(*reading(seq, 1)).clone()
            })
        };
        assert_eq!(seqs(throttle.admit(reading(1, 1), now)), [1]);
        assert_eq!(seqs(throttle.admit(change(2, "updated"), now)), [2]);
        assert!(seqs(throttle.admit(reading(3, 1), now)).is_empty());
        // Reading 3 may be the one deleted: it goes first, and is not sent again later.
        assert_eq!(seqs(throttle.admit(change(4, "deleted"), now)), [3, 4]);
        assert!(throttle.release(now + Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn other_channels_pass() {
        let mut throttle = Throttle::new(Duration::from_secs(1));
        let event = Arc::new(Event {
            seq: 1,
            channel: Channel::Sensors,
            event_type: "created".into(),
            sensor_id: Some(1),
            tipo: None,
            body: crate::events::Body::Data(serde_json::Value::Null),
            frame: "{}".into(),
        });
        let now = Instant::now();
        assert_eq!(seqs(throttle.admit(event.clone(), now)), [1]);
        assert_eq!(seqs(throttle.admit(event, now)), [1]);
    }
}
