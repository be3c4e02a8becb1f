//! Modbus devices: RTU on an RS-485 line (a USB adapter or a HAT) and Modbus TCP (meters
//! and Ethernet gateways).
//!
//! - [`registers`]: register maps, decoding and request merging, pure.
//! - [`presets`]: the register maps of common devices.

pub mod presets;
pub mod registers;
