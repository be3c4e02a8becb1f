//! Alert rules: what they look like in the config file and over REST, and their
//! validation. Pure: no I/O.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{forbidden_char, forbidden_char_message, FieldError, MAX_TEXT};

/// Longest `for_s`, `seconds` and `repeat_s`: a week.
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// Default and largest webhook notifications per minute per rule.
const DEFAULT_PER_MINUTE: u32 = 6;
const MAX_PER_MINUTE: u32 = 600;

/// What a rule watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionKind {
    /// The value is above `threshold`.
    Above,
    /// The value is below `threshold`.
    Below,
    /// The value is outside `min`..=`max`.
    Outside,
    /// No reading of the sensor and `tipo` for `seconds`.
    NoReading,
    /// The value changes faster than `per_minute` (either way) between two readings.
    Rate,
}

impl ConditionKind {
    /// The name used in config, REST and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionKind::Above => "above",
            ConditionKind::Below => "below",
            ConditionKind::Outside => "outside",
            ConditionKind::NoReading => "no_reading",
            ConditionKind::Rate => "rate",
        }
    }

    /// The parameters this condition takes.
    fn parameters(self) -> &'static [&'static str] {
        match self {
            ConditionKind::Above | ConditionKind::Below => &["threshold"],
            ConditionKind::Outside => &["min", "max"],
            ConditionKind::NoReading => &["seconds"],
            ConditionKind::Rate => &["per_minute"],
        }
    }
}

/// A rule as written in an `[[alert]]` table or a REST body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name; a config rule is found again by it across restarts.
    pub name: String,
    /// The sensor, by id or by name (exactly one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor: Option<String>,
    /// The `tipo` of the sensor's readings the rule watches.
    pub tipo: String,
    pub condition: ConditionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<f64>,
    /// How long the condition must hold before the alert fires, in seconds.
    #[serde(default)]
    pub for_s: f64,
    /// How far back past the threshold the value must come before a firing alert
    /// resolves (for `rate`, in the same units per minute).
    #[serde(default)]
    pub hysteresis: f64,
    /// Notify again every this many seconds while the alert fires unacknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_s: Option<f64>,
    /// `http://` URL that gets a JSON POST at each notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Most webhook notifications per minute; later ones wait their turn.
    #[serde(default = "default_per_minute")]
    pub webhook_per_minute: u32,
}

fn default_per_minute() -> u32 {
    DEFAULT_PER_MINUTE
}

/// The condition of a checked rule, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    Above(f64),
    Below(f64),
    Outside { min: f64, max: f64 },
    NoReading { seconds: f64 },
    Rate { per_minute: f64 },
}

/// The fields of a rule, in the order errors list them.
const FIELDS: &[&str] = &[
    "name",
    "sensor_id",
    "sensor",
    "tipo",
    "condition",
    "threshold",
    "min",
    "max",
    "seconds",
    "per_minute",
    "for_s",
    "hysteresis",
    "repeat_s",
    "webhook",
    "webhook_per_minute",
];

impl RuleSpec {
    /// Reads a rule from a REST body, naming every field that is missing, unknown or of
    /// the wrong type; then checks it (see [`RuleSpec::check`]).
    pub fn from_json(body: Value) -> Result<RuleSpec, Vec<FieldError>> {
        let Value::Object(fields) = body else {
            return Err(vec![FieldError::new("body", "must be a JSON object")]);
        };
        let mut errors: Vec<FieldError> = fields
            .keys()
            .filter(|k| !FIELDS.contains(&k.as_str()))
            .map(|k| FieldError::new(k, "unknown field"))
            .collect();
        // Each field alone, so that every bad one is named, not only the first.
        let mut clean = Map::new();
        for &field in FIELDS {
            let Some(value) = fields.get(field) else {
                continue;
            };
            if value.is_null() {
                continue;
            }
            let expected = match field {
                "name" | "sensor" | "tipo" | "webhook" => value.is_string(),
                "sensor_id" => value.as_i64().is_some(),
                "webhook_per_minute" => value.as_u64().is_some_and(|n| n <= u32::MAX as u64),
                "condition" => serde_json::from_value::<ConditionKind>(value.clone()).is_ok(),
                _ => value.is_number(),
            };
            if expected {
                clean.insert(field.to_owned(), value.clone());
            } else {
                errors.push(FieldError::new(
                    field,
                    match field {
                        "name" | "sensor" | "tipo" | "webhook" => "must be a string",
                        "sensor_id" => "must be an integer",
                        "webhook_per_minute" => "must be a whole number",
                        "condition" => "must be above, below, outside, no_reading or rate",
                        _ => "must be a number",
                    },
                ));
            }
        }
        for required in ["name", "tipo", "condition"] {
            if !fields.contains_key(required) || fields[required].is_null() {
                errors.push(FieldError::new(required, "field required"));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let spec: RuleSpec = serde_json::from_value(Value::Object(clean))
            .map_err(|e| vec![FieldError::new("body", e.to_string())])?;
        spec.check().map(|_| spec)
    }

    /// The rule as JSON, as stored and as REST shows it.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Checks the rule; answers its condition, or every problem, each naming its field.
    pub fn check(&self) -> Result<Condition, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut text = |field: &str, value: Option<&String>, required: bool| {
            let Some(value) = value else { return };
            if required && value.trim().is_empty() {
                errors.push(FieldError::new(field, "must not be empty"));
            }
            if value.chars().count() > MAX_TEXT {
                errors.push(FieldError::new(
                    field,
                    format!("must be at most {MAX_TEXT} characters"),
                ));
            }
            if let Some(c) = forbidden_char(value) {
                errors.push(FieldError::new(field, forbidden_char_message(c)));
            }
        };
        text("name", Some(&self.name), true);
        text("sensor", self.sensor.as_ref(), true);
        text("tipo", Some(&self.tipo), true);
        match (self.sensor_id, &self.sensor) {
            (None, None) => errors.push(FieldError::new(
                "sensor_id",
                "a rule names its sensor: sensor_id or sensor (its name)",
            )),
            (Some(_), Some(_)) => errors.push(FieldError::new(
                "sensor",
                "give sensor_id or sensor (its name), not both",
            )),
            (Some(id), None) if id <= 0 => {
                errors.push(FieldError::new("sensor_id", "must be a positive integer"))
            }
            _ => {}
        }
        let given = [
            ("threshold", self.threshold),
            ("min", self.min),
            ("max", self.max),
            ("seconds", self.seconds),
            ("per_minute", self.per_minute),
        ];
        let wanted = self.condition.parameters();
        for (field, value) in given {
            match (wanted.contains(&field), value) {
                (true, None) => errors.push(FieldError::new(
                    field,
                    format!("required by condition {}", self.condition.as_str()),
                )),
                (true, Some(v)) if !v.is_finite() => {
                    errors.push(FieldError::new(field, "must be a finite number"))
                }
                (false, Some(_)) => errors.push(FieldError::new(
                    field,
                    format!(
                        "is not used by condition {} (it takes {})",
                        self.condition.as_str(),
                        wanted.join(" and ")
                    ),
                )),
                _ => {}
            }
        }
        let mut seconds = |field: &str, value: f64, least: f64| {
            if !(value.is_finite() && value >= least && value <= MAX_SECONDS) {
                errors.push(FieldError::new(
                    field,
                    format!("must be between {least} and {MAX_SECONDS} seconds (a week)"),
                ));
            }
        };
        seconds("for_s", self.for_s, 0.0);
        if let Some(repeat) = self.repeat_s {
            seconds("repeat_s", repeat, 1.0);
        }
        if let (ConditionKind::NoReading, Some(s)) = (self.condition, self.seconds) {
            seconds("seconds", s, 1.0);
        }
        if let (ConditionKind::Rate, Some(p)) = (self.condition, self.per_minute) {
            if p <= 0.0 {
                errors.push(FieldError::new("per_minute", "must be above 0"));
            }
        }
        if !(self.hysteresis.is_finite() && self.hysteresis >= 0.0) {
            errors.push(FieldError::new("hysteresis", "must be 0 or more"));
        }
        if let (ConditionKind::Outside, Some(min), Some(max)) = (self.condition, self.min, self.max)
        {
            if min >= max {
                errors.push(FieldError::new("max", "must be above min"));
            } else if self.hysteresis * 2.0 >= max - min {
                errors.push(FieldError::new(
                    "hysteresis",
                    "must be less than half of max - min, or the alert could never resolve",
                ));
            }
        }
        if let Some(url) = &self.webhook {
            if let Err(why) = check_webhook(url) {
                errors.push(FieldError::new("webhook", why));
            }
        }
        if !(1..=MAX_PER_MINUTE).contains(&self.webhook_per_minute) {
            errors.push(FieldError::new(
                "webhook_per_minute",
                format!("must be between 1 and {MAX_PER_MINUTE}"),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let p = |v: Option<f64>| v.unwrap_or_default();
        Ok(match self.condition {
            ConditionKind::Above => Condition::Above(p(self.threshold)),
            ConditionKind::Below => Condition::Below(p(self.threshold)),
            ConditionKind::Outside => Condition::Outside {
                min: p(self.min),
                max: p(self.max),
            },
            ConditionKind::NoReading => Condition::NoReading {
                seconds: p(self.seconds),
            },
            ConditionKind::Rate => Condition::Rate {
                per_minute: p(self.per_minute),
            },
        })
    }
}

/// A webhook URL must be `http://host[:port]/path`: notifications go to a receiver on
/// the gateway's network (TLS to the internet is the broker uplink's job).
fn check_webhook(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported: use an http:// receiver on the gateway's network".into(),
            )
        }
        _ => return Err("must start with http://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if forbidden_char(url).is_some() || url.len() > 2048 {
        return Err("must be at most 2048 characters, without control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_good_rule_reads_and_checks() {
        let spec = RuleSpec::from_json(json!({
            "name": "freezer", "sensor": "freezer", "tipo": "temperatura",
            "condition": "above", "threshold": -15, "for_s": 60, "hysteresis": 1,
            "webhook": "http://10.0.0.2:8080/hook"
        }))
        .unwrap();
        assert_eq!(spec.check().unwrap(), Condition::Above(-15.0));
        assert_eq!(spec.webhook_per_minute, DEFAULT_PER_MINUTE);
        assert_eq!(RuleSpec::from_json(spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = RuleSpec::from_json(json!({
            "name": "", "sensor_id": 1, "tipo": "temperatura", "condition": "outside",
            "min": 5, "max": 1, "threshold": 3, "colour": "red", "for_s": "soon"
        }))
        .unwrap_err();
        assert_eq!(fields(errors), ["colour", "for_s"]);
        let errors = RuleSpec::from_json(json!({
            "name": "", "sensor_id": 1, "tipo": "temperatura", "condition": "outside",
            "min": 5, "max": 1, "threshold": 3
        }))
        .unwrap_err();
        assert_eq!(fields(errors), ["name", "threshold", "max"]);
        let errors =
            RuleSpec::from_json(json!({"tipo": "x", "condition": "sideways"})).unwrap_err();
        assert_eq!(fields(errors), ["condition", "name"]);
    }

    #[test]
    fn conditions_need_their_parameters_and_a_sensor() {
        let base = |extra: Value| {
            let mut rule = json!({"name": "r", "tipo": "t", "sensor": "s"});
            rule.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            RuleSpec::from_json(rule).map_err(fields)
        };
        assert_eq!(
            base(json!({"condition": "no_reading"})).unwrap_err(),
            ["seconds"]
        );
        assert_eq!(
            base(json!({"condition": "rate", "per_minute": 0})).unwrap_err(),
            ["per_minute"]
        );
        assert_eq!(
            base(json!({"condition": "below", "threshold": 1, "webhook": "https://x/"}))
                .unwrap_err(),
            ["webhook"]
        );
        assert_eq!(
            base(json!({"condition": "outside", "min": 0, "max": 2, "hysteresis": 1})).unwrap_err(),
            ["hysteresis"]
        );
        assert!(base(json!({"condition": "no_reading", "seconds": 30})).is_ok());
        let errors = RuleSpec::from_json(json!({
            "name": "r", "tipo": "t", "condition": "above", "threshold": 1
        }))
        .unwrap_err();
        assert_eq!(fields(errors), ["sensor_id"]);
    }
}
