//! Sensors served by Linux Industrial I/O drivers, read from sysfs.
//!
//! Every IIO device is a directory `<root>/bus/iio/devices/iio:deviceN/` whose `name` file
//! holds the driver's device name; the number N depends on probe order, so devices are
//! found by name. [`IioSource`] reads environmental chips such as the BME280/BMP280; the
//! device lookup, the retries and the loss reporting are shared with the DHT's IIO source
//! (`dht::IioDhtSource`). Values are converted from the IIO ABI units by pure functions;
//! the sources only find the directory and read files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::source::{Measurement, Pacing, SensorError, Source};
use crate::backoff::Backoff;

/// A physical quantity an IIO device may expose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// `temp`: milli-degrees Celsius, shown in °C.
    Temperature,
    /// `humidityrelative`: milli-percent, shown in %.
    Humidity,
    /// `pressure`: kilopascal, shown in hPa.
    Pressure,
}

impl Quantity {
    const ALL: [Quantity; 3] = [
        Quantity::Temperature,
        Quantity::Humidity,
        Quantity::Pressure,
    ];

    /// The channel type in IIO attribute names (`in_<type>_input`).
    fn channel(self) -> &'static str {
        match self {
            Quantity::Temperature => "temp",
            Quantity::Humidity => "humidityrelative",
            Quantity::Pressure => "pressure",
        }
    }

    /// Converts a value in the IIO ABI unit (milli-degrees Celsius, milli-percent,
    /// kilopascal) to the unit shown to clients.
    /// Values are rounded to a millionth of the client unit, far below any sensor's
    /// resolution, so that unit conversion leaves no binary noise (1013.2299999999999).
    pub fn measurement(self, iio_value: f64) -> Measurement {
        let millionths = |x: f64| (x * 1e6).round() / 1e6;
        match self {
            Quantity::Temperature => {
                Measurement::in_known_unit("temperatura", millionths(iio_value / 1000.0))
            }
            Quantity::Humidity => {
                Measurement::in_known_unit("humedad", millionths(iio_value / 1000.0))
            }
            Quantity::Pressure => {
                Measurement::in_known_unit("presion", millionths(iio_value * 10.0))
            }
        }
    }
}

/// Parses one sysfs attribute: a decimal number on one line (`21500`, `100.156250000`,
/// `0.001000000`).
pub fn parse_sysfs_number(text: &str) -> Result<f64, SensorError> {
    let text = text.trim();
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(SensorError::Malformed(format!(
            "sysfs value {text:?} is not a number"
        ))),
    }
}

/// The processed value of a channel exposed as `in_X_raw`, per the IIO ABI:
/// `(raw + offset) * scale`, in the channel's ABI unit.
pub fn scaled(raw: f64, offset: f64, scale: f64) -> f64 {
    (raw + offset) * scale
}

/// How a failed sysfs read should be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFailure {
    /// EIO or ETIMEDOUT: the `dht11` driver missed the sensor's answer. Every few reads
    /// do this; it is worth a retry.
    Routine,
    /// The file or its device is gone (driver unloaded, I2C device removed).
    Gone(String),
    /// Anything else, e.g. permission denied.
    Other(String),
}

/// EIO is 5 on every Linux architecture; ETIMEDOUT differs (110, or 145 on MIPS), so it
/// is matched through `ErrorKind::TimedOut`, which std maps from the platform's errno.
const EIO: i32 = 5;
/// ENODEV/ENXIO: the attribute's device went away while the file was open.
const ENXIO: i32 = 6;
const ENODEV: i32 = 19;

/// Classifies a sysfs read error; pure so the errnos a plain test file cannot produce
/// are still tested.
pub fn classify(err: &io::Error) -> ReadFailure {
    match err.raw_os_error() {
        Some(EIO) => return ReadFailure::Routine,
        Some(ENODEV | ENXIO) => return ReadFailure::Gone(err.to_string()),
        _ => {}
    }
    match err.kind() {
        io::ErrorKind::TimedOut => ReadFailure::Routine,
        io::ErrorKind::NotFound => ReadFailure::Gone(err.to_string()),
        _ => ReadFailure::Other(err.to_string()),
    }
}

/// Why reading a device's attributes produced no value.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The read itself failed; [`classify`] decides what that means.
    Io(io::Error),
    /// The read worked but the text was not a usable value.
    Value(SensorError),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

impl From<SensorError> for Failure {
    fn from(e: SensorError) -> Self {
        Failure::Value(e)
    }
}

/// Reads one sysfs attribute as a number.
pub(crate) fn read_number(path: &Path) -> Result<f64, Failure> {
    Ok(parse_sysfs_number(&fs::read_to_string(path)?)?)
}

/// How hard to try before reporting a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RetryPolicy {
    attempts: u32,
    /// Pause after a failed attempt, so the sensor is not re-triggered mid-recovery.
    gap: Backoff,
    /// No new attempt starts after this much time: a DHT read can block about a second,
    /// and `read` must return within a couple of seconds.
    budget: Duration,
}

/// Three tries fit the budget even when each blocks for the driver's full second.
const RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    gap: Backoff::fixed(Duration::from_millis(200)),
    budget: Duration::from_millis(1500),
};

/// Runs `attempt` until it succeeds, fails for a non-routine reason, or the policy is
/// spent.
fn with_retries<T>(
    policy: RetryPolicy,
    mut attempt: impl FnMut() -> Result<T, Failure>,
) -> Result<T, Failure> {
    let start = Instant::now();
    let mut gap = policy.gap;
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt() {
            Err(Failure::Io(e))
                if classify(&e) == ReadFailure::Routine
                    && tries < policy.attempts
                    && start.elapsed() < policy.budget =>
            {
                thread::sleep(gap.next_delay());
            }
            outcome => return outcome,
        }
    }
}

/// Finds `iio:deviceN` whose `name` is `name`: the lowest N, or exactly N when `index`
/// is given. `Ok(None)` when there is no such device (yet).
fn find_device(root: &Path, name: &str, index: Option<u32>) -> io::Result<Option<PathBuf>> {
    let devices = root.join("bus/iio/devices");
    let mut candidates = Vec::new();
    for entry in fs::read_dir(&devices)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(n) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix("iio:device"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if index.is_some_and(|i| i != n) {
            continue;
        }
        match fs::read_to_string(entry.path().join("name")) {
            Ok(found) if found.trim() == name => candidates.push((n, entry.path())),
            Ok(_) => {}
            // A device vanishing during the scan is simply not a candidate.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    candidates.sort();
    Ok(candidates.into_iter().next().map(|(_, path)| path))
}

/// The device directory a source reads, found lazily and forgotten when it disappears.
#[derive(Debug)]
pub(crate) struct Device {
    root: PathBuf,
    name: String,
    index: Option<u32>,
    dir: Option<PathBuf>,
    loss_reported: bool,
}

impl Device {
    /// The device named `name` under `root`, optionally `iio:device<index>`; looked up by
    /// the first read.
    pub(crate) fn new(root: &Path, name: &str, index: Option<u32>) -> Self {
        Device {
            root: root.to_owned(),
            name: name.to_owned(),
            index,
            dir: None,
            loss_reported: false,
        }
    }

    /// Finds the device if need be and runs `attempt` on its directory, retrying routine
    /// failures. `Ok(None)` means the device is still gone and that was reported already:
    /// a loss is reported once, not on every read while it lasts.
    pub(crate) fn read<T>(
        &mut self,
        mut attempt: impl FnMut(&Path) -> Result<T, Failure>,
    ) -> Result<Option<T>, SensorError> {
        let dir = match self.dir.take() {
            Some(dir) => dir,
            None => match find_device(&self.root, &self.name, self.index) {
                Ok(Some(dir)) => dir,
                Ok(None) => return self.lost(format!("no IIO device named {:?}", self.name)),
                Err(e) => return self.lost(format!("IIO devices: {e}")),
            },
        };
        let error = match with_retries(RETRY, || attempt(&dir)) {
            Ok(value) => {
                self.dir = Some(dir);
                self.loss_reported = false;
                return Ok(Some(value));
            }
            Err(Failure::Value(e)) => e,
            Err(Failure::Io(e)) => match classify(&e) {
                ReadFailure::Routine => SensorError::Timeout,
                ReadFailure::Gone(why) => return self.lost(format!("{}: {why}", dir.display())),
                ReadFailure::Other(why) => SensorError::Io(format!("{}: {why}", dir.display())),
            },
        };
        // The device is there; only this read failed.
        self.dir = Some(dir);
        Err(error)
    }

    /// Whether the device directory was found and has not gone since.
    pub(crate) fn is_found(&self) -> bool {
        self.dir.is_some()
    }

    fn lost<T>(&mut self, why: String) -> Result<Option<T>, SensorError> {
        self.dir = None;
        if self.loss_reported {
            Ok(None)
        } else {
            self.loss_reported = true;
            Err(SensorError::PortLost(why))
        }
    }
}

/// Where sysfs is mounted, unless a config says otherwise.
pub(crate) fn default_sysfs_root() -> PathBuf {
    PathBuf::from("/sys")
}

/// A generic IIO environmental sensor (BME280, BMP280, HDC1080, ...).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IioConfig {
    /// The device's `name` file, e.g. `bme280`.
    pub device_name: String,
    /// The N of `iio:deviceN`, for two chips of one kind; the device there must still
    /// carry `device_name`.
    #[serde(default)]
    pub device_index: Option<u32>,
    /// Where sysfs is mounted; tests point it at a temporary tree.
    #[serde(default = "default_sysfs_root")]
    pub sysfs_root: PathBuf,
}

/// Reads one quantity from `in_X_input` (already in the ABI unit) or, failing that, from
/// `in_X_raw` with the optional `in_X_offset` and `in_X_scale`. `Ok(None)` when the device
/// has no such channel.
fn read_channel(dir: &Path, quantity: Quantity) -> Result<Option<f64>, Failure> {
    let file = |suffix: &str| {
        let path = dir.join(format!("in_{}_{suffix}", quantity.channel()));
        path.is_file().then_some(path)
    };
    if let Some(input) = file("input") {
        return read_number(&input).map(Some);
    }
    let Some(raw) = file("raw") else {
        return Ok(None);
    };
    let optional = |suffix: &str, absent: f64| file(suffix).map_or(Ok(absent), |p| read_number(&p));
    let raw = read_number(&raw)?;
    Ok(Some(scaled(
        raw,
        optional("offset", 0.0)?,
        optional("scale", 1.0)?,
    )))
}

/// Every temperature, humidity and pressure channel the device has, in that order.
fn read_channels(dir: &Path) -> Result<Vec<Measurement>, Failure> {
    let mut measurements = Vec::new();
    for quantity in Quantity::ALL {
        if let Some(value) = read_channel(dir, quantity)? {
            measurements.push(quantity.measurement(value));
        }
    }
    if measurements.is_empty() {
        return Err(Failure::Value(SensorError::Malformed(format!(
            "{} has no temperature, humidity or pressure channel",
            dir.display()
        ))));
    }
    Ok(measurements)
}

/// A generic IIO device. Its channels are looked up on every read, which costs a few
/// `stat`s and follows a driver that is reloaded with other attributes.
#[derive(Debug)]
pub struct IioSource {
    interval: Duration,
    device: Device,
}

impl IioSource {
    /// A source reading every `interval`. Nothing is opened here: a missing device is
    /// reported by the first `read`.
    pub fn new(config: &IioConfig, interval: Duration) -> Self {
        IioSource {
            interval,
            device: Device::new(&config.sysfs_root, &config.device_name, config.device_index),
        }
    }
}

impl Source for IioSource {
    fn is_connected(&self) -> bool {
        self.device.is_found()
    }

    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError> {
        self.device.read(read_channels)
    }

    fn pacing(&self) -> Pacing {
        Pacing::Every(self.interval)
    }
}

/// Lays out `iio:deviceN` under `root` as the kernel does, with the given attribute files:
/// the sysfs tree the IIO sources' tests read.
#[cfg(test)]
pub(crate) fn add_device(root: &Path, n: u32, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = root.join(format!("bus/iio/devices/iio:device{n}"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("name"), format!("{name}\n")).unwrap();
    for (file, content) in files {
        fs::write(dir.join(file), content).unwrap();
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn generic_config(root: &Path, name: &str) -> IioConfig {
        IioConfig {
            device_name: name.into(),
            device_index: None,
            sysfs_root: root.to_owned(),
        }
    }

    #[test]
    fn quantities_convert_from_abi_units() {
        assert_eq!(
            Quantity::Temperature.measurement(21500.0),
            Measurement::new("temperatura", 21.5, "°C")
        );
        assert_eq!(
            Quantity::Humidity.measurement(40250.0),
            Measurement::new("humedad", 40.25, "%")
        );
        assert_eq!(
            Quantity::Pressure.measurement(100.15625),
            Measurement::new("presion", 1001.5625, "hPa")
        );
        assert_eq!(scaled(1000.0, -500.0, 2.5), 1250.0);
    }

    #[test]
    fn sysfs_numbers() {
        assert_eq!(parse_sysfs_number("21500\n"), Ok(21500.0));
        assert_eq!(parse_sysfs_number("100.156250000\n"), Ok(100.15625));
        assert_eq!(parse_sysfs_number("-4000\n"), Ok(-4000.0));
        for bad in ["", "\n", "abc\n", "nan\n", "inf\n", "12 34\n"] {
            assert!(
                matches!(parse_sysfs_number(bad), Err(SensorError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn classifies_read_errors() {
        assert_eq!(
            classify(&io::Error::from_raw_os_error(5)),
            ReadFailure::Routine
        );
        assert_eq!(
            classify(&io::Error::from_raw_os_error(110)),
            ReadFailure::Routine
        );
        assert_eq!(
            classify(&io::Error::from(io::ErrorKind::TimedOut)),
            ReadFailure::Routine
        );
        assert!(matches!(
            classify(&io::Error::from_raw_os_error(19)),
            ReadFailure::Gone(_)
        ));
        assert!(matches!(
            classify(&io::Error::from_raw_os_error(2)),
            ReadFailure::Gone(_)
        ));
        assert!(matches!(
            classify(&io::Error::from_raw_os_error(13)),
            ReadFailure::Other(_)
        ));
    }

    const FAST: RetryPolicy = RetryPolicy {
        attempts: 3,
        gap: Backoff::fixed(Duration::ZERO),
        budget: Duration::from_secs(5),
    };

    fn errno(code: i32) -> Failure {
        Failure::Io(io::Error::from_raw_os_error(code))
    }

    fn routine(outcome: Result<(), Failure>) -> bool {
        matches!(outcome, Err(Failure::Io(e)) if classify(&e) == ReadFailure::Routine)
    }

    #[test]
    fn routine_failures_are_retried_then_time_out() {
        let calls = Cell::new(0);
        let flaky = || {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(errno(5))
            } else {
                Ok(7)
            }
        };
        assert!(matches!(with_retries(FAST, flaky), Ok(7)));
        assert_eq!(calls.get(), 3);

        calls.set(0);
        let dead = || {
            calls.set(calls.get() + 1);
            Err(errno(110))
        };
        assert!(routine(with_retries(FAST, dead)));
        assert_eq!(calls.get(), 3);

        calls.set(0);
        let gone = || -> Result<(), Failure> {
            calls.set(calls.get() + 1);
            Err(errno(2))
        };
        assert!(matches!(with_retries(FAST, gone), Err(Failure::Io(_))));
        assert_eq!(calls.get(), 1);

        calls.set(0);
        let garbage = || -> Result<(), Failure> {
            calls.set(calls.get() + 1);
            Err(SensorError::Malformed("x".into()).into())
        };
        assert!(matches!(
            with_retries(FAST, garbage),
            Err(Failure::Value(SensorError::Malformed(_)))
        ));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn retries_stop_when_the_budget_is_spent() {
        let calls = Cell::new(0);
        let spent = RetryPolicy {
            budget: Duration::ZERO,
            ..FAST
        };
        let dead = || {
            calls.set(calls.get() + 1);
            Err(errno(5))
        };
        assert!(routine(with_retries(spent, dead)));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn bme280_processed_channels() {
        let tmp = tempfile::tempdir().unwrap();
        add_device(
            tmp.path(),
            0,
            "bme280",
            &[
                ("in_temp_input", "23450\n"),
                ("in_humidityrelative_input", "41500\n"),
                ("in_pressure_input", "100.156250000\n"),
                ("in_temp_oversampling_ratio", "2\n"),
            ],
        );
        let mut source = IioSource::new(
            &generic_config(tmp.path(), "bme280"),
            Duration::from_secs(30),
        );
        assert_eq!(
            source.read(),
            Ok(Some(vec![
                Measurement::new("temperatura", 23.45, "°C"),
                Measurement::new("humedad", 41.5, "%"),
                Measurement::new("presion", 1001.5625, "hPa"),
            ]))
        );
        assert_eq!(source.pacing(), Pacing::Every(Duration::from_secs(30)));
    }

    #[test]
    fn raw_channels_apply_offset_then_scale() {
        let tmp = tempfile::tempdir().unwrap();
        add_device(
            tmp.path(),
            0,
            "hdc100x",
            &[
                // (26000 + -4000) * 1.25 = 27500 milli °C
                ("in_temp_raw", "26000\n"),
                ("in_temp_offset", "-4000\n"),
                ("in_temp_scale", "1.250000000\n"),
                // No offset file: 3000 * 12.5 = 37500 milli %
                ("in_humidityrelative_raw", "3000\n"),
                ("in_humidityrelative_scale", "12.5\n"),
            ],
        );
        let mut source = IioSource::new(
            &generic_config(tmp.path(), "hdc100x"),
            Duration::from_secs(10),
        );
        assert_eq!(
            source.read(),
            Ok(Some(vec![
                Measurement::new("temperatura", 27.5, "°C"),
                Measurement::new("humedad", 37.5, "%"),
            ]))
        );
    }

    #[test]
    fn device_without_known_channels_is_malformed() {
        let tmp = tempfile::tempdir().unwrap();
        add_device(tmp.path(), 0, "adxl345", &[("in_accel_x_raw", "12\n")]);
        let mut source = IioSource::new(
            &generic_config(tmp.path(), "adxl345"),
            Duration::from_secs(1),
        );
        assert!(matches!(source.read(), Err(SensorError::Malformed(_))));
    }

    #[test]
    fn generic_device_lost_and_found() {
        let tmp = tempfile::tempdir().unwrap();
        let mut source = IioSource::new(
            &generic_config(tmp.path(), "bmp280"),
            Duration::from_secs(1),
        );
        // No bus/iio directory at all yet (the module is not loaded).
        assert!(matches!(source.read(), Err(SensorError::PortLost(_))));
        assert_eq!(source.read(), Ok(None));
        add_device(tmp.path(), 0, "bmp280", &[("in_pressure_input", "99.5\n")]);
        assert_eq!(
            source.read(),
            Ok(Some(vec![Measurement::new("presion", 995.0, "hPa")]))
        );
        assert!(source.is_connected());
    }

    #[test]
    fn config_has_defaults_and_refuses_unknown_fields() {
        let generic: IioConfig =
            serde_json::from_str(r#"{"device_name": "bme280", "device_index": 1}"#).unwrap();
        assert_eq!(generic.device_index, Some(1));
        assert_eq!(generic.sysfs_root, PathBuf::from("/sys"));
        assert!(serde_json::from_str::<IioConfig>(r#"{"device_name": "x", "bus": 1}"#).is_err());
    }
}
