//! Model providers: one trait, one normalized chunk type (STYLE.md, habit 5).
//!
//! Every adapter turns its provider's wire format into [`Chunk`]s — text deltas, usage, a finish
//! reason, tool calls carried through untouched — and every failure into a typed
//! [`ProviderError`] with a class, so the turn and (later) the pools decide on retries and
//! failover from types, never from strings.
//!
//! Adapters: [`openai`] (every OpenAI-compatible API by base URL: OpenAI, Groq, OpenRouter, xAI,
//! Ollama, vLLM), [`anthropic`] (Messages API), [`gemini`] (generateContent), [`mock`] (built in,
//! needs no key). Each adapter's event → chunk conversion is a pure function tested on recorded
//! wire transcripts; the async part only moves bytes.

pub mod anthropic;
pub mod catalogue;
pub mod gemini;
pub mod http;
pub mod mock;
pub mod openai;
pub mod pool;
pub mod routing;
pub mod sse;

use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

/// One call to a model. Adapters place `system` where their API wants it (OpenAI: a first
/// `system` message; Anthropic: the top-level `system` field; Gemini: `systemInstruction`).
/// `messages` never contains `System` entries when `system` is set by Chorus, but adapters
/// must accept them (the OpenAI-compatible API passes client messages through).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    /// The provider's own model name (`upstream` in models.toml).
    pub model: String,
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end (OpenAI `stop`, Anthropic `end_turn`/`stop_sequence`, Gemini `STOP`).
    Stop,
    /// Hit `max_tokens` (OpenAI `length`, Anthropic `max_tokens`, Gemini `MAX_TOKENS`).
    Length,
    /// Withheld by a safety filter (OpenAI `content_filter`, Gemini `SAFETY`/…).
    ContentFilter,
    /// The model asked for tools (OpenAI `tool_calls`, Anthropic `tool_use`).
    ToolCalls,
    /// Anything else, with the provider's word for it.
    Other(String),
}

/// The normalized unit every adapter produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Text(String),
    /// Usage as reported by the provider; may arrive more than once (Anthropic reports input
    /// tokens at the start and output tokens at the end): the last value of each field wins,
    /// zero meaning "not reported in this chunk".
    Usage(TokenUsage),
    Finish(FinishReason),
    /// A tool-call fragment exactly as the provider sent it.
    ToolCall(serde_json::Value),
}

/// A whole answer (non-streaming calls).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    pub text: String,
    pub usage: Option<TokenUsage>,
    pub finish: Option<FinishReason>,
}

/// Why a provider call failed, classified so retries and failover are decided from types.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ProviderError {
    /// 401/403: the key is missing, wrong or not allowed this model.
    #[error("provider rejected the credentials: {message}")]
    Auth { message: String },
    /// 429: rate limited; `retry_after` from the `Retry-After` header (or the body) when given.
    #[error("provider rate limited the request: {message}")]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// The prompt does not fit the model's context window.
    #[error("prompt exceeds the model's context window: {message}")]
    ContextTooLong { message: String },
    /// 503/529 or an `overloaded_error`: try elsewhere or later.
    #[error("provider overloaded: {message}")]
    Overloaded {
        retry_after: Option<Duration>,
        message: String,
    },
    /// Other 5xx.
    #[error("provider server error {status}: {message}")]
    Server { status: u16, message: String },
    /// No answer (or no next chunk) in time.
    #[error("provider timed out: {message}")]
    Timeout { message: String },
    /// Other 4xx: our request was wrong for this provider; retrying will not help.
    #[error("provider rejected the request: {message}")]
    BadRequest { message: String },
    /// Connection refused/reset, or the stream ended before the provider said it was done.
    #[error("connection to provider failed: {message}")]
    Transport { message: String },
    /// The provider sent bytes we cannot decode.
    #[error("undecodable provider response: {message}")]
    Decode { message: String },
    /// The operation is not offered by this provider (e.g. embeddings on Anthropic).
    #[error("not supported by this provider: {message}")]
    Unsupported { message: String },
}

impl ProviderError {
    /// A stable label for metrics and the `error` event's `code`.
    pub fn class(&self) -> &'static str {
        match self {
            ProviderError::Auth { .. } => "auth",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::ContextTooLong { .. } => "context_too_long",
            ProviderError::Overloaded { .. } => "overloaded",
            ProviderError::Server { .. } => "server_error",
            ProviderError::Timeout { .. } => "timeout",
            ProviderError::BadRequest { .. } => "bad_request",
            ProviderError::Transport { .. } => "transport",
            ProviderError::Decode { .. } => "decode",
            ProviderError::Unsupported { .. } => "unsupported",
        }
    }

    /// Whether the same request may succeed if tried again (here or on another deployment).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Overloaded { .. }
                | ProviderError::Server { .. }
                | ProviderError::Timeout { .. }
                | ProviderError::Transport { .. }
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. }
            | ProviderError::Overloaded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

pub type ChunkStream = BoxStream<'static, Result<Chunk, ProviderError>>;

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The provider kind, e.g. `openai`, `anthropic`, `gemini`, `mock`.
    fn kind(&self) -> &'static str;

    /// Starts a streaming call. Failures before the first byte of the body (HTTP status errors,
    /// connection errors) are returned here; later ones arrive as an `Err` item in the stream,
    /// after which the stream ends. A stream that ends without a finish reason was cut.
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, ProviderError>;

    /// A non-streaming call.
    async fn complete(&self, request: ChatRequest) -> Result<Completion, ProviderError>;

    /// Embeddings for `inputs`, one vector each, in order.
    async fn embed(&self, model: &str, inputs: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        let _ = (model, inputs);
        Err(ProviderError::Unsupported {
            message: format!("{} has no embeddings API", self.kind()),
        })
    }
}

/// Opens users' sealed provider keys (bring-your-own-key). The edge holds the master key and
/// implements this; sessions call it when a turn starts.
pub trait KeyOpener: std::fmt::Debug + Send + Sync + 'static {
    /// The plaintext key, or `None` when it cannot be opened (logged by the implementation).
    fn open(&self, user_id: uuid::Uuid, provider: &str, sealed: &[u8]) -> Option<String>;
}

/// Parses a `Retry-After` header value given in seconds (the form providers use).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}
