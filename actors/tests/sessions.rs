//! The session layer against a real SQLite store: per-user serialization, passivation after
//! idle and for hand-off, rebuild on next use, and supervision.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use chorus_actors::Node;
use chorus_actors::provider::catalogue::{Catalogue, CatalogueFile, ModelSpec, ProviderSpec};
use chorus_actors::session::{
    NewThread, Passivation, SendMessage, SessionConfig, SessionError, ThreadPatch, usage_period,
};
use chorus_actors::store::{
    ApiKey, MessageStatus, Role, SqliteStore, Store, ThreadQuery, User, UserSettings,
};
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

/// A mock model answering `upstream` (`echo`, or `lorem` with options).
fn mock_model(id: &str, upstream: &str) -> ModelSpec {
    ModelSpec {
        id: id.into(),
        name: id.into(),
        provider: "mock".into(),
        upstream: upstream.into(),
        context_length: 8192,
        input_per_mtok: 0.0,
        output_per_mtok: 0.0,
        capabilities: vec!["chat".into(), "stream".into()],
        tiers: vec!["free".into()],
        max_output_tokens: 100_000,
        deployments: Vec::new(),
        fallbacks: Vec::new(),
        context_fallbacks: Vec::new(),
        continue_after_cut: None,
    }
}

/// A node whose sessions never passivate on their own, with `mock-echo` and `mock-endless` (a
/// long answer, only ever ended here by a cancel), and one stored user.
async fn chat_node() -> (Node, Arc<dyn Store>, Uuid, tempfile::TempDir) {
    chat_node_idle(Duration::from_secs(3600)).await
}

/// [`chat_node`] whose sessions passivate after `idle`.
async fn chat_node_idle(idle: Duration) -> (Node, Arc<dyn Store>, Uuid, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    let file = CatalogueFile {
        providers: [(
            "mock".to_owned(),
            ProviderSpec {
                kind: "mock".into(),
                base_url: None,
                api_key_env: None,
                base_url_env: None,
                enabled_by_env: None,
            },
        )]
        .into_iter()
        .collect(),
        models: vec![
            mock_model("mock-echo", "echo"),
            mock_model("mock-endless", "lorem;words=50000;delay_ms=100"),
        ],
    };
    let catalogue = Arc::new(Catalogue::build(&file, &|_| None).unwrap());
    let config = SessionConfig {
        idle_timeout: idle,
        call_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let node = Node::start(store.clone(), catalogue, config).await.unwrap();
    let user = Uuid::now_v7();
    let now = chrono::Utc::now();
    store
        .create_user(&User {
            id: user,
            email: format!("{user}@example.com"),
            display_name: None,
            password_hash: "x".into(),
            tier: "free".into(),
            role: Role::User,
            settings: UserSettings::default(),
            created_at: now,
            updated_at: now,
        })
        .await
        .unwrap();
    (node, store, user, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_with_a_running_turn_is_busy_then_stops_once_it_ends() {
    let (node, store, user, _dir) = chat_node().await;
    let sessions = node.sessions.clone();
    assert_eq!(
        sessions.passivate(user).await.unwrap(),
        Passivation::NotLive
    );
    let thread = sessions
        .create_thread(user, NewThread::default())
        .await
        .unwrap();
    let started = sessions
        .start_turn(
            user,
            thread.id,
            SendMessage {
                content: "tell me everything".into(),
                models: vec!["mock-endless".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(sessions.running_turns(), 1);
    assert_eq!(sessions.live_users(), vec![user]);

    // The turn keeps its session: nothing is stopped, the turn runs on.
    assert_eq!(
        sessions.passivate(user).await.unwrap(),
        Passivation::Busy { running_turns: 1 }
    );
    assert_eq!(sessions.live_users(), vec![user]);
    assert_eq!(sessions.running_turns(), 1);
    // Another user has no session here.
    assert_eq!(
        sessions.passivate(Uuid::now_v7()).await.unwrap(),
        Passivation::NotLive
    );

    sessions
        .cancel_turn(user, thread.id, started.turn_id)
        .await
        .unwrap();
    assert!(
        eventually(|| sessions.running_turns() == 0).await,
        "the cancelled turn never ended"
    );
    let answer = store
        .get_message(user, thread.id, started.assistant_messages[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, MessageStatus::Interrupted);

    // Nothing runs any more: the session stops, and the node no longer lists the user.
    assert_eq!(
        sessions.passivate(user).await.unwrap(),
        Passivation::Stopped
    );
    assert_eq!(sessions.live_users(), Vec::<Uuid>::new());
    assert_eq!(sessions.live_count(), 0);
    assert_eq!(
        sessions.passivate(user).await.unwrap(),
        Passivation::NotLive
    );

    // The next request rebuilds the session from the store, and turns run in it as before.
    let again = sessions
        .start_turn(
            user,
            thread.id,
            SendMessage {
                content: "hello again".into(),
                models: vec!["mock-echo".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(sessions.live_users(), vec![user]);
    assert!(
        eventually(|| sessions.running_turns() == 0).await,
        "the echo turn never ended"
    );
    let echoed = store
        .get_message(user, thread.id, again.assistant_messages[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (echoed.status, echoed.content.as_str()),
        (MessageStatus::Complete, "hello again")
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passivation_writes_the_usage_the_session_held() {
    let (node, store, user, _dir) = chat_node().await;
    let sessions = node.sessions.clone();

    // A `/v1` request admitted and not yet settled keeps the session busy.
    let reservation = sessions.admit(user, "mock-echo", 100).await.unwrap();
    assert_eq!(
        sessions.passivate(user).await.unwrap(),
        Passivation::Busy { running_turns: 1 }
    );
    // Settled: its usage is held by the session (written in a batch later)...
    sessions.settle(user, reservation, 42, 0.25).await;
    // ...and a hand-off writes it before the session stops.
    assert_eq!(
        sessions.passivate(user).await.unwrap(),
        Passivation::Stopped
    );
    let usage = store.get_usage(user, &usage_period()).await.unwrap();
    assert_eq!(usage.get("tokens"), Some(&42), "{usage:?}");
    assert_eq!(usage.get("chat_messages"), Some(&1), "{usage:?}");
    assert_eq!(usage.get("cost_micro_usd"), Some(&250_000), "{usage:?}");

    // The rebuilt session counts on from the stored figures.
    let reservation = sessions.admit(user, "mock-echo", 100).await.unwrap();
    sessions.settle(user, reservation, 8, 0.0).await;
    sessions.flush_usage(user).await.unwrap();
    let usage = store.get_usage(user, &usage_period()).await.unwrap();
    assert_eq!(usage.get("tokens"), Some(&50), "{usage:?}");
    assert_eq!(usage.get("chat_messages"), Some(&2), "{usage:?}");
    node.shutdown().await;
}

/// Requests admitted and settled by the edge without a message still count as activity: the
/// session does not passivate under them, and passivates (writing their usage) once they stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_outside_the_mailbox_keep_the_session_alive_until_they_stop() {
    let (node, store, user, _dir) = chat_node_idle(Duration::from_millis(300)).await;
    let sessions = node.sessions.clone();
    // For 1.5 s (five idle timeouts), a request every 60 ms.
    for n in 0..25 {
        if n > 0 {
            assert_eq!(
                sessions.live_count(),
                1,
                "the session passivated under traffic (request {n})"
            );
        }
        let reservation = sessions.admit(user, "mock-echo", 10).await.unwrap();
        assert!(sessions.try_settle(user, reservation, 4, 0.0).is_none());
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(eventually(|| sessions.live_count() == 0).await);
    let usage = store.get_usage(user, &usage_period()).await.unwrap();
    assert_eq!(usage.get("chat_messages"), Some(&25), "{usage:?}");
    assert_eq!(usage.get("tokens"), Some(&100), "{usage:?}");
    node.shutdown().await;
}
