//! The demo's stand-in hardware: a microcontroller on a pseudo-terminal and a sysfs tree
//! with a DHT22, a BME280 and a DS18B20, laid out as the kernel lays them out, so that
//! `--demo` exercises the real serial, IIO and 1-Wire sources end to end.

use std::f64::consts::TAU;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serialport::{SerialPort, TTYPort};

/// How often the stand-in devices produce new values.
const TICK: Duration = Duration::from_secs(1);

/// Running stand-in devices; dropping it stops them.
pub struct Rig {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sensors: String,
    /// The terminal's far end must stay open for the serial source to read from it.
    _device_end: TTYPort,
}

impl Rig {
    /// Lays out the sysfs tree under `dir`, opens a pseudo-terminal, and starts
    /// writing values to both.
    pub fn start(dir: &Path) -> std::io::Result<Rig> {
        let sysfs = Sysfs::at(&dir.join("demo-sysfs"));
        let dht = sysfs.iio_device(0, "dht11")?;
        let bme = sysfs.iio_device(1, "bme280")?;
        let w1 = sysfs.w1_device("28-0000075e2fd1")?;

        let (mut controller, device_end) = TTYPort::pair().map_err(std::io::Error::other)?;
        let tty = device_end
            .name()
            .ok_or_else(|| std::io::Error::other("pseudo-terminal has no name"))?;
        let sensors = sensors_toml(&tty, sysfs.root());

        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let files = Files { dht, bme, w1 };
        let thread = std::thread::Builder::new()
            .name("demo-rig".into())
            .spawn(move || {
                let started = Instant::now();
                let mut tick = 0u64;
                while !stopping.load(Ordering::Relaxed) {
                    let t = started.elapsed().as_secs_f64();
                    if let Err(e) = files.write(t) {
                        log::warn!("demo sysfs tree: {e}");
                    }
                    if tick.is_multiple_of(2) {
                        let line = if tick % 40 == 20 {
                            // Now and then a line no parser accepts, as real firmware does.
                            "#boot v1.2 @@\n".to_owned()
                        } else {
                            format!(
                                "T={:.1} H={:.1}\n",
                                wave(t, 19.0, 1.2, 300.0),
                                wave(t, 62.0, 4.0, 420.0)
                            )
                        };
                        let _ = controller.write_all(line.as_bytes());
                    }
                    tick += 1;
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(Rig {
            stop,
            thread: Some(thread),
            sensors,
            _device_end: device_end,
        })
    }

    /// `[[sensor]]` tables for the stand-in devices, to append to the demo config.
    pub fn sensors_toml(&self) -> &str {
        &self.sensors
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sensors_toml(tty: &str, sysfs: &Path) -> String {
    let root = sysfs.display().to_string();
    format!(
        r#"
[[sensor]]
name = "arduino-serie"
tipo = "temperatura"
modelo = "Arduino + SHT31"
ubicacion = "Semillero"
interval_s = 2
source = {{ kind = "serial", path = {tty:?} }}

[[sensor]]
name = "dht22-iio"
tipo = "temperatura"
modelo = "DHT22"
ubicacion = "Invernadero sur"
interval_s = 2
source = {{ kind = "iio_dht", model = "dht22", sysfs_root = {root:?} }}

[[sensor]]
name = "bme280-iio"
tipo = "presion"
modelo = "BME280"
ubicacion = "Caseta"
interval_s = 5
source = {{ kind = "iio", device_name = "bme280", sysfs_root = {root:?} }}

[[sensor]]
name = "ds18b20-w1"
tipo = "temperatura"
modelo = "DS18B20"
ubicacion = "Depósito de agua"
interval_s = 5
source = {{ kind = "w1", sysfs_root = {root:?} }}
"#
    )
}

/// A slow swing around `base`.
fn wave(t: f64, base: f64, amplitude: f64, period_s: f64) -> f64 {
    base + amplitude * (TAU * t / period_s).sin()
}

struct Files {
    dht: PathBuf,
    bme: PathBuf,
    w1: PathBuf,
}

impl Files {
    /// Writes values in the kernel's units: IIO milli-degrees and milli-percent, kPa;
    /// 1-Wire's two-line `w1_slave` text with milli-degrees.
    fn write(&self, t: f64) -> std::io::Result<()> {
        let milli = |x: f64| format!("{}\n", (x * 1000.0).round() as i64);
        let put = Sysfs::set;
        put(
            &self.dht,
            "in_temp_input",
            &milli(wave(t, 23.0, 1.5, 600.0)),
        )?;
        put(
            &self.dht,
            "in_humidityrelative_input",
            &milli(wave(t, 58.0, 3.0, 500.0)),
        )?;
        put(
            &self.bme,
            "in_temp_input",
            &milli(wave(t, 17.5, 1.0, 700.0)),
        )?;
        put(
            &self.bme,
            "in_humidityrelative_input",
            &milli(wave(t, 66.0, 2.0, 650.0)),
        )?;
        put(
            &self.bme,
            "in_pressure_input",
            &format!("{:.3}\n", wave(t, 101.32, 0.05, 900.0)),
        )?;
        let water = (wave(t, 12.0, 0.4, 800.0) * 1000.0).round() as i64;
        put(&self.w1, "w1_slave", &w1_slave("YES", water))
    }
}

/// A sysfs tree laid out as the kernel lays out IIO and 1-Wire devices: the demo's
/// stand-in hardware, and the tests' fake sensors.
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// A tree under `root`, the `sysfs_root` of the sources that read it.
    pub fn at(root: &Path) -> Sysfs {
        Sysfs {
            root: root.to_owned(),
        }
    }

    /// The `sysfs_root` of the sources that read this tree.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Lays out `bus/iio/devices/iio:deviceN` with the driver's `name`; returns its
    /// directory.
    pub fn iio_device(&self, n: u32, name: &str) -> std::io::Result<PathBuf> {
        let device = self.root.join(format!("bus/iio/devices/iio:device{n}"));
        std::fs::create_dir_all(&device)?;
        Sysfs::set(&device, "name", &format!("{name}\n"))?;
        Ok(device)
    }

    /// Lays out `bus/w1/devices/<id>` beside the bus master's entry; returns its
    /// directory.
    pub fn w1_device(&self, id: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(self.root.join("bus/w1/devices/w1_bus_master1"))?;
        let device = self.root.join("bus/w1/devices").join(id);
        std::fs::create_dir_all(&device)?;
        Ok(device)
    }

    /// Replaces the attribute `name` of `device` in one step, as the kernel presents a
    /// value: a reader never sees it half written.
    pub fn set(device: &Path, name: &str, text: &str) -> std::io::Result<()> {
        let staged = device.join(format!(".{name}.new"));
        std::fs::write(&staged, text)?;
        std::fs::rename(staged, device.join(name))
    }
}

/// The `w1_slave` text of a DS18B20: the CRC check's verdict (`YES` or `NO`) and the
/// temperature in milli-degrees.
pub fn w1_slave(crc: &str, milli: i64) -> String {
    format!("72 01 4b 46 7f ff 0e 10 57 : crc=57 {crc}\n72 01 4b 46 7f ff 0e 10 57 t={milli}\n")
}
