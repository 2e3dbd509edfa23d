//! The embedded [`Store`]: one SQLite file in WAL mode.
//!
//! # Connection model
//!
//! WAL lets any number of readers run alongside one writer, so the store keeps two small pools
//! over the same file:
//!
//! - one **writer** connection: every statement that changes data goes through it, which
//!   serialises writes inside the process and makes compare-and-set steps (spending a refresh
//!   token) trivially atomic. Multi-statement writes use `BEGIN IMMEDIATE` so that another process
//!   on the same file (`chorus migrate`) makes us wait on the busy timeout instead of failing a
//!   lock upgrade halfway through.
//! - [`READERS`] **reader** connections (`query_only`): lists and lookups, which never wait for the
//!   writer and see the last committed state when their statement starts.
//!
//! Each pool is a `std::sync::Mutex<Vec<Connection>>` guarded by a tokio [`Semaphore`] with one
//! permit per connection: callers queue on the semaphore asynchronously, then the SQLite work runs
//! on the blocking thread pool (`spawn_blocking`), where the mutex is held only to take or return
//! a connection. A connection lost to a panic is reopened on demand, and one left inside a
//! transaction is discarded rather than reused. A caller that gives up (a dropped future) does not
//! cancel a write already handed to the blocking pool.
//!
//! # Stored representation
//!
//! UUIDs are hyphenated lowercase TEXT; timestamps are INTEGER unix **microseconds**, so every
//! `DateTime<Utc>` written is truncated to microsecond precision and reads back truncated. Callers
//! that compare what they wrote with what they read should truncate first (a `Utc::now()` has
//! nanoseconds on Linux). Settings and scopes are JSON text.
//!
//! [`SqliteStore::open`] is blocking (it creates the file and migrates it); call it at startup,
//! before serving. [`SqliteStore::migrate`] does only the migration step, for `chorus migrate`.
//!
//! # Several nodes on one file
//!
//! A development cluster runs several `chorus` processes on one file (WAL serves several
//! processes on one host). Each store instance serves one node ([`SqliteStore::open_for_node`])
//! and records it as the owner of every message it inserts, so a node's startup reaper
//! ([`Store::settle_orphaned_messages`]) settles only the turns it left behind, never another
//! live node's, and the cluster can settle a dead node's turns
//! ([`Store::settle_orphaned_messages_of`]).

mod migrations;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::functions::FunctionFlags;
use rusqlite::types::{Type, Value};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub use migrations::{AppliedMigration, MigrationReport, SCHEMA_VERSION};

use super::{
    ApiKey, BillingEvent, Chunk, ChunkCursor, ChunkPosition, Citation, Document, DocumentProgress,
    DocumentStatus, Message, MessageQuery, MessageRole, MessageStatus, ModelStats, Order, Page,
    ProviderKey, RefreshToken, Role, Share, SpendOutcome, Store, StoreError, StoreResult, Summary,
    Thread, ThreadCursor, ThreadQuery, Usage, User,
};

/// Reader connections per store: enough for a node's concurrent lists without holding many
/// file handles.
pub const READERS: usize = 4;

/// How long a statement waits for a lock held by another connection or process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A SQL function lower-casing with Rust's Unicode rules; SQLite's own `lower()` only folds ASCII,
/// which would make thread search miss "Über" for "über". The queries spell the name out.
const LOWER_FN: &str = "chorus_lower";

/// The node a store serves when none is named ([`SqliteStore::open`]): a single node.
pub const LOCAL_NODE: &str = "local";

/// The SQLite-backed [`Store`]. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Pool>,
    readers: Arc<Pool>,
    /// The node this instance serves: the owner recorded on the messages it inserts.
    node: Arc<str>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.writer.path)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if needed) and migrates the database at
    /// `path`, serving the node [`LOCAL_NODE`]. Blocking. Fails with
    /// [`StoreError::SchemaTooNew`] when the file was migrated by a newer binary.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        SqliteStore::open_for_node(path, LOCAL_NODE)
    }

    /// Like [`open`](Self::open), for the node named `node`: the messages this instance inserts
    /// are recorded as that node's, and its [`Store::settle_orphaned_messages`] settles only
    /// that node's (and unowned) messages. Several processes may open one file, each for its
    /// own node.
    pub fn open_for_node(path: &Path, node: &str) -> StoreResult<SqliteStore> {
        let (writer, _report) = open_and_migrate(path)?;
        let readers = (0..READERS)
            .map(|_| open_connection(path, ConnKind::Reader))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| at_path("open", path, e))?;
        Ok(SqliteStore {
            writer: Arc::new(Pool::new(path, ConnKind::Writer, vec![writer])),
            readers: Arc::new(Pool::new(path, ConnKind::Reader, readers)),
            node: Arc::from(node),
        })
    }

    /// Applies pending migrations to the database at `path` (creating it if needed) and reports
    /// what was done. Blocking; safe to run while nodes use the file.
    pub fn migrate(path: &Path) -> StoreResult<MigrationReport> {
        let (_conn, report) = open_and_migrate(path)?;
        Ok(report)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.writer.path
    }

    /// The node this instance serves (the owner of the messages it inserts).
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn read<T, F>(&self, op: &'static str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        run(&self.readers, op, f).await
    }

    async fn write<T, F>(&self, op: &'static str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        run(&self.writer, op, f).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnKind {
    Writer,
    Reader,
}

/// Idle connections of one kind, with a permit per connection.
struct Pool {
    path: PathBuf,
    kind: ConnKind,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    fn new(path: &Path, kind: ConnKind, conns: Vec<Connection>) -> Pool {
        let permits = Arc::new(Semaphore::new(conns.len().max(1)));
        Pool {
            path: path.to_path_buf(),
            kind,
            idle: Mutex::new(conns),
            permits,
        }
    }

    /// Takes an idle connection, or opens a replacement for one lost to a panic.
    fn checkout(&self, op: &'static str) -> StoreResult<Connection> {
        let idle = self
            .idle
            .lock()
            .map_err(|_| backend(op, "connection pool lock poisoned"))?
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_connection(&self.path, self.kind).map_err(|e| at_path(op, &self.path, e)),
        }
    }

    fn checkin(&self, conn: Connection) {
        // A connection still inside a transaction would leak its locks into the next caller's
        // work; dropping it rolls the transaction back and `checkout` opens a fresh one.
        if !conn.is_autocommit() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
    }
}

/// Runs `f` on a pooled connection on the blocking thread pool.
async fn run<T, F>(pool: &Arc<Pool>, op: &'static str, f: F) -> StoreResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
{
    let permit = Arc::clone(&pool.permits)
        .acquire_owned()
        .await
        .map_err(|e| backend(op, e))?;
    let pool = Arc::clone(pool);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut conn = pool.checkout(op)?;
        let result = f(&mut conn);
        pool.checkin(conn);
        result.map_err(|e| classify(op, e))
    })
    .await
    .map_err(|e| backend(op, e))?
}

fn open_and_migrate(path: &Path) -> StoreResult<(Connection, MigrationReport)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| at_path("open", parent, e))?;
    }
    let mut conn = open_connection(path, ConnKind::Writer).map_err(|e| at_path("open", path, e))?;
    // Refuse a newer file before changing anything about it, journal mode included.
    let found = migrations::user_version(&conn).map_err(|e| classify("open", e))?;
    migrations::check_not_too_new(found)?;
    enable_wal(&conn)?;
    let report = migrations::apply(&mut conn)?;
    Ok((conn, report))
}

fn enable_wal(conn: &Connection) -> StoreResult<()> {
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| classify("enable WAL", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(backend(
            "enable WAL",
            format!("SQLite kept journal_mode={mode}; the filesystem may not support WAL"),
        ));
    }
    Ok(())
}

fn open_connection(path: &Path, kind: ConnKind) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // Room for every statement the store prepares, list variants included.
    conn.set_prepared_statement_cache_capacity(64);
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    if kind == ConnKind::Reader {
        conn.pragma_update(None, "query_only", true)?;
    }
    conn.create_scalar_function(
        LOWER_FN,
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| Ok(ctx.get::<Option<String>>(0)?.map(|s| s.to_lowercase())),
    )?;
    Ok(conn)
}

// ---- errors ----

fn backend(
    op: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    StoreError::Backend {
        op,
        source: source.into(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("database {}", path.display())]
struct AtPath {
    path: PathBuf,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn at_path(
    op: &'static str,
    path: &Path,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    backend(
        op,
        AtPath {
            path: path.to_path_buf(),
            source: source.into(),
        },
    )
}

/// Maps SQLite errors onto the store's vocabulary: uniqueness violations are conflicts, values
/// that fail to decode are corruption, everything else is a backend failure.
fn classify(op: &'static str, err: rusqlite::Error) -> StoreError {
    match &err {
        rusqlite::Error::SqliteFailure(code, _)
            if code.code == ErrorCode::ConstraintViolation
                && matches!(
                    code.extended_code,
                    rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                        | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                ) =>
        {
            StoreError::Conflict(format!("{op}: {err}"))
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            StoreError::Corrupt(format!("{op}: {err}"))
        }
        _ => backend(op, err),
    }
}

// ---- value encoding ----

fn id(u: Uuid) -> String {
    u.hyphenated().to_string()
}

fn opt_id(u: Option<Uuid>) -> Option<String> {
    u.map(id)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn opt_micros(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(micros)
}

fn json<T: Serialize>(value: &T) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn message_role_str(role: MessageRole) -> &'static str {
    match role {
        MessageRole::User => "user",
        MessageRole::Assistant => "assistant",
        MessageRole::System => "system",
    }
}

fn parse_message_role(s: &str) -> Option<MessageRole> {
    match s {
        "user" => Some(MessageRole::User),
        "assistant" => Some(MessageRole::Assistant),
        "system" => Some(MessageRole::System),
        _ => None,
    }
}

fn message_status_str(status: MessageStatus) -> &'static str {
    match status {
        MessageStatus::Pending => "pending",
        MessageStatus::Streaming => "streaming",
        MessageStatus::Complete => "complete",
        MessageStatus::Interrupted => "interrupted",
        MessageStatus::Failed => "failed",
    }
}

fn parse_message_status(s: &str) -> Option<MessageStatus> {
    match s {
        "pending" => Some(MessageStatus::Pending),
        "streaming" => Some(MessageStatus::Streaming),
        "complete" => Some(MessageStatus::Complete),
        "interrupted" => Some(MessageStatus::Interrupted),
        "failed" => Some(MessageStatus::Failed),
        _ => None,
    }
}

// ---- value decoding ----

fn bad_value(
    idx: usize,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, err.into())
}

fn uuid_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    let text: String = row.get(idx)?;
    Uuid::parse_str(&text).map_err(|e| bad_value(idx, e))
}

fn opt_uuid_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Uuid>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| Uuid::parse_str(&t).map_err(|e| bad_value(idx, e)))
        .transpose()
}

fn to_time(idx: usize, us: i64) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).ok_or(rusqlite::Error::IntegralValueOutOfRange(idx, us))
}

fn time_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    to_time(idx, row.get(idx)?)
}

fn opt_time_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    row.get::<_, Option<i64>>(idx)?
        .map(|us| to_time(idx, us))
        .transpose()
}

fn json_col<T: DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| bad_value(idx, e))
}

fn enum_col<T>(row: &Row<'_>, idx: usize, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    parse(&text).ok_or_else(|| bad_value(idx, format!("unknown value {text:?}")))
}

/// The row limit for a page: one more than asked, to learn whether another page follows. A zero
/// limit is read as one, since an empty page could not say where the next one starts.
fn fetch_limit(limit: usize) -> (usize, i64) {
    let limit = limit.max(1);
    let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
    (limit, fetch)
}

fn into_page<T, C>(mut items: Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> C) -> Page<T, C> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor_of)
    } else {
        None
    };
    Page { items, next }
}

// ---- rows ----
//
// Column lists are macros so that queries stay `&'static str` literals (and cache well); each
// `*_from_row` reads the columns in the order of its list.

macro_rules! user_cols {
    () => {
        "id, email, display_name, password_hash, tier, role, settings, created_at, updated_at"
    };
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: uuid_col(row, 0)?,
        email: row.get(1)?,
        display_name: row.get(2)?,
        password_hash: row.get(3)?,
        tier: row.get(4)?,
        role: enum_col(row, 5, Role::parse)?,
        settings: json_col(row, 6)?,
        created_at: time_col(row, 7)?,
        updated_at: time_col(row, 8)?,
    })
}

macro_rules! refresh_cols {
    () => {
        "token_hash, user_id, family_id, created_at, expires_at, spent_at, revoked_at"
    };
}

fn refresh_from_row(row: &Row<'_>) -> rusqlite::Result<RefreshToken> {
    Ok(RefreshToken {
        token_hash: row.get(0)?,
        user_id: uuid_col(row, 1)?,
        family_id: uuid_col(row, 2)?,
        created_at: time_col(row, 3)?,
        expires_at: time_col(row, 4)?,
        spent_at: opt_time_col(row, 5)?,
        revoked_at: opt_time_col(row, 6)?,
    })
}

macro_rules! api_key_cols {
    () => {
        "id, key_hash, user_id, name, scopes, created_at, last_used_at"
    };
}

fn api_key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: uuid_col(row, 0)?,
        key_hash: row.get(1)?,
        user_id: uuid_col(row, 2)?,
        name: row.get(3)?,
        scopes: json_col(row, 4)?,
        created_at: time_col(row, 5)?,
        last_used_at: opt_time_col(row, 6)?,
    })
}

macro_rules! thread_cols {
    () => {
        "user_id, id, title, system_prompt, model, bookmarked, created_at, updated_at, \
         message_count"
    };
}

fn thread_from_row(row: &Row<'_>) -> rusqlite::Result<Thread> {
    Ok(Thread {
        user_id: uuid_col(row, 0)?,
        id: uuid_col(row, 1)?,
        title: row.get(2)?,
        system_prompt: row.get(3)?,
        model: row.get(4)?,
        bookmarked: row.get(5)?,
        created_at: time_col(row, 6)?,
        updated_at: time_col(row, 7)?,
        message_count: row.get(8)?,
    })
}

macro_rules! message_cols {
    () => {
        "user_id, thread_id, id, role, model, content, status, input_tokens, output_tokens, \
         cost_usd, latency_ms, ttft_ms, provider, parent_id, turn_id, created_at, deployment, \
         citations"
    };
}

/// Citations as stored: JSON, or NULL for none.
fn citations_text(citations: &[Citation]) -> rusqlite::Result<Option<String>> {
    if citations.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(citations)
        .map(Some)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn citations_col(row: &Row<'_>, index: usize) -> rusqlite::Result<Vec<Citation>> {
    match row.get::<_, Option<String>>(index)? {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                index,
                rusqlite::types::Type::Text,
                Box::new(e),
            )
        }),
    }
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        user_id: uuid_col(row, 0)?,
        thread_id: uuid_col(row, 1)?,
        id: uuid_col(row, 2)?,
        role: enum_col(row, 3, parse_message_role)?,
        model: row.get(4)?,
        content: row.get(5)?,
        status: enum_col(row, 6, parse_message_status)?,
        usage: Usage {
            input_tokens: row.get(7)?,
            output_tokens: row.get(8)?,
        },
        cost_usd: row.get(9)?,
        latency_ms: row.get(10)?,
        ttft_ms: row.get(11)?,
        provider: row.get(12)?,
        parent_id: opt_uuid_col(row, 13)?,
        turn_id: opt_uuid_col(row, 14)?,
        created_at: time_col(row, 15)?,
        deployment: row.get(16)?,
        citations: citations_col(row, 17)?,
    })
}

macro_rules! summary_cols {
    () => {
        "user_id, thread_id, model, text, covers_until, updated_at"
    };
}

fn summary_from_row(row: &Row<'_>) -> rusqlite::Result<Summary> {
    Ok(Summary {
        user_id: uuid_col(row, 0)?,
        thread_id: uuid_col(row, 1)?,
        model: row.get(2)?,
        text: row.get(3)?,
        covers_until: uuid_col(row, 4)?,
        updated_at: time_col(row, 5)?,
    })
}

macro_rules! share_cols {
    () => {
        "share_id, user_id, thread_id, created_at, expires_at"
    };
}

fn share_from_row(row: &Row<'_>) -> rusqlite::Result<Share> {
    Ok(Share {
        share_id: row.get(0)?,
        user_id: uuid_col(row, 1)?,
        thread_id: uuid_col(row, 2)?,
        created_at: time_col(row, 3)?,
        expires_at: opt_time_col(row, 4)?,
    })
}

macro_rules! document_cols {
    () => {
        "user_id, id, name, mime, size, status, progress, chunk_count, error, blob_key, \
         created_at, updated_at"
    };
}

fn document_from_row(row: &Row<'_>) -> rusqlite::Result<Document> {
    Ok(Document {
        user_id: uuid_col(row, 0)?,
        id: uuid_col(row, 1)?,
        name: row.get(2)?,
        mime: row.get(3)?,
        size: row.get(4)?,
        status: enum_col(row, 5, DocumentStatus::parse)?,
        progress: row.get(6)?,
        chunk_count: row.get(7)?,
        error: row.get(8)?,
        blob_key: row.get(9)?,
        created_at: time_col(row, 10)?,
        updated_at: time_col(row, 11)?,
    })
}

macro_rules! chunk_cols {
    () => {
        "user_id, document_id, seq, text, position, token_count, embedding"
    };
}

fn chunk_from_row(row: &Row<'_>) -> rusqlite::Result<Chunk> {
    let position: ChunkPosition = json_col(row, 4)?;
    let embedding: Option<Vec<u8>> = row.get(6)?;
    Ok(Chunk {
        user_id: uuid_col(row, 0)?,
        document_id: uuid_col(row, 1)?,
        seq: row.get(2)?,
        text: row.get(3)?,
        position,
        token_count: row.get(5)?,
        embedding: embedding
            .map(|bytes| decode_embedding(&bytes).map_err(|e| bad_value(6, e)))
            .transpose()?,
    })
}

/// Embeddings are stored as little-endian `f32`s, 4 bytes each.
fn encode_embedding(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_embedding(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(4) {
        return Err(format!(
            "embedding of {} bytes is not a whole number of f32s",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.read("ping", |conn| {
            conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0))
                .map(drop)
        })
        .await
    }

    // ---- users ----

    async fn create_user(&self, user: &User) -> StoreResult<()> {
        let u = user.clone();
        self.write("create_user", move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO users (",
                user_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ))?
            .execute(params![
                id(u.id),
                u.email,
                u.display_name,
                u.password_hash,
                u.tier,
                u.role.as_str(),
                json(&u.settings)?,
                micros(u.created_at),
                micros(u.updated_at),
            ])
            .map(drop)
        })
        .await
    }

    async fn get_user(&self, user_id: Uuid) -> StoreResult<Option<User>> {
        self.read("get_user", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                user_cols!(),
                " FROM users WHERE id = ?1"
            ))?
            .query_row([id(user_id)], user_from_row)
            .optional()
        })
        .await
    }

    async fn get_user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        let email = email.to_owned();
        self.read("get_user_by_email", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                user_cols!(),
                " FROM users WHERE email = ?1"
            ))?
            .query_row([email], user_from_row)
            .optional()
        })
        .await
    }

    async fn update_user(&self, user: &User) -> StoreResult<bool> {
        let u = user.clone();
        self.write("update_user", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE users SET display_name = ?2, password_hash = ?3, tier = ?4, role = ?5, \
                     settings = ?6, updated_at = ?7 WHERE id = ?1",
                )?
                .execute(params![
                    id(u.id),
                    u.display_name,
                    u.password_hash,
                    u.tier,
                    u.role.as_str(),
                    json(&u.settings)?,
                    micros(u.updated_at),
                ])?;
            Ok(changed > 0)
        })
        .await
    }

    // ---- refresh tokens ----

    async fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<()> {
        let t = token.clone();
        self.write("insert_refresh_token", move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO refresh_tokens (",
                refresh_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))?
            .execute(params![
                t.token_hash,
                id(t.user_id),
                id(t.family_id),
                micros(t.created_at),
                micros(t.expires_at),
                opt_micros(t.spent_at),
                opt_micros(t.revoked_at),
            ])
            .map(drop)
        })
        .await
    }

    async fn get_refresh_token(&self, token_hash: &str) -> StoreResult<Option<RefreshToken>> {
        let hash = token_hash.to_owned();
        self.read("get_refresh_token", move |conn| get_refresh(conn, &hash))
            .await
    }

    async fn spend_refresh_token(
        &self,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<SpendOutcome> {
        let hash = token_hash.to_owned();
        self.write("spend_refresh_token", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let spent = tx
                .prepare_cached(
                    "UPDATE refresh_tokens SET spent_at = ?2 \
                     WHERE token_hash = ?1 AND spent_at IS NULL AND revoked_at IS NULL",
                )?
                .execute(params![hash, micros(at)])?;
            let outcome = match get_refresh(&tx, &hash)? {
                None => SpendOutcome::NotFound,
                Some(mut row) if spent > 0 => {
                    // The caller gets the row as it was before this call spent it.
                    row.spent_at = None;
                    SpendOutcome::Spent(row)
                }
                Some(row) => SpendOutcome::AlreadyUsed(row),
            };
            tx.commit()?;
            Ok(outcome)
        })
        .await
    }

    async fn revoke_refresh_token(&self, token_hash: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let hash = token_hash.to_owned();
        self.write("revoke_refresh_token", move |conn| {
            // COALESCE keeps the first revocation time, so the row still counts as existing.
            let changed = conn
                .prepare_cached(
                    "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, ?2) \
                     WHERE token_hash = ?1",
                )?
                .execute(params![hash, micros(at)])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn revoke_refresh_family(
        &self,
        user_id: Uuid,
        family_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.write("revoke_refresh_family", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE refresh_tokens SET revoked_at = ?3 \
                     WHERE user_id = ?1 AND family_id = ?2 AND revoked_at IS NULL",
                )?
                .execute(params![id(user_id), id(family_id), micros(at)])?;
            Ok(changed as u64)
        })
        .await
    }

    // ---- api keys ----

    async fn insert_api_key(&self, key: &ApiKey) -> StoreResult<()> {
        let k = key.clone();
        self.write("insert_api_key", move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO api_keys (",
                api_key_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))?
            .execute(params![
                id(k.id),
                k.key_hash,
                id(k.user_id),
                k.name,
                json(&k.scopes)?,
                micros(k.created_at),
                opt_micros(k.last_used_at),
            ])
            .map(drop)
        })
        .await
    }

    async fn get_api_key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ApiKey>> {
        let hash = key_hash.to_owned();
        self.read("get_api_key_by_hash", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE key_hash = ?1"
            ))?
            .query_row([hash], api_key_from_row)
            .optional()
        })
        .await
    }

    async fn list_api_keys(&self, user_id: Uuid) -> StoreResult<Vec<ApiKey>> {
        self.read("list_api_keys", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                api_key_cols!(),
                " FROM api_keys WHERE user_id = ?1 ORDER BY created_at DESC, id DESC"
            ))?
            .query_map([id(user_id)], api_key_from_row)?
            .collect()
        })
        .await
    }

    async fn delete_api_key(&self, user_id: Uuid, key_id: Uuid) -> StoreResult<bool> {
        self.write("delete_api_key", move |conn| {
            let deleted = conn
                .prepare_cached("DELETE FROM api_keys WHERE user_id = ?1 AND id = ?2")?
                .execute([id(user_id), id(key_id)])?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn touch_api_key(&self, key_hash: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let hash = key_hash.to_owned();
        self.write("touch_api_key", move |conn| {
            conn.prepare_cached("UPDATE api_keys SET last_used_at = ?2 WHERE key_hash = ?1")?
                .execute(params![hash, micros(at)])
                .map(drop)
        })
        .await
    }

    // ---- threads ----

    async fn create_thread(&self, thread: &Thread) -> StoreResult<()> {
        let t = thread.clone();
        self.write("create_thread", move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO threads (",
                thread_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ))?
            .execute(params![
                id(t.user_id),
                id(t.id),
                t.title,
                t.system_prompt,
                t.model,
                t.bookmarked,
                micros(t.created_at),
                micros(t.updated_at),
                t.message_count,
            ])
            .map(drop)
        })
        .await
    }

    async fn get_thread(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<Option<Thread>> {
        self.read("get_thread", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                thread_cols!(),
                " FROM threads WHERE user_id = ?1 AND id = ?2"
            ))?
            .query_row([id(user_id), id(thread_id)], thread_from_row)
            .optional()
        })
        .await
    }

    async fn update_thread(&self, thread: &Thread) -> StoreResult<bool> {
        let t = thread.clone();
        self.write("update_thread", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE threads SET title = ?3, system_prompt = ?4, model = ?5, \
                     bookmarked = ?6, updated_at = ?7 WHERE user_id = ?1 AND id = ?2",
                )?
                .execute(params![
                    id(t.user_id),
                    id(t.id),
                    t.title,
                    t.system_prompt,
                    t.model,
                    t.bookmarked,
                    micros(t.updated_at),
                ])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn delete_thread(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<bool> {
        self.write("delete_thread", move |conn| {
            let (user, thread) = (id(user_id), id(thread_id));
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Explicit child deletes rather than relying on ON DELETE CASCADE alone: the outcome
            // must not depend on a connection having `foreign_keys` on.
            tx.prepare_cached("DELETE FROM messages WHERE user_id = ?1 AND thread_id = ?2")?
                .execute(params![user, thread])?;
            tx.prepare_cached("DELETE FROM summaries WHERE user_id = ?1 AND thread_id = ?2")?
                .execute(params![user, thread])?;
            tx.prepare_cached("DELETE FROM shares WHERE user_id = ?1 AND thread_id = ?2")?
                .execute(params![user, thread])?;
            let deleted = tx
                .prepare_cached("DELETE FROM threads WHERE user_id = ?1 AND id = ?2")?
                .execute(params![user, thread])?;
            tx.commit()?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn list_threads(
        &self,
        user_id: Uuid,
        query: &ThreadQuery,
    ) -> StoreResult<Page<Thread, ThreadCursor>> {
        let (limit, fetch) = fetch_limit(query.limit);
        let mut sql = String::from(concat!(
            "SELECT ",
            thread_cols!(),
            " FROM threads WHERE user_id = ?"
        ));
        let mut args = vec![Value::Text(id(user_id))];
        if let Some(cursor) = query.cursor {
            sql.push_str(" AND (updated_at, id) < (?, ?)");
            args.push(Value::Integer(micros(cursor.updated_at)));
            args.push(Value::Text(id(cursor.id)));
        }
        if let Some(bookmarked) = query.bookmarked {
            sql.push_str(" AND bookmarked = ?");
            args.push(Value::Integer(i64::from(bookmarked)));
        }
        // An empty needle would match every titled thread but no untitled one: treat it as absent.
        if let Some(q) = query.q.as_deref().filter(|q| !q.is_empty()) {
            // instr() rather than LIKE: the needle is matched literally, `%` and `_` included.
            sql.push_str(
                " AND (instr(chorus_lower(title), ?) > 0 OR EXISTS (\
                 SELECT 1 FROM summaries AS s \
                 WHERE s.user_id = threads.user_id AND s.thread_id = threads.id \
                 AND instr(chorus_lower(s.text), ?) > 0))",
            );
            let needle = q.to_lowercase();
            args.push(Value::Text(needle.clone()));
            args.push(Value::Text(needle));
        }
        sql.push_str(" ORDER BY updated_at DESC, id DESC LIMIT ?");
        args.push(Value::Integer(fetch));

        let items = self
            .read("list_threads", move |conn| {
                conn.prepare_cached(&sql)?
                    .query_map(rusqlite::params_from_iter(args), thread_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(into_page(items, limit, |t| ThreadCursor {
            updated_at: t.updated_at,
            id: t.id,
        }))
    }

    async fn thread_model_stats(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
    ) -> StoreResult<Vec<ModelStats>> {
        self.read("thread_model_stats", move |conn| {
            let (user, thread) = (id(user_id), id(thread_id));
            // One read transaction, so counts and summaries come from the same snapshot.
            let tx = conn.transaction()?;
            let mut summaries = tx
                .prepare_cached(concat!(
                    "SELECT ",
                    summary_cols!(),
                    " FROM summaries WHERE user_id = ?1 AND thread_id = ?2"
                ))?
                .query_map(params![user, thread], summary_from_row)?
                .map(|s| s.map(|s| (s.model.clone(), s)))
                .collect::<rusqlite::Result<HashMap<_, _>>>()?;
            let stats = tx
                .prepare_cached(
                    "SELECT model, COUNT(*) FROM messages \
                     WHERE user_id = ?1 AND thread_id = ?2 AND model IS NOT NULL \
                     GROUP BY model ORDER BY model",
                )?
                .query_map(params![user, thread], |row| {
                    Ok((row.get::<_, String>(0)?, row.get(1)?))
                })?
                .map(|r| {
                    r.map(|(model, message_count)| ModelStats {
                        summary: summaries.remove(&model),
                        model,
                        message_count,
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(stats)
        })
        .await
    }

    // ---- messages ----

    async fn append_message(&self, message: &Message) -> StoreResult<()> {
        let m = message.clone();
        let node = self.node.clone();
        self.write("append_message", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(concat!(
                "INSERT INTO messages (",
                message_cols!(),
                ", node) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
            ))?
            .execute(params![
                id(m.user_id),
                id(m.thread_id),
                id(m.id),
                message_role_str(m.role),
                m.model,
                m.content,
                message_status_str(m.status),
                m.usage.input_tokens,
                m.usage.output_tokens,
                m.cost_usd,
                m.latency_ms,
                m.ttft_ms,
                m.provider,
                opt_id(m.parent_id),
                opt_id(m.turn_id),
                micros(m.created_at),
                m.deployment,
                citations_text(&m.citations)?,
                &*node,
            ])?;
            tx.prepare_cached(
                "UPDATE threads SET message_count = message_count + 1, \
                 updated_at = max(updated_at, ?3) WHERE user_id = ?1 AND id = ?2",
            )?
            .execute(params![
                id(m.user_id),
                id(m.thread_id),
                micros(m.created_at)
            ])?;
            tx.commit()
        })
        .await
    }

    async fn update_message(&self, message: &Message) -> StoreResult<bool> {
        let m = message.clone();
        self.write("update_message", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE messages SET content = ?4, status = ?5, input_tokens = ?6, \
                     output_tokens = ?7, cost_usd = ?8, latency_ms = ?9, ttft_ms = ?10, \
                     provider = ?11, model = ?12, deployment = ?13 \
                     WHERE user_id = ?1 AND thread_id = ?2 AND id = ?3",
                )?
                .execute(params![
                    id(m.user_id),
                    id(m.thread_id),
                    id(m.id),
                    m.content,
                    message_status_str(m.status),
                    m.usage.input_tokens,
                    m.usage.output_tokens,
                    m.cost_usd,
                    m.latency_ms,
                    m.ttft_ms,
                    m.provider,
                    m.model,
                    m.deployment,
                ])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn get_message(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        message_id: Uuid,
    ) -> StoreResult<Option<Message>> {
        self.read("get_message", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                message_cols!(),
                " FROM messages WHERE user_id = ?1 AND thread_id = ?2 AND id = ?3"
            ))?
            .query_row(
                [id(user_id), id(thread_id), id(message_id)],
                message_from_row,
            )
            .optional()
        })
        .await
    }

    async fn list_messages(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        query: &MessageQuery,
    ) -> StoreResult<Page<Message, Uuid>> {
        let (limit, fetch) = fetch_limit(query.limit);
        let (after, direction) = match query.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let mut sql = String::from(concat!(
            "SELECT ",
            message_cols!(),
            " FROM messages WHERE user_id = ? AND thread_id = ?"
        ));
        let mut args = vec![Value::Text(id(user_id)), Value::Text(id(thread_id))];
        if let Some(cursor) = query.cursor {
            // Hyphenated lowercase UUIDv7 text sorts like the ids themselves: in time order.
            sql.push_str(&format!(" AND id {after} ?"));
            args.push(Value::Text(id(cursor)));
        }
        if let Some(model) = &query.model {
            sql.push_str(" AND model = ?");
            args.push(Value::Text(model.clone()));
        }
        sql.push_str(&format!(" ORDER BY id {direction} LIMIT ?"));
        args.push(Value::Integer(fetch));

        let items = self
            .read("list_messages", move |conn| {
                conn.prepare_cached(&sql)?
                    .query_map(rusqlite::params_from_iter(args), message_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(into_page(items, limit, |m| m.id))
    }

    // ---- summaries ----

    async fn upsert_summary(&self, summary: &Summary) -> StoreResult<()> {
        let s = summary.clone();
        self.write("upsert_summary", move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO summaries (",
                summary_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (user_id, thread_id, model) DO UPDATE SET \
                 text = excluded.text, covers_until = excluded.covers_until, \
                 updated_at = excluded.updated_at"
            ))?
            .execute(params![
                id(s.user_id),
                id(s.thread_id),
                s.model,
                s.text,
                id(s.covers_until),
                micros(s.updated_at),
            ])
            .map(drop)
        })
        .await
    }

    async fn get_summary(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        model: &str,
    ) -> StoreResult<Option<Summary>> {
        let model = model.to_owned();
        self.read("get_summary", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                summary_cols!(),
                " FROM summaries WHERE user_id = ?1 AND thread_id = ?2 AND model = ?3"
            ))?
            .query_row([id(user_id), id(thread_id), model], summary_from_row)
            .optional()
        })
        .await
    }

    // ---- usage ----

    async fn add_usage(
        &self,
        user_id: Uuid,
        period: &str,
        kind: &str,
        delta: i64,
    ) -> StoreResult<i64> {
        let (period, kind) = (period.to_owned(), kind.to_owned());
        self.write("add_usage", move |conn| {
            conn.prepare_cached(
                "INSERT INTO usage (user_id, period, kind, value) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (user_id, period, kind) DO UPDATE SET value = value + excluded.value \
                 RETURNING value",
            )?
            .query_row(params![id(user_id), period, kind, delta], |row| row.get(0))
        })
        .await
    }

    async fn get_usage(&self, user_id: Uuid, period: &str) -> StoreResult<BTreeMap<String, i64>> {
        let period = period.to_owned();
        self.read("get_usage", move |conn| {
            conn.prepare_cached("SELECT kind, value FROM usage WHERE user_id = ?1 AND period = ?2")?
                .query_map([id(user_id), period], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
        })
        .await
    }

    // ---- shares ----

    async fn create_share(&self, share: &Share) -> StoreResult<()> {
        let s = share.clone();
        self.write("create_share", move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO shares (",
                share_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5)"
            ))?
            .execute(params![
                s.share_id,
                id(s.user_id),
                id(s.thread_id),
                micros(s.created_at),
                opt_micros(s.expires_at),
            ])
            .map(drop)
        })
        .await
    }

    async fn get_share(&self, share_id: &str) -> StoreResult<Option<Share>> {
        let share_id = share_id.to_owned();
        self.read("get_share", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                share_cols!(),
                " FROM shares WHERE share_id = ?1"
            ))?
            .query_row([share_id], share_from_row)
            .optional()
        })
        .await
    }

    async fn delete_shares_for_thread(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<u64> {
        self.write("delete_shares_for_thread", move |conn| {
            let deleted = conn
                .prepare_cached("DELETE FROM shares WHERE user_id = ?1 AND thread_id = ?2")?
                .execute([id(user_id), id(thread_id)])?;
            Ok(deleted as u64)
        })
        .await
    }

    async fn settle_orphaned_messages(
        &self,
        created_before: DateTime<Utc>,
        status: MessageStatus,
    ) -> StoreResult<u64> {
        let node = self.node.clone();
        self.write("settle_orphaned_messages", move |conn| {
            let settled = conn
                .prepare_cached(
                    "UPDATE messages SET status = ?1 WHERE status = 'streaming' \
                     AND created_at < ?2 AND (node = ?3 OR node IS NULL)",
                )?
                .execute(params![
                    message_status_str(status),
                    micros(created_before),
                    &*node
                ])?;
            Ok(settled as u64)
        })
        .await
    }

    async fn settle_orphaned_messages_of(
        &self,
        node: &str,
        at: DateTime<Utc>,
        status: MessageStatus,
    ) -> StoreResult<u64> {
        let node = node.to_owned();
        self.write("settle_orphaned_messages_of", move |conn| {
            let settled = conn
                .prepare_cached(
                    "UPDATE messages SET status = ?1 WHERE status = 'streaming' \
                     AND created_at < ?2 AND node = ?3",
                )?
                .execute(params![message_status_str(status), micros(at), node])?;
            Ok(settled as u64)
        })
        .await
    }

    async fn streaming_node(&self, user_id: Uuid, thread_id: Uuid) -> StoreResult<Option<String>> {
        self.read("streaming_node", move |conn| {
            conn.prepare_cached(
                "SELECT node FROM messages WHERE user_id = ?1 AND thread_id = ?2 \
                 AND status = 'streaming' AND node IS NOT NULL ORDER BY id DESC LIMIT 1",
            )?
            .query_row([id(user_id), id(thread_id)], |r| r.get::<_, String>(0))
            .optional()
        })
        .await
    }

    async fn put_provider_key(&self, key: &ProviderKey) -> StoreResult<()> {
        let key = key.clone();
        self.write("put_provider_key", move |conn| {
            conn.prepare_cached(
                "INSERT INTO provider_keys (user_id, provider, sealed, updated_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (user_id, provider) DO UPDATE \
                 SET sealed = excluded.sealed, updated_at = excluded.updated_at",
            )?
            .execute(params![
                id(key.user_id),
                key.provider,
                key.sealed,
                micros(key.updated_at)
            ])?;
            Ok(())
        })
        .await
    }

    async fn list_provider_keys(&self, user_id: Uuid) -> StoreResult<Vec<ProviderKey>> {
        self.read("list_provider_keys", move |conn| {
            conn.prepare_cached(
                "SELECT user_id, provider, sealed, updated_at FROM provider_keys \
                 WHERE user_id = ?1 ORDER BY provider",
            )?
            .query_map([id(user_id)], |row| {
                Ok(ProviderKey {
                    user_id: uuid_col(row, 0)?,
                    provider: row.get(1)?,
                    sealed: row.get(2)?,
                    updated_at: time_col(row, 3)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn delete_provider_key(&self, user_id: Uuid, provider: &str) -> StoreResult<bool> {
        let provider = provider.to_owned();
        self.write("delete_provider_key", move |conn| {
            let deleted = conn
                .prepare_cached("DELETE FROM provider_keys WHERE user_id = ?1 AND provider = ?2")?
                .execute(params![id(user_id), provider])?;
            Ok(deleted > 0)
        })
        .await
    }

    // ---- billing events ----

    async fn insert_billing_event(&self, event: &BillingEvent) -> StoreResult<bool> {
        let e = event.clone();
        self.write("insert_billing_event", move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO billing_events (event_id, user_id, type, received_at) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (event_id) DO NOTHING",
                )?
                .execute(params![
                    e.event_id,
                    id(e.user_id),
                    e.event_type,
                    micros(e.received_at)
                ])?;
            Ok(inserted > 0)
        })
        .await
    }

    async fn get_billing_event(&self, event_id: &str) -> StoreResult<Option<BillingEvent>> {
        let event_id = event_id.to_owned();
        self.read("get_billing_event", move |conn| {
            conn.prepare_cached(
                "SELECT event_id, user_id, type, received_at FROM billing_events \
                 WHERE event_id = ?1",
            )?
            .query_row([event_id], |row| {
                Ok(BillingEvent {
                    event_id: row.get(0)?,
                    user_id: uuid_col(row, 1)?,
                    event_type: row.get(2)?,
                    received_at: time_col(row, 3)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn delete_billing_event(&self, event_id: &str) -> StoreResult<bool> {
        let event_id = event_id.to_owned();
        self.write("delete_billing_event", move |conn| {
            let deleted = conn
                .prepare_cached("DELETE FROM billing_events WHERE event_id = ?1")?
                .execute([event_id])?;
            Ok(deleted > 0)
        })
        .await
    }

    // ---- documents and chunks ----

    async fn create_document(&self, document: &Document) -> StoreResult<()> {
        let d = document.clone();
        self.write("create_document", move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO documents (",
                document_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))?
            .execute(params![
                id(d.user_id),
                id(d.id),
                d.name,
                d.mime,
                d.size,
                d.status.as_str(),
                d.progress,
                d.chunk_count,
                d.error,
                d.blob_key,
                micros(d.created_at),
                micros(d.updated_at),
            ])
            .map(drop)
        })
        .await
    }

    async fn get_document(
        &self,
        user_id: Uuid,
        document_id: Uuid,
    ) -> StoreResult<Option<Document>> {
        self.read("get_document", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                document_cols!(),
                " FROM documents WHERE user_id = ?1 AND id = ?2"
            ))?
            .query_row([id(user_id), id(document_id)], document_from_row)
            .optional()
        })
        .await
    }

    async fn list_documents(
        &self,
        user_id: Uuid,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> StoreResult<Page<Document, Uuid>> {
        let (limit, fetch) = fetch_limit(limit);
        let items = self
            .read("list_documents", move |conn| match cursor {
                None => conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        document_cols!(),
                        " FROM documents WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2"
                    ))?
                    .query_map(params![id(user_id), fetch], document_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>(),
                Some(after) => conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        document_cols!(),
                        " FROM documents WHERE user_id = ?1 AND id < ?2 \
                         ORDER BY id DESC LIMIT ?3"
                    ))?
                    .query_map(params![id(user_id), id(after), fetch], document_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>(),
            })
            .await?;
        Ok(into_page(items, limit, |d| d.id))
    }

    async fn update_document_progress(
        &self,
        user_id: Uuid,
        document_id: Uuid,
        progress: &DocumentProgress,
    ) -> StoreResult<bool> {
        let p = progress.clone();
        self.write("update_document_progress", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE documents SET status = ?3, progress = ?4, chunk_count = ?5, \
                     error = ?6, updated_at = ?7 WHERE user_id = ?1 AND id = ?2",
                )?
                .execute(params![
                    id(user_id),
                    id(document_id),
                    p.status.as_str(),
                    p.progress,
                    p.chunk_count,
                    p.error,
                    micros(p.updated_at),
                ])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn delete_document(&self, user_id: Uuid, document_id: Uuid) -> StoreResult<bool> {
        self.write("delete_document", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // The foreign key cascades too; deleting explicitly keeps the intent visible.
            tx.prepare_cached("DELETE FROM chunks WHERE user_id = ?1 AND document_id = ?2")?
                .execute([id(user_id), id(document_id)])?;
            let deleted = tx
                .prepare_cached("DELETE FROM documents WHERE user_id = ?1 AND id = ?2")?
                .execute([id(user_id), id(document_id)])?;
            tx.commit()?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn list_unfinished_documents(&self, limit: usize) -> StoreResult<Vec<Document>> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        self.read("list_unfinished_documents", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                document_cols!(),
                " FROM documents WHERE status IN ('pending', 'processing') \
                 ORDER BY created_at, id LIMIT ?1"
            ))?
            .query_map([limit], document_from_row)?
            .collect()
        })
        .await
    }

    async fn put_chunks(
        &self,
        user_id: Uuid,
        document_id: Uuid,
        chunks: &[Chunk],
    ) -> StoreResult<bool> {
        if let Some(stray) = chunks
            .iter()
            .find(|c| c.user_id != user_id || c.document_id != document_id)
        {
            return Err(backend(
                "put_chunks",
                format!(
                    "chunk {} of {}/{} handed in for {user_id}/{document_id}",
                    stray.seq, stray.user_id, stray.document_id
                ),
            ));
        }
        let chunks = chunks.to_vec();
        self.write("put_chunks", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists = tx
                .prepare_cached("SELECT 1 FROM documents WHERE user_id = ?1 AND id = ?2")?
                .exists([id(user_id), id(document_id)])?;
            if !exists {
                return Ok(false);
            }
            {
                let mut insert = tx.prepare_cached(concat!(
                    "INSERT INTO chunks (",
                    chunk_cols!(),
                    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT (user_id, document_id, seq) DO UPDATE SET \
                     text = excluded.text, position = excluded.position, \
                     token_count = excluded.token_count, embedding = excluded.embedding"
                ))?;
                for c in &chunks {
                    insert.execute(params![
                        id(c.user_id),
                        id(c.document_id),
                        c.seq,
                        c.text,
                        json(&c.position)?,
                        c.token_count,
                        c.embedding.as_deref().map(encode_embedding),
                    ])?;
                }
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn delete_chunks(&self, user_id: Uuid, document_id: Uuid) -> StoreResult<u64> {
        self.write("delete_chunks", move |conn| {
            let deleted = conn
                .prepare_cached("DELETE FROM chunks WHERE user_id = ?1 AND document_id = ?2")?
                .execute([id(user_id), id(document_id)])?;
            Ok(deleted as u64)
        })
        .await
    }

    async fn list_chunks(&self, user_id: Uuid, document_id: Uuid) -> StoreResult<Vec<Chunk>> {
        self.read("list_chunks", move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                chunk_cols!(),
                " FROM chunks WHERE user_id = ?1 AND document_id = ?2 ORDER BY seq"
            ))?
            .query_map([id(user_id), id(document_id)], chunk_from_row)?
            .collect()
        })
        .await
    }

    async fn list_user_chunks(
        &self,
        user_id: Uuid,
        limit: usize,
        cursor: Option<ChunkCursor>,
    ) -> StoreResult<Page<Chunk, ChunkCursor>> {
        let (limit, fetch) = fetch_limit(limit);
        let items = self
            .read("list_user_chunks", move |conn| match cursor {
                None => conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        chunk_cols!(),
                        " FROM chunks WHERE user_id = ?1 ORDER BY document_id, seq LIMIT ?2"
                    ))?
                    .query_map(params![id(user_id), fetch], chunk_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>(),
                Some(after) => conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        chunk_cols!(),
                        " FROM chunks WHERE user_id = ?1 \
                         AND (document_id > ?2 OR (document_id = ?2 AND seq > ?3)) \
                         ORDER BY document_id, seq LIMIT ?4"
                    ))?
                    .query_map(
                        params![id(user_id), id(after.document_id), after.seq, fetch],
                        chunk_from_row,
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>(),
            })
            .await?;
        Ok(into_page(items, limit, |c| ChunkCursor {
            document_id: c.document_id,
            seq: c.seq,
        }))
    }
}

fn get_refresh(conn: &Connection, hash: &str) -> rusqlite::Result<Option<RefreshToken>> {
    conn.prepare_cached(concat!(
        "SELECT ",
        refresh_cols!(),
        " FROM refresh_tokens WHERE token_hash = ?1"
    ))?
    .query_row([hash], refresh_from_row)
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_the_documented_pragmas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/chorus.db");
        let store = SqliteStore::open(&path).unwrap();
        assert!(path.exists());

        let conn = store.writer.checkout("test").unwrap();
        let pragma =
            |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
        assert_eq!(pragma("foreign_keys"), 1);
        assert_eq!(pragma("synchronous"), 1, "NORMAL");
        assert_eq!(pragma("busy_timeout"), 5000);
        assert_eq!(pragma("query_only"), 0);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");

        let reader = store.readers.checkout("test").unwrap();
        let query_only: i64 = reader
            .pragma_query_value(None, "query_only", |r| r.get(0))
            .unwrap();
        assert_eq!(query_only, 1);
    }

    #[test]
    fn lower_function_folds_unicode() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("x.db"), ConnKind::Writer).unwrap();
        let folded: String = conn
            .query_row("SELECT chorus_lower('ÜBER Straße')", [], |r| r.get(0))
            .unwrap();
        assert_eq!(folded, "über straße");
        let null: Option<String> = conn
            .query_row("SELECT chorus_lower(NULL)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(null, None);
    }

    #[test]
    fn uniqueness_violations_are_conflicts_and_bad_values_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("x.db"), ConnKind::Writer).unwrap();
        conn.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY); INSERT INTO t VALUES ('a');")
            .unwrap();
        let dup = conn.execute("INSERT INTO t VALUES ('a')", []).unwrap_err();
        assert!(matches!(classify("x", dup), StoreError::Conflict(_)));

        let bad = conn
            .query_row("SELECT 'not-a-uuid'", [], |row| uuid_col(row, 0))
            .unwrap_err();
        assert!(matches!(classify("x", bad), StoreError::Corrupt(_)));
    }

    #[test]
    fn fetch_limit_asks_for_one_more() {
        assert_eq!(fetch_limit(10), (10, 11));
        assert_eq!(fetch_limit(0), (1, 2));
        assert_eq!(fetch_limit(usize::MAX).1, i64::MAX);
    }
}
