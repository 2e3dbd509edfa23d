//! What the three dialects share: the parsed request, the planned answer, HTTP replies, and
//! the timed body stream that plays a streaming answer (with its abrupt cut).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use warp::Reply;
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use warp::http::{Response as HttpResponse, StatusCode};
use warp::reply::Response;

use crate::options::Failure;

/// What a dialect's parser reads out of a chat request.
#[derive(Debug)]
pub struct Request<'a> {
    /// The model string exactly as sent (options included).
    pub model: &'a str,
    /// Words across every message, system prompt included.
    pub prompt_tokens: u64,
    /// The words of the last user message (the echo answer).
    pub echo: Vec<&'a str>,
    /// The request's output cap, if any.
    pub max_tokens: Option<u64>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
}

/// The answer to play, after `tokens=` and `max_tokens` were applied.
#[derive(Debug)]
pub struct Exchange<'a> {
    pub model: &'a str,
    pub id: String,
    pub created: u64,
    pub prompt_tokens: u64,
    pub answer: Vec<&'a str>,
    /// `max_tokens` cut the answer short (finish reason `length` / `max_tokens`).
    pub truncated: bool,
    pub include_usage: bool,
}

impl Exchange<'_> {
    pub fn completion_tokens(&self) -> u64 {
        self.answer.len() as u64
    }

    pub fn text(&self) -> String {
        self.answer.join(" ")
    }
}

/// How a stream ends after its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The dialect's normal terminal events.
    Complete,
    /// The dialect's mid-stream error event (Gemini: a cut), then a clean end of body.
    Error(Failure),
    /// An abrupt close with no terminal marker.
    Cut,
}

/// Plays `words` as tokens: waits `ttft` (also when there are no words), then emits one event
/// per word via `emit(index, word, out)`, `delay` apart.
pub fn play_tokens<'w>(
    script: &mut Script,
    ttft: Duration,
    delay: Duration,
    words: &[&'w str],
    mut emit: impl FnMut(usize, &'w str, &mut Vec<u8>),
) {
    script.sleep(ttft);
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            script.sleep(delay);
        }
        emit(i, word, script.out());
    }
}

/// An error answer: status, body in the dialect's shape, and an optional `Retry-After`.
#[derive(Debug)]
pub struct ErrorReply {
    pub status: u16,
    pub body: Bytes,
    pub retry_after: Option<u64>,
}

impl ErrorReply {
    pub fn new(status: u16, body: Bytes) -> ErrorReply {
        ErrorReply {
            status,
            body,
            retry_after: None,
        }
    }

    pub fn into_response(self) -> Response {
        let mut response = json_response(self.status, self.body);
        if let Some(seconds) = self.retry_after
            && matches!(self.status, 429 | 503 | 529)
        {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Serializes `value` as JSON (our types never fail to serialize).
pub fn to_json(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    serde_json::to_writer(&mut out, value).unwrap_or_default();
    out
}

/// Appends `data: <json><eol><eol>` (`eol` is `\n`, or `\r\n` for Gemini).
pub fn push_data(out: &mut Vec<u8>, value: &impl Serialize, eol: &str) {
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, value).unwrap_or_default();
    out.extend_from_slice(eol.as_bytes());
    out.extend_from_slice(eol.as_bytes());
}

/// Appends `event: <name>\ndata: <json>\n\n` (Anthropic).
pub fn push_event(out: &mut Vec<u8>, name: &str, value: &impl Serialize) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    push_data(out, value, "\n");
}

pub fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A complete JSON response.
pub fn json_response(code: u16, body: impl Into<Bytes>) -> Response {
    let mut response = HttpResponse::new(body.into().into());
    *response.status_mut() = status(code);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A 200 response whose body is played by `script`.
pub fn stream_response(content_type: &'static str, script: Script) -> Response {
    let mut response = warp::reply::stream(script).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The error a cut body ends with; hyper then closes the connection without the terminal
/// chunk, so the client sees the body end early.
#[derive(Debug, thiserror::Error)]
#[error("mock-upstream: connection cut on purpose")]
pub struct Cut;

#[derive(Debug)]
enum Step {
    Data(Bytes),
    Sleep(Duration),
    /// Return `Pending` once so hyper flushes what it buffered (before a cut).
    Flush,
    Cut,
}

/// A body stream: data chunks separated by sleeps, possibly ending in a cut.
#[derive(Debug, Default)]
pub struct Script {
    steps: VecDeque<Step>,
    pending: Vec<u8>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    shutdown: Option<CancellationToken>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    /// The buffer the next data chunk is written into.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.pending
    }

    /// Appends data; adjacent data without a sleep between goes out as one chunk.
    pub fn data(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    pub fn sleep(&mut self, duration: Duration) {
        if duration.is_zero() {
            return;
        }
        self.flush_pending();
        self.steps.push_back(Step::Sleep(duration));
    }

    /// Ends the body with an abrupt connection close after what was sent so far.
    pub fn cut(mut self) -> Script {
        self.flush_pending();
        self.steps.push_back(Step::Flush);
        self.steps.push_back(Step::Cut);
        self
    }

    /// Cuts the body at the next step once `shutdown` is cancelled, so that stopping the
    /// server does not wait for slow streams.
    pub fn until(mut self, shutdown: &CancellationToken) -> Script {
        self.shutdown = Some(shutdown.clone());
        self
    }

    /// Ends the body normally.
    pub fn finish(mut self) -> Script {
        self.flush_pending();
        self
    }

    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            let data = std::mem::take(&mut self.pending);
            self.steps.push_back(Step::Data(Bytes::from(data)));
        }
    }
}

impl Stream for Script {
    type Item = Result<Bytes, Cut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self
                .shutdown
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled)
            {
                self.steps.clear();
                self.sleep = None;
                self.shutdown = None;
                return Poll::Ready(Some(Err(Cut)));
            }
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.steps.pop_front() {
                None => return Poll::Ready(None),
                Some(Step::Data(bytes)) => return Poll::Ready(Some(Ok(bytes))),
                Some(Step::Sleep(duration)) => {
                    self.sleep = Some(Box::pin(tokio::time::sleep(duration)));
                }
                Some(Step::Flush) => {
                    // Give hyper a turn to write out the buffered chunks before the cut.
                    self.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_millis(5))));
                }
                Some(Step::Cut) => return Poll::Ready(Some(Err(Cut))),
            }
        }
    }
}
