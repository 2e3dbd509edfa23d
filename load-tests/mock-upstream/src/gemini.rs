//! The Gemini dialect: `POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent` (`?alt=sse`: `data:` events separated by CRLF as the real API does;
//! without `alt=sse`: a streamed JSON array), and the
//! `{"error":{"code","message","status"}}` error shape.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::options::Failure;
use crate::text;
use crate::wire::{self, Ending, ErrorReply, Exchange, Request, Script};

/// Context window claimed by `error=context`.
const CONTEXT_WINDOW: u64 = 1_048_576;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: u16,
    message: &'a str,
    status: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<RetryInfo>,
}

#[derive(Serialize)]
struct RetryInfo {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "retryDelay")]
    retry_delay: String,
}

fn error_json(code: u16, status: &str, message: &str, retry_after: Option<u64>) -> Bytes {
    let details = retry_after
        .map(|seconds| RetryInfo {
            kind: "type.googleapis.com/google.rpc.RetryInfo",
            retry_delay: format!("{seconds}s"),
        })
        .into_iter()
        .collect();
    Bytes::from(wire::to_json(&ErrorBody {
        error: ErrorDetail {
            code,
            message,
            status,
            details,
        },
    }))
}

/// A 400 `INVALID_ARGUMENT`.
pub fn invalid_argument(message: &str) -> ErrorReply {
    ErrorReply::new(400, error_json(400, "INVALID_ARGUMENT", message, None))
}

/// The 401 for a request with neither `x-goog-api-key` nor `?key=`.
pub fn missing_key() -> ErrorReply {
    ErrorReply::new(
        401,
        error_json(
            401,
            "UNAUTHENTICATED",
            "Request is missing required authentication credential. Expected OAuth 2 access \
             token, login cookie or other valid authentication credential. See \
             https://developers.google.com/identity/sign-in/web/devconsole-project.",
            None,
        ),
    )
}

/// The 404 for a path the real API does not serve.
pub fn not_found(path: &str) -> ErrorReply {
    ErrorReply::new(
        404,
        error_json(
            404,
            "NOT_FOUND",
            &format!("The requested URL {path} was not found on this server."),
            None,
        ),
    )
}

/// The body of an injected failure, as the real API words it.
pub fn failure_body(
    failure: Failure,
    model: &str,
    prompt_tokens: u64,
    retry_after: Option<u64>,
) -> Bytes {
    let code = match failure {
        Failure::ContextLength => {
            return error_json(
                400,
                "INVALID_ARGUMENT",
                &format!(
                    "The input token count ({}) exceeds the maximum number of tokens allowed \
                     ({CONTEXT_WINDOW}).",
                    CONTEXT_WINDOW + prompt_tokens
                ),
                None,
            );
        }
        Failure::Status(code) => code,
    };
    let (status, message) = match code {
        400 => (
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.".to_owned(),
        ),
        401 => (
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.".to_owned(),
        ),
        403 => (
            "PERMISSION_DENIED",
            "The caller does not have permission".to_owned(),
        ),
        404 => (
            "NOT_FOUND",
            format!(
                "models/{model} is not found for API version v1beta, or is not supported for \
                 generateContent."
            ),
        ),
        429 => (
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).".to_owned(),
        ),
        500 => (
            "INTERNAL",
            "An internal error has occurred. Please retry or report in \
             https://developers.generativeai.google/guide/troubleshooting"
                .to_owned(),
        ),
        503 => (
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.".to_owned(),
        ),
        504 => (
            "DEADLINE_EXCEEDED",
            "Deadline expired before operation could complete.".to_owned(),
        ),
        501..=599 => (
            "UNAVAILABLE",
            format!("mock-upstream: injected HTTP {code}"),
        ),
        _ => (
            "FAILED_PRECONDITION",
            format!("mock-upstream: injected HTTP {code}"),
        ),
    };
    let retry = if code == 429 { retry_after } else { None };
    error_json(code, status, &message, retry)
}

fn either<'a>(
    object: &'a serde_json::Map<String, Value>,
    camel: &str,
    snake: &str,
) -> Option<&'a Value> {
    object.get(camel).or_else(|| object.get(snake))
}

fn parts_words(content: &Value) -> u64 {
    content.get("parts").map_or(0, text::count_words)
}

/// Reads a `GenerateContentRequest`; the model comes from the URL path.
pub fn parse<'a>(body: &'a Value, model: &'a str, stream: bool) -> Result<Request<'a>, ErrorReply> {
    let Some(object) = body.as_object() else {
        return Err(invalid_argument(
            "Invalid JSON payload received. Expected a JSON object.",
        ));
    };
    let Some(contents) = object.get("contents").and_then(Value::as_array) else {
        return Err(invalid_argument(
            "* GenerateContentRequest.contents: contents is not specified\n",
        ));
    };
    let mut prompt_tokens =
        either(object, "systemInstruction", "system_instruction").map_or(0, parts_words);
    let mut last_user = None;
    for content in contents {
        prompt_tokens += parts_words(content);
        match content.get("role").and_then(Value::as_str) {
            None | Some("user") => last_user = content.get("parts"),
            Some(_) => {}
        }
    }
    let mut echo = Vec::new();
    if let Some(parts) = last_user {
        text::push_words(parts, &mut echo);
    }
    let max_tokens = either(object, "generationConfig", "generation_config")
        .and_then(Value::as_object)
        .and_then(|config| either(config, "maxOutputTokens", "max_output_tokens"))
        .and_then(Value::as_u64);
    Ok(Request {
        model,
        prompt_tokens,
        echo,
        max_tokens,
        stream,
        include_usage: false,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse<'a> {
    candidates: [Candidate<'a>; 1],
    usage_metadata: UsageMetadata,
    model_version: &'a str,
    response_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    content: Content<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'static str>,
    index: u32,
}

#[derive(Serialize)]
struct Content<'a> {
    parts: [Part<'a>; 1],
    role: &'static str,
}

#[derive(Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: u64,
    candidates_token_count: u64,
    total_token_count: u64,
    prompt_tokens_details: [ModalityCount; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModalityCount {
    modality: &'static str,
    token_count: u64,
}

fn finish_reason(ex: &Exchange) -> &'static str {
    if ex.truncated { "MAX_TOKENS" } else { "STOP" }
}

fn response<'a>(
    ex: &'a Exchange,
    text: &'a str,
    finish: Option<&'static str>,
    candidates_tokens: u64,
) -> GenerateContentResponse<'a> {
    GenerateContentResponse {
        candidates: [Candidate {
            content: Content {
                parts: [Part { text }],
                role: "model",
            },
            finish_reason: finish,
            index: 0,
        }],
        usage_metadata: UsageMetadata {
            prompt_token_count: ex.prompt_tokens,
            candidates_token_count: candidates_tokens,
            total_token_count: ex.prompt_tokens + candidates_tokens,
            prompt_tokens_details: [ModalityCount {
                modality: "TEXT",
                token_count: ex.prompt_tokens,
            }],
        },
        model_version: ex.model,
        response_id: &ex.id,
    }
}

/// The non-streaming `GenerateContentResponse`.
pub fn body(ex: &Exchange) -> Bytes {
    let text = ex.text();
    Bytes::from(wire::to_json(&response(
        ex,
        &text,
        Some(finish_reason(ex)),
        ex.completion_tokens(),
    )))
}

/// The stream: one `GenerateContentResponse` per token with cumulative `usageMetadata`, the last
/// carrying `finishReason`. A mid-stream error is a cut (no terminal chunk). `sse` picks
/// `data:` events (CRLF-separated); otherwise a JSON array is streamed.
pub fn stream(
    ex: &Exchange,
    emit: usize,
    ending: Ending,
    ttft: Duration,
    delay: Duration,
    sse: bool,
) -> Script {
    let mut script = Script::new();
    let complete = ending == Ending::Complete;
    let last = ex.answer.len().saturating_sub(1);
    let mut first = true;
    let mut push = |out: &mut Vec<u8>, chunk: &GenerateContentResponse| {
        if sse {
            wire::push_data(out, chunk, "\r\n");
        } else {
            out.extend_from_slice(if first { b"[" } else { b"\n,\r\n" });
            serde_json::to_writer(&mut *out, chunk).unwrap_or_default();
        }
        first = false;
    };
    wire::play_tokens(
        &mut script,
        ttft,
        delay,
        &ex.answer[..emit],
        |i, word, out| {
            let token = text::token_text(word, i == last);
            let finish = (complete && i == last).then(|| finish_reason(ex));
            push(out, &response(ex, &token, finish, i as u64 + 1));
        },
    );
    if !complete {
        return script.cut();
    }
    if ex.answer.is_empty() {
        push(script.out(), &response(ex, "", Some(finish_reason(ex)), 0));
    }
    if !sse {
        script.out().extend_from_slice(b"\n]");
    }
    script.finish()
}
