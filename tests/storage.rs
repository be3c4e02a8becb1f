//! Storage end to end: roll-ups and retention on data spanning months.

mod common;

use common::{temp_dir, Daemon};
use sensorgate::model::{format_time, now_micros};
use serde_json::Value;

const HOUR: i64 = 3_600_000_000;
/// These tests post hundreds of readings in a burst; rate limits have tests of their own.
const NO_RATE_LIMIT: &str = "[limits]\nwrites_per_second = 100000.0\nwrite_burst = 100000.0\n";
const DAY: i64 = 24 * HOUR;

async fn sensor(daemon: &Daemon) -> i64 {
    let (_, s) = daemon
        .post(
            "/api/v1/sensores/",
            r#"{"tipo": "temperatura", "modelo": "DHT22"}"#,
        )
        .await;
    s["id"].as_i64().unwrap()
}

async fn reading(daemon: &Daemon, sensor: i64, tipo: &str, at: i64, valor: f64) {
    let body = format!(
        r#"{{"sensor_id": {sensor}, "tipo": "{tipo}", "valor": {valor}, "timestamp": "{}"}}"#,
        format_time(at)
    );
    let (status, answer) = daemon.post("/api/v1/lecturas/", &body).await;
    assert_eq!(status, 201, "{answer}");
}

/// Readings every 6 hours over 90 days; hour and day buckets must equal what the raw
/// readings give.
#[tokio::test]
async fn rollups_match_the_raw_readings_over_months() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), NO_RATE_LIMIT).await;
    let id = sensor(&daemon).await;
    let start = (now_micros() / DAY - 100) * DAY;
    let mut expected_days: Vec<(i64, f64, f64, f64, i64)> = Vec::new();
    for day in 0..90 {
        let mut values = Vec::new();
        for slot in 0..4 {
            let valor = 10.0 + day as f64 * 0.1 + slot as f64;
            reading(
                &daemon,
                id,
                "temperatura",
                start + day * DAY + slot * 6 * HOUR + 1_000,
                valor,
            )
            .await;
            values.push(valor);
        }
        let sum: f64 = values.iter().sum();
        expected_days.push((start + day * DAY, values[0], values[3], sum / 4.0, 4));
    }
    reading(&daemon, id, "humedad", start, 50.0).await;

    let url = format!(
        "/api/v1/lecturas/agregadas?sensor_id={id}&tipo=temperatura&bucket=day&desde={}&hasta={}",
        format_time(start),
        format_time(start + 90 * DAY)
    );
    let (status, days) = daemon.get(&url).await;
    assert_eq!(status, 200, "{days}");
    let days = days.as_array().unwrap();
    assert_eq!(days.len(), 90);
    for (got, (inicio, min, max, avg, count)) in days.iter().zip(&expected_days) {
        assert_eq!(got["tipo"], "temperatura");
        assert_eq!(got["inicio"], format_time(*inicio));
        assert_eq!(got["min"].as_f64().unwrap(), *min);
        assert_eq!(got["max"].as_f64().unwrap(), *max);
        assert!((got["avg"].as_f64().unwrap() - avg).abs() < 1e-9);
        assert_eq!(got["count"], *count);
    }

    let url = format!(
        "/api/v1/readings/aggregated?sensor_id={id}&bucket=hour&desde={}&hasta={}",
        format_time(start),
        format_time(start + DAY)
    );
    let (_, hours) = daemon.get(&url).await;
    let hours = hours.as_array().unwrap();
    // Four temperature hours and one humidity hour on the first day, by tipo then time.
    let tipos: Vec<&str> = hours.iter().map(|h| h["tipo"].as_str().unwrap()).collect();
    assert_eq!(
        tipos,
        [
            "humedad",
            "temperatura",
            "temperatura",
            "temperatura",
            "temperatura"
        ]
    );
    assert_eq!(hours[2]["inicio"], format_time(start + 6 * HOUR));
    assert_eq!(hours[2]["count"], 1);

    for bad in [
        "/api/v1/lecturas/agregadas?bucket=hour",
        "/api/v1/lecturas/agregadas?sensor_id=1&bucket=week",
        "/api/v1/lecturas/agregadas?sensor_id=1&desde=yesterday",
    ] {
        let (status, body) = daemon.get(bad).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    daemon.stop().await;
}

/// Raw readings and minute buckets past their retention go; hour buckets, kept longer,
/// stay. Retention runs in the background on a short interval here.
#[tokio::test]
async fn retention_removes_old_readings_and_rollups_in_the_background() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(
        dir.path(),
        "[storage]\nreadings_retention_days = 30\nminute_rollup_retention_days = 7\nmaintenance_interval_s = 1\n",
    )
    .await;
    let id = sensor(&daemon).await;
    let now = now_micros();
    for (age_days, valor) in [(200, 1.0), (20, 2.0), (1, 3.0)] {
        reading(&daemon, id, "temperatura", now - age_days * DAY, valor).await;
    }

    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    let remaining = loop {
        // Each write gives the writer a chance to run its retention pass.
        reading(&daemon, id, "humedad", now_micros(), 40.0).await;
        let (_, rows) = daemon
            .get(&format!(
                "/api/v1/lecturas/?sensor_id={id}&tipo=temperatura&order=asc"
            ))
            .await;
        let values: Vec<f64> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["valor"].as_f64().unwrap())
            .collect();
        if values.len() == 2 || tokio::time::Instant::now() > deadline {
            break values;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(
        remaining,
        [2.0, 3.0],
        "the 200-day-old reading is past retention"
    );

    let aggregated = |bucket: &str| {
        format!(
            "/api/v1/lecturas/agregadas?sensor_id={id}&tipo=temperatura&bucket={bucket}&desde={}&hasta={}",
            format_time(now - 365 * DAY),
            format_time(now + DAY)
        )
    };
    let counts = |rows: Value| rows.as_array().unwrap().len();
    assert_eq!(
        counts(daemon.get(&aggregated("minute")).await.1),
        1,
        "minute buckets older than 7 days go"
    );
    assert_eq!(
        counts(daemon.get(&aggregated("hour")).await.1),
        3,
        "hour buckets stay"
    );
    daemon.stop().await;
}
