//! sensorgate: an edge daemon for sensor gateways.
//!
//! Data flows one way:
//!
//! ```text
//! sensors (source threads) ─┐ (a sample sink, wired in app)
//!                           ├─> store::Store ─> writer thread ─> SQLite (one transaction per batch)
//! api (REST writes) ────────┘                        │
//!                                                    └─> events::Hub ─┬─> store::Feed ─┬─> api sessions
//!                                                                     │                └─> uplink ─> MQTT
//!                                                                     └─> alerts, sensor changes (app)
//! ```
//!
//! Dependencies point down: `app` wires `api`, `uplink`, `sensors`, `service` and `alerts`
//! over `store`, which stands on `events` and `model`; each part owns its settings and
//! `config` composes them. `tests/architecture.rs` holds the table.
//!
//! - [`config`]: typed configuration, validated once.
//! - [`clock`]: whether sample times can be trusted (boards without a real-time clock).
//! - [`alerts`]: alert rules over readings, their state, acknowledgements, silences and
//!   webhook notifications; one watcher task that follows the hub.
//! - [`model`]: sensors, readings and samples as clients see them, validated inputs,
//!   calibration and derived values.
//! - [`store`]: schema, the writer thread (group commit, event numbering), read queries,
//!   the token table, the event log and the feed (stored events, then live ones).
//! - [`events`]: events with a typed body and their frames, and the hub that fans them out.
//! - [`sensors`]: sources and the scheduler that drives them.
//! - [`api`]: accept loop, routing, REST handlers, WebSocket and SSE sessions and their
//!   client protocol, limits, metrics.
//! - [`auth`]: tokens, scopes, the policy, the origin and `Host` checks, trusted proxies.
//! - [`control`]: the control socket, through which the command line's token and backup
//!   commands reach a running daemon.
//! - [`app`]: wiring and ordered shutdown.
//! - [`shutdown`]: the shutdown signal and drain.
//! - [`backoff`]: the waits between attempts at something that failed.
//! - [`demo`]: stand-in hardware for `--demo`.
//! - [`service`]: systemd readiness, status and watchdog; logs; signals; giving freed
//!   memory back.
//! - [`uplink`]: the fleet uplink to an MQTT broker (store-and-forward, Home Assistant
//!   discovery); off unless configured.

// Four exceptions, allowed where they are: reading the kernel's clock status (`clock`),
// the room left for the WAL (`store::checkpointer`), the file system's free space
// (`store::capacity`) and giving freed memory back (`service::memory`).
#![deny(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod control;
pub mod demo;
pub mod events;
pub mod model;
pub mod sensors;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod uplink;
