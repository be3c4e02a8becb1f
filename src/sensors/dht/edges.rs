//! The DHT's answer on its data line, decoded from the edges the kernel timestamped: pure,
//! and tested on synthetic edge trains.

use super::datasheet::{DhtModel, Reading};
use crate::sensors::source::SensorError;

/// Direction of a level change on the data line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKind {
    /// Low to high: the sensor released the line.
    Rising,
    /// High to low: the sensor pulled the line down.
    Falling,
}

/// A level change with the kernel's monotonic timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// CLOCK_MONOTONIC nanoseconds, taken in the interrupt handler.
    pub timestamp_ns: u64,
    /// Which way the line went.
    pub kind: EdgeKind,
}

/// A data bit is ~50 us low followed by a high of 26-28 us (0) or ~70 us (1). The
/// threshold sits between the two; the bounds reject pulses no DHT sends, even allowing
/// for interrupt latency in the timestamps.
const ONE_THRESHOLD_NS: u64 = 50_000;
const HIGH_MIN_NS: u64 = 8_000;
const HIGH_MAX_NS: u64 = 110_000;
const LOW_MIN_NS: u64 = 20_000;
const LOW_MAX_NS: u64 = 110_000;
/// Fewer edges than this means the sensor never started answering.
const MIN_ANSWER_EDGES: usize = 4;

/// Decodes one transmission from the edges seen on the line after the start pulse.
///
/// The 40 data bits are located from the end of the train, where the last bit's falling
/// edge (and then the sensor releasing the line) closes it: whether the sensor's 80 us
/// response pulse, or the host's own release, was caught depends on how fast the kernel
/// armed edge detection after the line turned to input, so nothing before the data is
/// relied upon. Every bit but the first must follow its predecessor edge by edge with a
/// plausible low in between, so a lost or doubled edge inside the data is `Malformed`
/// rather than a silently shifted frame.
pub fn decode_edges(edges: &[Edge], model: DhtModel) -> Result<Reading, SensorError> {
    decode_frame(frame_from_edges(edges)?, model)
}

fn frame_from_edges(edges: &[Edge]) -> Result<[u8; 5], SensorError> {
    if edges.len() < MIN_ANSWER_EDGES {
        return Err(SensorError::Timeout);
    }
    if edges
        .windows(2)
        .any(|w| w[1].timestamp_ns < w[0].timestamp_ns)
    {
        return Err(SensorError::Malformed(
            "edge timestamps go backwards".into(),
        ));
    }
    // The sensor releases the line after the last bit: drop that final rising edge.
    let end = match edges.last() {
        Some(e) if e.kind == EdgeKind::Rising => edges.len() - 1,
        _ => edges.len(),
    };
    let mut highs = [0u64; 40];
    // `fall` indexes the falling edge that ends the bit being decoded, walking backwards.
    let mut fall = end;
    for bit in (0..40).rev() {
        if fall < 2 {
            return Err(SensorError::Malformed(format!(
                "only {} of 40 bits",
                39 - bit
            )));
        }
        fall -= 1;
        let (rise_edge, fall_edge) = (edges[fall - 1], edges[fall]);
        if rise_edge.kind != EdgeKind::Rising || fall_edge.kind != EdgeKind::Falling {
            return Err(SensorError::Malformed(format!("missing edge at bit {bit}")));
        }
        let high = fall_edge.timestamp_ns - rise_edge.timestamp_ns;
        if !(HIGH_MIN_NS..=HIGH_MAX_NS).contains(&high) {
            return Err(SensorError::Malformed(format!(
                "bit {bit} high for {} us",
                high / 1000
            )));
        }
        highs[bit] = high;
        if bit > 0 {
            // The falling edge that starts this bit's low ends the previous bit.
            let Some(prev_fall) = fall.checked_sub(2).map(|i| edges[i]) else {
                return Err(SensorError::Malformed(format!(
                    "only {} of 40 bits",
                    40 - bit
                )));
            };
            let low = rise_edge.timestamp_ns - prev_fall.timestamp_ns;
            if prev_fall.kind != EdgeKind::Falling || !(LOW_MIN_NS..=LOW_MAX_NS).contains(&low) {
                return Err(SensorError::Malformed(format!(
                    "missing edge before bit {bit}"
                )));
            }
        }
        fall -= 1;
    }
    let mut frame = [0u8; 5];
    for (i, high) in highs.iter().enumerate() {
        if *high > ONE_THRESHOLD_NS {
            frame[i / 8] |= 0x80 >> (i % 8);
        }
    }
    Ok(frame)
}

/// Checks the checksum and decodes the model's layout.
///
/// DHT22: humidity is a 16-bit count of tenths; temperature is 15 bits of tenths with the
/// top bit as sign (sign-magnitude, not two's complement). DHT11: integer and decimal
/// bytes; the newer DHT11 marks negative temperatures with the top bit of the decimal.
fn decode_frame(frame: [u8; 5], model: DhtModel) -> Result<Reading, SensorError> {
    let sum = frame[..4].iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    if sum != frame[4] {
        return Err(SensorError::Checksum);
    }
    let tenths = |high: u8, low: u8| f64::from(u16::from(high) << 8 | u16::from(low)) / 10.0;
    match model {
        DhtModel::Dht22 => {
            let magnitude = tenths(frame[2] & 0x7f, frame[3]);
            Ok(Reading {
                humidity: tenths(frame[0], frame[1]),
                temperature: if frame[2] & 0x80 != 0 {
                    -magnitude
                } else {
                    magnitude
                },
            })
        }
        DhtModel::Dht11 => {
            let (hum_dec, temp_dec) = (frame[1], frame[3] & 0x7f);
            if hum_dec > 9 || temp_dec > 9 {
                return Err(SensorError::Malformed(format!(
                    "DHT11 decimal byte out of range in {frame:02x?}"
                )));
            }
            let whole_and_tenths =
                |whole: u8, dec: u8| f64::from(u16::from(whole) * 10 + u16::from(dec)) / 10.0;
            let magnitude = whole_and_tenths(frame[2], temp_dec);
            Ok(Reading {
                humidity: whole_and_tenths(frame[0], hum_dec),
                temperature: if frame[3] & 0x80 != 0 {
                    -magnitude
                } else {
                    magnitude
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW_NS: u64 = 50_000;
    const ZERO_NS: u64 = 27_000;
    const ONE_NS: u64 = 70_000;

    /// The edges a DHT produces for `frame`, as the kernel timestamps them: the host's
    /// release, the 80 us/80 us response, 40 bits, then the sensor releasing the line.
    /// `jitter(i)` shifts the i-th pulse duration.
    fn train(frame: [u8; 5], jitter: impl Fn(usize) -> i64) -> Vec<Edge> {
        let mut pulses = vec![(EdgeKind::Rising, 30_000), (EdgeKind::Falling, 80_000)];
        pulses.push((EdgeKind::Rising, 80_000));
        for i in 0..40 {
            let one = frame[i / 8] & (0x80 >> (i % 8)) != 0;
            pulses.push((EdgeKind::Falling, LOW_NS));
            pulses.push((EdgeKind::Rising, if one { ONE_NS } else { ZERO_NS }));
        }
        pulses.push((EdgeKind::Falling, LOW_NS));
        pulses.push((EdgeKind::Rising, 0));
        let mut t: u64 = 1_000_000_000;
        pulses
            .iter()
            .enumerate()
            .map(|(i, (kind, len))| {
                let edge = Edge {
                    timestamp_ns: t,
                    kind: *kind,
                };
                t = (t as i64 + *len as i64 + jitter(i)) as u64;
                edge
            })
            .collect()
    }

    fn with_checksum(b: [u8; 4]) -> [u8; 5] {
        let sum = b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        [b[0], b[1], b[2], b[3], sum]
    }

    /// 65.2 %RH, 35.1 °C.
    const FRAME: [u8; 5] = [0x02, 0x8c, 0x01, 0x5f, 0xee];

    #[test]
    fn decodes_a_clean_dht22_train() {
        assert_eq!(frame_from_edges(&train(FRAME, |_| 0)), Ok(FRAME));
        assert_eq!(
            decode_edges(&train(FRAME, |_| 0), DhtModel::Dht22),
            Ok(Reading {
                temperature: 35.1,
                humidity: 65.2
            })
        );
    }

    #[test]
    fn tolerates_ten_microseconds_of_jitter() {
        // +10/-10 us in a pattern that does not line up with the bits.
        let jitter = |i: usize| [10_000, -10_000, -10_000, 10_000, -10_000][i % 5];
        assert_eq!(
            decode_edges(&train(FRAME, jitter), DhtModel::Dht22),
            Ok(Reading {
                temperature: 35.1,
                humidity: 65.2
            })
        );
    }

    #[test]
    fn decodes_when_the_response_pulse_was_not_caught() {
        // Edge detection armed late: the first edge seen is the start of bit 0's low.
        let edges = train(FRAME, |_| 0);
        assert_eq!(frame_from_edges(&edges[3..]), Ok(FRAME));
        // Not even that falling edge: bit 0 starts with its rising edge.
        assert_eq!(frame_from_edges(&edges[4..]), Ok(FRAME));
    }

    #[test]
    fn decodes_without_the_final_release_edge() {
        let edges = train(FRAME, |_| 0);
        assert_eq!(frame_from_edges(&edges[..edges.len() - 1]), Ok(FRAME));
    }

    #[test]
    fn a_missing_edge_inside_the_data_is_malformed() {
        for missing in [10, 41, 60] {
            let mut edges = train(FRAME, |_| 0);
            edges.remove(missing);
            let got = decode_edges(&edges, DhtModel::Dht22);
            assert!(
                matches!(got, Err(SensorError::Malformed(_))),
                "edge {missing}: {got:?}"
            );
        }
    }

    #[test]
    fn a_lost_bit_is_malformed_not_shifted() {
        // Both edges of one bit lost: the neighbours still alternate, but the low between
        // them is far too long.
        let mut edges = train(FRAME, |_| 0);
        edges.drain(40..42);
        assert!(matches!(
            decode_edges(&edges, DhtModel::Dht22),
            Err(SensorError::Malformed(_))
        ));
    }

    #[test]
    fn too_few_bits_is_malformed_and_silence_is_timeout() {
        let edges = train(FRAME, |_| 0);
        assert!(matches!(
            decode_edges(&edges[40..], DhtModel::Dht22),
            Err(SensorError::Malformed(why)) if why.contains("of 40 bits")
        ));
        assert_eq!(
            decode_edges(&edges[..2], DhtModel::Dht22),
            Err(SensorError::Timeout)
        );
        assert_eq!(
            decode_edges(&[], DhtModel::Dht22),
            Err(SensorError::Timeout)
        );
    }

    #[test]
    fn an_over_long_pulse_is_malformed() {
        // Stretch the high of bit 20 (a zero) to 147 us.
        let jitter = |i: usize| if i == 4 + 2 * 20 { 120_000 } else { 0 };
        assert!(matches!(
            decode_edges(&train(FRAME, jitter), DhtModel::Dht22),
            Err(SensorError::Malformed(_))
        ));
    }

    #[test]
    fn a_bad_checksum_is_reported() {
        let mut frame = FRAME;
        frame[4] ^= 0x01;
        assert_eq!(
            decode_edges(&train(frame, |_| 0), DhtModel::Dht22),
            Err(SensorError::Checksum)
        );
    }

    #[test]
    fn decodes_negative_dht22_temperatures() {
        // -10.1 °C is 101 tenths with the sign bit set; 45.5 %RH is 455 tenths.
        let frame = with_checksum([0x01, 0xc7, 0x80, 0x65]);
        assert_eq!(
            decode_edges(&train(frame, |_| 0), DhtModel::Dht22),
            Ok(Reading {
                temperature: -10.1,
                humidity: 45.5
            })
        );
    }

    #[test]
    fn decodes_dht11_integer_and_decimal_bytes() {
        let frame = with_checksum([55, 0, 24, 3]);
        assert_eq!(
            decode_edges(&train(frame, |_| 0), DhtModel::Dht11),
            Ok(Reading {
                temperature: 24.3,
                humidity: 55.0
            })
        );
        assert_eq!(
            decode_frame(with_checksum([30, 0, 2, 0x85]), DhtModel::Dht11),
            Ok(Reading {
                temperature: -2.5,
                humidity: 30.0
            })
        );
        assert!(matches!(
            decode_frame(with_checksum([30, 12, 20, 0]), DhtModel::Dht11),
            Err(SensorError::Malformed(_))
        ));
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn kind() -> impl Strategy<Value = EdgeKind> {
            prop::sample::select(vec![EdgeKind::Rising, EdgeKind::Falling])
        }

        fn model() -> impl Strategy<Value = DhtModel> {
            prop::sample::select(vec![DhtModel::Dht11, DhtModel::Dht22])
        }

        /// Edges with gaps around the pulse lengths a DHT sends, alternating or not, so
        /// that trains get deep into the decoder before they fail.
        fn plausible_edges() -> impl Strategy<Value = Vec<Edge>> {
            (
                any::<u64>(),
                prop::collection::vec(
                    (
                        prop_oneof![
                            5_000u64..120_000,
                            prop::sample::select(vec![0, 8_000, 50_000, 50_001, 110_000, 110_001]),
                            any::<u64>(),
                        ],
                        prop_oneof![4 => Just(None), 1 => kind().prop_map(Some)],
                    ),
                    0..100,
                ),
            )
                .prop_map(|(start, pulses)| {
                    let mut t = start;
                    let mut rising = true;
                    pulses
                        .into_iter()
                        .map(|(gap, forced)| {
                            t = t.saturating_add(gap);
                            rising = !rising;
                            let natural = if rising {
                                EdgeKind::Rising
                            } else {
                                EdgeKind::Falling
                            };
                            Edge {
                                timestamp_ns: t,
                                kind: forced.unwrap_or(natural),
                            }
                        })
                        .collect()
                })
        }

        fn any_edges() -> impl Strategy<Value = Vec<Edge>> {
            prop::collection::vec(
                (any::<u64>(), kind()).prop_map(|(timestamp_ns, kind)| Edge { timestamp_ns, kind }),
                0..100,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_edges_decode_or_fail_cleanly(
                edges in prop_oneof![3 => plausible_edges(), 1 => any_edges()],
                model in model(),
            ) {
                match decode_edges(&edges, model) {
                    Ok(r) => {
                        prop_assert!(edges.len() >= 80);
                        prop_assert!(r.temperature.is_finite() && r.humidity.is_finite());
                        prop_assert!(r.humidity >= 0.0 && r.humidity <= 6553.5);
                        prop_assert!(r.temperature.abs() <= 3276.7);
                    }
                    Err(SensorError::Timeout) => prop_assert!(edges.len() < MIN_ANSWER_EDGES),
                    Err(e) => prop_assert!(
                        matches!(e, SensorError::Malformed(_) | SensorError::Checksum),
                        "{:?}", e
                    ),
                }
            }

            #[test]
            fn jittered_trains_decode_to_their_frame(
                data in any::<[u8; 4]>(),
                // Up to 19 us either way: a one's high stays above the 50 us threshold and a
                // zero's below it.
                jitter in prop::collection::vec(-19_000i64..=19_000, 86),
                skip in 0usize..=4,
                release in any::<bool>(),
                model in model(),
            ) {
                let frame = with_checksum(data);
                let edges = train(frame, |i| jitter[i]);
                let end = if release { edges.len() } else { edges.len() - 1 };
                let edges = &edges[skip..end];
                prop_assert_eq!(frame_from_edges(edges), Ok(frame));
                prop_assert_eq!(decode_edges(edges, model), decode_frame(frame, model));
            }

            #[test]
            fn a_corrupted_frame_is_never_read_as_another(
                data in any::<[u8; 4]>(),
                flip in 0usize..40,
                model in model(),
            ) {
                // One flipped data bit: the checksum catches it.
                let frame = with_checksum(data);
                let mut corrupted = frame;
                corrupted[flip / 8] ^= 0x80 >> (flip % 8);
                prop_assert_eq!(
                    decode_edges(&train(corrupted, |_| 0), model),
                    Err(SensorError::Checksum)
                );
            }
        }
    }
}
