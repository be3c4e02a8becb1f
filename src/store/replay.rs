//! Pages of stored events read for resuming clients, kept for the next client that asks.
//!
//! When a room of dashboards reconnects after an outage, they all resume from about the
//! same `seq` and read the same pages of the event log. Each page is read and its frames
//! built once; every client takes the same events, shared, so that memory grows with the
//! pages cached here, not with the number of clients replaying. Once nobody replays, the
//! pages go (see [`super::Replaying`]): live clients never read them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::events::{Channel, Event};

/// Pages kept: enough for clients that resume together and drift apart a little,
/// small enough to stay a few megabytes (a page is at most 256 events).
const CACHED_PAGES: usize = 32;

/// What identifies a page: where it starts, what it holds, how long it may be.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PageKey {
    after: u64,
    channels: Vec<Channel>,
    limit: u32,
}

/// One page: the events with `after < seq <= upto` on its channels, at most `limit`.
struct Page {
    key: PageKey,
    upto: u64,
    events: Arc<[Arc<Event>]>,
}

impl Page {
    /// The events the same read with `upto` would give, if this page holds them all.
    ///
    /// A full page holds every event up to its last `seq`; a short one every event up to
    /// the `upto` it was read with. Events never change once published, so either
    /// answers any read that stops no later.
    fn answer(&self, upto: u64) -> Option<Vec<Arc<Event>>> {
        let full = self.events.len() == self.key.limit as usize;
        (full || upto <= self.upto).then(|| {
            self.events
                .iter()
                .take_while(|e| e.seq <= upto)
                .cloned()
                .collect()
        })
    }
}

/// The most recently read pages, newest first.
#[derive(Default)]
pub struct ReplayPages {
    pages: Mutex<VecDeque<Page>>,
}

impl ReplayPages {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Page>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The events with `after < seq <= upto` on `channels`, at most `limit`, if a cached
    /// page holds them.
    pub fn get(
        &self,
        after: u64,
        upto: u64,
        channels: &[Channel],
        limit: u32,
    ) -> Option<Vec<Arc<Event>>> {
        let pages = self.lock();
        pages
            .iter()
            .filter(|p| p.key.after == after && p.key.limit == limit && p.key.channels == channels)
            .find_map(|p| p.answer(upto))
    }

    /// Drops every page; whether there were any.
    pub fn clear(&self) -> bool {
        let mut pages = self.lock();
        let had = !pages.is_empty();
        pages.clear();
        had
    }

    /// Keeps a page just read, dropping the oldest beyond [`CACHED_PAGES`].
    pub fn put(
        &self,
        after: u64,
        upto: u64,
        channels: &[Channel],
        limit: u32,
        events: &[Arc<Event>],
    ) {
        let key = PageKey {
            after,
            channels: channels.to_vec(),
            limit,
        };
        let mut pages = self.lock();
        pages.retain(|p| p.key != key);
        pages.push_front(Page {
            key,
            upto,
            events: events.into(),
        });
        pages.truncate(CACHED_PAGES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(seqs: impl IntoIterator<Item = u64>) -> Vec<Arc<Event>> {
        seqs.into_iter()
            .map(|seq| {
                Arc::new(Event {
                    seq,
                    channel: Channel::Readings,
                    event_type: "created".into(),
                    sensor_id: Some(1),
                    tipo: Some("temperatura".into()),
                    body: crate::events::Body::Data(serde_json::Value::Null),
                    frame: "{}".into(),
                })
            })
            .collect()
    }

    fn seqs(events: Option<Vec<Arc<Event>>>) -> Option<Vec<u64>> {
        events.map(|e| e.iter().map(|e| e.seq).collect())
    }

    const READINGS: &[Channel] = &[Channel::Readings];

    #[test]
    fn a_full_page_answers_any_read_from_the_same_start() {
        let pages = ReplayPages::default();
        pages.put(10, 100, READINGS, 3, &events([11, 12, 14]));
        assert_eq!(
            seqs(pages.get(10, 100, READINGS, 3)),
            Some(vec![11, 12, 14])
        );
        assert_eq!(
            seqs(pages.get(10, 5000, READINGS, 3)),
            Some(vec![11, 12, 14])
        );
        assert_eq!(seqs(pages.get(10, 12, READINGS, 3)), Some(vec![11, 12]));
        // Another start, limit or set of channels is another page.
        assert_eq!(seqs(pages.get(11, 100, READINGS, 3)), None);
        assert_eq!(seqs(pages.get(10, 100, READINGS, 4)), None);
        assert_eq!(seqs(pages.get(10, 100, &Channel::ALL, 3)), None);
    }

    #[test]
    fn a_short_page_answers_only_reads_that_stop_no_later() {
        let pages = ReplayPages::default();
        pages.put(10, 20, READINGS, 5, &events([11, 15]));
        assert_eq!(seqs(pages.get(10, 20, READINGS, 5)), Some(vec![11, 15]));
        assert_eq!(seqs(pages.get(10, 14, READINGS, 5)), Some(vec![11]));
        // Events after 20 may have been published since: read again.
        assert_eq!(seqs(pages.get(10, 21, READINGS, 5)), None);
    }

    #[test]
    fn the_oldest_pages_go_first() {
        let pages = ReplayPages::default();
        for after in 0..CACHED_PAGES as u64 + 1 {
            pages.put(after, 1000, READINGS, 1, &events([after + 1]));
        }
        assert_eq!(seqs(pages.get(0, 1000, READINGS, 1)), None);
        assert_eq!(seqs(pages.get(1, 1000, READINGS, 1)), Some(vec![2]));
    }
}
