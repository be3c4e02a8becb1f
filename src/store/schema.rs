//! Schema and migrations, versioned with `PRAGMA user_version`.
//!
//! Each entry of [`MIGRATIONS`] moves the schema one version up and is applied once, in
//! its own transaction, at start. Never edit a released migration: add a new one.

use rusqlite::{Connection, Transaction};

use super::StoreError;

/// Migration `n` (0-based) takes the database from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
    -- AUTOINCREMENT: a deleted sensor's id is never handed out again, so old readings
    -- and events can never be mistaken for a new sensor's.
    CREATE TABLE sensors (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        tipo       TEXT    NOT NULL,
        modelo     TEXT    NOT NULL,
        nombre     TEXT,
        ubicacion  TEXT,
        fuente     TEXT,
        intervalo  REAL,
        activo     INTEGER NOT NULL DEFAULT 1,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX sensors_nombre ON sensors(nombre);

    -- Times are integer microseconds since the epoch (UTC).
    CREATE TABLE readings (
        id        INTEGER PRIMARY KEY,
        sensor_id INTEGER NOT NULL,
        ts        INTEGER NOT NULL,
        tipo      TEXT    NOT NULL,
        valor     REAL    NOT NULL,
        unidad    TEXT    NOT NULL
    );
    CREATE INDEX readings_sensor_ts ON readings(sensor_id, ts);
    CREATE INDEX readings_ts ON readings(ts);

    -- The newest reading (by sample time) of each sensor and tipo, kept by the writer so
    -- that a snapshot never scans readings.
    CREATE TABLE latest_readings (
        sensor_id  INTEGER NOT NULL,
        tipo       TEXT    NOT NULL,
        reading_id INTEGER NOT NULL,
        ts         INTEGER NOT NULL,
        PRIMARY KEY (sensor_id, tipo)
    ) WITHOUT ROWID;

    -- Roll-ups per sensor, tipo and bucket start (UTC), kept by the writer.
    CREATE TABLE rollup_minute (
        sensor_id INTEGER NOT NULL, tipo TEXT NOT NULL, inicio INTEGER NOT NULL,
        min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (sensor_id, tipo, inicio)
    ) WITHOUT ROWID;
    CREATE TABLE rollup_hour (
        sensor_id INTEGER NOT NULL, tipo TEXT NOT NULL, inicio INTEGER NOT NULL,
        min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (sensor_id, tipo, inicio)
    ) WITHOUT ROWID;
    CREATE TABLE rollup_day (
        sensor_id INTEGER NOT NULL, tipo TEXT NOT NULL, inicio INTEGER NOT NULL,
        min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (sensor_id, tipo, inicio)
    ) WITHOUT ROWID;

    -- Every event sent to clients, by seq, with the exact frame that was sent, so that a
    -- resuming client receives the same bytes a live one did.
    CREATE TABLE events (
        seq        INTEGER PRIMARY KEY,
        ts         INTEGER NOT NULL,
        channel    TEXT    NOT NULL,
        event_type TEXT    NOT NULL,
        sensor_id  INTEGER,
        tipo       TEXT,
        frame      TEXT    NOT NULL
    );
"#,
    r#"
    -- API tokens, stored as SHA-256 hashes only.
    CREATE TABLE tokens (
        id           INTEGER PRIMARY KEY,
        name         TEXT    NOT NULL UNIQUE,
        scope        TEXT    NOT NULL,
        hash         BLOB    NOT NULL,
        created_at   INTEGER NOT NULL,
        last_used_at INTEGER
    );
"#,
    r#"
    -- How far the fleet uplink got: the newest seq up to which the broker acknowledged
    -- every event (or the uplink skipped it). One row per uplink, by name.
    CREATE TABLE uplink_cursor (
        name       TEXT    PRIMARY KEY,
        seq        INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
"#,
    r#"
    -- Reading events, nine in ten of all events, keep the reading's fields instead of their
    -- frame (an empty `frame`): a fifth of the bytes, and the frame rebuilt from them is
    -- byte for byte the one that was sent.
    ALTER TABLE events ADD COLUMN reading_id INTEGER;
    ALTER TABLE events ADD COLUMN valor REAL;
    ALTER TABLE events ADD COLUMN unidad TEXT;
    ALTER TABLE events ADD COLUMN taken_at INTEGER;
"#,
    r#"
    -- Samples taken before the gateway's clock was trusted (a board without a real-time
    -- clock, before NTP): 1 when the time may be wrong. A zero costs no bytes in a row.
    ALTER TABLE readings ADD COLUMN hora_dudosa INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE events ADD COLUMN hora_dudosa INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
    -- What clients were last told of each sensor's availability, found at start without
    -- scanning the events: a sensor announced offline before a restart is announced online
    -- at its first good sample after it. Partial: other events add nothing to it.
    CREATE INDEX events_availability ON events(sensor_id, seq, event_type)
        WHERE event_type IN ('sensor_offline', 'sensor_online');
"#,
    r#"
    -- The largest id of a reading deleted over REST. SQLite hands out the largest rowid
    -- plus one, so deleting the newest reading would give its id to the next one; the
    -- writer gives the next reading an id above this instead, so that a reading id, like
    -- a sensor id, is never handed out twice. One row at most.
    CREATE TABLE deleted_reading_ids (last_id INTEGER NOT NULL);
"#,
    r#"
    -- Alert rules (`origin` 'config' for those of the config file, 'api' for those made
    -- over REST; `definition` the rule as JSON), the state of each (JSON, so that a restart
    -- in the middle of a firing alert picks it up without firing it again), the silences
    -- still running, and the webhook notifications not yet delivered, in order. Delivered
    -- notifications and ended silences are deleted; their events stay in `events`.
    CREATE TABLE alert_rules (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        name       TEXT    NOT NULL UNIQUE,
        origin     TEXT    NOT NULL,
        definition TEXT    NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE alert_state (
        rule_id    INTEGER PRIMARY KEY,
        state      TEXT    NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE alert_silences (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        rule_id    INTEGER,
        sensor_id  INTEGER,
        ends_at    INTEGER NOT NULL,
        created_by TEXT    NOT NULL,
        comment    TEXT    NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE alert_outbox (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        rule_id    INTEGER NOT NULL,
        url        TEXT    NOT NULL,
        per_minute INTEGER NOT NULL,
        body       TEXT    NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX alert_outbox_rule ON alert_outbox(rule_id, id);
"#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database up to [`SCHEMA_VERSION`]. Refuses a database written by a newer
/// build rather than guessing at a schema it does not know.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx: Transaction = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as u32 + 1)?;
        tx.commit()?;
        log::info!("database schema migrated to version {}", version + 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_fresh_database_and_is_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        conn.execute("INSERT INTO events (seq, ts, channel, event_type, frame) VALUES (1, 0, 'general', 'test', '{}')", [])
            .unwrap();
    }

    #[test]
    fn refuses_newer_schema() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(StoreError::NewerSchema { .. })
        ));
    }
}
