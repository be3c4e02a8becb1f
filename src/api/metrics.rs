//! `GET /metrics`: counters in the Prometheus text exposition format, for a Prometheus
//! that scrapes every gateway.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::events::{Channel, Hub};
use crate::sensors::health::Estado;
use crate::sensors::HealthBoard;
use crate::store::Store;

/// A limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    ConnectionsPerAddress,
    BodySize,
    UriLength,
    HeaderTimeout,
    HeaderSize,
    WriteRate,
    SocketMessageRate,
    SocketMessageSize,
    ForbiddenOrigin,
    Unauthorized,
    Forbidden,
}

impl Limit {
    const ALL: [Limit; 12] = [
        Limit::Connections,
        Limit::ConnectionsPerAddress,
        Limit::BodySize,
        Limit::UriLength,
        Limit::HeaderTimeout,
        Limit::HeaderSize,
        Limit::WriteRate,
        Limit::SocketMessageRate,
        Limit::SocketMessageSize,
        Limit::ForbiddenOrigin,
        Limit::Unauthorized,
        Limit::Forbidden,
    ];

    fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerAddress => "connections_per_address",
            Limit::BodySize => "body_size",
            Limit::UriLength => "uri_length",
            Limit::HeaderTimeout => "header_timeout",
            Limit::HeaderSize => "header_size",
            Limit::WriteRate => "write_rate",
            Limit::SocketMessageRate => "socket_message_rate",
            Limit::SocketMessageSize => "socket_message_size",
            Limit::ForbiddenOrigin => "forbidden_origin",
            Limit::Unauthorized => "unauthorized",
            Limit::Forbidden => "forbidden",
        }
    }
}

/// Counters kept by the HTTP side.
#[derive(Default)]
pub struct Counters {
    limits: [AtomicU64; 12],
}

impl Counters {
    /// Counts one refusal by `limit`.
    pub fn hit(&self, limit: Limit) {
        self.limits[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn hits(&self, limit: Limit) -> u64 {
        self.limits[limit as usize].load(Ordering::Relaxed)
    }
}

/// Picks one counter out of a channel's stats.
type ChannelValue = fn(&crate::events::ChannelStats) -> u64;

/// The exposition text.
pub fn render(counters: &Counters, hub: &Hub, health: &HealthBoard, store: &Store) -> String {
    let mut out = String::with_capacity(4096);
    let mut lines: Vec<String> = Vec::new();

    let name = family_line(
        &mut out,
        "sensorgate_limit_hits_total",
        "counter",
        "Requests, connections and messages refused by a limit.",
    );
    for limit in Limit::ALL {
        lines.push(format!(
            "{name}{{limit=\"{}\"}} {}",
            limit.name(),
            counters.hits(limit)
        ));
    }
    flush(&mut out, &mut lines);

    let stats = hub.stats();
    let per_channel: [(&str, &str, &str, ChannelValue); 4] = [
        (
            "sensorgate_websocket_clients",
            "gauge",
            "Connected clients per channel.",
            |c| c.connections,
        ),
        (
            "sensorgate_events_emitted_total",
            "counter",
            "Events emitted per channel.",
            |c| c.events_emitted,
        ),
        (
            "sensorgate_messages_sent_total",
            "counter",
            "Events delivered to clients per channel.",
            |c| c.messages_sent,
        ),
        (
            "sensorgate_slow_disconnects_total",
            "counter",
            "Clients closed for not keeping up, per channel.",
            |c| c.slow_disconnects,
        ),
    ];
    for (metric, kind, help, value) in per_channel {
        let name = family_line(&mut out, metric, kind, help);
        for channel in Channel::ALL {
            let c = &stats.channels[channel.as_str()];
            lines.push(format!("{name}{{channel=\"{channel}\"}} {}", value(c)));
        }
        flush(&mut out, &mut lines);
    }
    let scalars = [
        (
            "sensorgate_clients",
            "gauge",
            "Connected WebSocket and event-stream clients.",
            stats.total_connections as f64,
        ),
        (
            "sensorgate_queued_frames",
            "gauge",
            "Frames waiting in client queues.",
            stats.queued_frames as f64,
        ),
        (
            "sensorgate_coalesced_readings_total",
            "counter",
            "Readings dropped from slow clients' queues as superseded.",
            stats.coalesced_readings as f64,
        ),
        (
            "sensorgate_last_seq",
            "gauge",
            "Sequence number of the newest event.",
            hub.published() as f64,
        ),
        (
            "sensorgate_writer_commits_total",
            "counter",
            "Storage transactions committed.",
            store.health().commits() as f64,
        ),
        (
            "sensorgate_storage_ok",
            "gauge",
            "1 while the last commit succeeded.",
            f64::from(u8::from(store.health().last_error().is_none())),
        ),
    ];
    for (metric, kind, help, value) in scalars {
        let name = family_line(&mut out, metric, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }

    let sensors = health.all();
    let name = family_line(
        &mut out,
        "sensorgate_sensor_reads_total",
        "counter",
        "Read attempts per sensor and outcome.",
    );
    for (id, salud) in &sensors {
        for (outcome, count) in &salud.conteo {
            lines.push(format!(
                "{name}{{sensor_id=\"{id}\",outcome=\"{outcome}\"}} {count}"
            ));
        }
    }
    flush(&mut out, &mut lines);
    let name = family_line(
        &mut out,
        "sensorgate_sensor_online",
        "gauge",
        "1 while a sampled sensor delivers good samples.",
    );
    for (id, salud) in &sensors {
        lines.push(format!(
            "{name}{{sensor_id=\"{id}\"}} {}",
            u8::from(salud.estado == Estado::Online)
        ));
    }
    flush(&mut out, &mut lines);
    out
}

fn family_line(out: &mut String, name: &str, kind: &str, help: &str) -> String {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name.to_owned()
}

fn flush(out: &mut String, lines: &mut Vec<String>) {
    for line in lines.drain(..) {
        out.push_str(&line);
        out.push('\n');
    }
}
