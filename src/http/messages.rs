//! Chat turns at the edge: send a message (SSE or a settled answer), watch a thread's events
//! with resume, cancel a turn, summarize now.
//!
//! The edge never runs the turn: it asks the user's session to start it and then only reads the
//! thread's event log. A client that disconnects drops its reader and nothing else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use chorus_actors::provider::ProviderError;
use chorus_actors::session::SendMessage;
use chorus_actors::session::events::EventRecord;
use chorus_actors::session::turn::FirstOutcome;
use chorus_cluster::turn_events;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::Reply;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Body, Ctx, json_response};
use super::error::{ApiError, ErrorCode, set_rate_limit_headers};
use super::validate;
use super::views::MessageView;

fn ids(thread: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(thread).map_err(|_| ApiError::not_found("thread"))
}

/// A provider failure before any output, as an HTTP error.
pub fn provider_error(error: &ProviderError) -> ApiError {
    let details = json!({
        "class": error.class(),
        "retryable": error.retryable(),
        "retry_after": error.retry_after().map(|d| d.as_secs_f64().ceil() as u64),
    });
    match error {
        ProviderError::ContextTooLong { .. } => ApiError::new(
            ErrorCode::Validation,
            "the message and its context exceed the model's context window",
        ),
        ProviderError::RateLimited { retry_after, .. } => ApiError::rate_limited(
            chorus_actors::quota::Decision {
                allowed: false,
                limit: 0,
                remaining: 0,
                reset_after: retry_after.unwrap_or(Duration::from_secs(1)),
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            },
            "the model provider is rate limiting; retry later",
        ),
        other => ApiError::new(
            ErrorCode::ProviderError,
            format!("model provider failed: {other}"),
        ),
    }
    .with_details(details)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    content: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    web_search: Option<bool>,
    #[serde(default)]
    document_ids: Option<Vec<String>>,
}

pub async fn send(ctx: Ctx, thread: String, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let thread_id = ids(&thread)?;
    let body: SendBody = ctx.json(body).await?;
    let mut send = validate_send(
        &ctx,
        body.content,
        body.model,
        body.models,
        body.temperature,
        body.max_tokens,
    )?;
    reject_unsupported(body.web_search)?;
    attach_documents(&ctx, &mut send, body.document_ids).await?;
    let stream = body.stream.unwrap_or(true);
    let started = ctx
        .state
        .homes
        .start_turn(principal.user_id, thread_id, send, true)
        .await
        .map_err(|e| ApiError::from_session(e, "thread"))?;
    let rate_limit = started.rate_limit;

    // The home peeks at the first outcome before the edge commits to a 200: a provider that
    // fails before any output gets a real status code (STYLE.md, habit 6).
    if let Some(FirstOutcome::AllFailed(error)) = &started.first_outcome {
        return Err(provider_error(error)
            .with_detail("user_message_id", json!(started.user_message.id))
            .with_detail("turn_id", json!(started.turn_id)));
    }

    let events = turn_events(started.events, started.turn_id);
    if stream {
        let mut response = sse_response(events, ctx.state.config.keep_alive);
        set_rate_limit_headers(&mut response, &rate_limit);
        return Ok(response);
    }

    // Not streaming: wait for the turn to settle, then answer with the stored messages.
    events.for_each(|_| futures_util::future::ready(())).await;
    let store = &ctx.state.store;
    let mut assistant = Vec::with_capacity(started.assistant_messages.len());
    for placeholder in &started.assistant_messages {
        if let Some(message) = store
            .get_message(principal.user_id, thread_id, placeholder.id)
            .await?
        {
            assistant.push(message);
        }
    }
    let views: Vec<MessageView> = assistant.iter().map(MessageView::from).collect();
    let mut response = json_response(
        StatusCode::OK,
        &json!({
            "turn_id": started.turn_id,
            "user_message": MessageView::from(&started.user_message),
            "assistant_messages": views,
        }),
    );
    set_rate_limit_headers(&mut response, &rate_limit);
    Ok(response)
}

/// Web search arrives with a later issue; until then asking for it is an error, not a silent
/// no-op.
pub fn reject_unsupported(web_search: Option<bool>) -> Result<(), ApiError> {
    if web_search == Some(true) {
        return Err(ApiError::field(
            "web_search",
            "web search is not available on this server yet",
        ));
    }
    Ok(())
}

/// Most documents one message may name before the tier's own limit is even looked at.
const DOCUMENTS_PER_MESSAGE_MAX: usize = 100;

/// Attaches `document_ids` to a message — for `POST …/messages` and the WebSocket's `send` alike:
/// ids checked (an id that is no document id is a 404, as any other resource), duplicates
/// dropped, and the message embedded for retrieval among them. Whether each is the user's and
/// `ready` is the session's check when the turn starts.
pub async fn attach_documents(
    ctx: &Ctx,
    send: &mut SendMessage,
    document_ids: Option<Vec<String>>,
) -> Result<(), ApiError> {
    let Some(raw) = document_ids.filter(|ids| !ids.is_empty()) else {
        return Ok(());
    };
    if raw.len() > DOCUMENTS_PER_MESSAGE_MAX {
        return Err(ApiError::field(
            "document_ids",
            format!("at most {DOCUMENTS_PER_MESSAGE_MAX} documents"),
        ));
    }
    let mut ids = Vec::with_capacity(raw.len());
    for id in raw {
        let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("document"))?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    send.document_ids = ids;
    if let Some(embedder) = &ctx.state.embedder {
        match embedder.embed(std::slice::from_ref(&send.content)).await {
            Ok(mut vectors) => send.query_embedding = vectors.pop(),
            Err(e) => {
                tracing::warn!(error = %e, "embedding a message failed; retrieving lexically")
            }
        }
    }
    Ok(())
}

/// Validates the fields a message shares between the native and WebSocket APIs.
pub fn validate_send(
    ctx: &Ctx,
    content: String,
    model: Option<String>,
    models: Option<Vec<String>>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
) -> Result<SendMessage, ApiError> {
    let max_chars = ctx.state.config.limits.message_max_chars;
    if content.trim().is_empty() {
        return Err(ApiError::field("content", "must not be empty"));
    }
    if content.chars().count() > max_chars {
        return Err(ApiError::field(
            "content",
            format!("must be at most {max_chars} characters"),
        ));
    }
    if model.is_some() && models.is_some() {
        return Err(ApiError::validation(
            "give either `model` or `models`, not both",
        ));
    }
    let mut list = Vec::new();
    for m in models.unwrap_or_default().into_iter().chain(model) {
        if let Some(valid) = validate::model("model", Some(m))? {
            list.push(valid);
        }
    }
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::field("temperature", "must be between 0 and 2"));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::field("max_tokens", "must be at least 1"));
    }
    Ok(SendMessage {
        content,
        models: list,
        max_tokens,
        temperature,
        document_ids: Vec::new(),
        query_embedding: None,
    })
}

/// SSE framing: `id:` the sequence number, `event:` the name, `data:` the JSON; keep-alive
/// comments while quiet.
fn sse_response<S>(events: S, keep_alive: Duration) -> Response
where
    S: Stream<Item = Arc<EventRecord>> + Send + 'static,
{
    let frames = events.map(|event| {
        Ok::<_, Infallible>(
            warp::sse::Event::default()
                .id(event.seq.to_string())
                .event(event.name)
                .data(event.data.as_str()),
        )
    });
    let stream = warp::sse::keep_alive()
        .interval(keep_alive)
        .text("keep-alive")
        .stream(sync_wrapper::SyncStream::new(frames));
    let mut response = warp::sse::reply(stream).into_response();
    // Proxies (nginx) must not buffer a live stream.
    response.headers_mut().insert(
        "x-accel-buffering",
        warp::http::HeaderValue::from_static("no"),
    );
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    after: Option<u64>,
    /// WebSocket-style token in the query, for EventSource clients that cannot set headers.
    #[serde(default)]
    access_token: Option<String>,
}

pub async fn events(ctx: Ctx, thread: String) -> Result<Response, ApiError> {
    let query: EventsQuery = ctx.query()?;
    let principal = match &query.access_token {
        Some(token) if ctx.headers.get("authorization").is_none() => {
            ctx.authenticate_token(token)?
        }
        _ => ctx.authenticate()?,
    };
    let thread_id = ids(&thread)?;
    let last_event_id = ctx
        .headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::validation("Last-Event-ID must be an event id"))
        })
        .transpose()?;
    let subscription = ctx
        .state
        .homes
        .subscribe(principal.user_id, thread_id, last_event_id.or(query.after))
        .await
        .map_err(|e| ApiError::from_session(e, "thread"))?;
    Ok(sse_response(
        subscription.events,
        ctx.state.config.keep_alive,
    ))
}

pub async fn cancel(ctx: Ctx, thread: String, turn: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let thread_id = ids(&thread)?;
    let turn_id = Uuid::parse_str(&turn).map_err(|_| ApiError::not_found("turn"))?;
    ctx.state
        .homes
        .cancel_turn(principal.user_id, thread_id, turn_id)
        .await
        .map_err(|e| ApiError::from_session(e, "live turn"))?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "turn_id": turn_id, "status": "cancelling" }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SummarizeBody {
    #[serde(default)]
    model: Option<String>,
}

pub async fn summarize(ctx: Ctx, thread: String, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let thread_id = ids(&thread)?;
    let body: SummarizeBody = ctx.json(body).await?;
    let model = validate::model("model", body.model)?;
    let summary = ctx
        .state
        .homes
        .summarize(principal.user_id, thread_id, model)
        .await
        .map_err(|e| ApiError::from_session(e, "thread"))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "summary": summary.text,
            "model": summary.model,
            "covers_until": (!summary.covers_until.is_nil()).then_some(summary.covers_until),
        }),
    ))
}
