//! Per-sensor calibration: a linear correction per `tipo`, applied to every value a
//! source reads before it is checked and stored.
//!
//! A correction is `stored = read × scale + offset`. It is given either as `offset` and
//! `scale` (each optional, 0 and 1 by default), or as two reference points, each a value
//! the sensor read and the true value a reference instrument gave at that moment
//! (`points = [[read, true], [read, true]]`), which are turned into offset and scale.
//! On the wire, in events and in the calibration history it is always offset and scale.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::derived::Derived;
use super::{forbidden_char, FieldError, Measurement};

/// The `tipo`s every source may report, besides the one a sensor is created with and
/// those its source maps device keys and registers to.
const COMMON_TIPOS: [&str; 3] = ["temperatura", "humedad", "presion"];

/// Largest magnitude of an offset, and of a scale: beyond it a correction is a typo.
const MAX_MAGNITUDE: f64 = 1e6;

/// The correction of one `tipo`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Adjustment {
    /// Added after scaling, in the reading's unit.
    pub offset: f64,
    /// Multiplies the value read.
    pub scale: f64,
}

impl Adjustment {
    /// The corrected value of `value`.
    pub fn apply(&self, value: f64) -> f64 {
        value * self.scale + self.offset
    }
}

/// A sensor's calibration: one correction per `tipo`; empty when the sensor has none.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Calibration(BTreeMap<String, Adjustment>);

impl Calibration {
    /// Whether no `tipo` is corrected.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The corrected `tipo`s.
    pub fn tipos(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The correction of `tipo`, if it has one.
    pub fn get(&self, tipo: &str) -> Option<&Adjustment> {
        self.0.get(tipo)
    }

    /// Reads a calibration object (`{"temperatura": {"offset": -0.8}}`), naming every
    /// problem by its path under `field`. Stored calibrations are read back the same way.
    pub fn from_json(value: &Value, field: &str) -> Result<Calibration, Vec<FieldError>> {
        let Value::Object(tipos) = value else {
            return Err(vec![FieldError::new(
                field,
                "must be an object with a correction per tipo",
            )]);
        };
        let mut errors = Vec::new();
        let mut calibration = BTreeMap::new();
        for (tipo, spec) in tipos {
            let at = format!("{field}.{tipo}");
            if tipo.trim().is_empty() || forbidden_char(tipo).is_some() {
                errors.push(FieldError::new(&at, "is not a tipo"));
                continue;
            }
            if Derived::from_tipo(tipo).is_some() {
                errors.push(FieldError::new(
                    &at,
                    "is a derived value: calibrate the values it is derived from",
                ));
                continue;
            }
            match adjustment(spec, &at) {
                Ok(adjustment) => {
                    calibration.insert(tipo.clone(), adjustment);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(Calibration(calibration))
        } else {
            Err(errors)
        }
    }

    /// Stored text, read back; unreadable text (a hand-edited database) is no calibration.
    pub fn from_stored(text: Option<&str>) -> Calibration {
        text.and_then(|t| serde_json::from_str::<Value>(t).ok())
            .and_then(|v| Calibration::from_json(&v, "calibracion").ok())
            .unwrap_or_default()
    }

    /// The text stored in the database; `None` when empty.
    pub fn to_stored(&self) -> Option<String> {
        (!self.is_empty()).then(|| serde_json::to_string(self).unwrap_or_default())
    }

    /// A problem for each corrected `tipo` that the sensor does not measure: neither its
    /// own `tipo`, nor a common one, nor one its source names.
    pub fn unknown_tipos(
        &self,
        tipo: &str,
        fuente: Option<&Value>,
        field: &str,
    ) -> Vec<FieldError> {
        unknown_tipos(self.tipos(), tipo, fuente, field)
    }

    /// Corrects the measurements of one sample in place. A corrected value that cannot
    /// exist (a relative humidity outside 0 to 100 %, a temperature below absolute zero)
    /// makes the whole sample implausible, as a value out of a device's range does: the
    /// error says why.
    pub fn apply(&self, measurements: &mut [Measurement]) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        // Checked before anything is changed, so a refused sample is left as it was read.
        let corrected: Vec<Option<f64>> = measurements
            .iter()
            .map(|m| self.0.get(&m.tipo).map(|a| a.apply(m.valor)))
            .collect();
        for (m, value) in measurements.iter().zip(&corrected) {
            let Some(value) = *value else { continue };
            let impossible = !value.is_finite()
                || match (m.tipo.as_str(), m.unidad.as_str()) {
                    ("humedad", "%") => !(0.0..=100.0).contains(&value),
                    ("temperatura", "°C") => value < -273.15,
                    _ => false,
                };
            if impossible {
                return Err(format!(
                    "{} {} {} after calibration (read {})",
                    m.tipo, value, m.unidad, m.valor
                ));
            }
        }
        for (m, value) in measurements.iter_mut().zip(corrected) {
            if let Some(value) = value {
                m.valor = value;
            }
        }
        Ok(())
    }
}

/// A problem for each of `tipos` that a sensor of `tipo` with source `fuente` does not
/// measure (see [`Calibration::unknown_tipos`]).
pub fn unknown_tipos<'a>(
    tipos: impl Iterator<Item = &'a str>,
    tipo: &str,
    fuente: Option<&Value>,
    field: &str,
) -> Vec<FieldError> {
    let mut known: Vec<String> = COMMON_TIPOS.iter().map(|t| t.to_string()).collect();
    known.push(tipo.to_owned());
    if let Some(fuente) = fuente {
        tipos_named_in(fuente, &mut known);
    }
    known.sort();
    known.dedup();
    tipos
        .filter(|t| !known.iter().any(|k| k == t))
        .map(|t| {
            FieldError::new(
                &format!("{field}.{t}"),
                format!("unknown tipo: this sensor measures {}", known.join(", ")),
            )
        })
        .collect()
}

/// Every string under a `tipo` key in a source spec: the tipos its serial keys and
/// Modbus registers are mapped to.
fn tipos_named_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("tipo", Value::String(t)) => out.push(t.clone()),
                    _ => tipos_named_in(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| tipos_named_in(v, out)),
        _ => {}
    }
}

fn number(spec: &Map<String, Value>, key: &str, at: &str) -> Result<Option<f64>, FieldError> {
    match spec.get(key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x.abs() <= MAX_MAGNITUDE => Ok(Some(x)),
            _ => Err(FieldError::new(
                &format!("{at}.{key}"),
                "must be a finite number of magnitude at most 1000000",
            )),
        },
    }
}

/// One `tipo`'s correction, from `{"offset", "scale"}` or `{"points"}`.
fn adjustment(spec: &Value, at: &str) -> Result<Adjustment, FieldError> {
    let Value::Object(spec) = spec else {
        return Err(FieldError::new(
            at,
            "must be an object: {\"offset\", \"scale\"} or {\"points\": [[read, true], [read, true]]}",
        ));
    };
    if let Some(unknown) = spec
        .keys()
        .find(|k| !["offset", "scale", "points"].contains(&k.as_str()))
    {
        return Err(FieldError::new(&format!("{at}.{unknown}"), "unknown field"));
    }
    if let Some(points) = spec.get("points") {
        if spec.contains_key("offset") || spec.contains_key("scale") {
            return Err(FieldError::new(
                &format!("{at}.points"),
                "cannot be given with offset or scale",
            ));
        }
        return from_points(points, &format!("{at}.points"));
    }
    let offset = number(spec, "offset", at)?;
    let scale = number(spec, "scale", at)?;
    if offset.is_none() && scale.is_none() {
        return Err(FieldError::new(
            at,
            "needs offset, scale, or two reference points",
        ));
    }
    let scale = scale.unwrap_or(1.0);
    if scale == 0.0 {
        return Err(FieldError::new(
            &format!("{at}.scale"),
            "must not be 0: every value would read the same",
        ));
    }
    Ok(Adjustment {
        offset: offset.unwrap_or(0.0),
        scale,
    })
}

/// The correction through two points `[read, true]`.
fn from_points(points: &Value, at: &str) -> Result<Adjustment, FieldError> {
    let bad = || {
        FieldError::new(
            at,
            "must be two points [read, true] of finite numbers: [[20.3, 20.0], [80.9, 80.0]]",
        )
    };
    let pairs: Vec<(f64, f64)> = points
        .as_array()
        .filter(|p| p.len() == 2)
        .ok_or_else(bad)?
        .iter()
        .map(|p| match p.as_array().map(Vec::as_slice) {
            Some([read, real]) => match (read.as_f64(), real.as_f64()) {
                (Some(r), Some(t))
                    if r.is_finite()
                        && t.is_finite()
                        && r.abs() <= MAX_MAGNITUDE
                        && t.abs() <= MAX_MAGNITUDE =>
                {
                    Ok((r, t))
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        })
        .collect::<Result<_, _>>()?;
    let [(r1, t1), (r2, t2)] = [pairs[0], pairs[1]];
    if r1 == r2 {
        return Err(FieldError::new(
            at,
            "the two points must have different read values",
        ));
    }
    let scale = (t2 - t1) / (r2 - r1);
    if scale == 0.0 || !scale.is_finite() || scale.abs() > MAX_MAGNITUDE {
        return Err(FieldError::new(
            at,
            "the two points must give a scale that is not 0 (different true values)",
        ));
    }
    Ok(Adjustment {
        offset: t1 - scale * r1,
        scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn offset_and_scale_default_to_no_change() {
        let c = Calibration::from_json(
            &json!({"temperatura": {"offset": -0.8}, "humedad": {"scale": 1.02}}),
            "calibracion",
        )
        .unwrap();
        assert_eq!(
            c.get("temperatura"),
            Some(&Adjustment {
                offset: -0.8,
                scale: 1.0
            })
        );
        assert_eq!(c.get("humedad").unwrap().offset, 0.0);
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"humedad": {"offset": 0.0, "scale": 1.02},
                   "temperatura": {"offset": -0.8, "scale": 1.0}})
        );
    }

    #[test]
    fn two_points_become_offset_and_scale() {
        // An ice bath read 0.5 °C, boiling water 99.5 °C.
        let c = Calibration::from_json(
            &json!({"temperatura": {"points": [[0.5, 0.0], [99.5, 100.0]]}}),
            "calibracion",
        )
        .unwrap();
        let a = c.get("temperatura").unwrap();
        assert!((a.apply(0.5) - 0.0).abs() < 1e-12);
        assert!((a.apply(99.5) - 100.0).abs() < 1e-12);
        assert!((a.scale - 100.0 / 99.0).abs() < 1e-12);
    }

    #[test]
    fn bad_calibrations_name_the_field() {
        for (body, field) in [
            (
                json!({"temperatura": {"scale": 0}}),
                "calibracion.temperatura.scale",
            ),
            (
                json!({"temperatura": {"offset": "x"}}),
                "calibracion.temperatura.offset",
            ),
            (
                json!({"temperatura": {"offset": 1e300}}),
                "calibracion.temperatura.offset",
            ),
            (json!({"temperatura": {}}), "calibracion.temperatura"),
            (json!({"temperatura": 3}), "calibracion.temperatura"),
            (
                json!({"temperatura": {"gain": 2}}),
                "calibracion.temperatura.gain",
            ),
            (
                json!({"temperatura": {"points": [[1, 2]]}}),
                "calibracion.temperatura.points",
            ),
            (
                json!({"temperatura": {"points": [[1, 2], [1, 3]]}}),
                "calibracion.temperatura.points",
            ),
            (
                json!({"temperatura": {"points": [[1, 2], [3, 2]]}}),
                "calibracion.temperatura.points",
            ),
            (
                json!({"temperatura": {"points": [[1, 2], [2, 3]], "offset": 1}}),
                "calibracion.temperatura.points",
            ),
            (
                json!({"punto_rocio": {"offset": 1}}),
                "calibracion.punto_rocio",
            ),
            (json!({"": {"offset": 1}}), "calibracion."),
            (json!([1]), "calibracion"),
        ] {
            let err = Calibration::from_json(&body, "calibracion").unwrap_err();
            assert_eq!(fields(err), [field], "{body}");
        }
    }

    #[test]
    fn only_tipos_the_sensor_measures_are_known() {
        let c = Calibration::from_json(
            &json!({"temperatura": {"offset": 1}, "co2": {"offset": -20}, "caudal": {"scale": 2}}),
            "calibracion",
        )
        .unwrap();
        let fuente = json!({"kind": "serial", "path": "/dev/x", "keys": {"co2": {"tipo": "co2", "unidad": "ppm"}}});
        let errors = c.unknown_tipos("temperatura", Some(&fuente), "calibracion");
        assert_eq!(fields(errors.clone()), ["calibracion.caudal"]);
        assert!(errors[0]
            .message
            .contains("co2, humedad, presion, temperatura"));
        assert!(c
            .unknown_tipos("caudal", Some(&fuente), "calibracion")
            .is_empty());
    }

    #[test]
    fn applies_to_its_tipos_and_refuses_impossible_results() {
        let c = Calibration::from_json(
            &json!({"temperatura": {"offset": -0.8}, "humedad": {"offset": 5}}),
            "calibracion",
        )
        .unwrap();
        let mut sample = vec![
            Measurement::new("temperatura", 21.8, "°C"),
            Measurement::new("humedad", 40.0, "%"),
            Measurement::new("presion", 1013.0, "hPa"),
        ];
        c.apply(&mut sample).unwrap();
        assert!((sample[0].valor - 21.0).abs() < 1e-9);
        assert_eq!(sample[1].valor, 45.0);
        assert_eq!(sample[2].valor, 1013.0);
        let mut wet = vec![Measurement::new("humedad", 97.0, "%")];
        assert!(c.apply(&mut wet).unwrap_err().contains("after calibration"));
        assert_eq!(wet[0].valor, 97.0, "a refused sample is left as read");
        // Only corrected values are judged: what the device sent was judged by it.
        let only_temperature =
            Calibration::from_json(&json!({"temperatura": {"offset": 1}}), "c").unwrap();
        let mut odd = vec![Measurement::new("humedad", 101.0, "%")];
        assert_eq!(only_temperature.apply(&mut odd), Ok(()));
    }

    #[test]
    fn stored_text_reads_back() {
        let c = Calibration::from_json(&json!({"temperatura": {"offset": -0.8}}), "c").unwrap();
        assert_eq!(Calibration::from_stored(c.to_stored().as_deref()), c);
        assert_eq!(Calibration::default().to_stored(), None);
        assert_eq!(
            Calibration::from_stored(Some("nonsense")),
            Calibration::default()
        );
    }
}
