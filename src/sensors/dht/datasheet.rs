//! What the datasheets say about the DHT family: the variants, the ranges they measure,
//! how they are woken and how often they can be read, and the pair they report.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sensors::source::Measurement;

/// Which DHT variant is wired: the frame layout and the plausible ranges differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DhtModel {
    /// Blue DHT11: whole degrees 0..50 °C, 20..90 %RH.
    Dht11,
    /// White DHT22, also sold as AM2302: tenths, -40..80 °C, 0..100 %RH.
    #[serde(alias = "am2302")]
    Dht22,
}

impl DhtModel {
    /// The measuring range from the datasheet; values outside it are glitches.
    pub fn limits(self) -> Limits {
        match self {
            DhtModel::Dht11 => Limits {
                temperature: Bounds {
                    min: 0.0,
                    max: 50.0,
                },
                humidity: Bounds {
                    min: 20.0,
                    max: 90.0,
                },
            },
            DhtModel::Dht22 => Limits {
                temperature: Bounds {
                    min: -40.0,
                    max: 80.0,
                },
                humidity: Bounds {
                    min: 0.0,
                    max: 100.0,
                },
            },
        }
    }

    /// How long the host holds the line low to wake the sensor: the DHT11 needs at least
    /// 18 ms, the DHT22 1 to 20 ms (so 18 ms could overshoot past 20 ms under load).
    pub(super) fn start_signal(self) -> Duration {
        match self {
            DhtModel::Dht11 => Duration::from_millis(20),
            DhtModel::Dht22 => Duration::from_millis(2),
        }
    }
}

/// The sensor needs two seconds between conversions; asking sooner returns stale data or
/// no answer at all.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);

/// One decoded temperature/humidity pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Degrees Celsius.
    pub temperature: f64,
    /// Percent relative humidity.
    pub humidity: f64,
}

impl Reading {
    /// The pair in the wire vocabulary.
    pub fn measurements(&self) -> Vec<Measurement> {
        vec![
            Measurement::in_known_unit("temperatura", self.temperature),
            Measurement::in_known_unit("humedad", self.humidity),
        ]
    }
}

/// A closed interval of values a sensor model can report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Lowest plausible value, inclusive.
    pub min: f64,
    /// Highest plausible value, inclusive.
    pub max: f64,
}

impl Bounds {
    /// Whether `value` lies in the interval; NaN never does.
    pub fn contains(&self, value: f64) -> bool {
        (self.min..=self.max).contains(&value)
    }
}

/// What one sensor model can measure, from its datasheet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Degrees Celsius.
    pub temperature: Bounds,
    /// Percent relative humidity.
    pub humidity: Bounds,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_in_config() {
        #[derive(Deserialize)]
        struct M {
            model: DhtModel,
        }
        let parse = |s: &str| serde_json::from_str::<M>(s).map(|m| m.model);
        assert_eq!(parse(r#"{"model":"dht22"}"#).unwrap(), DhtModel::Dht22);
        assert_eq!(parse(r#"{"model":"am2302"}"#).unwrap(), DhtModel::Dht22);
        assert_eq!(parse(r#"{"model":"dht11"}"#).unwrap(), DhtModel::Dht11);
        assert!(parse(r#"{"model":"dht33"}"#).is_err());
    }
}
