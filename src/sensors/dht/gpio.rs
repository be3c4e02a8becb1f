//! A DHT read from userspace over a GPIO character device.
//!
//! Bit-banging a DHT with `sleep`/poll from userspace on Linux is unreliable: the 26 us vs
//! 70 us pulses are shorter than scheduling jitter. What makes it work is that the GPIO
//! character device timestamps every edge in the interrupt handler, so the timing is the
//! kernel's, not ours. This source only sends the start pulse and collects the timestamped
//! edges; `decode_edges` turns them into a reading.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use gpiocdev::line::{Bias, EdgeDetection, EventClock, Value};
use gpiocdev::Request;
use serde::{Deserialize, Serialize};

use super::datasheet::{DhtModel, MIN_INTERVAL};
use super::edges::{decode_edges, Edge, EdgeKind};
use super::plausibility::PlausibilityFilter;
use crate::sensors::source::{Measurement, Pacing, SensorError, Source};

/// Where the sensor's data pin is wired.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpioDhtConfig {
    /// GPIO character device; `/dev/gpiochip0` carries the header pins on every Pi model
    /// with a current kernel.
    #[serde(default = "default_chip")]
    pub chip: PathBuf,
    /// Line offset on that chip (the BCM GPIO number on a Pi, not the header pin number).
    pub line: u32,
    /// DHT11 or DHT22 (`am2302` is accepted for the latter).
    pub model: DhtModel,
}

fn default_chip() -> PathBuf {
    PathBuf::from("/dev/gpiochip0")
}

/// The whole transmission lasts about 5 ms after the start pulse.
const COLLECT_WINDOW: Duration = Duration::from_millis(10);
/// Room for the ~85 edges of one transmission plus noise; the kernel default (16 per
/// line) would overflow before we read.
const EVENT_BUFFER: u32 = 128;
const CONSUMER: &str = "sensorgate-dht";

/// A DHT on a GPIO line, read with the character device's timestamped edge events.
#[derive(Debug)]
pub struct GpioDhtSource {
    config: GpioDhtConfig,
    interval: Duration,
    filter: PlausibilityFilter,
}

impl GpioDhtSource {
    /// A source reading every `interval`, raised to the sensor's 2 s minimum. The line is
    /// requested on each read and released afterwards, so nothing is held between reads.
    pub fn new(config: &GpioDhtConfig, interval: Duration) -> Self {
        GpioDhtSource {
            config: config.clone(),
            interval: interval.max(MIN_INTERVAL),
            filter: PlausibilityFilter::new(config.model.limits()),
        }
    }

    /// Sends the start pulse and returns the edges of the answer.
    fn collect_edges(&self) -> Result<Vec<Edge>, SensorError> {
        let gpio = |e: gpiocdev::Error| SensorError::Io(e.to_string());
        let offset = self.config.line;
        let request = Request::builder()
            .on_chip(&self.config.chip)
            .with_consumer(CONSUMER)
            .with_line(offset)
            .with_bias(Bias::PullUp)
            .as_output(Value::Inactive)
            .with_kernel_event_buffer_size(EVENT_BUFFER)
            .request()
            .map_err(gpio)?;
        thread::sleep(self.config.model.start_signal());
        // Releasing the line and arming edge detection is one ioctl, so the sensor's answer
        // (starting 20-40 us later) is timestamped by the kernel from here on.
        let mut input = request.config();
        input
            .with_line(offset)
            .as_input()
            .with_bias(Bias::PullUp)
            .with_edge_detection(EdgeDetection::BothEdges)
            .with_event_clock(EventClock::Monotonic);
        request.reconfigure(&input).map_err(gpio)?;
        // The timestamps are the kernel's, so there is no need to read while the sensor
        // talks: wait out the transmission, then drain the buffer.
        thread::sleep(COLLECT_WINDOW);
        let mut events = request.new_edge_event_buffer(EVENT_BUFFER as usize);
        let mut edges = Vec::with_capacity(EVENT_BUFFER as usize);
        let mut last_seqno = None;
        while events.has_event().map_err(gpio)? {
            let event = events.read_event().map_err(gpio)?;
            // A gap in the sequence numbers means the kernel buffer overflowed and edges
            // were lost: the frame cannot be trusted.
            if last_seqno.is_some_and(|last: u32| event.line_seqno != last.wrapping_add(1)) {
                return Err(SensorError::Malformed("kernel dropped edge events".into()));
            }
            last_seqno = Some(event.line_seqno);
            edges.push(Edge {
                timestamp_ns: event.timestamp_ns,
                kind: match event.kind {
                    gpiocdev::line::EdgeKind::Rising => EdgeKind::Rising,
                    gpiocdev::line::EdgeKind::Falling => EdgeKind::Falling,
                },
            });
        }
        Ok(edges)
    }
}

impl Source for GpioDhtSource {
    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError> {
        let edges = self.collect_edges()?;
        let reading = decode_edges(&edges, self.config.model)?;
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

    #[test]
    fn gpio_config_defaults_and_pacing_floor() {
        let config: GpioDhtConfig =
            serde_json::from_str(r#"{"line": 4, "model": "dht22"}"#).unwrap();
        assert_eq!(config.chip, PathBuf::from("/dev/gpiochip0"));
        assert!(serde_json::from_str::<GpioDhtConfig>(
            r#"{"line": 4, "model": "dht22", "pin": 7}"#
        )
        .is_err());
        let source = GpioDhtSource::new(&config, Duration::from_millis(500));
        assert_eq!(source.pacing(), Pacing::Every(Duration::from_secs(2)));
    }
}
