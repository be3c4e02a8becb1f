//! Values derived from a temperature and a relative humidity taken in the same sample:
//! dew point, vapour-pressure deficit and absolute humidity.
//!
//! Each is stored as a reading of its own `tipo`, so it travels the one data path like a
//! measured value. The formulas are pure and checked against published tables in the
//! tests below; outside their validity range they give nothing rather than a number that
//! looks right and is not.
//!
//! - Saturation vapour pressure over water, for the deficit and the absolute humidity:
//!   the Buck equation in its 1996 revision, `es = 0.61121 exp((18.678 - T/234.5)
//!   (T / (257.14 + T)))` kPa; the tests hold it to 0.1 % of the CRC table.
//! - Dew point: the Magnus formula inverted, with the coefficients of Alduchov and
//!   Eskridge (1996), `a = 17.625`, `b = 243.04 °C`, within 0.4 % of the saturation
//!   pressure from -40 to 50 °C: `g = ln(RH/100) + aT/(b+T)`, `Td = b g / (a - g)`.
//! - Absolute humidity from the ideal gas law for the vapour: `rho = e M / (R T)`, with
//!   `e = RH/100 es`, `M = 18.01528 g/mol`, `R = 8.314462618 J/(mol K)`.

use serde::{Deserialize, Serialize};

use super::Measurement;

/// Lowest temperature, in °C, at which the formulas are used.
pub const MIN_TEMPERATURE: f64 = -40.0;
/// Highest temperature, in °C, at which the formulas are used.
pub const MAX_TEMPERATURE: f64 = 50.0;

const MAGNUS_A: f64 = 17.625;
const MAGNUS_B: f64 = 243.04;
const WATER_MOLAR_MASS: f64 = 18.015_28;
const GAS_CONSTANT: f64 = 8.314_462_618;
const ZERO_CELSIUS: f64 = 273.15;

/// A value a sensor may derive, opted in per sensor (`derivados` on the wire, `derive`
/// in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Derived {
    /// Dew point, °C.
    PuntoRocio,
    /// Vapour-pressure deficit, kPa.
    Vpd,
    /// Absolute humidity, g/m³.
    HumedadAbsoluta,
}

impl Derived {
    /// Every derived value, in the order they are stored in a sample.
    pub const ALL: [Derived; 3] = [Derived::PuntoRocio, Derived::Vpd, Derived::HumedadAbsoluta];

    /// The `tipo` its readings carry.
    pub fn tipo(self) -> &'static str {
        match self {
            Derived::PuntoRocio => "punto_rocio",
            Derived::Vpd => "vpd",
            Derived::HumedadAbsoluta => "humedad_absoluta",
        }
    }

    /// The unit its readings carry.
    pub fn unit(self) -> &'static str {
        match self {
            Derived::PuntoRocio => "°C",
            Derived::Vpd => "kPa",
            Derived::HumedadAbsoluta => "g/m³",
        }
    }

    /// The derived value named by `tipo`.
    pub fn from_tipo(tipo: &str) -> Option<Derived> {
        Derived::ALL.into_iter().find(|d| d.tipo() == tipo)
    }

    /// Its value from a temperature in °C and a relative humidity in %, or `None` outside
    /// the formulas' range.
    pub fn compute(self, temperature: f64, humidity: f64) -> Option<f64> {
        match self {
            Derived::PuntoRocio => dew_point(temperature, humidity),
            Derived::Vpd => vapour_pressure_deficit(temperature, humidity),
            Derived::HumedadAbsoluta => absolute_humidity(temperature, humidity),
        }
    }
}

/// Whether a temperature and a relative humidity are inside the formulas' range: -40 to
/// 50 °C, and above 0 up to 100 %RH (a dew point of dry air does not exist).
fn in_range(temperature: f64, humidity: f64) -> bool {
    (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&temperature)
        && humidity > 0.0
        && humidity <= 100.0
}

/// Saturation vapour pressure over water in kPa (Buck, 1996).
pub fn saturation_vapour_pressure(temperature: f64) -> Option<f64> {
    (MIN_TEMPERATURE..=MAX_TEMPERATURE)
        .contains(&temperature)
        .then(|| {
            0.61121
                * ((18.678 - temperature / 234.5) * (temperature / (257.14 + temperature))).exp()
        })
}

/// Dew point in °C (Magnus, Alduchov and Eskridge coefficients).
pub fn dew_point(temperature: f64, humidity: f64) -> Option<f64> {
    if !in_range(temperature, humidity) {
        return None;
    }
    let g = (humidity / 100.0).ln() + MAGNUS_A * temperature / (MAGNUS_B + temperature);
    Some(MAGNUS_B * g / (MAGNUS_A - g))
}

/// Vapour-pressure deficit in kPa: how much more water vapour the air could hold.
pub fn vapour_pressure_deficit(temperature: f64, humidity: f64) -> Option<f64> {
    if !in_range(temperature, humidity) {
        return None;
    }
    saturation_vapour_pressure(temperature).map(|es| es * (1.0 - humidity / 100.0))
}

/// Absolute humidity in g/m³: the mass of water vapour in a cubic metre of air.
pub fn absolute_humidity(temperature: f64, humidity: f64) -> Option<f64> {
    if !in_range(temperature, humidity) {
        return None;
    }
    let vapour_pa = saturation_vapour_pressure(temperature)? * 1000.0 * humidity / 100.0;
    Some(vapour_pa * WATER_MOLAR_MASS / (GAS_CONSTANT * (temperature + ZERO_CELSIUS)))
}

/// The derived measurements of one sample: for each of `wanted`, computed from the
/// sample's `temperatura` (°C) and `humedad` (%), when it has both and they are in range.
pub fn derive(measurements: &[Measurement], wanted: &[Derived]) -> Vec<Measurement> {
    if wanted.is_empty() {
        return Vec::new();
    }
    let find = |tipo: &str, unit: &str| {
        measurements
            .iter()
            .find(|m| m.tipo == tipo && m.unidad == unit)
            .map(|m| m.valor)
    };
    let (Some(temperature), Some(humidity)) = (find("temperatura", "°C"), find("humedad", "%"))
    else {
        return Vec::new();
    };
    wanted
        .iter()
        .filter_map(|d| {
            let valor = d.compute(temperature, humidity)?;
            Some(Measurement::new(d.tipo(), valor, d.unit()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: Option<f64>, expected: f64, tolerance: f64) {
        let actual = actual.expect("a value");
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} is not within {tolerance} of {expected}"
        );
    }

    /// Vapour pressure of water over a flat surface of water, kPa, from the CRC Handbook
    /// of Chemistry and Physics (as tabulated in Wikipedia's "Vapour pressure of water").
    #[test]
    fn saturation_pressure_matches_the_crc_table() {
        for (temperature, kpa) in [
            (0.0, 0.6113),
            (10.0, 1.2281),
            (20.0, 2.3388),
            (25.0, 3.1690),
            (30.0, 4.2455),
            (40.0, 7.3814),
            (50.0, 12.344),
        ] {
            close(saturation_vapour_pressure(temperature), kpa, kpa * 0.001);
        }
    }

    /// Dew points from the Magnus formula tables (20 °C at 50 % is 9.26 °C; 30 °C at
    /// 80 % is 26.2 °C); at saturation the dew point is the temperature.
    #[test]
    fn dew_point_matches_reference_values() {
        close(dew_point(20.0, 50.0), 9.26, 0.01);
        close(dew_point(30.0, 80.0), 26.17, 0.01);
        for t in [-30.0, -5.0, 0.0, 12.5, 35.0, 50.0] {
            close(dew_point(t, 100.0), t, 1e-9);
        }
    }

    /// Growers' VPD charts: 25 °C at 60 % is 1.27 kPa, 20 °C at 50 % is 1.17 kPa.
    #[test]
    fn vpd_matches_reference_values() {
        close(vapour_pressure_deficit(25.0, 60.0), 1.27, 0.005);
        close(vapour_pressure_deficit(20.0, 50.0), 1.17, 0.005);
        close(vapour_pressure_deficit(30.0, 100.0), 0.0, 1e-12);
    }

    /// Saturated air holds 17.3 g/m³ at 20 °C and 30.4 g/m³ at 30 °C (engineering
    /// tables of water vapour in air): 8.65 g/m³ at 20 °C and 50 %.
    #[test]
    fn absolute_humidity_matches_reference_values() {
        close(absolute_humidity(20.0, 50.0), 8.65, 0.02);
        close(absolute_humidity(20.0, 100.0), 17.3, 0.03);
        close(absolute_humidity(30.0, 100.0), 30.4, 0.1);
    }

    #[test]
    fn out_of_range_inputs_give_nothing() {
        for (t, h) in [
            (-40.1, 50.0),
            (50.1, 50.0),
            (20.0, 0.0),
            (20.0, -1.0),
            (20.0, 100.1),
            (f64::NAN, 50.0),
            (20.0, f64::NAN),
            (f64::INFINITY, 50.0),
        ] {
            for d in Derived::ALL {
                assert_eq!(d.compute(t, h), None, "{d:?} at {t} °C, {h} %");
            }
        }
    }

    #[test]
    fn derives_only_what_is_wanted_from_one_sample() {
        let sample = [
            Measurement::new("temperatura", 20.0, "°C"),
            Measurement::new("humedad", 50.0, "%"),
        ];
        assert!(derive(&sample, &[]).is_empty());
        let derived = derive(&sample, &[Derived::PuntoRocio, Derived::HumedadAbsoluta]);
        let tipos: Vec<&str> = derived.iter().map(|m| m.tipo.as_str()).collect();
        assert_eq!(tipos, ["punto_rocio", "humedad_absoluta"]);
        assert_eq!(derived[1].unidad, "g/m³");
        // Without humidity in the same sample there is nothing to derive from.
        assert!(derive(&sample[..1], &Derived::ALL).is_empty());
        // A temperature in another unit is not taken for degrees Celsius.
        let fahrenheit = [
            Measurement::new("temperatura", 68.0, "°F"),
            Measurement::new("humedad", 50.0, "%"),
        ];
        assert!(derive(&fahrenheit, &Derived::ALL).is_empty());
    }

    #[test]
    fn tipos_read_back() {
        for d in Derived::ALL {
            assert_eq!(Derived::from_tipo(d.tipo()), Some(d));
            let json = serde_json::to_value(d).unwrap();
            assert_eq!(json, d.tipo());
        }
        assert_eq!(Derived::from_tipo("temperatura"), None);
    }
}
