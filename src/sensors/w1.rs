//! DS18B20 temperature sensors on the kernel's 1-Wire bus (`dtoverlay=w1-gpio`).
//!
//! The `w1_therm` driver exposes each sensor as `<root>/bus/w1/devices/28-<serial>/`. Its
//! `w1_slave` file runs a conversion (about 750 ms at 12 bits) and prints the scratchpad
//! with the driver's CRC verdict, then the value in milli-degrees; newer kernels also offer
//! a bare `temperature` file. The text is parsed by pure functions; [`W1Source`] only finds
//! and reads the file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::source::{Measurement, Pacing, SensorError, Source};

/// The DS18B20 datasheet range.
const MIN_CELSIUS: f64 = -55.0;
const MAX_CELSIUS: f64 = 125.0;
/// The scratchpad's reset value: the sensor reports it when read before any conversion
/// completed (typically after a brown-out), so it is never taken as a temperature.
const POWER_ON_MILLI: i64 = 85_000;
/// A conversion takes 750 ms; reading faster only queues conversions on the bus.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The family code of the DS18B20 in 1-Wire device names.
const DS18B20_FAMILY: &str = "28-";

/// Parses `w1_slave`:
///
/// ```text
/// 72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
/// 72 01 4b 46 7f ff 0e 10 57 t=23125
/// ```
///
/// The value is trusted only when the first line ends in `YES` (the driver's CRC check).
/// An all-zero scratchpad also passes the CRC (the CRC of zeros is zero) and is what a bus
/// held low by a shorted or half-connected sensor reads as, so it is rejected too.
pub fn parse_w1_slave(text: &str) -> Result<f64, SensorError> {
    let mut lines = text.lines();
    let (Some(check), Some(data)) = (lines.next(), lines.next()) else {
        return Err(SensorError::Malformed(format!(
            "w1_slave needs two lines, got {text:?}"
        )));
    };
    let check = check.trim_end();
    if check.ends_with("NO") {
        return Err(SensorError::Checksum);
    }
    if !check.ends_with("YES") {
        return Err(SensorError::Malformed(format!(
            "w1_slave CRC line {check:?}"
        )));
    }
    let scratchpad = check.split(':').next().unwrap_or_default();
    let mut bytes = scratchpad.split_whitespace().peekable();
    if bytes.peek().is_some() && bytes.all(|b| b == "00") {
        return Err(SensorError::Implausible(
            "all-zero scratchpad: the bus is held low".into(),
        ));
    }
    let Some((_, value)) = data.rsplit_once("t=") else {
        return Err(SensorError::Malformed(format!(
            "w1_slave data line {data:?} has no t="
        )));
    };
    milli_celsius(value)
}

/// Parses the `temperature` file: milli-degrees on one line. The driver has checked the
/// CRC already (it fails the read otherwise).
pub fn parse_temperature_file(text: &str) -> Result<f64, SensorError> {
    milli_celsius(text)
}

fn milli_celsius(text: &str) -> Result<f64, SensorError> {
    let text = text.trim();
    let milli: i64 = text
        .parse()
        .map_err(|_| SensorError::Malformed(format!("temperature {text:?} is not an integer")))?;
    if milli == POWER_ON_MILLI {
        return Err(SensorError::Implausible(
            "85 °C is the DS18B20 power-on value".into(),
        ));
    }
    let celsius = milli as f64 / 1000.0;
    if !(MIN_CELSIUS..=MAX_CELSIUS).contains(&celsius) {
        return Err(SensorError::Implausible(format!(
            "{celsius} °C outside the DS18B20 range"
        )));
    }
    Ok(celsius)
}

/// Which DS18B20 to read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct W1Config {
    /// The 1-Wire id, e.g. `28-000005e2fdc3` (see `ls /sys/bus/w1/devices`). Without it
    /// the first DS18B20 found is used, which is only stable with a single sensor.
    #[serde(default)]
    pub sensor_id: Option<String>,
    /// Where sysfs is mounted; tests point it at a temporary tree.
    #[serde(default = "default_sysfs_root")]
    pub sysfs_root: PathBuf,
}

fn default_sysfs_root() -> PathBuf {
    PathBuf::from("/sys")
}

/// One DS18B20 read once per interval.
#[derive(Debug)]
pub struct W1Source {
    config: W1Config,
    interval: Duration,
    /// The sensor's directory once found; forgotten when it disappears so that the next
    /// read looks again (a replaced sensor has a new id).
    device: Option<PathBuf>,
    loss_reported: bool,
}

impl W1Source {
    /// A source reading every `interval` (at least [`MIN_INTERVAL`]). Nothing is opened
    /// here: a sensor that is missing at start-up is reported by the first `read`.
    pub fn new(config: &W1Config, interval: Duration) -> Self {
        W1Source {
            config: config.clone(),
            interval: interval.max(MIN_INTERVAL),
            device: None,
            loss_reported: false,
        }
    }

    fn find_device(&self) -> io::Result<Option<PathBuf>> {
        let devices = self.config.sysfs_root.join("bus/w1/devices");
        if let Some(id) = &self.config.sensor_id {
            let dir = devices.join(id);
            return Ok(dir.is_dir().then_some(dir));
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(&devices)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(DS18B20_FAMILY)
            {
                found.push(entry.path());
            }
        }
        found.sort();
        Ok(found.into_iter().next())
    }

    /// The loss is reported once; later reads while the sensor is still away are quiet.
    fn lost(&mut self, why: String) -> Result<Option<Vec<Measurement>>, SensorError> {
        self.device = None;
        if self.loss_reported {
            Ok(None)
        } else {
            self.loss_reported = true;
            Err(SensorError::PortLost(why))
        }
    }
}

/// Reads the sensor's value, preferring `w1_slave` for its CRC verdict.
fn read_celsius(dir: &Path) -> io::Result<Result<f64, SensorError>> {
    match fs::read_to_string(dir.join("w1_slave")) {
        Ok(text) => Ok(parse_w1_slave(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::read_to_string(dir.join("temperature")).map(|text| parse_temperature_file(&text))
        }
        Err(e) => Err(e),
    }
}

/// ENODEV: the sensor dropped off the bus while its file was being read.
const ENODEV: i32 = 19;

impl Source for W1Source {
    fn is_connected(&self) -> bool {
        self.device.is_some()
    }

    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError> {
        let dir = match &self.device {
            Some(dir) => dir.clone(),
            None => match self.find_device() {
                Ok(Some(dir)) => dir,
                Ok(None) => {
                    let which = self.config.sensor_id.as_deref().unwrap_or("no DS18B20");
                    return self.lost(format!("{which} on the 1-Wire bus"));
                }
                Err(e) => return self.lost(format!("1-Wire bus: {e}")),
            },
        };
        match read_celsius(&dir) {
            Ok(value) => {
                self.device = Some(dir);
                self.loss_reported = false;
                Ok(Some(vec![Measurement::new("temperatura", value?, "°C")]))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(ENODEV) => {
                self.lost(format!("{}: {e}", dir.display()))
            }
            Err(e) => Err(SensorError::Io(format!("{}: {e}", dir.display()))),
        }
    }

    fn pacing(&self) -> Pacing {
        Pacing::Every(self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n\
                        72 01 4b 46 7f ff 0e 10 57 t=23125\n";

    #[test]
    fn parses_a_good_reading() {
        assert_eq!(parse_w1_slave(GOOD), Ok(23.125));
    }

    #[test]
    fn crc_no_is_a_checksum_error() {
        let text = "72 01 4b 46 7f ff 0e 10 57 : crc=a1 NO\n\
                    72 01 4b 46 7f ff 0e 10 57 t=23125\n";
        assert_eq!(parse_w1_slave(text), Err(SensorError::Checksum));
    }

    #[test]
    fn power_on_value_is_implausible() {
        let text = "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n\
                    50 05 4b 46 7f ff 0c 10 1c t=85000\n";
        assert!(matches!(
            parse_w1_slave(text),
            Err(SensorError::Implausible(why)) if why.contains("power-on")
        ));
        assert!(matches!(
            parse_temperature_file("85000\n"),
            Err(SensorError::Implausible(_))
        ));
    }

    #[test]
    fn negative_temperatures() {
        let text = "ec ff 4b 46 7f ff 0c 10 76 : crc=76 YES\n\
                    ec ff 4b 46 7f ff 0c 10 76 t=-1250\n";
        assert_eq!(parse_w1_slave(text), Ok(-1.25));
        assert_eq!(parse_temperature_file("-55000\n"), Ok(-55.0));
    }

    #[test]
    fn all_zero_scratchpad_is_implausible() {
        let text = "00 00 00 00 00 00 00 00 00 : crc=00 YES\n\
                    00 00 00 00 00 00 00 00 00 t=0\n";
        assert!(matches!(
            parse_w1_slave(text),
            Err(SensorError::Implausible(_))
        ));
    }

    #[test]
    fn out_of_range_is_implausible() {
        assert!(matches!(
            parse_temperature_file("127937"),
            Err(SensorError::Implausible(_))
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        for text in [
            "",
            "72 01 : crc=57 YES\n",
            "72 01 : crc=57 MAYBE\n72 01 t=1000\n",
            "72 01 : crc=57 YES\n72 01 x=1000\n",
            "72 01 : crc=57 YES\n72 01 t=21.5\n",
        ] {
            assert!(
                matches!(parse_w1_slave(text), Err(SensorError::Malformed(_))),
                "{text:?}"
            );
        }
        assert!(matches!(
            parse_temperature_file(""),
            Err(SensorError::Malformed(_))
        ));
    }

    fn add_sensor(root: &Path, id: &str, w1_slave: &str) -> PathBuf {
        let dir = root.join("bus/w1/devices").join(id);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("w1_slave"), w1_slave).unwrap();
        dir
    }

    fn config(root: &Path, sensor_id: Option<&str>) -> W1Config {
        W1Config {
            sensor_id: sensor_id.map(str::to_owned),
            sysfs_root: root.to_owned(),
        }
    }

    #[test]
    fn reads_the_first_ds18b20_or_the_configured_one() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("bus/w1/devices/w1_bus_master1")).unwrap();
        add_sensor(root, "28-000005e2fdc3", GOOD);
        add_sensor(
            root,
            "28-0000075c3a11",
            "ec ff 4b 46 7f ff 0c 10 76 : crc=76 YES\nec ff 4b 46 7f ff 0c 10 76 t=-1250\n",
        );

        let mut first = W1Source::new(&config(root, None), Duration::from_secs(10));
        assert_eq!(
            first.read(),
            Ok(Some(vec![Measurement::new("temperatura", 23.125, "°C")]))
        );
        assert!(first.is_connected());
        assert_eq!(first.pacing(), Pacing::Every(Duration::from_secs(10)));

        let mut chosen = W1Source::new(
            &config(root, Some("28-0000075c3a11")),
            Duration::from_millis(10),
        );
        assert_eq!(
            chosen.read(),
            Ok(Some(vec![Measurement::new("temperatura", -1.25, "°C")]))
        );
        assert_eq!(chosen.pacing(), Pacing::Every(MIN_INTERVAL));
    }

    #[test]
    fn falls_back_to_the_temperature_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bus/w1/devices/28-000005e2fdc3");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("temperature"), "21437\n").unwrap();
        let mut source = W1Source::new(&config(tmp.path(), None), MIN_INTERVAL);
        assert_eq!(
            source.read(),
            Ok(Some(vec![Measurement::new("temperatura", 21.437, "°C")]))
        );
    }

    #[test]
    fn a_vanished_sensor_is_reported_once_then_found_again() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let id = "28-000005e2fdc3";
        let dir = add_sensor(root, id, GOOD);
        let mut source = W1Source::new(&config(root, Some(id)), MIN_INTERVAL);
        assert!(source.read().unwrap().is_some());

        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(source.read(), Err(SensorError::PortLost(_))));
        assert!(!source.is_connected());
        assert_eq!(source.read(), Ok(None));
        assert_eq!(source.read(), Ok(None));

        add_sensor(root, id, GOOD);
        assert_eq!(
            source.read(),
            Ok(Some(vec![Measurement::new("temperatura", 23.125, "°C")]))
        );
        assert!(source.is_connected());

        // A bad reading is an error of its own and does not count as a loss.
        fs::write(dir.join("w1_slave"), "72 01 : crc=57 NO\n72 01 t=23125\n").unwrap();
        assert_eq!(source.read(), Err(SensorError::Checksum));
        assert!(source.is_connected());
    }

    #[test]
    fn no_sensor_at_start_is_a_loss() {
        let tmp = tempfile::tempdir().unwrap();
        let mut source = W1Source::new(&config(tmp.path(), None), MIN_INTERVAL);
        assert!(matches!(source.read(), Err(SensorError::PortLost(_))));
        assert_eq!(source.read(), Ok(None));
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: W1Config = serde_json::from_str("{}").unwrap();
        assert_eq!(c, config(Path::new("/sys"), None));
        assert!(serde_json::from_str::<W1Config>(r#"{"id": "28-1"}"#).is_err());
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn scratchpad() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..10).prop_map(|bytes| {
                    bytes
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                }),
                Just("00 00 00 00 00 00 00 00 00".to_owned()),
                ".{0,30}",
            ]
        }

        fn milli_text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|m| m.to_string()),
                (-60_000i64..130_000).prop_map(|m| m.to_string()),
                Just("85000".to_owned()),
                "[0-9]{19,40}",
                "[-+ ]?[0-9a-z.]{0,8}",
            ]
        }

        /// The driver's two lines, right and wrong in every part.
        fn w1_slave_text() -> impl Strategy<Value = String> {
            (
                scratchpad(),
                prop::sample::select(vec![
                    " : crc=57 YES",
                    " : crc=a1 NO",
                    " : crc=57",
                    "YES",
                    "",
                ]),
                prop::sample::select(vec!["\n", "\r\n", "", "\n\n"]),
                scratchpad(),
                prop::sample::select(vec![" t=", "t=", " t= ", " ", "t=t="]),
                milli_text(),
                prop::sample::select(vec!["\n", "", "\nextra\n"]),
            )
                .prop_map(|(a, crc, nl, b, t, milli, end)| {
                    format!("{a}{crc}{nl}{b}{t}{milli}{end}")
                })
        }

        fn check(text: &str, outcome: Result<f64, SensorError>) -> Result<(), TestCaseError> {
            match outcome {
                Ok(celsius) => {
                    prop_assert!(celsius.is_finite());
                    prop_assert!(
                        (MIN_CELSIUS..=MAX_CELSIUS).contains(&celsius),
                        "{}",
                        celsius
                    );
                    prop_assert!(celsius != 85.0);
                }
                Err(e) => prop_assert!(e.to_string().len() <= 200 + 10 * text.len(), "{}", e),
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn w1_slave_values_are_in_range_or_refused(
                text in prop_oneof![3 => w1_slave_text(), 1 => ".{0,200}"]
            ) {
                check(&text, parse_w1_slave(&text))?;
                // A value is only ever taken from a line the driver's CRC check passed.
                if parse_w1_slave(&text).is_ok() {
                    prop_assert!(text.lines().next().unwrap_or("").trim_end().ends_with("YES"));
                }
            }

            #[test]
            fn temperature_file_values_are_in_range_or_refused(text in milli_text()) {
                check(&text, parse_temperature_file(&text))?;
            }

            #[test]
            fn good_readings_read_back(
                milli in -55_000i64..=125_000,
                pad in prop::collection::vec(1u8..=255, 9),
            ) {
                prop_assume!(milli != POWER_ON_MILLI);
                let pad: Vec<String> = pad.iter().map(|b| format!("{b:02x}")).collect();
                let pad = pad.join(" ");
                let text = format!("{pad} : crc=57 YES\n{pad} t={milli}\n");
                prop_assert_eq!(parse_w1_slave(&text), Ok(milli as f64 / 1000.0));
            }
        }
    }
}
