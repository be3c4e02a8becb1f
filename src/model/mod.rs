//! The wire shapes: sensors and readings as clients see them, and the validated inputs
//! that create or change them.
//!
//! Field names are Spanish because existing dashboards speak the original service's
//! format; see `API.md` in the README's API section.

use chrono::{DateTime, Datelike, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

pub mod calibration;
pub mod derived;
mod sample;

pub use calibration::Calibration;
pub use derived::Derived;
pub use sample::{Measurement, Sample};

/// The unit of each `tipo` whose unit sensorgate knows: what its drivers report it in,
/// and what a reading posted without `unidad` is stored with.
const KNOWN_UNITS: [(&str, &str); 6] = [
    ("temperatura", "°C"),
    ("humedad", "%"),
    ("presion", "hPa"),
    ("punto_rocio", "°C"),
    ("vpd", "kPa"),
    ("humedad_absoluta", "g/m³"),
];

/// The unit of a known `tipo`, such as `°C` for `temperatura`.
pub fn known_unit(tipo: &str) -> Option<&'static str> {
    KNOWN_UNITS
        .iter()
        .find(|(known, _)| *known == tipo)
        .map(|(_, unit)| *unit)
}

/// A point in time as stored: microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// Current time in storage units.
pub fn now_micros() -> Micros {
    Utc::now().timestamp_micros()
}

/// Formats stored time the way the wire wants it: RFC 3339, UTC, microseconds, `Z`.
pub fn format_time(t: Micros) -> String {
    Utc.timestamp_micros(t)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a wire time (RFC 3339 with any offset) into storage units.
///
/// A time whose UTC form falls outside the years 0000 to 9999 is refused: an offset can
/// carry `9999-12-31T23:59:59-23:59` into year 10000, which the wire format cannot show,
/// so it could be stored but never given back as RFC 3339.
pub fn parse_time(text: &str) -> Option<Micros> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| (0..=9999).contains(&t.year()))
        .map(|t| t.timestamp_micros())
}

/// Serde helpers that write stored times in the wire format.
pub mod wire_time {
    use super::{format_time, Micros};

    pub fn required<S: serde::Serializer>(t: &Micros, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_time(*t))
    }

    pub fn optional<S: serde::Serializer>(t: &Option<Micros>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&format_time(*t)),
            None => s.serialize_none(),
        }
    }
}

/// A sensor as stored and as sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sensor {
    pub id: i64,
    pub tipo: String,
    pub modelo: String,
    pub nombre: Option<String>,
    pub ubicacion: Option<String>,
    /// Acquisition source spec (`{"kind": "serial", ...}`), absent for sensors that only
    /// receive readings over REST.
    pub fuente: Option<Value>,
    /// Sampling interval in seconds.
    pub intervalo: Option<f64>,
    pub activo: bool,
    /// Corrections applied to its values as they are read, per `tipo`; `{}` when none.
    pub calibracion: Calibration,
    /// Values derived from each sample's temperature and humidity; `[]` when none.
    pub derivados: Vec<Derived>,
    #[serde(serialize_with = "wire_time::required")]
    pub created_at: Micros,
    #[serde(serialize_with = "wire_time::required")]
    pub updated_at: Micros,
}

/// The sensor fields a client may set, in schema order. `updated_fields` lists changes in
/// this order.
pub const SENSOR_FIELDS: [&str; 9] = [
    "tipo",
    "modelo",
    "nombre",
    "ubicacion",
    "fuente",
    "intervalo",
    "activo",
    "calibracion",
    "derivados",
];

/// A reading as stored and as sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    pub id: i64,
    pub sensor_id: i64,
    pub tipo: String,
    pub valor: f64,
    pub unidad: String,
    /// When the sample was taken, not when it was stored.
    #[serde(serialize_with = "wire_time::required")]
    pub timestamp: Micros,
    /// Taken before the clock was trusted (see [`crate::clock`]): the time may be wrong.
    /// Absent on the wire when false, so readings keep their original shape.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hora_dudosa: bool,
}

/// One field that failed validation, as listed in a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Longest text field of a sensor or reading, in characters, over REST and in the config
/// file.
pub const MAX_TEXT: usize = 128;

/// The first character of `text` that has no place in a name or a unit: a control
/// character (C0, DEL, C1: NUL, CR, LF, escape sequences) or a bidirectional override or
/// isolate (U+202E turns `exe.txt` into `txt.exe` on screen). Such text breaks log lines,
/// CSV rows and terminal output, and makes what a dashboard shows differ from what is
/// stored.
pub fn forbidden_char(text: &str) -> Option<char> {
    text.chars().find(|&c| {
        c.is_control()
            || matches!(
                c,
                '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            )
    })
}

/// The 422 message for text holding `c` (see [`forbidden_char`]).
pub fn forbidden_char_message(c: char) -> String {
    format!(
        "must not contain control or bidirectional formatting characters (found U+{:04X})",
        u32::from(c)
    )
}

/// Whether a `fuente` (a source description) names a source the daemon can drive, and if
/// not, why. Which sources exist is the drivers' word; the model only runs the check, so
/// that a bad `fuente` is reported with the other problems of the body.
pub type SourceCheck = fn(&Value) -> Result<(), String>;

/// Sampling intervals accepted, over REST and in the config file.
pub const MIN_INTERVAL_S: f64 = 0.05;
pub const MAX_INTERVAL_S: f64 = 86_400.0;

/// Reads typed fields out of a JSON object and collects every problem, so that one 422
/// answer names all bad fields at once instead of the first.
struct Fields {
    object: Map<String, Value>,
    errors: Vec<FieldError>,
}

impl Fields {
    fn new(body: Value) -> Result<Self, Vec<FieldError>> {
        match body {
            Value::Object(object) => Ok(Fields {
                object,
                errors: Vec::new(),
            }),
            _ => Err(vec![FieldError::new("body", "must be a JSON object")]),
        }
    }

    /// `None` when absent; `Some(None)` when explicitly null.
    fn take(&mut self, name: &str) -> Option<Option<Value>> {
        self.object
            .remove(name)
            .map(|v| if v.is_null() { None } else { Some(v) })
    }

    fn fail(&mut self, name: &str, message: &str) {
        self.errors.push(FieldError::new(name, message));
    }

    fn text(&mut self, name: &str, value: Value) -> Option<String> {
        match value {
            Value::String(s) if s.trim().is_empty() => {
                self.fail(name, "must not be empty");
                None
            }
            Value::String(s) if s.chars().count() > MAX_TEXT => {
                self.fail(name, "must be at most 128 characters");
                None
            }
            Value::String(s) => match forbidden_char(&s) {
                Some(c) => {
                    self.fail(name, &forbidden_char_message(c));
                    None
                }
                None => Some(s),
            },
            _ => {
                self.fail(name, "must be a string");
                None
            }
        }
    }

    fn required_text(&mut self, name: &str) -> Option<String> {
        match self.take(name) {
            Some(Some(v)) => self.text(name, v),
            _ => {
                self.fail(name, "field required");
                None
            }
        }
    }

    /// Absent: `None`. Present: `Some(new value)`, where null clears the field.
    fn nullable_text(&mut self, name: &str) -> Option<Option<String>> {
        match self.take(name)? {
            None => Some(None),
            Some(v) => self.text(name, v).map(Some),
        }
    }

    fn fuente(&mut self, check_source: SourceCheck) -> Option<Option<Value>> {
        match self.take("fuente")? {
            None => Some(None),
            // A hung driver on demand is for exercising the watchdog from a config file,
            // not something a client of the API may set up.
            Some(Value::Object(spec)) if spec.contains_key("hang_after_reads") => {
                self.fail(
                    "fuente",
                    "hang_after_reads is allowed only in the config file",
                );
                None
            }
            Some(v @ Value::Object(_)) => {
                if let Some(c) = forbidden_in_json(&v) {
                    self.fail("fuente", &forbidden_char_message(c));
                    return None;
                }
                match check_source(&v) {
                    Ok(()) => Some(Some(v)),
                    Err(e) => {
                        self.fail("fuente", &format!("not a valid source: {e}"));
                        None
                    }
                }
            }
            Some(_) => {
                self.fail("fuente", "must be an object describing the source");
                None
            }
        }
    }

    fn intervalo(&mut self) -> Option<Option<f64>> {
        match self.take("intervalo")? {
            None => Some(None),
            Some(v) => match v.as_f64() {
                Some(s) if (MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&s) => Some(Some(s)),
                _ => {
                    self.fail(
                        "intervalo",
                        "must be a number of seconds from 0.05 to 86400",
                    );
                    None
                }
            },
        }
    }

    fn activo(&mut self) -> Option<bool> {
        match self.take("activo")? {
            Some(Value::Bool(b)) => Some(b),
            _ => {
                self.fail("activo", "must be true or false");
                None
            }
        }
    }

    /// A calibration (see [`Calibration::from_json`]); `null` clears it. Only its first
    /// problem is reported, under the exact key it is about.
    fn calibracion(&mut self) -> Option<Calibration> {
        match self.take("calibracion")? {
            None => Some(Calibration::default()),
            Some(v) => match Calibration::from_json(&v, "calibracion") {
                Ok(c) => Some(c),
                Err(errors) => {
                    self.errors.extend(errors.into_iter().take(1));
                    None
                }
            },
        }
    }

    /// The derived values wanted, as a list of their `tipo`s; `null` clears it.
    fn derivados(&mut self) -> Option<Vec<Derived>> {
        match self.take("derivados")? {
            None => Some(Vec::new()),
            Some(v) => match parse_derived(&v) {
                Ok(list) => Some(list),
                Err(message) => {
                    self.fail("derivados", &message);
                    None
                }
            },
        }
    }

    /// Unknown fields are errors: a typo in a field name must not be silently ignored.
    fn finish(mut self) -> Result<(), Vec<FieldError>> {
        let unknown: Vec<String> = self.object.keys().cloned().collect();
        for name in unknown {
            self.fail(&name, "unknown field");
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

/// The first forbidden character ([`forbidden_char`]) in any key or string of `value`:
/// a source spec's paths and the `tipo` and `unidad` it maps device keys to.
pub fn forbidden_in_json(value: &Value) -> Option<char> {
    match value {
        Value::String(s) => forbidden_char(s),
        Value::Array(items) => items.iter().find_map(forbidden_in_json),
        Value::Object(map) => map
            .iter()
            .find_map(|(k, v)| forbidden_char(k).or_else(|| forbidden_in_json(v))),
        _ => None,
    }
}

/// A list of derived values by `tipo`, without repeats, in the order of
/// [`Derived::ALL`]; the message names the values accepted.
pub fn parse_derived(value: &Value) -> Result<Vec<Derived>, String> {
    let names = || {
        let all: Vec<&str> = Derived::ALL.iter().map(|d| d.tipo()).collect();
        format!("must be a list of: {}", all.join(", "))
    };
    let items = value.as_array().ok_or_else(names)?;
    let mut list = Vec::new();
    for item in items {
        let derived = item
            .as_str()
            .and_then(Derived::from_tipo)
            .ok_or_else(names)?;
        if !list.contains(&derived) {
            list.push(derived);
        }
    }
    list.sort();
    Ok(list)
}

/// A validated request to create a sensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSensor {
    pub tipo: String,
    pub modelo: String,
    pub nombre: Option<String>,
    pub ubicacion: Option<String>,
    pub fuente: Option<Value>,
    pub intervalo: Option<f64>,
    pub activo: bool,
    pub calibracion: Calibration,
    pub derivados: Vec<Derived>,
}

impl NewSensor {
    /// Validates a create body; every problem is reported.
    pub fn from_json(body: Value, check_source: SourceCheck) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(body)?;
        let tipo = f.required_text("tipo");
        let modelo = f.required_text("modelo");
        let nombre = f.nullable_text("nombre").flatten();
        let ubicacion = f.nullable_text("ubicacion").flatten();
        let fuente = f.fuente(check_source).flatten();
        let intervalo = f.intervalo().flatten();
        let activo = f.activo().unwrap_or(true);
        let calibracion = f.calibracion().unwrap_or_default();
        let derivados = f.derivados().unwrap_or_default();
        f.finish()?;
        Ok(NewSensor {
            tipo: tipo.unwrap_or_default(),
            modelo: modelo.unwrap_or_default(),
            nombre,
            ubicacion,
            fuente,
            intervalo,
            activo,
            calibracion,
            derivados,
        })
    }
}

/// A validated partial update: only the fields present in the body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SensorPatch {
    pub tipo: Option<String>,
    pub modelo: Option<String>,
    pub nombre: Option<Option<String>>,
    pub ubicacion: Option<Option<String>>,
    pub fuente: Option<Option<Value>>,
    pub intervalo: Option<Option<f64>>,
    pub activo: Option<bool>,
    pub calibracion: Option<Calibration>,
    pub derivados: Option<Vec<Derived>>,
}

impl SensorPatch {
    /// Validates an update body. `tipo` and `modelo` cannot be cleared; the optional
    /// fields can, with `null`.
    pub fn from_json(body: Value, check_source: SourceCheck) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(body)?;
        let mut patch = SensorPatch::default();
        for name in ["tipo", "modelo"] {
            let value = match f.take(name) {
                None => None,
                Some(None) => {
                    f.fail(name, "must not be null");
                    None
                }
                Some(Some(v)) => f.text(name, v),
            };
            if name == "tipo" {
                patch.tipo = value;
            } else {
                patch.modelo = value;
            }
        }
        patch.nombre = f.nullable_text("nombre");
        patch.ubicacion = f.nullable_text("ubicacion");
        patch.fuente = f.fuente(check_source);
        patch.intervalo = f.intervalo();
        patch.activo = f.activo();
        patch.calibracion = f.calibracion();
        patch.derivados = f.derivados();
        f.finish()?;
        Ok(patch)
    }

    /// Applies the patch and returns the names of the fields whose value really changed,
    /// in schema order. Writing a field with its current value is not a change.
    pub fn apply(&self, sensor: &mut Sensor) -> Vec<&'static str> {
        let mut changed = Vec::new();
        fn set<T: PartialEq + Clone>(
            slot: &mut T,
            new: &Option<T>,
            name: &'static str,
            changed: &mut Vec<&'static str>,
        ) {
            if let Some(value) = new {
                if slot != value {
                    *slot = value.clone();
                    changed.push(name);
                }
            }
        }
        set(&mut sensor.tipo, &self.tipo, "tipo", &mut changed);
        set(&mut sensor.modelo, &self.modelo, "modelo", &mut changed);
        set(&mut sensor.nombre, &self.nombre, "nombre", &mut changed);
        set(
            &mut sensor.ubicacion,
            &self.ubicacion,
            "ubicacion",
            &mut changed,
        );
        set(&mut sensor.fuente, &self.fuente, "fuente", &mut changed);
        set(
            &mut sensor.intervalo,
            &self.intervalo,
            "intervalo",
            &mut changed,
        );
        set(&mut sensor.activo, &self.activo, "activo", &mut changed);
        set(
            &mut sensor.calibracion,
            &self.calibracion,
            "calibracion",
            &mut changed,
        );
        set(
            &mut sensor.derivados,
            &self.derivados,
            "derivados",
            &mut changed,
        );
        changed
    }
}

/// A validated reading pushed by a client.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReading {
    pub sensor_id: i64,
    pub tipo: String,
    pub valor: f64,
    pub unidad: String,
    /// When the sample was taken; `None` means now.
    pub timestamp: Option<Micros>,
    /// The time is the gateway's and its clock was not trusted (see [`crate::clock`]).
    pub hora_dudosa: bool,
}

impl NewReading {
    /// Validates a reading body; every problem is reported.
    pub fn from_json(body: Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(body)?;
        let sensor_id = match f.take("sensor_id") {
            Some(Some(v)) => match v.as_i64() {
                Some(id) if id > 0 => Some(id),
                _ => {
                    f.fail("sensor_id", "must be a positive integer");
                    None
                }
            },
            _ => {
                f.fail("sensor_id", "field required");
                None
            }
        };
        let tipo = f.required_text("tipo");
        let valor = match f.take("valor") {
            Some(Some(v)) => match v.as_f64() {
                Some(x) if x.is_finite() => Some(x),
                _ => {
                    f.fail("valor", "must be a finite number");
                    None
                }
            },
            _ => {
                f.fail("valor", "field required");
                None
            }
        };
        let unidad = match f.take("unidad") {
            None | Some(None) => Some(None),
            Some(Some(Value::String(s))) if s.chars().count() <= 16 => match forbidden_char(&s) {
                Some(c) => {
                    f.fail("unidad", &forbidden_char_message(c));
                    None
                }
                None => Some(Some(s)),
            },
            Some(Some(_)) => {
                f.fail("unidad", "must be a string of at most 16 characters");
                None
            }
        };
        let timestamp = match f.take("timestamp") {
            None | Some(None) => Some(None),
            Some(Some(Value::String(s))) => match parse_time(&s) {
                Some(t) => Some(Some(t)),
                None => {
                    f.fail("timestamp", "must be an RFC 3339 time with offset");
                    None
                }
            },
            Some(Some(_)) => {
                f.fail("timestamp", "must be an RFC 3339 time with offset");
                None
            }
        };
        f.finish()?;
        let tipo = tipo.unwrap_or_default();
        let unidad = unidad
            .flatten()
            .unwrap_or_else(|| known_unit(&tipo).unwrap_or_default().to_owned());
        Ok(NewReading {
            sensor_id: sensor_id.unwrap_or_default(),
            tipo,
            valor: valor.unwrap_or_default(),
            unidad,
            timestamp: timestamp.flatten(),
            hora_dudosa: false,
        })
    }
}

/// The reading fields an update may change, in schema order. `updated_fields` lists
/// changes in this order. `hora_dudosa` is not set by clients: it is cleared when a
/// client gives the reading its time.
pub const READING_FIELDS: [&str; 5] = ["tipo", "valor", "unidad", "timestamp", "hora_dudosa"];

/// A validated partial update of a stored reading: only the fields present in the body.
/// The sensor of a reading is not changed: a reading filed under the wrong sensor is
/// deleted and posted again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadingPatch {
    pub tipo: Option<String>,
    pub valor: Option<f64>,
    pub unidad: Option<String>,
    pub timestamp: Option<Micros>,
}

impl ReadingPatch {
    /// Validates an update body; every problem is reported. No field can be cleared;
    /// a null `unidad` is the empty unit, as when a reading is posted.
    pub fn from_json(body: Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields::new(body)?;
        let mut patch = ReadingPatch::default();
        for name in ["id", "sensor_id", "hora_dudosa"] {
            if f.take(name).is_some() {
                f.fail(
                    name,
                    match name {
                        "sensor_id" => {
                            "cannot be changed: delete the reading and post it to the right sensor"
                        }
                        "hora_dudosa" => "is set by the gateway: give the reading its timestamp",
                        _ => "cannot be changed",
                    },
                );
            }
        }
        patch.tipo = match f.take("tipo") {
            None => None,
            Some(None) => {
                f.fail("tipo", "must not be null");
                None
            }
            Some(Some(v)) => f.text("tipo", v),
        };
        patch.valor = match f.take("valor") {
            None => None,
            Some(v) => match v.as_ref().and_then(Value::as_f64) {
                Some(x) if x.is_finite() => Some(x),
                _ => {
                    f.fail("valor", "must be a finite number");
                    None
                }
            },
        };
        patch.unidad = match f.take("unidad") {
            None => None,
            Some(None) => Some(String::new()),
            Some(Some(Value::String(s))) if s.chars().count() <= 16 => match forbidden_char(&s) {
                Some(c) => {
                    f.fail("unidad", &forbidden_char_message(c));
                    None
                }
                None => Some(s),
            },
            Some(Some(_)) => {
                f.fail("unidad", "must be a string of at most 16 characters");
                None
            }
        };
        patch.timestamp = match f.take("timestamp") {
            None => None,
            Some(v) => match v.as_ref().and_then(Value::as_str).and_then(parse_time) {
                Some(t) => Some(t),
                None => {
                    f.fail("timestamp", "must be an RFC 3339 time with offset");
                    None
                }
            },
        };
        f.finish()?;
        Ok(patch)
    }

    /// Applies the patch and returns the names of the fields whose value really changed,
    /// in schema order. A timestamp given by the client is trusted: it clears
    /// `hora_dudosa`.
    pub fn apply(&self, reading: &mut Reading) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if let Some(tipo) = &self.tipo {
            if *tipo != reading.tipo {
                reading.tipo = tipo.clone();
                changed.push("tipo");
            }
        }
        if let Some(valor) = self.valor {
            // Stored values have no negative zero (SQLite keeps -0.0 as 0).
            let valor = valor + 0.0;
            if valor.to_bits() != reading.valor.to_bits() {
                reading.valor = valor;
                changed.push("valor");
            }
        }
        if let Some(unidad) = &self.unidad {
            if *unidad != reading.unidad {
                reading.unidad = unidad.clone();
                changed.push("unidad");
            }
        }
        if let Some(timestamp) = self.timestamp {
            if timestamp != reading.timestamp {
                reading.timestamp = timestamp;
                changed.push("timestamp");
            }
            if reading.hora_dudosa {
                reading.hora_dudosa = false;
                changed.push("hora_dudosa");
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A stand-in for the drivers' check of a `fuente`: only `{"kind": "sim", ..}`.
    pub(super) fn only_sim(fuente: &Value) -> Result<(), String> {
        match fuente.get("kind").and_then(Value::as_str) {
            Some("sim") => Ok(()),
            other => Err(format!("unknown kind {other:?}")),
        }
    }

    impl NewSensor {
        pub(super) fn from_test_json(body: Value) -> Result<Self, Vec<FieldError>> {
            NewSensor::from_json(body, only_sim)
        }
    }

    impl SensorPatch {
        pub(super) fn from_test_json(body: Value) -> Result<Self, Vec<FieldError>> {
            SensorPatch::from_json(body, only_sim)
        }
    }

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn new_sensor_requires_tipo_and_modelo() {
        let err = NewSensor::from_test_json(json!({})).unwrap_err();
        assert_eq!(fields(err), ["tipo", "modelo"]);
    }

    #[test]
    fn new_sensor_rejects_unknown_and_wrong_types() {
        let err = NewSensor::from_test_json(json!({"tipo": 5, "modelo": "DHT22", "color": "red"}))
            .unwrap_err();
        assert_eq!(fields(err), ["tipo", "color"]);
    }

    #[test]
    fn fuente_must_be_a_known_source() {
        let ok = NewSensor::from_test_json(
            json!({"tipo": "t", "modelo": "m", "fuente": {"kind": "sim"}}),
        );
        assert!(ok.is_ok());
        for bad in [
            json!({"kind": "laser"}),
            json!({"kind": "serial"}),
            json!("sim"),
            json!({"kind": "sim", "hang_after_reads": 3}),
        ] {
            let err = NewSensor::from_test_json(json!({"tipo": "t", "modelo": "m", "fuente": bad}))
                .unwrap_err();
            assert_eq!(fields(err), ["fuente"]);
        }
    }

    #[test]
    fn new_sensor_defaults_activo() {
        let s =
            NewSensor::from_test_json(json!({"tipo": "temperatura", "modelo": "DHT22"})).unwrap();
        assert!(s.activo);
        assert_eq!(s.nombre, None);
    }

    #[test]
    fn patch_reports_only_real_changes_in_schema_order() {
        let mut sensor = Sensor {
            id: 1,
            tipo: "temperatura".into(),
            modelo: "DHT22".into(),
            nombre: Some("a".into()),
            ubicacion: None,
            fuente: None,
            intervalo: None,
            activo: true,
            calibracion: Calibration::default(),
            derivados: Vec::new(),
            created_at: 0,
            updated_at: 0,
        };
        let patch = SensorPatch::from_test_json(
            json!({"activo": false, "modelo": "DHT11", "tipo": "temperatura"}),
        )
        .unwrap();
        assert_eq!(patch.apply(&mut sensor), ["modelo", "activo"]);
        assert_eq!(patch.apply(&mut sensor), Vec::<&str>::new());
    }

    #[test]
    fn patch_clears_nullable_but_not_required() {
        let patch = SensorPatch::from_test_json(json!({"nombre": null})).unwrap();
        assert_eq!(patch.nombre, Some(None));
        let err = SensorPatch::from_test_json(json!({"tipo": null})).unwrap_err();
        assert_eq!(fields(err), ["tipo"]);
    }

    #[test]
    fn reading_validation() {
        let r = NewReading::from_json(
            json!({"sensor_id": 1, "tipo": "temperatura", "valor": 21.4, "unidad": "°C"}),
        )
        .unwrap();
        assert_eq!(r.valor, 21.4);
        let err = NewReading::from_json(
            json!({"sensor_id": "x", "valor": "hot", "timestamp": "yesterday"}),
        )
        .unwrap_err();
        assert_eq!(fields(err), ["sensor_id", "tipo", "valor", "timestamp"]);
    }

    #[test]
    fn a_reading_patch_lists_real_changes_in_schema_order() {
        let mut reading = Reading {
            id: 1,
            sensor_id: 2,
            tipo: "temperatura".into(),
            valor: 0.0,
            unidad: "°C".into(),
            timestamp: 5,
            hora_dudosa: true,
        };
        let patch = ReadingPatch::from_json(
            json!({"timestamp": "1970-01-01T00:00:00.000005Z", "valor": -0.0, "unidad": "°C"}),
        )
        .unwrap();
        // The same time, now vouched for by the client: only the doubt goes.
        assert_eq!(patch.apply(&mut reading), ["hora_dudosa"]);
        assert!(patch.apply(&mut reading).is_empty());
        let patch = ReadingPatch::from_json(json!({"valor": 2.5, "tipo": "humedad"})).unwrap();
        assert_eq!(patch.apply(&mut reading), ["tipo", "valor"]);
        assert_eq!(
            fields(ReadingPatch::from_json(json!({"valor": null, "sensor_id": 3})).unwrap_err()),
            ["sensor_id", "valor"]
        );
        assert_eq!(
            fields(
                ReadingPatch::from_json(json!({"tipo": "a\u{202E}b", "unidad": "\r\n"}))
                    .unwrap_err()
            ),
            ["tipo", "unidad"]
        );
    }

    #[test]
    fn control_and_bidi_characters_are_refused_naming_the_field() {
        for bad in [
            "a\u{0}b",
            "a\r\nb",
            "\u{1b}[2J",
            "a\u{85}",
            "abc\u{202E}txt",
            "\u{2066}x",
        ] {
            let err = NewSensor::from_test_json(
                json!({"tipo": "t", "modelo": "m", "nombre": bad, "ubicacion": bad}),
            )
            .unwrap_err();
            assert_eq!(fields(err), ["nombre", "ubicacion"], "{bad:?}");
            let err = SensorPatch::from_test_json(json!({"tipo": bad})).unwrap_err();
            assert!(err[0].message.contains("U+"), "{err:?}");
            let err = NewReading::from_json(
                json!({"sensor_id": 1, "tipo": bad, "valor": 1, "unidad": bad}),
            )
            .unwrap_err();
            assert_eq!(fields(err), ["tipo", "unidad"], "{bad:?}");
        }
        let err = NewSensor::from_test_json(
            json!({"tipo": "t", "modelo": "m", "fuente": {"kind": "serial", "path": "/dev/tty\u{0}"}}),
        )
        .unwrap_err();
        assert_eq!(fields(err), ["fuente"]);
        assert!(
            NewSensor::from_test_json(json!({"tipo": "Temp. ñ °C 🌡", "modelo": "m\u{00A0}x"}))
                .is_ok()
        );
    }

    #[test]
    fn times_round_trip_in_wire_format() {
        let t = parse_time("2026-11-28T10:15:02.123456Z").unwrap();
        assert_eq!(format_time(t), "2026-11-28T10:15:02.123456Z");
        assert_eq!(parse_time("2026-11-28T11:15:02.123456+01:00"), Some(t));
    }

    #[test]
    fn times_the_wire_cannot_show_are_refused() {
        assert_eq!(parse_time("9999-12-31T23:59:59.999999-23:59"), None);
        assert_eq!(parse_time("0000-01-01T00:00:00+00:01"), None);
        let last = parse_time("9999-12-31T23:59:59.999999Z").unwrap();
        assert_eq!(format_time(last), "9999-12-31T23:59:59.999999Z");
        let first = parse_time("0000-01-01T00:00:00+00:00").unwrap();
        assert_eq!(format_time(first), "0000-01-01T00:00:00.000000Z");
    }
}

/// JSON values for property tests, shared by every module that validates client JSON.
#[cfg(test)]
pub(crate) mod arbitrary {
    use proptest::prelude::*;
    use serde_json::{Map, Number, Value};

    /// Numbers at the edges validators care about: zero and negative zero, integer
    /// limits, the interval bounds and their neighbours, huge and tiny floats.
    pub(crate) fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop::sample::select(vec![
                0.0,
                -0.0,
                0.05,
                0.049_999_999,
                86_400.0,
                86_400.000_001,
                1e308,
                -1e308,
                f64::MIN_POSITIVE,
                9_007_199_254_740_993.0,
            ])
            .prop_map(Value::from),
            prop::sample::select(vec![i64::MIN, -1, 1, i64::MAX]).prop_map(Value::from),
            Just(Value::Number(Number::from(u64::MAX))),
        ]
    }

    /// Strings that are empty, blank, at and around 128 characters (multi-byte too), and
    /// the names clients send.
    pub(crate) fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            "[ \t\n]{0,3}",
            (126usize..=130, prop::sample::select(vec!['a', 'ñ', '🌡']))
                .prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
            (0usize..=18).prop_map(|n| "°".repeat(n)),
            prop::sample::select(vec![
                "temperatura",
                "DHT22",
                "sensors",
                "readings",
                "general",
                "created",
                "2026-11-28T10:15:02.123456Z",
                "2026-11-28T11:15:02+01:00",
                "9999-12-31T23:59:59.999999-23:59",
                "0000-01-01T00:00:00+23:59",
                "sim",
                "serial",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            number(),
            text().prop_map(Value::String),
        ]
    }

    /// Any JSON value, nested at most `depth` levels with at most `width` items per
    /// array or object; object keys are drawn from `keys` half of the time, so that
    /// objects look enough like real bodies to get past the first check.
    pub(crate) fn json_with_keys(
        keys: &'static [&'static str],
        depth: u32,
        width: usize,
    ) -> impl Strategy<Value = Value> {
        leaf().prop_recursive(depth, 24, width as u32, move |inner| {
            let key = if keys.is_empty() {
                text().boxed()
            } else {
                prop_oneof![prop::sample::select(keys).prop_map(str::to_owned), text()].boxed()
            };
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..=width).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..=width)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// Any JSON value (depth 3, width 5).
    pub(crate) fn json() -> impl Strategy<Value = Value> {
        json_with_keys(&[], 3, 5)
    }

    /// A JSON object whose keys are mostly `keys`, with values of any shape.
    pub(crate) fn object_with_keys(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            8 => prop::sample::select(keys).prop_map(str::to_owned),
            1 => text(),
        ];
        prop::collection::vec((key, json_with_keys(keys, 2, 4)), 0..=keys.len() + 1)
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect()))
    }
}

#[cfg(test)]
mod proptests {
    use super::arbitrary::{json, number, object_with_keys, text};
    use super::*;
    use proptest::prelude::*;

    const READING_FIELDS: [&str; 5] = ["sensor_id", "tipo", "valor", "unidad", "timestamp"];

    fn valid_text(s: &str) -> bool {
        !s.trim().is_empty() && s.chars().count() <= MAX_TEXT && forbidden_char(s).is_none()
    }

    fn valid_interval(s: f64) -> bool {
        s.is_finite() && (MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&s)
    }

    /// A body with each of `fields` present six times in seven, its value drawn from the
    /// field's strategy, and now and then a field no body has.
    fn body(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> impl Strategy<Value = Value> {
        let present: Vec<_> = fields
            .into_iter()
            .map(|(name, value)| prop::option::weighted(0.85, value).prop_map(move |v| (name, v)))
            .collect();
        (present, prop::option::weighted(0.1, (text(), json()))).prop_map(|(fields, extra)| {
            let mut object: Map<String, Value> = fields
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_owned(), value?)))
                .collect();
            if let Some((name, value)) = extra {
                object.insert(name, value);
            }
            Value::Object(object)
        })
    }

    /// Mostly what the field takes, sometimes anything at all.
    fn mostly(good: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
        prop_oneof![6 => good, 1 => json()].boxed()
    }

    /// Names as clients send them, and text around the bounds.
    fn string() -> impl Strategy<Value = Value> {
        prop_oneof![
            2 => "[a-zA-Z0-9 ]{1,20}".prop_map(Value::String),
            1 => text().prop_map(Value::String),
        ]
    }

    fn nullable(good: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Value> {
        prop_oneof![4 => good, 1 => Just(Value::Null)]
    }

    fn sensor_body() -> impl Strategy<Value = Value> {
        let fuente = prop::sample::select(vec![
            serde_json::json!({"kind": "sim"}),
            serde_json::json!({"kind": "sim", "seed": 7}),
            serde_json::json!({"kind": "w1"}),
            serde_json::json!({"kind": "serial"}),
            serde_json::json!({"kind": "laser"}),
            Value::Null,
        ]);
        // Inside, at and just outside both bounds.
        let intervalo = prop_oneof![
            (0.0f64..0.1).prop_map(Value::from),
            (86_399.9f64..86_400.1).prop_map(Value::from),
            (0.0f64..100_000.0).prop_map(Value::from),
            number(),
            Just(Value::Null),
        ];
        let calibracion = prop_oneof![
            (-10.0f64..10.0, -2.0f64..2.0).prop_map(
                |(offset, scale)| serde_json::json!({"temperatura": {"offset": offset, "scale": scale}})
            ),
            Just(serde_json::json!({"humedad": {"points": [[20, 21], [80, 79]]}})),
            Just(serde_json::json!({"humedad": {"points": [[20, 21], [20, 79]]}})),
            Just(serde_json::json!({"vpd": {"offset": 1}})),
            Just(Value::Null),
        ];
        let derivados = prop_oneof![
            Just(serde_json::json!([
                "punto_rocio",
                "vpd",
                "humedad_absoluta"
            ])),
            Just(serde_json::json!(["vpd", "vpd"])),
            Just(serde_json::json!(["rocio"])),
            Just(Value::Null),
        ];
        let fields = vec![
            ("tipo", mostly(string())),
            ("modelo", mostly(string())),
            ("nombre", mostly(nullable(string()))),
            ("ubicacion", mostly(nullable(string()))),
            ("fuente", mostly(fuente)),
            ("intervalo", mostly(intervalo)),
            ("activo", mostly(any::<bool>().prop_map(Value::Bool))),
            ("calibracion", mostly(calibracion)),
            ("derivados", mostly(derivados)),
        ];
        prop_oneof![
            6 => body(fields),
            1 => object_with_keys(&SENSOR_FIELDS),
            1 => json(),
        ]
    }

    /// RFC 3339 times with offsets, some of which carry them past year 9999 or before
    /// year 0 in UTC.
    fn offset_time() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just(0), Just(9999), 0..=9999],
            prop_oneof![Just((1, 1)), Just((12, 31)), (1u32..=12, 1u32..=28)],
            0u32..24,
            prop::sample::select(vec!["Z", "+00:00", "-23:59", "+23:59", "+01:00", "-05:30"]),
        )
            .prop_map(|(year, (month, day), hour, offset)| {
                format!("{year:04}-{month:02}-{day:02}T{hour:02}:30:00{offset}")
            })
    }

    fn reading_body() -> impl Strategy<Value = Value> {
        let time = prop_oneof![
            (-62_135_596_800_000_000i64..253_402_300_799_999_999)
                .prop_map(|t| Value::String(format_time(t))),
            offset_time().prop_map(Value::String),
            string(),
        ];
        let fields = vec![
            (
                "sensor_id",
                mostly(prop_oneof![(-3i64..10).prop_map(Value::from), number()]),
            ),
            ("tipo", mostly(string())),
            ("valor", mostly(number())),
            (
                "unidad",
                mostly(nullable("[a-zA-Z°%]{0,20}".prop_map(Value::String))),
            ),
            ("timestamp", mostly(nullable(time))),
        ];
        prop_oneof![
            6 => body(fields),
            1 => object_with_keys(&READING_FIELDS),
            1 => json(),
        ]
    }

    /// Errors are bounded by the body: at most one per field given plus the required
    /// ones missing, each naming a field and with a message that does not grow without
    /// bound.
    fn check_errors(body: &Value, errors: &[FieldError], required: usize) {
        let given = body.as_object().map_or(1, Map::len);
        assert!(!errors.is_empty());
        assert!(errors.len() <= given + required, "{errors:?} for {body}");
        let body_len = body.to_string().len();
        for e in errors {
            assert!(!e.field.is_empty() || body.get("").is_some(), "{e:?}");
            assert!(e.message.len() <= 200 + body_len, "{e:?}");
        }
    }

    fn sensor_at_rest() -> Sensor {
        Sensor {
            id: 1,
            tipo: "temperatura".into(),
            modelo: "DHT22".into(),
            nombre: None,
            ubicacion: Some("invernadero".into()),
            fuente: None,
            intervalo: Some(2.0),
            activo: true,
            calibracion: Calibration::default(),
            derivados: Vec::new(),
            created_at: 0,
            updated_at: 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn new_sensor_accepts_only_bounded_values(body in sensor_body()) {
            match NewSensor::from_test_json(body.clone()) {
                Ok(s) => {
                    let object = body.as_object().expect("only objects are accepted");
                    prop_assert!(object.keys().all(|k| SENSOR_FIELDS.contains(&k.as_str())));
                    prop_assert!(valid_text(&s.tipo) && valid_text(&s.modelo));
                    prop_assert_eq!(Some(s.tipo.as_str()), object["tipo"].as_str());
                    prop_assert!(s.nombre.iter().chain(&s.ubicacion).all(|t| valid_text(t)));
                    prop_assert!(s.intervalo.is_none_or(valid_interval));
                    if let Some(fuente) = &s.fuente {
                        prop_assert!(fuente.is_object());
                        prop_assert!(super::tests::only_sim(fuente).is_ok());
                    }
                    prop_assert_eq!(s.activo, object.get("activo").and_then(Value::as_bool).unwrap_or(true));
                }
                Err(errors) => check_errors(&body, &errors, 2),
            }
        }

        #[test]
        fn sensor_patch_accepts_only_bounded_values(body in sensor_body()) {
            match SensorPatch::from_test_json(body.clone()) {
                Ok(patch) => {
                    let object = body.as_object().expect("only objects are accepted");
                    prop_assert!(object.keys().all(|k| SENSOR_FIELDS.contains(&k.as_str())));
                    prop_assert!(patch.tipo.iter().chain(&patch.modelo).all(|t| valid_text(t)));
                    prop_assert!(patch
                        .nombre
                        .iter()
                        .chain(&patch.ubicacion)
                        .flatten()
                        .all(|t| valid_text(t)));
                    prop_assert!(patch.intervalo.flatten().is_none_or(valid_interval));
                    prop_assert!(patch.fuente.iter().flatten().all(Value::is_object));
                    // Applying is idempotent and reports changes in schema order.
                    let mut sensor = sensor_at_rest();
                    let changed = patch.apply(&mut sensor);
                    let order: Vec<usize> = changed
                        .iter()
                        .map(|f| SENSOR_FIELDS.iter().position(|g| g == f).expect("a sensor field"))
                        .collect();
                    prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "{:?}", changed);
                    prop_assert!(changed.iter().all(|f| object.contains_key(*f)));
                    prop_assert!(patch.apply(&mut sensor).is_empty());
                }
                Err(errors) => check_errors(&body, &errors, 0),
            }
        }

        #[test]
        fn new_reading_accepts_only_bounded_values(
            body in reading_body()
        ) {
            match NewReading::from_json(body.clone()) {
                Ok(r) => {
                    prop_assert!(r.sensor_id > 0);
                    prop_assert!(valid_text(&r.tipo));
                    prop_assert!(r.valor.is_finite());
                    prop_assert!(r.unidad.chars().count() <= 16);
                    prop_assert_eq!(forbidden_char(&r.unidad), None);
                    if let Some(t) = r.timestamp {
                        // Whatever was accepted is stored and shown in the wire format.
                        prop_assert_eq!(parse_time(&format_time(t)), Some(t));
                    }
                }
                Err(errors) => check_errors(&body, &errors, 3),
            }
        }

        #[test]
        fn reading_patch_accepts_only_bounded_values(body in reading_body()) {
            match ReadingPatch::from_json(body.clone()) {
                Ok(patch) => {
                    let object = body.as_object().expect("only objects are accepted");
                    prop_assert!(object.keys().all(|k| super::READING_FIELDS.contains(&k.as_str())));
                    prop_assert!(!object.contains_key("hora_dudosa"));
                    prop_assert!(patch.tipo.iter().all(|t| valid_text(t)));
                    prop_assert!(patch.valor.is_none_or(f64::is_finite));
                    prop_assert!(patch.unidad.iter().all(|u| u.chars().count() <= 16));
                    if let Some(t) = patch.timestamp {
                        prop_assert_eq!(parse_time(&format_time(t)), Some(t));
                    }
                    // Applying is idempotent and reports changes in schema order.
                    let mut reading = Reading {
                        id: 1,
                        sensor_id: 1,
                        tipo: "temperatura".into(),
                        valor: 20.0,
                        unidad: "°C".into(),
                        timestamp: 0,
                        hora_dudosa: true,
                    };
                    let changed = patch.apply(&mut reading);
                    let order: Vec<usize> = changed
                        .iter()
                        .map(|f| super::READING_FIELDS.iter().position(|g| g == f).expect("a reading field"))
                        .collect();
                    prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "{:?}", changed);
                    prop_assert!(patch.apply(&mut reading).is_empty());
                }
                Err(errors) => check_errors(&body, &errors, 0),
            }
        }

        #[test]
        fn accepted_times_can_be_shown(text in offset_time()) {
            if let Some(t) = parse_time(&text) {
                prop_assert_eq!(parse_time(&format_time(t)), Some(t));
            }
        }

        #[test]
        fn wire_times_round_trip(t in -62_135_596_800_000_000i64..253_402_300_799_999_999) {
            prop_assert_eq!(parse_time(&format_time(t)), Some(t));
        }
    }
}
