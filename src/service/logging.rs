//! Logs a person can read on a terminal, and that journald files at the right level.

use std::io::Write;

/// tokio-modbus warns about every frame it cannot decode; on a noisy RS-485 line that is
/// one line per request. The modbus source counts those failures in `salud` and logs
/// them at most once a minute per sensor, so its own warnings are left out by default.
const DEFAULT_FILTER: &str = "info,tokio_modbus=error";

/// Terminal logs get timestamps; under systemd (`JOURNAL_STREAM` set) journald adds its
/// own, so lines carry only a `<N>` priority prefix that journald turns into a level.
/// `RUST_LOG` sets the filter (default `info`, tokio-modbus at `error`).
pub fn init() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(DEFAULT_FILTER));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder
            .format(|buf, record| writeln!(buf, "<{}>{}", priority(record.level()), record.args()));
    }
    builder.init();
}

/// syslog priority of a log level.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Warn), 4);
        assert_eq!(priority(log::Level::Info), 6);
        assert_eq!(priority(log::Level::Trace), 7);
    }
}
