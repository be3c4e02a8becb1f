//! Roll-ups: minute, hour and day buckets (min, max, sum, count) per sensor and `tipo`,
//! kept up to date as readings are stored, so that history queries read a few hundred
//! bucket rows instead of millions of readings.
//!
//! The writer folds a whole batch into one aggregate per bucket in memory and writes
//! each touched bucket once per commit: under load, thousands of readings cost a
//! handful of row updates.

use std::collections::HashMap;

use rusqlite::{params, Connection, Transaction};
use serde::Serialize;

use crate::model::Micros;

/// A roll-up granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    Minute,
    Hour,
    Day,
}

impl Bucket {
    pub const ALL: [Bucket; 3] = [Bucket::Minute, Bucket::Hour, Bucket::Day];

    fn micros(self) -> i64 {
        match self {
            Bucket::Minute => 60_000_000,
            Bucket::Hour => 3_600_000_000,
            Bucket::Day => 86_400_000_000,
        }
    }

    /// The table holding this granularity.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Bucket::Minute => "rollup_minute",
            Bucket::Hour => "rollup_hour",
            Bucket::Day => "rollup_day",
        }
    }

    /// Start of the bucket holding `t` (UTC).
    pub fn start(self, t: Micros) -> Micros {
        t - t.rem_euclid(self.micros())
    }

    /// Parses `minute`, `hour` or `day`.
    pub fn parse(text: &str) -> Option<Bucket> {
        match text {
            "minute" => Some(Bucket::Minute),
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Agg {
    min: f64,
    max: f64,
    sum: f64,
    count: i64,
}

/// Readings of one batch, folded per bucket.
#[derive(Default)]
pub struct Pending {
    /// By bucket size, sensor and bucket start; a sensor has a few `tipo`s, so each
    /// keeps a short list, and a reading whose bucket is already there allocates nothing.
    buckets: HashMap<(Bucket, i64, Micros), Vec<(String, Agg)>>,
}

impl Pending {
    /// Adds one reading to its three buckets.
    pub fn add(&mut self, sensor_id: i64, tipo: &str, taken_at: Micros, valor: f64) {
        for bucket in Bucket::ALL {
            let tipos = self
                .buckets
                .entry((bucket, sensor_id, bucket.start(taken_at)))
                .or_default();
            match tipos.iter_mut().find(|(t, _)| t == tipo) {
                Some((_, a)) => {
                    a.min = a.min.min(valor);
                    a.max = a.max.max(valor);
                    a.sum += valor;
                    a.count += 1;
                }
                None => tipos.push((
                    tipo.to_owned(),
                    Agg {
                        min: valor,
                        max: valor,
                        sum: valor,
                        count: 1,
                    },
                )),
            }
        }
    }

    /// Merges the batch into the stored buckets, inside the batch's transaction.
    pub fn flush(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        for ((bucket, sensor_id, start), tipos) in self.buckets.drain() {
            let mut upsert = tx.prepare_cached(&format!(
                "INSERT INTO {} (sensor_id, tipo, inicio, min, max, sum, count) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (sensor_id, tipo, inicio) DO UPDATE SET \
                 min = MIN(min, excluded.min), max = MAX(max, excluded.max), \
                 sum = sum + excluded.sum, count = count + excluded.count",
                bucket.table()
            ))?;
            for (tipo, agg) in tipos {
                upsert.execute(params![
                    sensor_id, tipo, start, agg.min, agg.max, agg.sum, agg.count
                ])?;
            }
        }
        Ok(())
    }
}

/// One bucket as served by the aggregated-readings endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aggregate {
    pub tipo: String,
    #[serde(serialize_with = "crate::model::wire_time::required")]
    pub inicio: Micros,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub count: i64,
}

/// What to aggregate.
#[derive(Debug, Clone)]
pub struct AggregateQuery {
    pub sensor_id: i64,
    pub tipo: Option<String>,
    pub bucket: Bucket,
    pub from: Micros,
    pub to: Micros,
    pub limit: u32,
}

/// Buckets of a sensor in `[from, to)`, by `tipo` then time.
pub fn aggregates(conn: &Connection, q: &AggregateQuery) -> rusqlite::Result<Vec<Aggregate>> {
    let sql = format!(
        "SELECT tipo, inicio, min, max, sum, count FROM {} \
         WHERE sensor_id = ?1 AND (?2 IS NULL OR tipo = ?2) AND inicio >= ?3 AND inicio < ?4 \
         ORDER BY tipo, inicio LIMIT ?5",
        q.bucket.table()
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![q.sensor_id, q.tipo, q.bucket.start(q.from), q.to, q.limit],
        |row| {
            let sum: f64 = row.get(4)?;
            let count: i64 = row.get(5)?;
            Ok(Aggregate {
                tipo: row.get(0)?,
                inicio: row.get(1)?,
                min: row.get(2)?,
                max: row.get(3)?,
                avg: if count > 0 { sum / count as f64 } else { 0.0 },
                count,
            })
        },
    )?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema;

    #[test]
    fn bucket_starts_are_utc_boundaries() {
        let t = crate::model::parse_time("2026-11-28T10:15:42.5Z").unwrap();
        let at = |s: &str| crate::model::parse_time(s).unwrap();
        assert_eq!(Bucket::Minute.start(t), at("2026-11-28T10:15:00Z"));
        assert_eq!(Bucket::Hour.start(t), at("2026-11-28T10:00:00Z"));
        assert_eq!(Bucket::Day.start(t), at("2026-11-28T00:00:00Z"));
        assert_eq!(Bucket::Hour.start(-1), -3_600_000_000);
    }

    #[test]
    fn batches_merge_into_stored_buckets() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        let hour = Bucket::Hour.micros();
        for batch in [[(0, 20.0), (10, 22.0)], [(hour - 1, 18.0), (hour, 30.0)]] {
            let tx = conn.transaction().unwrap();
            let mut pending = Pending::default();
            for (t, v) in batch {
                // Two tipos of one sensor share each bucket and must not mix.
                pending.add(1, "temperatura", t, v);
                pending.add(1, "humedad", t, v + 40.0);
            }
            pending.flush(&tx).unwrap();
            tx.commit().unwrap();
        }
        let q = AggregateQuery {
            sensor_id: 1,
            tipo: Some("temperatura".into()),
            bucket: Bucket::Hour,
            from: 0,
            to: 2 * hour,
            limit: 100,
        };
        let got = aggregates(&conn, &q).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].min, got[0].max, got[0].count), (18.0, 22.0, 3));
        assert_eq!(got[0].avg, 20.0);
        assert_eq!((got[1].inicio, got[1].count, got[1].avg), (hour, 1, 30.0));
        let humedad = aggregates(
            &conn,
            &AggregateQuery {
                tipo: Some("humedad".into()),
                ..q.clone()
            },
        )
        .unwrap();
        assert_eq!(
            (humedad[0].min, humedad[0].max, humedad[0].count),
            (58.0, 62.0, 3)
        );
        let day = aggregates(
            &conn,
            &AggregateQuery {
                bucket: Bucket::Day,
                ..q
            },
        )
        .unwrap();
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].count, 4);
    }
}
