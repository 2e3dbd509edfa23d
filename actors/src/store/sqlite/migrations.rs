//! Versioned schema migrations, tracked in `PRAGMA user_version`.
//!
//! Migrations are append-only: a released entry is never edited, a change ships as a new version.
//! Every user-owned table leads its primary key with `user_id`, mirroring the ScyllaDB partitions
//! of ARCHITECTURE.md, so a query that is cheap here is cheap there too. UUIDs are hyphenated
//! lowercase TEXT (readable in the `sqlite3` shell, and UUIDv7 text sorts in time order);
//! timestamps are INTEGER unix microseconds; settings and scopes are JSON text.
//!
//! There is deliberately no foreign key to `users`: the trait has no user deletion and a
//! partitioned backend cannot enforce one either. Thread children do reference their thread, so a
//! write racing a thread delete fails instead of leaving orphans.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::{StoreError, StoreResult};

/// One schema step.
pub(super) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: r#"
CREATE TABLE users (
    id            TEXT    NOT NULL PRIMARY KEY,
    email         TEXT    NOT NULL UNIQUE,
    display_name  TEXT,
    password_hash TEXT    NOT NULL,
    tier          TEXT    NOT NULL,
    role          TEXT    NOT NULL,
    settings      TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE refresh_tokens (
    token_hash TEXT    NOT NULL PRIMARY KEY,
    user_id    TEXT    NOT NULL,
    family_id  TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    spent_at   INTEGER,
    revoked_at INTEGER
) STRICT;
CREATE INDEX refresh_tokens_by_family ON refresh_tokens (user_id, family_id);

CREATE TABLE api_keys (
    key_hash     TEXT    NOT NULL PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    user_id      TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER
) STRICT;
CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at DESC, id DESC);

CREATE TABLE threads (
    user_id       TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    title         TEXT,
    system_prompt TEXT,
    model         TEXT,
    bookmarked    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    message_count INTEGER NOT NULL,
    PRIMARY KEY (user_id, id)
) STRICT, WITHOUT ROWID;
CREATE INDEX threads_by_activity ON threads (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    user_id       TEXT    NOT NULL,
    thread_id     TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    role          TEXT    NOT NULL,
    model         TEXT,
    content       TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd      REAL    NOT NULL,
    latency_ms    INTEGER,
    ttft_ms       INTEGER,
    provider      TEXT,
    parent_id     TEXT,
    turn_id       TEXT,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (user_id, thread_id, id),
    FOREIGN KEY (user_id, thread_id) REFERENCES threads (user_id, id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX messages_by_model ON messages (user_id, thread_id, model, id);

CREATE TABLE summaries (
    user_id      TEXT    NOT NULL,
    thread_id    TEXT    NOT NULL,
    model        TEXT    NOT NULL,
    text         TEXT    NOT NULL,
    covers_until TEXT    NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, thread_id, model),
    FOREIGN KEY (user_id, thread_id) REFERENCES threads (user_id, id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;

CREATE TABLE usage (
    user_id TEXT    NOT NULL,
    period  TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    value   INTEGER NOT NULL,
    PRIMARY KEY (user_id, period, kind)
) STRICT, WITHOUT ROWID;

CREATE TABLE shares (
    share_id   TEXT    NOT NULL PRIMARY KEY,
    user_id    TEXT    NOT NULL,
    thread_id  TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    FOREIGN KEY (user_id, thread_id) REFERENCES threads (user_id, id) ON DELETE CASCADE
) STRICT;
CREATE INDEX shares_by_thread ON shares (user_id, thread_id);
"#,
    },
    Migration {
        version: 2,
        name: "provider keys",
        sql: r#"
CREATE TABLE provider_keys (
    user_id    TEXT    NOT NULL,
    provider   TEXT    NOT NULL,
    sealed     BLOB    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, provider)
) STRICT;
"#,
    },
    Migration {
        version: 3,
        name: "index of streaming messages for the reaper",
        sql: r#"
CREATE INDEX messages_streaming ON messages (created_at) WHERE status = 'streaming';
"#,
    },
    Migration {
        version: 4,
        name: "billing events seen by the webhook",
        sql: r#"
CREATE TABLE billing_events (
    event_id    TEXT    NOT NULL PRIMARY KEY,
    user_id     TEXT    NOT NULL,
    type        TEXT    NOT NULL,
    received_at INTEGER NOT NULL
) STRICT;
"#,
    },
    Migration {
        version: 5,
        name: "the deployment that served an assistant message",
        sql: r#"
ALTER TABLE messages ADD COLUMN deployment TEXT;
"#,
    },
    Migration {
        version: 6,
        name: "documents and their chunks",
        sql: r#"
CREATE TABLE documents (
    user_id     TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    mime        TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    progress    REAL    NOT NULL,
    chunk_count INTEGER NOT NULL,
    error       TEXT,
    blob_key    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (user_id, id)
) STRICT, WITHOUT ROWID;
CREATE INDEX documents_unfinished ON documents (created_at)
    WHERE status IN ('pending', 'processing');

CREATE TABLE chunks (
    user_id     TEXT    NOT NULL,
    document_id TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    text        TEXT    NOT NULL,
    position    TEXT    NOT NULL,
    token_count INTEGER NOT NULL,
    embedding   BLOB,
    PRIMARY KEY (user_id, document_id, seq),
    FOREIGN KEY (user_id, document_id) REFERENCES documents (user_id, id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
"#,
    },
    Migration {
        version: 7,
        name: "the document passages an answer was given",
        sql: r#"
ALTER TABLE messages ADD COLUMN citations TEXT;
"#,
    },
    Migration {
        version: 8,
        name: "the node that owns a message (reapers settle only their own)",
        // NULL: written before owners were recorded. The partial index covers the only query
        // that filters on the owner: the reapers' scan of messages still `streaming`.
        sql: r#"
ALTER TABLE messages ADD COLUMN node TEXT;
CREATE INDEX messages_streaming_by_node ON messages (node, created_at)
    WHERE status = 'streaming';
"#,
    },
    Migration {
        version: 9,
        name: "finding the node a thread's turn runs on",
        // Partial: only messages still `streaming` (a handful at any time) are indexed.
        sql: r#"
CREATE INDEX messages_streaming_by_thread ON messages (user_id, thread_id, id)
    WHERE status = 'streaming';
"#,
    },
];

/// The newest schema version this binary knows.
pub const SCHEMA_VERSION: i64 = 9;

/// What a migration run did (see [`SqliteStore::migrate`](super::SqliteStore::migrate)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The version found before migrating (0 for a new database).
    pub previous_version: i64,
    /// The version after migrating; equals [`SCHEMA_VERSION`] on success.
    pub current_version: i64,
    /// The migrations applied by this run, oldest first (empty when already up to date).
    pub applied: Vec<AppliedMigration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: i64,
    pub name: &'static str,
}

pub(super) fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Applies the pending migrations, one transaction each.
///
/// The version is re-read inside each write transaction so that two processes migrating the same
/// file at once (a node starting while `chorus migrate` runs) apply every step exactly once.
pub(super) fn apply(conn: &mut Connection) -> StoreResult<MigrationReport> {
    let op = "migrate";
    let sql_err = |e| super::classify(op, e);
    let previous_version = user_version(conn).map_err(sql_err)?;
    check_not_too_new(previous_version)?;

    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        let current = user_version(&tx).map_err(sql_err)?;
        check_not_too_new(current)?;
        if current >= migration.version {
            continue;
        }
        tx.execute_batch(migration.sql).map_err(sql_err)?;
        tx.pragma_update(None, "user_version", migration.version)
            .map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied SQLite migration"
        );
        applied.push(AppliedMigration {
            version: migration.version,
            name: migration.name,
        });
    }

    let current_version = user_version(conn).map_err(sql_err)?;
    Ok(MigrationReport {
        previous_version,
        current_version,
        applied,
    })
}

pub(super) fn check_not_too_new(found: i64) -> StoreResult<()> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_end_at_schema_version() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(versions.last().copied(), Some(SCHEMA_VERSION));
    }
}
