//! The Anthropic Messages API adapter.
//!
//! `base_url` is the host root (`https://api.anthropic.com`, or `http://127.0.0.1:PORT` for a
//! test upstream); requests go to `{base_url}/v1/messages` with `x-api-key` and
//! `anthropic-version: 2023-06-01`. The system prompt is the top-level `system` string (system
//! messages found in `messages` are folded into it, since the API has no `system` role), and
//! `max_tokens` — required by Anthropic — defaults to [`DEFAULT_MAX_TOKENS`].
//!
//! The stream is a sequence of typed events (`message_start`, `content_block_*`,
//! `message_delta`, `message_stop`, `ping`, `error`); [`AnthropicStream`] turns each into chunks.
//! Usage arrives twice: input tokens at `message_start`, output tokens at `message_delta`.
//! Only `message_stop` completes the stream.

use std::borrow::Cow;

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{HttpClient, Post};
use super::openai::{
    EventDecoder, classify_stream_error, decode_error, read_body, response_stream, secret_header,
    send, trim_base_url,
};
use super::sse::SseEvent;
use super::{
    ChatRequest, ChatRole, Chunk, ChunkStream, Completion, FinishReason, Provider, ProviderError,
    TokenUsage,
};

/// The API version this adapter speaks (the wire format below is this version's).
pub const API_VERSION: &str = "2023-06-01";

/// `max_tokens` when the request sets none: Anthropic requires the field.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The Anthropic Messages API.
#[derive(Clone)]
pub struct AnthropicProvider {
    base_url: String,
    api_key: String,
    http: HttpClient,
}

/// Never prints the key.
impl std::fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        super::openai::debug_redacted(f, "AnthropicProvider", &self.base_url, &self.api_key)
    }
}

impl AnthropicProvider {
    /// `base_url` like `https://api.anthropic.com` (no `/v1`; a trailing `/` is tolerated).
    pub fn new(base_url: String, api_key: String, http: HttpClient) -> Self {
        Self {
            base_url: trim_base_url(base_url),
            api_key,
            http,
        }
    }

    fn post(&self, body: &MessagesBody<'_>) -> Result<Post<'_>, ProviderError> {
        let mut request = self
            .http
            .post_url(&format!("{}/v1/messages", self.base_url))
            .header(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(API_VERSION),
            )
            // Sets `content-type: application/json`.
            .json(body);
        // An empty key sends none, so a keyless test upstream or proxy works.
        if !self.api_key.is_empty() {
            request = request.header(
                HeaderName::from_static("x-api-key"),
                secret_header(&self.api_key)?,
            );
        }
        Ok(request)
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = MessagesBody::new(&request, true);
        let response = send(self.post(&body)?).await?;
        Ok(response_stream(response, AnthropicStream::default()))
    }

    async fn complete(&self, request: ChatRequest) -> Result<Completion, ProviderError> {
        let body = MessagesBody::new(&request, false);
        let response = send(self.post(&body)?).await?;
        parse_completion(&read_body(response).await?)
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct MessagesBody<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<Cow<'a, str>>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: ChatRole,
    content: &'a str,
}

impl<'a> MessagesBody<'a> {
    fn new(request: &'a ChatRequest, stream: bool) -> Self {
        let mut system_parts = request
            .system
            .as_deref()
            .into_iter()
            .chain(
                request
                    .messages
                    .iter()
                    .filter(|m| m.role == ChatRole::System)
                    .map(|m| m.content.as_str()),
            )
            .peekable();
        // The usual case (one system prompt) is borrowed; several are joined.
        let system = match (system_parts.next(), system_parts.peek()) {
            (None, _) => None,
            (Some(only), None) => Some(Cow::Borrowed(only)),
            (Some(first), Some(_)) => Some(Cow::Owned(
                std::iter::once(first)
                    .chain(system_parts)
                    .collect::<Vec<_>>()
                    .join("\n\n"),
            )),
        };
        let messages = request
            .messages
            .iter()
            .filter(|m| m.role != ChatRole::System)
            .map(|m| WireMessage {
                role: m.role,
                content: &m.content,
            })
            .collect();
        Self {
            model: &request.model,
            max_tokens: request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            system,
            messages,
            temperature: request.temperature,
            stream,
        }
    }
}

/// Anthropic's usage object. `input_tokens` excludes prompt-cache reads and writes; they are
/// added back so `input_tokens` means the whole prompt, as it does for the other providers.
#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    fn input(&self) -> u64 {
        [
            self.input_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ]
        .iter()
        .flatten()
        .sum()
    }
}

#[derive(Debug, Deserialize)]
struct MessageBody {
    #[serde(default)]
    content: Option<Vec<ContentBlock>>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Pure conversions
// ---------------------------------------------------------------------------------------------

pub(crate) fn map_stop_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        // The second one: the prompt plus answer filled the context window mid-answer.
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        // The streaming classifier stopped the answer.
        "refusal" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

/// The event types this adapter acts on; new types Anthropic adds are ignored, as its
/// versioning policy asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    MessageStart,
    ContentBlockStart,
    ContentBlockDelta,
    MessageDelta,
    MessageStop,
    Error,
    Ignored,
}

impl EventType {
    fn of(name: &str) -> Self {
        match name {
            "message_start" => Self::MessageStart,
            "content_block_start" => Self::ContentBlockStart,
            "content_block_delta" => Self::ContentBlockDelta,
            "message_delta" => Self::MessageDelta,
            "message_stop" => Self::MessageStop,
            "error" => Self::Error,
            // `ping`, `content_block_stop` and anything newer.
            _ => Self::Ignored,
        }
    }
}

/// The streaming state machine: one SSE event in, chunks out. Complete at `message_stop`.
#[derive(Debug, Default)]
pub struct AnthropicStream {
    stopped: bool,
}

impl AnthropicStream {
    pub fn on_sse(&mut self, event: &SseEvent) -> Result<Vec<Chunk>, ProviderError> {
        if event.data.trim().is_empty() {
            return Ok(Vec::new());
        }
        // Parsed once into a tree: tool-call fragments are passed on as that same tree.
        let mut value: Value = serde_json::from_str(&event.data).map_err(decode_error)?;
        // The JSON `type` is authoritative; the SSE `event:` name is the fallback.
        let kind = EventType::of(
            value
                .get("type")
                .and_then(Value::as_str)
                .or(event.event.as_deref())
                .unwrap_or_default(),
        );
        let mut out = Vec::new();
        match kind {
            EventType::MessageStart => {
                let usage = usage_at(&value, "/message/usage")?;
                if usage.input() > 0 {
                    // Output tokens here are a placeholder count; the real one comes at the end.
                    out.push(Chunk::Usage(TokenUsage {
                        input_tokens: usage.input(),
                        output_tokens: 0,
                    }));
                }
            }
            EventType::ContentBlockStart => {
                let block_type = value.pointer("/content_block/type").and_then(Value::as_str);
                match block_type {
                    Some("text") => {
                        if let Some(text) = take_string(&mut value, "/content_block/text") {
                            out.push(Chunk::Text(text));
                        }
                    }
                    // The tool's id and name: the start of a tool call, passed through whole.
                    Some("tool_use" | "server_tool_use") => out.push(Chunk::ToolCall(value)),
                    _ => {} // Thinking and other blocks are not part of the answer text.
                }
            }
            EventType::ContentBlockDelta => {
                match value.pointer("/delta/type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        if let Some(text) = take_string(&mut value, "/delta/text") {
                            out.push(Chunk::Text(text));
                        }
                    }
                    Some("input_json_delta") => out.push(Chunk::ToolCall(value)),
                    _ => {} // thinking_delta, signature_delta, citations_delta, …
                }
            }
            EventType::MessageDelta => {
                if let Some(reason) = value.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(Chunk::Finish(map_stop_reason(reason)));
                }
                let usage = usage_at(&value, "/usage")?;
                let usage = TokenUsage {
                    input_tokens: usage.input(),
                    output_tokens: usage.output_tokens.unwrap_or(0),
                };
                if usage != TokenUsage::default() {
                    out.push(Chunk::Usage(usage));
                }
            }
            EventType::MessageStop => self.stopped = true,
            EventType::Error => {
                return Err(classify_stream_error(
                    value.get("error").unwrap_or(&Value::Null),
                ));
            }
            EventType::Ignored => {}
        }
        Ok(out)
    }
}

impl EventDecoder for AnthropicStream {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<Chunk>, ProviderError> {
        self.on_sse(event)
    }

    fn is_complete(&self) -> bool {
        self.stopped
    }

    fn is_done(&self) -> bool {
        self.stopped
    }
}

/// The usage object at `pointer`, absent meaning all zero; a malformed one is a decode error.
fn usage_at(value: &Value, pointer: &str) -> Result<WireUsage, ProviderError> {
    match value.pointer(pointer) {
        None | Some(Value::Null) => Ok(WireUsage::default()),
        Some(usage) => WireUsage::deserialize(usage).map_err(decode_error),
    }
}

/// Moves a non-empty string out of the tree (no copy of the text).
fn take_string(value: &mut Value, pointer: &str) -> Option<String> {
    match value.pointer_mut(pointer).map(Value::take) {
        Some(Value::String(text)) if !text.is_empty() => Some(text),
        _ => None,
    }
}

/// A non-streaming response body → [`Completion`]: the text blocks joined.
pub fn parse_completion(body: &[u8]) -> Result<Completion, ProviderError> {
    let body: MessageBody = serde_json::from_slice(body).map_err(decode_error)?;
    if let Some(error) = body.error.as_ref().filter(|e| !e.is_null()) {
        return Err(classify_stream_error(error));
    }
    let text = body
        .content
        .into_iter()
        .flatten()
        .filter(|block| block.kind == "text")
        .filter_map(|block| block.text)
        .collect();
    Ok(Completion {
        text,
        usage: body.usage.map(|u| TokenUsage {
            input_tokens: u.input(),
            output_tokens: u.output_tokens.unwrap_or(0),
        }),
        finish: body.stop_reason.as_deref().map(map_stop_reason),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header::{HeaderMap, HeaderValue};
    use serde_json::json;

    use super::*;
    use crate::provider::ChatMessage;
    use crate::provider::openai::classify_http_error;
    use crate::provider::openai::test_support::{
        error_response, run, run_all_splits, serve_once, sse_response, text,
    };
    use futures_util::StreamExt;

    const STREAM_TEXT: &str = include_str!("testdata/anthropic_stream_text.sse");
    const STREAM_TOOL: &str = include_str!("testdata/anthropic_stream_tool_use.sse");
    const STREAM_OVERLOADED: &str = include_str!("testdata/anthropic_stream_overloaded.sse");

    fn message(role: ChatRole, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_owned(),
        }
    }

    #[test]
    fn body_has_top_level_system_and_default_max_tokens() {
        let request = ChatRequest {
            model: "claude-sonnet-4-5".to_owned(),
            system: Some("Be brief.".to_owned()),
            messages: vec![message(ChatRole::User, "Hi")],
            max_tokens: None,
            temperature: Some(0.2),
        };
        let body = serde_json::to_value(MessagesBody::new(&request, true)).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 4096,
                "system": "Be brief.",
                "messages": [{"role": "user", "content": "Hi"}],
                "temperature": 0.2,
                "stream": true
            })
        );
    }

    #[test]
    fn system_messages_are_folded_into_system() {
        let request = ChatRequest {
            model: "m".to_owned(),
            system: Some("One.".to_owned()),
            messages: vec![
                message(ChatRole::System, "Two."),
                message(ChatRole::User, "Hi"),
                message(ChatRole::Assistant, "Hello"),
                message(ChatRole::User, "More"),
            ],
            max_tokens: Some(10),
            temperature: None,
        };
        let body = serde_json::to_value(MessagesBody::new(&request, false)).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "m",
                "max_tokens": 10,
                "system": "One.\n\nTwo.",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "More"}
                ]
            })
        );
        let no_system = ChatRequest {
            model: "m".to_owned(),
            messages: vec![message(ChatRole::User, "Hi")],
            ..ChatRequest::default()
        };
        let body = serde_json::to_value(MessagesBody::new(&no_system, false)).unwrap();
        assert!(body.get("system").is_none());
    }

    #[tokio::test]
    async fn streamed_answer_with_usage() {
        let items = run_all_splits::<AnthropicStream>(STREAM_TEXT).await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Usage(TokenUsage {
                    input_tokens: 25,
                    output_tokens: 0
                })),
                Ok(Chunk::Text("Hello".to_owned())),
                Ok(Chunk::Text("! How can I help?".to_owned())),
                Ok(Chunk::Finish(FinishReason::Stop)),
                Ok(Chunk::Usage(TokenUsage {
                    input_tokens: 0,
                    output_tokens: 15
                })),
            ]
        );
    }

    #[tokio::test]
    async fn streamed_tool_use_is_carried_through() {
        let items = run_all_splits::<AnthropicStream>(STREAM_TOOL).await;
        assert_eq!(text(&items), "Okay, let me check the weather.");
        let tool: Vec<&Value> = items
            .iter()
            .filter_map(|i| match i {
                Ok(Chunk::ToolCall(v)) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(tool[0]["type"], "content_block_start");
        assert_eq!(tool[0]["content_block"]["name"], "get_weather");
        assert_eq!(
            tool[0]["content_block"]["id"],
            "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
        );
        let json: String = tool[1..]
            .iter()
            .filter_map(|v| v["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(
            json,
            r#"{"location": "San Francisco, CA", "unit": "fahrenheit"}"#
        );
        assert!(items.contains(&Ok(Chunk::Finish(FinishReason::ToolCalls))));
        assert!(items.contains(&Ok(Chunk::Usage(TokenUsage {
            input_tokens: 0,
            output_tokens: 89
        }))));
        assert!(items.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn overloaded_error_event_mid_stream() {
        let items = run_all_splits::<AnthropicStream>(STREAM_OVERLOADED).await;
        assert_eq!(text(&items), "Once upon a");
        assert_eq!(
            items.last(),
            Some(&Err(ProviderError::Overloaded {
                retry_after: None,
                message: "Overloaded (overloaded_error)".to_owned()
            }))
        );
        assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1);
    }

    #[test]
    fn error_event_types_are_classified() {
        let cases = [
            ("overloaded_error", "Overloaded", "overloaded"),
            ("rate_limit_error", "slow down", "rate_limited"),
            ("api_error", "Internal server error", "server_error"),
            ("invalid_request_error", "bad field", "bad_request"),
            (
                "invalid_request_error",
                "prompt is too long: 210000 tokens > 200000 maximum",
                "context_too_long",
            ),
            ("authentication_error", "invalid x-api-key", "auth"),
            ("permission_error", "nope", "auth"),
            ("not_found_error", "model: x", "bad_request"),
            ("timeout_error", "timed out", "timeout"),
            ("brand_new_error", "?", "server_error"),
        ];
        for (kind, message, class) in cases {
            let data = json!({"type": "error", "error": {"type": kind, "message": message}});
            let event = SseEvent {
                event: Some("error".to_owned()),
                data: data.to_string(),
                id: None,
            };
            let error = AnthropicStream::default().on_sse(&event).unwrap_err();
            assert_eq!(error.class(), class, "{kind}: {message}");
        }
    }

    #[tokio::test]
    async fn eof_before_message_stop_is_a_cut() {
        let cut = &STREAM_TEXT[..STREAM_TEXT.find("event: message_stop").unwrap()];
        let items = run(cut, AnthropicStream::default(), 9).await;
        // Even with a stop reason seen, only `message_stop` completes the stream.
        assert!(items.contains(&Ok(Chunk::Finish(FinishReason::Stop))));
        assert_eq!(
            items.last(),
            Some(&Err(ProviderError::Transport {
                message: "stream ended before completion".to_owned()
            }))
        );
    }

    #[tokio::test]
    async fn malformed_event_is_a_decode_error() {
        let transcript = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\n\n";
        let items = run(transcript, AnthropicStream::default(), 4).await;
        assert!(matches!(
            items.as_slice(),
            [Err(ProviderError::Decode { .. })]
        ));
    }

    #[test]
    fn unknown_events_and_pings_are_ignored() {
        let mut stream = AnthropicStream::default();
        for data in [
            r#"{"type": "ping"}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"something_new","x":1}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
        ] {
            let event = SseEvent {
                data: data.to_owned(),
                ..SseEvent::default()
            };
            assert_eq!(stream.on_sse(&event), Ok(vec![]));
        }
        assert!(!stream.is_complete());
    }

    #[test]
    fn stop_reasons() {
        assert_eq!(map_stop_reason("end_turn"), FinishReason::Stop);
        assert_eq!(map_stop_reason("stop_sequence"), FinishReason::Stop);
        assert_eq!(map_stop_reason("max_tokens"), FinishReason::Length);
        assert_eq!(map_stop_reason("tool_use"), FinishReason::ToolCalls);
        assert_eq!(map_stop_reason("refusal"), FinishReason::ContentFilter);
        assert_eq!(
            map_stop_reason("pause_turn"),
            FinishReason::Other("pause_turn".to_owned())
        );
    }

    #[test]
    fn non_streaming_completion() {
        let body = include_bytes!("testdata/anthropic_completion.json");
        assert_eq!(
            parse_completion(body).unwrap(),
            Completion {
                text: "Hi! My name is Claude.".to_owned(),
                usage: Some(TokenUsage {
                    input_tokens: 2095 + 100 + 50,
                    output_tokens: 503
                }),
                finish: Some(FinishReason::Stop),
            }
        );
    }

    #[tokio::test]
    async fn http_stream_posts_to_v1_messages_with_headers() {
        let (base, server) = serve_once(sse_response(STREAM_TEXT)).await;
        let provider = AnthropicProvider::new(base, "sk-ant".to_owned(), HttpClient::for_tests());
        let request = ChatRequest {
            model: "claude-sonnet-4-5".to_owned(),
            messages: vec![message(ChatRole::User, "Hi")],
            ..ChatRequest::default()
        };
        let items: Vec<_> = provider.stream(request).await.unwrap().collect().await;
        assert_eq!(text(&items), "Hello! How can I help?");
        assert!(items.iter().all(Result::is_ok));
        let received = server.await.unwrap();
        assert!(received.starts_with("post /v1/messages http/1.1\r\n"));
        assert!(received.contains("\r\nx-api-key: sk-ant\r\n"));
        assert!(received.contains("\r\nanthropic-version: 2023-06-01\r\n"));
        assert!(received.contains("\r\ncontent-type: application/json\r\n"));
        assert!(received.contains(r#""max_tokens":4096"#));
    }

    #[tokio::test]
    async fn http_529_is_overloaded() {
        let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let (base, _server) = serve_once(error_response(529, "retry-after: 4\r\n", body)).await;
        let provider = AnthropicProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let request = ChatRequest {
            model: "m".to_owned(),
            messages: vec![message(ChatRole::User, "Hi")],
            ..ChatRequest::default()
        };
        assert_eq!(
            provider.complete(request).await,
            Err(ProviderError::Overloaded {
                retry_after: Some(Duration::from_secs(4)),
                message: "Overloaded (overloaded_error)".to_owned()
            })
        );
    }

    #[tokio::test]
    async fn embeddings_are_unsupported() {
        let provider =
            AnthropicProvider::new(String::new(), String::new(), HttpClient::for_tests());
        assert_eq!(
            provider
                .embed("m", &["x".to_owned()])
                .await
                .err()
                .map(|e| e.class()),
            Some("unsupported")
        );
    }

    #[test]
    fn http_errors_in_anthropic_shape() {
        let h = |v: &'static str| {
            let mut map = HeaderMap::new();
            map.insert("retry-after", HeaderValue::from_static(v));
            map
        };
        let body = |kind: &str, message: &str| {
            json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
        };
        let too_long = classify_http_error(
            400,
            &HeaderMap::new(),
            &body(
                "invalid_request_error",
                "prompt is too long: 201234 tokens > 200000 maximum",
            ),
        );
        assert_eq!(too_long.class(), "context_too_long");
        let overloaded = classify_http_error(529, &h("7"), &body("overloaded_error", "Overloaded"));
        assert_eq!(
            overloaded,
            ProviderError::Overloaded {
                retry_after: Some(Duration::from_secs(7)),
                message: "Overloaded (overloaded_error)".to_owned()
            }
        );
        let limited = classify_http_error(429, &h("30"), &body("rate_limit_error", "slow"));
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(30)));
        assert_eq!(
            classify_http_error(401, &HeaderMap::new(), &body("authentication_error", "bad"))
                .class(),
            "auth"
        );
        assert_eq!(
            classify_http_error(500, &HeaderMap::new(), &body("api_error", "oops")),
            ProviderError::Server {
                status: 500,
                message: "oops (api_error)".to_owned()
            }
        );
        assert_eq!(
            classify_http_error(413, &HeaderMap::new(), &body("request_too_large", "big")).class(),
            "bad_request"
        );
    }
}
