//! The control socket: how the command line's `token` and `backup` commands reach a
//! running daemon.
//!
//! With `storage.locking = "exclusive"` (the default) the daemon keeps its database to
//! itself: no other process may open the file while it runs. So the commands that need
//! the database ask the daemon instead, over a Unix socket beside the database,
//! `DATA_DIR/control.sock`. Only the daemon's own user and root may use it, the same
//! people who may open the database file; with no daemon listening, the commands open the
//! database themselves.
//!
//! One request per connection, one line of JSON (a `command` and its fields); the answer
//! is one line of JSON, `{"ok": ...}` or `{"error": "..."}`. The answer to a backup gives
//! the copy's size, and exactly that many bytes follow: the database's pages, from one
//! snapshot.

pub mod client;
pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::tokens::TokenInfo;
use crate::auth::Scope;
use crate::model::Micros;

/// The socket's name in the data directory.
pub const SOCKET_FILE: &str = "control.sock";

/// Where the daemon serving `data_dir` listens.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// A command for the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Make a token named `name` with `scope`.
    CreateToken { name: String, scope: Scope },
    /// List every token, never the secrets.
    ListTokens,
    /// Remove the token named `name`; it stops working at once.
    RevokeToken { name: String },
    /// Send a copy of the database.
    Backup,
}

/// The daemon's answer: what the command did, or why it did not.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The command was done.
    Ok(Reply),
    /// It was not, and why, in words for the operator.
    Error(String),
}

/// What a command did.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The new token, shown this once.
    Created { token: String },
    /// Every token, by name.
    Tokens(Vec<ListedToken>),
    /// The token is gone.
    Revoked,
    /// A copy of the database follows, this many bytes.
    Backup { bytes: u64 },
}

/// A token as listed, never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedToken {
    /// Its name, unique.
    pub name: String,
    /// What it allows.
    pub scope: Scope,
    /// When it was made, in microseconds since the epoch.
    pub created_at: Micros,
    /// When a request last presented it, if ever.
    pub last_used_at: Option<Micros>,
}

impl From<TokenInfo> for ListedToken {
    fn from(token: TokenInfo) -> ListedToken {
        ListedToken {
            name: token.name,
            scope: token.scope,
            created_at: token.created_at,
            last_used_at: token.last_used_at,
        }
    }
}

/// `message` as one line of the protocol: its JSON and a newline.
fn json_line(message: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// The longest request line a daemon reads: a token name is at most 64 characters.
const MAX_REQUEST: u64 = 4096;
