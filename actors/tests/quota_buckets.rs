//! One suite for both token-bucket backends: in-process `LocalBuckets`, and `RedisBuckets`
//! against a real `redis-server` started on a free port — including two nodes sharing one
//! Redis, and Redis dying and coming back under load.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_actors::quota::{BackendHealth, BucketSpec, LocalBuckets, RedisBuckets, TokenBuckets};
use common::redis_server::RedisServer;
use futures_util::future::join_all;
use uuid::Uuid;

/// A bucket of `capacity` that refills so slowly it never refills during a test.
fn frozen(capacity: u64) -> BucketSpec {
    BucketSpec {
        capacity,
        refill_per_sec: 1e-6,
    }
}

fn key() -> String {
    format!("test-{}", Uuid::new_v4().simple())
}

async fn redis_buckets(server: &RedisServer, fallback_share: f64) -> RedisBuckets {
    let buckets = RedisBuckets::connect(
        &server.url(),
        "chorus-test",
        Duration::from_millis(200),
        fallback_share,
    )
    .await;
    assert_eq!(buckets.health(), BackendHealth::Healthy);
    buckets
}

/// How many of `n` concurrent takes of 1 the buckets admit.
async fn admitted(
    buckets: &[Arc<dyn TokenBuckets>],
    key: &str,
    spec: BucketSpec,
    n: usize,
) -> usize {
    let takes = (0..n).map(|i| {
        let buckets = buckets[i % buckets.len()].clone();
        let key = key.to_owned();
        tokio::spawn(async move { buckets.try_take(&key, spec, 1).await })
    });
    join_all(takes)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .filter(|a| a.allowed)
        .count()
}

async fn concurrent_takes_admit_exactly_the_capacity(buckets: Arc<dyn TokenBuckets>) {
    let key = key();
    let n = admitted(std::slice::from_ref(&buckets), &key, frozen(10), 100).await;
    assert_eq!(n, 10, "{}: 100 takes on a bucket of 10", buckets.backend());
    let refused = buckets.try_take(&key, frozen(10), 1).await;
    assert!(!refused.allowed);
    assert_eq!(refused.limit, 10);
    assert_eq!(refused.remaining, 0);
    assert!(refused.retry_after > Duration::from_secs(3600));
}

async fn takes_are_all_or_nothing_and_settle_both_ways(buckets: Arc<dyn TokenBuckets>) {
    let backend = buckets.backend();
    let key = key();
    let spec = frozen(10);
    let took = buckets.try_take(&key, spec, 6).await;
    assert!(took.allowed, "{backend}");
    assert_eq!(took.remaining, 4, "{backend}");
    assert_eq!(took.retry_after, Duration::ZERO, "{backend}");
    // More than is left: refused, and nothing taken.
    let refused = buckets.try_take(&key, spec, 5).await;
    assert!(!refused.allowed, "{backend}");
    assert_eq!(refused.remaining, 4, "{backend}");
    assert_eq!(buckets.peek(&key, spec).await.remaining, 4, "{backend}");

    // Settling a reservation that used more than it took goes below zero…
    buckets.adjust(&key, spec, 7).await;
    let peek = buckets.peek(&key, spec).await;
    assert_eq!(peek.remaining, 0, "{backend}");
    assert!(!peek.allowed, "{backend}");
    assert!(!buckets.try_take(&key, spec, 1).await.allowed, "{backend}");
    // …and giving back repays the debt first (-3 + 5 = 2).
    buckets.adjust(&key, spec, -5).await;
    assert_eq!(buckets.peek(&key, spec).await.remaining, 2, "{backend}");
    // Giving back never fills past the capacity.
    buckets.adjust(&key, spec, -1000).await;
    let full = buckets.peek(&key, spec).await;
    assert_eq!(full.remaining, 10, "{backend}");
    assert!(
        full.reset_after < Duration::from_millis(1),
        "{backend}: {full:?}"
    );
    assert!(buckets.try_take(&key, spec, 10).await.allowed, "{backend}");
}

async fn buckets_refill_with_time(buckets: Arc<dyn TokenBuckets>) {
    let backend = buckets.backend();
    let key = key();
    // 5 tokens, 20 per second.
    let spec = BucketSpec {
        capacity: 5,
        refill_per_sec: 20.0,
    };
    assert!(buckets.try_take(&key, spec, 5).await.allowed, "{backend}");
    let refused = buckets.try_take(&key, spec, 1).await;
    assert!(!refused.allowed, "{backend}");
    assert!(
        refused.retry_after <= Duration::from_millis(50),
        "{backend}: {refused:?}"
    );
    assert!(
        refused.reset_after <= Duration::from_millis(250),
        "{backend}: {refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    let after = buckets.try_take(&key, spec, 2).await;
    assert!(
        after.allowed,
        "{backend}: 2 tokens after 120 ms at 20/s: {after:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Refilled to the capacity, not beyond.
    assert_eq!(buckets.peek(&key, spec).await.remaining, 5, "{backend}");
    assert!(!buckets.try_take(&key, spec, 6).await.allowed, "{backend}");
}

async fn suite(buckets: Arc<dyn TokenBuckets>) {
    assert_eq!(buckets.health(), BackendHealth::Healthy);
    concurrent_takes_admit_exactly_the_capacity(buckets.clone()).await;
    takes_are_all_or_nothing_and_settle_both_ways(buckets.clone()).await;
    buckets_refill_with_time(buckets.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_buckets_pass_the_suite() {
    let buckets: Arc<dyn TokenBuckets> = Arc::new(LocalBuckets::new());
    assert_eq!(buckets.backend(), "local");
    suite(buckets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_buckets_pass_the_suite() {
    let server = RedisServer::start();
    let buckets: Arc<dyn TokenBuckets> = Arc::new(redis_buckets(&server, 0.5).await);
    assert_eq!(buckets.backend(), "redis");
    suite(buckets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_sharing_one_redis_admit_the_capacity_together() {
    let server = RedisServer::start();
    let node_a: Arc<dyn TokenBuckets> = Arc::new(redis_buckets(&server, 0.5).await);
    let node_b: Arc<dyn TokenBuckets> = Arc::new(redis_buckets(&server, 0.5).await);
    let key = key();
    let n = admitted(&[node_a.clone(), node_b.clone()], &key, frozen(10), 100).await;
    assert_eq!(n, 10, "two nodes, one shared bucket of 10");
    // Each node sees the other's takes.
    assert_eq!(node_a.peek(&key, frozen(10)).await.remaining, 0);
    node_b.adjust(&key, frozen(10), -3).await;
    assert_eq!(node_a.peek(&key, frozen(10)).await.remaining, 3);
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what} did not happen within 10s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_redis_degrades_to_the_local_share_and_recovers() {
    let mut server = RedisServer::start();
    let buckets: Arc<dyn TokenBuckets> = Arc::new(redis_buckets(&server, 0.5).await);
    let spec = frozen(10);
    let shared = key();
    assert!(buckets.try_take(&shared, spec, 8).await.allowed);

    server.kill();
    // Still answered — by this node's share (half of 10) — and never blocked for long.
    let started = Instant::now();
    let local = key();
    let n = admitted(std::slice::from_ref(&buckets), &local, spec, 20).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "degraded answers took {:?}",
        started.elapsed()
    );
    assert_eq!(
        n, 5,
        "the local share of a limit of 10 at fallback_share 0.5"
    );
    match buckets.health() {
        BackendHealth::Degraded { reason } => assert!(!reason.is_empty()),
        BackendHealth::Healthy => panic!("Redis is down but the backend reports healthy"),
    }
    let refused = buckets.try_take(&local, spec, 1).await;
    assert!(!refused.allowed);
    assert_eq!(refused.limit, 5, "{refused:?}");

    server.restart();
    eventually("recovery to Healthy", || {
        buckets.health() == BackendHealth::Healthy
    })
    .await;
    // Back on Redis: the restarted (empty) Redis holds a full bucket of the whole limit.
    let n = admitted(std::slice::from_ref(&buckets), &local, spec, 20).await;
    assert_eq!(n, 10, "answered by Redis again, with the whole limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_at_start_is_degraded_not_an_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let buckets = RedisBuckets::connect(
        &format!("redis://127.0.0.1:{port}"),
        "chorus-test",
        Duration::from_millis(100),
        0.2,
    )
    .await;
    assert!(matches!(buckets.health(), BackendHealth::Degraded { .. }));
    let key = key();
    let spec = frozen(10);
    let mut allowed = 0;
    for _ in 0..10 {
        if buckets.try_take(&key, spec, 1).await.allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 2, "20% of 10 while Redis is unreachable");
}
