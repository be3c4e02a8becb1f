//! The uplink's settings: the broker's address, the gateway's name and topics, the MQTT
//! client's options and TLS, resolved once from the config.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use super::configured::UplinkConfig;
use super::error::UplinkError;
use super::topics::{topic_level, Topics};

/// The client's in-flight limit and packet id range.
const CLIENT_INFLIGHT: u16 = 100;

/// Largest MQTT packet, either way; a sensor event with a long source spec fits.
const MAX_PACKET: usize = 256 * 1024;

/// The broker to connect to, from `uplink.broker` and `uplink.tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    /// Reads `mqtt://host[:port]`, `mqtts://host[:port]` (TLS) or `host[:port]`; the port
    /// defaults to 1883, or 8883 with TLS.
    pub fn parse(text: &str, tls: bool) -> Result<BrokerAddress, String> {
        let (tls, rest) = match text.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (tls, rest),
            Some(("mqtts" | "ssl" | "tls", rest)) => (true, rest),
            Some((scheme, _)) => {
                return Err(format!("has scheme \"{scheme}\"; use mqtt:// or mqtts://"))
            }
            None => (tls, text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address in brackets has colons of its own.
            Some((host, port)) if !port.contains(']') => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("has an invalid port \"{port}\""))?;
                (host, port)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("\"{text}\" is not mqtt://host:port"));
        }
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// The host name, as a topic level: the default gateway name.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name = topic_level(name.trim());
    if name.is_empty() {
        "sensorgate".into()
    } else {
        name
    }
}

/// The uplink's settings, resolved from the config.
pub(super) struct Settings {
    pub(super) broker: BrokerAddress,
    pub(super) gateway: String,
    pub(super) topics: Topics,
    pub(super) options: MqttOptions,
    /// The discovery prefix, when discovery is on.
    pub(super) discovery: Option<String>,
    /// Time between two stored events sent while catching up.
    pub(super) replay_interval: Duration,
}

impl Settings {
    /// The settings of `[uplink]`; `None` when no broker is configured.
    pub(super) fn from_config(uplink: &UplinkConfig) -> Result<Option<Settings>, UplinkError> {
        let Some(broker) = &uplink.broker else {
            return Ok(None);
        };
        // Validated with the config already.
        let broker = BrokerAddress::parse(broker, uplink.tls).map_err(UplinkError::Config)?;
        let gateway = uplink.gateway.clone().unwrap_or_else(host_name);
        let topics = Topics::new(&uplink.topic_prefix, &gateway);
        let client_id = uplink
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sensorgate-{gateway}"));
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options
            .set_keep_alive(Duration::from_secs(uplink.keep_alive_s))
            .set_clean_session(true)
            .set_inflight(CLIENT_INFLIGHT)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_last_will(LastWill::new(
                topics.status(),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(username) = &uplink.username {
            options.set_credentials(
                username.clone(),
                uplink.password.clone().unwrap_or_default(),
            );
        }
        if broker.tls {
            options.set_transport(Transport::tls_with_config(tls_config(
                uplink.ca_file.as_deref(),
            )?));
        }
        Ok(Some(Settings {
            broker,
            gateway,
            topics,
            options,
            discovery: uplink.discovery.then(|| uplink.discovery_prefix.clone()),
            replay_interval: Duration::from_secs(1) / uplink.replay_per_second.max(1),
        }))
    }
}

/// TLS through rustls (ring): the CA of `ca_file`, or the system's trusted roots.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<TlsConfiguration, UplinkError> {
    if let Some(path) = ca_file {
        let ca = std::fs::read(path)
            .map_err(|e| UplinkError::Tls(format!("{}: {e}", path.display())))?;
        return Ok(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        });
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(UplinkError::Tls(
            "no trusted CA certificates found on this system; set uplink.ca_file".into(),
        ));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses() {
        let parse = |t: &str, tls| BrokerAddress::parse(t, tls);
        assert_eq!(
            parse("mqtt://broker.lan", false).unwrap(),
            BrokerAddress {
                host: "broker.lan".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(parse("mqtts://broker.lan", false).unwrap().port, 8883);
        assert!(parse("mqtts://broker.lan", false).unwrap().tls);
        assert_eq!(parse("broker.lan:1884", false).unwrap().port, 1884);
        assert_eq!(parse("broker.lan", true).unwrap().port, 8883);
        assert_eq!(
            parse("mqtt://10.0.0.5:1883/", false).unwrap().host,
            "10.0.0.5"
        );
        assert_eq!(parse("mqtt://[::1]:1884", false).unwrap().host, "::1");
        assert_eq!(parse("mqtt://[::1]", false).unwrap().port, 1883);
        assert!(parse("http://broker.lan", false).is_err());
        assert!(parse("mqtt://broker.lan:0", false).is_err());
        assert!(parse("mqtt://broker.lan:x", false).is_err());
        assert!(parse("mqtt://", false).is_err());
        assert_eq!(
            parse("mqtts://b:8884", false).unwrap().to_string(),
            "mqtts://b:8884"
        );
    }
}
