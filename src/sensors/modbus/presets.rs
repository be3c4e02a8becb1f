//! Register maps of common devices, so a config says `preset = "sdm120"` instead of
//! copying a table from a datasheet. Each names the table it follows; serial settings
//! (baud, parity) are not part of a preset because every device on one bus shares them.

use super::registers::{ByteOrder, DataType, Field, Function};

/// A named register map.
pub struct Preset {
    /// What a config writes.
    pub name: &'static str,
    /// The device, for `check-config` and error messages.
    pub device: &'static str,
    fields: fn() -> Vec<Field>,
}

impl Preset {
    /// The register map.
    pub fn fields(&self) -> Vec<Field> {
        (self.fields)()
    }
}

/// Every preset, by name.
pub static PRESETS: &[Preset] = &[
    Preset {
        name: "xy-md02",
        device: "SHT20 RS-485 temperature/humidity probe (XY-MD02 and compatibles)",
        fields: xy_md02,
    },
    Preset {
        name: "soil-th",
        device: "RS-485 soil moisture/temperature probe (\"TR\" type: JXCT, Renke and compatibles)",
        fields: soil_th,
    },
    Preset {
        name: "sdm120",
        device: "Eastron SDM120-Modbus single-phase energy meter",
        fields: sdm120,
    },
];

/// The preset called `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// The names of every preset, for error messages.
pub fn names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[allow(clippy::too_many_arguments)]
fn field(
    tipo: &str,
    unidad: &str,
    function: Function,
    address: u16,
    data_type: DataType,
    scale: f64,
    min: f64,
    max: f64,
) -> Field {
    Field {
        tipo: tipo.into(),
        unidad: unidad.into(),
        function,
        address,
        data_type,
        order: ByteOrder::ABCD,
        scale,
        offset: 0.0,
        min: Some(min),
        max: Some(max),
    }
}

/// XY-MD02 (SHT20) manual, "MODBUS protocol": function 0x04 (input registers); 0x0001
/// temperature, signed, in 0.1 °C (0xFF33 is -20.5 °C); 0x0002 relative humidity in
/// 0.1 %RH. Both can be read with one request of two registers. Factory settings: unit 1,
/// 9600 baud, 8N1. Range from the same manual: -40 to 60 °C, 0 to 100 %RH.
fn xy_md02() -> Vec<Field> {
    vec![
        field(
            "temperatura",
            "°C",
            Function::Input,
            0x0001,
            DataType::I16,
            0.1,
            -40.0,
            60.0,
        ),
        field(
            "humedad",
            "%",
            Function::Input,
            0x0002,
            DataType::U16,
            0.1,
            0.0,
            100.0,
        ),
    ]
}

/// The register table shared by the common "TR" soil probes (JXCT, Renke
/// SN-3000-TR-N01 and their rebrands): function 0x03 (holding registers); 0x0000 volumetric
/// water content in 0.1 %, 0x0001 temperature, signed, in 0.1 °C. Factory settings:
/// unit 1, 4800 baud, 8N1 (some ship at 9600). Range: 0 to 100 %, -40 to 80 °C.
fn soil_th() -> Vec<Field> {
    vec![
        field(
            "humedad_suelo",
            "%",
            Function::Holding,
            0x0000,
            DataType::U16,
            0.1,
            0.0,
            100.0,
        ),
        field(
            "temperatura",
            "°C",
            Function::Holding,
            0x0001,
            DataType::I16,
            0.1,
            -40.0,
            80.0,
        ),
    ]
}

/// Eastron "SDM120 Modbus protocol" (input registers, function 0x04, every value an
/// IEEE 754 float in two registers, high word first, i.e. `ABCD`): 30001 (0x0000) voltage
/// V, 30007 (0x0006) current A, 30013 (0x000C) active power W, 30071 (0x0046) frequency
/// Hz, 30343 (0x0156) total active energy kWh. Factory settings: unit 1, 2400 baud, 8N1.
/// Ranges are wide bounds around the meter's rating (230 V, 45 A max, 50/60 Hz).
fn sdm120() -> Vec<Field> {
    let f32 = |tipo, unidad, address, min, max| {
        field(
            tipo,
            unidad,
            Function::Input,
            address,
            DataType::F32,
            1.0,
            min,
            max,
        )
    };
    vec![
        f32("voltaje", "V", 0x0000, 0.0, 400.0),
        f32("corriente", "A", 0x0006, 0.0, 100.0),
        f32("potencia", "W", 0x000C, -25_000.0, 25_000.0),
        f32("frecuencia", "Hz", 0x0046, 40.0, 70.0),
        f32("energia", "kWh", 0x0156, 0.0, 1e9),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::registers::{plan, Merging};
    use super::*;

    #[test]
    fn every_preset_is_valid_and_named_once() {
        for preset in PRESETS {
            let fields = preset.fields();
            assert!(!fields.is_empty(), "{}", preset.name);
            for field in &fields {
                field
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", preset.name));
            }
            let tipos: std::collections::HashSet<&str> =
                fields.iter().map(|f| f.tipo.as_str()).collect();
            assert_eq!(tipos.len(), fields.len(), "{}", preset.name);
            assert!(std::ptr::eq(find(preset.name).unwrap(), preset));
        }
        assert!(find("SDM120").is_some());
        assert!(find("sdm630").is_none());
    }

    #[test]
    fn presets_read_in_few_requests() {
        let merging = |max_gap| Merging {
            max_gap,
            max_registers: 125,
        };
        assert_eq!(
            plan(&find("xy-md02").unwrap().fields(), merging(0)).len(),
            1
        );
        assert_eq!(
            plan(&find("soil-th").unwrap().fields(), merging(0)).len(),
            1
        );
        let sdm = find("sdm120").unwrap().fields();
        assert_eq!(plan(&sdm, merging(0)).len(), 5);
        assert_eq!(plan(&sdm, merging(60)).len(), 2);
    }
}
