//! Per-subscription reading rate: at most one reading per sensor and `tipo` every
//! interval, the latest one winning. For a phone on Wi-Fi that wants a calm screen, not
//! every sample.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::events::{Channel, Event};

type Key = (Option<i64>, Option<String>);

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

    /// Passes an event through now, or holds it (replacing an older held one of the
    /// same sensor and `tipo`). Only new readings are throttled: a change or deletion of
    /// a stored reading always goes through.
    pub fn admit(&mut self, event: Arc<Event>, now: Instant) -> Option<Arc<Event>> {
        if event.channel != Channel::Readings || event.event_type != "created" {
            return Some(event);
        }
        let key = (event.sensor_id, event.tipo.clone());
        match self.last_sent.get(&key) {
            Some(at) if now.duration_since(*at) < self.every => {
                self.held.insert(key, event);
                None
            }
            _ => {
                self.last_sent.insert(key, now);
                Some(event)
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
            frame: "{}".into(),
        })
    }

    #[test]
    fn latest_reading_wins_within_the_interval() {
        let mut throttle = Throttle::new(Duration::from_millis(1000));
        let t0 = Instant::now();
        assert!(throttle.admit(reading(1, 1), t0).is_some());
        assert!(throttle
            .admit(reading(2, 1), t0 + Duration::from_millis(100))
            .is_none());
        assert!(throttle
            .admit(reading(3, 1), t0 + Duration::from_millis(200))
            .is_none());
        assert!(throttle
            .admit(reading(4, 2), t0 + Duration::from_millis(200))
            .is_some());
        assert_eq!(throttle.next_due(), Some(t0 + Duration::from_millis(1000)));
        assert!(throttle.release(t0 + Duration::from_millis(999)).is_empty());
        let released = throttle.release(t0 + Duration::from_millis(1000));
        assert_eq!(released.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(throttle.next_due(), None);
    }

    #[test]
    fn changes_of_stored_readings_pass() {
        let mut throttle = Throttle::new(Duration::from_secs(1));
        let now = Instant::now();
        assert!(throttle.admit(reading(1, 1), now).is_some());
        for (seq, kind) in [(2, "updated"), (3, "deleted")] {
            let change = Arc::new(Event {
                event_type: kind.into(),
                ..(*reading(seq, 1)).clone()
            });
            assert!(throttle.admit(change, now).is_some(), "{kind}");
        }
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
            frame: "{}".into(),
        });
        let now = Instant::now();
        assert!(throttle.admit(event.clone(), now).is_some());
        assert!(throttle.admit(event, now).is_some());
    }
}
