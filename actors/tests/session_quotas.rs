//! Per-user limits in the home session, over the real SQLite store and the mock provider:
//! tiers gate models, per-minute buckets refuse without storing anything, monthly limits count
//! the `usage` table and reset when the (injected) clock enters the next month.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_actors::Node;
use chorus_actors::provider::catalogue::{Catalogue, CatalogueFile, ModelSpec, ProviderSpec};
use chorus_actors::quota::Clock;
use chorus_actors::quota::tiers::{MonthlyLimits, TierSpec, Tiers, TiersFile};
use chorus_actors::session::{NewThread, SendMessage, SessionConfig, SessionError, Sessions};
use chorus_actors::store::{MessageQuery, Order, Role, SqliteStore, Store, User, UserSettings};
use chrono::{DateTime, TimeZone, Utc};
use futures_util::StreamExt;
use uuid::Uuid;

fn model(id: &str) -> ModelSpec {
    ModelSpec {
        id: id.into(),
        name: id.into(),
        provider: "mock".into(),
        upstream: "echo".into(),
        context_length: 8192,
        input_per_mtok: 0.0,
        output_per_mtok: 0.0,
        capabilities: vec!["chat".into(), "stream".into()],
        tiers: vec!["small".into(), "other".into()],
        max_output_tokens: 256,
        deployments: Vec::new(),
        fallbacks: Vec::new(),
        context_fallbacks: Vec::new(),
        continue_after_cut: None,
    }
}

fn catalogue() -> Arc<Catalogue> {
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
        models: vec![model("mock-echo"), model("mock-premium")],
    };
    Arc::new(Catalogue::build(&file, &|_| None).unwrap())
}

fn tiers(rpm: u32, chat_messages: Option<u64>) -> Tiers {
    let tier = |models: &[&str]| TierSpec {
        name: "Small".into(),
        requests_per_minute: rpm,
        tokens_per_minute: 100_000,
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        files_per_request: 1,
        upload_max_bytes: 1,
        monthly: MonthlyLimits {
            chat_messages,
            ..Default::default()
        },
    };
    Tiers::build(TiersFile {
        default_tier: "small".into(),
        tiers: [
            ("small".to_owned(), tier(&["mock-echo"])),
            ("other".to_owned(), tier(&["*"])),
        ]
        .into_iter()
        .collect(),
    })
    .unwrap()
}

struct Setup {
    node: Node,
    store: Arc<dyn Store>,
    now: Arc<Mutex<DateTime<Utc>>>,
    user: Uuid,
    thread: Uuid,
    _dir: tempfile::TempDir,
}

async fn setup(tiers: Tiers) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("c.db")).unwrap());
    let now = Arc::new(Mutex::new(
        Utc.with_ymd_and_hms(2031, 1, 31, 23, 0, 0).unwrap(),
    ));
    let clock_now = now.clone();
    let config = SessionConfig {
        call_timeout: Duration::from_secs(5),
        tiers: Arc::new(tiers),
        clock: Clock::new(move || *clock_now.lock().unwrap()),
        ..Default::default()
    };
    let node = Node::start(store.clone(), catalogue(), config)
        .await
        .unwrap();
    let user = Uuid::now_v7();
    let created = Utc::now();
    store
        .create_user(&User {
            id: user,
            email: format!("{user}@example.com"),
            display_name: None,
            password_hash: "x".into(),
            tier: "small".into(),
            role: Role::User,
            settings: UserSettings::default(),
            created_at: created,
            updated_at: created,
        })
        .await
        .unwrap();
    let thread = node
        .sessions
        .create_thread(
            user,
            NewThread {
                model: Some("mock-echo".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id;
    Setup {
        node,
        store,
        now,
        user,
        thread,
        _dir: dir,
    }
}

fn message(text: &str, models: &[&str]) -> SendMessage {
    SendMessage {
        content: text.into(),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        max_tokens: Some(64),
        temperature: None,
        document_ids: Vec::new(),
        query_embedding: None,
    }
}

/// Sends a message and waits for its turn to end.
async fn turn(sessions: &Sessions, s: &Setup, text: &str) -> Result<(), SessionError> {
    let started = sessions
        .start_turn(s.user, s.thread, message(text, &[]))
        .await?;
    let events: Vec<_> = started
        .log
        .reader(started.from_seq - 1)
        .into_turn_stream(started.turn_id)
        .collect()
        .await;
    assert_eq!(events.last().map(|e| e.name), Some("done"));
    Ok(())
}

async fn stored_messages(s: &Setup) -> usize {
    s.store
        .list_messages(
            s.user,
            s.thread,
            &MessageQuery {
                limit: 100,
                cursor: None,
                order: Order::Asc,
                model: None,
            },
        )
        .await
        .unwrap()
        .items
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monthly_limits_count_the_usage_table_and_reset_with_the_month() {
    let s = setup(tiers(100, Some(2))).await;
    let sessions = s.node.sessions.clone();
    turn(&sessions, &s, "one").await.unwrap();
    turn(&sessions, &s, "two").await.unwrap();
    let usage = s.store.get_usage(s.user, "2031-01").await.unwrap();
    assert_eq!(usage.get("chat_messages"), Some(&2), "{usage:?}");

    match turn(&sessions, &s, "three").await {
        Err(SessionError::QuotaExceeded {
            what,
            limit,
            used,
            resets_at,
        }) => {
            assert_eq!(what, "chat_messages");
            assert_eq!((limit, used), (2, 2));
            assert_eq!(
                resets_at,
                Utc.with_ymd_and_hms(2031, 2, 1, 0, 0, 0).unwrap()
            );
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    assert_eq!(
        stored_messages(&s).await,
        4,
        "a refused message stores nothing"
    );

    // Two hours later it is February (UTC): a new period with its own counters.
    *s.now.lock().unwrap() = Utc.with_ymd_and_hms(2031, 2, 1, 1, 0, 0).unwrap();
    turn(&sessions, &s, "three").await.unwrap();
    let february = s.store.get_usage(s.user, "2031-02").await.unwrap();
    assert_eq!(february.get("chat_messages"), Some(&1), "{february:?}");
    let january = s.store.get_usage(s.user, "2031-01").await.unwrap();
    assert_eq!(january.get("chat_messages"), Some(&2), "{january:?}");
    turn(&sessions, &s, "four").await.unwrap();
    assert!(matches!(
        turn(&sessions, &s, "five").await,
        Err(SessionError::QuotaExceeded { .. })
    ));
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_requests_bucket_refuses_without_storing_and_models_follow_the_tier() {
    let s = setup(tiers(2, None)).await;
    let sessions = s.node.sessions.clone();
    let first = sessions
        .start_turn(s.user, s.thread, message("a", &[]))
        .await
        .unwrap();
    assert!(first.rate_limit.allowed);
    assert_eq!(first.rate_limit.limit, 2);
    assert_eq!(first.rate_limit.remaining, 1);
    turn(&sessions, &s, "b").await.unwrap();
    let before = stored_messages(&s).await;
    match turn(&sessions, &s, "c").await {
        Err(SessionError::RateLimited {
            what,
            limit,
            remaining,
            retry_after,
            ..
        }) => {
            assert_eq!(what, "requests_per_minute");
            assert_eq!((limit, remaining), (2, 0));
            assert!(retry_after > Duration::from_secs(20), "{retry_after:?}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(
        stored_messages(&s).await,
        before,
        "a refused message stores nothing"
    );

    // A model outside the tier is forbidden (and checked before the bucket).
    let other = setup(tiers(5, None)).await;
    match other
        .node
        .sessions
        .start_turn(other.user, other.thread, message("x", &["mock-premium"]))
        .await
    {
        Err(SessionError::Forbidden(why)) => assert!(why.contains("mock-premium"), "{why}"),
        Err(e) => panic!("expected Forbidden, got {e:?}"),
        Ok(_) => panic!("expected Forbidden, got a turn"),
    }
    assert_eq!(stored_messages(&other).await, 0);
    // The refusal did not take a request: all 5 are still there.
    for i in 0..5 {
        turn(&other.node.sessions, &other, &format!("m{i}"))
            .await
            .unwrap();
    }
    assert!(matches!(
        turn(&other.node.sessions, &other, "six").await,
        Err(SessionError::RateLimited { .. })
    ));
    s.node.shutdown().await;
    other.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_outside_threads_are_admitted_settled_and_recorded() {
    let s = setup(tiers(3, Some(2))).await;
    let sessions = s.node.sessions.clone();
    let reservation = sessions.admit(s.user, "mock-echo", 500).await.unwrap();
    assert_eq!(reservation.tokens, 500);
    assert_eq!(reservation.period, "2031-01");
    assert_eq!(reservation.admission.remaining, 2);
    // Held by the open request: one chat message of the monthly two.
    let second = sessions.admit(s.user, "mock-echo", 10).await.unwrap();
    match sessions.admit(s.user, "mock-echo", 10).await {
        Err(SessionError::QuotaExceeded { used, .. }) => assert_eq!(used, 2),
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    sessions.settle(s.user, reservation, 42, 0.25).await;
    // A request refused by its provider before any output records nothing.
    sessions.settle(s.user, second, 0, 0.0).await;
    let mut usage = Default::default();
    for _ in 0..100 {
        usage = s.store.get_usage(s.user, "2031-01").await.unwrap();
        if usage.contains_key("tokens") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(usage.get("chat_messages"), Some(&1), "{usage:?}");
    assert_eq!(usage.get("tokens"), Some(&42), "{usage:?}");
    assert_eq!(usage.get("cost_micro_usd"), Some(&250_000), "{usage:?}");
    assert!(matches!(
        sessions.admit(s.user, "mock-premium", 1).await,
        Err(SessionError::Forbidden(_))
    ));
    s.node.shutdown().await;
}

/// Admits `n` `/v1` requests at once from separate tasks; the reservations and refusals.
async fn admit_at_once(
    sessions: &Sessions,
    user: Uuid,
    n: usize,
) -> (Vec<chorus_actors::session::Reservation>, Vec<SessionError>) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let sessions = sessions.clone();
            tokio::spawn(async move { sessions.admit(user, "mock-echo", 10).await })
        })
        .collect();
    let (mut admitted, mut refused) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            Ok(reservation) => admitted.push(reservation),
            Err(error) => refused.push(error),
        }
    }
    (admitted, refused)
}

/// The edge admits and settles `/v1` requests in the session's ledger, without a message to
/// the session, once the session has loaded what the checks need. Concurrent requests must
/// still meet exact limits, and settled usage must still reach the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_admitted_outside_the_mailbox_keep_limits_exact() {
    // Per minute: 5 requests; the first loads the session, 39 more race for the other 4.
    let s = setup(tiers(5, None)).await;
    let sessions = s.node.sessions.clone();
    let first = sessions.admit(s.user, "mock-echo", 10).await.unwrap();
    assert!(sessions.try_settle(s.user, first, 10, 0.0).is_none());
    let (admitted, refused) = admit_at_once(&sessions, s.user, 39).await;
    assert_eq!(admitted.len(), 4, "refusals: {refused:?}");
    assert!(
        refused.iter().all(
            |e| matches!(e, SessionError::RateLimited { what, .. } if what == "requests_per_minute")
        ),
        "{refused:?}"
    );
    s.node.shutdown().await;

    // Per month: 3 chat messages. Unsettled requests hold theirs, so 3 of 30 at once pass.
    let s = setup(tiers(100, Some(3))).await;
    let sessions = s.node.sessions.clone();
    let (admitted, refused) = admit_at_once(&sessions, s.user, 30).await;
    assert_eq!(admitted.len(), 3, "refusals: {refused:?}");
    assert!(
        refused.iter().all(
            |e| matches!(e, SessionError::QuotaExceeded { what, .. } if what == "chat_messages")
        ),
        "{refused:?}"
    );
    // Settled by the edge: the usage is written about a second later, with no other message.
    for reservation in admitted {
        assert!(sessions.try_settle(s.user, reservation, 20, 0.5).is_none());
    }
    let mut usage = Default::default();
    for _ in 0..150 {
        usage = s.store.get_usage(s.user, "2031-01").await.unwrap();
        if usage.get("chat_messages") == Some(&3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(usage.get("chat_messages"), Some(&3), "{usage:?}");
    assert_eq!(usage.get("tokens"), Some(&60), "{usage:?}");
    assert_eq!(usage.get("cost_micro_usd"), Some(&1_500_000), "{usage:?}");
    match sessions.admit(s.user, "mock-echo", 10).await {
        Err(SessionError::QuotaExceeded { used, .. }) => assert_eq!(used, 3),
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    s.node.shutdown().await;
}

/// A change the session makes (here the user's tier) applies to the very next request the edge
/// admits on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tier_change_applies_to_the_next_request_admitted_outside_the_mailbox() {
    let s = setup(tiers(100, None)).await;
    let sessions = s.node.sessions.clone();
    let echo = sessions.admit(s.user, "mock-echo", 10).await.unwrap();
    assert!(sessions.try_settle(s.user, echo, 10, 0.0).is_none());
    assert!(matches!(
        sessions.admit(s.user, "mock-premium", 10).await,
        Err(SessionError::Forbidden(_))
    ));
    sessions
        .set_tier_role(
            s.user,
            chorus_actors::session::TierRoleChange {
                tier: Some("other".into()),
                role: None,
            },
        )
        .await
        .unwrap();
    let premium = sessions.admit(s.user, "mock-premium", 10).await.unwrap();
    assert!(sessions.try_settle(s.user, premium, 10, 0.0).is_none());
    s.node.shutdown().await;
}
