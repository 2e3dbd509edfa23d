//! What every response shares: `X-Request-Id` (minted or echoed), the 404 for unknown routes,
//! CORS, and the health endpoints.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{TestApp, assert_error, body_json, request_id};

#[tokio::test]
async fn healthz_and_readyz_answer_200_while_running() {
    let app = TestApp::spawn().await;
    let response = app.get_anon("/healthz").await;
    assert_eq!(response.status(), StatusCode::OK);
    request_id(response.headers());
    let body = body_json(response).await;
    assert_eq!(body["status"], "ok");

    let response = app.get_anon("/readyz").await;
    assert_eq!(response.status(), StatusCode::OK);
    request_id(response.headers());
    let body = body_json(response).await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["checks"]["store"], "ok", "{body}");
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_each_is_different() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token().to_owned();
    let mut ids = HashSet::new();

    let responses = vec![
        app.get_anon("/healthz").await,
        app.get_anon("/readyz").await,
        app.get("/api/v1/me", &token).await,
        app.post_json("/api/v1/threads", Some(&token), &json!({ "title": "t" }))
            .await,
        app.get_anon("/api/v1/me").await,
        app.get("/api/v1/threads?limit=0", &token).await,
        app.get_anon("/no/such/route").await,
        app.request(Method::PUT, "/api/v1/threads")
            .send()
            .await
            .unwrap(),
        app.post_json(
            "/api/v1/auth/logout",
            None,
            &json!({ "refresh_token": "x" }),
        )
        .await,
    ];
    for response in responses {
        let status = response.status();
        let id = request_id(response.headers());
        assert!(!id.is_empty(), "{status}");
        assert!(ids.insert(id.clone()), "request id {id} was reused");
    }
}

#[tokio::test]
async fn unknown_routes_are_404_in_the_envelope() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    for (method, path) in [
        (Method::GET, "/"),
        (Method::GET, "/api/v1/nope"),
        (Method::GET, "/api/v2/threads"),
        (Method::POST, "/healthz"),
        (Method::DELETE, "/api/v1/threads"),
        (Method::GET, "/api/v1/threads/a/b/c"),
    ] {
        let response = app
            .request(method.clone(), path)
            .bearer_auth(session.token())
            .send()
            .await
            .unwrap();
        assert_error(response, 404, "NOT_FOUND").await;
    }
}

#[tokio::test]
async fn a_client_request_id_is_echoed_on_success_and_error() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;

    let response = app
        .request(Method::GET, "/api/v1/me")
        .bearer_auth(session.token())
        .header("x-request-id", "client-req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(request_id(response.headers()), "client-req-123");

    let response = app
        .request(Method::GET, "/api/v1/threads/not-a-thread")
        .bearer_auth(session.token())
        .header("x-request-id", "trace.abc:42_x")
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(response.headers()), "trace.abc:42_x");
    let error = assert_error(response, 404, "NOT_FOUND").await;
    assert_eq!(error["request_id"], "trace.abc:42_x");

    let response = app
        .request(Method::GET, "/no/such/route")
        .header("x-request-id", "unknown-route-id")
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(response.headers()), "unknown-route-id");
    assert_error(response, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn unusable_client_request_ids_are_replaced() {
    let app = TestApp::spawn().await;
    let too_long = "a".repeat(129);
    for sent in [
        "has spaces in it",
        "<script>",
        too_long.as_str(),
        "semi;colon",
    ] {
        let response = app
            .request(Method::GET, "/healthz")
            .header("x-request-id", sent)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let got = request_id(response.headers());
        assert_ne!(got, sent, "an unsafe id was echoed");
        assert!(!got.is_empty() && got.len() <= 128, "{got}");
        assert!(
            got.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)),
            "{got}"
        );
    }
    // An empty header is replaced as well.
    let response = app
        .request(Method::GET, "/healthz")
        .header("x-request-id", "")
        .send()
        .await
        .unwrap();
    assert!(!request_id(response.headers()).is_empty());
    // The longest acceptable id is echoed.
    let max = "b".repeat(128);
    let response = app
        .request(Method::GET, "/healthz")
        .header("x-request-id", max.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(response.headers()), max);
}

const ORIGIN: &str = "https://app.example";

async fn cors_app() -> TestApp {
    TestApp::builder()
        .env("CHORUS__SERVER__CORS_ORIGINS", ORIGIN)
        .spawn()
        .await
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn cors_preflight_from_an_allowed_origin_gets_the_allow_headers() {
    let app = cors_app().await;
    let response = app
        .request(Method::OPTIONS, "/api/v1/threads")
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some(ORIGIN)
    );
    let methods = header(&response, "access-control-allow-methods")
        .unwrap_or_default()
        .to_ascii_uppercase();
    for method in ["GET", "POST", "PATCH", "DELETE"] {
        assert!(
            methods.contains(method),
            "allow-methods `{methods}` lacks {method}"
        );
    }
    let headers = header(&response, "access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for name in ["authorization", "content-type"] {
        assert!(
            headers.contains(name),
            "allow-headers `{headers}` lacks {name}"
        );
    }
}

#[tokio::test]
async fn cors_requests_from_an_allowed_origin_get_allow_origin_and_exposed_headers() {
    let app = cors_app().await;
    let session = app.register_user().await;
    let response = app
        .request(Method::GET, "/api/v1/me")
        .bearer_auth(session.token())
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some(ORIGIN)
    );
    let exposed = header(&response, "access-control-expose-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("x-request-id"),
        "expose-headers `{exposed}`"
    );
    request_id(response.headers());

    // Errors carry the CORS headers too, so a browser app can read them.
    let response = app
        .request(Method::GET, "/api/v1/me")
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some(ORIGIN)
    );
    assert_error(response, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn cors_other_origins_get_no_allow_origin() {
    let app = cors_app().await;
    let response = app
        .request(Method::OPTIONS, "/api/v1/threads")
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        header(&response, "access-control-allow-origin").is_none(),
        "preflight from another origin was allowed"
    );
    request_id(response.headers());

    let response = app
        .request(Method::GET, "/healthz")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(header(&response, "access-control-allow-origin").is_none());
    request_id(response.headers());

    // Lookalike origins are not the allowed one.
    for origin in ["http://app.example", "https://app.example.evil.com"] {
        let response = app
            .request(Method::GET, "/healthz")
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert!(
            header(&response, "access-control-allow-origin").is_none(),
            "{origin}"
        );
    }
}

#[tokio::test]
async fn without_cors_configured_no_allow_origin_is_sent() {
    let app = TestApp::spawn().await;
    let response = app
        .request(Method::GET, "/healthz")
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "access-control-allow-origin").is_none());
}

#[tokio::test]
async fn openai_completions_from_a_browser_origin_get_cors_headers_and_others_do_not() {
    // `POST /v1/chat/completions` without an `Origin` is served by the edge's direct route;
    // with one it goes through the filters, where CORS applies. Both answer the same way.
    let app = cors_app().await;
    let session = app.register_user().await;
    let body =
        json!({"model": "mock-echo", "messages": [{"role": "user", "content": "ping pong"}]});
    for origin in [Some(ORIGIN), None] {
        let mut request = app
            .request(Method::POST, "/v1/chat/completions")
            .bearer_auth(session.token())
            .json(&body);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "origin {origin:?}");
        assert_eq!(header(&response, "access-control-allow-origin"), origin);
        request_id(response.headers());
        let answer = body_json(response).await;
        assert_eq!(answer["object"], "chat.completion", "{answer}");
        assert!(
            answer["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|text| text.contains("ping pong")),
            "{answer}"
        );
    }

    // A refused request on the direct route still carries the request id, in OpenAI's shape.
    let response = app
        .request(Method::POST, "/v1/chat/completions")
        .bearer_auth(session.token())
        .header("content-type", "application/json")
        .header("x-request-id", "direct-route-check")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(request_id(response.headers()), "direct-route-check");
    let answer = body_json(response).await;
    assert!(answer["error"]["message"].is_string(), "{answer}");
}

#[tokio::test]
async fn a_client_that_stalls_in_its_request_head_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::builder()
        .env("CHORUS__SERVER__HEADER_READ_TIMEOUT_SECS", "1")
        .spawn()
        .await;
    // The request line and one header, then nothing: the head never ends.
    let mut stalled = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stalled.read_to_end(&mut answer),
    )
    .await
    .expect("the stalled connection was left open");
    // Closed (or reset) without an answer to the unfinished request.
    assert!(
        closed.is_err() || !String::from_utf8_lossy(&answer).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Whole requests are still served.
    let mut stream = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
