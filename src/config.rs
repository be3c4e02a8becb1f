//! Typed configuration, read from TOML once at start and validated before anything runs.
//!
//! The packaged default (`systemd/config.toml`) is embedded so that
//! `print-default-config` always matches the binary.
//!
//! Each part owns the settings type of its section (`store::StorageConfig`,
//! `api::settings::ServerConfig`, `uplink::UplinkConfig`, ...); this module composes them,
//! fills in defaults and reports what is wrong with the line it is on. No part reads it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::settings::{LimitsConfig, RealtimeConfig, ServerConfig};
use crate::auth::{AuthConfig, Policy};
use crate::model::calibration::unknown_tipos;
use crate::model::{
    forbidden_char, forbidden_char_message, forbidden_in_json, MAX_INTERVAL_S, MAX_TEXT,
    MIN_INTERVAL_S,
};
use crate::model::{Calibration, Derived};
use crate::sensors::{SamplingConfig, SourceSpec};
use crate::store::StorageConfig;
use crate::uplink::UplinkConfig;

/// The documented default configuration, as installed in `/etc/sensorgate/config.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../systemd/config.toml");

/// The configuration `--demo` runs: simulated sensors, development mode, loopback only.
pub const DEMO_CONFIG: &str = include_str!("demo.toml");

/// Largest `storage.max_future_s`: a week.
const MAX_FUTURE_S: u64 = 7 * 24 * 3600;

/// Everything the daemon can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub realtime: RealtimeConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub uplink: UplinkConfig,
    #[serde(default, rename = "sensor")]
    pub sensors: Vec<SensorConfig>,
    /// Alert rules (`[[alert]]`). A bad one is reported with its line and left out: it
    /// never keeps the daemon from starting (see [`Config::alert_problems`]).
    #[serde(default, rename = "alert")]
    pub alerts: crate::alerts::ConfiguredRules,
}

/// One sensor this gateway samples.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    /// Stable name; the sensor record is found by it across restarts.
    pub name: String,
    pub tipo: String,
    pub modelo: String,
    #[serde(default)]
    pub ubicacion: Option<String>,
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    pub source: SourceSpec,
    /// Corrections per `tipo` (`{ temperatura = { offset = -0.8 } }`), as the sensor's
    /// `calibracion` takes them. Absent: a calibration set over REST stays.
    #[serde(default)]
    pub calibration: Option<serde_json::Value>,
    /// Values derived from each sample (`["punto_rocio", "vpd", "humedad_absoluta"]`).
    /// Absent: the ones set over REST stay.
    #[serde(default)]
    pub derive: Option<Vec<Derived>>,
}

impl SensorConfig {
    /// The calibration the file sets, once [`Config::validate`] passed.
    pub fn calibracion(&self) -> Option<Calibration> {
        self.calibration
            .as_ref()
            .map(|v| Calibration::from_json(v, "calibration").unwrap_or_default())
    }

    /// The derived values the file sets, in their stored order.
    pub fn derivados(&self) -> Option<Vec<Derived>> {
        self.derive.as_ref().map(|list| {
            let mut list = list.clone();
            list.sort();
            list.dedup();
            list
        })
    }
}

fn default_interval() -> f64 {
    2.0
}

/// A configuration that could not be loaded, with enough context to fix it.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    Parse {
        path: PathBuf,
        message: String,
    },
    /// Every problem found, each with its line where it could be found.
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => write!(f, "{}: {error}", path.display()),
            ConfigError::Parse { path, message } => write!(f, "{}: {message}", path.display()),
            // One line per problem, each naming the file, as compilers do.
            ConfigError::Invalid { path, problems } => {
                let lines: Vec<String> = problems
                    .iter()
                    .map(|p| format!("{}: {p}", path.display()))
                    .collect();
                f.write_str(&lines.join("\n"))
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config
            .alerts
            .locate(|index, key| table_line(text, "[[alert]]", index, Some(key)));
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                problems: problems.iter().map(|p| locate(text, p)).collect(),
            });
        }
        Ok(config)
    }

    /// What is wrong with the alert rules that were left out, one line each, naming the
    /// file and the line: `check-config` fails on them, the daemon logs them and runs.
    pub fn alert_problems(&self, origin: &Path) -> Vec<String> {
        self.alerts
            .problems()
            .iter()
            .map(|p| format!("{}: {p}", origin.display()))
            .collect()
    }

    /// Every problem of the config, in file order as far as it can tell.
    fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.server.max_connections == 0 {
            problems.push(Problem::key("server.max_connections", "must be at least 1"));
        }
        if self.server.max_body_bytes < 1024 {
            problems.push(Problem::key(
                "server.max_body_bytes",
                "must be at least 1024",
            ));
        }
        for entry in &self.server.trusted_proxies {
            if let Err(message) = crate::auth::proxy::AddressRange::parse(entry) {
                problems.push(Problem::key("server.trusted_proxies", &message));
            }
        }
        for entry in &self.auth.allowed_hosts {
            if !crate::auth::host::valid_entry(entry) {
                problems.push(Problem::key(
                    "auth.allowed_hosts",
                    &format!(
                        "{entry:?} is not a host name or address (no scheme or port), or \"*\""
                    ),
                ));
            }
        }
        if self.server.body_read_timeout_s == 0 {
            problems.push(Problem::key(
                "server.body_read_timeout_s",
                "must be at least 1",
            ));
        }
        if self.storage.maintenance_interval_s == 0 {
            problems.push(Problem::key(
                "storage.maintenance_interval_s",
                "must be at least 1",
            ));
        }
        for rule in &self.storage.retention {
            if rule.tipo.is_some() == rule.sensor.is_some() || rule.days == 0 {
                problems.push(Problem::key(
                    "storage.retention",
                    "each rule names either a tipo or a sensor, and days of at least 1",
                ));
            }
        }
        if !(1..=MAX_FUTURE_S).contains(&self.storage.max_future_s) {
            problems.push(Problem::key(
                "storage.max_future_s",
                &format!("must be between 1 and {MAX_FUTURE_S} seconds (a week)"),
            ));
        }
        if self.storage.max_events == 0 {
            problems.push(Problem::key("storage.max_events", "must be at least 1"));
        }
        if self.storage.commit_window_ms > 60_000 {
            problems.push(Problem::key(
                "storage.commit_window_ms",
                "must be at most 60000 (a minute)",
            ));
        }
        if self.storage.max_commit_window_ms > 600_000 {
            problems.push(Problem::key(
                "storage.max_commit_window_ms",
                "must be at most 600000 (ten minutes)",
            ));
        }
        if self.storage.min_free_percent > 90 {
            problems.push(Problem::key(
                "storage.min_free_percent",
                "must be at most 90",
            ));
        }
        if self.realtime.client_queue < 16 {
            problems.push(Problem::key("realtime.client_queue", "must be at least 16"));
        }
        if self.realtime.ping_interval_s == 0 {
            problems.push(Problem::key(
                "realtime.ping_interval_s",
                "must be at least 1",
            ));
        }
        if self.auth.policy == Policy::None && !self.server.dev {
            problems.push(Problem::key(
                "auth.policy",
                "\"none\" is only allowed with server.dev = true (or --dev)",
            ));
        }
        let limits = &self.limits;
        if limits.max_connections_per_address == 0
            || limits.max_uri_bytes < 256
            || limits.max_headers < 8
        {
            problems.push(Problem::key(
                "limits",
                "max_connections_per_address must be at least 1, max_uri_bytes at least 256, max_headers at least 8",
            ));
        }
        for (key, value) in [
            ("limits.writes_per_second", limits.writes_per_second),
            ("limits.write_burst", limits.write_burst),
            (
                "limits.socket_messages_per_second",
                limits.socket_messages_per_second,
            ),
            ("limits.socket_message_burst", limits.socket_message_burst),
        ] {
            if !(value.is_finite() && value > 0.0) {
                problems.push(Problem::key(key, "must be a number above 0"));
            }
        }
        if self.sampling.offline_after_intervals == 0 {
            problems.push(Problem::key(
                "sampling.offline_after_intervals",
                "must be at least 1",
            ));
        }
        self.validate_uplink(&mut problems);
        let mut names = std::collections::HashSet::new();
        for (index, sensor) in self.sensors.iter().enumerate() {
            let at = |key: &str, message: &str| Problem {
                anchor: Some(key.to_owned()),
                sensor: Some(index),
                text: if sensor.name.trim().is_empty() {
                    format!("sensor {}: {key} {message}", index + 1)
                } else {
                    format!("sensor \"{}\": {key} {message}", sensor.name)
                },
            };
            if sensor.name.trim().is_empty() {
                problems.push(at("name", "must not be empty"));
            }
            for (key, text) in [
                ("name", Some(&sensor.name)),
                ("tipo", Some(&sensor.tipo)),
                ("modelo", Some(&sensor.modelo)),
                ("ubicacion", sensor.ubicacion.as_ref()),
            ] {
                if text.is_some_and(|t| t.chars().count() > MAX_TEXT) {
                    problems.push(at(key, &format!("must be at most {MAX_TEXT} characters")));
                }
                if let Some(c) = text.and_then(|t| forbidden_char(t)) {
                    problems.push(at(key, &forbidden_char_message(c)));
                }
            }
            let source = serde_json::to_value(&sensor.source).unwrap_or_default();
            if let Some(c) = forbidden_in_json(&source) {
                problems.push(at("source", &forbidden_char_message(c)));
            }
            if !names.insert(sensor.name.as_str()) {
                problems.push(at("name", "is used twice"));
            }
            if sensor.tipo.trim().is_empty() {
                problems.push(at("tipo", "must not be empty"));
            }
            if sensor.modelo.trim().is_empty() {
                problems.push(at("modelo", "must not be empty"));
            }
            if !(MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&sensor.interval_s) {
                problems.push(at("interval_s", "must be between 0.05 and 86400 seconds"));
            }
            if let Some(calibration) = &sensor.calibration {
                // Every problem at once: unknown tipos besides bad corrections.
                let mut errors = Calibration::from_json(calibration, "calibration")
                    .err()
                    .unwrap_or_default();
                if let Some(tipos) = calibration.as_object() {
                    errors.extend(unknown_tipos(
                        tipos.keys().map(String::as_str),
                        &sensor.tipo,
                        Some(&source),
                        "calibration",
                    ));
                }
                errors.sort_by(|a, b| a.field.cmp(&b.field));
                for e in errors {
                    // Found by the `calibration` key; named by the exact entry.
                    let whole = at(&e.field, &e.message);
                    problems.push(Problem {
                        anchor: Some("calibration".to_owned()),
                        ..whole
                    });
                }
            }
        }
        let modbus = self.sensors.iter().filter_map(|s| match &s.source {
            SourceSpec::Modbus(config) => Some((s.name.as_str(), config)),
            _ => None,
        });
        if let Err((name, why)) = crate::sensors::modbus::check_shared_buses(modbus) {
            problems.push(Problem {
                anchor: Some("source".to_owned()),
                sensor: self.sensors.iter().position(|s| s.name == name),
                text: format!("sensor \"{name}\": source {why}"),
            });
        }
        problems
    }
}

impl Config {
    fn validate_uplink(&self, problems: &mut Vec<Problem>) {
        let uplink = &self.uplink;
        let Some(broker) = &uplink.broker else {
            return;
        };
        if let Err(message) = crate::uplink::BrokerAddress::parse(broker, uplink.tls) {
            problems.push(Problem::key("uplink.broker", &message));
        }
        if let Some(gateway) = &uplink.gateway {
            if !crate::uplink::is_topic_name(gateway) {
                problems.push(Problem::key(
                    "uplink.gateway",
                    "must be letters, digits, '-' or '_' (it is a topic level)",
                ));
            }
        }
        for (key, value) in [
            ("uplink.topic_prefix", &uplink.topic_prefix),
            ("uplink.discovery_prefix", &uplink.discovery_prefix),
        ] {
            if value.is_empty()
                || value.contains(['+', '#'])
                || value.starts_with('/')
                || value.ends_with('/')
            {
                problems.push(Problem::key(
                    key,
                    "must be a topic without wildcards or a leading or trailing '/'",
                ));
            }
        }
        if uplink.password.is_some() && uplink.username.is_none() {
            problems.push(Problem::key("uplink.password", "needs uplink.username"));
        }
        if uplink.replay_per_second == 0 {
            problems.push(Problem::key(
                "uplink.replay_per_second",
                "must be at least 1",
            ));
        }
        if !(5..=3600).contains(&uplink.keep_alive_s) {
            problems.push(Problem::key(
                "uplink.keep_alive_s",
                "must be between 5 and 3600 seconds",
            ));
        }
        if let Some(ca) = &uplink.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                problems.push(Problem::key(
                    "uplink.ca_file",
                    &format!("cannot be read ({}): {e}", ca.display()),
                ));
            }
        }
    }
}

/// A validation problem and what to look for to find its line.
struct Problem {
    /// Text on its line; for a sensor, the key set on it.
    anchor: Option<String>,
    /// The sensor it is about, by position: its line is looked for in that `[[sensor]]`.
    sensor: Option<usize>,
    text: String,
}

impl Problem {
    fn key(key: &str, message: &str) -> Problem {
        let last = key.rsplit('.').next().unwrap_or(key);
        Problem {
            anchor: Some(format!("{last} ")),
            sensor: None,
            text: format!("{key} {message}"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Prefixes a validation message with the line of the file it is about, when the key or
/// sensor can be found there.
fn locate(text: &str, problem: &Problem) -> String {
    let line = match (problem.sensor, problem.anchor.as_deref()) {
        (Some(index), key) => table_line(text, "[[sensor]]", index, key),
        (None, anchor) => anchor.and_then(|anchor| {
            text.lines()
                .position(|l| !l.trim_start().starts_with('#') && l.contains(anchor))
        }),
    };
    match line {
        Some(n) => format!("line {}: {}", n + 1, problem.text),
        None => problem.text.clone(),
    }
}

/// The line, counted from 0, that sets `key` in the `index`th table under `header` (such
/// as `[[sensor]]`), or else that table's header.
pub(crate) fn table_line(
    text: &str,
    header: &str,
    index: usize,
    key: Option<&str>,
) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == header)
        .nth(index)?
        .0;
    let sets_key = |line: &str| {
        key.and_then(|key| line.trim_start().strip_prefix(key))
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    };
    let found = lines[header + 1..]
        .iter()
        .take_while(|l| !l.trim_start().starts_with('['))
        .position(|l| sets_key(l));
    Some(found.map_or(header, |n| header + 1 + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_rule_is_named_by_line_and_the_good_ones_stay() {
        let text = "\
[[alert]]
name = \"ok\"
sensor = \"s\"
tipo = \"t\"
condition = \"above\"
threshold = 3

[[alert]]
name = \"bad\"
sensor = \"s\"
tipo = \"t\"
condition = \"below\"
threshold = \"cold\"
";
        #[derive(Deserialize)]
        struct File {
            alert: crate::alerts::ConfiguredRules,
        }
        let mut file: File = toml::from_str(text).unwrap();
        file.alert
            .locate(|index, key| table_line(text, "[[alert]]", index, Some(key)));
        assert_eq!(file.alert.rules.len(), 1);
        assert_eq!(
            file.alert.problems(),
            ["line 13: alert 2: threshold must be a number"]
        );
    }

    #[test]
    fn embedded_configs_are_valid() {
        let default = Config::parse(DEFAULT_CONFIG, Path::new("default")).unwrap();
        assert_eq!(default.server.listen.port(), 8000);
        assert!(!default.server.dev);
        let demo = Config::parse(DEMO_CONFIG, Path::new("demo")).unwrap();
        assert!(demo.server.dev);
        assert!(!demo.sensors.is_empty());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\nport = 5\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn invalid_value_names_line() {
        let text = "[server]\nmax_connections = 0\n";
        let err = Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "x.toml: line 2: server.max_connections must be at least 1"
        );
    }

    #[test]
    fn uplink_is_off_by_default_and_checked_when_on() {
        let default = Config::parse(DEFAULT_CONFIG, Path::new("default")).unwrap();
        assert_eq!(default.uplink.broker, None);
        let on = Config::parse(
            "[uplink]\nbroker = \"mqtt://broker.lan\"\ngateway = \"gw-1\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(on.uplink.broker.as_deref(), Some("mqtt://broker.lan"));
        assert!(on.uplink.discovery);
        let err = Config::parse(
            "[uplink]\nbroker = \"mqtt://broker.lan\"\ngateway = \"a/b\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("x.toml: line 3: uplink.gateway"), "{err}");
        let err = Config::parse(
            "[uplink]\nbroker = \"http://broker.lan\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("x.toml: line 2: uplink.broker"), "{err}");
    }

    #[test]
    fn calibration_and_derived_values_are_read_and_checked() {
        let sensor = |extra: &str| {
            format!(
                "[[sensor]]\nname = \"aula\"\ntipo = \"temperatura\"\nmodelo = \"DHT22\"\nsource = {{ kind = \"sim\" }}\n{extra}"
            )
        };
        let good = sensor(
            "calibration = { temperatura = { offset = -0.8 }, humedad = { points = [[30, 32], [80, 81]] } }\n\
             derive = [\"vpd\", \"punto_rocio\", \"vpd\"]\n",
        );
        let config = Config::parse(&good, Path::new("x.toml")).unwrap();
        let sensor_config = &config.sensors[0];
        let calibration = sensor_config.calibracion().unwrap();
        assert_eq!(calibration.get("temperatura").unwrap().offset, -0.8);
        assert_eq!(
            sensor_config.derivados().unwrap(),
            [Derived::PuntoRocio, Derived::Vpd]
        );
        for (extra, expected) in [
            (
                "calibration = { temperatura = { scale = 0 } }\n",
                "x.toml: line 6: sensor \"aula\": calibration.temperatura.scale must not be 0",
            ),
            (
                "derive = [\"vpd\"]\ncalibration = { co2 = { offset = 1 } }\n",
                "x.toml: line 7: sensor \"aula\": calibration.co2 unknown tipo",
            ),
        ] {
            let err = Config::parse(&sensor(extra), Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{err}");
        }
        let err = Config::parse(&sensor("derive = [\"rocio\"]\n"), Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 6") && err.contains("punto_rocio"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_sensor_names_are_refused() {
        let text = r#"
[[sensor]]
name = "a"
tipo = "temperatura"
modelo = "DHT22"
source = { kind = "sim" }
[[sensor]]
name = "a"
tipo = "temperatura"
modelo = "DHT22"
source = { kind = "sim" }
"#;
        let err = Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
    }

    #[test]
    fn modbus_maps_and_shared_ports_are_checked() {
        let sensor = |name: &str, source: &str| {
            format!(
                "[[sensor]]\nname = \"{name}\"\ntipo = \"t\"\nmodelo = \"m\"\nsource = {{ kind = \"modbus\", {source} }}\n"
            )
        };
        let aire = sensor(
            "aire",
            "port = \"/dev/ttyUSB0\", unit = 1, preset = \"xy-md02\"",
        );
        let medidor = sensor(
            "medidor",
            "port = \"/dev/ttyUSB0\", unit = 2, preset = \"sdm120\"",
        );
        assert!(Config::parse(&format!("{aire}{medidor}"), Path::new("x.toml")).is_ok());
        let lento = sensor(
            "lento",
            "port = \"/dev/ttyUSB0\", baud = 2400, unit = 3, preset = \"sdm120\"",
        );
        let err = Config::parse(&format!("{aire}{lento}"), Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x.toml: line 10: sensor \"lento\": source uses /dev/ttyUSB0"),
            "{err}"
        );
        let err = Config::parse(
            &sensor("mal", "port = \"/dev/ttyUSB0\", preset = \"sdm630\""),
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 5") && err.contains("unknown preset"),
            "{err}"
        );
    }

    #[test]
    fn sensor_texts_are_as_long_as_over_rest_at_most() {
        let sensor = |modelo: &str| {
            format!(
                "[[sensor]]\nname = \"a\"\ntipo = \"t\"\nmodelo = \"{modelo}\"\nsource = {{ kind = \"sim\" }}\n"
            )
        };
        let longest = "m".repeat(MAX_TEXT);
        assert!(Config::parse(&sensor(&longest), Path::new("x.toml")).is_ok());
        let err = Config::parse(&sensor(&format!("{longest}m")), Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("modelo must be at most 128 characters"),
            "{err}"
        );
        assert!(err.contains("x.toml: line 4"), "the modelo line: {err}");
    }

    #[test]
    fn security_keys_are_checked_with_their_line() {
        for (text, expected) in [
            (
                "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"proxy.lan\"]\n",
                "x.toml: line 2: server.trusted_proxies \"proxy.lan\" is not an address",
            ),
            (
                "[server]\ntrusted_proxies = [\"10.0.0.0/40\"]\n",
                "x.toml: line 2: server.trusted_proxies \"10.0.0.0/40\": the prefix must be 0 to 32",
            ),
            (
                "[auth]\nallowed_hosts = [\"http://pi.local:8000\"]\n",
                "x.toml: line 2: auth.allowed_hosts \"http://pi.local:8000\" is not a host name",
            ),
            (
                "[storage]\nmax_future_s = 0\n",
                "x.toml: line 2: storage.max_future_s must be between 1 and 604800",
            ),
        ] {
            let err = Config::parse(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{err}");
        }
        let good = Config::parse(
            "[server]\ntrusted_proxies = [\"127.0.0.1\", \"fd00::/8\"]\n[auth]\nallowed_hosts = [\"sensors.farm.example\", \"192.0.2.7\"]\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(good.server.trusted_proxies.len(), 2);
        assert_eq!(good.storage.max_future_s, 300);
    }

    #[test]
    fn sensor_texts_refuse_control_characters() {
        let text = "[[sensor]]\nname = \"a\"\ntipo = \"t\"\nmodelo = \"m\"\nubicacion = \"shed\\u202E\"\nsource = { kind = \"sim\" }\n";
        let err = Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ubicacion must not contain control"), "{err}");
        assert!(err.contains("U+202E"), "{err}");
        let text = "[[sensor]]\nname = \"a\"\ntipo = \"t\"\nmodelo = \"m\"\nsource = { kind = \"serial\", path = \"/dev/ttyUSB0\", keys = { co2 = { tipo = \"co2\", unidad = \"ppm\\r\\n\" } } }\n";
        let err = Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("source must not contain control"), "{err}");
    }
}
