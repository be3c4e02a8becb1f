//! The uplink's section of the config file (`[uplink]`).

use std::path::PathBuf;

use serde::Deserialize;

/// The fleet uplink to an MQTT broker; off unless `broker` is set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// `mqtt://host:1883`, `mqtts://host:8883` or `host:port`; none: no uplink.
    pub broker: Option<String>,
    /// TLS to the broker (implied by `mqtts://`).
    pub tls: bool,
    /// PEM file of the CA that signed the broker's certificate; by default the system's.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// This gateway's name in topics; by default the host name.
    pub gateway: Option<String>,
    /// MQTT client id; by default `sensorgate-<gateway>`.
    pub client_id: Option<String>,
    /// First level of every topic.
    pub topic_prefix: String,
    /// Home Assistant MQTT discovery announcements.
    pub discovery: bool,
    pub discovery_prefix: String,
    /// Most stored events sent per second while catching up after an outage.
    pub replay_per_second: u32,
    /// Seconds between MQTT keep-alive pings.
    pub keep_alive_s: u64,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            broker: None,
            tls: false,
            ca_file: None,
            username: None,
            password: None,
            gateway: None,
            client_id: None,
            topic_prefix: "sensorgate".into(),
            discovery: true,
            discovery_prefix: "homeassistant".into(),
            replay_per_second: 200,
            keep_alive_s: 30,
        }
    }
}
