//! Live delivery to clients: WebSocket sessions and Server-Sent Events streams.
//!
//! Both are built from the same parts: a [`subscription::Subscription`] says what the
//! client wants, a [`feed::Feed`] yields every event after the client's position (stored
//! ones first when resuming, then live), and [`opening`] decides what the client is told
//! before the first event (a snapshot, or that its `since` cannot be honoured).

pub mod feed;
pub mod outbox;
pub mod sse;
pub mod subscription;
pub mod throttle;
pub mod ws;

use crate::events;
use crate::model::now_micros;
use crate::store::{Store, StoreError};
use subscription::{Request, Subscription};

/// What a new subscriber is sent before events, and the position to start its feed at.
pub struct Opening {
    pub messages: Vec<String>,
    /// Where the feed starts: after this `seq`, or at the newest event if `None`.
    pub since: Option<u64>,
    /// A snapshot consistent with this `seq` was sent: skip to it.
    pub snapshot_seq: Option<u64>,
}

/// Checks `since` against what is stored and reads the snapshot if asked for.
pub async fn opening(store: &Store, request: &Request) -> Result<Opening, StoreError> {
    let mut messages = Vec::new();
    let mut since = request.since;
    if let Some(asked) = request.since {
        let counts = store.counts().await?;
        let reason = if asked > counts.last_seq {
            Some("unknown_seq")
        } else if counts.oldest_seq > asked + 1 {
            Some("since_too_old")
        } else {
            None
        };
        if let Some(reason) = reason {
            messages.push(events::resync_message(
                reason,
                asked,
                counts.oldest_seq,
                counts.last_seq,
                now_micros(),
            ));
            since = Some(counts.oldest_seq.saturating_sub(1));
        }
    }
    let mut snapshot_seq = None;
    if request.snapshot {
        let (text, seq) = snapshot(store, &request.subscription).await?;
        messages.push(text);
        snapshot_seq = Some(seq);
    }
    Ok(Opening {
        messages,
        since,
        snapshot_seq,
    })
}

/// A snapshot message narrowed to the subscription's sensor and `tipo` filters, and its
/// `seq`.
pub async fn snapshot(
    store: &Store,
    subscription: &Subscription,
) -> Result<(String, u64), StoreError> {
    let snapshot = store.snapshot().await?;
    let wanted_sensor = |id: i64| {
        subscription
            .sensor_id
            .as_ref()
            .is_none_or(|ids| ids.contains(&id))
    };
    let wanted_tipo = |tipo: &String| subscription.tipo.as_ref().is_none_or(|t| t.contains(tipo));
    let sensors: Vec<_> = snapshot
        .sensors
        .iter()
        .filter(|s| wanted_sensor(s.id))
        .collect();
    let readings: Vec<_> = snapshot
        .latest
        .iter()
        .filter(|r| wanted_sensor(r.sensor_id) && wanted_tipo(&r.tipo))
        .collect();
    let text = events::snapshot_message(snapshot.seq, &sensors, &readings, now_micros());
    Ok((text, snapshot.seq))
}
