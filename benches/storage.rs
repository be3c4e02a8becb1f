//! Storage benchmark: ingest through the real writer, then history queries from the
//! roll-ups, with the figures the storage section of the README reports.
//!
//! ```sh
//! cargo bench --bench storage                       # 10 sensors x 3 days at 1 Hz
//! STORAGE_DAYS=30 cargo bench --bench storage       # the full month: 26 million readings
//! cargo bench --bench storage -- gateway            # a greenhouse in real time, 10 minutes
//! ```
//!
//! The `gateway` scenario runs the writer at the pace of a real gateway, with the default
//! storage settings: `GATEWAY_SENSORS` (10) DHT22-like sensors, each giving temperature
//! and humidity every `GATEWAY_INTERVAL_MS` (2000), spread evenly over the interval, for
//! `GATEWAY_SECONDS` (600). `GATEWAY_WINDOW_MS`, `GATEWAY_BUDGET_MB` and
//! `GATEWAY_LOCKING=shared` override `storage.commit_window_ms`,
//! `storage.write_budget_mb_per_day` and `storage.locking`. It prints bytes
//! written per reading and per day, database bytes per reading and how long a sample
//! took from being taken to its event.
//!
//! Samples are stamped one second apart per sensor but submitted as fast as the writer
//! takes them, so a month of data goes in in minutes. A second part measures what a
//! gateway at its own pace writes to the card: the same samples committed one by one (as
//! with `commit_window_ms = 0` when sensors are slow) and in groups (as a commit window
//! gathers them). Prints one markdown table.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sensorgate::events::Hub;
use sensorgate::model::NewSensor;
use sensorgate::model::{Measurement, Sample};
use sensorgate::store::{
    process_write_bytes, AggregateQuery, Bucket, ReadingFilter, ReadingOrder, Store,
};
use sensorgate::store::{Locking, StorageConfig, Synchronous};

const SENSORS: i64 = 10;
const CHUNK: usize = 1000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn size_of(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Sensors sampled every 2 s, their samples committed `per_commit` at a time: bytes
/// written per reading, the final checkpoint included.
fn bytes_per_reading_in_commits_of(per_commit: usize, samples: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        data_dir: dir.path().to_owned(),
        ..StorageConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, writer) = Store::open(&config, Hub::new(4096)).unwrap();
    let ids = runtime.block_on(create_sensors(&store, SENSORS as usize));
    let start_time = sensorgate::model::now_micros() - samples as i64 * 2_000_000;
    let bytes_before = process_write_bytes().unwrap_or(0);
    let mut group = Vec::with_capacity(per_commit);
    for (n, id) in ids.iter().cycle().take(samples).enumerate() {
        let round = (n / ids.len()) as i64;
        group.push(Sample {
            sensor_id: *id,
            taken_at: start_time + round * 2_000_000,
            hora_dudosa: false,
            measurements: vec![
                Measurement::new("temperatura", 20.0 + round as f64 / 100.0, "°C"),
                Measurement::new("humedad", 50.0 - round as f64 / 100.0, "%"),
            ],
        });
        if group.len() == per_commit {
            store.submit_samples(std::mem::take(&mut group)).unwrap();
            // Waits for the commit, so that the next group is a commit of its own.
            runtime.block_on(store.ping()).unwrap();
        }
    }
    runtime.block_on(store.close());
    writer.join();
    (process_write_bytes().unwrap_or(0) - bytes_before) as f64 / (samples * 2) as f64
}

async fn create_sensors(store: &Store, count: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..count {
        let new = NewSensor {
            tipo: "temperatura".into(),
            modelo: "DHT22".into(),
            nombre: Some(format!("s{i}")),
            ubicacion: None,
            fuente: None,
            intervalo: Some(1.0),
            activo: true,
            calibracion: Default::default(),
            derivados: Vec::new(),
        };
        ids.push(store.create_sensor(new).await.unwrap().id);
    }
    ids
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::args().any(|a| a == "gateway") {
        gateway();
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let days = env_or("STORAGE_DAYS", if bench { 3 } else { 1 });
    let seconds = if bench { days * 86_400 } else { 600 };
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        data_dir: dir.path().to_owned(),
        synchronous: Synchronous::Full,
        // Keep everything: the run is about ingest and history, not retention.
        max_events: u64::MAX / 2,
        readings_retention_days: 0,
        minute_rollup_retention_days: 0,
        hour_rollup_retention_days: 0,
        ..StorageConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, writer) = Store::open(&config, Hub::new(4096)).unwrap();
    let ids = runtime.block_on(create_sensors(&store, SENSORS as usize));

    let start_time = sensorgate::model::now_micros() - seconds as i64 * 1_000_000;
    let readings = seconds * SENSORS as u64;
    let bytes_before = process_write_bytes().unwrap_or(0);
    let began = Instant::now();
    let mut chunk = Vec::with_capacity(CHUNK);
    for t in 0..seconds {
        for &id in &ids {
            let x = (t as f64 / 3600.0).sin() * 3.0 + id as f64;
            chunk.push(Sample {
                sensor_id: id,
                taken_at: start_time + t as i64 * 1_000_000,
                hora_dudosa: false,
                measurements: vec![Measurement::new("temperatura", 20.0 + x, "°C")],
            });
            if chunk.len() == CHUNK {
                store.submit_samples(std::mem::take(&mut chunk)).unwrap();
            }
        }
    }
    store.submit_samples(chunk).unwrap();
    runtime.block_on(store.ping()).unwrap();
    let ingest = began.elapsed();
    let written = process_write_bytes().unwrap_or(0) - bytes_before;
    let on_disk = size_of(dir.path());

    let hour_query = AggregateQuery {
        sensor_id: ids[0],
        tipo: Some("temperatura".into()),
        bucket: Bucket::Hour,
        from: start_time,
        to: start_time + seconds as i64 * 1_000_000,
        limit: 10_000,
    };
    let time = |query: &AggregateQuery| {
        let mut took: Vec<Duration> = (0..21)
            .map(|_| {
                let t = Instant::now();
                let rows = runtime.block_on(store.aggregates(query.clone())).unwrap();
                assert!(!rows.is_empty());
                t.elapsed()
            })
            .collect();
        took.sort();
        took[10]
    };
    let hourly = time(&hour_query);
    let daily = time(&AggregateQuery {
        bucket: Bucket::Day,
        ..hour_query.clone()
    });
    let window = seconds.min(3600);
    let raw = {
        let t = Instant::now();
        let filter = ReadingFilter {
            sensor_id: Some(ids[0]),
            tipo: None,
            from: Some(start_time),
            to: Some(start_time + window as i64 * 1_000_000),
            limit: 10_000,
            order: ReadingOrder::Asc,
            after: None,
        };
        let rows = runtime.block_on(store.readings(filter)).unwrap();
        assert_eq!(rows.len(), window as usize);
        t.elapsed()
    };

    runtime.block_on(store.close());
    writer.join();

    let millions = readings as f64 / 1e6;
    println!("| storage scenario | figure |");
    println!("| --- | --- |");
    println!(
        "| ingest through the writer ({SENSORS} sensors x {:.1} days at 1 Hz, synchronous=full) | {readings} readings in {:.1} s: {:.0} readings/s, each with its stored event and roll-ups |",
        seconds as f64 / 86_400.0,
        ingest.as_secs_f64(),
        readings as f64 / ingest.as_secs_f64()
    );
    println!(
        "| database size | {:.1} MiB in all, {:.1} MiB per million readings (readings, events, roll-ups, indexes) |",
        on_disk as f64 / 1048576.0,
        on_disk as f64 / 1048576.0 / millions
    );
    println!(
        "| bytes written to storage per reading | {:.0} bytes (`/proc/self/io` write_bytes, WAL and checkpoints included) |",
        written as f64 / readings as f64
    );
    println!(
        "| aggregated query, the whole range at hour buckets, one sensor | {:.2} ms (median of 21) |",
        hourly.as_secs_f64() * 1000.0
    );
    println!(
        "| aggregated query, the whole range at day buckets, one sensor | {:.2} ms (median of 21) |",
        daily.as_secs_f64() * 1000.0
    );
    println!(
        "| raw readings of one sensor, {window} rows | {:.2} ms |",
        raw.as_secs_f64() * 1000.0
    );
    let paced = if bench { 2000 } else { 100 };
    for (per_commit, like) in [
        (1, "each sample its own commit (`commit_window_ms = 0`)"),
        (
            25,
            "25 samples per commit (`commit_window_ms = 5000` with 10 sensors every 2 s)",
        ),
    ] {
        println!(
            "| bytes written per reading at a gateway's pace, {like} | {:.0} bytes ({paced} DHT22 samples, 2 readings each) |",
            bytes_per_reading_in_commits_of(per_commit, paced)
        );
    }
}

/// A gateway at its own pace (see the module's doc): what it costs the card.
fn gateway() {
    let sensors = env_or("GATEWAY_SENSORS", 10) as usize;
    let interval = Duration::from_millis(env_or("GATEWAY_INTERVAL_MS", 2000));
    let seconds = env_or("GATEWAY_SECONDS", 600);
    let dir = tempfile::tempdir().unwrap();
    let mut config = StorageConfig {
        data_dir: dir.path().to_owned(),
        ..StorageConfig::default()
    };
    if let Ok(window) = std::env::var("GATEWAY_WINDOW_MS") {
        config.commit_window_ms = window.parse().unwrap();
    }
    if let Ok(budget) = std::env::var("GATEWAY_BUDGET_MB") {
        config.write_budget_mb_per_day = budget.parse().unwrap();
    }
    if let Ok(locking) = std::env::var("GATEWAY_LOCKING") {
        config.locking = match locking.as_str() {
            "shared" => Locking::Shared,
            "exclusive" => Locking::Exclusive,
            other => panic!("GATEWAY_LOCKING={other:?}: expected shared or exclusive"),
        };
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let hub = Hub::new(4096);
    let mut events = hub.subscribe();
    let (store, writer) = Store::open(&config, hub).unwrap();
    let ids = runtime.block_on(create_sensors(&store, sensors));

    // When each sensor's samples were taken, oldest first; the first event of a sample
    // (its temperature) ends its wait.
    let taken: Arc<Mutex<HashMap<i64, VecDeque<Instant>>>> = Arc::default();
    let waits = {
        let taken = taken.clone();
        runtime.spawn(async move {
            let mut waits = Vec::new();
            while let Ok(event) = events.recv().await {
                if event.tipo.as_deref() != Some("temperatura") {
                    continue;
                }
                let Some(sensor) = event.sensor_id else {
                    continue;
                };
                if let Some(at) = taken
                    .lock()
                    .unwrap()
                    .get_mut(&sensor)
                    .and_then(|q| q.pop_front())
                {
                    waits.push(at.elapsed());
                }
            }
            waits
        })
    };

    let bytes_before = process_write_bytes().unwrap_or(0);
    let began = Instant::now();
    let spacing = interval / sensors as u32;
    let mut samples = 0u64;
    let mut tick = 0u32;
    while began.elapsed() < Duration::from_secs(seconds) {
        let due = began + spacing * tick;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = ids[tick as usize % sensors];
        let round = (tick as usize / sensors) as f64;
        taken
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .push_back(Instant::now());
        store
            .submit_samples(vec![Sample {
                sensor_id: id,
                taken_at: sensorgate::model::now_micros(),
                hora_dudosa: false,
                measurements: vec![
                    Measurement::new("temperatura", 20.0 + (round / 50.0).sin(), "°C"),
                    Measurement::new("humedad", 55.0 + (round / 70.0).cos() * 5.0, "%"),
                ],
            }])
            .unwrap();
        samples += 1;
        tick += 1;
    }
    runtime.block_on(store.close());
    writer.join();
    let elapsed = began.elapsed().as_secs_f64();
    let written = process_write_bytes().unwrap_or(0) - bytes_before;
    let on_disk = size_of(dir.path());
    let mut waits = runtime.block_on(waits).unwrap();
    waits.sort();
    let at = |q: f64| waits[((waits.len() as f64 * q) as usize).min(waits.len() - 1)];
    let readings = samples * 2;
    println!("| gateway scenario | figure |");
    println!("| --- | --- |");
    println!(
        "| setup | {sensors} sensors, temperature and humidity every {} ms, {elapsed:.0} s, commit window {} ms, write budget {} MB/day, synchronous={:?}, locking={:?} |",
        interval.as_millis(),
        config.commit_window_ms,
        config.write_budget_mb_per_day,
        config.synchronous,
        config.locking
    );
    println!(
        "| bytes written per reading | {:.0} (`/proc/self/io` write_bytes: {written} bytes for {readings} readings, WAL, checkpoints and the final one included) |",
        written as f64 / readings as f64
    );
    println!(
        "| bytes written per day at this rate | {:.2} GB |",
        written as f64 / elapsed * 86_400.0 / 1e9
    );
    println!(
        "| database bytes per reading | {:.0} ({on_disk} bytes on disk after the final checkpoint) |",
        on_disk as f64 / readings as f64
    );
    println!(
        "| sample taken -> event, {} samples | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms |",
        waits.len(),
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        at(1.0).as_secs_f64() * 1000.0
    );
}
