//! The behaviour switches, in every dialect where they differ.

use std::time::{Duration, Instant};

use chorus_mock_upstream::{MockConfig, MockUpstream};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::{
    anthropic, anthropic_body, client, eventually, gemini, gemini_body, openai, openai_body,
    parse_sse, read_body, start,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dialect {
    OpenAi,
    Anthropic,
    Gemini,
}

const DIALECTS: [Dialect; 3] = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Gemini];

async fn send(
    mock: &MockUpstream,
    dialect: Dialect,
    model: &str,
    text: &str,
    stream: bool,
) -> reqwest::Response {
    match dialect {
        Dialect::OpenAi => openai(mock, openai_body(model, text, stream)).await,
        Dialect::Anthropic => anthropic(mock, anthropic_body(model, text, stream)).await,
        Dialect::Gemini => {
            let action = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            gemini(mock, model, action, gemini_body(text)).await
        }
    }
}

/// (error type/status string, message) of an error body in the dialect's shape, checking the
/// shape on the way.
fn error_of(dialect: Dialect, status: u16, body: &Value) -> (String, String) {
    match dialect {
        Dialect::OpenAi => {
            let error = &body["error"];
            assert!(
                error.get("param").is_some() && error.get("code").is_some(),
                "{body}"
            );
            (
                error["type"].as_str().unwrap().to_owned(),
                error["message"].as_str().unwrap().to_owned(),
            )
        }
        Dialect::Anthropic => {
            assert_eq!(body["type"], "error", "{body}");
            (
                body["error"]["type"].as_str().unwrap().to_owned(),
                body["error"]["message"].as_str().unwrap().to_owned(),
            )
        }
        Dialect::Gemini => {
            assert_eq!(body["error"]["code"], status, "{body}");
            (
                body["error"]["status"].as_str().unwrap().to_owned(),
                body["error"]["message"].as_str().unwrap().to_owned(),
            )
        }
    }
}

#[tokio::test]
async fn error_switch_answers_each_status_in_each_shape() {
    let mock = start().await;
    let expected: [(&str, u16, [&str; 3]); 7] = [
        (
            "400",
            400,
            [
                "invalid_request_error",
                "invalid_request_error",
                "INVALID_ARGUMENT",
            ],
        ),
        (
            "401",
            401,
            [
                "invalid_request_error",
                "authentication_error",
                "UNAUTHENTICATED",
            ],
        ),
        (
            "429",
            429,
            ["requests", "rate_limit_error", "RESOURCE_EXHAUSTED"],
        ),
        ("500", 500, ["server_error", "api_error", "INTERNAL"]),
        ("503", 503, ["server_error", "api_error", "UNAVAILABLE"]),
        (
            "529",
            529,
            ["server_error", "overloaded_error", "UNAVAILABLE"],
        ),
        (
            "context",
            400,
            [
                "invalid_request_error",
                "invalid_request_error",
                "INVALID_ARGUMENT",
            ],
        ),
    ];
    for (error, status, kinds) in expected {
        for (dialect, kind) in DIALECTS.into_iter().zip(kinds) {
            for stream in [false, true] {
                let model = format!("m;error={error};retry_after=7");
                let response = send(&mock, dialect, &model, "a b c", stream).await;
                assert_eq!(response.status(), status, "{dialect:?} {error}");
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                if matches!(status, 429 | 503 | 529) {
                    assert_eq!(retry_after.as_deref(), Some("7"), "{dialect:?} {error}");
                } else {
                    assert_eq!(retry_after, None, "{dialect:?} {error}");
                }
                let body: Value = response.json().await.unwrap();
                let (actual_kind, message) = error_of(dialect, status, &body);
                assert_eq!(actual_kind, kind, "{dialect:?} {error}: {body}");
                if error == "context" {
                    match dialect {
                        Dialect::OpenAi => {
                            assert_eq!(body["error"]["code"], "context_length_exceeded");
                            assert_eq!(body["error"]["param"], "messages");
                            assert!(message.starts_with("This model's maximum context length is 128000 tokens. However, your messages resulted in 128003 tokens."), "{message}");
                        }
                        Dialect::Anthropic => {
                            assert_eq!(
                                message,
                                "prompt is too long: 200003 tokens > 200000 maximum"
                            );
                        }
                        Dialect::Gemini => assert_eq!(
                            message,
                            "The input token count (1048579) exceeds the maximum number of tokens allowed (1048576)."
                        ),
                    }
                }
                if dialect == Dialect::OpenAi && error == "429" {
                    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
                }
                if dialect == Dialect::Anthropic && error == "529" {
                    assert_eq!(message, "Overloaded");
                }
                if dialect == Dialect::Gemini && error == "429" {
                    assert_eq!(body["error"]["details"][0]["retryDelay"], "7s");
                }
            }
        }
    }
}

#[tokio::test]
async fn cut_after_ends_the_stream_early_without_terminal_marker() {
    let mock = start().await;
    for dialect in DIALECTS {
        let response = send(&mock, dialect, "m;cut_after=2", "one two three four", true).await;
        assert_eq!(response.status(), 200);
        let body = read_body(response).await;
        assert!(!body.clean, "{dialect:?}: the body must end abruptly");
        let events = parse_sse(&body.text);
        match dialect {
            Dialect::OpenAi => {
                assert_eq!(events.len(), 3, "{events:?}");
                assert!(!body.text.contains("[DONE]"));
                assert_eq!(events[1].json()["choices"][0]["delta"]["content"], "one ");
                assert_eq!(events[2].json()["choices"][0]["delta"]["content"], "two ");
                assert!(
                    events
                        .iter()
                        .all(|e| e.json()["choices"][0]["finish_reason"].is_null())
                );
            }
            Dialect::Anthropic => {
                let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
                assert_eq!(
                    names,
                    [
                        "message_start",
                        "content_block_start",
                        "ping",
                        "content_block_delta",
                        "content_block_delta"
                    ]
                );
            }
            Dialect::Gemini => {
                assert_eq!(events.len(), 2);
                assert!(
                    events
                        .iter()
                        .all(|e| e.json()["candidates"][0].get("finishReason").is_none())
                );
            }
        }
    }
    // Non-streaming: half a JSON body, then the cut.
    let response = send(&mock, Dialect::OpenAi, "m;cut_after=1", "a b", false).await;
    assert_eq!(response.status(), 200);
    let body = read_body(response).await;
    assert!(!body.clean);
    assert!(serde_json::from_str::<Value>(&body.text).is_err());
}

#[tokio::test]
async fn error_after_emits_the_mid_stream_error() {
    let mock = start().await;

    let body = read_body(
        send(
            &mock,
            Dialect::OpenAi,
            "m;error_after=2",
            "one two three",
            true,
        )
        .await,
    )
    .await;
    assert!(body.clean);
    assert!(!body.text.contains("[DONE]"));
    let events = parse_sse(&body.text);
    assert_eq!(events.len(), 4);
    let error = events[3].json();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error["error"]["message"].is_string());

    let body = read_body(
        send(
            &mock,
            Dialect::Anthropic,
            "m;error_after=1",
            "one two three",
            true,
        )
        .await,
    )
    .await;
    assert!(body.clean);
    let events = parse_sse(&body.text);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        events[4].json(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    let body = read_body(
        send(
            &mock,
            Dialect::Anthropic,
            "m;error_after=0;error=429",
            "x",
            true,
        )
        .await,
    )
    .await;
    let events = parse_sse(&body.text);
    assert_eq!(
        events.last().unwrap().json()["error"]["type"],
        "rate_limit_error"
    );

    // Gemini has no mid-stream error event: the stream is cut.
    let body =
        read_body(send(&mock, Dialect::Gemini, "m;error_after=1", "one two", true).await).await;
    assert!(!body.clean);
    assert_eq!(parse_sse(&body.text).len(), 1);

    // Without a stream, error_after is an upfront error.
    let response = send(&mock, Dialect::OpenAi, "m;error_after=1", "one two", false).await;
    assert_eq!(response.status(), 500);
    let response = send(
        &mock,
        Dialect::Anthropic,
        "m;error_after=1",
        "one two",
        false,
    )
    .await;
    assert_eq!(response.status(), 529);
}

#[tokio::test]
async fn hang_never_answers_until_the_client_gives_up() {
    let mock = start().await;
    for (dialect, stream) in [
        (Dialect::OpenAi, false),
        (Dialect::Anthropic, true),
        (Dialect::Gemini, true),
    ] {
        let request = match dialect {
            Dialect::OpenAi => client()
                .post(format!("{}/v1/chat/completions", mock.base_url()))
                .bearer_auth("k")
                .json(&openai_body("m;hang=1", "x", stream)),
            Dialect::Anthropic => client()
                .post(format!("{}/v1/messages", mock.base_url()))
                .header("x-api-key", "k")
                .header("anthropic-version", "2023-06-01")
                .json(&anthropic_body("m;hang=1", "x", stream)),
            Dialect::Gemini => client()
                .post(format!(
                    "{}/v1beta/models/m;hang=1:streamGenerateContent?alt=sse",
                    mock.base_url()
                ))
                .header("x-goog-api-key", "k")
                .json(&gemini_body("x")),
        };
        let error = request
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .unwrap_err();
        assert!(error.is_timeout(), "{dialect:?}: {error}");
        // The held request is released once the client hangs up.
        eventually(|| mock.active_hangs() == 0).await;
    }
}

#[tokio::test]
async fn hang_is_capped_and_released_by_shutdown() {
    let mock = MockUpstream::start_with(MockConfig {
        hang_timeout: Duration::from_millis(200),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let response = send(&mock, Dialect::OpenAi, "m;hang=1", "x", false).await;
    assert_eq!(response.status(), 504);

    let mock = start().await;
    let url = format!("{}/v1/chat/completions", mock.base_url());
    let pending = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth("k")
            .json(&openai_body("m;hang=1", "x", false))
            .send()
            .await
            .map(|response| response.status().as_u16())
    });
    eventually(|| mock.active_hangs() == 1).await;
    mock.shutdown().await;
    assert_eq!(pending.await.unwrap().unwrap(), 504);
}

#[tokio::test]
async fn fail_first_fails_then_succeeds_per_model_string() {
    let mock = start().await;
    let statuses = async |model: &str, n: usize| {
        let mut statuses = Vec::new();
        for _ in 0..n {
            statuses.push(
                send(&mock, Dialect::OpenAi, model, "x", false)
                    .await
                    .status()
                    .as_u16(),
            );
        }
        statuses
    };
    assert_eq!(statuses("a;fail_first=2", 4).await, [503, 503, 200, 200]);
    assert_eq!(
        statuses("b;fail_first=1;error=429", 3).await,
        [429, 200, 200]
    );
    // A different model string counts separately.
    assert_eq!(
        statuses("a;fail_first=2;tokens=1", 3).await,
        [503, 503, 200]
    );

    // Failure switches other than `error` are gated too.
    let first = read_body(
        send(
            &mock,
            Dialect::Anthropic,
            "c;fail_first=1;cut_after=1",
            "x y",
            true,
        )
        .await,
    )
    .await;
    assert!(!first.clean);
    let second = read_body(
        send(
            &mock,
            Dialect::Anthropic,
            "c;fail_first=1;cut_after=1",
            "x y",
            true,
        )
        .await,
    )
    .await;
    assert!(second.clean);
    assert!(second.text.contains("message_stop"));

    mock.reset_fail_counts();
    assert_eq!(statuses("a;fail_first=2", 1).await, [503]);
}

#[tokio::test]
async fn fail_every_fails_each_nth_request_per_model_string() {
    let mock = start().await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            send(
                &mock,
                Dialect::OpenAi,
                "a;fail_every=2;error=500",
                "x",
                false,
            )
            .await
            .status()
            .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 500, 200, 500, 200, 500]);
    // Without a failure switch it is a 503, like fail_first; another model string counts alone.
    let other = send(&mock, Dialect::OpenAi, "a;fail_every=1", "x", false).await;
    assert_eq!(other.status().as_u16(), 503);
}

#[tokio::test]
async fn ttft_and_delay_hold_the_answer_back() {
    let mock = start().await;
    let started = Instant::now();
    let response = send(&mock, Dialect::OpenAi, "m;ttft_ms=300", "x", false).await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Streaming: headers and the preamble come at once, the first token after ttft, then one
    // token per delay.
    let started = Instant::now();
    let response = send(
        &mock,
        Dialect::Anthropic,
        "m;ttft_ms=200;delay_ms=100",
        "a b c",
        true,
    )
    .await;
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut first_token_at = None;
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        if first_token_at.is_none() && text.contains("content_block_delta") {
            first_token_at = Some(started.elapsed());
        }
    }
    assert!(first_token_at.unwrap() >= Duration::from_millis(200));
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(parse_sse(&text).len(), 9);
}

#[tokio::test]
async fn headers_set_options_and_override_the_model_name() {
    let mock = start().await;
    let url = format!("{}/v1/chat/completions", mock.base_url());
    let response = client()
        .post(&url)
        .bearer_auth("k")
        .header("x-mock-tokens", "2")
        .json(&openai_body("m;tokens=9", "x", false))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "lorem ipsum");

    let response = client()
        .post(&url)
        .bearer_auth("k")
        .header("x-mock-error", "503")
        .header("x-mock-retry-after", "3")
        .json(&openai_body("m", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "3");

    let response = client()
        .post(&url)
        .bearer_auth("k")
        .header("x-mock-options", "error=429;retry_after=5")
        .json(&openai_body("m", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "5");

    // A typo is a 400, not a silent happy path.
    let response = client()
        .post(&url)
        .bearer_auth("k")
        .header("x-mock-ttft", "5")
        .json(&openai_body("m", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown option `ttft`")
    );
    let response = send(&mock, Dialect::Anthropic, "m;tokens=many", "x", false).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn configured_options_layer_under_the_model_name() {
    let mock = MockUpstream::start_with(MockConfig {
        default_options: "tokens=1".to_owned(),
        model_options: vec![("gpt-x".to_owned(), "tokens=2".to_owned())],
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let content = async |model: &str| {
        let body: Value = send(&mock, Dialect::OpenAi, model, "echo me", false)
            .await
            .json()
            .await
            .unwrap();
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(content("other").await, "lorem");
    assert_eq!(content("gpt-x").await, "lorem ipsum");
    assert_eq!(content("gpt-x;tokens=3").await, "lorem ipsum dolor");

    // Runtime changes: make a real-looking model fail, then recover.
    mock.set_model_options("gpt-x", "error=503").unwrap();
    assert_eq!(
        send(&mock, Dialect::OpenAi, "gpt-x", "x", false)
            .await
            .status(),
        503
    );
    mock.set_model_options("gpt-x", "").unwrap();
    mock.set_default_options("").unwrap();
    assert_eq!(content("gpt-x").await, "echo me");
    assert!(mock.set_model_options("gpt-x", "bogus=1").is_err());
}

#[tokio::test]
async fn records_what_clients_sent() {
    let mock = start().await;
    let mut body = openai_body("gpt", "hi", true);
    body["stream_options"] = json!({"include_usage": true});
    read_body(openai(&mock, body).await).await;
    let mut body = anthropic_body("claude", "hi", false);
    body["system"] = json!("top-level system");
    anthropic(&mock, body).await;
    gemini(
        &mock,
        "gem",
        "streamGenerateContent?alt=sse",
        gemini_body("hi"),
    )
    .await;
    client()
        .post(format!("{}/v1/chat/completions", mock.base_url()))
        .send()
        .await
        .unwrap();

    assert_eq!(mock.request_count(), 4);
    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(requests[0].header("Authorization"), Some("Bearer sk-test"));
    assert_eq!(requests[0].body["stream_options"]["include_usage"], true);
    assert_eq!(requests[1].path, "/v1/messages");
    assert_eq!(requests[1].header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(requests[1].body["system"], "top-level system");
    assert_eq!(requests[2].path, "/v1beta/models/gem:streamGenerateContent");
    assert_eq!(requests[2].query, "alt=sse");
    assert_eq!(requests[3].body, Value::Null);

    mock.clear_requests();
    assert!(mock.requests().is_empty());
    assert_eq!(mock.request_count(), 4);
}
