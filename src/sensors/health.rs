//! Sensor health: every read outcome counted, the time of the last good sample, and
//! whether the sensor is online. A sensor with no good sample for a few intervals is
//! offline, so no client mistakes its last value for a fresh one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::source::SensorError;
use crate::model::Micros;

/// Where a sampled sensor stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Estado {
    /// Started, no good sample yet, not yet overdue.
    Starting,
    /// Good samples arrive.
    Online,
    /// No good sample for longer than allowed.
    Offline,
}

/// What clients see of a sensor's health (`salud` in `GET /api/v1/sensores/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Salud {
    pub estado: Estado,
    /// Whether the device is there (serial port open, sysfs node present).
    pub conectado: bool,
    /// When the last good sample was taken.
    #[serde(serialize_with = "crate::model::wire_time::optional")]
    pub ultima_muestra: Option<Micros>,
    /// Read outcomes since start: `ok` and each failure kind.
    pub conteo: BTreeMap<&'static str, u64>,
    pub ultimo_error: Option<String>,
    #[serde(serialize_with = "crate::model::wire_time::optional")]
    pub ultimo_error_en: Option<Micros>,
}

/// A change worth telling clients about on `general`.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Offline,
    /// Back after being offline.
    Online,
    PortLost(String),
    PortFound,
}

impl Transition {
    /// The `event_type` of the system event.
    pub fn event_type(&self) -> &'static str {
        match self {
            Transition::Offline => "sensor_offline",
            Transition::Online => "sensor_online",
            Transition::PortLost(_) => "port_lost",
            Transition::PortFound => "port_found",
        }
    }
}

/// Follows one sensor's outcomes; pure apart from the clock values it is given.
pub struct Tracker {
    offline_after: Duration,
    last_good: Instant,
    salud: Salud,
}

impl Tracker {
    /// `offline_after`: how long without a good sample makes the sensor offline.
    /// `told_offline`: clients were last told the sensor is offline (by an earlier
    /// sampling thread of it); the tracker then starts offline, so that its first good
    /// sample announces `sensor_online` and no second `sensor_offline` is sent.
    pub fn new(offline_after: Duration, now: Instant, told_offline: bool) -> Tracker {
        Tracker {
            offline_after,
            last_good: now,
            salud: Salud {
                estado: if told_offline {
                    Estado::Offline
                } else {
                    Estado::Starting
                },
                conectado: true,
                ultima_muestra: None,
                conteo: BTreeMap::new(),
                ultimo_error: None,
                ultimo_error_en: None,
            },
        }
    }

    pub fn salud(&self) -> &Salud {
        &self.salud
    }

    /// Records a good sample taken at `taken_at`.
    pub fn ok(&mut self, now: Instant, taken_at: Micros) -> Option<Transition> {
        *self.salud.conteo.entry("ok").or_default() += 1;
        self.last_good = now;
        self.salud.ultima_muestra = Some(taken_at);
        let was = std::mem::replace(&mut self.salud.estado, Estado::Online);
        (was == Estado::Offline).then_some(Transition::Online)
    }

    /// Records a failed read.
    pub fn failed(&mut self, error: &SensorError, at: Micros) -> Option<Transition> {
        *self.salud.conteo.entry(error.kind()).or_default() += 1;
        self.salud.ultimo_error = Some(error.to_string());
        self.salud.ultimo_error_en = Some(at);
        match error {
            SensorError::PortLost(why) if self.salud.conectado => {
                self.salud.conectado = false;
                Some(Transition::PortLost(why.clone()))
            }
            _ => None,
        }
    }

    /// Checks the device and the time since the last good sample, after every attempt.
    pub fn check(&mut self, connected: bool, now: Instant) -> Vec<Transition> {
        let mut changes = Vec::new();
        if connected && !self.salud.conectado {
            self.salud.conectado = true;
            changes.push(Transition::PortFound);
        }
        if self.salud.estado != Estado::Offline
            && now.duration_since(self.last_good) > self.offline_after
        {
            self.salud.estado = Estado::Offline;
            changes.push(Transition::Offline);
        }
        changes
    }
}

/// Health of every sampled sensor, written by sampling threads, read by the API and
/// the watchdog.
#[derive(Default)]
pub struct HealthBoard {
    sensors: Mutex<HashMap<i64, Entry>>,
    /// Sensors whose last announcement on `general` was `sensor_offline`. Kept apart
    /// from `sensors` because it outlives a sampling thread: a sensor restarted with a
    /// new source, switched off and on, or reconfigured by a reload gets a new thread,
    /// and that thread's first good sample must still announce `sensor_online`.
    told_offline: Mutex<HashSet<i64>>,
    scheduler_running: AtomicBool,
}

struct Entry {
    salud: Salud,
    last_attempt: Instant,
    /// Longest expected pause between two attempts; longer means the thread is stuck.
    allowed_gap: Duration,
}

impl HealthBoard {
    /// Records a sensor's health after a read attempt.
    pub fn record(&self, sensor_id: i64, salud: &Salud, allowed_gap: Duration) {
        self.lock().insert(
            sensor_id,
            Entry {
                salud: salud.clone(),
                last_attempt: Instant::now(),
                allowed_gap,
            },
        );
    }

    /// The sensor is no longer sampled; what clients were last told of it is kept.
    pub fn remove(&self, sensor_id: i64) {
        self.lock().remove(&sensor_id);
    }

    /// The sensor was deleted: nothing of it is kept.
    pub fn forget(&self, sensor_id: i64) {
        self.remove(sensor_id);
        self.told().remove(&sensor_id);
    }

    /// Notes an availability change announced on `general`.
    pub fn announced(&self, sensor_id: i64, change: &Transition) {
        match change {
            Transition::Offline => {
                self.told().insert(sensor_id);
            }
            Transition::Online => {
                self.told().remove(&sensor_id);
            }
            Transition::PortLost(_) | Transition::PortFound => {}
        }
    }

    /// Takes what clients were told before a restart, from the stored events.
    pub fn told_offline_before(&self, sensor_ids: impl IntoIterator<Item = i64>) {
        self.told().extend(sensor_ids);
    }

    /// Whether clients were last told that the sensor is offline.
    pub fn told_offline(&self, sensor_id: i64) -> bool {
        self.told().contains(&sensor_id)
    }

    /// Health of a sensor, if it is sampled.
    pub fn get(&self, sensor_id: i64) -> Option<Salud> {
        self.lock().get(&sensor_id).map(|e| e.salud.clone())
    }

    /// Every sampled sensor's health, by id.
    pub fn all(&self) -> Vec<(i64, Salud)> {
        let mut all: Vec<(i64, Salud)> = self
            .lock()
            .iter()
            .map(|(id, e)| (*id, e.salud.clone()))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// Sampled sensors by state, for status lines.
    pub fn count(&self, estado: Estado) -> usize {
        self.lock()
            .values()
            .filter(|e| e.salud.estado == estado)
            .count()
    }

    /// Sensors whose sampling thread has not attempted a read for longer than it should
    /// (a hung driver, a dead thread).
    pub fn stalled(&self, now: Instant) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .lock()
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_attempt) > e.allowed_gap)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Whether the scheduler is following sensor records.
    pub fn scheduler_running(&self) -> bool {
        self.scheduler_running.load(Ordering::Relaxed)
    }

    pub(crate) fn set_scheduler_running(&self, running: bool) {
        self.scheduler_running.store(running, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Entry>> {
        self.sensors.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn told(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.told_offline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_after_silence_and_online_again() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(Duration::from_secs(6), t0, false);
        assert_eq!(tracker.salud().estado, Estado::Starting);
        assert_eq!(tracker.ok(t0 + Duration::from_secs(1), 10), None);
        assert_eq!(tracker.salud().estado, Estado::Online);
        assert_eq!(tracker.failed(&SensorError::Timeout, 20), None);
        assert!(tracker.check(true, t0 + Duration::from_secs(7)).is_empty());
        assert_eq!(
            tracker.check(true, t0 + Duration::from_secs(8)),
            [Transition::Offline]
        );
        assert!(
            tracker.check(true, t0 + Duration::from_secs(9)).is_empty(),
            "reported once"
        );
        assert_eq!(
            tracker.ok(t0 + Duration::from_secs(10), 30),
            Some(Transition::Online)
        );
        let salud = tracker.salud();
        assert_eq!(salud.conteo["ok"], 2);
        assert_eq!(salud.conteo["timeout"], 1);
        assert_eq!(salud.ultima_muestra, Some(30));
        assert_eq!(salud.ultimo_error_en, Some(20));
    }

    #[test]
    fn a_tracker_of_a_sensor_told_offline_announces_its_return_only() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(Duration::from_secs(6), t0, true);
        assert_eq!(tracker.salud().estado, Estado::Offline);
        assert!(
            tracker.check(true, t0 + Duration::from_secs(60)).is_empty(),
            "clients know already"
        );
        assert_eq!(
            tracker.ok(t0 + Duration::from_secs(61), 10),
            Some(Transition::Online)
        );
    }

    #[test]
    fn port_lost_and_found_are_reported_once() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(Duration::from_secs(60), t0, false);
        let lost = SensorError::PortLost("unplugged".into());
        assert_eq!(
            tracker.failed(&lost, 1),
            Some(Transition::PortLost("unplugged".into()))
        );
        assert_eq!(tracker.failed(&lost, 2), None);
        assert!(tracker.check(false, t0).is_empty());
        assert_eq!(tracker.check(true, t0), [Transition::PortFound]);
        assert!(tracker.salud().conectado);
    }
}
