//! Sensor acquisition: sources, the scheduler that drives them, and their health.
//!
//! Each sampled sensor has its own thread (sysfs and serial reads block) that reads at
//! the source's pace and hands every sample to the store writer, the one path by which
//! data enters the daemon. The scheduler decides which sensors are sampled from the
//! sensor records themselves: a sensor with an active `fuente` is sampled, whether it
//! came from the config file or from REST, and a change to it (an event on `sensors`)
//! restarts or stops its thread.
//!
//! Between the source and the writer, the thread corrects each sample by the sensor's
//! calibration and adds the values derived from it, so that they enter storage
//! with the sample, as readings like any other. A change to either reaches the running
//! thread without restarting it (a serial device stays open, a DHT's filter keeps its
//! history).

pub mod dht;
pub mod health;
pub mod iio;
pub mod modbus;
pub mod serial;
pub mod sim;
pub mod source;
pub mod w1;

pub use health::{HealthBoard, Salud};
pub use source::{Measurement, Pacing, SensorError, Source};

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::clock::{Clock, ClockTrust};
use crate::model::derived::{self, Derived};
use crate::model::{now_micros, Calibration, Sample, Sensor};
use crate::shutdown::Shutdown;
use health::{Tracker, Transition};

/// Where a sensor's samples come from: the `fuente` of a sensor record, and the `source`
/// of a `[[sensor]]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    /// A simulated sensor.
    Sim(sim::SimConfig),
    /// A microcontroller printing lines on a serial port.
    Serial(serial::SerialConfig),
    /// A DHT11/DHT22 through the kernel's `dht11` IIO driver.
    IioDht(dht::IioDhtConfig),
    /// Any other IIO sensor (BME280, SHT3x, ...).
    Iio(iio::IioConfig),
    /// A DS18B20 on the 1-Wire bus.
    W1(w1::W1Config),
    /// A DHT11/DHT22 read directly on a GPIO line.
    GpioDht(dht::GpioDhtConfig),
    /// A Modbus RTU device on an RS-485 line, or a Modbus TCP device.
    Modbus(modbus::ModbusConfig),
}

/// Sensor sampling and health.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// A sensor with no good sample for this many intervals is reported offline.
    pub offline_after_intervals: u32,
    /// Which sample times to trust; the others are stored flagged `hora_dudosa`.
    pub trust_clock: ClockTrust,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            offline_after_intervals: 5,
            trust_clock: ClockTrust::default(),
        }
    }
}

/// Whether a `fuente` describes a source the daemon can drive ([`SourceSpec`]), and if
/// not, why: the check the model runs on every `fuente` a client sends.
pub fn check_source(fuente: &Value) -> Result<(), String> {
    serde_json::from_value::<SourceSpec>(fuente.clone())
        .map(drop)
        .map_err(|e| e.to_string())
}

impl SourceSpec {
    /// Builds the source; no device is opened until its first read.
    fn build(&self, interval: Duration) -> Box<dyn Source> {
        match self {
            SourceSpec::Sim(c) => Box::new(sim::SimSource::new(c.clone(), interval)),
            SourceSpec::Serial(c) => Box::new(serial::SerialSource::new(c)),
            SourceSpec::IioDht(c) => Box::new(dht::IioDhtSource::new(c, interval)),
            SourceSpec::Iio(c) => Box::new(iio::IioSource::new(c, interval)),
            SourceSpec::W1(c) => Box::new(w1::W1Source::new(c, interval)),
            SourceSpec::GpioDht(c) => Box::new(dht::GpioDhtSource::new(c, interval)),
            SourceSpec::Modbus(c) => Box::new(modbus::ModbusSource::new(c, interval)),
        }
    }
}

/// Sampling interval when a sensor record gives none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// What makes a sensor sampled, taken from its record.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    spec: SourceSpec,
    interval: Duration,
}

impl Plan {
    fn of(sensor: &Sensor) -> Option<Plan> {
        if !sensor.activo {
            return None;
        }
        let fuente = sensor.fuente.clone()?;
        match serde_json::from_value::<SourceSpec>(fuente) {
            Ok(spec) => Some(Plan {
                spec,
                interval: sensor
                    .intervalo
                    .map(Duration::from_secs_f64)
                    .unwrap_or(DEFAULT_INTERVAL),
            }),
            Err(e) => {
                log::error!(
                    "sensor {}: source not understood, not sampled: {e}",
                    sensor.id
                );
                None
            }
        }
    }
}

/// Where the sensors' output goes: samples to storage, health changes to clients. Wired
/// to the store in `app`; the sensors know nothing of what is behind it.
pub trait SampleSink: Send + Sync {
    /// Hands samples over for storage, waiting while storage is busy (a bounded queue:
    /// a slow card pushes back on the sources). Fails once storage has stopped.
    fn submit(&self, samples: Vec<Sample>) -> Result<(), SinkClosed>;

    /// Tells clients of a sensor's health change (`sensor_offline`, `sensor_online`,
    /// ...), with its `data`; stored and numbered like every event.
    fn announce(&self, sensor_id: i64, event_type: &str, data: Value);
}

/// The sink takes nothing more: storage has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkClosed;

/// A change to the sensor records, as the scheduler hears of it.
#[derive(Debug, Clone, PartialEq)]
pub enum SensorChange {
    /// Every sensor record: at start, and again after changes were missed. `None` when
    /// they could not be read; the sensors sampled then stay as they are.
    All(Option<Vec<Sensor>>),
    /// A sensor created or updated, as it is now.
    Saved(Sensor),
    /// A sensor deleted.
    Deleted(i64),
}

/// Runs one thread per sampled sensor and keeps the set in step with the sensor records.
pub struct Scheduler {
    sink: Arc<dyn SampleSink>,
    health: Arc<HealthBoard>,
    clock: Arc<Clock>,
    offline_after_intervals: u32,
    running: HashMap<i64, Running>,
}

struct Running {
    plan: Plan,
    /// What the thread does to each sample; changed in place, without restarting it.
    processing: SharedProcessing,
    /// Dropping the sender wakes the thread out of its sleep and ends it.
    stop: mpsc::Sender<()>,
    /// Disconnects when the thread has ended.
    done: mpsc::Receiver<()>,
    thread: JoinHandle<()>,
}

/// How long stopping a sensor waits for its thread.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// Longest a single read may block before the thread counts as stuck.
const MAX_READ_TIME: Duration = Duration::from_secs(5);

impl Scheduler {
    pub fn new(
        sink: Arc<dyn SampleSink>,
        health: Arc<HealthBoard>,
        clock: Arc<Clock>,
        offline_after_intervals: u32,
    ) -> Scheduler {
        Scheduler {
            sink,
            health,
            clock,
            offline_after_intervals,
            running: HashMap::new(),
        }
    }

    /// Samples every sensor whose record has an active source, follows `changes` to the
    /// records until `shutdown`, then stops every thread. The first change is every
    /// record.
    ///
    /// `started` is told, with their number, once the sensors sampled at start have
    /// their threads running.
    pub async fn run(
        mut self,
        mut changes: tokio::sync::mpsc::Receiver<SensorChange>,
        mut shutdown: Shutdown,
        started: oneshot::Sender<usize>,
    ) {
        let _running = RunningFlag::set(self.health.clone());
        let mut started = Some(started);
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
                change = changes.recv() => match change {
                    Some(SensorChange::All(sensors)) => {
                        if let Some(sensors) = sensors {
                            self.resync(&sensors).await;
                        }
                        if let Some(started) = started.take() {
                            let _ = started.send(self.running.len());
                        }
                    }
                    Some(SensorChange::Saved(sensor)) => self.apply(&sensor).await,
                    Some(SensorChange::Deleted(id)) => {
                        self.stop(id).await;
                        self.health.forget(id);
                    }
                    None => break,
                }
            }
        }
        let ids: Vec<i64> = self.running.keys().copied().collect();
        self.stop_all(ids).await;
    }

    /// Brings the running set in line with every sensor record.
    async fn resync(&mut self, sensors: &[Sensor]) {
        let ids: Vec<i64> = sensors.iter().map(|s| s.id).collect();
        let gone: Vec<i64> = self
            .running
            .keys()
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        self.stop_all(gone.clone()).await;
        gone.iter().for_each(|id| self.health.forget(*id));
        for sensor in sensors {
            self.apply(sensor).await;
        }
        log::info!("{} sensors sampled", self.running.len());
    }

    /// Starts, restarts or stops a sensor's thread as its record says.
    async fn apply(&mut self, sensor: &Sensor) {
        let plan = Plan::of(sensor);
        let processing = Processing::of(sensor);
        if let Some(running) = self.running.get(&sensor.id) {
            if Some(&running.plan) == plan.as_ref() {
                // A new calibration reaches the running thread: its device stays open.
                let mut current = running
                    .processing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if **current != processing {
                    *current = Arc::new(processing);
                }
                return;
            }
        }
        self.stop(sensor.id).await;
        let Some(plan) = plan else { return };
        let (stop, stopped) = mpsc::channel();
        let (finished, done) = mpsc::channel::<()>();
        let source = plan.spec.build(plan.interval);
        // Sources that cannot be read that often (a DHT at most every 2 s) pace
        // themselves slower; "N intervals" means N of their reads.
        let pace = match source.pacing() {
            Pacing::Every(every) => every.max(plan.interval),
            Pacing::Streaming => plan.interval,
        };
        let shared: SharedProcessing = Arc::new(Mutex::new(Arc::new(processing)));
        let worker = Worker {
            sensor_id: sensor.id,
            source,
            processing: shared.clone(),
            sink: self.sink.clone(),
            health: self.health.clone(),
            clock: self.clock.clone(),
            offline_after: pace * self.offline_after_intervals,
            allowed_gap: pace.max(Duration::from_secs(1)) * 2 + MAX_READ_TIME,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("sensor-{}", sensor.id))
            .spawn(move || {
                // Dropped when the thread ends, however it ends.
                let _finished = finished;
                worker.run(stopped)
            });
        match spawned {
            Ok(thread) => {
                log::info!("sensor {} sampled every {:?}", sensor.id, pace);
                let running = Running {
                    plan,
                    processing: shared,
                    stop,
                    done,
                    thread,
                };
                self.running.insert(sensor.id, running);
            }
            Err(e) => log::error!("sensor {}: cannot start its thread: {e}", sensor.id),
        }
    }

    /// Stops one sensor's thread, as [`Scheduler::stop_all`] does.
    async fn stop(&mut self, sensor_id: i64) {
        self.stop_all(vec![sensor_id]).await;
    }

    /// Stops sensors' threads and waits for them, off the async threads and for at most
    /// [`STOP_WAIT`] in all: a thread stuck in a hung driver is left behind rather than
    /// holding up reconfiguration or shutdown. Every thread is told before any is waited
    /// for: one told later would go on filling the writer's queue, and the sources
    /// waiting for room in it would each take their turn.
    async fn stop_all(&mut self, sensor_ids: Vec<i64>) {
        let stopping: Vec<(i64, mpsc::Receiver<()>, JoinHandle<()>)> = sensor_ids
            .into_iter()
            .filter_map(|id| self.running.remove(&id).map(|running| (id, running)))
            .map(|(id, running)| {
                drop(running.stop);
                (id, running.done, running.thread)
            })
            .collect();
        if stopping.is_empty() {
            return;
        }
        let ids: Vec<i64> = stopping.iter().map(|(id, ..)| *id).collect();
        let ended = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + STOP_WAIT;
            stopping
                .into_iter()
                .map(|(id, done, thread)| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ended = match done.recv_timeout(left) {
                        Err(RecvTimeoutError::Timeout) => None,
                        _ => Some(thread.join().is_ok()),
                    };
                    (id, ended)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|_| ids.iter().map(|&id| (id, Some(false))).collect());
        for (sensor_id, ended) in ended {
            match ended {
                Some(true) => {}
                None => {
                    log::error!("sensor {sensor_id}: sampling thread stuck in a read, left behind")
                }
                Some(false) => log::error!("sensor {sensor_id}: sampling thread panicked"),
            }
            self.health.remove(sensor_id);
        }
    }
}

/// What is done to each sample between the source and the store: its calibration, then
/// the values derived from it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Processing {
    calibration: Calibration,
    derive: Vec<Derived>,
}

impl Processing {
    fn of(sensor: &Sensor) -> Processing {
        Processing {
            calibration: sensor.calibracion.clone(),
            derive: sensor.derivados.clone(),
        }
    }

    /// Corrects a sample and adds what is derived from the corrected values, or says why
    /// the corrected sample cannot be right.
    fn apply(&self, measurements: &mut Vec<Measurement>) -> Result<(), SensorError> {
        self.calibration
            .apply(measurements)
            .map_err(SensorError::Implausible)?;
        let derived = derived::derive(measurements, &self.derive);
        measurements.extend(derived);
        Ok(())
    }
}

/// A sampling thread's processing, shared with the scheduler, which replaces it when the
/// sensor's calibration or derived values change.
type SharedProcessing = Arc<Mutex<Arc<Processing>>>;

/// Marks the scheduler as running for as long as it lives, so the watchdog notices a
/// scheduler that died.
struct RunningFlag(Arc<HealthBoard>);

impl RunningFlag {
    fn set(health: Arc<HealthBoard>) -> RunningFlag {
        health.set_scheduler_running(true);
        RunningFlag(health)
    }
}

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.set_scheduler_running(false);
    }
}

/// The sampling loop of one sensor, on its own thread.
struct Worker {
    sensor_id: i64,
    source: Box<dyn Source>,
    processing: SharedProcessing,
    sink: Arc<dyn SampleSink>,
    health: Arc<HealthBoard>,
    clock: Arc<Clock>,
    offline_after: Duration,
    allowed_gap: Duration,
}

impl Worker {
    fn run(mut self, stop: mpsc::Receiver<()>) {
        let mut tracker = Tracker::new(
            self.offline_after,
            tokio::time::Instant::now(),
            self.health.told_offline(self.sensor_id),
        );
        let mut failures = FailureLog::default();
        self.health
            .record(self.sensor_id, tracker.salud(), self.allowed_gap);
        loop {
            let started = Instant::now();
            let outcome = self.source.read();
            let now = tokio::time::Instant::now();
            let mut changes = Vec::new();
            match outcome {
                Ok(Some(measurements)) if !measurements.is_empty() => {
                    let taken_at = now_micros();
                    let hora_dudosa = !self.clock.trusted();
                    let processing = self
                        .processing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    let mut rejected = None;
                    let samples: Vec<Sample> = self
                        .source
                        .earlier_samples()
                        .into_iter()
                        .chain([(Duration::ZERO, measurements)])
                        .filter_map(|(age, mut measurements)| {
                            if let Err(e) = processing.apply(&mut measurements) {
                                rejected = Some(e);
                                return None;
                            }
                            Some(Sample {
                                sensor_id: self.sensor_id,
                                taken_at: taken_at - age.as_micros() as i64,
                                hora_dudosa,
                                measurements,
                            })
                        })
                        .collect();
                    let stored = !samples.is_empty();
                    if stored {
                        if self.sink.submit(samples).is_err() {
                            return;
                        }
                        changes.extend(tracker.ok(now, taken_at));
                    }
                    if let Some(e) = rejected {
                        failures.record(self.sensor_id, &e);
                        if !stored {
                            changes.extend(tracker.failed(&e, now_micros()));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    failures.record(self.sensor_id, &e);
                    changes.extend(tracker.failed(&e, now_micros()));
                }
            }
            changes.extend(tracker.check(self.source.is_connected(), now));
            self.health
                .record(self.sensor_id, tracker.salud(), self.allowed_gap);
            for change in changes {
                self.announce(&change, &tracker);
            }
            let pause = match self.source.pacing() {
                Pacing::Every(interval) => interval.saturating_sub(started.elapsed()),
                Pacing::Streaming => Duration::ZERO,
            };
            match stop.recv_timeout(pause) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    /// Tells clients on `general` about a health change; stored and numbered like every
    /// event.
    fn announce(&self, change: &Transition, tracker: &Tracker) {
        let salud = tracker.salud();
        match change {
            Transition::Offline => log::warn!(
                "sensor {}: offline, no good sample for {:?}",
                self.sensor_id,
                self.offline_after
            ),
            Transition::Online => log::info!("sensor {}: online again", self.sensor_id),
            Transition::PortLost(why) => {
                log::warn!("sensor {}: device lost: {why}", self.sensor_id)
            }
            Transition::PortFound => log::info!("sensor {}: device back", self.sensor_id),
        }
        self.health.announced(self.sensor_id, change);
        self.sink.announce(
            self.sensor_id,
            change.event_type(),
            json!({
                "sensor_id": self.sensor_id,
                "salud": salud,
            }),
        );
    }
}

/// Logs read failures without flooding the journal: the first of a burst at once, then
/// at most one summary a minute.
#[derive(Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    suppressed: u64,
}

const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

impl FailureLog {
    fn record(&mut self, sensor_id: i64, error: &SensorError) {
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= FAILURE_LOG_EVERY);
        if !due {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!(
                "sensor {sensor_id}: read failed: {error} ({} more failures in the last minute)",
                self.suppressed
            );
        } else {
            log::warn!("sensor {sensor_id}: read failed: {error}");
        }
        self.last_logged = Some(Instant::now());
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fuente_must_name_a_source_the_daemon_drives() {
        assert_eq!(check_source(&json!({"kind": "sim"})), Ok(()));
        for bad in [
            json!({"kind": "laser"}),
            json!({"kind": "serial"}),
            json!("sim"),
        ] {
            assert!(check_source(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_dashboards_example_sources_are_valid() {
        let page = include_str!("../../assets/index.html");
        let examples: Vec<&str> = page
            .split("<option value='")
            .skip(1)
            .filter_map(|rest| rest.split_once('\'').map(|(value, _)| value))
            .collect();
        assert!(examples.len() >= 10, "{examples:?}");
        for example in examples {
            serde_json::from_str::<SourceSpec>(example)
                .unwrap_or_else(|e| panic!("{example}: {e}"));
        }
    }

    #[test]
    fn every_source_kind_reads_from_toml() {
        let specs = [
            r#"kind = "sim""#,
            r#"kind = "serial"
path = "/dev/serial/by-id/usb-Arduino"
baud = 115200"#,
            r#"kind = "iio_dht"
model = "dht22""#,
            r#"kind = "iio"
device_name = "bme280""#,
            r#"kind = "w1"
sensor_id = "28-000005e2fdc3""#,
            r#"kind = "gpio_dht"
line = 4
model = "dht22""#,
            r#"kind = "modbus"
port = "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0"
unit = 2
preset = "sdm120""#,
        ];
        for text in specs {
            let spec: SourceSpec = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let json = serde_json::to_value(&spec).unwrap();
            assert_eq!(serde_json::from_value::<SourceSpec>(json).unwrap(), spec);
        }
        assert!(toml::from_str::<SourceSpec>(
            r#"kind = "sim"
colour = 1"#
        )
        .is_err());
        assert!(toml::from_str::<SourceSpec>(r#"kind = "laser""#).is_err());
    }
}
