//! `GET /metrics`: counters in the Prometheus text exposition format, for a Prometheus
//! that scrapes every gateway.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::events::{Channel, Hub};
use crate::sensors::health::Estado;
use crate::sensors::HealthBoard;
use crate::store::{process_write_bytes, Snapshot, Store};
use crate::uplink;

/// A limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    ConnectionsPerAddress,
    BodySize,
    BodyTimeout,
    UriLength,
    HeaderTimeout,
    HeaderSize,
    WriteRate,
    SocketMessageRate,
    SocketMessageSize,
    ForbiddenOrigin,
    Unauthorized,
    Forbidden,
    ForbiddenHost,
}

impl Limit {
    const ALL: [Limit; 14] = [
        Limit::Connections,
        Limit::ConnectionsPerAddress,
        Limit::BodySize,
        Limit::BodyTimeout,
        Limit::UriLength,
        Limit::HeaderTimeout,
        Limit::HeaderSize,
        Limit::WriteRate,
        Limit::SocketMessageRate,
        Limit::SocketMessageSize,
        Limit::ForbiddenOrigin,
        Limit::Unauthorized,
        Limit::Forbidden,
        Limit::ForbiddenHost,
    ];

    fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerAddress => "connections_per_address",
            Limit::BodySize => "body_size",
            Limit::BodyTimeout => "body_timeout",
            Limit::UriLength => "uri_length",
            Limit::HeaderTimeout => "header_timeout",
            Limit::HeaderSize => "header_size",
            Limit::WriteRate => "write_rate",
            Limit::SocketMessageRate => "socket_message_rate",
            Limit::SocketMessageSize => "socket_message_size",
            Limit::ForbiddenOrigin => "forbidden_origin",
            Limit::Unauthorized => "unauthorized",
            Limit::Forbidden => "forbidden",
            Limit::ForbiddenHost => "host_not_allowed",
        }
    }
}

/// Who sent the first Close frame of a WebSocket close; a connection that ended without
/// one counts as 1006, closed by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseInitiator {
    Client,
    Server,
}

impl CloseInitiator {
    const ALL: [CloseInitiator; 2] = [CloseInitiator::Client, CloseInitiator::Server];

    fn name(self) -> &'static str {
        match self {
            CloseInitiator::Client => "client",
            CloseInitiator::Server => "server",
        }
    }
}

/// The WebSocket close codes counted one by one: the standard ones and the daemon's own.
/// Clients may send any code from 3000 to 4999; those count together as `other`, so that
/// no client can grow the metric.
const CLOSE_CODES: [u16; 13] = [
    1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 4000, 4008, 4029, 4401,
];

/// Counters kept by the HTTP side.
#[derive(Default)]
pub struct Counters {
    limits: [AtomicU64; 14],
    /// Per initiator, per code of [`CLOSE_CODES`], then `other`.
    closes: [[AtomicU64; CLOSE_CODES.len() + 1]; 2],
}

impl Counters {
    /// Counts one WebSocket close.
    pub fn count_close(&self, code: u16, initiator: CloseInitiator) {
        let index = CLOSE_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_CODES.len());
        self.closes[initiator as usize][index].fetch_add(1, Ordering::Relaxed);
    }

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

/// The exposition text. `snapshot` gives the last value of each sensor and `tipo`;
/// `uplink` the fleet uplink's state, when it runs.
pub fn render(
    counters: &Counters,
    hub: &Hub,
    health: &HealthBoard,
    store: &Store,
    uplink: Option<&uplink::Stats>,
    snapshot: Option<&Snapshot>,
) -> String {
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

    let name = family_line(
        &mut out,
        "sensorgate_websocket_closes_total",
        "counter",
        "WebSocket connections closed, by close code and by who sent the first Close frame (1006: none was sent).",
    );
    for initiator in CloseInitiator::ALL {
        let counted = &counters.closes[initiator as usize];
        let codes = CLOSE_CODES
            .iter()
            .map(u16::to_string)
            .chain(["other".into()]);
        for (code, count) in codes.zip(counted) {
            lines.push(format!(
                "{name}{{code=\"{code}\",initiator=\"{}\"}} {}",
                initiator.name(),
                count.load(Ordering::Relaxed)
            ));
        }
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
    let figures = &store.health().storage;
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
            "sensorgate_writer_batch_commands_total",
            "counter",
            "Commands applied in committed transactions; over commits, the mean batch size.",
            store.health().batch_commands() as f64,
        ),
        (
            "sensorgate_storage_ok",
            "gauge",
            "1 while storage works: no damage found, no outage under way (one ends once commits have worked for 3 s) and, with synchronous = normal, the last WAL flush worked.",
            f64::from(u8::from(store.health().failure().is_none())),
        ),
        (
            "sensorgate_storage_write_bytes_per_day",
            "gauge",
            "Bytes written to storage per day, at the rate of the last ten minutes.",
            figures.bytes_per_day() as f64,
        ),
        (
            "sensorgate_storage_write_budget_bytes_per_day",
            "gauge",
            "The daily write budget (storage.write_budget_mb_per_day); 0 when there is none.",
            figures.budget_bytes_per_day() as f64,
        ),
        (
            "sensorgate_storage_write_budget_used_ratio",
            "gauge",
            "Bytes written per day over the budget; 0 when there is none.",
            match figures.budget_bytes_per_day() {
                0 => 0.0,
                budget => figures.bytes_per_day() as f64 / budget as f64,
            },
        ),
        (
            "sensorgate_storage_commit_window_seconds",
            "gauge",
            "How long samples wait for others before their commit, as the write budget set it.",
            figures.commit_window_ms() as f64 / 1000.0,
        ),
        (
            "sensorgate_storage_free_bytes",
            "gauge",
            "Free bytes of the database's file system.",
            figures.free_bytes() as f64,
        ),
        (
            "sensorgate_storage_free_floor_bytes",
            "gauge",
            "Free bytes the database leaves its file system; 0 when there is no floor.",
            figures.floor_bytes() as f64,
        ),
        (
            "sensorgate_storage_seconds_to_floor",
            "gauge",
            "Time until the database, growing as in the last ten minutes, reaches the free-space floor; +Inf while it does not grow.",
            figures
                .days_to_floor()
                .map_or(f64::INFINITY, |days| days * 86_400.0),
        ),
        (
            "sensorgate_storage_pruned_readings_total",
            "counter",
            "Oldest raw readings removed to keep the free-space floor.",
            figures.pruned_readings() as f64,
        ),
    ];
    for (metric, kind, help, value) in scalars {
        let name = family_line(&mut out, metric, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    // A summary without quantiles: its sum over its count is the mean commit time.
    let name = family_line(
        &mut out,
        "sensorgate_writer_commit_seconds",
        "summary",
        "Committed transactions and the time they took, from begin to commit.",
    );
    let _ = writeln!(
        out,
        "{name}_sum {}\n{name}_count {}",
        store.health().commit_seconds(),
        store.health().commits()
    );
    if let Some(bytes) = process_write_bytes() {
        let name = family_line(
            &mut out,
            "sensorgate_process_write_bytes_total",
            "counter",
            "Bytes this process caused to be written to storage (write_bytes of /proc/self/io).",
        );
        let _ = writeln!(out, "{name} {bytes}");
    }
    if let Some(uplink) = uplink {
        let published = hub.published();
        let scalars = [
            (
                "sensorgate_uplink_connected",
                "gauge",
                "1 while the uplink is connected to its MQTT broker.",
                u64::from(uplink.connected()),
            ),
            (
                "sensorgate_uplink_backlog_events",
                "gauge",
                "Events not yet acknowledged by the broker: newest seq minus the uplink cursor.",
                published.saturating_sub(uplink.cursor()),
            ),
            (
                "sensorgate_uplink_cursor",
                "gauge",
                "Newest seq up to which the broker acknowledged every event.",
                uplink.cursor(),
            ),
            (
                "sensorgate_uplink_published_total",
                "counter",
                "Events the broker acknowledged since start.",
                uplink.published(),
            ),
            (
                "sensorgate_uplink_lost_events_total",
                "counter",
                "Events removed by retention before the uplink could send them.",
                uplink.lost(),
            ),
        ];
        for (metric, kind, help, value) in scalars {
            let name = family_line(&mut out, metric, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
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
    render_modbus(&mut out, &mut lines);
    if let Some(snapshot) = snapshot {
        let name = family_line(
            &mut out,
            "sensorgate_last_value",
            "gauge",
            "Latest reading per sensor and tipo, in the reading's unit.",
        );
        for reading in &snapshot.latest {
            lines.push(format!(
                "{name}{{sensor_id=\"{}\",tipo=\"{}\"}} {}",
                reading.sensor_id,
                label_value(&reading.tipo),
                reading.valor
            ));
        }
        flush(&mut out, &mut lines);
    }
    out
}

/// The load of every Modbus bus: requests, time spent waiting for answers, failures.
fn render_modbus(out: &mut String, lines: &mut Vec<String>) {
    let buses = crate::sensors::modbus::loads();
    if buses.is_empty() {
        return;
    }
    type Figure = fn(&crate::sensors::modbus::BusLoad) -> String;
    let families: [(&str, &str, &str, Figure); 3] = [
        (
            "sensorgate_modbus_requests_total",
            "counter",
            "Requests sent on each Modbus bus.",
            |b| b.requests.to_string(),
        ),
        (
            "sensorgate_modbus_busy_seconds_total",
            "counter",
            "Time each Modbus bus spent waiting for answers; its rate is the bus's load.",
            |b| b.busy_seconds.to_string(),
        ),
        (
            "sensorgate_modbus_connected",
            "gauge",
            "1 while the port of a Modbus bus is open or its connection up.",
            |b| u8::from(b.connected).to_string(),
        ),
    ];
    for (metric, kind, help, value) in families {
        let name = family_line(out, metric, kind, help);
        for bus in &buses {
            lines.push(format!(
                "{name}{{bus=\"{}\"}} {}",
                label_value(&bus.bus),
                value(bus)
            ));
        }
        flush(out, lines);
    }
    let name = family_line(
        out,
        "sensorgate_modbus_errors_total",
        "counter",
        "Failed requests on each Modbus bus, by kind (timeout, checksum, exception name, port_lost).",
    );
    for bus in &buses {
        for (kind, count) in &bus.errors {
            lines.push(format!(
                "{name}{{bus=\"{}\",kind=\"{kind}\"}} {count}",
                label_value(&bus.bus)
            ));
        }
    }
    flush(out, lines);
}

/// A label value with `\`, `"` and line feeds escaped, as the text format wants.
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends the alert watcher's figures to the exposition text.
pub fn render_alerts(out: &mut String, stats: &crate::alerts::AlertStats) {
    let scalars = [
        (
            "sensorgate_alerts_firing",
            "gauge",
            "Alert rules whose alert fires now.",
            stats.firing(),
        ),
        (
            "sensorgate_alert_notifications_delivered_total",
            "counter",
            "Webhook notifications delivered since start.",
            stats.delivered(),
        ),
        (
            "sensorgate_alert_notification_failures_total",
            "counter",
            "Webhook delivery attempts that failed since start; each is retried.",
            stats.failed(),
        ),
    ];
    for (metric, kind, help, value) in scalars {
        let name = family_line(out, metric, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("plain"), "plain");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn write_bytes_are_read_on_linux() {
        if std::path::Path::new("/proc/self/io").exists() {
            assert!(process_write_bytes().is_some());
        }
    }
}
