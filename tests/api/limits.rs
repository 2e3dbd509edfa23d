//! Throttling of the public auth routes: failed logins per account, and requests per client IP —
//! in one process, and shared by every node through Redis when it is configured.

use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::json;

use crate::helpers::{PASSWORD, RedisServer, TestApp, assert_error, unique_email};

fn header_u64(headers: &HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("missing `{name}` header: {headers:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("`{name}` is not a whole number of seconds: {e}"))
}

#[tokio::test]
async fn failed_logins_throttle_the_account_even_for_the_right_password() {
    let app = TestApp::builder()
        .env("CHORUS__LIMITS__LOGIN_FAILURES_PER_ACCOUNT_PER_MINUTE", "3")
        .spawn()
        .await;
    let victim = app.register_user().await;
    let bystander = app.register_user().await;

    for attempt in 1..=3 {
        let response = app
            .login_raw(&victim.email, &format!("wrong-guess-{attempt}"))
            .await;
        assert_error(response, 401, "UNAUTHENTICATED").await;
    }
    let response = app.login_raw(&victim.email, PASSWORD).await;
    let headers = response.headers().clone();
    let error = assert_error(response, 429, "RATE_LIMITED").await;
    let retry_after = header_u64(&headers, "retry-after");
    assert!(
        (1..=60).contains(&retry_after),
        "Retry-After {retry_after}: {error}"
    );

    // Case and spacing of the email do not dodge the account limit.
    let response = app
        .login_raw(&format!(" {} ", victim.email.to_uppercase()), PASSWORD)
        .await;
    assert_error(response, 429, "RATE_LIMITED").await;

    // It is per account: another user on the same IP logs in.
    app.login(&bystander.email, PASSWORD).await;
    // Existing sessions of the throttled account keep working.
    app.get_ok("/api/v1/me", victim.token()).await;
}

#[tokio::test]
async fn successful_logins_do_not_count_towards_the_account_limit() {
    let app = TestApp::builder()
        .env("CHORUS__LIMITS__LOGIN_FAILURES_PER_ACCOUNT_PER_MINUTE", "2")
        .spawn()
        .await;
    let user = app.register_user().await;
    for _ in 0..4 {
        app.login(&user.email, PASSWORD).await;
    }
    let response = app.login_raw(&user.email, "wrong-password-1").await;
    assert_error(response, 401, "UNAUTHENTICATED").await;
    app.login(&user.email, PASSWORD).await;
}

#[tokio::test]
async fn the_per_ip_limit_answers_429_with_rate_limit_headers() {
    let app = TestApp::builder()
        .env("CHORUS__LIMITS__AUTH_PER_IP_PER_MINUTE", "3")
        .spawn()
        .await;
    let email = unique_email();

    // 1: register (allowed, and it reports the limit).
    let response = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let headers = response.headers().clone();
    assert_eq!(header_u64(&headers, "x-ratelimit-limit"), 3);
    assert_eq!(header_u64(&headers, "x-ratelimit-remaining"), 2);
    header_u64(&headers, "x-ratelimit-reset");
    let session: serde_json::Value = response.json().await.unwrap();
    let access = session["access_token"].as_str().unwrap().to_owned();

    // 2, 3: logins.
    for remaining in [1, 0] {
        let response = app.login_raw(&email, PASSWORD).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header_u64(response.headers(), "x-ratelimit-remaining"),
            remaining
        );
    }

    // 4: over the limit — even with the right password.
    let response = app.login_raw(&email, PASSWORD).await;
    let headers = response.headers().clone();
    assert_error(response, 429, "RATE_LIMITED").await;
    let retry_after = header_u64(&headers, "retry-after");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(header_u64(&headers, "x-ratelimit-limit"), 3);
    assert_eq!(header_u64(&headers, "x-ratelimit-remaining"), 0);
    let reset = header_u64(&headers, "x-ratelimit-reset");
    assert!((1..=60).contains(&reset), "X-RateLimit-Reset {reset}");

    // Register and refresh share the bucket.
    let response = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": unique_email(), "password": PASSWORD }),
        )
        .await;
    assert_error(response, 429, "RATE_LIMITED").await;
    let response = app
        .refresh_raw(session["refresh_token"].as_str().unwrap())
        .await;
    assert_error(response, 429, "RATE_LIMITED").await;

    // Authenticated routes are not behind the auth limit.
    app.get_ok("/api/v1/me", &access).await;
}

/// Two nodes of one deployment: one store (the SQLite file both open) and one `redis-server`.
async fn two_nodes_sharing_redis(redis: &RedisServer, limits: &[(&str, &str)]) -> [TestApp; 2] {
    let data_dir = Arc::new(tempfile::tempdir().unwrap());
    let node = |name: &str| {
        let mut builder = TestApp::builder()
            .data_dir(data_dir.clone())
            .env("HOSTNAME", name)
            .env("CHORUS__REDIS__URL", &redis.url());
        for (key, value) in limits {
            builder = builder.env(key, value);
        }
        builder.spawn()
    };
    let a = node("node-a").await;
    let b = node("node-b").await;
    [a, b]
}

#[tokio::test]
async fn the_per_ip_limit_holds_across_nodes_sharing_redis() {
    let redis = RedisServer::start();
    let [a, b] =
        two_nodes_sharing_redis(&redis, &[("CHORUS__LIMITS__AUTH_PER_IP_PER_MINUTE", "3")]).await;
    let email = unique_email();

    // 1 on node a, then 2 and 3 alternating: each node alone would still admit more.
    let response = a
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(header_u64(response.headers(), "x-ratelimit-remaining"), 2);
    for (node, remaining) in [(&b, 1), (&a, 0)] {
        let response = node.login_raw(&email, PASSWORD).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header_u64(response.headers(), "x-ratelimit-limit"), 3);
        assert_eq!(
            header_u64(response.headers(), "x-ratelimit-remaining"),
            remaining
        );
    }

    // The limit is spent for this address on every node, right password or not.
    for node in [&b, &a, &b] {
        let response = node.login_raw(&email, PASSWORD).await;
        let headers = response.headers().clone();
        assert_error(response, 429, "RATE_LIMITED").await;
        let retry_after = header_u64(&headers, "retry-after");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        assert_eq!(header_u64(&headers, "x-ratelimit-remaining"), 0);
    }
    let response = a
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": unique_email(), "password": PASSWORD }),
        )
        .await;
    assert_error(response, 429, "RATE_LIMITED").await;
}

#[tokio::test]
async fn failed_logins_of_an_account_count_across_nodes_sharing_redis() {
    let redis = RedisServer::start();
    let [a, b] = two_nodes_sharing_redis(
        &redis,
        &[("CHORUS__LIMITS__LOGIN_FAILURES_PER_ACCOUNT_PER_MINUTE", "2")],
    )
    .await;
    let victim = a.register_user().await;
    let bystander = b.register_user().await;

    // One failure on each node: the account's limit is used up on both.
    assert_error(
        a.login_raw(&victim.email, "wrong-guess-1").await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    assert_error(
        b.login_raw(&victim.email, "wrong-guess-2").await,
        401,
        "UNAUTHENTICATED",
    )
    .await;
    for node in [&a, &b] {
        let response = node.login_raw(&victim.email, PASSWORD).await;
        let headers = response.headers().clone();
        assert_error(response, 429, "RATE_LIMITED").await;
        let retry_after = header_u64(&headers, "retry-after");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    }
    // Successful logins give their token back, on whichever node: they never lock anyone out.
    for _ in 0..3 {
        a.login(&bystander.email, PASSWORD).await;
        b.login(&bystander.email, PASSWORD).await;
    }
}
