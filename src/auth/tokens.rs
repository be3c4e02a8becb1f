//! API tokens: made here, stored only as a hash, compared in constant time.
//!
//! A token is 32 random bytes from the kernel, written as `sg_` and 64 hex digits. It
//! is stored as its SHA-256: a fast hash is right for a secret with 256 bits of entropy
//! (no dictionary to try, nothing for a slow hash to slow down), and it keeps a copy of
//! the database from handing out working tokens.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Scope;
use crate::model::{now_micros, Micros};
use crate::store::tokens::{OfflineTable, StoredToken};
use crate::store::{Store, StoreError};

/// What makes a token name acceptable: short, printable, no spaces.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A fresh token.
pub fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("sg_{}", hex(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stored form of a token.
pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Equality that takes as long whatever the contents, so timing tells nothing about
/// how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// A token as listed: never the secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub scope: Scope,
    #[serde(serialize_with = "crate::model::wire_time::required")]
    pub created_at: Micros,
    #[serde(serialize_with = "crate::model::wire_time::optional")]
    pub last_used_at: Option<Micros>,
}

/// Why a token operation failed.
#[derive(Debug)]
pub enum TokenError {
    InvalidName,
    NameTaken(String),
    NotFound(String),
    Random(std::io::Error),
    /// The token was revoked, but a running daemon could not be told.
    Marker(std::io::Error),
    /// The token table could not be read or written.
    Store(StoreError),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::InvalidName => {
                write!(
                    f,
                    "a token name is 1 to 64 letters, digits, '-', '_' or '.'"
                )
            }
            TokenError::NameTaken(name) => write!(f, "a token named {name:?} exists already"),
            TokenError::NotFound(name) => write!(f, "no token named {name:?}"),
            TokenError::Random(e) => write!(f, "no randomness from the kernel: {e}"),
            TokenError::Marker(e) => write!(
                f,
                "token revoked, but a running daemon may accept it for up to {} s: \
                 {REVOKED_MARKER} not written: {e}",
                super::TOKEN_RELOAD.as_secs()
            ),
            TokenError::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TokenError {}

impl From<StoreError> for TokenError {
    fn from(e: StoreError) -> Self {
        TokenError::Store(e)
    }
}

/// A new token for `name`: the secret, shown once, and the hash that is stored.
fn new_token(name: &str) -> Result<(String, Vec<u8>), TokenError> {
    if !valid_name(name) {
        return Err(TokenError::InvalidName);
    }
    let token = generate().map_err(TokenError::Random)?;
    let hashed = hash(&token);
    Ok((token, hashed))
}

/// The tokens as listed, from their rows.
fn listed(rows: Vec<StoredToken>) -> Vec<TokenInfo> {
    rows.into_iter()
        .map(|row| TokenInfo {
            scope: row.scope.parse().unwrap_or(Scope::Read),
            name: row.name,
            created_at: row.created_at,
            last_used_at: row.last_used_at,
        })
        .collect()
}

/// Makes a token and stores its hash through the store's writer; returns the token,
/// which is shown once.
pub async fn create(store: &Store, name: &str, scope: Scope) -> Result<String, TokenError> {
    let (token, hashed) = new_token(name)?;
    if !store
        .create_token(name.to_owned(), scope.as_str(), hashed)
        .await?
    {
        return Err(TokenError::NameTaken(name.to_owned()));
    }
    Ok(token)
}

/// Every token, by name.
pub async fn list(store: &Store) -> Result<Vec<TokenInfo>, TokenError> {
    Ok(listed(store.tokens().await?))
}

/// Removes a token through the store's writer; it stops working at once, also in other
/// processes on `data_dir`, which the marker there tells ([`revocations`]).
pub async fn revoke(store: &Store, name: &str, data_dir: &Path) -> Result<(), TokenError> {
    match store.delete_token(name.to_owned()).await? {
        false => Err(TokenError::NotFound(name.to_owned())),
        true => mark_revoked(data_dir).map_err(TokenError::Marker),
    }
}

/// The same as [`create`], for the command line, on the table by itself.
pub fn create_offline(
    table: &OfflineTable,
    name: &str,
    scope: Scope,
) -> Result<String, TokenError> {
    let (token, hashed) = new_token(name)?;
    if !table.insert(name, scope.as_str(), &hashed)? {
        return Err(TokenError::NameTaken(name.to_owned()));
    }
    Ok(token)
}

/// The same as [`list`], for the command line.
pub fn list_offline(table: &OfflineTable) -> Result<Vec<TokenInfo>, TokenError> {
    Ok(listed(table.all()?))
}

/// The same as [`revoke`], for the command line.
pub fn revoke_offline(table: &OfflineTable, name: &str, data_dir: &Path) -> Result<(), TokenError> {
    match table.delete(name)? {
        false => Err(TokenError::NotFound(name.to_owned())),
        true => mark_revoked(data_dir).map_err(TokenError::Marker),
    }
}

/// The file beside the database that changes whenever a token is revoked, by the
/// daemon or by the command line in another process.
pub const REVOKED_MARKER: &str = "tokens.revoked";

/// Which revocation the marker stands at: `None` before the first. Reading it is one
/// `stat`, so a daemon may keep the tokens it has checked and read this on every request
/// instead of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revocations {
    inode: u64,
    modified_nanos: i64,
}

/// Where the marker stands now.
pub fn revocations(marker: &Path) -> Option<Revocations> {
    let metadata = std::fs::metadata(marker).ok()?;
    Some(Revocations {
        inode: metadata.ino(),
        modified_nanos: metadata
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(metadata.mtime_nsec()),
    })
}

/// Replaces the marker with a new file, written beside it (under a name of this
/// process's own, so that two revocations at once do not share it) and renamed over it:
/// the new file exists while the old one does, so its inode differs from the one a
/// daemon last saw, and its modification time moves too.
fn mark_revoked(data_dir: &Path) -> std::io::Result<()> {
    let marker = data_dir.join(REVOKED_MARKER);
    let fresh = data_dir.join(format!(
        "{REVOKED_MARKER}.{}.{}.new",
        std::process::id(),
        now_micros()
    ));
    let mut file = std::fs::File::create(&fresh)?;
    writeln!(file, "{}", now_micros())?;
    file.sync_all()?;
    std::fs::rename(&fresh, &marker)
}

/// The hash and scope of every token.
pub fn live(rows: &[StoredToken]) -> Vec<(Vec<u8>, Scope)> {
    rows.iter()
        .filter_map(|row| Some((row.hash.clone(), row.scope.parse().ok()?)))
        .collect()
}

/// The token whose secret has the hash `presented` ([`hash`]): every stored hash is
/// compared in constant time, so neither the answer's timing nor the lookup path
/// depends on the secret.
pub fn find(rows: &[StoredToken], presented: &[u8]) -> Option<(i64, String, Scope)> {
    let mut found = None;
    for row in rows {
        if constant_time_eq(&row.hash, presented) {
            found = row
                .scope
                .parse()
                .ok()
                .map(|scope| (row.id, row.name.clone(), scope));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> OfflineTable {
        OfflineTable::in_memory()
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let conn = db();
        let a = create_offline(&conn, "kitchen-tablet", Scope::Write).unwrap();
        let b = create_offline(&conn, "wall", Scope::Read).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("sg_") && a.len() == 67);
        let stored: Vec<Vec<u8>> = conn
            .all()
            .unwrap()
            .into_iter()
            .map(|row| row.hash)
            .collect();
        assert!(stored
            .iter()
            .all(|h| h.len() == 32 && !h.windows(3).any(|w| w == b"sg_")));
        assert_eq!(
            find(&conn.all().unwrap(), &hash(&a)).unwrap().2,
            Scope::Write
        );
        assert_eq!(find(&conn.all().unwrap(), &hash("sg_wrong")), None);
    }

    #[test]
    fn names_are_unique_and_revocation_works() {
        let conn = db();
        let token = create_offline(&conn, "x", Scope::Admin).unwrap();
        assert!(matches!(
            create_offline(&conn, "x", Scope::Read),
            Err(TokenError::NameTaken(_))
        ));
        assert!(matches!(
            create_offline(&conn, "bad name", Scope::Read),
            Err(TokenError::InvalidName)
        ));
        let listed = list_offline(&conn).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_used_at, None);
        let dir = tempfile::tempdir().unwrap();
        revoke_offline(&conn, "x", dir.path()).unwrap();
        assert_eq!(find(&conn.all().unwrap(), &hash(&token)), None);
        assert!(matches!(
            revoke_offline(&conn, "x", dir.path()),
            Err(TokenError::NotFound(_))
        ));
    }

    #[test]
    fn each_revocation_moves_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db();
        let marker = dir.path().join(REVOKED_MARKER);
        assert_eq!(revocations(&marker), None);
        create_offline(&conn, "a", Scope::Read).unwrap();
        create_offline(&conn, "b", Scope::Read).unwrap();
        assert_eq!(revocations(&marker), None, "creating revokes nothing");
        revoke_offline(&conn, "a", dir.path()).unwrap();
        let first = revocations(&marker).expect("marker after a revocation");
        revoke_offline(&conn, "b", dir.path()).unwrap();
        let second = revocations(&marker).unwrap();
        assert_ne!(
            first, second,
            "two revocations in the same instant still differ"
        );
        assert!(revoke_offline(&conn, "b", dir.path()).is_err());
        assert_eq!(revocations(&marker), Some(second), "nothing revoked");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [REVOKED_MARKER], "no temporary file left behind");
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
