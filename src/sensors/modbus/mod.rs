//! Modbus devices: RTU on an RS-485 line (a USB adapter or a HAT) and Modbus TCP (meters
//! and Ethernet gateways).
//!
//! - [`registers`]: register maps, decoding and request merging, pure.
//! - [`presets`]: the register maps of common devices.
//! - [`bus`]: one owner thread per port or connection, serialising the requests of every
//!   sensor on it.
//! - [`scan`]: which unit ids answer on a line, for installers.
//! - [`ModbusSource`]: one sensor (one unit id and its values), as the scheduler sees it.
//!
//! The framing (CRC, MBAP headers, exception responses) is tokio-modbus's.

pub mod bus;
pub mod presets;
pub mod registers;
pub mod scan;

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::source::{Measurement, Pacing, SensorError, Source};
use registers::{Field, Merging, Request};

pub use bus::{loads, BusLoad};

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit() -> u8 {
    1
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_retries() -> u8 {
    1
}
fn default_max_registers() -> u16 {
    registers::MAX_REGISTERS_PER_REQUEST
}

/// A `modbus` source as written in a config file or a sensor's `fuente`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSpec {
    /// Serial port of an RTU bus; prefer `/dev/serial/by-id/...`. Either this or `tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// `host:port` of a Modbus TCP device or gateway. Either this or `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Unit (slave) id of the device.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// A register map by name (`xy-md02`, `soil-th`, `sdm120`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Values to read, besides the preset's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registers: Vec<Field>,
    /// How long to wait for each answer.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Further tries of a request that timed out or came back garbled.
    #[serde(default = "default_retries")]
    pub retries: u8,
    /// Quiet time after opening the port or connecting (slow devices, TCP gateways).
    #[serde(default)]
    pub pause_after_connect_ms: u64,
    /// Quiet time before every request, when longer than the line's inter-frame gap.
    #[serde(default)]
    pub pause_between_requests_ms: u64,
    /// Unused registers a request may span to fetch two values at once; 0 merges only
    /// contiguous values (safe with devices that refuse unimplemented addresses).
    #[serde(default)]
    pub merge_gap: u16,
    /// Largest request in registers the device accepts (the protocol allows 125).
    #[serde(default = "default_max_registers")]
    pub max_registers: u16,
}

/// The physical line of a bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Line {
    Serial {
        path: String,
        baud: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
    },
    Tcp {
        address: String,
    },
}

/// What every sensor on one bus must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Link {
    pub line: Line,
    pub pause_after_connect: Duration,
}

impl Link {
    /// The bus's name in logs and metrics: the port path, or `tcp://host:port`.
    pub fn name(&self) -> String {
        match &self.line {
            Line::Serial { path, .. } => path.clone(),
            Line::Tcp { address } => format!("tcp://{address}"),
        }
    }

    /// The settings, for a message about a conflict.
    pub fn describe(&self) -> String {
        let pause = self.pause_after_connect.as_millis();
        match &self.line {
            Line::Serial {
                baud,
                parity,
                data_bits,
                stop_bits,
                ..
            } => format!(
                "{baud} baud, {data_bits}{}{stop_bits}, pause_after_connect_ms {pause}",
                match parity {
                    Parity::None => 'N',
                    Parity::Even => 'E',
                    Parity::Odd => 'O',
                }
            ),
            Line::Tcp { .. } => format!("pause_after_connect_ms {pause}"),
        }
    }

    /// The silence that separates two RTU frames: 3.5 character times, and 1.75 ms above
    /// 19200 baud (Modbus over serial line v1.02, 2.5.1.1). None over TCP.
    pub fn inter_frame_gap(&self) -> Duration {
        match &self.line {
            Line::Serial {
                baud,
                parity,
                data_bits,
                stop_bits,
                ..
            } => {
                if *baud > 19_200 {
                    return Duration::from_micros(1750);
                }
                let bits = 1
                    + u32::from(*data_bits)
                    + u32::from(*parity != Parity::None)
                    + u32::from(*stop_bits);
                Duration::from_secs_f64(3.5 * f64::from(bits) / f64::from(*baud))
            }
            Line::Tcp { .. } => Duration::ZERO,
        }
    }
}

/// A checked `modbus` source: the spec as written, the register map it resolves to and
/// the requests that fetch it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "ModbusSpec", into = "ModbusSpec")]
pub struct ModbusConfig {
    spec: ModbusSpec,
    link: Link,
    fields: Vec<Field>,
    requests: Vec<Request>,
}

impl From<ModbusConfig> for ModbusSpec {
    fn from(config: ModbusConfig) -> ModbusSpec {
        config.spec
    }
}

/// Highest timeout and pauses accepted: longer would hold every other device of the bus.
const MAX_WAIT_MS: u64 = 10_000;
const MAX_RETRIES: u8 = 5;

impl TryFrom<ModbusSpec> for ModbusConfig {
    type Error = String;

    fn try_from(spec: ModbusSpec) -> Result<ModbusConfig, String> {
        let line = match (&spec.port, &spec.tcp) {
            (Some(path), None) => {
                if path.trim().is_empty() {
                    return Err("port must not be empty".into());
                }
                if !(300..=4_000_000).contains(&spec.baud) {
                    return Err("baud must be between 300 and 4000000".into());
                }
                if !(7..=8).contains(&spec.data_bits) {
                    return Err("data_bits must be 7 or 8".into());
                }
                if !(1..=2).contains(&spec.stop_bits) {
                    return Err("stop_bits must be 1 or 2".into());
                }
                if !(1..=247).contains(&spec.unit) {
                    return Err("unit must be between 1 and 247 on a serial line".into());
                }
                Line::Serial {
                    path: path.clone(),
                    baud: spec.baud,
                    parity: spec.parity,
                    data_bits: spec.data_bits,
                    stop_bits: spec.stop_bits,
                }
            }
            (None, Some(address)) => {
                let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !valid {
                    return Err(format!("tcp must be host:port, not {address:?}"));
                }
                Line::Tcp {
                    address: address.clone(),
                }
            }
            _ => return Err("give either port (RTU) or tcp (host:port), not both".into()),
        };
        for (key, ms) in [
            ("timeout_ms", spec.timeout_ms),
            ("pause_after_connect_ms", spec.pause_after_connect_ms),
            ("pause_between_requests_ms", spec.pause_between_requests_ms),
        ] {
            if ms > MAX_WAIT_MS {
                return Err(format!("{key} must be at most {MAX_WAIT_MS}"));
            }
        }
        if spec.timeout_ms < 10 {
            return Err("timeout_ms must be at least 10".into());
        }
        if spec.retries > MAX_RETRIES {
            return Err(format!("retries must be at most {MAX_RETRIES}"));
        }
        if !(1..=registers::MAX_REGISTERS_PER_REQUEST).contains(&spec.max_registers) {
            return Err("max_registers must be between 1 and 125".into());
        }
        if spec.merge_gap > registers::MAX_REGISTERS_PER_REQUEST {
            return Err("merge_gap must be at most 125".into());
        }
        let mut fields = match &spec.preset {
            Some(name) => presets::find(name)
                .ok_or_else(|| format!("unknown preset {name:?}; known: {}", presets::names()))?
                .fields(),
            None => Vec::new(),
        };
        fields.extend(spec.registers.iter().cloned());
        if fields.is_empty() {
            return Err("give a preset or at least one entry in registers".into());
        }
        for (i, field) in fields.iter().enumerate() {
            field.validate()?;
            if !field.function.is_bits() && field.width() > spec.max_registers {
                return Err(format!(
                    "{} needs {} registers, more than max_registers {}",
                    field.tipo,
                    field.width(),
                    spec.max_registers
                ));
            }
            if fields[..i].iter().any(|f| f.tipo == field.tipo) {
                return Err(format!("tipo {:?} is read twice", field.tipo));
            }
        }
        let requests = registers::plan(
            &fields,
            Merging {
                max_gap: spec.merge_gap,
                max_registers: spec.max_registers,
            },
        );
        Ok(ModbusConfig {
            link: Link {
                line,
                pause_after_connect: Duration::from_millis(spec.pause_after_connect_ms),
            },
            spec,
            fields,
            requests,
        })
    }
}

/// Checks that sensors naming the same port agree on its settings (one port has one
/// speed); on a conflict, the name of the second sensor and what is wrong.
pub fn check_shared_buses<'a>(
    sensors: impl IntoIterator<Item = (&'a str, &'a ModbusConfig)>,
) -> Result<(), (String, String)> {
    let mut seen: Vec<(&str, &Link)> = Vec::new();
    for (name, config) in sensors {
        let bus = config.link.name();
        if let Some((first, link)) = seen.iter().find(|(_, l)| l.name() == bus) {
            if **link != config.link {
                return Err((
                    name.to_owned(),
                    format!(
                        "uses {bus} with {}, but sensor \"{first}\" with {}: every sensor on a bus needs the same settings",
                        config.link.describe(),
                        link.describe()
                    ),
                ));
            }
        } else {
            seen.push((name, &config.link));
        }
    }
    Ok(())
}

impl ModbusConfig {
    /// The values read at every sampling.
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// The requests one sampling sends.
    pub fn requests(&self) -> &[Request] {
        &self.requests
    }
}

/// Longest a `read` waits for its bus before handing back to the scheduler; the answer
/// is picked up by the next read.
const READ_WAIT: Duration = Duration::from_millis(1500);

/// One device on a bus, as the scheduler sees it. Its bus is shared with every other
/// sensor naming the same port.
pub struct ModbusSource {
    config: ModbusConfig,
    interval: Duration,
    bus: Result<Arc<bus::BusHandle>, String>,
    /// The job handed to the bus and not answered yet: at most one per sensor, so a slow
    /// bus delays a sensor's samples instead of queueing them without bound.
    pending: Option<Receiver<Result<Vec<registers::Answer>, SensorError>>>,
    loss_reported: bool,
}

impl ModbusSource {
    /// A source for `config`, joining (or starting) the bus of its port.
    pub fn new(config: &ModbusConfig, interval: Duration) -> ModbusSource {
        ModbusSource {
            bus: bus::bus_for(&config.link),
            config: config.clone(),
            interval,
            pending: None,
            loss_reported: false,
        }
    }

    fn outcome(
        &mut self,
        outcome: Result<Vec<registers::Answer>, SensorError>,
    ) -> Result<Option<Vec<Measurement>>, SensorError> {
        match outcome {
            Err(SensorError::PortLost(_)) if self.loss_reported => Ok(None),
            Err(lost @ SensorError::PortLost(_)) => {
                self.loss_reported = true;
                Err(lost)
            }
            Err(e) => {
                self.loss_reported = false;
                Err(e)
            }
            Ok(answers) => {
                self.loss_reported = false;
                let decoded = registers::decode(&self.config.fields, &answers)
                    .map_err(|short| SensorError::Malformed(short.0))?;
                // One implausible value makes the whole sampling suspect (a device that
                // answers nonsense in one register rarely gets the next one right).
                decoded
                    .into_iter()
                    .collect::<Result<Vec<_>, String>>()
                    .map(Some)
                    .map_err(SensorError::Implausible)
            }
        }
    }
}

impl Source for ModbusSource {
    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError> {
        let bus = match &self.bus {
            Ok(bus) => bus.clone(),
            Err(why) => {
                // A conflict with another sensor's settings: say so at the read pace.
                std::thread::sleep(READ_WAIT.min(self.interval));
                return Err(SensorError::Io(why.clone()));
            }
        };
        let pending = match self.pending.take() {
            Some(pending) => pending,
            None => {
                let (reply, answer) = mpsc::sync_channel(1);
                bus.submit(bus::Job {
                    unit: self.config.spec.unit,
                    requests: self.config.requests.clone(),
                    timeout: Duration::from_millis(self.config.spec.timeout_ms),
                    retries: self.config.spec.retries,
                    pause_between: Duration::from_millis(
                        self.config.spec.pause_between_requests_ms,
                    ),
                    reply,
                })?;
                answer
            }
        };
        match pending.recv_timeout(READ_WAIT) {
            Ok(outcome) => self.outcome(outcome),
            Err(RecvTimeoutError::Timeout) => {
                self.pending = Some(pending);
                Ok(None)
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(SensorError::Io("the modbus bus thread ended".into()))
            }
        }
    }

    fn pacing(&self) -> Pacing {
        Pacing::Every(self.interval)
    }

    fn is_connected(&self) -> bool {
        self.bus.as_ref().is_ok_and(|bus| bus.connected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModbusConfig, String> {
        toml::from_str::<ModbusConfig>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_preset_on_a_serial_line() {
        let config = parse("port = \"/dev/ttyUSB0\"\nunit = 3\npreset = \"xy-md02\"").unwrap();
        assert_eq!(config.fields().len(), 2);
        assert_eq!(config.requests().len(), 1);
        assert_eq!(config.link.name(), "/dev/ttyUSB0");
        // 3.5 characters of 10 bits at 9600 baud.
        let gap = config.link.inter_frame_gap().as_secs_f64();
        assert!((gap - 0.003_645).abs() < 1e-5, "{gap}");
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(
            serde_json::from_value::<ModbusConfig>(json).unwrap(),
            config
        );
    }

    #[test]
    fn a_custom_map_over_tcp() {
        let config = parse(
            r#"tcp = "192.168.1.50:502"
unit = 0
merge_gap = 10
registers = [
  { tipo = "co2", unidad = "ppm", function = "holding", address = 5 },
  { tipo = "caudal", unidad = "l/min", function = "input", address = 10, type = "f32", order = "CDAB", scale = 60.0 },
  { tipo = "bomba", unidad = "on", function = "coil", address = 0 },
]"#,
        )
        .unwrap();
        assert_eq!(config.requests().len(), 3);
        assert_eq!(config.link.inter_frame_gap(), Duration::ZERO);
    }

    #[test]
    fn what_check_config_refuses() {
        for (text, expected) in [
            ("preset = \"xy-md02\"", "either port"),
            ("port = \"/dev/x\"\ntcp = \"a:1\"\npreset = \"xy-md02\"", "either port"),
            ("tcp = \"gateway\"\npreset = \"xy-md02\"", "host:port"),
            ("port = \"/dev/x\"\npreset = \"sdm630\"", "unknown preset"),
            ("port = \"/dev/x\"", "at least one entry"),
            ("port = \"/dev/x\"\nunit = 0\npreset = \"xy-md02\"", "unit"),
            ("port = \"/dev/x\"\nretries = 9\npreset = \"xy-md02\"", "retries"),
            ("port = \"/dev/x\"\ntimeout_ms = 60000\npreset = \"xy-md02\"", "timeout_ms"),
            ("port = \"/dev/x\"\nmax_registers = 200\npreset = \"xy-md02\"", "max_registers"),
            ("port = \"/dev/x\"\nmax_registers = 1\npreset = \"sdm120\"", "more than max_registers"),
            ("port = \"/dev/x\"\nbaud = 0\npreset = \"xy-md02\"", "baud"),
            ("port = \"/dev/x\"\nparity = \"mark\"\npreset = \"xy-md02\"", "parity"),
            (
                "port = \"/dev/x\"\npreset = \"xy-md02\"\nregisters = [{ tipo = \"humedad\", unidad = \"%\", function = \"input\", address = 9 }]",
                "read twice",
            ),
            (
                "port = \"/dev/x\"\nregisters = [{ tipo = \"t\", unidad = \"C\", function = \"input\", address = 1, type = \"f16\" }]",
                "f16",
            ),
            (
                "port = \"/dev/x\"\nregisters = [{ tipo = \"t\", unidad = \"C\", function = \"input\", address = 1, order = \"ABDC\" }]",
                "ABDC",
            ),
            (
                "port = \"/dev/x\"\nregisters = [{ tipo = \"t\", unidad = \"C\", function = \"input\", address = 65535, type = \"u32\" }]",
                "65535",
            ),
            ("port = \"/dev/x\"\nbogus = 1\npreset = \"xy-md02\"", "bogus"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn sensors_on_one_port_share_its_settings() {
        let a = parse("port = \"/dev/ttyUSB0\"\nunit = 1\npreset = \"xy-md02\"").unwrap();
        let b = parse("port = \"/dev/ttyUSB0\"\nunit = 2\npreset = \"sdm120\"").unwrap();
        let slow =
            parse("port = \"/dev/ttyUSB0\"\nbaud = 2400\nunit = 3\npreset = \"sdm120\"").unwrap();
        let other = parse("port = \"/dev/ttyUSB1\"\nbaud = 2400\npreset = \"sdm120\"").unwrap();
        assert!(check_shared_buses([("a", &a), ("b", &b), ("other", &other)]).is_ok());
        let (name, why) = check_shared_buses([("a", &a), ("b", &b), ("slow", &slow)]).unwrap_err();
        assert_eq!(name, "slow");
        assert!(
            why.contains("2400 baud") && why.contains("9600 baud"),
            "{why}"
        );
    }

    #[test]
    fn exceptions_are_counted_by_name() {
        let e = SensorError::Exception {
            code: 2,
            detail: "Input 1000 to 1001".into(),
        };
        assert_eq!(e.kind(), "illegal_address");
        assert_eq!(
            e.to_string(),
            "exception 0x02 (illegal address) for Input 1000 to 1001"
        );
        let other = SensorError::Exception {
            code: 0x40,
            detail: String::new(),
        };
        assert_eq!(other.kind(), "exception");
    }
}
