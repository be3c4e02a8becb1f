//! The writer thread: the only code that writes to the database.
//!
//! It takes the first queued command, then everything else already queued (up to
//! [`MAX_BATCH`]), applies them all in one transaction and commits once: an idle
//! gateway commits each write at once, a busy one amortises the commit over many
//! (group commit). Events are numbered here, stored in the same transaction as the data
//! they describe, and handed to the publisher thread only after the commit succeeded,
//! which announces them once the data is on the card, so no client ever hears of data
//! that a power cut could take back.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{
    params, CachedStatement, Connection, OptionalExtension, Transaction, TransactionBehavior,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::alerts::{self, AlertReceipt, AlertWrite};
use super::capacity::{self, Meter, StorageFigures};
use super::checkpointer::Checkpointer;
use super::publisher::{self, Handover, Publisher, Unpublished};
use super::retention::{self, Retention, SLICE};
use super::rollup::{self, Folded, OpenBuckets, Pending};
use super::{reader, SampleGate, StorageConfig, StoreError, Synchronous};
use crate::events::{self, Channel, Event, Hub};
use crate::model::{
    now_micros, Micros, NewReading, NewSensor, Reading, ReadingPatch, Sample, Sensor, SensorPatch,
};

/// Samples kept in memory while storage fails (a full or read-only card), newest first
/// to survive; a few hours of a small gateway.
const RETRY_SAMPLES: usize = 20_000;

/// How long commits must keep working after a failure before the outage counts as over:
/// on a card that is nearly full, a small commit fits now and then between failures, and
/// each of those must not end one outage and start the next.
const RECOVERY_HOLD: Duration = Duration::from_secs(3);

/// How often the latest value of each sensor and `tipo` is written to its table (see
/// [`write_out_latest`]): what a snapshot folds in from the readings since.
const LATEST_WRITE_INTERVAL: Duration = Duration::from_secs(60);

/// How often the roll-up buckets folded in memory are written to their tables (see
/// [`rollup`]): a restart folds what came since again, so this bounds only that work.
const ROLLUP_WRITE_INTERVAL: Duration = Duration::from_secs(300);

/// Most work gathered into one transaction, in samples and other commands (see
/// [`Command::weight`]); bounds the latency of the batch's first command and the memory
/// of its events.
const MAX_BATCH: usize = 2048;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer is asked to do.
pub(crate) enum Command {
    CreateSensor(NewSensor, Reply<Sensor>),
    UpdateSensor(i64, SensorPatch, Reply<Sensor>),
    DeleteSensor(i64, Reply<Sensor>),
    InsertReading(NewReading, Reply<Reading>),
    UpdateReading(i64, ReadingPatch, Reply<Reading>),
    DeleteReading(i64, Reply<Reading>),
    Emit(Emission, Reply<u64>),
    Samples(Vec<Sample>),
    /// Answered once the batch it arrived in is through: proof the writer is not wedged.
    Ping(oneshot::Sender<()>),
    /// Records a token's last use.
    TouchToken(i64, Micros),
    /// Saves how far an uplink got (its name, the `seq`).
    SaveUplinkCursor(&'static str, u64, Reply<()>),
    /// Alert rows and their events, together (see [`super::alerts`]).
    Alerts(AlertWrite, Reply<AlertReceipt>),
    Shutdown,
}

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

/// What the writer has done, for health checks, the watchdog and `/metrics`.
#[derive(Debug, Default)]
pub struct WriterHealth {
    /// What storage costs the card: bytes written, space left.
    pub storage: StorageFigures,
    commits: AtomicU64,
    /// Commands in committed batches, summed: divided by `commits`, the mean batch size.
    batch_commands: AtomicU64,
    /// Time spent in committed transactions, from begin to commit, in microseconds.
    commit_micros: AtomicU64,
    /// `seq` of the newest committed event, set before any caller hears of its commit.
    committed: AtomicU64,
    failure: Mutex<Option<Failure>>,
    /// The run of failed WAL flushes (`synchronous = "normal"`), apart from failed
    /// commits: a commit that works says nothing of the flush that must follow it.
    flush_failure: Mutex<Option<Failure>>,
    /// Set for good once SQLite finds the database damaged: what it found and what to do.
    damage: Mutex<Option<Failure>>,
}

/// A run of failed commits or flushes: what the latest one said and when the first one
/// failed, so an operator sees since when the card has been refusing writes.
#[derive(Clone, Debug)]
pub struct Failure {
    pub error: String,
    pub since: Micros,
}

impl WriterHealth {
    /// Transactions committed since start.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Commands applied in committed transactions since start.
    pub fn batch_commands(&self) -> u64 {
        self.batch_commands.load(Ordering::Relaxed)
    }

    /// Seconds spent in committed transactions since start.
    pub fn commit_seconds(&self) -> f64 {
        self.commit_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// `seq` of the newest committed event, published or not: a client that connects
    /// after a REST write was answered starts after that write's event.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Counts a committed transaction of `commands` commands that took `took`.
    fn timed(&self, commands: usize, took: Duration) {
        self.batch_commands
            .fetch_add(commands as u64, Ordering::Relaxed);
        self.commit_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Damage found in the database, or else the current run of failed commits, cleared
    /// by the next successful one, or else of failed WAL flushes, cleared by the next
    /// successful flush.
    pub fn failure(&self) -> Option<Failure> {
        let current =
            |slot: &Mutex<Option<Failure>>| slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.damage()
            .or_else(|| current(&self.failure))
            .or_else(|| current(&self.flush_failure))
    }

    /// What SQLite found damaged in the database and what the operator can do, once it
    /// found anything; from then on every write is refused.
    pub fn damage(&self) -> Option<Failure> {
        self.damage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that `database` is damaged, as `found` says, if `found` is the kind of
    /// error that means so; logs it the first time. Returns whether it was.
    pub(super) fn note_damage(&self, database: &Path, found: &rusqlite::Error) -> bool {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match found.sqlite_error_code() {
            Some(DatabaseCorrupt | NotADatabase) => {
                self.mark_damaged(database, &found.to_string());
                true
            }
            _ => false,
        }
    }

    /// Records that `database` is damaged, as `found` says; logs it the first time.
    pub(super) fn mark_damaged(&self, database: &Path, found: &str) {
        let mut damage = self.damage.lock().unwrap_or_else(|e| e.into_inner());
        if damage.is_some() {
            return;
        }
        let error = format!(
            "the database {path} is damaged ({found}); writes are refused until it is replaced. \
             Save what can still be read with `sensorgate backup FILE`, or if that fails with \
             `sqlite3 {path} .recover | sqlite3 FILE`, then stop sensorgate, move the damaged \
             file and its -wal aside and the saved copy to {path}, and start it again",
            path = database.display()
        );
        log::error!("{error}");
        *damage = Some(Failure {
            error,
            since: now_micros(),
        });
    }

    /// Counts a commit, or the run of failed commits it continues (which only
    /// [`WriterHealth::clear_failure`] ends).
    pub(super) fn record(&self, result: &Result<(), String>) {
        match result {
            Ok(()) => drop(self.commits.fetch_add(1, Ordering::Relaxed)),
            Err(_) => note(&self.failure, result),
        }
    }

    /// Commits work again: ends the run of failed commits.
    pub(super) fn clear_failure(&self) {
        note(&self.failure, &Ok(()));
    }

    /// Ends or continues the run of failed WAL flushes.
    pub(super) fn record_flush(&self, result: &Result<(), String>) {
        note(&self.flush_failure, result);
    }
}

/// Clears `slot` on success; on failure keeps the time the run of failures began.
fn note(slot: &Mutex<Option<Failure>>, result: &Result<(), String>) {
    let mut failure = slot.lock().unwrap_or_else(|e| e.into_inner());
    *failure = match result {
        Ok(()) => None,
        Err(e) => Some(Failure {
            error: e.clone(),
            since: failure.as_ref().map_or_else(now_micros, |f| f.since),
        }),
    };
}

/// The running writer thread.
pub struct WriterHandle {
    thread: JoinHandle<()>,
}

impl WriterHandle {
    /// Waits until the writer has committed everything queued before
    /// [`super::Store::close`] and stopped.
    pub fn join(self) {
        if self.thread.join().is_err() {
            log::error!("storage writer thread panicked");
        }
    }
}

/// What the writer keeps up to date for the store's readers.
pub(crate) struct Shared {
    pub(crate) health: Arc<WriterHealth>,
    pub(crate) open: Arc<OpenBuckets>,
}

pub(crate) fn spawn(
    mut conn: Connection,
    checkpoints: Connection,
    queue: mpsc::Receiver<Command>,
    queued: Arc<SampleGate>,
    hub: Hub,
    config: &StorageConfig,
    Shared { health, open }: Shared,
) -> Result<WriterHandle, StoreError> {
    if config.max_database_mb > 0 {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = (config.max_database_mb as i64).saturating_mul(1024 * 1024) / page_size;
        conn.pragma_update(None, "max_page_count", pages)?;
    }
    let wal = config
        .data_dir
        .join(format!("{}-wal", super::DATABASE_FILE));
    if config.synchronous == Synchronous::Normal {
        // A previous run may have stopped between a commit and its flush: what is in the
        // WAL must be on the card before replay may send it.
        match publisher::sync_file(&wal) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(StoreError::Io(e)),
            _ => {}
        }
    }
    let next_seq = last_seq(&conn)? + 1;
    if let Err(e) = fold_unwritten(&conn, &open) {
        // A damaged page must not keep the daemon from serving what can still be read.
        if !health.note_damage(&config.data_dir.join(super::DATABASE_FILE), &e) {
            return Err(e.into());
        }
    }
    hub.start_at(next_seq - 1);
    health.committed.store(next_seq - 1, Ordering::Release);
    let wal = (config.synchronous == Synchronous::Normal).then_some(wal);
    let database = config.data_dir.join(super::DATABASE_FILE);
    let publisher = Publisher::spawn(wal, database, hub, health.clone()).map_err(StoreError::Io)?;
    let checkpointer = Checkpointer::spawn(checkpoints, &mut conn, config.data_dir.clone())?;
    let meter = Meter::new(config, &health.storage);
    let writer = Writer {
        conn,
        database: config.data_dir.join(super::DATABASE_FILE),
        queue,
        queued,
        next_seq,
        retention: Retention::new(config),
        maintenance_every: Duration::from_secs(config.maintenance_interval_s),
        health,
        last_maintenance: Instant::now(),
        retry: VecDeque::new(),
        outage: None,
        meter,
        data_dir: config.data_dir.clone(),
        floor_config: config.clone(),
        timer: tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(StoreError::Io)?,
        publisher,
        checkpointer,
        max_future: (config.max_future_s as Micros).saturating_mul(1_000_000),
        series: HashMap::new(),
        open,
        rollups_written: Instant::now(),
        latest_written: Instant::now(),
        write_rollups: false,
    };
    let thread = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer.run())
        .map_err(StoreError::Io)?;
    Ok(WriterHandle { thread })
}

/// Folds the readings stored after the last write-out of the roll-ups (see
/// [`rollup`]) into the open buckets: what a restart, or a power cut, left unwritten.
fn fold_unwritten(conn: &Connection, open: &OpenBuckets) -> rusqlite::Result<()> {
    let through = reader::meta(conn, "rollups_through")?;
    let mut pending = open.lock();
    let mut rows = conn.prepare(&format!("{} WHERE r.id > ?1", reader::READING_COLUMNS))?;
    let mut folded = 0u64;
    for reading in rows.query_map([through], reader::reading_from_row)? {
        let r = reading?;
        pending.add(r.sensor_id, &r.tipo, r.timestamp, r.valor);
        folded += 1;
    }
    if folded > 0 {
        log::info!("{folded} readings folded into the roll-ups again after a restart");
    }
    Ok(())
}

fn last_seq(conn: &Connection) -> rusqlite::Result<u64> {
    let seq: i64 = conn.query_row(reader::LAST_SEQ, [], |r| r.get(0))?;
    Ok(seq as u64)
}

/// An ongoing storage failure.
struct Outage {
    /// Monotonic: a Pi's wall clock may step by years (NTP's first sync) during an outage.
    since: Instant,
    /// Samples dropped because the retry buffer was full.
    dropped: u64,
    /// The first commit of the current run of successful ones, if the last commit
    /// worked: the outage is over once this run lasts [`RECOVERY_HOLD`].
    working_since: Option<Instant>,
}

struct Writer {
    conn: Connection,
    /// The database file, named when it is found damaged.
    database: PathBuf,
    queue: mpsc::Receiver<Command>,
    /// Told how many samples each batch took off `queue`.
    queued: Arc<SampleGate>,
    next_seq: u64,
    retention: Retention,
    maintenance_every: Duration,
    health: Arc<WriterHealth>,
    /// Samples of failed commits, retried with the next batch.
    retry: VecDeque<Sample>,
    /// Set while storage fails.
    outage: Option<Outage>,
    last_maintenance: Instant,
    /// Announces each commit's events (after flushing the WAL, with `synchronous =
    /// "normal"`).
    publisher: Publisher,
    checkpointer: Checkpointer,
    /// Bytes written and space left; decides how long samples wait for company (the
    /// commit window, widened by a write budget).
    meter: Meter,
    /// Where the database lives, for the free space of its file system.
    data_dir: PathBuf,
    /// The settings of the free-space floor.
    floor_config: StorageConfig,
    /// How far ahead of the clock a latest value may lie before newer-stored readings
    /// replace it (`storage.max_future_s`).
    max_future: Micros,
    /// Series ids by sensor, `tipo`, `unidad` and clock trust, as looked up or created;
    /// forgotten when a commit fails, as the series it created are gone with it.
    series: SeriesIds,
    /// Readings folded into roll-ups since these were last written out.
    open: Arc<OpenBuckets>,
    /// When the roll-ups were last written out.
    rollups_written: Instant,
    /// When the latest values were last written out.
    latest_written: Instant,
    /// Write the roll-ups out with the next commit, whenever it is due or not.
    write_rollups: bool,
    /// Times waits on the queue; the writer is a plain thread.
    timer: tokio::runtime::Runtime,
}

/// A command applied inside the open transaction, whose answer waits for the commit.
enum Done {
    Unit(Reply<()>),
    Sensor(Reply<Sensor>, Result<Sensor, StoreError>),
    Reading(Reply<Reading>, Result<Reading, StoreError>),
    Seq(Reply<u64>, Result<u64, StoreError>),
    Alerts(Reply<AlertReceipt>, AlertReceipt),
    Ping(oneshot::Sender<()>),
    Nothing,
}

impl Done {
    fn send(self) {
        // A caller that gave up waiting (client disconnected) is not the writer's problem.
        match self {
            Done::Unit(reply) => drop(reply.send(Ok(()))),
            Done::Sensor(reply, result) => drop(reply.send(result)),
            Done::Reading(reply, result) => drop(reply.send(result)),
            Done::Seq(reply, result) => drop(reply.send(result)),
            Done::Alerts(reply, receipt) => drop(reply.send(Ok(receipt))),
            Done::Ping(reply) => drop(reply.send(())),
            Done::Nothing => {}
        }
    }

    /// Replaces a successful answer with the reason the batch was not committed.
    fn fail(self, why: &str) {
        let err = || StoreError::Aborted(why.to_owned());
        match self {
            Done::Unit(reply) => drop(reply.send(Err(err()))),
            Done::Sensor(reply, _) => drop(reply.send(Err(err()))),
            Done::Reading(reply, _) => drop(reply.send(Err(err()))),
            Done::Seq(reply, _) => drop(reply.send(Err(err()))),
            Done::Alerts(reply, _) => drop(reply.send(Err(err()))),
            // The writer is alive even when a commit fails (a full disk): answer.
            Done::Ping(reply) => drop(reply.send(())),
            Done::Nothing => {}
        }
    }
}

impl Command {
    /// What the command counts for against [`MAX_BATCH`]: a submission of samples
    /// counts each sample (a batched source hands over hundreds at once), anything else
    /// counts one.
    fn weight(&self) -> usize {
        match self {
            Command::Samples(samples) => samples.len().max(1),
            _ => 1,
        }
    }

    /// Answers the command with [`StoreError::Damaged`].
    fn refuse(self, damage: &str) {
        let err = || StoreError::Damaged(damage.to_owned());
        match self {
            Command::CreateSensor(_, r)
            | Command::UpdateSensor(_, _, r)
            | Command::DeleteSensor(_, r) => drop(r.send(Err(err()))),
            Command::InsertReading(_, r)
            | Command::UpdateReading(_, _, r)
            | Command::DeleteReading(_, r) => drop(r.send(Err(err()))),
            Command::Emit(_, r) => drop(r.send(Err(err()))),
            Command::SaveUplinkCursor(_, _, r) => drop(r.send(Err(err()))),
            Command::Alerts(_, r) => drop(r.send(Err(err()))),
            Command::Ping(reply) => drop(reply.send(())),
            Command::Samples(_) | Command::TouchToken(..) | Command::Shutdown => {}
        }
    }

    fn abort(self, why: &str) {
        let done = match self {
            Command::CreateSensor(_, r)
            | Command::UpdateSensor(_, _, r)
            | Command::DeleteSensor(_, r) => Done::Sensor(r, Err(StoreError::Closed)),
            Command::InsertReading(_, r)
            | Command::UpdateReading(_, _, r)
            | Command::DeleteReading(_, r) => Done::Reading(r, Err(StoreError::Closed)),
            Command::Emit(_, r) => Done::Seq(r, Err(StoreError::Closed)),
            Command::SaveUplinkCursor(_, _, r) => Done::Unit(r),
            Command::Alerts(_, r) => Done::Alerts(r, AlertReceipt::default()),
            Command::Samples(samples) => {
                log::error!("{} samples not stored: {why}", samples.len());
                Done::Nothing
            }
            Command::Ping(reply) => {
                let _ = reply.send(());
                Done::Nothing
            }
            Command::TouchToken(..) | Command::Shutdown => Done::Nothing,
        };
        done.fail(why);
    }
}

/// Closes the sample gate when the writer's loop ends, by returning or by a panic.
struct CloseOnExit(Arc<SampleGate>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Writer {
    fn run(mut self) {
        self.serve();
        self.write_out_rollups();
        let stopped_at = self.next_seq - 1;
        let Writer {
            mut conn,
            publisher,
            checkpointer,
            ..
        } = self;
        checkpointer.stop(&mut conn);
        publisher.stop();
        if let Err(e) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
            log::warn!("final checkpoint failed: {e}");
        }
        log::info!("storage writer stopped at seq {stopped_at}");
    }

    /// Commits batches until the queue is closed and empty.
    fn serve(&mut self) {
        let _gate = CloseOnExit(self.queued.clone());
        let mut batch = Vec::with_capacity(64);
        while let Some(first) = self.next_command() {
            let mut weight = first.weight();
            batch.push(first);
            while weight < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(command) => {
                        weight += command.weight();
                        batch.push(command);
                    }
                    Err(_) => break,
                }
            }
            self.gather_samples(&mut batch, weight);
            self.queued.leave(
                batch
                    .iter()
                    .map(|c| match c {
                        Command::Samples(samples) => samples.len(),
                        _ => 0,
                    })
                    .sum(),
            );
            if batch.iter().any(|c| matches!(c, Command::Shutdown)) {
                // Take nothing new; what is already queued is still committed below and
                // in the following rounds, until the queue is empty.
                self.queue.close();
            }
            if !self.retry.is_empty() {
                batch.insert(0, Command::Samples(self.retry.drain(..).collect()));
            }
            self.commit(&mut batch);
            self.look_at_costs();
            if self.last_maintenance.elapsed() >= self.maintenance_every {
                self.maintain();
            }
        }
    }

    /// The next command, waiting as long as it takes; while an outage seems over, only
    /// until it has lasted [`RECOVERY_HOLD`], to announce the recovery on time.
    fn next_command(&mut self) -> Option<Command> {
        loop {
            let Some(working_since) = self.outage.as_ref().and_then(|o| o.working_since) else {
                return self.queue.blocking_recv();
            };
            let deadline = tokio::time::Instant::from_std(working_since + RECOVERY_HOLD);
            let queue = &mut self.queue;
            let next = self
                .timer
                .block_on(async { tokio::time::timeout_at(deadline, queue.recv()).await });
            match next {
                Ok(command) => return command,
                Err(_) => self.confirm_recovery(),
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<Command>) {
        if let Some(damage) = self.health.damage() {
            self.refuse(batch, &damage.error);
            return;
        }
        // A reading changed over REST is refolded from the tables, which must then hold
        // every reading's share: the open buckets go out first, in the same transaction.
        let changes_readings = batch
            .iter()
            .any(|c| matches!(c, Command::UpdateReading(..) | Command::DeleteReading(..)));
        let write_latest = changes_readings
            || self.write_rollups
            || self.latest_written.elapsed() >= LATEST_WRITE_INTERVAL;
        let open = self.open.clone();
        let mut writing_out = (changes_readings
            || self.write_rollups
            || self.rollups_written.elapsed() >= ROLLUP_WRITE_INTERVAL)
            .then(|| open.lock());
        let mut done = Vec::with_capacity(batch.len());
        let mut published = Vec::new();
        let first_seq = self.next_seq;
        let mut rollups = Pending::default();
        let mut held = Vec::new();
        let commands = batch.len();
        let started = Instant::now();
        let outcome = (|| -> Result<(), rusqlite::Error> {
            // IMMEDIATE: take the write lock up front, so that another process holding it
            // (a backup, an sqlite3 shell) is waited for, not failed on mid-batch.
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(open) = &writing_out {
                open.flush(&tx)?;
            }
            let mut seq = self.next_seq;
            let mut step = Step {
                tx: &tx,
                readings: ReadingInserts::prepare(&tx)?,
                seq: &mut seq,
                events: &mut published,
                rollups: &mut rollups,
                held: &mut held,
                series: &mut self.series,
                max_future: self.max_future,
                now: now_micros(),
            };
            let mut commands = batch.drain(..);
            for command in commands.by_ref() {
                step.now = now_micros();
                match step.apply(command) {
                    Ok(d) => done.push(d),
                    Err(e) => {
                        let why = e.to_string();
                        for command in commands {
                            match command {
                                Command::Samples(samples) => step.held.extend(samples),
                                other => other.abort(&why),
                            }
                        }
                        return Err(e);
                    }
                }
            }
            drop(commands);
            step.readings.write_seconds()?;
            drop(step);
            if write_latest {
                write_out_latest(&tx, seq as i64 - 1, self.max_future)?;
            }
            if writing_out.is_some() {
                rollups.flush(&tx)?;
                tx.execute(
                    "UPDATE store_meta SET value = ?1 WHERE key = 'rollups_through'",
                    [seq as i64 - 1],
                )?;
            }
            tx.commit()?;
            self.next_seq = seq;
            Ok(())
        })();
        let outcome = outcome.map_err(|e| {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                self.make_room();
            }
            self.health.note_damage(&self.database, &e);
            e.to_string()
        });
        self.health.record(&outcome);
        if write_latest && outcome.is_ok() {
            self.latest_written = Instant::now();
        }
        match &mut writing_out {
            Some(open) if outcome.is_ok() => {
                open.clear();
                self.rollups_written = Instant::now();
                self.write_rollups = false;
            }
            Some(_) => {}
            None if outcome.is_ok() => open.lock().merge(rollups),
            None => {}
        }
        drop(writing_out);
        if outcome.is_err() {
            self.series.clear();
        }
        match outcome {
            Ok(()) => {
                self.health.timed(commands, started.elapsed());
                self.health
                    .committed
                    .store(self.next_seq - 1, Ordering::Release);
                // Answers before events: publishing wakes every session, and the callers
                // woken after them would wait behind them all for a worker. A ping is
                // answered last, as its promise is that everything before it is out.
                let mut pings = Vec::new();
                for answer in done {
                    match answer {
                        Done::Ping(reply) => pings.push(reply),
                        answer => answer.send(),
                    }
                }
                self.publisher.send(Handover::Committed(published, pings));
                match &mut self.outage {
                    None => self.health.clear_failure(),
                    Some(outage) => {
                        outage.working_since.get_or_insert_with(Instant::now);
                        self.confirm_recovery();
                    }
                }
            }
            Err(why) => {
                self.next_seq = first_seq;
                done.into_iter().for_each(|d| d.fail(&why));
                // Commands not reached (the transaction could not even begin).
                for command in batch.drain(..) {
                    match command {
                        Command::Samples(samples) => held.extend(samples),
                        other => other.abort(&why),
                    }
                }
                self.keep_for_retry(held);
                self.degraded(&why);
            }
        }
    }

    /// The card is full: copies the WAL back and truncates it, which frees its space
    /// whenever the database has room for the copied pages, so that the next attempt
    /// may fit.
    fn make_room(&mut self) {
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            }) {
            Ok(0) => log::info!("storage full: the WAL was copied back and truncated"),
            Ok(_) => log::debug!("storage full: the WAL could not be truncated yet"),
            Err(e) => log::debug!("storage full: checkpoint failed: {e}"),
        }
    }

    /// Answers every write of `batch` with the damage found in the database: writing on
    /// would build on pages that SQLite cannot read. Samples are dropped (and counted):
    /// kept for a retry they would only be refused again.
    fn refuse(&mut self, batch: &mut Vec<Command>, damage: &str) {
        self.degraded(damage);
        let mut dropped = 0;
        for command in batch.drain(..) {
            match command {
                Command::Samples(samples) => dropped += samples.len(),
                other => other.refuse(damage),
            }
        }
        dropped += self.retry.len();
        self.retry.clear();
        if let Some(outage) = &mut self.outage {
            outage.dropped += dropped as u64;
        }
    }

    /// Waits up to the commit window for more samples when the batch holds nothing else,
    /// so that a gateway sampling a few sensors every few seconds commits once a window
    /// rather than once a sample: the pages every commit rewrites (the last page of the
    /// readings and of their seconds, the first page) reach the card once for many
    /// samples. The window is the configured one, or wider under a write budget (see
    /// [`Meter`]). A token's "last
    /// used" time waits with them; anything else (a REST write, the watchdog's ping,
    /// shutdown) ends the wait. `weight` is what the batch counts for so far.
    fn gather_samples(&mut self, batch: &mut Vec<Command>, mut weight: usize) {
        let may_wait = |c: &Command| matches!(c, Command::Samples(_) | Command::TouchToken(..));
        let window = self.meter.window();
        if window.is_zero() {
            return;
        }
        if !batch.iter().all(may_wait) {
            return;
        }
        let deadline = tokio::time::Instant::now() + window;
        while weight < MAX_BATCH {
            let queue = &mut self.queue;
            let next = self
                .timer
                .block_on(async { tokio::time::timeout_at(deadline, queue.recv()).await });
            let Ok(Some(command)) = next else {
                break;
            };
            let waits = may_wait(&command);
            weight += command.weight();
            batch.push(command);
            if !waits {
                break;
            }
        }
    }

    /// Keeps the newest samples of a failed commit for the next attempt, within
    /// [`RETRY_SAMPLES`]: a full or read-only card costs the oldest samples, never memory.
    fn keep_for_retry(&mut self, samples: Vec<Sample>) {
        self.retry.extend(samples);
        let excess = self.retry.len().saturating_sub(RETRY_SAMPLES);
        if excess > 0 {
            self.retry.drain(..excess);
            if let Some(outage) = &mut self.outage {
                outage.dropped += excess as u64;
            }
        }
    }

    /// Storage just failed (or failed again): tell clients once per outage. The notice
    /// cannot be stored, so it goes out live only, with `seq` 0.
    fn degraded(&mut self, why: &str) {
        if let Some(outage) = &mut self.outage {
            // Still the same outage, however many commits fitted in between.
            outage.working_since = None;
            return;
        }
        log::error!(
            "storage failing, keeping up to {RETRY_SAMPLES} newest samples in memory: {why}"
        );
        self.outage = Some(Outage {
            since: Instant::now(),
            dropped: 0,
            working_since: None,
        });
        // Through the publisher: events of earlier commits go out before the notice,
        // when they can.
        self.publisher
            .send(Handover::Notice(outage_notice(why, self.retry.len())));
    }

    /// Ends the outage once commits have kept working for [`RECOVERY_HOLD`].
    fn confirm_recovery(&mut self) {
        let held = |o: &Outage| {
            o.working_since
                .is_some_and(|t| t.elapsed() >= RECOVERY_HOLD)
        };
        if self.outage.as_ref().is_some_and(held) {
            if let Some(outage) = self.outage.take() {
                self.health.clear_failure();
                self.recovered(outage);
            }
        }
    }

    /// Storage works again after an outage: a stored event says how long it lasted, from
    /// the first failed commit to the first of those that kept working, and what was lost.
    fn recovered(&mut self, outage: Outage) {
        let ended = outage.working_since.unwrap_or_else(Instant::now);
        let seconds = ended.duration_since(outage.since).as_secs_f64();
        log::info!(
            "storage writable again after {seconds:.0} s; {} samples were dropped",
            outage.dropped
        );
        let (reply, _) = oneshot::channel();
        let emission = Emission {
            channel: Channel::General,
            kind: EmissionKind::System("storage_recovered".into()),
            sensor_id: None,
            data: serde_json::json!({"outage_s": seconds, "dropped_samples": outage.dropped}),
        };
        self.commit(&mut vec![Command::Emit(emission, reply)]);
    }

    /// Samples bytes written and space left (at most once a second), which steers the
    /// commit window by the write budget.
    fn look_at_costs(&mut self) {
        if !self.meter.due() {
            return;
        }
        let space = self.free_space();
        let used = database_bytes(&self.conn).map_or(0, |(used, _)| used);
        self.meter.look(&self.health.storage, used, space);
    }

    /// Free bytes of the database's file system and the floor the database leaves there,
    /// where the file system says.
    fn free_space(&self) -> Option<(u64, u64)> {
        capacity::file_system_space(&self.data_dir)
            .map(|(free, total)| (free, capacity::free_space_floor(&self.floor_config, total)))
    }

    /// Keeps the database from taking its file system below the free-space floor: while
    /// the free space, with the free pages inside the database that new rows reuse, lies
    /// below it, each pass removes a slice of the oldest raw readings (roll-ups stay) and
    /// says so with a `storage_pruned` event. Returns whether more may be due.
    fn keep_free_space_floor(&mut self) -> bool {
        let Some((free, floor)) = self.free_space() else {
            return false;
        };
        let reusable = database_bytes(&self.conn).map_or(0, |(_, free_pages)| free_pages);
        if floor == 0 || free.saturating_add(reusable) >= floor {
            return false;
        }
        // Only readings the stored roll-ups count are removed: those are written out first.
        self.write_out_rollups();
        let removed = match retention::remove_oldest_stored(&self.conn, SLICE) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("removing the oldest readings to keep free space failed: {e}");
                return false;
            }
        };
        if removed == 0 {
            return false;
        }
        self.health.storage.count_pruned(removed as u64);
        log::warn!(
            "{free} bytes free, below the floor of {floor}: removed the {removed} oldest raw readings"
        );
        let oldest = self
            .conn
            .query_row(
                &format!(
                    "{} ORDER BY m.second, r.ts LIMIT 1",
                    reader::READINGS_BY_SECOND
                ),
                [],
                reader::reading_from_row,
            )
            .optional()
            .ok()
            .flatten()
            .map(|r| crate::model::format_time(r.timestamp));
        let (reply, _) = oneshot::channel();
        let emission = Emission {
            channel: Channel::General,
            kind: EmissionKind::System("storage_pruned".into()),
            sensor_id: None,
            data: serde_json::json!({
                "removed_readings": removed,
                "oldest_reading": oldest,
                "free_bytes": free,
                "floor_bytes": floor,
            }),
        };
        self.commit(&mut vec![Command::Emit(emission, reply)]);
        true
    }

    /// Writes the open roll-up buckets to their tables now, in a commit of their own.
    fn write_out_rollups(&mut self) {
        if self.open.lock().is_empty() || self.health.damage().is_some() {
            return;
        }
        self.write_rollups = true;
        self.commit(&mut Vec::new());
    }

    /// Retention in small slices (see [`Retention`]) and the free-space floor.
    fn maintain(&mut self) {
        self.last_maintenance = Instant::now();
        if self.health.damage().is_some() {
            // Deleting rows rewrites pages that may be the damaged ones.
            return;
        }
        if self.rollups_written.elapsed() >= ROLLUP_WRITE_INTERVAL {
            // A quiet gateway has no commit to write them out with.
            self.write_out_rollups();
        }
        let now = now_micros();
        self.retention.prune_open(&mut self.open.lock(), now);
        // Retention removes only readings the stored roll-ups count: where it has some
        // to remove that are folded in memory only (a sample that came late), those go
        // out first.
        let due = self.retention.readings_cutoff(now);
        if due.is_some_and(|cutoff| self.open.lock().starts_before(cutoff)) {
            self.write_out_rollups();
        }
        let mut behind = self.keep_free_space_floor();
        for (what, outcome) in self
            .retention
            .sweep(&self.conn, now_micros(), self.next_seq - 1)
        {
            match outcome {
                Ok(0) => {}
                Ok(n) => {
                    behind |= n as i64 == SLICE;
                    log::debug!("retention removed {n} rows: {what}");
                }
                Err(e) => log::warn!("retention of {what} failed: {e}"),
            }
        }
        // No checkpoint here: each one writes the pages every commit touches (the first
        // page, the B-trees' inner pages) to the card once more, so the WAL is copied
        // back only once it reaches its threshold.
        if behind {
            // More is due than one slice: come back after a second, not a whole interval.
            self.last_maintenance -= self
                .maintenance_every
                .saturating_sub(Duration::from_secs(1));
        }
    }
}

/// Bytes the database uses in its pages, and bytes of its free pages (which new rows
/// take before the file grows).
fn database_bytes(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0));
    let (pages, free, size) = (
        pragma("page_count")?,
        pragma("freelist_count")?,
        pragma("page_size")?,
    );
    Ok((
        ((pages - free) * size).max(0) as u64,
        (free * size).max(0) as u64,
    ))
}

/// The live-only notice (`seq` 0, it cannot be stored) that storage fails, with the
/// samples kept in memory meanwhile.
pub(super) fn outage_notice(why: &str, buffered_samples: usize) -> Arc<Event> {
    let data = serde_json::json!({"error": why, "buffered_samples": buffered_samples});
    let frame = events::system_frame("storage_degraded", &data, now_micros(), 0);
    Arc::new(Event {
        seq: 0,
        channel: Channel::General,
        event_type: "storage_degraded".into(),
        sensor_id: None,
        tipo: None,
        frame: frame.into(),
    })
}

/// Applies the batch's commands inside its transaction.
struct Step<'a> {
    tx: &'a Transaction<'a>,
    readings: ReadingInserts<'a>,
    seq: &'a mut u64,
    events: &'a mut Vec<Unpublished>,
    rollups: &'a mut Pending,
    /// Samples of this transaction, kept until it commits so that a failed
    /// commit can retry them.
    held: &'a mut Vec<Sample>,
    series: &'a mut SeriesIds,
    /// See [`Writer::max_future`].
    max_future: Micros,
    now: Micros,
}

impl Step<'_> {
    fn apply(&mut self, command: Command) -> Result<Done, rusqlite::Error> {
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
                self.tx
                    .prepare_cached("UPDATE tokens SET last_used_at = ?2 WHERE id = ?1")?
                    .execute(params![id, at])?;
                Done::Nothing
            }
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

    fn insert_samples(&mut self, samples: &[Sample]) -> Result<(), rusqlite::Error> {
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
    fn record(
        &mut self,
        channel: Channel,
        event_type: &str,
        sensor_id: Option<i64>,
        tipo: Option<&str>,
        frame: String,
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
            frame: frame.into(),
        })));
        Ok(seq)
    }

    /// Takes the next `seq` for a reading just stored with it as its id: the reading's
    /// row is its `created` event (see [`reader::events_after`]).
    fn record_reading(&mut self, reading: Reading) {
        let seq = *self.seq;
        debug_assert_eq!(reading.id as u64, seq);
        *self.seq += 1;
        self.events.push(Unpublished::Reading { reading, seq });
    }

    fn sensor_event(
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
        )?;
        Ok(())
    }

    fn create_sensor(&mut self, new: NewSensor) -> Result<Sensor, rusqlite::Error> {
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

    fn update_sensor(
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
    fn record_calibration(&mut self, sensor: &Sensor) -> Result<(), rusqlite::Error> {
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

    fn delete_sensor(&mut self, id: i64) -> Result<Result<Sensor, StoreError>, rusqlite::Error> {
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

    fn update_reading(
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
        self.readings.note_moved(reading.timestamp, id);
        self.derived_after_change(&old, Some(&reading))?;
        let frame =
            events::reading_change_frame("updated", &reading, &changed, self.now, *self.seq);
        self.record(
            Channel::Readings,
            "updated",
            Some(reading.sensor_id),
            Some(&reading.tipo),
            frame,
        )?;
        Ok(Ok(reading))
    }

    fn delete_reading(&mut self, id: i64) -> Result<Result<Reading, StoreError>, rusqlite::Error> {
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
        let frame = events::reading_change_frame("deleted", &reading, &[], self.now, *self.seq);
        self.record(
            Channel::Readings,
            "deleted",
            Some(reading.sensor_id),
            Some(&reading.tipo),
            frame,
        )?;
        Ok(Ok(reading))
    }

    /// Brings roll-ups and latest values in line with a reading changed from `old` to
    /// `new`, or deleted, whose raw row is written already. What this batch stored before
    /// is written out first, so that both are computed from the tables alone.
    fn derived_after_change(
        &mut self,
        old: &Reading,
        new: Option<&Reading>,
    ) -> rusqlite::Result<()> {
        self.readings.write_seconds()?;
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
    fn store_reading(
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
    fn series_of(
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

    fn emit(&mut self, emission: Emission) -> Result<u64, rusqlite::Error> {
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
        )
    }
}

/// Brings the `latest_readings` table up to the reading with id `through`: folds in the
/// readings stored since it was last written (a commit would otherwise rewrite its page
/// every time), as [`reader::snapshot`] does on reading it.
fn write_out_latest(
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
fn refresh_latest(
    tx: &Transaction<'_>,
    sensor_id: i64,
    tipo: &str,
    horizon: Micros,
) -> rusqlite::Result<()> {
    let newest_until = |until: Micros| -> rusqlite::Result<Option<(i64, Micros)>> {
        tx.prepare_cached(
            "SELECT r.id, r.ts FROM reading_seconds m CROSS JOIN reading_rows r \
             CROSS JOIN series s WHERE r.id BETWEEN m.first_id AND m.last_id \
             AND r.ts / 1000000 = m.second AND s.id = r.series \
             AND s.sensor_id = ?1 AND s.tipo = ?2 AND m.second <= ?3 / 1000000 \
             AND r.ts <= ?3 ORDER BY m.second DESC, r.ts DESC, r.id DESC LIMIT 1",
        )?
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
struct ReadingInserts<'tx> {
    tx: &'tx Transaction<'tx>,
    row: CachedStatement<'tx>,
    /// The id range of each second of sample time in this transaction, written to
    /// `reading_seconds` once (see [`ReadingInserts::write_seconds`]).
    seconds: HashMap<i64, (i64, i64)>,
    /// Readings of earlier transactions moved to another second (over REST).
    moved: Vec<(i64, i64)>,
}

/// How far past the end of its second's last range a reading may lie and still extend
/// it, in ids: what a query of that second reads of other seconds' readings.
const SECOND_RANGE_GAP: i64 = 256;

impl<'tx> ReadingInserts<'tx> {
    fn prepare(tx: &'tx Transaction<'tx>) -> rusqlite::Result<Self> {
        Ok(ReadingInserts {
            tx,
            row: tx.prepare_cached(
                "INSERT INTO reading_rows (id, series, ts, valor) VALUES (?1, ?2, ?3, ?4)",
            )?,
            seconds: HashMap::new(),
            moved: Vec::new(),
        })
    }

    /// Stores a reading's row; its second's id range is written with the others.
    fn insert(
        &mut self,
        id: i64,
        series: i64,
        taken_at: Micros,
        valor: f64,
    ) -> rusqlite::Result<()> {
        self.row.execute(params![id, series, taken_at, valor])?;
        self.note_second(taken_at, id);
        Ok(())
    }

    /// `id`, new in this transaction, was taken in the second of `taken_at` (as SQLite
    /// divides, towards zero).
    fn note_second(&mut self, taken_at: Micros, id: i64) {
        let range = self.seconds.entry(taken_at / 1_000_000).or_insert((id, id));
        range.0 = range.0.min(id);
        range.1 = range.1.max(id);
    }

    /// The stored reading `id` now lies in the second of `taken_at`.
    fn note_moved(&mut self, taken_at: Micros, id: i64) {
        self.moved.push((taken_at / 1_000_000, id));
    }

    /// Records the ids of this transaction's readings in their seconds' ranges: each
    /// second's range extends its last one where that ends close enough before it, or
    /// starts one of its own. Ids of this transaction lie above every stored one.
    fn write_seconds(&mut self) -> rusqlite::Result<()> {
        let mut last_range = self.tx.prepare_cached(
            "SELECT first_id, last_id FROM reading_seconds WHERE second = ?1 \
             ORDER BY first_id DESC LIMIT 1",
        )?;
        let mut extend = self.tx.prepare_cached(
            "UPDATE reading_seconds SET last_id = ?3 WHERE second = ?1 AND first_id = ?2",
        )?;
        let mut start = self.tx.prepare_cached(
            "INSERT INTO reading_seconds (second, first_id, last_id) VALUES (?1, ?2, ?3)",
        )?;
        for (second, (first, last)) in self.seconds.drain() {
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
        let mut covered = self.tx.prepare_cached(
            "SELECT 1 FROM reading_seconds WHERE second = ?1 AND first_id <= ?2 AND last_id >= ?2",
        )?;
        for (second, id) in self.moved.drain(..) {
            if !covered.exists(params![second, id])? {
                start.execute(params![second, id, id])?;
            }
        }
        Ok(())
    }
}

/// Series ids known to the writer, by sensor; a sensor has a few.
type SeriesIds = HashMap<i64, Vec<SeriesId>>;

struct SeriesId {
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
struct NewestReadings {
    by_sensor: HashMap<i64, Vec<Newest>>,
    max_future: Micros,
}

struct Newest {
    tipo: String,
    reading_id: i64,
    taken_at: Micros,
}

impl NewestReadings {
    fn new(max_future: Micros) -> NewestReadings {
        NewestReadings {
            by_sensor: HashMap::new(),
            max_future,
        }
    }

    /// A reading stored since the table was written, looked at `now`; of two taken at
    /// the same moment the later stored wins, as in the upsert.
    fn add(&mut self, sensor_id: i64, tipo: &str, reading_id: i64, taken_at: Micros, now: Micros) {
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
    fn flush(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
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
fn stored_derived(derivados: &[crate::model::Derived]) -> Option<String> {
    (!derivados.is_empty()).then(|| serde_json::to_string(derivados).unwrap_or_default())
}
