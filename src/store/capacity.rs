//! What the database costs the card: bytes written (against an optional daily budget,
//! which widens the commit window) and space left (against a free-space floor, below
//! which the oldest raw readings go).
//!
//! Bytes written are the kernel's own count for the process (`write_bytes` in
//! `/proc/self/io`): the WAL, checkpoints and everything else sensorgate writes, as the
//! card sees it. Where that count cannot be read (a kernel without task I/O accounting),
//! the budget has nothing to steer by and leaves the window alone.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::StorageConfig;

/// How far back the write rate is measured, for the budget and the figures.
const RATE_WINDOW: Duration = Duration::from_secs(600);

/// The rate the budget aims at, as a share of the budget: a budget is a ceiling, and
/// the checkpoints, minutes apart, add to the rate the window is steered by: at such
/// rates they write about as many bytes again as the readings take at rest.
const BUDGET_AIM: f64 = 0.6;

/// How often the budget steers the window, and over how long it measures the rate it
/// steers by: short enough to follow a change of the window.
const STEER_EVERY: Duration = Duration::from_secs(10);
const STEER_RATE_WINDOW: Duration = Duration::from_secs(60);

/// Bytes the process has caused to be written to storage since it started, if the
/// kernel says.
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Free bytes for unprivileged writers and the size of the file system holding `dir`.
#[allow(unsafe_code)]
// The conversions are needed where block counts are 32 bits (32-bit ARM).
#[allow(clippy::useless_conversion)]
pub fn file_system_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills in the zeroed struct it is given, from a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let done = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (done == 0).then(|| {
        let block = u64::from(stat.f_frsize);
        (
            u64::from(stat.f_bavail).saturating_mul(block),
            u64::from(stat.f_blocks).saturating_mul(block),
        )
    })
}

/// The free space the database leaves its file system: `min_free_percent` of it or
/// `min_free_mb`, whichever is smaller (0 in either turns the floor off).
pub fn free_space_floor(config: &StorageConfig, total_bytes: u64) -> u64 {
    if config.min_free_percent == 0 || config.min_free_mb == 0 {
        return 0;
    }
    let share = total_bytes / 100 * u64::from(config.min_free_percent);
    share.min(config.min_free_mb.saturating_mul(1024 * 1024))
}

/// Figures for `/metrics` and `/healthz`, kept by the writer.
#[derive(Debug, Default)]
pub struct StorageFigures {
    bytes_per_day: AtomicU64,
    budget_bytes_per_day: AtomicU64,
    commit_window_ms: AtomicU64,
    free_bytes: AtomicU64,
    floor_bytes: AtomicU64,
    /// `u64::MAX` while the database does not grow (or nothing is known yet).
    days_to_floor: AtomicU64,
    pruned_readings: AtomicU64,
}

impl StorageFigures {
    /// Bytes written per day at the rate of the last ten minutes.
    pub fn bytes_per_day(&self) -> u64 {
        self.bytes_per_day.load(Ordering::Relaxed)
    }

    /// The daily write budget; 0 when there is none.
    pub fn budget_bytes_per_day(&self) -> u64 {
        self.budget_bytes_per_day.load(Ordering::Relaxed)
    }

    /// How long samples wait for company before their commit, now.
    pub fn commit_window_ms(&self) -> u64 {
        self.commit_window_ms.load(Ordering::Relaxed)
    }

    /// Free bytes of the database's file system at the last look.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// Free bytes the database leaves its file system; 0 when there is no floor.
    pub fn floor_bytes(&self) -> u64 {
        self.floor_bytes.load(Ordering::Relaxed)
    }

    /// Days until the database, growing as in the last ten minutes, takes its file
    /// system down to the floor; `None` while it does not grow.
    pub fn days_to_floor(&self) -> Option<f64> {
        match self.days_to_floor.load(Ordering::Relaxed) {
            u64::MAX => None,
            hundredths => Some(hundredths as f64 / 100.0),
        }
    }

    /// Raw readings removed to keep the free-space floor, since start.
    pub fn pruned_readings(&self) -> u64 {
        self.pruned_readings.load(Ordering::Relaxed)
    }

    pub(super) fn count_pruned(&self, readings: u64) {
        self.pruned_readings.fetch_add(readings, Ordering::Relaxed);
    }
}

/// The writer's view of what it costs the card, sampled at each maintenance pass and
/// after commits (at most once a second).
pub(super) struct Meter {
    started_with: Option<u64>,
    /// `(when, bytes written, database bytes in use)`, oldest first, over [`RATE_WINDOW`].
    samples: VecDeque<(Instant, u64, u64)>,
    budget_per_day: u64,
    base_window: Duration,
    max_window: Duration,
    window: Duration,
    last_look: Option<Instant>,
    last_steer: Instant,
}

impl Meter {
    pub(super) fn new(config: &StorageConfig, figures: &StorageFigures) -> Meter {
        let base_window = Duration::from_millis(config.commit_window_ms);
        let budget_per_day = config.write_budget_mb_per_day.saturating_mul(1_000_000);
        figures
            .budget_bytes_per_day
            .store(budget_per_day, Ordering::Relaxed);
        figures
            .commit_window_ms
            .store(config.commit_window_ms, Ordering::Relaxed);
        figures.days_to_floor.store(u64::MAX, Ordering::Relaxed);
        Meter {
            started_with: process_write_bytes(),
            samples: VecDeque::new(),
            budget_per_day,
            base_window,
            max_window: Duration::from_millis(config.max_commit_window_ms).max(base_window),
            window: base_window,
            last_look: None,
            last_steer: Instant::now(),
        }
    }

    /// The commit window in force: the configured one, or wider to keep the budget.
    pub(super) fn window(&self) -> Duration {
        self.window
    }

    /// Whether a second has passed since the last look.
    pub(super) fn due(&self) -> bool {
        self.last_look
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    }

    /// Takes a sample of bytes written and database size (at most once a second), and
    /// steers the window by the budget. `database_bytes` is the space the database
    /// uses in its pages.
    pub(super) fn look(
        &mut self,
        figures: &StorageFigures,
        database_bytes: u64,
        space: Option<(u64, u64)>,
    ) {
        let now = Instant::now();
        self.last_look = Some(now);
        let Some(written) = process_write_bytes() else {
            return;
        };
        let written = written.saturating_sub(self.started_with.unwrap_or(0));
        self.samples.push_back((now, written, database_bytes));
        while self
            .samples
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some(&(since, written_then, size_then)) = self.samples.front() else {
            return;
        };
        let seconds = now.duration_since(since).as_secs_f64();
        if seconds < 10.0 {
            return;
        }
        let per_day = |bytes: f64| bytes / seconds * 86_400.0;
        let rate = per_day(written.saturating_sub(written_then) as f64);
        figures.bytes_per_day.store(rate as u64, Ordering::Relaxed);
        if let Some((free, floor)) = space {
            figures.free_bytes.store(free, Ordering::Relaxed);
            figures.floor_bytes.store(floor, Ordering::Relaxed);
            let growth = per_day(database_bytes as f64 - size_then as f64);
            let days = if growth > 0.0 {
                (free.saturating_sub(floor) as f64 / growth * 100.0).min(u64::MAX as f64 / 2.0)
                    as u64
            } else {
                u64::MAX
            };
            figures.days_to_floor.store(days, Ordering::Relaxed);
        }
        if self.budget_per_day > 0 && now.duration_since(self.last_steer) >= STEER_EVERY {
            self.last_steer = now;
            if let Some(&(since, written_then, _)) = self
                .samples
                .iter()
                .find(|(t, _, _)| now.duration_since(*t) <= STEER_RATE_WINDOW)
            {
                let seconds = now.duration_since(since).as_secs_f64().max(1.0);
                self.steer(written.saturating_sub(written_then) as f64 / seconds * 86_400.0);
            }
            figures
                .commit_window_ms
                .store(self.window.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Widens the window as the rate lies above the budget's aim, and narrows it back
    /// towards the configured one when it lies below: each commit costs the card about
    /// the same, so the rate falls with the commits. Damped (the square root of the
    /// ratio, at most a factor of two a step), as the rate follows the window only as
    /// the minute it is measured over moves on.
    fn steer(&mut self, rate_per_day: f64) {
        let aim = self.budget_per_day as f64 * BUDGET_AIM;
        if rate_per_day <= 0.0 {
            return;
        }
        let factor = (rate_per_day / aim).sqrt().clamp(0.5, 2.0);
        let next = self
            .window
            .max(Duration::from_millis(100))
            .mul_f64(factor)
            .clamp(self.base_window, self.max_window);
        if next != self.window {
            log::debug!(
                "write budget: {:.0} MB/day against {:.0} MB/day, commit window {} ms",
                rate_per_day / 1e6,
                self.budget_per_day as f64 / 1e6,
                next.as_millis()
            );
            self.window = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(window_ms: u64, budget_mb: u64) -> Meter {
        let config = StorageConfig {
            commit_window_ms: window_ms,
            write_budget_mb_per_day: budget_mb,
            max_commit_window_ms: 30_000,
            ..StorageConfig::default()
        };
        Meter::new(&config, &StorageFigures::default())
    }

    #[test]
    fn the_window_widens_past_the_budget_and_comes_back_within_bounds() {
        let mut m = meter(1000, 500);
        m.steer(1_600_000_000.0);
        assert_eq!(m.window(), Duration::from_millis(2000));
        for _ in 0..10 {
            m.steer(1_600_000_000.0);
        }
        assert_eq!(
            m.window(),
            Duration::from_secs(30),
            "bounded by the latency bound"
        );
        for _ in 0..10 {
            m.steer(100_000_000.0);
        }
        assert_eq!(
            m.window(),
            Duration::from_secs(1),
            "never below the configured one"
        );
    }

    #[test]
    fn the_floor_is_the_smaller_of_share_and_size() {
        let config = StorageConfig {
            min_free_percent: 10,
            min_free_mb: 1024,
            ..StorageConfig::default()
        };
        let gib = 1024 * 1024 * 1024;
        assert_eq!(free_space_floor(&config, 4 * gib), 4 * gib / 100 * 10);
        assert_eq!(free_space_floor(&config, 64 * gib), gib);
        let off = StorageConfig {
            min_free_mb: 0,
            ..config
        };
        assert_eq!(free_space_floor(&off, 64 * gib), 0);
    }
}
