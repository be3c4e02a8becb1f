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

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

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

type Socket = WebSocketStream<TokioIo<Upgraded>>;

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
            Pin::new(&mut self.socket).poll_next(cx).map(Step::Read)
        })
        .await
    }

    /// Reads the client's next message and nothing else, for before frames are queued.
    pub async fn read(&mut self) -> Option<Result<Message, WsError>> {
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
        let socket = &mut self.socket;
        let answer = async {
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
    pub fn io(&mut self) -> &mut TokioIo<Upgraded> {
        self.socket.get_mut()
    }
}
