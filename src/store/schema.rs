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
    -- Readings as small as an SD card wants them (see the README's storage section).
    -- What the store keeps about itself, by name:
    --   reading_events_from: readings with this id or above are their own `created`
    --     event, with `seq` = id; older ones have a row in `events`.
    --   log_floor: the oldest `seq` that replay can still serve.
    --   rollups_through: the newest reading id the stored roll-ups count; newer ones
    --     are folded again at start.
    --   latest_through: the newest reading id `latest_readings` has taken in; a
    --     snapshot folds in the newer ones.
    CREATE TABLE store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO store_meta (key, value) VALUES
        ('reading_events_from', (SELECT COALESCE(MAX(seq), 0) + 1 FROM events)),
        ('log_floor', (SELECT COALESCE(MIN(seq), 1) FROM events)),
        ('rollups_through', (SELECT COALESCE(MAX(id), 0) FROM readings)),
        ('latest_through', (SELECT COALESCE(MAX(id), 0) FROM readings));

    -- Each sensor's `tipo`, `unidad` and clock trust once, instead of in every reading.
    CREATE TABLE series (
        id          INTEGER PRIMARY KEY,
        sensor_id   INTEGER NOT NULL,
        tipo        TEXT    NOT NULL,
        unidad      TEXT    NOT NULL,
        hora_dudosa INTEGER NOT NULL,
        UNIQUE (sensor_id, tipo, unidad, hora_dudosa)
    );
    INSERT INTO series (sensor_id, tipo, unidad, hora_dudosa)
        SELECT DISTINCT sensor_id, tipo, unidad, hora_dudosa FROM readings;

    -- No index: readings are found by time through `reading_seconds` below.
    CREATE TABLE reading_rows (
        id     INTEGER PRIMARY KEY,
        series INTEGER NOT NULL,
        ts     INTEGER NOT NULL,
        valor  REAL    NOT NULL
    );
    INSERT INTO reading_rows (id, series, ts, valor)
        SELECT r.id, s.id, r.ts, r.valor FROM readings r JOIN series s
            ON s.sensor_id = r.sensor_id AND s.tipo = r.tipo AND s.unidad = r.unidad
            AND s.hora_dudosa = r.hora_dudosa
        ORDER BY r.id;
    DROP TABLE readings;
    DROP TABLE deleted_reading_ids;

    -- For each second of sample time (`ts / 1000000`), ranges of ids that hold every
    -- reading taken in it, disjoint: a query by time reads the rows of the seconds it
    -- covers by id, second by second. Ids grow with time, so a second has one range,
    -- which its next readings extend; a reading that arrives late (a buffered sample, a
    -- board that booted in 1970) starts a range of its own rather than widening one over
    -- everything stored since. A row per second instead of an index entry per reading:
    -- a tenth of the bytes at ten readings a second, and a tenth of the pages a commit
    -- touches.
    CREATE TABLE reading_seconds (
        second   INTEGER NOT NULL,
        first_id INTEGER NOT NULL,
        last_id  INTEGER NOT NULL,
        PRIMARY KEY (second, first_id)
    ) WITHOUT ROWID;
    -- A second's readings whose ids lie at most 256 apart share a range.
    INSERT INTO reading_seconds (second, first_id, last_id)
        SELECT second, MIN(id), MAX(id) FROM (
            SELECT id, second, SUM(gap IS NULL OR gap > 256)
                OVER (PARTITION BY second ORDER BY id) AS part
            FROM (SELECT id, ts / 1000000 AS second,
                         id - LAG(id) OVER (PARTITION BY ts / 1000000 ORDER BY id) AS gap
                  FROM reading_rows))
        GROUP BY second, part;

    -- The readings and the whole event log as they were, for queries by hand
    -- (`sqlite3 sensorgate.db`): a reading's `created` event is the reading itself,
    -- unless a row in `events` keeps it (the reading was changed or deleted since).
    CREATE VIEW readings AS
        SELECT r.id AS id, s.sensor_id AS sensor_id, r.ts AS ts, s.tipo AS tipo,
               r.valor AS valor, s.unidad AS unidad, s.hora_dudosa AS hora_dudosa
        FROM reading_rows r JOIN series s ON s.id = r.series;
    CREATE VIEW event_log AS
        SELECT seq, ts, channel, event_type, sensor_id, tipo, frame, reading_id, valor,
               unidad, taken_at, hora_dudosa
        FROM events
        UNION ALL
        SELECT r.id, r.ts, 'readings', 'created', s.sensor_id, s.tipo, '', r.id, r.valor,
               s.unidad, r.ts, s.hora_dudosa
        FROM reading_rows r JOIN series s ON s.id = r.series
        WHERE r.id >= (SELECT value FROM store_meta WHERE key = 'reading_events_from')
            AND r.id NOT IN (SELECT seq FROM events);
"#,
    r#"
    -- A sensor's calibration (offset and scale per tipo, JSON) and the values derived
    -- from its samples (a JSON list of tipos); NULL when it has none.
    ALTER TABLE sensors ADD COLUMN calibracion TEXT;
    ALTER TABLE sensors ADD COLUMN derivados TEXT;
    -- Every calibration a sensor has had, from when it took effect ('{}': none), so that
    -- a reading taken at time t is traced to the newest row with desde <= t. A row per
    -- change made by hand: it grows with edits, not with samples.
    CREATE TABLE calibration_history (
        sensor_id   INTEGER NOT NULL,
        desde       INTEGER NOT NULL,
        calibracion TEXT    NOT NULL,
        PRIMARY KEY (sensor_id, desde)
    ) WITHOUT ROWID;
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
    r#"
    -- `reading_seconds` covers the readings up to this one; those stored since are found
    -- by id, and their seconds are written with the roll-ups rather than in each commit.
    -- Until now every commit wrote them: all are covered.
    INSERT INTO store_meta (key, value)
        VALUES ('seconds_through', (SELECT COALESCE(MAX(id), 0) FROM reading_rows));
"#,
];

/// The version whose migration copies every reading into `reading_rows`: the one
/// upgrade whose room grows with the database.
const READINGS_REWRITTEN_AT: u32 = 8;

/// Room the readings' rewrite takes per reading: the new row and its share of
/// `reading_seconds` twice, once in the WAL and once in the file when the WAL is
/// checkpointed, before the old table's pages are free again (a compact row is about
/// 30 bytes at rest). Measured on a million readings: 68 bytes each (43 in the WAL, 25
/// of growth).
const REWRITE_BYTES_PER_READING: u64 = 80;

/// Room any migration may take beyond that, and what other writers on the card need
/// meanwhile.
const MIGRATION_MARGIN_BYTES: u64 = 16 * 1024 * 1024;

/// Refuses, before anything is written, an upgrade across [`READINGS_REWRITTEN_AT`] that
/// would fill the file system: it would fail at the full card after writing most of the
/// copy, roll back, and do the same at every restart, wearing the card for nothing.
/// `free` is asked only when that upgrade is due.
fn check_room_to_rewrite_readings(
    conn: &Connection,
    current: u32,
    wanted: u32,
    free: impl FnOnce() -> Option<u64>,
) -> Result<(), StoreError> {
    if current == 0 || current >= READINGS_REWRITTEN_AT || wanted < READINGS_REWRITTEN_AT {
        return Ok(());
    }
    let Some(free) = free() else {
        return Ok(());
    };
    // Counted, not taken from the span of ids: retention may have removed readings from
    // the middle of it. A million readings count in well under a second.
    let readings: i64 = conn.query_row("SELECT COUNT(*) FROM readings", [], |row| row.get(0))?;
    let readings = readings.max(0) as u64;
    let needed = readings * REWRITE_BYTES_PER_READING + MIGRATION_MARGIN_BYTES;
    if free < needed {
        return Err(StoreError::NoRoomToUpgrade {
            version: READINGS_REWRITTEN_AT,
            readings,
            needed,
            free,
        });
    }
    Ok(())
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database up to [`SCHEMA_VERSION`]. Refuses a database written by a newer
/// build rather than guessing at a schema it does not know.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_up_to(conn, SCHEMA_VERSION)
}

/// Brings the database up to `version` and no further: [`migrate`], and how the upgrade
/// tests make a database as an older build left it.
pub fn migrate_up_to(conn: &mut Connection, version: u32) -> Result<(), StoreError> {
    let directory = conn
        .path()
        .and_then(|path| std::path::Path::new(path).parent())
        .map(std::path::Path::to_owned);
    migrate_with_room(conn, version, || {
        directory
            .as_deref()
            .and_then(super::file_system_space)
            .map(|(free, _)| free)
    })
}

/// [`migrate_up_to`] on a file system with the bytes `free` tells left (`None`: unknown,
/// as for an in-memory database).
fn migrate_with_room(
    conn: &mut Connection,
    version: u32,
    free: impl FnOnce() -> Option<u64>,
) -> Result<(), StoreError> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    let wanted = version.min(SCHEMA_VERSION) as usize;
    check_room_to_rewrite_readings(conn, current, wanted as u32, free)?;
    for (version, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(wanted)
        .skip(current as usize)
    {
        let started = std::time::Instant::now();
        let tx: Transaction = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as u32 + 1)?;
        tx.commit()?;
        log::info!(
            "database schema migrated to version {} in {:.1} s",
            version + 1,
            started.elapsed().as_secs_f64()
        );
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

    /// A database as the build before the readings' rewrite left it, with `readings`
    /// readings of one sensor in a row and one more far past them.
    fn database_before_the_rewrite(path: &std::path::Path, readings: i64) -> Connection {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        migrate_up_to(&mut conn, READINGS_REWRITTEN_AT - 1).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute(
            "INSERT INTO sensors (id, tipo, modelo, nombre, created_at, updated_at) \
             VALUES (1, 'temperatura', 'DHT22', 'a', 0, 0)",
            [],
        )
        .unwrap();
        tx.execute(
            "WITH RECURSIVE n(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM n WHERE id < ?1) \
             INSERT INTO readings (id, sensor_id, ts, tipo, valor, unidad) \
             SELECT id, 1, id * 2000000, 'temperatura', id / 10.0, '°C' FROM n",
            [readings],
        )
        .unwrap();
        // Retention took readings from the middle: the ids span far more than are left.
        tx.execute(
            "INSERT INTO readings (id, sensor_id, ts, tipo, valor, unidad) \
             VALUES (?1 * 1000, 1, ?1 * 2000000000, 'temperatura', 0, '°C')",
            [readings],
        )
        .unwrap();
        tx.commit().unwrap();
        conn
    }

    #[test]
    fn an_upgrade_that_would_fill_the_file_system_is_refused_before_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = database_before_the_rewrite(&dir.path().join("old.db"), 1000);
        let needed = 1001 * REWRITE_BYTES_PER_READING + MIGRATION_MARGIN_BYTES;
        let refused = migrate_with_room(&mut conn, SCHEMA_VERSION, || Some(needed - 1));
        assert!(
            matches!(
                refused,
                Err(StoreError::NoRoomToUpgrade {
                    version: READINGS_REWRITTEN_AT,
                    readings: 1001,
                    ..
                })
            ),
            "{refused:?}"
        );
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, READINGS_REWRITTEN_AT - 1, "nothing migrated");

        migrate_with_room(&mut conn, SCHEMA_VERSION, || Some(needed)).unwrap();
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM reading_rows", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1001);
        // Past the rewrite, a full card stops no upgrade: the next ones add a table
        // or a column.
        migrate_with_room(&mut conn, SCHEMA_VERSION, || Some(0)).unwrap();
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
