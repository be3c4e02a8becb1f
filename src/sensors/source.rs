//! The seam between hardware and the scheduler: every kind of sensor is a [`Source`]
//! that yields [`Measurement`]s or a typed [`SensorError`].

use std::fmt;
use std::time::Duration;

pub use crate::model::Measurement;

/// Why a read produced no sample. These happen in normal operation (a DHT22 times out
/// every few reads), so each is a variant that health counters can count, not a string.
#[derive(Debug, Clone, PartialEq)]
pub enum SensorError {
    /// The device did not answer in time (ETIMEDOUT from the driver, no edges on the line).
    Timeout,
    /// The frame arrived but its checksum or CRC did not match.
    Checksum,
    /// A well-formed value that no real sensor in a real room produces.
    Implausible(String),
    /// The input could not be parsed (garbage on a serial line, unexpected sysfs text).
    Malformed(String),
    /// The device disappeared (cable pulled, sysfs node gone); the source keeps retrying.
    PortLost(String),
    /// Any other I/O failure, with the OS message.
    Io(String),
    /// A Modbus device answered with an exception code (`detail` says to which request).
    Exception { code: u8, detail: String },
}

impl SensorError {
    /// Stable short name used in health counters, metrics and events.
    pub fn kind(&self) -> &'static str {
        match self {
            SensorError::Timeout => "timeout",
            SensorError::Checksum => "checksum",
            SensorError::Implausible(_) => "implausible",
            SensorError::Malformed(_) => "malformed",
            SensorError::PortLost(_) => "port_lost",
            SensorError::Io(_) => "io",
            SensorError::Exception { code, .. } => match code {
                0x01 => "illegal_function",
                0x02 => "illegal_address",
                0x03 => "illegal_value",
                0x04 => "device_failure",
                0x05 => "acknowledge",
                0x06 => "device_busy",
                0x08 => "memory_parity_error",
                0x0A => "gateway_path_unavailable",
                0x0B => "gateway_no_response",
                _ => "exception",
            },
        }
    }
}

impl fmt::Display for SensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SensorError::Timeout => write!(f, "sensor did not answer in time"),
            SensorError::Checksum => write!(f, "checksum mismatch"),
            SensorError::Implausible(why) => write!(f, "implausible value: {why}"),
            SensorError::Malformed(why) => write!(f, "malformed input: {why}"),
            SensorError::PortLost(why) => write!(f, "device lost: {why}"),
            SensorError::Io(why) => write!(f, "I/O error: {why}"),
            SensorError::Exception { code, detail } => write!(
                f,
                "exception 0x{code:02X} ({}) for {detail}",
                self.kind().replace('_', " ")
            ),
        }
    }
}

impl std::error::Error for SensorError {}

/// How the scheduler paces a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Read once per interval; the scheduler sleeps between reads.
    Every(Duration),
    /// The device pushes samples (a microcontroller on a serial line): the scheduler calls
    /// `read` again at once, and `read` itself blocks for at most about half a second.
    Streaming,
}

/// A sensor the scheduler can drive. Each source runs on its own thread, so `read` may
/// block (sysfs reads of a DHT22 take up to a second); it must return within a couple of
/// seconds so that shutdown and reconfiguration are seen promptly.
pub trait Source: Send {
    /// One read attempt. `Ok(None)` means nothing arrived yet (a quiet serial line): not a
    /// failure and not counted.
    fn read(&mut self) -> Result<Option<Vec<Measurement>>, SensorError>;

    /// Samples the last successful `read` took before the one it returned, oldest first,
    /// each with how long before that one it was taken: a device that buffers several
    /// samples between reads hands them over together, and they are stored in one
    /// submission. Most sources take one sample per read and have none.
    fn earlier_samples(&mut self) -> Vec<(Duration, Vec<Measurement>)> {
        Vec::new()
    }

    /// How often `read` should be called.
    fn pacing(&self) -> Pacing;

    /// Whether the device is there (port open, sysfs node present). A source that loses
    /// its device reports [`SensorError::PortLost`] once and keeps retrying; this says
    /// when it is back.
    fn is_connected(&self) -> bool {
        true
    }
}
