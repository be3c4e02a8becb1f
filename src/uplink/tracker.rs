//! Which publishes the broker has acknowledged, and so how far the cursor may move.
//!
//! Every event the uplink handles goes through here in `seq` order: published ones wait
//! for their PUBACK, skipped ones (the `general` channel) count as done at once. The
//! cursor is the newest `seq` such that everything up to it is done, so a PUBACK that
//! overtakes an older one never moves it past a publish still in flight. Publishes that
//! carry no event (status, discovery) occupy the in-flight window but never move it.
//!
//! The MQTT client hands out packet ids itself; it reports them in the order the
//! publishes were submitted (`Outgoing::Publish(pkid)`), which is how ids are matched
//! to entries here.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
struct Entry {
    /// The event it carries; `None` for status and discovery messages.
    seq: Option<u64>,
    done: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Tracker {
    cursor: u64,
    /// Entries not yet done, and done ones behind an older entry still in flight,
    /// oldest first; `first` is the id of the front one.
    entries: VecDeque<Entry>,
    first: u64,
    /// Ids of entries submitted whose packet id the client has not reported yet.
    unsent: VecDeque<u64>,
    by_pkid: HashMap<u16, u64>,
}

/// The client reported something that does not match what was submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl Tracker {
    /// A tracker whose cursor stands at `cursor`.
    pub fn new(cursor: u64) -> Tracker {
        Tracker {
            cursor,
            entries: VecDeque::new(),
            first: 0,
            unsent: VecDeque::new(),
            by_pkid: HashMap::new(),
        }
    }

    /// Everything up to this `seq` was acknowledged or needed no delivery.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Publishes submitted and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unsent.len() + self.by_pkid.len()
    }

    /// An event that is not published: done as soon as everything before it is.
    pub fn skip(&mut self, seq: u64) {
        self.entries.push_back(Entry {
            seq: Some(seq),
            done: true,
        });
        self.advance();
    }

    /// A publish handed to the client; `seq` is the event it carries, if any.
    pub fn submit(&mut self, seq: Option<u64>) {
        let id = self.first + self.entries.len() as u64;
        self.entries.push_back(Entry { seq, done: false });
        self.unsent.push_back(id);
    }

    /// The client sent the oldest unsent publish with packet id `pkid`.
    pub fn sent(&mut self, pkid: u16) -> Result<(), Mismatch> {
        let id = self
            .unsent
            .pop_front()
            .ok_or_else(|| Mismatch(format!("packet {pkid} sent but nothing was submitted")))?;
        if self.by_pkid.insert(pkid, id).is_some() {
            return Err(Mismatch(format!("packet id {pkid} reused while in flight")));
        }
        Ok(())
    }

    /// The broker acknowledged packet `pkid`; returns the event it carried, if any.
    pub fn acked(&mut self, pkid: u16) -> Result<Option<u64>, Mismatch> {
        let id = self
            .by_pkid
            .remove(&pkid)
            .ok_or_else(|| Mismatch(format!("acknowledgement of unknown packet {pkid}")))?;
        let mut seq = None;
        if let Some(entry) = self.entries.get_mut((id - self.first) as usize) {
            entry.done = true;
            seq = entry.seq;
        }
        self.advance();
        Ok(seq)
    }

    fn advance(&mut self) {
        while self.entries.front().is_some_and(|e| e.done) {
            if let Some(Entry { seq: Some(seq), .. }) = self.entries.pop_front() {
                self.cursor = self.cursor.max(seq);
            }
            self.first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_follows_acknowledgements_in_order() {
        let mut t = Tracker::new(10);
        t.submit(None); // status
        t.submit(Some(11));
        t.skip(12);
        t.submit(Some(13));
        assert_eq!(t.in_flight(), 3);
        t.sent(1).unwrap();
        t.sent(2).unwrap();
        t.sent(3).unwrap();
        assert_eq!(t.cursor(), 10);
        assert_eq!(t.acked(1).unwrap(), None);
        assert_eq!(t.cursor(), 10);
        assert_eq!(t.acked(2).unwrap(), Some(11));
        assert_eq!(
            t.cursor(),
            12,
            "the skipped event follows the acknowledged one"
        );
        t.acked(3).unwrap();
        assert_eq!(t.cursor(), 13);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_later_ack_does_not_pass_an_older_publish_in_flight() {
        let mut t = Tracker::new(0);
        t.submit(Some(1));
        t.submit(Some(2));
        t.sent(7).unwrap();
        t.sent(8).unwrap();
        t.acked(8).unwrap();
        assert_eq!(t.cursor(), 0);
        t.acked(7).unwrap();
        assert_eq!(t.cursor(), 2);
    }

    #[test]
    fn skips_alone_move_the_cursor_at_once() {
        let mut t = Tracker::new(5);
        t.skip(6);
        t.skip(7);
        assert_eq!(t.cursor(), 7);
    }

    #[test]
    fn mismatches_are_reported() {
        let mut t = Tracker::new(0);
        assert!(t.sent(1).is_err());
        assert!(t.acked(1).is_err());
        t.submit(Some(1));
        t.submit(Some(2));
        t.sent(1).unwrap();
        assert!(t.sent(1).is_err());
    }
}
