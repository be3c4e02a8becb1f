//! The event log as one reader follows it (the feed): the events one client receives, in `seq` order, with no gap and no duplicate.
//!
//! A feed subscribes to the hub first and only then decides where it stands, so every
//! event is either in the database already or still to come through the subscription.
//! It replays from the database until it has caught up, then follows the hub; if it ever
//! falls behind the hub's ring it goes back to the database from where it stood. Events
//! the hub delivers at or below the position are duplicates of replayed ones and are
//! skipped.
//!
//! A client that wants no readings follows the hub's ring without them; when its
//! subscription changes, the feed moves to the other ring and catches up from the
//! database, as after falling behind.
//!
//! Should retention remove events before the feed has read them (a replay or a client
//! that fell that far behind), the feed says so ([`Pulled::Removed`]) and goes on from
//! the oldest event kept: its reader must learn that it missed some, which a jump in
//! `seq` alone would not tell a client of a few channels.

use std::sync::Arc;

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use super::{Replay, Replaying, Store, StoreError};
use crate::events::{Channel, Event, Hub};

/// Events read from the database in one go while replaying.
const PAGE: usize = 256;

/// What [`Feed::next`] hands out.
#[derive(Debug)]
pub enum Pulled {
    /// The next events, oldest first, never empty.
    Events(Vec<Arc<Event>>),
    /// Retention removed events after `since` that this feed had not handed out; it goes
    /// on from `oldest_seq`. `last_seq` is the newest event stored by then, as in the
    /// `resync` a client gets on connecting.
    Removed {
        since: u64,
        oldest_seq: u64,
        last_seq: u64,
    },
}

/// A client's position in the event sequence.
pub struct Feed {
    store: Store,
    hub: Hub,
    live: broadcast::Receiver<Arc<Event>>,
    /// Whether `live` is the hub's ring with readings.
    live_has_readings: bool,
    /// The newest `seq` handed out (wanted or not).
    position: u64,
    /// Held while the feed reads stored events rather than following the hub.
    replaying: Option<Replaying>,
    /// Set when a client that had no readings asks for them: what was published then
    /// (or the `seq` of the snapshot it was just sent). Its other channels are replayed
    /// up to there; readings start after it, not from wherever the position stood.
    readings_from: Option<u64>,
    /// The `seq` of a snapshot just sent, until the next call of [`Feed::next`].
    snapshot_at: Option<u64>,
}

impl Feed {
    /// A feed that starts after `since`, or after the newest committed event if `None`.
    pub fn new(hub: &Hub, store: Store, since: Option<u64>) -> Feed {
        // Read where numbering stands before subscribing: anything published in between
        // is in the database and the first replay round finds it. Without `since`, the
        // newest committed event, never behind the newest published one: events
        // committed before the client came but published after are not its news, as a
        // REST write answered before it connected must not reach it as an event.
        let position = since.unwrap_or_else(|| store.health().committed());
        let live = hub.subscribe();
        let replaying = Some(store.replaying());
        Feed {
            store,
            hub: hub.clone(),
            live,
            live_has_readings: true,
            position,
            replaying,
            readings_from: None,
            snapshot_at: None,
        }
    }

    /// Moves to the hub's ring with or without readings, subscribing before reading
    /// where publication stands, so that nothing falls between the rings. Readings are
    /// wanted from `snapshot_at` if the client was just sent a snapshot, else from now.
    fn follow(&mut self, readings: bool, snapshot_at: Option<u64>) {
        self.live = if readings {
            self.hub.subscribe()
        } else {
            self.hub.subscribe_without_readings()
        };
        self.live_has_readings = readings;
        self.readings_from = readings.then(|| snapshot_at.unwrap_or_else(|| self.hub.published()));
        self.replaying = Some(self.store.replaying());
    }

    /// The newest `seq` handed out.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Whether the feed is reading stored events rather than following the hub.
    pub fn is_replaying(&self) -> bool {
        self.replaying.is_some()
    }

    /// Whether the feed has handed out all it received from the hub, with nothing to
    /// read from the database first, and follows the ring that `channels` call for: its
    /// reader is live and has had every event up to [`Feed::position`] on that ring.
    pub fn is_caught_up(&self, channels: &[Channel]) -> bool {
        channels.contains(&Channel::Readings) == self.live_has_readings
            && self.replaying.is_none()
            && self.readings_from.is_none()
            && self.snapshot_at.is_none()
            && self.live.is_empty()
    }

    /// Whether the feed follows the hub's ring with readings (or the one without).
    pub fn follows_readings(&self) -> bool {
        self.live_has_readings
    }

    /// Moves past events up to `seq` that reached the reader another way; those still
    /// to come from the hub are skipped as duplicates.
    pub fn advance_to(&mut self, seq: u64) {
        self.position = self.position.max(seq);
    }

    /// Skips to `seq` when the client was just sent a snapshot consistent with it.
    pub fn skip_to(&mut self, seq: u64) {
        self.position = self.position.max(seq);
        self.snapshot_at = Some(seq);
    }

    /// The next events on `channels`, oldest first, at most `limit` of them, or that
    /// some were removed before they could be read. Cancel-safe: a change of ring is made
    /// before the first wait and is whole, and every other change of state comes after a
    /// result is in hand.
    pub async fn next(&mut self, channels: &[Channel], limit: usize) -> Result<Pulled, StoreError> {
        let limit = limit.clamp(1, PAGE);
        let wants_readings = channels.contains(&Channel::Readings);
        let snapshot_at = self.snapshot_at.take();
        if wants_readings != self.live_has_readings {
            self.follow(wants_readings, snapshot_at);
        }
        loop {
            if self.replaying.is_some() {
                // Held while this page is read (see `Store::replay_turn`); a read that is
                // cancelled, because the client's session had other work, lets it go.
                let _turn = self.store.replay_turn().await?;
                // Never past what the hub has published: a committed event may still wait
                // for its flush to the card (`synchronous = "normal"`), and no client may
                // hear of it before.
                let (upto, wanted) = match self.readings_from {
                    Some(from) => (from.min(self.hub.published()), without_readings(channels)),
                    None => (self.hub.published(), channels.to_vec()),
                };
                let page = if upto > self.position && !wanted.is_empty() {
                    match self
                        .store
                        .events_after(self.position, upto, wanted, limit as u32)
                        .await?
                    {
                        Replay::Events(page) => page,
                        Replay::Removed { oldest_seq } => {
                            let since = self.position;
                            self.position = oldest_seq - 1;
                            return Ok(Pulled::Removed {
                                since,
                                oldest_seq,
                                last_seq: self.store.health().committed(),
                            });
                        }
                    }
                } else {
                    Vec::new()
                };
                match page.last() {
                    None => match self.readings_from.take() {
                        Some(from) => self.position = self.position.max(from),
                        None => self.replaying = None,
                    },
                    Some(last) => {
                        self.position = last.seq;
                        return Ok(Pulled::Events(page));
                    }
                }
                continue;
            }
            let first = match self.live.recv().await {
                Ok(event) => event,
                Err(RecvError::Lagged(_)) => {
                    self.replaying = Some(self.store.replaying());
                    continue;
                }
                Err(RecvError::Closed) => return Err(StoreError::Closed),
            };
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(event) = next.take() {
                if event.seq == 0 {
                    // A live-only notice (storage failing), never stored or replayed.
                    if channels.contains(&event.channel) {
                        batch.push(event);
                    }
                } else if event.seq > self.position {
                    self.position = event.seq;
                    if channels.contains(&event.channel) {
                        batch.push(event);
                    }
                }
                if batch.len() >= limit {
                    break;
                }
                match self.live.try_recv() {
                    Ok(event) => next = Some(event),
                    Err(TryRecvError::Lagged(_)) => {
                        self.replaying = Some(self.store.replaying());
                        break;
                    }
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                return Ok(Pulled::Events(batch));
            }
        }
    }
}

fn without_readings(channels: &[Channel]) -> Vec<Channel> {
    channels
        .iter()
        .copied()
        .filter(|c| *c != Channel::Readings)
        .collect()
}
