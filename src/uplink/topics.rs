//! The topic layout and the payloads published under it; pure functions.
//!
//! ```text
//! <prefix>/<gateway>/status                  "online" / "offline", retained (last will)
//! <prefix>/<gateway>/<sensor_id>/<tipo>      a reading: {"sensor_id", "tipo", "value", "unit", "time", "seq"}
//! <prefix>/<gateway>/sensors/<sensor_id>     a sensor event: the envelope WebSocket clients get
//! <prefix>/<gateway>/readings/<reading_id>   a stored reading updated or deleted: the envelope
//! <prefix>/<gateway>/alerts/<rule_id>        the latest alert event of a rule, retained: the envelope
//! ```

use serde::Serialize;

use crate::model::{format_time, Reading};

/// Where this gateway publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// `<prefix>/<gateway>`.
    base: String,
}

impl Topics {
    /// The topics of `gateway` under `prefix`.
    pub fn new(prefix: &str, gateway: &str) -> Topics {
        Topics {
            base: format!("{prefix}/{gateway}"),
        }
    }

    /// Retained `online` while connected; the broker publishes the retained last will
    /// `offline` when the connection is lost, and the daemon publishes it on a clean stop.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// Readings of one sensor and `tipo`.
    pub fn reading(&self, sensor_id: i64, tipo: &str) -> String {
        format!("{}/{sensor_id}/{}", self.base, topic_level(tipo))
    }

    /// Events about one sensor (created, updated, deleted).
    pub fn sensor(&self, sensor_id: i64) -> String {
        format!("{}/sensors/{sensor_id}", self.base)
    }

    /// The latest alert event of one rule (firing, acknowledged, resolved), retained.
    pub fn alert(&self, rule_id: i64) -> String {
        format!("{}/alerts/{rule_id}", self.base)
    }

    /// Changes to one stored reading (updated, deleted). Apart from the readings'
    /// topic, so that a consumer storing samples never takes a correction for a sample.
    pub fn reading_change(&self, reading_id: i64) -> String {
        format!("{}/readings/{reading_id}", self.base)
    }
}

/// `text` as one topic level: letters, digits, `-` and `_` are kept, anything else
/// (`/`, the wildcards `+` and `#`, spaces, accents) becomes `_`.
pub fn topic_level(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `text` is usable as a topic level unchanged (see [`topic_level`]).
pub fn is_topic_name(text: &str) -> bool {
    !text.is_empty() && topic_level(text) == text
}

#[derive(Serialize)]
struct ReadingPayload<'a> {
    sensor_id: i64,
    tipo: &'a str,
    value: f64,
    unit: &'a str,
    time: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    time_doubtful: bool,
    seq: u64,
}

/// The payload of a reading: `{"sensor_id", "tipo", "value", "unit", "time", "seq"}`,
/// `time` being when the sample was taken, and `"time_doubtful": true` when the gateway's
/// clock was not trusted yet. Consumers drop a `seq` they have seen: QoS 1 delivers at
/// least once.
pub fn reading_payload(reading: &Reading, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&ReadingPayload {
        sensor_id: reading.sensor_id,
        tipo: &reading.tipo,
        value: reading.valor,
        unit: &reading.unidad,
        time: &format_time(reading.timestamp),
        time_doubtful: reading.hora_dudosa,
        seq,
    })
    .expect("reading payloads always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn layout() {
        let topics = Topics::new("sensorgate", "gw-1");
        assert_eq!(topics.status(), "sensorgate/gw-1/status");
        assert_eq!(
            topics.reading(3, "temperatura"),
            "sensorgate/gw-1/3/temperatura"
        );
        assert_eq!(
            topics.reading(3, "co2/ppm #1"),
            "sensorgate/gw-1/3/co2_ppm__1"
        );
        assert_eq!(topics.sensor(3), "sensorgate/gw-1/sensors/3");
        assert_eq!(topics.reading_change(9), "sensorgate/gw-1/readings/9");
    }

    #[test]
    fn topic_names() {
        assert!(is_topic_name("gw_1-a"));
        assert!(!is_topic_name("gw/1"));
        assert!(!is_topic_name("gw+"));
        assert!(!is_topic_name(""));
        assert_eq!(topic_level("presión"), "presi_n");
    }

    #[test]
    fn reading_payload_shows_the_time_it_was_taken() {
        let reading = Reading {
            id: 9,
            sensor_id: 3,
            tipo: "temperatura".into(),
            valor: 21.5,
            unidad: "°C".into(),
            timestamp: crate::model::parse_time("2026-11-28T10:15:02.123456Z").unwrap(),
            hora_dudosa: false,
        };
        let payload: Value = serde_json::from_slice(&reading_payload(&reading, 41)).unwrap();
        assert_eq!(
            payload,
            json!({"sensor_id": 3, "tipo": "temperatura", "value": 21.5, "unit": "°C",
                   "time": "2026-11-28T10:15:02.123456Z", "seq": 41})
        );
        let doubtful = Reading {
            hora_dudosa: true,
            ..reading
        };
        let payload: Value = serde_json::from_slice(&reading_payload(&doubtful, 42)).unwrap();
        assert_eq!(payload["time_doubtful"], true);
    }
}
