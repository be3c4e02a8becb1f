//! Trusted proxies: who the client is when a reverse proxy (for TLS) stands in front.
//!
//! Behind a proxy every connection comes from the proxy's address, and limits kept per
//! address would become one limit for everyone. A proxy says who it forwards for in
//! `X-Forwarded-For` (or the standard `Forwarded`), but any client can send those
//! headers too: they are read only when the connection comes from a configured proxy,
//! and only as far as they were written by trusted hops. The client is the right-most
//! address in the chain that is not a trusted proxy; whatever a client wrote to the left
//! of it is not believed.

use std::net::IpAddr;

use hyper::header::{HeaderMap, FORWARDED};

/// An address or a block of addresses: `10.0.0.7`, `10.0.0.0/8`, `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    network: IpAddr,
    prefix: u8,
}

impl AddressRange {
    /// Parses `ADDRESS` or `ADDRESS/PREFIX`; the reason when it cannot.
    pub fn parse(text: &str) -> Result<AddressRange, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or address/prefix"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= bits => p,
                _ => return Err(format!("{text:?}: the prefix must be 0 to {bits}")),
            },
        };
        Ok(AddressRange { network, prefix })
    }

    /// Whether `address` is in the range (an IPv4 address reached over IPv6 counts as
    /// IPv4).
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match (self.network, address) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                prefix_matches(&net.octets(), &a.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                prefix_matches(&net.octets(), &a.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_matches(net: &[u8], address: &[u8], prefix: u8) -> bool {
    let (whole, rest) = ((prefix / 8) as usize, prefix % 8);
    if net[..whole] != address[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        net[whole] & mask == address[whole] & mask
    }
}

/// The configured proxies (`server.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<AddressRange>);

impl TrustedProxies {
    /// From config entries, each checked by [`AddressRange::parse`] when the config was
    /// validated; an entry that does not parse is left out.
    pub fn new(entries: &[String]) -> TrustedProxies {
        TrustedProxies(
            entries
                .iter()
                .filter_map(|e| AddressRange::parse(e).ok())
                .collect(),
        )
    }

    /// Whether connections from `address` are a trusted proxy's.
    pub fn trusts(&self, address: IpAddr) -> bool {
        self.0.iter().any(|range| range.contains(address))
    }

    /// The client a request from `peer` is made for: `peer` itself unless it is a
    /// trusted proxy; otherwise the right-most address of `X-Forwarded-For` (or, without
    /// it, of `Forwarded`'s `for=`) that is not a trusted proxy. A hop that hides its
    /// address (`unknown`, an obfuscated name) ends the walk at the trusted hop that
    /// reported it.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops = forwarded_for(headers);
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(address) = hop else {
                return client;
            };
            client = *address;
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }
}

/// The chain of addresses a request was forwarded for, left (first client) to right
/// (last proxy before the peer); `None` for a hop that gave no address.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect::<Vec<_>>()
    };
    let xff = values("x-forwarded-for");
    if !xff.is_empty() {
        return xff.into_iter().map(parse_hop).collect();
    }
    values(FORWARDED.as_str())
        .into_iter()
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_hop(value.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// One hop: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_hop(text: &str) -> Option<IpAddr> {
    if let Ok(address) = text.parse() {
        return Some(address);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    text.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn ranges_match_by_prefix() {
        let range = AddressRange::parse("10.1.0.0/16").unwrap();
        assert!(range.contains(ip("10.1.200.3")));
        assert!(!range.contains(ip("10.2.0.1")));
        assert!(range.contains(ip("::ffff:10.1.0.9")));
        let odd = AddressRange::parse("192.168.1.128/25").unwrap();
        assert!(odd.contains(ip("192.168.1.200")) && !odd.contains(ip("192.168.1.127")));
        assert!(AddressRange::parse("fd00::/8")
            .unwrap()
            .contains(ip("fd12::1")));
        assert!(AddressRange::parse("0.0.0.0/0")
            .unwrap()
            .contains(ip("8.8.8.8")));
        assert!(AddressRange::parse("127.0.0.1")
            .unwrap()
            .contains(ip("127.0.0.1")));
        for bad in ["10.0.0.0/33", "pi.local", "10.0.0.0/x", "", "::/129"] {
            assert!(AddressRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_count_only_from_trusted_proxies() {
        let proxies = TrustedProxies::new(&["127.0.0.1".into(), "10.0.0.0/8".into()]);
        let forged = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(proxies.client(ip("192.0.2.9"), &forged), ip("192.0.2.9"));
        assert_eq!(proxies.client(ip("127.0.0.1"), &forged), ip("198.51.100.1"));
        assert_eq!(
            proxies.client(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1"),
            "a proxy's own request"
        );
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let proxies = TrustedProxies::new(&["127.0.0.1".into(), "10.0.0.0/8".into()]);
        let peer = ip("127.0.0.1");
        // The client wrote a fake first hop; the proxies appended the real ones.
        let chain = headers(&[
            ("x-forwarded-for", "1.1.1.1, 203.0.113.5"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        assert_eq!(proxies.client(peer, &chain), ip("203.0.113.5"));
        let all_trusted = headers(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(proxies.client(peer, &all_trusted), ip("10.0.0.3"));
        let hidden = headers(&[("x-forwarded-for", "203.0.113.5, unknown, 10.0.0.2")]);
        assert_eq!(proxies.client(peer, &hidden), ip("10.0.0.2"));
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let proxies = TrustedProxies::new(&["127.0.0.1".into()]);
        let peer = ip("127.0.0.1");
        let standard = headers(&[(
            "forwarded",
            "for=192.0.2.43;proto=https, For=\"[2001:db8:cafe::17]:4711\"",
        )]);
        assert_eq!(proxies.client(peer, &standard), ip("2001:db8:cafe::17"));
        let with_port = headers(&[("forwarded", "for=\"192.0.2.60:8080\";by=127.0.0.1")]);
        assert_eq!(proxies.client(peer, &with_port), ip("192.0.2.60"));
        let both = headers(&[
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        assert_eq!(proxies.client(peer, &both), ip("192.0.2.2"));
    }
}
