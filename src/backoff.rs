//! How long to wait before trying again something that failed: reopening a serial port
//! or a Modbus bus, reaching the MQTT broker, delivering a webhook, reading an IIO device.
//!
//! It only hands out durations and never sleeps, so each caller waits its own way (a
//! blocking thread, a tokio timer, a deadline in a loop) and tests need no clock.

use std::time::Duration;

/// Waits that start at `first`, double after each failed attempt up to `max`, and start
/// over after a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits from `first`, doubling to at most `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The same wait after every failure.
    pub const fn fixed(wait: Duration) -> Self {
        Backoff::new(wait, wait)
    }

    /// The wait before the next attempt; the one after it is twice as long, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// The wait the next failure will get, without counting one.
    pub fn upcoming(&self) -> Duration {
        self.next
    }

    /// Starts over from the first wait: the attempt succeeded.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(backoff: &mut Backoff, n: usize) -> Vec<u128> {
        (0..n).map(|_| backoff.next_delay().as_millis()).collect()
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(
            millis(&mut b, 8),
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        assert_eq!(b.upcoming(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.upcoming(), Duration::from_millis(500));
        assert_eq!(millis(&mut b, 2), vec![500, 1000]);
    }

    #[test]
    fn a_fixed_wait_never_grows() {
        let mut b = Backoff::fixed(Duration::from_millis(200));
        assert_eq!(millis(&mut b, 4), vec![200, 200, 200, 200]);
        let mut none = Backoff::fixed(Duration::ZERO);
        assert_eq!(millis(&mut none, 3), vec![0, 0, 0]);
    }

    #[test]
    fn a_cap_below_the_first_wait_applies_from_the_second() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(millis(&mut b, 3), vec![2000, 1000, 1000]);
    }

    #[test]
    fn doubling_near_the_largest_duration_does_not_overflow() {
        let mut b = Backoff::new(Duration::MAX / 2 + Duration::from_secs(1), Duration::MAX);
        b.next_delay();
        assert_eq!(b.next_delay(), Duration::MAX);
        assert_eq!(b.next_delay(), Duration::MAX);
    }
}
