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

use rusqlite::{params, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Scope;
use crate::model::{now_micros, Micros};

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
    Sqlite(rusqlite::Error),
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
            TokenError::Sqlite(e) => write!(f, "database error: {e}"),
        }
    }
}

impl std::error::Error for TokenError {}

impl From<rusqlite::Error> for TokenError {
    fn from(e: rusqlite::Error) -> Self {
        TokenError::Sqlite(e)
    }
}

/// Makes a token and stores its hash; returns the token, which is shown once.
pub fn create(conn: &Connection, name: &str, scope: Scope) -> Result<String, TokenError> {
    if !valid_name(name) {
        return Err(TokenError::InvalidName);
    }
    let token = generate().map_err(TokenError::Random)?;
    let inserted = conn.execute(
        "INSERT INTO tokens (name, scope, hash, created_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (name) DO NOTHING",
        params![name, scope.as_str(), hash(&token), now_micros()],
    )?;
    if inserted == 0 {
        return Err(TokenError::NameTaken(name.to_owned()));
    }
    Ok(token)
}

/// Every token, by name.
pub fn list(conn: &Connection) -> Result<Vec<TokenInfo>, TokenError> {
    let mut stmt =
        conn.prepare("SELECT name, scope, created_at, last_used_at FROM tokens ORDER BY name")?;
    let rows = stmt.query_map([], |row| {
        let scope: String = row.get(1)?;
        Ok(TokenInfo {
            name: row.get(0)?,
            scope: scope.parse().unwrap_or(Scope::Read),
            created_at: row.get(2)?,
            last_used_at: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Removes a token; it stops working at once, also in a daemon running on `data_dir`,
/// which the marker there tells ([`revocations`]).
pub fn revoke(conn: &Connection, name: &str, data_dir: &Path) -> Result<(), TokenError> {
    match conn.execute("DELETE FROM tokens WHERE name = ?1", [name])? {
        0 => Err(TokenError::NotFound(name.to_owned())),
        _ => mark_revoked(data_dir).map_err(TokenError::Marker),
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
pub fn live(conn: &Connection) -> rusqlite::Result<Vec<(Vec<u8>, Scope)>> {
    let mut stmt = conn.prepare_cached("SELECT hash, scope FROM tokens")?;
    let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get::<_, String>(1)?)))?;
    let mut live = Vec::new();
    for row in rows {
        let (hash, scope) = row?;
        if let Ok(scope) = scope.parse() {
            live.push((hash, scope));
        }
    }
    Ok(live)
}

/// Whether any token exists.
pub fn any(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("SELECT EXISTS (SELECT 1 FROM tokens)", [], |r| r.get(0))
}

/// The token whose secret has the hash `presented` ([`hash`]): every stored hash is
/// compared in constant time, so neither the answer's timing nor the lookup path
/// depends on the secret.
pub fn find(conn: &Connection, presented: &[u8]) -> rusqlite::Result<Option<(i64, String, Scope)>> {
    let mut stmt = conn.prepare_cached("SELECT id, name, scope, hash FROM tokens")?;
    let mut rows = stmt.query([])?;
    let mut found = None;
    while let Some(row) = rows.next()? {
        let stored: Vec<u8> = row.get(3)?;
        if constant_time_eq(&stored, presented) {
            let scope: String = row.get(2)?;
            found = scope
                .parse()
                .ok()
                .map(|scope| (row.get(0), row.get(1), scope));
        }
    }
    Ok(match found {
        Some((Ok(id), Ok(name), scope)) => Some((id, name, scope)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::migrate;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        conn
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let conn = db();
        let a = create(&conn, "kitchen-tablet", Scope::Write).unwrap();
        let b = create(&conn, "wall", Scope::Read).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("sg_") && a.len() == 67);
        let stored: Vec<Vec<u8>> = conn
            .prepare("SELECT hash FROM tokens")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(stored
            .iter()
            .all(|h| h.len() == 32 && !h.windows(3).any(|w| w == b"sg_")));
        assert_eq!(find(&conn, &hash(&a)).unwrap().unwrap().2, Scope::Write);
        assert_eq!(find(&conn, &hash("sg_wrong")).unwrap(), None);
    }

    #[test]
    fn names_are_unique_and_revocation_works() {
        let conn = db();
        let token = create(&conn, "x", Scope::Admin).unwrap();
        assert!(matches!(
            create(&conn, "x", Scope::Read),
            Err(TokenError::NameTaken(_))
        ));
        assert!(matches!(
            create(&conn, "bad name", Scope::Read),
            Err(TokenError::InvalidName)
        ));
        let listed = list(&conn).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_used_at, None);
        let dir = tempfile::tempdir().unwrap();
        revoke(&conn, "x", dir.path()).unwrap();
        assert_eq!(find(&conn, &hash(&token)).unwrap(), None);
        assert!(matches!(
            revoke(&conn, "x", dir.path()),
            Err(TokenError::NotFound(_))
        ));
    }

    #[test]
    fn each_revocation_moves_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db();
        let marker = dir.path().join(REVOKED_MARKER);
        assert_eq!(revocations(&marker), None);
        create(&conn, "a", Scope::Read).unwrap();
        create(&conn, "b", Scope::Read).unwrap();
        assert_eq!(revocations(&marker), None, "creating revokes nothing");
        revoke(&conn, "a", dir.path()).unwrap();
        let first = revocations(&marker).expect("marker after a revocation");
        revoke(&conn, "b", dir.path()).unwrap();
        let second = revocations(&marker).unwrap();
        assert_ne!(
            first, second,
            "two revocations in the same instant still differ"
        );
        assert!(revoke(&conn, "b", dir.path()).is_err());
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
