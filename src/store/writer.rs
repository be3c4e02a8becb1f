//! The writer thread: the only code that writes to the database.
//!
//! It takes the first queued command, then everything else already queued (up to
//! [`MAX_BATCH`]), applies them all in one transaction and commits once: an idle
//! gateway commits each write at once, a busy one amortises the commit over many
//! (group commit). Events are numbered here, stored in the same transaction as the data
//! they describe, and handed to the publisher thread only after the commit succeeded,
//! which announces them once the data is on the card, so no client ever hears of data
//! that a power cut could take back.
//!
//! The SQL of each command is in [`super::step`], the commands and their answers in
//! [`super::command`], what the writer reports of itself in [`super::health`].

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::capacity::{self, Meter};
use super::checkpointer::Checkpointer;
use super::command::{Command, Done};
use super::health::{outage_notice, WriterHealth};
use super::publisher::{self, Handover, Publisher};
use super::retention::{self, Retention, SLICE};
use super::rollup::{OpenBuckets, Pending};
use super::seconds;
use super::step::{write_out_latest, ReadingInserts, SeriesIds, Step};
use super::{
    reader, ReadingFilter, ReadingOrder, SampleGate, StorageConfig, StoreError, Synchronous,
};
use super::{Emission, EmissionKind};
use crate::events::{Channel, Hub};
use crate::model::{now_micros, Micros, Sample};

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

/// `seq`s stored past the indexed seconds (see [`seconds`]) beyond which the next commit
/// indexes them ahead of the roll-ups: a query by time reads those readings by id, and
/// sorts them. A gateway reaches [`ROLLUP_WRITE_INTERVAL`] long before; a burst of
/// ingest would otherwise leave minutes of it, millions of readings, to read for each
/// query. One commit may add a batch's worth past it.
const UNINDEXED_MAX: u64 = 50_000;

/// Most work gathered into one transaction, in samples and other commands (see
/// [`Command::weight`]); bounds the latency of the batch's first command and the memory
/// of its events.
const MAX_BATCH: usize = 2048;

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
    let indexed_through = reader::meta(&conn, "seconds_through")? as u64;
    if let Err(e) = fold_unwritten(&conn, &open) {
        // A damaged page must not keep the daemon from serving what can still be read.
        if !health.note_damage(&config.data_dir.join(super::DATABASE_FILE), &e) {
            return Err(e.into());
        }
    }
    hub.start_at(next_seq - 1);
    health.committed.store(next_seq - 1, Ordering::Release);
    let wal = (config.synchronous == Synchronous::Normal).then_some(wal);
    let database = super::DatabaseFile::of(config);
    let publisher = Publisher::spawn(wal, database, hub, health.clone()).map_err(StoreError::Io)?;
    let checkpointer = Checkpointer::spawn(checkpoints, &mut conn, config.data_dir.clone())?;
    let meter = Meter::new(config, &health.storage);
    let writer = Writer {
        conn,
        database: config.data_dir.join(super::DATABASE_FILE),
        queue,
        queued,
        next_seq,
        indexed_through,
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
    /// The newest `seq` whose reading, if it is one, `reading_seconds` covers.
    indexed_through: u64,
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
        let index_seconds = writing_out.is_some()
            || self.next_seq.saturating_sub(self.indexed_through) > UNINDEXED_MAX;
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
            drop(step);
            if write_latest {
                write_out_latest(&tx, seq as i64 - 1, self.max_future)?;
            }
            if index_seconds {
                seconds::index_readings(&tx, seq as i64 - 1)?;
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
        if index_seconds && outcome.is_ok() {
            self.indexed_through = self.next_seq - 1;
        }
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
    /// rather than once a sample: the pages every commit rewrites (the last pages of the
    /// readings, the first page) reach the card once for many samples. The window is the
    /// configured one, or wider under a write budget (see [`Meter`]). A token's "last
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
        let oldest = reader::readings(
            &self.conn,
            &ReadingFilter {
                limit: 1,
                order: ReadingOrder::Asc,
                ..ReadingFilter::default()
            },
        )
        .ok()
        .and_then(|found| found.into_iter().next())
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

    /// Writes the open roll-up buckets to their tables, and the seconds of the readings
    /// since, now, in a commit of their own.
    fn write_out_rollups(&mut self) {
        let nothing_open = self.open.lock().is_empty() && self.indexed_through + 1 == self.next_seq;
        if nothing_open || self.health.damage().is_some() {
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
