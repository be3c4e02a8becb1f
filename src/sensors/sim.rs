//! A simulated sensor, so the daemon can be tried, tested and benchmarked without
//! hardware. It drifts like a real room, has noise, and fails now and then the way real
//! sensors do.

use std::f64::consts::TAU;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::source::{Measurement, Pacing, SensorError, Source};

/// Which real sensor to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SimProfile {
    /// Temperature and relative humidity.
    #[default]
    Dht22,
    /// Temperature only.
    Ds18b20,
}

/// The failure a simulated read can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SimFailure {
    Timeout,
    Checksum,
    Implausible,
    Io,
}

/// Settings of a simulated source (`source = { kind = "sim", ... }`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    pub profile: SimProfile,
    /// Mean temperature in °C.
    pub base_temperature: f64,
    /// Mean relative humidity in %.
    pub base_humidity: f64,
    /// Share of reads that fail, from 0 to 1.
    pub failure_rate: f64,
    /// The failures to draw from when a read fails.
    pub failures: Vec<SimFailure>,
    /// Fixed seed for a reproducible sequence; by default each start differs.
    pub seed: Option<u64>,
    /// After this many reads the sensor stops answering and the read never returns, as
    /// a hung driver does; for exercising the watchdog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hang_after_reads: Option<u64>,
    /// Samples each read yields, spread evenly over the time since the read before it
    /// (the interval, for the first), as a device that buffers between reads delivers
    /// them: lets a few sensors offer the daemon any rate, for load tests.
    pub samples_per_read: SamplesPerRead,
}

/// How many samples one simulated read yields, from 1 to [`SamplesPerRead::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct SamplesPerRead(u32);

impl SamplesPerRead {
    /// Enough to offer hundreds of thousands of samples per second from a few sensors;
    /// few enough that one read's batch stays small in memory.
    pub const MAX: u32 = 1000;
}

impl Default for SamplesPerRead {
    fn default() -> Self {
        SamplesPerRead(1)
    }
}

impl TryFrom<u32> for SamplesPerRead {
    type Error = String;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        if (1..=Self::MAX).contains(&n) {
            Ok(SamplesPerRead(n))
        } else {
            Err(format!(
                "samples_per_read must be from 1 to {}, not {n}",
                Self::MAX
            ))
        }
    }
}

impl From<SamplesPerRead> for u32 {
    fn from(n: SamplesPerRead) -> u32 {
        n.0
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            profile: SimProfile::Dht22,
            base_temperature: 21.0,
            base_humidity: 50.0,
            failure_rate: 0.0,
            failures: vec![SimFailure::Timeout],
            seed: None,
            hang_after_reads: None,
            samples_per_read: SamplesPerRead::default(),
        }
    }
}

/// The simulated source.
pub struct SimSource {
    config: SimConfig,
    interval: Duration,
    rng: XorShift,
    started: Instant,
    drift: f64,
    reads: u64,
    /// The samples the last read took before the one it returned.
    earlier: Vec<(Duration, Vec<Measurement>)>,
    /// When the last successful read was, since `started`: a batch spreads over the time
    /// since then, so batches never overlap even when a read comes early or late.
    last_read: Option<Duration>,
}

impl SimSource {
    pub fn new(config: SimConfig, interval: Duration) -> SimSource {
        let seed = config.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        SimSource {
            config,
            interval,
            rng: XorShift::new(seed),
            started: Instant::now(),
            drift: 0.0,
            reads: 0,
            earlier: Vec::new(),
            last_read: None,
        }
    }

    fn failure(&mut self) -> SensorError {
        let kinds = &self.config.failures;
        let kind = if kinds.is_empty() {
            SimFailure::Timeout
        } else {
            kinds[(self.rng.next() % kinds.len() as u64) as usize]
        };
        match kind {
            SimFailure::Timeout => SensorError::Timeout,
            SimFailure::Checksum => SensorError::Checksum,
            SimFailure::Implausible => {
                SensorError::Implausible("temperature doubled between two reads".into())
            }
            SimFailure::Io => SensorError::Io("simulated I/O error".into()),
        }
    }

    /// The values of one sample taken `since_start` after the source started.
    fn values_at(&mut self, since_start: Duration) -> Vec<Measurement> {
        // A slow daily-like swing (period 10 minutes, so a demo shows it), a bounded
        // random walk, and sensor noise.
        let t = since_start.as_secs_f64();
        self.drift = (self.drift + 0.05 * self.rng.normal()).clamp(-2.0, 2.0);
        let swing = 1.5 * (TAU * t / 600.0).sin();
        let temperature =
            self.config.base_temperature + swing + self.drift + 0.1 * self.rng.normal();
        let mut values = vec![Measurement::new("temperatura", round(temperature), "°C")];
        if self.config.profile == SimProfile::Dht22 {
            let humidity = (self.config.base_humidity - 2.0 * (swing + self.drift)
                + 0.3 * self.rng.normal())
            .clamp(0.0, 100.0);
            values.push(Measurement::new("humedad", round(humidity), "%"));
        }
        values
    }
}

impl Source for SimSource {
    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError> {
        self.reads += 1;
        if self.config.hang_after_reads.is_some_and(|n| self.reads > n) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        self.earlier.clear();
        if self.rng.unit() < self.config.failure_rate {
            return Err(self.failure());
        }
        let now = self.started.elapsed();
        let since_last = self
            .last_read
            .map_or(self.interval, |last| now.saturating_sub(last));
        self.last_read = Some(now);
        let count = u32::from(self.config.samples_per_read);
        let spacing = since_last / count;
        for older in (1..count).rev() {
            let age = spacing * older;
            let values = self.values_at(now.saturating_sub(age));
            self.earlier.push((age, values));
        }
        Ok(Some(self.values_at(now)))
    }

    fn earlier_samples(&mut self) -> Vec<(Duration, Vec<Measurement>)> {
        std::mem::take(&mut self.earlier)
    }

    fn pacing(&self) -> Pacing {
        Pacing::Every(self.interval)
    }
}

/// Real sensors report one decimal.
fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// xorshift64*: plenty for simulated noise, and no dependency.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal, by Box-Muller.
    fn normal(&mut self) -> f64 {
        let u = self.unit().max(f64::MIN_POSITIVE);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(config: SimConfig) -> SimSource {
        SimSource::new(config, Duration::from_secs(2))
    }

    #[test]
    fn dht22_profile_yields_temperature_and_humidity_near_base() {
        let mut sim = source(SimConfig {
            seed: Some(7),
            ..SimConfig::default()
        });
        for _ in 0..100 {
            let values = sim.read().unwrap().unwrap();
            assert_eq!(values.len(), 2);
            assert_eq!(values[0].tipo, "temperatura");
            assert!((values[0].valor - 21.0).abs() < 5.0, "{values:?}");
            assert_eq!(values[1].tipo, "humedad");
            assert!((0.0..=100.0).contains(&values[1].valor));
        }
    }

    #[test]
    fn ds18b20_profile_yields_temperature_only() {
        let mut sim = source(SimConfig {
            profile: SimProfile::Ds18b20,
            seed: Some(1),
            ..SimConfig::default()
        });
        assert_eq!(sim.read().unwrap().unwrap().len(), 1);
    }

    #[test]
    fn a_batched_read_spreads_its_samples_over_the_interval() {
        let mut sim = source(SimConfig {
            samples_per_read: SamplesPerRead::try_from(4).unwrap(),
            seed: Some(5),
            ..SimConfig::default()
        });
        assert_eq!(sim.read().unwrap().unwrap().len(), 2);
        let earlier = sim.earlier_samples();
        let ages: Vec<Duration> = earlier.iter().map(|(age, _)| *age).collect();
        assert_eq!(
            ages,
            [1500, 1000, 500].map(Duration::from_millis),
            "oldest first, a quarter of the 2 s interval apart"
        );
        assert!(earlier.iter().all(|(_, values)| values.len() == 2));
        assert!(sim.earlier_samples().is_empty(), "handed over once");

        // A read that comes early spreads its batch over the time since the last one,
        // not over a whole interval reaching back before it.
        std::thread::sleep(Duration::from_millis(40));
        sim.read().unwrap();
        let oldest = sim.earlier_samples()[0].0;
        assert!(oldest < Duration::from_millis(500), "{oldest:?}");
    }

    #[test]
    fn samples_per_read_is_bounded() {
        let parse = |n: u32| toml::from_str::<SimConfig>(&format!("samples_per_read = {n}"));
        assert_eq!(parse(1000).unwrap().samples_per_read, SamplesPerRead(1000));
        for bad in [0, 1001] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(
                error.contains("samples_per_read must be from 1 to 1000"),
                "{error}"
            );
        }
        let mut single = source(SimConfig::default());
        assert!(single.read().is_ok());
        assert!(
            single.earlier_samples().is_empty(),
            "one sample per read by default"
        );
    }

    #[test]
    fn injects_configured_failures() {
        let mut sim = source(SimConfig {
            failure_rate: 1.0,
            failures: vec![SimFailure::Checksum],
            seed: Some(3),
            ..SimConfig::default()
        });
        assert_eq!(sim.read(), Err(SensorError::Checksum));
    }

    #[test]
    fn failure_rate_is_roughly_honoured() {
        let mut sim = source(SimConfig {
            failure_rate: 0.2,
            seed: Some(11),
            ..SimConfig::default()
        });
        let failed = (0..10_000).filter(|_| sim.read().is_err()).count();
        assert!((1_500..2_500).contains(&failed), "{failed}");
    }
}
