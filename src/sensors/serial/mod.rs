//! A microcontroller (Arduino, ESP32, Pico) that prints readings on a serial line.
//!
//! Three layers, outermost last, one file each:
//! - `decode`: [`parse_line`] / [`LineFormat::parse`], one line of text to measurements,
//!   pure. Lines are JSON objects (`{"t": 21.4, "h": 40.2}` or
//!   `{"tipo": "temperatura", "valor": 21.4}`) or key/value text (`T=21.4 H=40.2`,
//!   `temp:21.4,hum:40.2`); a [`KeyMapping`] says what each key measures.
//! - `framing`: bytes to lines, with the length bound and the resynchronisation after
//!   (re)connecting.
//! - `port`: [`SerialSource`] owns the port, survives the device being unplugged and
//!   plugged back (it reopens the configured path, typically a `/dev/serial/by-id/...`
//!   symlink that udev recreates), and never blocks a `read` for more than about half a
//!   second.

mod decode;
mod framing;
mod port;

pub use decode::{parse_line, KeyMapping, KeySpec, LineFormat};
pub use port::{SerialConfig, SerialSource};
