//! Register maps, pure: what a value is (function, address, type, byte order, scale), how
//! it is decoded from the words or bits a device answers, and how the values of one
//! device are fetched with as few requests as it allows.

use serde::{Deserialize, Serialize};

use super::super::source::Measurement;

/// Most registers one read of holding or input registers may ask for (Modbus
/// Application Protocol v1.1b3, 6.3 and 6.4: 1 to 125).
pub const MAX_REGISTERS_PER_REQUEST: u16 = 125;
/// Most coils or discrete inputs one read may ask for (6.1 and 6.2: 1 to 2000).
pub const MAX_BITS_PER_REQUEST: u16 = 2000;

/// Which table of the device a value lives in, and so which function reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Function {
    /// Holding registers, function 0x03.
    Holding,
    /// Input registers, function 0x04.
    Input,
    /// Coils, function 0x01: one bit, stored as 0 or 1.
    Coil,
    /// Discrete inputs, function 0x02: one bit, stored as 0 or 1.
    Discrete,
}

impl Function {
    /// Whether the table holds bits rather than 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Function::Coil | Function::Discrete)
    }

    /// Largest request the protocol allows for this table.
    pub fn protocol_limit(self) -> u16 {
        if self.is_bits() {
            MAX_BITS_PER_REQUEST
        } else {
            MAX_REGISTERS_PER_REQUEST
        }
    }
}

/// How the registers of a value are read as a number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    #[default]
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DataType {
    /// Registers the value occupies.
    pub fn registers(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

/// Order of the bytes of a value across its registers, named as Telegraf's modbus input
/// names them: `A` is the most significant byte. `ABCD` is big-endian (the Modbus
/// default), `DCBA` little-endian, `BADC` big-endian with the bytes of each register
/// swapped, `CDAB` little-endian word order with big-endian registers (common in meters
/// and PLCs). Values longer than two registers follow the same rule: the word order
/// reverses for `DCBA` and `CDAB`, the bytes in each word swap for `DCBA` and `BADC`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum ByteOrder {
    #[default]
    ABCD,
    DCBA,
    BADC,
    CDAB,
}

impl ByteOrder {
    fn words_reversed(self) -> bool {
        matches!(self, ByteOrder::DCBA | ByteOrder::CDAB)
    }

    fn bytes_swapped(self) -> bool {
        matches!(self, ByteOrder::DCBA | ByteOrder::BADC)
    }
}

/// One value of a register map.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// What is measured, in the wire vocabulary (`temperatura`, `voltaje`, ...).
    pub tipo: String,
    /// Unit shown to clients.
    pub unidad: String,
    /// Which table the value is in.
    pub function: Function,
    /// Address of its first register or bit, as on the wire (0-based).
    pub address: u16,
    /// Number type; ignored for coils and discrete inputs.
    #[serde(default, rename = "type")]
    pub data_type: DataType,
    #[serde(default)]
    pub order: ByteOrder,
    /// The value stored is `raw * scale + offset`.
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// Lowest and highest plausible value after scaling (the device's measuring range);
    /// anything outside is rejected as implausible.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl Field {
    /// Registers or bits the field occupies.
    pub fn width(&self) -> u16 {
        if self.function.is_bits() {
            1
        } else {
            self.data_type.registers()
        }
    }

    /// The first address past the field, or `None` when it would run past 0xFFFF.
    pub fn end(&self) -> Option<u32> {
        let end = u32::from(self.address) + u32::from(self.width());
        (end <= 0x1_0000).then_some(end)
    }

    /// Checks what serde cannot: a finite scale and offset, a sane range, an address
    /// range inside the table, texts that are not empty.
    pub fn validate(&self) -> Result<(), String> {
        let at = format!("{} at {:?} {}", self.tipo, self.function, self.address);
        if self.tipo.trim().is_empty() || self.unidad.trim().is_empty() {
            return Err(format!("{at}: tipo and unidad must not be empty"));
        }
        if !(self.scale.is_finite() && self.scale != 0.0 && self.offset.is_finite()) {
            return Err(format!(
                "{at}: scale must be a finite number other than 0 and offset finite"
            ));
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min.is_nan() || max.is_nan() || min > max {
                return Err(format!("{at}: min must not be above max"));
            }
        }
        if self.end().is_none() {
            return Err(format!("{at}: runs past address 65535"));
        }
        Ok(())
    }

    /// Decodes the field from the words (or bits, as 0 and 1) starting at its address.
    /// `raw` holds exactly [`Field::width`] entries.
    fn decode(&self, raw: &[u16]) -> f64 {
        let value = if self.function.is_bits() {
            f64::from(raw[0] & 1)
        } else {
            decode_number(self.data_type, self.order, raw)
        };
        value * self.scale + self.offset
    }
}

/// Reads `words` (as many as the type occupies) as a number in the given byte order.
pub fn decode_number(data_type: DataType, order: ByteOrder, words: &[u16]) -> f64 {
    let mut ordered: Vec<u16> = words.to_vec();
    if order.words_reversed() {
        ordered.reverse();
    }
    // The bytes, most significant first.
    let mut bytes = [0u8; 8];
    for (i, word) in ordered.iter().enumerate() {
        let [high, low] = word.to_be_bytes();
        let pair = if order.bytes_swapped() {
            [low, high]
        } else {
            [high, low]
        };
        bytes[2 * i..2 * i + 2].copy_from_slice(&pair);
    }
    let b2 = [bytes[0], bytes[1]];
    let b4 = [bytes[0], bytes[1], bytes[2], bytes[3]];
    match data_type {
        DataType::U16 => f64::from(u16::from_be_bytes(b2)),
        DataType::I16 => f64::from(i16::from_be_bytes(b2)),
        DataType::U32 => f64::from(u32::from_be_bytes(b4)),
        DataType::I32 => f64::from(i32::from_be_bytes(b4)),
        DataType::F32 => f64::from(f32::from_be_bytes(b4)),
        // Past 2^53 a u64 or i64 loses precision as a reading; energy counters never get
        // there.
        DataType::U64 => u64::from_be_bytes(bytes) as f64,
        DataType::I64 => i64::from_be_bytes(bytes) as f64,
        DataType::F64 => f64::from_be_bytes(bytes),
    }
}

/// One read request: `count` registers or bits of `function` from `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub function: Function,
    pub address: u16,
    pub count: u16,
}

impl Request {
    fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.count)
    }
}

/// How requests may be merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merging {
    /// Unused registers (or bits) a request may span to join two values; 0 merges only
    /// contiguous values. Some devices refuse to read addresses they do not implement.
    pub max_gap: u16,
    /// Largest request in registers, at most 125.
    pub max_registers: u16,
}

/// The requests that fetch every field: per function, fields sorted by address, merged
/// while the gap between them is at most `max_gap` and the request stays within the
/// register (or bit) limit. A field is never longer than the limit (at most 4
/// registers), so every field is covered whole by a request.
pub fn plan(fields: &[Field], merging: Merging) -> Vec<Request> {
    let mut spans: Vec<(Function, u32, u32)> = fields
        .iter()
        .filter_map(|f| f.end().map(|end| (f.function, u32::from(f.address), end)))
        .collect();
    spans.sort_unstable();
    let mut requests: Vec<Request> = Vec::new();
    for (function, start, end) in spans {
        let limit = if function.is_bits() {
            u32::from(MAX_BITS_PER_REQUEST)
        } else {
            u32::from(merging.max_registers.clamp(4, MAX_REGISTERS_PER_REQUEST))
        };
        if let Some(last) = requests.last_mut() {
            let gap_ok = start <= last.end() + u32::from(merging.max_gap);
            let new_end = end.max(last.end());
            if last.function == function && gap_ok && new_end - u32::from(last.address) <= limit {
                last.count = (new_end - u32::from(last.address)) as u16;
                continue;
            }
        }
        requests.push(Request {
            function,
            address: start as u16,
            count: (end - start) as u16,
        });
    }
    requests
}

/// What a request brought back: its words, or its bits as 0 and 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub request: Request,
    pub values: Vec<u16>,
}

/// Why the answers do not describe a field: the device sent fewer words or bits than
/// asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortAnswer(pub String);

/// Decodes every field from the answers to [`plan`]'s requests, in the fields' order.
/// A field out of its range is returned as `Err` with the reason, the others still
/// decode.
pub fn decode(
    fields: &[Field],
    answers: &[Answer],
) -> Result<Vec<Result<Measurement, String>>, ShortAnswer> {
    let mut out = Vec::with_capacity(fields.len());
    for field in fields {
        let start = u32::from(field.address);
        let width = u32::from(field.width());
        let answer = answers
            .iter()
            .find(|a| {
                a.request.function == field.function
                    && u32::from(a.request.address) <= start
                    && start + width <= a.request.end()
            })
            .ok_or_else(|| ShortAnswer(format!("no request covers {}", field.tipo)))?;
        let from = (start - u32::from(answer.request.address)) as usize;
        let raw = answer
            .values
            .get(from..from + width as usize)
            .ok_or_else(|| {
                ShortAnswer(format!(
                    "{} values answered for {} asked",
                    answer.values.len(),
                    answer.request.count
                ))
            })?;
        let value = field.decode(raw);
        let checked = if !value.is_finite() {
            Err(format!("{} is not a number ({value})", field.tipo))
        } else if field.min.is_some_and(|min| value < min)
            || field.max.is_some_and(|max| value > max)
        {
            Err(format!(
                "{} {value} {} outside {}..{}",
                field.tipo,
                field.unidad,
                field.min.map_or("".into(), |v| v.to_string()),
                field.max.map_or("".into(), |v| v.to_string())
            ))
        } else {
            Ok(Measurement::new(&field.tipo, value, &field.unidad))
        };
        out.push(checked);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(function: Function, address: u16, data_type: DataType) -> Field {
        Field {
            tipo: format!("v{address}"),
            unidad: "u".into(),
            function,
            address,
            data_type,
            order: ByteOrder::ABCD,
            scale: 1.0,
            offset: 0.0,
            min: None,
            max: None,
        }
    }

    #[test]
    fn byte_orders_as_telegraf_names_them() {
        // 0x4148F5C3 is 12.56 as f32; 0x0102_0304 as u32 is 16909060.
        let be = [0x4148, 0xF5C3];
        assert_eq!(
            decode_number(DataType::F32, ByteOrder::ABCD, &be) as f32,
            12.56
        );
        assert_eq!(
            decode_number(DataType::F32, ByteOrder::CDAB, &[0xF5C3, 0x4148]) as f32,
            12.56
        );
        assert_eq!(
            decode_number(DataType::F32, ByteOrder::BADC, &[0x4841, 0xC3F5]) as f32,
            12.56
        );
        assert_eq!(
            decode_number(DataType::F32, ByteOrder::DCBA, &[0xC3F5, 0x4841]) as f32,
            12.56
        );
        assert_eq!(
            decode_number(DataType::U32, ByteOrder::ABCD, &[0x0102, 0x0304]),
            16_909_060.0
        );
        assert_eq!(
            decode_number(DataType::U32, ByteOrder::DCBA, &[0x0403, 0x0201]),
            16_909_060.0
        );
        assert_eq!(
            decode_number(DataType::I16, ByteOrder::ABCD, &[0xFF38]),
            -200.0
        );
        assert_eq!(
            decode_number(DataType::I16, ByteOrder::BADC, &[0x38FF]),
            -200.0
        );
        assert_eq!(
            decode_number(DataType::U16, ByteOrder::ABCD, &[0xFF38]),
            65336.0
        );
        assert_eq!(
            decode_number(DataType::I32, ByteOrder::ABCD, &[0xFFFF, 0xFFFE]),
            -2.0
        );
        let words = 1_234_567_890_123u64.to_be_bytes();
        let w: Vec<u16> = words
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(
            decode_number(DataType::U64, ByteOrder::ABCD, &w),
            1_234_567_890_123.0
        );
        let reversed: Vec<u16> = w.iter().rev().copied().collect();
        assert_eq!(
            decode_number(DataType::U64, ByteOrder::CDAB, &reversed),
            1_234_567_890_123.0
        );
        assert_eq!(
            decode_number(DataType::I64, ByteOrder::ABCD, &[0xFFFF; 4]),
            -1.0
        );
        let pi = std::f64::consts::PI.to_be_bytes();
        let w: Vec<u16> = pi
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(
            decode_number(DataType::F64, ByteOrder::ABCD, &w),
            std::f64::consts::PI
        );
        let swapped: Vec<u16> = w.iter().map(|x| x.swap_bytes()).rev().collect();
        assert_eq!(
            decode_number(DataType::F64, ByteOrder::DCBA, &swapped),
            std::f64::consts::PI
        );
    }

    #[test]
    fn scale_offset_and_bits() {
        let mut temperature = field(Function::Input, 1, DataType::I16);
        temperature.scale = 0.1;
        temperature.offset = -1.0;
        assert!((temperature.decode(&[0xFF38]) - -21.0).abs() < 1e-9);
        let coil = field(Function::Coil, 7, DataType::F64);
        assert_eq!(coil.width(), 1);
        assert_eq!(coil.decode(&[1]), 1.0);
        assert_eq!(coil.decode(&[0]), 0.0);
    }

    fn merging(max_gap: u16) -> Merging {
        Merging {
            max_gap,
            max_registers: MAX_REGISTERS_PER_REQUEST,
        }
    }

    #[test]
    fn contiguous_values_are_one_request() {
        let fields = [
            field(Function::Input, 2, DataType::U16),
            field(Function::Input, 1, DataType::I16),
        ];
        assert_eq!(
            plan(&fields, merging(0)),
            [Request {
                function: Function::Input,
                address: 1,
                count: 2
            }]
        );
    }

    #[test]
    fn gaps_functions_and_limits_split_requests() {
        let fields = [
            field(Function::Input, 0, DataType::F32),
            field(Function::Input, 6, DataType::F32),
            field(Function::Input, 12, DataType::F32),
            field(Function::Input, 70, DataType::F32),
            field(Function::Holding, 0, DataType::U16),
            field(Function::Input, 342, DataType::F32),
        ];
        let requests = plan(&fields, merging(4));
        let summary: Vec<(Function, u16, u16)> = requests
            .iter()
            .map(|r| (r.function, r.address, r.count))
            .collect();
        assert_eq!(
            summary,
            [
                (Function::Holding, 0, 1),
                (Function::Input, 0, 14),
                (Function::Input, 70, 2),
                (Function::Input, 342, 2)
            ]
        );
        // Without a gap allowance the three first values are three requests.
        assert_eq!(plan(&fields, merging(0)).len(), 6);
        // A wide gap merges everything up to the 125-register limit.
        let wide = plan(&fields, merging(1000));
        assert_eq!(
            wide.iter()
                .map(|r| (r.address, r.count))
                .collect::<Vec<_>>(),
            [(0, 1), (0, 72), (342, 2)]
        );
        // A smaller limit splits where a value would not fit.
        let small = plan(
            &fields[..3],
            Merging {
                max_gap: 10,
                max_registers: 8,
            },
        );
        assert_eq!(
            small
                .iter()
                .map(|r| (r.address, r.count))
                .collect::<Vec<_>>(),
            [(0, 8), (12, 2)]
        );
    }

    #[test]
    fn bits_merge_up_to_2000() {
        let fields: Vec<Field> = [0u16, 1999, 2000, 2500]
            .iter()
            .map(|&a| field(Function::Coil, a, DataType::U16))
            .collect();
        let requests = plan(&fields, merging(u16::MAX));
        assert_eq!(
            requests
                .iter()
                .map(|r| (r.address, r.count))
                .collect::<Vec<_>>(),
            [(0, 2000), (2000, 501)]
        );
    }

    #[test]
    fn overlapping_values_share_a_request() {
        let fields = [
            field(Function::Holding, 10, DataType::U32),
            field(Function::Holding, 11, DataType::U16),
        ];
        assert_eq!(
            plan(&fields, merging(0)),
            [Request {
                function: Function::Holding,
                address: 10,
                count: 2
            }]
        );
    }

    #[test]
    fn decoding_answers_and_ranges() {
        let mut temperature = field(Function::Input, 1, DataType::I16);
        temperature.tipo = "temperatura".into();
        temperature.scale = 0.1;
        temperature.min = Some(-40.0);
        temperature.max = Some(60.0);
        let mut humidity = field(Function::Input, 2, DataType::U16);
        humidity.tipo = "humedad".into();
        humidity.scale = 0.1;
        let fields = [temperature, humidity];
        let requests = plan(&fields, merging(0));
        let answers = [Answer {
            request: requests[0],
            values: vec![215, 452],
        }];
        let decoded = decode(&fields, &answers).unwrap();
        let values: Vec<f64> = decoded.iter().map(|m| m.as_ref().unwrap().valor).collect();
        assert!((values[0] - 21.5).abs() < 1e-9 && (values[1] - 45.2).abs() < 1e-9);
        let hot = [Answer {
            request: requests[0],
            values: vec![700, 452],
        }];
        let decoded = decode(&fields, &hot).unwrap();
        assert!(decoded[0].as_ref().unwrap_err().contains("outside -40..60"));
        assert!(decoded[1].is_ok());
        let short = [Answer {
            request: requests[0],
            values: vec![215],
        }];
        assert!(decode(&fields, &short).is_err());
    }

    #[test]
    fn validation_refuses_what_no_device_has() {
        let mut f = field(Function::Holding, 65534, DataType::U32);
        assert!(f.validate().is_ok());
        f.data_type = DataType::F64;
        assert!(f.validate().unwrap_err().contains("65535"));
        let mut f = field(Function::Holding, 0, DataType::U16);
        f.scale = 0.0;
        assert!(f.validate().is_err());
        f.scale = f64::NAN;
        assert!(f.validate().is_err());
        let mut f = field(Function::Holding, 0, DataType::U16);
        f.min = Some(2.0);
        f.max = Some(1.0);
        assert!(f.validate().is_err());
        f.tipo = " ".into();
        assert!(f.validate().is_err());
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn any_field() -> impl Strategy<Value = Field> {
            (
                prop::sample::select(vec![
                    Function::Holding,
                    Function::Input,
                    Function::Coil,
                    Function::Discrete,
                ]),
                any::<u16>(),
                prop::sample::select(vec![
                    DataType::U16,
                    DataType::I16,
                    DataType::U32,
                    DataType::F32,
                    DataType::I64,
                    DataType::F64,
                ]),
            )
                .prop_map(|(function, address, data_type)| field(function, address, data_type))
                .prop_filter("inside the table", |f| f.end().is_some())
        }

        proptest! {
            #[test]
            fn every_field_is_covered_by_one_request_within_limits(
                fields in prop::collection::vec(any_field(), 0..40),
                max_gap in 0u16..300,
                max_registers in 4u16..=125,
            ) {
                let requests = plan(&fields, Merging { max_gap, max_registers });
                for r in &requests {
                    prop_assert!(r.count >= 1);
                    let limit = if r.function.is_bits() { 2000 } else { max_registers };
                    prop_assert!(r.count <= limit, "{:?}", r);
                    prop_assert!(r.end() <= 0x1_0000);
                }
                for f in &fields {
                    let covering = requests.iter().filter(|r| {
                        r.function == f.function
                            && r.address <= f.address
                            && u32::from(f.address) + u32::from(f.width()) <= r.end()
                    });
                    prop_assert!(covering.count() >= 1, "{:?}", f);
                }
                // Decoding any answer of the right length never panics.
                let answers: Vec<Answer> = requests
                    .iter()
                    .map(|r| Answer { request: *r, values: vec![0xFFFF; r.count as usize] })
                    .collect();
                prop_assert!(decode(&fields, &answers).is_ok());
            }

            #[test]
            fn decoding_any_words_never_panics(
                words in prop::collection::vec(any::<u16>(), 4),
                order in prop::sample::select(vec![ByteOrder::ABCD, ByteOrder::DCBA, ByteOrder::BADC, ByteOrder::CDAB]),
            ) {
                for t in [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::U64, DataType::I64, DataType::F32, DataType::F64] {
                    let _ = decode_number(t, order, &words[..t.registers() as usize]);
                }
            }
        }
    }
}
