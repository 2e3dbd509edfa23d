//! Provider pools and failover through the real server, with the mock upstream injecting the
//! faults (`load-tests/mock-upstream`): a failing, rate-limited, hanging or context-limited
//! deployment, a stream cut mid-answer, a circuit breaker opening and closing, every deployment
//! down, and users' own provider keys. Each test asserts what a user sees: which deployment and
//! model answered (`message_complete`, the stored message), the `status` events of a failover,
//! the error envelope, and what the upstream was (or was not) sent.

use std::time::{Duration, Instant};

use chorus_mock_upstream::{MockUpstream, RecordedRequest};
use serde_json::{Value, json};

use crate::helpers::{
    MOCK_ANTHROPIC_KEY, MOCK_OPENAI_KEY, SseEvent, TestApp, assert_contiguous, assert_error,
    catalogue_toml, delta_text, eventually, id_of, lorem,
};

const PROVIDERS: [&str; 3] = ["openai", "anthropic", "gemini"];
const PROMPT: &str = "hello big world";

/// One `[[models.deployments]]` entry.
struct Dep<'a> {
    id: &'a str,
    provider: &'a str,
    upstream: &'a str,
    priority: u32,
    /// More TOML lines for the deployment (`first_token_timeout_ms = 500`).
    extra: &'a str,
}

const fn dep<'a>(id: &'a str, provider: &'a str, upstream: &'a str, priority: u32) -> Dep<'a> {
    Dep {
        id,
        provider,
        upstream,
        priority,
        extra: "",
    }
}

/// A `[[models]]` entry with explicit deployments; `model_extra` holds model-level lines
/// (`fallbacks = [..]`, `continue_after_cut = false`).
fn model_toml(id: &str, model_extra: &str, deployments: &[Dep<'_>]) -> String {
    let first = &deployments[0];
    let mut text = format!(
        r#"
[[models]]
id = "{id}"
name = "Test {id}"
provider = "{provider}"
upstream = "{upstream}"
context_length = 128000
input_per_mtok = 1.0
output_per_mtok = 2.0
capabilities = ["chat", "stream"]
tiers = ["free", "pro", "enterprise"]
max_output_tokens = 1024
{model_extra}
"#,
        provider = first.provider,
        upstream = first.upstream,
    );
    for d in deployments {
        text.push_str(&format!(
            r#"
[[models.deployments]]
id = "{id}"
provider = "{provider}"
upstream = "{upstream}"
priority = {priority}
{extra}
"#,
            id = d.id,
            provider = d.provider,
            upstream = d.upstream,
            priority = d.priority,
            extra = d.extra,
        ));
    }
    text
}

struct Setup {
    app: TestApp,
    upstream: MockUpstream,
}

/// The test providers (see `catalogue_toml`) plus `models`, against a fresh mock upstream.
async fn setup(models: &[String], env: &[(&str, &str)]) -> Setup {
    let upstream = MockUpstream::start()
        .await
        .expect("starting the mock upstream");
    let mut toml = catalogue_toml(&[]);
    for model in models {
        toml.push_str(model);
    }
    let mut builder = TestApp::builder().models_toml(&toml).upstream(&upstream);
    for (key, value) in env {
        builder = builder.env(key, value);
    }
    Setup {
        app: builder.spawn().await,
        upstream,
    }
}

impl Setup {
    /// A titled thread, so that no title-generation call reaches the upstream.
    async fn thread(&self, token: &str) -> String {
        id_of(
            &self
                .app
                .create_thread(token, &json!({ "title": "routing test" }))
                .await,
        )
    }

    /// A streamed turn on a new thread.
    async fn turn(&self, token: &str, model: &str) -> Turn {
        let thread = self.thread(token).await;
        let events = self
            .app
            .chat_turn(
                token,
                &thread,
                &json!({ "content": PROMPT, "model": model }),
            )
            .await;
        assert_contiguous(&events);
        Turn { thread, events }
    }

    /// The chat requests the upstream received whose model's base name is `base` (the name
    /// before the `;` options), in order.
    fn calls(&self, base: &str) -> Vec<RecordedRequest> {
        self.upstream
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && base_name(&upstream_model(r)) == base)
            .collect()
    }
}

struct Turn {
    thread: String,
    events: Vec<SseEvent>,
}

impl Turn {
    fn complete(&self) -> &Value {
        &self
            .events
            .iter()
            .find(|e| e.name() == "message_complete")
            .unwrap_or_else(|| panic!("no message_complete: {:#?}", self.events))
            .data
    }

    fn message_id(&self) -> &str {
        self.events[0].data["message_id"]
            .as_str()
            .unwrap_or_else(|| panic!("first event has no message_id: {:#?}", self.events))
    }

    /// The `status` events with stage `failover`.
    fn failovers(&self) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e.name() == "status" && e.data["stage"] == "failover")
            .map(|e| &e.data)
            .collect()
    }

    fn names(&self) -> Vec<&str> {
        self.events.iter().map(SseEvent::name).collect()
    }
}

/// The model a recorded chat request asked for: the body's `model`, or Gemini's path segment.
fn upstream_model(request: &RecordedRequest) -> String {
    if let Some(model) = request.body.get("model").and_then(Value::as_str) {
        return model.to_owned();
    }
    let tail = request
        .path
        .rsplit_once("/models/")
        .map_or("", |(_, tail)| tail);
    let model = tail.rsplit_once(':').map_or(tail, |(model, _)| model);
    model
        .replace("%3B", ";")
        .replace("%3b", ";")
        .replace("%3D", "=")
        .replace("%3d", "=")
        .replace("%7E", "~")
        .replace("%7e", "~")
}

fn base_name(model: &str) -> &str {
    model.split([';', '~']).next().unwrap_or(model)
}

/// The text of a recorded chat request's last message and its role (`user`, `assistant`,
/// Gemini's `model`).
fn last_message(request: &RecordedRequest) -> (String, String) {
    let body = &request.body;
    let last = body["messages"]
        .as_array()
        .or_else(|| body["contents"].as_array())
        .and_then(|m| m.last())
        .unwrap_or_else(|| panic!("no messages: {body}"))
        .clone();
    let role = last["role"].as_str().unwrap_or_default().to_owned();
    let text = match (&last["content"], &last["parts"]) {
        (Value::String(text), _) => text.clone(),
        (Value::Array(blocks), _) | (_, Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<String>(),
        _ => panic!("no text in the last message: {body}"),
    };
    (role, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deployment_is_skipped_for_the_next_priority() {
    let models: Vec<String> = PROVIDERS
        .iter()
        .map(|&p| {
            model_toml(
                &format!("{p}-pool"),
                "",
                &[
                    dep(&format!("{p}-broken"), p, &format!("{p}-a;error=500"), 0),
                    dep(&format!("{p}-backup"), p, &format!("{p}-b"), 1),
                ],
            )
        })
        .collect();
    let setup = setup(&models, &[]).await;
    let user = setup.app.register_user().await;
    for provider in PROVIDERS {
        let turn = setup.turn(user.token(), &format!("{provider}-pool")).await;
        let complete = turn.complete();
        assert_eq!(complete["status"], "complete", "{provider}: {complete}");
        assert_eq!(complete["deployment"], format!("{provider}-backup"));
        assert_eq!(complete["provider"], provider);
        assert_eq!(complete["model_used"], format!("{provider}-pool"));
        assert_eq!(delta_text(&turn.events, None), PROMPT, "{provider}");
        let failovers = turn.failovers();
        assert_eq!(failovers.len(), 1, "{provider}: {:#?}", turn.events);
        assert!(
            failovers[0]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("{provider}-broken"))),
            "the status names the failed deployment: {}",
            failovers[0]
        );
        // The failover is announced before the answer streams.
        let names = turn.names();
        let status_at = names.iter().position(|n| *n == "status").unwrap();
        let first_delta = names.iter().position(|n| *n == "delta").unwrap();
        assert!(status_at < first_delta, "{names:?}");

        let stored = setup
            .app
            .thread_message(user.token(), &turn.thread, turn.message_id())
            .await;
        assert_eq!(stored["status"], "complete", "{stored}");
        assert_eq!(stored["content"], PROMPT);
        assert_eq!(stored["deployment"], format!("{provider}-backup"));
        assert_eq!(stored["provider"], provider);

        assert_eq!(
            setup.calls(&format!("{provider}-a")).len(),
            1,
            "{provider}: the broken deployment was tried once"
        );
        assert_eq!(setup.calls(&format!("{provider}-b")).len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_its_retry_after() {
    let models: Vec<String> = PROVIDERS
        .iter()
        .map(|&p| {
            model_toml(
                &format!("{p}-limited"),
                "",
                &[dep(
                    &format!("{p}-only"),
                    p,
                    &format!("{p}-r;fail_first=1;error=429;retry_after=2"),
                    0,
                )],
            )
        })
        .collect();
    let setup = setup(&models, &[]).await;
    let user = setup.app.register_user().await;
    for provider in PROVIDERS {
        let turn = setup
            .turn(user.token(), &format!("{provider}-limited"))
            .await;
        let complete = turn.complete();
        assert_eq!(complete["status"], "complete", "{provider}: {complete}");
        assert_eq!(complete["deployment"], format!("{provider}-only"));
        assert_eq!(delta_text(&turn.events, None), PROMPT, "{provider}");
        let calls = setup.calls(&format!("{provider}-r"));
        assert_eq!(calls.len(), 2, "{provider}: one 429, one answer");
        let gap = calls[1].received_at - calls[0].received_at;
        // Retry-After: 2 — longer than any backoff or default cool-down (1 s) would wait.
        assert!(
            gap >= Duration::from_millis(1950) && gap < Duration::from_secs(15),
            "{provider}: the retry came {gap:?} after the 429 with Retry-After: 2"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_deployment_cools_down_without_opening_its_breaker() {
    // One failure would open a breaker (for 30 s): a 429 must not count as one.
    let models = [model_toml(
        "cooling",
        "",
        &[
            dep(
                "cool-a",
                "openai",
                "ca;fail_first=1;error=429;retry_after=2",
                0,
            ),
            dep("cool-b", "openai", "cb", 1),
        ],
    )];
    let setup = setup(
        &models,
        &[("CHORUS__ROUTING__BREAKER_CONSECUTIVE_FAILURES", "1")],
    )
    .await;
    let user = setup.app.register_user().await;

    let first = setup.turn(user.token(), "cooling").await;
    assert_eq!(
        first.complete()["deployment"],
        "cool-b",
        "{:#?}",
        first.events
    );
    assert_eq!(first.failovers().len(), 1);
    let limited_at = Instant::now();

    // While A cools down, calls go to B without touching A.
    let second = setup.turn(user.token(), "cooling").await;
    assert!(
        limited_at.elapsed() < Duration::from_millis(1800),
        "the second turn must run within A's cool-down for this test to mean anything"
    );
    assert_eq!(second.complete()["deployment"], "cool-b");
    assert!(second.failovers().is_empty(), "{:#?}", second.events);
    assert_eq!(
        setup.calls("ca").len(),
        1,
        "the cooling deployment was not called"
    );
    assert_eq!(setup.calls("cb").len(), 2);

    // After the Retry-After, A (priority 0) takes traffic again: its breaker stayed closed.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let third = setup.turn(user.token(), "cooling").await;
    assert_eq!(
        third.complete()["deployment"],
        "cool-a",
        "{:#?}",
        third.events
    );
    assert_eq!(delta_text(&third.events, None), PROMPT);
    assert_eq!(setup.calls("ca").len(), 2);
    // GET /api/v1/admin/providers (breaker state) is not on this branch yet; the traffic above
    // is what a closed breaker looks like.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_deployment_fails_over_at_its_first_token_timeout() {
    let models = [model_toml(
        "hangs",
        "",
        &[
            Dep {
                extra: "first_token_timeout_ms = 500",
                ..dep("hang-a", "openai", "ha;hang=1", 0)
            },
            dep("hang-b", "anthropic", "hb", 1),
        ],
    )];
    let setup = setup(&models, &[]).await;
    let user = setup.app.register_user().await;
    let started = Instant::now();
    let turn = setup.turn(user.token(), "hangs").await;
    let took = started.elapsed();
    let complete = turn.complete();
    assert_eq!(complete["status"], "complete", "{complete}");
    assert_eq!(complete["deployment"], "hang-b");
    assert_eq!(complete["provider"], "anthropic");
    assert_eq!(delta_text(&turn.events, None), PROMPT);
    assert!(
        took < Duration::from_secs(10),
        "the answer came {took:?} after asking; the hanging deployment's first-token \
         timeout is 500 ms (the server default is 60 s)"
    );
    let failovers = turn.failovers();
    assert_eq!(failovers.len(), 1, "{:#?}", turn.events);
    assert_eq!(failovers[0]["reason"], "timeout", "{}", failovers[0]);
    assert_eq!(setup.calls("ha").len(), 1);
    // Chorus hung up on the stalled request instead of leaving it open.
    assert!(
        eventually(Duration::from_secs(10), || setup.upstream.active_hangs()
            == 0)
        .await,
        "the hanging upstream request was not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_length_error_goes_to_the_context_fallback_not_the_fallbacks() {
    let mut models = Vec::new();
    for p in PROVIDERS {
        models.push(model_toml(
            &format!("{p}-small"),
            &format!("fallbacks = [\"{p}-general\"]\ncontext_fallbacks = [\"{p}-long\"]"),
            &[dep(
                &format!("{p}-small-d"),
                p,
                &format!("{p}-s;error=context"),
                0,
            )],
        ));
        models.push(model_toml(
            &format!("{p}-general"),
            "",
            &[dep(&format!("{p}-general-d"), p, &format!("{p}-g"), 0)],
        ));
        models.push(model_toml(
            &format!("{p}-long"),
            "",
            &[dep(&format!("{p}-long-d"), p, &format!("{p}-l"), 0)],
        ));
    }
    let setup = setup(&models, &[]).await;
    let user = setup.app.register_user().await;
    for provider in PROVIDERS {
        let turn = setup.turn(user.token(), &format!("{provider}-small")).await;
        let complete = turn.complete();
        assert_eq!(complete["status"], "complete", "{provider}: {complete}");
        assert_eq!(complete["model_used"], format!("{provider}-long"));
        assert_eq!(complete["deployment"], format!("{provider}-long-d"));
        assert_eq!(delta_text(&turn.events, None), PROMPT);
        let failovers = turn.failovers();
        assert_eq!(failovers.len(), 1, "{provider}: {:#?}", turn.events);
        assert_eq!(failovers[0]["to_model"], format!("{provider}-long"));
        assert_eq!(
            failovers[0]["reason"], "context_too_long",
            "{}",
            failovers[0]
        );

        assert_eq!(
            setup.calls(&format!("{provider}-s")).len(),
            1,
            "{provider}: no retry of a prompt that cannot fit"
        );
        assert_eq!(setup.calls(&format!("{provider}-l")).len(), 1);
        assert!(
            setup.calls(&format!("{provider}-g")).is_empty(),
            "{provider}: the general fallback cannot fit the prompt either"
        );
        let stored = setup
            .app
            .thread_message(user.token(), &turn.thread, turn.message_id())
            .await;
        assert_eq!(stored["status"], "complete");
        assert_eq!(stored["deployment"], format!("{provider}-long-d"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_continues_on_the_next_deployment() {
    let models: Vec<String> = PROVIDERS
        .iter()
        .map(|&p| {
            model_toml(
                &format!("{p}-cuts"),
                "",
                &[
                    dep(
                        &format!("{p}-cutter"),
                        p,
                        &format!("{p}-c;tokens=10;cut_after=3"),
                        0,
                    ),
                    dep(&format!("{p}-finisher"), p, &format!("{p}-f"), 1),
                ],
            )
        })
        .collect();
    let setup = setup(&models, &[]).await;
    let user = setup.app.register_user().await;
    let partial = lorem(3);
    for provider in PROVIDERS {
        let turn = setup.turn(user.token(), &format!("{provider}-cuts")).await;
        let names = turn.names();
        // Three words, the cut announced, then the rest from the next deployment.
        let status_at = names
            .iter()
            .position(|n| *n == "status")
            .unwrap_or_else(|| panic!("{provider}: no status event: {names:?}"));
        let before: String = delta_text(&turn.events[..status_at], None);
        assert_eq!(before.trim_end(), partial, "{provider}: {names:?}");
        assert_eq!(turn.failovers().len(), 1, "{provider}: {:#?}", turn.events);
        assert!(
            !names.contains(&"error"),
            "{provider}: a continued answer is not an error: {names:?}"
        );
        let text = delta_text(&turn.events, None);
        assert!(
            text.starts_with(&before) && text.len() > before.len(),
            "{provider}: the answer goes on after the cut: {text:?}"
        );
        // The finisher echoes the prompt after the partial answer it was given as a prefix.
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>().join(" "),
            format!("{partial} {PROMPT}"),
            "{provider}"
        );
        let complete = turn.complete();
        assert_eq!(complete["status"], "complete", "{provider}: {complete}");
        assert_eq!(complete["deployment"], format!("{provider}-finisher"));

        let finisher = setup.calls(&format!("{provider}-f"));
        assert_eq!(finisher.len(), 1, "{provider}");
        let (role, prefix) = last_message(&finisher[0]);
        assert!(
            role == "assistant" || role == "model",
            "{provider}: the continuation ends with the partial answer as the assistant's: \
             {role} {prefix:?}"
        );
        assert_eq!(prefix.trim_end(), partial, "{provider}");

        let stored = setup
            .app
            .thread_message(user.token(), &turn.thread, turn.message_id())
            .await;
        assert_eq!(stored["status"], "complete", "{provider}: {stored}");
        assert_eq!(stored["content"], text.as_str());
        assert_eq!(stored["deployment"], format!("{provider}-finisher"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_fails_with_its_partial_text_when_the_model_does_not_continue() {
    let models: Vec<String> = ["openai", "anthropic"]
        .iter()
        .map(|&p| {
            model_toml(
                &format!("{p}-cuts"),
                "continue_after_cut = false",
                &[
                    dep(
                        &format!("{p}-cutter"),
                        p,
                        &format!("{p}-c;tokens=10;cut_after=3"),
                        0,
                    ),
                    dep(&format!("{p}-finisher"), p, &format!("{p}-f"), 1),
                ],
            )
        })
        .collect();
    let setup = setup(&models, &[]).await;
    let user = setup.app.register_user().await;
    for provider in ["openai", "anthropic"] {
        let turn = setup.turn(user.token(), &format!("{provider}-cuts")).await;
        let names = turn.names();
        let text = delta_text(&turn.events, None);
        assert_eq!(text.trim_end(), lorem(3), "{provider}: {names:?}");
        assert!(turn.failovers().is_empty(), "{provider}: {names:?}");
        let error = turn
            .events
            .iter()
            .find(|e| e.name() == "error")
            .unwrap_or_else(|| panic!("{provider}: no error event: {names:?}"));
        assert!(error.data["code"].is_string(), "{}", error.data);
        let complete = turn.complete();
        assert_eq!(complete["status"], "failed", "{provider}: {complete}");
        assert_eq!(complete["deployment"], format!("{provider}-cutter"));
        assert!(setup.calls(&format!("{provider}-f")).is_empty());

        let stored = setup
            .app
            .thread_message(user.token(), &turn.thread, turn.message_id())
            .await;
        assert_eq!(stored["status"], "failed", "{provider}: {stored}");
        assert_eq!(stored["content"], text.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_probes_after_its_cool_down_and_closes_on_success() {
    let models = [model_toml(
        "guarded",
        "",
        &[
            dep("guard-a", "openai", "ga", 0),
            dep("guard-b", "openai", "gb", 1),
        ],
    )];
    let setup = setup(
        &models,
        &[
            ("CHORUS__ROUTING__BREAKER_CONSECUTIVE_FAILURES", "2"),
            ("CHORUS__ROUTING__BREAKER_COOLDOWN_SECS", "1"),
        ],
    )
    .await;
    let user = setup.app.register_user().await;
    let token = user.token();
    setup.upstream.set_model_options("ga", "error=500").unwrap();

    // Two failures in a row on A (each turn answered by B) open A's breaker.
    for n in 1..=2 {
        let turn = setup.turn(token, "guarded").await;
        assert_eq!(turn.complete()["deployment"], "guard-b", "turn {n}");
        assert_eq!(turn.failovers().len(), 1, "turn {n}: {:#?}", turn.events);
        assert_eq!(setup.calls("ga").len(), n);
    }
    let opened_at = Instant::now();
    // Open: A gets nothing, and nobody waits for it.
    for _ in 0..2 {
        let turn = setup.turn(token, "guarded").await;
        assert_eq!(turn.complete()["deployment"], "guard-b");
        assert!(turn.failovers().is_empty(), "{:#?}", turn.events);
    }
    assert!(
        opened_at.elapsed() < Duration::from_millis(900),
        "the open-breaker turns must run within the 1 s cool-down for this test to mean anything"
    );
    assert_eq!(setup.calls("ga").len(), 2, "no calls to an open deployment");
    // The admin view shows it: A open and unhealthy, B closed and serving.
    let admin = setup.app.register_admin().await;
    let view = deployment_views(&setup, admin.token()).await;
    assert_eq!(view["guard-a"]["breaker"], "open", "{view:#?}");
    assert_eq!(view["guard-a"]["healthy"], false);
    assert_eq!(view["guard-a"]["consecutive_failures"], 2);
    assert_eq!(view["guard-b"]["breaker"], "closed");
    assert_eq!(view["guard-b"]["healthy"], true);

    // After the cool-down one probe goes to A; it fails, so the breaker opens again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let probe = setup.turn(token, "guarded").await;
    assert_eq!(probe.complete()["deployment"], "guard-b");
    assert_eq!(probe.failovers().len(), 1);
    assert_eq!(setup.calls("ga").len(), 3, "exactly one probe");
    let reopened = setup.turn(token, "guarded").await;
    assert_eq!(reopened.complete()["deployment"], "guard-b");
    assert!(reopened.failovers().is_empty(), "{:#?}", reopened.events);
    assert_eq!(
        setup.calls("ga").len(),
        3,
        "a failed probe reopens the breaker"
    );

    // A recovers: the next probe succeeds, the breaker closes and A takes the traffic again.
    setup.upstream.set_model_options("ga", "").unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for n in 4..=6 {
        let turn = setup.turn(token, "guarded").await;
        assert_eq!(
            turn.complete()["deployment"],
            "guard-a",
            "{:#?}",
            turn.events
        );
        assert!(turn.failovers().is_empty());
        assert_eq!(delta_text(&turn.events, None), PROMPT);
        assert_eq!(setup.calls("ga").len(), n);
    }
    assert_eq!(setup.calls("gb").len(), 6);
    let view = deployment_views(&setup, admin.token()).await;
    assert_eq!(view["guard-a"]["breaker"], "closed", "{view:#?}");
    assert_eq!(view["guard-a"]["consecutive_failures"], 0);
    // Non-admins do not see the pools.
    let response = setup.app.get("/api/v1/admin/providers", token).await;
    assert_eq!(response.status(), 403);
    // The metrics count calls by outcome.
    let metrics = setup
        .app
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("provider_calls_total")
                && l.contains("deployment=\"guard-a\"")
                && l.contains("outcome=\"server_error\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );
}

/// `GET /api/v1/admin/providers` as `{deployment id: deployment}`.
async fn deployment_views(setup: &Setup, admin_token: &str) -> serde_json::Map<String, Value> {
    let response = setup.app.get("/api/v1/admin/providers", admin_token).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["providers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["deployments"].as_array().unwrap().iter())
        .map(|d| (d["id"].as_str().unwrap().to_owned(), d.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_deployment_down_is_a_502_with_the_turn_stored_as_failed() {
    let models = [model_toml(
        "down",
        "",
        &[
            dep("down-a", "openai", "da;error=500", 0),
            dep("down-b", "anthropic", "db;error=500", 1),
        ],
    )];
    let setup = setup(&models, &[]).await;
    let user = setup.app.register_user().await;
    let token = user.token();
    for stream in [false, true] {
        let thread = setup.thread(token).await;
        let response = setup
            .app
            .post_message(
                token,
                &thread,
                &json!({ "content": PROMPT, "model": "down", "stream": stream }),
            )
            .await;
        let error = assert_error(response, 502, "PROVIDER_ERROR").await;
        assert_eq!(error["details"]["class"], "server_error", "{error}");
        let user_message_id = error["details"]["user_message_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no user_message_id: {error}"));

        // What the user wrote is kept; the answer that never came is stored as failed.
        let messages = setup.app.thread_messages(token, &thread).await;
        assert_eq!(messages.len(), 2, "stream={stream}: {messages:#?}");
        let user_message = messages
            .iter()
            .find(|m| m["id"] == user_message_id)
            .unwrap_or_else(|| panic!("the user message is not stored: {messages:#?}"));
        assert_eq!(user_message["role"], "user");
        assert_eq!(user_message["content"], PROMPT);
        let assistant = messages
            .iter()
            .find(|m| m["role"] == "assistant")
            .unwrap_or_else(|| panic!("no assistant message: {messages:#?}"));
        assert_eq!(
            assistant["status"], "failed",
            "stream={stream}: {assistant}"
        );
        assert_eq!(assistant["content"], "");
    }
    // Both deployments were tried (and retried) before giving up.
    assert!(setup.calls("da").len() >= 2);
    assert!(setup.calls("db").len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_own_provider_key_is_used_for_their_turns_only() {
    let models = [
        model_toml("own-openai", "", &[dep("own-o", "openai", "oo", 0)]),
        model_toml("own-anthropic", "", &[dep("own-a", "anthropic", "oa", 0)]),
    ];
    let setup = setup(&models, &[]).await;
    let owner = setup.app.register_user().await;
    let other = setup.app.register_user().await;
    for (provider, key) in [
        ("openai", "sk-user-own-openai"),
        ("anthropic", "sk-ant-user-own"),
    ] {
        let response = setup
            .app
            .request(
                reqwest::Method::PUT,
                &format!("/api/v1/me/provider-keys/{provider}"),
            )
            .bearer_auth(owner.token())
            .json(&json!({ "api_key": key }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
    }

    for (session, openai_key, anthropic_key) in [
        (&owner, "sk-user-own-openai", "sk-ant-user-own"),
        (&other, MOCK_OPENAI_KEY, MOCK_ANTHROPIC_KEY),
        (&owner, "sk-user-own-openai", "sk-ant-user-own"),
    ] {
        setup.upstream.clear_requests();
        let turn = setup.turn(session.token(), "own-openai").await;
        assert_eq!(turn.complete()["status"], "complete");
        let calls = setup.calls("oo");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].header("authorization"),
            Some(format!("Bearer {openai_key}").as_str())
        );

        let turn = setup.turn(session.token(), "own-anthropic").await;
        assert_eq!(turn.complete()["status"], "complete");
        let calls = setup.calls("oa");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].header("x-api-key"), Some(anthropic_key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_keys_leave_a_shared_deployments_rate_limit_alone() {
    let models = [model_toml(
        "metered",
        "",
        &[Dep {
            extra: "rpm = 2",
            ..dep("metered-a", "openai", "me", 0)
        }],
    )];
    let setup = setup(&models, &[]).await;
    let owner = setup.app.register_user().await;
    let shared = setup.app.register_user().await;
    let response = setup
        .app
        .request(reqwest::Method::PUT, "/api/v1/me/provider-keys/openai")
        .bearer_auth(owner.token())
        .json(&json!({ "api_key": "sk-user-own-openai" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    // Three turns on the owner's key: more than the deployment's 2 per minute, none counted.
    for _ in 0..3 {
        let turn = setup.turn(owner.token(), "metered").await;
        assert_eq!(turn.complete()["status"], "complete");
    }
    let admin = setup.app.register_admin().await;
    let view = deployment_views(&setup, admin.token()).await;
    assert_eq!(
        view["metered-a"]["bucket_levels"]["requests_remaining"], 2,
        "{view:#?}"
    );
    // The shared key still has the deployment's whole minute.
    for _ in 0..2 {
        let turn = setup.turn(shared.token(), "metered").await;
        assert_eq!(turn.complete()["status"], "complete");
    }
    let view = deployment_views(&setup, admin.token()).await;
    assert_eq!(view["metered-a"]["bucket_levels"]["requests_remaining"], 0);
    let calls = setup.calls("me");
    assert_eq!(calls.len(), 5);
    let shared_calls = calls
        .iter()
        .filter(|c| c.header("authorization") == Some(format!("Bearer {MOCK_OPENAI_KEY}").as_str()))
        .count();
    assert_eq!(shared_calls, 2);
    // A third shared call finds the deployment's minute used up: refused, not sent.
    let response = setup
        .app
        .request(
            reqwest::Method::POST,
            &format!(
                "/api/v1/threads/{}/messages",
                setup.thread(shared.token()).await
            ),
        )
        .bearer_auth(shared.token())
        .json(&json!({ "content": "one more", "models": ["metered"], "stream": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429, "{}", response.text().await.unwrap());
    assert_eq!(setup.calls("me").len(), 5);
}
