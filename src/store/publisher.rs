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
//! waits for the card, except behind a long backlog of a failed flush that is read back
//! once the card works again. With `full`, SQLite flushed each commit before handing it
//! over.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::health::{self, WriterHealth};
use super::reader::{self, Replay};
use super::DatabaseFile;
use crate::events::{self, Body, Channel, Event, Hub};
use crate::model::Reading;

/// Commits waiting for the publisher before the writer waits for it in turn: the
/// publisher takes everything queued at each round, so this only fills while the card
/// stalls a flush.
const QUEUED_COMMITS: usize = 16;

/// How soon a failed flush is tried again when no new commit arrives to prompt it.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Events kept in memory while flushes fail, about 150 bytes each. Past this only their
/// `seq`s are kept, and the events are read back from the database once a flush works:
/// a card that refuses flushes for hours costs no more memory than a few minutes.
const HELD_EVENTS: usize = 20_000;

/// Events read back from the database at a time.
const READ_BACK: u32 = 1000;

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
    /// A stored reading, whose `created` frame the publisher builds. The frame's
    /// `timestamp` is the reading's own: replay rebuilds the frame from the reading's row
    /// alone (see `reader::events_after`), which keeps no time of its storing.
    Reading { reading: Reading, seq: u64 },
}

impl Unpublished {
    fn seq(&self) -> u64 {
        match self {
            Unpublished::Built(event) => event.seq,
            Unpublished::Reading { seq, .. } => *seq,
        }
    }

    fn build(self) -> Arc<Event> {
        match self {
            Unpublished::Built(event) => event,
            Unpublished::Reading { reading, seq } => {
                let frame = events::reading_frame(&reading, reading.timestamp, seq);
                Arc::new(Event {
                    seq,
                    channel: Channel::Readings,
                    event_type: "created".into(),
                    sensor_id: Some(reading.sensor_id),
                    tipo: Some(reading.tipo.clone()),
                    body: Body::Reading(reading),
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
    /// Starts the thread that publishes to `hub`, flushing `wal` first when it is given;
    /// events held back too long are read back from `database`.
    pub(super) fn spawn(
        wal: Option<PathBuf>,
        database: DatabaseFile,
        hub: Hub,
        health: Arc<WriterHealth>,
    ) -> std::io::Result<Self> {
        let (queue, handovers) = mpsc::sync_channel(QUEUED_COMMITS);
        let thread = std::thread::Builder::new()
            .name("store-publisher".into())
            .spawn(move || {
                let mut backlog = Backlog::new(&database);
                run(wal.as_deref(), &handovers, &mut backlog, &hub, &health);
            })?;
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

/// Committed events waiting for their WAL flush: a round's worth while flushes work,
/// every commit's since the first failed flush while the card refuses them.
struct Backlog<'a> {
    held: Vec<Unpublished>,
    /// First and last `seq` of the events committed once [`HELD_EVENTS`] were held, not
    /// kept in memory. The writer numbers without gaps, so every event between them is
    /// one of them.
    dropped: Option<(u64, u64)>,
    /// Reading them back failed last time: logged once, tried again every round.
    read_back_failing: bool,
    database: &'a DatabaseFile,
}

impl<'a> Backlog<'a> {
    fn new(database: &'a DatabaseFile) -> Self {
        Backlog {
            held: Vec::new(),
            dropped: None,
            read_back_failing: false,
            database,
        }
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.dropped.is_none()
    }

    fn add(&mut self, events: Vec<Unpublished>) {
        for event in events {
            if self.dropped.is_none() && self.held.len() < HELD_EVENTS {
                self.held.push(event);
            } else {
                let seq = event.seq();
                let first = self.dropped.map_or(seq, |(first, _)| first);
                self.dropped = Some((first, seq));
            }
        }
    }

    /// Publishes every event, in `seq` order; call once the WAL is flushed. Events that
    /// cannot be read back yet stay in the backlog, ahead of every newer one.
    fn publish(&mut self, hub: &Hub) {
        self.held
            .drain(..)
            .for_each(|event| hub.publish(event.build()));
        let Some((first, last)) = self.dropped else {
            return;
        };
        let mut after = first - 1;
        match self.read_back(hub, &mut after, last) {
            Ok(()) => {
                self.dropped = None;
                if std::mem::take(&mut self.read_back_failing) {
                    log::info!("events held back by failed flushes are out again");
                }
            }
            Err(e) => {
                self.dropped = Some((after + 1, last));
                if !std::mem::replace(&mut self.read_back_failing, true) {
                    log::error!(
                        "events {} to {last} could not be read back to go out live: {e}; \
                         trying again every second",
                        after + 1
                    );
                }
            }
        }
    }

    /// Publishes the stored events after `after` up to `last`, moving `after` along.
    fn read_back(&self, hub: &Hub, after: &mut u64, last: u64) -> rusqlite::Result<()> {
        let conn = self.database.open_reader()?;
        while *after < last {
            let events = match reader::events_after(&conn, *after, last, &Channel::ALL, READ_BACK)?
            {
                Replay::Events(events) => events,
                Replay::Removed { oldest_seq } => {
                    log::warn!(
                        "events {} to {} were removed by retention before they could go out live",
                        *after + 1,
                        oldest_seq - 1
                    );
                    *after = oldest_seq - 1;
                    continue;
                }
            };
            let Some(newest) = events.last() else {
                break;
            };
            *after = newest.seq;
            events
                .into_iter()
                .for_each(|event| hub.publish(Arc::new(event)));
        }
        Ok(())
    }
}

fn run(
    wal: Option<&Path>,
    handovers: &Receiver<Handover>,
    backlog: &mut Backlog<'_>,
    hub: &Hub,
    health: &WriterHealth,
) {
    let mut failing = false;
    loop {
        // With events held back by a failed flush, try again after a while even when
        // nothing new is committed.
        let first = if backlog.is_empty() {
            handovers.recv().ok()
        } else {
            match handovers.recv_timeout(RETRY_AFTER) {
                Ok(handover) => Some(handover),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    match flush(wal) {
                        Ok(()) => backlog.publish(hub),
                        Err(why) => log::error!("{why}; the last events were not sent"),
                    }
                    return;
                }
            }
        };
        if first.is_none() && backlog.is_empty() {
            return;
        }
        let mut pings = Vec::new();
        let mut notices = Vec::new();
        for handover in first.into_iter().chain(handovers.try_iter()) {
            match handover {
                Handover::Committed(events, answers) => {
                    backlog.add(events);
                    pings.extend(answers);
                }
                Handover::Notice(notice) => notices.push(notice),
            }
        }
        if !backlog.is_empty() {
            let flushed = flush(wal);
            health.record_flush(&flushed);
            match flushed {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        log::info!("flushing the WAL works again");
                    }
                    backlog.publish(hub);
                }
                Err(why) => {
                    if !std::mem::replace(&mut failing, true) {
                        log::error!("{why}; events wait until it works");
                        hub.publish(health::outage_notice(&why, 0));
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
    use crate::store::StorageConfig;

    fn event(seq: u64) -> Arc<Event> {
        Arc::new(Event {
            seq,
            channel: Channel::Sensors,
            event_type: "sensor_updated".into(),
            sensor_id: Some(1),
            tipo: None,
            body: Body::Data(serde_json::Value::Null),
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
        let database = DatabaseFile::of(&StorageConfig {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        });
        let publisher =
            Publisher::spawn(Some(wal.clone()), database, hub.clone(), health.clone()).unwrap();

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
        health.record(&Ok(()));
        assert!(
            health.failure().is_some(),
            "a commit that works does not end a run of failed flushes"
        );

        std::fs::write(&wal, b"").unwrap();
        let (ping, pong) = oneshot::channel();
        publisher.send(Handover::Committed(vec![built(3)], vec![ping]));
        pong.blocking_recv().unwrap();
        assert_eq!(received(&mut events), [1, 2, 3]);
        assert!(
            health.failure().is_none(),
            "a flush that works ends the run"
        );

        publisher.send(Handover::Committed(vec![built(4)], Vec::new()));
        publisher.stop();
        assert_eq!(
            received(&mut events),
            [4],
            "stopping flushes what was handed over"
        );
    }

    #[test]
    fn events_past_the_memory_bound_are_read_back_from_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let total = (HELD_EVENTS + 2500) as u64;
        let newer = total + 1;
        let storage = StorageConfig {
            data_dir: dir.path().to_owned(),
            synchronous: crate::store::Synchronous::Normal,
            ..Default::default()
        };
        let conn = crate::store::open_database(&storage).unwrap();
        let mut insert = conn
            .prepare(
                "INSERT INTO events (seq, ts, channel, event_type, frame) \
                 VALUES (?1, 0, 'sensors', 'updated', ?2)",
            )
            .unwrap();
        for seq in 1..=newer {
            insert
                .execute(rusqlite::params![seq as i64, format!("stored {seq}")])
                .unwrap();
        }
        let database = DatabaseFile::of(&storage);
        let wal = dir.path().join("refused-wal");
        let hub = Hub::new(newer as usize + 16);
        let mut events = hub.subscribe();
        let publisher = Publisher::spawn(
            Some(wal.clone()),
            database.clone(),
            hub.clone(),
            Arc::new(WriterHealth::default()),
        )
        .unwrap();
        let in_memory = |seq: u64| {
            Unpublished::Built(Arc::new(Event {
                frame: format!("held {seq}").into(),
                ..(*event(seq)).clone()
            }))
        };
        let hand_over = |seqs: &[u64]| {
            let (ping, pong) = oneshot::channel();
            let events = seqs.iter().map(|&seq| in_memory(seq)).collect();
            publisher.send(Handover::Committed(events, vec![ping]));
            pong.blocking_recv().unwrap();
        };
        let published = |events: &mut tokio::sync::broadcast::Receiver<Arc<Event>>| {
            std::iter::from_fn(|| events.try_recv().ok())
                .map(|e| (e.seq, e.frame.to_string()))
                .collect::<Vec<_>>()
        };
        let expected = |seqs: std::ops::RangeInclusive<u64>, source: &str| {
            seqs.map(|seq| (seq, format!("{source} {seq}")))
                .collect::<Vec<_>>()
        };

        let seqs: Vec<u64> = (1..=total).collect();
        seqs.chunks(1000).for_each(hand_over);
        assert_eq!(
            received(&mut events),
            [0],
            "only the outage notice goes out"
        );

        // The flush works, but the events past the bound cannot be read back yet.
        std::fs::write(&wal, b"").unwrap();
        let away = dir.path().join("elsewhere.db");
        std::fs::rename(&database.path, &away).unwrap();
        hand_over(&[]);
        assert_eq!(
            published(&mut events),
            expected(1..=HELD_EVENTS as u64, "held"),
            "the events kept in memory go out"
        );

        std::fs::rename(&away, &database.path).unwrap();
        hand_over(&[newer]);
        assert_eq!(
            published(&mut events),
            expected(HELD_EVENTS as u64 + 1..=newer, "stored"),
            "the rest is read back, before the newer commit and with it"
        );
        publisher.stop();
        assert_eq!(received(&mut events), Vec::<u64>::new());
    }
}
