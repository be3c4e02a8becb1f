//! Home Assistant MQTT discovery: one retained config per sensor and `tipo` under
//! `<discovery_prefix>/sensor/<gateway>_<sensor_id>_<tipo>/config`, so each shows up as
//! an entity without configuration on the Home Assistant side.
//!
//! The uplink announces every sensor of a snapshot when it connects, announces again
//! when a sensor is created or updated or a reading brings a `tipo` not seen before, and
//! publishes an empty retained config (which removes the entity) when a sensor is
//! deleted. Everything here is pure: it returns the messages to publish.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::topics::{topic_level, Topics};
use crate::model::Sensor;
use crate::store::Snapshot;

/// `tipo`s every sensor may have, whose configs are cleared when a sensor is deleted even
/// if this process never saw a reading of them.
const COMMON_TIPOS: [&str; 6] = [
    "temperatura",
    "humedad",
    "presion",
    "punto_rocio",
    "vpd",
    "humedad_absoluta",
];

/// A retained message to publish; an empty payload removes the entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What discovery needs of a sensor.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorInfo {
    pub id: i64,
    pub tipo: String,
    pub modelo: String,
    pub nombre: Option<String>,
    pub ubicacion: Option<String>,
    pub intervalo: Option<f64>,
    /// The `tipo`s of the values it derives, announced before their first reading.
    pub derivados: Vec<String>,
}

impl From<&Sensor> for SensorInfo {
    fn from(s: &Sensor) -> Self {
        SensorInfo {
            id: s.id,
            tipo: s.tipo.clone(),
            modelo: s.modelo.clone(),
            nombre: s.nombre.clone(),
            ubicacion: s.ubicacion.clone(),
            intervalo: s.intervalo,
            derivados: s.derivados.iter().map(|d| d.tipo().to_owned()).collect(),
        }
    }
}

/// The Home Assistant device class and the unit it expects, for the `tipo`s sensorgate's
/// sources produce (Spanish, as on the wire) and their English names. A dew point is a
/// temperature and a vapour-pressure deficit a pressure to Home Assistant.
fn device_class(tipo: &str) -> Option<(&'static str, &'static str)> {
    match tipo {
        "temperatura" | "temperature" | "punto_rocio" => Some(("temperature", "°C")),
        "humedad" | "humidity" => Some(("humidity", "%")),
        "presion" | "presión" | "pressure" => Some(("pressure", "hPa")),
        "vpd" => Some(("pressure", "kPa")),
        _ => None,
    }
}

/// The unit of a `tipo` Home Assistant has no device class for but that sensorgate
/// knows: absolute humidity, shown as a plain number in g/m³.
fn classless_unit(tipo: &str) -> Option<&'static str> {
    (tipo == "humedad_absoluta").then_some("g/m³")
}

/// The announcements of one gateway.
#[derive(Debug)]
pub struct Discovery {
    prefix: String,
    gateway: String,
    topics: Topics,
    /// `expire_after` is this many sampling intervals.
    expire_intervals: u32,
    sensors: HashMap<i64, SensorInfo>,
    /// Per sensor, each `tipo` announced and the unit of its latest reading.
    tipos: HashMap<i64, BTreeMap<String, Option<String>>>,
}

#[derive(Serialize)]
struct Device<'a> {
    identifiers: [String; 1],
    name: String,
    model: &'a str,
    manufacturer: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    suggested_area: Option<&'a str>,
}

#[derive(Serialize)]
struct Config<'a> {
    name: &'a str,
    unique_id: String,
    state_topic: String,
    value_template: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit_of_measurement: Option<&'a str>,
    state_class: &'static str,
    availability_topic: String,
    payload_available: &'static str,
    payload_not_available: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expire_after: Option<u64>,
    device: Device<'a>,
}

impl Discovery {
    /// Announcements under `prefix` for `gateway`, whose readings go to `topics`;
    /// `expire_intervals` sampling intervals without a reading make an entity unavailable.
    pub fn new(prefix: &str, gateway: &str, topics: Topics, expire_intervals: u32) -> Discovery {
        Discovery {
            prefix: prefix.to_owned(),
            gateway: gateway.to_owned(),
            topics,
            expire_intervals,
            sensors: HashMap::new(),
            tipos: HashMap::new(),
        }
    }

    /// Forgets everything and takes the sensors and latest readings of `snapshot`;
    /// returns the announcements of all of them.
    pub fn load(&mut self, snapshot: &Snapshot) -> Vec<Announcement> {
        self.sensors.clear();
        self.tipos.clear();
        for sensor in &snapshot.sensors {
            self.remember(SensorInfo::from(sensor));
        }
        for reading in &snapshot.latest {
            if let Some(tipos) = self.tipos.get_mut(&reading.sensor_id) {
                tipos.insert(reading.tipo.clone(), Some(reading.unidad.clone()));
            }
        }
        let mut ids: Vec<i64> = self.sensors.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter().flat_map(|id| self.announce(id)).collect()
    }

    fn remember(&mut self, sensor: SensorInfo) {
        let tipos = self.tipos.entry(sensor.id).or_default();
        for tipo in std::iter::once(&sensor.tipo).chain(&sensor.derivados) {
            tipos.entry(tipo.clone()).or_insert(None);
        }
        self.sensors.insert(sensor.id, sensor);
    }

    /// A sensor event: `created` and `updated` announce the sensor again, `deleted`
    /// removes its entities. With `announce` false (the event is older than the snapshot
    /// the announcements came from) only deletions are published.
    pub fn sensor_event(
        &mut self,
        event_type: &str,
        sensor: &Sensor,
        announce: bool,
    ) -> Vec<Announcement> {
        let sensor = SensorInfo::from(sensor);
        let id = sensor.id;
        match event_type {
            "deleted" => {
                let mut tipos: Vec<String> = self
                    .tipos
                    .remove(&id)
                    .map(|t| t.into_keys().collect())
                    .unwrap_or_default();
                tipos.push(sensor.tipo.clone());
                tipos.extend(COMMON_TIPOS.iter().map(|t| t.to_string()));
                tipos.sort_by_key(|t| topic_level(t));
                tipos.dedup_by_key(|t| topic_level(t));
                self.sensors.remove(&id);
                tipos
                    .iter()
                    .map(|tipo| Announcement {
                        topic: self.config_topic(id, tipo),
                        payload: Vec::new(),
                    })
                    .collect()
            }
            _ if announce => {
                self.remember(sensor);
                self.announce(id)
            }
            _ => Vec::new(),
        }
    }

    /// A reading: announces its `tipo` the first time it is seen for a known sensor, or
    /// again when its unit changed.
    pub fn reading(&mut self, sensor_id: i64, tipo: &str, unit: &str) -> Vec<Announcement> {
        if !self.sensors.contains_key(&sensor_id) {
            return Vec::new();
        }
        let tipos = self.tipos.entry(sensor_id).or_default();
        match tipos.get(tipo) {
            Some(Some(known)) if known == unit => Vec::new(),
            // Announced with the unit a tipo usually has, and this is that unit.
            Some(None)
                if device_class(tipo).is_some_and(|(_, u)| u == unit)
                    || classless_unit(tipo) == Some(unit) =>
            {
                tipos.insert(tipo.to_owned(), Some(unit.to_owned()));
                Vec::new()
            }
            _ => {
                tipos.insert(tipo.to_owned(), Some(unit.to_owned()));
                let sensor = &self.sensors[&sensor_id];
                vec![self.config(sensor, tipo, Some(unit))]
            }
        }
    }

    fn announce(&self, id: i64) -> Vec<Announcement> {
        let (Some(sensor), Some(tipos)) = (self.sensors.get(&id), self.tipos.get(&id)) else {
            return Vec::new();
        };
        tipos
            .iter()
            .map(|(tipo, unit)| self.config(sensor, tipo, unit.as_deref()))
            .collect()
    }

    fn config_topic(&self, sensor_id: i64, tipo: &str) -> String {
        format!(
            "{}/sensor/{}_{sensor_id}_{}/config",
            self.prefix,
            self.gateway,
            topic_level(tipo)
        )
    }

    fn config(&self, sensor: &SensorInfo, tipo: &str, unit: Option<&str>) -> Announcement {
        let class = device_class(tipo);
        let unit = unit
            .filter(|u| !u.is_empty())
            .or(class.map(|(_, unit)| unit))
            .or(classless_unit(tipo));
        // A unit Home Assistant does not accept for the class would make it refuse the
        // entity; without the class it is still shown, as a plain number.
        let device_class = class.filter(|(_, u)| Some(*u) == unit).map(|(c, _)| c);
        let expire_after = sensor
            .intervalo
            .filter(|i| i.is_finite() && *i > 0.0)
            .map(|i| (i * f64::from(self.expire_intervals)).ceil().max(1.0) as u64);
        let name = sensor
            .nombre
            .clone()
            .unwrap_or_else(|| format!("{} {}", sensor.modelo, sensor.id));
        let config = Config {
            name: tipo,
            unique_id: format!(
                "sensorgate_{}_{}_{}",
                self.gateway,
                sensor.id,
                topic_level(tipo)
            ),
            state_topic: self.topics.reading(sensor.id, tipo),
            value_template: "{{ value_json.value }}",
            device_class,
            unit_of_measurement: unit,
            state_class: "measurement",
            availability_topic: self.topics.status(),
            payload_available: "online",
            payload_not_available: "offline",
            expire_after,
            device: Device {
                identifiers: [format!("sensorgate_{}_{}", self.gateway, sensor.id)],
                name,
                model: &sensor.modelo,
                manufacturer: "sensorgate",
                suggested_area: sensor.ubicacion.as_deref(),
            },
        };
        Announcement {
            topic: self.config_topic(sensor.id, tipo),
            payload: serde_json::to_vec(&config).expect("discovery configs always serialise"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reading;
    use serde_json::{json, Value};

    fn sensor(id: i64) -> Sensor {
        Sensor {
            id,
            tipo: "temperatura".into(),
            modelo: "DHT22".into(),
            nombre: Some("invernadero".into()),
            ubicacion: Some("Invernadero norte".into()),
            fuente: None,
            intervalo: Some(2.0),
            activo: true,
            calibracion: Default::default(),
            derivados: Vec::new(),
            created_at: 0,
            updated_at: 0,
        }
    }

    /// Dew point is a temperature and VPD a pressure in kPa to Home Assistant; absolute
    /// humidity has no class and keeps its unit. Each is announced before its first
    /// reading, and its first reading in that unit announces nothing again.
    #[test]
    fn derived_values_get_their_classes_and_units() {
        use crate::model::Derived;
        let mut d = discovery();
        let mut derives = sensor(4);
        derives.derivados = Derived::ALL.to_vec();
        let snapshot = Snapshot {
            seq: 1,
            sensors: vec![derives],
            latest: Vec::new(),
        };
        let announced: BTreeMap<String, Value> = d
            .load(&snapshot)
            .iter()
            .map(|a| (a.topic.clone(), json_of(a)))
            .collect();
        let config = |tipo: &str| &announced[&format!("homeassistant/sensor/gw_4_{tipo}/config")];
        assert_eq!(config("punto_rocio")["device_class"], "temperature");
        assert_eq!(config("punto_rocio")["unit_of_measurement"], "°C");
        assert_eq!(config("vpd")["device_class"], "pressure");
        assert_eq!(config("vpd")["unit_of_measurement"], "kPa");
        assert!(config("humedad_absoluta").get("device_class").is_none());
        assert_eq!(config("humedad_absoluta")["unit_of_measurement"], "g/m³");
        for dv in Derived::ALL {
            assert!(d.reading(4, dv.tipo(), dv.unit()).is_empty(), "{dv:?}");
        }
    }

    fn discovery() -> Discovery {
        Discovery::new("homeassistant", "gw", Topics::new("sensorgate", "gw"), 5)
    }

    fn json_of(a: &Announcement) -> Value {
        serde_json::from_slice(&a.payload).unwrap()
    }

    #[test]
    fn snapshot_announces_every_sensor_and_tipo() {
        let mut d = discovery();
        let snapshot = Snapshot {
            seq: 10,
            sensors: vec![sensor(3)],
            latest: vec![Reading {
                id: 1,
                sensor_id: 3,
                tipo: "humedad".into(),
                valor: 40.0,
                unidad: "%".into(),
                timestamp: 0,
                hora_dudosa: false,
            }],
        };
        let a = d.load(&snapshot);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].topic, "homeassistant/sensor/gw_3_humedad/config");
        assert_eq!(a[1].topic, "homeassistant/sensor/gw_3_temperatura/config");
        assert_eq!(
            json_of(&a[1]),
            json!({
                "name": "temperatura",
                "unique_id": "sensorgate_gw_3_temperatura",
                "state_topic": "sensorgate/gw/3/temperatura",
                "value_template": "{{ value_json.value }}",
                "device_class": "temperature",
                "unit_of_measurement": "°C",
                "state_class": "measurement",
                "availability_topic": "sensorgate/gw/status",
                "payload_available": "online",
                "payload_not_available": "offline",
                "expire_after": 10,
                "device": {"identifiers": ["sensorgate_gw_3"], "name": "invernadero",
                           "model": "DHT22", "manufacturer": "sensorgate",
                           "suggested_area": "Invernadero norte"}
            })
        );
        assert_eq!(json_of(&a[0])["device_class"], "humidity");
        assert_eq!(json_of(&a[0])["unit_of_measurement"], "%");
    }

    #[test]
    fn readings_announce_new_tipos_once() {
        let mut d = discovery();
        d.load(&Snapshot {
            seq: 1,
            sensors: vec![sensor(3)],
            latest: vec![],
        });
        assert!(d.reading(3, "temperatura", "°C").is_empty());
        let a = d.reading(3, "co2", "ppm");
        assert_eq!(a.len(), 1);
        let config = json_of(&a[0]);
        assert_eq!(config["unit_of_measurement"], "ppm");
        assert!(config.get("device_class").is_none());
        assert!(d.reading(3, "co2", "ppm").is_empty());
        assert!(d.reading(99, "co2", "ppm").is_empty(), "unknown sensor");
    }

    #[test]
    fn deletion_clears_with_empty_configs_and_updates_announce() {
        let mut d = discovery();
        d.load(&Snapshot {
            seq: 1,
            sensors: vec![sensor(3)],
            latest: vec![],
        });
        let renamed = Sensor {
            nombre: Some("norte".into()),
            ..sensor(3)
        };
        let a = d.sensor_event("updated", &renamed, true);
        assert_eq!(a.len(), 1);
        assert_eq!(json_of(&a[0])["device"]["name"], "norte");
        assert!(d.sensor_event("updated", &renamed, false).is_empty());
        let a = d.sensor_event("deleted", &sensor(3), false);
        let topics: Vec<&str> = a.iter().map(|a| a.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "homeassistant/sensor/gw_3_humedad/config",
                "homeassistant/sensor/gw_3_humedad_absoluta/config",
                "homeassistant/sensor/gw_3_presion/config",
                "homeassistant/sensor/gw_3_punto_rocio/config",
                "homeassistant/sensor/gw_3_temperatura/config",
                "homeassistant/sensor/gw_3_vpd/config"
            ]
        );
        assert!(a.iter().all(|a| a.payload.is_empty()));
        assert!(d.reading(3, "temperatura", "°C").is_empty());
    }
}
