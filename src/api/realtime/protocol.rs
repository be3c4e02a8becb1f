//! The client protocol: the messages a session sends of its own (the greeting, its
//! stats, errors, snapshots and resyncs), besides the events it forwards. Shapes and
//! field order follow the original service.

use serde::Serialize;
use serde_json::Value;

use crate::events::HubStats;
use crate::model::{format_time, Micros, Reading, Sensor};

fn to_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("protocol messages always serialise")
}

#[derive(Serialize)]
struct Connection<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    status: &'static str,
    channel: &'a str,
    client_id: &'a str,
    timestamp: String,
}

/// The first message on a new socket.
pub fn connection_message(channel: &str, client_id: &str, at: Micros) -> String {
    to_text(&Connection {
        kind: "connection",
        status: "connected",
        channel,
        client_id,
        timestamp: format_time(at),
    })
}

#[derive(Serialize)]
struct Stats<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    data: &'a HubStats,
    timestamp: String,
}

/// The second message on a new socket: the same counters as `GET /api/v1/ws/stats`.
pub fn stats_message(stats: &HubStats, at: Micros) -> String {
    to_text(&Stats {
        kind: "stats",
        data: stats,
        timestamp: format_time(at),
    })
}

#[derive(Serialize)]
struct ErrorMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    code: &'a str,
    detail: &'a str,
    timestamp: String,
}

/// An error told to a socket client (a malformed message, an unknown action); `id`
/// repeats the id of the message it answers.
pub fn error_message(id: Option<&Value>, code: &str, detail: &str, at: Micros) -> String {
    to_text(&ErrorMessage {
        kind: "error",
        id,
        code,
        detail,
        timestamp: format_time(at),
    })
}

#[derive(Serialize)]
struct SnapshotMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    sensors: &'a [&'a Sensor],
    readings: &'a [&'a Reading],
    timestamp: String,
}

/// The current sensors and their latest readings, consistent with `seq`: every event
/// after it follows.
pub fn snapshot_message(
    seq: u64,
    sensors: &[&Sensor],
    readings: &[&Reading],
    at: Micros,
) -> String {
    to_text(&SnapshotMessage {
        kind: "snapshot",
        seq,
        sensors,
        readings,
        timestamp: format_time(at),
    })
}

#[derive(Serialize)]
struct ResyncMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    reason: &'a str,
    since: u64,
    oldest_seq: u64,
    last_seq: u64,
    timestamp: String,
}

/// Tells a resuming client that its `since` cannot be honoured exactly
/// (`since_too_old`: events after it were removed by retention; `unknown_seq`: it is
/// ahead of this gateway's numbering), so it should reload its state over REST. Events
/// from `oldest_seq` on follow.
pub fn resync_message(
    reason: &str,
    since: u64,
    oldest_seq: u64,
    last_seq: u64,
    at: Micros,
) -> String {
    to_text(&ResyncMessage {
        kind: "resync",
        reason,
        since,
        oldest_seq,
        last_seq,
        timestamp: format_time(at),
    })
}
