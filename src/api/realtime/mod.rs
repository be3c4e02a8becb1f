//! Live delivery to clients: WebSocket sessions and Server-Sent Events streams.
//!
//! Both are built from the same parts: a [`subscription::Subscription`] says what the
//! client wants, the store's [`Feed`](crate::store::Feed) yields every event after the
//! client's position (stored ones first when resuming, then live), and [`opening`]
//! decides what the client is told before the first event (a snapshot, or that its
//! `since` cannot be honoured).

pub mod fanout;
pub mod outbox;
pub mod protocol;
pub mod socket;
pub mod sse;
pub mod subscription;
pub mod throttle;
pub mod ws;

use hyper::body::Incoming;
use hyper::header::{HOST, ORIGIN};

use crate::api::metrics::Limit;
use crate::api::{ApiError, State};
use crate::auth::origin;
use crate::model::now_micros;
use crate::store::{Store, StoreError};
use subscription::{Request, Subscription};

/// Refuses a browser page from a foreign site (see [`origin::allowed`]).
pub fn check_origin(req: &hyper::Request<Incoming>, state: &State) -> Result<(), ApiError> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let page = header(ORIGIN);
    if origin::allowed(page, header(HOST), &state.allowed_origins) {
        Ok(())
    } else {
        state.counters.hit(Limit::ForbiddenOrigin);
        Err(ApiError::forbidden_origin(page.unwrap_or_default()))
    }
}

/// What a new subscriber is sent before events, and where its feed starts.
pub struct Opening {
    pub messages: Vec<String>,
    /// The feed starts after this `seq` (the snapshot's, or the honoured `since`), or at
    /// the newest event if `None`.
    pub start: Option<u64>,
    /// The `seq` of the snapshot among `messages`, if one was asked for.
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
            messages.push(protocol::resync_message(
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
        // A snapshot is consistent with its seq: every event after it follows, whatever
        // was published while it was read.
        start: snapshot_seq.or(since),
        snapshot_seq,
    })
}

/// The `resync` for a client whose stream stood at `since` when retention removed the
/// events after it up to `oldest_seq` (see [`crate::store::Pulled::Removed`]); said in
/// the log under `client`.
pub fn resync_after_removal(client: &str, since: u64, oldest_seq: u64, last_seq: u64) -> String {
    log::info!(
        "{client}: events {} to {} were removed by retention before it read them; told to resync",
        since + 1,
        oldest_seq - 1
    );
    protocol::resync_message("since_too_old", since, oldest_seq, last_seq, now_micros())
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
    let text = protocol::snapshot_message(snapshot.seq, &sensors, &readings, now_micros());
    Ok((text, snapshot.seq))
}
