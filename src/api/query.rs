//! Query strings: `application/x-www-form-urlencoded` pairs, repeatable keys.

use std::str::FromStr;

use crate::model::{parse_time, FieldError, Micros};

/// Decoded query parameters, in order.
#[derive(Debug, Default, Clone)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses the query part of a URI; undecodable escapes are kept literally.
    pub fn parse(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(k), decode(v))
            })
            .collect();
        Query(pairs)
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, with comma-separated values split.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect()
    }
}

impl Query {
    /// A parameter parsed as `T`, if present; a bad value is recorded in `errors` as
    /// `message`, so that one 422 names every bad parameter.
    pub fn parsed<T: FromStr>(
        &self,
        name: &str,
        message: &str,
        errors: &mut Vec<FieldError>,
    ) -> Option<T> {
        let text = self.get(name)?;
        text.parse()
            .map_err(|_| errors.push(FieldError::new(name, message)))
            .ok()
    }

    /// A time parameter (RFC 3339 with an offset), if present.
    pub fn time(&self, name: &str, errors: &mut Vec<FieldError>) -> Option<Micros> {
        let text = self.get(name)?;
        parse_time(text)
            .ok_or_else(|| {
                errors.push(FieldError::new(
                    name,
                    "must be an RFC 3339 time with offset",
                ))
            })
            .ok()
    }
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_repeats() {
        let q = Query::parse(Some(
            "channel=sensors&channel=readings%2Cgeneral&tipo=temp+ext&x",
        ));
        assert_eq!(q.all("channel"), ["sensors", "readings", "general"]);
        assert_eq!(q.get("tipo"), Some("temp ext"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(q.get("y"), None);
    }

    #[test]
    fn keeps_bad_escapes() {
        assert_eq!(Query::parse(Some("a=%zz%4")).get("a"), Some("%zz%4"));
        assert_eq!(Query::parse(Some("a=%C3%A9")).get("a"), Some("é"));
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        /// `text` as a browser's form encoding sends it: spaces as `+`, every byte but
        /// unreserved ASCII escaped.
        fn form_encoded(text: &str) -> String {
            text.bytes()
                .map(|b| match b {
                    b' ' => "+".to_owned(),
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        }

        fn raw_query() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,100}",
                "([a-z%+=&,]|%[0-9a-fA-F]{2}|%[0-9a-fA-F]?){0,40}",
                prop::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|bytes| bytes.iter().map(|b| format!("%{b:02x}")).collect()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn form_encoded_pairs_decode_to_what_was_sent(
                pairs in prop::collection::vec((".{1,12}", ".{0,20}"), 0..8),
            ) {
                let query: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| format!("{}={}", form_encoded(k), form_encoded(v)))
                    .collect();
                let parsed = Query::parse(Some(&query.join("&")));
                prop_assert_eq!(parsed.0, pairs);
            }

            #[test]
            fn decoding_never_grows_the_text(query in raw_query()) {
                let parsed = Query::parse(Some(&query));
                let raw: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
                prop_assert_eq!(parsed.0.len(), raw.len());
                for ((key, value), raw) in parsed.0.iter().zip(raw) {
                    prop_assert!(key.len() + value.len() <= raw.len(), "{:?} from {:?}", (key, value), raw);
                }
                let listed: usize = parsed.all("a").iter().map(|v| v.len()).sum();
                prop_assert!(listed <= query.len());
            }
        }
    }
}
