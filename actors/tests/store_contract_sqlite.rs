//! The shared `Store` contract against `SqliteStore`, plus what only the SQLite file can show:
//! migrations, durability across reopen, the schema-version guard and the journal mode.

#![expect(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chorus_actors::store::sqlite::LOCAL_NODE;
use chorus_actors::store::sqlite::{AppliedMigration, MigrationReport, SCHEMA_VERSION};
use chorus_actors::store::{MessageRole, MessageStatus, SqliteStore, Store, StoreError, contract};
use tempfile::TempDir;

async fn fresh_store() -> (Arc<dyn Store>, TempDir) {
    let dir = TempDir::new().unwrap();
    let store = SqliteStore::open(&db_path(&dir)).unwrap();
    (Arc::new(store), dir)
}

fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("data").join("chorus.db")
}

mod contract_suite {
    use super::fresh_store;

    chorus_actors::store_contract_tests!(fresh_store);
}

/// One file, opened once per node (as the processes of a development cluster do).
async fn stores_for_nodes(nodes: &[&str]) -> (Vec<Arc<dyn Store>>, TempDir) {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let stores = nodes
        .iter()
        .map(|node| Arc::new(SqliteStore::open_for_node(&path, node).unwrap()) as Arc<dyn Store>)
        .collect();
    (stores, dir)
}

mod node_contract_suite {
    use super::stores_for_nodes;

    chorus_actors::store_node_contract_tests!(stores_for_nodes);
}

fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

fn user_version(path: &Path) -> i64 {
    raw(path)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn migrate_reports_what_it_applied_and_is_idempotent() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);

    let first = SqliteStore::migrate(&path).unwrap();
    assert_eq!(first.previous_version, 0);
    assert_eq!(first.current_version, SCHEMA_VERSION);
    assert_eq!(
        first.applied.iter().map(|m| m.version).collect::<Vec<_>>(),
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert!(first.applied.iter().all(|m| !m.name.is_empty()));

    let second = SqliteStore::migrate(&path).unwrap();
    assert_eq!(
        second,
        MigrationReport {
            previous_version: SCHEMA_VERSION,
            current_version: SCHEMA_VERSION,
            applied: Vec::<AppliedMigration>::new(),
        }
    );
    assert_eq!(user_version(&path), SCHEMA_VERSION);
}

#[tokio::test]
async fn opening_twice_is_harmless() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let a = SqliteStore::open(&path).unwrap();
    // A second process (or `chorus migrate`) on a live file.
    let b = SqliteStore::open(&path).unwrap();
    assert_eq!(SqliteStore::migrate(&path).unwrap().applied, vec![]);

    let u = contract::user("twice@example.com");
    a.create_user(&u).await.unwrap();
    assert_eq!(b.get_user(u.id).await.unwrap(), Some(u));
    assert_eq!(user_version(&path), SCHEMA_VERSION);
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let u = contract::user("durable@example.com");
    let t = contract::thread(u.id, 1);
    let m = contract::message(&t, 2, Some("gpt"));
    {
        let store = SqliteStore::open(&path).unwrap();
        store.create_user(&u).await.unwrap();
        store.create_thread(&t).await.unwrap();
        store.append_message(&m).await.unwrap();
        store.add_usage(u.id, "2026-01", "chat", 4).await.unwrap();
    }

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.get_user(u.id).await.unwrap(), Some(u.clone()));
    let reopened = store.get_thread(u.id, t.id).await.unwrap().unwrap();
    assert_eq!(reopened.message_count, 1);
    assert_eq!(store.get_message(u.id, t.id, m.id).await.unwrap(), Some(m));
    assert_eq!(
        store.add_usage(u.id, "2026-01", "chat", 1).await.unwrap(),
        5
    );
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    SqliteStore::migrate(&path).unwrap();
    raw(&path)
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();

    for result in [
        SqliteStore::open(&path).map(drop),
        SqliteStore::migrate(&path).map(drop),
    ] {
        match result {
            Err(StoreError::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }
    assert_eq!(
        user_version(&path),
        SCHEMA_VERSION + 1,
        "the file is left alone"
    );
}

#[test]
fn the_file_is_in_wal_mode() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let _store = SqliteStore::open(&path).unwrap();
    let mode: String = raw(&path)
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn timestamps_are_truncated_to_microseconds() {
    let (store, _dir) = fresh_store().await;
    let precise = chrono::DateTime::from_timestamp(1_767_225_600, 123_456_789).unwrap();
    let mut u = contract::user("nanos@example.com");
    u.created_at = precise;
    store.create_user(&u).await.unwrap();
    let stored = store.get_user(u.id).await.unwrap().unwrap();
    assert_eq!(
        stored.created_at,
        chrono::DateTime::from_timestamp(1_767_225_600, 123_456_000).unwrap()
    );
}

#[tokio::test]
async fn a_corrupt_row_is_reported_as_corruption() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let store = SqliteStore::open(&path).unwrap();
    let u = contract::user("corrupt@example.com");
    store.create_user(&u).await.unwrap();
    raw(&path)
        .execute("UPDATE users SET role = 'overlord'", [])
        .unwrap();

    let err = store.get_user(u.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

#[tokio::test]
async fn a_message_for_a_missing_thread_is_rejected() {
    let (store, _dir) = fresh_store().await;
    let orphan = contract::thread(uuid::Uuid::now_v7(), 0);
    let err = store
        .append_message(&contract::message(&orphan, 1, None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
}

fn streaming(thread: &chorus_actors::store::Thread, secs: i64) -> chorus_actors::store::Message {
    let mut m = contract::message(thread, secs, Some("m"));
    m.role = MessageRole::Assistant;
    m.status = MessageStatus::Streaming;
    m.content = format!("partial {secs}");
    m
}

#[tokio::test]
async fn messages_record_the_node_that_inserted_them() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let local = SqliteStore::open(&path).unwrap();
    let named = SqliteStore::open_for_node(&path, "node-7").unwrap();
    assert_eq!((local.node(), named.node()), (LOCAL_NODE, "node-7"));
    let u = contract::user("owners@example.com");
    let t = contract::thread(u.id, 1);
    local.create_thread(&t).await.unwrap();
    let by_local = streaming(&t, 2);
    let by_named = streaming(&t, 3);
    local.append_message(&by_local).await.unwrap();
    named.append_message(&by_named).await.unwrap();

    let owners: Vec<(String, Option<String>)> = raw(&path)
        .prepare("SELECT content, node FROM messages ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        owners,
        vec![
            ("partial 2".to_owned(), Some(LOCAL_NODE.to_owned())),
            ("partial 3".to_owned(), Some("node-7".to_owned())),
        ]
    );
    // Finishing a turn (an update) keeps its owner.
    let mut done = by_named.clone();
    done.status = MessageStatus::Complete;
    assert!(local.update_message(&done).await.unwrap());
    let owner: Option<String> = raw(&path)
        .query_row(
            "SELECT node FROM messages WHERE content = 'partial 3'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(owner.as_deref(), Some("node-7"));
}

#[tokio::test]
async fn unowned_streaming_messages_are_left_to_the_startup_reaper() {
    // Rows written before migration 8 have no owner: whichever node starts first settles them,
    // and no node's death claims them.
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let a = SqliteStore::open_for_node(&path, "node-a").unwrap();
    let b = SqliteStore::open_for_node(&path, "node-b").unwrap();
    let u = contract::user("legacy@example.com");
    let t = contract::thread(u.id, 1);
    a.create_thread(&t).await.unwrap();
    let legacy = streaming(&t, 2);
    let on_b = streaming(&t, 3);
    a.append_message(&legacy).await.unwrap();
    b.append_message(&on_b).await.unwrap();
    raw(&path)
        .execute(
            "UPDATE messages SET node = NULL WHERE content = 'partial 2'",
            [],
        )
        .unwrap();

    for node in ["node-a", "node-b"] {
        let settled = b
            .settle_orphaned_messages_of(node, contract::at(10), MessageStatus::Interrupted)
            .await
            .unwrap();
        assert_eq!(settled, u64::from(node == "node-b"), "{node}");
    }
    let stored = a.get_message(u.id, t.id, legacy.id).await.unwrap().unwrap();
    assert_eq!(stored.status, MessageStatus::Streaming);

    assert_eq!(
        a.settle_orphaned_messages(contract::at(10), MessageStatus::Interrupted)
            .await
            .unwrap(),
        1
    );
    let stored = b.get_message(u.id, t.id, legacy.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.status, stored.content.as_str()),
        (MessageStatus::Interrupted, "partial 2")
    );
}

#[test]
fn a_version_7_file_gains_unowned_messages() {
    // Migrating a file written by the previous schema keeps its messages, with no owner.
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    SqliteStore::migrate(&path).unwrap();
    let conn = raw(&path);
    conn.execute_batch(
        "DROP INDEX messages_streaming_by_thread; \
         DROP INDEX messages_streaming_by_node; \
         ALTER TABLE messages DROP COLUMN node; \
         PRAGMA user_version = 7;",
    )
    .unwrap();
    conn.execute_batch(
        "INSERT INTO threads (user_id, id, bookmarked, created_at, updated_at, message_count) \
         VALUES ('u', 't', 0, 0, 0, 1); \
         INSERT INTO messages (user_id, thread_id, id, role, content, status, input_tokens, \
         output_tokens, cost_usd, created_at) \
         VALUES ('u', 't', 'm', 'assistant', 'half', 'streaming', 0, 0, 0.0, 0);",
    )
    .unwrap();
    drop(conn);

    let report = SqliteStore::migrate(&path).unwrap();
    assert_eq!(
        report.applied.iter().map(|m| m.version).collect::<Vec<_>>(),
        vec![8, 9]
    );
    let owner: Option<String> = raw(&path)
        .query_row("SELECT node FROM messages WHERE id = 'm'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(owner, None);
}
