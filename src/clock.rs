//! Whether the wall clock can be trusted for sample times.
//!
//! A Raspberry Pi has no battery-backed clock: it boots with the time saved at the last
//! shutdown (or 1970) and steps to the right time only once NTP has synchronised it,
//! minutes later or, without a network, never. Samples taken before that carry a wrong
//! time; they are stored flagged (`hora_dudosa`), so that a dashboard or an export can tell
//! them apart. `seq` never depends on the clock, so a clock that jumps backwards never
//! reorders events.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;

/// Which sample times to trust; `sampling.trust_clock` in the config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClockTrust {
    /// Trust the clock once a time daemon has synchronised it.
    #[default]
    Synchronized,
    /// Trust it always: a board with a real-time clock, or a clock set by hand.
    Always,
}

/// Created by systemd-timesyncd (Raspberry Pi OS and Debian's default time daemon) once it
/// has synchronised the clock; readable inside the service's sandbox.
const TIMESYNCD_SYNCHRONIZED: &str = "/run/systemd/timesync/synchronized";

/// Answers "can a sample taken now be trusted to carry the right time?".
#[derive(Debug)]
pub struct Clock {
    trust: ClockTrust,
    /// Once synchronised, the clock stays trusted for the life of the process: a time
    /// daemon that loses its server keeps the clock disciplined for hours, and a sample
    /// flagged for that would be flagged wrongly.
    synchronized: AtomicBool,
}

impl Clock {
    pub fn new(trust: ClockTrust) -> Clock {
        Clock {
            trust,
            synchronized: AtomicBool::new(false),
        }
    }

    /// Whether the time of a sample taken now is trusted; cheap enough for every sample.
    pub fn trusted(&self) -> bool {
        self.trusted_if(|| kernel_synchronized() || Path::new(TIMESYNCD_SYNCHRONIZED).exists())
    }

    fn trusted_if(&self, synchronized: impl FnOnce() -> bool) -> bool {
        match self.trust {
            ClockTrust::Always => true,
            ClockTrust::Synchronized => {
                if self.synchronized.load(Ordering::Relaxed) {
                    return true;
                }
                if !synchronized() {
                    return false;
                }
                self.synchronized.store(true, Ordering::Relaxed);
                log::info!("the clock is synchronised: sample times are trusted from now on");
                true
            }
        }
    }
}

/// The kernel's NTP status, which every time daemon (systemd-timesyncd, chrony, ntpd)
/// keeps: synchronised unless `adjtimex` answers `TIME_ERROR`. Reading it needs no
/// privilege, but a sandbox that filters the `@clock` system calls (systemd's
/// `ProtectClock=`) refuses it; that counts as "cannot tell", so not synchronised.
#[allow(unsafe_code)]
fn kernel_synchronized() -> bool {
    // SAFETY: with `modes` 0, adjtimex only fills in the zeroed struct it is given.
    let state = unsafe {
        let mut status: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut status)
    };
    state != -1 && state != libc::TIME_ERROR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_is_trusted_without_asking() {
        let clock = Clock::new(ClockTrust::Always);
        assert!(clock.trusted_if(|| panic!("not asked")));
    }

    #[test]
    fn synchronized_is_trusted_from_the_first_sync_on() {
        let clock = Clock::new(ClockTrust::Synchronized);
        assert!(!clock.trusted_if(|| false));
        assert!(!clock.trusted_if(|| false));
        assert!(clock.trusted_if(|| true));
        assert!(
            clock.trusted_if(|| false),
            "a lost server does not untrust it"
        );
    }
}
