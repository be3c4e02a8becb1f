//! How readings are found by sample time: `reading_seconds` holds, for each second, the id
//! ranges of the readings taken in it (see the schema), up to the reading
//! `seconds_through` in `store_meta`; the readings stored since are read by id.
//!
//! The ranges are written with the roll-ups (every few minutes, or once enough readings
//! wait), not in every commit: a commit of a few sampled readings then changes the
//! readings' last page alone, where writing the ranges too took one more page, in the
//! WAL and again at the checkpoint, for every commit. What a power cut leaves unindexed
//! is found by id as before, and indexed at the next write-out.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};

/// How far past the end of its second's last range a reading may lie and still extend
/// it, in ids: what a query of that second reads of other seconds' readings.
const SECOND_RANGE_GAP: i64 = 256;

/// The newest reading `reading_seconds` covers.
const INDEXED_THROUGH: &str = "(SELECT value FROM store_meta WHERE key = 'seconds_through')";

/// Stands for a reading's second in the conditions given to [`by_time`].
pub(super) const SECOND: &str = "{second}";

/// A query by sample time: `columns` of each reading `r` (with its series `s`) that meets
/// `conditions` (` AND ...`, where [`SECOND`] is the reading's second), and then its
/// second, as the last column. Readings in indexed seconds are read through their ranges
/// `m`, the others by id; each reading comes once. Order by the second first (the column
/// after `columns`), then by `r.ts`: the indexed part then reads its seconds in order.
pub(super) fn by_time(columns: &str, conditions: &str) -> String {
    format!(
        "SELECT {columns}, m.second FROM reading_seconds m CROSS JOIN reading_rows r \
         CROSS JOIN series s WHERE r.id BETWEEN m.first_id AND m.last_id \
         AND r.ts / 1000000 = m.second AND s.id = r.series{indexed} \
         UNION ALL \
         SELECT {columns}, r.ts / 1000000 FROM reading_rows r CROSS JOIN series s \
         WHERE r.id > {INDEXED_THROUGH} AND s.id = r.series{recent}",
        indexed = conditions.replace(SECOND, "m.second"),
        recent = conditions.replace(SECOND, "(r.ts / 1000000)"),
    )
}

/// Writes the ranges of the readings stored since the last call, up to `through`, and
/// moves `seconds_through` there. A second's range extends its last one where that ends
/// close enough before it, or starts one of its own: a reading that arrives late (a
/// buffered sample, a board that booted in 1970) then does not widen a range over
/// everything stored since.
pub(super) fn index_readings(tx: &Transaction<'_>, through: i64) -> rusqlite::Result<()> {
    let from: i64 = tx
        .prepare_cached(&format!("SELECT {INDEXED_THROUGH}"))?
        .query_row([], |r| r.get(0))?;
    if through <= from {
        return Ok(());
    }
    let mut ranges: Vec<(i64, i64, i64)> = Vec::new();
    let mut open: HashMap<i64, (i64, i64)> = HashMap::new();
    let mut rows = tx.prepare_cached(
        "SELECT id, ts / 1000000 FROM reading_rows WHERE id > ?1 AND id <= ?2 ORDER BY id",
    )?;
    for row in rows.query_map([from, through], |r| Ok((r.get(0)?, r.get(1)?)))? {
        let (id, second): (i64, i64) = row?;
        let range = open.entry(second).or_insert((id, id));
        if id - range.1 > SECOND_RANGE_GAP {
            ranges.push((second, range.0, range.1));
            *range = (id, id);
        } else {
            range.1 = id;
        }
    }
    ranges.extend(open.into_iter().map(|(second, (f, l))| (second, f, l)));
    ranges.sort_unstable();

    let mut last_range = tx.prepare_cached(
        "SELECT first_id, last_id FROM reading_seconds WHERE second = ?1 \
         ORDER BY first_id DESC LIMIT 1",
    )?;
    let mut extend = tx.prepare_cached(
        "UPDATE reading_seconds SET last_id = ?3 WHERE second = ?1 AND first_id = ?2",
    )?;
    let mut start = tx.prepare_cached(
        "INSERT INTO reading_seconds (second, first_id, last_id) VALUES (?1, ?2, ?3)",
    )?;
    for (second, first, last) in ranges {
        let kept: Option<(i64, i64)> = last_range
            .query_row([second], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match kept {
            Some((kept_first, kept_last)) if first - kept_last <= SECOND_RANGE_GAP => {
                extend.execute(params![second, kept_first, last.max(kept_last)])?;
            }
            _ => drop(start.execute(params![second, first, last])?),
        }
    }
    tx.prepare_cached("UPDATE store_meta SET value = ?1 WHERE key = 'seconds_through'")?
        .execute([through])?;
    Ok(())
}

/// The indexed reading `id` now lies in the second of `taken_at` (changed over REST):
/// a range of its own there, unless one covers it already. A reading not yet indexed
/// needs none: it is read by id, and indexed where it lies then.
pub(super) fn cover_moved(tx: &Transaction<'_>, taken_at: i64, id: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(&format!(
        "INSERT INTO reading_seconds (second, first_id, last_id) SELECT ?1, ?2, ?2 \
         WHERE ?2 <= {INDEXED_THROUGH} \
         AND NOT EXISTS (SELECT 1 FROM reading_seconds \
                         WHERE second = ?1 AND first_id <= ?2 AND last_id >= ?2)"
    ))?
    .execute(params![taken_at / 1_000_000, id])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;
    use crate::store::schema;

    const SECOND_US: i64 = 1_000_000;

    /// A database with readings `(id, second)` of one series, none indexed.
    fn stored(readings: &[(i64, i64)]) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO series (id, sensor_id, tipo, unidad, hora_dudosa) VALUES (1, 1, 't', '', 0)",
            [],
        )
        .unwrap();
        for &(id, second) in readings {
            conn.execute(
                "INSERT INTO reading_rows (id, series, ts, valor) VALUES (?1, 1, ?2, 0)",
                [id, second * SECOND_US + id],
            )
            .unwrap();
        }
        conn
    }

    fn index(conn: &mut Connection, through: i64) {
        let tx = conn.transaction().unwrap();
        index_readings(&tx, through).unwrap();
        tx.commit().unwrap();
    }

    /// The ids of the readings taken in seconds `from..=to`, by time.
    fn found(conn: &Connection, from: i64, to: i64) -> Vec<i64> {
        let sql = format!(
            "{} ORDER BY 2, 1",
            by_time("r.id", &format!(" AND {SECOND} BETWEEN ?1 AND ?2"))
        );
        let mut stmt = conn.prepare(&sql).unwrap();
        let ids = stmt.query_map([from, to], |r| r.get(0)).unwrap();
        ids.collect::<rusqlite::Result<_>>().unwrap()
    }

    fn ranges(conn: &Connection) -> Vec<(i64, i64, i64)> {
        let mut stmt = conn
            .prepare("SELECT second, first_id, last_id FROM reading_seconds ORDER BY 1, 2")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn each_reading_is_found_once_before_during_and_after_indexing() {
        let readings: Vec<(i64, i64)> = (1..=10).map(|id| (id, 100 + id / 3)).collect();
        let mut conn = stored(&readings);
        let all: Vec<i64> = (1..=10).collect();
        assert_eq!(found(&conn, 0, 1000), all);
        assert_eq!(found(&conn, 101, 102), [3, 4, 5, 6, 7, 8]);
        // Second 101 is indexed in part: its range is extended by the next write-out.
        index(&mut conn, 4);
        assert_eq!(found(&conn, 0, 1000), all);
        assert_eq!(found(&conn, 101, 102), [3, 4, 5, 6, 7, 8]);
        index(&mut conn, 10);
        index(&mut conn, 7);
        assert_eq!(found(&conn, 0, 1000), all);
        assert_eq!(
            ranges(&conn),
            [(100, 1, 2), (101, 3, 5), (102, 6, 8), (103, 9, 10)]
        );
    }
    #[test]
    fn a_late_reading_starts_a_range_of_its_own() {
        // Second 5 gets a reading, then 300 of second 9000, then second 5 again.
        let mut readings = vec![(1, 5)];
        readings.extend((2..=301).map(|id| (id, 9000)));
        readings.push((302, 5));
        let mut conn = stored(&readings);
        index(&mut conn, 150);
        index(&mut conn, 302);
        assert_eq!(ranges(&conn), [(5, 1, 1), (5, 302, 302), (9000, 2, 301)]);
        assert_eq!(found(&conn, 5, 5), [1, 302]);
    }

    #[test]
    fn a_moved_reading_is_found_in_its_new_second() {
        let mut conn = stored(&[(1, 10), (2, 10), (3, 10), (4, 10)]);
        index(&mut conn, 2);
        let tx = conn.transaction().unwrap();
        for id in [1, 3] {
            tx.execute(
                "UPDATE reading_rows SET ts = ?2 WHERE id = ?1",
                [id, 20 * SECOND_US],
            )
            .unwrap();
            cover_moved(&tx, 20 * SECOND_US, id).unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(found(&conn, 20, 20), [1, 3]);
        assert_eq!(found(&conn, 10, 10), [2, 4]);
        // Only the indexed one needed a range; the other is indexed where it lies now.
        assert_eq!(ranges(&conn), [(10, 1, 2), (20, 1, 1)]);
        // Ranges reach over readings of other seconds; each is read in its own.
        index(&mut conn, 4);
        assert_eq!(ranges(&conn), [(10, 1, 4), (20, 1, 3)]);
        assert_eq!(found(&conn, 0, 100), [2, 4, 1, 3]);
    }
}
