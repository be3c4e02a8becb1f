//! Roll-ups: minute, hour and day buckets (min, max, sum, count) per sensor and `tipo`,
//! kept up to date as readings are stored, so that history queries read a few hundred
//! bucket rows instead of millions of readings.
//!
//! The writer folds readings into one aggregate per bucket in memory ([`OpenBuckets`])
//! and writes the buckets out every few minutes, not with every commit: on a card, each
//! commit that touched a bucket row would write that row's page again. Queries merge
//! the open buckets into what they read, and a restart folds the readings stored since
//! the last write-out again, so nothing is counted twice or lost.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

use super::seconds::{self, SECOND};
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

    /// Whether nothing was folded.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Folds `other` in.
    pub fn merge(&mut self, other: Pending) {
        for (key, tipos) in other.buckets {
            let kept = self.buckets.entry(key).or_default();
            for (tipo, agg) in tipos {
                match kept.iter_mut().find(|(t, _)| *t == tipo) {
                    Some((_, a)) => a.merge(&agg),
                    None => kept.push((tipo, agg)),
                }
            }
        }
    }

    /// Forgets the buckets of one granularity that start before `cutoff`: retention
    /// removed their stored rows, and writing them out would bring them back.
    pub fn forget_before(&mut self, bucket: Bucket, cutoff: Micros) {
        self.buckets
            .retain(|(b, _, start), _| *b != bucket || *start >= cutoff);
    }

    /// Whether a bucket starts before `t`: readings taken before it may be among those
    /// folded.
    pub fn starts_before(&self, t: Micros) -> bool {
        self.buckets.keys().any(|(_, _, start)| *start < t)
    }

    /// Forgets what was folded, once it is written out.
    pub fn clear(&mut self) {
        self.buckets.clear();
    }

    /// Merges what was folded into the stored buckets, inside a transaction; keeps it,
    /// as the transaction may still fail.
    pub fn flush(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        for ((bucket, sensor_id, start), tipos) in &self.buckets {
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

    /// The folded buckets of one sensor at one granularity, from `from` (a bucket start)
    /// until before `to`, of one `tipo` or all.
    fn of<'a>(
        &'a self,
        bucket: Bucket,
        sensor_id: i64,
        tipo: Option<&'a str>,
        from: Micros,
        to: Micros,
    ) -> impl Iterator<Item = (&'a str, Micros, &'a Agg)> {
        self.buckets
            .iter()
            .filter(move |((b, s, start), _)| {
                *b == bucket && *s == sensor_id && *start >= from && *start < to
            })
            .flat_map(|((_, _, start), tipos)| {
                tipos.iter().map(move |(t, agg)| (t.as_str(), *start, agg))
            })
            .filter(move |(t, _, _)| tipo.is_none_or(|wanted| wanted == *t))
    }
}

impl Agg {
    fn merge(&mut self, other: &Agg) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// Readings folded since the roll-up tables were last written, shared by the writer
/// (which folds and writes them out) and queries (which add them to what they read).
/// The writer holds the lock from writing them out until the commit has cleared them,
/// and a query holds it while it reads the tables: a query sees each reading once, in
/// the tables or here.
#[derive(Default)]
pub struct OpenBuckets(Mutex<Pending>);

impl OpenBuckets {
    /// The folded readings, locked.
    pub fn lock(&self) -> MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stored reading as the roll-ups count it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Folded<'a> {
    pub sensor_id: i64,
    pub tipo: &'a str,
    pub taken_at: Micros,
    pub valor: f64,
}

impl<'a> Folded<'a> {
    fn key(&self, bucket: Bucket) -> (i64, &'a str, Micros) {
        (self.sensor_id, self.tipo, bucket.start(self.taken_at))
    }
}

/// Brings the buckets of a reading that was changed from `old` to `new`, or deleted
/// (`new` is `None`), in line with the raw readings, which hold the change already.
/// Call with every pending roll-up of the transaction flushed.
///
/// Each touched bucket is computed again from the raw readings in its range, as if
/// they had been stored that way. Where retention already removed some of them (a
/// bucket straddling the raw readings' cut-off, or a reading moved into an older
/// bucket), the raw rows no longer account for the bucket: its count and sum are
/// adjusted by the change instead, which keeps count and average exact, and its min
/// and max take in the new value but still cover the old one, which the removed
/// readings can no longer disprove.
pub fn refold(
    tx: &Transaction<'_>,
    old: Folded<'_>,
    new: Option<Folded<'_>>,
) -> rusqlite::Result<()> {
    for bucket in Bucket::ALL {
        let old_key = old.key(bucket);
        let new_key = new.map(|n| n.key(bucket));
        refold_bucket(
            tx,
            bucket,
            old_key,
            Some(old.valor),
            new.filter(|_| new_key == Some(old_key)).map(|n| n.valor),
        )?;
        if let Some(new) = new.filter(|_| new_key != Some(old_key)) {
            refold_bucket(tx, bucket, new.key(bucket), None, Some(new.valor))?;
        }
    }
    Ok(())
}

/// One bucket of [`refold`]: `removed` left it, `added` joined it.
fn refold_bucket(
    tx: &Transaction<'_>,
    bucket: Bucket,
    (sensor_id, tipo, start): (i64, &str, Micros),
    removed: Option<f64>,
    added: Option<f64>,
) -> rusqlite::Result<()> {
    let table = bucket.table();
    let stored: Option<Agg> = tx
        .prepare_cached(&format!(
            "SELECT min, max, sum, count FROM {table} WHERE sensor_id = ?1 AND tipo = ?2 AND inicio = ?3"
        ))?
        .query_row(params![sensor_id, tipo, start], |r| {
            Ok(Agg {
                min: r.get(0)?,
                max: r.get(1)?,
                sum: r.get(2)?,
                count: r.get(3)?,
            })
        })
        .optional()?;
    let raw: (Option<f64>, Option<f64>, f64, i64) = tx
        .prepare_cached(&format!(
            "SELECT MIN(valor), MAX(valor), COALESCE(SUM(valor), 0), COUNT(*) FROM ({})",
            seconds::by_time(
                "r.valor AS valor",
                &format!(
                    " AND {SECOND} BETWEEN ?2 / 1000000 AND (?3 - 1) / 1000000 \
                     AND r.ts >= ?2 AND r.ts < ?3 AND s.sensor_id = ?1 AND s.tipo = ?4"
                ),
            )
        ))?
        .query_row(
            params![sensor_id, start, start + bucket.micros(), tipo],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
    let expected =
        stored.map_or(0, |s| s.count) - i64::from(removed.is_some()) + i64::from(added.is_some());
    let folded = match (stored, raw) {
        (Some(mut kept), (_, _, _, count)) if count < expected => {
            // Raw readings of this bucket were removed by retention.
            kept.count = expected;
            kept.sum += added.unwrap_or(0.0) - removed.unwrap_or(0.0);
            if let Some(v) = added {
                kept.min = kept.min.min(v);
                kept.max = kept.max.max(v);
            }
            Some(kept)
        }
        (_, (Some(min), Some(max), sum, count)) if count > 0 => Some(Agg {
            min,
            max,
            sum,
            count,
        }),
        _ => None,
    };
    match folded {
        Some(agg) => {
            tx.prepare_cached(&format!(
                "INSERT OR REPLACE INTO {table} (sensor_id, tipo, inicio, min, max, sum, count) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))?
            .execute(params![
                sensor_id, tipo, start, agg.min, agg.max, agg.sum, agg.count
            ])?;
        }
        None => {
            tx.prepare_cached(&format!(
                "DELETE FROM {table} WHERE sensor_id = ?1 AND tipo = ?2 AND inicio = ?3"
            ))?
            .execute(params![sensor_id, tipo, start])?;
        }
    }
    Ok(())
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
    /// Kept to merge the open buckets in; not part of the answer.
    #[serde(skip)]
    sum: f64,
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

/// The mean of a bucket from its sum. Values near the limits of a double can make the
/// sum overflow to infinity (or, mixed, to NaN) though every value is finite; the mean
/// lies between min and max all the same, and is never shown as null.
fn mean(min: f64, max: f64, sum: f64, count: i64) -> f64 {
    if count <= 0 {
        return 0.0;
    }
    let avg = sum / count as f64;
    if avg.is_nan() {
        min / 2.0 + max / 2.0
    } else if min <= max {
        avg.clamp(min, max)
    } else {
        avg
    }
}

/// Buckets of a sensor in `[from, to)`, by `tipo` then time: the stored ones with the
/// open ones merged in.
pub fn aggregates(
    conn: &Connection,
    q: &AggregateQuery,
    open: &OpenBuckets,
) -> rusqlite::Result<Vec<Aggregate>> {
    let open = open.lock();
    let mut stored = stored_aggregates(conn, q)?;
    let complete = stored.len() < q.limit as usize;
    let last = stored.last().map(|a| (a.tipo.clone(), a.inicio));
    let from = q.bucket.start(q.from);
    for (tipo, inicio, agg) in open.of(q.bucket, q.sensor_id, q.tipo.as_deref(), from, q.to) {
        // Past the last stored row of a full page lie rows this page does not show.
        if !complete
            && last
                .as_ref()
                .is_some_and(|(t, i)| (tipo, inicio) > (t.as_str(), *i))
        {
            continue;
        }
        match stored
            .iter_mut()
            .find(|a| a.tipo == tipo && a.inicio == inicio)
        {
            Some(row) => {
                let mut merged = Agg {
                    min: row.min,
                    max: row.max,
                    sum: row.sum,
                    count: row.count,
                };
                merged.merge(agg);
                *row = Aggregate::from_agg(tipo, inicio, merged);
            }
            None => stored.push(Aggregate::from_agg(tipo, inicio, *agg)),
        }
    }
    stored.sort_by(|a, b| (a.tipo.as_str(), a.inicio).cmp(&(b.tipo.as_str(), b.inicio)));
    stored.truncate(q.limit as usize);
    Ok(stored)
}

impl Aggregate {
    fn from_agg(tipo: &str, inicio: Micros, a: Agg) -> Aggregate {
        Aggregate {
            tipo: tipo.to_owned(),
            inicio,
            min: a.min,
            max: a.max,
            avg: mean(a.min, a.max, a.sum, a.count),
            sum: a.sum,
            count: a.count,
        }
    }
}

fn stored_aggregates(conn: &Connection, q: &AggregateQuery) -> rusqlite::Result<Vec<Aggregate>> {
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
            let (min, max, sum, count): (f64, f64, f64, i64) =
                (row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?);
            Ok(Aggregate {
                tipo: row.get(0)?,
                inicio: row.get(1)?,
                min,
                max,
                avg: mean(min, max, sum, count),
                sum,
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
    fn the_mean_of_values_near_the_limits_stays_a_number() {
        assert_eq!(mean(-f64::MAX, -f64::MAX, f64::NEG_INFINITY, 3), -f64::MAX);
        assert_eq!(mean(-f64::MAX, f64::MAX, f64::NAN, 4), 0.0);
        assert_eq!(mean(1.0, 3.0, 6.0, 3), 2.0);
        assert_eq!(mean(0.0, 0.0, 0.0, 0), 0.0);
    }

    #[test]
    fn bucket_starts_are_utc_boundaries() {
        let t = crate::model::parse_time("2026-11-28T10:15:42.5Z").unwrap();
        let at = |s: &str| crate::model::parse_time(s).unwrap();
        assert_eq!(Bucket::Minute.start(t), at("2026-11-28T10:15:00Z"));
        assert_eq!(Bucket::Hour.start(t), at("2026-11-28T10:00:00Z"));
        assert_eq!(Bucket::Day.start(t), at("2026-11-28T00:00:00Z"));
        assert_eq!(Bucket::Hour.start(-1), -3_600_000_000);
    }

    /// Stores readings `(id, t, valor)` of sensor 1 and folds them into their buckets.
    fn stored(conn: &mut Connection, readings: &[(i64, Micros, f64)]) {
        let tx = conn.transaction().unwrap();
        let mut pending = Pending::default();
        tx.execute(
            "INSERT OR IGNORE INTO series (id, sensor_id, tipo, unidad, hora_dudosa) VALUES (1, 1, 't', '', 0)",
            [],
        )
        .unwrap();
        for &(id, t, v) in readings {
            tx.execute(
                "INSERT INTO reading_rows (id, series, ts, valor) VALUES (?1, 1, ?2, ?3)",
                params![id, t, v],
            )
            .unwrap();
            pending.add(1, "t", t, v);
        }
        let through = readings.iter().map(|&(id, ..)| id).max().unwrap_or(0);
        seconds::index_readings(&tx, through).unwrap();
        pending.flush(&tx).unwrap();
        tx.commit().unwrap();
    }

    fn hour_bucket(conn: &Connection) -> (f64, f64, f64, i64) {
        conn.query_row(
            "SELECT min, max, sum, count FROM rollup_hour WHERE sensor_id = 1 AND tipo = 't'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    }

    fn at(t: Micros, valor: f64) -> Folded<'static> {
        Folded {
            sensor_id: 1,
            tipo: "t",
            taken_at: t,
            valor,
        }
    }

    #[test]
    fn a_changed_reading_refolds_its_buckets_from_the_raw_readings() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        let minute = Bucket::Minute.micros();
        stored(&mut conn, &[(1, 0, 10.0), (2, 1, 30.0), (3, minute, 20.0)]);
        let tx = conn.transaction().unwrap();
        tx.execute("UPDATE reading_rows SET valor = 12 WHERE id = 2", [])
            .unwrap();
        refold(&tx, at(1, 30.0), Some(at(1, 12.0))).unwrap();
        tx.execute("DELETE FROM reading_rows WHERE id = 3", [])
            .unwrap();
        refold(&tx, at(minute, 20.0), None).unwrap();
        tx.commit().unwrap();
        assert_eq!(hour_bucket(&conn), (10.0, 12.0, 22.0, 2));
        let minutes: i64 = conn
            .query_row("SELECT COUNT(*) FROM rollup_minute", [], |r| r.get(0))
            .unwrap();
        assert_eq!(minutes, 1, "the emptied minute is gone");
    }

    #[test]
    fn a_bucket_whose_raw_readings_were_pruned_keeps_count_and_sum_exact() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        stored(&mut conn, &[(1, 0, 40.0), (2, 1, 10.0), (3, 2, 30.0)]);
        // Retention removed the oldest raw reading; its bucket stays.
        conn.execute("DELETE FROM reading_rows WHERE id = 1", [])
            .unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute("UPDATE reading_rows SET valor = 20 WHERE id = 3", [])
            .unwrap();
        refold(&tx, at(2, 30.0), Some(at(2, 20.0))).unwrap();
        tx.execute("DELETE FROM reading_rows WHERE id = 2", [])
            .unwrap();
        refold(&tx, at(1, 10.0), None).unwrap();
        tx.commit().unwrap();
        // Count and sum as if stored that way (40 and 20); the minimum still covers the
        // deleted 10, which only the pruned reading could have replaced.
        assert_eq!(hour_bucket(&conn), (10.0, 40.0, 60.0, 2));
    }

    #[test]
    fn open_buckets_merge_into_stored_ones() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        let hour = Bucket::Hour.micros();
        let open = OpenBuckets::default();
        // The first batch was written out, the second is still open.
        for (n, batch) in [[(0, 20.0), (10, 22.0)], [(hour - 1, 18.0), (hour, 30.0)]]
            .into_iter()
            .enumerate()
        {
            let mut pending = Pending::default();
            for (t, v) in batch {
                // Two tipos of one sensor share each bucket and must not mix.
                pending.add(1, "temperatura", t, v);
                pending.add(1, "humedad", t, v + 40.0);
            }
            if n == 0 {
                let tx = conn.transaction().unwrap();
                pending.flush(&tx).unwrap();
                tx.commit().unwrap();
            } else {
                open.lock().merge(pending);
            }
        }
        let q = AggregateQuery {
            sensor_id: 1,
            tipo: Some("temperatura".into()),
            bucket: Bucket::Hour,
            from: 0,
            to: 2 * hour,
            limit: 100,
        };
        let got = aggregates(&conn, &q, &open).unwrap();
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
            &open,
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
                ..q.clone()
            },
            &open,
        )
        .unwrap();
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].count, 4);
        // A full page of stored rows shows no open bucket that sorts after its last row.
        let first = aggregates(&conn, &AggregateQuery { limit: 1, ..q }, &open).unwrap();
        assert_eq!((first.len(), first[0].count), (1, 3));
    }
}
