//! Storage: one SQLite file in WAL mode.
//!
//! Every write goes through the [`writer`] thread, which owns the only connection that
//! writes rows, commits whatever is queued in one transaction, and only then hands the
//! events that describe it to the [`publisher`] thread. The [`checkpointer`] thread copies
//! the WAL back into the database beside them. Reads run on a small pool of read-only
//! connections on the blocking thread pool, a few at a time, so they never wait behind a commit.

pub mod alerts;
mod backup;
mod capacity;
mod checkpointer;
mod command;
mod feed;
mod health;
mod publisher;
mod reader;
mod replay;
mod retention;
mod rollup;
mod schema;
mod seconds;
mod settings;
mod step;
pub mod tokens;
mod writer;

pub use backup::{backup, DatabaseCopy};
pub use capacity::{file_system_space, process_write_bytes, StorageFigures};
pub use feed::{Feed, Pulled};
pub use health::WriterHealth;
pub use reader::{
    CalibrationChange, Counts, ReadingFilter, ReadingOrder, Replay, SensorFilter, Snapshot,
};
pub use rollup::{Aggregate, AggregateQuery, Bucket};
#[cfg(test)]
pub(crate) use schema::migrate;
pub use schema::{migrate_up_to, SCHEMA_VERSION};
pub use settings::{Locking, RetentionRule, StorageConfig, Synchronous};
pub use writer::WriterHandle;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex};

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::events::{Channel, Hub};
use crate::model::{NewReading, NewSensor, Reading, ReadingPatch, Sample, Sensor, SensorPatch};
use command::Command;
use replay::ReplayPages;
use rollup::OpenBuckets;

/// A system or test event to store and publish.
#[derive(Debug, Clone)]
pub struct Emission {
    pub channel: Channel,
    pub kind: EmissionKind,
    pub sensor_id: Option<i64>,
    pub data: Value,
}

/// The envelope an [`Emission`] goes out in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmissionKind {
    /// `{"type": "system_event", "event_type": ...}`.
    System(String),
    /// `{"type": "test_event", ...}` from `POST /api/v1/ws/test-event`.
    Test,
}

/// File name of the database inside the data directory.
pub const DATABASE_FILE: &str = "sensorgate.db";

/// Commands waiting for the writer. Bounded so that a wedged disk pushes back on
/// producers instead of growing memory.
const WRITER_QUEUE: usize = 8192;

/// Samples waiting for the writer: a batched source hands over hundreds per command, so
/// the command bound alone would let millions queue (hundreds of MiB, and a shutdown
/// that takes minutes to commit them).
const QUEUED_SAMPLES: usize = 16_384;

/// Page size of a new database, in bytes.
const PAGE_SIZE: u32 = 1024;

/// WAL pages that trigger a checkpoint: 4 MiB of 1 KiB pages.
const WAL_CHECKPOINT_PAGES: u32 = 4096;

/// Reads that run at once, each on a read-only connection kept open between reads.
const READERS: usize = 4;

/// Pages of stored events read for replaying clients at once (see [`Store::replay_turn`]).
const REPLAYING_CLIENTS: usize = 8;

/// Why a storage operation failed.
#[derive(Debug)]
pub enum StoreError {
    /// The sensor (or other entity) does not exist.
    NotFound { entity: &'static str, id: i64 },
    /// SQLite failed: disk full, read-only card, corruption.
    Sqlite(rusqlite::Error),
    /// The batch this write was part of could not be committed; nothing of it was stored.
    Aborted(String),
    /// The data directory could not be created or opened.
    Io(std::io::Error),
    /// The database was written by a newer sensorgate.
    NewerSchema { found: u32, supported: u32 },
    /// The upgrade to schema `version` rewrites `readings` readings and needs `needed`
    /// bytes of the file system, which has `free`; nothing was changed.
    NoRoomToUpgrade {
        version: u32,
        readings: u64,
        needed: u64,
        free: u64,
    },
    /// The writer has stopped (the daemon is shutting down).
    Closed,
    /// A command that works on an existing database found none at this path.
    NoDatabase(PathBuf),
    /// The database at this path could not be opened or set up.
    Open(PathBuf, Box<StoreError>),
    /// Another process holds the database at this path to itself.
    Locked(PathBuf),
    /// A backup would overwrite this file.
    BackupExists(PathBuf),
    /// The backup file could not be made at this path.
    BackupTarget(PathBuf, String),
    /// The database is damaged; writes are refused. What was found and what to do.
    Damaged(String),
    /// A page-by-page copy could not be read whole; what went wrong.
    CopyIncomplete(String),
    /// A page-by-page copy could not be passed on to whoever asked for it.
    CopyNotSent(std::io::Error),
    /// A page-by-page copy was stopped before its end, as its caller asked.
    CopyCancelled,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NotFound { entity, id } => write!(f, "{entity} {id} not found"),
            StoreError::Sqlite(e) => write!(f, "database error: {e}"),
            StoreError::Aborted(why) => write!(f, "write not committed: {why}"),
            StoreError::Io(e) => write!(f, "data directory: {e}"),
            StoreError::NewerSchema { found, supported } => write!(
                f,
                "database schema version {found} is newer than this build supports ({supported}); upgrade sensorgate"
            ),
            StoreError::NoRoomToUpgrade {
                version,
                readings,
                needed,
                free,
            } => write!(
                f,
                "upgrading the database to schema version {version} rewrites its {readings} readings and needs about {} MiB free on its file system, which has {} MiB: free some space on it (or move storage.data_dir to a larger one) and start again; nothing was changed",
                needed.div_ceil(1024 * 1024),
                free / (1024 * 1024)
            ),
            StoreError::Closed => write!(f, "storage is shutting down"),
            StoreError::NoDatabase(path) => write!(
                f,
                "no database at {}: check --data-dir or storage.data_dir in --config (the daemon creates the database on its first start)",
                path.display()
            ),
            StoreError::Open(path, e) => write!(f, "cannot open {}: {e}", path.display()),
            StoreError::Locked(path) => write!(
                f,
                "{} is locked by another process (a program in the middle of a write, or a sensorgate with storage.locking = \"exclusive\" that is starting, stopping or without its control socket: its log says which): stop that process first",
                path.display()
            ),
            StoreError::Damaged(what) => f.write_str(what),
            StoreError::BackupExists(path) => write!(
                f,
                "backup file {} exists already; choose a new file name",
                path.display()
            ),
            StoreError::BackupTarget(path, why) => {
                write!(f, "backup file {}: {why}", path.display())
            }
            StoreError::CopyIncomplete(why) => write!(f, "copy of the database failed: {why}"),
            StoreError::CopyNotSent(e) => write!(f, "copy of the database not sent: {e}"),
            StoreError::CopyCancelled => write!(f, "copy of the database stopped: the daemon is stopping"),
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// Whether SQLite found the database locked by another process, past its busy
    /// timeout.
    fn is_locked(&self) -> bool {
        matches!(self, StoreError::Sqlite(e)
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

/// Handle to the storage; cheap to clone.
#[derive(Clone)]
pub struct Store {
    commands: mpsc::Sender<Command>,
    queued: Arc<SampleGate>,
    readers: Arc<Readers>,
    /// Event pages read for resuming clients, shared by the next ones.
    pages: Arc<ReplayPages>,
    /// Turns to replay stored events; see [`Store::replay_turn`].
    replay_turns: Arc<Semaphore>,
    /// Feeds replaying; see [`Replaying`].
    replaying: Arc<AtomicUsize>,
    health: Arc<WriterHealth>,
    /// Roll-up buckets not yet written to their tables, which queries merge in.
    open_buckets: Arc<OpenBuckets>,
    /// `storage.max_future_s` in microseconds, for the latest values of a snapshot.
    max_future: crate::model::Micros,
}

impl Store {
    /// Opens (creating if needed) the database in `config.data_dir`, migrates it, and
    /// starts the writer thread and the threads beside it; committed events go to `hub`.
    pub fn open(config: &StorageConfig, hub: Hub) -> Result<(Store, WriterHandle), StoreError> {
        let conn = open_database(config)?;
        let checkpoints = open_database(config)?;
        let file = DatabaseFile::of(config);
        let (commands, queue) = mpsc::channel(WRITER_QUEUE);
        let health = Arc::new(WriterHealth::default());
        let queued = Arc::new(SampleGate::new(QUEUED_SAMPLES));
        let open_buckets = Arc::new(OpenBuckets::default());
        let handle = writer::spawn(
            conn,
            checkpoints,
            queue,
            queued.clone(),
            hub,
            config,
            writer::Shared {
                health: health.clone(),
                open: open_buckets.clone(),
            },
        )?;
        check_in_background(file.clone(), health.clone());
        let store = Store {
            commands,
            queued,
            readers: Arc::new(Readers {
                file,
                idle: Mutex::new(Vec::new()),
                health: health.clone(),
                permits: Arc::new(Semaphore::new(READERS)),
            }),
            pages: Arc::default(),
            replay_turns: Arc::new(Semaphore::new(REPLAYING_CLIENTS)),
            replaying: Arc::default(),
            health,
            open_buckets,
            max_future: (config.max_future_s as i64).saturating_mul(1_000_000),
        };
        Ok((store, handle))
    }

    /// The writer's progress and last error, for health checks.
    pub fn health(&self) -> &WriterHealth {
        &self.health
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores a new sensor and emits `created`.
    pub async fn create_sensor(&self, new: NewSensor) -> Result<Sensor, StoreError> {
        self.call(|reply| Command::CreateSensor(new, reply)).await
    }

    /// Applies a patch; emits `updated` only when a value really changed.
    pub async fn update_sensor(&self, id: i64, patch: SensorPatch) -> Result<Sensor, StoreError> {
        self.call(|reply| Command::UpdateSensor(id, patch, reply))
            .await
    }

    /// Deletes a sensor, emits `deleted` with the sensor as it was, and returns it. Its
    /// readings stay until retention removes them.
    pub async fn delete_sensor(&self, id: i64) -> Result<Sensor, StoreError> {
        self.call(|reply| Command::DeleteSensor(id, reply)).await
    }

    /// Stores a reading pushed by a client and emits it on `readings`.
    pub async fn insert_reading(&self, new: NewReading) -> Result<Reading, StoreError> {
        self.call(|reply| Command::InsertReading(new, reply)).await
    }

    /// Applies a patch to a stored reading, with its roll-ups and latest value; emits
    /// `updated` on `readings` only when a value really changed.
    pub async fn update_reading(
        &self,
        id: i64,
        patch: ReadingPatch,
    ) -> Result<Reading, StoreError> {
        self.call(|reply| Command::UpdateReading(id, patch, reply))
            .await
    }

    /// Deletes a stored reading, takes it out of its roll-ups and latest value, emits
    /// `deleted` with the reading as it was, and returns it.
    pub async fn delete_reading(&self, id: i64) -> Result<Reading, StoreError> {
        self.call(|reply| Command::DeleteReading(id, reply)).await
    }

    /// Stores and emits a system or test event; returns its `seq`.
    pub async fn emit(&self, emission: Emission) -> Result<u64, StoreError> {
        self.call(|reply| Command::Emit(emission, reply)).await
    }

    /// Queues samples from a sensor source. Called from source threads; waits while the
    /// writer's queue is full, or holds [`QUEUED_SAMPLES`] samples already.
    ///
    /// A value that is not a finite number is dropped here: SQLite would store NaN as
    /// NULL and refuse the row, and a sample that can never be stored would hold up every
    /// commit it is retried in. Sources reject such values already; this is the last line.
    pub fn submit_samples(&self, mut samples: Vec<Sample>) -> Result<(), StoreError> {
        for sample in &mut samples {
            sample.measurements.retain(|m| {
                let finite = m.valor.is_finite();
                if !finite {
                    log::warn!(
                        "sensor {}: {} value {} dropped: not a finite number",
                        sample.sensor_id,
                        m.tipo,
                        m.valor
                    );
                }
                finite
            });
        }
        samples.retain(|s| !s.measurements.is_empty());
        let count = samples.len();
        self.queued.enter(count);
        self.commands
            .blocking_send(Command::Samples(samples))
            .map_err(|_| {
                self.queued.leave(count);
                StoreError::Closed
            })
    }

    /// Queues a system event from a thread outside the runtime, without waiting for it
    /// to be committed.
    pub fn submit_emission(&self, emission: Emission) -> Result<(), StoreError> {
        let (reply, _) = oneshot::channel();
        self.commands
            .blocking_send(Command::Emit(emission, reply))
            .map_err(|_| StoreError::Closed)
    }

    /// Resolves once the writer has worked through everything queued before it: the
    /// watchdog's proof that storage is not wedged.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Ping(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)
    }

    /// Records when a token was last used.
    pub async fn touch_token(&self, token_id: i64, at: crate::model::Micros) {
        let _ = self.commands.send(Command::TouchToken(token_id, at)).await;
    }

    /// Every token, by name.
    pub async fn tokens(&self) -> Result<Vec<tokens::StoredToken>, StoreError> {
        self.read(tokens::all).await
    }

    /// Adds a token with the hash of its secret; `false` when the name is taken.
    pub async fn create_token(
        &self,
        name: String,
        scope: &'static str,
        hash: Vec<u8>,
    ) -> Result<bool, StoreError> {
        self.call(|reply| Command::CreateToken {
            name,
            scope,
            hash,
            reply,
        })
        .await
    }

    /// Removes a token; `false` when there was none of that name.
    pub async fn delete_token(&self, name: String) -> Result<bool, StoreError> {
        self.call(|reply| Command::DeleteToken(name, reply)).await
    }

    /// Saves how far the uplink `name` got: every event up to `seq` was delivered (or
    /// needs no delivery). Written through the writer like everything else.
    pub async fn save_uplink_cursor(&self, name: &'static str, seq: u64) -> Result<(), StoreError> {
        self.call(|reply| Command::SaveUplinkCursor(name, seq, reply))
            .await
    }

    /// Applies alert rows and their events in one transaction (see [`alerts`]).
    pub async fn alert_write(
        &self,
        write: alerts::AlertWrite,
    ) -> Result<alerts::AlertReceipt, StoreError> {
        self.call(|reply| Command::Alerts(write, reply)).await
    }

    /// Every alert rule, by id.
    pub async fn alert_rules(&self) -> Result<Vec<alerts::RuleRow>, StoreError> {
        self.read(alerts::rules).await
    }

    /// The stored state of every alert rule that has one.
    pub async fn alert_states(&self) -> Result<Vec<(i64, String)>, StoreError> {
        self.read(alerts::states).await
    }

    /// Stored silences, by id.
    pub async fn alert_silences(&self) -> Result<Vec<alerts::SilenceRow>, StoreError> {
        self.read(alerts::silences).await
    }

    /// The oldest undelivered webhook notification of each rule.
    pub async fn alert_outbox_heads(&self) -> Result<Vec<alerts::OutboxRow>, StoreError> {
        self.read(alerts::outbox_heads).await
    }

    /// The saved position of the uplink `name`, if it ever saved one.
    pub async fn uplink_cursor(&self, name: &'static str) -> Result<Option<u64>, StoreError> {
        self.read(move |c| reader::uplink_cursor(c, name)).await
    }

    /// Asks the writer to commit what is queued and stop. Later writes fail with
    /// [`StoreError::Closed`].
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }

    /// Runs a query on a read-only connection off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let permit = readers
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let result = readers.with(query);
            drop(permit);
            result
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// One sensor, if it exists.
    pub async fn sensor(&self, id: i64) -> Result<Option<Sensor>, StoreError> {
        self.read(move |c| reader::sensor(c, id)).await
    }

    /// The first sensor with this name, if any.
    pub async fn sensor_named(&self, name: String) -> Result<Option<Sensor>, StoreError> {
        self.read(move |c| reader::sensor_named(c, &name)).await
    }

    /// A sensor's calibrations, oldest first, each with when it took effect.
    pub async fn calibration_history(
        &self,
        sensor_id: i64,
    ) -> Result<Vec<CalibrationChange>, StoreError> {
        self.read(move |c| reader::calibration_history(c, sensor_id))
            .await
    }

    /// Sensors matching a filter, by id.
    pub async fn sensors(&self, filter: SensorFilter) -> Result<Vec<Sensor>, StoreError> {
        self.read(move |c| reader::sensors(c, &filter)).await
    }

    /// One reading, if it exists.
    pub async fn reading(&self, id: i64) -> Result<Option<Reading>, StoreError> {
        self.read(move |c| reader::reading(c, id)).await
    }

    /// Readings matching a filter.
    pub async fn readings(&self, filter: ReadingFilter) -> Result<Vec<Reading>, StoreError> {
        self.read(move |c| reader::readings(c, &filter)).await
    }

    /// Waits for a turn to replay stored events, held while one page is read. However
    /// many clients resume at once, only [`REPLAYING_CLIENTS`] read from the log at a
    /// time, so the cores they take stay bounded and live clients keep their latency;
    /// the others wait, connected, and their live events wait in the log. Each page
    /// waits for a turn again, so clients resuming together take pages in turn and move
    /// through the log side by side, most of them finding the page they need among
    /// those just read (see [`Replaying`]); a client that kept its turn until caught up
    /// read the whole log alone while the others waited (250 clients resuming over
    /// 200,000 events took five times as long to catch up).
    pub async fn replay_turn(&self) -> Result<OwnedSemaphorePermit, StoreError> {
        self.replay_turns
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Counts a feed as replaying until the guard is dropped; see [`Replaying`].
    pub fn replaying(&self) -> Replaying {
        self.replaying.fetch_add(1, AtomicOrdering::Relaxed);
        Replaying {
            count: self.replaying.clone(),
            pages: self.pages.clone(),
            readers: self.readers.clone(),
        }
    }

    /// Stored events with `after < seq <= upto` on `channels`, oldest first: what a
    /// resuming client missed, or that retention removed some of it. Clients resuming
    /// together share the pages they read.
    pub async fn events_after(
        &self,
        after: u64,
        upto: u64,
        channels: Vec<crate::events::Channel>,
        limit: u32,
    ) -> Result<Replay<Arc<crate::events::Event>>, StoreError> {
        if let Some(page) = self.pages.get(after, upto, &channels, limit) {
            return Ok(Replay::Events(page));
        }
        let pages = self.pages.clone();
        self.read(move |c| {
            // Another client may have read the page while this one waited for a reader.
            if let Some(page) = pages.get(after, upto, &channels, limit) {
                return Ok(Replay::Events(page));
            }
            Ok(
                match reader::events_after(c, after, upto, &channels, limit)? {
                    Replay::Events(events) => {
                        let page: Vec<_> = events.into_iter().map(Arc::new).collect();
                        pages.put(after, upto, &channels, limit, &page);
                        Replay::Events(page)
                    }
                    Replay::Removed { oldest_seq } => Replay::Removed { oldest_seq },
                },
            )
        })
        .await
    }

    /// Sensors whose last announcement on `general` was `sensor_offline`.
    pub async fn sensors_told_offline(&self) -> Result<Vec<i64>, StoreError> {
        self.read(reader::told_offline).await
    }

    /// Current sensors and latest readings, consistent with one `seq`.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let max_future = self.max_future;
        self.read(move |c| reader::snapshot(c, max_future)).await
    }

    /// Roll-up buckets of one sensor over a time range.
    pub async fn aggregates(&self, query: AggregateQuery) -> Result<Vec<Aggregate>, StoreError> {
        let open = self.open_buckets.clone();
        self.read(move |c| rollup::aggregates(c, &query, &open))
            .await
    }

    /// Counts for the health endpoint: sensors, readings, last `seq`.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.read(reader::counts).await
    }
}

/// Opens (creating if needed) the database in `storage.data_dir` read-write and migrates
/// it: for the writer, and for the command line's token commands.
pub fn open_database(storage: &StorageConfig) -> Result<Connection, StoreError> {
    let data_dir = &storage.data_dir;
    let path = data_dir.join(DATABASE_FILE);
    // Every failure names the path: "attempt to write a readonly database" alone does
    // not say which directory to fix.
    let at = |e: StoreError| match e {
        e @ StoreError::NewerSchema { .. } => e,
        e if e.is_locked() => StoreError::Locked(path.clone()),
        e => StoreError::Open(path.clone(), Box::new(e)),
    };
    std::fs::create_dir_all(data_dir).map_err(|e| at(StoreError::Io(e)))?;
    let mut conn =
        Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), storage.locking.vfs())
            .map_err(|e| at(e.into()))?;
    configure(&conn, storage.synchronous).map_err(|e| at(e.into()))?;
    schema::migrate(&mut conn).map_err(at)?;
    Ok(conn)
}

/// Opens the database that a daemon created in `data_dir`, as [`open_database`] does,
/// but refuses a directory without one: a mistyped path must not get a new, empty
/// database that no daemon reads.
pub fn open_existing_database(storage: &StorageConfig) -> Result<Connection, StoreError> {
    let path = storage.data_dir.join(DATABASE_FILE);
    if !path.is_file() {
        return Err(StoreError::NoDatabase(path));
    }
    open_database(storage)
}

/// Per-connection settings. WAL lets readers run beside the writer; `synchronous`
/// decides what a power cut may take (see the README's storage section).
fn configure(conn: &Connection, synchronous: Synchronous) -> Result<(), rusqlite::Error> {
    // Small pages for a new database (an existing one keeps its own): a commit writes
    // each page it touched whole, and a few samples touch a few bytes of each.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let level = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", level)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoint less often than SQLite's default 1000 pages: a hot page (a roll-up
    // bucket, the latest reading) rewritten by every commit reaches the card once per
    // checkpoint, so fewer checkpoints mean fewer card writes. The writer's connection
    // hands its checkpoints to a thread of their own (see `checkpointer`).
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    // A WAL that a burst grew past the checkpoint threshold shrinks back to it when it
    // starts over, rather than keeping its largest size for good.
    conn.pragma_update(
        None,
        "journal_size_limit",
        i64::from(WAL_CHECKPOINT_PAGES) * i64::from(PAGE_SIZE),
    )?;
    Ok(())
}

/// Looks through the whole database once, on a thread of its own, for damage that no
/// query has run into yet (a card that lost pages in a power cut): a damaged database
/// must refuse writes from the start, not only once a read happens upon the damage.
/// `quick_check` reads every page once; on a card that is seconds per hundred MiB, spent
/// while the daemon already serves.
fn check_in_background(file: DatabaseFile, health: Arc<WriterHealth>) {
    let check = move || {
        let path = &file.path;
        let started = std::time::Instant::now();
        let found = file.open_reader().and_then(|conn| {
            let mut statement = conn.prepare("PRAGMA quick_check(5)")?;
            let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
            rows.collect::<Result<Vec<_>, _>>()
        });
        match found {
            Ok(rows) if rows == ["ok"] => log::info!(
                "database check found no damage in {:.1} s",
                started.elapsed().as_secs_f64()
            ),
            Ok(rows) => health.mark_damaged(path, &rows.join("; ")),
            Err(e) => {
                if !health.note_damage(path, &e) {
                    log::warn!("database check could not run: {e}");
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("store-check".into())
        .spawn(check)
    {
        log::warn!("database check not started: {e}");
    }
}

/// A feed that reads stored events rather than following the hub (see
/// [`Store::replaying`]).
///
/// When the last of them catches up (or goes), what replaying took goes too: the pages
/// shared by replaying clients and the readers' page caches (up to about 2 MB each),
/// which a room of resuming clients filled from the log and the live clients that stay
/// do not need. A client that replays again later reads its pages anew.
pub struct Replaying {
    count: Arc<AtomicUsize>,
    pages: Arc<ReplayPages>,
    readers: Arc<Readers>,
}

impl Drop for Replaying {
    fn drop(&mut self) {
        let last = self.count.fetch_sub(1, AtomicOrdering::Relaxed) == 1;
        // A feed that found nothing to replay read no pages: the readers keep their
        // caches for the queries of live clients.
        if last && self.pages.clear() {
            self.readers.release_memory();
        }
    }
}

/// Read-only connections. Reads wait for one of [`READERS`] permits before they
/// take a blocking thread, so that however many clients replay at once, the daemon holds
/// that many reader connections (each with its page cache) and threads, not one each.
struct Readers {
    file: DatabaseFile,
    idle: Mutex<Vec<Connection>>,
    /// Told when a query finds the database damaged.
    health: Arc<WriterHealth>,
    permits: Arc<Semaphore>,
}

impl Readers {
    fn with<T>(
        &self,
        query: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.file.open_reader()?,
        };
        let result = query(&conn);
        if let Err(e) = &result {
            self.health.note_damage(&self.file.path, e);
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < READERS {
            idle.push(conn);
        }
        Ok(result?)
    }

    /// Frees what the idle connections' page caches hold; the pages are in the
    /// operating system's cache still, and read again from there when needed.
    fn release_memory(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for conn in &idle {
            if let Err(e) = conn.execute_batch("PRAGMA shrink_memory") {
                log::debug!("a reader's page cache was not freed: {e}");
            }
        }
        let mut kept = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let room = READERS.saturating_sub(kept.len());
        kept.extend(idle.into_iter().take(room));
    }
}

/// The database file and how this process opens it, carried together so that every
/// reader opens it the way the writer did (see [`Locking::vfs`]).
#[derive(Debug, Clone)]
struct DatabaseFile {
    path: PathBuf,
    locking: Locking,
}

impl DatabaseFile {
    /// The database of these settings.
    fn of(storage: &StorageConfig) -> DatabaseFile {
        DatabaseFile {
            path: storage.data_dir.join(DATABASE_FILE),
            locking: storage.locking,
        }
    }

    /// A read-only connection to it.
    fn open_reader(&self) -> Result<Connection, rusqlite::Error> {
        Connection::open_with_flags_and_vfs(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            self.locking.vfs(),
        )
    }
}

/// Counts the samples queued for the writer, and holds source threads back while there
/// are too many. A plain mutex and condition variable: its callers are sensor threads,
/// never the async runtime.
pub(crate) struct SampleGate {
    state: Mutex<GateState>,
    left: Condvar,
    limit: usize,
}

#[derive(Default)]
struct GateState {
    queued: usize,
    /// The writer has stopped, however it stopped: nobody waits any more, and the send
    /// that follows finds the queue closed.
    closed: bool,
}

impl SampleGate {
    fn new(limit: usize) -> SampleGate {
        SampleGate {
            state: Mutex::new(GateState::default()),
            left: Condvar::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `count` more samples fit. A submission larger than the limit goes
    /// in alone, once the queue is empty.
    fn enter(&self, count: usize) {
        let mut state = self.lock();
        while !state.closed && state.queued > 0 && state.queued + count > self.limit {
            state = self.left.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.queued += count;
    }

    /// The writer took `count` samples off the queue.
    pub(crate) fn leave(&self, count: usize) {
        if count == 0 {
            return;
        }
        let mut state = self.lock();
        state.queued = state.queued.saturating_sub(count);
        self.left.notify_all();
    }

    /// The writer has stopped: lets every waiting source go.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.left.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_sample_gate_holds_sources_back_past_its_limit() {
        let gate = Arc::new(SampleGate::new(10));
        gate.enter(8);
        let (entered, told) = std::sync::mpsc::channel();
        let waiting = gate.clone();
        let source = std::thread::spawn(move || {
            waiting.enter(5);
            entered.send(()).unwrap();
        });
        assert!(
            told.recv_timeout(Duration::from_millis(200)).is_err(),
            "8 queued and 5 more is past 10: the source must wait"
        );
        gate.leave(8);
        told.recv_timeout(Duration::from_secs(10))
            .expect("let in once the writer took the first 8");
        source.join().unwrap();
        gate.leave(5);
        gate.enter(50);
        assert_eq!(gate.lock().queued, 50, "alone, a large submission goes in");

        let (entered, told) = std::sync::mpsc::channel();
        let waiting = gate.clone();
        let source = std::thread::spawn(move || {
            waiting.enter(1);
            entered.send(()).unwrap();
        });
        assert!(told.recv_timeout(Duration::from_millis(200)).is_err());
        gate.close();
        told.recv_timeout(Duration::from_secs(10))
            .expect("a writer that stopped holds no source back");
        source.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_feed_to_stop_replaying_lets_go_of_the_shared_pages() {
        let (_dir, store, writer) = open_store(Hub::new(64));
        emit_three(&store).await;
        let general = || vec![Channel::General];
        let cached = |store: &Store| store.pages.get(0, 3, &general(), 10).is_some();

        let first = store.replaying();
        let second = store.replaying();
        let Replay::Events(page) = store.events_after(0, 3, general(), 10).await.unwrap() else {
            panic!("nothing was removed");
        };
        assert_eq!(page.len(), 3);
        assert!(cached(&store), "the page is kept for the next client");
        // Waiting for a turn or paused, a replaying client still counts.
        let turn = store.replay_turn().await.unwrap();
        drop(turn);
        drop(first);
        assert!(cached(&store), "a client still replays: its page stays");
        drop(second);
        assert!(!cached(&store), "nobody replays: the page is let go");

        close_store(store, writer).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_feed_that_catches_up_lets_go_of_the_pages_it_read() {
        let hub = Hub::new(64);
        let (_dir, store, writer) = open_store(hub.clone());
        emit_three_published(&store, &hub).await;
        let general = [Channel::General];

        let mut feed = Feed::new(&hub, store.clone(), Some(0));
        let Ok(Pulled::Events(events)) = feed.next(&general, 10).await else {
            panic!("the three stored events");
        };
        assert_eq!(events.len(), 3);
        assert!(feed.is_replaying());
        let cached = |store: &Store| store.pages.get(0, 3, &general, 10).is_some();
        assert!(cached(&store), "the page read is kept");
        // Caught up, the feed waits for live events: nobody replays any more.
        let live = tokio::time::timeout(Duration::from_millis(200), feed.next(&general, 10));
        assert!(live.await.is_err(), "nothing new was published");
        assert!(!feed.is_replaying());
        assert!(!cached(&store), "the page is let go");

        drop(feed);
        close_store(store, writer).await;
    }

    /// A turn to replay is one page: more feeds than there are turns all get a page
    /// before any takes a second, so that clients resuming together move through the
    /// log side by side and read each other's pages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn feeds_resuming_together_take_pages_in_turn() {
        let hub = Hub::new(64);
        let (_dir, store, writer) = open_store(hub.clone());
        emit_three_published(&store, &hub).await;
        let general = [Channel::General];
        let mut feeds: Vec<Feed> = (0..=REPLAYING_CLIENTS)
            .map(|_| Feed::new(&hub, store.clone(), Some(0)))
            .collect();
        for (n, feed) in feeds.iter_mut().enumerate() {
            let page = tokio::time::timeout(Duration::from_secs(5), feed.next(&general, 1))
                .await
                .unwrap_or_else(|_| panic!("feed {n} waited for a turn the others kept"));
            assert!(matches!(page, Ok(Pulled::Events(e)) if e.len() == 1));
        }
        assert!(feeds.iter().all(Feed::is_replaying));

        drop(feeds);
        close_store(store, writer).await;
    }

    /// Three events, committed and published, so that a feed can replay them.
    async fn emit_three_published(store: &Store, hub: &Hub) {
        let mut published = hub.subscribe();
        emit_three(store).await;
        for _ in 0..3 {
            published.recv().await.unwrap();
        }
    }

    /// A copy holds what was committed when it began, the pages still in the WAL
    /// included, and nothing committed after; it opens as a database without a WAL.
    #[tokio::test]
    async fn a_copy_is_the_snapshot_it_began_with() {
        let (dir, store, writer) = open_store(Hub::new(16));
        emit_three(&store).await;
        let reading = store.clone();
        let copy = tokio::task::spawn_blocking(move || reading.copy_database())
            .await
            .unwrap()
            .unwrap();
        emit_three(&store).await;
        let size = copy.size();
        let bytes = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            copy.write_to(&mut bytes, || false).map(|_| bytes)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(bytes[18..20], [1, 1], "marked as a database without a WAL");
        let path = dir.path().join("copy.db");
        std::fs::write(&path, &bytes).unwrap();
        let copied = Connection::open(&path).unwrap();
        let check: String = copied
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let events: i64 = copied
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(events, 3, "the events of the snapshot, not those after it");
        close_store(store, writer).await;
    }

    /// A copy asks before each page whether to go on, and stops at once when told not.
    #[tokio::test]
    async fn a_copy_stops_when_cancelled() {
        let (_dir, store, writer) = open_store(Hub::new(16));
        let reading = store.clone();
        let (stopped, written) = tokio::task::spawn_blocking(move || {
            let copy = reading.copy_database().unwrap();
            let asked = std::cell::Cell::new(0);
            let mut written = Vec::new();
            let stopped = copy.write_to(&mut written, || {
                asked.set(asked.get() + 1);
                asked.get() > 3
            });
            (stopped, written.len())
        })
        .await
        .unwrap();
        assert!(
            matches!(stopped, Err(StoreError::CopyCancelled)),
            "{stopped:?}"
        );
        assert_eq!(
            written,
            3 * PAGE_SIZE as usize,
            "three pages, then it stopped"
        );
        close_store(store, writer).await;
    }

    /// A store in a new temporary directory, with its default settings.
    fn open_store(hub: Hub) -> (tempfile::TempDir, Store, WriterHandle) {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            data_dir: dir.path().to_owned(),
            ..StorageConfig::default()
        };
        let (store, writer) = Store::open(&config, hub).unwrap();
        (dir, store, writer)
    }

    /// Stops the writer once what is queued is committed.
    async fn close_store(store: Store, writer: WriterHandle) {
        store.close().await;
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
    }

    /// Stores three test events on `general`.
    async fn emit_three(store: &Store) {
        for _ in 0..3 {
            let emission = Emission {
                channel: Channel::General,
                kind: EmissionKind::Test,
                sensor_id: None,
                data: Value::Null,
            };
            store.emit(emission).await.unwrap();
        }
    }
}
