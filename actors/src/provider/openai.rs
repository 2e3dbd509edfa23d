//! The OpenAI Chat Completions adapter — and, by base URL, every OpenAI-compatible API (Groq,
//! OpenRouter, xAI, Ollama's `/v1`, vLLM).
//!
//! `base_url` is the API root including its version segment (`https://api.openai.com/v1`,
//! `http://127.0.0.1:11434/v1`); chat goes to `{base_url}/chat/completions`, embeddings to
//! `{base_url}/embeddings`. An empty key sends no `Authorization` header (Ollama, local vLLM).
//!
//! Streaming asks for `stream_options.include_usage`, so usage arrives in a last chunk with
//! empty `choices`, after the finish reason and before `data: [DONE]`.
//!
//! This file also holds the HTTP plumbing the other adapters share — one error classifier
//! ([`classify_http_error`]), the transport error mapping and the byte-stream → chunk-stream
//! driver ([`decode_stream`]) — so all three providers fail the same way for the same causes.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use http::Uri;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{HttpClient, HttpError, HttpResponse, Post};
use super::sse::{self, SseEvent};
use super::{
    ChatRequest, ChatRole, Chunk, ChunkStream, Completion, FinishReason, Provider, ProviderError,
    TokenUsage, parse_retry_after,
};

// ---------------------------------------------------------------------------------------------
// The adapter
// ---------------------------------------------------------------------------------------------

/// An OpenAI-compatible Chat Completions endpoint.
#[derive(Clone)]
pub struct OpenAiProvider {
    base_url: String,
    api_key: String,
    http: HttpClient,
    /// Parsed once: parsing a URL on every call showed up in profiles of `/v1`.
    chat_url: Option<Uri>,
    embeddings_url: Option<Uri>,
    /// `Bearer <key>` as a sensitive header value, built once; `None` without a key.
    authorization: Option<Result<HeaderValue, ProviderError>>,
}

/// Never prints the key.
impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_redacted(f, "OpenAiProvider", &self.base_url, &self.api_key)
    }
}

/// The `Debug` of every HTTP adapter: its endpoint, and only whether a key is set.
pub(crate) fn debug_redacted(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    base_url: &str,
    api_key: &str,
) -> std::fmt::Result {
    f.debug_struct(name)
        .field("base_url", &base_url)
        .field(
            "api_key",
            &if api_key.is_empty() {
                "(none)"
            } else {
                "(redacted)"
            },
        )
        .finish_non_exhaustive()
}

impl OpenAiProvider {
    /// `base_url` like `https://api.openai.com/v1` (a trailing `/` is tolerated); `api_key`
    /// may be empty for servers that take none.
    pub fn new(base_url: String, api_key: String, http: HttpClient) -> Self {
        let base_url = trim_base_url(base_url);
        let parse = |path: &str| format!("{base_url}{path}").parse::<Uri>().ok();
        let authorization =
            (!api_key.is_empty()).then(|| secret_header(&format!("Bearer {api_key}")));
        Self {
            chat_url: parse("/chat/completions"),
            embeddings_url: parse("/embeddings"),
            base_url,
            api_key,
            http,
            authorization,
        }
    }

    fn post(&self, path: &str) -> Result<Post<'_>, ProviderError> {
        let parsed = match path {
            "/chat/completions" => self.chat_url.as_ref(),
            "/embeddings" => self.embeddings_url.as_ref(),
            _ => None,
        };
        let request = match parsed {
            Some(url) => self.http.post(url.clone()),
            // An unparsable base URL fails here, per call, saying why.
            None => self.http.post_url(&format!("{}{path}", self.base_url)),
        };
        match &self.authorization {
            None => Ok(request),
            Some(Ok(bearer)) => Ok(request.header(AUTHORIZATION, bearer.clone())),
            Some(Err(error)) => Err(error.clone()),
        }
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        "openai"
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = ChatBody::new(&request, true);
        let response = send(self.post("/chat/completions")?.json(&body)).await?;
        Ok(response_stream(response, OpenAiStream::default()))
    }

    async fn complete(&self, request: ChatRequest) -> Result<Completion, ProviderError> {
        let body = ChatBody::new(&request, false);
        let response = send(self.post("/chat/completions")?.json(&body)).await?;
        parse_completion(&read_body(response).await?)
    }

    async fn embed(&self, model: &str, inputs: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        // OpenAI rejects an empty `input` array; nothing to embed is not an error.
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let body = EmbeddingsRequest {
            model,
            input: inputs,
        };
        let response = send(self.post("/embeddings")?.json(&body)).await?;
        parse_embeddings(&read_body(response).await?, inputs.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format: requests
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    /// `max_tokens` rather than `max_completion_tokens`: every compatible server knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: ChatRole,
    content: &'a str,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl<'a> ChatBody<'a> {
    fn new(request: &'a ChatRequest, stream: bool) -> Self {
        // Borrowed, not cloned: a long conversation is serialized straight from the request.
        let system = request.system.as_deref().map(|content| WireMessage {
            role: ChatRole::System,
            content,
        });
        let messages = system
            .into_iter()
            .chain(request.messages.iter().map(|m| WireMessage {
                role: m.role,
                content: &m.content,
            }))
            .collect();
        Self {
            model: &request.model,
            messages,
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        }
    }
}

#[derive(Debug, Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: &'a [String],
}

// ---------------------------------------------------------------------------------------------
// Wire format: responses (lenient: `null` wherever a field may be absent)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Option<Vec<StreamChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// OpenRouter and some servers report a failure mid-stream as `{"error": {...}}`.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamChoice {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl WireUsage {
    fn to_usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.prompt_tokens.unwrap_or(0),
            output_tokens: self.completion_tokens.unwrap_or(0),
        }
    }
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(default)]
    choices: Option<Vec<CompletionChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    message: Option<CompletionMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct EmbeddingsBody {
    data: Vec<EmbeddingItem>,
}

#[derive(Debug, Deserialize)]
struct EmbeddingItem {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

// ---------------------------------------------------------------------------------------------
// Pure conversions
// ---------------------------------------------------------------------------------------------

/// OpenAI's finish reasons; `function_call` is the pre-tools spelling of `tool_calls`.
pub(crate) fn map_finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        other => FinishReason::Other(other.to_owned()),
    }
}

/// The streaming state machine: one SSE `data:` payload in, chunks out.
///
/// The answer is complete at a `finish_reason` (the usage chunk may still follow); the stream
/// is over at `data: [DONE]`.
#[derive(Debug, Default)]
pub struct OpenAiStream {
    finished: bool,
    done: bool,
}

impl OpenAiStream {
    pub fn on_data(&mut self, data: &str) -> Result<Vec<Chunk>, ProviderError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(Vec::new());
        }
        if data == "[DONE]" {
            self.done = true;
            return Ok(Vec::new());
        }
        let chunk: StreamChunk = serde_json::from_str(data).map_err(decode_error)?;
        if let Some(error) = chunk.error.as_ref().filter(|e| !e.is_null()) {
            return Err(classify_stream_error(error));
        }
        let mut out = Vec::new();
        // Only choice 0: Chorus never asks for `n > 1`.
        let choice = chunk
            .choices
            .into_iter()
            .flatten()
            .find(|c| c.index.unwrap_or(0) == 0);
        if let Some(choice) = choice {
            if let Some(delta) = choice.delta {
                // The first chunk carries `"content": ""` with the role; skip empty text.
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push(Chunk::Text(text));
                }
                out.extend(delta.tool_calls.into_iter().flatten().map(Chunk::ToolCall));
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finished = true;
                out.push(Chunk::Finish(map_finish_reason(&reason)));
            }
        }
        if let Some(usage) = chunk.usage {
            out.push(Chunk::Usage(usage.to_usage()));
        }
        Ok(out)
    }
}

impl EventDecoder for OpenAiStream {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<Chunk>, ProviderError> {
        self.on_data(&event.data)
    }

    fn is_complete(&self) -> bool {
        self.finished || self.done
    }

    fn is_done(&self) -> bool {
        self.done
    }
}

/// A non-streaming response body → [`Completion`].
pub fn parse_completion(body: &[u8]) -> Result<Completion, ProviderError> {
    let body: CompletionBody = serde_json::from_slice(body).map_err(decode_error)?;
    // Some compatible servers answer 200 with an error object.
    if let Some(error) = body.error.as_ref().filter(|e| !e.is_null()) {
        return Err(classify_stream_error(error));
    }
    let choice = body.choices.into_iter().flatten().next();
    let (text, finish) = match choice {
        Some(choice) => (
            choice.message.and_then(|m| m.content).unwrap_or_default(),
            choice.finish_reason.as_deref().map(map_finish_reason),
        ),
        None => {
            return Err(ProviderError::Decode {
                message: "completion has no choices".to_owned(),
            });
        }
    };
    Ok(Completion {
        text,
        usage: body.usage.map(|u| u.to_usage()),
        finish,
    })
}

/// An embeddings response → one vector per input, in input order (by `index`).
pub fn parse_embeddings(body: &[u8], expected: usize) -> Result<Vec<Vec<f32>>, ProviderError> {
    let body: EmbeddingsBody = serde_json::from_slice(body).map_err(decode_error)?;
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (position, item) in body.data.into_iter().enumerate() {
        let index = item.index.unwrap_or(position);
        match slots.get_mut(index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => {
                return Err(ProviderError::Decode {
                    message: format!("embedding index {index} out of range or repeated"),
                });
            }
        }
    }
    slots
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ProviderError::Decode {
            message: format!("expected {expected} embeddings, some are missing"),
        })
}

// =============================================================================================
// Shared HTTP plumbing (used by the Anthropic and Gemini adapters too)
// =============================================================================================

/// `https://host/v1/` and `https://host/v1` name the same root; paths are appended to it.
pub(crate) fn trim_base_url(base_url: String) -> String {
    base_url.trim_end_matches('/').to_owned()
}

/// A credential as a header value, marked sensitive so it stays out of debug output. A key that
/// cannot be a header value is a configuration error (classified Auth), not a transport fault.
pub(crate) fn secret_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut header = HeaderValue::from_str(value).map_err(|_| ProviderError::Auth {
        message: "the API key contains characters not allowed in an HTTP header".to_owned(),
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// Sends a request; a non-2xx answer becomes a classified error (its body read for the message).
pub(crate) async fn send(request: Post<'_>) -> Result<HttpResponse, ProviderError> {
    let response = request.send().await.map_err(transport_error)?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    // The body only improves the message; if it cannot be read, the status still classifies.
    let body = match response.bytes().await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    Err(classify_http_error(status.as_u16(), &headers, &body))
}

/// Reads a whole (successful) response body.
pub(crate) async fn read_body(response: HttpResponse) -> Result<Bytes, ProviderError> {
    response.bytes().await.map_err(transport_error)
}

/// A transport failure (connect, send, or reading the body) → its class: a timeout, or a
/// transport fault (a body cut mid-way is a broken connection like any other).
pub(crate) fn transport_error(error: HttpError) -> ProviderError {
    if error.timeout {
        ProviderError::Timeout {
            message: error.message,
        }
    } else {
        ProviderError::Transport {
            message: error.message,
        }
    }
}

/// A failure while reading a streaming body. Past the headers, a broken connection and a
/// premature end are the same event for the caller — the answer was cut — so both read as
/// [`stream_cut`]; the cause goes to the log. A read timeout stays a Timeout.
fn stream_body_error(error: HttpError) -> ProviderError {
    if error.timeout {
        return transport_error(error);
    }
    tracing::debug!(error = %error.message, "provider stream body failed");
    stream_cut()
}

pub(crate) fn decode_error(error: serde_json::Error) -> ProviderError {
    ProviderError::Decode {
        message: error.to_string(),
    }
}

/// The error every adapter's stream ends with when the body stops before the provider's
/// terminal marker.
pub(crate) fn stream_cut() -> ProviderError {
    ProviderError::Transport {
        message: "stream ended before completion".to_owned(),
    }
}

/// What an adapter's pure event converter offers [`decode_stream`].
pub(crate) trait EventDecoder: Send + 'static {
    /// One SSE event → chunks. An `Err` is yielded and ends the stream.
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<Chunk>, ProviderError>;
    /// The provider has said the answer is complete: the body may end from here on.
    fn is_complete(&self) -> bool;
    /// Nothing more will come (OpenAI `[DONE]`, Anthropic `message_stop`): stop reading.
    fn is_done(&self) -> bool {
        false
    }
}

/// A successful streaming response → the adapter's chunk stream.
pub(crate) fn response_stream<D: EventDecoder>(response: HttpResponse, decoder: D) -> ChunkStream {
    decode_stream(
        response
            .bytes_stream()
            .map(|item| item.map_err(stream_body_error)),
        decoder,
    )
}

/// The one streaming loop: bytes → SSE events → the adapter's chunks. It yields at most one
/// `Err` and then ends; a body ending before the decoder is complete yields [`stream_cut`].
/// Generic over the byte source so tests drive it without a server.
pub(crate) fn decode_stream<S, B, D>(body: S, decoder: D) -> ChunkStream
where
    S: Stream<Item = Result<B, ProviderError>> + Send + 'static,
    B: AsRef<[u8]> + Send + 'static,
    D: EventDecoder,
{
    struct State<D> {
        events: BoxStream<'static, Result<SseEvent, ProviderError>>,
        decoder: D,
        pending: std::vec::IntoIter<Chunk>,
        failed: Option<ProviderError>,
        ended: bool,
    }

    let state = State {
        events: sse::events(body).boxed(),
        decoder,
        pending: Vec::new().into_iter(),
        failed: None,
        ended: false,
    };
    stream::unfold(state, |mut state| async move {
        loop {
            if let Some(chunk) = state.pending.next() {
                return Some((Ok(chunk), state));
            }
            if let Some(error) = state.failed.take() {
                state.ended = true;
                return Some((Err(error), state));
            }
            if state.ended {
                return None;
            }
            match state.events.next().await {
                Some(Ok(event)) => match state.decoder.on_event(&event) {
                    Ok(chunks) => {
                        state.pending = chunks.into_iter();
                        state.ended = state.decoder.is_done();
                    }
                    Err(error) => state.failed = Some(error),
                },
                Some(Err(error)) if state.decoder.is_complete() => {
                    // The answer is whole (only usage or `[DONE]` could be missing): a reset
                    // now is not worth a retry or a failover.
                    tracing::debug!(%error, "provider stream failed after completion");
                    state.ended = true;
                }
                Some(Err(error)) => state.failed = Some(error),
                None => {
                    state.ended = true;
                    if !state.decoder.is_complete() {
                        state.failed = Some(stream_cut());
                    }
                }
            }
        }
    })
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Error classification
// ---------------------------------------------------------------------------------------------

/// The fields of a provider's error body that classification and messages use. Understands
/// OpenAI `{"error":{"message","type","code"}}`, Anthropic `{"type":"error","error":{"type",
/// "message"}}`, Gemini `{"error":{"code","message","status","details"}}` (also wrapped in a
/// one-element array), `{"error":"text"}` (Ollama) and `{"message"|"detail": "text"}`.
#[derive(Debug, Default)]
struct ErrorDetails {
    message: String,
    /// OpenAI `type`, Anthropic `error.type`, Gemini `status`.
    kind: Option<String>,
    /// OpenAI's string `code`.
    code: Option<String>,
    /// A numeric `code` (Gemini, OpenRouter): an HTTP status.
    status: Option<u16>,
    /// Gemini's `google.rpc.RetryInfo.retryDelay`.
    retry_after: Option<Duration>,
    /// The raw error, lower-cased once, for the keyword checks.
    haystack: String,
}

impl ErrorDetails {
    fn from_body(body: &str) -> Self {
        match serde_json::from_str::<Value>(body) {
            Ok(value) => {
                let value = match value {
                    Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
                    other => other,
                };
                let mut details = match value.get("error") {
                    Some(error @ Value::Object(_)) => Self::from_error_object(error),
                    Some(Value::String(message)) => Self {
                        message: message.clone(),
                        ..Self::default()
                    },
                    _ => Self {
                        message: ["message", "detail"]
                            .iter()
                            .find_map(|k| value.get(k).and_then(Value::as_str))
                            .unwrap_or_default()
                            .to_owned(),
                        ..Self::default()
                    },
                };
                details.haystack = body.to_lowercase();
                details
            }
            Err(_) => Self {
                message: truncate(body.trim(), 500).to_owned(),
                haystack: body.to_lowercase(),
                ..Self::default()
            },
        }
    }

    /// The inner `error` object of any of the providers' shapes.
    fn from_error_object(error: &Value) -> Self {
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_owned);
        let retry_after = error
            .get("details")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|d| d.get("retryDelay").and_then(Value::as_str))
            .and_then(|delay| parse_retry_after(delay.strip_suffix('s').unwrap_or(delay)));
        Self {
            message: text("message").unwrap_or_default(),
            kind: text("type").or_else(|| text("status")),
            code: text("code"),
            status: error
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (100..=599).contains(c)),
            retry_after,
            haystack: error.to_string().to_lowercase(),
        }
    }

    /// The message shown to callers: the provider's words plus its type and code, which are
    /// what people search for.
    fn full_message(&self, status: u16) -> String {
        let mut tags: Vec<&str> = Vec::new();
        tags.extend(self.kind.as_deref());
        tags.extend(
            self.code
                .as_deref()
                .filter(|c| Some(*c) != self.kind.as_deref()),
        );
        let message = if self.message.is_empty() {
            format!("HTTP {status}")
        } else {
            self.message.clone()
        };
        if tags.is_empty() {
            message
        } else {
            format!("{message} ({})", tags.join(", "))
        }
    }

    fn mentions_context_length(&self) -> bool {
        const MARKERS: [&str; 6] = [
            "context_length_exceeded",              // OpenAI's code
            "maximum context length",               // OpenAI, vLLM, OpenRouter wording
            "prompt is too long",                   // Anthropic
            "exceeds the maximum number of tokens", // Gemini
            "input token count",                    // Gemini
            "context window",                       // xAI and others
        ];
        MARKERS.iter().any(|m| self.haystack.contains(m))
    }

    /// Gemini answers a bad key with 400 `INVALID_ARGUMENT`, not 401.
    fn mentions_invalid_key(&self) -> bool {
        self.haystack.contains("api_key_invalid") || self.haystack.contains("api key not valid")
    }

    /// An HTTP status for an error that arrived without one (mid-stream, or a 200 body), from
    /// its numeric code or its type name.
    fn implied_status(&self) -> u16 {
        let by_name = |name: &str| -> Option<u16> {
            Some(match name {
                // Anthropic error types.
                "invalid_request_error" => 400,
                "authentication_error" | "invalid_api_key" => 401,
                "billing_error" => 402,
                "permission_error" => 403,
                "not_found_error" => 404,
                "timeout_error" => 408,
                "request_too_large" => 413,
                "rate_limit_error" | "rate_limit_exceeded" | "insufficient_quota" => 429,
                "api_error" | "server_error" => 500,
                "overloaded_error" => 529,
                "context_length_exceeded" => 400,
                // Google RPC status names.
                "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => 400,
                "UNAUTHENTICATED" => 401,
                "PERMISSION_DENIED" => 403,
                "NOT_FOUND" => 404,
                "RESOURCE_EXHAUSTED" => 429,
                "INTERNAL" | "UNKNOWN" => 500,
                "UNAVAILABLE" => 503,
                "DEADLINE_EXCEEDED" => 504,
                _ => return None,
            })
        };
        self.status
            .or_else(|| self.kind.as_deref().and_then(by_name))
            .or_else(|| self.code.as_deref().and_then(by_name))
            // Unknown and mid-stream: most likely the provider's fault, worth another try.
            .unwrap_or(500)
    }

    fn classify(&self, status: u16, retry_after: Option<Duration>) -> ProviderError {
        let message = self.full_message(status);
        let retry_after = retry_after.or(self.retry_after);
        match status {
            401 | 403 => ProviderError::Auth { message },
            400..=499 if self.mentions_invalid_key() => ProviderError::Auth { message },
            // The server timed out waiting for us: sending again is fine.
            408 => ProviderError::Timeout { message },
            429 => ProviderError::RateLimited {
                retry_after,
                message,
            },
            400 | 413 | 422 if self.mentions_context_length() => {
                ProviderError::ContextTooLong { message }
            }
            400..=499 => ProviderError::BadRequest { message },
            503 | 529 => ProviderError::Overloaded {
                retry_after,
                message,
            },
            500..=599 if self.kind.as_deref() == Some("overloaded_error") => {
                ProviderError::Overloaded {
                    retry_after,
                    message,
                }
            }
            500..=599 => ProviderError::Server { status, message },
            // 1xx/3xx reaching us means a misconfigured endpoint (a redirect we did not follow).
            _ => ProviderError::BadRequest {
                message: format!("unexpected HTTP status {status}: {message}"),
            },
        }
    }
}

/// Classifies a non-2xx HTTP answer from any of the three providers (see the module docs of
/// `provider` for the classes): 401/403 → Auth; 408 → Timeout; 429 → RateLimited; 400/413/422
/// mentioning the context window → ContextTooLong; other 4xx → BadRequest; 503/529 →
/// Overloaded; other 5xx → Server. `retry-after-ms`, then `Retry-After` (seconds), then a
/// Gemini `RetryInfo` in the body give the retry delay.
pub(crate) fn classify_http_error(status: u16, headers: &HeaderMap, body: &str) -> ProviderError {
    let details = ErrorDetails::from_body(body);
    details.classify(status, retry_after_header(headers))
}

/// Classifies an error object that arrived without an HTTP status: mid-stream (Anthropic's
/// `error` event, OpenAI/Gemini `{"error": …}` chunks) or inside a 200 body. `error` is the
/// inner object (`{"type","message"}`, `{"code","message","status"}`, …).
pub(crate) fn classify_stream_error(error: &Value) -> ProviderError {
    let details = match error {
        Value::String(message) => ErrorDetails {
            message: message.clone(),
            haystack: message.to_lowercase(),
            ..ErrorDetails::default()
        },
        other => ErrorDetails::from_error_object(other),
    };
    let status = details.implied_status();
    details.classify(status, None)
}

fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("retry-after-ms")
        .and_then(|ms| ms.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| header("retry-after").and_then(parse_retry_after))
}

/// At most `max` bytes of `text`, cut on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// ---------------------------------------------------------------------------------------------
// Test support shared by the adapters' tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod test_support {
    use futures_util::stream::{self, StreamExt};

    use super::{EventDecoder, decode_stream};
    use crate::provider::{Chunk, ProviderError};

    /// Runs a wire transcript through the real streaming loop, `chunk_size` bytes at a time
    /// (so events straddle network chunks).
    pub(crate) async fn run<D: EventDecoder>(
        transcript: &str,
        decoder: D,
        chunk_size: usize,
    ) -> Vec<Result<Chunk, ProviderError>> {
        let pieces: Vec<Result<Vec<u8>, ProviderError>> = transcript
            .as_bytes()
            .chunks(chunk_size)
            .map(|c| Ok(c.to_vec()))
            .collect();
        decode_stream(stream::iter(pieces), decoder).collect().await
    }

    /// Runs a transcript at several chunk sizes and checks they all agree; returns the result.
    pub(crate) async fn run_all_splits<D: EventDecoder + Default>(
        transcript: &str,
    ) -> Vec<Result<Chunk, ProviderError>> {
        let whole = run(transcript, D::default(), transcript.len().max(1)).await;
        for size in [1, 2, 3, 7, 64] {
            assert_eq!(
                run(transcript, D::default(), size).await,
                whole,
                "chunk size {size}"
            );
        }
        whole
    }

    /// Reads one HTTP/1.1 request (head and content-length body) off `socket`, leaving any bytes
    /// of the next request in `buffer`; the request lower-cased, or `None` once the peer closes.
    pub(crate) async fn read_request(
        socket: &mut tokio::net::TcpStream,
        buffer: &mut Vec<u8>,
    ) -> Option<String> {
        use tokio::io::AsyncReadExt;

        let mut piece = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(buffer).to_lowercase();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text[..head_end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                let end = head_end + 4 + length;
                if buffer.len() >= end {
                    let request = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
                    buffer.drain(..end);
                    return Some(request);
                }
            }
            let n = socket.read(&mut piece).await.ok()?;
            if n == 0 {
                return None;
            }
            buffer.extend_from_slice(&piece[..n]);
        }
    }

    /// A one-shot HTTP/1.1 server on `127.0.0.1:0`: it reads one request, answers `response`
    /// verbatim (status line, headers, body) and closes, which ends a close-delimited body.
    /// Returns the base URL and a handle yielding the request as received, lower-cased.
    pub(crate) async fn serve_once(response: String) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::AsyncWriteExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let handle = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let request = read_request(&mut socket, &mut Vec::new())
                .await
                .expect("client closed before sending a whole request");
            socket.write_all(response.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
            request
        });
        (base, handle)
    }

    /// A 200 event-stream response carrying `body`.
    pub(crate) fn sse_response(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
        )
    }

    /// An error response with the given status, extra header lines and JSON body.
    pub(crate) fn error_response(status: u16, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status} Whatever\r\ncontent-type: application/json\r\n{headers}\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// The text of all `Text` chunks, concatenated.
    pub(crate) fn text(items: &[Result<Chunk, ProviderError>]) -> String {
        items
            .iter()
            .filter_map(|item| match item {
                Ok(Chunk::Text(text)) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{run, run_all_splits, text};
    use super::*;
    use crate::provider::ChatMessage;
    use serde_json::json;

    const STREAM_TEXT: &str = include_str!("testdata/openai_stream_text.sse");
    const STREAM_TOOL: &str = include_str!("testdata/openai_stream_tool_call.sse");
    const STREAM_FILTER: &str = include_str!("testdata/openai_stream_content_filter.sse");
    const STREAM_ERROR: &str = include_str!("testdata/openai_stream_error.sse");

    fn request() -> ChatRequest {
        ChatRequest {
            model: "gpt-4o-mini".to_owned(),
            system: Some("Be brief.".to_owned()),
            messages: vec![
                ChatMessage {
                    role: ChatRole::User,
                    content: "Hi".to_owned(),
                },
                ChatMessage {
                    role: ChatRole::Assistant,
                    content: "Hello!".to_owned(),
                },
            ],
            max_tokens: Some(256),
            temperature: Some(0.5),
        }
    }

    #[test]
    fn streaming_body_has_system_first_and_asks_for_usage() {
        let request = request();
        let body = serde_json::to_value(ChatBody::new(&request, true)).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}
                ],
                "max_tokens": 256,
                "temperature": 0.5,
                "stream": true,
                "stream_options": {"include_usage": true}
            })
        );
    }

    #[test]
    fn plain_body_omits_unset_fields() {
        let request = ChatRequest {
            model: "m".to_owned(),
            messages: vec![ChatMessage {
                role: ChatRole::User,
                content: "x".to_owned(),
            }],
            ..ChatRequest::default()
        };
        let body = serde_json::to_value(ChatBody::new(&request, false)).unwrap();
        assert_eq!(
            body,
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        );
    }

    #[tokio::test]
    async fn streamed_answer_with_usage() {
        let items = run_all_splits::<OpenAiStream>(STREAM_TEXT).await;
        assert_eq!(text(&items), "Hello! How can I help you today?");
        assert_eq!(
            &items[items.len() - 2..],
            &[
                Ok(Chunk::Finish(FinishReason::Stop)),
                Ok(Chunk::Usage(TokenUsage {
                    input_tokens: 19,
                    output_tokens: 10
                })),
            ]
        );
    }

    #[tokio::test]
    async fn streamed_tool_call_is_carried_through() {
        let items = run_all_splits::<OpenAiStream>(STREAM_TOOL).await;
        let tool: Vec<&Value> = items
            .iter()
            .filter_map(|i| match i {
                Ok(Chunk::ToolCall(v)) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(tool.len(), 4);
        assert_eq!(tool[0]["id"], "call_abc123");
        assert_eq!(tool[0]["function"]["name"], "get_weather");
        let arguments: String = tool
            .iter()
            .filter_map(|v| v["function"]["arguments"].as_str())
            .collect();
        assert_eq!(arguments, r#"{"location":"Paris"}"#);
        assert!(items.contains(&Ok(Chunk::Finish(FinishReason::ToolCalls))));
        assert!(items.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn content_filter_finish() {
        let items = run_all_splits::<OpenAiStream>(STREAM_FILTER).await;
        assert_eq!(text(&items), "I can");
        assert!(items.contains(&Ok(Chunk::Finish(FinishReason::ContentFilter))));
        assert!(items.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn error_chunk_mid_stream_ends_the_stream() {
        let items = run_all_splits::<OpenAiStream>(STREAM_ERROR).await;
        assert_eq!(text(&items), "Once upon");
        let last = items.last().unwrap();
        assert!(
            matches!(last, Err(ProviderError::Server { status: 502, .. })),
            "{last:?}"
        );
        // Nothing after the error, not even the cut marker.
        assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1);
    }

    #[tokio::test]
    async fn eof_before_finish_is_a_cut() {
        // Cut mid-event, before the finish reason: the partial event is dropped, then EOF.
        let cut = &STREAM_TEXT[..STREAM_TEXT.find(r#""finish_reason":"stop""#).unwrap()];
        assert!(cut.len() < STREAM_TEXT.len());
        let items = run(cut, OpenAiStream::default(), 5).await;
        assert_eq!(items.last(), Some(&Err(stream_cut())));
    }

    #[tokio::test]
    async fn eof_after_finish_without_done_is_fine() {
        let transcript = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}\n\n";
        let items = run(transcript, OpenAiStream::default(), 4).await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Text("ok".to_owned())),
                Ok(Chunk::Finish(FinishReason::Stop))
            ]
        );
    }

    #[tokio::test]
    async fn malformed_json_is_a_decode_error() {
        let transcript = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[\n\ndata: [DONE]\n\n";
        let items = run(transcript, OpenAiStream::default(), 3).await;
        assert_eq!(items.len(), 2);
        assert!(matches!(items[1], Err(ProviderError::Decode { .. })));
    }

    #[tokio::test]
    async fn done_stops_reading() {
        let transcript = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\ndata: garbage\n\n";
        let items = run(transcript, OpenAiStream::default(), 100).await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Text("a".to_owned())),
                Ok(Chunk::Finish(FinishReason::Length))
            ]
        );
    }

    #[tokio::test]
    async fn transport_error_mid_stream_is_yielded_once() {
        let pieces: Vec<Result<&'static [u8], ProviderError>> = vec![
            Ok(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"),
            Err(ProviderError::Transport {
                message: "connection reset".to_owned(),
            }),
            Ok(b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"),
        ];
        let items: Vec<_> = decode_stream(stream::iter(pieces), OpenAiStream::default())
            .collect()
            .await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Text("a".to_owned())),
                Err(ProviderError::Transport {
                    message: "connection reset".to_owned()
                })
            ]
        );
    }

    #[test]
    fn non_streaming_completion() {
        let body = include_bytes!("testdata/openai_completion.json");
        assert_eq!(
            parse_completion(body).unwrap(),
            Completion {
                text: "Hello there, how may I assist you today?".to_owned(),
                usage: Some(TokenUsage {
                    input_tokens: 9,
                    output_tokens: 12
                }),
                finish: Some(FinishReason::Stop),
            }
        );
    }

    #[test]
    fn non_streaming_tool_call_has_null_content() {
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        let completion = parse_completion(body).unwrap();
        assert_eq!(completion.text, "");
        assert_eq!(completion.finish, Some(FinishReason::ToolCalls));
    }

    #[test]
    fn error_inside_a_200_body_is_classified() {
        let body = br#"{"error":{"message":"Rate limit exceeded","code":429}}"#;
        assert!(matches!(
            parse_completion(body),
            Err(ProviderError::RateLimited { .. })
        ));
    }

    #[test]
    fn embeddings_are_ordered_by_index() {
        let body = br#"{"object":"list","data":[
            {"object":"embedding","index":1,"embedding":[0.5,0.25]},
            {"object":"embedding","index":0,"embedding":[1.0,-1.0]}
        ],"model":"text-embedding-3-small","usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        assert_eq!(
            parse_embeddings(body, 2).unwrap(),
            vec![vec![1.0, -1.0], vec![0.5, 0.25]]
        );
        assert!(matches!(
            parse_embeddings(body, 3),
            Err(ProviderError::Decode { .. })
        ));
        let repeated = br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[2]}]}"#;
        assert!(matches!(
            parse_embeddings(repeated, 2),
            Err(ProviderError::Decode { .. })
        ));
    }

    #[test]
    fn embeddings_request_shape() {
        let inputs = vec!["a".to_owned(), "b".to_owned()];
        let body = serde_json::to_value(EmbeddingsRequest {
            model: "text-embedding-3-small",
            input: &inputs,
        })
        .unwrap();
        assert_eq!(
            body,
            json!({"model": "text-embedding-3-small", "input": ["a", "b"]})
        );
    }

    #[test]
    fn base_url_trailing_slash_is_trimmed() {
        let p = OpenAiProvider::new(
            "http://127.0.0.1:9/v1/".to_owned(),
            String::new(),
            HttpClient::for_tests(),
        );
        assert_eq!(p.base_url, "http://127.0.0.1:9/v1");
    }

    // --- the HTTP layer, against a one-shot local server -------------------------------

    use super::test_support::{error_response, serve_once, sse_response};

    #[tokio::test]
    async fn http_stream_posts_to_chat_completions_with_bearer() {
        let (base, server) = serve_once(sse_response(STREAM_TEXT)).await;
        let provider = OpenAiProvider::new(
            format!("{base}/v1"),
            "sk-test".to_owned(),
            HttpClient::for_tests(),
        );
        let items: Vec<_> = provider.stream(request()).await.unwrap().collect().await;
        assert_eq!(text(&items), "Hello! How can I help you today?");
        assert!(items.iter().all(Result::is_ok));
        let received = server.await.unwrap();
        assert!(received.starts_with("post /v1/chat/completions http/1.1\r\n"));
        assert!(received.contains("\r\nauthorization: bearer sk-test\r\n"));
        assert!(received.contains("\r\ncontent-type: application/json\r\n"));
        assert!(received.contains(r#""stream_options":{"include_usage":true}"#));
    }

    #[tokio::test]
    async fn http_empty_key_sends_no_authorization() {
        let body = std::str::from_utf8(include_bytes!("testdata/openai_completion.json")).unwrap();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (base, server) = serve_once(response).await;
        let provider = OpenAiProvider::new(
            format!("{base}/v1/"),
            String::new(),
            HttpClient::for_tests(),
        );
        let completion = provider.complete(request()).await.unwrap();
        assert_eq!(completion.finish, Some(FinishReason::Stop));
        let received = server.await.unwrap();
        assert!(received.starts_with("post /v1/chat/completions "));
        assert!(!received.contains("authorization:"));
    }

    #[tokio::test]
    async fn http_429_is_classified_with_retry_after() {
        let body = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        let (base, _server) = serve_once(error_response(429, "retry-after: 12\r\n", body)).await;
        let provider = OpenAiProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let error = provider.stream(request()).await.err().unwrap();
        assert_eq!(
            error,
            ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(12)),
                message: "Rate limit reached (requests, rate_limit_exceeded)".to_owned()
            }
        );
    }

    #[tokio::test]
    async fn http_cut_stream_ends_with_transport_error() {
        let cut = &STREAM_TEXT[..STREAM_TEXT.find(r#""finish_reason":"stop""#).unwrap()];
        let (base, _server) = serve_once(sse_response(cut)).await;
        let provider = OpenAiProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let items: Vec<_> = provider.stream(request()).await.unwrap().collect().await;
        assert_eq!(items.last(), Some(&Err(stream_cut())));
    }

    #[tokio::test]
    async fn http_chunked_body_cut_mid_stream_is_a_cut_not_a_decode_error() {
        // One chunk of the chunked encoding, then the connection closes without the final
        // zero-size chunk: the client reports that as a broken body.
        let event = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
            event.len()
        );
        let (base, _server) = serve_once(response).await;
        let provider = OpenAiProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let items: Vec<_> = provider.stream(request()).await.unwrap().collect().await;
        assert_eq!(
            items,
            vec![Ok(Chunk::Text("Hi".to_owned())), Err(stream_cut())]
        );
    }

    #[tokio::test]
    async fn http_embeddings() {
        let body = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}],"model":"e"}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (base, server) = serve_once(response).await;
        let provider = OpenAiProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let vectors = provider.embed("e", &["hi".to_owned()]).await.unwrap();
        assert_eq!(vectors, vec![vec![0.5]]);
        let received = server.await.unwrap();
        assert!(received.starts_with("post /embeddings "));
        assert!(received.ends_with(r#"{"model":"e","input":["hi"]}"#));
    }

    #[tokio::test]
    async fn http_connection_refused_is_transport() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let provider = OpenAiProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let error = provider.complete(request()).await.err().unwrap();
        assert_eq!(error.class(), "transport", "{error:?}");
    }

    #[tokio::test]
    async fn http_timeout_is_timeout() {
        // Accepts the connection and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let _held = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let http = HttpClient::new(super::super::http::HttpTimeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_millis(200),
        })
        .unwrap();
        let provider = OpenAiProvider::new(base, "k".to_owned(), http);
        let error = provider.stream(request()).await.err().unwrap();
        assert_eq!(error.class(), "timeout", "{error:?}");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let provider = OpenAiProvider::new(
            "http://127.0.0.1:9/v1".to_owned(),
            "sk-secret".to_owned(),
            HttpClient::for_tests(),
        );
        let printed = format!("{provider:?}");
        assert!(!printed.contains("sk-secret"), "{printed}");
        assert!(printed.contains("(redacted)"));
    }

    #[test]
    fn a_key_that_cannot_be_a_header_is_an_auth_error() {
        let provider = OpenAiProvider::new(
            "http://127.0.0.1:9".to_owned(),
            "bad\nkey".to_owned(),
            HttpClient::for_tests(),
        );
        assert!(matches!(
            provider.post("/x"),
            Err(ProviderError::Auth { .. })
        ));
    }

    // --- classification -----------------------------------------------------------------

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn classify_auth() {
        let body = r#"{"error":{"message":"Incorrect API key provided: sk-abc.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let error = classify_http_error(401, &HeaderMap::new(), body);
        assert_eq!(
            error,
            ProviderError::Auth {
                message:
                    "Incorrect API key provided: sk-abc. (invalid_request_error, invalid_api_key)"
                        .to_owned()
            }
        );
        assert!(matches!(
            classify_http_error(403, &HeaderMap::new(), ""),
            ProviderError::Auth { .. }
        ));
    }

    #[test]
    fn classify_rate_limit_with_retry_after() {
        let body = r#"{"error":{"message":"Rate limit reached for gpt-4o","type":"requests","code":"rate_limit_exceeded"}}"#;
        let error = classify_http_error(429, &headers(&[("retry-after", "20")]), body);
        assert_eq!(error.retry_after(), Some(Duration::from_secs(20)));
        assert_eq!(error.class(), "rate_limited");
        // retry-after-ms wins: it is the more precise of the two.
        let error = classify_http_error(
            429,
            &headers(&[("retry-after", "2"), ("retry-after-ms", "1500")]),
            body,
        );
        assert_eq!(error.retry_after(), Some(Duration::from_millis(1500)));
        // No header: no delay.
        assert_eq!(
            classify_http_error(429, &HeaderMap::new(), body).retry_after(),
            None
        );
    }

    #[test]
    fn classify_context_length() {
        let openai = r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        assert_eq!(
            classify_http_error(400, &HeaderMap::new(), openai).class(),
            "context_too_long"
        );
        let other = r#"{"error":{"message":"Invalid value for 'temperature'","type":"invalid_request_error","code":null}}"#;
        assert_eq!(
            classify_http_error(400, &HeaderMap::new(), other).class(),
            "bad_request"
        );
        assert_eq!(
            classify_http_error(404, &HeaderMap::new(), r#"{"error":"model 'x' not found"}"#),
            ProviderError::BadRequest {
                message: "model 'x' not found".to_owned()
            }
        );
    }

    #[test]
    fn classify_server_side() {
        let h = headers(&[("retry-after", "3")]);
        let overloaded = classify_http_error(503, &h, "Service Unavailable");
        assert_eq!(
            overloaded,
            ProviderError::Overloaded {
                retry_after: Some(Duration::from_secs(3)),
                message: "Service Unavailable".to_owned()
            }
        );
        assert_eq!(classify_http_error(529, &h, "").class(), "overloaded");
        assert_eq!(
            classify_http_error(500, &HeaderMap::new(), ""),
            ProviderError::Server {
                status: 500,
                message: "HTTP 500".to_owned()
            }
        );
        assert_eq!(
            classify_http_error(502, &HeaderMap::new(), "<html>bad gateway</html>").class(),
            "server_error"
        );
        assert_eq!(
            classify_http_error(408, &HeaderMap::new(), "").class(),
            "timeout"
        );
    }

    #[test]
    fn classify_keeps_long_non_json_bodies_short() {
        let body = "é".repeat(1000);
        match classify_http_error(500, &HeaderMap::new(), &body) {
            ProviderError::Server { message, .. } => assert!(message.len() <= 500),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn classify_stream_errors_by_type() {
        let cases = [
            (
                json!({"message": "x", "type": "server_error"}),
                "server_error",
            ),
            (json!({"message": "x", "code": 429}), "rate_limited"),
            (
                json!({"message": "x", "code": "context_length_exceeded"}),
                "context_too_long",
            ),
            (json!({"message": "x", "type": "weird"}), "server_error"),
            (json!("bare text"), "server_error"),
        ];
        for (error, class) in cases {
            assert_eq!(classify_stream_error(&error).class(), class, "{error}");
        }
    }
}
