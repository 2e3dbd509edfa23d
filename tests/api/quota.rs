//! Per-user quotas end to end: a custom tiers file (`CHORUS__TIERS_FILE`) and the mock models;
//! 429s with their headers, monthly limits, `/me/usage`, the OpenAI-compatible API, and tiers
//! that do not include a model.

use std::sync::Arc;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error, body_json, id_of};

/// Two mock models with a price (so cost shows), open to the tiers `free` and `basic`.
const MODELS: &str = r#"
[providers.mock]
kind = "mock"

[[models]]
id = "mock-echo"
name = "Mock Echo"
provider = "mock"
upstream = "echo"
context_length = 8192
input_per_mtok = 1000.0
output_per_mtok = 2000.0
capabilities = ["chat", "stream"]
tiers = ["free", "basic"]
max_output_tokens = 256

[[models]]
id = "mock-lorem"
name = "Mock Lorem"
provider = "mock"
upstream = "lorem;words=5;delay_ms=1"
context_length = 8192
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream"]
tiers = ["free", "basic"]
max_output_tokens = 256
"#;

/// A tiers file whose default tier `basic` allows `mock-echo` only.
fn tiers_toml(rpm: u32, monthly: &str) -> String {
    format!(
        r#"default_tier = "basic"

[tiers.basic]
name = "Basic"
requests_per_minute = {rpm}
tokens_per_minute = 100000
models = ["mock-echo"]
files_per_request = 2
upload_max_bytes = 1000

[tiers.basic.monthly]
{monthly}

[tiers.free]
name = "Free"
requests_per_minute = 100
tokens_per_minute = 100000
models = ["*"]
files_per_request = 1
upload_max_bytes = 1000
"#
    )
}

async fn app_with(rpm: u32, monthly: &str) -> (TestApp, Arc<tempfile::TempDir>) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path = dir.path().join("tiers.toml");
    std::fs::write(&path, tiers_toml(rpm, monthly)).unwrap();
    let app = TestApp::builder()
        .models_toml(MODELS)
        .env("CHORUS__TIERS_FILE", &path.display().to_string())
        .spawn()
        .await;
    (app, dir)
}

fn header(headers: &HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("missing `{name}`: {headers:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("`{name}` is not a number: {e}"))
}

async fn send(app: &TestApp, token: &str, thread: &str, text: &str) -> reqwest::Response {
    app.post_message(
        token,
        thread,
        &json!({ "content": text, "stream": false, "max_tokens": 32 }),
    )
    .await
}

#[tokio::test]
async fn a_rate_limited_user_gets_through_after_the_retry_after() {
    // 30 a minute: the bucket refills one request every 2 s.
    let (app, _tiers) = app_with(30, "").await;
    let user = app.register_user().await;
    let token = user.token();
    let thread = id_of(
        &app.create_thread(token, &json!({ "model": "mock-echo" }))
            .await,
    );
    let mut sent = 0;
    let refused = loop {
        let response = send(&app, token, &thread, "hi").await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            break response;
        }
        assert_eq!(response.status(), StatusCode::OK);
        sent += 1;
        assert!(sent <= 30, "the bucket holds 30");
    };
    assert_eq!(sent, 30);
    let retry_after = header(refused.headers(), "retry-after");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    tokio::time::sleep(Duration::from_millis(retry_after * 1000 + 200)).await;
    let response = send(&app, token, &thread, "again").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "after Retry-After the request passes"
    );
    assert_eq!(header(response.headers(), "x-ratelimit-remaining"), 0);
}

#[tokio::test]
async fn the_fourth_message_in_a_minute_is_rate_limited_and_stores_nothing() {
    let (app, _tiers) = app_with(3, "").await;
    let user = app.register_user().await;
    let token = user.token();
    // Registration gives the tiers file's default tier.
    let me = app.get_ok("/api/v1/me", token).await;
    assert_eq!(me["user"]["tier"], "basic", "{me}");
    let thread = id_of(
        &app.create_thread(token, &json!({ "model": "mock-echo" }))
            .await,
    );

    for (i, remaining) in [2, 1, 0].into_iter().enumerate() {
        let response = send(&app, token, &thread, &format!("message {i}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers().clone();
        assert_eq!(header(&headers, "x-ratelimit-limit"), 3);
        assert_eq!(header(&headers, "x-ratelimit-remaining"), remaining);
        assert!(header(&headers, "x-ratelimit-reset") <= 60);
        body_json(response).await;
    }
    let stored = app.thread_messages(token, &thread).await.len();
    assert_eq!(stored, 6);

    // Streaming or not, the fourth request is refused before anything is stored.
    let response = app
        .post_message(token, &thread, &json!({ "content": "one too many" }))
        .await;
    let headers = response.headers().clone();
    let error = assert_error(response, 429, "RATE_LIMITED").await;
    let retry_after = header(&headers, "retry-after");
    assert!(
        (1..=20).contains(&retry_after),
        "Retry-After {retry_after}: {error}"
    );
    assert_eq!(header(&headers, "x-ratelimit-limit"), 3);
    assert_eq!(header(&headers, "x-ratelimit-remaining"), 0);
    assert!((retry_after..=60).contains(&header(&headers, "x-ratelimit-reset")));
    assert_eq!(error["details"]["what"], "requests_per_minute", "{error}");
    assert_eq!(app.thread_messages(token, &thread).await.len(), stored);

    // Another user has a bucket of their own.
    let other = app.register_user().await;
    let their_thread = id_of(&app.create_thread(other.token(), &json!({})).await);
    let response = send(&app, other.token(), &their_thread, "hello").await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn monthly_limits_answer_quota_exceeded_and_usage_shows_them() {
    let (app, _tiers) = app_with(100, "chat_messages = 2\nimages = 7").await;
    let user = app.register_user().await;
    let token = user.token();
    let thread = id_of(
        &app.create_thread(token, &json!({ "model": "mock-echo" }))
            .await,
    );
    for text in ["first", "second"] {
        let response = send(&app, token, &thread, text).await;
        assert_eq!(response.status(), StatusCode::OK);
        body_json(response).await;
    }
    let response = send(&app, token, &thread, "third").await;
    let headers = response.headers().clone();
    let error = assert_error(response, 429, "QUOTA_EXCEEDED").await;
    let details = &error["details"];
    assert_eq!(details["what"], "chat_messages", "{error}");
    assert_eq!(details["limit"], 2, "{error}");
    assert_eq!(details["used"], 2, "{error}");
    let now = Utc::now();
    let next_month = if now.month() == 12 {
        Utc.with_ymd_and_hms(now.year() + 1, 1, 1, 0, 0, 0)
    } else {
        Utc.with_ymd_and_hms(now.year(), now.month() + 1, 1, 0, 0, 0)
    }
    .unwrap();
    let resets_at = details["resets_at"].as_str().unwrap();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(resets_at).unwrap(),
        next_month,
        "{error}"
    );
    assert!(header(&headers, "retry-after") >= 1);
    assert_eq!(app.thread_messages(token, &thread).await.len(), 4);

    let usage = app.get_ok("/api/v1/me/usage", token).await;
    assert_eq!(usage["period"], now.format("%Y-%m").to_string(), "{usage}");
    assert_eq!(usage["tier"], "basic", "{usage}");
    let limits = &usage["limits"];
    assert_eq!(limits["chat_messages"], 2, "{usage}");
    assert_eq!(limits["images"], 7, "{usage}");
    assert_eq!(limits["tokens"], Value::Null, "unlimited: {usage}");
    assert_eq!(limits["requests_per_minute"], 100, "{usage}");
    assert_eq!(limits["tokens_per_minute"], 100000, "{usage}");
    assert_eq!(limits["files_per_request"], 2, "{usage}");
    assert_eq!(limits["upload_max_bytes"], 1000, "{usage}");
    let used = &usage["used"];
    assert_eq!(used["chat_messages"], 2, "{usage}");
    assert!(used["tokens"].as_i64().unwrap() > 0, "{usage}");
    assert_eq!(used["images"], 0, "{usage}");
    assert!(
        usage["cost_usd"].as_f64().unwrap() > 0.0,
        "priced model: {usage}"
    );
    assert_eq!(usage["resets_at"], resets_at, "{usage}");
}

#[tokio::test]
async fn a_model_outside_the_tier_is_forbidden_on_both_apis() {
    let (app, _tiers) = app_with(100, "").await;
    let user = app.register_user().await;
    let token = user.token();
    let thread = id_of(&app.create_thread(token, &json!({})).await);
    let response = app
        .post_message(
            token,
            &thread,
            &json!({ "content": "hi", "models": ["mock-echo", "mock-lorem"] }),
        )
        .await;
    let error = assert_error(response, 403, "FORBIDDEN").await;
    assert!(
        error["message"].as_str().unwrap().contains("mock-lorem"),
        "{error}"
    );
    assert!(app.thread_messages(token, &thread).await.is_empty());

    let (_, key) = app.create_api_key(token, "sdk").await;
    let response = app
        .post_json(
            "/v1/chat/completions",
            Some(&key),
            &json!({ "model": "mock-lorem", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await;
    assert_eq!(response.status(), 403);
    let body = body_json(response).await;
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    let usage = app.get_ok("/api/v1/me/usage", token).await;
    assert_eq!(usage["used"]["chat_messages"], 0, "{usage}");
}

#[tokio::test]
async fn openai_compatible_requests_are_counted_and_limited() {
    let (app, _tiers) = app_with(2, "tokens = 1000000").await;
    let user = app.register_user().await;
    let (_, key) = app.create_api_key(user.token(), "sdk").await;
    let body = json!({ "model": "mock-echo", "messages": [{ "role": "user", "content": "count these words please" }] });

    let response = app
        .post_json("/v1/chat/completions", Some(&key), &body)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "x-ratelimit-limit"), 2);
    assert_eq!(header(response.headers(), "x-ratelimit-remaining"), 1);
    let completion = body_json(response).await;
    let total = completion["usage"]["total_tokens"].as_u64().unwrap();
    assert!(total > 0, "{completion}");

    // Streamed, read to the end.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = app
        .post_json("/v1/chat/completions", Some(&key), &streamed)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "x-ratelimit-remaining"), 0);
    let text = response.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");

    let response = app
        .post_json("/v1/chat/completions", Some(&key), &body)
        .await;
    assert_eq!(response.status(), 429);
    let headers = response.headers().clone();
    assert!(header(&headers, "retry-after") >= 1);
    assert_eq!(header(&headers, "x-ratelimit-limit"), 2);
    assert_eq!(header(&headers, "x-ratelimit-remaining"), 0);
    let error = body_json(response).await;
    assert_eq!(error["error"]["type"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");

    // Both answered requests are in the month's usage (settled off the request path).
    let mut usage = Value::Null;
    for _ in 0..100 {
        usage = app.get_ok("/api/v1/me/usage", user.token()).await;
        if usage["used"]["chat_messages"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(usage["used"]["chat_messages"], 2, "{usage}");
    assert!(
        usage["used"]["tokens"].as_u64().unwrap() >= 2 * total,
        "{usage}"
    );
    assert!(usage["cost_usd"].as_f64().unwrap() > 0.0, "{usage}");
}

#[tokio::test]
async fn an_exhausted_monthly_quota_is_insufficient_quota_on_v1() {
    let (app, _tiers) = app_with(100, "chat_messages = 1").await;
    let user = app.register_user().await;
    let (_, key) = app.create_api_key(user.token(), "sdk").await;
    let body = json!({ "model": "mock-echo", "messages": [{ "role": "user", "content": "hi" }] });
    let response = app
        .post_json("/v1/chat/completions", Some(&key), &body)
        .await;
    assert_eq!(response.status(), 200);
    body_json(response).await;
    // The settlement is a message to the session, handled before the next admission.
    let response = app
        .post_json("/v1/chat/completions", Some(&key), &body)
        .await;
    assert_eq!(response.status(), 429);
    let error = body_json(response).await;
    assert_eq!(error["error"]["type"], "insufficient_quota", "{error}");
    assert_eq!(error["error"]["code"], "insufficient_quota", "{error}");
}
