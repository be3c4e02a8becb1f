//! Retention: what is removed, and how, so that it never stalls ingest.
//!
//! Each pass removes at most [`SLICE`] rows per rule, oldest first: the oldest events
//! past `max_events`, raw readings past their period (per `tipo` or per sensor where a
//! rule says so, the default period otherwise), and each roll-up past its own, longer
//! period.

use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, Transaction};

use super::rollup::{Bucket, Pending};
use super::{RetentionRule, StorageConfig};
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
            )
            .and_then(|n| raise_log_floor(conn, keep_from.max(0) + 1).map(|_| n)),
        ));
        for rule in &self.rules {
            let (name, filter, value) = match (&rule.tipo, &rule.sensor) {
                (Some(tipo), _) => (format!("readings of tipo {tipo}"), " AND s.tipo = ?", tipo),
                (None, Some(sensor)) => (
                    format!("readings of sensor {sensor}"),
                    " AND s.sensor_id IN (SELECT id FROM sensors WHERE nombre = ?)",
                    sensor,
                ),
                (None, None) => continue,
            };
            outcomes.push((
                name,
                delete_readings(
                    conn,
                    cutoff(days(rule.days)),
                    filter,
                    vec![value.clone().into()],
                    SLICE,
                    RemovedEvents::Keep,
                ),
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

    /// The newest sample time before which some rule may remove raw readings, if any
    /// rule does.
    pub fn readings_cutoff(&self, now: Micros) -> Option<Micros> {
        let shortest = self
            .rules
            .iter()
            .map(|r| days(r.days))
            .chain((!self.readings.is_zero()).then_some(self.readings))
            .min()?;
        Some(now - shortest.as_micros() as i64)
    }

    /// Drops the open roll-up buckets past their retention, as [`Retention::sweep`]
    /// removes the stored ones.
    pub fn prune_open(&self, open: &mut Pending, now: Micros) {
        for (bucket, period) in &self.rollups {
            if !period.is_zero() {
                open.forget_before(*bucket, now - period.as_micros() as i64);
            }
        }
    }

    /// Readings not covered by a rule, past the default period.
    fn sweep_default(&self, conn: &Connection, cutoff: Micros) -> rusqlite::Result<usize> {
        let mut args: Vec<SqlValue> = Vec::new();
        let mut excluded = String::new();
        for rule in &self.rules {
            if let Some(tipo) = &rule.tipo {
                excluded.push_str(" AND s.tipo <> ?");
                args.push(tipo.clone().into());
            } else if let Some(sensor) = &rule.sensor {
                excluded
                    .push_str(" AND s.sensor_id NOT IN (SELECT id FROM sensors WHERE nombre = ?)");
                args.push(sensor.clone().into());
            }
        }
        delete_readings(conn, cutoff, &excluded, args, SLICE, RemovedEvents::Keep)
    }
}

/// What becomes of the `created` events of readings removed while replay still serves
/// them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum RemovedEvents {
    /// Kept, as rows of the `events` table: retention removes a reading by its sample
    /// time, and one stored late (a buffered sample, one stamped by a clock in 1970) may
    /// still be within what clients resume from.
    Keep,
    /// Gone with the readings; the log's floor moves past them: removing readings to
    /// free space must not fill the space again.
    Drop,
}

/// Deletes up to `limit` readings taken before `cutoff` whose series passes `filter`
/// (SQL on the series `s`, with `args` for its placeholders), oldest first, of those
/// the stored roll-ups count already (a restart folds only the readings still stored
/// into the open buckets again). Returns how many. Those are all in `reading_seconds`:
/// their seconds are indexed when the roll-ups are written out, in the same commit.
pub(super) fn delete_readings(
    conn: &Connection,
    cutoff: Micros,
    filter: &str,
    args: Vec<SqlValue>,
    limit: i64,
    events: RemovedEvents,
) -> rusqlite::Result<usize> {
    let sql = format!(
        "SELECT r.id, m.second FROM reading_seconds m CROSS JOIN reading_rows r CROSS JOIN series s \
         WHERE r.id BETWEEN m.first_id AND m.last_id AND r.ts / 1000000 = m.second \
         AND s.id = r.series AND m.second <= ? / 1000000 AND r.ts < ? \
         AND r.id <= (SELECT value FROM store_meta WHERE key = 'rollups_through'){filter} \
         ORDER BY m.second LIMIT ?"
    );
    let mut all: Vec<SqlValue> = vec![cutoff.into(), cutoff.into()];
    all.extend(args);
    all.push(limit.into());
    // One transaction: the events and the floor move with the readings or not at all.
    let tx = conn.unchecked_transaction()?;
    let found: Vec<(i64, i64)> = tx
        .prepare_cached(&sql)?
        .query_map(params_from_iter(all), |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    remove(&tx, &found, events)?;
    tx.commit()?;
    Ok(found.len())
}

/// Deletes up to `limit` of the readings stored first, of those the stored roll-ups
/// count already, with their events (see [`RemovedEvents::Drop`]): room for new ones.
/// Returns how many. By storing order, not sample time, so that one stamped by a clock
/// in 1970 does not take the events of everything stored since with it.
pub(super) fn remove_oldest_stored(conn: &Connection, limit: i64) -> rusqlite::Result<usize> {
    let tx = conn.unchecked_transaction()?;
    let found: Vec<(i64, i64)> = tx
        .prepare_cached(
            "SELECT id, ts / 1000000 FROM reading_rows \
             WHERE id <= (SELECT value FROM store_meta WHERE key = 'rollups_through') \
             ORDER BY id LIMIT ?1",
        )?
        .query_map([limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    remove(&tx, &found, RemovedEvents::Drop)?;
    tx.commit()?;
    Ok(found.len())
}

/// Deletes the readings `found` (id and second), inside `tx`, with their events kept or
/// dropped.
fn remove(
    tx: &Transaction<'_>,
    found: &[(i64, i64)],
    events: RemovedEvents,
) -> rusqlite::Result<()> {
    // Readings older than the first that is its own event had their events in the
    // `events` table, which has its own retention; so have those below the floor.
    let served_from: i64 = tx.query_row(
        "SELECT MAX((SELECT value FROM store_meta WHERE key = 'reading_events_from'), \
                    (SELECT value FROM store_meta WHERE key = 'log_floor'))",
        [],
        |r| r.get(0),
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM reading_rows WHERE id = ?1")?;
    for (id, _) in found {
        if *id >= served_from && events == RemovedEvents::Keep {
            keep_created_event(tx, *id)?;
        }
        delete.execute([id])?;
    }
    let newest_served = found
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| *id >= served_from)
        .max();
    if let (Some(newest), RemovedEvents::Drop) = (newest_served, events) {
        raise_log_floor(tx, newest + 1)?;
    }
    // Ranges of the seconds touched that lie wholly below the oldest reading left hold
    // none.
    if let Some(latest_second) = found.iter().map(|(_, second)| *second).max() {
        tx.prepare_cached(
            "DELETE FROM reading_seconds WHERE second <= ?1 \
             AND last_id < (SELECT COALESCE(MIN(id), 0) FROM reading_rows)",
        )?
        .execute([latest_second])?;
    }
    Ok(())
}

/// Keeps the `created` event of the stored reading `id`, about to change or go, as a row
/// of the `events` table with the fields it was sent with: replay would otherwise
/// rebuild it from the changed row, or miss it. Nothing for a reading older than the
/// first that is its own event (its event is a row already), nor twice.
pub(super) fn keep_created_event(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO events (seq, ts, channel, event_type, sensor_id, tipo, frame, \
         reading_id, valor, unidad, taken_at, hora_dudosa) \
         SELECT r.id, r.ts, 'readings', 'created', s.sensor_id, s.tipo, '', r.id, r.valor, \
         s.unidad, r.ts, s.hora_dudosa FROM reading_rows r JOIN series s ON s.id = r.series \
         WHERE r.id = ?1 \
         AND r.id >= (SELECT value FROM store_meta WHERE key = 'reading_events_from')",
    )?
    .execute([id])?;
    Ok(())
}

/// Replay serves events from `floor` on at the oldest, once readings or events below it
/// are gone.
fn raise_log_floor(conn: &Connection, floor: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE store_meta SET value = MAX(value, ?1) WHERE key = 'log_floor'")?
        .execute([floor])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{schema, seconds};

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
                    "INSERT OR IGNORE INTO series (sensor_id, tipo, unidad, hora_dudosa) VALUES (?1, ?2, 'u', 0)",
                    params![sensor, tipo],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO reading_rows (series, ts, valor) SELECT id, ?3, 1 FROM series \
                     WHERE sensor_id = ?1 AND tipo = ?2",
                    params![sensor, tipo, now - age * DAY],
                )
                .unwrap();
            }
        }
        // The roll-ups count them all (retention never removes a reading they do not),
        // and their seconds are indexed with them.
        let tx = conn.unchecked_transaction().unwrap();
        let through: i64 = tx
            .query_row("SELECT MAX(id) FROM reading_rows", [], |r| r.get(0))
            .unwrap();
        seconds::index_readings(&tx, through).unwrap();
        tx.execute(
            "UPDATE store_meta SET value = ?1 WHERE key = 'rollups_through'",
            [through],
        )
        .unwrap();
        tx.commit().unwrap();
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
