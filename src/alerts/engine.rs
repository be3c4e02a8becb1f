//! The state machine of one rule: inactive -> pending -> firing -> resolved. Pure: it is
//! told the time with every input, so it is tested without waiting.

use serde::{Deserialize, Serialize};

use super::rules::Condition;
use crate::model::Micros;

const MICROS_PER_SECOND: f64 = 1e6;

/// Where a rule stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Never fired since it was made.
    #[default]
    Inactive,
    /// The condition holds, not yet for `for_s`.
    Pending,
    Firing,
    /// It fired, and the value came back past the hysteresis.
    Resolved,
}

/// Who acknowledged a firing alert, when and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub by: String,
    pub comment: String,
    pub at: Micros,
}

/// What is stored of a rule's state, so that a restart picks it up where it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    pub phase: Phase,
    /// When the condition started to hold (pending and firing).
    pub since: Option<Micros>,
    pub fired_at: Option<Micros>,
    pub resolved_at: Option<Micros>,
    /// The value that made the last change (for `no_reading`, the seconds without one).
    pub value: Option<f64>,
    pub acknowledged: Option<Ack>,
    /// When the last webhook notification of this firing was queued.
    pub notified_at: Option<Micros>,
}

/// A change clients are told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Fired,
    Resolved,
}

/// What an input did to the rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The stored state changed (and must be saved).
    pub changed: bool,
    pub change: Option<Change>,
}

impl Outcome {
    fn saved() -> Outcome {
        Outcome {
            changed: true,
            change: None,
        }
    }

    fn told(change: Change) -> Outcome {
        Outcome {
            changed: true,
            change: Some(change),
        }
    }
}

/// One rule's condition and state, with what it remembers of the readings it saw.
#[derive(Debug, Clone)]
pub struct Tracker {
    condition: Condition,
    hold: Micros,
    hysteresis: f64,
    pub state: AlertState,
    /// Time of the last reading seen (by the gateway's clock), or when watching began.
    last_seen: Micros,
    /// The last value and its sample time, for rates; only values seen since start, so
    /// that nothing fires on a value from before a restart.
    last_value: Option<(f64, Micros)>,
}

impl Tracker {
    /// A tracker in `state`, watching from `now`.
    pub fn new(
        condition: Condition,
        for_s: f64,
        hysteresis: f64,
        state: AlertState,
        now: Micros,
    ) -> Tracker {
        Tracker {
            condition,
            hold: (for_s * MICROS_PER_SECOND) as Micros,
            hysteresis,
            state,
            last_seen: now,
            last_value: None,
        }
    }

    /// A reading of the watched sensor and `tipo`, taken at `taken_at`, seen at `now`.
    pub fn reading(&mut self, value: f64, taken_at: Micros, now: Micros) -> Outcome {
        let previous = self.last_value.replace((value, taken_at));
        self.last_seen = now;
        if let Condition::NoReading { .. } = self.condition {
            return match self.state.phase {
                Phase::Pending => self.back_to_quiet(),
                Phase::Firing => self.resolve(0.0, now),
                _ => Outcome::default(),
            };
        }
        let rate = previous.and_then(|(before, at)| {
            let minutes = (taken_at - at) as f64 / MICROS_PER_SECOND / 60.0;
            (minutes > 0.0).then(|| (value - before).abs() / minutes)
        });
        let measured = match self.condition {
            Condition::Rate { .. } => match rate {
                Some(rate) => rate,
                None => return Outcome::default(),
            },
            _ => value,
        };
        match self.state.phase {
            Phase::Inactive | Phase::Resolved if self.violated(measured) => {
                self.state.phase = Phase::Pending;
                self.state.since = Some(now);
                self.state.value = Some(measured);
                self.promote(now).unwrap_or_else(Outcome::saved)
            }
            Phase::Pending if !self.violated(measured) => self.back_to_quiet(),
            Phase::Pending => {
                self.state.value = Some(measured);
                self.promote(now).unwrap_or_default()
            }
            Phase::Firing if self.cleared(measured) => self.resolve(measured, now),
            Phase::Firing => {
                self.state.value = Some(measured);
                Outcome::default()
            }
            _ => Outcome::default(),
        }
    }

    /// The clock moved on. `offline`: the sensor is reported offline, so its last value
    /// is stale and may not fire a value rule.
    pub fn tick(&mut self, now: Micros, offline: bool) -> Outcome {
        if let Condition::NoReading { seconds } = self.condition {
            let limit = (seconds * MICROS_PER_SECOND) as Micros;
            let quiet_for = now - self.last_seen;
            if quiet_for <= limit {
                return Outcome::default();
            }
            let silent = quiet_for as f64 / MICROS_PER_SECOND;
            return match self.state.phase {
                Phase::Inactive | Phase::Resolved => {
                    self.state.phase = Phase::Pending;
                    self.state.since = Some(self.last_seen + limit);
                    self.state.value = Some(silent);
                    self.promote(now).unwrap_or_else(Outcome::saved)
                }
                Phase::Pending => {
                    self.state.value = Some(silent);
                    self.promote(now).unwrap_or_default()
                }
                Phase::Firing => Outcome::default(),
            };
        }
        match self.state.phase {
            Phase::Pending if offline || self.last_value.is_none() => Outcome::default(),
            Phase::Pending => self.promote(now).unwrap_or_default(),
            _ => Outcome::default(),
        }
    }

    /// The sensor was reported offline: a pending value rule stops waiting on a value
    /// that will not be confirmed (a `no_reading` rule is for silence).
    pub fn offline(&mut self) -> Outcome {
        self.last_value = None;
        match (self.condition, self.state.phase) {
            (Condition::NoReading { .. }, _) => Outcome::default(),
            (_, Phase::Pending) => self.back_to_quiet(),
            _ => Outcome::default(),
        }
    }

    /// Whether the alert fires now (a running `for_s` has run out).
    fn promote(&mut self, now: Micros) -> Option<Outcome> {
        let since = self.state.since?;
        if now - since < self.hold {
            return None;
        }
        self.state.phase = Phase::Firing;
        self.state.fired_at = Some(now);
        self.state.resolved_at = None;
        self.state.acknowledged = None;
        self.state.notified_at = None;
        Some(Outcome::told(Change::Fired))
    }

    fn back_to_quiet(&mut self) -> Outcome {
        self.state.phase = if self.state.fired_at.is_some() {
            Phase::Resolved
        } else {
            Phase::Inactive
        };
        self.state.since = None;
        Outcome::saved()
    }

    fn resolve(&mut self, value: f64, now: Micros) -> Outcome {
        self.state.phase = Phase::Resolved;
        self.state.resolved_at = Some(now);
        self.state.value = Some(value);
        Outcome::told(Change::Resolved)
    }

    fn violated(&self, measured: f64) -> bool {
        match self.condition {
            Condition::Above(threshold) => measured > threshold,
            Condition::Below(threshold) => measured < threshold,
            Condition::Outside { min, max } => measured < min || measured > max,
            Condition::Rate { per_minute } => measured > per_minute,
            Condition::NoReading { .. } => false,
        }
    }

    /// Whether a firing alert resolves: the value is back past the hysteresis.
    fn cleared(&self, measured: f64) -> bool {
        let h = self.hysteresis;
        match self.condition {
            Condition::Above(threshold) => measured <= threshold - h,
            Condition::Below(threshold) => measured >= threshold + h,
            Condition::Outside { min, max } => measured >= min + h && measured <= max - h,
            Condition::Rate { per_minute } => measured <= (per_minute - h).max(0.0),
            Condition::NoReading { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn tracker(condition: Condition, for_s: f64, hysteresis: f64) -> Tracker {
        Tracker::new(condition, for_s, hysteresis, AlertState::default(), 0)
    }

    #[test]
    fn above_waits_for_its_hold_then_fires_and_resolves_past_the_hysteresis() {
        let mut t = tracker(Condition::Above(10.0), 5.0, 1.0);
        assert_eq!(t.reading(9.0, 0, 0), Outcome::default());
        assert_eq!(t.reading(11.0, S, S), Outcome::saved());
        assert_eq!(t.state.phase, Phase::Pending);
        assert_eq!(t.reading(12.0, 3 * S, 3 * S), Outcome::default());
        assert_eq!(t.tick(5 * S, false), Outcome::default(), "4 s of 5");
        assert_eq!(t.tick(6 * S, false), Outcome::told(Change::Fired));
        assert_eq!(t.state.since, Some(S));
        assert_eq!(t.state.fired_at, Some(6 * S));
        assert_eq!(
            t.reading(9.5, 7 * S, 7 * S),
            Outcome::default(),
            "within hysteresis"
        );
        assert_eq!(t.state.phase, Phase::Firing);
        assert_eq!(
            t.reading(9.0, 8 * S, 8 * S),
            Outcome::told(Change::Resolved)
        );
        assert_eq!(t.state.phase, Phase::Resolved);
        assert_eq!(t.state.value, Some(9.0));
    }

    #[test]
    fn a_pending_alert_that_clears_before_its_hold_never_fires() {
        let mut t = tracker(Condition::Below(0.0), 10.0, 0.0);
        t.reading(-1.0, 0, 0);
        assert_eq!(t.reading(1.0, S, S), Outcome::saved());
        assert_eq!(t.state.phase, Phase::Inactive);
        assert_eq!(t.tick(20 * S, false), Outcome::default());
    }

    #[test]
    fn no_hold_fires_on_the_reading() {
        let mut t = tracker(Condition::Outside { min: 2.0, max: 8.0 }, 0.0, 0.5);
        assert_eq!(t.reading(1.0, 0, 0), Outcome::told(Change::Fired));
        assert_eq!(t.reading(2.2, S, S), Outcome::default());
        assert_eq!(
            t.reading(2.6, 2 * S, 2 * S),
            Outcome::told(Change::Resolved)
        );
        assert_eq!(t.reading(9.0, 3 * S, 3 * S), Outcome::told(Change::Fired));
    }

    #[test]
    fn an_offline_sensor_never_fires_a_value_rule_with_its_stale_value() {
        let mut t = tracker(Condition::Above(10.0), 5.0, 0.0);
        t.reading(11.0, 0, 0);
        assert_eq!(
            t.tick(10 * S, true),
            Outcome::default(),
            "offline: no firing"
        );
        assert_eq!(t.offline(), Outcome::saved());
        assert_eq!(t.state.phase, Phase::Inactive);
        assert_eq!(t.tick(20 * S, false), Outcome::default());
    }

    #[test]
    fn a_restarted_pending_rule_waits_for_a_fresh_value() {
        let state = AlertState {
            phase: Phase::Pending,
            since: Some(0),
            value: Some(11.0),
            ..AlertState::default()
        };
        let mut t = Tracker::new(Condition::Above(10.0), 5.0, 0.0, state, 100 * S);
        assert_eq!(t.tick(200 * S, false), Outcome::default());
        assert_eq!(
            t.reading(12.0, 201 * S, 201 * S),
            Outcome::told(Change::Fired)
        );
    }

    #[test]
    fn no_reading_fires_after_its_silence_and_hold_and_resolves_on_a_reading() {
        let mut t = tracker(Condition::NoReading { seconds: 10.0 }, 5.0, 0.0);
        t.reading(1.0, 0, 0);
        assert_eq!(t.tick(10 * S, false), Outcome::default());
        assert_eq!(t.tick(11 * S, false), Outcome::saved());
        assert_eq!(t.state.since, Some(10 * S));
        assert_eq!(t.tick(14 * S, true), Outcome::default());
        assert_eq!(t.tick(15 * S, true), Outcome::told(Change::Fired));
        assert_eq!(t.tick(100 * S, true), Outcome::default());
        assert_eq!(
            t.reading(1.0, 101 * S, 101 * S),
            Outcome::told(Change::Resolved)
        );
    }

    #[test]
    fn rate_compares_consecutive_samples_per_minute() {
        let mut t = tracker(Condition::Rate { per_minute: 2.0 }, 0.0, 0.5);
        assert_eq!(t.reading(0.0, 0, 0), Outcome::default());
        assert_eq!(t.reading(1.0, 60 * S, 60 * S), Outcome::default(), "1/min");
        assert_eq!(
            t.reading(4.0, 120 * S, 120 * S),
            Outcome::told(Change::Fired),
            "3/min"
        );
        assert_eq!(
            t.reading(5.8, 180 * S, 180 * S),
            Outcome::default(),
            "1.8/min"
        );
        assert_eq!(
            t.reading(7.0, 240 * S, 240 * S),
            Outcome::told(Change::Resolved),
            "1.2/min"
        );
    }
}
