//! Rejects temperature/humidity readings that passed the checksum but that no real room
//! produces. DHT sensors are the reason: a DHT22 now and then sends a doubled or halved
//! value with a valid checksum, and the kernel driver and our GPIO decoder both pass it on.
//! The filter is pure (the caller supplies the time of each reading), so both DHT sources
//! share it and tests drive it without clocks.

use std::time::Instant;

use super::datasheet::{Limits, Reading};
use crate::sensors::source::SensorError;

/// How far a reading may move from the last accepted one: `base + per_minute * minutes`.
/// The base covers sensor noise and resolution (a DHT11 reports whole degrees) at the 2 s
/// minimum pacing; the rate is what a real room does at most (a window opened onto winter,
/// breath on the sensor). Letting the allowance grow with the elapsed time means a long
/// gap (sensor unplugged for an hour) does not pin the series to a stale value.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    base: f64,
    per_minute: f64,
}

impl Step {
    fn allows(&self, from: f64, to: f64, elapsed_secs: f64) -> bool {
        (to - from).abs() <= self.base + self.per_minute * elapsed_secs / 60.0
    }
}

/// 10 °C or 30 %RH within a minute is more than any room does; a doubled 21 °C (42 °C) or
/// a halved 40 %RH (20 %RH) two seconds later is well outside the allowance.
const TEMPERATURE_STEP: Step = Step {
    base: 2.0,
    per_minute: 10.0,
};
const HUMIDITY_STEP: Step = Step {
    base: 10.0,
    per_minute: 30.0,
};

#[derive(Debug, Clone, Copy)]
struct Sample {
    reading: Reading,
    at: Instant,
}

impl Sample {
    /// Describes why `next` cannot follow `self`, or `None` when it can.
    fn jump_to(&self, next: &Sample) -> Option<String> {
        let secs = next.at.saturating_duration_since(self.at).as_secs_f64();
        let (a, b) = (self.reading, next.reading);
        if !TEMPERATURE_STEP.allows(a.temperature, b.temperature, secs) {
            return Some(format!(
                "temperatura jumped from {} to {} °C in {secs:.1} s",
                a.temperature, b.temperature
            ));
        }
        if !HUMIDITY_STEP.allows(a.humidity, b.humidity, secs) {
            return Some(format!(
                "humedad jumped from {} to {} % in {secs:.1} s",
                a.humidity, b.humidity
            ));
        }
        None
    }
}

/// Range and rate-of-change check for one sensor's consecutive readings.
///
/// A reading outside the model's range is always rejected. A reading that jumps too far
/// from the last accepted one is rejected once; if the next reading agrees with it, the
/// change was real (a heater switched on next to the sensor) and the filter follows it,
/// so a real step costs one sample while an isolated glitch never gets through.
#[derive(Debug, Clone)]
pub struct PlausibilityFilter {
    limits: Limits,
    accepted: Option<Sample>,
    rejected: Option<Sample>,
}

impl PlausibilityFilter {
    /// A filter with no history: the first in-range reading is accepted.
    pub fn new(limits: Limits) -> Self {
        PlausibilityFilter {
            limits,
            accepted: None,
            rejected: None,
        }
    }

    /// Accepts `reading` taken at `at`, or says why no real room produces it.
    pub fn check(&mut self, reading: Reading, at: Instant) -> Result<Reading, SensorError> {
        let limits = &self.limits;
        if !limits.temperature.contains(reading.temperature) {
            return Err(SensorError::Implausible(format!(
                "temperatura {} °C outside {}..{} °C",
                reading.temperature, limits.temperature.min, limits.temperature.max
            )));
        }
        if !limits.humidity.contains(reading.humidity) {
            return Err(SensorError::Implausible(format!(
                "humedad {} % outside {}..{} %",
                reading.humidity, limits.humidity.min, limits.humidity.max
            )));
        }
        let sample = Sample { reading, at };
        let jump = self
            .accepted
            .as_ref()
            .and_then(|last| last.jump_to(&sample));
        let confirmed = self
            .rejected
            .as_ref()
            .is_some_and(|previous| previous.jump_to(&sample).is_none());
        match jump {
            Some(why) if !confirmed => {
                self.rejected = Some(sample);
                Err(SensorError::Implausible(why))
            }
            _ => {
                self.accepted = Some(sample);
                self.rejected = None;
                Ok(reading)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::dht::datasheet::DhtModel;
    use std::time::Duration;

    /// The DHT22's datasheet range, which the filter is tried against.
    const ROOM: DhtModel = DhtModel::Dht22;

    fn r(temperature: f64, humidity: f64) -> Reading {
        Reading {
            temperature,
            humidity,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn accepts_first_reading_in_range_and_small_changes() {
        let t0 = Instant::now();
        let mut f = PlausibilityFilter::new(ROOM.limits());
        assert_eq!(f.check(r(21.0, 40.0), t0), Ok(r(21.0, 40.0)));
        assert_eq!(f.check(r(22.5, 45.0), t0 + secs(2)), Ok(r(22.5, 45.0)));
    }

    #[test]
    fn rejects_out_of_range_without_touching_history() {
        let t0 = Instant::now();
        let mut f = PlausibilityFilter::new(ROOM.limits());
        assert!(matches!(
            f.check(r(81.0, 40.0), t0),
            Err(SensorError::Implausible(_))
        ));
        assert!(matches!(
            f.check(r(20.0, 100.5), t0),
            Err(SensorError::Implausible(_))
        ));
        assert!(matches!(
            f.check(r(f64::NAN, 40.0), t0),
            Err(SensorError::Implausible(_))
        ));
        // Nothing was accepted yet, so any in-range value is the first.
        assert_eq!(f.check(r(-10.0, 90.0), t0), Ok(r(-10.0, 90.0)));
    }

    #[test]
    fn rejects_doubled_and_halved_glitches_between_good_readings() {
        let t0 = Instant::now();
        let mut f = PlausibilityFilter::new(ROOM.limits());
        f.check(r(21.0, 40.0), t0).unwrap();
        let doubled = f.check(r(42.0, 40.0), t0 + secs(2));
        assert!(
            matches!(&doubled, Err(SensorError::Implausible(why)) if why.contains("temperatura")),
            "{doubled:?}"
        );
        assert_eq!(f.check(r(21.1, 40.0), t0 + secs(4)), Ok(r(21.1, 40.0)));
        let halved = f.check(r(21.1, 20.0), t0 + secs(6));
        assert!(
            matches!(&halved, Err(SensorError::Implausible(why)) if why.contains("humedad")),
            "{halved:?}"
        );
        assert_eq!(f.check(r(21.2, 41.0), t0 + secs(8)), Ok(r(21.2, 41.0)));
    }

    #[test]
    fn allowance_grows_with_elapsed_time() {
        let t0 = Instant::now();
        let mut f = PlausibilityFilter::new(ROOM.limits());
        f.check(r(20.0, 40.0), t0).unwrap();
        // 11 °C: too much after 2 s, fine after a minute (2 + 10 = 12 allowed).
        let mut early = f.clone();
        assert!(early.check(r(31.0, 40.0), t0 + secs(2)).is_err());
        assert_eq!(f.check(r(31.0, 40.0), t0 + secs(60)), Ok(r(31.0, 40.0)));
    }

    #[test]
    fn a_confirmed_step_is_followed_after_one_rejection() {
        let t0 = Instant::now();
        let mut f = PlausibilityFilter::new(ROOM.limits());
        f.check(r(20.0, 40.0), t0).unwrap();
        assert!(f.check(r(30.0, 40.0), t0 + secs(2)).is_err());
        assert_eq!(f.check(r(30.2, 40.0), t0 + secs(4)), Ok(r(30.2, 40.0)));
        // The new level is now the reference: going back is a jump again.
        assert!(f.check(r(20.0, 40.0), t0 + secs(6)).is_err());
    }

    #[test]
    fn two_different_glitches_in_a_row_are_both_rejected() {
        let t0 = Instant::now();
        let mut f = PlausibilityFilter::new(ROOM.limits());
        f.check(r(20.0, 40.0), t0).unwrap();
        assert!(f.check(r(40.0, 40.0), t0 + secs(2)).is_err());
        assert!(f.check(r(10.0, 40.0), t0 + secs(4)).is_err());
        assert_eq!(f.check(r(20.5, 40.0), t0 + secs(6)), Ok(r(20.5, 40.0)));
    }
}
