//! Sensor acquisition: sources and the scheduler that drives them.
//!
//! Each running source has its own thread (sysfs and serial reads block) that reads at
//! the source's pace and hands every sample to the store writer, the one path by which
//! data enters the daemon.

pub mod sim;
pub mod source;

pub use source::{Measurement, Pacing, SensorError, Source};

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::SourceSpec;
use crate::model::now_micros;
use crate::store::{Sample, Store, StoreError};

/// Builds the source a spec describes.
fn build(spec: &SourceSpec, interval: Duration) -> Box<dyn Source> {
    match spec {
        SourceSpec::Sim(config) => Box::new(sim::SimSource::new(config.clone(), interval)),
    }
}

/// Runs one thread per sampled sensor.
pub struct Scheduler {
    store: Store,
    running: HashMap<i64, Running>,
}

struct Running {
    spec: SourceSpec,
    interval: Duration,
    /// Dropping the sender wakes the thread out of its sleep and ends it.
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Scheduler {
    pub fn new(store: Store) -> Scheduler {
        Scheduler {
            store,
            running: HashMap::new(),
        }
    }

    /// Starts sampling a sensor, or restarts it if its source or interval changed.
    pub fn start(&mut self, sensor_id: i64, spec: &SourceSpec, interval: Duration) {
        if let Some(current) = self.running.get(&sensor_id) {
            if &current.spec == spec && current.interval == interval {
                return;
            }
            self.stop(sensor_id);
        }
        let (stop, stopped) = mpsc::channel();
        let source = build(spec, interval);
        let store = self.store.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("sensor-{sensor_id}"))
            .spawn(move || sample_loop(sensor_id, source, store, stopped));
        match spawned {
            Ok(thread) => {
                self.running.insert(
                    sensor_id,
                    Running {
                        spec: spec.clone(),
                        interval,
                        stop,
                        thread,
                    },
                );
            }
            Err(e) => log::error!("sensor {sensor_id}: cannot start its thread: {e}"),
        }
    }

    /// Stops sampling a sensor and waits for its thread.
    pub fn stop(&mut self, sensor_id: i64) {
        if let Some(running) = self.running.remove(&sensor_id) {
            drop(running.stop);
            if running.thread.join().is_err() {
                log::error!("sensor {sensor_id}: sampling thread panicked");
            }
        }
    }

    /// Ids of the sensors being sampled.
    pub fn sampled(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.running.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Stops every source and waits for all threads.
    pub fn shutdown(mut self) {
        for (_, running) in self.running.drain() {
            drop(running.stop);
            let _ = running.thread.join();
        }
    }
}

fn sample_loop(
    sensor_id: i64,
    mut source: Box<dyn Source>,
    store: Store,
    stop: mpsc::Receiver<()>,
) {
    let mut failures = FailureLog::default();
    loop {
        let started = Instant::now();
        match source.read() {
            Ok(Some(measurements)) if !measurements.is_empty() => {
                let sample = Sample {
                    sensor_id,
                    taken_at: now_micros(),
                    measurements,
                };
                if let Err(StoreError::Closed) = store.submit_samples(vec![sample]) {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => failures.record(sensor_id, &e),
        }
        let pause = match source.pacing() {
            Pacing::Every(interval) => interval.saturating_sub(started.elapsed()),
            Pacing::Streaming => Duration::ZERO,
        };
        match stop.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
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
