//! Samples: the values a source read at one moment, as they travel from the drivers to the
//! store.

use super::Micros;

/// One value read from a sensor, before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// What was measured, in the wire vocabulary (`temperatura`, `humedad`, `presion`, ...).
    pub tipo: String,
    pub valor: f64,
    /// Unit as shown to clients (`°C`, `%`, `hPa`).
    pub unidad: String,
}

impl Measurement {
    /// A value of `tipo` in `unidad`.
    pub fn new(tipo: &str, valor: f64, unidad: &str) -> Self {
        Measurement {
            tipo: tipo.to_owned(),
            valor,
            unidad: unidad.to_owned(),
        }
    }

    /// A value of a `tipo` in its known unit ([`super::known_unit`]).
    pub fn in_known_unit(tipo: &str, valor: f64) -> Self {
        Measurement::new(tipo, valor, super::known_unit(tipo).unwrap_or_default())
    }
}

/// Values read from one sensor at one moment, on their way to storage.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub sensor_id: i64,
    pub taken_at: Micros,
    /// `taken_at` comes from a clock that was not trusted yet (a board without a real-time clock, before its time is set).
    pub hora_dudosa: bool,
    pub measurements: Vec<Measurement>,
}
