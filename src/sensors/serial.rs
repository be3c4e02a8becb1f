//! A microcontroller (Arduino, ESP32, Pico) that prints readings on a serial line.
//!
//! Three layers, outermost last:
//! - [`parse_line`] / [`LineFormat::parse`]: one line of text to measurements, pure. Lines
//!   are JSON objects (`{"t": 21.4, "h": 40.2}` or `{"tipo": "temperatura", "valor": 21.4}`)
//!   or key/value text (`T=21.4 H=40.2`, `temp:21.4,hum:40.2`); a [`KeyMapping`] says what
//!   each key measures.
//! - `LineAssembler`: bytes to lines, with the length bound and the resynchronisation
//!   after (re)connecting.
//! - [`SerialSource`]: owns the port, survives the device being unplugged and plugged back
//!   (it reopens the configured path, typically a `/dev/serial/by-id/...` symlink that udev
//!   recreates), and never blocks a `read` for more than about half a second.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read};
use std::num::{NonZeroU32, NonZeroUsize};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serialport::{ClearBuffer, SerialPort};

use super::source::{Measurement, Pacing, SensorError, Source};
use crate::backoff::Backoff;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Assembly {
    /// Just (re)connected: the first bytes may be the tail of a line whose start was sent
    /// before we listened. They are skipped up to the next newline, unless the line goes
    /// quiet first (`discarded` still false), which shows we are between lines.
    Resync { discarded: bool },
    /// At a line boundary or inside a line whose start we saw.
    Ready,
    /// Skipping the rest of an over-long line, already reported.
    Overflow,
}

/// Splits the byte stream into lines of at most `max` bytes (the newline excluded).
#[derive(Debug)]
struct LineAssembler {
    max: usize,
    line: Vec<u8>,
    state: Assembly,
}

impl LineAssembler {
    fn new(max: usize) -> Self {
        LineAssembler {
            max,
            line: Vec::new(),
            state: Assembly::Resync { discarded: false },
        }
    }

    /// Forgets any partial line: called after (re)opening the port.
    fn resync(&mut self) {
        self.line.clear();
        self.state = Assembly::Resync { discarded: false };
    }

    /// The line was silent for a whole read timeout.
    fn quiet(&mut self) {
        if self.state == (Assembly::Resync { discarded: false }) {
            self.state = Assembly::Ready;
        }
    }

    /// Consumes `bytes`; returns each completed line, and one `Malformed` per over-long
    /// line (whose rest is then dropped up to its newline).
    fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Vec<u8>, SensorError>> {
        let mut out = Vec::new();
        for &byte in bytes {
            match (self.state, byte) {
                (Assembly::Resync { .. } | Assembly::Overflow, b'\n') => {
                    self.state = Assembly::Ready
                }
                (Assembly::Resync { .. }, _) => self.state = Assembly::Resync { discarded: true },
                (Assembly::Overflow, _) => {}
                (Assembly::Ready, b'\n') => out.push(Ok(std::mem::take(&mut self.line))),
                (Assembly::Ready, _) if self.line.len() == self.max => {
                    self.line.clear();
                    self.state = Assembly::Overflow;
                    out.push(Err(SensorError::Malformed(format!(
                        "line longer than {} bytes",
                        self.max
                    ))));
                }
                (Assembly::Ready, _) => self.line.push(byte),
            }
        }
        out
    }
}

/// A replugged USB adapter is usually back within a second; a device that is gone for
/// good costs one `open` every 30 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// serialport's default timeout is zero, which makes a read loop spin. A quarter second
/// keeps `read` responsive to shutdown and is long enough to tell a quiet line (between
/// lines) from a line being transmitted (bytes every few ms even at 1200 baud).
const READ_TIMEOUT: Duration = Duration::from_millis(250);

fn default_baud() -> NonZeroU32 {
    NonZeroU32::new(9600).expect("9600 is not zero")
}

fn default_max_line_bytes() -> NonZeroUsize {
    NonZeroUsize::new(256).expect("256 is not zero")
}

/// A serial port with a device printing one reading per line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Device path; prefer `/dev/serial/by-id/...`, which survives replugging and does not
    /// swap when two adapters enumerate in another order.
    pub path: String,
    /// Line speed; 9600 unless the firmware says otherwise. Ignored by USB CDC devices.
    #[serde(default = "default_baud")]
    pub baud: NonZeroU32,
    /// How lines are written; `auto` tells JSON from key/value per line.
    #[serde(default)]
    pub format: LineFormat,
    /// Longest line accepted; longer ones are dropped and reported as malformed, so a
    /// device spewing binary cannot grow memory.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: NonZeroUsize,
    /// Extra or replacement keys, e.g. `co2 = { tipo = "co2", unidad = "ppm" }`.
    #[serde(default)]
    pub keys: BTreeMap<String, KeySpec>,
}

/// What [`Source::read`] returns.
type ReadOutcome = Result<Option<Vec<Measurement>>, SensorError>;

/// Reads measurements line by line from a serial port, reopening it when it vanishes.
///
/// A loss (read error, hang-up, failed open) is returned once as `PortLost`; while the
/// device stays away, reads return `Ok(None)` and reopen attempts back off from 0.5 s to
/// 30 s. [`SerialSource::is_connected`] tells the scheduler when it is back.
pub struct SerialSource {
    path: String,
    baud: u32,
    format: LineFormat,
    mapping: KeyMapping,
    assembler: LineAssembler,
    /// Lines assembled but not yet handed out: one `read` returns one line's outcome.
    /// It is drained before the port is read again, so it never holds more than one
    /// read buffer's worth of lines.
    pending: VecDeque<Result<Vec<u8>, SensorError>>,
    port: Option<Box<dyn SerialPort>>,
    retry_at: Instant,
    backoff: Backoff,
    loss_reported: bool,
}

impl SerialSource {
    /// A source for `config`. The port is opened by the first `read`, so a device that is
    /// unplugged at start-up is a reported loss, not a start-up failure.
    pub fn new(config: &SerialConfig) -> Self {
        SerialSource {
            path: config.path.clone(),
            baud: config.baud.get(),
            format: config.format,
            mapping: KeyMapping::with_keys(&config.keys),
            assembler: LineAssembler::new(config.max_line_bytes.get()),
            pending: VecDeque::new(),
            port: None,
            retry_at: Instant::now(),
            backoff: RECONNECT,
            loss_reported: false,
        }
    }

    fn open(&self) -> serialport::Result<Box<dyn SerialPort>> {
        let port = serialport::new(&self.path, self.baud)
            .timeout(READ_TIMEOUT)
            .open()?;
        // Bytes queued before we opened are stale, and the resync would drop most of them.
        port.clear(ClearBuffer::Input)?;
        Ok(port)
    }

    /// Waits (at most one read timeout) for the back-off to expire, then tries to open.
    /// `Err` carries what `read` should return when there is still no port.
    fn reconnect(&mut self) -> Result<Box<dyn SerialPort>, ReadOutcome> {
        let now = Instant::now();
        if now < self.retry_at {
            thread::sleep((self.retry_at - now).min(READ_TIMEOUT));
            if Instant::now() < self.retry_at {
                return Err(Ok(None));
            }
        }
        match self.open() {
            Ok(port) => {
                self.backoff.reset();
                self.loss_reported = false;
                self.assembler.resync();
                Ok(port)
            }
            Err(e) => Err(self.lost(format!("{}: {e}", self.path))),
        }
    }

    /// Drops the port (by not putting it back) and schedules the next attempt; the loss is
    /// reported only if it was not already.
    fn lost(&mut self, why: String) -> ReadOutcome {
        self.port = None;
        self.retry_at = Instant::now() + self.backoff.next_delay();
        if self.loss_reported {
            Ok(None)
        } else {
            self.loss_reported = true;
            Err(SensorError::PortLost(why))
        }
    }

    fn next_line(&mut self) -> Option<Result<Vec<Measurement>, SensorError>> {
        let line = self.pending.pop_front()?;
        Some(line.and_then(|line| self.format.parse(&line, &self.mapping)))
    }
}

impl Source for SerialSource {
    fn is_connected(&self) -> bool {
        self.port.is_some()
    }

    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError> {
        if let Some(outcome) = self.next_line() {
            return outcome.map(Some);
        }
        let mut port = match self.port.take() {
            Some(port) => port,
            None => match self.reconnect() {
                Ok(port) => port,
                Err(outcome) => return outcome,
            },
        };
        let mut buf = [0u8; 512];
        match port.read(&mut buf) {
            Ok(0) => self.lost(format!("{}: end of file", self.path)),
            Ok(n) => {
                self.port = Some(port);
                let lines = self.assembler.feed(&buf[..n]);
                self.pending.extend(lines);
                self.next_line().transpose()
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                self.port = Some(port);
                self.assembler.quiet();
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.port = Some(port);
                Ok(None)
            }
            // Unplugging shows up as a hang-up (BrokenPipe) or EIO.
            Err(e) => self.lost(format!("{}: {e}", self.path)),
        }
    }

    fn pacing(&self) -> Pacing {
        Pacing::Streaming
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serialport::TTYPort;
    use std::io::Write;
    use std::path::Path;

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

    fn lines(outcomes: Vec<Result<Vec<u8>, SensorError>>) -> Vec<Result<String, String>> {
        outcomes
            .into_iter()
            .map(|o| {
                o.map(|l| String::from_utf8(l).unwrap())
                    .map_err(|e| e.kind().to_owned())
            })
            .collect()
    }

    fn ready(max: usize) -> LineAssembler {
        let mut assembler = LineAssembler::new(max);
        assembler.quiet();
        assembler
    }

    #[test]
    fn assembler_splits_lines_across_chunks() {
        let mut a = ready(256);
        assert_eq!(lines(a.feed(b"T=21")), vec![]);
        assert_eq!(
            lines(a.feed(b".4\r\nH=40\nP=")),
            vec![Ok("T=21.4\r".to_owned()), Ok("H=40".to_owned())]
        );
        assert_eq!(lines(a.feed(b"1000\n")), vec![Ok("P=1000".to_owned())]);
    }

    #[test]
    fn assembler_drops_the_partial_first_line_after_connecting() {
        let mut a = LineAssembler::new(256);
        assert_eq!(
            lines(a.feed(b"1.4 H=40.2\nT=22.0\n")),
            vec![Ok("T=22.0".to_owned())]
        );
        // Once bytes were dropped, a pause does not make the rest of that line valid.
        let mut b = LineAssembler::new(256);
        assert_eq!(lines(b.feed(b"1.4")), vec![]);
        b.quiet();
        assert_eq!(lines(b.feed(b" H=40\nT=1\n")), vec![Ok("T=1".to_owned())]);
        // A pause before any byte shows we are between lines: the first line is whole.
        let mut c = LineAssembler::new(256);
        c.quiet();
        assert_eq!(lines(c.feed(b"T=22.0\n")), vec![Ok("T=22.0".to_owned())]);
        // Reconnecting forgets the half line that was in flight.
        c.feed(b"T=2");
        c.resync();
        assert_eq!(lines(c.feed(b"3\nH=5\n")), vec![Ok("H=5".to_owned())]);
    }

    #[test]
    fn assembler_reports_an_over_long_line_once() {
        let mut a = ready(8);
        assert_eq!(
            lines(a.feed(b"01234567\n")),
            vec![Ok("01234567".to_owned())]
        );
        assert_eq!(
            lines(a.feed(b"0123456789abcdef")),
            vec![Err("malformed".to_owned())]
        );
        assert_eq!(lines(a.feed(b"ghijklmnopqrstuvwxyz")), vec![]);
        assert_eq!(lines(a.feed(b"xyz\nT=1\n")), vec![Ok("T=1".to_owned())]);
    }

    #[test]
    fn config_defaults_and_keys_table() {
        let config: SerialConfig = toml::from_str(
            r#"
            path = "/dev/serial/by-id/usb-Arduino_Uno-if00"
            [keys]
            co2 = { tipo = "co2", unidad = "ppm" }
            "#,
        )
        .unwrap();
        assert_eq!(config.baud.get(), 9600);
        assert_eq!(config.format, LineFormat::Auto);
        assert_eq!(config.max_line_bytes.get(), 256);
        assert_eq!(config.keys["co2"].unidad, "ppm");

        let kv: SerialConfig =
            toml::from_str("path = \"/dev/ttyACM0\"\nformat = \"kv\"\nbaud = 115200").unwrap();
        assert_eq!((kv.format, kv.baud.get()), (LineFormat::Kv, 115200));

        for bad in [
            "path = \"/dev/ttyACM0\"\nbaud = 0",
            "path = \"/dev/ttyACM0\"\nmax_line_bytes = 0",
            "path = \"/dev/ttyACM0\"\nformat = \"xml\"",
            "path = \"/dev/ttyACM0\"\nparity = \"even\"",
            "path = \"/dev/ttyACM0\"\n[keys]\nx = { tipo = \"x\" }",
        ] {
            assert!(toml::from_str::<SerialConfig>(bad).is_err(), "{bad}");
        }
    }

    fn config(path: &str) -> SerialConfig {
        SerialConfig {
            path: path.to_owned(),
            baud: default_baud(),
            format: LineFormat::Auto,
            max_line_bytes: default_max_line_bytes(),
            keys: BTreeMap::new(),
        }
    }

    /// The next non-quiet outcome; each `read` blocks at most ~0.5 s.
    fn next(source: &mut SerialSource) -> Result<Vec<Measurement>, SensorError> {
        for _ in 0..20 {
            if let Some(outcome) = source.read().transpose() {
                return outcome;
            }
        }
        panic!("nothing arrived within 20 reads");
    }

    /// Opens the port: the first read connects and then times out on the quiet line.
    fn connect(source: &mut SerialSource) {
        for _ in 0..20 {
            let outcome = source.read();
            if source.is_connected() {
                assert_eq!(outcome, Ok(None));
                return;
            }
        }
        panic!("port did not open");
    }

    fn pty() -> (TTYPort, TTYPort, String) {
        let (master, slave) = TTYPort::pair().expect("pseudo-terminal pair");
        let name = slave.name().expect("slave pty has a name");
        (master, slave, name)
    }

    #[test]
    fn reads_lines_from_a_pseudo_terminal() {
        let (mut device, _slave, path) = pty();
        let mut source = SerialSource::new(&config(&path));
        assert_eq!(source.pacing(), Pacing::Streaming);
        assert!(!source.is_connected());
        connect(&mut source);

        device.write_all(b"T=21.4 H=40.2\n").unwrap();
        assert_eq!(
            next(&mut source),
            Ok(vec![m("temperatura", 21.4, "°C"), m("humedad", 40.2, "%")])
        );

        device
            .write_all(b"\x00\xff garbage \x07\n{\"t\": 22.5}\r\n")
            .unwrap();
        assert!(malformed(next(&mut source)));
        assert_eq!(next(&mut source), Ok(vec![m("temperatura", 22.5, "°C")]));

        let long = [b'x'; 300];
        device.write_all(&long).unwrap();
        device
            .write_all(b"\n{\"tipo\": \"presion\", \"valor\": 1002.5}\n")
            .unwrap();
        assert!(malformed(next(&mut source)));
        assert_eq!(next(&mut source), Ok(vec![m("presion", 1002.5, "hPa")]));

        // A quiet line is not an error.
        assert_eq!(source.read(), Ok(None));
    }

    #[test]
    fn a_missing_port_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ttyUSB-gone");
        let mut source = SerialSource::new(&config(path.to_str().unwrap()));
        source.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        assert!(matches!(source.read(), Err(SensorError::PortLost(_))));
        for _ in 0..4 {
            assert_eq!(source.read(), Ok(None));
        }
        assert!(!source.is_connected());
        // The quiet reads were failed attempts that kept backing off, not just waits.
        assert_eq!(source.backoff.upcoming(), Duration::from_millis(40));
    }

    fn link(target: &str, link: &Path) {
        std::os::unix::fs::symlink(target, link).unwrap();
    }

    #[test]
    fn reconnects_when_the_device_comes_back() {
        // The by-id symlink that udev removes on unplug and recreates, possibly pointing at
        // another tty, on replug.
        let dir = tempfile::tempdir().unwrap();
        let by_id = dir.path().join("usb-Arduino_Uno_123-if00");
        let (mut device, slave, path) = pty();
        link(&path, &by_id);

        let mut source = SerialSource::new(&config(by_id.to_str().unwrap()));
        source.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(80));
        connect(&mut source);
        device.write_all(b"T=20.5\n").unwrap();
        assert_eq!(next(&mut source), Ok(vec![m("temperatura", 20.5, "°C")]));

        // Unplug: the tty hangs up and the symlink goes.
        drop(device);
        drop(slave);
        std::fs::remove_file(&by_id).unwrap();
        assert!(matches!(source.read(), Err(SensorError::PortLost(_))));
        assert!(!source.is_connected());
        for _ in 0..4 {
            assert_eq!(source.read(), Ok(None));
        }
        assert_eq!(source.backoff.upcoming(), Duration::from_millis(80));

        // Replug.
        let (mut device, _slave, path) = pty();
        link(&path, &by_id);
        connect(&mut source);
        assert_eq!(source.backoff.upcoming(), Duration::from_millis(20));
        device.write_all(b"H=41.5\n").unwrap();
        assert_eq!(next(&mut source), Ok(vec![m("humedad", 41.5, "%")]));
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

        /// What a ready assembler must make of `lines` joined by newlines: each line whole
        /// when it fits, one `malformed` when it does not.
        fn expected(lines: &[Vec<u8>], max: usize) -> Vec<Result<Vec<u8>, String>> {
            lines
                .iter()
                .map(|l| {
                    if l.len() <= max {
                        Ok(l.clone())
                    } else {
                        Err("malformed".to_owned())
                    }
                })
                .collect()
        }

        fn outcomes(out: Vec<Result<Vec<u8>, SensorError>>) -> Vec<Result<Vec<u8>, String>> {
            out.into_iter()
                .map(|o| o.map_err(|e| e.kind().to_owned()))
                .collect()
        }

        /// Feeds `bytes` cut at `cuts` (positions, in any order, may repeat).
        fn feed_in_chunks(
            assembler: &mut LineAssembler,
            bytes: &[u8],
            cuts: &[usize],
        ) -> Vec<Result<Vec<u8>, SensorError>> {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut out = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                out.extend(assembler.feed(&bytes[from..cut]));
                from = cut;
            }
            out
        }

        fn line_without_newline() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(
                    any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
                    0..40
                ),
                (0usize..80, any::<u8>())
                    .prop_map(|(n, b)| vec![if b == b'\n' { b'x' } else { b }; n]),
            ]
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

            #[test]
            fn assembled_lines_never_exceed_the_cap(
                // Newlines one byte in `every`, so lines are short and long against `max`.
                bytes in (prop::collection::vec(any::<u8>(), 0..600), 2u8..=255).prop_map(
                    |(bytes, every)| {
                        bytes
                            .into_iter()
                            .map(|b| if b % every == 0 { b'\n' } else { b })
                            .collect::<Vec<u8>>()
                    }
                ),
                cuts in prop::collection::vec(any::<usize>(), 0..20),
                max in 1usize..100,
                quiet in any::<bool>(),
            ) {
                let mut assembler = LineAssembler::new(max);
                if quiet {
                    assembler.quiet();
                }
                let out = feed_in_chunks(&mut assembler, &bytes, &cuts);
                let newlines = bytes.iter().filter(|b| **b == b'\n').count();
                // At most one outcome per line, and memory held is bounded by the cap.
                prop_assert!(out.len() <= newlines + 1);
                prop_assert!(assembler.line.len() <= max);
                let mut total = 0;
                for line in out.iter().flatten() {
                    prop_assert!(line.len() <= max);
                    prop_assert!(!line.contains(&b'\n'));
                    total += line.len();
                }
                prop_assert!(total <= bytes.len());
            }

            #[test]
            fn chunking_does_not_change_the_lines(
                lines in prop::collection::vec(line_without_newline(), 0..12),
                cuts in prop::collection::vec(any::<usize>(), 0..30),
                max in 1usize..64,
                quiet in any::<bool>(),
            ) {
                let mut bytes = Vec::new();
                for line in &lines {
                    bytes.extend_from_slice(line);
                    bytes.push(b'\n');
                }
                let start = |a: &mut LineAssembler| if quiet { a.quiet() };
                let mut whole = LineAssembler::new(max);
                start(&mut whole);
                let at_once = outcomes(whole.feed(&bytes));
                let mut chunked = LineAssembler::new(max);
                start(&mut chunked);
                let in_chunks = outcomes(feed_in_chunks(&mut chunked, &bytes, &cuts));
                prop_assert_eq!(&at_once, &in_chunks);
                // A line that began before we listened is dropped; every other line comes
                // out whole, or as one error when it is over the cap.
                let heard = if quiet { &lines[..] } else { &lines[lines.len().min(1)..] };
                prop_assert_eq!(at_once, expected(heard, max));
            }
        }
    }
}
