//! Bytes from the port to lines, with the length bound and the resynchronisation after
//! (re)connecting.

use crate::sensors::source::SensorError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Assembly {
    /// Just (re)connected: the first bytes may be the tail of a line whose start was sent
    /// before we listened. They are skipped up to the next newline, unless the line goes
    /// quiet first (`discarded` still false), which shows we are between lines.
    Resync { discarded: bool },
    /// At a line boundary or inside a line whose start we saw.
    Ready,
    /// Skipping the rest of an over-long line, already reported.
    Overflow,
}

/// Splits the byte stream into lines of at most `max` bytes (the newline excluded).
#[derive(Debug)]
pub(super) struct LineAssembler {
    max: usize,
    line: Vec<u8>,
    state: Assembly,
}

impl LineAssembler {
    pub(super) fn new(max: usize) -> Self {
        LineAssembler {
            max,
            line: Vec::new(),
            state: Assembly::Resync { discarded: false },
        }
    }

    /// Forgets any partial line: called after (re)opening the port.
    pub(super) fn resync(&mut self) {
        self.line.clear();
        self.state = Assembly::Resync { discarded: false };
    }

    /// The line was silent for a whole read timeout.
    pub(super) fn quiet(&mut self) {
        if self.state == (Assembly::Resync { discarded: false }) {
            self.state = Assembly::Ready;
        }
    }

    /// Consumes `bytes`; returns each completed line, and one `Malformed` per over-long
    /// line (whose rest is then dropped up to its newline).
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Vec<u8>, SensorError>> {
        let mut out = Vec::new();
        for &byte in bytes {
            match (self.state, byte) {
                (Assembly::Resync { .. } | Assembly::Overflow, b'\n') => {
                    self.state = Assembly::Ready
                }
                (Assembly::Resync { .. }, _) => self.state = Assembly::Resync { discarded: true },
                (Assembly::Overflow, _) => {}
                (Assembly::Ready, b'\n') => out.push(Ok(std::mem::take(&mut self.line))),
                (Assembly::Ready, _) if self.line.len() == self.max => {
                    self.line.clear();
                    self.state = Assembly::Overflow;
                    out.push(Err(SensorError::Malformed(format!(
                        "line longer than {} bytes",
                        self.max
                    ))));
                }
                (Assembly::Ready, _) => self.line.push(byte),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(outcomes: Vec<Result<Vec<u8>, SensorError>>) -> Vec<Result<String, String>> {
        outcomes
            .into_iter()
            .map(|o| {
                o.map(|l| String::from_utf8(l).unwrap())
                    .map_err(|e| e.kind().to_owned())
            })
            .collect()
    }

    fn ready(max: usize) -> LineAssembler {
        let mut assembler = LineAssembler::new(max);
        assembler.quiet();
        assembler
    }

    #[test]
    fn assembler_splits_lines_across_chunks() {
        let mut a = ready(256);
        assert_eq!(lines(a.feed(b"T=21")), vec![]);
        assert_eq!(
            lines(a.feed(b".4\r\nH=40\nP=")),
            vec![Ok("T=21.4\r".to_owned()), Ok("H=40".to_owned())]
        );
        assert_eq!(lines(a.feed(b"1000\n")), vec![Ok("P=1000".to_owned())]);
    }

    #[test]
    fn assembler_drops_the_partial_first_line_after_connecting() {
        let mut a = LineAssembler::new(256);
        assert_eq!(
            lines(a.feed(b"1.4 H=40.2\nT=22.0\n")),
            vec![Ok("T=22.0".to_owned())]
        );
        // Once bytes were dropped, a pause does not make the rest of that line valid.
        let mut b = LineAssembler::new(256);
        assert_eq!(lines(b.feed(b"1.4")), vec![]);
        b.quiet();
        assert_eq!(lines(b.feed(b" H=40\nT=1\n")), vec![Ok("T=1".to_owned())]);
        // A pause before any byte shows we are between lines: the first line is whole.
        let mut c = LineAssembler::new(256);
        c.quiet();
        assert_eq!(lines(c.feed(b"T=22.0\n")), vec![Ok("T=22.0".to_owned())]);
        // Reconnecting forgets the half line that was in flight.
        c.feed(b"T=2");
        c.resync();
        assert_eq!(lines(c.feed(b"3\nH=5\n")), vec![Ok("H=5".to_owned())]);
    }

    #[test]
    fn assembler_reports_an_over_long_line_once() {
        let mut a = ready(8);
        assert_eq!(
            lines(a.feed(b"01234567\n")),
            vec![Ok("01234567".to_owned())]
        );
        assert_eq!(
            lines(a.feed(b"0123456789abcdef")),
            vec![Err("malformed".to_owned())]
        );
        assert_eq!(lines(a.feed(b"ghijklmnopqrstuvwxyz")), vec![]);
        assert_eq!(lines(a.feed(b"xyz\nT=1\n")), vec![Ok("T=1".to_owned())]);
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        /// What a ready assembler must make of `lines` joined by newlines: each line whole
        /// when it fits, one `malformed` when it does not.
        fn expected(lines: &[Vec<u8>], max: usize) -> Vec<Result<Vec<u8>, String>> {
            lines
                .iter()
                .map(|l| {
                    if l.len() <= max {
                        Ok(l.clone())
                    } else {
                        Err("malformed".to_owned())
                    }
                })
                .collect()
        }

        fn outcomes(out: Vec<Result<Vec<u8>, SensorError>>) -> Vec<Result<Vec<u8>, String>> {
            out.into_iter()
                .map(|o| o.map_err(|e| e.kind().to_owned()))
                .collect()
        }

        /// Feeds `bytes` cut at `cuts` (positions, in any order, may repeat).
        fn feed_in_chunks(
            assembler: &mut LineAssembler,
            bytes: &[u8],
            cuts: &[usize],
        ) -> Vec<Result<Vec<u8>, SensorError>> {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut out = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                out.extend(assembler.feed(&bytes[from..cut]));
                from = cut;
            }
            out
        }

        fn line_without_newline() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(
                    any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
                    0..40
                ),
                (0usize..80, any::<u8>())
                    .prop_map(|(n, b)| vec![if b == b'\n' { b'x' } else { b }; n]),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn assembled_lines_never_exceed_the_cap(
                // Newlines one byte in `every`, so lines are short and long against `max`.
                bytes in (prop::collection::vec(any::<u8>(), 0..600), 2u8..=255).prop_map(
                    |(bytes, every)| {
                        bytes
                            .into_iter()
                            .map(|b| if b % every == 0 { b'\n' } else { b })
                            .collect::<Vec<u8>>()
                    }
                ),
                cuts in prop::collection::vec(any::<usize>(), 0..20),
                max in 1usize..100,
                quiet in any::<bool>(),
            ) {
                let mut assembler = LineAssembler::new(max);
                if quiet {
                    assembler.quiet();
                }
                let out = feed_in_chunks(&mut assembler, &bytes, &cuts);
                let newlines = bytes.iter().filter(|b| **b == b'\n').count();
                // At most one outcome per line, and memory held is bounded by the cap.
                prop_assert!(out.len() <= newlines + 1);
                prop_assert!(assembler.line.len() <= max);
                let mut total = 0;
                for line in out.iter().flatten() {
                    prop_assert!(line.len() <= max);
                    prop_assert!(!line.contains(&b'\n'));
                    total += line.len();
                }
                prop_assert!(total <= bytes.len());
            }

            #[test]
            fn chunking_does_not_change_the_lines(
                lines in prop::collection::vec(line_without_newline(), 0..12),
                cuts in prop::collection::vec(any::<usize>(), 0..30),
                max in 1usize..64,
                quiet in any::<bool>(),
            ) {
                let mut bytes = Vec::new();
                for line in &lines {
                    bytes.extend_from_slice(line);
                    bytes.push(b'\n');
                }
                let start = |a: &mut LineAssembler| if quiet { a.quiet() };
                let mut whole = LineAssembler::new(max);
                start(&mut whole);
                let at_once = outcomes(whole.feed(&bytes));
                let mut chunked = LineAssembler::new(max);
                start(&mut chunked);
                let in_chunks = outcomes(feed_in_chunks(&mut chunked, &bytes, &cuts));
                prop_assert_eq!(&at_once, &in_chunks);
                // A line that began before we listened is dropped; every other line comes
                // out whole, or as one error when it is over the cap.
                let heard = if quiet { &lines[..] } else { &lines[lines.len().min(1)..] };
                prop_assert_eq!(at_once, expected(heard, max));
            }
        }
    }
}
