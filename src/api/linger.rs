//! Lingering close: ending a connection whose client may still be sending.
//!
//! When the server answers before it has read the whole request (a body over the limit,
//! a write without a token, a body that arrives too slowly) and then closes, the client's
//! unread bytes make the kernel answer with a reset, and a client that writes its whole
//! request before reading (Python's `urllib` and `requests` do) gets "connection reset"
//! instead of the answer that was already on its way. So the write side is shut first and
//! what the client still sends is read and discarded, up to a bound in bytes and time, as
//! nginx's `lingering_close` does; only then is the socket closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::Admission;

/// Longest a closing connection is drained.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// Most bytes read and discarded from a closing connection.
const LINGER_BYTES: usize = 8 * 1024 * 1024;

/// Shuts the write side of `io`, then reads and discards what the peer still sends until
/// it closes its side, [`LINGER_BYTES`] were read or [`LINGER_TIME`] passed.
pub async fn drain<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) {
    let discard = async {
        io.shutdown().await?;
        let mut buffer = vec![0u8; 16 * 1024];
        let mut total = 0;
        while total < LINGER_BYTES {
            match io.read(&mut buffer).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(LINGER_TIME, discard).await;
}

/// A connection's socket that, once hyper is done with it, lingers when the connection
/// was answered early (see [`Admission::linger_on_close`]) and closes at once otherwise.
/// The connection keeps its [`Admission`] while it lingers, so lingering sockets count
/// against the connection limits like any other.
pub struct LingeringStream {
    /// Present until dropped.
    stream: Option<TcpStream>,
    admission: Arc<Admission>,
}

impl LingeringStream {
    pub fn new(stream: TcpStream, admission: Arc<Admission>) -> LingeringStream {
        LingeringStream {
            stream: Some(stream),
            admission,
        }
    }

    /// The socket itself, for a connection that outlives hyper (an upgraded one), which
    /// then closes it as it sees fit: it no longer lingers on drop.
    pub fn into_stream(mut self) -> TcpStream {
        self.stream
            .take()
            .expect("the stream is taken only when dropped")
    }

    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(
            self.get_mut()
                .stream
                .as_mut()
                .expect("the stream is taken only when dropped"),
        )
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        if !self.admission.lingers() {
            return;
        }
        // Outside a runtime (it is shutting down) the socket just closes.
        if let (Some(stream), Ok(runtime)) =
            (self.stream.take(), tokio::runtime::Handle::try_current())
        {
            let admission = self.admission.clone();
            runtime.spawn(async move {
                drain(stream).await;
                drop(admission);
            });
        }
    }
}

impl AsyncRead for LingeringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}
