//! The SQL of each command, applied inside the batch's open transaction.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, CachedStatement, OptionalExtension, Transaction};
use serde_json::Value;

use super::alerts::{self, AlertReceipt};
use super::command::{Command, Done};
use super::publisher::Unpublished;
use super::retention;
use super::rollup::{self, Folded, Pending};
use super::seconds::{self, SECOND};
use super::tokens;
use super::{reader, Emission, EmissionKind, StoreError};
use crate::events::{self, Body, Channel, Event};
use crate::model::{
    now_micros, Micros, NewSensor, Reading, ReadingPatch, Sample, Sensor, SensorPatch,
};

/// Applies the batch's commands inside its transaction.
pub(super) struct Step<'a> {
    pub(super) tx: &'a Transaction<'a>,
    pub(super) readings: ReadingInserts<'a>,
    pub(super) seq: &'a mut u64,
    pub(super) events: &'a mut Vec<Unpublished>,
    pub(super) rollups: &'a mut Pending,
    /// Samples of this transaction, kept until it commits so that a failed
    /// commit can retry them.
    pub(super) held: &'a mut Vec<Sample>,
    pub(super) series: &'a mut SeriesIds,
    /// See [`Writer::max_future`].
    pub(super) max_future: Micros,
    pub(super) now: Micros,
}

impl Step<'_> {
    pub(super) fn apply(&mut self, command: Command) -> Result<Done, rusqlite::Error> {
        Ok(match command {
            Command::CreateSensor(new, reply) => Done::Sensor(reply, Ok(self.create_sensor(new)?)),
            Command::UpdateSensor(id, patch, reply) => {
                Done::Sensor(reply, self.update_sensor(id, patch)?)
            }
            Command::DeleteSensor(id, reply) => Done::Sensor(reply, self.delete_sensor(id)?),
            Command::InsertReading(new, reply) => {
                let sensor_id = new.sensor_id;
                let result = if reader::sensor_exists(self.tx, sensor_id)? {
                    let taken_at = new.timestamp.unwrap_or(self.now);
                    let reading = self.store_reading(
                        sensor_id,
                        taken_at,
                        new.hora_dudosa,
                        &new.tipo,
                        new.valor,
                        &new.unidad,
                    )?;
                    self.record_reading(reading.clone());
                    Ok(reading)
                } else {
                    Err(StoreError::NotFound {
                        entity: "Sensor",
                        id: sensor_id,
                    })
                };
                Done::Reading(reply, result)
            }
            Command::UpdateReading(id, patch, reply) => {
                Done::Reading(reply, self.update_reading(id, patch)?)
            }
            Command::DeleteReading(id, reply) => Done::Reading(reply, self.delete_reading(id)?),
            Command::Emit(emission, reply) => Done::Seq(reply, Ok(self.emit(emission)?)),
            Command::Samples(samples) => {
                let stored = self.insert_samples(&samples);
                // Held even when an insert failed: if the transaction does not commit, the
                // whole command is retried, not just what came after the failure.
                self.held.extend(samples);
                stored?;
                Done::Nothing
            }
            Command::Ping(reply) => Done::Ping(reply),
            Command::TouchToken(id, at) => {
                tokens::touch(self.tx, id, at)?;
                Done::Nothing
            }
            Command::CreateToken {
                name,
                scope,
                hash,
                reply,
            } => Done::Flag(
                reply,
                tokens::insert(self.tx, &name, scope, &hash, self.now)?,
            ),
            Command::DeleteToken(name, reply) => Done::Flag(reply, tokens::delete(self.tx, &name)?),
            Command::SaveUplinkCursor(name, seq, reply) => {
                self.tx
                    .prepare_cached(
                        "INSERT INTO uplink_cursor (name, seq, updated_at) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
                    )?
                    .execute(params![name, seq as i64, self.now])?;
                Done::Unit(reply)
            }
            Command::Alerts(write, reply) => {
                let ids = alerts::apply(self.tx, self.now, write.ops)?;
                let mut seqs = Vec::with_capacity(write.emissions.len());
                for emission in write.emissions {
                    seqs.push(self.emit(emission)?);
                }
                Done::Alerts(reply, AlertReceipt { ids, seqs })
            }
            Command::Shutdown => Done::Nothing,
        })
    }

    pub(super) fn insert_samples(&mut self, samples: &[Sample]) -> Result<(), rusqlite::Error> {
        // A batched source hands over many samples of one sensor: look it up once.
        let mut exists = None;
        for sample in samples {
            // A sensor deleted while its source was still reading: drop the sample.
            if exists != Some(sample.sensor_id) {
                if !reader::sensor_exists(self.tx, sample.sensor_id)? {
                    continue;
                }
                exists = Some(sample.sensor_id);
            }
            for m in &sample.measurements {
                let reading = self.store_reading(
                    sample.sensor_id,
                    sample.taken_at,
                    sample.hora_dudosa,
                    &m.tipo,
                    m.valor,
                    &m.unidad,
                )?;
                self.record_reading(reading);
            }
        }
        Ok(())
    }

    /// Stores an event with the next `seq` and keeps it for publishing after the commit.
    pub(super) fn record(
        &mut self,
        channel: Channel,
        event_type: &str,
        sensor_id: Option<i64>,
        tipo: Option<&str>,
        frame: String,
        body: Body,
    ) -> Result<u64, rusqlite::Error> {
        let seq = *self.seq;
        self.tx
            .prepare_cached(
                "INSERT INTO events (seq, ts, channel, event_type, sensor_id, tipo, frame) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                seq as i64,
                self.now,
                channel.as_str(),
                event_type,
                sensor_id,
                tipo,
                frame
            ])?;
        *self.seq += 1;
        self.events.push(Unpublished::Built(Arc::new(Event {
            seq,
            channel,
            event_type: event_type.to_owned(),
            sensor_id,
            tipo: tipo.map(str::to_owned),
            body,
            frame: frame.into(),
        })));
        Ok(seq)
    }

    /// Takes the next `seq` for a reading just stored with it as its id: the reading's
    /// row is its `created` event (see [`reader::events_after`]).
    pub(super) fn record_reading(&mut self, reading: Reading) {
        let seq = *self.seq;
        debug_assert_eq!(reading.id as u64, seq);
        *self.seq += 1;
        self.events.push(Unpublished::Reading { reading, seq });
    }

    pub(super) fn sensor_event(
        &mut self,
        event_type: &str,
        sensor: &Sensor,
        changed: &[&str],
    ) -> rusqlite::Result<()> {
        let frame = events::sensor_frame(event_type, sensor, changed, self.now, *self.seq);
        self.record(
            Channel::Sensors,
            event_type,
            Some(sensor.id),
            Some(&sensor.tipo),
            frame,
            Body::Sensor(sensor.clone()),
        )?;
        Ok(())
    }

    /// A stored reading's `updated` or `deleted` event, as [`Self::sensor_event`] is a
    /// sensor's.
    fn reading_change_event(
        &mut self,
        event_type: &str,
        reading: &Reading,
        changed: &[&str],
    ) -> rusqlite::Result<()> {
        let frame = events::reading_change_frame(event_type, reading, changed, self.now, *self.seq);
        self.record(
            Channel::Readings,
            event_type,
            Some(reading.sensor_id),
            Some(&reading.tipo),
            frame,
            Body::Reading(reading.clone()),
        )?;
        Ok(())
    }

    pub(super) fn create_sensor(&mut self, new: NewSensor) -> Result<Sensor, rusqlite::Error> {
        let fuente = new.fuente.as_ref().map(Value::to_string);
        self.tx
            .prepare_cached(
                "INSERT INTO sensors (tipo, modelo, nombre, ubicacion, fuente, intervalo, activo, created_at, updated_at, \
                 calibracion, derivados) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)",
            )?
            .execute(params![new.tipo, new.modelo, new.nombre, new.ubicacion, fuente, new.intervalo, new.activo, self.now,
                new.calibracion.to_stored(), stored_derived(&new.derivados)])?;
        let sensor = Sensor {
            id: self.tx.last_insert_rowid(),
            tipo: new.tipo,
            modelo: new.modelo,
            nombre: new.nombre,
            ubicacion: new.ubicacion,
            fuente: new.fuente,
            intervalo: new.intervalo,
            activo: new.activo,
            calibracion: new.calibracion,
            derivados: new.derivados,
            created_at: self.now,
            updated_at: self.now,
        };
        if !sensor.calibracion.is_empty() {
            self.record_calibration(&sensor)?;
        }
        self.sensor_event("created", &sensor, &[])?;
        Ok(sensor)
    }

    pub(super) fn update_sensor(
        &mut self,
        id: i64,
        patch: SensorPatch,
    ) -> Result<Result<Sensor, StoreError>, rusqlite::Error> {
        let Some(mut sensor) = reader::sensor(self.tx, id)? else {
            return Ok(Err(StoreError::NotFound {
                entity: "Sensor",
                id,
            }));
        };
        let changed = patch.apply(&mut sensor);
        if changed.is_empty() {
            return Ok(Ok(sensor));
        }
        sensor.updated_at = self.now;
        let fuente = sensor.fuente.as_ref().map(Value::to_string);
        self.tx
            .prepare_cached(
                "UPDATE sensors SET tipo = ?2, modelo = ?3, nombre = ?4, ubicacion = ?5, fuente = ?6, \
                 intervalo = ?7, activo = ?8, updated_at = ?9, calibracion = ?10, derivados = ?11 WHERE id = ?1",
            )?
            .execute(params![
                id,
                sensor.tipo,
                sensor.modelo,
                sensor.nombre,
                sensor.ubicacion,
                fuente,
                sensor.intervalo,
                sensor.activo,
                sensor.updated_at,
                sensor.calibracion.to_stored(),
                stored_derived(&sensor.derivados)
            ])?;
        if changed.contains(&"calibracion") {
            self.record_calibration(&sensor)?;
        }
        self.sensor_event("updated", &sensor, &changed)?;
        Ok(Ok(sensor))
    }

    /// Adds the sensor's calibration to its history, effective from now. Two changes
    /// committed in the same batch share that moment; the later one is what stands.
    pub(super) fn record_calibration(&mut self, sensor: &Sensor) -> Result<(), rusqlite::Error> {
        let text = sensor
            .calibracion
            .to_stored()
            .unwrap_or_else(|| "{}".to_owned());
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO calibration_history (sensor_id, desde, calibracion) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![sensor.id, self.now, text])?;
        Ok(())
    }

    pub(super) fn delete_sensor(
        &mut self,
        id: i64,
    ) -> Result<Result<Sensor, StoreError>, rusqlite::Error> {
        let Some(sensor) = reader::sensor(self.tx, id)? else {
            return Ok(Err(StoreError::NotFound {
                entity: "Sensor",
                id,
            }));
        };
        self.tx
            .prepare_cached("DELETE FROM sensors WHERE id = ?1")?
            .execute([id])?;
        self.tx
            .prepare_cached("DELETE FROM latest_readings WHERE sensor_id = ?1")?
            .execute([id])?;
        self.sensor_event("deleted", &sensor, &[])?;
        Ok(Ok(sensor))
    }

    pub(super) fn update_reading(
        &mut self,
        id: i64,
        patch: ReadingPatch,
    ) -> Result<Result<Reading, StoreError>, rusqlite::Error> {
        let Some(old) = reader::reading(self.tx, id)? else {
            return Ok(Err(StoreError::NotFound {
                entity: "Reading",
                id,
            }));
        };
        let mut reading = old.clone();
        let changed = patch.apply(&mut reading);
        if changed.is_empty() {
            return Ok(Ok(reading));
        }
        retention::keep_created_event(self.tx, old.id)?;
        let series = self.series_of(
            reading.sensor_id,
            &reading.tipo,
            &reading.unidad,
            reading.hora_dudosa,
        )?;
        self.tx
            .prepare_cached(
                "UPDATE reading_rows SET series = ?2, valor = ?3, ts = ?4 WHERE id = ?1",
            )?
            .execute(params![id, series, reading.valor, reading.timestamp])?;
        seconds::cover_moved(self.tx, reading.timestamp, id)?;
        self.derived_after_change(&old, Some(&reading))?;
        self.reading_change_event("updated", &reading, &changed)?;
        Ok(Ok(reading))
    }

    pub(super) fn delete_reading(
        &mut self,
        id: i64,
    ) -> Result<Result<Reading, StoreError>, rusqlite::Error> {
        let Some(reading) = reader::reading(self.tx, id)? else {
            return Ok(Err(StoreError::NotFound {
                entity: "Reading",
                id,
            }));
        };
        retention::keep_created_event(self.tx, reading.id)?;
        // Its id is never handed out again: ids are `seq`s.
        self.tx
            .prepare_cached("DELETE FROM reading_rows WHERE id = ?1")?
            .execute([id])?;
        self.derived_after_change(&reading, None)?;
        self.reading_change_event("deleted", &reading, &[])?;
        Ok(Ok(reading))
    }

    /// Brings roll-ups and latest values in line with a reading changed from `old` to
    /// `new`, or deleted, whose raw row is written already. What this batch stored before
    /// is written out first, so that both are computed from the tables alone.
    pub(super) fn derived_after_change(
        &mut self,
        old: &Reading,
        new: Option<&Reading>,
    ) -> rusqlite::Result<()> {
        write_out_latest(self.tx, *self.seq as i64 - 1, self.max_future)?;
        self.rollups.flush(self.tx)?;
        self.rollups.clear();
        fn folded(r: &Reading) -> Folded<'_> {
            Folded {
                sensor_id: r.sensor_id,
                tipo: &r.tipo,
                taken_at: r.timestamp,
                valor: r.valor,
            }
        }
        rollup::refold(self.tx, folded(old), new.map(folded))?;
        let horizon = self.now.saturating_add(self.max_future);
        refresh_latest(self.tx, old.sensor_id, &old.tipo, horizon)?;
        if let Some(new) = new.filter(|n| n.tipo != old.tipo) {
            refresh_latest(self.tx, new.sensor_id, &new.tipo, horizon)?;
        }
        Ok(())
    }

    /// Stores a reading and its share of the roll-ups and latest values; its event is
    /// [`Step::record_reading`].
    pub(super) fn store_reading(
        &mut self,
        sensor_id: i64,
        taken_at: Micros,
        hora_dudosa: bool,
        tipo: &str,
        valor: f64,
        unidad: &str,
    ) -> Result<Reading, rusqlite::Error> {
        // SQLite keeps -0.0 as 0: the live frame must carry the value replay will read.
        let valor = valor + 0.0;
        // The reading is its own `created` event: its id is the event's `seq`.
        let id = *self.seq as i64;
        let series = self.series_of(sensor_id, tipo, unidad, hora_dudosa)?;
        self.readings.insert(id, series, taken_at, valor)?;
        self.rollups.add(sensor_id, tipo, taken_at, valor);
        let reading = Reading {
            id,
            sensor_id,
            tipo: tipo.to_owned(),
            valor,
            unidad: unidad.to_owned(),
            timestamp: taken_at,
            hora_dudosa,
        };
        Ok(reading)
    }

    /// The series of a sensor's `tipo` in `unidad`, created on first use.
    pub(super) fn series_of(
        &mut self,
        sensor_id: i64,
        tipo: &str,
        unidad: &str,
        hora_dudosa: bool,
    ) -> rusqlite::Result<i64> {
        let known = self.series.entry(sensor_id).or_default();
        if let Some(found) = known
            .iter()
            .find(|s| s.tipo == tipo && s.unidad == unidad && s.hora_dudosa == hora_dudosa)
        {
            return Ok(found.id);
        }
        let id = match self
            .tx
            .prepare_cached(
                "SELECT id FROM series WHERE sensor_id = ?1 AND tipo = ?2 AND unidad = ?3 \
                 AND hora_dudosa = ?4",
            )?
            .query_row(params![sensor_id, tipo, unidad, hora_dudosa], |r| r.get(0))
            .optional()?
        {
            Some(id) => id,
            None => {
                self.tx
                    .prepare_cached(
                        "INSERT INTO series (sensor_id, tipo, unidad, hora_dudosa) \
                         VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![sensor_id, tipo, unidad, hora_dudosa])?;
                self.tx.last_insert_rowid()
            }
        };
        known.push(SeriesId {
            tipo: tipo.to_owned(),
            unidad: unidad.to_owned(),
            hora_dudosa,
            id,
        });
        Ok(id)
    }

    pub(super) fn emit(&mut self, emission: Emission) -> Result<u64, rusqlite::Error> {
        let seq = *self.seq;
        let (event_type, frame) = match &emission.kind {
            EmissionKind::System(kind) => (
                kind.as_str(),
                events::system_frame(kind, &emission.data, self.now, seq),
            ),
            EmissionKind::Test => (
                "test",
                events::test_frame(emission.channel, &emission.data, self.now, seq),
            ),
        };
        self.record(
            emission.channel,
            event_type,
            emission.sensor_id,
            None,
            frame,
            Body::Data(emission.data),
        )
    }
}

/// Brings the `latest_readings` table up to the reading with id `through`: folds in the
/// readings stored since it was last written (a commit would otherwise rewrite its page
/// every time), as [`reader::snapshot`] does on reading it.
pub(super) fn write_out_latest(
    tx: &Transaction<'_>,
    through: i64,
    max_future: Micros,
) -> rusqlite::Result<()> {
    let since = reader::meta(tx, "latest_through")?;
    if through <= since {
        return Ok(());
    }
    let mut newest = NewestReadings::new(max_future);
    let now = now_micros();
    for reading in tx
        .prepare_cached(&format!(
            "{} WHERE r.id > ?1 AND r.id <= ?2 AND s.sensor_id IN (SELECT id FROM sensors) ORDER BY r.id",
            reader::READING_COLUMNS
        ))?
        .query_map(params![since, through], reader::reading_from_row)?
    {
        let r = reading?;
        newest.add(r.sensor_id, &r.tipo, r.id, r.timestamp, now);
    }
    newest.flush(tx)?;
    tx.prepare_cached("UPDATE store_meta SET value = ?1 WHERE key = 'latest_through'")?
        .execute([through])?;
    Ok(())
}

/// Points the latest value of a sensor and `tipo` at its newest remaining reading, or
/// removes it when none is left. As in [`NewestReadings`], a reading stamped after
/// `horizon` (too far in the future) is the latest only when there is no other. A
/// deleted sensor has no latest values, even while its readings stay.
pub(super) fn refresh_latest(
    tx: &Transaction<'_>,
    sensor_id: i64,
    tipo: &str,
    horizon: Micros,
) -> rusqlite::Result<()> {
    let newest_until = |until: Micros| -> rusqlite::Result<Option<(i64, Micros)>> {
        // Columns: id, ts, second.
        tx.prepare_cached(&format!(
            "{} ORDER BY 3 DESC, 2 DESC, 1 DESC LIMIT 1",
            seconds::by_time(
                "r.id, r.ts",
                &format!(
                    " AND s.sensor_id = ?1 AND s.tipo = ?2 AND {SECOND} <= ?3 / 1000000 \
                     AND r.ts <= ?3"
                ),
            )
        ))?
        .query_row(params![sensor_id, tipo, until], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
    };
    let newest = if reader::sensor_exists(tx, sensor_id)? {
        match newest_until(horizon)? {
            Some(found) => Some(found),
            None => newest_until(Micros::MAX)?,
        }
    } else {
        None
    };
    match newest {
        Some((reading_id, ts)) => tx
            .prepare_cached(
                "INSERT OR REPLACE INTO latest_readings (sensor_id, tipo, reading_id, ts) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![sensor_id, tipo, reading_id, ts])?,
        None => tx
            .prepare_cached("DELETE FROM latest_readings WHERE sensor_id = ?1 AND tipo = ?2")?
            .execute(params![sensor_id, tipo])?,
    };
    Ok(())
}

/// The insert of every reading, prepared once per transaction: a busy gateway stores
/// thousands of readings per commit, and looking the statement up in the connection's
/// cache by its text for every reading cost the writer a good part of its ingest rate.
/// The readings' seconds are indexed later, with the roll-ups (see [`seconds`]).
pub(super) struct ReadingInserts<'tx> {
    row: CachedStatement<'tx>,
}

impl<'tx> ReadingInserts<'tx> {
    pub(super) fn prepare(tx: &'tx Transaction<'tx>) -> rusqlite::Result<Self> {
        Ok(ReadingInserts {
            row: tx.prepare_cached(
                "INSERT INTO reading_rows (id, series, ts, valor) VALUES (?1, ?2, ?3, ?4)",
            )?,
        })
    }

    pub(super) fn insert(
        &mut self,
        id: i64,
        series: i64,
        taken_at: Micros,
        valor: f64,
    ) -> rusqlite::Result<()> {
        self.row.execute(params![id, series, taken_at, valor])?;
        Ok(())
    }
}

/// Series ids known to the writer, by sensor; a sensor has a few.
pub(super) type SeriesIds = HashMap<i64, Vec<SeriesId>>;

pub(super) struct SeriesId {
    tipo: String,
    unidad: String,
    hora_dudosa: bool,
    id: i64,
}

/// The newest reading of each sensor and `tipo` among the readings stored since the
/// `latest_readings` table was last written, written to it once. A sensor has a few
/// `tipo`s, so each keeps a short list.
///
/// "Newest" is by sample time, except that a reading stamped further in the future than
/// `max_future` (a client's clock in year 9999, or one that got in while the gateway's
/// clock was not trusted, or is in an older database) is newest only until anything
/// else is stored: it cannot pin the latest value.
pub(super) struct NewestReadings {
    by_sensor: HashMap<i64, Vec<Newest>>,
    max_future: Micros,
}

pub(super) struct Newest {
    tipo: String,
    reading_id: i64,
    taken_at: Micros,
}

impl NewestReadings {
    pub(super) fn new(max_future: Micros) -> NewestReadings {
        NewestReadings {
            by_sensor: HashMap::new(),
            max_future,
        }
    }

    /// A reading stored since the table was written, looked at `now`; of two taken at
    /// the same moment the later stored wins, as in the upsert.
    pub(super) fn add(
        &mut self,
        sensor_id: i64,
        tipo: &str,
        reading_id: i64,
        taken_at: Micros,
        now: Micros,
    ) {
        let horizon = now.saturating_add(self.max_future);
        let kept = self.by_sensor.entry(sensor_id).or_default();
        match kept.iter_mut().find(|n| n.tipo == tipo) {
            Some(newest) if taken_at >= newest.taken_at || newest.taken_at > horizon => {
                newest.reading_id = reading_id;
                newest.taken_at = taken_at;
            }
            Some(_) => {}
            None => kept.push(Newest {
                tipo: tipo.to_owned(),
                reading_id,
                taken_at,
            }),
        }
    }

    /// Writes the batch's newest readings where they are newer than the stored ones, or
    /// the stored ones lie too far in the future.
    pub(super) fn flush(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let horizon = now_micros().saturating_add(self.max_future);
        let mut upsert = tx.prepare_cached(
            "INSERT INTO latest_readings (sensor_id, tipo, reading_id, ts) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (sensor_id, tipo) DO UPDATE SET reading_id = excluded.reading_id, ts = excluded.ts \
             WHERE excluded.ts >= latest_readings.ts OR latest_readings.ts > ?5",
        )?;
        for (sensor_id, kept) in self.by_sensor.drain() {
            for newest in kept {
                upsert.execute(params![
                    sensor_id,
                    newest.tipo,
                    newest.reading_id,
                    newest.taken_at,
                    horizon
                ])?;
            }
        }
        Ok(())
    }
}

/// The stored text of a sensor's derived values; `None` when it derives none.
pub(super) fn stored_derived(derivados: &[crate::model::Derived]) -> Option<String> {
    (!derivados.is_empty()).then(|| serde_json::to_string(derivados).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;
    use tokio::sync::oneshot;

    use super::*;
    use crate::model::{Calibration, Measurement, NewReading};
    use crate::store::schema;

    /// The first `seq` of a fresh database.
    const FIRST_SEQ: u64 = 1;

    fn database() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        conn
    }

    /// Runs `apply` in one transaction as the writer does, commits, and gives back its
    /// result, the events it left for publishing and the next `seq`.
    fn in_batch<T>(
        conn: &mut Connection,
        seq: u64,
        apply: impl FnOnce(&mut Step<'_>) -> T,
    ) -> (T, Vec<Unpublished>, u64) {
        let mut seq = seq;
        let mut events = Vec::new();
        let mut rollups = Pending::default();
        let mut held = Vec::new();
        let mut series = SeriesIds::new();
        let tx = conn.transaction().unwrap();
        let result = {
            let mut step = Step {
                tx: &tx,
                readings: ReadingInserts::prepare(&tx).unwrap(),
                seq: &mut seq,
                events: &mut events,
                rollups: &mut rollups,
                held: &mut held,
                series: &mut series,
                max_future: 300_000_000,
                now: now_micros(),
            };
            apply(&mut step)
        };
        tx.commit().unwrap();
        (result, events, seq)
    }

    fn new_sensor(tipo: &str) -> NewSensor {
        NewSensor {
            tipo: tipo.into(),
            modelo: "DHT22".into(),
            nombre: None,
            ubicacion: None,
            fuente: None,
            intervalo: None,
            activo: true,
            calibracion: Calibration::default(),
            derivados: Vec::new(),
        }
    }

    fn event_types(events: &[Unpublished]) -> Vec<(u64, String)> {
        events
            .iter()
            .map(|e| match e {
                Unpublished::Built(event) => (event.seq, event.event_type.clone()),
                Unpublished::Reading { seq, .. } => (*seq, "reading".into()),
            })
            .collect()
    }

    #[test]
    fn a_created_sensor_is_stored_with_its_event_under_the_next_seq() {
        let mut conn = database();
        let (reply, answer) = oneshot::channel();
        let command = Command::CreateSensor(new_sensor("temperatura"), reply);
        let (done, events, next) = in_batch(&mut conn, FIRST_SEQ, |step| step.apply(command));
        done.unwrap().send();
        let sensor = answer.blocking_recv().unwrap().unwrap();
        assert_eq!(next, FIRST_SEQ + 1);
        assert_eq!(event_types(&events), [(FIRST_SEQ, "created".to_string())]);
        assert_eq!(reader::sensor(&conn, sensor.id).unwrap(), Some(sensor));
    }

    #[test]
    fn samples_become_readings_each_its_own_event() {
        let mut conn = database();
        let (sensor, _, seq) = in_batch(&mut conn, FIRST_SEQ, |step| {
            step.create_sensor(new_sensor("temperatura")).unwrap()
        });
        let taken_at = now_micros() - 1_000_000;
        let sample = Sample {
            sensor_id: sensor.id,
            taken_at,
            hora_dudosa: false,
            measurements: vec![
                Measurement::new("temperatura", 21.5, "°C"),
                Measurement::new("humedad", 40.0, "%"),
            ],
        };
        let (stored, events, next) =
            in_batch(&mut conn, seq, |step| step.insert_samples(&[sample]));
        stored.unwrap();
        assert_eq!(next, seq + 2);
        assert_eq!(
            event_types(&events),
            [
                (seq, "reading".to_string()),
                (seq + 1, "reading".to_string())
            ]
        );
        let stored: Vec<(String, f64, Micros)> = [seq, seq + 1]
            .iter()
            .map(|id| reader::reading(&conn, *id as i64).unwrap().unwrap())
            .map(|r| (r.tipo, r.valor, r.timestamp))
            .collect();
        assert_eq!(
            stored,
            [
                ("temperatura".to_string(), 21.5, taken_at),
                ("humedad".to_string(), 40.0, taken_at)
            ]
        );
    }

    #[test]
    fn samples_of_a_deleted_sensor_are_dropped_without_a_seq() {
        let mut conn = database();
        let sample = Sample {
            sensor_id: 7,
            taken_at: now_micros(),
            hora_dudosa: false,
            measurements: vec![Measurement::new("temperatura", 21.5, "°C")],
        };
        let (stored, events, next) =
            in_batch(&mut conn, FIRST_SEQ, |step| step.insert_samples(&[sample]));
        stored.unwrap();
        assert!(events.is_empty());
        assert_eq!(next, FIRST_SEQ);
        assert_eq!(reader::counts(&conn).unwrap().last_seq, 0);
    }

    #[test]
    fn a_reading_for_a_missing_sensor_is_refused_and_numbers_nothing() {
        let mut conn = database();
        let (reply, answer) = oneshot::channel();
        let new = NewReading {
            sensor_id: 9,
            tipo: "temperatura".into(),
            valor: 20.0,
            unidad: "°C".into(),
            timestamp: None,
            hora_dudosa: false,
        };
        let (done, events, next) = in_batch(&mut conn, FIRST_SEQ, |step| {
            step.apply(Command::InsertReading(new, reply))
        });
        done.unwrap().send();
        assert!(matches!(
            answer.blocking_recv().unwrap(),
            Err(StoreError::NotFound {
                entity: "Sensor",
                id: 9
            })
        ));
        assert!(events.is_empty());
        assert_eq!(next, FIRST_SEQ);
    }

    #[test]
    fn deleting_a_sensor_keeps_its_record_in_the_event() {
        let mut conn = database();
        let (sensor, _, seq) = in_batch(&mut conn, FIRST_SEQ, |step| {
            step.create_sensor(new_sensor("humedad")).unwrap()
        });
        let (deleted, events, next) = in_batch(&mut conn, seq, |step| {
            (
                step.delete_sensor(sensor.id).unwrap(),
                step.delete_sensor(sensor.id).unwrap(),
            )
        });
        assert_eq!(deleted.0.unwrap(), sensor);
        assert!(matches!(deleted.1, Err(StoreError::NotFound { .. })));
        assert_eq!(event_types(&events), [(seq, "deleted".to_string())]);
        assert_eq!(next, seq + 1);
        assert_eq!(reader::sensor(&conn, sensor.id).unwrap(), None);
    }
}
