//! The daemon's side of the control socket.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::{json_line, socket_path, Answer, Reply, Request, MAX_REQUEST};
use crate::auth::tokens;
use crate::shutdown::{DrainGuard, Shutdown};
use crate::store::{Store, StoreError};

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one write of a copy may wait for the client to read. A copy holds a read
/// snapshot, which keeps checkpoints from finishing, so a client that stops reading is
/// let go.
const COPY_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections answered at once. The command line makes one per command.
const CONNECTIONS: usize = 8;

/// A bound control socket, not yet serving.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The daemon's user, which owns the socket: who may use it besides root.
    owner: u32,
    /// Connections being answered; past [`CONNECTIONS`] a new one is refused.
    connections: Arc<Semaphore>,
    /// The one copy of the database being sent, if any.
    copying: Arc<Semaphore>,
}

impl ControlSocket {
    /// Binds the socket in `data_dir`. A socket file that nobody answers on (left by a
    /// daemon that did not stop cleanly) is replaced; one that answers is another
    /// daemon's, and is left alone. The socket is made under a name of its own and renamed
    /// into place once only its owner may use it, so nobody connects in between.
    pub fn bind(data_dir: &Path) -> io::Result<ControlSocket> {
        let path = socket_path(data_dir);
        let named = |e: io::Error| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        };
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(named(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another daemon answers on it",
            )));
        }
        let making = path.with_extension(format!("sock.{}", std::process::id()));
        let _ = fs::remove_file(&making);
        let listener = UnixListener::bind(&making).map_err(named)?;
        let placed = fs::set_permissions(&making, fs::Permissions::from_mode(0o600))
            .and_then(|()| fs::metadata(&making))
            .and_then(|made| fs::rename(&making, &path).map(|()| made.uid()));
        match placed {
            Ok(owner) => Ok(ControlSocket {
                listener,
                path,
                owner,
                connections: Arc::new(Semaphore::new(CONNECTIONS)),
                copying: Arc::new(Semaphore::new(1)),
            }),
            Err(e) => {
                let _ = fs::remove_file(&making);
                Err(named(e))
            }
        }
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers requests until shutdown, then removes the socket file. Each connection
    /// holds a clone of `guard`, so storage closes after the commands in flight.
    pub async fn serve(
        self,
        store: Store,
        data_dir: PathBuf,
        mut shutdown: Shutdown,
        guard: DrainGuard,
    ) {
        loop {
            let stream = tokio::select! {
                _ = shutdown.recv() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, most likely: wait for some to close.
                        log::warn!("control socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(answering) = self.connections.clone().try_acquire_owned() else {
                tokio::spawn(refuse(
                    stream,
                    "the daemon is answering other commands; try again",
                ));
                continue;
            };
            let connection = Connection {
                store: store.clone(),
                data_dir: data_dir.clone(),
                owner: self.owner,
                copying: self.copying.clone(),
                shutdown: shutdown.clone(),
                _answering: answering,
                _guard: guard.clone(),
            };
            tokio::spawn(connection.answer(stream));
        }
        drop(self.listener);
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("control socket {} not removed: {e}", self.path.display());
        }
    }
}

/// One client of the control socket.
struct Connection {
    store: Store,
    data_dir: PathBuf,
    owner: u32,
    copying: Arc<Semaphore>,
    /// A copy in progress stops at the next page when shutdown starts.
    shutdown: Shutdown,
    _answering: OwnedSemaphorePermit,
    _guard: DrainGuard,
}

impl Connection {
    async fn answer(self, mut stream: UnixStream) {
        let allowed = match stream.peer_cred() {
            Ok(peer) => peer.uid() == self.owner || peer.uid() == 0,
            Err(e) => {
                log::warn!("control socket: whose connection is it? {e}");
                false
            }
        };
        if !allowed {
            return refuse(
                stream,
                "only the daemon's user and root may use its control socket",
            )
            .await;
        }
        let request = match read_request(&mut stream).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(why) => {
                let _ = send(&mut stream, &Answer::Error(why)).await;
                return;
            }
        };
        let answer = match request {
            Request::Backup => return self.send_copy(stream).await,
            Request::CreateToken { name, scope } => tokens::create(&self.store, &name, scope)
                .await
                .map(|token| {
                    log::info!("token {name:?} created with scope {scope} (command line)");
                    Reply::Created { token }
                }),
            Request::ListTokens => tokens::list(&self.store)
                .await
                .map(|listed| Reply::Tokens(listed.into_iter().map(Into::into).collect())),
            Request::RevokeToken { name } => tokens::revoke(&self.store, &name, &self.data_dir)
                .await
                .map(|()| {
                    log::info!("token {name:?} revoked (command line)");
                    Reply::Revoked
                }),
        };
        let answer = match answer {
            Ok(reply) => Answer::Ok(reply),
            Err(e) => Answer::Error(e.to_string()),
        };
        if let Err(e) = send(&mut stream, &answer).await {
            log::warn!("control socket: answer not sent: {e}");
        }
    }

    /// Answers a backup: the size, then the pages, written from a blocking thread since
    /// SQLite reads them there. One at a time: each holds a snapshot and a connection.
    async fn send_copy(self, stream: UnixStream) {
        let Ok(_copying) = self.copying.clone().try_acquire_owned() else {
            return refuse(
                stream,
                "a backup is being sent already; try again when it is done",
            )
            .await;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("backup for the command line: {e}");
                return;
            }
        };
        // Shutdown closes the socket under a write that waits for the command to read:
        // a stalled copy ends with the daemon, not a write timeout later.
        let (copied, finished) = oneshot::channel::<()>();
        if let Ok(closer) = stream.try_clone() {
            let mut shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.recv() => {
                        let _ = closer.shutdown(std::net::Shutdown::Both);
                    }
                    _ = finished => {}
                }
            });
        }
        let store = self.store.clone();
        let stopping = self.shutdown.clone();
        let shutdown = self.shutdown;
        let sent =
            tokio::task::spawn_blocking(move || send_pages(&store, stream, || stopping.is_fired()))
                .await;
        drop(copied);
        match sent {
            Ok(Ok(bytes)) => log::info!("backup: {bytes} bytes sent to the command line"),
            Ok(Err(_)) if shutdown.is_fired() => {
                log::warn!("backup for the command line cut short: the daemon is stopping")
            }
            Ok(Err(StoreError::CopyNotSent(e)))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                log::warn!(
                    "backup for the command line stopped: it read nothing for {} s",
                    COPY_WRITE_TIMEOUT.as_secs()
                )
            }
            Ok(Err(e)) => log::warn!("backup for the command line: {e}"),
            Err(e) => log::error!("backup for the command line: {e}"),
        }
    }
}

/// Writes a backup's answer and pages to the blocking socket `stream`; returns the
/// bytes of the copy. On a failure past the answer the buffered rest is thrown away:
/// flushing it could wait out the write timeout once more.
fn send_pages(
    store: &Store,
    stream: std::os::unix::net::UnixStream,
    cancelled: impl Fn() -> bool,
) -> Result<u64, StoreError> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(COPY_WRITE_TIMEOUT)))
        .map_err(StoreError::CopyNotSent)?;
    let mut out = BufWriter::with_capacity(64 * 1024, stream);
    let copy = match store.copy_database() {
        Ok(copy) => copy,
        Err(e) => {
            let _ = write_line(&mut out, &Answer::Error(e.to_string())).and_then(|()| out.flush());
            return Err(e);
        }
    };
    let sent = write_line(&mut out, &Answer::Ok(Reply::Backup { bytes: copy.size() }))
        .map_err(StoreError::CopyNotSent)
        .and_then(|()| copy.write_to(&mut out, cancelled));
    if sent.is_err() {
        let _ = out.into_parts();
    }
    sent
}

/// Answers a connection with `why` and closes it.
async fn refuse(mut stream: UnixStream, why: &str) {
    let _ = send(&mut stream, &Answer::Error(why.into())).await;
}

/// The request line, or `None` when the client closed without one; a line that is too
/// long, late or not a request is refused with why.
async fn read_request(stream: &mut UnixStream) -> Result<Option<Request>, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return Err(format!("no request within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("request not read: {e}")),
        Ok(Ok(0)) => return Ok(None),
        Ok(Ok(_)) if !line.ends_with('\n') => {
            return Err(format!(
                "a request is one line of at most {MAX_REQUEST} bytes"
            ))
        }
        Ok(Ok(_)) => {}
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| format!("not a request: {e}"))
}

async fn send(stream: &mut UnixStream, answer: &Answer) -> io::Result<()> {
    stream.write_all(&json_line(answer)?).await?;
    stream.shutdown().await
}

fn write_line(out: &mut impl Write, answer: &Answer) -> io::Result<()> {
    out.write_all(&json_line(answer)?)
}
