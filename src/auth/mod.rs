//! Who may do what: tokens with scopes, the configured policy, the origin and `Host`
//! checks, and which proxies may say who a client is.
//!
//! Scopes are ordered: `admin` can do what `write` can, `write` what `read` can. The
//! policy decides what needs a token at all: by default reads are open and writes need
//! `write`; test events and token management always need `admin`; the secure socket
//! always needs a token.

pub mod host;
pub mod origin;
pub mod proxy;
pub mod tokens;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::model::now_micros;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: a width in a table (`{:<6}`) must apply.
        f.pad(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope {other:?}; expected read, write or admin"
            )),
        }
    }
}

/// What needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Reads are open; writes need a `write` token.
    #[default]
    Writes,
    /// Everything but the health check, the dashboard page and the API document needs a
    /// token.
    All,
    /// Nothing needs a token; only allowed in development mode.
    None,
}

/// Who may do what.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `writes` (default), `all`, or `none` (development mode only).
    pub policy: Policy,
    /// Origins of browser pages, besides the gateway's own, allowed to open the socket
    /// and the event stream (`"https://dash.example"`, or `"*"` for any).
    pub allowed_origins: Vec<String>,
    /// Names and addresses requests may use in `Host`, besides `localhost`, loopback, the
    /// gateway's host name, `<host name>.local` and the address a request arrives on
    /// (`"sensors.farm.example"`, or `"*"` for any).
    pub allowed_hosts: Vec<String>,
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Admin,
    /// The secure socket: a token whatever the policy.
    Secure,
}

/// The token a request was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: i64,
    pub name: String,
    pub scope: Scope,
    /// The token's stored hash: what identifies it for as long as a stream lives (ids
    /// and names are given again to tokens made later).
    pub hash: Vec<u8>,
}

/// Why a request is refused.
#[derive(Debug)]
pub enum AuthError {
    /// No token where one is needed (401).
    Missing,
    /// A token that does not exist, or was revoked (401).
    Invalid,
    /// A valid token without the scope needed (403).
    Forbidden { needed: Scope, has: Scope },
    /// Tokens could not be read (503).
    Unavailable(StoreError),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => write!(f, "A token is needed: send Authorization: Bearer TOKEN"),
            AuthError::Invalid => write!(f, "The token is not valid (unknown or revoked)"),
            AuthError::Forbidden { needed, has } => {
                let article = if needed.as_str().starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                write!(
                    f,
                    "This needs {article} {needed} token; this token has scope {has}"
                )
            }
            AuthError::Unavailable(e) => write!(f, "Tokens cannot be checked: {e}"),
        }
    }
}

/// Checks tokens. A token found in the database is kept in memory, by its hash, until
/// the revocation marker moves ([`tokens::revocations`], one `stat` per request): a
/// token revoked from the command line stops working at once, and a request with a
/// known token reads nothing from the database.
pub struct Authenticator {
    store: Store,
    policy: Policy,
    marker: PathBuf,
    known: Mutex<KnownTokens>,
    /// When each token's `last_used_at` was last written; written at most once a
    /// minute per token, not on every request.
    touched: Mutex<HashMap<i64, Instant>>,
    /// The tokens that exist and their scopes, for open streams to check themselves
    /// against whenever it changes (see [`Authenticator::watch_tokens`]).
    live: watch::Sender<Arc<LiveTokens>>,
    /// Asks the watcher to read the tokens again now.
    reload: Notify,
}

const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// How often the watcher looks at the revocation marker (one `stat`): a token revoked
/// from the command line, in another process, closes its streams within this, plus the
/// time to read the token table.
pub const MARKER_POLL: Duration = Duration::from_secs(1);

/// How often the watcher reads the token table whatever the marker says: a change the
/// marker does not show (a scope lowered in the database by hand, a marker that could
/// not be written) reaches open streams and the token cache within this.
pub const TOKEN_RELOAD: Duration = Duration::from_secs(30);

/// The tokens in the database, by hash, as last read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LiveTokens {
    by_hash: HashMap<Vec<u8>, Scope>,
}

/// Tokens found in the database since the revocation marker last moved. Only tokens
/// that exist are kept, so guesses cannot fill it; a gateway has a handful.
#[derive(Default)]
struct KnownTokens {
    revocations: Option<tokens::Revocations>,
    by_hash: HashMap<Vec<u8>, Principal>,
}

/// More known tokens than any gateway has; past it the memory starts afresh.
const MAX_KNOWN_TOKENS: usize = 256;

impl KnownTokens {
    /// The token with this hash, if known while the marker stands at `revocations`.
    fn get(&mut self, hash: &[u8], revocations: Option<tokens::Revocations>) -> Option<Principal> {
        if self.revocations != revocations {
            self.by_hash.clear();
            self.revocations = revocations;
        }
        self.by_hash.get(hash).cloned()
    }

    /// Keeps a token read from the database while the marker stood at `revocations`,
    /// unless it has moved since: the token may be what was revoked.
    fn keep(
        &mut self,
        hash: Vec<u8>,
        principal: Principal,
        revocations: Option<tokens::Revocations>,
    ) {
        if self.revocations != revocations {
            return;
        }
        if self.by_hash.len() >= MAX_KNOWN_TOKENS {
            self.by_hash.clear();
        }
        self.by_hash.insert(hash, principal);
    }
}

impl Authenticator {
    /// `data_dir` holds the database and the revocation marker.
    pub fn new(store: Store, policy: Policy, data_dir: &Path) -> Authenticator {
        Authenticator {
            store,
            policy,
            marker: data_dir.join(tokens::REVOKED_MARKER),
            known: Mutex::new(KnownTokens::default()),
            touched: Mutex::new(HashMap::new()),
            live: watch::Sender::new(Arc::default()),
            reload: Notify::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The scope an access needs under the policy, or `None` if it is open.
    pub fn needed(&self, access: Access) -> Option<Scope> {
        match (access, self.policy) {
            (Access::Secure, _) => Some(Scope::Read),
            (_, Policy::None) => None,
            (Access::Read, Policy::Writes) => None,
            (Access::Read, Policy::All) => Some(Scope::Read),
            (Access::Write, _) => Some(Scope::Write),
            (Access::Admin, _) => Some(Scope::Admin),
        }
    }

    /// Checks a presented token against what `access` needs. A valid token is returned
    /// even where none is needed, so limits can be kept per token.
    pub async fn authorize(
        &self,
        token: Option<&str>,
        access: Access,
    ) -> Result<Option<Principal>, AuthError> {
        let needed = self.needed(access);
        let principal = match token {
            Some(secret) => Some(self.identify(secret).await?.ok_or(AuthError::Invalid)?),
            None if needed.is_some() => return Err(AuthError::Missing),
            None => None,
        };
        if let (Some(needed), Some(p)) = (needed, &principal) {
            if p.scope < needed {
                return Err(AuthError::Forbidden {
                    needed,
                    has: p.scope,
                });
            }
        }
        Ok(principal)
    }

    /// The token a secret belongs to, if any.
    pub async fn identify(&self, secret: &str) -> Result<Option<Principal>, AuthError> {
        let hash = tokens::hash(secret);
        let revocations = tokens::revocations(&self.marker);
        let known = self.known().get(&hash, revocations);
        if let Some(principal) = known {
            self.touch(principal.token_id);
            return Ok(Some(principal));
        }
        let rows = self.store.tokens().await.map_err(AuthError::Unavailable)?;
        let found = tokens::find(&rows, &hash);
        let Some((token_id, name, scope)) = found else {
            return Ok(None);
        };
        let principal = Principal {
            token_id,
            name,
            scope,
            hash: hash.clone(),
        };
        self.known().keep(hash, principal.clone(), revocations);
        self.touch(token_id);
        Ok(Some(principal))
    }

    /// Forgets every token checked so far, as a move of the revocation marker does, and
    /// has open streams check their tokens again.
    pub fn forget_known(&self) {
        self.known().by_hash.clear();
        self.reload.notify_one();
    }

    /// Follows the token table for open streams: reads it when the revocation marker
    /// moves (looked at every [`MARKER_POLL`]), when this daemon revokes a token, and
    /// every [`TOKEN_RELOAD`] in any case, and publishes it when it changed. Streams wait
    /// on [`Authenticator::live_tokens`] and never read the database per event.
    pub async fn watch_tokens(&self, mut shutdown: Shutdown) {
        let mut poll = tokio::time::interval(MARKER_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut marker = None;
        let mut read_at: Option<Instant> = None;
        loop {
            let asked = tokio::select! {
                _ = shutdown.recv() => return,
                _ = poll.tick() => false,
                _ = self.reload.notified() => true,
            };
            // The marker is looked at before the table is read: a revocation between
            // the two moves it again, and the next poll reads the table again.
            let now_marker = tokens::revocations(&self.marker);
            let due = read_at.is_none_or(|at| at.elapsed() >= TOKEN_RELOAD);
            if !(asked || due || now_marker != marker) {
                continue;
            }
            match self.store.tokens().await {
                Ok(rows) => {
                    let rows = tokens::live(&rows);
                    marker = now_marker;
                    read_at = Some(Instant::now());
                    let fresh = LiveTokens {
                        by_hash: rows.into_iter().collect(),
                    };
                    if **self.live.borrow() != fresh {
                        self.known().by_hash.clear();
                        self.live.send_replace(Arc::new(fresh));
                    }
                }
                Err(e) => log::warn!("tokens could not be read to check open streams: {e}"),
            }
        }
    }

    /// The tokens as last read, marked changed whenever they change.
    pub fn live_tokens(&self) -> watch::Receiver<Arc<LiveTokens>> {
        self.live.subscribe()
    }

    /// Whether a stream opened with `principal` for `access` may go on, given the tokens
    /// as last read; the reason to close it if not. A token newer than that reading is
    /// looked up in the database, once.
    pub async fn still_allowed(
        &self,
        principal: &Principal,
        access: Access,
        live: &LiveTokens,
    ) -> Result<(), String> {
        let scope = match live.by_hash.get(&principal.hash) {
            Some(scope) => Some(*scope),
            None => {
                match self.store.tokens().await {
                    Ok(rows) => tokens::find(&rows, &principal.hash).map(|(_, _, scope)| scope),
                    // Storage trouble is not a revocation: the stream goes on, and is
                    // checked again with the next reading of the tokens.
                    Err(_) => return Ok(()),
                }
            }
        };
        match (scope, self.needed(access)) {
            (None, _) => Err(format!("token {:?} was revoked", principal.name)),
            (Some(has), Some(needed)) if has < needed => Err(format!(
                "token {:?} now has scope {has}; this stream needs {needed}",
                principal.name
            )),
            _ => Ok(()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, KnownTokens> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self, token_id: i64) {
        let now = Instant::now();
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched
            .get(&token_id)
            .is_some_and(|at| now.duration_since(*at) < TOUCH_EVERY)
        {
            return;
        }
        touched.insert(token_id, now);
        drop(touched);
        let store = self.store.clone();
        tokio::spawn(async move { store.touch_token(token_id, now_micros()).await });
    }
}

/// Creates the first admin token when there is none, writes it to `admin.token` in the
/// data directory (readable by the daemon's user only) and says where it is.
pub async fn bootstrap_admin(store: &Store, data_dir: &Path) -> Result<(), tokens::TokenError> {
    if !store.tokens().await?.is_empty() {
        return Ok(());
    }
    let token = tokens::create(store, "admin", Scope::Admin).await?;
    let path = data_dir.join("admin.token");
    write_private(&path, &format!("{token}\n")).map_err(tokens::TokenError::Random)?;
    log::warn!(
        "no API token existed: created token \"admin\" (scope admin), written to {}; \
         make others with `sensorgate token create`",
        path.display()
    );
    Ok(())
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_ordered() {
        assert!(Scope::Admin > Scope::Write && Scope::Write > Scope::Read);
        assert_eq!("write".parse::<Scope>(), Ok(Scope::Write));
        assert!("root".parse::<Scope>().is_err());
    }
}
