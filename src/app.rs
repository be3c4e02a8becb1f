//! Wiring and ordered shutdown.
//!
//! Start: open storage (migrating it), start the writer, start the fleet uplink if one is
//! configured, bring configured sensors into the database, start their sources, serve,
//! and tell systemd it is ready. A reload brings configured sensors in line with the new
//! file. Stop, in this order: stop accepting and tell every connection and session
//! (sessions send Close 1001), wait for them with a deadline, stop the sources, stop the
//! uplink (it saves its cursor through the writer), then let the writer commit everything
//! queued and stop. Nothing that was acknowledged to a client is lost on a clean stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{mpsc, oneshot};

use crate::alerts::Alerts;
use crate::api::{self, State};
use crate::auth::{self, Policy};
use crate::clock::Clock;
use crate::config::{Config, SensorConfig};
use crate::control::server::ControlSocket;
use crate::events::{Body, Channel, Event, Hub};
use crate::model::{NewSensor, Sample, Sensor, SensorPatch};
use crate::sensors::{HealthBoard, SampleSink, Scheduler, SensorChange, SinkClosed};
use crate::service::{self, Supervisor};
use crate::shutdown::{Drain, Trigger};
use crate::store::{Emission, EmissionKind, SensorFilter, Store, StoreError, DATABASE_FILE};
use crate::uplink::Uplink;

/// Events the hub keeps for subscribers that fall briefly behind; one further behind
/// catches up from the database.
const HUB_CAPACITY: usize = 4096;

/// How long open connections get to finish after shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the daemon on an already-bound listener until `shutdown` completes. Every
/// config sent on `reloads` (already validated) is applied without a restart.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<Config>,
) -> Result<(), StoreError> {
    let hub = Hub::new(HUB_CAPACITY);
    let (store, writer) = Store::open(&config.storage, hub.clone())?;
    log::info!(
        "storage open at {}",
        config.storage.data_dir.join(DATABASE_FILE).display()
    );
    // Before the configured sensors are brought in, so that their events are sent too.
    let uplink = match Uplink::start(
        &config.uplink,
        config.sampling.offline_after_intervals,
        store.clone(),
        hub.clone(),
    )
    .await
    {
        Ok(uplink) => uplink,
        Err(e) => {
            log::error!("uplink not started: {e}");
            None
        }
    };
    sync_configured_sensors(&store, &[], &config.sensors).await;
    if config.auth.policy == Policy::None {
        log::warn!("auth policy \"none\": anyone on the network can change sensors and data");
    } else if let Err(e) = auth::bootstrap_admin(&store, &config.storage.data_dir).await {
        log::error!("could not create the first admin token: {e}");
    }

    let (trigger, signal) = Trigger::new();
    // After the configured sensors, so that rules naming them find them. A failure
    // leaves the gateway without alerts, never without sampling.
    let (alerts, watching) =
        match Alerts::start(&config.alerts, store.clone(), &hub, signal.clone()).await {
            Ok((alerts, task)) => (Some(alerts), Some(task)),
            Err(e) => {
                log::error!("alerts not started: {e}");
                (None, None)
            }
        };
    let health = Arc::new(HealthBoard::default());
    let clock = Arc::new(Clock::new(config.sampling.trust_clock));
    if !clock.trusted() {
        log::warn!(
            "the clock is not synchronised yet: readings are flagged hora_dudosa until a time \
             daemon synchronises it (set sampling.trust_clock = \"always\" on a board with a \
             real-time clock)"
        );
    }
    match store.sensors_told_offline().await {
        Ok(ids) => health.told_offline_before(ids),
        Err(e) => log::error!("cannot read which sensors were announced offline: {e}"),
    }
    let scheduler = Scheduler::new(
        Arc::new(StoreSink(store.clone())),
        health.clone(),
        clock.clone(),
        config.sampling.offline_after_intervals,
    );
    // Subscribed before the records are read, so no change falls in between.
    let events = hub.subscribe_without_readings();
    let (changes, sensor_changes) = mpsc::channel(SENSOR_CHANGES);
    tokio::spawn(follow_sensor_records(store.clone(), events, changes));
    let (started, sources_started) = oneshot::channel();
    let sampling = tokio::spawn(scheduler.run(sensor_changes, signal.clone(), started));
    let supervisor = Supervisor::new(store.clone(), hub.clone(), health.clone());
    let supervising = tokio::spawn(supervisor.run(signal.clone()));
    tokio::spawn(service::give_back_memory_periodically(signal.clone()));
    let (drain, guard) = Drain::new();
    // A daemon without it still samples and serves; only the command line's token and
    // backup commands then need the daemon stopped (under exclusive locking).
    let control = match ControlSocket::bind(&config.storage.data_dir) {
        Ok(socket) => {
            log::info!("control socket at {}", socket.path().display());
            Some(tokio::spawn(socket.serve(
                store.clone(),
                config.storage.data_dir.clone(),
                signal.clone(),
                guard.clone(),
            )))
        }
        Err(e) => {
            log::error!("{e}; `sensorgate token` and `backup` cannot reach this daemon");
            None
        }
    };
    let state = Arc::new(
        State::new(
            api::settings::Settings {
                server: config.server.clone(),
                realtime: config.realtime.clone(),
                limits: config.limits.clone(),
                auth: config.auth.clone(),
                data_dir: config.storage.data_dir.clone(),
                max_future_s: config.storage.max_future_s,
            },
            store.clone(),
            hub,
            health,
            clock,
            signal,
            guard,
        )
        .with_uplink(uplink.as_ref().map(Uplink::stats))
        .with_alerts(alerts.clone()),
    );
    let server = tokio::spawn(api::serve(listener, state.clone()));
    let sampled = sources_started.await.unwrap_or_default();
    log::info!("ready: {sampled} sensors sampled");
    service::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("ready: {sampled} sensors sampled")),
    ]);

    let mut current = config;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(next) = reloads.recv() => {
                reload(&store, &current, &next).await;
                if let Some(alerts) = &alerts {
                    if let Err(e) = alerts.configure(&next.alerts).await {
                        log::error!("alert rules not reloaded: {e}");
                    }
                }
                current = next;
            }
        }
    }

    log::info!("shutting down");
    service::notify(&[NotifyState::Stopping]);
    trigger.fire();
    let _ = server.await;
    if let Some(control) = control {
        let _ = control.await;
    }
    drop(state);
    if !drain.wait(DRAIN_DEADLINE).await {
        log::warn!("some connections did not close within {DRAIN_DEADLINE:?}");
    }
    let _ = sampling.await;
    let _ = supervising.await;
    if let Some(watching) = watching {
        let _ = watching.await;
    }
    if let Some(uplink) = uplink {
        uplink.stop().await;
    }
    store.close().await;
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .ok();
    log::info!("stopped");
    Ok(())
}

/// Applies a new config: configured sensors are added, changed or stopped (through the
/// store, so clients see the change and the scheduler follows it); WebSocket clients stay
/// connected. Server, storage and realtime settings only change with a restart.
async fn reload(store: &Store, current: &Config, next: &Config) {
    log::info!("reloading configuration");
    sync_configured_sensors(store, &current.sensors, &next.sensors).await;
    let needs_restart = [
        (
            "[server]",
            format!("{:?}", current.server) != format!("{:?}", next.server),
        ),
        (
            "[storage]",
            format!("{:?}", current.storage) != format!("{:?}", next.storage),
        ),
        (
            "[realtime]",
            format!("{:?}", current.realtime) != format!("{:?}", next.realtime),
        ),
        (
            "[sampling]",
            format!("{:?}", current.sampling) != format!("{:?}", next.sampling),
        ),
        ("[uplink]", current.uplink != next.uplink),
    ];
    for (section, changed) in needs_restart {
        if changed {
            log::warn!("{section} changed: takes effect after a restart");
        }
    }
    log::info!(
        "configuration reloaded: {} sensors configured",
        next.sensors.len()
    );
}

/// Brings the records of configured sensors in line with `next`; sensors that were in
/// `previous` but are no longer configured stop being sampled (their records and history
/// stay).
async fn sync_configured_sensors(store: &Store, previous: &[SensorConfig], next: &[SensorConfig]) {
    for sensor in next {
        if let Err(e) = sync_configured_sensor(store, sensor).await {
            log::error!("sensor \"{}\" not started: {e}", sensor.name);
        }
    }
    for gone in previous
        .iter()
        .filter(|p| !next.iter().any(|n| n.name == p.name))
    {
        let stop = async {
            if let Some(record) = store.sensor_named(gone.name.clone()).await? {
                let patch = SensorPatch {
                    activo: Some(false),
                    ..SensorPatch::default()
                };
                store.update_sensor(record.id, patch).await?;
            }
            Ok::<_, StoreError>(())
        };
        match stop.await {
            Ok(()) => log::info!(
                "sensor \"{}\" no longer configured: sampling stopped",
                gone.name
            ),
            Err(e) => log::error!("sensor \"{}\" could not be stopped: {e}", gone.name),
        }
    }
}

/// Finds the sensor record of a configured sensor by name, creating it or bringing it in
/// line with the file. Changes go through the writer like any other, so clients see them.
async fn sync_configured_sensor(store: &Store, config: &SensorConfig) -> Result<i64, StoreError> {
    let fuente = serde_json::to_value(&config.source).ok();
    match store.sensor_named(config.name.clone()).await? {
        Some(existing) => {
            let patch = SensorPatch {
                tipo: Some(config.tipo.clone()),
                modelo: Some(config.modelo.clone()),
                ubicacion: Some(config.ubicacion.clone()),
                fuente: Some(fuente),
                intervalo: Some(Some(config.interval_s)),
                activo: Some(true),
                calibracion: config.calibracion(),
                derivados: config.derivados(),
                ..SensorPatch::default()
            };
            Ok(store.update_sensor(existing.id, patch).await?.id)
        }
        None => {
            let new = NewSensor {
                tipo: config.tipo.clone(),
                modelo: config.modelo.clone(),
                nombre: Some(config.name.clone()),
                ubicacion: config.ubicacion.clone(),
                fuente,
                intervalo: Some(config.interval_s),
                activo: true,
                calibracion: config.calibracion().unwrap_or_default(),
                derivados: config.derivados().unwrap_or_default(),
            };
            Ok(store.create_sensor(new).await?.id)
        }
    }
}

/// Sensor changes waiting for the scheduler; past it, the hub's ring holds them, and
/// past that every record is read again.
const SENSOR_CHANGES: usize = 64;

/// The sensors' way to the store: samples into the writer's queue, health changes as
/// system events on `general`.
struct StoreSink(Store);

impl SampleSink for StoreSink {
    fn submit(&self, samples: Vec<Sample>) -> Result<(), SinkClosed> {
        self.0.submit_samples(samples).map_err(|_| SinkClosed)
    }

    fn announce(&self, sensor_id: i64, event_type: &str, data: Value) {
        let _ = self.0.submit_emission(Emission {
            channel: Channel::General,
            kind: EmissionKind::System(event_type.to_owned()),
            sensor_id: Some(sensor_id),
            data,
        });
    }
}

/// Tells the scheduler of the sensor records: every record first, then each sensor event
/// of the store, and every record again when events were missed. Ends when the scheduler
/// stops listening.
async fn follow_sensor_records(
    store: Store,
    mut events: broadcast::Receiver<Arc<Event>>,
    changes: mpsc::Sender<SensorChange>,
) {
    let mut change = SensorChange::All(all_sensors(&store).await);
    loop {
        if changes.send(change).await.is_err() {
            return;
        }
        change = loop {
            let event = tokio::select! {
                _ = changes.closed() => return,
                event = events.recv() => event,
            };
            match event {
                // Only the store's own sensor events describe sensor records: an admin's
                // test event on `sensors` carries whatever data it was given.
                Ok(event) => match (&event.body, event.event_type.as_str()) {
                    (Body::Sensor(sensor), "deleted") => break SensorChange::Deleted(sensor.id),
                    (Body::Sensor(sensor), "created" | "updated") => {
                        break SensorChange::Saved(sensor.clone())
                    }
                    _ => {}
                },
                Err(RecvError::Lagged(_)) => break SensorChange::All(all_sensors(&store).await),
                Err(RecvError::Closed) => return,
            }
        };
    }
}

/// Every sensor record, or `None` (logged) when they cannot be read.
async fn all_sensors(store: &Store) -> Option<Vec<Sensor>> {
    let all = SensorFilter {
        limit: u32::MAX,
        ..SensorFilter::default()
    };
    match store.sensors(all).await {
        Ok(sensors) => Some(sensors),
        Err(e) => {
            log::error!("cannot read sensors to sample: {e}");
            None
        }
    }
}
