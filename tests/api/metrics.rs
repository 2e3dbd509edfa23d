//! `GET /metrics`: Prometheus text with the request counters, optional basic auth.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{TestApp, assert_error};

/// The value of the sample line that starts with `series` (`name{labels}`), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

async fn scrape(app: &TestApp) -> String {
    let response = app.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_not_raw_path() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    for _ in 0..3 {
        app.get_ok("/healthz", user.token()).await;
    }
    let thread = app
        .create_thread(user.token(), &json!({ "title": "t" }))
        .await;
    let id = thread["id"].as_str().unwrap();
    app.get_ok(&format!("/api/v1/threads/{id}"), user.token())
        .await;
    let missing = uuid::Uuid::now_v7();
    let response = app
        .get(&format!("/api/v1/threads/{missing}"), user.token())
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = app.get("/no/such/route", user.token()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let text = scrape(&app).await;
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="/healthz",status="200"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="POST",route="/api/v1/auth/register",status="201"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="/api/v1/threads/{id}",status="200"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="/api/v1/threads/{id}",status="404"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="unmatched",status="404"}"#
        ),
        Some(1.0),
        "{text}"
    );
    // Ids never become labels.
    assert!(!text.contains(id), "a thread id leaked into the labels");
    assert!(!text.contains(&missing.to_string()));
    assert!(
        sample(
            &text,
            r#"http_request_duration_seconds_count{route="/healthz"}"#
        ) == Some(3.0),
        "{text}"
    );
    assert!(
        text.contains(r#"http_request_duration_seconds_bucket{route="/healthz",le="0.005"}"#),
        "{text}"
    );
    // The user's session is live after creating a thread.
    assert!(
        sample(&text, "sessions_live").is_some_and(|v| v >= 1.0),
        "{text}"
    );
    // Process metrics (Linux).
    for family in ["process_resident_memory_bytes", "process_cpu_seconds_total"] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }

    // The scrape itself is counted (seen by the next one).
    let text = scrape(&app).await;
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="/metrics",status="200"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_honour_basic_auth_when_configured() {
    let app = TestApp::builder()
        .env("CHORUS__METRICS__BASIC_AUTH_USER", "prometheus")
        .env("CHORUS__METRICS__BASIC_AUTH_PASSWORD", "scrape-secret-123")
        .spawn()
        .await;

    let response = app.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(
        response.headers()["www-authenticate"].to_str().unwrap(),
        "Basic realm=\"metrics\", charset=\"UTF-8\""
    );
    assert_error(response, 401, "UNAUTHENTICATED").await;
    for (user, password) in [
        ("prometheus", "wrong"),
        ("someone", "scrape-secret-123"),
        ("prometheus", ""),
        ("prometheus", "scrape-secret-1234"),
    ] {
        let response = app
            .request(Method::GET, "/metrics")
            .basic_auth(user, Some(password))
            .send()
            .await
            .unwrap();
        assert_error(response, 401, "UNAUTHENTICATED").await;
    }
    let response = app
        .request(Method::GET, "/metrics")
        .bearer_auth("scrape-secret-123")
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "UNAUTHENTICATED").await;

    let response = app
        .request(Method::GET, "/metrics")
        .basic_auth("prometheus", Some("scrape-secret-123"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="/metrics",status="401"}"#
        )
        .is_some_and(|v| v >= 6.0),
        "{text}"
    );
}
