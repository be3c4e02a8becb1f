//! The checkpointer thread: copies the WAL back into the database file.
//!
//! A checkpoint writes the WAL's pages into the database and flushes it, tens of
//! milliseconds on a card. SQLite's automatic checkpoint runs inside the commit that
//! crosses its threshold, on the writer thread, so every command queued behind that
//! commit waited for it. This thread checkpoints beside the writer instead, on a
//! connection of its own (it writes no rows), when the writer's WAL hook reports
//! [`WAL_CHECKPOINT_PAGES`] or more.
//!
//! The WAL starts over from its beginning only when a write transaction begins with
//! everything in it copied, which a writer that keeps committing never finds, as commits
//! land while this thread copies; checkpointing again and again would only write the
//! same hot pages to the card again. So once this thread has copied the bulk, the writer
//! copies the rest itself, between two transactions, at its next commit: a few pages,
//! after which its next transaction starts the WAL over. Should that fail (a reader still
//! using the WAL), the writer checkpoints after every commit once the WAL reaches
//! [`WAL_LIMIT_PAGES`], waiting for a checkpoint under way (SQLite refuses two at once).
//!
//! On a small file system (or under a file size limit) the WAL must not take the space
//! the database needs: the writer also checkpoints, and truncates the WAL to nothing,
//! once the WAL is as large as the room it has left to grow.

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::Connection;

use super::{StoreError, WAL_CHECKPOINT_PAGES};

/// WAL pages past which the writer checkpoints itself (8 MiB of 1 KiB pages, 32 MiB of
/// an older database's 4 KiB ones): under a sustained burst
/// the WAL stays below about twice the checkpoint threshold.
const WAL_LIMIT_PAGES: u32 = 2 * WAL_CHECKPOINT_PAGES;

/// The running checkpointer thread and the way to ask it for a checkpoint.
pub(super) struct Checkpointer {
    requests: SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Starts the thread on `conn` and makes `writer`'s commits ask it for checkpoints,
    /// in place of SQLite's automatic ones. The WAL lives in `data_dir`.
    pub(super) fn spawn(
        conn: Connection,
        writer: &mut Connection,
        data_dir: PathBuf,
    ) -> Result<Self, StoreError> {
        // One request waiting is enough: it checkpoints everything committed by then.
        let (requests, received) = mpsc::sync_channel(1);
        let from_commits = requests.clone();
        // Held by whoever checkpoints, this thread or the writer.
        let turn = Arc::new(Mutex::new(()));
        let writers_turn = turn.clone();
        // Set by this thread after each checkpoint: the bulk is copied.
        let copied = Arc::new(AtomicBool::new(false));
        let bulk_copied = copied.clone();
        // Whether this WAL, since it last started over, was handed to this thread.
        let mut requested = false;
        // Short of room: truncations so far, and when to try again after one that a
        // reader held up (it waited for the busy timeout; the next commits must not).
        let mut truncations = 0u64;
        let mut truncate_after: Option<Instant> = None;
        writer.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
            let pages = u32::try_from(pages).unwrap_or(0);
            let wal_bytes = u64::from(pages) * PAGE_BYTES;
            let may_truncate = truncate_after.is_none_or(|at| Instant::now() >= at);
            if may_truncate && wal_bytes >= room_to_grow(&data_dir, wal_bytes) {
                let _turn = writers_turn.lock().unwrap_or_else(|e| e.into_inner());
                // TRUNCATE: the WAL's file shrinks to nothing, giving its space back.
                match wal.checkpoint_v2(CheckpointMode::TRUNCATE) {
                    Ok(_) => {
                        truncations += 1;
                        truncate_after = None;
                        // Said once; on a small card it happens every few megabytes.
                        let level = match truncations {
                            1 => log::Level::Info,
                            _ => log::Level::Debug,
                        };
                        log::log!(
                            level,
                            "space for the database runs short: the WAL ({pages} pages) was copied back and truncated, as it will be whenever it reaches the room left"
                        );
                    }
                    Err(e) => {
                        truncate_after = Some(Instant::now() + TRUNCATE_RETRY);
                        log::warn!(
                            "space for the database runs short; a checkpoint of the WAL ({pages} pages) failed: {e}"
                        );
                    }
                }
                requested = false;
                bulk_copied.store(false, Ordering::Relaxed);
            } else if pages < WAL_CHECKPOINT_PAGES {
                requested = false;
                bulk_copied.store(false, Ordering::Relaxed);
            } else if pages >= WAL_LIMIT_PAGES || bulk_copied.swap(false, Ordering::Relaxed) {
                let _turn = writers_turn.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = wal.checkpoint() {
                    log::warn!("checkpoint of a WAL of {pages} pages failed: {e}");
                }
            } else if !requested {
                requested = true;
                request(&from_commits);
            }
            Ok(())
        }))?;
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || run(&conn, &received, &turn, &copied))
            .map_err(StoreError::Io)?;
        Ok(Checkpointer { requests, thread })
    }

    /// Removes the writer's hook, lets a checkpoint under way finish and stops the thread.
    pub(super) fn stop(self, writer: &mut Connection) {
        type Hook = fn(&mut Wal, c_int) -> rusqlite::Result<()>;
        if let Err(e) = writer.wal_hook(None::<Hook>) {
            log::warn!("removing the WAL hook failed: {e}");
        }
        drop(self.requests);
        if self.thread.join().is_err() {
            log::error!("storage checkpoint thread panicked");
        }
    }
}

/// How long the writer leaves the WAL alone after a truncation that could not finish (a
/// reader was still using the WAL).
const TRUNCATE_RETRY: Duration = Duration::from_secs(5);

/// WAL frames are pages of at most this size (a database made before sensorgate chose
/// 1 KiB pages keeps SQLite's default 4 KiB) plus a 24-byte header.
const PAGE_BYTES: u64 = 4096 + 24;

/// Bytes a WAL of `wal_bytes` in `dir` can still grow by: the free space of its file
/// system, and no more than the process's file size limit (`RLIMIT_FSIZE`, `LimitFSIZE=`
/// in a unit) allows. Unbounded where neither can be read.
#[allow(unsafe_code)]
// The conversion is needed where limits are 32 bits (32-bit ARM).
#[allow(clippy::useless_conversion)]
fn room_to_grow(dir: &Path, wal_bytes: u64) -> u64 {
    let free = super::capacity::file_system_space(dir).map_or(u64::MAX, |(free, _)| free);
    // SAFETY: getrlimit fills in the zeroed struct it is given.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    let file_limit = match unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) } {
        0 if limit.rlim_cur != libc::RLIM_INFINITY => {
            u64::from(limit.rlim_cur).saturating_sub(wal_bytes)
        }
        _ => u64::MAX,
    };
    free.min(file_limit)
}

fn request(requests: &SyncSender<()>) {
    match requests.try_send(()) {
        Ok(()) | Err(TrySendError::Full(())) => {}
        Err(TrySendError::Disconnected(())) => {
            log::warn!("storage checkpoint thread is gone; the WAL is checkpointed at its limit")
        }
    }
}

fn run(conn: &Connection, requests: &Receiver<()>, turn: &Mutex<()>, copied: &AtomicBool) {
    while requests.recv().is_ok() {
        let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
        // PASSIVE: never waits for readers or the writer; what it cannot copy now, the
        // next request copies.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        }) {
            Ok((frames, done)) => {
                log::debug!("checkpoint copied {done} of {frames} WAL frames");
                copied.store(true, Ordering::Relaxed);
            }
            Err(e) => log::debug!("checkpoint skipped: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A WAL database of one table in `dir`, its writer's connection and a checkpointer.
    fn database(dir: &Path) -> (Connection, Checkpointer) {
        let path = dir.join("test.db");
        let mut writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        // Nothing but the checkpointer may copy the WAL back.
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        // Commits as fast as the disk takes them: their durability is not under test.
        writer.pragma_update(None, "synchronous", "OFF").unwrap();
        writer
            .execute("CREATE TABLE blobs (data BLOB)", [])
            .unwrap();
        let checkpointer = Checkpointer::spawn(
            Connection::open(&path).unwrap(),
            &mut writer,
            dir.to_owned(),
        )
        .unwrap();
        (writer, checkpointer)
    }

    #[test]
    fn a_commit_past_the_threshold_is_checkpointed_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.db");
        let (mut writer, checkpointer) = database(dir.path());

        let bytes = (WAL_CHECKPOINT_PAGES as usize + 64) * 4096;
        writer
            .execute("INSERT INTO blobs VALUES (zeroblob(?1))", [bytes as i64])
            .unwrap();
        let database_size = || std::fs::metadata(&path).unwrap().len() as usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        while database_size() < bytes {
            assert!(
                Instant::now() < deadline,
                "the WAL was not copied back: database {} bytes",
                database_size()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        checkpointer.stop(&mut writer);
        writer.execute("DELETE FROM blobs", []).unwrap();
    }

    #[test]
    fn the_wal_starts_over_under_a_writer_that_never_pauses() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, checkpointer) = database(dir.path());

        // Commits back to back, each opening its transaction at once, three times the
        // limit in all.
        let page: i64 = 4096;
        let limit = i64::from(WAL_LIMIT_PAGES) * page;
        let mut written = 0;
        while written < 3 * limit {
            writer
                .execute("INSERT INTO blobs VALUES (zeroblob(?1))", [16 * page])
                .unwrap();
            written += 16 * page;
        }
        let wal = std::fs::metadata(dir.path().join("test.db-wal"))
            .unwrap()
            .len() as i64;
        checkpointer.stop(&mut writer);
        assert!(
            wal <= limit + limit / 4,
            "the WAL grew to {wal} bytes; limit {limit}"
        );
    }
}
