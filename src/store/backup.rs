//! Copies of the database. With no daemon on it, `sensorgate backup` has SQLite write a
//! compacted copy (`VACUUM INTO`). A running daemon may keep the file to itself
//! (`storage.locking = "exclusive"`), so there the copy is read through one of its own
//! connections instead, page by page from one snapshot, for the command line to write.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rusqlite::Connection;

use super::{DatabaseFile, StorageConfig, Store, StoreError};

/// Writes a consistent, compacted copy of the database to `target` (`VACUUM INTO` reads
/// one snapshot), for the command line when no daemon serves the database. Returns the
/// copy's size. Refuses to overwrite an existing file, and leaves none behind when it
/// fails.
pub fn backup(storage: &StorageConfig, target: &Path) -> Result<u64, StoreError> {
    let source = DatabaseFile::of(storage);
    if !source.path.is_file() {
        return Err(StoreError::NoDatabase(source.path));
    }
    let refuse = |why: String| StoreError::BackupTarget(target.to_owned(), why);
    // SQLite takes the name as text, and a `file:` name as a URI naming another file.
    let name = match target.to_str() {
        Some(name) if !name.starts_with("file:") => name,
        _ => {
            return Err(refuse(
                "use a plain UTF-8 path not starting with \"file:\"".into(),
            ))
        }
    };
    // Created here, empty (which `VACUUM INTO` accepts), so that nothing else's file at
    // that path is ever taken over or removed.
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(target)
    {
        return Err(match e.kind() {
            std::io::ErrorKind::AlreadyExists => StoreError::BackupExists(target.to_owned()),
            _ => refuse(e.to_string()),
        });
    }
    let copied = source
        .open_reader()
        .and_then(|conn| conn.execute("VACUUM INTO ?1", [name]))
        .map_err(|e| match StoreError::from(e) {
            e if e.is_locked() => StoreError::Locked(source.path.clone()),
            e => e,
        })
        .and_then(|_| std::fs::metadata(target).map_err(|e| refuse(e.to_string())));
    match copied {
        Ok(metadata) if metadata.len() > 0 => Ok(metadata.len()),
        Ok(_) => {
            let _ = std::fs::remove_file(target);
            Err(refuse("the copy came out empty".into()))
        }
        Err(e) => {
            let _ = std::fs::remove_file(target);
            Err(e)
        }
    }
}

/// Where the database header says whether the file goes with a WAL (2) or a rollback
/// journal (1): its file format write and read versions.
const WRITE_VERSION: usize = 18;
const READ_VERSION: usize = 19;
const LEGACY_JOURNAL: u8 = 1;

/// Every page of the main database, in order.
const COPY_PAGES: &str = "SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno";

impl Store {
    /// Opens a snapshot of the database for a page-by-page copy: what the database holds
    /// now, whatever the writer commits meanwhile. Blocking; run it off the runtime.
    pub fn copy_database(&self) -> Result<DatabaseCopy, StoreError> {
        let conn = self.readers.file.open_reader()?;
        // A read transaction keeps one snapshot from the first read to the last page.
        conn.execute_batch("BEGIN")?;
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        // Fails here, before the copy is announced, in a build without `sqlite_dbpage`.
        if conn.prepare(COPY_PAGES).is_err() {
            return Err(StoreError::CopyIncomplete(
                "this build of sensorgate cannot read its database page by page (SQLite's \
                 sqlite_dbpage, which the source's .cargo/config.toml turns on): stop the \
                 daemon and run the backup again, which then reads the file itself"
                    .into(),
            ));
        }
        Ok(DatabaseCopy {
            conn,
            pages: pages.unsigned_abs(),
            page_size: page_size.unsigned_abs(),
        })
    }
}

/// A snapshot of the database being copied; see [`Store::copy_database`].
pub struct DatabaseCopy {
    conn: Connection,
    pages: u64,
    page_size: u64,
}

impl DatabaseCopy {
    /// How many bytes the copy has: the database file as of the snapshot.
    pub fn size(&self) -> u64 {
        self.pages * self.page_size
    }

    /// Writes every page of the snapshot to `out`, in order: the database file a
    /// checkpoint at that moment would have left, the pages still in the WAL included,
    /// marked as a database without a WAL (as `VACUUM INTO` leaves one), so that the copy
    /// opens on read-only media too. Stops with [`StoreError::CopyCancelled`] once
    /// `cancelled` says so, which it is asked before each page. Returns the bytes written, which are
    /// [`DatabaseCopy::size`].
    pub fn write_to(
        self,
        out: &mut impl Write,
        cancelled: impl Fn() -> bool,
    ) -> Result<u64, StoreError> {
        let mut pages = self.conn.prepare(COPY_PAGES)?;
        let mut rows = pages.query([])?;
        let mut written = 0;
        while let Some(row) = rows.next()? {
            let number = row.get::<_, i64>(0)?.unsigned_abs();
            let mut data: Vec<u8> = row.get(1)?;
            if number != written / self.page_size + 1 || data.len() as u64 != self.page_size {
                return Err(StoreError::CopyIncomplete(format!(
                    "page {number} of the copy is out of order or {} bytes long",
                    data.len()
                )));
            }
            if cancelled() {
                return Err(StoreError::CopyCancelled);
            }
            if number == 1 {
                data[WRITE_VERSION..=READ_VERSION].fill(LEGACY_JOURNAL);
            }
            out.write_all(&data).map_err(StoreError::CopyNotSent)?;
            written += self.page_size;
        }
        if written != self.size() {
            return Err(StoreError::CopyIncomplete(format!(
                "the copy ended after {written} of {} bytes",
                self.size()
            )));
        }
        out.flush().map_err(StoreError::CopyNotSent)?;
        Ok(written)
    }
}
