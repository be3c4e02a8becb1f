//! The JSON shapes on the wire. Field names and order follow the original service, so
//! existing dashboards parse them unchanged.

use serde::Serialize;
use serde_json::Value;

use super::Channel;
use crate::model::{format_time, Micros, Reading, Sensor};

#[derive(Serialize)]
struct EntityEvent<'a, D: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    entity_type: &'static str,
    event_type: &'a str,
    entity_id: i64,
    data: D,
    timestamp: String,
    metadata: Metadata<'a>,
    seq: u64,
}

#[derive(Serialize)]
struct Metadata<'a> {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields_updated: Option<&'a [&'a str]>,
}

/// A sensor as `data` of an update: the sensor plus the fields that changed.
#[derive(Serialize)]
struct UpdatedSensor<'a> {
    #[serde(flatten)]
    sensor: &'a Sensor,
    updated_fields: &'a [&'a str],
}

fn to_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("event shapes always serialise")
}

/// The frame of a sensor `created`, `updated` or `deleted` event. `changed` is only
/// shown on updates.
pub(crate) fn sensor_frame(
    event_type: &str,
    sensor: &Sensor,
    changed: &[&str],
    at: Micros,
    seq: u64,
) -> String {
    let action = match event_type {
        "created" => "create_sensor",
        "updated" => "update_sensor",
        _ => "delete_sensor",
    };
    let timestamp = format_time(at);
    if event_type == "updated" {
        to_text(&EntityEvent {
            kind: "entity_event",
            entity_type: "sensor",
            event_type,
            entity_id: sensor.id,
            data: UpdatedSensor {
                sensor,
                updated_fields: changed,
            },
            timestamp,
            metadata: Metadata {
                action,
                fields_updated: Some(changed),
            },
            seq,
        })
    } else {
        to_text(&EntityEvent {
            kind: "entity_event",
            entity_type: "sensor",
            event_type,
            entity_id: sensor.id,
            data: sensor,
            timestamp,
            metadata: Metadata {
                action,
                fields_updated: None,
            },
            seq,
        })
    }
}

/// The frame of a reading `created` event.
pub(crate) fn reading_frame(reading: &Reading, at: Micros, seq: u64) -> String {
    to_text(&EntityEvent {
        kind: "entity_event",
        entity_type: "reading",
        event_type: "created",
        entity_id: reading.id,
        data: reading,
        timestamp: format_time(at),
        metadata: Metadata {
            action: "create_reading",
            fields_updated: None,
        },
        seq,
    })
}

/// A reading as `data` of an update: the reading plus the fields that changed.
#[derive(Serialize)]
struct UpdatedReading<'a> {
    #[serde(flatten)]
    reading: &'a Reading,
    updated_fields: &'a [&'a str],
}

/// The frame of a reading `updated` or `deleted` event, with the same rules as a
/// sensor's: `changed` is only shown on updates, a deletion carries the reading as it
/// was.
pub(crate) fn reading_change_frame(
    event_type: &str,
    reading: &Reading,
    changed: &[&str],
    at: Micros,
    seq: u64,
) -> String {
    let timestamp = format_time(at);
    if event_type == "updated" {
        to_text(&EntityEvent {
            kind: "entity_event",
            entity_type: "reading",
            event_type,
            entity_id: reading.id,
            data: UpdatedReading {
                reading,
                updated_fields: changed,
            },
            timestamp,
            metadata: Metadata {
                action: "update_reading",
                fields_updated: Some(changed),
            },
            seq,
        })
    } else {
        to_text(&EntityEvent {
            kind: "entity_event",
            entity_type: "reading",
            event_type,
            entity_id: reading.id,
            data: reading,
            timestamp,
            metadata: Metadata {
                action: "delete_reading",
                fields_updated: None,
            },
            seq,
        })
    }
}

#[derive(Serialize)]
struct SystemEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    event_type: &'a str,
    data: &'a Value,
    timestamp: String,
    seq: u64,
}

/// The frame of a `system_event` on `general` (sensor health, storage state).
pub(crate) fn system_frame(event_type: &str, data: &Value, at: Micros, seq: u64) -> String {
    to_text(&SystemEvent {
        kind: "system_event",
        event_type,
        data,
        timestamp: format_time(at),
        seq,
    })
}

#[derive(Serialize)]
struct TestEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: &'static str,
    data: &'a Value,
    timestamp: String,
    seq: u64,
}

/// The frame of an admin's test broadcast.
pub(crate) fn test_frame(channel: Channel, data: &Value, at: Micros, seq: u64) -> String {
    to_text(&TestEvent {
        kind: "test_event",
        channel: channel.as_str(),
        data,
        timestamp: format_time(at),
        seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sensor() -> Sensor {
        Sensor {
            id: 123,
            tipo: "temperatura".into(),
            modelo: "DHT22".into(),
            nombre: None,
            ubicacion: None,
            fuente: None,
            intervalo: None,
            activo: true,
            calibracion: Default::default(),
            derivados: Vec::new(),
            created_at: 0,
            updated_at: 1_000_000,
        }
    }

    #[test]
    fn update_envelope_matches_contract() {
        let frame = sensor_frame("updated", &sensor(), &["modelo"], 2_000_000, 4711);
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "entity_event");
        assert_eq!(v["entity_type"], "sensor");
        assert_eq!(v["event_type"], "updated");
        assert_eq!(v["entity_id"], 123);
        assert_eq!(v["data"]["id"], 123);
        assert_eq!(v["data"]["modelo"], "DHT22");
        assert_eq!(v["data"]["updated_fields"], serde_json::json!(["modelo"]));
        assert_eq!(v["data"]["created_at"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:02.000000Z");
        assert_eq!(v["metadata"]["action"], "update_sensor");
        assert_eq!(
            v["metadata"]["fields_updated"],
            serde_json::json!(["modelo"])
        );
        assert_eq!(v["seq"], 4711);
    }

    #[test]
    fn created_and_deleted_have_no_update_lists() {
        for (kind, action) in [("created", "create_sensor"), ("deleted", "delete_sensor")] {
            let v: Value = serde_json::from_str(&sensor_frame(kind, &sensor(), &[], 0, 1)).unwrap();
            assert_eq!(v["metadata"]["action"], action);
            assert!(v["metadata"].get("fields_updated").is_none());
            assert!(v["data"].get("updated_fields").is_none());
        }
    }
}
