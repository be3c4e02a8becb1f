//! Read queries. Each takes any connection, so the writer can use them inside its
//! transaction and the read pool outside it.

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use serde::Serialize;
use serde_json::Value;

use super::seconds::{self, SECOND};
use crate::events::{self, Body, Channel, Event};
use crate::model::{parse_derived, parse_time, Calibration, Micros, Reading, Sensor};

const SENSOR_COLUMNS: &str = "id, tipo, modelo, nombre, ubicacion, fuente, intervalo, activo, \
     created_at, updated_at, calibracion, derivados";

fn sensor_from_row(row: &Row<'_>) -> rusqlite::Result<Sensor> {
    let fuente: Option<String> = row.get(5)?;
    Ok(Sensor {
        id: row.get(0)?,
        tipo: row.get(1)?,
        modelo: row.get(2)?,
        nombre: row.get(3)?,
        ubicacion: row.get(4)?,
        // Written by this program from a validated JSON object; unreadable text would
        // mean a hand-edited database, shown as no source rather than failing the read.
        fuente: fuente.and_then(|text| serde_json::from_str(&text).ok()),
        intervalo: row.get(6)?,
        activo: row.get(7)?,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
        calibracion: Calibration::from_stored(row.get::<_, Option<String>>(10)?.as_deref()),
        derivados: row
            .get::<_, Option<String>>(11)?
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default(),
    })
}

/// A calibration a sensor had, from the time it took effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CalibrationChange {
    /// When it took effect: samples taken from then on were corrected by it.
    #[serde(serialize_with = "crate::model::wire_time::required")]
    pub desde: Micros,
    /// `{}` when the sensor's calibration was removed.
    pub calibracion: Calibration,
}

/// A sensor's calibrations, oldest first.
pub fn calibration_history(
    conn: &Connection,
    sensor_id: i64,
) -> rusqlite::Result<Vec<CalibrationChange>> {
    conn.prepare_cached(
        "SELECT desde, calibracion FROM calibration_history WHERE sensor_id = ?1 ORDER BY desde",
    )?
    .query_map([sensor_id], |row| {
        Ok(CalibrationChange {
            desde: row.get(0)?,
            calibracion: Calibration::from_stored(Some(&row.get::<_, String>(1)?)),
        })
    })?
    .collect()
}

/// One sensor by id.
pub fn sensor(conn: &Connection, id: i64) -> rusqlite::Result<Option<Sensor>> {
    conn.prepare_cached(&format!(
        "SELECT {SENSOR_COLUMNS} FROM sensors WHERE id = ?1"
    ))?
    .query_row([id], sensor_from_row)
    .optional()
}

/// Whether a sensor exists; cheaper than loading it, for every stored sample.
pub fn sensor_exists(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM sensors WHERE id = ?1")?
        .exists([id])
}

/// The oldest sensor with this name: how configured sensors are found across restarts.
pub fn sensor_named(conn: &Connection, name: &str) -> rusqlite::Result<Option<Sensor>> {
    conn.prepare_cached(&format!(
        "SELECT {SENSOR_COLUMNS} FROM sensors WHERE nombre = ?1 ORDER BY id LIMIT 1"
    ))?
    .query_row([name], sensor_from_row)
    .optional()
}

/// Which sensors to list.
#[derive(Debug, Clone, Default)]
pub struct SensorFilter {
    pub tipo: Option<String>,
    pub activo: Option<bool>,
    pub limit: u32,
    pub offset: u32,
}

/// Sensors matching the filter, by id.
pub fn sensors(conn: &Connection, filter: &SensorFilter) -> rusqlite::Result<Vec<Sensor>> {
    let mut sql = format!("SELECT {SENSOR_COLUMNS} FROM sensors WHERE 1=1");
    let mut args: Vec<SqlValue> = Vec::new();
    if let Some(tipo) = &filter.tipo {
        sql.push_str(" AND tipo = ?");
        args.push(tipo.clone().into());
    }
    if let Some(activo) = filter.activo {
        sql.push_str(" AND activo = ?");
        args.push(i64::from(activo).into());
    }
    sql.push_str(" ORDER BY id LIMIT ? OFFSET ?");
    args.push(i64::from(filter.limit).into());
    args.push(i64::from(filter.offset).into());
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), sensor_from_row)?;
    rows.collect()
}

/// Newest first (the default) or oldest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadingOrder {
    Asc,
    #[default]
    Desc,
}

/// Which readings to list.
#[derive(Debug, Clone, Default)]
pub struct ReadingFilter {
    pub sensor_id: Option<i64>,
    pub tipo: Option<String>,
    /// Inclusive lower bound on the sample time.
    pub from: Option<Micros>,
    /// Exclusive upper bound on the sample time.
    pub to: Option<Micros>,
    pub limit: u32,
    pub order: ReadingOrder,
    /// Only readings after this (time, id) in ascending order: a cursor for paging
    /// through a range without OFFSET.
    pub after: Option<(Micros, i64)>,
}

/// A reading's columns (`id, sensor_id, tipo, valor, unidad, ts, hora_dudosa`, as
/// [`reading_from_row`] takes them) of `reading_rows r` and its series `s`.
macro_rules! reading_fields {
    () => {
        "r.id, s.sensor_id, s.tipo, r.valor, s.unidad, r.ts, s.hora_dudosa"
    };
}

/// The reading's columns for queries by id. CROSS JOIN keeps the readings the outer loop.
pub(super) const READING_COLUMNS: &str = concat!(
    "SELECT ",
    reading_fields!(),
    " FROM reading_rows r CROSS JOIN series s ON s.id = r.series"
);

/// The newest `seq` stored: of an event row, or of a reading that is its own event, or
/// below the log's floor when the newest events were removed with their readings to free
/// space (a `seq` is never handed out twice).
pub(super) const LAST_SEQ: &str = "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events), 0), \
     COALESCE((SELECT MAX(id) FROM reading_rows), 0), \
     (SELECT value - 1 FROM store_meta WHERE key = 'log_floor'))";

/// A value the store keeps about itself (see the `store_meta` table).
pub(super) fn meta(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT value FROM store_meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
}

/// Readings matching the filter, ordered by sample time (then id). Time bounds are
/// given twice, on the second (which bounds the rows read) and on the exact time.
pub fn readings(conn: &Connection, filter: &ReadingFilter) -> rusqlite::Result<Vec<Reading>> {
    let mut conditions = String::new();
    let mut args: Vec<SqlValue> = Vec::new();
    let mut arg = |value: SqlValue| {
        args.push(value);
        args.len()
    };
    if let Some(id) = filter.sensor_id {
        let id = arg(id.into());
        conditions.push_str(&format!(" AND s.sensor_id = ?{id}"));
    }
    if let Some(tipo) = &filter.tipo {
        let tipo = arg(tipo.clone().into());
        conditions.push_str(&format!(" AND s.tipo = ?{tipo}"));
    }
    if let Some(from) = filter.from {
        let from = arg(from.into());
        conditions.push_str(&format!(
            " AND {SECOND} >= ?{from} / 1000000 AND r.ts >= ?{from}"
        ));
    }
    if let Some(to) = filter.to {
        let to = arg(to.into());
        conditions.push_str(&format!(
            " AND {SECOND} <= (?{to} - 1) / 1000000 AND r.ts < ?{to}"
        ));
    }
    if let Some((ts, id)) = filter.after {
        let (ts, id) = (arg(ts.into()), arg(id.into()));
        conditions.push_str(&format!(
            " AND {SECOND} >= ?{ts} / 1000000 AND (r.ts > ?{ts} OR (r.ts = ?{ts} AND r.id > ?{id}))"
        ));
    }
    let limit = arg(i64::from(filter.limit).into());
    // Columns 1 and 6 are the id and the time, 8 the second.
    let order = match filter.order {
        ReadingOrder::Asc => "8 ASC, 6 ASC, 1 ASC",
        ReadingOrder::Desc => "8 DESC, 6 DESC, 1 DESC",
    };
    let sql = format!(
        "{} ORDER BY {order} LIMIT ?{limit}",
        seconds::by_time(reading_fields!(), &conditions)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), reading_from_row)?;
    rows.collect()
}

/// One reading by id.
pub fn reading(conn: &Connection, id: i64) -> rusqlite::Result<Option<Reading>> {
    conn.prepare_cached(&format!("{READING_COLUMNS} WHERE r.id = ?1"))?
        .query_row([id], reading_from_row)
        .optional()
}

/// Columns `id, sensor_id, tipo, valor, unidad, ts, hora_dudosa`.
pub(super) fn reading_from_row(row: &Row<'_>) -> rusqlite::Result<Reading> {
    Ok(Reading {
        id: row.get(0)?,
        sensor_id: row.get(1)?,
        tipo: row.get(2)?,
        valor: row.get(3)?,
        unidad: row.get(4)?,
        timestamp: row.get(5)?,
        hora_dudosa: row.get(6)?,
    })
}

/// Storage figures for the health endpoint; each is an index lookup, not a scan.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub sensors: i64,
    pub last_seq: u64,
    pub oldest_seq: u64,
}

/// See [`Counts`].
pub fn counts(conn: &Connection) -> rusqlite::Result<Counts> {
    let sensors = conn.query_row("SELECT COUNT(*) FROM sensors", [], |r| r.get(0))?;
    let last_seq: i64 = conn.query_row(LAST_SEQ, [], |r| r.get(0))?;
    let oldest_seq = if last_seq == 0 {
        0
    } else {
        meta(conn, "log_floor")?.clamp(1, last_seq)
    };
    Ok(Counts {
        sensors,
        last_seq: last_seq as u64,
        oldest_seq: oldest_seq as u64,
    })
}

/// The saved position of an uplink.
pub fn uplink_cursor(conn: &Connection, name: &str) -> rusqlite::Result<Option<u64>> {
    conn.prepare_cached("SELECT seq FROM uplink_cursor WHERE name = ?1")?
        .query_row([name], |r| r.get::<_, i64>(0))
        .optional()
        .map(|seq| seq.map(|s| s as u64))
}

/// Sensors whose newest stored availability event is `sensor_offline`: what clients
/// were last told of them, as far as the events kept go back.
pub fn told_offline(conn: &Connection) -> rusqlite::Result<Vec<i64>> {
    // The bare `event_type` comes from the row with the largest `seq` (SQLite's rule for
    // MAX in an aggregate); the WHERE matches the partial index.
    conn.prepare_cached(
        "SELECT sensor_id, event_type, MAX(seq) FROM events \
         WHERE event_type IN ('sensor_offline', 'sensor_online') AND sensor_id IS NOT NULL \
         GROUP BY sensor_id",
    )?
    .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
    .filter_map(|row| match row {
        Ok((id, kind)) => (kind == "sensor_offline").then_some(Ok(id)),
        Err(e) => Some(Err(e)),
    })
    .collect()
}

/// What the event log holds after a `seq`.
#[derive(Debug)]
pub enum Replay<E = Event> {
    /// The events after it, oldest first (see [`events_after`]).
    Events(Vec<E>),
    /// Retention removed events right after it: the log starts at `oldest_seq`. Below the
    /// floor a removal may be under way, so nothing there is read.
    Removed { oldest_seq: u64 },
}

/// Stored events with `after < seq <= upto` on the given channels, oldest first, at most
/// `limit`: rows of the `events` table merged with the readings that are their own
/// `created` events. Where both hold a `seq` (a reading changed or deleted over REST
/// keeps its first event as a row), the row wins. [`Replay::Removed`] when the log's
/// floor lies past `after + 1`: a reader must learn that it missed events, which a
/// replay that started at the floor would hide from it.
pub fn events_after(
    conn: &Connection,
    after: u64,
    upto: u64,
    channels: &[Channel],
    limit: u32,
) -> rusqlite::Result<Replay> {
    // One read transaction: a removal committed between reading the floor and reading
    // the page would otherwise show as a page that starts past `after + 1`.
    let read = conn.unchecked_transaction()?;
    let floor = meta(&read, "log_floor")?.max(1) as u64;
    if after + 1 < floor {
        return Ok(Replay::Removed { oldest_seq: floor });
    }
    event_page(&read, after, upto, channels, limit).map(Replay::Events)
}

/// The page of [`events_after`], whose caller checked the log's floor in the same read
/// transaction.
fn event_page(
    conn: &Connection,
    after: u64,
    upto: u64,
    channels: &[Channel],
    limit: u32,
) -> rusqlite::Result<Vec<Event>> {
    let mut rows = event_rows(conn, after, upto, channels, limit)?;
    if !channels.contains(&Channel::Readings) {
        return Ok(rows);
    }
    let from = meta(conn, "reading_events_from")?;
    let readings = conn
        .prepare_cached(&format!(
            "{READING_COLUMNS} WHERE r.id > ?1 AND r.id <= ?2 AND r.id >= ?3 ORDER BY r.id LIMIT ?4"
        ))?
        .query_map(
            params![after as i64, upto as i64, from, i64::from(limit)],
            reading_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if readings.is_empty() {
        return Ok(rows);
    }
    let mut merged = Vec::with_capacity(rows.len() + readings.len());
    let mut readings = readings.into_iter().peekable();
    for row in rows.drain(..) {
        while let Some(reading) = readings.next_if(|r| (r.id as u64) < row.seq) {
            merged.push(reading_event(reading));
        }
        readings.next_if(|r| r.id as u64 == row.seq);
        merged.push(row);
    }
    merged.extend(readings.map(reading_event));
    merged.truncate(limit as usize);
    Ok(merged)
}

/// A reading that is its own `created` event, as the publisher sent it.
fn reading_event(reading: Reading) -> Event {
    let seq = reading.id as u64;
    Event {
        seq,
        channel: Channel::Readings,
        event_type: "created".into(),
        sensor_id: Some(reading.sensor_id),
        tipo: Some(reading.tipo.clone()),
        frame: events::reading_frame(&reading, reading.timestamp, seq).into(),
        body: Body::Reading(reading),
    }
}

/// The rows of the `events` table of [`events_after`].
fn event_rows(
    conn: &Connection,
    after: u64,
    upto: u64,
    channels: &[Channel],
    limit: u32,
) -> rusqlite::Result<Vec<Event>> {
    let placeholders = vec!["?"; channels.len()].join(", ");
    let sql = format!(
        "SELECT seq, channel, event_type, sensor_id, tipo, frame, ts, \
         reading_id, valor, unidad, taken_at, hora_dudosa FROM events \
         WHERE seq > ? AND seq <= ? AND channel IN ({placeholders}) ORDER BY seq LIMIT ?"
    );
    let mut args: Vec<SqlValue> = vec![(after as i64).into(), (upto as i64).into()];
    args.extend(
        channels
            .iter()
            .map(|c| SqlValue::from(c.as_str().to_owned())),
    );
    args.push(i64::from(limit).into());
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |row| {
        let seq = row.get::<_, i64>(0)? as u64;
        let channel: String = row.get(1)?;
        let sensor_id: Option<i64> = row.get(3)?;
        let tipo: Option<String> = row.get(4)?;
        let event_type: String = row.get(2)?;
        // Only this program writes the column, from `Channel::as_str`.
        let channel = channel.parse().unwrap_or(Channel::General);
        let mut frame: String = row.get(5)?;
        let body = if frame.is_empty() {
            // A reading event, stored as the reading's fields (schema version 4).
            let reading = Reading {
                id: row.get(7)?,
                sensor_id: sensor_id.unwrap_or_default(),
                tipo: tipo.clone().unwrap_or_default(),
                valor: row.get(8)?,
                unidad: row.get(9)?,
                timestamp: row.get(10)?,
                hora_dudosa: row.get(11)?,
            };
            frame = events::reading_frame(&reading, row.get(6)?, seq);
            Body::Reading(reading)
        } else {
            stored_body(channel, &event_type, &frame)
        };
        Ok(Event {
            seq,
            channel,
            event_type,
            sensor_id,
            tipo,
            body,
            frame: frame.into(),
        })
    })?;
    rows.collect()
}

/// What a stored event says, read back from the frame it was stored as: the event log
/// keeps sensor, reading-change, system and test events as the frames clients were sent,
/// and this is the one place that reads them. A frame this program did not write (a
/// damaged row) reads as its `data`, or as nothing.
fn stored_body(channel: Channel, event_type: &str, frame: &str) -> Body {
    let data = serde_json::from_str::<Value>(frame)
        .ok()
        .and_then(|mut envelope| envelope.get_mut("data").map(Value::take))
        .unwrap_or(Value::Null);
    let entity = matches!(event_type, "created" | "updated" | "deleted");
    let decoded = match channel {
        Channel::Sensors if entity => stored_sensor(&data).map(Body::Sensor),
        Channel::Readings if entity => stored_reading(&data).map(Body::Reading),
        _ => None,
    };
    decoded.unwrap_or(Body::Data(data))
}

/// A sensor as an event's `data` shows it.
fn stored_sensor(data: &Value) -> Option<Sensor> {
    let text = |key: &str| data.get(key).and_then(Value::as_str).map(str::to_owned);
    let time = |key: &str| data.get(key).and_then(Value::as_str).and_then(parse_time);
    Some(Sensor {
        id: data.get("id")?.as_i64()?,
        tipo: text("tipo")?,
        modelo: text("modelo")?,
        nombre: text("nombre"),
        ubicacion: text("ubicacion"),
        fuente: data.get("fuente").filter(|v| !v.is_null()).cloned(),
        intervalo: data.get("intervalo").and_then(Value::as_f64),
        activo: data.get("activo")?.as_bool()?,
        calibracion: data
            .get("calibracion")
            .and_then(|v| Calibration::from_json(v, "calibracion").ok())
            .unwrap_or_default(),
        derivados: data
            .get("derivados")
            .and_then(|v| parse_derived(v).ok())
            .unwrap_or_default(),
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
    })
}

/// A reading as an event's `data` shows it.
fn stored_reading(data: &Value) -> Option<Reading> {
    Some(Reading {
        id: data.get("id")?.as_i64()?,
        sensor_id: data.get("sensor_id")?.as_i64()?,
        tipo: data.get("tipo")?.as_str()?.to_owned(),
        valor: data.get("valor")?.as_f64()?,
        unidad: data.get("unidad")?.as_str()?.to_owned(),
        timestamp: parse_time(data.get("timestamp")?.as_str()?)?,
        hora_dudosa: data
            .get("hora_dudosa")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// Every sensor and the latest reading of each of its `tipo`s, with the `seq` they are
/// consistent with: read in one transaction, so no event up to `seq` is missing from it
/// and none after it is in it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub seq: u64,
    pub sensors: Vec<Sensor>,
    pub latest: Vec<Reading>,
}

/// The latest values of `latest_readings` with the readings stored since it was last
/// written folded in, by the rule the writer writes it by (a reading stamped further
/// ahead than `max_future` is the latest only until anything else is stored), for the
/// sensors that exist; in the table's order.
fn with_newer_readings(
    conn: &Connection,
    mut latest: Vec<Reading>,
    sensors: &[Sensor],
    upto: i64,
    max_future: Micros,
) -> rusqlite::Result<Vec<Reading>> {
    let since = meta(conn, "latest_through")?;
    let horizon = crate::model::now_micros().saturating_add(max_future);
    let mut newer = conn.prepare_cached(&format!(
        "{READING_COLUMNS} WHERE r.id > ?1 AND r.id <= ?2 ORDER BY r.id"
    ))?;
    for reading in newer.query_map(params![since, upto], reading_from_row)? {
        let r = reading?;
        if !sensors.iter().any(|s| s.id == r.sensor_id) {
            continue;
        }
        match latest
            .iter_mut()
            .find(|l| l.sensor_id == r.sensor_id && l.tipo == r.tipo)
        {
            Some(kept) if r.timestamp >= kept.timestamp || kept.timestamp > horizon => *kept = r,
            Some(_) => {}
            None => latest.push(r),
        }
    }
    latest.sort_by(|a, b| (a.sensor_id, &a.tipo).cmp(&(b.sensor_id, &b.tipo)));
    Ok(latest)
}

/// See [`Snapshot`].
pub fn snapshot(conn: &Connection, max_future: Micros) -> rusqlite::Result<Snapshot> {
    let tx = conn.unchecked_transaction()?;
    let seq: i64 = tx.query_row(LAST_SEQ, [], |r| r.get(0))?;
    let all = SensorFilter {
        limit: u32::MAX,
        ..SensorFilter::default()
    };
    let sensors = self::sensors(&tx, &all)?;
    let latest = tx
        .prepare_cached(
            "SELECT r.id, s.sensor_id, s.tipo, r.valor, s.unidad, r.ts, s.hora_dudosa \
             FROM latest_readings l JOIN reading_rows r ON r.id = l.reading_id \
             JOIN series s ON s.id = r.series ORDER BY l.sensor_id, l.tipo",
        )?
        .query_map([], reading_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let latest = with_newer_readings(&tx, latest, &sensors, seq, max_future)?;
    tx.finish()?;
    Ok(Snapshot {
        seq: seq as u64,
        sensors,
        latest,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Derived;

    fn sensor() -> Sensor {
        Sensor {
            id: 4,
            tipo: "temperatura".into(),
            modelo: "DHT22".into(),
            nombre: Some("invernadero".into()),
            ubicacion: None,
            fuente: Some(json!({"kind": "sim", "seed": 7})),
            intervalo: Some(2.5),
            activo: true,
            calibracion: Calibration::from_json(
                &json!({"temperatura": {"offset": -0.5}}),
                "calibracion",
            )
            .unwrap(),
            derivados: vec![Derived::PuntoRocio],
            created_at: 1_764_324_902_123_456,
            updated_at: 1_764_324_999_000_001,
        }
    }

    #[test]
    fn a_stored_sensor_event_says_what_the_live_one_said() {
        for (event_type, changed) in [
            ("created", &[][..]),
            ("updated", &["nombre", "intervalo"][..]),
            ("deleted", &[][..]),
        ] {
            let frame = events::sensor_frame(event_type, &sensor(), changed, 5, 9);
            assert_eq!(
                stored_body(Channel::Sensors, event_type, &frame),
                Body::Sensor(sensor()),
                "{event_type}"
            );
        }
    }

    #[test]
    fn a_stored_reading_change_says_what_the_live_one_said() {
        let reading = Reading {
            id: 12,
            sensor_id: 4,
            tipo: "humedad".into(),
            valor: 41.25,
            unidad: "%".into(),
            timestamp: 1_764_324_902_000_007,
            hora_dudosa: true,
        };
        for event_type in ["updated", "deleted"] {
            let frame = events::reading_change_frame(event_type, &reading, &["valor"], 5, 13);
            assert_eq!(
                stored_body(Channel::Readings, event_type, &frame),
                Body::Reading(reading.clone())
            );
        }
    }

    #[test]
    fn stored_system_and_test_events_say_their_data() {
        let data = json!({"sensor_id": 4, "salud": {"estado": "offline"}});
        let frame = events::system_frame("sensor_offline", &data, 5, 14);
        assert_eq!(
            stored_body(Channel::General, "sensor_offline", &frame),
            Body::Data(data.clone())
        );
        // A test event on `sensors` is not a sensor, whatever its data.
        let frame = events::test_frame(Channel::Sensors, &json!({"id": 4}), 5, 15);
        assert_eq!(
            stored_body(Channel::Sensors, "test", &frame),
            Body::Data(json!({"id": 4}))
        );
    }
}
