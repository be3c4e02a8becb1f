//! Retention: what is removed, and how, so that it never stalls ingest.
//!
//! Each pass removes at most [`SLICE`] rows per rule, oldest first: the oldest events
//! past `max_events`, raw readings past their period (per `tipo` or per sensor where a
//! rule says so, the default period otherwise), and each roll-up past its own, longer
//! period.

use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection};

use super::rollup::Bucket;
use crate::config::{RetentionRule, StorageConfig};
use crate::model::Micros;

/// Most rows one rule removes in one pass.
pub const SLICE: i64 = 5000;

/// The retention periods in force.
pub struct Retention {
    max_events: u64,
    readings: Duration,
    rules: Vec<RetentionRule>,
    rollups: Vec<(Bucket, Duration)>,
}

fn days(d: u32) -> Duration {
    Duration::from_secs(u64::from(d) * 86_400)
}

impl Retention {
    pub fn new(config: &StorageConfig) -> Retention {
        Retention {
            max_events: config.max_events,
            readings: days(config.readings_retention_days),
            rules: config.retention.clone(),
            rollups: vec![
                (Bucket::Minute, days(config.minute_rollup_retention_days)),
                (Bucket::Hour, days(config.hour_rollup_retention_days)),
                (Bucket::Day, days(config.day_rollup_retention_days)),
            ],
        }
    }

    /// One pass; returns what each rule removed (or why it failed), by a name for logs.
    pub fn sweep(
        &self,
        conn: &Connection,
        now: Micros,
        newest_seq: u64,
    ) -> Vec<(String, rusqlite::Result<usize>)> {
        let cutoff = |period: Duration| now - period.as_micros() as i64;
        let mut outcomes = Vec::new();
        let keep_from = newest_seq as i64 - self.max_events as i64;
        outcomes.push((
            "events".to_owned(),
            conn.execute(
                "DELETE FROM events WHERE seq <= ?1 AND seq < (SELECT MIN(seq) FROM events) + ?2",
                params![keep_from, SLICE],
            ),
        ));
        for rule in &self.rules {
            let (name, filter, value) = match (&rule.tipo, &rule.sensor) {
                (Some(tipo), _) => (format!("readings of tipo {tipo}"), "tipo = ?1", tipo),
                (None, Some(sensor)) => (
                    format!("readings of sensor {sensor}"),
                    "sensor_id IN (SELECT id FROM sensors WHERE nombre = ?1)",
                    sensor,
                ),
                (None, None) => continue,
            };
            let sql = format!(
                "DELETE FROM readings WHERE id IN \
                 (SELECT id FROM readings WHERE {filter} AND ts < ?2 ORDER BY ts LIMIT ?3)"
            );
            outcomes.push((
                name,
                conn.execute(&sql, params![value, cutoff(days(rule.days)), SLICE]),
            ));
        }
        if !self.readings.is_zero() {
            outcomes.push((
                "readings".to_owned(),
                self.sweep_default(conn, cutoff(self.readings)),
            ));
        }
        for (bucket, period) in &self.rollups {
            if period.is_zero() {
                continue;
            }
            // Roll-up tables are WITHOUT ROWID: rows are deleted by their key.
            let table = bucket.table();
            let sql = format!(
                "DELETE FROM {table} WHERE (sensor_id, tipo, inicio) IN \
                 (SELECT sensor_id, tipo, inicio FROM {table} WHERE inicio < ?1 LIMIT ?2)"
            );
            outcomes.push((
                table.to_owned(),
                conn.execute(&sql, params![cutoff(*period), SLICE]),
            ));
        }
        outcomes
    }

    /// Readings not covered by a rule, past the default period.
    fn sweep_default(&self, conn: &Connection, cutoff: Micros) -> rusqlite::Result<usize> {
        let mut args: Vec<SqlValue> = vec![cutoff.into()];
        let mut excluded = String::new();
        for rule in &self.rules {
            if let Some(tipo) = &rule.tipo {
                excluded.push_str(" AND tipo <> ?");
                args.push(tipo.clone().into());
            } else if let Some(sensor) = &rule.sensor {
                excluded
                    .push_str(" AND sensor_id NOT IN (SELECT id FROM sensors WHERE nombre = ?)");
                args.push(sensor.clone().into());
            }
        }
        args.push(SLICE.into());
        let sql = format!(
            "DELETE FROM readings WHERE id IN \
             (SELECT id FROM readings WHERE ts < ?{excluded} ORDER BY ts LIMIT ?)"
        );
        conn.execute(&sql, params_from_iter(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema;

    const DAY: i64 = 86_400_000_000;

    fn rule(tipo: Option<&str>, sensor: Option<&str>, days: u32) -> RetentionRule {
        RetentionRule {
            tipo: tipo.map(str::to_owned),
            sensor: sensor.map(str::to_owned),
            days,
        }
    }

    #[test]
    fn rules_override_the_default_per_tipo_and_per_sensor() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO sensors (id, tipo, modelo, nombre, created_at, updated_at) VALUES \
             (1, 't', 'm', 'nevera', 0, 0), (2, 't', 'm', 'patio', 0, 0);",
        )
        .unwrap();
        let now = 1000 * DAY;
        // Ages in days: 5, 50, 500 for each (sensor, tipo).
        for (sensor, tipo) in [(1, "temperatura"), (2, "temperatura"), (2, "humedad")] {
            for age in [5, 50, 500] {
                conn.execute(
                    "INSERT INTO readings (sensor_id, ts, tipo, valor, unidad) VALUES (?1, ?2, ?3, 1, 'u')",
                    params![sensor, now - age * DAY, tipo],
                )
                .unwrap();
            }
        }
        let config = StorageConfig {
            readings_retention_days: 365,
            retention: vec![
                rule(Some("humedad"), None, 30),
                rule(None, Some("nevera"), 1000),
            ],
            ..StorageConfig::default()
        };
        let outcomes = Retention::new(&config).sweep(&conn, now, 0);
        assert!(outcomes.iter().all(|(_, r)| r.is_ok()));
        let left = |sensor: i64, tipo: &str| -> i64 {
            conn.query_row(
                "SELECT COUNT(*) FROM readings WHERE sensor_id = ?1 AND tipo = ?2",
                params![sensor, tipo],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(left(2, "humedad"), 1, "humidity keeps 30 days");
        assert_eq!(left(1, "temperatura"), 3, "the fridge keeps 1000 days");
        assert_eq!(
            left(2, "temperatura"),
            2,
            "the rest keeps the default 365 days"
        );
    }
}
