//! The Anthropic dialect: `POST /v1/messages` (JSON, and named-event SSE from `message_start`
//! to `message_stop`), and the `{"type":"error","error":{"type","message"}}` error shape.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::options::Failure;
use crate::text;
use crate::wire::{self, Ending, ErrorReply, Exchange, Request, Script};

/// Context window claimed by `error=context`.
const CONTEXT_WINDOW: u64 = 200_000;

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

fn error_json(kind: &str, message: &str) -> Bytes {
    Bytes::from(wire::to_json(&ErrorBody {
        kind: "error",
        error: ErrorDetail { kind, message },
    }))
}

/// A 400 `invalid_request_error`.
pub fn invalid_request(message: &str) -> ErrorReply {
    ErrorReply::new(400, error_json("invalid_request_error", message))
}

/// The 401 for a request without `x-api-key`.
pub fn missing_key() -> ErrorReply {
    ErrorReply::new(
        401,
        error_json("authentication_error", "x-api-key header is required"),
    )
}

/// The 400 for a request without `anthropic-version`.
pub fn missing_version() -> ErrorReply {
    invalid_request("anthropic-version: header is required")
}

/// The 404 for a path the real API does not serve.
pub fn not_found() -> ErrorReply {
    ErrorReply::new(404, error_json("not_found_error", "Not Found"))
}

/// The body of an injected failure, as the real API words it.
pub fn failure_body(failure: Failure, model: &str, prompt_tokens: u64) -> Bytes {
    let status = match failure {
        Failure::ContextLength => {
            return error_json(
                "invalid_request_error",
                &format!(
                    "prompt is too long: {} tokens > {CONTEXT_WINDOW} maximum",
                    CONTEXT_WINDOW + prompt_tokens
                ),
            );
        }
        Failure::Status(status) => status,
    };
    match status {
        400 => error_json(
            "invalid_request_error",
            "mock-upstream: injected invalid request",
        ),
        401 => error_json("authentication_error", "invalid x-api-key"),
        403 => error_json(
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        404 => error_json("not_found_error", &format!("model: {model}")),
        413 => error_json(
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        429 => error_json(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 1 requests per \
             minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can \
             see the response headers for current usage. Please reduce the prompt length or the \
             maximum tokens requested, or try again later.",
        ),
        500 => error_json("api_error", "Internal server error"),
        504 => error_json("timeout_error", "Request timeout"),
        529 => error_json("overloaded_error", "Overloaded"),
        501..=599 => error_json(
            "api_error",
            &format!("mock-upstream: injected HTTP {status}"),
        ),
        _ => error_json(
            "invalid_request_error",
            &format!("mock-upstream: injected HTTP {status}"),
        ),
    }
}

/// Reads a Messages API request.
pub fn parse(body: &Value) -> Result<Request<'_>, ErrorReply> {
    let Some(object) = body.as_object() else {
        return Err(invalid_request(
            "There was an issue with your request body: expected a JSON object",
        ));
    };
    let Some(model) = object.get("model").and_then(Value::as_str) else {
        return Err(invalid_request("model: Field required"));
    };
    let Some(messages) = object.get("messages").and_then(Value::as_array) else {
        return Err(invalid_request("messages: Field required"));
    };
    let Some(max_tokens) = object.get("max_tokens").and_then(Value::as_u64) else {
        return Err(invalid_request("max_tokens: Field required"));
    };
    let mut prompt_tokens = object.get("system").map_or(0, text::count_words);
    let mut last_user = None;
    for message in messages {
        let content = message.get("content").unwrap_or(&Value::Null);
        prompt_tokens += text::count_words(content);
        if message.get("role").and_then(Value::as_str) == Some("user") {
            last_user = Some(content);
        }
    }
    // A final assistant message is a prefill the answer continues; the real API refuses one
    // that ends in whitespace.
    if let Some(last) = messages.last()
        && last.get("role").and_then(Value::as_str) == Some("assistant")
        && ends_with_whitespace(last.get("content").unwrap_or(&Value::Null))
    {
        return Err(invalid_request(
            "messages: final assistant content cannot end with trailing whitespace",
        ));
    }
    let mut echo = Vec::new();
    if let Some(content) = last_user {
        text::push_words(content, &mut echo);
    }
    Ok(Request {
        model,
        prompt_tokens,
        echo,
        max_tokens: Some(max_tokens),
        stream: object.get("stream").and_then(Value::as_bool) == Some(true),
        include_usage: false,
    })
}

/// Whether message content (a string or blocks) ends in whitespace: its last text does.
fn ends_with_whitespace(content: &Value) -> bool {
    let last_text = match content {
        Value::String(text) => Some(text.as_str()),
        Value::Array(blocks) => blocks
            .last()
            .and_then(|block| block.get("text"))
            .and_then(Value::as_str),
        _ => None,
    };
    last_text.is_some_and(|text| text.ends_with(char::is_whitespace))
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize)]
struct Message<'a, C> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: C,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<()>,
    usage: Usage,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

fn stop_reason(ex: &Exchange) -> &'static str {
    if ex.truncated {
        "max_tokens"
    } else {
        "end_turn"
    }
}

/// The non-streaming `message` body.
pub fn body(ex: &Exchange) -> Bytes {
    let text = ex.text();
    Bytes::from(wire::to_json(&Message {
        id: &ex.id,
        kind: "message",
        role: "assistant",
        model: ex.model,
        content: [TextBlock {
            kind: "text",
            text: &text,
        }],
        stop_reason: Some(stop_reason(ex)),
        stop_sequence: None,
        usage: Usage {
            input_tokens: ex.prompt_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            output_tokens: ex.completion_tokens(),
        },
    }))
}

#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: Message<'a, [(); 0]>,
}

#[derive(Serialize)]
struct BlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    content_block: TextBlock<'a>,
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: TextDelta<'a>,
}

#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct BlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
}

#[derive(Serialize)]
struct MessageDelta {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta,
    usage: OutputUsage,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<()>,
}

#[derive(Serialize)]
struct OutputUsage {
    output_tokens: u64,
}

#[derive(Serialize)]
struct Bare {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The named-event stream: `message_start`, `content_block_start`, `ping`, one
/// `content_block_delta` per token, `content_block_stop`, `message_delta`, `message_stop` — or
/// an `error` event / a cut after some tokens.
pub fn stream(
    ex: &Exchange,
    emit: usize,
    ending: Ending,
    ttft: Duration,
    delay: Duration,
) -> Script {
    let mut script = Script::new();
    let out = script.out();
    wire::push_event(
        out,
        "message_start",
        &MessageStart {
            kind: "message_start",
            message: Message {
                id: &ex.id,
                kind: "message",
                role: "assistant",
                model: ex.model,
                content: [],
                stop_reason: None,
                stop_sequence: None,
                usage: Usage {
                    input_tokens: ex.prompt_tokens,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 0,
                    output_tokens: 1,
                },
            },
        },
    );
    wire::push_event(
        out,
        "content_block_start",
        &BlockStart {
            kind: "content_block_start",
            index: 0,
            content_block: TextBlock {
                kind: "text",
                text: "",
            },
        },
    );
    wire::push_event(out, "ping", &Bare { kind: "ping" });
    let last = ex.answer.len().saturating_sub(1);
    wire::play_tokens(
        &mut script,
        ttft,
        delay,
        &ex.answer[..emit],
        |i, word, out| {
            let token = text::token_text(word, i == last);
            wire::push_event(
                out,
                "content_block_delta",
                &BlockDelta {
                    kind: "content_block_delta",
                    index: 0,
                    delta: TextDelta {
                        kind: "text_delta",
                        text: &token,
                    },
                },
            );
        },
    );
    let out = script.out();
    match ending {
        Ending::Complete => {
            wire::push_event(
                out,
                "content_block_stop",
                &BlockStop {
                    kind: "content_block_stop",
                    index: 0,
                },
            );
            wire::push_event(
                out,
                "message_delta",
                &MessageDelta {
                    kind: "message_delta",
                    delta: StopDelta {
                        stop_reason: stop_reason(ex),
                        stop_sequence: None,
                    },
                    usage: OutputUsage {
                        output_tokens: ex.completion_tokens(),
                    },
                },
            );
            wire::push_event(
                out,
                "message_stop",
                &Bare {
                    kind: "message_stop",
                },
            );
            script.finish()
        }
        Ending::Error(failure) => {
            let body = failure_body(failure, ex.model, ex.prompt_tokens);
            out.extend_from_slice(b"event: error\ndata: ");
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\n\n");
            script.finish()
        }
        Ending::Cut => script.cut(),
    }
}
