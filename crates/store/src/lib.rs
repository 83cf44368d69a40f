//! SQLite persistence for conductor: workspaces, the persistent task queue, task command
//! results and logs, snapshots, and instance metadata. Nothing else in conductor writes SQL.
//!
//! # Durability
//!
//! The promise this crate keeps is that a `kill -9` (or any other process crash) loses no
//! task the API has accepted:
//!
//! - The database runs in **WAL mode with `synchronous=NORMAL`**. A transaction is committed
//!   once its frames are appended to the write-ahead log; the log is fsynced at checkpoints.
//!   Written data survives a crash of the *process* (the OS page cache still holds it); only
//!   a power loss or kernel crash can roll back the last few commits, which is the accepted
//!   trade for not fsyncing on every task insert.
//! - Every write method returns only **after its transaction has committed**. So an HTTP 202
//!   sent after [`Store::insert_tasks`] returns always refers to a durable row.
//! - Every state change is one statement or one transaction; claiming the next task is a
//!   single `BEGIN IMMEDIATE` transaction, so two workers (threads or processes sharing the
//!   file) can never claim the same task.
//!
//! # Shape
//!
//! A [`Store`] owns one connection behind a [`std::sync::Mutex`]; its methods take `&self`
//! and are synchronous: every call is a short, indexed, single-row (or small) operation, so
//! async callers may call them directly. One file per table family holds its repository
//! methods (`workspaces`, `tasks`, `snapshots`, `meta`); `migrations` holds the schema as an
//! ordered list of SQL scripts tracked with `PRAGMA user_version`.
//!
//! Rows are decoded strictly: a state string the lifecycle enums do not know, or an integer
//! out of range, is reported as [`StoreError::Corrupt`] naming the table, row and column,
//! never silently mapped to a default.

mod egress;
mod leases;
mod meta;
mod migrations;
mod secrets;
mod snapshots;
mod tasks;
mod workspaces;

use std::path::Path;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::types::{FromSql, Value};
use rusqlite::{ffi, Connection, Row, TransactionBehavior};

pub use egress::{EgressDecision, EgressEventRecord, EgressFilter, EgressHostSummary, EgressSummary};
pub use leases::{LeaseRecord, OnTimeout};
pub use secrets::{SecretKey, SecretMeta, SecretValue};
pub use snapshots::SnapshotRecord;
pub use tasks::{CommandResult, LogChunk, NewTask, TaskFilter, TaskRecord};
pub use workspaces::{WorkspaceFilter, WorkspaceRecord};

/// How long a statement waits for another connection's write lock before failing with
/// `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Errors of the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite itself failed (I/O, lock timeout, constraint violation, ...).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be decoded (unknown state string, integer out of range), or
    /// the schema is newer than this build understands.
    #[error("corrupt data in {what}: {detail}")]
    Corrupt {
        /// Table, row and column (or the schema) that failed to decode.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// An update or delete addressed a row that does not exist.
    #[error("{what} not found")]
    NotFound {
        /// The entity and its id, e.g. `task 'abc'`.
        what: String,
    },
}

impl StoreError {
    /// Whether this is a uniqueness violation (duplicate task id, duplicate snapshot name
    /// within a workspace, ...): the caller usually maps it to a conflict, not an outage.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite(e) if matches!(
                e.sqlite_error().map(|e| e.extended_code),
                Some(ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
            )
        )
    }
}

/// Result type of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The conductor database. Cheap to share behind an `Arc`; `Send + Sync`.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// SQL statements run since the store was opened (see [`Store::statements`]).
    statements: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// Opens (creating if missing) the database file at `path` and migrates it to the latest
    /// schema. The parent directory must exist.
    ///
    /// Several `Store`s (in one or several processes) may open the same file; SQLite's
    /// locking plus `busy_timeout` serialises their writes.
    pub fn open(path: &Path) -> Result<Store> {
        Store::init(Connection::open(path)?)
    }

    /// Opens a private in-memory database with the full schema, for tests. Not durable.
    pub fn open_in_memory() -> Result<Store> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        // The busy timeout goes first so that even switching to WAL waits for other openers.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // An in-memory database answers "memory"; a file database answers "wal".
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut conn)?;
        let statements = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = statements.clone();
        conn.trace_v2(
            rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT,
            Some(move |_: rusqlite::trace::TraceEvent<'_>| {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
            statements,
        })
    }

    /// How many SQL statements this store has run since it was opened: what the benchmark
    /// reports per command, to keep the store off the hot path.
    pub fn statements(&self) -> u64 {
        self.statements.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Locks the connection. A panic while the lock was held cannot have left a transaction
    /// open (an unwinding `Transaction` rolls back on drop), so a poisoned lock is still safe
    /// to use.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Applies the migrations the database has not seen yet, all in one transaction, and records
/// the new version in `PRAGMA user_version`.
fn migrate(conn: &mut Connection) -> Result<()> {
    let latest = migrations::MIGRATIONS.len();
    if schema_version(conn, latest)? == latest {
        return Ok(());
    }
    // Re-read under the write lock: another opener may have migrated in the meantime.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current = schema_version(&tx, latest)?;
    for sql in &migrations::MIGRATIONS[current..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", latest)?;
    tx.commit()?;
    Ok(())
}

/// The schema version recorded in the file; newer than `latest` is an error because this
/// build would misread tables it does not know.
fn schema_version(conn: &Connection, latest: usize) -> Result<usize> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    usize::try_from(version)
        .ok()
        .filter(|v| *v <= latest)
        .ok_or_else(|| StoreError::Corrupt {
            what: "schema version (PRAGMA user_version)".to_owned(),
            detail: format!("the database is at version {version}; this build knows versions up to {latest}"),
        })
}

/// Decodes one row, turning type and value errors into [`StoreError::Corrupt`] that names
/// the table and row (`what`) and the column.
struct Decoder<'a> {
    row: &'a Row<'a>,
    what: String,
}

impl<'a> Decoder<'a> {
    fn new(row: &'a Row<'a>, what: String) -> Self {
        Decoder { row, what }
    }

    fn get<T: FromSql>(&self, column: &str) -> Result<T> {
        self.row.get(column).map_err(|e| match e {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => self.corrupt(column, e.to_string()),
            other => other.into(),
        })
    }

    /// Decodes a JSON column into its type.
    fn json<T: serde::de::DeserializeOwned>(&self, column: &str) -> Result<T> {
        let raw: String = self.get(column)?;
        serde_json::from_str(&raw).map_err(|e| self.corrupt(column, e.to_string()))
    }

    /// Parses a column through `FromStr` (the lifecycle enums).
    fn parse<T: FromStr<Err = String>>(&self, column: &str) -> Result<T> {
        let raw: String = self.get(column)?;
        raw.parse().map_err(|detail| self.corrupt(column, detail))
    }

    fn corrupt(&self, column: &str, detail: String) -> StoreError {
        StoreError::Corrupt {
            what: format!("{}, column {column}", self.what),
            detail,
        }
    }
}

/// Runs a query and decodes every row with `decode`.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl Fn(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// Runs a query expected to yield at most one row (lookup by key, or `UPDATE ... RETURNING`
/// of a single row: SQLite applies the whole update on the first step).
fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl Fn(&Row<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    match rows.next()? {
        Some(row) => Ok(Some(decode(row)?)),
        None => Ok(None),
    }
}

/// Turns "0 rows changed" into [`StoreError::NotFound`].
fn expect_row(changed: usize, what: impl FnOnce() -> String) -> Result<()> {
    if changed == 0 {
        Err(StoreError::NotFound { what: what() })
    } else {
        Ok(())
    }
}

/// Maps a foreign-key violation (a child row for a missing parent) to
/// [`StoreError::NotFound`] naming the parent.
fn parent_missing(e: rusqlite::Error, parent: impl FnOnce() -> String) -> StoreError {
    if e.sqlite_error().map(|e| e.extended_code) == Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) {
        StoreError::NotFound { what: parent() }
    } else {
        e.into()
    }
}

/// Builds a `WHERE` clause from optional filters, with positional parameters.
#[derive(Default)]
struct Where {
    clauses: Vec<String>,
    params: Vec<Value>,
}

impl Where {
    /// Adds `column = value` when a value is given.
    fn eq(&mut self, column: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.params.push(Value::Text(value.to_owned()));
            self.clauses.push(format!("{column} = ?{}", self.params.len()));
        }
    }

    /// Adds `column IN (...)` when the list is not empty (empty means "any").
    fn any_of<'s>(&mut self, column: &str, values: impl IntoIterator<Item = &'s str>) {
        let mut placeholders = Vec::new();
        for value in values {
            self.params.push(Value::Text(value.to_owned()));
            placeholders.push(format!("?{}", self.params.len()));
        }
        if !placeholders.is_empty() {
            self.clauses.push(format!("{column} IN ({})", placeholders.join(", ")));
        }
    }

    /// Appends a positional parameter and returns its placeholder (for `LIMIT`/`OFFSET`).
    fn param(&mut self, value: i64) -> String {
        self.params.push(Value::Integer(value));
        format!("?{}", self.params.len())
    }

    /// The clause, with a leading space, or an empty string when nothing filters.
    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }

    fn params(&self) -> rusqlite::ParamsFromIter<std::slice::Iter<'_, Value>> {
        rusqlite::params_from_iter(self.params.iter())
    }
}

#[cfg(test)]
mod test_util {
    use super::Store;

    /// A store on a fresh file in its own temporary directory, with the real migrations.
    pub(crate) fn file_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("conductor.db")).expect("open store");
        (dir, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma_i64(store: &Store, name: &str) -> i64 {
        store.conn().pragma_query_value(None, name, |row| row.get(0)).unwrap()
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
    }

    #[test]
    fn open_sets_durability_pragmas_and_schema_version() {
        let (_dir, store) = test_util::file_store();
        let mode: String = store
            .conn()
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(pragma_i64(&store, "synchronous"), 1, "NORMAL");
        assert_eq!(pragma_i64(&store, "foreign_keys"), 1);
        assert_eq!(pragma_i64(&store, "busy_timeout"), 5000);
        assert_eq!(pragma_i64(&store, "user_version"), migrations::MIGRATIONS.len() as i64);
    }

    #[test]
    fn statements_are_counted() {
        let store = Store::open_in_memory().unwrap();
        let before = store.statements();
        store.get_workspace("nope").unwrap();
        store.get_workspace("nope").unwrap();
        assert_eq!(store.statements() - before, 2);
    }

    #[test]
    fn reopening_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conductor.db");
        drop(Store::open(&path).unwrap());
        // A second run of CREATE TABLE would fail, so success proves the version check.
        let store = Store::open(&path).unwrap();
        assert_eq!(pragma_i64(&store, "user_version"), migrations::MIGRATIONS.len() as i64);
    }

    #[test]
    fn open_does_not_create_parent_directories() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open(&dir.path().join("missing/conductor.db")).unwrap_err();
        assert!(
            matches!(&err, StoreError::Sqlite(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen)),
            "{err:?}"
        );
    }

    #[test]
    fn newer_schema_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conductor.db");
        let store = Store::open(&path).unwrap();
        store.conn().pragma_update(None, "user_version", 999).unwrap();
        drop(store);
        match Store::open(&path).unwrap_err() {
            StoreError::Corrupt { what, detail } => {
                assert!(what.contains("user_version"), "{what}");
                assert!(detail.contains("999"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn in_memory_store_has_the_schema() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(pragma_i64(&store, "user_version"), migrations::MIGRATIONS.len() as i64);
        assert_eq!(pragma_i64(&store, "foreign_keys"), 1);
    }
}
