//! The `Host` check against DNS rebinding.
//!
//! A page on `evil.example` can make its own name resolve to the gateway's address: the
//! browser then sends the gateway requests with `Host: evil.example` and the page's own
//! origin, which it considers same-origin, and reads the answers. Checking `Origin`
//! against `Host` does not stop that, since the attacker chose both. What stops it is
//! answering only requests that name the gateway by one of its own names or addresses.

use std::net::IpAddr;

/// The names and addresses requests may carry in `Host`.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    /// Lower-case names, without a trailing dot.
    names: Vec<String>,
    addresses: Vec<IpAddr>,
    /// `"*"` was configured: every host is accepted.
    any: bool,
}

impl AllowedHosts {
    /// `localhost`, the host name and `<host name>.local`, the listen address, and the
    /// configured extra names or addresses (`auth.allowed_hosts`). Loopback addresses and
    /// the address a request arrived on are accepted besides (see [`AllowedHosts::allows`]).
    pub fn new(listen: IpAddr, host_name: Option<&str>, extra: &[String]) -> AllowedHosts {
        let mut names = vec!["localhost".to_owned()];
        if let Some(name) = host_name.map(normalise).filter(|n| !n.is_empty()) {
            let short = name.split('.').next().unwrap_or(&name).to_owned();
            names.push(format!("{short}.local"));
            names.push(short);
            names.push(name);
        }
        let mut addresses = Vec::new();
        if !listen.is_unspecified() {
            addresses.push(listen);
        }
        let mut any = false;
        for entry in extra {
            match entry.parse::<IpAddr>() {
                _ if entry == "*" => any = true,
                Ok(address) => addresses.push(address),
                Err(_) => names.push(normalise(entry)),
            }
        }
        names.dedup();
        AllowedHosts {
            names,
            addresses,
            any,
        }
    }

    /// Whether a request with this `Host` header, arriving on the local address `local`,
    /// may be answered. A request without `Host` is not from a browser (every browser
    /// sends one) and is answered. The port is not compared: the gateway answers on the
    /// port the request reached.
    pub fn allows(&self, host: Option<&str>, local: IpAddr) -> bool {
        let Some(host) = host else {
            return true;
        };
        if self.any {
            return true;
        }
        match split_host(host) {
            Some(HostName::Address(address)) => {
                address.is_loopback()
                    || address == local
                    || canonical(address) == canonical(local)
                    || self.addresses.contains(&address)
            }
            Some(HostName::Name(name)) => self.names.contains(&name),
            None => false,
        }
    }
}

/// Whether an `auth.allowed_hosts` entry is usable: `"*"`, an address, or a host name
/// (letters, digits, `-` and `.`), without scheme or port.
pub fn valid_entry(entry: &str) -> bool {
    entry == "*"
        || entry.parse::<IpAddr>().is_ok()
        || (!entry.is_empty()
            && entry.len() <= 253
            && entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && !entry.starts_with(['.', '-']))
}

/// This machine's host name, as the kernel has it.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

enum HostName {
    Address(IpAddr),
    Name(String),
}

/// The host part of a `Host` header: `name`, `name:port`, `1.2.3.4:port`, `[::1]:port`.
fn split_host(header: &str) -> Option<HostName> {
    let header = header.trim();
    if let Some(rest) = header.strip_prefix('[') {
        let (address, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return address.parse().ok().map(HostName::Address);
    }
    let host = match header.rsplit_once(':') {
        Some((host, port)) if is_port(port) => host,
        Some(_) => return None,
        None => header,
    };
    if host.is_empty() {
        return None;
    }
    Some(match host.parse::<IpAddr>() {
        Ok(address) => HostName::Address(address),
        Err(_) => HostName::Name(normalise(host)),
    })
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

fn normalise(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// An IPv4 address reached over an IPv6 socket shows as `::ffff:a.b.c.d`.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_gateways_names_and_addresses_are_allowed_and_nothing_else() {
        let hosts = AllowedHosts::new(
            ip("0.0.0.0"),
            Some("shed-pi"),
            &["sensors.farm.example".into(), "203.0.113.7".into()],
        );
        let lan = ip("192.168.1.20");
        for host in [
            "localhost",
            "LOCALHOST:8000",
            "127.0.0.1:8000",
            "[::1]:8000",
            "shed-pi",
            "shed-pi.local:8000",
            "shed-pi.local.",
            "192.168.1.20:8000",
            "sensors.farm.example",
            "203.0.113.7:443",
        ] {
            assert!(hosts.allows(Some(host), lan), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8000",
            "shed-pi.evil.example",
            "192.168.1.21:8000",
            "",
            "shed-pi:80:80",
            "[::1",
            "localhost.evil.example",
        ] {
            assert!(!hosts.allows(Some(host), lan), "{host}");
        }
        assert!(hosts.allows(None, lan), "no Host: not a browser");
        assert!(hosts.allows(Some("192.168.1.20"), ip("::ffff:192.168.1.20")));
    }

    #[test]
    fn a_listen_address_and_a_wildcard() {
        let hosts = AllowedHosts::new(ip("10.0.0.5"), None, &[]);
        assert!(hosts.allows(Some("10.0.0.5:8000"), ip("127.0.0.1")));
        assert!(!hosts.allows(Some("pi.local"), ip("10.0.0.5")));
        let any = AllowedHosts::new(ip("10.0.0.5"), None, &["*".into()]);
        assert!(any.allows(Some("evil.example"), ip("10.0.0.5")));
    }

    #[test]
    fn entries_are_names_or_addresses() {
        for good in ["*", "pi.local", "10.0.0.1", "::1", "sensors-1.farm.example"] {
            assert!(valid_entry(good), "{good}");
        }
        for bad in [
            "",
            "http://pi.local",
            "pi.local:8000",
            "-pi",
            "a b",
            "[::1]",
        ] {
            assert!(!valid_entry(bad), "{bad}");
        }
    }
}
