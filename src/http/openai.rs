//! The OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`, `/v1/embeddings`), so
//! existing SDKs and tools work unchanged against Chorus.
//!
//! Requests follow OpenAI's shapes (unknown fields are ignored, as OpenAI's own SDKs send
//! fields a gateway need not use); errors use OpenAI's envelope `{"error": {message, type,
//! param, code}}`. Callers authenticate with an API key (`ck-…`) or an access JWT. No thread is
//! stored; calls are routed through the provider pools like turns (selection, retries,
//! failover before output, breakers).

use chorus_actors::provider::catalogue::Model;
use chorus_actors::provider::pool::Lease;
use chorus_actors::provider::routing::{self, RouteOptions};
use chorus_actors::provider::{
    ChatMessage, ChatRequest, ChatRole, Chunk, FinishReason, TokenUsage,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::convert::Infallible;
use uuid::Uuid;
use warp::Reply;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use chorus_actors::session::Reservation;

use super::context::{Body, Ctx, json_response};
use super::error::{ApiError, ErrorCode, retry_secs, set_rate_limit_headers};
use crate::auth::tokens::API_KEY_PREFIX;

/// Turns a native error into OpenAI's error shape (same status code).
pub fn openai_error(error: ApiError, request_id: &str) -> Response {
    // The user's own plan limits answer as OpenAI's do; a provider's 429 stays an upstream
    // `rate_limit_error`.
    let plan_limit = error
        .details
        .as_ref()
        .is_some_and(|d| d.get("what").is_some());
    let kind = match error.code {
        ErrorCode::Validation | ErrorCode::PayloadTooLarge | ErrorCode::UnsupportedMediaType => {
            "invalid_request_error"
        }
        ErrorCode::Unauthenticated => "authentication_error",
        ErrorCode::Forbidden => "permission_error",
        ErrorCode::NotFound => "not_found_error",
        ErrorCode::RateLimited if plan_limit => "rate_limit_exceeded",
        ErrorCode::RateLimited => "rate_limit_error",
        ErrorCode::QuotaExceeded => "insufficient_quota",
        ErrorCode::Conflict => "conflict_error",
        _ => "api_error",
    };
    let code = match error.code {
        ErrorCode::RateLimited if plan_limit => "rate_limit_exceeded".to_owned(),
        ErrorCode::QuotaExceeded => "insufficient_quota".to_owned(),
        other => other.as_str().to_ascii_lowercase(),
    };
    let param = error
        .details
        .as_ref()
        .and_then(|d| d.get("field"))
        .cloned()
        .unwrap_or(Value::Null);
    let status = error.code.status();
    let mut response = json_response(
        status,
        &json!({
            "error": {
                "message": error.message,
                "type": kind,
                "param": param,
                "code": code,
                "request_id": request_id,
            }
        }),
    );
    if let Some(decision) = error.rate_limit {
        if plan_limit {
            set_rate_limit_headers(&mut response, &decision);
        }
        response.headers_mut().insert(
            "retry-after",
            HeaderValue::from(retry_secs(decision.retry_after)),
        );
    }
    response
}

/// The caller's user id from `Authorization: Bearer ck-…` (API key) or a JWT.
async fn authenticate(ctx: &Ctx) -> Result<Uuid, ApiError> {
    let token = ctx
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| ApiError::unauthenticated("missing `Authorization: Bearer <API key>`"))?;
    if token.starts_with(API_KEY_PREFIX) {
        return ctx
            .state
            .api_keys
            .user_for(&*ctx.state.store, token)
            .await?
            .ok_or_else(|| ApiError::unauthenticated("invalid API key"));
    }
    Ok(ctx.authenticate_token(token)?.user_id)
}

pub async fn list_models(ctx: Ctx) -> Result<Response, ApiError> {
    authenticate(&ctx).await?;
    let data: Vec<Value> = ctx
        .state
        .catalogue
        .models()
        .iter()
        .map(|m| {
            json!({
                "id": m.spec.id,
                "object": "model",
                "created": 0,
                "owned_by": &*m.provider_id,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "object": "list", "data": data }),
    ))
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    messages: Vec<IncomingMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct IncomingMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

/// Text of a message: a string, or the `text` parts of a content array.
fn content_text(content: Option<Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")),
        Some(_) => Err(ApiError::field(
            "messages",
            "content must be a string or an array of parts",
        )),
    }
}

fn chat_model(ctx: &Ctx, id: &str, capability: &str) -> Result<Model, ApiError> {
    ctx.state
        .catalogue
        .get(id)
        .filter(|m| m.can(capability))
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("The model `{id}` does not exist or is not available for {capability}"),
            )
            .with_details(json!({ "field": "model" }))
        })
}

fn finish_str(reason: &FinishReason) -> &str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Other(other) => other.as_str(),
    }
}

/// Routing for a `/v1` call: the pools pick the deployment, with the same retries and failover
/// before output as turns (there is no thread, so no affinity).
fn route_options(
    ctx: &Ctx,
    estimated_tokens: u64,
    own_keys: std::collections::HashMap<String, String>,
) -> RouteOptions {
    RouteOptions {
        affinity: None,
        estimated_tokens,
        first_token_timeout: ctx.state.config.sessions.turn_timeouts.first_token,
        own_keys,
        exclude: Vec::new(),
    }
}

pub async fn chat_completions(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let user_id = authenticate(&ctx).await?;
    let request: CompletionRequest = ctx.json(body).await?;
    let model = chat_model(&ctx, &request.model, "chat")?;
    let mut system = Vec::new();
    let mut messages = Vec::with_capacity(request.messages.len());
    for message in request.messages {
        let text = content_text(message.content)?;
        let role = match message.role.as_str() {
            "system" | "developer" => {
                system.push(text);
                continue;
            }
            "user" => ChatRole::User,
            "assistant" => ChatRole::Assistant,
            other => {
                return Err(ApiError::field(
                    "messages",
                    format!("unsupported role `{other}`"),
                ));
            }
        };
        messages.push(ChatMessage {
            role,
            content: text,
        });
    }
    if messages.is_empty() {
        return Err(ApiError::field("messages", "must contain a user message"));
    }
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(model.spec.max_output_tokens);
    let chat = ChatRequest {
        model: model.spec.upstream.clone(),
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        max_tokens: Some(max_tokens),
        temperature: request.temperature,
    };
    let id = format!("chatcmpl-{}", Uuid::now_v7().simple());
    let created = chrono::Utc::now().timestamp();
    let model_id = model.spec.id.clone();

    // The same per-user limits as the native API, admitted by the user's session; the guard
    // settles the reservation exactly once with what was used, also when the client hangs up.
    let prompt_tokens: u64 = chat
        .system
        .iter()
        .map(String::as_str)
        .chain(chat.messages.iter().map(|m| m.content.as_str()))
        .map(|text| chorus_actors::session::context::count_tokens(&model, text) as u64)
        .sum();
    let estimated_tokens = prompt_tokens + u64::from(max_tokens);
    let mut reservation = ctx
        .state
        .homes
        .admit(user_id, &model_id, estimated_tokens)
        .await?;
    let rate_limit = reservation.admission;
    let route = route_options(
        &ctx,
        estimated_tokens,
        std::mem::take(&mut reservation.own_keys),
    );
    let mut usage_guard = UsageGuard {
        state: ctx.state.clone(),
        user_id,
        reservation: Some(reservation),
        model: model.clone(),
        prompt_tokens,
        reported: TokenUsage::default(),
        text: String::new(),
    };

    if !request.stream {
        let routed = routing::complete(&ctx.state.catalogue, &model, &chat, &route, &mut |_| {})
            .await
            .map_err(|e| super::messages::provider_error(&e))?;
        let done = routed.value;
        let usage = done.usage.unwrap_or_default();
        let mut lease = routed.lease;
        lease
            .settle_tokens(usage.input_tokens + usage.output_tokens)
            .await;
        usage_guard.record_usage(usage);
        usage_guard.record_text(&done.text);
        drop(usage_guard);
        let finish_reason = done.finish.as_ref().map(finish_str).unwrap_or("stop");
        let mut response = json_response(
            StatusCode::OK,
            &CompletionBody {
                id: &id,
                object: "chat.completion",
                created,
                model: &model_id,
                choices: [CompletionChoice {
                    index: 0,
                    message: Delta {
                        role: Some("assistant"),
                        content: Some(&done.text),
                    },
                    finish_reason,
                }],
                usage: CompletionUsage::from(usage),
            },
        );
        set_rate_limit_headers(&mut response, &rate_limit);
        return Ok(response);
    }

    let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
    let routed = routing::open_stream(&ctx.state.catalogue, &model, &chat, &route, &mut |_| {})
        .await
        .map_err(|e| super::messages::provider_error(&e))?;
    let state = CompletionStream {
        upstream: routed.value,
        lease: routed.lease,
        opened: std::time::Instant::now(),
        id,
        created,
        model: model_id,
        include_usage,
        usage: TokenUsage::default(),
        phase: Phase::Start,
        usage_guard,
    };
    let frames = futures_util::stream::unfold(state, |mut state| async move {
        let frame = state.next_frame().await?;
        Some((
            Ok::<_, Infallible>(warp::sse::Event::default().data(frame)),
            state,
        ))
    });
    let mut response = warp::sse::reply(sync_wrapper::SyncStream::new(frames)).into_response();
    set_rate_limit_headers(&mut response, &rate_limit);
    Ok(response)
}

/// Settles a `/v1` request's reservation exactly once when dropped — after the answer, on an
/// error, or when the client hangs up mid-stream — with what was counted so far.
struct UsageGuard {
    /// For `homes` (one reference count rather than a clone of the handle per request).
    state: std::sync::Arc<crate::app::AppState>,
    user_id: Uuid,
    reservation: Option<Reservation>,
    model: Model,
    /// The prompt as counted here, charged when the provider produced output but no usage.
    prompt_tokens: u64,
    reported: TokenUsage,
    text: String,
}

impl UsageGuard {
    fn record_usage(&mut self, reported: TokenUsage) {
        if reported.input_tokens > 0 {
            self.reported.input_tokens = reported.input_tokens;
        }
        if reported.output_tokens > 0 {
            self.reported.output_tokens = reported.output_tokens;
        }
    }

    fn record_text(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// `(input, output)` tokens: as reported, else counted; nothing for a call that produced
    /// nothing (refused before output, as providers bill it).
    fn counts(&self) -> (u64, u64) {
        let output = match self.reported.output_tokens {
            0 if !self.text.is_empty() => {
                chorus_actors::session::context::count_tokens(&self.model, &self.text) as u64
            }
            n => n,
        };
        let input = match self.reported.input_tokens {
            0 if output > 0 => self.prompt_tokens,
            n => n,
        };
        (input, output)
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let (input, output) = self.counts();
        let cost = self.model.cost_usd(input, output);
        // Usually one cast to the session that admitted the request (no task, no wait).
        if tokio::runtime::Handle::try_current().is_ok() {
            self.state
                .homes
                .settle(self.user_id, reservation, input + output, cost);
        } else {
            tracing::error!(user_id = %self.user_id, "no runtime to settle a /v1 reservation");
        }
    }
}

enum Phase {
    Start,
    Streaming,
    Usage,
    Done,
    Ended,
}

/// Turns normalized chunks into OpenAI's `chat.completion.chunk` frames: a first frame with the
/// role, one per text delta, one with the finish reason, the usage frame when asked for
/// (`stream_options.include_usage`, with `choices: []` as OpenAI sends it), then `[DONE]`.
struct CompletionStream {
    upstream: chorus_actors::provider::ChunkStream,
    /// The deployment serving the stream; told how it ended (a client hanging up tells it
    /// nothing, which leaves the deployment's record alone).
    lease: Lease,
    opened: std::time::Instant,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    usage: TokenUsage,
    phase: Phase,
    usage_guard: UsageGuard,
}

// Typed response bodies: one allocation per frame (the JSON text), none per field.

#[derive(Serialize)]
struct CompletionBody<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: CompletionUsage,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: Delta<'a>,
    finish_reason: &'a str,
}

/// A message or a streamed delta: only the fields present are written (`{}` for the finish).
#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct CompletionUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl From<TokenUsage> for CompletionUsage {
    fn from(usage: TokenUsage) -> Self {
        CompletionUsage {
            prompt_tokens: usage.input_tokens,
            completion_tokens: usage.output_tokens,
            total_tokens: usage.input_tokens + usage.output_tokens,
        }
    }
}

#[derive(Serialize)]
struct ChunkFrame<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<CompletionUsage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'a str>,
}

impl CompletionStream {
    fn frame(&self, choices: &[ChunkChoice<'_>], usage: Option<CompletionUsage>) -> String {
        serde_json::to_string(&ChunkFrame {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
        .unwrap_or_default()
    }

    fn chunk(&self, delta: Delta<'_>, finish: Option<&str>) -> String {
        self.frame(
            &[ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
            }],
            None,
        )
    }

    async fn next_frame(&mut self) -> Option<String> {
        loop {
            match self.phase {
                Phase::Start => {
                    self.phase = Phase::Streaming;
                    let role = Delta {
                        role: Some("assistant"),
                        content: Some(""),
                    };
                    return Some(self.chunk(role, None));
                }
                Phase::Streaming => match self.upstream.next().await {
                    Some(Ok(Chunk::Text(text))) => {
                        self.usage_guard.record_text(&text);
                        let delta = Delta {
                            role: None,
                            content: Some(&text),
                        };
                        return Some(self.chunk(delta, None));
                    }
                    Some(Ok(Chunk::Finish(reason))) => {
                        let empty = Delta {
                            role: None,
                            content: None,
                        };
                        return Some(self.chunk(empty, Some(finish_str(&reason))));
                    }
                    Some(Ok(Chunk::Usage(reported))) => {
                        self.usage_guard.record_usage(reported);
                        if reported.input_tokens > 0 {
                            self.usage.input_tokens = reported.input_tokens;
                        }
                        if reported.output_tokens > 0 {
                            self.usage.output_tokens = reported.output_tokens;
                        }
                    }
                    Some(Ok(Chunk::ToolCall(_))) => {}
                    Some(Err(error)) => {
                        // OpenAI reports a failure inside a started stream as an error object.
                        self.lease.failed(&error);
                        self.phase = Phase::Done;
                        return Some(
                            json!({
                                "error": {
                                    "message": error.to_string(),
                                    "type": "api_error",
                                    "code": error.class(),
                                }
                            })
                            .to_string(),
                        );
                    }
                    None => {
                        self.lease.succeeded(self.opened.elapsed());
                        self.lease
                            .settle_tokens(self.usage.input_tokens + self.usage.output_tokens)
                            .await;
                        self.phase = Phase::Usage;
                    }
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    if self.include_usage {
                        // OpenAI's usage frame: `choices: []`.
                        return Some(self.frame(&[], Some(CompletionUsage::from(self.usage))));
                    }
                }
                Phase::Done => {
                    self.phase = Phase::Ended;
                    return Some("[DONE]".to_owned());
                }
                Phase::Ended => return None,
            }
        }
    }
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: EmbeddingInput,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

/// Most inputs one embeddings request may carry (OpenAI's own limit is 2048).
const MAX_EMBEDDING_INPUTS: usize = 2048;

pub async fn embeddings(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    authenticate(&ctx).await?;
    let request: EmbeddingsRequest = ctx.json(body).await?;
    let model = chat_model(&ctx, &request.model, "embeddings")?;
    let inputs = match request.input {
        EmbeddingInput::One(text) => vec![text],
        EmbeddingInput::Many(texts) => texts,
    };
    if inputs.is_empty() || inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::field(
            "input",
            format!("must hold 1 to {MAX_EMBEDDING_INPUTS} strings"),
        ));
    }
    let vectors = model
        .provider
        .embed(&model.spec.upstream, &inputs)
        .await
        .map_err(|e| super::messages::provider_error(&e))?;
    let tokens: usize = inputs
        .iter()
        .map(|t| chorus_actors::session::context::count_tokens(&model, t))
        .sum();
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| json!({ "object": "embedding", "index": index, "embedding": embedding }))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": model.spec.id,
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        }),
    ))
}
