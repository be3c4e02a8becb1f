//! Wiring and ordered shutdown.
//!
//! Start: open storage (migrating it), start the writer, bring configured sensors into
//! the database, start their sources, serve. Stop, in this order: stop accepting and tell
//! every connection and session (sessions send Close 1001), wait for them with a
//! deadline, stop the sources, then let the writer commit everything queued and stop.
//! Nothing that was acknowledged to a client is lost on a clean stop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::api::{self, State};
use crate::config::{Config, SensorConfig};
use crate::events::Hub;
use crate::model::{now_micros, NewSensor, SensorPatch};
use crate::sensors::{HealthBoard, Scheduler};
use crate::shutdown::{Drain, Trigger};
use crate::store::{Store, StoreError};

/// Events the hub keeps for subscribers that fall briefly behind; one further behind
/// catches up from the database.
const HUB_CAPACITY: usize = 4096;

/// How long open connections get to finish after shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the daemon on an already-bound listener until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let hub = Hub::new(HUB_CAPACITY);
    let (store, writer) = Store::open(&config.storage, hub.clone())?;
    log::info!(
        "storage open at {}",
        config
            .storage
            .data_dir
            .join(crate::store::DATABASE_FILE)
            .display()
    );

    for sensor in &config.sensors {
        if let Err(e) = sync_configured_sensor(&store, sensor).await {
            log::error!("sensor \"{}\" not started: {e}", sensor.name);
        }
    }

    let (trigger, signal) = Trigger::new();
    let health = Arc::new(HealthBoard::default());
    let scheduler = Scheduler::new(
        store.clone(),
        health.clone(),
        config.sampling.offline_after_intervals,
    );
    let sampling = tokio::spawn(scheduler.run(hub.clone(), signal.clone()));
    let (drain, guard) = Drain::new();
    let state = Arc::new(State {
        store: store.clone(),
        hub,
        health,
        server: config.server.clone(),
        realtime: config.realtime.clone(),
        started: Instant::now(),
        started_at: now_micros(),
        shutdown: signal,
        drain: guard,
    });
    let server = tokio::spawn(api::serve(listener, state.clone()));
    log::info!("ready");

    shutdown.await;
    log::info!("shutting down");
    trigger.fire();
    let _ = server.await;
    drop(state);
    if !drain.wait(DRAIN_DEADLINE).await {
        log::warn!("some connections did not close within {DRAIN_DEADLINE:?}");
    }
    let _ = sampling.await;
    store.close().await;
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .ok();
    log::info!("stopped");
    Ok(())
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
            };
            Ok(store.create_sensor(new).await?.id)
        }
    }
}
