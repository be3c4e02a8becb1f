//! `sensorgate modbus scan`: which unit ids answer on a line, and at which settings, for
//! whoever wires a bus. Each probe reads holding register 0 of one unit; any answer, an
//! exception included, shows a device there, and bytes that never make a frame show a
//! device talking at other settings. Every probe is bounded by its timeout.

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_modbus::slave::SlaveContext;
use tokio_modbus::Slave;

use super::bus::{self, Connection};
use super::registers::{Function, Request};
use super::{Line, Link, Parity};
use crate::sensors::SensorError;

/// The speeds RS-485 devices ship with, slowest first.
pub const USUAL_BAUDS: [u32; 6] = [2400, 4800, 9600, 19_200, 38_400, 115_200];

/// What to probe.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub units: RangeInclusive<u8>,
    /// Line speeds to try (RTU only).
    pub bauds: Vec<u32>,
    /// Parities to try (RTU only).
    pub parities: Vec<Parity>,
    /// How long one probe waits for an answer.
    pub timeout: Duration,
}

/// What one probe heard.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// Holding register 0 and its value.
    Register(u16),
    /// An exception answer, by name: a device is there, without that register.
    Exception(&'static str),
    /// Bytes that never decoded: a device at other settings, or noise.
    Garbled,
}

/// One unit that answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// `9600 8N1`, or `tcp` over TCP.
    pub settings: String,
    pub unit: u8,
    pub heard: Heard,
}

/// Probes every unit of `options` at every setting on `target` (a serial port, or
/// `host:port` for TCP), calling `found` for each that answers; returns what was found.
/// An error means the port or connection could not be opened at all.
pub async fn scan(
    target: &str,
    options: &ScanOptions,
    mut found: impl FnMut(&Found),
) -> Result<Vec<Found>, String> {
    let tcp = !target.starts_with('/') && target.contains(':');
    let mut settings: Vec<Line> = Vec::new();
    if tcp {
        settings.push(Line::Tcp {
            address: target.to_owned(),
        });
    } else {
        for &baud in &options.bauds {
            for &parity in &options.parities {
                settings.push(Line::Serial {
                    path: target.to_owned(),
                    baud,
                    parity,
                    data_bits: 8,
                    stop_bits: 1,
                });
            }
        }
    }
    let mut all = Vec::new();
    for line in settings {
        let link = Link {
            line,
            pause_after_connect: Duration::ZERO,
        };
        let label = match &link.line {
            Line::Tcp { .. } => "tcp".to_owned(),
            _ => {
                let described = link.describe();
                described
                    .split(", pause")
                    .next()
                    .unwrap_or(&described)
                    .to_owned()
            }
        };
        let mut connection: Option<Connection> = None;
        for unit in options.units.clone() {
            // Dropped before it is opened again: the port is held exclusively.
            let connection_now = match connection.as_mut() {
                Some(open_now) => open_now,
                None => connection.insert(open(&link).await?),
            };
            tokio::time::sleep(link.inter_frame_gap()).await;
            let heard = probe(connection_now, unit, options.timeout).await;
            // A late answer must not be read as the next unit's: after silence over TCP
            // (where it may still come) or garbage on a line, start afresh.
            let tcp_silence = heard.is_none() && connection_now.received.is_none();
            if tcp_silence || heard == Some(Heard::Garbled) {
                connection = None;
            }
            if let Some(heard) = heard {
                let entry = Found {
                    settings: label.clone(),
                    unit,
                    heard,
                };
                found(&entry);
                all.push(entry);
            }
        }
    }
    Ok(all)
}

async fn open(link: &Link) -> Result<Connection, String> {
    bus::open(link)
        .await
        .map_err(|e| format!("{}: {e}", link.name()))
}

async fn probe(connection: &mut Connection, unit: u8, timeout: Duration) -> Option<Heard> {
    connection.context.set_slave(Slave(unit));
    if let Some(received) = &connection.received {
        received.store(0, Ordering::Relaxed);
    }
    let request = Request {
        function: Function::Holding,
        address: 0,
        count: 1,
    };
    match tokio::time::timeout(timeout, bus::call(&mut connection.context, &request)).await {
        Ok(Ok(Ok(values))) => Some(Heard::Register(values.first().copied().unwrap_or(0))),
        Ok(Ok(Err(code))) => {
            let error = SensorError::Exception {
                code: u8::from(code),
                detail: String::new(),
            };
            Some(Heard::Exception(error.kind()))
        }
        Ok(Err(_)) => Some(Heard::Garbled),
        Err(_) => connection
            .received
            .as_ref()
            .is_some_and(|r| r.load(Ordering::Relaxed) > 0)
            .then_some(Heard::Garbled),
    }
}

/// Parses `1-247` or `5` into a range of unit ids.
pub fn parse_units(text: &str) -> Result<RangeInclusive<u8>, String> {
    let bad = || format!("units must be N or N-M with ids from 0 to 255, not {text:?}");
    let (from, to) = match text.split_once('-') {
        Some((from, to)) => (from, to),
        None => (text, text),
    };
    let from: u8 = from.trim().parse().map_err(|_| bad())?;
    let to: u8 = to.trim().parse().map_err(|_| bad())?;
    if from > to {
        return Err(bad());
    }
    Ok(from..=to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_ranges() {
        assert_eq!(parse_units("1-247"), Ok(1..=247));
        assert_eq!(parse_units("5"), Ok(5..=5));
        assert!(parse_units("9-3").is_err());
        assert!(parse_units("1-300").is_err());
        assert!(parse_units("x").is_err());
    }
}
