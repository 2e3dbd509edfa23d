//! `GET /api/v1/ws`: the chat protocol over one WebSocket — authentication (query token or
//! header), `send`, `subscribe` with `after`, `cancel`, `ping`, error frames for bad requests
//! (the socket stays open), `document_ids` on `send` (retrieval and citations as over HTTP),
//! and isolation between users.

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::documents::{RAG_MODELS, corpus_markdown, jsonl, minilm_dir, ready, upload};
use crate::helpers::{
    EVENT_TIMEOUT, SseEvent, TestApp, TestModel, assert_corpus_passage_cited, catalogue_toml,
    id_of, lorem,
};

const SLOW: &str = "mock-slow";
const CRAWL: &str = "mock-crawl";

async fn ws_app() -> TestApp {
    TestApp::builder()
        .models_toml(&catalogue_toml(&[
            TestModel::new(SLOW, "mock", "lorem;words=40;delay_ms=50"),
            TestModel::new(CRAWL, "mock", "lorem;words=400;delay_ms=50"),
        ]))
        .spawn()
        .await
}

/// A test client: JSON text frames in and out, bounded waits.
struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Every frame received so far.
    seen: Vec<Value>,
}

impl Ws {
    /// Connects with `?access_token=`.
    async fn connect(app: &TestApp, token: &str) -> Ws {
        let url = format!("ws://{}/api/v1/ws?access_token={token}", app.addr);
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket upgrade with ?access_token=");
        Ws {
            socket,
            seen: Vec::new(),
        }
    }

    /// Connects with `Authorization: Bearer`.
    async fn connect_with_header(app: &TestApp, token: &str) -> Ws {
        let mut request = format!("ws://{}/api/v1/ws", app.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("WebSocket upgrade with an Authorization header");
        Ws {
            socket,
            seen: Vec::new(),
        }
    }

    async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::text(text.to_owned()))
            .await
            .expect("sending a WebSocket frame");
    }

    /// The next JSON text frame (control frames skipped). Panics after [`EVENT_TIMEOUT`] or
    /// when the socket closes.
    async fn next(&mut self) -> Value {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match tokio::time::timeout(left, self.socket.next()).await {
                Err(_) => panic!(
                    "no WebSocket frame within {EVENT_TIMEOUT:?}; frames so far: {:#?}",
                    self.seen
                ),
                Ok(None) => panic!("the socket closed; frames so far: {:#?}", self.seen),
                Ok(Some(Err(e))) => {
                    panic!("the socket failed: {e}; frames so far: {:#?}", self.seen)
                }
                Ok(Some(Ok(frame))) => frame,
            };
            match frame {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"));
                    self.seen.push(value.clone());
                    return value;
                }
                Message::Close(close) => {
                    panic!(
                        "the server closed the socket ({close:?}); frames so far: {:#?}",
                        self.seen
                    )
                }
                Message::Binary(_) => panic!("unexpected binary frame"),
                _ => {}
            }
        }
    }

    /// Frames up to and including the first whose `type` is `kind`.
    async fn until_type(&mut self, kind: &str) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let found = frame["type"] == kind;
            frames.push(frame);
            if found {
                return frames;
            }
        }
    }
}

fn types(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The turn's event frames only (no `subscribed`, `cancelling`, `pong`).
fn event_frames(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| {
            matches!(
                f["type"].as_str(),
                Some("message_start" | "delta" | "message_complete" | "error" | "done" | "status")
            )
        })
        .cloned()
        .collect()
}

fn text_of(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "delta")
        .map(|f| f["text"].as_str().unwrap())
        .collect()
}

fn assert_ids_contiguous(frames: &[Value]) {
    for pair in frames.windows(2) {
        let (a, b) = (pair[0]["id"].as_u64(), pair[1]["id"].as_u64());
        assert!(
            a.is_some() && b.is_some(),
            "event frames carry numeric ids: {pair:?}"
        );
        assert_eq!(
            b.unwrap(),
            a.unwrap() + 1,
            "ids increase by one: {frames:#?}"
        );
    }
}

/// An SSE event as the WebSocket frame the server should send for it.
fn as_frame(event: &SseEvent) -> Value {
    let mut frame = json!({ "type": event.name(), "id": event.seq() });
    for (key, value) in event.data.as_object().unwrap() {
        frame[key] = value.clone();
    }
    frame
}

#[tokio::test]
async fn ping_is_answered_with_pong_over_a_query_token_connection() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let mut ws = Ws::connect(&app, session.token()).await;
    ws.send(json!({ "type": "ping" })).await;
    assert_eq!(ws.next().await, json!({ "type": "pong" }));
    ws.send(json!({ "type": "ping" })).await;
    assert_eq!(ws.next().await, json!({ "type": "pong" }));
}

#[tokio::test]
async fn send_streams_the_turn_as_frames() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut ws = Ws::connect_with_header(&app, session.token()).await;
    ws.send(json!({
        "type": "send",
        "thread_id": thread,
        "content": "over the socket",
        "model": "mock-echo",
    }))
    .await;
    let frames = ws.until_type("done").await;
    assert_eq!(
        types(&frames),
        [
            "message_start",
            "delta",
            "delta",
            "delta",
            "message_complete",
            "done"
        ],
        "{frames:#?}"
    );
    assert_ids_contiguous(&frames);
    let start = &frames[0];
    assert_eq!(start["thread_id"], thread.as_str());
    assert_eq!(start["model"], "mock-echo");
    let message_id = start["message_id"].as_str().unwrap();
    assert!(frames[1..4].iter().all(|f| f["message_id"] == message_id));
    assert_eq!(text_of(&frames), "over the socket");
    let complete = &frames[4];
    assert_eq!(complete["status"], "complete");
    assert_eq!(complete["provider"], "mock");
    assert_eq!(
        complete["usage"],
        json!({ "input_tokens": 3, "output_tokens": 3 })
    );
    assert_eq!(frames[5]["turn_id"], start["turn_id"]);

    let stored = app
        .thread_message(session.token(), &thread, message_id)
        .await;
    assert_eq!(stored["status"], "complete");
    assert_eq!(stored["content"], "over the socket");

    // Two models in one turn, on the same socket.
    ws.send(json!({
        "type": "send",
        "thread_id": thread,
        "content": "both please",
        "models": ["mock-echo", "mock-lorem"],
    }))
    .await;
    let frames = ws.until_type("done").await;
    assert_ids_contiguous(&frames);
    let starts: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "message_start")
        .collect();
    assert_eq!(starts.len(), 2, "{frames:#?}");
    assert!(frames[0]["id"].as_u64() > start["id"].as_u64());
    assert_eq!(
        frames
            .iter()
            .filter(|f| f["type"] == "message_complete")
            .count(),
        2
    );
    assert_eq!(app.thread_messages(session.token(), &thread).await.len(), 5);
}

#[tokio::test]
async fn subscribe_with_after_replays_then_follows_live() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let first = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "already said", "model": "mock-echo" }),
        )
        .await;

    let mut ws = Ws::connect(&app, session.token()).await;
    let after = first[0].seq() - 1;
    ws.send(json!({ "type": "subscribe", "thread_id": thread, "after": after }))
        .await;
    let frames = ws.until_type("done").await;
    let replay = event_frames(&frames);
    let expected: Vec<Value> = first.iter().map(as_frame).collect();
    assert_eq!(replay, expected, "the replay is the SSE events as frames");
    // The acknowledgement (it may trail the first replayed frames).
    let mut frames = frames;
    if !frames.iter().any(|f| f["type"] == "subscribed") {
        frames.extend(ws.until_type("subscribed").await);
    }
    let ack = frames.iter().find(|f| f["type"] == "subscribed").unwrap();
    assert_eq!(ack["thread_id"], thread.as_str());
    assert_eq!(ack["after"], after);

    // Still subscribed: the next turn (sent over HTTP) arrives live.
    let second = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "said later", "model": "mock-echo" }),
        )
        .await;
    let live = event_frames(&ws.until_type("done").await);
    assert_eq!(live, second.iter().map(as_frame).collect::<Vec<_>>());

    // A subscription without `after` starts from now.
    let mut fresh = Ws::connect(&app, session.token()).await;
    fresh
        .send(json!({ "type": "subscribe", "thread_id": thread }))
        .await;
    let ack = fresh.next().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["after"], second.last().unwrap().seq(), "{ack}");
    let third = app
        .chat_turn(
            session.token(),
            &thread,
            &json!({ "content": "only this one", "model": "mock-echo" }),
        )
        .await;
    let live = event_frames(&fresh.until_type("done").await);
    assert_eq!(live, third.iter().map(as_frame).collect::<Vec<_>>());
}

#[tokio::test]
async fn cancel_over_the_socket_interrupts_the_turn() {
    let app = ws_app().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut ws = Ws::connect(&app, session.token()).await;
    ws.send(json!({
        "type": "send",
        "thread_id": thread,
        "content": "go on forever",
        "model": CRAWL,
    }))
    .await;
    let mut frames = ws.until_type("delta").await;
    let turn_id = frames[0]["turn_id"].as_str().unwrap().to_owned();
    let message_id = frames[0]["message_id"].as_str().unwrap().to_owned();
    ws.send(json!({ "type": "cancel", "thread_id": thread, "turn_id": turn_id }))
        .await;
    frames.extend(ws.until_type("done").await);
    let ack = frames
        .iter()
        .find(|f| f["type"] == "cancelling")
        .unwrap_or_else(|| panic!("no `cancelling` frame: {frames:#?}"));
    assert_eq!(ack["turn_id"], turn_id.as_str());
    let events = event_frames(&frames);
    assert_ids_contiguous(&events);
    let complete = events
        .iter()
        .find(|f| f["type"] == "message_complete")
        .unwrap();
    assert_eq!(complete["status"], "interrupted", "{complete}");
    let partial = text_of(&events);
    assert!(!partial.is_empty() && partial.len() < lorem(400).len());

    let stored = app
        .thread_message(session.token(), &thread, &message_id)
        .await;
    assert_eq!(stored["status"], "interrupted");
    assert_eq!(stored["content"], partial.as_str());
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_socket_stays_open() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut ws = Ws::connect(&app, session.token()).await;

    let cases: Vec<(String, &str, Value)> = vec![
        ("not json".to_owned(), "VALIDATION_ERROR", Value::Null),
        (
            json!({ "type": "teleport" }).to_string(),
            "VALIDATION_ERROR",
            Value::Null,
        ),
        (
            json!({ "no_type": 1 }).to_string(),
            "VALIDATION_ERROR",
            Value::Null,
        ),
        (
            json!({ "type": "send", "thread_id": thread }).to_string(),
            "VALIDATION_ERROR",
            Value::Null,
        ),
        (
            json!({ "type": "send", "thread_id": thread, "content": "  " }).to_string(),
            "VALIDATION_ERROR",
            json!("send"),
        ),
        (
            json!({ "type": "send", "thread_id": thread, "content": "x", "temperature": 9 })
                .to_string(),
            "VALIDATION_ERROR",
            json!("send"),
        ),
        (
            json!({ "type": "send", "thread_id": thread, "content": "x", "model": "nope" })
                .to_string(),
            "VALIDATION_ERROR",
            json!("send"),
        ),
        (
            json!({ "type": "send", "thread_id": uuid::Uuid::now_v7(), "content": "x" })
                .to_string(),
            "NOT_FOUND",
            json!("send"),
        ),
        (
            json!({ "type": "subscribe", "thread_id": "not-a-thread" }).to_string(),
            "NOT_FOUND",
            json!("subscribe"),
        ),
        (
            json!({ "type": "cancel", "thread_id": thread, "turn_id": uuid::Uuid::now_v7() })
                .to_string(),
            "NOT_FOUND",
            json!("cancel"),
        ),
    ];
    for (text, code, request) in cases {
        ws.send_text(&text).await;
        let frame = ws.next().await;
        assert_eq!(frame["type"], "error", "{text}: {frame}");
        assert_eq!(frame["code"], code, "{text}: {frame}");
        assert_eq!(frame["request"], request, "{text}: {frame}");
        assert!(
            frame["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{text}: {frame}"
        );
    }
    ws.socket
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    let frame = ws.next().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], "VALIDATION_ERROR");

    // Still open and working.
    ws.send(json!({ "type": "ping" })).await;
    assert_eq!(ws.next().await, json!({ "type": "pong" }));
    assert!(
        app.thread_messages(session.token(), &thread)
            .await
            .is_empty(),
        "rejected sends store nothing"
    );
}

#[tokio::test]
async fn an_unauthenticated_upgrade_is_401() {
    let app = TestApp::spawn().await;
    for url in [
        format!("ws://{}/api/v1/ws", app.addr),
        format!("ws://{}/api/v1/ws?access_token=not-a-token", app.addr),
    ] {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok(_) => panic!("{url}: the upgrade must be refused"),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{url}");
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .unwrap_or(Value::Null);
                assert_eq!(body["error"]["code"], "UNAUTHENTICATED", "{url}: {body}");
            }
            Err(other) => panic!("{url}: expected an HTTP 401, got {other}"),
        }
    }
    let mut request = format!("ws://{}/api/v1/ws", app.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer garbage".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        Ok(_) => panic!("a bad header token must be refused"),
        Err(other) => panic!("expected an HTTP 401, got {other}"),
    }
}

#[tokio::test]
async fn another_users_thread_is_not_found_over_the_socket() {
    let app = ws_app().await;
    let owner = app.register_user().await;
    let intruder = app.register_user().await;
    let thread = id_of(&app.create_thread(owner.token(), &json!({})).await);
    let mut mine = Ws::connect(&app, owner.token()).await;
    mine.send(json!({
        "type": "send",
        "thread_id": thread,
        "content": "private",
        "model": SLOW,
    }))
    .await;
    let start = mine.until_type("message_start").await;
    let turn_id = start[0]["turn_id"].as_str().unwrap().to_owned();

    let mut theirs = Ws::connect(&app, intruder.token()).await;
    for (frame, request) in [
        (
            json!({ "type": "subscribe", "thread_id": thread }),
            "subscribe",
        ),
        (
            json!({ "type": "subscribe", "thread_id": thread, "after": 0 }),
            "subscribe",
        ),
        (
            json!({ "type": "send", "thread_id": thread, "content": "hi", "model": "mock-echo" }),
            "send",
        ),
        (
            json!({ "type": "cancel", "thread_id": thread, "turn_id": turn_id }),
            "cancel",
        ),
    ] {
        theirs.send(frame.clone()).await;
        let reply = theirs.next().await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        assert_eq!(reply["code"], "NOT_FOUND", "{frame}: {reply}");
        assert_eq!(reply["request"], request, "{frame}: {reply}");
    }
    theirs.send(json!({ "type": "ping" })).await;
    assert_eq!(
        theirs.next().await,
        json!({ "type": "pong" }),
        "no event leaked"
    );

    // The owner's turn ran to completion, untouched.
    let frames = mine.until_type("done").await;
    let complete = frames
        .iter()
        .find(|f| f["type"] == "message_complete")
        .unwrap();
    assert_eq!(complete["status"], "complete");
    assert_eq!(text_of(&mine.seen), lorem(40));
    assert_eq!(app.thread_messages(owner.token(), &thread).await.len(), 2);
}

#[tokio::test]
async fn send_over_the_socket_validates_like_post_messages() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = id_of(&app.create_thread(session.token(), &json!({})).await);
    let mut ws = Ws::connect(&app, session.token()).await;
    // The same body as POST messages: what HTTP rejects, the socket rejects too.
    for (extra, field) in [
        (json!({ "web_search": true }), "web_search"),
        (json!({ "colour": "red" }), "colour"),
    ] {
        let mut body = json!({ "content": "hello", "model": "mock-echo" });
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let response = app.post_message(session.token(), &thread, &body).await;
        assert_eq!(response.status(), 400, "HTTP rejects {body}");

        let mut frame = body.clone();
        frame["type"] = json!("send");
        frame["thread_id"] = json!(thread);
        ws.send(frame.clone()).await;
        let reply = ws.next().await;
        assert_eq!(
            reply["type"], "error",
            "{frame} must be rejected like over HTTP: {reply}"
        );
        assert_eq!(reply["code"], "VALIDATION_ERROR", "{reply}");
        assert!(
            reply["message"].as_str().unwrap_or("").contains(field),
            "{frame}: the error should name `{field}`: {reply}"
        );
    }
    // An id that names no document is a 404 over HTTP and NOT_FOUND over the socket.
    let body = json!({ "content": "hello", "model": "mock-echo", "document_ids": ["d1"] });
    let response = app.post_message(session.token(), &thread, &body).await;
    assert_eq!(response.status(), 404, "no such document over HTTP");
    let mut frame = body.clone();
    frame["type"] = json!("send");
    frame["thread_id"] = json!(thread);
    ws.send(frame).await;
    assert_send_refused_for_a_document(&mut ws, &app, session.token(), &thread).await;
}

#[tokio::test]
async fn send_with_document_ids_over_the_socket_retrieves_and_cites() {
    let app = TestApp::builder()
        .models_toml(RAG_MODELS)
        .env("CHORUS__EMBEDDINGS__LOCAL_MODEL_DIR", &minilm_dir())
        .spawn()
        .await;
    let owner = app.register_user().await;
    let token = owner.token();
    let passages = jsonl("passages.jsonl");
    let id = upload(
        &app,
        token,
        "corpus.md",
        corpus_markdown(&passages).as_bytes(),
    )
    .await;
    ready(&app, token, &id).await;
    let thread = id_of(&app.create_thread(token, &json!({ "title": "rag" })).await);

    // Too big for mock-small's window whole: retrieved, announced, cited — as over HTTP.
    let mut ws = Ws::connect(&app, token).await;
    ws.send(json!({
        "type": "send",
        "thread_id": thread,
        "content": "How often should I feed my sourdough starter?",
        "model": "mock-small",
        "document_ids": [id],
    }))
    .await;
    let frames = ws.until_type("done").await;
    let status = frames
        .iter()
        .find(|f| f["type"] == "status" && f["stage"] == "retrieval")
        .unwrap_or_else(|| panic!("a retrieval status frame: {frames:#?}"));
    assert_eq!(status["mode"], "retrieval", "{status}");
    let complete = frames
        .iter()
        .find(|f| f["type"] == "message_complete")
        .unwrap_or_else(|| panic!("message_complete: {frames:#?}"));
    assert_eq!(complete["status"], "complete", "{complete}");
    let messages = app.thread_messages(token, &thread).await;
    let answer = messages
        .iter()
        .find(|m| m["id"] == complete["message_id"])
        .unwrap_or_else(|| panic!("the answer is stored: {messages:#?}"));
    assert_corpus_passage_cited(answer, &id);
    let usage = app.get_ok("/api/v1/me/usage", token).await;
    assert_eq!(usage["used"]["rag_queries"], 1, "{usage}");

    // Another user's socket cannot attach it: NOT_FOUND naming the document, no turn.
    let other = app.register_user().await;
    let their_thread = id_of(&app.create_thread(other.token(), &json!({})).await);
    let mut theirs = Ws::connect(&app, other.token()).await;
    theirs
        .send(json!({
            "type": "send",
            "thread_id": their_thread,
            "content": "hi",
            "model": "mock-small",
            "document_ids": [id],
        }))
        .await;
    assert_send_refused_for_a_document(&mut theirs, &app, other.token(), &their_thread).await;
}

/// The socket answered a `send` with NOT_FOUND naming a document, and no turn started: nothing
/// was stored in the thread.
async fn assert_send_refused_for_a_document(ws: &mut Ws, app: &TestApp, token: &str, thread: &str) {
    let reply = ws.next().await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "NOT_FOUND", "{reply}");
    assert_eq!(reply["request"], "send", "{reply}");
    assert!(
        reply["message"].as_str().unwrap_or("").contains("document"),
        "{reply}"
    );
    ws.send(json!({ "type": "ping" })).await;
    let last = ws.until_type("pong").await;
    assert!(
        !last.iter().any(|f| f["type"] == "message_start"),
        "no turn started: {last:#?}"
    );
    assert!(app.thread_messages(token, thread).await.is_empty());
}
