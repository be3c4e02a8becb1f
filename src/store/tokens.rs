//! The token table. It keeps a hash of each secret, never the secret; what a token is
//! and how it is checked is the business of `auth`, which reads and writes the table
//! through the store like everything else.

use rusqlite::{params, Connection};

use super::StoreError;
use crate::model::{now_micros, Micros};

/// A row of the token table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub id: i64,
    pub name: String,
    /// As written by `auth` (`read`, `write`, `admin`).
    pub scope: String,
    /// The hash of the secret.
    pub hash: Vec<u8>,
    pub created_at: Micros,
    pub last_used_at: Option<Micros>,
}

/// Every token, by name.
pub fn all(conn: &Connection) -> rusqlite::Result<Vec<StoredToken>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, scope, hash, created_at, last_used_at FROM tokens ORDER BY name",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(StoredToken {
            id: row.get(0)?,
            name: row.get(1)?,
            scope: row.get(2)?,
            hash: row.get(3)?,
            created_at: row.get(4)?,
            last_used_at: row.get(5)?,
        })
    })?;
    rows.collect()
}

/// Adds a token; `false` when the name is taken, and then nothing changed.
pub fn insert(
    conn: &Connection,
    name: &str,
    scope: &str,
    hash: &[u8],
    at: Micros,
) -> rusqlite::Result<bool> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO tokens (name, scope, hash, created_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO NOTHING",
        )?
        .execute(params![name, scope, hash, at])?;
    Ok(inserted > 0)
}

/// Removes a token; `false` when there was none of that name.
pub fn delete(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    let deleted = conn
        .prepare_cached("DELETE FROM tokens WHERE name = ?1")?
        .execute([name])?;
    Ok(deleted > 0)
}

/// Records a token's last use.
pub fn touch(conn: &Connection, id: i64, at: Micros) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE tokens SET last_used_at = ?2 WHERE id = ?1")?
        .execute(params![id, at])?;
    Ok(())
}

/// The token table on a connection of its own: for the command line, which works on the
/// database while a daemon may be running on it.
pub struct OfflineTable(Connection);

impl OfflineTable {
    /// The table on `conn` (see [`super::open_existing_database`]).
    pub fn new(conn: Connection) -> OfflineTable {
        OfflineTable(conn)
    }

    /// A table in a database of its own in memory.
    #[cfg(test)]
    pub(crate) fn in_memory() -> OfflineTable {
        let mut conn = Connection::open_in_memory().expect("an in-memory database opens");
        super::schema::migrate(&mut conn).expect("a new database migrates");
        OfflineTable(conn)
    }

    /// Every token, by name.
    pub fn all(&self) -> Result<Vec<StoredToken>, StoreError> {
        Ok(all(&self.0)?)
    }

    /// Adds a token; `false` when the name is taken.
    pub fn insert(&self, name: &str, scope: &str, hash: &[u8]) -> Result<bool, StoreError> {
        Ok(insert(&self.0, name, scope, hash, now_micros())?)
    }

    /// Removes a token; `false` when there was none of that name.
    pub fn delete(&self, name: &str) -> Result<bool, StoreError> {
        Ok(delete(&self.0, name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema;

    #[test]
    fn names_are_unique_and_rows_read_back_by_name() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        assert!(insert(&conn, "wall", "read", b"h1", 10).unwrap());
        assert!(insert(&conn, "kitchen", "write", b"h2", 20).unwrap());
        assert!(!insert(&conn, "wall", "admin", b"h3", 30).unwrap());
        let first = all(&conn).unwrap();
        assert_eq!(
            first
                .iter()
                .map(|t| (
                    t.name.as_str(),
                    t.scope.as_str(),
                    t.hash.as_slice(),
                    t.created_at
                ))
                .collect::<Vec<_>>(),
            [
                ("kitchen", "write", &b"h2"[..], 20),
                ("wall", "read", &b"h1"[..], 10)
            ]
        );
        touch(&conn, first[1].id, 40).unwrap();
        assert_eq!(all(&conn).unwrap()[1].last_used_at, Some(40));
        assert!(delete(&conn, "wall").unwrap());
        assert!(!delete(&conn, "wall").unwrap());
        assert_eq!(all(&conn).unwrap().len(), 1);
    }
}
