//! The contract every [`Store`] backend passes, written against the trait alone.
//!
//! A backend's test crate instantiates it with [`store_contract_tests!`](crate::store_contract_tests),
//! giving an async factory that returns a fresh, empty store plus a guard kept alive for the test
//! (a temporary directory, a keyspace to drop):
//!
//! ```text
//! async fn fresh() -> (Arc<dyn Store>, tempfile::TempDir) { ... }
//! chorus_actors::store_contract_tests!(fresh);
//! ```
//!
//! Each case becomes its own `#[tokio::test]` (the test crate needs `tokio` as a dependency).
//! Timestamps used here carry microseconds but no nanoseconds: that is the precision a backend
//! must round-trip.

// Test code, exported (behind the `store-contract` feature) so other backends can run it: panicking
// on a failed expectation is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use uuid::{NoContext, Timestamp, Uuid};

use super::{
    ApiKey, BillingEvent, Chunk, ChunkCursor, ChunkPosition, Document, DocumentProgress,
    DocumentStatus, Message, MessageQuery, MessageRole, MessageStatus, Order, ProviderKey,
    RefreshToken, Role, Share, SpendOutcome, Store, StoreError, Summary, Thread, ThreadCursor,
    ThreadQuery, Usage, User, UserSettings,
};

/// Generates one `#[tokio::test]` per contract case, each on a store from `$factory`, an async
/// function (or closure returning a future) yielding `(Arc<dyn Store>, guard)`.
#[macro_export]
macro_rules! store_contract_tests {
    ($factory:expr) => {
        $crate::store_contract_tests!(@cases $factory;
            ping_succeeds,
            user_round_trips,
            missing_user_is_none,
            duplicate_email_is_a_conflict,
            update_user_replaces_mutable_fields_only,
            refresh_token_round_trips,
            refresh_token_is_spent_once,
            spending_a_revoked_or_unknown_token,
            concurrent_spends_have_one_winner,
            revoke_refresh_token_marks_it,
            revoke_family_revokes_only_that_family,
            api_keys_lifecycle,
            api_keys_are_listed_newest_first,
            thread_round_trips_and_updates,
            users_cannot_reach_each_others_data,
            threads_are_listed_by_activity,
            thread_pages_cover_everything_once,
            thread_page_boundary_has_no_next,
            thread_ties_are_broken_by_id,
            thread_search_matches_titles_case_insensitively,
            thread_search_matches_summaries,
            thread_search_treats_wildcards_literally,
            thread_search_paginates,
            bookmarked_filter,
            append_message_bumps_thread,
            message_round_trips_and_updates,
            messages_page_in_both_orders,
            messages_filter_by_model,
            message_ids_order_by_time,
            model_stats_per_model,
            summaries_upsert,
            usage_accumulates_per_period_and_kind,
            shares_lifecycle,
            provider_keys_upsert_list_delete_per_user,
            orphaned_streaming_messages_are_settled,
            delete_thread_cascades,
            timestamps_round_trip_at_microseconds,
            billing_event_is_recorded_once,
            concurrent_billing_event_inserts_have_one_winner,
            billing_event_can_be_forgotten,
            document_round_trips_and_progresses,
            documents_page_newest_first,
            documents_belong_to_their_user,
            chunks_round_trip_in_batches,
            chunks_of_a_missing_document_are_refused,
            delete_document_removes_its_chunks,
            user_chunks_page_across_documents,
            unfinished_documents_are_listed_oldest_first,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, _guard) = ($factory)().await;
                $crate::store::contract::$case(store).await;
            }
        )*
    };
}

/// Generates the cases about several nodes sharing one backend (each store instance serving one
/// node), on stores from `$factory`: an async function taking node names (`&[&str]`) and yielding
/// `(Vec<Arc<dyn Store>>, guard)`, one store per name, all over the same data.
#[macro_export]
macro_rules! store_node_contract_tests {
    ($factory:expr) => {
        $crate::store_node_contract_tests!(@cases $factory;
            startup_reaper_settles_only_its_own_nodes_messages,
            a_dead_nodes_streaming_messages_are_settled_by_another_node,
            the_node_running_a_threads_turn_is_found,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (stores, _guard) = ($factory)(&["node-a", "node-b"]).await;
                $crate::store::contract::$case(stores).await;
            }
        )*
    };
}

// ---- fixtures ----

/// 2026-01-01T00:00:00.123456Z: an instant with microseconds, so a backend that keeps only
/// milliseconds fails the round trips.
const BASE_MICROS: i64 = 1_767_225_600_123_456;

/// `BASE + secs` seconds.
pub fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(BASE_MICROS + secs * 1_000_000).unwrap()
}

/// A UUIDv7 for the instant `at(secs)`, so that id order is the order of `secs`.
pub fn v7_at(secs: i64) -> Uuid {
    let t = at(secs);
    let ts = Timestamp::from_unix(
        NoContext,
        u64::try_from(t.timestamp()).unwrap(),
        t.timestamp_subsec_nanos(),
    );
    Uuid::new_v7(ts)
}

pub fn user(email: &str) -> User {
    User {
        id: Uuid::now_v7(),
        email: email.to_owned(),
        display_name: Some("Ada".to_owned()),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_owned(),
        tier: "free".to_owned(),
        role: Role::User,
        settings: UserSettings {
            default_model: Some("gpt-4o".to_owned()),
            temperature: Some(0.7),
            system_prompt: None,
        },
        created_at: at(0),
        updated_at: at(0),
    }
}

pub fn thread(user_id: Uuid, updated_secs: i64) -> Thread {
    Thread {
        user_id,
        id: Uuid::now_v7(),
        title: Some(format!("thread at {updated_secs}")),
        system_prompt: None,
        model: None,
        bookmarked: false,
        created_at: at(updated_secs),
        updated_at: at(updated_secs),
        message_count: 0,
    }
}

pub fn message(thread: &Thread, secs: i64, model: Option<&str>) -> Message {
    Message {
        user_id: thread.user_id,
        thread_id: thread.id,
        id: v7_at(secs),
        role: MessageRole::User,
        model: model.map(str::to_owned),
        content: format!("message at {secs}"),
        status: MessageStatus::Complete,
        usage: Usage::default(),
        cost_usd: 0.0,
        latency_ms: None,
        ttft_ms: None,
        provider: None,
        deployment: None,
        citations: Vec::new(),
        parent_id: None,
        turn_id: None,
        created_at: at(secs),
    }
}

pub fn refresh_token(user_id: Uuid, family_id: Uuid, hash: &str) -> RefreshToken {
    RefreshToken {
        token_hash: hash.to_owned(),
        user_id,
        family_id,
        created_at: at(0),
        expires_at: at(30 * 24 * 3600),
        spent_at: None,
        revoked_at: None,
    }
}

pub fn api_key(user_id: Uuid, hash: &str, created_secs: i64) -> ApiKey {
    ApiKey {
        id: Uuid::now_v7(),
        key_hash: hash.to_owned(),
        user_id,
        name: format!("key {hash}"),
        scopes: vec!["chat".to_owned(), "threads:read".to_owned()],
        created_at: at(created_secs),
        last_used_at: None,
    }
}

pub fn summary(thread: &Thread, model: &str, text: &str) -> Summary {
    Summary {
        user_id: thread.user_id,
        thread_id: thread.id,
        model: model.to_owned(),
        text: text.to_owned(),
        covers_until: v7_at(1),
        updated_at: at(1),
    }
}

pub fn share(thread: &Thread, share_id: &str) -> Share {
    Share {
        share_id: share_id.to_owned(),
        user_id: thread.user_id,
        thread_id: thread.id,
        created_at: at(5),
        expires_at: Some(at(3600)),
    }
}

async fn create_threads(store: &dyn Store, threads: &[Thread]) {
    for t in threads {
        store.create_thread(t).await.unwrap();
    }
}

/// Walks every page of `query` and returns the thread ids in order, checking each page's size.
async fn all_thread_pages(store: &dyn Store, user_id: Uuid, query: ThreadQuery) -> Vec<Vec<Uuid>> {
    let mut pages = Vec::new();
    let mut query = query;
    loop {
        let page = store.list_threads(user_id, &query).await.unwrap();
        assert!(
            page.items.len() <= query.limit,
            "page larger than the limit"
        );
        pages.push(page.items.iter().map(|t| t.id).collect());
        match page.next {
            Some(cursor) => {
                let last = page.items.last().expect("a page with `next` has items");
                assert_eq!(
                    cursor,
                    ThreadCursor {
                        updated_at: last.updated_at,
                        id: last.id
                    }
                );
                query.cursor = Some(cursor);
            }
            None => return pages,
        }
        assert!(pages.len() < 1000, "pagination does not terminate");
    }
}

async fn all_message_pages(
    store: &dyn Store,
    thread: &Thread,
    query: MessageQuery,
) -> Vec<Vec<Uuid>> {
    let mut pages = Vec::new();
    let mut query = query;
    loop {
        let page = store
            .list_messages(thread.user_id, thread.id, &query)
            .await
            .unwrap();
        assert!(
            page.items.len() <= query.limit,
            "page larger than the limit"
        );
        pages.push(page.items.iter().map(|m| m.id).collect());
        match page.next {
            Some(cursor) => {
                assert_eq!(Some(cursor), page.items.last().map(|m| m.id));
                query.cursor = Some(cursor);
            }
            None => return pages,
        }
        assert!(pages.len() < 1000, "pagination does not terminate");
    }
}

fn search(q: &str) -> ThreadQuery {
    ThreadQuery {
        limit: 100,
        q: Some(q.to_owned()),
        ..ThreadQuery::default()
    }
}

async fn listed(store: &dyn Store, user_id: Uuid, query: &ThreadQuery) -> Vec<Uuid> {
    let page = store.list_threads(user_id, query).await.unwrap();
    page.items.iter().map(|t| t.id).collect()
}

fn first_page(limit: usize) -> ThreadQuery {
    ThreadQuery {
        limit,
        ..ThreadQuery::default()
    }
}

// ---- cases ----

pub async fn ping_succeeds(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
}

pub async fn user_round_trips(store: Arc<dyn Store>) {
    let mut u = user("ada@example.com");
    u.settings.system_prompt = Some("Be brief.".to_owned());
    store.create_user(&u).await.unwrap();

    assert_eq!(store.get_user(u.id).await.unwrap(), Some(u.clone()));
    assert_eq!(
        store.get_user_by_email("ada@example.com").await.unwrap(),
        Some(u.clone())
    );

    let mut bare = user("bare@example.com");
    bare.display_name = None;
    bare.role = Role::Admin;
    bare.settings = UserSettings::default();
    store.create_user(&bare).await.unwrap();
    assert_eq!(store.get_user(bare.id).await.unwrap(), Some(bare));
}

pub async fn missing_user_is_none(store: Arc<dyn Store>) {
    assert_eq!(store.get_user(Uuid::now_v7()).await.unwrap(), None);
    assert_eq!(
        store.get_user_by_email("nobody@example.com").await.unwrap(),
        None
    );
}

pub async fn duplicate_email_is_a_conflict(store: Arc<dyn Store>) {
    let first = user("same@example.com");
    store.create_user(&first).await.unwrap();

    let mut second = user("same@example.com");
    second.display_name = Some("Impostor".to_owned());
    let err = store.create_user(&second).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    assert_eq!(
        store.get_user_by_email("same@example.com").await.unwrap(),
        Some(first)
    );
    assert_eq!(store.get_user(second.id).await.unwrap(), None);
}

pub async fn update_user_replaces_mutable_fields_only(store: Arc<dyn Store>) {
    let u = user("ada@example.com");
    store.create_user(&u).await.unwrap();

    let mut changed = u.clone();
    changed.email = "other@example.com".to_owned();
    changed.display_name = None;
    changed.password_hash = "$argon2id$new".to_owned();
    changed.tier = "pro".to_owned();
    changed.role = Role::Admin;
    changed.settings = UserSettings {
        default_model: None,
        temperature: Some(0.2),
        system_prompt: Some("Terse.".to_owned()),
    };
    changed.created_at = at(99);
    changed.updated_at = at(10);
    assert!(store.update_user(&changed).await.unwrap());

    let expected = User {
        email: u.email.clone(),
        created_at: u.created_at,
        ..changed.clone()
    };
    assert_eq!(store.get_user(u.id).await.unwrap(), Some(expected.clone()));
    assert_eq!(
        store.get_user_by_email("ada@example.com").await.unwrap(),
        Some(expected)
    );
    assert_eq!(
        store.get_user_by_email("other@example.com").await.unwrap(),
        None
    );

    let ghost = user("ghost@example.com");
    assert!(!store.update_user(&ghost).await.unwrap());
    assert_eq!(store.get_user(ghost.id).await.unwrap(), None);
}

pub async fn refresh_token_round_trips(store: Arc<dyn Store>) {
    let token = refresh_token(Uuid::now_v7(), Uuid::now_v7(), "hash-1");
    store.insert_refresh_token(&token).await.unwrap();
    assert_eq!(
        store.get_refresh_token("hash-1").await.unwrap(),
        Some(token)
    );
    assert_eq!(store.get_refresh_token("hash-2").await.unwrap(), None);
}

pub async fn refresh_token_is_spent_once(store: Arc<dyn Store>) {
    let token = refresh_token(Uuid::now_v7(), Uuid::now_v7(), "hash-1");
    store.insert_refresh_token(&token).await.unwrap();

    let outcome = store.spend_refresh_token("hash-1", at(60)).await.unwrap();
    assert_eq!(outcome, SpendOutcome::Spent(token.clone()));

    let spent = RefreshToken {
        spent_at: Some(at(60)),
        ..token
    };
    assert_eq!(
        store.get_refresh_token("hash-1").await.unwrap(),
        Some(spent.clone())
    );
    let again = store.spend_refresh_token("hash-1", at(61)).await.unwrap();
    assert_eq!(again, SpendOutcome::AlreadyUsed(spent.clone()));
    // A failed spend changes nothing.
    assert_eq!(
        store.get_refresh_token("hash-1").await.unwrap(),
        Some(spent)
    );
}

pub async fn spending_a_revoked_or_unknown_token(store: Arc<dyn Store>) {
    assert_eq!(
        store.spend_refresh_token("missing", at(1)).await.unwrap(),
        SpendOutcome::NotFound
    );

    let token = refresh_token(Uuid::now_v7(), Uuid::now_v7(), "hash-1");
    store.insert_refresh_token(&token).await.unwrap();
    assert!(store.revoke_refresh_token("hash-1", at(5)).await.unwrap());
    let revoked = RefreshToken {
        revoked_at: Some(at(5)),
        ..token
    };
    assert_eq!(
        store.spend_refresh_token("hash-1", at(6)).await.unwrap(),
        SpendOutcome::AlreadyUsed(revoked.clone())
    );
    assert_eq!(
        store.get_refresh_token("hash-1").await.unwrap(),
        Some(revoked)
    );
}

pub async fn concurrent_spends_have_one_winner(store: Arc<dyn Store>) {
    const RACERS: i64 = 8;
    for round in 0..3 {
        let hash = format!("race-{round}");
        let token = refresh_token(Uuid::now_v7(), Uuid::now_v7(), &hash);
        store.insert_refresh_token(&token).await.unwrap();

        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS as usize));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..RACERS {
            let (store, barrier, hash) = (Arc::clone(&store), Arc::clone(&barrier), hash.clone());
            tasks.spawn(async move {
                barrier.wait().await;
                store.spend_refresh_token(&hash, at(100 + i)).await.unwrap()
            });
        }
        let outcomes = tasks.join_all().await;

        let winners: Vec<_> = outcomes
            .iter()
            .filter(|o| matches!(o, SpendOutcome::Spent(_)))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        assert_eq!(winners[0], &SpendOutcome::Spent(token.clone()));

        let stored = store.get_refresh_token(&hash).await.unwrap().unwrap();
        assert!(stored.spent_at.is_some());
        for o in &outcomes {
            if let SpendOutcome::AlreadyUsed(row) = o {
                assert_eq!(row, &stored, "losers see the winner's spend");
            }
        }
        let losers = outcomes
            .iter()
            .filter(|o| matches!(o, SpendOutcome::AlreadyUsed(_)))
            .count();
        assert_eq!(losers as i64, RACERS - 1);
    }
}

pub async fn revoke_refresh_token_marks_it(store: Arc<dyn Store>) {
    assert!(!store.revoke_refresh_token("missing", at(1)).await.unwrap());

    let token = refresh_token(Uuid::now_v7(), Uuid::now_v7(), "hash-1");
    store.insert_refresh_token(&token).await.unwrap();
    assert!(store.revoke_refresh_token("hash-1", at(2)).await.unwrap());
    let stored = store.get_refresh_token("hash-1").await.unwrap().unwrap();
    assert_eq!(stored.revoked_at, Some(at(2)));
    assert_eq!(stored.spent_at, None);
    // Logging out twice still finds the token.
    assert!(store.revoke_refresh_token("hash-1", at(3)).await.unwrap());
    let stored = store.get_refresh_token("hash-1").await.unwrap().unwrap();
    assert!(stored.revoked_at.is_some());
}

pub async fn revoke_family_revokes_only_that_family(store: Arc<dyn Store>) {
    let (user_id, family, other_family) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let mut spent = refresh_token(user_id, family, "f-spent");
    spent.spent_at = Some(at(1));
    let live = refresh_token(user_id, family, "f-live");
    let mut revoked = refresh_token(user_id, family, "f-revoked");
    revoked.revoked_at = Some(at(2));
    let other = refresh_token(user_id, other_family, "other-family");
    let stranger = refresh_token(Uuid::now_v7(), family, "other-user");
    for t in [&spent, &live, &revoked, &other, &stranger] {
        store.insert_refresh_token(t).await.unwrap();
    }

    assert_eq!(
        store
            .revoke_refresh_family(user_id, family, at(10))
            .await
            .unwrap(),
        2
    );
    let get = |hash: &'static str| {
        let store = Arc::clone(&store);
        async move { store.get_refresh_token(hash).await.unwrap().unwrap() }
    };
    assert_eq!(get("f-spent").await.revoked_at, Some(at(10)));
    assert_eq!(get("f-spent").await.spent_at, Some(at(1)));
    assert_eq!(get("f-live").await.revoked_at, Some(at(10)));
    assert_eq!(
        get("f-revoked").await.revoked_at,
        Some(at(2)),
        "an earlier revocation is kept"
    );
    assert_eq!(get("other-family").await.revoked_at, None);
    assert_eq!(get("other-user").await.revoked_at, None);

    assert_eq!(
        store
            .revoke_refresh_family(user_id, family, at(11))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.spend_refresh_token("f-live", at(12)).await.unwrap(),
        SpendOutcome::AlreadyUsed(get("f-live").await)
    );
}

pub async fn api_keys_lifecycle(store: Arc<dyn Store>) {
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let key = api_key(alice, "key-hash-1", 1);
    store.insert_api_key(&key).await.unwrap();

    assert_eq!(
        store.get_api_key_by_hash("key-hash-1").await.unwrap(),
        Some(key.clone())
    );
    assert_eq!(store.get_api_key_by_hash("nope").await.unwrap(), None);

    store.touch_api_key("key-hash-1", at(50)).await.unwrap();
    let touched = ApiKey {
        last_used_at: Some(at(50)),
        ..key.clone()
    };
    assert_eq!(
        store.get_api_key_by_hash("key-hash-1").await.unwrap(),
        Some(touched.clone())
    );
    // Touching an unknown key is not an error.
    store.touch_api_key("nope", at(51)).await.unwrap();

    assert!(!store.delete_api_key(bob, key.id).await.unwrap());
    assert_eq!(store.list_api_keys(bob).await.unwrap(), vec![]);
    assert_eq!(
        store.list_api_keys(alice).await.unwrap(),
        vec![touched.clone()]
    );

    assert!(store.delete_api_key(alice, key.id).await.unwrap());
    assert!(!store.delete_api_key(alice, key.id).await.unwrap());
    assert_eq!(store.get_api_key_by_hash("key-hash-1").await.unwrap(), None);
    assert_eq!(store.list_api_keys(alice).await.unwrap(), vec![]);
}

pub async fn api_keys_are_listed_newest_first(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let keys = [
        api_key(user_id, "k-middle", 20),
        api_key(user_id, "k-old", 10),
        api_key(user_id, "k-new", 30),
    ];
    for k in &keys {
        store.insert_api_key(k).await.unwrap();
    }
    store
        .insert_api_key(&api_key(Uuid::now_v7(), "k-other", 40))
        .await
        .unwrap();

    let listed: Vec<String> = store
        .list_api_keys(user_id)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.key_hash)
        .collect();
    assert_eq!(listed, ["k-new", "k-middle", "k-old"]);
}

pub async fn thread_round_trips_and_updates(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let mut t = thread(user_id, 0);
    t.system_prompt = Some("You are terse.".to_owned());
    t.model = Some("claude".to_owned());
    store.create_thread(&t).await.unwrap();
    assert_eq!(
        store.get_thread(user_id, t.id).await.unwrap(),
        Some(t.clone())
    );
    assert_eq!(
        store.get_thread(user_id, Uuid::now_v7()).await.unwrap(),
        None
    );

    store.append_message(&message(&t, 1, None)).await.unwrap();
    let mut patched = t.clone();
    patched.title = None;
    patched.system_prompt = None;
    patched.model = Some("gpt".to_owned());
    patched.bookmarked = true;
    patched.updated_at = at(7);
    patched.created_at = at(100);
    patched.message_count = 42;
    assert!(store.update_thread(&patched).await.unwrap());

    let expected = Thread {
        created_at: t.created_at,
        message_count: 1,
        ..patched
    };
    assert_eq!(
        store.get_thread(user_id, t.id).await.unwrap(),
        Some(expected)
    );

    let ghost = thread(user_id, 0);
    assert!(!store.update_thread(&ghost).await.unwrap());
    assert_eq!(store.get_thread(user_id, ghost.id).await.unwrap(), None);
}

pub async fn users_cannot_reach_each_others_data(store: Arc<dyn Store>) {
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let t = thread(alice, 0);
    store.create_thread(&t).await.unwrap();
    let m = message(&t, 1, Some("gpt"));
    store.append_message(&m).await.unwrap();
    store
        .upsert_summary(&summary(&t, "gpt", "secret plans"))
        .await
        .unwrap();
    store.create_share(&share(&t, "share-a")).await.unwrap();
    store.add_usage(alice, "2026-01", "chat", 3).await.unwrap();

    assert_eq!(store.get_thread(bob, t.id).await.unwrap(), None);
    assert!(listed(&*store, bob, &first_page(100)).await.is_empty());
    assert!(listed(&*store, bob, &search("secret")).await.is_empty());
    assert_eq!(store.get_message(bob, t.id, m.id).await.unwrap(), None);
    let page = store
        .list_messages(
            bob,
            t.id,
            &MessageQuery {
                limit: 100,
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(page.items.is_empty() && page.next.is_none());
    assert_eq!(store.get_summary(bob, t.id, "gpt").await.unwrap(), None);
    assert!(
        store
            .thread_model_stats(bob, t.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.get_usage(bob, "2026-01").await.unwrap().is_empty());

    let mut hijack = t.clone();
    hijack.user_id = bob;
    hijack.title = Some("mine now".to_owned());
    assert!(!store.update_thread(&hijack).await.unwrap());
    let mut forged = m.clone();
    forged.user_id = bob;
    forged.content = "forged".to_owned();
    assert!(!store.update_message(&forged).await.unwrap());
    assert_eq!(store.delete_shares_for_thread(bob, t.id).await.unwrap(), 0);
    assert!(!store.delete_thread(bob, t.id).await.unwrap());

    // Alice's data is untouched.
    assert_eq!(
        store.get_thread(alice, t.id).await.unwrap().unwrap().title,
        t.title
    );
    assert_eq!(store.get_message(alice, t.id, m.id).await.unwrap(), Some(m));
    assert!(
        store
            .get_summary(alice, t.id, "gpt")
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.get_share("share-a").await.unwrap().is_some());
    assert_eq!(listed(&*store, alice, &first_page(100)).await, vec![t.id]);
}

pub async fn threads_are_listed_by_activity(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let (oldest, middle, newest) = (thread(user_id, 1), thread(user_id, 2), thread(user_id, 3));
    create_threads(&*store, &[middle.clone(), oldest.clone(), newest.clone()]).await;

    assert_eq!(
        listed(&*store, user_id, &first_page(10)).await,
        vec![newest.id, middle.id, oldest.id]
    );

    store
        .append_message(&message(&oldest, 10, None))
        .await
        .unwrap();
    assert_eq!(
        listed(&*store, user_id, &first_page(10)).await,
        vec![oldest.id, newest.id, middle.id]
    );
    let bumped = store.get_thread(user_id, oldest.id).await.unwrap().unwrap();
    assert_eq!(bumped.updated_at, at(10));

    let mut patched = middle.clone();
    patched.updated_at = at(20);
    assert!(store.update_thread(&patched).await.unwrap());
    assert_eq!(
        listed(&*store, user_id, &first_page(10)).await,
        vec![middle.id, oldest.id, newest.id]
    );
}

pub async fn thread_pages_cover_everything_once(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let threads: Vec<Thread> = (0..25).map(|i| thread(user_id, i)).collect();
    create_threads(&*store, &threads).await;
    create_threads(&*store, &[thread(Uuid::now_v7(), 100)]).await;

    let pages = all_thread_pages(&*store, user_id, first_page(10)).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [10, 10, 5]);

    let got: Vec<Uuid> = pages.concat();
    let expected: Vec<Uuid> = threads.iter().rev().map(|t| t.id).collect();
    assert_eq!(got, expected, "newest first, no duplicates, no gaps");
}

pub async fn thread_page_boundary_has_no_next(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let threads: Vec<Thread> = (0..10).map(|i| thread(user_id, i)).collect();
    create_threads(&*store, &threads).await;

    let page = store.list_threads(user_id, &first_page(10)).await.unwrap();
    assert_eq!(page.items.len(), 10);
    assert_eq!(page.next, None, "an exactly full last page has no next");

    let page = store.list_threads(user_id, &first_page(9)).await.unwrap();
    assert_eq!(page.items.len(), 9);
    assert!(page.next.is_some());

    let empty = store
        .list_threads(Uuid::now_v7(), &first_page(10))
        .await
        .unwrap();
    assert!(empty.items.is_empty() && empty.next.is_none());
}

pub async fn thread_ties_are_broken_by_id(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    // Same activity time: the order must still be total, or pages could skip or repeat.
    let threads: Vec<Thread> = (0..7).map(|_| thread(user_id, 5)).collect();
    create_threads(&*store, &threads).await;
    create_threads(&*store, &[thread(user_id, 6), thread(user_id, 4)]).await;

    let pages = all_thread_pages(&*store, user_id, first_page(2)).await;
    let got: Vec<Uuid> = pages.concat();
    assert_eq!(got.len(), 9);
    let tied: Vec<Uuid> = got[1..8].to_vec();
    let mut expected: Vec<Uuid> = threads.iter().map(|t| t.id).collect();
    expected.sort_by(|a, b| b.cmp(a));
    assert_eq!(
        tied, expected,
        "equal updated_at falls back to id descending"
    );
}

pub async fn thread_search_matches_titles_case_insensitively(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let mut rust = thread(user_id, 1);
    rust.title = Some("Learning RUST lifetimes".to_owned());
    let mut cooking = thread(user_id, 2);
    cooking.title = Some("Cooking with Über-chefs".to_owned());
    let mut untitled = thread(user_id, 3);
    untitled.title = None;
    create_threads(&*store, &[rust.clone(), cooking.clone(), untitled]).await;

    assert_eq!(
        listed(&*store, user_id, &search("rust")).await,
        vec![rust.id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("LIFETIME")).await,
        vec![rust.id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("über")).await,
        vec![cooking.id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("ÜBER-CHEF")).await,
        vec![cooking.id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("in")).await,
        vec![cooking.id, rust.id]
    );
    assert!(listed(&*store, user_id, &search("python")).await.is_empty());
    assert_eq!(
        listed(&*store, user_id, &search("")).await.len(),
        3,
        "an empty query filters nothing"
    );
}

pub async fn thread_search_matches_summaries(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let mut a = thread(user_id, 1);
    a.title = Some("Untitled chat".to_owned());
    let mut b = thread(user_id, 2);
    b.title = Some("Another chat".to_owned());
    create_threads(&*store, &[a.clone(), b.clone()]).await;
    store
        .upsert_summary(&summary(
            &a,
            "gpt",
            "The user asked about Quantum Tunnelling.",
        ))
        .await
        .unwrap();
    store
        .upsert_summary(&summary(&a, "claude", "Physics questions."))
        .await
        .unwrap();
    store
        .upsert_summary(&summary(&b, "gpt", "Recipes for bread."))
        .await
        .unwrap();

    assert_eq!(
        listed(&*store, user_id, &search("quantum")).await,
        vec![a.id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("PHYSICS")).await,
        vec![a.id]
    );
    assert_eq!(listed(&*store, user_id, &search("bread")).await, vec![b.id]);
    // A thread matching in its title and in two summaries is listed once.
    store
        .upsert_summary(&summary(&b, "claude", "More chat about bread."))
        .await
        .unwrap();
    assert_eq!(
        listed(&*store, user_id, &search("chat")).await,
        vec![b.id, a.id]
    );
}

pub async fn thread_search_treats_wildcards_literally(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let titles = [
        "100% done",
        "100 percent",
        "snake_case",
        "snakeXcase",
        "back\\slash",
    ];
    let threads: Vec<Thread> = titles
        .iter()
        .enumerate()
        .map(|(i, title)| Thread {
            title: Some((*title).to_owned()),
            ..thread(user_id, i as i64)
        })
        .collect();
    create_threads(&*store, &threads).await;

    assert_eq!(
        listed(&*store, user_id, &search("%")).await,
        vec![threads[0].id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("0% d")).await,
        vec![threads[0].id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("_")).await,
        vec![threads[2].id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("e_c")).await,
        vec![threads[2].id]
    );
    assert_eq!(
        listed(&*store, user_id, &search("\\")).await,
        vec![threads[4].id]
    );
    assert!(listed(&*store, user_id, &search("'")).await.is_empty());
}

pub async fn thread_search_paginates(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let threads: Vec<Thread> = (0..12)
        .map(|i| Thread {
            title: Some(if i % 2 == 0 {
                format!("Match {i}")
            } else {
                format!("other {i}")
            }),
            ..thread(user_id, i)
        })
        .collect();
    create_threads(&*store, &threads).await;

    let query = ThreadQuery {
        limit: 4,
        ..search("match")
    };
    let pages = all_thread_pages(&*store, user_id, query).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [4, 2]);
    let matches: Vec<Uuid> = threads
        .iter()
        .rev()
        .filter(|t| t.title.as_deref().is_some_and(|s| s.starts_with("Match")))
        .map(|t| t.id)
        .collect();
    assert_eq!(pages.concat(), matches);
}

pub async fn bookmarked_filter(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let threads: Vec<Thread> = (0..6)
        .map(|i| Thread {
            bookmarked: i % 3 == 0,
            ..thread(user_id, i)
        })
        .collect();
    create_threads(&*store, &threads).await;
    let ids = |pred: fn(&Thread) -> bool| -> Vec<Uuid> {
        threads
            .iter()
            .rev()
            .filter(|t| pred(t))
            .map(|t| t.id)
            .collect()
    };

    let query = |bookmarked| ThreadQuery {
        limit: 100,
        bookmarked,
        ..ThreadQuery::default()
    };
    assert_eq!(
        listed(&*store, user_id, &query(Some(true))).await,
        ids(|t| t.bookmarked)
    );
    assert_eq!(
        listed(&*store, user_id, &query(Some(false))).await,
        ids(|t| !t.bookmarked)
    );
    assert_eq!(listed(&*store, user_id, &query(None)).await, ids(|_| true));

    let pages = all_thread_pages(
        &*store,
        user_id,
        ThreadQuery {
            limit: 1,
            ..query(Some(true))
        },
    )
    .await;
    assert_eq!(pages.concat(), ids(|t| t.bookmarked));
}

pub async fn append_message_bumps_thread(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 10);
    store.create_thread(&t).await.unwrap();

    store
        .append_message(&message(&t, 20, Some("gpt")))
        .await
        .unwrap();
    let after = store.get_thread(user_id, t.id).await.unwrap().unwrap();
    assert_eq!((after.message_count, after.updated_at), (1, at(20)));

    // A message stamped earlier than the last activity counts but does not move time back.
    store
        .append_message(&message(&t, 5, Some("gpt")))
        .await
        .unwrap();
    let after = store.get_thread(user_id, t.id).await.unwrap().unwrap();
    assert_eq!((after.message_count, after.updated_at), (2, at(20)));

    store.append_message(&message(&t, 30, None)).await.unwrap();
    let after = store.get_thread(user_id, t.id).await.unwrap().unwrap();
    assert_eq!((after.message_count, after.updated_at), (3, at(30)));
    assert_eq!(after.created_at, t.created_at);
}

pub async fn message_round_trips_and_updates(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    store.create_thread(&t).await.unwrap();

    let question = message(&t, 1, Some("gpt-4o"));
    store.append_message(&question).await.unwrap();
    let answer = Message {
        id: v7_at(2),
        role: MessageRole::Assistant,
        content: String::new(),
        status: MessageStatus::Streaming,
        provider: Some("openai".to_owned()),
        deployment: None,
        citations: Vec::new(),
        parent_id: Some(question.id),
        turn_id: Some(Uuid::now_v7()),
        created_at: at(2),
        ..question.clone()
    };
    store.append_message(&answer).await.unwrap();
    assert_eq!(
        store.get_message(user_id, t.id, question.id).await.unwrap(),
        Some(question.clone())
    );
    assert_eq!(
        store.get_message(user_id, t.id, answer.id).await.unwrap(),
        Some(answer.clone())
    );
    assert_eq!(
        store
            .get_message(user_id, t.id, Uuid::now_v7())
            .await
            .unwrap(),
        None
    );

    let done = Message {
        content: "Hello! ✨ How can I help?".to_owned(),
        status: MessageStatus::Complete,
        usage: Usage {
            input_tokens: 12,
            output_tokens: 345,
        },
        cost_usd: 0.001_234_5,
        latency_ms: Some(1_250),
        ttft_ms: Some(180),
        provider: Some("azure".to_owned()),
        deployment: Some("gpt-4o@azure".to_owned()),
        citations: Vec::new(),
        model: Some("gpt-4o-2024".to_owned()),
        ..answer.clone()
    };
    let mut attempt = done.clone();
    attempt.role = MessageRole::System;
    attempt.parent_id = None;
    attempt.turn_id = None;
    attempt.created_at = at(99);
    assert!(store.update_message(&attempt).await.unwrap());
    assert_eq!(
        store.get_message(user_id, t.id, answer.id).await.unwrap(),
        Some(done.clone()),
        "role, parent, turn and created_at are not replaced"
    );

    let ghost = message(&t, 3, None);
    assert!(!store.update_message(&ghost).await.unwrap());
    assert_eq!(
        store.get_message(user_id, t.id, ghost.id).await.unwrap(),
        None
    );

    for status in [
        MessageStatus::Pending,
        MessageStatus::Interrupted,
        MessageStatus::Failed,
    ] {
        let m = Message {
            status,
            ..done.clone()
        };
        assert!(store.update_message(&m).await.unwrap());
        assert_eq!(
            store
                .get_message(user_id, t.id, m.id)
                .await
                .unwrap()
                .map(|m| m.status),
            Some(status)
        );
    }
}

pub async fn messages_page_in_both_orders(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    let other = thread(user_id, 0);
    create_threads(&*store, &[t.clone(), other.clone()]).await;
    let messages: Vec<Message> = (1..=7).map(|i| message(&t, i, None)).collect();
    for m in &messages {
        store.append_message(m).await.unwrap();
    }
    store
        .append_message(&message(&other, 4, None))
        .await
        .unwrap();
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();

    let asc = all_message_pages(
        &*store,
        &t,
        MessageQuery {
            limit: 3,
            ..MessageQuery::default()
        },
    )
    .await;
    assert_eq!(asc.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(asc.concat(), ids);

    let desc = all_message_pages(
        &*store,
        &t,
        MessageQuery {
            limit: 3,
            order: Order::Desc,
            ..MessageQuery::default()
        },
    )
    .await;
    assert_eq!(desc.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(desc.concat(), ids.iter().rev().copied().collect::<Vec<_>>());

    // The cursor is exclusive in both directions.
    let after = store
        .list_messages(
            user_id,
            t.id,
            &MessageQuery {
                limit: 2,
                cursor: Some(ids[3]),
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(after.items, messages[4..6].to_vec());
    assert_eq!(after.next, Some(ids[5]));
    let before = store
        .list_messages(
            user_id,
            t.id,
            &MessageQuery {
                limit: 10,
                cursor: Some(ids[3]),
                order: Order::Desc,
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    let expected: Vec<Message> = messages[..3].iter().rev().cloned().collect();
    assert_eq!(before.items, expected);
    assert_eq!(before.next, None);

    let exact = store
        .list_messages(
            user_id,
            t.id,
            &MessageQuery {
                limit: 7,
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((exact.items.len(), exact.next), (7, None));
}

pub async fn messages_filter_by_model(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    store.create_thread(&t).await.unwrap();
    let models = [
        Some("gpt"),
        Some("claude"),
        Some("gpt"),
        None,
        Some("gpt"),
        Some("claude"),
    ];
    let messages: Vec<Message> = models
        .iter()
        .enumerate()
        .map(|(i, model)| message(&t, i as i64 + 1, *model))
        .collect();
    for m in &messages {
        store.append_message(m).await.unwrap();
    }
    let of = |model: &str| -> Vec<Uuid> {
        messages
            .iter()
            .filter(|m| m.model.as_deref() == Some(model))
            .map(|m| m.id)
            .collect()
    };

    let gpt = all_message_pages(
        &*store,
        &t,
        MessageQuery {
            limit: 2,
            model: Some("gpt".to_owned()),
            ..MessageQuery::default()
        },
    )
    .await;
    assert_eq!(gpt.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(gpt.concat(), of("gpt"));

    let claude_desc = all_message_pages(
        &*store,
        &t,
        MessageQuery {
            limit: 1,
            order: Order::Desc,
            model: Some("claude".to_owned()),
            ..MessageQuery::default()
        },
    )
    .await;
    let mut expected = of("claude");
    expected.reverse();
    assert_eq!(claude_desc.concat(), expected);

    let none = store
        .list_messages(
            user_id,
            t.id,
            &MessageQuery {
                limit: 10,
                model: Some("gemini".to_owned()),
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next.is_none());
}

pub async fn message_ids_order_by_time(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    store.create_thread(&t).await.unwrap();
    // Spread over milliseconds, seconds and years so every byte of the v7 timestamp varies, and
    // insert out of order: listing must follow time, not insertion.
    let offsets = [86_400 * 400, 1, 3_600, 0, 86_400, 59, 2];
    let mut messages: Vec<Message> = offsets.iter().map(|&s| message(&t, s, None)).collect();
    for m in &messages {
        store.append_message(m).await.unwrap();
    }
    messages.sort_by_key(|m| m.created_at);
    let page = store
        .list_messages(
            user_id,
            t.id,
            &MessageQuery {
                limit: 100,
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items, messages);
}

pub async fn model_stats_per_model(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    let other = thread(user_id, 0);
    create_threads(&*store, &[t.clone(), other.clone()]).await;
    assert!(
        store
            .thread_model_stats(user_id, t.id)
            .await
            .unwrap()
            .is_empty()
    );

    for (i, model) in [
        Some("gpt"),
        Some("claude"),
        Some("gpt"),
        None,
        Some("gemini"),
        Some("gpt"),
    ]
    .into_iter()
    .enumerate()
    {
        store
            .append_message(&message(&t, i as i64 + 1, model))
            .await
            .unwrap();
    }
    store
        .append_message(&message(&other, 9, Some("claude")))
        .await
        .unwrap();
    let claude_summary = summary(&t, "claude", "short");
    store.upsert_summary(&claude_summary).await.unwrap();
    store
        .upsert_summary(&summary(&other, "gpt", "elsewhere"))
        .await
        .unwrap();

    let stats = store.thread_model_stats(user_id, t.id).await.unwrap();
    let got: Vec<(&str, i64, Option<&Summary>)> = stats
        .iter()
        .map(|s| (s.model.as_str(), s.message_count, s.summary.as_ref()))
        .collect();
    assert_eq!(
        got,
        [
            ("claude", 1, Some(&claude_summary)),
            ("gemini", 1, None),
            ("gpt", 3, None),
        ]
    );
}

pub async fn summaries_upsert(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    store.create_thread(&t).await.unwrap();
    assert_eq!(store.get_summary(user_id, t.id, "gpt").await.unwrap(), None);

    let first = summary(&t, "gpt", "first");
    store.upsert_summary(&first).await.unwrap();
    assert_eq!(
        store.get_summary(user_id, t.id, "gpt").await.unwrap(),
        Some(first.clone())
    );

    let second = Summary {
        text: "second, longer".to_owned(),
        covers_until: v7_at(9),
        updated_at: at(9),
        ..first
    };
    store.upsert_summary(&second).await.unwrap();
    assert_eq!(
        store.get_summary(user_id, t.id, "gpt").await.unwrap(),
        Some(second)
    );
    assert_eq!(
        store.get_summary(user_id, t.id, "claude").await.unwrap(),
        None
    );
    assert_eq!(store.get_summary(user_id, t.id, "GPT").await.unwrap(), None);
}

pub async fn usage_accumulates_per_period_and_kind(store: Arc<dyn Store>) {
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    assert!(store.get_usage(alice, "2026-01").await.unwrap().is_empty());

    assert_eq!(
        store.add_usage(alice, "2026-01", "chat", 1).await.unwrap(),
        1
    );
    assert_eq!(
        store.add_usage(alice, "2026-01", "chat", 1).await.unwrap(),
        2
    );
    assert_eq!(
        store
            .add_usage(alice, "2026-01", "tokens", 1_500)
            .await
            .unwrap(),
        1_500
    );
    assert_eq!(
        store
            .add_usage(alice, "2026-01", "tokens", 2_500)
            .await
            .unwrap(),
        4_000
    );
    assert_eq!(
        store.add_usage(alice, "2026-01", "chat", -1).await.unwrap(),
        1
    );
    assert_eq!(
        store.add_usage(alice, "2026-02", "chat", 5).await.unwrap(),
        5
    );
    assert_eq!(store.add_usage(bob, "2026-01", "chat", 7).await.unwrap(), 7);

    let expected: BTreeMap<String, i64> =
        [("chat".to_owned(), 1), ("tokens".to_owned(), 4_000)].into();
    assert_eq!(store.get_usage(alice, "2026-01").await.unwrap(), expected);
    assert_eq!(
        store.get_usage(alice, "2026-02").await.unwrap(),
        [("chat".to_owned(), 5)].into()
    );
    assert_eq!(
        store.get_usage(bob, "2026-01").await.unwrap(),
        [("chat".to_owned(), 7)].into()
    );

    // Concurrent increments are not lost.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let store = Arc::clone(&store);
        tasks.spawn(async move { store.add_usage(bob, "2026-03", "images", 1).await.unwrap() });
    }
    let values: HashSet<i64> = tasks.join_all().await.into_iter().collect();
    assert_eq!(values, (1..=20).collect());
    assert_eq!(
        store.get_usage(bob, "2026-03").await.unwrap(),
        [("images".to_owned(), 20)].into()
    );
}

pub async fn shares_lifecycle(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    let other = thread(user_id, 0);
    create_threads(&*store, &[t.clone(), other.clone()]).await;

    let a = share(&t, "share-a");
    let b = Share {
        expires_at: None,
        ..share(&t, "share-b")
    };
    let c = share(&other, "share-c");
    for s in [&a, &b, &c] {
        store.create_share(s).await.unwrap();
    }
    assert_eq!(store.get_share("share-a").await.unwrap(), Some(a));
    assert_eq!(store.get_share("share-b").await.unwrap(), Some(b));
    assert_eq!(store.get_share("missing").await.unwrap(), None);

    assert_eq!(
        store.delete_shares_for_thread(user_id, t.id).await.unwrap(),
        2
    );
    assert_eq!(
        store.delete_shares_for_thread(user_id, t.id).await.unwrap(),
        0
    );
    assert_eq!(store.get_share("share-a").await.unwrap(), None);
    assert_eq!(store.get_share("share-b").await.unwrap(), None);
    assert_eq!(store.get_share("share-c").await.unwrap(), Some(c));
}

pub async fn provider_keys_upsert_list_delete_per_user(store: Arc<dyn Store>) {
    let alice = Uuid::now_v7();
    let bob = Uuid::now_v7();
    let key = |user_id, provider: &str, sealed: &[u8], secs| ProviderKey {
        user_id,
        provider: provider.to_owned(),
        sealed: sealed.to_vec(),
        updated_at: at(secs),
    };
    store
        .put_provider_key(&key(alice, "openai", b"v1", 0))
        .await
        .unwrap();
    store
        .put_provider_key(&key(alice, "anthropic", b"a1", 1))
        .await
        .unwrap();
    store
        .put_provider_key(&key(bob, "openai", b"bob", 2))
        .await
        .unwrap();
    // Replacing keeps one row per (user, provider).
    store
        .put_provider_key(&key(alice, "openai", b"v2", 3))
        .await
        .unwrap();

    let listed = store.list_provider_keys(alice).await.unwrap();
    assert_eq!(
        listed,
        vec![
            key(alice, "anthropic", b"a1", 1),
            key(alice, "openai", b"v2", 3)
        ]
    );
    assert_eq!(
        store.list_provider_keys(bob).await.unwrap(),
        vec![key(bob, "openai", b"bob", 2)]
    );

    // Bob cannot delete Alice's key; deleting twice reports absence.
    assert!(!store.delete_provider_key(bob, "anthropic").await.unwrap());
    assert!(store.delete_provider_key(alice, "openai").await.unwrap());
    assert!(!store.delete_provider_key(alice, "openai").await.unwrap());
    assert_eq!(store.list_provider_keys(alice).await.unwrap().len(), 1);
    assert_eq!(store.list_provider_keys(bob).await.unwrap().len(), 1);
}

pub async fn orphaned_streaming_messages_are_settled(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    create_threads(&*store, std::slice::from_ref(&t)).await;
    let mut old = message(&t, 1, Some("m"));
    old.status = MessageStatus::Streaming;
    old.content = "partial".into();
    let mut newer = message(&t, 10, Some("m"));
    newer.status = MessageStatus::Streaming;
    let done = message(&t, 2, Some("m"));
    for m in [&old, &newer, &done] {
        store.append_message(m).await.unwrap();
    }
    // Only streaming messages created before the cut-off are settled, keeping their text.
    assert_eq!(
        store
            .settle_orphaned_messages(at(5), MessageStatus::Interrupted)
            .await
            .unwrap(),
        1
    );
    let settled = store
        .get_message(user_id, t.id, old.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(settled.status, MessageStatus::Interrupted);
    assert_eq!(settled.content, "partial");
    let untouched = store
        .get_message(user_id, t.id, newer.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(untouched.status, MessageStatus::Streaming);
    let complete = store
        .get_message(user_id, t.id, done.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(complete.status, done.status);
}

/// A streaming assistant message with partial text, as a turn leaves it.
fn streaming(thread: &Thread, secs: i64, content: &str) -> Message {
    let mut m = message(thread, secs, Some("m"));
    m.role = MessageRole::Assistant;
    m.status = MessageStatus::Streaming;
    m.content = content.to_owned();
    m
}

async fn status_and_content(store: &dyn Store, m: &Message) -> (MessageStatus, String) {
    let stored = store
        .get_message(m.user_id, m.thread_id, m.id)
        .await
        .unwrap()
        .unwrap();
    (stored.status, stored.content)
}

/// `stores[0]` serves `node-a`, `stores[1]` serves `node-b`, over one backend.
pub async fn startup_reaper_settles_only_its_own_nodes_messages(stores: Vec<Arc<dyn Store>>) {
    let (a, b) = (&stores[0], &stores[1]);
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    create_threads(&**a, std::slice::from_ref(&t)).await;
    let on_a = streaming(&t, 1, "partial on a");
    let on_b = streaming(&t, 2, "partial on b");
    a.append_message(&on_a).await.unwrap();
    b.append_message(&on_b).await.unwrap();

    // Node a restarts: only the turn it left behind is settled; b's turn is still running.
    assert_eq!(
        a.settle_orphaned_messages(at(5), MessageStatus::Interrupted)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        status_and_content(&**b, &on_a).await,
        (MessageStatus::Interrupted, "partial on a".to_owned())
    );
    assert_eq!(
        status_and_content(&**a, &on_b).await,
        (MessageStatus::Streaming, "partial on b".to_owned())
    );
    assert_eq!(
        a.settle_orphaned_messages(at(5), MessageStatus::Interrupted)
            .await
            .unwrap(),
        0
    );
}

/// `stores[0]` serves `node-a`, `stores[1]` serves `node-b`, over one backend.
pub async fn a_dead_nodes_streaming_messages_are_settled_by_another_node(
    stores: Vec<Arc<dyn Store>>,
) {
    let (a, b) = (&stores[0], &stores[1]);
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    let other = thread(Uuid::now_v7(), 0);
    create_threads(&**a, std::slice::from_ref(&t)).await;
    create_threads(&**b, std::slice::from_ref(&other)).await;
    let dead_turn = streaming(&t, 1, "half an answ");
    let dead_turn_of_another_user = streaming(&other, 2, "");
    let live_turn = streaming(&t, 3, "still going");
    let finished = message(&t, 4, Some("m"));
    let after_death = streaming(&t, 10, "");
    for m in [&dead_turn, &finished, &after_death] {
        a.append_message(m).await.unwrap();
    }
    a.append_message(&dead_turn_of_another_user).await.unwrap();
    b.append_message(&live_turn).await.unwrap();

    // Node b learns that a died at(5): a's streaming messages from before then are settled,
    // with the text they had stored.
    assert_eq!(
        b.settle_orphaned_messages_of("node-a", at(5), MessageStatus::Interrupted)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        status_and_content(&**b, &dead_turn).await,
        (MessageStatus::Interrupted, "half an answ".to_owned())
    );
    assert_eq!(
        status_and_content(&**b, &dead_turn_of_another_user).await,
        (MessageStatus::Interrupted, String::new())
    );
    // b's own turn, a's finished message and anything newer than the death are untouched.
    assert_eq!(
        status_and_content(&**b, &live_turn).await,
        (MessageStatus::Streaming, "still going".to_owned())
    );
    assert_eq!(
        status_and_content(&**b, &finished).await.0,
        MessageStatus::Complete
    );
    assert_eq!(
        status_and_content(&**b, &after_death).await.0,
        MessageStatus::Streaming
    );
    // Again (another node seeing the same death): nothing left to settle. Unknown node: none.
    for node in ["node-a", "node-c"] {
        assert_eq!(
            b.settle_orphaned_messages_of(node, at(5), MessageStatus::Interrupted)
                .await
                .unwrap(),
            0
        );
    }
    // A settled message is an ordinary one again: the node's startup reaper leaves it be.
    assert_eq!(
        a.settle_orphaned_messages(at(5), MessageStatus::Failed)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        status_and_content(&**a, &dead_turn).await.0,
        MessageStatus::Interrupted
    );
}

/// `stores[0]` serves `node-a`, `stores[1]` serves `node-b`, over one backend.
pub async fn the_node_running_a_threads_turn_is_found(stores: Vec<Arc<dyn Store>>) {
    let (a, b) = (&stores[0], &stores[1]);
    let user_id = Uuid::now_v7();
    let t = thread(user_id, 0);
    let quiet = thread(user_id, 1);
    create_threads(&**a, &[t.clone(), quiet.clone()]).await;
    a.append_message(&message(&quiet, 2, Some("m")))
        .await
        .unwrap();
    assert_eq!(b.streaming_node(user_id, quiet.id).await.unwrap(), None);

    let mut running = streaming(&t, 3, "");
    a.append_message(&running).await.unwrap();
    // Any node sharing the backend sees where the turn runs; another user sees nothing.
    for store in [a, b] {
        assert_eq!(
            store
                .streaming_node(user_id, t.id)
                .await
                .unwrap()
                .as_deref(),
            Some("node-a")
        );
    }
    assert_eq!(b.streaming_node(Uuid::now_v7(), t.id).await.unwrap(), None);
    // A newer turn on b is the one named.
    b.append_message(&streaming(&t, 4, "")).await.unwrap();
    assert_eq!(
        a.streaming_node(user_id, t.id).await.unwrap().as_deref(),
        Some("node-b")
    );
    // Once settled, a message no longer counts.
    running.status = MessageStatus::Complete;
    a.update_message(&running).await.unwrap();
    b.settle_orphaned_messages_of("node-b", at(10), MessageStatus::Interrupted)
        .await
        .unwrap();
    assert_eq!(a.streaming_node(user_id, t.id).await.unwrap(), None);
}

pub async fn delete_thread_cascades(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let doomed = thread(user_id, 0);
    let kept = thread(user_id, 1);
    create_threads(&*store, &[doomed.clone(), kept.clone()]).await;
    for t in [&doomed, &kept] {
        store
            .append_message(&message(t, 2, Some("gpt")))
            .await
            .unwrap();
        store
            .append_message(&message(t, 3, Some("claude")))
            .await
            .unwrap();
        store
            .upsert_summary(&summary(t, "gpt", "summary"))
            .await
            .unwrap();
    }
    store
        .create_share(&share(&doomed, "doomed-share"))
        .await
        .unwrap();
    store
        .create_share(&share(&kept, "kept-share"))
        .await
        .unwrap();
    let doomed_message = v7_at(2);

    assert!(store.delete_thread(user_id, doomed.id).await.unwrap());
    assert!(!store.delete_thread(user_id, doomed.id).await.unwrap());

    assert_eq!(store.get_thread(user_id, doomed.id).await.unwrap(), None);
    let page = store
        .list_messages(
            user_id,
            doomed.id,
            &MessageQuery {
                limit: 100,
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(page.items.is_empty());
    assert_eq!(
        store
            .get_message(user_id, doomed.id, doomed_message)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get_summary(user_id, doomed.id, "gpt").await.unwrap(),
        None
    );
    assert!(
        store
            .thread_model_stats(user_id, doomed.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.get_share("doomed-share").await.unwrap(), None);
    assert_eq!(
        listed(&*store, user_id, &first_page(10)).await,
        vec![kept.id]
    );

    let kept_now = store.get_thread(user_id, kept.id).await.unwrap().unwrap();
    assert_eq!(kept_now.message_count, 2);
    assert!(
        store
            .get_summary(user_id, kept.id, "gpt")
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.get_share("kept-share").await.unwrap().is_some());
    assert_eq!(
        store
            .thread_model_stats(user_id, kept.id)
            .await
            .unwrap()
            .len(),
        2
    );

    // The id can be reused afterwards; nothing of the old thread comes back with it.
    store.create_thread(&doomed).await.unwrap();
    assert_eq!(
        store.get_thread(user_id, doomed.id).await.unwrap(),
        Some(doomed.clone())
    );
    assert_eq!(
        store.get_summary(user_id, doomed.id, "gpt").await.unwrap(),
        None
    );
}

pub async fn timestamps_round_trip_at_microseconds(store: Arc<dyn Store>) {
    // Odd microsecond values, one before the epoch, one far ahead.
    let instants = [
        DateTime::from_timestamp_micros(1_767_225_600_000_001).unwrap(),
        DateTime::from_timestamp_micros(1_767_225_600_999_999).unwrap(),
        DateTime::from_timestamp_micros(-1_234_567).unwrap(),
        DateTime::from_timestamp_micros(4_102_444_800_654_321).unwrap(),
    ];
    for (i, t) in instants.into_iter().enumerate() {
        let u = User {
            created_at: t,
            updated_at: t + Duration::microseconds(1),
            ..user(&format!("time{i}@example.com"))
        };
        store.create_user(&u).await.unwrap();
        assert_eq!(store.get_user(u.id).await.unwrap(), Some(u.clone()));

        let th = Thread {
            created_at: t,
            updated_at: t,
            ..thread(u.id, 0)
        };
        store.create_thread(&th).await.unwrap();
        assert_eq!(
            store.get_thread(u.id, th.id).await.unwrap(),
            Some(th.clone())
        );

        let token = RefreshToken {
            created_at: t,
            expires_at: t + Duration::days(30),
            spent_at: Some(t + Duration::microseconds(7)),
            revoked_at: Some(t - Duration::microseconds(3)),
            ..refresh_token(u.id, Uuid::now_v7(), &format!("time-{i}"))
        };
        store.insert_refresh_token(&token).await.unwrap();
        assert_eq!(
            store.get_refresh_token(&token.token_hash).await.unwrap(),
            Some(token)
        );

        let s = Share {
            created_at: t,
            expires_at: Some(t + Duration::microseconds(1)),
            ..share(&th, &format!("time-share-{i}"))
        };
        store.create_share(&s).await.unwrap();
        assert_eq!(store.get_share(&s.share_id).await.unwrap(), Some(s));

        let m = Message {
            created_at: t,
            ..message(&th, 0, None)
        };
        store.append_message(&m).await.unwrap();
        assert_eq!(store.get_message(u.id, th.id, m.id).await.unwrap(), Some(m));
    }
}

pub fn billing_event(event_id: &str, user_id: Uuid, event_type: &str) -> BillingEvent {
    BillingEvent {
        event_id: event_id.to_owned(),
        user_id,
        event_type: event_type.to_owned(),
        received_at: at(5),
    }
}

pub async fn billing_event_is_recorded_once(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let first = billing_event("evt_1", user_id, "subscription.activated");
    assert_eq!(store.get_billing_event("evt_1").await.unwrap(), None);
    assert!(store.insert_billing_event(&first).await.unwrap());
    assert_eq!(
        store.get_billing_event("evt_1").await.unwrap(),
        Some(first.clone())
    );

    // The same id again, even with other contents, is refused and changes nothing.
    let mut replay = billing_event("evt_1", Uuid::now_v7(), "subscription.revoked");
    replay.received_at = at(9);
    assert!(!store.insert_billing_event(&replay).await.unwrap());
    assert_eq!(store.get_billing_event("evt_1").await.unwrap(), Some(first));

    // Ids are exact: another id (or another case) is another event.
    assert!(
        store
            .insert_billing_event(&billing_event("EVT_1", user_id, "subscription.revoked"))
            .await
            .unwrap()
    );
}

pub async fn concurrent_billing_event_inserts_have_one_winner(store: Arc<dyn Store>) {
    const RACERS: usize = 8;
    let user_id = Uuid::now_v7();
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..RACERS {
        let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            let event = billing_event("evt_race", user_id, "subscription.activated");
            store.insert_billing_event(&event).await.unwrap()
        });
    }
    let outcomes = tasks.join_all().await;
    assert_eq!(
        outcomes.iter().filter(|won| **won).count(),
        1,
        "{outcomes:?}"
    );
}

pub async fn billing_event_can_be_forgotten(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let event = billing_event("evt_forget", user_id, "subscription.activated");
    assert!(!store.delete_billing_event("evt_forget").await.unwrap());
    assert!(store.insert_billing_event(&event).await.unwrap());
    assert!(
        store
            .insert_billing_event(&billing_event("evt_other", user_id, "subscription.revoked"))
            .await
            .unwrap()
    );
    assert!(store.delete_billing_event("evt_forget").await.unwrap());
    assert_eq!(store.get_billing_event("evt_forget").await.unwrap(), None);
    assert!(
        store
            .get_billing_event("evt_other")
            .await
            .unwrap()
            .is_some()
    );
    // Forgotten, it can be recorded again.
    assert!(store.insert_billing_event(&event).await.unwrap());
}

// ---- documents and chunks ----

pub fn document(user_id: Uuid, secs: i64) -> Document {
    let id = v7_at(secs);
    Document {
        user_id,
        id,
        name: format!("doc-{secs}.md"),
        mime: "text/markdown".to_owned(),
        size: 1234,
        status: DocumentStatus::Pending,
        progress: 0.0,
        chunk_count: 0,
        error: None,
        blob_key: format!("users/{user_id}/documents/{id}"),
        created_at: at(secs),
        updated_at: at(secs),
    }
}

pub fn chunk(document: &Document, seq: i64) -> Chunk {
    Chunk {
        user_id: document.user_id,
        document_id: document.id,
        seq,
        text: format!("chunk {seq} of {}", document.name),
        position: ChunkPosition {
            page: Some(u32::try_from(seq).unwrap() + 1),
            heading_path: vec!["Intro".to_owned(), format!("Part {seq}")],
            char_start: u64::try_from(seq).unwrap() * 100,
            char_end: u64::try_from(seq).unwrap() * 100 + 90,
        },
        token_count: 7 + seq,
        embedding: (seq % 2 == 0).then(|| vec![0.25, -1.5, f32::MIN_POSITIVE, seq as f32]),
    }
}

pub async fn document_round_trips_and_progresses(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let doc = document(user_id, 1);
    assert_eq!(store.get_document(user_id, doc.id).await.unwrap(), None);
    store.create_document(&doc).await.unwrap();
    assert_eq!(
        store.get_document(user_id, doc.id).await.unwrap(),
        Some(doc.clone())
    );
    assert!(matches!(
        store.create_document(&doc).await,
        Err(StoreError::Conflict(_))
    ));

    let processing = DocumentProgress {
        status: DocumentStatus::Processing,
        progress: 0.375,
        chunk_count: 0,
        error: None,
        updated_at: at(2),
    };
    assert!(
        store
            .update_document_progress(user_id, doc.id, &processing)
            .await
            .unwrap()
    );
    let failed = DocumentProgress {
        status: DocumentStatus::Failed,
        progress: 0.5,
        chunk_count: 3,
        error: Some("no text layer".to_owned()),
        updated_at: at(3),
    };
    assert!(
        store
            .update_document_progress(user_id, doc.id, &failed)
            .await
            .unwrap()
    );
    let stored = store.get_document(user_id, doc.id).await.unwrap().unwrap();
    assert_eq!(
        stored,
        Document {
            status: DocumentStatus::Failed,
            progress: 0.5,
            chunk_count: 3,
            error: Some("no text layer".to_owned()),
            updated_at: at(3),
            ..doc.clone()
        }
    );
    // Clearing the error on the way back to pending (a retry) is a real change too.
    let again = DocumentProgress {
        status: DocumentStatus::Pending,
        progress: 0.0,
        chunk_count: 0,
        error: None,
        updated_at: at(4),
    };
    assert!(
        store
            .update_document_progress(user_id, doc.id, &again)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .get_document(user_id, doc.id)
            .await
            .unwrap()
            .unwrap()
            .error,
        None
    );
    // Progress of a document that does not exist reports it.
    assert!(
        !store
            .update_document_progress(user_id, Uuid::now_v7(), &again)
            .await
            .unwrap()
    );
}

pub async fn documents_page_newest_first(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let docs: Vec<Document> = (0..5).map(|i| document(user_id, i * 10)).collect();
    // Created out of order: the listing follows ids (upload time), not insertion.
    for i in [3, 0, 4, 1, 2] {
        store.create_document(&docs[i]).await.unwrap();
    }
    store
        .create_document(&document(Uuid::now_v7(), 25))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = store.list_documents(user_id, 2, cursor).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|d| d.id));
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), seen.last());
                cursor = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<Uuid> = docs.iter().rev().map(|d| d.id).collect();
    assert_eq!(seen, expected);
    // A page that ends exactly at the last document says so.
    let all = store.list_documents(user_id, 5, None).await.unwrap();
    assert_eq!(all.items.len(), 5);
    assert_eq!(all.next, None);
}

pub async fn documents_belong_to_their_user(store: Arc<dyn Store>) {
    let (alice, mallory) = (Uuid::now_v7(), Uuid::now_v7());
    let doc = document(alice, 1);
    store.create_document(&doc).await.unwrap();
    store
        .put_chunks(alice, doc.id, &[chunk(&doc, 0)])
        .await
        .unwrap();
    assert_eq!(store.get_document(mallory, doc.id).await.unwrap(), None);
    assert!(
        store
            .list_documents(mallory, 10, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(store.list_chunks(mallory, doc.id).await.unwrap().is_empty());
    assert!(
        store
            .list_user_chunks(mallory, 10, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let progress = DocumentProgress {
        status: DocumentStatus::Ready,
        progress: 1.0,
        chunk_count: 1,
        error: None,
        updated_at: at(2),
    };
    assert!(
        !store
            .update_document_progress(mallory, doc.id, &progress)
            .await
            .unwrap()
    );
    assert!(!store.delete_document(mallory, doc.id).await.unwrap());
    assert_eq!(store.delete_chunks(mallory, doc.id).await.unwrap(), 0);
    // Chunks handed in under another user's key are refused outright.
    let mut stray = chunk(&doc, 1);
    stray.user_id = mallory;
    assert!(store.put_chunks(alice, doc.id, &[stray]).await.is_err());
    assert_eq!(
        store.get_document(alice, doc.id).await.unwrap(),
        Some(doc.clone())
    );
    assert_eq!(store.list_chunks(alice, doc.id).await.unwrap().len(), 1);
}

pub async fn chunks_round_trip_in_batches(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let doc = document(user_id, 1);
    store.create_document(&doc).await.unwrap();
    assert!(store.list_chunks(user_id, doc.id).await.unwrap().is_empty());
    let chunks: Vec<Chunk> = (0..5).map(|seq| chunk(&doc, seq)).collect();
    // Two batches, the second first: the listing is by seq.
    assert!(
        store
            .put_chunks(user_id, doc.id, &chunks[3..])
            .await
            .unwrap()
    );
    assert!(
        store
            .put_chunks(user_id, doc.id, &chunks[..3])
            .await
            .unwrap()
    );
    assert!(store.put_chunks(user_id, doc.id, &[]).await.unwrap());
    assert_eq!(store.list_chunks(user_id, doc.id).await.unwrap(), chunks);

    // The same seq again replaces the chunk (an ingestion that started over).
    let mut replaced = chunk(&doc, 2);
    replaced.text = "replaced".to_owned();
    replaced.embedding = None;
    replaced.position.page = None;
    replaced.position.heading_path.clear();
    assert!(
        store
            .put_chunks(user_id, doc.id, std::slice::from_ref(&replaced))
            .await
            .unwrap()
    );
    let listed = store.list_chunks(user_id, doc.id).await.unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[2], replaced);

    assert_eq!(store.delete_chunks(user_id, doc.id).await.unwrap(), 5);
    assert!(store.list_chunks(user_id, doc.id).await.unwrap().is_empty());
    assert!(store.get_document(user_id, doc.id).await.unwrap().is_some());
}

pub async fn chunks_of_a_missing_document_are_refused(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let doc = document(user_id, 1);
    assert!(
        !store
            .put_chunks(user_id, doc.id, &[chunk(&doc, 0)])
            .await
            .unwrap()
    );
    assert!(store.list_chunks(user_id, doc.id).await.unwrap().is_empty());
    // Nor do they appear once a document with that id is created.
    store.create_document(&doc).await.unwrap();
    assert!(store.list_chunks(user_id, doc.id).await.unwrap().is_empty());
}

pub async fn delete_document_removes_its_chunks(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let doomed = document(user_id, 1);
    let kept = document(user_id, 2);
    for doc in [&doomed, &kept] {
        store.create_document(doc).await.unwrap();
        let chunks: Vec<Chunk> = (0..3).map(|seq| chunk(doc, seq)).collect();
        assert!(store.put_chunks(user_id, doc.id, &chunks).await.unwrap());
    }
    assert!(store.delete_document(user_id, doomed.id).await.unwrap());
    assert!(!store.delete_document(user_id, doomed.id).await.unwrap());
    assert_eq!(store.get_document(user_id, doomed.id).await.unwrap(), None);
    assert!(
        store
            .list_chunks(user_id, doomed.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.list_chunks(user_id, kept.id).await.unwrap().len(), 3);
    // Writing chunks for it afterwards (an ingestion that missed the delete) stores nothing.
    assert!(
        !store
            .put_chunks(user_id, doomed.id, &[chunk(&doomed, 0)])
            .await
            .unwrap()
    );
    // The id can be reused; nothing of the old document comes back with it.
    store.create_document(&doomed).await.unwrap();
    assert!(
        store
            .list_chunks(user_id, doomed.id)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn user_chunks_page_across_documents(store: Arc<dyn Store>) {
    let user_id = Uuid::now_v7();
    let docs = [document(user_id, 1), document(user_id, 2)];
    let mut expected = Vec::new();
    for doc in &docs {
        store.create_document(doc).await.unwrap();
        let chunks: Vec<Chunk> = (0..3).map(|seq| chunk(doc, seq)).collect();
        assert!(store.put_chunks(user_id, doc.id, &chunks).await.unwrap());
        expected.extend(chunks);
    }
    let other = document(Uuid::now_v7(), 3);
    store.create_document(&other).await.unwrap();
    assert!(
        store
            .put_chunks(other.user_id, other.id, &[chunk(&other, 0)])
            .await
            .unwrap()
    );
    expected.sort_by_key(|c| (c.document_id, c.seq));

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list_user_chunks(user_id, 4, cursor).await.unwrap();
        assert!(page.items.len() <= 4);
        seen.extend(page.items.iter().cloned());
        match page.next {
            Some(next) => {
                let last = seen.last().unwrap();
                assert_eq!(
                    next,
                    ChunkCursor {
                        document_id: last.document_id,
                        seq: last.seq
                    }
                );
                cursor = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(seen, expected);
}

pub async fn unfinished_documents_are_listed_oldest_first(store: Arc<dyn Store>) {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let statuses = [
        (a, 5, DocumentStatus::Processing),
        (b, 1, DocumentStatus::Pending),
        (a, 2, DocumentStatus::Ready),
        (b, 3, DocumentStatus::Failed),
        (a, 4, DocumentStatus::Pending),
    ];
    for (user_id, secs, status) in statuses {
        let doc = Document {
            status,
            ..document(user_id, secs)
        };
        store.create_document(&doc).await.unwrap();
    }
    let unfinished = store.list_unfinished_documents(10).await.unwrap();
    let seen: Vec<(Uuid, DateTime<Utc>, DocumentStatus)> = unfinished
        .iter()
        .map(|d| (d.user_id, d.created_at, d.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            (b, at(1), DocumentStatus::Pending),
            (a, at(4), DocumentStatus::Pending),
            (a, at(5), DocumentStatus::Processing),
        ]
    );
    assert_eq!(store.list_unfinished_documents(2).await.unwrap().len(), 2);
}
