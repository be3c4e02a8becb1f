//! Living under systemd: readiness and status notifications, a watchdog that only pets
//! while the daemon really works, journald-friendly logs, signals, and memory given back
//! to the system after a burst.
//!
//! Every notification is a no-op when the daemon was not started by systemd
//! (`NOTIFY_SOCKET` unset), so the same binary runs on a terminal.

mod logging;
mod memory;
mod signals;
mod supervisor;

pub use logging::init as init_logging;
pub use memory::give_back_periodically as give_back_memory_periodically;
pub use memory::give_back_promptly as give_back_memory_promptly;
pub use signals::{hangups, terminate};
pub use supervisor::Supervisor;

use sd_notify::NotifyState;

/// Tells the service manager something; failures only matter for debugging.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("service manager notification failed: {e}");
    }
}
