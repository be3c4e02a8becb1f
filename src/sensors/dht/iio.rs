//! A DHT served by the kernel `dht11` IIO driver (`dtoverlay=dht11,gpiopin=N`), which
//! decodes in the kernel and serves DHT11 and DHT22 alike: found and read like any IIO
//! device, with the plausibility filter on top.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::datasheet::{DhtModel, Reading, MIN_INTERVAL};
use super::plausibility::PlausibilityFilter;
use crate::sensors::iio::{default_sysfs_root, read_number, Device, Failure};
use crate::sensors::source::{Measurement, Pacing, SensorError, Source};

fn default_dht_device_name() -> String {
    "dht11".to_owned()
}

/// A DHT11/DHT22 served by the kernel `dht11` driver (`dtoverlay=dht11,gpiopin=N`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IioDhtConfig {
    /// The driver names its device `dht11` whichever model is wired, hence `model`.
    pub model: DhtModel,
    /// The device's `name` file; `dht11` unless the overlay was renamed.
    #[serde(default = "default_dht_device_name")]
    pub device_name: String,
    /// The N of `iio:deviceN`, for several sensors on one gateway; the device there must
    /// still carry `device_name`.
    #[serde(default)]
    pub device_index: Option<u32>,
    /// Where sysfs is mounted; tests point it at a temporary tree.
    #[serde(default = "default_sysfs_root")]
    pub sysfs_root: PathBuf,
}

/// A DHT read through the kernel driver, with the plausibility filter on top.
#[derive(Debug)]
pub struct IioDhtSource {
    interval: Duration,
    device: Device,
    filter: PlausibilityFilter,
}

impl IioDhtSource {
    /// A source reading every `interval`, raised to the sensor's 2 s minimum. Nothing is
    /// opened here: a missing device is reported by the first `read`.
    pub fn new(config: &IioDhtConfig, interval: Duration) -> Self {
        IioDhtSource {
            interval: interval.max(MIN_INTERVAL),
            device: Device::new(&config.sysfs_root, &config.device_name, config.device_index),
            filter: PlausibilityFilter::new(config.model.limits()),
        }
    }
}

/// Reads both channels back to back: the first read triggers a conversion and the driver
/// caches the pair for 2 s, so the second returns the same conversion.
fn read_dht(dir: &Path) -> Result<Reading, Failure> {
    let temperature = read_number(&dir.join("in_temp_input"))?;
    let humidity = read_number(&dir.join("in_humidityrelative_input"))?;
    Ok(Reading {
        temperature: temperature / 1000.0,
        humidity: humidity / 1000.0,
    })
}

impl Source for IioDhtSource {
    fn is_connected(&self) -> bool {
        self.device.is_found()
    }

    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError> {
        let Some(reading) = self.device.read(read_dht)? else {
            return Ok(None);
        };
        let reading = self.filter.check(reading, Instant::now())?;
        Ok(Some(reading.measurements()))
    }

    fn pacing(&self) -> Pacing {
        Pacing::Every(self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::iio::add_device;
    use std::fs;

    fn dht_config(root: &Path) -> IioDhtConfig {
        IioDhtConfig {
            model: DhtModel::Dht22,
            device_name: "dht11".into(),
            device_index: None,
            sysfs_root: root.to_owned(),
        }
    }

    /// A DHT as the kernel's driver lays it out: temperature and humidity in milli-units.
    fn dht_device(root: &Path, n: u32, temperature: &str, humidity: &str) -> PathBuf {
        add_device(
            root,
            n,
            "dht11",
            &[
                ("in_temp_input", temperature),
                ("in_humidityrelative_input", humidity),
            ],
        )
    }

    #[test]
    fn dht_device_is_found_by_name_and_read_in_milli_units() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        add_device(root, 0, "bmp280", &[("in_temp_input", "30000\n")]);
        dht_device(root, 1, "21500\n", "40250\n");
        let mut source = IioDhtSource::new(&dht_config(root), Duration::from_secs(1));
        assert_eq!(source.pacing(), Pacing::Every(Duration::from_secs(2)));
        assert!(!source.is_connected());
        assert_eq!(
            source.read(),
            Ok(Some(vec![
                Measurement::new("temperatura", 21.5, "°C"),
                Measurement::new("humedad", 40.25, "%"),
            ]))
        );
        assert!(source.is_connected());
    }

    #[test]
    fn device_index_picks_among_devices_of_one_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let files = |t: &'static str| {
            [
                ("in_temp_input", t),
                ("in_humidityrelative_input", "50000\n"),
            ]
        };
        add_device(root, 2, "dht11", &files("20000\n"));
        add_device(root, 10, "dht11", &files("25000\n"));
        add_device(root, 3, "bme280", &files("99000\n"));

        let mut lowest = IioDhtSource::new(&dht_config(root), Duration::from_secs(5));
        assert_eq!(lowest.read().unwrap().unwrap()[0].valor, 20.0);

        let mut tenth = IioDhtSource::new(
            &IioDhtConfig {
                device_index: Some(10),
                ..dht_config(root)
            },
            Duration::from_secs(5),
        );
        assert_eq!(tenth.read().unwrap().unwrap()[0].valor, 25.0);

        // An index whose device has another name is not a match.
        let mut wrong = IioDhtSource::new(
            &IioDhtConfig {
                device_index: Some(3),
                ..dht_config(root)
            },
            Duration::from_secs(5),
        );
        assert!(matches!(wrong.read(), Err(SensorError::PortLost(_))));
    }

    #[test]
    fn dht_rejects_implausible_values_and_jumps() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = dht_device(tmp.path(), 0, "21000\n", "40000\n");
        let mut source = IioDhtSource::new(&dht_config(tmp.path()), Duration::from_secs(2));
        assert!(source.read().unwrap().is_some());

        // The DHT22's doubled value with a valid checksum, moments later.
        fs::write(dir.join("in_temp_input"), "42000\n").unwrap();
        assert!(matches!(source.read(), Err(SensorError::Implausible(_))));
        fs::write(dir.join("in_temp_input"), "21100\n").unwrap();
        assert_eq!(source.read().unwrap().unwrap()[0].valor, 21.1);

        fs::write(dir.join("in_humidityrelative_input"), "120000\n").unwrap();
        assert!(matches!(source.read(), Err(SensorError::Implausible(_))));
    }

    #[test]
    fn dht11_model_uses_its_narrower_range() {
        let tmp = tempfile::tempdir().unwrap();
        dht_device(tmp.path(), 0, "-5000\n", "40000\n");
        let config = IioDhtConfig {
            model: DhtModel::Dht11,
            ..dht_config(tmp.path())
        };
        assert!(matches!(
            IioDhtSource::new(&config, Duration::from_secs(2)).read(),
            Err(SensorError::Implausible(_))
        ));
        assert!(
            IioDhtSource::new(&dht_config(tmp.path()), Duration::from_secs(2))
                .read()
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn missing_channel_file_is_a_loss_reported_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = dht_device(tmp.path(), 0, "21000\n", "40000\n");
        let mut source = IioDhtSource::new(&dht_config(tmp.path()), Duration::from_secs(2));
        assert!(source.read().unwrap().is_some());

        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(source.read(), Err(SensorError::PortLost(_))));
        assert!(!source.is_connected());
        assert_eq!(source.read(), Ok(None));

        dht_device(tmp.path(), 4, "21500\n", "40000\n");
        assert_eq!(source.read().unwrap().unwrap()[0].valor, 21.5);
        assert!(source.is_connected());
    }

    #[test]
    fn garbage_in_a_channel_is_malformed() {
        let tmp = tempfile::tempdir().unwrap();
        dht_device(tmp.path(), 0, "twenty\n", "40000\n");
        let mut source = IioDhtSource::new(&dht_config(tmp.path()), Duration::from_secs(2));
        assert!(matches!(source.read(), Err(SensorError::Malformed(_))));
        assert!(source.is_connected());
    }

    #[test]
    fn unreadable_channel_is_an_io_error() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory where the attribute should be: reading it fails with EISDIR.
        let dir = add_device(
            tmp.path(),
            0,
            "dht11",
            &[("in_humidityrelative_input", "1")],
        );
        fs::create_dir(dir.join("in_temp_input")).unwrap();
        let mut source = IioDhtSource::new(&dht_config(tmp.path()), Duration::from_secs(2));
        assert!(matches!(source.read(), Err(SensorError::Io(_))));
    }

    #[test]
    fn config_has_defaults_and_refuses_unknown_fields() {
        let dht: IioDhtConfig = serde_json::from_str(r#"{"model": "dht22"}"#).unwrap();
        assert_eq!(dht, dht_config(Path::new("/sys")));
        assert!(serde_json::from_str::<IioDhtConfig>(r#"{}"#).is_err());
        assert!(serde_json::from_str::<IioDhtConfig>(r#"{"model": "dht22", "pin": 4}"#).is_err());
    }
}
