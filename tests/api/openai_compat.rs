//! The OpenAI-compatible API (`/v1/*`): chat completions (whole and streamed, with
//! `stream_options.include_usage`), models and embeddings, authenticated with an API key or a
//! JWT, errors in OpenAI's shape — and the official `openai` Python SDK against it.

use std::time::Duration;

use reqwest::{Method, Response};
use serde_json::{Value, json};

use crate::helpers::{SseEvent, TestApp, body_json, sse_of};

const ECHO_MESSAGES: &str = "mock-echo";

fn chat(content: &str) -> Value {
    json!({
        "model": ECHO_MESSAGES,
        "messages": [
            { "role": "system", "content": "Be brief." },
            { "role": "user", "content": content },
        ],
    })
}

async fn v1_post(app: &TestApp, path: &str, token: &str, body: &Value) -> Response {
    app.request(Method::POST, path)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("POST /v1 failed")
}

/// Asserts OpenAI's error envelope with `status` and `kind`; returns the `error` object.
async fn assert_openai_error(response: Response, status: u16, kind: &str) -> Value {
    let got = response.status().as_u16();
    let body = body_json(response).await;
    assert_eq!(got, status, "expected {status} {kind}: {body}");
    let error = body
        .get("error")
        .unwrap_or_else(|| panic!("no `error` object: {body}"))
        .clone();
    for key in ["message", "type", "param", "code"] {
        assert!(
            error.get(key).is_some(),
            "OpenAI errors have `{key}`: {body}"
        );
    }
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], kind, "{body}");
    error
}

fn assert_completion(body: &Value, content: &str, prompt_tokens: u64, completion_tokens: u64) {
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")),
        "{body}"
    );
    assert!(
        body["created"].is_i64() || body["created"].is_u64(),
        "{body}"
    );
    assert_eq!(body["model"], ECHO_MESSAGES);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], content, "{body}");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }),
        "{body}"
    );
}

#[tokio::test]
async fn chat_completions_answer_with_an_api_key_or_a_jwt() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (_, key) = app.create_api_key(session.token(), "compat").await;
    assert!(key.starts_with("ck-"), "{key}");

    for token in [key.as_str(), session.token()] {
        let response = v1_post(
            &app,
            "/v1/chat/completions",
            token,
            &chat("three little words"),
        )
        .await;
        assert_eq!(response.status(), 200);
        let body = body_json(response).await;
        // Input: "Be brief." (2) + 3 words; output: 3 words.
        assert_completion(&body, "three little words", 5, 3);
    }

    // max_tokens caps the answer and says so.
    let mut capped = chat("one two three four five");
    capped["max_tokens"] = json!(2);
    let response = v1_post(&app, "/v1/chat/completions", &key, &capped).await;
    let body = body_json(response).await;
    assert_eq!(
        body["choices"][0]["message"]["content"], "one two",
        "{body}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2);

    // Content given as parts, and fields a gateway need not use, are accepted.
    let body = json!({
        "model": ECHO_MESSAGES,
        "messages": [{ "role": "user", "content": [{ "type": "text", "text": "parts work" }] }],
        "user": "someone",
        "n": 1,
        "presence_penalty": 0,
    });
    let response = v1_post(&app, "/v1/chat/completions", &key, &body).await;
    assert_eq!(response.status(), 200);
    let body = body_json(response).await;
    assert_eq!(body["choices"][0]["message"]["content"], "parts work");

    // No thread is stored for /v1 calls.
    let threads = app.get_ok("/api/v1/threads", session.token()).await;
    assert_eq!(threads["threads"], json!([]), "{threads}");
}

/// The chunks of a streamed completion, `[DONE]` included.
async fn stream_chunks(app: &TestApp, token: &str, body: &Value) -> Vec<SseEvent> {
    let mut stream = sse_of(v1_post(app, "/v1/chat/completions", token, body).await).await;
    let chunks = stream.rest().await;
    assert!(
        stream.error.is_none(),
        "the stream failed: {:?}",
        stream.error
    );
    assert_eq!(
        chunks.last().map(|c| c.raw.as_str()),
        Some("[DONE]"),
        "a stream ends with [DONE]: {chunks:#?}"
    );
    chunks
}

#[tokio::test]
async fn streamed_chat_completions_follow_openais_chunk_format() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (_, key) = app.create_api_key(session.token(), "compat").await;

    for token in [key.as_str(), session.token()] {
        let mut body = chat("streamed back to me");
        body["stream"] = json!(true);
        let chunks = stream_chunks(&app, token, &body).await;
        let data: Vec<&Value> = chunks[..chunks.len() - 1].iter().map(|c| &c.data).collect();
        let id = data[0]["id"].as_str().unwrap();
        for chunk in &data {
            assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
            assert_eq!(chunk["id"], id, "one id per completion");
            assert_eq!(chunk["model"], ECHO_MESSAGES);
            assert!(
                chunk.get("usage").is_none_or(Value::is_null),
                "no usage unless asked: {chunk}"
            );
        }
        assert_eq!(data[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = data
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "streamed back to me");
        let finishes: Vec<&Value> = data
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, [&json!("stop")], "{data:#?}");
        assert_eq!(
            data.last().unwrap()["choices"][0]["finish_reason"],
            "stop",
            "without include_usage the finish chunk is the last before [DONE]"
        );
    }

    let mut body = chat("with usage please");
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let chunks = stream_chunks(&app, &key, &body).await;
    let last = &chunks[chunks.len() - 2].data;
    assert_eq!(
        last["choices"],
        json!([]),
        "the usage chunk has no choices: {last}"
    );
    assert_eq!(
        last["usage"],
        json!({ "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8 }),
        "{last}"
    );
    assert_eq!(last["object"], "chat.completion.chunk");
    let text: String = chunks
        .iter()
        .filter_map(|c| c.data["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "with usage please");
    assert_eq!(
        chunks
            .iter()
            .filter(|c| c.data.get("usage").is_some_and(|u| !u.is_null()))
            .count(),
        1,
        "usage is sent once"
    );
}

#[tokio::test]
async fn v1_errors_use_openais_shape() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (key_id, key) = app.create_api_key(session.token(), "short-lived").await;
    let response = v1_post(&app, "/v1/chat/completions", &key, &chat("before deletion")).await;
    assert_eq!(response.status(), 200);

    let response = app
        .delete(&format!("/api/v1/me/api-keys/{key_id}"), session.token())
        .await;
    assert_eq!(response.status(), 204);
    let response = v1_post(&app, "/v1/chat/completions", &key, &chat("after deletion")).await;
    assert_openai_error(response, 401, "authentication_error").await;
    let response = app
        .request(Method::GET, "/v1/models")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_openai_error(response, 401, "authentication_error").await;

    // No credentials, a made-up key, a garbage JWT.
    let response = app
        .request(Method::POST, "/v1/chat/completions")
        .json(&chat("anonymous"))
        .send()
        .await
        .unwrap();
    assert_openai_error(response, 401, "authentication_error").await;
    for token in ["ck-0000000000000000000000000000000000000000", "not.a.jwt"] {
        let response = v1_post(&app, "/v1/chat/completions", token, &chat("forged")).await;
        assert_openai_error(response, 401, "authentication_error").await;
    }

    let response = v1_post(
        &app,
        "/v1/chat/completions",
        session.token(),
        &json!({ "model": "no-such-model", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    let error = assert_openai_error(response, 404, "not_found_error").await;
    assert_eq!(error["param"], "model", "{error}");
    assert!(error["message"].as_str().unwrap().contains("no-such-model"));

    for (body, param) in [
        (json!({ "model": ECHO_MESSAGES }), Value::Null),
        (
            json!({ "model": ECHO_MESSAGES, "messages": [{ "role": "system", "content": "only" }] }),
            json!("messages"),
        ),
        (
            json!({ "model": ECHO_MESSAGES, "messages": [{ "role": "wizard", "content": "hi" }] }),
            json!("messages"),
        ),
        (
            json!({ "model": ECHO_MESSAGES, "messages": [{ "role": "user", "content": 42 }] }),
            json!("messages"),
        ),
    ] {
        let response = v1_post(&app, "/v1/chat/completions", session.token(), &body).await;
        let error = assert_openai_error(response, 400, "invalid_request_error").await;
        if !param.is_null() {
            assert_eq!(error["param"], param, "{body}: {error}");
        }
    }
    let response = app
        .send_raw(
            Method::POST,
            "/v1/chat/completions",
            Some(session.token()),
            Some("application/json"),
            "{\"model\": ",
        )
        .await;
    assert_openai_error(response, 400, "invalid_request_error").await;
}

#[tokio::test]
async fn v1_models_lists_the_catalogue() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (_, key) = app.create_api_key(session.token(), "models").await;
    for token in [key.as_str(), session.token()] {
        let response = app
            .request(Method::GET, "/v1/models")
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = body_json(response).await;
        assert_eq!(body["object"], "list");
        let data = body["data"].as_array().unwrap();
        let echo = data
            .iter()
            .find(|m| m["id"] == "mock-echo")
            .unwrap_or_else(|| panic!("mock-echo missing: {body}"));
        assert_eq!(echo["object"], "model");
        assert_eq!(echo["owned_by"], "mock");
        assert!(echo["created"].is_number());
        assert!(data.iter().any(|m| m["id"] == "mock-lorem"));
        assert!(
            !data.iter().any(|m| m["id"] == "gpt-4o"),
            "no key, no OpenAI"
        );
    }
}

#[tokio::test]
async fn v1_embeddings_are_deterministic() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (_, key) = app.create_api_key(session.token(), "embed").await;
    let embed = |input: Value| {
        let app = &app;
        let key = key.clone();
        async move {
            let response = v1_post(
                app,
                "/v1/embeddings",
                &key,
                &json!({ "model": "mock-echo", "input": input }),
            )
            .await;
            assert_eq!(response.status(), 200);
            body_json(response).await
        }
    };
    let one = embed(json!("the same words")).await;
    assert_eq!(one["object"], "list");
    assert_eq!(one["model"], "mock-echo");
    assert_eq!(one["data"][0]["object"], "embedding");
    assert_eq!(one["data"][0]["index"], 0);
    let vector = one["data"][0]["embedding"].as_array().unwrap().clone();
    assert!(!vector.is_empty());
    let norm: f64 = vector.iter().map(|v| v.as_f64().unwrap().powi(2)).sum();
    assert!((norm - 1.0).abs() < 1e-3, "unit vectors: {norm}");
    assert!(one["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{one}");

    let again = embed(json!("the same words")).await;
    assert_eq!(
        again["data"][0]["embedding"],
        json!(vector),
        "same input, same vector"
    );
    let many = embed(json!(["other words", "the same words"])).await;
    let data = many["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["index"], 0);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[1]["embedding"], json!(vector));
    assert_ne!(data[0]["embedding"], json!(vector));

    let response = v1_post(
        &app,
        "/v1/embeddings",
        &key,
        &json!({ "model": "mock-lorem", "input": "no embeddings here" }),
    )
    .await;
    assert_openai_error(response, 404, "not_found_error").await;
    let response = v1_post(
        &app,
        "/v1/embeddings",
        &key,
        &json!({ "model": "mock-echo", "input": [] }),
    )
    .await;
    let error = assert_openai_error(response, 400, "invalid_request_error").await;
    assert_eq!(error["param"], "input", "{error}");
    let response = app
        .request(Method::POST, "/v1/embeddings")
        .json(&json!({ "model": "mock-echo", "input": "x" }))
        .send()
        .await
        .unwrap();
    assert_openai_error(response, 401, "authentication_error").await;
}

/// Environment variables that could send the SDK's requests elsewhere or change its behaviour.
fn is_sdk_scrubbed_var(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.ends_with("_PROXY") || upper.starts_with("OPENAI_")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_works_against_v1() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (_, key) = app.create_api_key(session.token(), "python sdk").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_check.py");

    let mut command = tokio::process::Command::new("python3");
    command
        .arg(script)
        .arg(format!("{}/v1", app.base))
        .arg(&key)
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_none_or(is_sdk_scrubbed_var) {
            command.env_remove(&name);
        }
    }
    let output = match tokio::time::timeout(Duration::from_secs(120), command.output()).await {
        Err(_) => panic!("the SDK check did not finish within 120s"),
        Ok(Err(e)) => panic!(
            "could not run `python3` ({e}); this test needs python3 with the `openai` package: \
             run `python3 -m pip install openai` (.ci/run installs it)"
        ),
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(3) {
        panic!(
            "the Python `openai` package is not installed: run `python3 -m pip install openai` \
             (.ci/run installs it).\n{stderr}"
        );
    }
    assert!(
        output.status.success(),
        "the OpenAI SDK check failed ({}).\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON summary on stdout:\n{stdout}\nstderr:\n{stderr}"));
    let models = summary["models"].as_array().unwrap();
    assert!(models.contains(&json!("mock-echo")), "{summary}");
    assert_eq!(summary["completion"]["text"], "hello from the python sdk");
    assert_eq!(summary["completion"]["finish_reason"], "stop");
    assert_eq!(
        summary["completion"]["usage"],
        json!({ "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12 })
    );
    assert_eq!(summary["stream"]["text"], "streaming words come back");
    assert_eq!(summary["stream"]["finish_reason"], "stop");
    assert_eq!(
        summary["stream"]["usage"],
        json!({ "prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8 })
    );
    assert_eq!(
        summary["errors"]["unknown_model"]["status"], 404,
        "{summary}"
    );
    assert_eq!(summary["errors"]["bad_key"]["status"], 401, "{summary}");
}
