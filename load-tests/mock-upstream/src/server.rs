//! Routing and the request flow shared by every dialect: authenticate, parse, resolve the
//! switches, then fail, hang, or answer (whole or streamed).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use warp::http::{HeaderMap, Method};
use warp::reply::Response;

use crate::options::{Behavior, Failure, split_model};
use crate::wire::{self, Ending, ErrorReply, Exchange, Request, Script};
use crate::{RecordedRequest, anthropic, gemini, openai, text};

/// Switch sources that live on the server: defaults and per-model options.
#[derive(Debug, Default)]
pub(crate) struct Layers {
    pub defaults: Behavior,
    pub per_model: HashMap<String, Behavior>,
}

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct State {
    pub layers: RwLock<Layers>,
    pub models: Vec<String>,
    pub embedding_dims: usize,
    pub hang_timeout: Duration,
    pub fail_counts: Mutex<HashMap<String, u64>>,
    pub request_count: AtomicU64,
    pub active_hangs: AtomicU64,
    pub recorded: Option<Mutex<VecDeque<RecordedRequest>>>,
    pub max_recorded: usize,
    pub id_prefix: String,
    pub next_id: AtomicU64,
    pub shutdown: CancellationToken,
}

impl State {
    fn next_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{}{n:010x}", self.id_prefix)
    }

    fn record(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
        json: &Option<Value>,
    ) {
        let Some(recorded) = &self.recorded else {
            return;
        };
        let request = RecordedRequest {
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: match json {
                Some(value) => value.clone(),
                None if body.is_empty() => Value::Null,
                None => Value::String(String::from_utf8_lossy(body).into_owned()),
            },
            received_at: std::time::Instant::now(),
        };
        if let Ok(mut recorded) = recorded.lock() {
            if recorded.len() >= self.max_recorded {
                recorded.pop_front();
            }
            recorded.push_back(request);
        }
    }
}

/// The dialect a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    Anthropic,
    Gemini { sse: bool },
}

impl Dialect {
    fn invalid(self, message: &str) -> ErrorReply {
        match self {
            Dialect::OpenAi => openai::invalid_request(message, None, None),
            Dialect::Anthropic => anthropic::invalid_request(message),
            Dialect::Gemini { .. } => gemini::invalid_argument(message),
        }
    }

    fn failure(
        self,
        failure: Failure,
        model: &str,
        prompt_tokens: u64,
        retry_after: Option<u64>,
    ) -> ErrorReply {
        let body = match self {
            Dialect::OpenAi => {
                openai::failure_body(failure, model, prompt_tokens, retry_after.unwrap_or(1))
            }
            Dialect::Anthropic => anthropic::failure_body(failure, model, prompt_tokens),
            Dialect::Gemini { .. } => {
                gemini::failure_body(failure, model, prompt_tokens, retry_after)
            }
        };
        ErrorReply {
            status: failure.status(),
            body,
            retry_after,
        }
    }

    /// The failure `error_after` injects when `error` does not name one.
    fn default_stream_failure(self) -> Failure {
        match self {
            Dialect::Anthropic => Failure::Status(529),
            _ => Failure::Status(500),
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Dialect::OpenAi => "chatcmpl-",
            Dialect::Anthropic => "msg_",
            Dialect::Gemini { .. } => "",
        }
    }

    fn body(self, ex: &Exchange) -> Bytes {
        match self {
            Dialect::OpenAi => openai::body(ex),
            Dialect::Anthropic => anthropic::body(ex),
            Dialect::Gemini { .. } => gemini::body(ex),
        }
    }

    fn stream(self, ex: &Exchange, emit: usize, ending: Ending, behavior: &Behavior) -> Script {
        let (ttft, delay) = (behavior.ttft(), behavior.delay());
        match self {
            Dialect::OpenAi => openai::stream(ex, emit, ending, ttft, delay),
            Dialect::Anthropic => anthropic::stream(ex, emit, ending, ttft, delay),
            Dialect::Gemini { sse } => gemini::stream(ex, emit, ending, ttft, delay, sse),
        }
    }

    fn stream_content_type(self) -> &'static str {
        match self {
            Dialect::OpenAi | Dialect::Anthropic => "text/event-stream; charset=utf-8",
            Dialect::Gemini { sse: true } => "text/event-stream",
            Dialect::Gemini { sse: false } => "application/json; charset=UTF-8",
        }
    }
}

enum Route<'p> {
    Chat(Dialect),
    GeminiChat { model: &'p str, stream: bool },
    Models,
    Embeddings,
    NotFound,
}

fn route<'p>(method: &Method, path: &'p str) -> Route<'p> {
    let post = method == Method::POST;
    match path {
        "/v1/chat/completions" if post => return Route::Chat(Dialect::OpenAi),
        "/v1/messages" if post => return Route::Chat(Dialect::Anthropic),
        "/v1/embeddings" if post => return Route::Embeddings,
        "/v1/models" if method == Method::GET => return Route::Models,
        _ => {}
    }
    if post {
        let rest = path
            .strip_prefix("/v1beta/models/")
            .or_else(|| path.strip_prefix("/v1/models/"));
        if let Some((model, action)) = rest.and_then(|rest| rest.rsplit_once(':')) {
            match action {
                "generateContent" => {
                    return Route::GeminiChat {
                        model,
                        stream: false,
                    };
                }
                "streamGenerateContent" => {
                    return Route::GeminiChat {
                        model,
                        stream: true,
                    };
                }
                _ => {}
            }
        }
    }
    Route::NotFound
}

/// Serves one request.
pub(crate) async fn handle(
    state: Arc<State>,
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.request_count.fetch_add(1, Ordering::Relaxed);
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    state.record(&method, &path, &query, &headers, &body, &json);
    let json = json.unwrap_or(Value::Null);
    let result = match route(&method, &path) {
        Route::Chat(dialect) => chat_entry(&state, dialect, &headers, &json).await,
        Route::GeminiChat { model, stream } => {
            let sse = query_param(&query, "alt").is_some_and(|alt| alt == "sse");
            gemini_entry(&state, model, stream, sse, &query, &headers, &json).await
        }
        Route::Models => models(&state, &headers),
        Route::Embeddings => embeddings(&state, &headers, &json).await,
        Route::NotFound => Err(if path.starts_with("/v1beta/") {
            gemini::not_found(&path)
        } else if path.starts_with("/v1/messages") {
            anthropic::not_found()
        } else {
            openai::not_found(method.as_str(), &path)
        }),
    };
    result.unwrap_or_else(ErrorReply::into_response)
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

fn has_bearer(headers: &HeaderMap) -> bool {
    header(headers, "authorization").is_some_and(|value| {
        value.len() > 7
            && value[..7].eq_ignore_ascii_case("bearer ")
            && !value[7..].trim().is_empty()
    })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

async fn chat_entry(
    state: &State,
    dialect: Dialect,
    headers: &HeaderMap,
    json: &Value,
) -> Result<Response, ErrorReply> {
    let request = match dialect {
        Dialect::OpenAi => {
            if !has_bearer(headers) {
                return Err(openai::missing_key());
            }
            openai::parse(json)?
        }
        _ => {
            if header(headers, "x-api-key").is_none() {
                return Err(anthropic::missing_key());
            }
            if header(headers, "anthropic-version").is_none() {
                return Err(anthropic::missing_version());
            }
            anthropic::parse(json)?
        }
    };
    chat(state, dialect, headers, request).await
}

async fn gemini_entry(
    state: &State,
    raw_model: &str,
    stream: bool,
    sse: bool,
    query: &str,
    headers: &HeaderMap,
    json: &Value,
) -> Result<Response, ErrorReply> {
    let dialect = Dialect::Gemini { sse };
    if header(headers, "x-goog-api-key").is_none()
        && query_param(query, "key").is_none_or(|key| key.trim().is_empty())
    {
        return Err(gemini::missing_key());
    }
    let model = percent_decode(raw_model);
    let request = gemini::parse(json, &model, stream)?;
    chat(state, dialect, headers, request).await
}

/// Layers every switch source for `model` (the model string as sent).
fn resolve(state: &State, model: &str, headers: &HeaderMap) -> Result<Behavior, String> {
    let (base, options) = split_model(model);
    let mut behavior = match state.layers.read() {
        Ok(layers) => {
            let mut behavior = layers.defaults.clone();
            if let Some(per_model) = layers.per_model.get(base) {
                behavior.merge(per_model);
            }
            behavior
        }
        Err(_) => Behavior::default(),
    };
    if !options.is_empty() {
        behavior.apply_list(options).map_err(|e| e.to_string())?;
    }
    behavior.apply_headers(headers).map_err(|e| e.to_string())?;
    if behavior.fail_first.is_some() || behavior.fail_every.is_some() {
        let count = match state.fail_counts.lock() {
            Ok(mut counts) => {
                let count = counts.entry(model.to_owned()).or_insert(0);
                *count += 1;
                *count
            }
            Err(_) => u64::MAX,
        };
        if behavior.fails_at(count) {
            if !behavior.has_failure() {
                behavior.error = Some(Failure::Status(503));
            }
        } else {
            behavior.clear_failures();
        }
    }
    Ok(behavior)
}

async fn chat(
    state: &State,
    dialect: Dialect,
    headers: &HeaderMap,
    request: Request<'_>,
) -> Result<Response, ErrorReply> {
    let behavior = resolve(state, request.model, headers).map_err(|e| dialect.invalid(&e))?;
    if behavior.hang == Some(true) {
        hang(state).await;
        return Err(dialect.failure(
            Failure::Status(504),
            request.model,
            request.prompt_tokens,
            None,
        ));
    }
    let upfront = match (behavior.error, behavior.error_after, behavior.cut_after) {
        (Some(failure), None, None) => Some(failure),
        (failure, Some(_), None) if !request.stream => {
            Some(failure.unwrap_or(dialect.default_stream_failure()))
        }
        _ => None,
    };
    if let Some(failure) = upfront {
        sleep(behavior.ttft()).await;
        return Err(dialect.failure(
            failure,
            request.model,
            request.prompt_tokens,
            behavior.retry_after,
        ));
    }

    let mut answer = match behavior.tokens {
        Some(n) => text::lorem(n),
        None => request.echo,
    };
    let mut truncated = false;
    if let Some(max) = request.max_tokens
        && (answer.len() as u64) > max
    {
        answer.truncate(max as usize);
        truncated = true;
    }
    let exchange = Exchange {
        model: request.model,
        id: state.next_id(dialect.id_prefix()),
        created: now(),
        prompt_tokens: request.prompt_tokens,
        answer,
        truncated,
        include_usage: request.include_usage,
    };

    if !request.stream {
        let tokens = exchange.answer.len() as u32;
        sleep(behavior.ttft() + behavior.delay() * tokens.saturating_sub(1)).await;
        let body = dialect.body(&exchange);
        if behavior.cut_after.is_some() {
            let mut script = Script::new();
            script.data(&body[..body.len() / 2]);
            return Ok(wire::stream_response(
                "application/json",
                script.cut().until(&state.shutdown),
            ));
        }
        return Ok(wire::json_response(200, body));
    }

    let words = exchange.answer.len();
    let (emit, ending) = match (behavior.cut_after, behavior.error_after) {
        (Some(n), _) => (n.min(words), Ending::Cut),
        (None, Some(n)) => (
            n.min(words),
            Ending::Error(behavior.error.unwrap_or(dialect.default_stream_failure())),
        ),
        (None, None) => (words, Ending::Complete),
    };
    let script = dialect
        .stream(&exchange, emit, ending, &behavior)
        .until(&state.shutdown);
    Ok(wire::stream_response(dialect.stream_content_type(), script))
}

fn models(state: &State, headers: &HeaderMap) -> Result<Response, ErrorReply> {
    if !has_bearer(headers) {
        return Err(openai::missing_key());
    }
    let mut ids = state.models.clone();
    if let Ok(layers) = state.layers.read() {
        for model in layers.per_model.keys() {
            if !ids.contains(model) {
                ids.push(model.clone());
            }
        }
    }
    Ok(wire::json_response(200, openai::models(&ids)))
}

async fn embeddings(
    state: &State,
    headers: &HeaderMap,
    json: &Value,
) -> Result<Response, ErrorReply> {
    if !has_bearer(headers) {
        return Err(openai::missing_key());
    }
    let dialect = Dialect::OpenAi;
    let model = json.get("model").and_then(Value::as_str).unwrap_or("");
    let behavior = resolve(state, model, headers).map_err(|e| dialect.invalid(&e))?;
    if behavior.hang == Some(true) {
        hang(state).await;
        return Err(dialect.failure(Failure::Status(504), model, 0, None));
    }
    sleep(behavior.ttft()).await;
    if behavior.has_failure() {
        let failure = behavior.error.unwrap_or(Failure::Status(500));
        return Err(dialect.failure(failure, model, 0, behavior.retry_after));
    }
    let body = openai::embeddings(json, behavior.dims.unwrap_or(state.embedding_dims))?;
    Ok(wire::json_response(200, body))
}

/// Waits until the hang cap or server shutdown, counted in `active_hangs` meanwhile. If the
/// client gives up first, hyper drops this future with the connection.
async fn hang(state: &State) {
    struct Gauge<'a>(&'a AtomicU64);
    impl Drop for Gauge<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    state.active_hangs.fetch_add(1, Ordering::Relaxed);
    let _gauge = Gauge(&state.active_hangs);
    tokio::select! {
        () = tokio::time::sleep(state.hang_timeout) => {}
        () = state.shutdown.cancelled() => {}
    }
}

async fn sleep(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Decodes `%XX` escapes in a path segment (Gemini model names in the URL).
fn percent_decode(raw: &str) -> String {
    if !raw.contains('%') {
        return raw.to_owned();
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("m%3Btokens%3D3"), "m;tokens=3");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }

    #[test]
    fn routes_gemini_paths() {
        assert!(matches!(
            route(
                &Method::POST,
                "/v1beta/models/gemini-x;tokens=2:streamGenerateContent"
            ),
            Route::GeminiChat {
                model: "gemini-x;tokens=2",
                stream: true,
                ..
            }
        ));
        assert!(matches!(
            route(&Method::GET, "/v1beta/models/x:generateContent"),
            Route::NotFound
        ));
    }
}
