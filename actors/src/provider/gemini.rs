//! The Google Gemini (Generative Language API) adapter.
//!
//! `base_url` is the host root (`https://generativelanguage.googleapis.com`, or
//! `http://127.0.0.1:PORT`); requests go to `{base_url}/v1beta/models/{model}:…` with the key in
//! the `x-goog-api-key` header (never in the URL, so it cannot leak into logs):
//! `:streamGenerateContent?alt=sse` to stream, `:generateContent` for a whole answer,
//! `:batchEmbedContents` for embeddings.
//!
//! Each stream event is a whole `GenerateContentResponse`; [`GeminiStream`] turns it into
//! chunks. `usageMetadata` repeats on every event (cumulative), so usage is emitted only when it
//! changes. There is no end-of-stream marker: the stream is complete once a candidate carries a
//! `finishReason` (or the prompt itself was blocked).

use async_trait::async_trait;
use http::header::HeaderName;
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

/// The Gemini API.
#[derive(Clone)]
pub struct GeminiProvider {
    base_url: String,
    api_key: String,
    http: HttpClient,
}

/// Never prints the key.
impl std::fmt::Debug for GeminiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        super::openai::debug_redacted(f, "GeminiProvider", &self.base_url, &self.api_key)
    }
}

impl GeminiProvider {
    /// `base_url` like `https://generativelanguage.googleapis.com` (no version segment).
    pub fn new(base_url: String, api_key: String, http: HttpClient) -> Self {
        Self {
            base_url: trim_base_url(base_url),
            api_key,
            http,
        }
    }

    /// `model` may be given bare (`gemini-2.0-flash`) or as a resource (`models/gemini-…`).
    fn post(&self, model: &str, method: &str) -> Result<Post<'_>, ProviderError> {
        let url = format!(
            "{}/v1beta/models/{}:{method}",
            self.base_url,
            bare_model(model)
        );
        let request = self.http.post_url(&url);
        if self.api_key.is_empty() {
            return Ok(request);
        }
        Ok(request.header(
            HeaderName::from_static("x-goog-api-key"),
            secret_header(&self.api_key)?,
        ))
    }
}

fn bare_model(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

#[async_trait]
impl Provider for GeminiProvider {
    fn kind(&self) -> &'static str {
        "gemini"
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = GenerateBody::new(&request);
        let builder = self.post(&request.model, "streamGenerateContent?alt=sse")?;
        let response = send(builder.json(&body)).await?;
        Ok(response_stream(response, GeminiStream::default()))
    }

    async fn complete(&self, request: ChatRequest) -> Result<Completion, ProviderError> {
        let body = GenerateBody::new(&request);
        let builder = self.post(&request.model, "generateContent")?;
        let response = send(builder.json(&body)).await?;
        parse_completion(&read_body(response).await?)
    }

    async fn embed(&self, model: &str, inputs: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        // Each request in the batch names its model as a resource.
        let resource = format!("models/{}", bare_model(model));
        let body = BatchEmbedBody {
            requests: inputs
                .iter()
                .map(|text| EmbedRequest {
                    model: &resource,
                    content: SystemInstruction {
                        parts: vec![Part { text }],
                    },
                })
                .collect(),
        };
        let response = send(self.post(model, "batchEmbedContents")?.json(&body)).await?;
        parse_embeddings(&read_body(response).await?, inputs.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format: requests
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateBody<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<SystemInstruction<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Debug, Serialize)]
struct Content<'a> {
    role: &'static str,
    parts: [Part<'a>; 1],
}

#[derive(Debug, Serialize)]
struct SystemInstruction<'a> {
    parts: Vec<Part<'a>>,
}

#[derive(Debug, Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
}

impl<'a> GenerateBody<'a> {
    fn new(request: &'a ChatRequest) -> Self {
        // Gemini has no system role in `contents`: system messages join `systemInstruction`,
        // one part each.
        let system_parts: Vec<Part<'a>> = request
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
            .map(|text| Part { text })
            .collect();
        let contents = request
            .messages
            .iter()
            .filter_map(|m| {
                let role = match m.role {
                    ChatRole::User => "user",
                    ChatRole::Assistant => "model",
                    ChatRole::System => return None,
                };
                Some(Content {
                    role,
                    parts: [Part { text: &m.content }],
                })
            })
            .collect();
        let generation_config = (request.max_tokens.is_some() || request.temperature.is_some())
            .then_some(GenerationConfig {
                max_output_tokens: request.max_tokens,
                temperature: request.temperature,
            });
        Self {
            contents,
            system_instruction: (!system_parts.is_empty()).then_some(SystemInstruction {
                parts: system_parts,
            }),
            generation_config,
        }
    }
}

#[derive(Debug, Serialize)]
struct BatchEmbedBody<'a> {
    requests: Vec<EmbedRequest<'a>>,
}

#[derive(Debug, Serialize)]
struct EmbedRequest<'a> {
    model: &'a str,
    content: SystemInstruction<'a>,
}

// ---------------------------------------------------------------------------------------------
// Wire format: responses
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateResponse {
    #[serde(default)]
    candidates: Option<Vec<Candidate>>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    /// A failure reported inside the stream.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CandidateContent {
    /// Kept as trees: a `functionCall` part is passed on exactly as sent.
    #[serde(default)]
    parts: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: Option<u64>,
    #[serde(default)]
    candidates_token_count: Option<u64>,
    /// Thinking tokens are billed as output.
    #[serde(default)]
    thoughts_token_count: Option<u64>,
}

impl UsageMetadata {
    fn to_usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.prompt_token_count.unwrap_or(0),
            output_tokens: self.candidates_token_count.unwrap_or(0)
                + self.thoughts_token_count.unwrap_or(0),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BatchEmbedResponse {
    #[serde(default)]
    embeddings: Vec<Embedding>,
}

#[derive(Debug, Deserialize)]
struct Embedding {
    values: Vec<f32>,
}

// ---------------------------------------------------------------------------------------------
// Pure conversions
// ---------------------------------------------------------------------------------------------

pub(crate) fn map_finish_reason(reason: &str) -> FinishReason {
    match reason {
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => {
            FinishReason::ContentFilter
        }
        other => FinishReason::Other(other.to_owned()),
    }
}

/// The streaming state machine: one `GenerateContentResponse` in, chunks out.
#[derive(Debug, Default)]
pub struct GeminiStream {
    finished: bool,
    /// The usage last emitted: Gemini repeats it on every event.
    last_usage: Option<TokenUsage>,
}

impl GeminiStream {
    pub fn on_data(&mut self, data: &str) -> Result<Vec<Chunk>, ProviderError> {
        if data.trim().is_empty() {
            return Ok(Vec::new());
        }
        let response: GenerateResponse = serde_json::from_str(data).map_err(decode_error)?;
        self.on_response(response)
    }

    fn on_response(&mut self, response: GenerateResponse) -> Result<Vec<Chunk>, ProviderError> {
        if let Some(error) = response.error.as_ref().filter(|e| !e.is_null()) {
            return Err(classify_stream_error(error));
        }
        let mut out = Vec::new();
        // Only candidate 0: Chorus never asks for several.
        let candidate = response
            .candidates
            .into_iter()
            .flatten()
            .find(|c| c.index.unwrap_or(0) == 0);
        match candidate {
            Some(candidate) => {
                let parts = candidate
                    .content
                    .and_then(|c| c.parts)
                    .into_iter()
                    .flatten();
                for part in parts {
                    out.extend(part_to_chunk(part));
                }
                if let Some(reason) = candidate.finish_reason.filter(|r| !r.is_empty()) {
                    self.finished = true;
                    out.push(Chunk::Finish(map_finish_reason(&reason)));
                }
            }
            None => {
                // No candidates and a block reason: the prompt itself was refused; nothing
                // else will come.
                let blocked = response.prompt_feedback.and_then(|f| f.block_reason);
                if blocked.is_some_and(|r| !r.is_empty()) {
                    self.finished = true;
                    out.push(Chunk::Finish(FinishReason::ContentFilter));
                }
            }
        }
        if let Some(usage) = response.usage_metadata.map(|u| u.to_usage())
            && self.last_usage != Some(usage)
        {
            self.last_usage = Some(usage);
            out.push(Chunk::Usage(usage));
        }
        Ok(out)
    }
}

/// A text part → text (thought summaries are not the answer); a `functionCall` part → a tool
/// call, passed through whole.
fn part_to_chunk(part: Value) -> Option<Chunk> {
    let Value::Object(mut part) = part else {
        return None;
    };
    if part.contains_key("functionCall") {
        return Some(Chunk::ToolCall(Value::Object(part)));
    }
    if part.get("thought").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    match part.remove("text") {
        Some(Value::String(text)) if !text.is_empty() => Some(Chunk::Text(text)),
        _ => None,
    }
}

impl EventDecoder for GeminiStream {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<Chunk>, ProviderError> {
        self.on_data(&event.data)
    }

    fn is_complete(&self) -> bool {
        self.finished
    }
}

/// A `:generateContent` body → [`Completion`] (the same shape as one stream event, so the same
/// conversion folds it).
pub fn parse_completion(body: &[u8]) -> Result<Completion, ProviderError> {
    let response: GenerateResponse = serde_json::from_slice(body).map_err(decode_error)?;
    let mut completion = Completion::default();
    for chunk in GeminiStream::default().on_response(response)? {
        match chunk {
            Chunk::Text(text) => completion.text.push_str(&text),
            Chunk::Usage(usage) => completion.usage = Some(usage),
            Chunk::Finish(reason) => completion.finish = Some(reason),
            Chunk::ToolCall(_) => {} // A whole answer carries text only.
        }
    }
    Ok(completion)
}

/// A `:batchEmbedContents` body → one vector per input, in request order.
pub fn parse_embeddings(body: &[u8], expected: usize) -> Result<Vec<Vec<f32>>, ProviderError> {
    let response: BatchEmbedResponse = serde_json::from_slice(body).map_err(decode_error)?;
    if response.embeddings.len() != expected {
        return Err(ProviderError::Decode {
            message: format!(
                "expected {expected} embeddings, got {}",
                response.embeddings.len()
            ),
        });
    }
    Ok(response.embeddings.into_iter().map(|e| e.values).collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header::HeaderMap;
    use serde_json::json;

    use super::*;
    use crate::provider::ChatMessage;
    use crate::provider::openai::classify_http_error;
    use crate::provider::openai::test_support::{
        run, run_all_splits, serve_once, sse_response, text,
    };
    use futures_util::StreamExt;

    const STREAM_TEXT: &str = include_str!("testdata/gemini_stream_text.sse");
    const STREAM_SAFETY: &str = include_str!("testdata/gemini_stream_safety.sse");
    const STREAM_FUNCTION: &str = include_str!("testdata/gemini_stream_function_call.sse");
    const STREAM_ERROR: &str = include_str!("testdata/gemini_stream_error.sse");

    fn message(role: ChatRole, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_owned(),
        }
    }

    #[test]
    fn body_maps_roles_and_system_instruction() {
        let request = ChatRequest {
            model: "gemini-2.0-flash".to_owned(),
            system: Some("Be brief.".to_owned()),
            messages: vec![
                message(ChatRole::User, "Hi"),
                message(ChatRole::Assistant, "Hello"),
                message(ChatRole::System, "Answer in French."),
                message(ChatRole::User, "Weather?"),
            ],
            max_tokens: Some(100),
            temperature: Some(0.7),
        };
        assert_eq!(
            serde_json::to_value(GenerateBody::new(&request)).unwrap(),
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Hi"}]},
                    {"role": "model", "parts": [{"text": "Hello"}]},
                    {"role": "user", "parts": [{"text": "Weather?"}]}
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]},
                "generationConfig": {"maxOutputTokens": 100, "temperature": 0.7}
            })
        );
        let bare = ChatRequest {
            model: "m".to_owned(),
            messages: vec![message(ChatRole::User, "x")],
            ..ChatRequest::default()
        };
        assert_eq!(
            serde_json::to_value(GenerateBody::new(&bare)).unwrap(),
            json!({"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
        );
    }

    #[test]
    fn model_may_be_a_resource_name() {
        assert_eq!(bare_model("models/gemini-2.0-flash"), "gemini-2.0-flash");
        assert_eq!(bare_model("gemini-2.0-flash"), "gemini-2.0-flash");
    }

    #[tokio::test]
    async fn streamed_answer_with_usage() {
        let items = run_all_splits::<GeminiStream>(STREAM_TEXT).await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Text("The".to_owned())),
                Ok(Chunk::Usage(TokenUsage {
                    input_tokens: 8,
                    output_tokens: 0
                })),
                Ok(Chunk::Text(" quick brown fox".to_owned())),
                Ok(Chunk::Text(" jumps.".to_owned())),
                Ok(Chunk::Finish(FinishReason::Stop)),
                Ok(Chunk::Usage(TokenUsage {
                    input_tokens: 8,
                    output_tokens: 12
                })),
            ]
        );
    }

    #[tokio::test]
    async fn safety_finish_is_content_filter() {
        let items = run_all_splits::<GeminiStream>(STREAM_SAFETY).await;
        assert_eq!(text(&items), "I can help with");
        assert!(items.contains(&Ok(Chunk::Finish(FinishReason::ContentFilter))));
        assert!(items.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn blocked_prompt_is_content_filter_and_complete() {
        let transcript = "data: {\"promptFeedback\": {\"blockReason\": \"SAFETY\", \"safetyRatings\": [{\"category\": \"HARM_CATEGORY_DANGEROUS_CONTENT\", \"probability\": \"HIGH\"}]}, \"usageMetadata\": {\"promptTokenCount\": 9, \"totalTokenCount\": 9}}\r\n\r\n";
        let items = run(transcript, GeminiStream::default(), 10).await;
        assert_eq!(
            items,
            vec![
                Ok(Chunk::Finish(FinishReason::ContentFilter)),
                Ok(Chunk::Usage(TokenUsage {
                    input_tokens: 9,
                    output_tokens: 0
                })),
            ]
        );
    }

    #[tokio::test]
    async fn function_call_is_carried_through() {
        let items = run_all_splits::<GeminiStream>(STREAM_FUNCTION).await;
        let expected =
            json!({"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}});
        assert!(items.contains(&Ok(Chunk::ToolCall(expected))), "{items:?}");
        assert!(items.contains(&Ok(Chunk::Finish(FinishReason::Stop))));
        // Thought summaries are not answer text.
        assert_eq!(text(&items), "Let me look that up.");
    }

    #[tokio::test]
    async fn error_mid_stream_is_classified() {
        let items = run_all_splits::<GeminiStream>(STREAM_ERROR).await;
        assert_eq!(text(&items), "Once upon");
        assert_eq!(
            items.last(),
            Some(&Err(ProviderError::Overloaded {
                retry_after: None,
                message: "The model is overloaded. Please try again later. (UNAVAILABLE)"
                    .to_owned()
            }))
        );
        assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1);
    }

    #[tokio::test]
    async fn eof_before_finish_reason_is_a_cut() {
        let cut = &STREAM_TEXT[..STREAM_TEXT.find("\"finishReason\"").unwrap()];
        let items = run(cut, GeminiStream::default(), 6).await;
        assert_eq!(
            items.last(),
            Some(&Err(ProviderError::Transport {
                message: "stream ended before completion".to_owned()
            }))
        );
    }

    #[test]
    fn malformed_json_is_a_decode_error() {
        assert!(matches!(
            GeminiStream::default().on_data("{\"candidates\": [}"),
            Err(ProviderError::Decode { .. })
        ));
    }

    #[test]
    fn finish_reasons() {
        for (wire, reason) in [
            ("STOP", FinishReason::Stop),
            ("MAX_TOKENS", FinishReason::Length),
            ("SAFETY", FinishReason::ContentFilter),
            ("RECITATION", FinishReason::ContentFilter),
            ("BLOCKLIST", FinishReason::ContentFilter),
            ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
            ("SPII", FinishReason::ContentFilter),
            (
                "MALFORMED_FUNCTION_CALL",
                FinishReason::Other("MALFORMED_FUNCTION_CALL".to_owned()),
            ),
        ] {
            assert_eq!(map_finish_reason(wire), reason);
        }
    }

    #[test]
    fn non_streaming_completion() {
        let body = include_bytes!("testdata/gemini_completion.json");
        assert_eq!(
            parse_completion(body).unwrap(),
            Completion {
                text: "Hello! How can I help you today?".to_owned(),
                usage: Some(TokenUsage {
                    input_tokens: 4,
                    output_tokens: 10 + 20
                }),
                finish: Some(FinishReason::Stop),
            }
        );
    }

    #[test]
    fn embeddings() {
        let inputs = ["a".to_owned(), "b".to_owned()];
        let resource = "models/text-embedding-004";
        let body = BatchEmbedBody {
            requests: inputs
                .iter()
                .map(|text| EmbedRequest {
                    model: resource,
                    content: SystemInstruction {
                        parts: vec![Part { text }],
                    },
                })
                .collect(),
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"requests": [
                {"model": "models/text-embedding-004", "content": {"parts": [{"text": "a"}]}},
                {"model": "models/text-embedding-004", "content": {"parts": [{"text": "b"}]}}
            ]})
        );
        let response = br#"{"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]}"#;
        assert_eq!(
            parse_embeddings(response, 2).unwrap(),
            vec![vec![0.1, 0.2], vec![0.3, 0.4]]
        );
        assert!(parse_embeddings(response, 3).is_err());
    }

    #[tokio::test]
    async fn http_stream_url_and_key_header() {
        let (base, server) = serve_once(sse_response(STREAM_TEXT)).await;
        let provider = GeminiProvider::new(
            format!("{base}/"),
            "AIza-test".to_owned(),
            HttpClient::for_tests(),
        );
        let request = ChatRequest {
            model: "gemini-2.0-flash".to_owned(),
            messages: vec![message(ChatRole::User, "Hi")],
            ..ChatRequest::default()
        };
        let items: Vec<_> = provider.stream(request).await.unwrap().collect().await;
        assert_eq!(text(&items), "The quick brown fox jumps.");
        let received = server.await.unwrap();
        assert!(
            received.starts_with(
                "post /v1beta/models/gemini-2.0-flash:streamgeneratecontent?alt=sse http/1.1\r\n"
            ),
            "{received}"
        );
        assert!(received.contains("\r\nx-goog-api-key: aiza-test\r\n"));
        assert!(!received.contains("key="));
    }

    #[tokio::test]
    async fn http_generate_and_embed_urls() {
        let body = std::str::from_utf8(include_bytes!("testdata/gemini_completion.json")).unwrap();
        let ok = |body: &str| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let (base, server) = serve_once(ok(body)).await;
        let provider = GeminiProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let request = ChatRequest {
            model: "models/gemini-2.5-flash".to_owned(),
            messages: vec![message(ChatRole::User, "Hi")],
            ..ChatRequest::default()
        };
        let completion = provider.complete(request).await.unwrap();
        assert_eq!(completion.text, "Hello! How can I help you today?");
        assert!(
            server
                .await
                .unwrap()
                .starts_with("post /v1beta/models/gemini-2.5-flash:generatecontent ")
        );

        let (base, server) = serve_once(ok(r#"{"embeddings":[{"values":[1.5]}]}"#)).await;
        let provider = GeminiProvider::new(base, "k".to_owned(), HttpClient::for_tests());
        let vectors = provider
            .embed("text-embedding-004", &["x".to_owned()])
            .await
            .unwrap();
        assert_eq!(vectors, vec![vec![1.5]]);
        assert!(
            server
                .await
                .unwrap()
                .starts_with("post /v1beta/models/text-embedding-004:batchembedcontents ")
        );
    }

    #[test]
    fn http_errors_in_gemini_shape() {
        let none = HeaderMap::new();
        let body = |code: u16, status: &str, message: &str| {
            json!({"error": {"code": code, "message": message, "status": status}}).to_string()
        };
        let too_long = body(
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
        );
        assert_eq!(
            classify_http_error(400, &none, &too_long).class(),
            "context_too_long"
        );
        // A bad key is a 400 on Gemini.
        let bad_key = json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}).to_string();
        assert_eq!(classify_http_error(400, &none, &bad_key).class(), "auth");
        // 429 with the delay only in the body's RetryInfo.
        let limited = json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}]}}).to_string();
        assert_eq!(
            classify_http_error(429, &none, &limited).retry_after(),
            Some(Duration::from_secs(17))
        );
        // Also when wrapped in an array.
        let wrapped = format!("[{}]", body(503, "UNAVAILABLE", "The model is overloaded."));
        assert_eq!(
            classify_http_error(503, &none, &wrapped),
            ProviderError::Overloaded {
                retry_after: None,
                message: "The model is overloaded. (UNAVAILABLE)".to_owned()
            }
        );
        assert_eq!(
            classify_http_error(404, &none, &body(404, "NOT_FOUND", "models/x is not found"))
                .class(),
            "bad_request"
        );
    }
}
