//! A WebSocket client's socket and the frames on their way into it.
//!
//! The session task that follows the client's feed writes to the socket itself, as far
//! as the socket takes frames without waiting, and goes on with its feed and the
//! client's messages while the socket is full; what does not fit stays in its
//! [`Outbox`], where it is coalesced or overflows. One task per client, so an event
//! reaches a client's socket with one wake-up, the one that brought it.
//!
//! A socket that accepts nothing for [`WRITE_TIMEOUT`] belongs to a client that cannot
//! keep up; it is not written to again.
//!
//! While the client is idle its session may lend the socket to the
//! [`fanout`](super::fanout), which writes whole frames into it past tungstenite; the
//! socket is therefore shared ([`SharedStream`]), and the session makes sure that
//! tungstenite has nothing half-written when it lends it and that what the fan-out left
//! half-written goes out before anything else when it takes it back.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Buf;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::fanout::{Unparked, Unwritten};
use super::outbox::{Frame, Outbox};
use crate::events::{Channel, Hub};

/// A client whose socket accepts nothing for this long cannot keep up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest the server waits for the client's answer to a Close it sent.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The frames taken with a page of a replay are flushed each time this many bytes of
/// them wait. tungstenite's write buffer keeps the largest size it ever reached for the
/// life of the connection (4 to 8 KiB this way), and a room of dashboards that resumed
/// together would otherwise each keep room for a page of the replay once live. Live
/// batches are not cut up: under heavy fan-out a client's batches often pass this size,
/// and more writes per batch cost deliveries (see PERFORMANCE.md).
const REPLAY_CHUNK: usize = 4 * 1024;

/// A Close frame with code 1000, as a server sends it (unmasked).
const NORMAL_CLOSE_FRAME: [u8; 4] = [0x88, 0x02, 0x03, 0xE8];

type Socket = WebSocketStream<SharedStream>;

/// Waits until the client sends something (or the connection ends), without reading it:
/// for a session that has lent its socket, which must take it back before tungstenite
/// reads.
pub async fn readable(socket: &TcpStream) {
    let _ = poll_fn(|cx| socket.poll_read_ready(cx)).await;
}

/// A client's TCP socket, which its session reads and writes through tungstenite and
/// the fan-out writes to while the session has lent it.
pub struct SharedStream(Arc<TcpStream>);

impl SharedStream {
    pub fn new(stream: TcpStream) -> SharedStream {
        SharedStream(Arc::new(stream))
    }
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // A read that would block clears the readiness, and the next poll waits.
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts the write side, as tokio's own stream does, whoever else holds the socket.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// What the socket gave while the session waited on it.
pub enum Step {
    /// A message from the client, an error reading one, or `None` when it is gone.
    Read(Option<Result<Message, WsError>>),
    /// Frames that waited in the outbox were taken to be written: the outbox has room
    /// for more, to be queued while those go out.
    Room,
    /// Writing failed: the connection is gone.
    Broken,
}

pub struct Connection {
    socket: Socket,
    /// A message tungstenite had read when the session looked whether the client was
    /// idle, for the next read.
    read_ahead: Option<Option<Result<Message, WsError>>>,
    /// What the fan-out wrote only part of: it goes out before anything else.
    unwritten: Option<Unwritten>,
    /// Frames taken from the outbox and not yet handed to the socket.
    writing: VecDeque<Frame>,
    /// Frames were handed to the socket and not yet flushed.
    unflushed: bool,
    /// Payload bytes handed to the socket since the last flush.
    unflushed_bytes: usize,
    /// The frames being written are flushed every [`REPLAY_CHUNK`].
    chunked: bool,
    /// The next frames taken from the outbox are to be written in chunks.
    chunk_next: bool,
    /// Events handed over since the last flush, per channel, and the newest `seq`.
    sent: [u64; 3],
    newest: Option<u64>,
    /// When the socket started refusing to take more, while it still does.
    blocked_since: Option<Instant>,
    /// Frames were taken from the outbox since the session last looked at it.
    took_from_outbox: bool,
    /// The newest `seq` written to the socket: where the client resumes from.
    pub delivered: u64,
}

impl Connection {
    pub fn new(socket: Socket) -> Connection {
        Connection {
            socket,
            read_ahead: None,
            unwritten: None,
            writing: VecDeque::new(),
            unflushed: false,
            unflushed_bytes: 0,
            chunked: false,
            chunk_next: false,
            sent: [0; 3],
            newest: None,
            blocked_since: None,
            took_from_outbox: false,
            delivered: 0,
        }
    }

    /// The socket, to lend to the fan-out.
    pub fn shared_socket(&self) -> Arc<TcpStream> {
        self.socket.get_ref().0.clone()
    }

    /// Whether everything queued is written and flushed, tungstenite has nothing of its
    /// own to send (a pong) and has read no message that waits: then the socket may be
    /// lent to the fan-out, which writes past tungstenite. A message found waiting is
    /// kept for the next read.
    pub fn is_idle(&mut self) -> bool {
        let quiet = self.writing.is_empty()
            && !self.unflushed
            && self.blocked_since.is_none()
            && self.unwritten.is_none()
            && self.read_ahead.is_none();
        if !quiet {
            return false;
        }
        // Polled without a waker: the session waits on the socket itself next, and
        // polls tungstenite again with its own waker if the socket is not lent.
        let mut cx = Context::from_waker(Waker::noop());
        if !matches!(
            Pin::new(&mut self.socket).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ) {
            // What tungstenite holds (a pong) is flushed by the next write, with the
            // session's waker.
            self.unflushed = true;
            return false;
        }
        match Pin::new(&mut self.socket).poll_next(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(message) => {
                self.read_ahead = Some(message);
                false
            }
        }
    }

    /// Takes the socket back from the fan-out: what it delivered counts as delivered,
    /// and what it left half-written goes out first.
    pub fn take_back(&mut self, unparked: Unparked) {
        self.delivered = self.delivered.max(unparked.delivered);
        self.unwritten = unparked.unwritten;
    }

    /// When the socket will have accepted nothing for [`WRITE_TIMEOUT`], if it is full.
    pub fn stalls_at(&self) -> Option<Instant> {
        self.blocked_since.map(|since| since + WRITE_TIMEOUT)
    }

    /// Whether the socket has accepted nothing for [`WRITE_TIMEOUT`].
    pub fn stalled(&self) -> bool {
        self.stalls_at().is_some_and(|at| Instant::now() >= at)
    }

    /// The session queued a page of a replay: the frames taken with it are flushed
    /// every [`REPLAY_CHUNK`].
    pub fn chunk_next_batch(&mut self) {
        self.chunk_next = true;
    }

    /// Writes what the outbox holds as far as the socket takes it now, without waiting.
    /// False if the socket failed.
    pub async fn write_now(&mut self, outbox: &Outbox, hub: &Hub) -> bool {
        let polled = poll_fn(|cx| Poll::Ready(self.poll_write(cx, outbox, hub))).await;
        // The session looks at the outbox next anyway.
        self.took_from_outbox = false;
        !matches!(polled, Poll::Ready(Err(_)))
    }

    /// Waits for the client's next message while writing what the outbox holds; with
    /// `until_room`, also until frames leave the outbox. A session that waits for room
    /// asks for it, and only then: this wait is cancelled when another one ends first,
    /// and a session reading its feed must not have that read cancelled for room it
    /// does not need.
    pub async fn next(&mut self, outbox: &Outbox, hub: &Hub, until_room: bool) -> Step {
        poll_fn(|cx| {
            if let Poll::Ready(Err(_)) = self.poll_write(cx, outbox, hub) {
                return Poll::Ready(Step::Broken);
            }
            if std::mem::take(&mut self.took_from_outbox) && until_room {
                return Poll::Ready(Step::Room);
            }
            // A read may make tungstenite send a pong, which must not land in the middle
            // of a frame the fan-out left half-written.
            if self.unwritten.is_some() {
                return Poll::Pending;
            }
            if let Some(message) = self.read_ahead.take() {
                return Poll::Ready(Step::Read(message));
            }
            Pin::new(&mut self.socket).poll_next(cx).map(Step::Read)
        })
        .await
    }

    /// Reads the client's next message and nothing else, for before frames are queued.
    pub async fn read(&mut self) -> Option<Result<Message, WsError>> {
        if let Some(message) = self.read_ahead.take() {
            return message;
        }
        self.socket.next().await
    }

    /// Hands queued frames to the socket and flushes them, as far as the socket takes
    /// them now. Ready once the outbox is empty and everything is flushed; pending while
    /// the socket is full.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        outbox: &Outbox,
        hub: &Hub,
    ) -> Poll<Result<(), WsError>> {
        ready!(self.poll_unwritten(cx))?;
        loop {
            while !self.writing.is_empty() {
                if self.chunked && self.unflushed_bytes >= REPLAY_CHUNK {
                    ready!(self.poll_flush_counted(cx, hub))?;
                }
                ready!(self.poll_socket(cx, |socket, cx| socket.poll_ready(cx)))?;
                if let Some(message) = self.writing.pop_front().and_then(|f| self.message(f)) {
                    let bytes = message.len();
                    Pin::new(&mut self.socket).start_send(message)?;
                    self.unflushed = true;
                    self.unflushed_bytes += bytes;
                }
            }
            if self.unflushed {
                ready!(self.poll_flush_counted(cx, hub))?;
            }
            self.writing = outbox.take();
            if self.writing.is_empty() {
                return Poll::Ready(Ok(()));
            }
            self.chunked = std::mem::take(&mut self.chunk_next);
            self.took_from_outbox = true;
        }
    }

    /// Writes what the fan-out left half-written, past tungstenite, whose buffer was empty
    /// when the socket was lent and has stayed so.
    fn poll_unwritten(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        while let Some(unwritten) = &mut self.unwritten {
            if !unwritten.bytes.has_remaining() {
                self.delivered = self.delivered.max(unwritten.newest);
                self.unwritten = None;
                break;
            }
            let polled = Pin::new(self.socket.get_mut()).poll_write(cx, &unwritten.bytes);
            match polled {
                Poll::Pending => {
                    self.blocked_since.get_or_insert_with(Instant::now);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(WsError::ConnectionClosed)),
                Poll::Ready(Ok(n)) => {
                    self.blocked_since = None;
                    unwritten.bytes.advance(n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(WsError::Io(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Flushes what was handed to the socket, and counts it as sent.
    fn poll_flush_counted(&mut self, cx: &mut Context<'_>, hub: &Hub) -> Poll<Result<(), WsError>> {
        ready!(self.poll_socket(cx, |socket, cx| socket.poll_flush(cx)))?;
        self.unflushed = false;
        self.unflushed_bytes = 0;
        self.count_flushed(hub);
        Poll::Ready(Ok(()))
    }

    /// Polls the socket for room, noting when it started refusing.
    fn poll_socket(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut Socket>, &mut Context<'_>) -> Poll<Result<(), WsError>>,
    ) -> Poll<Result<(), WsError>> {
        let polled = poll(Pin::new(&mut self.socket), cx);
        if polled.is_pending() {
            self.blocked_since.get_or_insert_with(Instant::now);
        } else {
            self.blocked_since = None;
        }
        polled
    }

    fn message(&mut self, frame: Frame) -> Option<Message> {
        Some(match frame {
            Frame::Event(event) => {
                // A frame is made from text, so the check passes; it reads the bytes once
                // and does not copy them. Were it ever to fail, the event is left out and
                // said so, never sent as an empty message.
                let Ok(text) = Utf8Bytes::try_from(event.frame.shared()) else {
                    log::error!(
                        "event {} has a frame that is not UTF-8; not sent",
                        event.seq
                    );
                    return None;
                };
                self.sent[event.channel.index()] += 1;
                // A live-only notice has `seq` 0 and must not hide what came before.
                self.newest = self.newest.max(Some(event.seq));
                Message::Text(text)
            }
            Frame::Text(text) => Message::Text(text),
            Frame::Ping => Message::Ping(Default::default()),
        })
    }

    fn count_flushed(&mut self, hub: &Hub) {
        if let Some(seq) = self.newest.take() {
            self.delivered = self.delivered.max(seq);
        }
        for channel in Channel::ALL {
            let sent = std::mem::take(&mut self.sent[channel.index()]);
            if sent > 0 {
                hub.count_sent(channel, sent);
            }
        }
    }

    /// Writes what is queued, then a Close frame with `code` and `reason`, before the
    /// socket has accepted nothing for [`WRITE_TIMEOUT`] (counted from when it started
    /// refusing, if it already has); true if the Close was sent.
    pub async fn close(&mut self, outbox: &Outbox, hub: &Hub, code: u16, reason: String) -> bool {
        let deadline = self
            .stalls_at()
            .unwrap_or_else(|| Instant::now() + WRITE_TIMEOUT);
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(reason),
        };
        let close = async {
            poll_fn(|cx| self.poll_write(cx, outbox, hub)).await?;
            self.socket.send(Message::Close(Some(frame))).await
        };
        matches!(tokio::time::timeout_at(deadline, close).await, Ok(Ok(())))
    }

    /// After the server's Close: reads and drops what the client still sends until its
    /// Close arrives, for at most [`CLOSE_WAIT`].
    pub async fn await_client_close(&mut self) {
        match self.read_ahead.take() {
            // Anything but the Close is dropped, as below.
            Some(Some(Ok(message))) if !message.is_close() => {}
            Some(_) => return,
            None => {}
        }
        let answered = async {
            while let Some(Ok(message)) = self.socket.next().await {
                if message.is_close() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, answered).await;
    }

    /// Answers a client's Close and ends the connection. tungstenite has queued its
    /// answer, which echoes the client's code, and sends it on the next flush. A Close
    /// without a code would be echoed without one, which clients report as 1005 ("no
    /// status"): it is answered with 1000 instead, written past tungstenite, whose queued
    /// echo is then never sent; unless part of a frame still waits in tungstenite's
    /// buffer, which the raw frame would land in the middle of.
    pub async fn answer_close(mut self, client_gave_code: bool) {
        let echo = client_gave_code || self.unflushed;
        let answer = async {
            poll_fn(|cx| self.poll_unwritten(cx))
                .await
                .map_err(io::Error::other)?;
            let socket = &mut self.socket;
            if echo {
                socket.flush().await.map_err(std::io::Error::other)?;
            } else {
                socket.get_mut().write_all(&NORMAL_CLOSE_FRAME).await?;
            }
            socket.get_mut().shutdown().await
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, answer).await;
    }

    /// The connection under the WebSocket, for ending it.
    pub fn io(&mut self) -> &mut SharedStream {
        self.socket.get_mut()
    }
}
