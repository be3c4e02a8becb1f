//! What the writer has done and what fails, for health checks, the watchdog and
//! `/metrics`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::capacity::StorageFigures;
use crate::events::{self, Body, Channel, Event};
use crate::model::{now_micros, Micros};

/// What the writer has done, for health checks, the watchdog and `/metrics`.
#[derive(Debug, Default)]
pub struct WriterHealth {
    /// What storage costs the card: bytes written, space left.
    pub storage: StorageFigures,
    pub(super) commits: AtomicU64,
    /// Commands in committed batches, summed: divided by `commits`, the mean batch size.
    pub(super) batch_commands: AtomicU64,
    /// Time spent in committed transactions, from begin to commit, in microseconds.
    pub(super) commit_micros: AtomicU64,
    /// `seq` of the newest committed event, set before any caller hears of its commit.
    pub(super) committed: AtomicU64,
    pub(super) failure: Mutex<Option<Failure>>,
    /// The run of failed WAL flushes (`synchronous = "normal"`), apart from failed
    /// commits: a commit that works says nothing of the flush that must follow it.
    pub(super) flush_failure: Mutex<Option<Failure>>,
    /// Set for good once SQLite finds the database damaged: what it found and what to do.
    pub(super) damage: Mutex<Option<Failure>>,
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
    pub(super) fn timed(&self, commands: usize, took: Duration) {
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
             Stop sensorgate, then save what can still be read with `sensorgate backup FILE` \
             or, if that fails, with `sqlite3 {path} .recover | sqlite3 FILE`; move the \
             damaged file and its -wal aside and the saved copy to {path}, and start \
             sensorgate again",
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
pub(super) fn note(slot: &Mutex<Option<Failure>>, result: &Result<(), String>) {
    let mut failure = slot.lock().unwrap_or_else(|e| e.into_inner());
    *failure = match result {
        Ok(()) => None,
        Err(e) => Some(Failure {
            error: e.clone(),
            since: failure.as_ref().map_or_else(now_micros, |f| f.since),
        }),
    };
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
        body: Body::Data(data),
        frame: frame.into(),
    })
}
