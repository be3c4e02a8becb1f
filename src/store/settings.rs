//! The storage settings (`[storage]`): where the database lives, how it commits and what
//! it keeps.

use std::path::PathBuf;

use serde::Deserialize;

/// How SQLite trades durability against card writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    Full,
}

/// Whether other processes may open the database while the daemon has it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Locking {
    /// Anyone may: an `sqlite3` shell, a program reading the file. SQLite keeps the WAL's
    /// index in a file beside it (`-shm`), which the kernel writes back to the card about
    /// every 30 s while commits touch it.
    Shared,
    /// Nobody else may (the default): the daemon holds an exclusive lock on the file for
    /// as long as it runs, and SQLite keeps the WAL's index in the daemon's memory, so it
    /// is never written to the card. `sensorgate token` and `sensorgate backup` reach
    /// the database through the daemon's control socket.
    Exclusive,
}

impl Locking {
    /// The SQLite VFS that opens the database this way. Under `unix-excl` only a
    /// read-write connection takes the exclusive lock and moves the index into memory;
    /// read-only ones share what the process holds. So the writer must open the file
    /// before any reader does, or the index of a daemon with exclusive locking would be
    /// a `-shm` file again.
    pub(crate) fn vfs(self) -> &'static str {
        match self {
            Locking::Shared => "unix",
            Locking::Exclusive => "unix-excl",
        }
    }
}

/// The database and what it keeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub synchronous: Synchronous,
    /// Whether other processes may open the database while the daemon runs.
    pub locking: Locking,
    /// Samples from sensors wait up to this long for others before they are committed
    /// together; 0 commits each at once. REST writes never wait.
    pub commit_window_ms: u64,
    /// Bytes the daemon may write to the card per day, in MB (10^6 bytes); past it the
    /// commit window widens, up to `max_commit_window_ms`. 0: no budget.
    pub write_budget_mb_per_day: u64,
    /// The widest the write budget may make the commit window (never narrower than
    /// `commit_window_ms`).
    pub max_commit_window_ms: u64,
    /// The free space the database leaves its file system: this share of it in percent
    /// or `min_free_mb`, whichever is smaller. Below it the oldest raw readings go.
    /// 0 in either turns the floor off.
    pub min_free_percent: u8,
    /// See `min_free_percent`.
    pub min_free_mb: u64,
    pub max_events: u64,
    /// Raw readings older than this many days are removed; 0 keeps them forever.
    pub readings_retention_days: u32,
    /// Retention of the minute, hour and day roll-ups, in days; 0 keeps them forever.
    pub minute_rollup_retention_days: u32,
    pub hour_rollup_retention_days: u32,
    pub day_rollup_retention_days: u32,
    /// Seconds between retention passes.
    pub maintenance_interval_s: u64,
    /// Largest the database may grow, in MiB (0: as large as the card allows). Past it,
    /// writes fail as on a full card until retention or an operator frees space.
    pub max_database_mb: u64,
    /// Raw-reading retention for particular `tipo`s or sensors, instead of
    /// `readings_retention_days`.
    pub retention: Vec<RetentionRule>,
    /// Readings stamped more than this many seconds ahead of the gateway's clock are
    /// refused while the clock is trusted, and never stay the latest value.
    pub max_future_s: u64,
}

/// Keeps the raw readings of one `tipo`, or of one sensor (by name), for `days`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    #[serde(default)]
    pub tipo: Option<String>,
    #[serde(default)]
    pub sensor: Option<String>,
    pub days: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("/var/lib/sensorgate"),
            synchronous: Synchronous::Full,
            locking: Locking::Exclusive,
            commit_window_ms: 1000,
            write_budget_mb_per_day: 0,
            max_commit_window_ms: 30_000,
            min_free_percent: 10,
            min_free_mb: 1024,
            max_events: 1_000_000,
            readings_retention_days: 365,
            minute_rollup_retention_days: 31,
            hour_rollup_retention_days: 1825,
            day_rollup_retention_days: 0,
            maintenance_interval_s: 60,
            max_database_mb: 0,
            retention: Vec::new(),
            max_future_s: 300,
        }
    }
}
