//! Each provider adapter (OpenAI, Anthropic, Gemini) through the real server against the mock
//! upstream (`load-tests/mock-upstream`), which speaks their exact wire formats: answers and
//! usage, what the upstream was sent, every class of failure before output (a proper HTTP
//! status and a stored `failed` message), and failures after output (an `error` event and a
//! stored `failed` message with the partial text — never a silent `complete`).

use chorus_mock_upstream::{MockUpstream, RecordedRequest};
use serde_json::{Value, json};

use crate::helpers::{
    MOCK_ANTHROPIC_KEY, MOCK_GEMINI_KEY, MOCK_OPENAI_KEY, SseEvent, TEST_INPUT_PER_MTOK,
    TEST_OUTPUT_PER_MTOK, TestApp, TestModel, assert_contiguous, assert_error, body_json,
    catalogue_toml, delta_text, event_names, id_of, lorem, sse_of,
};

const PROVIDERS: [&str; 3] = ["openai", "anthropic", "gemini"];
const SYSTEM: &str = "Be brief.";
const PROMPT: &str = "hello big world";
/// Words of the system prompt and the prompt: what the mock upstream counts as input tokens.
const INPUT_TOKENS: u64 = 5;
const OUTPUT_TOKENS: u64 = 3;

/// The models of each provider: `{provider}-{suffix}` with these upstream names.
const UPSTREAMS: [(&str, &str); 12] = [
    ("echo", "m"),
    ("401", "m;error=401"),
    ("429", "m;error=429;retry_after=2"),
    ("500", "m;error=500"),
    ("503", "m;error=503"),
    ("529", "m;error=529"),
    ("ctx", "m;error=context"),
    ("cut", "m;tokens=10;cut_after=3"),
    ("err2", "m;tokens=10;error_after=2"),
    ("slow", "m;tokens=5;delay_ms=20"),
    ("hang", "m;hang=1"),
    ("stall", "m;tokens=5;delay_ms=4000"),
];

struct Setup {
    app: TestApp,
    upstream: MockUpstream,
}

async fn setup() -> Setup {
    setup_with(&[]).await
}

async fn setup_with(env: &[(&str, &str)]) -> Setup {
    let upstream = MockUpstream::start()
        .await
        .expect("starting the mock upstream");
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    setup_on(upstream, &env).await
}

/// [`setup_with`] on an upstream already started (its address may be in `env`).
async fn setup_on(upstream: MockUpstream, env: &[(String, String)]) -> Setup {
    let ids: Vec<(String, &str, &str)> = PROVIDERS
        .iter()
        .flat_map(|p| {
            UPSTREAMS
                .iter()
                .map(move |(suffix, up)| (format!("{p}-{suffix}"), *p, *up))
        })
        .collect();
    let models: Vec<TestModel<'_>> = ids
        .iter()
        .map(|(id, provider, up)| TestModel::new(id, provider, up))
        .collect();
    // These tests check each adapter's handling of every failure, so each call goes to the
    // provider once: no retries, no continuation after a cut (tests/api/routing.rs covers those).
    // Dozens of messages in a few seconds: well past the default tier's per-minute limits.
    let mut builder = TestApp::builder()
        .models_toml(&catalogue_toml(&models))
        .tiers_toml(crate::helpers::ROOMY_TIERS)
        .upstream(&upstream)
        .env("CHORUS__ROUTING__MAX_ATTEMPTS", "1")
        .env("CHORUS__ROUTING__CONTINUE_AFTER_CUT", "false");
    for (key, value) in env {
        builder = builder.env(key, value);
    }
    let app = builder.spawn().await;
    Setup { app, upstream }
}

impl Setup {
    /// A titled thread (no title generation call) with a system prompt.
    async fn thread(&self, token: &str) -> String {
        id_of(
            &self
                .app
                .create_thread(
                    token,
                    &json!({ "title": "provider test", "system_prompt": SYSTEM }),
                )
                .await,
        )
    }

    /// The chat requests the upstream received for `provider`'s base model `m`.
    fn chat_requests(&self) -> Vec<RecordedRequest> {
        self.upstream
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect()
    }
}

fn expected_cost() -> f64 {
    (INPUT_TOKENS as f64 * TEST_INPUT_PER_MTOK + OUTPUT_TOKENS as f64 * TEST_OUTPUT_PER_MTOK)
        / 1_000_000.0
}

fn assert_cost(value: &Value) {
    let cost = value
        .as_f64()
        .unwrap_or_else(|| panic!("cost is not a number: {value}"));
    assert!(
        (cost - expected_cost()).abs() < 1e-12,
        "cost {cost}, expected {}",
        expected_cost()
    );
}

/// Asserts the upstream request `request` is a well-formed streaming (or not) chat call of
/// `provider` for our thread.
fn assert_upstream_request(provider: &str, request: &RecordedRequest, stream: bool) {
    let body = &request.body;
    match provider {
        "openai" => {
            assert_eq!(request.path, "/v1/chat/completions");
            assert_eq!(
                request.header("authorization"),
                Some(format!("Bearer {MOCK_OPENAI_KEY}").as_str())
            );
            assert_eq!(body["model"], "m");
            let messages = body["messages"].as_array().unwrap();
            assert_eq!(
                messages[0],
                json!({ "role": "system", "content": SYSTEM }),
                "{body}"
            );
            assert_eq!(
                messages.last().unwrap(),
                &json!({ "role": "user", "content": PROMPT }),
                "{body}"
            );
            assert!(body["max_tokens"].is_u64(), "{body}");
            if stream {
                assert_eq!(body["stream"], true, "{body}");
                assert_eq!(
                    body["stream_options"]["include_usage"], true,
                    "usage must be asked for when streaming: {body}"
                );
            } else {
                assert_ne!(body["stream"], true, "{body}");
            }
        }
        "anthropic" => {
            assert_eq!(request.path, "/v1/messages");
            assert_eq!(request.header("x-api-key"), Some(MOCK_ANTHROPIC_KEY));
            assert!(request.header("anthropic-version").is_some());
            assert_eq!(body["model"], "m");
            assert_eq!(
                body["system"], SYSTEM,
                "the system prompt is top-level: {body}"
            );
            assert!(
                body["max_tokens"].is_u64(),
                "max_tokens is required: {body}"
            );
            let messages = body["messages"].as_array().unwrap();
            assert!(
                messages.iter().all(|m| m["role"] != "system"),
                "no system role in messages: {body}"
            );
            let last = messages.last().unwrap();
            assert_eq!(last["role"], "user");
            assert!(last.to_string().contains(PROMPT), "{body}");
            assert_eq!(body["stream"] == true, stream, "{body}");
        }
        "gemini" => {
            let action = if stream {
                "streamGenerateContent"
            } else {
                "generateContent"
            };
            assert_eq!(request.path, format!("/v1beta/models/m:{action}"));
            if stream {
                assert!(request.query.contains("alt=sse"), "{}", request.query);
            }
            assert_eq!(request.header("x-goog-api-key"), Some(MOCK_GEMINI_KEY));
            let system = body
                .get("systemInstruction")
                .or_else(|| body.get("system_instruction"))
                .unwrap_or_else(|| panic!("no system instruction: {body}"));
            assert!(system.to_string().contains(SYSTEM), "{body}");
            let contents = body["contents"].as_array().unwrap();
            let last = contents.last().unwrap();
            assert_eq!(last["role"], "user", "{body}");
            assert!(last.to_string().contains(PROMPT), "{body}");
        }
        other => panic!("unknown provider {other}"),
    }
}

fn names(events: &[SseEvent]) -> Vec<String> {
    event_names(events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_streams_a_turn_through_the_server() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    for provider in PROVIDERS {
        setup.upstream.clear_requests();
        let thread = setup.thread(session.token()).await;
        let model = format!("{provider}-echo");
        let events = app
            .chat_turn(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": model }),
            )
            .await;
        assert_contiguous(&events);
        let names = names(&events);
        assert_eq!(names.first().map(String::as_str), Some("message_start"));
        assert_eq!(
            &names[names.len() - 2..],
            ["message_complete", "done"],
            "{provider}: {events:#?}"
        );
        assert!(
            names[1..names.len() - 2].iter().all(|n| n == "delta"),
            "{provider}: {names:?}"
        );
        assert_eq!(delta_text(&events, None), PROMPT, "{provider}");
        let complete = &events[events.len() - 2].data;
        assert_eq!(complete["status"], "complete", "{provider}: {complete}");
        assert_eq!(complete["finish_reason"], "stop", "{provider}: {complete}");
        assert_eq!(complete["provider"], provider);
        assert_eq!(
            complete["usage"],
            json!({ "input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS }),
            "{provider}: usage as the upstream reported it"
        );
        assert_cost(&complete["cost_usd"]);

        let message_id = events[0].data["message_id"].as_str().unwrap();
        let stored = app
            .thread_message(session.token(), &thread, message_id)
            .await;
        assert_eq!(stored["status"], "complete", "{provider}: {stored}");
        assert_eq!(stored["content"], PROMPT);
        assert_eq!(stored["provider"], provider);
        assert_eq!(stored["model"], model);
        assert_eq!(
            stored["usage"],
            json!({ "input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS })
        );
        assert_cost(&stored["cost_usd"]);
        assert!(
            stored["latency_ms"].is_u64() && stored["ttft_ms"].is_u64(),
            "{stored}"
        );

        let requests = setup.chat_requests();
        assert_eq!(
            requests.len(),
            1,
            "{provider}: one upstream call: {requests:#?}"
        );
        assert_upstream_request(provider, &requests[0], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_answers_a_stream_false_turn() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    for provider in PROVIDERS {
        let thread = setup.thread(session.token()).await;
        let response = app
            .post_message(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": format!("{provider}-echo"), "stream": false }),
            )
            .await;
        assert_eq!(response.status(), 200, "{provider}");
        let body = body_json(response).await;
        let answer = &body["assistant_messages"][0];
        assert_eq!(answer["content"], PROMPT, "{provider}: {body}");
        assert_eq!(answer["status"], "complete");
        assert_eq!(answer["provider"], provider);
        assert_eq!(
            answer["usage"],
            json!({ "input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS })
        );
        assert_cost(&answer["cost_usd"]);
        let stored = app
            .thread_message(session.token(), &thread, answer["id"].as_str().unwrap())
            .await;
        assert_eq!(&stored, answer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_output_get_a_status_code_and_a_stored_failed_message() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    // (model suffix, status, code, class, retryable)
    let cases = [
        ("401", 502, "PROVIDER_ERROR", "auth", false),
        ("429", 429, "RATE_LIMITED", "rate_limited", true),
        ("500", 502, "PROVIDER_ERROR", "server_error", true),
        ("503", 502, "PROVIDER_ERROR", "overloaded", true),
        ("529", 502, "PROVIDER_ERROR", "overloaded", true),
        ("ctx", 400, "VALIDATION_ERROR", "context_too_long", false),
    ];
    for provider in PROVIDERS {
        for (suffix, status, code, class, retryable) in cases {
            for stream in [true, false] {
                let what = format!("{provider}-{suffix} (stream: {stream})");
                let thread = setup.thread(session.token()).await;
                let response = app
                    .post_message(
                        session.token(),
                        &thread,
                        &json!({
                            "content": PROMPT,
                            "model": format!("{provider}-{suffix}"),
                            "stream": stream,
                        }),
                    )
                    .await;
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let error = assert_error(response, status, code).await;
                let details = &error["details"];
                assert_eq!(details["class"], class, "{what}: {error}");
                assert_eq!(details["retryable"], retryable, "{what}: {error}");
                if suffix == "429" {
                    assert_eq!(
                        retry_after.as_deref(),
                        Some("2"),
                        "{what}: the upstream's Retry-After is passed on"
                    );
                }

                let messages = app.thread_messages(session.token(), &thread).await;
                assert_eq!(messages.len(), 2, "{what}: {messages:#?}");
                let (user, assistant) = (&messages[0], &messages[1]);
                assert_eq!(user["id"], details["user_message_id"], "{what}: {error}");
                assert_eq!(user["content"], PROMPT);
                assert_eq!(user["status"], "complete");
                assert_eq!(assistant["role"], "assistant");
                assert_eq!(assistant["status"], "failed", "{what}: {assistant}");
                assert_eq!(assistant["content"], "", "{what}");
                assert_eq!(assistant["turn_id"], details["turn_id"], "{what}: {error}");
                assert_eq!(assistant["provider"], provider, "{what}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_output_ends_in_an_error_event_and_a_failed_message() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    for provider in PROVIDERS {
        let thread = setup.thread(session.token()).await;
        let events = app
            .chat_turn(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": format!("{provider}-cut") }),
            )
            .await;
        assert_contiguous(&events);
        assert_eq!(
            names(&events),
            [
                "message_start",
                "delta",
                "delta",
                "delta",
                "error",
                "message_complete",
                "done"
            ],
            "{provider}: {events:#?}"
        );
        let message_id = events[0].data["message_id"].as_str().unwrap();
        let partial = format!("{} ", lorem(3));
        assert_eq!(delta_text(&events, None), partial);
        let error = &events[4].data;
        assert_eq!(error["code"], "transport", "{provider}: {error}");
        assert_eq!(error["message_id"], message_id);
        assert_eq!(error["retryable"], true);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        let complete = &events[5].data;
        assert_eq!(complete["status"], "failed", "{provider}: {complete}");
        assert_eq!(complete["message_id"], message_id);

        let stored = app
            .thread_message(session.token(), &thread, message_id)
            .await;
        assert_eq!(
            stored["status"], "failed",
            "{provider}: never a silent complete"
        );
        assert_eq!(
            stored["content"],
            partial.as_str(),
            "{provider}: the partial text is kept"
        );
        assert!(
            stored["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0,
            "{provider}: the partial answer is charged: {stored}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_error_event_after_output_is_classified() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    for (provider, code) in [("anthropic", "overloaded"), ("openai", "server_error")] {
        let thread = setup.thread(session.token()).await;
        let events = app
            .chat_turn(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": format!("{provider}-err2") }),
            )
            .await;
        assert_eq!(
            names(&events),
            [
                "message_start",
                "delta",
                "delta",
                "error",
                "message_complete",
                "done"
            ],
            "{provider}: {events:#?}"
        );
        assert_eq!(events[3].data["code"], code, "{provider}: {:?}", events[3]);
        assert_eq!(events[3].data["retryable"], true);
        assert_eq!(events[4].data["status"], "failed");
        let message_id = events[0].data["message_id"].as_str().unwrap();
        let stored = app
            .thread_message(session.token(), &thread, message_id)
            .await;
        assert_eq!(stored["status"], "failed");
        assert_eq!(stored["content"], format!("{} ", lorem(2)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_model_among_two_is_an_error_event_not_an_http_error() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    let thread = setup.thread(session.token()).await;
    let events = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": PROMPT, "models": ["openai-slow", "anthropic-500"] }),
        )
        .await;
    assert_contiguous(&events);
    let start_of = |model: &str| {
        events
            .iter()
            .find(|e| e.name() == "message_start" && e.data["model"] == model)
            .map(|e| e.data["message_id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no message_start for {model}: {events:#?}"))
    };
    let (good, bad) = (start_of("openai-slow"), start_of("anthropic-500"));
    let error = events
        .iter()
        .find(|e| e.name() == "error")
        .unwrap_or_else(|| panic!("no error event: {events:#?}"));
    assert_eq!(error.data["message_id"], bad.as_str());
    assert_eq!(error.data["code"], "server_error");
    let status_of = |id: &str| {
        events
            .iter()
            .find(|e| e.name() == "message_complete" && e.data["message_id"] == id)
            .map(|e| e.data["status"].clone())
            .unwrap()
    };
    assert_eq!(status_of(&bad), "failed");
    assert_eq!(status_of(&good), "complete");
    assert_eq!(delta_text(&events, Some(&good)), lorem(5));
    assert_eq!(events.last().unwrap().name(), "done");

    // Every model failing before output is an HTTP error again.
    let thread = setup.thread(session.token()).await;
    let response = app
        .post_message(
            session.token(),
            &thread,
            &json!({ "content": PROMPT, "models": ["anthropic-500", "gemini-500"] }),
        )
        .await;
    assert_error(response, 502, "PROVIDER_ERROR").await;
    let messages = app.thread_messages(session.token(), &thread).await;
    assert_eq!(messages.len(), 3);
    assert!(
        messages[1..].iter().all(|m| m["status"] == "failed"),
        "{messages:#?}"
    );
}

/// A non-streaming `/v1` chat completion with `model` that must answer 200 with the prompt
/// echoed; its body.
async fn complete_v1(app: &TestApp, token: &str, model: &str, messages: &Value) -> Value {
    let response = app
        .post_json(
            "/v1/chat/completions",
            Some(token),
            &json!({ "model": model, "messages": messages }),
        )
        .await;
    assert_eq!(response.status(), 200, "{model}");
    let body = body_json(response).await;
    assert_eq!(
        body["choices"][0]["message"]["content"], PROMPT,
        "{model}: {body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_compatible_api_reaches_every_provider() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    for provider in PROVIDERS {
        let model = format!("{provider}-echo");
        let messages = json!([
            { "role": "system", "content": SYSTEM },
            { "role": "user", "content": PROMPT },
        ]);
        setup.upstream.clear_requests();
        let body = complete_v1(app, session.token(), &model, &messages).await;
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["model"], model);
        assert_eq!(
            body["usage"],
            json!({
                "prompt_tokens": INPUT_TOKENS,
                "completion_tokens": OUTPUT_TOKENS,
                "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
            }),
            "{provider}"
        );
        let requests = setup.chat_requests();
        assert_eq!(requests.len(), 1, "{provider}: {requests:#?}");
        assert_upstream_request(provider, &requests[0], false);

        setup.upstream.clear_requests();
        let response = app
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .bearer_auth(session.token())
            .json(&json!({
                "model": model,
                "messages": messages,
                "stream": true,
                "stream_options": { "include_usage": true },
            }))
            .send()
            .await
            .unwrap();
        let mut stream = sse_of(response).await;
        let chunks = stream.rest().await;
        assert_eq!(
            chunks.last().unwrap().raw,
            "[DONE]",
            "{provider}: {chunks:#?}"
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c.data["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, PROMPT, "{provider}");
        let usage = &chunks[chunks.len() - 2].data;
        assert_eq!(usage["choices"], json!([]), "{provider}: {usage}");
        assert_eq!(
            usage["usage"]["prompt_tokens"], INPUT_TOKENS,
            "{provider}: {usage}"
        );
        assert_eq!(usage["usage"]["completion_tokens"], OUTPUT_TOKENS);
        let requests = setup.chat_requests();
        assert_eq!(requests.len(), 1, "{provider}: {requests:#?}");
        assert_upstream_request(provider, &requests[0], true);
    }

    // An upstream failure is an OpenAI-shaped error with the matching status.
    let response = app
        .post_json(
            "/v1/chat/completions",
            Some(session.token()),
            &json!({ "model": "anthropic-429", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some());
    let body = body_json(response).await;
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untitled_thread_gets_a_title_from_the_model() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let prompt = "please name this thread about rust async streams and actors";
    app.chat_turn(
        session.token(),
        &thread,
        &json!({ "content": prompt, "model": "openai-echo" }),
    )
    .await;
    // The echo upstream answers the title request with the prompt itself.
    let started = std::time::Instant::now();
    let title = loop {
        let title = app.get_thread(session.token(), &thread).await["title"].clone();
        if title == prompt || started.elapsed() > std::time::Duration::from_secs(10) {
            break title;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        title, prompt,
        "the generated title replaces the provisional one"
    );
    let requests = setup.chat_requests();
    assert_eq!(requests.len(), 2, "the turn and the title: {requests:#?}");
    let title_request = requests
        .iter()
        .find(|r| r.body["stream"] != true)
        .unwrap_or_else(|| panic!("no non-streaming title request: {requests:#?}"));
    let system = &title_request.body["messages"][0];
    assert_eq!(system["role"], "system");
    assert!(
        system["content"].as_str().unwrap().contains("title"),
        "{title_request:#?}"
    );

    // A failed first answer generates no title; the provisional one stays.
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    setup.upstream.clear_requests();
    let response = app
        .post_message(
            session.token(),
            &thread,
            &json!({ "content": "this one fails", "model": "openai-500" }),
        )
        .await;
    assert_error(response, 502, "PROVIDER_ERROR").await;
    assert_eq!(
        app.get_thread(session.token(), &thread).await["title"],
        "this one fails"
    );
    assert_eq!(
        setup.chat_requests().len(),
        1,
        "no title request after a failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_defaults_and_the_messages_options_reach_the_upstream() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    let response = app
        .patch_json(
            "/api/v1/me",
            session.token(),
            &json!({ "settings": { "system_prompt": "Answer kindly.", "temperature": 0.7 } }),
        )
        .await;
    assert_eq!(response.status(), 200);
    let thread = id_of(
        &app.create_thread(session.token(), &json!({ "title": "defaults" }))
            .await,
    );
    for (provider, body) in [
        (
            "openai",
            json!({ "content": PROMPT, "model": "openai-echo" }),
        ),
        (
            "anthropic",
            json!({ "content": PROMPT, "model": "anthropic-echo", "temperature": 0.2, "max_tokens": 50 }),
        ),
    ] {
        setup.upstream.clear_requests();
        app.chat_turn(session.token(), &thread, &body).await;
        let requests = setup.chat_requests();
        let sent = &requests[0].body;
        match provider {
            "openai" => {
                assert_eq!(
                    sent["messages"][0],
                    json!({ "role": "system", "content": "Answer kindly." }),
                    "the user's default system prompt: {sent}"
                );
                assert_eq!(
                    sent["temperature"], 0.7,
                    "the user's default temperature: {sent}"
                );
            }
            _ => {
                assert_eq!(sent["system"], "Answer kindly.", "{sent}");
                assert_eq!(
                    sent["temperature"], 0.2,
                    "the message's temperature wins: {sent}"
                );
                assert_eq!(sent["max_tokens"], 50, "the message's max_tokens: {sent}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summarize_asks_a_real_model_and_usage_adds_up() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    let thread = setup.thread(session.token()).await;
    for n in ["one", "two", "three", "four"] {
        let response = app
            .post_message(
                session.token(),
                &thread,
                &json!({ "content": format!("question number {n}"), "model": "openai-echo", "stream": false }),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    let usage = app.get_ok("/api/v1/me/usage", session.token()).await;
    assert_eq!(usage["used"]["chat_messages"], 4, "{usage}");
    let cost = usage["cost_usd"].as_f64().unwrap();
    assert!(cost > 0.0, "priced models cost something: {usage}");

    setup.upstream.clear_requests();
    let response = app
        .post_json(
            &format!("/api/v1/threads/{thread}/summarize"),
            Some(session.token()),
            &json!({ "model": "openai-echo" }),
        )
        .await;
    assert_eq!(response.status(), 200);
    let summary = body_json(response).await;
    assert_eq!(summary["model"], "openai-echo");
    let text = summary["summary"].as_str().unwrap();
    assert!(text.contains("question number one"), "{summary}");
    assert!(summary["covers_until"].is_string(), "{summary}");
    let requests = setup.chat_requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let sent = &requests[0].body;
    assert!(
        sent["messages"][0]["content"]
            .as_str()
            .is_some_and(|s| s.contains("Summarize")),
        "{sent}"
    );

    // The next turn sends the summary instead of the folded messages.
    setup.upstream.clear_requests();
    let response = app
        .post_message(
            session.token(),
            &thread,
            &json!({ "content": "question number five", "model": "openai-echo", "stream": false }),
        )
        .await;
    assert_eq!(response.status(), 200);
    let requests = setup.chat_requests();
    let sent = &requests[0].body;
    let system = sent["messages"][0]["content"].as_str().unwrap_or("");
    assert!(
        system.contains(SYSTEM) && system.contains(text),
        "the system message carries the summary: {sent}"
    );
    let sent_text = sent["messages"].to_string();
    assert!(
        !sent["messages"].as_array().unwrap()[1..]
            .iter()
            .any(|m| m["content"] == "question number one"),
        "folded messages are not sent verbatim: {sent_text}"
    );

    // A model that fails while summarizing: a provider error, and no summary stored for it.
    // (Its conversation is the 7 user messages, so there is something to fold.)
    for n in ["six", "seven"] {
        let response = app
            .post_message(
                session.token(),
                &thread,
                &json!({ "content": format!("question number {n}"), "model": "openai-echo", "stream": false }),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    let response = app
        .post_json(
            &format!("/api/v1/threads/{thread}/summarize"),
            Some(session.token()),
            &json!({ "model": "openai-500" }),
        )
        .await;
    let error = assert_error(response, 502, "PROVIDER_ERROR").await;
    assert_eq!(error["details"]["class"], "server_error", "{error}");
    let stored = app.get_thread(session.token(), &thread).await;
    assert!(
        stored["models"]["openai-500"]["summary"].is_null(),
        "{stored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_after_output_without_streaming_are_failed_answers() {
    let setup = setup().await;
    let app = &setup.app;
    let session = app.register_user().await;
    for provider in PROVIDERS {
        let thread = setup.thread(session.token()).await;
        let response = app
            .post_message(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": format!("{provider}-cut"), "stream": false }),
            )
            .await;
        assert_eq!(response.status(), 200, "{provider}: the turn started");
        let body = body_json(response).await;
        let answer = &body["assistant_messages"][0];
        assert_eq!(answer["status"], "failed", "{provider}: {body}");
        assert_eq!(answer["content"], format!("{} ", lorem(3)), "{provider}");
    }

    // Over /v1 a started stream reports the failure as an error chunk, then ends.
    let response = app
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .bearer_auth(session.token())
        .json(&json!({
            "model": "openai-cut",
            "messages": [{ "role": "user", "content": PROMPT }],
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    let mut stream = sse_of(response).await;
    let chunks = stream.rest().await;
    let error = chunks
        .iter()
        .find(|c| c.data.get("error").is_some())
        .unwrap_or_else(|| panic!("no error chunk: {chunks:#?}"));
    assert_eq!(error.data["error"]["code"], "transport", "{error:?}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c.data["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, format!("{} ", lorem(3)));
    assert!(
        !chunks
            .iter()
            .any(|c| c.data["choices"][0]["finish_reason"] == "stop"),
        "a cut stream must not claim a normal finish: {chunks:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_provider_times_out_before_and_after_output() {
    let setup = setup_with(&[
        ("CHORUS__TURNS__FIRST_TOKEN_TIMEOUT_SECS", "1"),
        ("CHORUS__TURNS__BETWEEN_CHUNKS_TIMEOUT_SECS", "1"),
    ])
    .await;
    let app = &setup.app;
    let session = app.register_user().await;
    for provider in PROVIDERS {
        // No answer at all: a 502 with class `timeout`, and a stored failed message.
        let thread = setup.thread(session.token()).await;
        let response = app
            .post_message(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": format!("{provider}-hang") }),
            )
            .await;
        let error = assert_error(response, 502, "PROVIDER_ERROR").await;
        assert_eq!(error["details"]["class"], "timeout", "{provider}: {error}");
        let messages = app.thread_messages(session.token(), &thread).await;
        assert_eq!(messages[1]["status"], "failed", "{provider}: {messages:#?}");

        // One token, then silence: an error event with code `timeout` and the partial text.
        let thread = setup.thread(session.token()).await;
        let events = app
            .chat_turn(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": format!("{provider}-stall") }),
            )
            .await;
        assert_eq!(
            names(&events),
            [
                "message_start",
                "delta",
                "error",
                "message_complete",
                "done"
            ],
            "{provider}: {events:#?}"
        );
        assert_eq!(events[2].data["code"], "timeout", "{provider}");
        assert_eq!(events[3].data["status"], "failed");
        let message_id = events[0].data["message_id"].as_str().unwrap();
        let stored = app
            .thread_message(session.token(), &thread, message_id)
            .await;
        assert_eq!(stored["status"], "failed");
        assert_eq!(stored["content"], "lorem ");
    }
}

/// Provider calls honour the system's proxy settings (`HTTP_PROXY` and `NO_PROXY`, read the
/// way `reqwest` reads them). Every provider's base URL here names a host that does not
/// resolve, and the mock upstream is the HTTP proxy: an answer can only come through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_calls_go_through_the_configured_proxy() {
    let upstream = MockUpstream::start()
        .await
        .expect("starting the mock upstream");
    let proxy = upstream.base_url();
    let env: Vec<(String, String)> = [
        ("OPENAI_BASE_URL", "http://openai.provider.invalid/v1"),
        ("ANTHROPIC_BASE_URL", "http://anthropic.provider.invalid"),
        ("GEMINI_BASE_URL", "http://gemini.provider.invalid"),
        ("HTTP_PROXY", &proxy),
        ("http_proxy", &proxy),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let setup = setup_on(upstream, &env).await;
    let app = &setup.app;
    let session = app.register_user().await;
    for provider in PROVIDERS {
        setup.upstream.clear_requests();
        let model = format!("{provider}-echo");
        let messages = json!([{ "role": "user", "content": PROMPT }]);
        complete_v1(app, session.token(), &model, &messages).await;
        // Streamed, too.
        let thread = setup.thread(session.token()).await;
        let events = app
            .chat_turn(
                session.token(),
                &thread,
                &json!({ "content": PROMPT, "model": model }),
            )
            .await;
        assert_eq!(delta_text(&events, None), PROMPT, "{provider}");
        let requests = setup.chat_requests();
        assert_eq!(requests.len(), 2, "{provider}: {requests:#?}");
        for request in &requests {
            assert_eq!(
                request.header("host"),
                Some(format!("{provider}.provider.invalid").as_str()),
                "{provider}: {request:#?}"
            );
        }
    }
}
