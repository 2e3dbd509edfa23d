//! The session layer against a real SQLite store: per-user serialization, passivation after
//! idle, rebuild on next use, and supervision.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use chorus_actors::Node;
use chorus_actors::provider::catalogue::{Catalogue, CatalogueFile};
use chorus_actors::session::{NewThread, SessionConfig, SessionError, ThreadPatch};
use chorus_actors::store::{ApiKey, SqliteStore, Store, ThreadQuery};
use uuid::Uuid;

async fn node(idle: Duration) -> (Node, Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    let config = SessionConfig {
        idle_timeout: idle,
        call_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let empty = CatalogueFile {
        providers: Default::default(),
        models: Vec::new(),
    };
    let catalogue = Arc::new(Catalogue::build(&empty, &|_| None).unwrap());
    let node = Node::start(store.clone(), catalogue, config).await.unwrap();
    (node, store, dir)
}

async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    condition()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_passivate_and_rebuild_from_the_store() {
    let (node, store, _dir) = node(Duration::from_millis(200)).await;
    let sessions = node.sessions.clone();
    let user = Uuid::now_v7();
    let thread = sessions
        .create_thread(
            user,
            NewThread {
                title: Some("kept".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(sessions.live_count(), 1);

    assert!(
        eventually(|| sessions.live_count() == 0).await,
        "session never passivated"
    );

    // The next request rebuilds the session; the data was in the store all along.
    let patched = sessions
        .update_thread(
            user,
            thread.id,
            ThreadPatch {
                bookmarked: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.title.as_deref(), Some("kept"));
    assert!(patched.bookmarked);
    assert_eq!(sessions.live_count(), 1);
    assert!(
        store
            .get_thread(user, thread.id)
            .await
            .unwrap()
            .unwrap()
            .bookmarked
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_of_one_user_are_all_applied() {
    let (node, store, _dir) = node(Duration::from_secs(60)).await;
    let user = Uuid::now_v7();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let sessions = node.sessions.clone();
        tasks.push(tokio::spawn(async move {
            sessions
                .create_thread(
                    user,
                    NewThread {
                        title: Some(format!("t{i}")),
                        ..Default::default()
                    },
                )
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // One session served them all.
    assert_eq!(node.sessions.live_count(), 1);
    let page = store
        .list_threads(
            user,
            &ThreadQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 50);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_requests_share_one_session_so_limits_hold() {
    // Each fresh user's first requests race to spawn the session; if two sessions were spawned,
    // both would pass the key-count check and the cap would be exceeded.
    let (node, store, _dir) = node(Duration::from_secs(60)).await;
    for _ in 0..20 {
        let user = Uuid::now_v7();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let sessions = node.sessions.clone();
            let key = ApiKey {
                id: Uuid::now_v7(),
                key_hash: Uuid::now_v7().to_string(),
                user_id: user,
                name: "k".into(),
                scopes: vec![],
                created_at: chrono::Utc::now(),
                last_used_at: None,
            };
            tasks.push(tokio::spawn(async move {
                sessions.create_api_key(user, key, 2).await
            }));
        }
        let mut created = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => created += 1,
                Err(SessionError::Conflict(_)) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(created, 2);
        assert_eq!(store.list_api_keys(user).await.unwrap().len(), 2);
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_get_separate_sessions_and_cannot_touch_each_other() {
    let (node, _store, _dir) = node(Duration::from_secs(60)).await;
    let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let thread = node
        .sessions
        .create_thread(ada, NewThread::default())
        .await
        .unwrap();
    let err = node
        .sessions
        .delete_thread(bob, thread.id)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::NotFound), "{err:?}");
    assert_eq!(node.sessions.live_count(), 2);
    node.sessions.delete_thread(ada, thread.id).await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_stops_every_session() {
    let (node, _store, _dir) = node(Duration::from_secs(60)).await;
    let sessions = node.sessions.clone();
    for _ in 0..5 {
        sessions
            .create_thread(Uuid::now_v7(), NewThread::default())
            .await
            .unwrap();
    }
    assert_eq!(sessions.live_count(), 5);
    node.shutdown().await;
    assert_eq!(sessions.live_count(), 0);
    let err = sessions
        .create_thread(Uuid::now_v7(), NewThread::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::Unavailable(_)), "{err:?}");
}
