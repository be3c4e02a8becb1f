//! WebSocket sessions: the upgrade, then per client one task that follows its [`Feed`],
//! answers its messages and writes to its socket as far as the socket takes frames
//! without waiting (see [`socket`](super::socket)), so a client that reads slowly never
//! holds up its session, the hub or anyone else. A client that is live and has
//! everything is parked with the [`fanout`](super::fanout) meanwhile, which writes live
//! events to many idle clients at once.
//!
//! Close codes: 1001 the daemon is shutting down; 4008 the client cannot keep up (its
//! queue overflowed after coalescing, or its socket accepted nothing for
//! [`WRITE_TIMEOUT`](super::socket::WRITE_TIMEOUT)), the reason says the `since` to
//! resume from; 4000 the client did not answer pings; 4029 the client sent messages
//! faster than its rate limit; 4401 a secure socket was not authenticated, or the token a
//! socket was opened with was revoked or lost the scope the socket needs; 1009 a client
//! message was too large; 1007 a text message was not UTF-8; 1002 any other breach of
//! the protocol; 1011 storage failed.
//!
//! The close handshake (RFC 6455 §5.5.1, §7) runs both ways. A client's Close is answered
//! at once with a Close carrying its code (1000 when it gave none), and the connection
//! ends. A close the server starts sends its Close after what is queued, waits
//! [`CLOSE_WAIT`](super::socket::CLOSE_WAIT) at most for the client's, then ends the
//! connection. A client that breaks the protocol gets its Close and the connection ends
//! without waiting, its unread bytes drained first so that the Close is not lost to a
//! reset.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::create_response_with_body;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::fanout::Parking;
use super::outbox::{Frame, Outbox, REPLAY_AHEAD};
use super::protocol;
use super::socket::{self, Connection, SharedStream, Step};
use super::subscription::{self, Request as SubscriptionRequest, Subscription, SubscriptionError};
use super::throttle::Throttle;
use crate::api::limits::Key;
use crate::api::linger::{self, LingeringStream};
use crate::api::metrics::{CloseInitiator, Limit};
use crate::api::query::Query;
use crate::api::{full, ApiError, Body, Client, State, StreamAdmission};
use crate::auth::{Access, Principal};
use crate::events::{self, Channel};
use crate::model::{format_time, now_micros};
use crate::store::{Feed, Pulled};

/// Socket buffers sized for many small JSON frames: tungstenite's 128 KiB defaults cost
/// memory per client and zero-fill time on every read. The read buffer is zeroed whole
/// before every read, so all of it is resident for every client; clients send a few
/// small commands, and a larger one takes more reads (and leaves the buffer its size).
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 16 * 1024;
/// Largest message a client may send; client messages are small JSON commands.
pub const MAX_CLIENT_MESSAGE: usize = 16 * 1024;

const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL: u16 = 1002;
/// The code counted for a connection that ended without any Close frame.
const CLOSE_ABNORMAL: u16 = 1006;
const CLOSE_INVALID_DATA: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_STORAGE: u16 = 1011;
const CLOSE_PING_TIMEOUT: u16 = 4000;
const CLOSE_AUTH_FAILED: u16 = 4401;
const CLOSE_RATE_LIMITED: u16 = 4029;

/// How long a secure socket opened without a token waits for its `auth` message.
const AUTH_WAIT: Duration = Duration::from_secs(5);
const CLOSE_SLOW: u16 = 4008;

fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> ApiError {
        match e {
            SubscriptionError::UnknownChannel(name) => ApiError::unknown_channel(&name),
            SubscriptionError::Invalid(field) => ApiError::invalid(vec![field]),
        }
    }
}

/// Validates the request, answers 101, and starts the session once hyper hands over the
/// connection.
pub fn upgrade(
    mut req: Request<Incoming>,
    state: Arc<State>,
    from: Client,
    principal: Option<Principal>,
    secure: bool,
    admission: StreamAdmission,
) -> Result<Response<Body>, ApiError> {
    let peer = from.peer;
    super::check_origin(&req, &state)?;
    let request = SubscriptionRequest::from_query(&Query::parse(req.uri().query()))?;
    let response = create_response_with_body(&req, || full(""))
        .map_err(|e| ApiError::malformed(format!("Not a valid WebSocket upgrade: {e}")))?;
    let upgrading = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrading.await {
            Ok(upgraded) => {
                let mut session = Box::new(Session::new(state, request, peer));
                session.client = from.address;
                session.principal = principal;
                session.must_authenticate = secure && session.principal.is_none();
                if secure {
                    session.access = Access::Secure;
                }
                session.run(upgraded).await;
                // The session counted as a connection until now.
                drop(admission);
            }
            Err(e) => log::debug!("upgrade from {peer} failed: {e}"),
        }
    });
    Ok(response)
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Unique within a run and, with the start time in it, across restarts.
fn client_id(state: &State) -> String {
    let n = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{n}", state.started_at / 1_000_000)
}

struct Session {
    state: Arc<State>,
    request: SubscriptionRequest,
    subscription: Subscription,
    throttle: Option<Throttle>,
    peer: SocketAddr,
    /// The client's address: the peer's, or the one a trusted proxy forwarded for.
    client: IpAddr,
    client_id: String,
    outbox: Outbox,
    /// The token the client connected with, if any; rate limits are kept per token.
    principal: Option<Principal>,
    /// A secure socket opened without a token: its first message must be `auth`.
    must_authenticate: bool,
    /// What the socket needs its token to allow, checked again when tokens change.
    access: Access,
    /// While the client is parked with the fan-out: its place there, and its socket to
    /// watch for the client's next message.
    parked: Option<(Arc<Parking>, Arc<TcpStream>)>,
}

/// A session that ends while parked (a panic in one of its steps included) takes its
/// socket back, so that the fan-out stops writing to a connection nobody serves.
impl Drop for Session {
    fn drop(&mut self) {
        if let Some((parking, _)) = self.parked.take() {
            parking.unpark();
        }
    }
}

/// How a session ended.
enum End {
    /// The socket broke or the client left without a Close frame: nothing more is sent.
    Gone,
    /// The client sent a Close frame (its code, if it gave one): answer it and end.
    ClosedByClient(Option<u16>),
    /// Close with this code and reason, then wait for the client's Close.
    Close(u16, String),
    /// The client broke the protocol: close with this code and reason and end without
    /// waiting, as its framing can no longer be trusted.
    Fail(u16, String),
}

impl Session {
    fn new(state: Arc<State>, request: SubscriptionRequest, peer: SocketAddr) -> Session {
        let client_id = client_id(&state);
        let outbox = Outbox::new(state.realtime.client_queue, state.hub.queue_counters());
        let subscription = request.subscription.clone();
        Session {
            throttle: subscription
                .rate_ms
                .map(|ms| Throttle::new(Duration::from_millis(ms))),
            state,
            request,
            subscription,
            peer,
            client: peer.ip(),
            client_id,
            outbox,
            principal: None,
            must_authenticate: false,
            access: Access::Read,
            parked: None,
        }
    }

    /// Runs the session to its end. This future is the largest part of what a connected
    /// client holds, so it is kept small. A future reserves room for a value moved into
    /// it besides its caller's, and for each step it awaits, often without reusing one
    /// step's room for another: so the session comes boxed, the socket is made here
    /// rather than moved in, and the larger steps are boxed (following the feed, for the
    /// whole connection; answering, authenticating and closing, while they run).
    async fn run(mut self: Box<Self>, upgraded: Upgraded) {
        // The server serves every connection on this type; the socket itself is needed to
        // share it with the fan-out.
        let parts = match upgraded.downcast::<TokioIo<LingeringStream>>() {
            Ok(parts) => parts,
            Err(_) => {
                log::error!("WebSocket from {}: not a TCP connection; closed", self.peer);
                return;
            }
        };
        let stream = SharedStream::new(parts.io.into_inner().into_stream());
        // What hyper read past the request is copied out: its bytes share hyper's whole
        // read buffer, which would otherwise stay for the life of the connection.
        let read_past_request = parts.read_buf.to_vec();
        drop(parts.read_buf);
        let socket = WebSocketStream::from_partially_read(
            stream,
            read_past_request,
            Role::Server,
            Some(socket_config()),
        )
        .await;
        let mut connection = Connection::new(socket);
        let _drain = self.state.drain.clone();
        let mut registration = self.state.hub.register(&self.subscription.channel_list());

        if self.must_authenticate {
            if let Err(end) = Box::pin(self.authenticate(&mut connection)).await {
                drop(registration);
                Box::pin(self.end(end, connection)).await;
                return;
            }
        }
        let now = now_micros();
        let channels: Vec<&str> = self.subscription.channels.iter().copied().collect();
        self.send_text(protocol::connection_message(
            &channels.join(","),
            &self.client_id,
            now,
        ));
        self.send_text(protocol::stats_message(&self.state.hub.stats(), now));
        let end = match super::opening(&self.state.store, &self.request).await {
            Ok(opening) => {
                let mut feed = Feed::new(&self.state.hub, self.state.store.clone(), opening.start);
                // Until something is written, a client told to resume should resume from
                // where it started, not from the beginning.
                connection.delivered = feed.position();
                opening.messages.into_iter().for_each(|m| self.send_text(m));
                log::debug!(
                    "client {} ({}) connected to {}",
                    self.client_id,
                    self.peer,
                    channels.join(",")
                );
                Box::pin(self.follow(&mut feed, &mut connection, &mut registration)).await
            }
            Err(e) => End::Close(CLOSE_STORAGE, format!("storage unavailable: {e}")),
        };
        // A closing client gets no more events and no longer counts as connected.
        drop(registration);
        Box::pin(self.end(end, connection)).await;
        log::debug!("client {} disconnected", self.client_id);
    }

    /// Runs the close handshake that `end` calls for, and counts the close.
    async fn end(&self, end: End, mut connection: Connection) {
        let counters = &self.state.counters;
        match end {
            End::Gone => counters.count_close(CLOSE_ABNORMAL, CloseInitiator::Client),
            End::ClosedByClient(code) => {
                counters.count_close(code.unwrap_or(CLOSE_NORMAL), CloseInitiator::Client);
                connection.answer_close(code.is_some()).await;
            }
            End::Close(code, reason) => {
                counters.count_close(code, CloseInitiator::Server);
                if code == CLOSE_SLOW {
                    for channel in self.subscription.channel_list() {
                        self.state.hub.count_slow_disconnect(channel);
                    }
                    log::info!(
                        "client {} ({}) disconnected: {reason}",
                        self.client_id,
                        self.peer
                    );
                }
                // What is queued goes first, then the Close frame, which a client that
                // is still there answers.
                if connection
                    .close(&self.outbox, &self.state.hub, code, reason)
                    .await
                {
                    connection.await_client_close().await;
                }
            }
            End::Fail(code, reason) => {
                counters.count_close(code, CloseInitiator::Server);
                log::debug!("client {} ({}): {reason}", self.client_id, self.peer);
                connection
                    .close(&self.outbox, &self.state.hub, code, reason)
                    .await;
                linger::drain(connection.io()).await;
            }
        }
    }

    /// Waits for the first message of a secure socket opened without a token: it must be
    /// `{"type": "auth", "token": "..."}` and arrive within [`AUTH_WAIT`]. Answers with an
    /// `auth_result`; otherwise says how the session ends.
    async fn authenticate(&mut self, connection: &mut Connection) -> Result<(), End> {
        let text = match tokio::time::timeout(AUTH_WAIT, connection.read()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(End::ClosedByClient(frame.map(|f| f.code.into())))
            }
            Ok(Some(Err(e))) => return Err(failure(&e)),
            Ok(None) => return Err(End::Gone),
            _ => {
                return Err(self.refuse(format!(
                    "authentication failed: no auth message within {AUTH_WAIT:?}"
                )))
            }
        };
        let message: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let token = match (message.get("type").and_then(Value::as_str), message.get("token").and_then(Value::as_str)) {
            (Some("auth"), Some(token)) => token.to_owned(),
            _ => return Err(self.refuse("authentication failed: the first message must be {\"type\": \"auth\", \"token\": ...}".into())),
        };
        match self.state.auth.identify(&token).await {
            Ok(Some(principal)) => {
                self.send_text(
                    json!({"type": "auth_result", "id": id, "ok": true, "token": principal.name,
                           "scope": principal.scope, "timestamp": format_time(now_micros())})
                    .to_string(),
                );
                self.principal = Some(principal);
                Ok(())
            }
            Ok(None) => Err(self.refuse("authentication failed: invalid or revoked token".into())),
            Err(e) => Err(self.refuse(format!("authentication failed: {e}"))),
        }
    }

    /// Counts a refused authentication; the session closes with 4401 and `reason`.
    fn refuse(&self, reason: String) -> End {
        self.state.counters.hit(Limit::Unauthorized);
        End::Close(CLOSE_AUTH_FAILED, reason)
    }

    /// Takes one message from the client's rate budget: its token's, or its address's
    /// when it has none.
    fn within_rate(&self) -> bool {
        let key = Key::of(self.client, self.principal.as_ref());
        let allowed = self
            .state
            .socket_limiter
            .take(&[key], Instant::now())
            .is_ok();
        if !allowed {
            self.state.counters.hit(Limit::SocketMessageRate);
        }
        allowed
    }

    fn send_text(&self, text: String) {
        // Control messages are few (one per client message) and the queue is bounded:
        // a client flooding requests without reading answers overflows and is closed.
        let _ = self.outbox.push([Frame::Text(text.into())]);
    }

    /// Follows the feed and the client until the session ends, and takes the client back
    /// from the fan-out if it is parked there then.
    async fn follow(
        &mut self,
        feed: &mut Feed,
        connection: &mut Connection,
        registration: &mut events::Registration,
    ) -> End {
        let end = self.follow_until_end(feed, connection, registration).await;
        self.unpark(feed, connection);
        end
    }

    /// Whether the client can be left to the fan-out: it is live and has every event
    /// (so nothing it should get first waits anywhere) and is not throttled (the
    /// throttle decides when it gets what).
    fn may_park(&self, feed: &Feed, channels: &[Channel], connection: &mut Connection) -> bool {
        self.state.fanout.is_running()
            && self.throttle.is_none()
            && feed.is_caught_up(channels)
            && self.outbox.is_empty()
            && connection.is_idle()
    }

    /// Takes the client back from the fan-out, if it is parked: the feed moves past what
    /// the fan-out sent, and what it left half-written is written first.
    fn unpark(&mut self, feed: &mut Feed, connection: &mut Connection) {
        if let Some((parking, _)) = self.parked.take() {
            let unparked = parking.unpark();
            feed.advance_to(unparked.position);
            connection.take_back(unparked);
        }
    }

    async fn follow_until_end(
        &mut self,
        feed: &mut Feed,
        connection: &mut Connection,
        registration: &mut events::Registration,
    ) -> End {
        let mut shutdown = self.state.shutdown.clone();
        let ping_every = Duration::from_secs(self.state.realtime.ping_interval_s);
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let mut answered_ping = true;
        let mut tokens = self.state.auth.live_tokens();
        tokens.mark_changed();
        loop {
            // Whatever woke a parked session, it takes its socket back before it writes
            // or reads.
            self.unpark(feed, connection);
            // What the last turn queued goes out now, as far as the socket takes it.
            if !connection.write_now(&self.outbox, &self.state.hub).await {
                return End::Gone;
            }
            // The subscription changes only in the turn's answer to a client message.
            let channels = self.subscription.channel_list();
            if self.may_park(feed, &channels, connection) {
                let socket = connection.shared_socket();
                let parking = self.state.fanout.park(
                    feed.follows_readings(),
                    socket.clone(),
                    self.subscription.clone(),
                    feed.position(),
                );
                self.parked = Some((parking, socket));
                // An event published since the feed was found caught up may have passed
                // the fan-out before the client joined it: the session delivers it.
                // Anything published later reaches the fan-out after the client did.
                if !feed.is_caught_up(&channels) {
                    self.unpark(feed, connection);
                }
            }
            let parked = self.parked.clone();
            let stalls_at = connection.stalls_at();
            let replaying = feed.is_replaying();
            let may_pull = !replaying || self.outbox.has_room();
            let pulls = may_pull && !channels.is_empty() && parked.is_none();
            let due = self.throttle.as_ref().and_then(Throttle::next_due);
            tokio::select! {
                _ = shutdown.recv() => return End::Close(CLOSE_GOING_AWAY, "server shutting down".into()),
                // The socket may have taken something since, or takes it now; then it
                // is not stalled yet.
                _ = sleep_until(stalls_at), if stalls_at.is_some() => {
                    if !connection.write_now(&self.outbox, &self.state.hub).await {
                        return End::Gone;
                    }
                    if connection.stalled() {
                        return End::Close(CLOSE_SLOW, self.resume_hint(connection));
                    }
                }
                batch = feed.next(&channels, self.batch_limit(replaying)), if pulls => {
                    let events = match batch {
                        Ok(Pulled::Events(events)) => events,
                        Ok(Pulled::Removed { since, oldest_seq, last_seq }) => {
                            if let Some(throttle) = &mut self.throttle {
                                throttle.drop_held();
                            }
                            let resync = super::resync_after_removal(
                                &format!("WebSocket client {}", self.client_id),
                                since,
                                oldest_seq,
                                last_seq,
                            );
                            // Never left out: the next events start at `oldest_seq`.
                            if self.outbox.push([Frame::Text(resync.into())]).is_err() {
                                return End::Close(CLOSE_SLOW, self.resume_hint(connection));
                            }
                            continue;
                        }
                        Err(e) => return End::Close(CLOSE_STORAGE, format!("storage unavailable: {e}")),
                    };
                    let now = Instant::now();
                    let frames: Vec<Frame> = events
                        .into_iter()
                        .filter(|e| self.subscription.matches(e))
                        .flat_map(|e| match &mut self.throttle {
                            Some(throttle) => throttle.admit(e, now),
                            None => None.into_iter().chain(Some(e)),
                        })
                        .map(Frame::Event)
                        .collect();
                    if self.outbox.push(frames).is_err() {
                        return End::Close(CLOSE_SLOW, self.resume_hint(connection));
                    }
                    // The pull where the feed moved between the hub and the store is
                    // chunked too: the one that found a replay caught up, or a live
                    // batch that ran into a lag.
                    if replaying || feed.is_replaying() {
                        connection.chunk_next_batch();
                    }
                    // A page of stored events is often ready at once, and a socket that
                    // takes each at once would let one task replay thousands in a
                    // single run: it steps aside after each page, so that live clients
                    // and REST answers are not held up behind a resuming client.
                    if feed.is_replaying() {
                        step_aside().await;
                    }
                }
                _ = sleep_until(due), if due.is_some() => {
                    if let Some(throttle) = &mut self.throttle {
                        let released = throttle.release(Instant::now());
                        if self.outbox.push(released.into_iter().map(Frame::Event)).is_err() {
                            return End::Close(CLOSE_SLOW, self.resume_hint(connection));
                        }
                    }
                }
                // The client has sent something, or the fan-out handed it back.
                _ = wait_parked(parked.as_ref()), if parked.is_some() => {}
                step = connection.next(&self.outbox, &self.state.hub, !may_pull), if parked.is_none() => match step {
                    Step::Room => {}
                    Step::Broken | Step::Read(None) => return End::Gone,
                    Step::Read(Some(Ok(Message::Text(text)))) => {
                        answered_ping = true;
                        if !self.within_rate() {
                            return End::Close(CLOSE_RATE_LIMITED, "rate limited: too many messages".into());
                        }
                        Box::pin(self.answer(&text, feed, registration)).await;
                    }
                    Step::Read(Some(Ok(Message::Binary(_)))) => {
                        self.send_text(protocol::error_message(None, "unsupported", "Binary messages are not supported; send JSON text", now_micros()));
                    }
                    Step::Read(Some(Ok(Message::Close(frame)))) => {
                        return End::ClosedByClient(frame.map(|f| f.code.into()));
                    }
                    // tungstenite has queued the pong; the next read or write sends it.
                    Step::Read(Some(Ok(_))) => answered_ping = true,
                    Step::Read(Some(Err(e))) => {
                        if matches!(e, WsError::Capacity(_)) {
                            self.state.counters.hit(Limit::SocketMessageSize);
                        }
                        return failure(&e);
                    }
                },
                Ok(()) = tokens.changed(), if self.principal.is_some() => {
                    let live = tokens.borrow_and_update().clone();
                    if let Some(principal) = &self.principal {
                        if let Err(reason) = self.state.auth.still_allowed(principal, self.access, &live).await {
                            log::info!("client {} ({}) closed: {reason}", self.client_id, self.peer);
                            return End::Close(CLOSE_AUTH_FAILED, reason);
                        }
                    }
                }
                _ = ping.tick() => {
                    self.unpark(feed, connection);
                    if !answered_ping {
                        return End::Close(CLOSE_PING_TIMEOUT, "no answer to ping".into());
                    }
                    answered_ping = false;
                    if self.outbox.push([Frame::Ping]).is_err() {
                        return End::Close(CLOSE_SLOW, self.resume_hint(connection));
                    }
                }
            }
        }
    }

    /// Most events taken from the feed at once: half the queue, so that a live burst is
    /// coalesced before it overflows; while replaying, a page of [`REPLAY_AHEAD`] at most,
    /// so that what a replaying client holds stays small (see [`Outbox::has_room`]).
    fn batch_limit(&self, replaying: bool) -> usize {
        let half = (self.state.realtime.client_queue / 2).max(1);
        if replaying {
            half.min(REPLAY_AHEAD)
        } else {
            half
        }
    }

    fn resume_hint(&self, connection: &Connection) -> String {
        format!("too slow; reconnect with since={}", connection.delivered)
    }

    /// Answers one client message; every message gets an answer, a result or an error,
    /// carrying the message's `id`.
    async fn answer(
        &mut self,
        text: &str,
        feed: &mut Feed,
        registration: &mut events::Registration,
    ) {
        let now = now_micros();
        let message: Value = match serde_json::from_str(text) {
            Ok(value @ Value::Object(_)) => value,
            _ => {
                self.send_text(protocol::error_message(
                    None,
                    "malformed",
                    "Messages must be JSON objects",
                    now,
                ));
                return;
            }
        };
        let id = message.get("id");
        let action = message.get("type").and_then(Value::as_str);
        match action {
            Some("ping") => {
                self.send_text(
                    json!({"type": "pong", "id": id, "timestamp": format_time(now)}).to_string(),
                );
            }
            Some(action @ ("subscribe" | "unsubscribe")) => {
                match subscription::apply_message(&self.subscription, action, &message) {
                    Ok((next, snapshot)) => {
                        if next.channels != self.subscription.channels {
                            *registration = self.state.hub.register(&next.channel_list());
                        }
                        if next.rate_ms != self.subscription.rate_ms {
                            self.throttle = next
                                .rate_ms
                                .map(|ms| Throttle::new(Duration::from_millis(ms)));
                        }
                        self.subscription = next;
                        self.send_text(
                            json!({"type": "result", "id": id, "action": action, "ok": true,
                                   "subscription": self.subscription, "timestamp": format_time(now)})
                            .to_string(),
                        );
                        if snapshot {
                            match super::snapshot(&self.state.store, &self.subscription).await {
                                Ok((text, seq)) => {
                                    self.send_text(text);
                                    feed.skip_to(seq);
                                }
                                Err(e) => self.send_text(protocol::error_message(
                                    id,
                                    "unavailable",
                                    &e.to_string(),
                                    now,
                                )),
                            }
                        }
                    }
                    Err(SubscriptionError::UnknownChannel(name)) => {
                        self.send_text(protocol::error_message(
                            id,
                            "unknown_channel",
                            &format!(
                                "Unknown channel '{name}'; expected sensors, readings or general"
                            ),
                            now,
                        ))
                    }
                    Err(SubscriptionError::Invalid(field)) => {
                        self.send_text(protocol::error_message(
                            id,
                            "invalid",
                            &format!("{}: {}", field.field, field.message),
                            now,
                        ))
                    }
                }
            }
            Some(other) => self.send_text(protocol::error_message(
                id,
                "unknown_action",
                &format!("Unknown message type '{other}'"),
                now,
            )),
            None => self.send_text(protocol::error_message(
                id,
                "malformed",
                "Messages need a \"type\"",
                now,
            )),
        }
    }
}

/// How the session ends for a read error: the protocol errors close with their code,
/// anything else means the connection is gone.
fn failure(error: &WsError) -> End {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match error {
        WsError::Capacity(_) => End::Fail(CLOSE_TOO_BIG, "message too large".into()),
        WsError::Utf8(_) => End::Fail(CLOSE_INVALID_DATA, "text message is not valid UTF-8".into()),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(e) => End::Fail(CLOSE_PROTOCOL, format!("protocol error: {e}")),
        _ => End::Gone,
    }
}

/// Lets the tasks queued on this worker run before this one goes on. Unlike
/// `tokio::task::yield_now`, which waits for the next poll of the reactor, the task
/// goes straight to the back of the run queue.
async fn step_aside() {
    let mut stepped = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut stepped, true) {
            std::task::Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Until the parked client sends something or the fan-out hands it back.
async fn wait_parked(parked: Option<&(Arc<Parking>, Arc<TcpStream>)>) {
    let Some((parking, socket)) = parked else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = parking.handed_back() => {}
        _ = socket::readable(socket) => {}
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
