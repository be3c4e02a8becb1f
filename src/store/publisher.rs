//! The flusher thread, with `synchronous = "normal"`.
//!
//! SQLite then leaves a commit's WAL pages in the kernel's cache until a checkpoint, so
//! a commit costs the writer no wait on the card. This thread flushes the WAL itself and
//! publishes a commit's events only once its data is on the card: a power cut may take
//! back an answered REST write, never one whose event a client heard of. It flushes while
//! the writer goes on with the next batch, and one flush covers every commit made while
//! the previous one ran, so the writer never waits for the card.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::writer::WriterHealth;
use crate::events::{Event, Hub};

/// Commits waiting for the flusher before the writer waits for it in turn: the flusher
/// takes everything queued at each round, so this only fills while the card stalls.
const QUEUED_COMMITS: usize = 16;

/// How soon a failed flush is tried again when no new commit arrives to prompt it.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the writer hands over after a commit.
pub(super) enum Flush {
    /// A commit's events, in `seq` order, and pings to answer once they are out.
    Committed(Vec<Arc<Event>>, Vec<oneshot::Sender<()>>),
    /// A live-only notice (`seq` 0): out after the events committed before it, or at once
    /// when those cannot be flushed.
    Notice(Arc<Event>),
}

/// The running flusher thread and the way to it.
pub(super) struct Flusher {
    queue: SyncSender<Flush>,
    thread: JoinHandle<()>,
}

impl Flusher {
    /// Starts the thread that flushes `wal` and publishes to `hub`.
    pub(super) fn spawn(
        wal: PathBuf,
        hub: Hub,
        health: Arc<WriterHealth>,
    ) -> std::io::Result<Self> {
        let (queue, commits) = mpsc::sync_channel(QUEUED_COMMITS);
        let thread = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || run(&wal, &commits, &hub, &health))?;
        Ok(Flusher { queue, thread })
    }

    /// Hands work over, waiting while [`QUEUED_COMMITS`] are already queued.
    pub(super) fn send(&self, flush: Flush) {
        if self.queue.send(flush).is_err() {
            log::error!("storage flusher thread is gone; events of a commit were not sent");
        }
    }

    /// Waits until everything handed over is flushed and published (or could not be).
    pub(super) fn stop(self) {
        drop(self.queue);
        if self.thread.join().is_err() {
            log::error!("storage flusher thread panicked");
        }
    }
}

/// Flushes a file's data to the card (`fdatasync` on a descriptor of its own: the kernel
/// flushes the file, whichever descriptor wrote it).
pub(super) fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}

fn run(wal: &Path, commits: &Receiver<Flush>, hub: &Hub, health: &WriterHealth) {
    let mut held: Vec<Arc<Event>> = Vec::new();
    let mut failing = false;
    loop {
        // With events held back by a failed flush, try again after a while even when
        // nothing new is committed.
        let first = if held.is_empty() {
            commits.recv().ok()
        } else {
            match commits.recv_timeout(RETRY_AFTER) {
                Ok(flush) => Some(flush),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    if let Err(e) = sync_file(wal) {
                        log::error!(
                            "flushing {} failed: {e}; the last events were not sent",
                            wal.display()
                        );
                    } else {
                        held.drain(..).for_each(|event| hub.publish(event));
                    }
                    return;
                }
            }
        };
        if first.is_none() && held.is_empty() {
            return;
        }
        let mut pings = Vec::new();
        let mut notices = Vec::new();
        for flush in first.into_iter().chain(commits.try_iter()) {
            match flush {
                Flush::Committed(events, answers) => {
                    held.extend(events);
                    pings.extend(answers);
                }
                Flush::Notice(notice) => notices.push(notice),
            }
        }
        if !held.is_empty() {
            match sync_file(wal) {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        log::info!("flushing {} works again", wal.display());
                    }
                    held.drain(..).for_each(|event| hub.publish(event));
                }
                Err(e) => {
                    let why = format!("flushing {} failed: {e}", wal.display());
                    health.record(&Err(why.clone()));
                    if !std::mem::replace(&mut failing, true) {
                        log::error!("{why}; events wait until it works");
                        hub.publish(super::writer::outage_notice(&why, 0));
                    }
                }
            }
        }
        notices.into_iter().for_each(|notice| hub.publish(notice));
        // The writer is alive even when the card refuses a flush: answer.
        pings.into_iter().for_each(|ping| {
            let _ = ping.send(());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Channel;

    fn event(seq: u64) -> Arc<Event> {
        Arc::new(Event {
            seq,
            channel: Channel::Sensors,
            event_type: "sensor_updated".into(),
            sensor_id: Some(1),
            tipo: None,
            frame: format!("{{\"seq\":{seq}}}").into(),
        })
    }

    fn received(events: &mut tokio::sync::broadcast::Receiver<Arc<Event>>) -> Vec<u64> {
        std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.seq)
            .collect()
    }

    #[test]
    fn events_wait_for_a_flush_that_works_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        // No WAL file yet: opening it to flush fails, as a card refusing the flush would.
        let wal = dir.path().join("sensorgate.db-wal");
        let hub = Hub::new(64);
        let mut events = hub.subscribe();
        let health = Arc::new(WriterHealth::default());
        let flusher = Flusher::spawn(wal.clone(), hub.clone(), health.clone()).unwrap();

        let (ping, pong) = oneshot::channel();
        flusher.send(Flush::Committed(vec![event(1), event(2)], vec![ping]));
        pong.blocking_recv()
            .expect("a failing flush still answers pings");
        assert_eq!(
            received(&mut events),
            [0],
            "only the outage notice goes out"
        );
        assert!(health.failure().unwrap().error.contains("flushing"));

        std::fs::write(&wal, b"").unwrap();
        let (ping, pong) = oneshot::channel();
        flusher.send(Flush::Committed(vec![event(3)], vec![ping]));
        pong.blocking_recv().unwrap();
        assert_eq!(received(&mut events), [1, 2, 3]);

        flusher.send(Flush::Committed(vec![event(4)], Vec::new()));
        flusher.stop();
        assert_eq!(
            received(&mut events),
            [4],
            "stopping flushes what was handed over"
        );
    }
}
