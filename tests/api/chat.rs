//! Chat turns through the real server with the built-in mock models: the SSE event protocol,
//! what is stored, several models in one turn, `stream: false`, disconnects, cancel, resume
//! (`Last-Event-ID` and `?after=`), several watchers, isolation between users, bad input,
//! summaries and the model list.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    SseEvent, TestApp, TestModel, assert_contiguous, assert_error, body_json, catalogue_toml,
    delta_text, event_names, id_of, lorem, message_of,
};

/// 40 words, 50 ms apart: long enough to act while it streams, short enough to wait for.
const SLOW: &str = "mock-slow";
const SLOW_WORDS: usize = 40;
/// 400 words, 50 ms apart (20 s): only ever cancelled.
const CRAWL: &str = "mock-crawl";
const CRAWL_WORDS: usize = 400;
/// Another crawling model, for two-model turns.
const CRAWL_B: &str = "mock-crawl-b";
/// Thinks for 8 s before its first word.
const LATE: &str = "mock-late";

/// A server whose catalogue adds slow mock models.
async fn chat_app() -> TestApp {
    TestApp::builder()
        .models_toml(&catalogue_toml(&[
            TestModel::new(SLOW, "mock", "lorem;words=40;delay_ms=50"),
            TestModel::new(CRAWL, "mock", "lorem;words=400;delay_ms=50"),
            TestModel::new(CRAWL_B, "mock", "lorem;words=300;delay_ms=50"),
            TestModel::new(LATE, "mock", "lorem;words=5;ttft_ms=8000"),
        ]))
        .spawn()
        .await
}

fn data<'a>(events: &'a [SseEvent], name: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e.name() == name)
        .map(|e| &e.data)
        .collect()
}

fn str_of(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
        .to_owned()
}

#[tokio::test]
async fn a_streamed_turn_sends_ordered_events_and_stores_both_messages() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let content = "the quick brown fox jumps over the lazy dog again";

    let response = app
        .post_message(
            session.token(),
            &thread,
            &json!({ "content": content, "model": "mock-echo" }),
        )
        .await;
    assert_eq!(
        response
            .headers()
            .get("x-accel-buffering")
            .and_then(|v| v.to_str().ok()),
        Some("no"),
        "a live stream must ask proxies not to buffer"
    );
    let mut stream = crate::helpers::sse_of(response).await;
    let events = stream.until_done().await;
    assert!(
        stream.rest().await.is_empty(),
        "the POST stream ends after `done`"
    );

    // Order: message_start, one delta per word, message_complete, done.
    let names = event_names(&events);
    let mut expected = vec!["message_start".to_owned()];
    expected.extend(std::iter::repeat_n("delta".to_owned(), 10));
    expected.extend(["message_complete".to_owned(), "done".to_owned()]);
    assert_eq!(names, expected, "{events:#?}");
    assert_contiguous(&events);

    let start = &events[0].data;
    let turn_id = str_of(&start["turn_id"]);
    let message_id = str_of(&start["message_id"]);
    let user_message_id = str_of(&start["user_message_id"]);
    assert_eq!(start["thread_id"], thread.as_str());
    assert_eq!(start["model"], "mock-echo");
    assert_ne!(message_id, user_message_id);
    for delta in data(&events, "delta") {
        assert_eq!(delta["message_id"], message_id.as_str(), "{delta}");
    }
    assert_eq!(delta_text(&events, Some(&message_id)), content);

    let complete = &events[events.len() - 2].data;
    assert_eq!(complete["message_id"], message_id.as_str());
    assert_eq!(complete["status"], "complete");
    assert_eq!(complete["finish_reason"], "stop");
    assert_eq!(
        complete["usage"],
        json!({ "input_tokens": 10, "output_tokens": 10 })
    );
    assert_eq!(complete["cost_usd"], 0.0);
    assert_eq!(complete["provider"], "mock");
    assert!(complete["latency_ms"].is_u64(), "{complete}");
    assert!(complete["ttft_ms"].is_u64(), "{complete}");
    assert_eq!(events.last().unwrap().data, json!({ "turn_id": turn_id }));

    // Stored: the user message, then the assistant's answer, both complete.
    let messages = app.thread_messages(session.token(), &thread).await;
    assert_eq!(messages.len(), 2, "{messages:#?}");
    let (user, assistant) = (&messages[0], &messages[1]);
    assert_eq!(user["id"], user_message_id.as_str());
    assert_eq!(user["role"], "user");
    assert_eq!(user["content"], content);
    assert_eq!(user["status"], "complete");
    assert_eq!(user["model"], "mock-echo");
    assert_eq!(user["turn_id"], turn_id.as_str());
    assert_eq!(assistant["id"], message_id.as_str());
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(assistant["thread_id"], thread.as_str());
    assert_eq!(assistant["model"], "mock-echo");
    assert_eq!(assistant["content"], content);
    assert_eq!(assistant["status"], "complete");
    assert_eq!(
        assistant["usage"],
        json!({ "input_tokens": 10, "output_tokens": 10 })
    );
    assert_eq!(assistant["provider"], "mock");
    assert_eq!(assistant["parent_id"], user_message_id.as_str());
    assert_eq!(assistant["turn_id"], turn_id.as_str());
    assert!(assistant["latency_ms"].is_u64(), "{assistant}");
    assert!(assistant["ttft_ms"].is_u64(), "{assistant}");
    assert!(assistant["cost_usd"].is_number(), "{assistant}");

    // The untitled thread is named after the first words of the first message.
    let stored = app.get_thread(session.token(), &thread).await;
    assert_eq!(
        stored["title"], "the quick brown fox jumps over the lazy…",
        "{stored}"
    );
    assert_eq!(stored["message_count"], 2, "{stored}");

    // A second turn continues the thread's numbering and sends the history to the model: the
    // echo model counts every word it was sent (10 + 10 + 2).
    let second = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "second question", "model": "mock-echo" }),
        )
        .await;
    assert!(second[0].seq() > events.last().unwrap().seq());
    assert_contiguous(&second);
    assert_eq!(delta_text(&second, None), "second question");
    let complete = data(&second, "message_complete")[0];
    assert_eq!(
        complete["usage"],
        json!({ "input_tokens": 22, "output_tokens": 2 })
    );
    let stored = app.get_thread(session.token(), &thread).await;
    assert_eq!(
        stored["title"], "the quick brown fox jumps over the lazy…",
        "a thread keeps its first title"
    );
    assert_eq!(app.thread_messages(session.token(), &thread).await.len(), 4);
}

#[tokio::test]
async fn one_turn_can_ask_two_models() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let content = "compare these two answers";
    let events = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": content, "models": ["mock-echo", "mock-lorem"] }),
        )
        .await;
    assert_contiguous(&events);
    let names = event_names(&events);
    assert_eq!(names.last().map(String::as_str), Some("done"));
    assert_eq!(
        names.iter().filter(|n| *n == "done").count(),
        1,
        "{names:?}"
    );

    let starts = data(&events, "message_start");
    assert_eq!(starts.len(), 2, "{events:#?}");
    assert_eq!(starts[0]["turn_id"], starts[1]["turn_id"]);
    assert_eq!(starts[0]["user_message_id"], starts[1]["user_message_id"]);
    assert_ne!(starts[0]["message_id"], starts[1]["message_id"]);
    let id_for = |model: &str| {
        starts
            .iter()
            .find(|s| s["model"] == model)
            .map(|s| str_of(&s["message_id"]))
            .unwrap_or_else(|| panic!("no message_start for {model}: {starts:?}"))
    };
    let (echo_id, lorem_id) = (id_for("mock-echo"), id_for("mock-lorem"));
    assert_eq!(delta_text(&events, Some(&echo_id)), content);
    assert_eq!(delta_text(&events, Some(&lorem_id)), lorem(40));

    let completes = data(&events, "message_complete");
    assert_eq!(completes.len(), 2);
    assert!(
        completes.iter().all(|c| c["status"] == "complete"),
        "{completes:?}"
    );
    // Each leg's message_complete comes after its own deltas.
    for id in [&echo_id, &lorem_id] {
        let last_delta = events
            .iter()
            .rposition(|e| e.name() == "delta" && e.data["message_id"] == id.as_str())
            .unwrap();
        let complete = events
            .iter()
            .position(|e| e.name() == "message_complete" && e.data["message_id"] == id.as_str())
            .unwrap();
        assert!(last_delta < complete);
    }

    let messages = app.thread_messages(session.token(), &thread).await;
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert_eq!(messages[0]["role"], "user");
    assert!(
        messages[0]["model"].is_null(),
        "a message to several models names none"
    );
    let stored = |id: &str| messages.iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!(stored(&echo_id)["content"], content);
    assert_eq!(stored(&echo_id)["model"], "mock-echo");
    assert_eq!(stored(&lorem_id)["content"], lorem(40));
    assert_eq!(stored(&lorem_id)["model"], "mock-lorem");
    assert_eq!(stored(&lorem_id)["status"], "complete");
}

#[tokio::test]
async fn stream_false_answers_with_the_settled_messages() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let response = app
        .post_message(
            session.token(),
            &thread,
            &json!({ "content": "no stream please", "model": "mock-echo", "stream": false }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_json(response).await;
    let turn_id = str_of(&body["turn_id"]);
    assert_eq!(body["user_message"]["role"], "user");
    assert_eq!(body["user_message"]["content"], "no stream please");
    assert_eq!(body["user_message"]["turn_id"], turn_id.as_str());
    let answers = body["assistant_messages"].as_array().unwrap();
    assert_eq!(answers.len(), 1, "{body}");
    let answer = &answers[0];
    assert_eq!(answer["content"], "no stream please");
    assert_eq!(answer["status"], "complete");
    assert_eq!(answer["role"], "assistant");
    assert_eq!(answer["model"], "mock-echo");
    assert_eq!(answer["provider"], "mock");
    assert_eq!(
        answer["usage"],
        json!({ "input_tokens": 3, "output_tokens": 3 })
    );
    assert_eq!(answer["turn_id"], turn_id.as_str());
    assert_eq!(answer["parent_id"], body["user_message"]["id"]);

    let messages = app.thread_messages(session.token(), &thread).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["id"], body["user_message"]["id"]);
    assert_eq!(messages[1], *answer, "the answer is what was stored");

    // Two models, settled together.
    let response = app
        .post_message(
            session.token(),
            &thread,
            &json!({ "content": "both of you", "models": ["mock-echo", "mock-lorem"], "stream": false }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_json(response).await;
    let answers = body["assistant_messages"].as_array().unwrap();
    assert_eq!(answers.len(), 2, "{body}");
    assert!(answers.iter().all(|a| a["status"] == "complete"), "{body}");
    let texts: Vec<&str> = answers
        .iter()
        .map(|a| a["content"].as_str().unwrap())
        .collect();
    assert!(texts.contains(&"both of you"), "{texts:?}");
    assert!(texts.contains(&lorem(40).as_str()), "{texts:?}");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_does_not_stop_the_turn() {
    let app = chat_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut stream = app
        .send_streaming(
            session.token(),
            &thread,
            &json!({ "content": "keep going without me", "model": SLOW }),
        )
        .await;
    let seen = stream.until_event("delta").await;
    let message_id = str_of(&seen[0].data["message_id"]);
    drop(stream);

    let stored = app
        .wait_for_message_status(session.token(), &thread, &message_id, "complete")
        .await;
    assert_eq!(stored["content"], lorem(SLOW_WORDS));
    assert_eq!(stored["usage"]["output_tokens"], SLOW_WORDS);
    assert_eq!(stored["provider"], "mock");
}

#[tokio::test]
async fn cancel_interrupts_the_turn_and_keeps_the_partial_text() {
    let app = chat_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut stream = app
        .send_streaming(
            session.token(),
            &thread,
            &json!({ "content": "a long answer please", "model": CRAWL }),
        )
        .await;
    let mut events = stream.until_event("delta").await;
    let turn_id = str_of(&events[0].data["turn_id"]);
    let message_id = str_of(&events[0].data["message_id"]);

    // The turn belongs to its thread: cancelling it through another thread is 404.
    let other = id_of(&app.create_thread(session.token(), &json!({})).await);
    let response = app.cancel_turn(session.token(), &other, &turn_id).await;
    assert_error(response, 404, "NOT_FOUND").await;

    let response = app.cancel_turn(session.token(), &thread, &turn_id).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body = body_json(response).await;
    assert_eq!(body["turn_id"], turn_id.as_str());

    events.extend(stream.until_done().await);
    assert!(stream.rest().await.is_empty());
    assert_contiguous(&events);
    let names = event_names(&events);
    assert_eq!(
        &names[names.len() - 2..],
        ["message_complete", "done"],
        "{names:?}"
    );
    assert!(
        !names.contains(&"error".to_owned()),
        "a cancel is not an error: {events:#?}"
    );
    let complete = &events[events.len() - 2].data;
    assert_eq!(complete["message_id"], message_id.as_str());
    assert_eq!(complete["status"], "interrupted", "{complete}");

    let partial = delta_text(&events, Some(&message_id));
    let full = lorem(CRAWL_WORDS);
    assert!(!partial.is_empty());
    assert!(
        partial.len() < full.len(),
        "the turn must stop early: {partial}"
    );
    assert!(full.starts_with(&partial), "{partial}");

    let stored = app
        .thread_message(session.token(), &thread, &message_id)
        .await;
    assert_eq!(stored["status"], "interrupted", "{stored}");
    assert_eq!(
        stored["content"],
        partial.as_str(),
        "the partial text is kept"
    );
    assert!(
        stored["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0,
        "usage is settled for an interrupted answer too: {stored}"
    );

    // A settled turn is no longer live: cancelling it again is 404 (once the session noticed).
    let started = std::time::Instant::now();
    loop {
        let response = app.cancel_turn(session.token(), &thread, &turn_id).await;
        if response.status() == StatusCode::NOT_FOUND {
            assert_error(response, 404, "NOT_FOUND").await;
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "cancelling a finished turn still answers {}",
            response.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for turn in [uuid::Uuid::now_v7().to_string(), "not-a-turn".to_owned()] {
        let response = app.cancel_turn(session.token(), &thread, &turn).await;
        assert_error(response, 404, "NOT_FOUND").await;
    }
}

/// Reads the start of a slow turn, hangs up, and resumes with `resume(last_id)`; checks the two
/// parts join without a gap or a duplicate.
async fn resume_after_disconnect(by_header: bool) {
    let app = chat_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut stream = app
        .send_streaming(
            session.token(),
            &thread,
            &json!({ "content": "resume me", "model": SLOW }),
        )
        .await;
    let mut first = stream.until_event("delta").await;
    first.extend(stream.until_event("delta").await);
    first.extend(stream.until_event("delta").await);
    drop(stream);
    let last = first.last().unwrap().seq();

    let mut resumed = if by_header {
        app.open_events(session.token(), &thread, "", Some(last))
            .await
    } else {
        app.open_events(session.token(), &thread, &format!("?after={last}"), None)
            .await
    };
    let rest = resumed.until_done().await;
    drop(resumed);
    assert_eq!(
        rest[0].seq(),
        last + 1,
        "resuming continues right after the last seen id"
    );
    let mut all = first.clone();
    all.extend(rest.iter().cloned());
    assert_contiguous(&all);
    let names = event_names(&all);
    assert_eq!(names.iter().filter(|n| *n == "message_start").count(), 1);
    assert_eq!(&names[names.len() - 2..], ["message_complete", "done"]);
    assert_eq!(delta_text(&all, None), lorem(SLOW_WORDS));
    assert_eq!(all[all.len() - 2].data["status"], "complete");

    // After the turn: the log still replays it from any point.
    let start = first[0].seq();
    let mut replay = app
        .open_events(
            session.token(),
            &thread,
            &format!("?after={}", start - 1),
            None,
        )
        .await;
    let replayed = replay.until_done().await;
    assert_eq!(
        replayed
            .iter()
            .map(|e| (e.seq(), e.raw.clone()))
            .collect::<Vec<_>>(),
        all.iter()
            .map(|e| (e.seq(), e.raw.clone()))
            .collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn resume_with_last_event_id_continues_without_gap_or_duplicate() {
    resume_after_disconnect(true).await;
}

#[tokio::test]
async fn resume_with_after_continues_without_gap_or_duplicate() {
    resume_after_disconnect(false).await;
}

#[tokio::test]
async fn bad_resume_cursors_are_rejected() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let response = app
        .request(Method::GET, &format!("/api/v1/threads/{thread}/events"))
        .bearer_auth(session.token())
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "VALIDATION_ERROR").await;
    let response = app
        .get(
            &format!("/api/v1/threads/{thread}/events?after=soon"),
            session.token(),
        )
        .await;
    let error = assert_error(response, 400, "VALIDATION_ERROR").await;
    assert!(
        message_of(&error).contains("after") || error["details"]["field"] == "after",
        "{error}"
    );
}

#[tokio::test]
async fn two_watchers_see_the_same_events_as_the_sender() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut first = app.open_events(session.token(), &thread, "", None).await;
    let mut second = app.open_events(session.token(), &thread, "", None).await;
    let sent = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "everyone sees this", "model": "mock-echo" }),
        )
        .await;
    let key = |events: &[SseEvent]| {
        events
            .iter()
            .map(|e| (e.seq(), e.name().to_owned(), e.raw.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&first.until_done().await), key(&sent));
    assert_eq!(key(&second.until_done().await), key(&sent));
}

#[tokio::test]
async fn a_watcher_joining_mid_turn_sees_the_whole_turn() {
    let app = chat_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut stream = app
        .send_streaming(
            session.token(),
            &thread,
            &json!({ "content": "second tab", "model": SLOW }),
        )
        .await;
    stream.until_event("delta").await;
    let mut watcher = app.open_events(session.token(), &thread, "", None).await;
    let watched = watcher.until_done().await;
    let sent = {
        let mut all = stream.seen.clone();
        all.extend(stream.until_done().await);
        all
    };
    assert_eq!(
        watched
            .iter()
            .map(|e| (e.seq(), e.raw.clone()))
            .collect::<Vec<_>>(),
        sent.iter()
            .map(|e| (e.seq(), e.raw.clone()))
            .collect::<Vec<_>>(),
        "a second tab sees the running turn from its first event"
    );
}

#[tokio::test]
async fn an_idle_event_stream_gets_keep_alive_comments() {
    let app = TestApp::builder()
        .env("CHORUS__TURNS__KEEP_ALIVE_SECS", "1")
        .spawn()
        .await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut watcher = app.open_events(session.token(), &thread, "", None).await;
    watcher.wait_for_comment().await;
    assert!(
        watcher.comments.iter().any(|c| c == "keep-alive"),
        "{:?}",
        watcher.comments
    );
    // The stream is still usable afterwards.
    app.chat_turn(
        session.token(),
        &thread,
        &json!({ "content": "still there", "model": "mock-echo" }),
    )
    .await;
    let events = watcher.until_done().await;
    assert_eq!(delta_text(&events, None), "still there");
}

#[tokio::test]
async fn another_user_cannot_send_watch_or_cancel_in_a_thread() {
    let app = chat_app().await;
    let owner = app.register_user().await;
    let intruder = app.register_user().await;
    let thread = id_of(&app.create_thread(owner.token(), &json!({})).await);
    let mut stream = app
        .send_streaming(
            owner.token(),
            &thread,
            &json!({ "content": "mine only", "model": SLOW }),
        )
        .await;
    let start = stream.until_event("message_start").await;
    let turn_id = str_of(&start[0].data["turn_id"]);
    let message_id = str_of(&start[0].data["message_id"]);

    let response = app
        .post_message(
            intruder.token(),
            &thread,
            &json!({ "content": "let me in", "model": "mock-echo" }),
        )
        .await;
    assert_error(response, 404, "NOT_FOUND").await;
    let response = app
        .post_message(
            intruder.token(),
            &thread,
            &json!({ "content": "let me in", "model": "mock-echo", "stream": false }),
        )
        .await;
    assert_error(response, 404, "NOT_FOUND").await;
    let response = app
        .get(
            &format!("/api/v1/threads/{thread}/events"),
            intruder.token(),
        )
        .await;
    assert_error(response, 404, "NOT_FOUND").await;
    let response = app
        .get_anon(&format!(
            "/api/v1/threads/{thread}/events?access_token={}",
            intruder.token()
        ))
        .await;
    assert_error(response, 404, "NOT_FOUND").await;
    let response = app.cancel_turn(intruder.token(), &thread, &turn_id).await;
    assert_error(response, 404, "NOT_FOUND").await;
    let response = app
        .post_json(
            &format!("/api/v1/threads/{thread}/summarize"),
            Some(intruder.token()),
            &json!({}),
        )
        .await;
    assert_error(response, 404, "NOT_FOUND").await;

    // The owner's turn was not touched.
    let events = stream.until_done().await;
    assert_eq!(events[events.len() - 2].data["status"], "complete");
    let stored = app
        .thread_message(owner.token(), &thread, &message_id)
        .await;
    assert_eq!(stored["status"], "complete");
    assert_eq!(stored["content"], lorem(SLOW_WORDS));
    let messages = app.thread_messages(owner.token(), &thread).await;
    assert_eq!(messages.len(), 2, "nothing of the intruder's was stored");
    // Without auth at all: 401.
    let response = app
        .get_anon(&format!("/api/v1/threads/{thread}/events"))
        .await;
    assert_error(response, 401, "UNAUTHENTICATED").await;
    let response = app
        .post_json(
            &format!("/api/v1/threads/{thread}/messages"),
            None,
            &json!({ "content": "anonymous" }),
        )
        .await;
    assert_error(response, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn bad_messages_are_rejected_and_change_nothing() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let cases = [
        (json!({ "content": "" }), "content"),
        (json!({ "content": "   \n\t " }), "content"),
        (json!({}), "content"),
        (json!({ "content": 5 }), "content"),
        (
            json!({ "content": "hi", "model": "no-such-model" }),
            "no-such-model",
        ),
        (json!({ "content": "hi", "model": "has space" }), "model"),
        (
            json!({ "content": "hi", "models": ["mock-echo", "nope"] }),
            "nope",
        ),
        (
            json!({ "content": "hi", "models": ["a", "b", "c", "d", "e"] }),
            "models",
        ),
        (
            json!({ "content": "hi", "model": "mock-echo", "models": ["mock-lorem"] }),
            "model",
        ),
        (json!({ "content": "hi", "colour": "red" }), "colour"),
        (
            json!({ "content": "hi", "temperature": 2.5 }),
            "temperature",
        ),
        (
            json!({ "content": "hi", "temperature": -0.1 }),
            "temperature",
        ),
        (
            json!({ "content": "hi", "temperature": "hot" }),
            "temperature",
        ),
        (json!({ "content": "hi", "max_tokens": 0 }), "max_tokens"),
        (json!({ "content": "hi", "max_tokens": -3 }), "max_tokens"),
        (json!({ "content": "hi", "stream": "yes" }), "stream"),
    ];
    for (body, needle) in cases {
        let response = app.post_message(session.token(), &thread, &body).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        let message = message_of(&error);
        assert!(
            message.contains(needle) || error["details"]["field"] == needle,
            "{body}: the error should name `{needle}`: {error}"
        );
    }
    let response = app
        .send_raw(
            Method::POST,
            &format!("/api/v1/threads/{thread}/messages"),
            Some(session.token()),
            Some("application/json"),
            "{\"content\": ",
        )
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
    assert!(
        app.thread_messages(session.token(), &thread)
            .await
            .is_empty(),
        "a rejected message is not stored"
    );
    assert!(app.get_thread(session.token(), &thread).await["title"].is_null());

    // Unknown threads are 404, whatever the id looks like.
    for missing in [uuid::Uuid::now_v7().to_string(), "not-a-thread".to_owned()] {
        let response = app
            .post_message(session.token(), &missing, &json!({ "content": "hello" }))
            .await;
        assert_error(response, 404, "NOT_FOUND").await;
        let response = app
            .get(
                &format!("/api/v1/threads/{missing}/events"),
                session.token(),
            )
            .await;
        assert_error(response, 404, "NOT_FOUND").await;
    }

    // The limits themselves are allowed.
    for temperature in [0.0, 2.0] {
        let response = app
            .post_message(
                session.token(),
                &thread,
                &json!({ "content": "edge", "model": "mock-echo", "temperature": temperature, "stream": false }),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "temperature {temperature}"
        );
    }
}

#[tokio::test]
async fn summarize_folds_the_older_part_of_a_long_conversation() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let summarize = |body: Value| {
        let app = &app;
        let thread = thread.clone();
        let token = session.token().to_owned();
        async move {
            let response = app
                .post_json(
                    &format!("/api/v1/threads/{thread}/summarize"),
                    Some(&token),
                    &body,
                )
                .await;
            let status = response.status();
            let body = body_json(response).await;
            assert_eq!(status, StatusCode::OK, "summarize: {body}");
            body
        }
    };

    let empty = summarize(json!({})).await;
    assert_eq!(
        empty,
        json!({ "summary": "", "model": "mock-echo", "covers_until": null })
    );

    let prompts = [
        "first alpha question",
        "second beta question",
        "third gamma question",
        "fourth delta question",
    ];
    for prompt in &prompts[..3] {
        let response = app
            .post_message(
                session.token(),
                &thread,
                &json!({ "content": prompt, "model": "mock-echo", "stream": false }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    // Six messages: all of them stay verbatim, nothing to fold.
    let short = summarize(json!({ "model": "mock-echo" })).await;
    assert_eq!(short["summary"], "", "{short}");
    assert!(short["covers_until"].is_null(), "{short}");

    let response = app
        .post_message(
            session.token(),
            &thread,
            &json!({ "content": prompts[3], "model": "mock-echo", "stream": false }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let messages = app.thread_messages(session.token(), &thread).await;
    assert_eq!(messages.len(), 8);

    let summary = summarize(json!({ "model": "mock-echo" })).await;
    assert_eq!(summary["model"], "mock-echo");
    let text = summary["summary"].as_str().unwrap();
    assert!(!text.is_empty(), "{summary}");
    assert!(text.contains("first alpha question"), "{summary}");
    assert!(
        !text.contains("fourth delta question"),
        "recent messages stay verbatim: {summary}"
    );
    assert_eq!(
        summary["covers_until"], messages[1]["id"],
        "the summary covers the first exchange: {summary}"
    );
    let stored = app.get_thread(session.token(), &thread).await;
    assert_eq!(stored["models"]["mock-echo"]["summary"], text, "{stored}");

    // Summarizing again folds nothing new and keeps the summary.
    assert_eq!(summarize(json!({ "model": "mock-echo" })).await, summary);

    for body in [json!({ "model": "no-such-model" }), json!({ "colour": 1 })] {
        let response = app
            .post_json(
                &format!("/api/v1/threads/{thread}/summarize"),
                Some(session.token()),
                &body,
            )
            .await;
        assert_error(response, 400, "VALIDATION_ERROR").await;
    }
}

#[tokio::test]
async fn models_lists_the_mock_models_and_providers_only_with_keys() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let body = app.get_ok("/api/v1/models", session.token()).await;
    let models = body["models"].as_array().unwrap();
    let find = |models: &[Value], id: &str| models.iter().find(|m| m["id"] == id).cloned();
    for id in ["mock-echo", "mock-lorem"] {
        let model = find(models, id).unwrap_or_else(|| panic!("{id} missing: {body}"));
        assert_eq!(model["mock"], true, "{model}");
        assert_eq!(model["provider"], "mock", "{model}");
        assert!(
            model["capabilities"]
                .as_array()
                .unwrap()
                .contains(&json!("chat")),
            "{model}"
        );
        assert!(model["context_length"].is_u64(), "{model}");
        assert!(model["pricing"]["input_per_mtok"].is_number(), "{model}");
        assert!(model["pricing"]["output_per_mtok"].is_number(), "{model}");
        assert!(
            model["name"].is_string() && model["tiers"].is_array(),
            "{model}"
        );
    }
    assert!(
        find(models, "gpt-4o").is_none(),
        "no key, no OpenAI: {body}"
    );
    assert!(
        models.iter().all(|m| m["provider"] == "mock"),
        "only the mock provider is on without keys: {body}"
    );
    let response = app.get_anon("/api/v1/models").await;
    assert_error(response, 401, "UNAUTHENTICATED").await;

    let with_key = TestApp::builder()
        .env("OPENAI_API_KEY", "sk-test-not-used")
        .spawn()
        .await;
    let session = with_key.register_user().await;
    let body = with_key.get_ok("/api/v1/models", session.token()).await;
    let models = body["models"].as_array().unwrap();
    let gpt = find(models, "gpt-4o").unwrap_or_else(|| panic!("gpt-4o missing: {body}"));
    assert_eq!(gpt["mock"], false);
    assert_eq!(gpt["provider"], "openai");
    assert_eq!(gpt["context_length"], 128000);
    assert_eq!(
        gpt["pricing"],
        json!({ "input_per_mtok": 2.5, "output_per_mtok": 10.0 })
    );
    assert!(find(models, "mock-echo").is_some());
    assert!(
        find(models, "claude-sonnet-4").is_none(),
        "Anthropic has no key: {body}"
    );
}

#[tokio::test]
async fn the_model_comes_from_the_message_the_thread_or_the_users_default() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let response = app
        .patch_json(
            "/api/v1/me",
            session.token(),
            &json!({ "settings": { "default_model": "mock-lorem" } }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let model_of = |events: &[SseEvent]| events[0].data["model"].clone();

    let plain = id_of(&app.create_thread(session.token(), &json!({})).await);
    let events = app
        .chat_turn(
            session.token(),
            &plain,
            &json!({ "content": "which model" }),
        )
        .await;
    assert_eq!(model_of(&events), "mock-lorem", "the user's default");

    let pinned = id_of(
        &app.create_thread(session.token(), &json!({ "model": "mock-echo" }))
            .await,
    );
    let events = app
        .chat_turn(
            session.token(),
            &pinned,
            &json!({ "content": "which model" }),
        )
        .await;
    assert_eq!(model_of(&events), "mock-echo", "the thread's model wins");
    let events = app
        .chat_turn(
            session.token(),
            &pinned,
            &json!({ "content": "which model", "model": "mock-lorem" }),
        )
        .await;
    assert_eq!(model_of(&events), "mock-lorem", "the message's model wins");

    // max_tokens reaches the model.
    let events = app
        .chat_turn(
            session.token(),
            &plain,
            &json!({ "content": "short", "model": "mock-lorem", "max_tokens": 5 }),
        )
        .await;
    assert_eq!(delta_text(&events, None), lorem(5));
    let complete = data(&events, "message_complete")[0];
    assert_eq!(complete["finish_reason"], "length", "{complete}");
    assert_eq!(complete["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn two_turns_in_one_thread_at_once_keep_their_own_streams() {
    let app = chat_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut slow = app
        .send_streaming(
            session.token(),
            &thread,
            &json!({ "content": "the slow one", "model": SLOW }),
        )
        .await;
    slow.until_event("delta").await;
    let quick = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "the quick one", "model": "mock-echo" }),
        )
        .await;
    let mut slow_events = slow.seen.clone();
    slow_events.extend(slow.until_done().await);

    for (events, text) in [
        (&quick, "the quick one".to_owned()),
        (&slow_events, lorem(SLOW_WORDS)),
    ] {
        let start = &events[0].data;
        let turn = &start["turn_id"];
        let message = &start["message_id"];
        assert_eq!(data(events, "message_start").len(), 1, "{events:#?}");
        for event in events.iter() {
            match event.name() {
                "delta" | "message_complete" => assert_eq!(&event.data["message_id"], message),
                "done" => assert_eq!(&event.data["turn_id"], turn),
                _ => {}
            }
        }
        for pair in events.windows(2) {
            assert!(pair[1].seq() > pair[0].seq(), "ids increase: {events:#?}");
        }
        assert_eq!(delta_text(events, None), text);
        assert_eq!(events[events.len() - 2].data["status"], "complete");
    }
    assert_ne!(quick[0].data["turn_id"], slow_events[0].data["turn_id"]);
    assert_eq!(app.thread_messages(session.token(), &thread).await.len(), 4);
}

#[tokio::test]
async fn usage_is_counted_once_per_turn() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let before = app.get_ok("/api/v1/me/usage", session.token()).await;
    assert!(
        before["used"].get("chat_messages").is_none_or(|v| v == 0),
        "{before}"
    );
    // 3 in + 3 out, then 2 legs: (3 + 3 + 2) in + 2 out for echo, (3 + 2) in + 40 out for lorem.
    app.chat_turn(
        session.token(),
        &thread,
        &json!({ "content": "count me once", "model": "mock-echo" }),
    )
    .await;
    let events = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "and again", "models": ["mock-echo", "mock-lorem"] }),
        )
        .await;
    let tokens: u64 = data(&events, "message_complete")
        .iter()
        .map(|c| {
            c["usage"]["input_tokens"].as_u64().unwrap()
                + c["usage"]["output_tokens"].as_u64().unwrap()
        })
        .sum::<u64>()
        + 6;
    let after = app.get_ok("/api/v1/me/usage", session.token()).await;
    assert_eq!(after["used"]["chat_messages"], 2, "one per turn: {after}");
    assert_eq!(after["used"]["tokens"], tokens, "{after}");
}

#[tokio::test]
async fn the_owner_can_watch_with_an_access_token_in_the_query() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let response = app
        .get_anon(&format!(
            "/api/v1/threads/{thread}/events?access_token={}",
            session.token()
        ))
        .await;
    let mut watcher = crate::helpers::sse_of(response).await;
    app.chat_turn(
        session.token(),
        &thread,
        &json!({ "content": "eventsource clients", "model": "mock-echo" }),
    )
    .await;
    assert_eq!(
        delta_text(&watcher.until_done().await, None),
        "eventsource clients"
    );
}

/// Starts a long turn, reads a few deltas and hangs up; returns (thread, message id, last id).
async fn start_long_turn(app: &TestApp, token: &str) -> (String, String, u64) {
    let thread = id_of(&app.create_thread(token, &json!({})).await);
    let mut stream = app
        .send_streaming(
            token,
            &thread,
            &json!({ "content": "take your time", "model": CRAWL }),
        )
        .await;
    let mut seen = stream.until_event("delta").await;
    seen.extend(stream.until_event("delta").await);
    let message_id = str_of(&seen[0].data["message_id"]);
    drop(stream);
    (thread, message_id, seen.last().unwrap().seq())
}

#[tokio::test]
async fn a_graceful_restart_mid_turn_stores_the_partial_answer() {
    let mut app = chat_app().await;
    let session = app.register_user().await;
    let (thread, message_id, last_seq) = start_long_turn(&app, session.token()).await;
    app.restart().await;

    let stored = app
        .thread_message(session.token(), &thread, &message_id)
        .await;
    let status = stored["status"].as_str().unwrap();
    assert!(
        status == "interrupted" || status == "failed",
        "a turn stopped by a shutdown is settled, not left `{status}`: {stored}"
    );
    let content = stored["content"].as_str().unwrap();
    assert!(
        !content.is_empty() && lorem(CRAWL_WORDS).starts_with(content),
        "the partial text is kept: {stored}"
    );

    // Event ids keep growing across the restart, so an old Last-Event-ID never hides new events.
    let events = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "after the restart", "model": "mock-echo" }),
        )
        .await;
    assert!(
        events[0].seq() > last_seq,
        "{} <= {last_seq}",
        events[0].seq()
    );
    let mut resumed = app
        .open_events(session.token(), &thread, "", Some(last_seq))
        .await;
    let replayed = resumed.until_done().await;
    assert_eq!(
        replayed.iter().map(|e| e.raw.clone()).collect::<Vec<_>>(),
        events.iter().map(|e| e.raw.clone()).collect::<Vec<_>>(),
        "resuming with an id from before the restart replays the new log"
    );
}

#[tokio::test]
async fn a_crash_mid_turn_does_not_leave_the_answer_streaming_forever() {
    let mut app = chat_app().await;
    let session = app.register_user().await;
    let (thread, message_id, _) = start_long_turn(&app, session.token()).await;
    app.crash_and_restart().await;

    // The user comes back: watches the thread and sends again.
    let mut watcher = app.open_events(session.token(), &thread, "", None).await;
    app.chat_turn(
        session.token(),
        &thread,
        &json!({ "content": "are you there", "model": "mock-echo" }),
    )
    .await;
    watcher.until_done().await;
    let started = std::time::Instant::now();
    let stored = loop {
        let stored = app
            .thread_message(session.token(), &thread, &message_id)
            .await;
        if stored["status"] != "streaming" || started.elapsed() > std::time::Duration::from_secs(10)
        {
            break stored;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // ARCHITECTURE.md: a turn whose owner died is settled as `interrupted`, keeping whatever
    // text had been flushed to the store (at most about a second behind what clients saw).
    assert_eq!(
        stored["status"], "interrupted",
        "an answer whose turn died with the process is settled as interrupted: {stored}"
    );
}

#[tokio::test]
async fn cancel_interrupts_every_model_of_the_turn() {
    let app = chat_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut stream = app
        .send_streaming(
            session.token(),
            &thread,
            &json!({ "content": "both slowly", "models": [CRAWL, CRAWL_B] }),
        )
        .await;
    let start = stream.until_event("delta").await;
    let turn_id = str_of(&start[0].data["turn_id"]);
    let response = app.cancel_turn(session.token(), &thread, &turn_id).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    stream.until_done().await;
    let events = stream.seen.clone();
    let completes = data(&events, "message_complete");
    assert_eq!(completes.len(), 2, "{events:#?}");
    assert!(
        completes.iter().all(|c| c["status"] == "interrupted"),
        "{completes:?}"
    );
    let messages = app.thread_messages(session.token(), &thread).await;
    assert_eq!(messages.len(), 3);
    for message in &messages[1..] {
        assert_eq!(message["status"], "interrupted", "{message}");
        let id = message["id"].as_str().unwrap();
        assert_eq!(message["content"], delta_text(&events, Some(id)).as_str());
    }
}

#[tokio::test]
async fn a_watcher_keeps_its_thread_alive_past_the_idle_timeout() {
    let app = TestApp::builder()
        .env("CHORUS__SESSIONS__IDLE_TIMEOUT_SECS", "1")
        .env("CHORUS__TURNS__KEEP_ALIVE_SECS", "1")
        .spawn()
        .await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut watcher = app.open_events(session.token(), &thread, "", None).await;
    // Well past the idle timeout (the keep-alive comments show the stream is still open).
    for _ in 0..3 {
        watcher.wait_for_comment().await;
    }
    let sent = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "still watching", "model": "mock-echo" }),
        )
        .await;
    let watched = watcher.until_done().await;
    assert_eq!(
        watched.iter().map(|e| e.raw.clone()).collect::<Vec<_>>(),
        sent.iter().map(|e| e.raw.clone()).collect::<Vec<_>>(),
        "a client still watching must not lose the thread's events to passivation"
    );
}

#[tokio::test]
async fn a_deleted_threads_events_are_gone_with_it() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let events = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "secret words to forget", "model": "mock-echo" }),
        )
        .await;
    let response = app
        .delete(&format!("/api/v1/threads/{thread}"), session.token())
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // Its messages are gone, and so is the replay of its events.
    let response = app
        .get(
            &format!("/api/v1/threads/{thread}/messages"),
            session.token(),
        )
        .await;
    assert_error(response, 404, "NOT_FOUND").await;
    let response = app
        .get(
            &format!(
                "/api/v1/threads/{thread}/events?after={}",
                events[0].seq() - 1
            ),
            session.token(),
        )
        .await;
    if response.status() == StatusCode::OK {
        let mut replay = crate::helpers::SseStream::new(response);
        let replayed = replay.until_done().await;
        panic!(
            "GET /events of a deleted thread answers 200 and replays its text {:?}; expected 404",
            delta_text(&replayed, None)
        );
    }
    assert_error(response, 404, "NOT_FOUND").await;
    let response = app
        .post_message(session.token(), &thread, &json!({ "content": "hello?" }))
        .await;
    assert_error(response, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn a_turn_cancelled_before_its_first_token_is_interrupted_and_empty() {
    let app = chat_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut watcher = app.open_events(session.token(), &thread, "", None).await;
    let body = json!({ "content": "think first", "model": LATE });
    let send = app.send_streaming(session.token(), &thread, &body);
    let cancel = async {
        // The watcher sees the turn start before any output; cancel from there.
        let start = watcher.until_event("message_start").await;
        let turn_id = str_of(&start[0].data["turn_id"]);
        let response = app.cancel_turn(session.token(), &thread, &turn_id).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        start
    };
    let (mut stream, start) = tokio::join!(send, cancel);
    let events = stream.until_done().await;
    assert_eq!(
        event_names(&events),
        ["message_start", "message_complete", "done"],
        "{events:#?}"
    );
    assert_eq!(events[0].raw, start[0].raw);
    assert_eq!(events[1].data["status"], "interrupted");
    let message_id = str_of(&events[0].data["message_id"]);
    let stored = app
        .thread_message(session.token(), &thread, &message_id)
        .await;
    assert_eq!(stored["status"], "interrupted", "{stored}");
    assert_eq!(stored["content"], "");
}
