//! sensorgate: an edge daemon for sensor gateways.
//!
//! Data flows one way:
//!
//! ```text
//! sensors (source threads) ─┐
//!                           ├─> store::Store ─> writer thread ─> SQLite (one transaction per batch)
//! api (REST writes) ────────┘                        │
//!                                                    └─> events::Hub ─┬─> api::ws sessions
//!                                                                     └─> uplink ─> MQTT broker
//! ```
//!
//! - [`config`]: typed configuration, validated once.
//! - [`clock`]: whether sample times can be trusted (boards without a real-time clock).
//! - [`alerts`]: alert rules over readings, their state, acknowledgements, silences and
//!   webhook notifications; one watcher task that follows the hub.
//! - [`model`]: sensors and readings as clients see them, and validated inputs.
//! - [`store`]: schema, the writer thread (group commit, event numbering), read queries.
//! - [`events`]: the event envelope and the hub that fans events out.
//! - [`sensors`]: sources and the scheduler that drives them; calibration and derived values.
//! - [`api`]: accept loop, routing, REST handlers, WebSocket sessions, limits, metrics.
//! - [`auth`]: tokens, scopes, the policy, the origin and `Host` checks, trusted proxies.
//! - [`app`]: wiring and ordered shutdown.
//! - [`shutdown`]: the shutdown signal and drain.
//! - [`backoff`]: the waits between attempts at something that failed.
//! - [`demo`]: stand-in hardware for `--demo`.
//! - [`service`]: systemd readiness, status and watchdog; logs; signals.
//! - [`uplink`]: the fleet uplink to an MQTT broker (store-and-forward, Home Assistant
//!   discovery); off unless configured.

// Two exceptions, allowed where they are: reading the kernel's clock status (`clock`),
// and the room left for the WAL (`store::checkpointer`).
#![deny(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod demo;
pub mod events;
pub mod model;
pub mod sensors;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod uplink;
