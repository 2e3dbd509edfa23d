//! The mock upstream over real HTTP: every dialect, streaming and not, and every switch.
//! One test binary (modules below) so the suite links once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod anthropic;
mod binary;
mod gemini;
mod openai;
mod switches;

use std::time::Duration;

use chorus_mock_upstream::MockUpstream;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// One parsed server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", self.data))
    }
}

/// Parses an SSE body (LF or CRLF line endings) into its events.
pub fn parse_sse(body: &str) -> Vec<Event> {
    let normalized = body.replace("\r\n", "\n");
    let mut events = Vec::new();
    for block in normalized.split("\n\n") {
        if block.trim().is_empty() {
            continue;
        }
        let mut event = None;
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(name) = line.strip_prefix("event: ") {
                event = Some(name.to_owned());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data.push(value);
            } else {
                panic!("unexpected SSE line {line:?} in {body:?}");
            }
        }
        events.push(Event {
            event,
            data: data.join("\n"),
        });
    }
    events
}

/// A body read to its end: the bytes received, and whether it ended cleanly.
pub struct Body {
    pub text: String,
    pub clean: bool,
}

pub async fn read_body(response: reqwest::Response) -> Body {
    let mut stream = response.bytes_stream();
    let mut bytes = Vec::new();
    let mut clean = true;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(_) => {
                clean = false;
                break;
            }
        }
    }
    Body {
        text: String::from_utf8(bytes).unwrap(),
        clean,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub async fn start() -> MockUpstream {
    MockUpstream::start().await.unwrap()
}

/// `POST /v1/chat/completions` with a Bearer key.
pub async fn openai(mock: &MockUpstream, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", mock.base_url()))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// `POST /v1/messages` with `x-api-key` and `anthropic-version`.
pub async fn anthropic(mock: &MockUpstream, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/messages", mock.base_url()))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// `POST /v1beta/models/{model}:{action}` with `x-goog-api-key`; `action` may carry a query.
pub async fn gemini(
    mock: &MockUpstream,
    model: &str,
    action: &str,
    body: Value,
) -> reqwest::Response {
    client()
        .post(format!(
            "{}/v1beta/models/{model}:{action}",
            mock.base_url()
        ))
        .header("x-goog-api-key", "g-test")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A one-message OpenAI chat body.
pub fn openai_body(model: &str, text: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
}

pub fn anthropic_body(model: &str, text: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
}

pub fn gemini_body(text: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
}

/// Polls `check` until it holds (up to 5 s).
pub async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held");
}
