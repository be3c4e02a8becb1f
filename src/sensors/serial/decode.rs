//! One line of text to measurements, pure. Lines are JSON objects (`{"t": 21.4, "h": 40.2}`
//! or `{"tipo": "temperatura", "valor": 21.4}`) or key/value text (`T=21.4 H=40.2`,
//! `temp:21.4,hum:40.2`); a [`KeyMapping`] says what each key measures.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sensors::source::{Measurement, SensorError};

/// What a key on the line measures.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Wire name of the quantity (`temperatura`, `humedad`, `presion`, or a new one).
    pub tipo: String,
    /// Unit shown to clients.
    pub unidad: String,
}

/// Case-insensitive table from the keys a device prints to what they measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMapping {
    /// Keys are stored lowercased.
    keys: HashMap<String, KeySpec>,
}

/// The keys firmware authors tend to use, in English and Spanish.
const DEFAULT_KEYS: &[(&[&str], &str)] = &[
    (&["t", "temp", "temperature", "temperatura"], "temperatura"),
    (&["h", "hum", "humidity", "humedad"], "humedad"),
    (&["p", "pres", "pressure", "presion"], "presion"),
];

impl Default for KeyMapping {
    fn default() -> Self {
        let mut keys = HashMap::new();
        for (aliases, tipo) in DEFAULT_KEYS {
            let unidad = crate::model::known_unit(tipo).unwrap_or_default();
            for alias in *aliases {
                keys.insert(
                    (*alias).to_owned(),
                    KeySpec {
                        tipo: (*tipo).to_owned(),
                        unidad: unidad.to_owned(),
                    },
                );
            }
        }
        KeyMapping { keys }
    }
}

impl KeyMapping {
    /// The default keys plus `extra`; an entry in `extra` replaces a default of the same
    /// name (so `p` can be remapped on a device where it means something else).
    pub fn with_keys(extra: &BTreeMap<String, KeySpec>) -> Self {
        let mut mapping = KeyMapping::default();
        for (key, spec) in extra {
            mapping.keys.insert(key.to_lowercase(), spec.clone());
        }
        mapping
    }

    fn get(&self, key: &str) -> Option<&KeySpec> {
        self.keys.get(&key.to_lowercase())
    }
}

/// How lines on the port are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LineFormat {
    /// A line starting with `{` is JSON, anything else key/value text.
    #[default]
    Auto,
    /// Every line is a JSON object.
    Json,
    /// Every line is `key=value` / `key:value` pairs.
    Kv,
}

impl LineFormat {
    /// Parses one line (without its newline) into measurements.
    ///
    /// Keys the mapping does not know are ignored, so firmware can add fields (`id`,
    /// `rssi`) without breaking the gateway; a line with no known key at all, a known key
    /// without a finite number, the same quantity twice, invalid UTF-8 and empty lines are
    /// `Malformed`.
    pub fn parse(self, line: &[u8], mapping: &KeyMapping) -> Result<Vec<Measurement>, SensorError> {
        let text = std::str::from_utf8(line)
            .map_err(|_| SensorError::Malformed(format!("not UTF-8: {}", excerpt(line))))?
            .trim();
        if text.is_empty() {
            return Err(SensorError::Malformed("empty line".into()));
        }
        match self {
            LineFormat::Json => parse_json(text, mapping),
            LineFormat::Kv => parse_kv(text, mapping),
            LineFormat::Auto if text.starts_with('{') => parse_json(text, mapping),
            LineFormat::Auto => parse_kv(text, mapping),
        }
    }
}

/// Parses one line in whichever format it is written: what `format = "auto"` does.
pub fn parse_line(line: &[u8], mapping: &KeyMapping) -> Result<Vec<Measurement>, SensorError> {
    LineFormat::Auto.parse(line, mapping)
}

/// The start of a line, printable, for error messages.
fn excerpt(line: &[u8]) -> String {
    const SHOWN: usize = 40;
    let shown = String::from_utf8_lossy(&line[..line.len().min(SHOWN)]).into_owned();
    if line.len() > SHOWN {
        format!("{shown:?}...")
    } else {
        format!("{shown:?}")
    }
}

/// Collects one line's measurements, refusing a quantity given twice (`T=1 temp=2`): which
/// one the device meant cannot be known.
#[derive(Default)]
struct Collected(Vec<Measurement>);

impl Collected {
    fn push(&mut self, spec: &KeySpec, valor: f64) -> Result<(), SensorError> {
        if self.0.iter().any(|m| m.tipo == spec.tipo) {
            return Err(SensorError::Malformed(format!("{} given twice", spec.tipo)));
        }
        self.0
            .push(Measurement::new(&spec.tipo, valor, &spec.unidad));
        Ok(())
    }

    fn finish(self, text: &str) -> Result<Vec<Measurement>, SensorError> {
        if self.0.is_empty() {
            return Err(SensorError::Malformed(format!(
                "no known key in {}",
                excerpt(text.as_bytes())
            )));
        }
        Ok(self.0)
    }
}

fn finite(valor: Option<f64>, key: &str) -> Result<f64, SensorError> {
    valor
        .filter(|v| v.is_finite())
        .ok_or_else(|| SensorError::Malformed(format!("{key} is not a finite number")))
}

fn parse_json(text: &str, mapping: &KeyMapping) -> Result<Vec<Measurement>, SensorError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        SensorError::Malformed(format!("invalid JSON ({e}): {}", excerpt(text.as_bytes())))
    })?;
    let Value::Object(object) = value else {
        return Err(SensorError::Malformed(format!(
            "JSON line is not an object: {}",
            excerpt(text.as_bytes())
        )));
    };
    let field = |name: &str| {
        object
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    };
    if let (Some(tipo), Some(valor)) = (field("tipo"), field("valor")) {
        // One measurement per line, self-described. The tipo still has to be known: the
        // mapping is what decides which quantities this gateway stores.
        let tipo = tipo
            .as_str()
            .ok_or_else(|| SensorError::Malformed("tipo is not a string".into()))?;
        let spec = mapping
            .get(tipo)
            .ok_or_else(|| SensorError::Malformed(format!("unknown tipo {tipo:?}")))?;
        let valor = finite(valor.as_f64(), "valor")?;
        let unidad = match field("unidad") {
            None | Some(Value::Null) => spec.unidad.as_str(),
            Some(Value::String(unidad)) if crate::model::forbidden_char(unidad).is_some() => {
                return Err(SensorError::Malformed(
                    "unidad holds control or bidirectional formatting characters".into(),
                ))
            }
            Some(Value::String(unidad)) if !unidad.trim().is_empty() => unidad.trim(),
            Some(_) => return Err(SensorError::Malformed("unidad is not a string".into())),
        };
        return Ok(vec![Measurement::new(&spec.tipo, valor, unidad)]);
    }
    let mut collected = Collected::default();
    for (key, value) in &object {
        if let Some(spec) = mapping.get(key) {
            collected.push(spec, finite(value.as_f64(), key)?)?;
        }
    }
    // Object key order is not meaningful in JSON (and serde_json's depends on a feature
    // flag), so the output is put in a fixed order.
    let mut measurements = collected.finish(text)?;
    measurements.sort_by(|a, b| a.tipo.cmp(&b.tipo));
    Ok(measurements)
}

fn parse_kv(text: &str, mapping: &KeyMapping) -> Result<Vec<Measurement>, SensorError> {
    let mut collected = Collected::default();
    for token in text.split([' ', '\t', ',', ';']).filter(|t| !t.is_empty()) {
        let (key, valor) = token
            .split_once(['=', ':'])
            .filter(|(key, valor)| !key.is_empty() && !valor.is_empty())
            .ok_or_else(|| {
                SensorError::Malformed(format!("{} is not key=value", excerpt(token.as_bytes())))
            })?;
        if let Some(spec) = mapping.get(key) {
            collected.push(spec, finite(valor.parse().ok(), key)?)?;
        }
    }
    collected.finish(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(tipo: &str, valor: f64, unidad: &str) -> Measurement {
        Measurement::new(tipo, valor, unidad)
    }

    fn parse(line: &str) -> Result<Vec<Measurement>, SensorError> {
        parse_line(line.as_bytes(), &KeyMapping::default())
    }

    fn malformed(outcome: Result<Vec<Measurement>, SensorError>) -> bool {
        matches!(outcome, Err(SensorError::Malformed(_)))
    }

    #[test]
    fn key_value_lines() {
        let both = vec![m("temperatura", 21.4, "°C"), m("humedad", 40.2, "%")];
        assert_eq!(parse("T=21.4 H=40.2"), Ok(both.clone()));
        assert_eq!(parse("temp:21.4,hum:40.2"), Ok(both.clone()));
        assert_eq!(parse("Temperature=21.4; HUMIDITY=40.2\r"), Ok(both.clone()));
        assert_eq!(parse("  t:21.4\th=40.2  "), Ok(both));
        assert_eq!(
            parse("presion=1013.25,temperatura=-3.5"),
            Ok(vec![
                m("presion", 1013.25, "hPa"),
                m("temperatura", -3.5, "°C")
            ])
        );
    }

    #[test]
    fn json_keyed_objects() {
        assert_eq!(
            parse(r#"{"t": 21.4, "h": 40.2, "pres": 1001}"#),
            Ok(vec![
                m("humedad", 40.2, "%"),
                m("presion", 1001.0, "hPa"),
                m("temperatura", 21.4, "°C"),
            ])
        );
        assert_eq!(
            parse(r#"{"Temp": 19.5, "id": "node-7", "ok": true}"#),
            Ok(vec![m("temperatura", 19.5, "°C")])
        );
    }

    #[test]
    fn json_tipo_valor_objects() {
        assert_eq!(
            parse(r#"{"tipo": "temperatura", "valor": 21.4}"#),
            Ok(vec![m("temperatura", 21.4, "°C")])
        );
        assert_eq!(
            parse(r#"{"tipo": "hum", "valor": 40, "unidad": "%HR"}"#),
            Ok(vec![m("humedad", 40.0, "%HR")])
        );
        assert!(malformed(parse(r#"{"tipo": "co2", "valor": 415}"#)));
        assert!(malformed(parse(r#"{"tipo": 1, "valor": 415}"#)));
        assert!(malformed(parse(r#"{"tipo": "t", "valor": "21"}"#)));
        assert!(malformed(parse(
            r#"{"tipo": "t", "valor": 21, "unidad": "C\u202e"}"#
        )));
        assert!(malformed(parse(
            r#"{"tipo": "t", "valor": 21, "unidad": 5}"#
        )));
    }

    #[test]
    fn unknown_keys_are_ignored_but_a_line_needs_one_known() {
        assert_eq!(
            parse("id=node7 T=21.4 rssi=-70 fw:1.2.3"),
            Ok(vec![m("temperatura", 21.4, "°C")])
        );
        assert!(malformed(parse("foo=1 bar=2")));
        assert!(malformed(parse(r#"{"x": 1}"#)));
        assert!(malformed(parse("{}")));
    }

    #[test]
    fn configured_keys_extend_and_replace_the_defaults() {
        let mut extra = BTreeMap::new();
        extra.insert(
            "CO2".to_owned(),
            KeySpec {
                tipo: "co2".into(),
                unidad: "ppm".into(),
            },
        );
        extra.insert(
            "p".to_owned(),
            KeySpec {
                tipo: "potencia".into(),
                unidad: "W".into(),
            },
        );
        let mapping = KeyMapping::with_keys(&extra);
        assert_eq!(
            parse_line(b"co2=415 P=60 h=40", &mapping),
            Ok(vec![
                m("co2", 415.0, "ppm"),
                m("potencia", 60.0, "W"),
                m("humedad", 40.0, "%"),
            ])
        );
        assert!(malformed(parse_line(b"co2=415", &KeyMapping::default())));
    }

    #[test]
    fn garbage_is_malformed() {
        for line in [
            "hello world",
            "Booting...",
            "T=",
            "=5",
            "T=abc",
            "T=21.4C",
            "T=21.4 T=22",
            "T=21.4 temp=22",
            "{",
            "[1, 2]",
            "{\"t\": \"21.4\"}",
            "{\"t\": null}",
            "{\"t\": 1, \"temp\": 2}",
        ] {
            assert!(malformed(parse(line)), "{line:?}");
        }
    }

    #[test]
    fn non_finite_numbers_are_malformed() {
        for line in [
            "T=NaN",
            "T=nan",
            "H=inf",
            "H=-infinity",
            "T=1e999",
            r#"{"t": NaN}"#,
        ] {
            assert!(malformed(parse(line)), "{line:?}");
        }
    }

    #[test]
    fn empty_lines_and_invalid_utf8_are_malformed() {
        assert!(malformed(parse("")));
        assert!(malformed(parse("  \r")));
        assert!(malformed(parse_line(
            b"T=21.4 \xff\xfe",
            &KeyMapping::default()
        )));
        assert!(malformed(parse_line(
            b"\x00\x00\x00",
            &KeyMapping::default()
        )));
    }

    #[test]
    fn a_forced_format_refuses_the_other_one() {
        let mapping = KeyMapping::default();
        assert!(malformed(LineFormat::Json.parse(b"T=21.4", &mapping)));
        assert!(malformed(LineFormat::Kv.parse(br#"{"t": 21.4}"#, &mapping)));
        assert_eq!(
            LineFormat::Kv.parse(b"T=21.4", &mapping),
            Ok(vec![m("temperatura", 21.4, "°C")])
        );
        assert_eq!(
            LineFormat::Json.parse(br#" {"t": 21.4}"#, &mapping),
            Ok(vec![m("temperatura", 21.4, "°C")])
        );
    }

    mod proptests {
        use super::*;
        use crate::model::arbitrary::json;
        use proptest::prelude::*;

        /// Every key of the default mapping, in any letter case.
        fn known_key() -> impl Strategy<Value = String> {
            let keys: Vec<&str> = DEFAULT_KEYS
                .iter()
                .flat_map(|(aliases, _)| aliases.iter().copied())
                .collect();
            (prop::sample::select(keys), any::<u64>()).prop_map(|(key, case)| {
                key.chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if case >> (i % 64) & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect()
            })
        }

        /// Number text as firmware prints it, and as broken firmware does.
        fn number_text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<f64>().prop_map(|v| v.to_string()),
                any::<i64>().prop_map(|v| v.to_string()),
                (-100.0f64..2000.0).prop_map(|v| format!("{v:.2}")),
                "[0-9]{300,400}",
                prop::sample::select(vec![
                    "NaN",
                    "nan",
                    "inf",
                    "-inf",
                    "+infinity",
                    "1e999",
                    "-1e999",
                    "1e-999",
                    "0x10",
                    "1_000",
                    "--1",
                    ".",
                    "-",
                    "+",
                    "1e",
                    "",
                ])
                .prop_map(str::to_owned),
            ]
        }

        fn kv_line() -> impl Strategy<Value = String> {
            let key = prop_oneof![6 => known_key(), 2 => "[a-z0-9]{0,6}", 1 => ".{0,4}"];
            let sep = prop_oneof![4 => Just("="), 4 => Just(":"), 1 => Just(""), 1 => Just("==")];
            let pair = (key, sep, number_text()).prop_map(|(k, sep, v)| format!("{k}{sep}{v}"));
            prop::collection::vec(
                (
                    pair,
                    prop::sample::select(vec![" ", ",", ";", "\t", ", ", "  "]),
                ),
                0..6,
            )
            .prop_map(|pairs| pairs.into_iter().map(|(p, s)| p + s).collect())
        }

        fn json_line() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                3 => known_key(),
                2 => prop::sample::select(vec!["tipo", "valor", "unidad", "TIPO", "Valor"])
                    .prop_map(str::to_owned),
                1 => ".{0,4}",
            ];
            let value = prop_oneof![
                3 => number_text(),
                1 => known_key().prop_map(|k| format!("{k:?}")),
                1 => json().prop_map(|v| v.to_string()),
                1 => Just("NaN".to_owned()),
            ];
            prop::collection::vec((key, value), 0..5).prop_map(|pairs| {
                let fields: Vec<String> =
                    pairs.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
                format!("{{{}}}", fields.join(", "))
            })
        }

        fn line() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                2 => kv_line().prop_map(String::into_bytes),
                2 => json_line().prop_map(String::into_bytes),
                1 => json().prop_map(|v| v.to_string().into_bytes()),
                // Deeply nested JSON, past serde_json's recursion limit.
                1 => (1usize..200).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
                1 => (1usize..200).prop_map(|n| format!("{}1{}", "{\"t\":".repeat(n), "}".repeat(n)).into_bytes()),
                2 => prop::collection::vec(any::<u8>(), 0..300),
            ]
        }

        fn format() -> impl Strategy<Value = LineFormat> {
            prop::sample::select(vec![LineFormat::Auto, LineFormat::Json, LineFormat::Kv])
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn parsed_lines_hold_only_finite_values(line in line(), format in format()) {
                let mapping = KeyMapping::default();
                match format.parse(&line, &mapping) {
                    Ok(measurements) => {
                        prop_assert!(!measurements.is_empty());
                        // One per quantity: never more than the mapping knows.
                        prop_assert!(measurements.len() <= DEFAULT_KEYS.len());
                        for (i, m) in measurements.iter().enumerate() {
                            prop_assert!(m.valor.is_finite(), "{:?}", m);
                            prop_assert!(!m.tipo.trim().is_empty(), "{:?}", m);
                            prop_assert!(!m.unidad.trim().is_empty(), "{:?}", m);
                            prop_assert!(m.unidad.len() <= line.len());
                            prop_assert!(measurements[..i].iter().all(|n| n.tipo != m.tipo));
                        }
                    }
                    Err(e) => {
                        prop_assert_eq!(e.kind(), "malformed");
                        prop_assert!(e.to_string().len() <= 200 + 10 * line.len(), "{}", e);
                    }
                }
            }

            #[test]
            fn printed_key_values_read_back(
                values in prop::collection::btree_map(
                    prop::sample::select(vec!["temperatura", "humedad", "presion"]),
                    (-1e6f64..1e6, known_key()),
                    1..=3,
                ),
                sep in prop::sample::select(vec![" ", ",", ";", "\t"]),
                eq in prop::sample::select(vec!["=", ":"]),
            ) {
                let mapping = KeyMapping::default();
                // The key printed must map to the quantity it stands for.
                let printed: Vec<(String, f64, &str)> = values
                    .iter()
                    .map(|(tipo, (valor, _))| (tipo[..1].to_owned(), *valor, *tipo))
                    .collect();
                let text: Vec<String> =
                    printed.iter().map(|(k, v, _)| format!("{k}{eq}{v}")).collect();
                let line = text.join(sep);
                let parsed = parse_line(line.as_bytes(), &mapping).unwrap();
                prop_assert_eq!(parsed.len(), printed.len());
                for ((_, valor, tipo), m) in printed.iter().zip(&parsed) {
                    prop_assert_eq!(&m.tipo, tipo);
                    prop_assert_eq!(m.valor, *valor);
                }
            }
        }
    }
}
