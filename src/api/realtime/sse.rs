//! Server-Sent Events at `/api/v1/events`: the same channels, filters, snapshot and
//! resume as the WebSocket, for curl and for clients that cannot open a socket.
//!
//! Every event goes out as `id: SEQ` and `data: ENVELOPE`, so a browser's `EventSource`
//! resumes by itself through `Last-Event-ID`. A snapshot carries its `seq` as id too.
//! A client that leaves its stream unread for [`WRITE_TIMEOUT`] is dropped. A stream
//! opened with a token ends when the token is revoked or no longer has the scope the
//! stream needs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response};
use tokio::sync::mpsc;

use super::socket::WRITE_TIMEOUT;
use super::subscription::Request as SubscriptionRequest;
use crate::api::query::Query;
use crate::api::{streamed, ApiError, Body, State, StreamAdmission, StreamFailed};
use crate::auth::{Access, Principal};
use crate::model::FieldError;
use crate::store::{Feed, Pulled};

/// A comment line every so often keeps proxies and idle timers from closing the stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Most events taken from the feed at once, and so written as one chunk.
const BATCH: usize = 64;

/// Chunks waiting for the connection; the stream writer waits when it is full. A few
/// are enough to keep the socket busy: the rest wait in the hub or, for a client far
/// behind, in the database, so that a room of slow streams replaying at once holds a
/// few batches each, not a queue of them.
const QUEUE: usize = 4;

/// Starts an event stream.
pub fn stream(
    req: &Request<Incoming>,
    state: Arc<State>,
    principal: Option<Principal>,
    admission: StreamAdmission,
) -> Result<Response<Body>, ApiError> {
    super::check_origin(req, &state)?;
    let mut request = SubscriptionRequest::from_query(&Query::parse(req.uri().query()))?;
    // A browser sends `Last-Event-ID` when it reconnects, to the same URL: what it saw
    // last is newer than the URL's `since`, and it has the snapshot the URL asked for.
    if let Some(value) = req.headers().get("last-event-id") {
        let seq = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::invalid(vec![FieldError::new(
                    "Last-Event-ID",
                    "must be a seq number",
                )])
            })?;
        request.since = Some(seq);
        request.snapshot = false;
    }
    let (chunks, body) = streamed(QUEUE);
    tokio::spawn(run(state, request, principal, admission, chunks));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn event_chunk(out: &mut String, id: Option<u64>, data: &str) {
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
}

async fn send(chunks: &mpsc::Sender<Result<Bytes, StreamFailed>>, text: String) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, chunks.send(Ok(Bytes::from(text)))).await,
        Ok(Ok(()))
    )
}

async fn run(
    state: Arc<State>,
    request: SubscriptionRequest,
    principal: Option<Principal>,
    _admission: StreamAdmission,
    chunks: mpsc::Sender<Result<Bytes, StreamFailed>>,
) {
    let _drain = state.drain.clone();
    let mut tokens = state.auth.live_tokens();
    tokens.mark_changed();
    let subscription = request.subscription.clone();
    let channels = subscription.channel_list();
    let _registration = state.hub.register(&channels);
    let mut shutdown = state.shutdown.clone();

    let opening = match super::opening(&state.store, &request).await {
        Ok(opening) => opening,
        Err(e) => {
            let _ = send(&chunks, format!(": storage unavailable: {e}\n\n")).await;
            return;
        }
    };
    let mut feed = Feed::new(&state.hub, state.store.clone(), opening.start);
    let mut first = String::from("retry: 2000\n\n");
    for message in &opening.messages {
        let id = opening
            .snapshot_seq
            .filter(|_| message.starts_with("{\"type\":\"snapshot\""));
        event_chunk(&mut first, id, message);
    }
    if !send(&chunks, first).await {
        return;
    }

    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = chunks.closed() => return,
            batch = feed.next(&channels, BATCH) => {
                let events = match batch {
                    Ok(Pulled::Events(events)) => events,
                    Ok(Pulled::Removed { since, oldest_seq, last_seq }) => {
                        let resync = super::resync_after_removal(
                            "event stream client",
                            since,
                            oldest_seq,
                            last_seq,
                        );
                        let mut text = String::new();
                        event_chunk(&mut text, None, &resync);
                        if !send(&chunks, text).await {
                            return;
                        }
                        continue;
                    }
                    Err(_) => return,
                };
                let mut text = String::new();
                let mut sent = 0;
                for event in events.iter().filter(|e| subscription.matches(e)) {
                    event_chunk(&mut text, Some(event.seq), event.frame.as_str());
                    sent += 1;
                }
                if sent > 0 {
                    if !send(&chunks, text).await {
                        log::info!("event stream client too slow, dropped");
                        return;
                    }
                    if let Some(&channel) = channels.first() {
                        state.hub.count_sent(channel, sent);
                    }
                }
            }
            Ok(()) = tokens.changed(), if principal.is_some() => {
                let live = tokens.borrow_and_update().clone();
                if let Some(principal) = &principal {
                    if let Err(reason) = state.auth.still_allowed(principal, Access::Read, &live).await {
                        log::info!("event stream closed: {reason}");
                        let _ = send(&chunks, format!(": {reason}; stream closed\n\n")).await;
                        return;
                    }
                }
            }
            _ = keepalive.tick() => {
                if !send(&chunks, ": keepalive\n\n".into()).await {
                    return;
                }
            }
        }
    }
}
