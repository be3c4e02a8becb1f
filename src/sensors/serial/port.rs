//! The port itself: opened lazily, reopened with a back-off when the device goes away,
//! read with a timeout so that a `read` never blocks for more than about half a second.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::num::{NonZeroU32, NonZeroUsize};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serialport::{ClearBuffer, SerialPort};

use super::decode::{KeyMapping, KeySpec, LineFormat};
use super::framing::LineAssembler;
use crate::backoff::Backoff;
use crate::sensors::source::{Measurement, Pacing, SensorError, Source};

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

    fn malformed(outcome: Result<Vec<Measurement>, SensorError>) -> bool {
        matches!(outcome, Err(SensorError::Malformed(_)))
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
}
