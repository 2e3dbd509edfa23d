//! The OpenAI dialect: `POST /v1/chat/completions` (JSON and `data:` SSE ending in
//! `data: [DONE]`), `GET /v1/models`, `POST /v1/embeddings`, and the
//! `{"error":{"message","type","param","code"}}` error shape.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::options::Failure;
use crate::text;
use crate::wire::{self, Ending, ErrorReply, Exchange, Request, Script};

/// Context window claimed by `error=context`.
const CONTEXT_WINDOW: u64 = 128_000;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

fn error_json(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Bytes {
    Bytes::from(wire::to_json(&ErrorBody {
        error: ErrorDetail {
            message,
            kind,
            param,
            code,
        },
    }))
}

/// A 400 `invalid_request_error`.
pub fn invalid_request(message: &str, param: Option<&str>, code: Option<&str>) -> ErrorReply {
    ErrorReply::new(
        400,
        error_json(message, "invalid_request_error", param, code),
    )
}

/// The 401 for a request without `Authorization: Bearer ...`.
pub fn missing_key() -> ErrorReply {
    ErrorReply::new(
        401,
        error_json(
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
             field (with blank username) if you're accessing the API from your browser and are \
             prompted for a username and password. You can obtain an API key from \
             https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        ),
    )
}

/// The 404 for a path the real API does not serve.
pub fn not_found(method: &str, path: &str) -> ErrorReply {
    ErrorReply::new(
        404,
        error_json(
            &format!("Invalid URL ({method} {path})"),
            "invalid_request_error",
            None,
            None,
        ),
    )
}

/// The body of an injected failure, as the real API words it.
pub fn failure_body(failure: Failure, model: &str, prompt_tokens: u64, retry: u64) -> Bytes {
    let status = match failure {
        Failure::ContextLength => {
            let message = format!(
                "This model's maximum context length is {CONTEXT_WINDOW} tokens. However, your \
                 messages resulted in {} tokens. Please reduce the length of the messages.",
                CONTEXT_WINDOW + prompt_tokens
            );
            return error_json(
                &message,
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
            );
        }
        Failure::Status(status) => status,
    };
    match status {
        401 => error_json(
            "Incorrect API key provided: sk-mock. You can find your API key at \
             https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ),
        403 => error_json(
            "You are not allowed to sample from this model",
            "invalid_request_error",
            None,
            None,
        ),
        404 => error_json(
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        ),
        429 => error_json(
            &format!(
                "Rate limit reached for {model} in organization org-mock on requests per min \
                 (RPM): Limit 1, Used 1, Requested 1. Please try again in {retry}s. Visit \
                 https://platform.openai.com/account/rate-limits to learn more."
            ),
            "requests",
            None,
            Some("rate_limit_exceeded"),
        ),
        500 => error_json(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        ),
        503 => error_json(
            "The server is overloaded or not ready yet.",
            "server_error",
            None,
            None,
        ),
        501..=599 => error_json(
            &format!("mock-upstream: injected HTTP {status}"),
            "server_error",
            None,
            None,
        ),
        _ => error_json(
            &format!("mock-upstream: injected HTTP {status}"),
            "invalid_request_error",
            None,
            None,
        ),
    }
}

/// Reads a chat completion request.
pub fn parse(body: &Value) -> Result<Request<'_>, ErrorReply> {
    let Some(object) = body.as_object() else {
        return Err(invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but \
             what was sent was not valid JSON.)",
            None,
            None,
        ));
    };
    let Some(model) = object.get("model").and_then(Value::as_str) else {
        return Err(invalid_request(
            "you must provide a model parameter",
            None,
            None,
        ));
    };
    let Some(messages) = object.get("messages").and_then(Value::as_array) else {
        return Err(invalid_request(
            "Missing required parameter: 'messages'.",
            Some("messages"),
            Some("missing_required_parameter"),
        ));
    };
    let mut prompt_tokens = 0;
    let mut last_user = None;
    for message in messages {
        let content = message.get("content").unwrap_or(&Value::Null);
        prompt_tokens += text::count_words(content);
        if message.get("role").and_then(Value::as_str) == Some("user") {
            last_user = Some(content);
        }
    }
    let mut echo = Vec::new();
    if let Some(content) = last_user {
        text::push_words(content, &mut echo);
    }
    let max_tokens = object
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| object.get("max_tokens").and_then(Value::as_u64));
    let stream = object.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = stream
        && object
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
    Ok(Request {
        model,
        prompt_tokens,
        echo,
        max_tokens,
        stream,
        include_usage,
    })
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptTokensDetails,
    completion_tokens_details: CompletionTokensDetails,
}

#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Serialize)]
struct CompletionTokensDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

fn usage(ex: &Exchange) -> Usage {
    Usage {
        prompt_tokens: ex.prompt_tokens,
        completion_tokens: ex.completion_tokens(),
        total_tokens: ex.prompt_tokens + ex.completion_tokens(),
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: 0,
            audio_tokens: 0,
        },
        completion_tokens_details: CompletionTokensDetails {
            reasoning_tokens: 0,
            audio_tokens: 0,
            accepted_prediction_tokens: 0,
            rejected_prediction_tokens: 0,
        },
    }
}

fn finish_reason(ex: &Exchange) -> &'static str {
    if ex.truncated { "length" } else { "stop" }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: [(); 0],
}

/// The non-streaming `chat.completion` body.
pub fn body(ex: &Exchange) -> Bytes {
    let content = ex.text();
    Bytes::from(wire::to_json(&Completion {
        id: &ex.id,
        object: "chat.completion",
        created: ex.created,
        model: ex.model,
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content: &content,
                refusal: None,
                annotations: [],
            },
            logprobs: None,
            finish_reason: finish_reason(ex),
        }],
        usage: usage(ex),
        service_tier: "default",
        system_fingerprint: "fp_mock",
    }))
}

#[derive(Serialize)]
struct Chunk<'a, D> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice<D>],
    /// Absent without `include_usage`; `null` on every chunk but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<D> {
    index: u32,
    delta: D,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct StartDelta {
    role: &'static str,
    content: &'static str,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct ContentDelta<'a> {
    content: &'a str,
}

#[derive(Serialize)]
struct EmptyDelta {}

fn chunk<'a, D>(
    ex: &'a Exchange,
    choices: &'a [ChunkChoice<D>],
    usage: Option<&'a Usage>,
) -> Chunk<'a, D> {
    Chunk {
        id: &ex.id,
        object: "chat.completion.chunk",
        created: ex.created,
        model: ex.model,
        service_tier: "default",
        system_fingerprint: "fp_mock",
        choices,
        usage: ex.include_usage.then_some(usage),
    }
}

/// The `chat.completion.chunk` stream: role chunk, one chunk per token, the finish chunk, the
/// usage chunk (with `include_usage`), `[DONE]` — or the mid-stream error / cut.
pub fn stream(
    ex: &Exchange,
    emit: usize,
    ending: Ending,
    ttft: Duration,
    delay: Duration,
) -> Script {
    let mut script = Script::new();
    let start = [ChunkChoice {
        index: 0,
        delta: StartDelta {
            role: "assistant",
            content: "",
            refusal: None,
        },
        logprobs: None,
        finish_reason: None,
    }];
    wire::push_data(script.out(), &chunk(ex, &start, None), "\n");
    let last = ex.answer.len().saturating_sub(1);
    wire::play_tokens(
        &mut script,
        ttft,
        delay,
        &ex.answer[..emit],
        |i, word, out| {
            let token = text::token_text(word, i == last);
            let choices = [ChunkChoice {
                index: 0,
                delta: ContentDelta { content: &token },
                logprobs: None,
                finish_reason: None,
            }];
            wire::push_data(out, &chunk(ex, &choices, None), "\n");
        },
    );
    match ending {
        Ending::Complete => {
            let finish = [ChunkChoice {
                index: 0,
                delta: EmptyDelta {},
                logprobs: None,
                finish_reason: Some(finish_reason(ex)),
            }];
            wire::push_data(script.out(), &chunk(ex, &finish, None), "\n");
            if ex.include_usage {
                let usage = usage(ex);
                let none: [ChunkChoice<EmptyDelta>; 0] = [];
                wire::push_data(script.out(), &chunk(ex, &none, Some(&usage)), "\n");
            }
            script.out().extend_from_slice(b"data: [DONE]\n\n");
            script.finish()
        }
        Ending::Error(failure) => {
            let body = failure_body(failure, ex.model, ex.prompt_tokens, 1);
            script.out().extend_from_slice(b"data: ");
            script.out().extend_from_slice(&body);
            script.out().extend_from_slice(b"\n\n");
            script.finish()
        }
        Ending::Cut => script.cut(),
    }
}

/// `GET /v1/models`.
pub fn models(ids: &[String]) -> Bytes {
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    #[derive(Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
    }
    Bytes::from(wire::to_json(&List {
        object: "list",
        data: ids
            .iter()
            .map(|id| Model {
                id,
                object: "model",
                created: 1_700_000_000,
                owned_by: "mock-upstream",
            })
            .collect(),
    }))
}

/// `POST /v1/embeddings`: one deterministic unit vector per input, `dims` components unless
/// the request asks for `dimensions`.
pub fn embeddings(body: &Value, default_dims: usize) -> Result<Bytes, ErrorReply> {
    let Some(object) = body.as_object() else {
        return Err(invalid_request(
            "We could not parse the JSON body of your request.",
            None,
            None,
        ));
    };
    let Some(model) = object.get("model").and_then(Value::as_str) else {
        return Err(invalid_request(
            "you must provide a model parameter",
            None,
            None,
        ));
    };
    let dims = match object.get("dimensions") {
        None | Some(Value::Null) => default_dims,
        Some(value) => match value.as_u64() {
            Some(dims @ 1..=65_536) => dims as usize,
            _ => {
                return Err(invalid_request(
                    "Invalid value for 'dimensions': must be a positive integer.",
                    Some("dimensions"),
                    Some("invalid_value"),
                ));
            }
        },
    };
    let base64 = match object.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(invalid_request(
                "Invalid value for 'encoding_format': must be 'float' or 'base64'.",
                Some("encoding_format"),
                Some("invalid_value"),
            ));
        }
    };
    // Each input as (text to hash, tokens).
    let mut inputs: Vec<(String, u64)> = Vec::new();
    match object.get("input") {
        Some(Value::String(input)) => inputs.push(string_input(input)),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                inputs.push(token_input(items));
            } else {
                for item in items {
                    match item {
                        Value::String(input) => inputs.push(string_input(input)),
                        Value::Array(tokens) if tokens.iter().all(Value::is_number) => {
                            inputs.push(token_input(tokens));
                        }
                        _ => return Err(bad_input()),
                    }
                }
            }
        }
        _ => return Err(bad_input()),
    }

    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Embedding>,
        model: &'a str,
        usage: EmbeddingUsage,
    }
    #[derive(Serialize)]
    struct Embedding {
        object: &'static str,
        index: usize,
        embedding: Vector,
    }
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Vector {
        Float(Vec<f32>),
        Base64(String),
    }
    #[derive(Serialize)]
    struct EmbeddingUsage {
        prompt_tokens: u64,
        total_tokens: u64,
    }
    let tokens: u64 = inputs.iter().map(|(_, tokens)| tokens).sum();
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, (input, _))| {
            let vector = text::embedding(input, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Float(vector)
            };
            Embedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    Ok(Bytes::from(wire::to_json(&List {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })))
}

fn string_input(input: &str) -> (String, u64) {
    (input.to_owned(), input.split_whitespace().count() as u64)
}

fn token_input(tokens: &[Value]) -> (String, u64) {
    (
        Value::Array(tokens.to_vec()).to_string(),
        tokens.len() as u64,
    )
}

fn bad_input() -> ErrorReply {
    invalid_request(
        "'input' must be a string, an array of strings, or an array of token arrays.",
        Some("input"),
        Some("invalid_type"),
    )
}
