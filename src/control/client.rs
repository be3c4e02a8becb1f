//! The command line's side: the token and backup commands, through the daemon serving the
//! database when there is one, otherwise on the file. Blocking: the command line does one
//! thing and waits for it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{json_line, socket_path, Answer, ListedToken, Reply, Request};
use crate::auth::tokens::{self, TokenError};
use crate::auth::Scope;
use crate::store::tokens::OfflineTable;
use crate::store::{self, StorageConfig, StoreError};

/// How long the command line waits for the daemon to answer, or to send the next part of
/// a copy.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// `sensorgate token ...`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenCommand {
    /// Make a token named `name` with `scope`.
    Create { name: String, scope: Scope },
    /// List every token.
    List,
    /// Remove the token of this name.
    Revoke(String),
}

/// What a token command did.
#[derive(Debug)]
pub enum TokenOutcome {
    /// A token was made; `token` is to be shown this once.
    Created {
        name: String,
        scope: Scope,
        token: String,
    },
    /// Every token, by name.
    Listed(Vec<ListedToken>),
    /// The token of this name is gone.
    Revoked(String),
}

/// Why a command failed.
#[derive(Debug)]
pub enum ControlError {
    /// The socket is there, but could not be used.
    Unreachable(PathBuf, io::Error),
    /// The daemon did the command and it failed, or refused it; the daemon's words.
    Refused(String),
    /// The daemon's answer was cut short, late or not an answer.
    NoAnswer(String),
    /// The database file, or the backup file, could not be used.
    Store(StoreError),
    /// A token command on the file failed.
    Token(TokenError),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Unreachable(path, e) if e.kind() == io::ErrorKind::PermissionDenied => {
                write!(
                    f,
                    "the daemon's control socket {} is not for this user ({e}): run the command as the service's user (sudo -u sensorgate ...) or root",
                    path.display()
                )
            }
            ControlError::Unreachable(path, e) => {
                write!(f, "the daemon at {} did not answer: {e}", path.display())
            }
            ControlError::Refused(why) => f.write_str(why),
            ControlError::NoAnswer(why) => write!(f, "no usable answer from the daemon: {why}"),
            ControlError::Store(e) => e.fmt(f),
            ControlError::Token(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ControlError {}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> ControlError {
        ControlError::Store(e)
    }
}

impl From<TokenError> for ControlError {
    fn from(e: TokenError) -> ControlError {
        ControlError::Token(e)
    }
}

/// Runs a token command: through the daemon serving `storage` when there is one (it
/// sees the change at once), otherwise on the database file.
pub fn token(storage: &StorageConfig, command: TokenCommand) -> Result<TokenOutcome, ControlError> {
    if let Some(client) = ControlClient::connect(&storage.data_dir)? {
        return match command {
            TokenCommand::Create { name, scope } => {
                let token = client.create_token(&name, scope)?;
                Ok(TokenOutcome::Created { name, scope, token })
            }
            TokenCommand::List => client.list_tokens().map(TokenOutcome::Listed),
            TokenCommand::Revoke(name) => {
                client.revoke_token(&name)?;
                Ok(TokenOutcome::Revoked(name))
            }
        };
    }
    let table = OfflineTable::new(store::open_existing_database(storage)?);
    Ok(match command {
        TokenCommand::Create { name, scope } => {
            let token = tokens::create_offline(&table, &name, scope)?;
            TokenOutcome::Created { name, scope, token }
        }
        TokenCommand::List => TokenOutcome::Listed(
            tokens::list_offline(&table)?
                .into_iter()
                .map(Into::into)
                .collect(),
        ),
        TokenCommand::Revoke(name) => {
            tokens::revoke_offline(&table, &name, &storage.data_dir)?;
            TokenOutcome::Revoked(name)
        }
    })
}

/// Writes a copy of the database of `storage` to `target`, a new file: through the daemon
/// serving it when there is one, otherwise from the file. Returns the copy's size.
pub fn backup(storage: &StorageConfig, target: &Path) -> Result<u64, ControlError> {
    match ControlClient::connect(&storage.data_dir)? {
        Some(client) => client.backup(target),
        None => Ok(store::backup(storage, target)?),
    }
}

/// A connection to the daemon serving a data directory, for one command.
pub struct ControlClient {
    stream: UnixStream,
    path: PathBuf,
}

impl ControlClient {
    /// Connects to the daemon serving `data_dir`; `None` when no daemon listens there.
    pub fn connect(data_dir: &Path) -> Result<Option<ControlClient>, ControlError> {
        let path = socket_path(data_dir);
        match UnixStream::connect(&path) {
            Ok(stream) => Ok(Some(ControlClient { stream, path })),
            // No socket, one left by a daemon that has stopped, or a path too long for a
            // socket (the daemon could not listen there either).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::InvalidInput
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(ControlError::Unreachable(path, e)),
        }
    }

    /// Creates a token; returns it (it is shown this once).
    pub fn create_token(self, name: &str, scope: Scope) -> Result<String, ControlError> {
        let request = Request::CreateToken {
            name: name.to_owned(),
            scope,
        };
        match self.ask(&request)?.0 {
            Reply::Created { token } => Ok(token),
            other => Err(unexpected(&other)),
        }
    }

    /// Every token, by name.
    pub fn list_tokens(self) -> Result<Vec<ListedToken>, ControlError> {
        match self.ask(&Request::ListTokens)?.0 {
            Reply::Tokens(tokens) => Ok(tokens),
            other => Err(unexpected(&other)),
        }
    }

    /// Revokes a token; the daemon stops accepting it at once.
    pub fn revoke_token(self, name: &str) -> Result<(), ControlError> {
        let request = Request::RevokeToken {
            name: name.to_owned(),
        };
        match self.ask(&request)?.0 {
            Reply::Revoked => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Writes a copy of the daemon's database to `target`, a new file; returns its size.
    /// The copy goes to a file of its own beside `target` first and takes the name once
    /// complete, so a copy cut short never looks like a backup (a command killed in the
    /// middle leaves that hidden file, never the target).
    pub fn backup(self, target: &Path) -> Result<u64, ControlError> {
        let exists = || ControlError::Store(StoreError::BackupExists(target.to_owned()));
        if target.symlink_metadata().is_ok() {
            return Err(exists());
        }
        let partial = partial_name(target);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| target_error(target, e))?;
        let copied = self.receive_copy(&mut file, target).and_then(|bytes| {
            file.sync_all().map_err(|e| target_error(target, e))?;
            // A link never replaces a file that appeared meanwhile.
            match fs::hard_link(&partial, target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
                // A file system without links (a FAT-formatted stick): rename it, after
                // one more look.
                Err(_) if target.symlink_metadata().is_ok() => return Err(exists()),
                Err(_) => fs::rename(&partial, target).map_err(|e| target_error(target, e))?,
            }
            Ok(bytes)
        });
        // Gone once linked, or on a failure; already gone once renamed.
        let _ = fs::remove_file(&partial);
        copied
    }

    fn receive_copy(self, file: &mut File, target: &Path) -> Result<u64, ControlError> {
        let (reply, mut rest) = self.ask(&Request::Backup)?;
        let Reply::Backup { bytes } = reply else {
            return Err(unexpected(&reply));
        };
        let mut pages = (&mut rest).take(bytes);
        let mut buffer = vec![0; 64 * 1024];
        let mut received = 0;
        loop {
            let read = match pages.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_failed(e)),
            };
            file.write_all(&buffer[..read])
                .map_err(|e| target_error(target, e))?;
            received += read as u64;
        }
        if received != bytes {
            return Err(ControlError::NoAnswer(format!(
                "the copy stopped after {received} of {bytes} bytes (the daemon's log says why)"
            )));
        }
        Ok(bytes)
    }

    /// Sends `request`, reads the answer line; returns the reply and the rest of the
    /// stream.
    fn ask(self, request: &Request) -> Result<(Reply, BufReader<UnixStream>), ControlError> {
        let unreachable = |e| ControlError::Unreachable(self.path.clone(), e);
        let line = json_line(request).map_err(unreachable)?;
        self.stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(unreachable)?;
        match (&self.stream).write_all(&line) {
            Ok(()) => {}
            // A daemon that refuses this user (or is too busy) may answer and close before
            // reading the request; its answer is still there to read.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(unreachable(e)),
        }
        let mut reader = BufReader::new(self.stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).map_err(read_failed)?;
        if answer.is_empty() {
            return Err(ControlError::NoAnswer(
                "it closed the connection (the daemon's log may say why)".into(),
            ));
        }
        match serde_json::from_str(&answer) {
            Ok(Answer::Ok(reply)) => Ok((reply, reader)),
            Ok(Answer::Error(why)) => Err(ControlError::Refused(why)),
            Err(e) => Err(ControlError::NoAnswer(format!("not an answer: {e}"))),
        }
    }
}

/// The file a copy is written to until it is complete: hidden, beside the target, named
/// after it and this process.
fn partial_name(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn target_error(target: &Path, e: io::Error) -> ControlError {
    ControlError::Store(StoreError::BackupTarget(target.to_owned(), e.to_string()))
}

/// A read from the daemon that failed; a timeout reads as one.
fn read_failed(e: io::Error) -> ControlError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::NoAnswer(format!(
            "nothing came for {} s (the daemon's log may say why)",
            ANSWER_TIMEOUT.as_secs()
        )),
        _ => ControlError::NoAnswer(e.to_string()),
    }
}

/// An answer to another command; named by its kind alone, since it may carry a secret.
fn unexpected(reply: &Reply) -> ControlError {
    let kind = match reply {
        Reply::Created { .. } => "a created token",
        Reply::Tokens(_) => "a token list",
        Reply::Revoked => "a revocation",
        Reply::Backup { .. } => "a backup",
    };
    ControlError::NoAnswer(format!("{kind}, the answer to another command"))
}
