//! The shared `Store` contract against `SqliteStore`, plus what only the SQLite file can show:
//! migrations, durability across reopen, the schema-version guard and the journal mode.

#![expect(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chorus_actors::store::sqlite::{AppliedMigration, MigrationReport, SCHEMA_VERSION};
use chorus_actors::store::{SqliteStore, Store, StoreError, contract};
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
