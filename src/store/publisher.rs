//! The publisher thread: announces what the writer committed.
//!
//! The writer hands each commit's events over and goes on with the next batch. This
//! thread builds the frames of readings (nine events in ten; each is serialised once,
//! here rather than on the writer, the daemon's busiest thread) and publishes every event
//! to the hub in `seq` order.
//!
//! With `synchronous = "normal"` SQLite leaves a commit's WAL pages in the kernel's cache
//! until a checkpoint, so this thread flushes the WAL itself before it publishes: a power
//! cut may take back an answered REST write, never one whose event a client heard of. One
//! flush covers every commit handed over while the previous one ran, so the writer never
//! waits for the card. With `full`, SQLite flushed each commit before handing it over.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::writer::WriterHealth;
use crate::events::{self, Channel, Event, Hub};
use crate::model::{Micros, Reading};

/// Commits waiting for the publisher before the writer waits for it in turn: the
/// publisher takes everything queued at each round, so this only fills while the card
/// stalls a flush.
const QUEUED_COMMITS: usize = 16;

/// How soon a failed flush is tried again when no new commit arrives to prompt it.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the writer hands over.
pub(super) enum Handover {
    /// A commit's events, in `seq` order, and pings to answer once they are out.
    Committed(Vec<Unpublished>, Vec<oneshot::Sender<()>>),
    /// A live-only notice (`seq` 0): out after the events committed before it, or at once
    /// when those cannot be flushed.
    Notice(Arc<Event>),
}

/// An event of a commit, on its way to the hub.
pub(super) enum Unpublished {
    /// Built by the writer: sensor, system and test events, a tenth of all.
    Built(Arc<Event>),
    /// A stored reading, whose `created` frame the publisher builds.
    Reading {
        reading: Reading,
        seq: u64,
        stored_at: Micros,
    },
}

impl Unpublished {
    fn build(self) -> Arc<Event> {
        match self {
            Unpublished::Built(event) => event,
            Unpublished::Reading {
                reading,
                seq,
                stored_at,
            } => {
                let frame = events::reading_frame(&reading, stored_at, seq);
                Arc::new(Event {
                    seq,
                    channel: Channel::Readings,
                    event_type: "created".into(),
                    sensor_id: Some(reading.sensor_id),
                    tipo: Some(reading.tipo),
                    frame: frame.into(),
                })
            }
        }
    }
}

/// The running publisher thread and the way to it.
pub(super) struct Publisher {
    queue: SyncSender<Handover>,
    thread: JoinHandle<()>,
}

impl Publisher {
    /// Starts the thread that publishes to `hub`, flushing `wal` first when it is given.
    pub(super) fn spawn(
        wal: Option<PathBuf>,
        hub: Hub,
        health: Arc<WriterHealth>,
    ) -> std::io::Result<Self> {
        let (queue, handovers) = mpsc::sync_channel(QUEUED_COMMITS);
        let thread = std::thread::Builder::new()
            .name("store-publisher".into())
            .spawn(move || run(wal.as_deref(), &handovers, &hub, &health))?;
        Ok(Publisher { queue, thread })
    }

    /// Hands work over, waiting while [`QUEUED_COMMITS`] are already queued.
    pub(super) fn send(&self, handover: Handover) {
        if self.queue.send(handover).is_err() {
            log::error!("storage publisher thread is gone; events of a commit were not sent");
        }
    }

    /// Waits until everything handed over is published (or could not be flushed).
    pub(super) fn stop(self) {
        drop(self.queue);
        if self.thread.join().is_err() {
            log::error!("storage publisher thread panicked");
        }
    }
}

/// Flushes a file's data to the card (`fdatasync` on a descriptor of its own: the kernel
/// flushes the file, whichever descriptor wrote it).
pub(super) fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}

/// Flushes the WAL when this thread is the one that must.
fn flush(wal: Option<&Path>) -> Result<(), String> {
    match wal {
        Some(wal) => sync_file(wal).map_err(|e| format!("flushing {} failed: {e}", wal.display())),
        None => Ok(()),
    }
}

fn run(wal: Option<&Path>, handovers: &Receiver<Handover>, hub: &Hub, health: &WriterHealth) {
    let mut held: Vec<Unpublished> = Vec::new();
    let mut failing = false;
    loop {
        // With events held back by a failed flush, try again after a while even when
        // nothing new is committed.
        let first = if held.is_empty() {
            handovers.recv().ok()
        } else {
            match handovers.recv_timeout(RETRY_AFTER) {
                Ok(handover) => Some(handover),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    match flush(wal) {
                        Ok(()) => held.drain(..).for_each(|e| hub.publish(e.build())),
                        Err(why) => log::error!("{why}; the last events were not sent"),
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
        for handover in first.into_iter().chain(handovers.try_iter()) {
            match handover {
                Handover::Committed(events, answers) => {
                    held.extend(events);
                    pings.extend(answers);
                }
                Handover::Notice(notice) => notices.push(notice),
            }
        }
        if !held.is_empty() {
            match flush(wal) {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        log::info!("flushing the WAL works again");
                    }
                    held.drain(..).for_each(|e| hub.publish(e.build()));
                }
                Err(why) => {
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

    fn built(seq: u64) -> Unpublished {
        Unpublished::Built(event(seq))
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
        let publisher = Publisher::spawn(Some(wal.clone()), hub.clone(), health.clone()).unwrap();

        let (ping, pong) = oneshot::channel();
        publisher.send(Handover::Committed(vec![built(1), built(2)], vec![ping]));
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
        publisher.send(Handover::Committed(vec![built(3)], vec![ping]));
        pong.blocking_recv().unwrap();
        assert_eq!(received(&mut events), [1, 2, 3]);

        publisher.send(Handover::Committed(vec![built(4)], Vec::new()));
        publisher.stop();
        assert_eq!(
            received(&mut events),
            [4],
            "stopping flushes what was handed over"
        );
    }
}
